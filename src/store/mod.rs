//! Storage: one trait, one module per backend.
//!
//! Stores speak documents, revisions and pages; they know nothing of gRPC. Their
//! inputs are already validated by the API layer (collection names, ids, JSON).
//! Every decision that does not depend on the database is made here once:
//! [`plan`] decides what a write does from what is stored and the time (the
//! conditions, merge patches and transforms, expiry, protected fields); a
//! backend only fetches the facts inside its transaction and applies the plan.
//!
//! - [`path`]: field paths; [`value`]: the value rules (order, equality);
//!   [`update`]: merge patches and transforms; [`plan`]: the write planner;
//!   [`key`]: order-preserving keys of values; [`query`]: queries and the
//!   index rule; [`protect`]: read-only and hidden fields;
//! - [`memory`], [`sqlite`], [`postgres`], [`mysql`]: the backends;
//!   [`tls`]: TLS settings of networked databases; [`migrate`]: what
//!   `docsidecar migrate` applies.

use async_trait::async_trait;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

pub mod changes;
mod error;
pub mod key;
pub mod memory;
pub mod migrate;
pub mod mysql;
pub mod path;
pub mod plan;
pub mod postgres;
mod protect;
pub mod query;
pub mod sql;
pub mod sqlite;
#[cfg(test)]
pub(crate) mod testing;
pub mod tls;
pub mod update;
pub mod value;

pub use error::{Precondition, Protection, StoreError, StoreResult, Unavailable};
pub use memory::MemoryStore;
pub use migrate::{Grant, MigratePlan};
pub use mysql::{MysqlStore, MysqlTarget};
pub use path::FieldPath;
pub use postgres::{Declared, PgTarget, PostgresStore};
pub use protect::Protected;
pub use sqlite::{SqliteStore, SqliteTarget};
pub use update::{Transform, TransformOp};

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

/// Microseconds since the Unix epoch.
pub type Micros = i64;

/// Nesting allowed in a document: objects and arrays, the document itself
/// counting as level 1 (Firestore's limit).
pub const MAX_DEPTH: usize = 20;

/// Where a document lives: its collection, its row scope (empty for
/// collections without row scopes) and its id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub collection: String,
    pub scope: String,
    pub id: String,
}

impl Key {
    pub fn new(
        collection: impl Into<String>,
        scope: impl Into<String>,
        id: impl Into<String>,
    ) -> Key {
        Key {
            collection: collection.into(),
            scope: scope.into(),
            id: id.into(),
        }
    }
}

/// A stored document. `data` is the JSON text of an object.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    pub key: Key,
    pub rev: String,
    pub data: String,
    pub create_time: Micros,
    pub update_time: Micros,
    /// When it expires; `None`: never.
    pub expire_time: Option<Micros>,
}

impl Document {
    /// Whether the document is still there at `now`: expired means absent.
    pub fn is_live(&self, now: Micros) -> bool {
        self.expire_time.is_none_or(|t| t > now)
    }
}

/// When a written document expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// Keep the stored expiry (an Update without one).
    Keep,
    /// Never (a Save without one clears an earlier expiry).
    Never,
    /// At this instant; it must be in the future.
    At(Micros),
    /// This long after the write; positive.
    After(Micros),
}

/// Creates or replaces one document.
#[derive(Debug, Clone)]
pub struct SaveOp {
    pub key: Key,
    /// JSON text of an object.
    pub data: String,
    /// Write only if the stored rev equals this one (the document must exist).
    pub expected_rev: Option<String>,
    /// Write only if the document does not exist.
    pub create_only: bool,
    pub expiry: Expiry,
    pub protected: Arc<Protected>,
}

/// Changes part of one document: a merge patch, then transforms.
#[derive(Debug, Clone)]
pub struct UpdateOp {
    pub key: Key,
    /// An RFC 7396 merge patch (a JSON object), applied first.
    pub merge: Option<serde_json::Value>,
    pub transforms: Vec<Transform>,
    /// Write only if the stored rev equals this one (the document must exist).
    pub expected_rev: Option<String>,
    /// Create an absent document from `{}`.
    pub allow_missing: bool,
    pub expiry: Expiry,
    pub protected: Arc<Protected>,
    /// The largest result accepted, in bytes of JSON.
    pub max_bytes: usize,
}

