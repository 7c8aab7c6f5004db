//! Storage: one trait, one module per backend.
//!
//! Stores speak documents, revisions and pages; they know nothing of gRPC. Their
//! inputs are already validated by the API layer (collection names, ids, JSON).

use async_trait::async_trait;
use std::time::{SystemTime, UNIX_EPOCH};

pub mod memory;
pub mod postgres;
pub mod postgres_migrate;
pub mod sqlite;

pub use memory::MemoryStore;
pub use postgres::{PgOptions, PostgresStore};
pub use sqlite::SqliteStore;

/// The rule for collection (and PostgreSQL schema) names, `^[a-z][a-z0-9_]{0,62}$`:
/// the only names that ever reach SQL as identifiers.
pub fn is_valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    match bytes.split_first() {
        Some((first, rest)) => {
            bytes.len() <= 63
                && first.is_ascii_lowercase()
                && rest
                    .iter()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_')
        }
        None => false,
    }
}

/// Microseconds since the Unix epoch.
pub type Micros = i64;

/// A stored document. `data` is the JSON text of an object.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    pub collection: String,
    pub id: String,
    pub rev: String,
    pub data: String,
    pub create_time: Micros,
    pub update_time: Micros,
}

/// Creates or replaces one document.
#[derive(Debug, Clone)]
pub struct SaveOp {
    pub collection: String,
    pub id: String,
    /// JSON text of an object.
    pub data: String,
    /// Write only if the stored rev equals this one (the document must exist).
    pub expected_rev: Option<String>,
    /// Write only if the document does not exist.
    pub create_only: bool,
}

/// Deletes one document.
#[derive(Debug, Clone)]
pub struct DeleteOp {
    pub collection: String,
    pub id: String,
    /// Delete only if the stored rev equals this one.
    pub expected_rev: Option<String>,
}

/// One mutation of an atomic [`DocumentStore::write`].
#[derive(Debug, Clone)]
pub enum Mutation {
    Save(SaveOp),
    Delete(DeleteOp),
}

/// What a successful save did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Saved {
    pub rev: String,
    pub update_time: Micros,
    /// True for an insert, false for a replacement.
    pub created: bool,
}

/// The result of one mutation of a write: the new rev of a save, `None` for a delete.
pub type Written = Option<Saved>;

/// One page of a collection in id order.
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub documents: Vec<Document>,
    /// True when documents follow the last one of this page.
    pub more: bool,
}

/// Everything that can go wrong in a store, in terms a caller can act on.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("document `{id}` not found in collection `{collection}`")]
    NotFound { collection: String, id: String },
    #[error("document `{id}` already exists in collection `{collection}`")]
    AlreadyExists { collection: String, id: String },
    /// A conditional write whose `expected_rev` did not match (or the document is absent).
    #[error("{}", rev_mismatch(.collection, .id, .expected, .actual.as_deref()))]
    RevMismatch {
        collection: String,
        id: String,
        expected: String,
        actual: Option<String>,
    },
    /// The collection may not be created or written by this sidecar's database account.
    #[error("{0}")]
    PermissionDenied(String),
    /// The database cannot be reached or no connection was free in time; retrying is safe.
    #[error("{0}")]
    Unavailable(String),
    /// A failure inside one mutation of an atomic write; nothing was applied.
    #[error("mutation {index}: {source}")]
    InMutation {
        index: usize,
        #[source]
        source: Box<StoreError>,
    },
    /// A fault of the store itself (corruption, a bug); not the caller's doing.
    #[error("{0}")]
    Internal(String),
}

fn rev_mismatch(collection: &str, id: &str, expected: &str, actual: Option<&str>) -> String {
    match actual {
        Some(actual) => format!(
            "document `{id}` in collection `{collection}` has rev `{actual}`, not the expected `{expected}`: read it again and retry"
        ),
        None => format!(
            "document `{id}` in collection `{collection}` does not exist, so it cannot have the expected rev `{expected}`"
        ),
    }
}

impl StoreError {
    /// Checks a stored rev against an expected one, inside the writing transaction.
    pub fn check_rev(
        collection: &str,
        id: &str,
        expected: Option<&str>,
        actual: Option<&str>,
    ) -> Result<(), StoreError> {
        match expected {
            Some(expected) if actual != Some(expected) => Err(StoreError::RevMismatch {
                collection: collection.into(),
                id: id.into(),
                expected: expected.into(),
                actual: actual.map(Into::into),
            }),
            _ => Ok(()),
        }
    }

    pub fn not_found(collection: &str, id: &str) -> StoreError {
        StoreError::NotFound {
            collection: collection.into(),
            id: id.into(),
        }
    }

    pub fn already_exists(collection: &str, id: &str) -> StoreError {
        StoreError::AlreadyExists {
            collection: collection.into(),
            id: id.into(),
        }
    }

    pub fn in_mutation(self, index: usize) -> StoreError {
        StoreError::InMutation {
            index,
            source: Box::new(self),
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// The storage backend behind the DocumentService.
#[async_trait]
pub trait DocumentStore: Send + Sync + 'static {
    async fn get(&self, collection: &str, id: &str) -> StoreResult<Document>;

    /// Upsert, honouring `expected_rev` and `create_only` in the same transaction.
    async fn save(&self, op: SaveOp) -> StoreResult<Saved>;

    async fn delete(&self, op: DeleteOp) -> StoreResult<()>;

    /// Up to `limit` documents with ids greater than `after`, in id (byte) order.
    async fn list(&self, collection: &str, after: Option<&str>, limit: usize) -> StoreResult<Page>;

    /// The documents that exist among `ids`, in any order.
    async fn batch_get(&self, collection: &str, ids: &[String]) -> StoreResult<Vec<Document>>;

    /// Applies all mutations in one transaction, or none of them. A failure is
    /// reported as [`StoreError::InMutation`] naming the first failing mutation.
    async fn write(&self, mutations: Vec<Mutation>) -> StoreResult<Vec<Written>>;

    /// Names of the collections that exist, sorted.
    async fn list_collections(&self) -> StoreResult<Vec<String>>;

    /// Succeeds when the database answers.
    async fn ping(&self) -> StoreResult<()>;

    /// Flushes and releases resources at shutdown.
    async fn close(&self);

    /// Connection pool figures, for metrics.
    fn pool_stats(&self) -> PoolStats {
        PoolStats::default()
    }
}

/// Connection pool figures at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Connections the pool may hold.
    pub max: usize,
    /// Connections open now.
    pub open: usize,
    /// Open connections not in use.
    pub idle: usize,
    /// Calls waiting for a connection.
    pub waiting: usize,
}

/// Records how long a call waited for a connection.
pub fn record_acquire(started: std::time::Instant) {
    metrics::histogram!("docsidecar_pool_acquire_seconds").record(started.elapsed().as_secs_f64());
}

impl SaveOp {
    /// Decides the conditions of this save against the stored rev (`None`: absent),
    /// for stores that read it inside the writing transaction.
    pub fn check(&self, stored_rev: Option<&str>) -> StoreResult<()> {
        if self.create_only && stored_rev.is_some() {
            return Err(StoreError::already_exists(&self.collection, &self.id));
        }
        StoreError::check_rev(
            &self.collection,
            &self.id,
            self.expected_rev.as_deref(),
            stored_rev,
        )
    }
}

/// A new revision: unique, and different on every write of a document.
pub fn new_rev() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

/// A new document id: unique and sortable by creation time (UUIDv7, lowercase).
pub fn new_id() -> String {
    uuid::Uuid::now_v7().hyphenated().to_string()
}

pub fn now_micros() -> Micros {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as Micros)
}
