//! Storage: one trait, one module per backend.
//!
//! Stores speak documents, revisions and pages; they know nothing of gRPC. Their
//! inputs are already validated by the API layer (collection names, ids, JSON).
//! Every decision that does not depend on the database (the conditions of a
//! write, the shape of a page) is made here once; a backend only fetches the
//! facts (the stored rev, the rows) and applies the outcome.

use async_trait::async_trait;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

pub mod memory;
pub mod postgres;
pub mod sqlite;

pub use memory::MemoryStore;
pub use postgres::{Declared, PgTarget, PgTls, PostgresStore, SslMode};
pub use sqlite::{SqliteStore, SqliteTarget};

/// The pattern of collection names (and PostgreSQL schema names): the only
/// names that ever reach SQL as identifiers.
pub const NAME_PATTERN: &str = "^[a-z][a-z0-9_]{0,62}$";

/// [`NAME_PATTERN`] in words, for error messages.
pub const NAME_RULE: &str = "names match ^[a-z][a-z0-9_]{0,62}$: a lowercase ASCII letter, then up to 62 lowercase letters, digits or underscores";

/// Whether `name` matches [`NAME_PATTERN`].
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

/// What a service's database role may do to a collection's table: resolved
/// from a policy's access by `config`, so that stores never import the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// SELECT, INSERT, UPDATE, DELETE.
    ReadWrite,
    /// SELECT.
    ReadOnly,
}

impl Grant {
    /// The SQL privileges this access needs, in a fixed order.
    pub fn privileges(self) -> &'static [&'static str] {
        match self {
            Grant::ReadWrite => &["SELECT", "INSERT", "UPDATE", "DELETE"],
            Grant::ReadOnly => &["SELECT"],
        }
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

impl Mutation {
    pub fn collection(&self) -> &str {
        match self {
            Mutation::Save(op) => &op.collection,
            Mutation::Delete(op) => &op.collection,
        }
    }

    pub fn id(&self) -> &str {
        match self {
            Mutation::Save(op) => &op.id,
            Mutation::Delete(op) => &op.id,
        }
    }
}

/// What a successful save did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Saved {
    pub rev: String,
    pub update_time: Micros,
    /// True for an insert, false for a replacement.
    pub created: bool,
}

/// The outcome of one mutation of a write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    Saved(Saved),
    Deleted,
}

/// One page of a collection in id order.
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub documents: Vec<Document>,
    /// True when documents follow the last one of this page.
    pub more: bool,
}

impl Page {
    /// How many rows to fetch for a page of `limit`: one more tells whether
    /// another page follows.
    pub fn fetch_limit(limit: usize) -> usize {
        limit.saturating_add(1)
    }

    /// The page made of rows fetched with [`Page::fetch_limit`].
    pub fn from_rows(mut documents: Vec<Document>, limit: usize) -> Page {
        let more = documents.len() > limit;
        documents.truncate(limit);
        Page { documents, more }
    }
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