/// Deletes one document.
#[derive(Debug, Clone)]
pub struct DeleteOp {
    pub key: Key,
    /// Delete only if the stored rev equals this one.
    pub expected_rev: Option<String>,
    /// Deleting an absent document succeeds.
    pub allow_missing: bool,
}

/// One mutation of an atomic [`DocumentStore::write`].
#[derive(Debug, Clone)]
pub enum Mutation {
    Save(SaveOp),
    Update(UpdateOp),
    Delete(DeleteOp),
}

impl Mutation {
    pub fn key(&self) -> &Key {
        match self {
            Mutation::Save(op) => &op.key,
            Mutation::Update(op) => &op.key,
            Mutation::Delete(op) => &op.key,
        }
    }

    pub fn collection(&self) -> &str {
        &self.key().collection
    }

    pub fn id(&self) -> &str {
        &self.key().id
    }
}

/// What a successful save or update did.
#[derive(Debug, Clone, PartialEq)]
pub struct Saved {
    /// The document as stored by this write.
    pub document: Document,
    /// True for an insert (the document was absent or expired).
    pub created: bool,
}

/// The outcome of one mutation of a write.
#[derive(Debug, Clone, PartialEq)]
pub enum Written {
    Saved(Saved),
    /// Deleted, or absent already (`allow_missing`).
    Deleted,
}

/// The largest response a read builds, as the API counts it: each document
/// costs `cost(doc)` (its encoded size); a page or batch stops before the
/// document that would exceed `bytes`, but always holds at least one. Stores
/// apply it while they read rows, so it bounds what they hold, not only what
/// is sent.
#[derive(Clone, Copy)]
pub struct Budget {
    pub bytes: usize,
    pub cost: fn(&Document) -> usize,
}

impl Budget {
    /// No limit (tests, internal reads).
    pub fn unlimited() -> Budget {
        Budget {
            bytes: usize::MAX,
            cost: |_| 0,
        }
    }

    /// A running total of documents taken under this budget.
    pub fn start(self) -> Spending {
        Spending {
            budget: self,
            spent: 0,
            taken: 0,
        }
    }
}

impl std::fmt::Debug for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Budget({} bytes)", self.bytes)
    }
}

/// Documents taken so far under a [`Budget`].
pub struct Spending {
    budget: Budget,
    spent: usize,
    taken: usize,
}

impl Spending {
    /// Takes `doc` if it fits (the first always does); false means stop.
    pub fn take(&mut self, doc: &Document) -> bool {
        let cost = (self.budget.cost)(doc);
        if self.taken > 0 && self.spent.saturating_add(cost) > self.budget.bytes {
            return false;
        }
        self.spent = self.spent.saturating_add(cost);
        self.taken += 1;
        true
    }
}

/// Which rows of a scoped collection a read sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scopes {
    /// One scope (the empty scope of an unscoped collection included).
    One(String),
    /// Every scope: a multi-scope (reporting) reader, in (id, scope) order.
    All,
}

/// One page of a collection in (id, scope) order.
#[derive(Debug, Clone)]
pub struct ListOp {
    pub collection: String,
    pub scopes: Scopes,
    /// The (id, scope) of the previous page's last document.
    pub after: Option<(String, String)>,
    pub limit: usize,
}

/// Documents of one collection and scope, by id.
#[derive(Debug, Clone)]
pub struct BatchGetOp {
    pub collection: String,
    pub scope: String,
    /// Distinct ids, in the order they are looked up.
    pub ids: Vec<String>,
}

/// One page of documents.
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

    /// A page from rows read in order: up to `limit` that fit the budget. Rows
    /// are taken one at a time, so a store that feeds them from a cursor stops
    /// reading at the budget.
    pub fn collect<E>(
        rows: impl IntoIterator<Item = Result<Document, E>>,
        limit: usize,
        budget: Budget,
    ) -> Result<Page, E> {
        let mut page = PageBuilder::new(limit, budget);
        for row in rows {
            if !page.push(row?) {
                break;
            }
        }
        Ok(page.finish())
    }
}

/// A page in the making, for stores that read rows from a stream.
pub struct PageBuilder {
    page: Page,
    limit: usize,
    spending: Spending,
}

impl PageBuilder {
    pub fn new(limit: usize, budget: Budget) -> PageBuilder {
        PageBuilder {
            page: Page::default(),
            limit,
            spending: budget.start(),
        }
    }

    /// Adds the next row in order; false means the page is full (the row
    /// belongs to the next page) and reading should stop.
    pub fn push(&mut self, doc: Document) -> bool {
        if self.page.documents.len() == self.limit || !self.spending.take(&doc) {
            self.page.more = true;
            return false;
        }
        self.page.documents.push(doc);
        true
    }

    pub fn finish(self) -> Page {
        self.page
    }
}

/// The documents a batch found, and how many of the request's ids it looked
/// up (the rest did not fit the budget).
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub documents: Vec<Document>,
    pub looked_up: usize,
}

impl Batch {
    /// A batch read in one statement, rows in request order: every id counts
    /// as looked up unless [`Batch::take`] stops at the budget.
    pub fn in_one_statement(ids: usize) -> Batch {
        Batch {
            documents: Vec::new(),
            looked_up: ids,
        }
    }

    /// Takes `doc`, found for the request's `n`th id (from 1), if it fits the
    /// budget; false once it does not, and then only the ids before count.
    pub fn take(&mut self, spending: &mut Spending, doc: Document, n: i64) -> bool {
        if !spending.take(&doc) {
            self.looked_up = usize::try_from(n - 1).unwrap_or(0);
            return false;
        }
        self.documents.push(doc);
        true
    }

    /// Adds the documents found for `ids`, the next ids of the request in
    /// order (`found` in any order, absent ones missing), while they fit the
    /// budget; false once it is reached (the rest is not looked up).
    pub fn add(&mut self, spending: &mut Spending, ids: &[String], found: Vec<Document>) -> bool {
        let mut by_id: std::collections::HashMap<String, Document> =
            found.into_iter().map(|d| (d.key.id.clone(), d)).collect();
        for id in ids {
            if let Some(doc) = by_id.remove(id) {
                if !spending.take(&doc) {
                    return false;
                }
                self.documents.push(doc);
            }
            self.looked_up += 1;
        }
        true
    }
}

/// The time as stores see it: the system clock (embedded stores) or the
/// database's (networked stores), plus an offset that tests move to cross an
/// expiry without waiting.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    offset: Arc<AtomicI64>,
}

impl Clock {
    /// The system clock, shifted by the offset.
    pub fn now(&self) -> Micros {
        now_micros() + self.offset()
    }

    /// What tests added to the base clock, in microseconds.
    pub fn offset(&self) -> Micros {
        self.offset.load(Ordering::Relaxed)
    }

    /// Moves this clock (and every store sharing it) forward.
    pub fn advance(&self, by: Micros) {
        self.offset.fetch_add(by, Ordering::Relaxed);
    }
}