    /// The error of a one-mutation write run on behalf of a plain call.
    pub fn outside_mutation(self) -> StoreError {
        match self {
            StoreError::InMutation { source, .. } => *source,
            e => e,
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Checks a stored rev (`None`: absent) against an expected one.
fn expect_rev(
    collection: &str,
    id: &str,
    expected: &Option<String>,
    stored: Option<&str>,
) -> StoreResult<()> {
    match expected {
        Some(expected) if stored != Some(expected.as_str()) => Err(StoreError::RevMismatch {
            collection: collection.into(),
            id: id.into(),
            expected: expected.into(),
            actual: stored.map(Into::into),
        }),
        _ => Ok(()),
    }
}

impl SaveOp {
    /// Decides the conditions of this save against the stored rev (`None`:
    /// absent), read inside the writing transaction. Stores whose statement
    /// decides the condition itself call it when the statement matched no row,
    /// to say why.
    pub fn check(&self, stored_rev: Option<&str>) -> StoreResult<()> {
        if self.create_only && stored_rev.is_some() {
            return Err(StoreError::already_exists(&self.collection, &self.id));
        }
        expect_rev(&self.collection, &self.id, &self.expected_rev, stored_rev)
    }
}

impl DeleteOp {
    /// Decides the conditions of this delete against the stored rev (`None`:
    /// absent); see [`SaveOp::check`].
    pub fn check(&self, stored_rev: Option<&str>) -> StoreResult<()> {
        if stored_rev.is_none() {
            return Err(StoreError::not_found(&self.collection, &self.id));
        }
        expect_rev(&self.collection, &self.id, &self.expected_rev, stored_rev)
    }
}

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

/// Which store to open, with everything it needs: resolved once from the
/// command line (see `config`), never by the stores themselves.
#[derive(Debug, Clone)]
pub enum Target {
    Memory,
    Sqlite(SqliteTarget),
    Postgres(Box<PgTarget>),
}

impl std::fmt::Display for Target {
    /// Where the store is, without credentials.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Memory => f.write_str("memory"),
            Target::Sqlite(t) => write!(f, "sqlite ({t})"),
            Target::Postgres(t) => write!(f, "postgresql ({t})"),
        }
    }
}

/// Opens the store `target` names, applying its schema migrations. Background
/// work a store needs (password rotation) runs in `tasks`.
pub async fn open(
    target: &Target,
    tasks: &crate::background::Tasks,
) -> StoreResult<Arc<dyn DocumentStore>> {
    tracing::info!(database = %target, "opening store");
    Ok(match target {
        Target::Memory => Arc::new(MemoryStore::new()),
        Target::Sqlite(t) => Arc::new(SqliteStore::open(t).await?),
        Target::Postgres(t) => Arc::new(PostgresStore::connect(t, tasks).await?),
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn save(expected_rev: Option<&str>, create_only: bool) -> SaveOp {
        SaveOp {
            collection: "c".into(),
            id: "a".into(),
            data: "{}".into(),
            expected_rev: expected_rev.map(Into::into),
            create_only,
        }
    }

    #[test]
    fn save_and_delete_conditions() {
        assert!(save(None, false).check(None).is_ok());
        assert!(save(None, false).check(Some("r1")).is_ok());
        assert!(matches!(
            save(None, true).check(Some("r1")),
            Err(StoreError::AlreadyExists { .. })
        ));
        assert!(save(Some("r1"), false).check(Some("r1")).is_ok());
        assert!(matches!(
            save(Some("r1"), false).check(None),
            Err(StoreError::RevMismatch { actual: None, .. })
        ));
        let delete = |expected: Option<&str>| DeleteOp {
            collection: "c".into(),
            id: "a".into(),
            expected_rev: expected.map(Into::into),
        };
        assert!(matches!(
            delete(None).check(None),
            Err(StoreError::NotFound { .. })
        ));
        assert!(matches!(
            delete(Some("r1")).check(None),
            Err(StoreError::NotFound { .. })
        ));
        assert!(delete(Some("r1")).check(Some("r1")).is_ok());
        assert!(matches!(
            delete(Some("r1")).check(Some("r2")),
            Err(StoreError::RevMismatch {
                actual: Some(_),
                ..
            })
        ));
    }

    #[test]
    fn pages_fetch_one_more() {
        let doc = |id: &str| Document {
            collection: "c".into(),
            id: id.into(),
            rev: "r".into(),
            data: "{}".into(),
            create_time: 0,
            update_time: 0,
        };
        assert_eq!(Page::fetch_limit(2), 3);
        let page = Page::from_rows(vec![doc("a"), doc("b"), doc("c")], 2);
        assert!(page.more);
        assert_eq!(page.documents.len(), 2);
        assert!(!Page::from_rows(vec![doc("a")], 2).more);
    }
}