/// The storage backend behind the DocumentService.
#[async_trait]
pub trait DocumentStore: Send + Sync + 'static {
    /// The live document at `key`, or NotFound.
    async fn get(&self, key: &Key) -> StoreResult<Document>;

    /// Applies all mutations in one transaction, or none of them. A failure is
    /// reported as [`StoreError::InMutation`] naming the first failing mutation.
    async fn write(&self, mutations: Vec<Mutation>) -> StoreResult<Vec<Written>>;

    /// Live documents after `op.after` in (id, scope) order, up to the limit
    /// and the budget.
    async fn list(&self, op: &ListOp, budget: Budget) -> StoreResult<Page>;

    /// The live documents among `op.ids`, looked up in order until the budget.
    async fn batch_get(&self, op: &BatchGetOp, budget: Budget) -> StoreResult<Batch>;

    /// Live documents that match the query's filters, in its order, after its
    /// cursor, up to the limit and the budget.
    async fn query(&self, query: &query::Query, budget: Budget) -> StoreResult<Page>;

    /// How many live documents match the query's filters (order and limit
    /// are ignored).
    async fn count(&self, query: &query::Query) -> StoreResult<u64>;

    /// Deletes up to `limit` expired documents, recording an EXPIRED change
    /// for each in the same transaction; how many it deleted. The one place
    /// that removes expired rows (besides a write over one).
    async fn reap_expired(&self, limit: usize) -> StoreResult<usize>;

    /// Committed changes after a position, in position (commit) order.
    async fn changes(&self, op: &changes::ChangesOp) -> StoreResult<changes::Changes>;

    /// The feed's oldest resumable and newest positions, and its identity.
    async fn feed_bounds(&self) -> StoreResult<changes::FeedBounds>;

    /// [`DocumentStore::feed_bounds`] with a head that covers every change
    /// committed before the call ("from now"), where numbering lags commits.
    async fn feed_now(&self) -> StoreResult<changes::FeedBounds> {
        self.feed_bounds().await
    }

    /// Deletes up to `limit` changes committed before `before` (retention);
    /// how many it deleted.
    async fn prune_changes(&self, before: Micros, limit: usize) -> StoreResult<usize>;

    /// Wake-ups for watchers when changes may have been committed.
    fn wakeups(&self) -> changes::Wakeups;

    /// Names of the collections that exist, sorted.
    async fn list_collections(&self) -> StoreResult<Vec<String>>;

    /// Whether any row of `collection` has a row scope (a collection never
    /// written has none). Asked only when a multi-scope reader names no scope.
    async fn has_scopes(&self, collection: &str) -> StoreResult<bool>;

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

impl From<deadpool::managed::Status> for PoolStats {
    fn from(status: deadpool::managed::Status) -> PoolStats {
        PoolStats {
            max: status.max_size,
            open: status.size,
            idle: status.available,
            waiting: status.waiting,
        }
    }
}

/// Which store to open, with everything it needs: resolved once from the
/// command line (see `config`), never by the stores themselves.
#[derive(Debug, Clone)]
pub enum Target {
    Memory,
    Sqlite(SqliteTarget),
    Postgres(Box<PgTarget>),
    Mysql(Box<MysqlTarget>),
}

impl std::fmt::Display for Target {
    /// Where the store is, without credentials.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Memory => f.write_str("memory"),
            Target::Sqlite(t) => write!(f, "sqlite ({t})"),
            Target::Postgres(t) => write!(f, "postgresql ({t})"),
            Target::Mysql(t) => write!(f, "mysql ({t})"),
        }
    }
}

/// Opens the store `target` names, applying its schema migrations. Background
/// work a store needs (password rotation) runs in `tasks`; `clock` is the
/// time for expiry (see [`Clock`]).
pub async fn open(
    target: &Target,
    tasks: &crate::background::Tasks,
    clock: Clock,
) -> StoreResult<Arc<dyn DocumentStore>> {
    tracing::info!(database = %target, "opening store");
    Ok(match target {
        Target::Memory => Arc::new(MemoryStore::new(clock)),
        Target::Sqlite(t) => Arc::new(SqliteStore::open(t, clock).await?),
        Target::Postgres(t) => {
            let store = Arc::new(PostgresStore::connect(t, tasks, clock).await?);
            store.start_feed(tasks);
            store
        }
        Target::Mysql(t) => {
            let store = Arc::new(MysqlStore::connect(t, tasks, clock).await?);
            store.start_feed(tasks);
            store
        }
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

/// Store-level checks every backend's unit tests run (the gRPC behaviour
/// suite cannot see what the reaper deleted).
#[cfg(test)]
pub(crate) mod conformance {
    use super::*;

    fn save(id: &str, expiry: Expiry) -> Mutation {
        Mutation::Save(SaveOp {
            key: Key::new("reaped", "", id),
            data: "{}".into(),
            expected_rev: None,
            create_only: false,
            expiry,
            protected: Arc::default(),
        })
    }

    /// Expired rows go in batches of the asked size; live ones stay.
    pub async fn the_reaper_deletes_expired_rows_in_batches(
        store: &dyn DocumentStore,
        clock: &Clock,
    ) {
        let mut writes: Vec<Mutation> = (0..25)
            .map(|i| save(&format!("e{i:02}"), Expiry::After(1_000_000)))
            .collect();
        writes.push(save("forever", Expiry::Never));
        writes.push(save("later", Expiry::After(3_600_000_000)));
        store.write(writes).await.unwrap();
        assert_eq!(
            store.reap_expired(10).await.unwrap(),
            0,
            "nothing expired yet"
        );
        clock.advance(2_000_000);
        assert_eq!(store.reap_expired(10).await.unwrap(), 10);
        assert_eq!(store.reap_expired(10).await.unwrap(), 10);
        assert_eq!(store.reap_expired(10).await.unwrap(), 5);
        assert_eq!(store.reap_expired(10).await.unwrap(), 0);
        let page = store
            .list(
                &ListOp {
                    collection: "reaped".into(),
                    scopes: Scopes::One(String::new()),
                    after: None,
                    limit: 100,
                },
                Budget::unlimited(),
            )
            .await
            .unwrap();
        let ids: Vec<&str> = page.documents.iter().map(|d| d.key.id.as_str()).collect();
        assert_eq!(ids, ["forever", "later"]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_memory_store_reaps() {
        let clock = Clock::default();
        let store = MemoryStore::new(clock.clone());
        conformance::the_reaper_deletes_expired_rows_in_batches(&store, &clock).await;
    }

    fn doc(id: &str, size: usize) -> Document {
        Document {
            key: Key::new("c", "", id),
            rev: "r".into(),
            data: "x".repeat(size),
            create_time: 0,
            update_time: 0,
            expire_time: None,
        }
    }

    fn cost_of_data(d: &Document) -> usize {
        d.data.len()
    }

    #[test]
    fn pages_stop_at_the_limit_or_the_budget() {
        let budget = Budget {
            bytes: 10,
            cost: cost_of_data,
        };
        let rows = || {
            ["a", "b", "c"]
                .map(|id| Ok::<_, ()>(doc(id, 4)))
                .into_iter()
        };
        let page = Page::collect(rows(), 2, Budget::unlimited()).unwrap();
        assert_eq!((page.documents.len(), page.more), (2, true));
        let page = Page::collect(rows(), 5, budget).unwrap();
        assert_eq!((page.documents.len(), page.more), (2, true));
        let page = Page::collect(rows(), 5, Budget::unlimited()).unwrap();
        assert_eq!((page.documents.len(), page.more), (3, false));
        // One document over the budget still makes a page.
        let big = [Ok::<_, ()>(doc("a", 50)), Ok(doc("b", 1))];
        let page = Page::collect(big, 5, budget).unwrap();
        assert_eq!((page.documents.len(), page.more), (1, true));
    }

    #[test]
    fn batches_keep_request_order_and_stop_at_the_budget() {
        let ids: Vec<String> = ["c", "a", "x", "b"].map(String::from).to_vec();
        let found = vec![doc("a", 6), doc("b", 6), doc("c", 6)];
        let budget = Budget {
            bytes: 13,
            cost: cost_of_data,
        };
        let mut batch = Batch::default();
        assert!(!batch.add(&mut budget.start(), &ids, found));
        let got: Vec<&str> = batch.documents.iter().map(|d| d.key.id.as_str()).collect();
        assert_eq!(got, ["c", "a"]);
        // "x" was looked up (absent); "b" did not fit.
        assert_eq!(batch.looked_up, 3);
    }
}
