//! Embedded SQLite store (rusqlite, bundled SQLite).
//!
//! One `documents` table keyed by (collection, scope, id); see [`schema`].
//! Conditional writes read the stored row and write inside one
//! `BEGIN IMMEDIATE` transaction, deciding through the shared planner.
//!
//! - [`conn`]: the writer, the reader pool, point reads on the worker;
//! - [`schema`]: versioned migrations.

mod commit;
mod conn;
mod feed;
mod queries;
pub mod schema;

use super::plan::{self, Action};
use super::*;
use conn::{configure, ReaderPool};
use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};
use std::time::Duration;

/// Where the database is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SqlitePath {
    File(std::path::PathBuf),
    Memory,
}

/// The SQLite store's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqliteTarget {
    pub path: SqlitePath,
    /// Read-only connections beside the one writer.
    pub readers: usize,
    /// How long a call waits for a connection before UNAVAILABLE.
    pub acquire_timeout: Duration,
    /// The declared query indexes by collection (the policy's `indexes`).
    pub indexes: std::collections::BTreeMap<String, Vec<crate::store::query::Index>>,
    /// Create the index a query needs on first use (development, no policy)
    /// instead of converging to the declared ones.
    pub auto_index: bool,
}

impl std::fmt::Display for SqliteTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.path {
            SqlitePath::File(p) => write!(f, "{}", p.display()),
            SqlitePath::Memory => f.write_str(":memory:"),
        }
    }
}

pub struct SqliteStore {
    writer: Arc<tokio::sync::Mutex<Connection>>,
    /// Read-only connections; `None` for an in-memory database, which each
    /// connection would see as a different database, so reads use the writer.
    readers: Option<Arc<ReaderPool>>,
    acquire_timeout: Duration,
    clock: Clock,
    auto_index: bool,
    /// Indexes created on first use, so each is created once.
    indexed: sql::CreatedIndexes,
    wakeups: changes::Wakeups,
    /// Writes waiting to be committed together.
    queue: commit::Queue,
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        use rusqlite::ErrorCode::*;
        match e.sqlite_error_code() {
            Some(DatabaseBusy | DatabaseLocked) => {
                StoreError::unavailable("the SQLite database is locked by another writer; retry")
            }
            Some(ReadOnly | PermissionDenied) => StoreError::Precondition {
                precondition: Precondition::DatabaseReadOnly,
                message: format!(
                    "the SQLite database cannot be written ({e}): make its file and directory writable by the sidecar"
                ),
            },
            Some(DiskFull) => StoreError::DiskFull(
                "the volume holding the SQLite database is full: free space or grow the volume (the database stays intact; reads go on)".into(),
            ),
            Some(CannotOpen) => StoreError::unavailable(format!("cannot open the SQLite database: {e}")),
            _ => StoreError::Internal(format!("SQLite: {e}")),
        }
    }
}

/// The document columns, in the order [`row_to_doc`] reads them.
const COLUMNS: &str = "scope, id, rev, data, create_time, update_time, expire_time";
/// A row is live (not expired) at `?now`.
const LIVE: &str = "(expire_time IS NULL OR expire_time > ?4)";
/// A Get, spelled out: the statement cache is keyed by the text, and building it
/// with `format!` on every call was a measurable share of a Get.
const GET: &str = "SELECT scope, id, rev, data, create_time, update_time, expire_time FROM documents \
     WHERE collection = ?1 AND scope = ?2 AND id = ?3 AND (expire_time IS NULL OR expire_time > ?4)";

/// A document's columns as the insert and the update number them (?1 to ?8).
fn row_params(d: &Document) -> [&dyn rusqlite::ToSql; 8] {
    [
        &d.key.collection,
        &d.key.scope,
        &d.key.id,
        &d.rev,
        &d.data,
        &d.create_time,
        &d.update_time,
        &d.expire_time,
    ]
}

fn row_to_doc(collection: &str, row: &rusqlite::Row<'_>) -> rusqlite::Result<Document> {
    Ok(Document {
        key: Key {
            collection: collection.to_string(),
            scope: row.get(0)?,
            id: row.get(1)?,
        },
        rev: row.get(2)?,
        data: row.get(3)?,
        create_time: row.get(4)?,
        update_time: row.get(5)?,
        expire_time: row.get(6)?,
    })
}

/// The stored row of `key`, live or expired, read inside the writing
/// transaction (which holds the write lock). Its data only when asked.
fn stored(tx: &Connection, key: &Key, with_data: bool) -> rusqlite::Result<Option<Document>> {
    let sql = if with_data {
        "SELECT scope, id, rev, data, create_time, update_time, expire_time FROM documents WHERE collection = ?1 AND scope = ?2 AND id = ?3"
    } else {
        "SELECT scope, id, rev, '', create_time, update_time, expire_time FROM documents WHERE collection = ?1 AND scope = ?2 AND id = ?3"
    };
    tx.prepare_cached(sql)?
        .query_row(params![key.collection, key.scope, key.id], |r| {
            row_to_doc(&key.collection, r)
        })
        .optional()
}

/// Applies a planned action inside the writing transaction.
fn apply(tx: &Connection, action: &Action) -> rusqlite::Result<()> {
    match action {
        Action::Insert(d) => {
            tx.prepare_cached(
                "INSERT OR IGNORE INTO collections (name, create_time) VALUES (?1, ?2)",
            )?
            .execute(params![d.key.collection, d.update_time])?;
            tx.prepare_cached(
                "INSERT INTO documents (collection, scope, id, rev, data, create_time, update_time, expire_time)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?
            .execute(&row_params(d)[..])?;
        }
        Action::Replace(d) => {
            tx.prepare_cached(
                "UPDATE documents SET rev = ?4, data = ?5, create_time = ?6, update_time = ?7, expire_time = ?8
                 WHERE collection = ?1 AND scope = ?2 AND id = ?3",
            )?
            .execute(&row_params(d)[..])?;
        }
        Action::Delete(k) => {
            tx.prepare_cached(
                "DELETE FROM documents WHERE collection = ?1 AND scope = ?2 AND id = ?3",
            )?
            .execute(params![k.collection, k.scope, k.id])?;
        }
        Action::Nothing => {}
    }
    Ok(())
}

impl SqliteStore {
    /// Opens (creating if needed) and migrates the database. A file the
    /// sidecar cannot write is refused here, not at the first write.
    pub async fn open(target: &SqliteTarget, clock: Clock) -> StoreResult<Self> {
        let SqliteTarget {
            path,
            readers,
            acquire_timeout,
            indexes,
            auto_index,
        } = target.clone();
        let (writer, path) = tokio::task::spawn_blocking(move || -> StoreResult<_> {
            let (mut conn, path) = match path {
                SqlitePath::Memory => (Connection::open_in_memory()?, None),
                SqlitePath::File(path) => (Connection::open(&path)?, Some(path)),
            };
            if conn.is_readonly(rusqlite::MAIN_DB)? {
                return Err(StoreError::Precondition {
                    precondition: Precondition::DatabaseReadOnly,
                    message: "the SQLite database file is read-only (file or volume permissions): the sidecar must be able to write it".into(),
                });
            }
            if path.is_some() {
                let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
                if !mode.eq_ignore_ascii_case("wal") {
                    tracing::warn!(%mode, "SQLite could not switch to WAL; reads will wait for writes");
                }
            }
            configure(&conn)?;
            schema::migrate(&mut conn, schema::MIGRATIONS)?;
            if !auto_index {
                queries::converge(&conn, &indexes)?;
            }
            Ok((conn, path))
        })
        .await
        .map_err(|e| StoreError::Internal(format!("a SQLite task failed: {e}")))??;

        Ok(SqliteStore {
            writer: Arc::new(tokio::sync::Mutex::new(writer)),
            readers: path.map(|path| Arc::new(ReaderPool::new(path, readers))),
            acquire_timeout,
            clock,
            auto_index,
            indexed: Default::default(),
            wakeups: changes::Wakeups::default(),
            queue: Default::default(),
        })
    }
}

fn immediate(conn: &mut Connection) -> rusqlite::Result<Transaction<'_>> {
    conn.transaction_with_behavior(TransactionBehavior::Immediate)
}

#[async_trait]
impl DocumentStore for SqliteStore {
    async fn get(&self, key: &Key) -> StoreResult<Document> {
        let now = self.clock.now();
        let k = key.clone();
        let found = self
            .read_point(move |conn| {
                conn.prepare_cached(GET)?
                    .query_row(params![k.collection, k.scope, k.id, now], |r| {
                        row_to_doc(&k.collection, r)
                    })
                    .optional()
            })
            .await?;
        found.ok_or_else(|| StoreError::not_found(&key.collection, &key.id))
    }

    async fn write(&self, mutations: Vec<Mutation>) -> StoreResult<Vec<Written>> {
        let result = self.commit(mutations).await;
        if result.is_ok() {
            self.wakeups.notify();
        }
        result
    }

    async fn list(&self, op: &ListOp, budget: Budget) -> StoreResult<Page> {
        let now = self.clock.now();
        let op = op.clone();
        self.with_reader(move |conn| {
            let fetch = i64::try_from(Page::fetch_limit(op.limit)).unwrap_or(i64::MAX);
            let (after_id, after_scope) = op.after.clone().unwrap_or_default();
            // Keyset pagination: a range scan of an index from `after`, never
            // OFFSET; rows are read one at a time up to the budget.
            let (mut stmt, scope) = match &op.scopes {
                Scopes::One(scope) => (
                    conn.prepare_cached(&format!(
                        "SELECT {COLUMNS} FROM documents WHERE collection = ?1 AND scope = ?2 AND id > ?3 AND {LIVE}
                         ORDER BY id LIMIT ?5"
                    ))?,
                    scope.clone(),
                ),
                Scopes::All => (
                    conn.prepare_cached(&format!(
                        "SELECT {COLUMNS} FROM documents WHERE collection = ?1 AND (id, scope) > (?3, ?2) AND {LIVE}
                         ORDER BY id, scope LIMIT ?5"
                    ))?,
                    after_scope,
                ),
            };
            let rows = stmt.query_map(params![op.collection, scope, after_id, now, fetch], |r| {
                row_to_doc(&op.collection, r)
            })?;
            Ok(Page::collect(rows, op.limit, budget)?)
        })
        .await
    }

    async fn batch_get(&self, op: &BatchGetOp, budget: Budget) -> StoreResult<Batch> {
        let now = self.clock.now();
        let op = op.clone();
        self.with_reader(move |conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM documents WHERE collection = ?1 AND scope = ?2 AND id = ?3 AND {LIVE}"
            ))?;
            let mut batch = Batch::default();
            let mut spending = budget.start();
            // Point lookups in request order, so the budget stops the reading.
            for id in &op.ids {
                let found = stmt
                    .query_row(params![op.collection, op.scope, id, now], |r| {
                        row_to_doc(&op.collection, r)
                    })
                    .optional()?;
                if !batch.add(&mut spending, std::slice::from_ref(id), found.into_iter().collect()) {
                    break;
                }
            }
            Ok(batch)
        })
        .await
    }

    async fn query(&self, q: &query::Query, budget: Budget) -> StoreResult<Page> {
        self.run_query(q, budget).await
    }

    async fn count(&self, q: &query::Query) -> StoreResult<u64> {
        self.run_count(q).await
    }

    async fn reap_expired(&self, limit: usize) -> StoreResult<usize> {
        let now = self.clock.now();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let reaped = self
            .with_writer(move |conn| {
                // One short transaction per batch: the writer is free in between.
                let tx = immediate(conn)?;
                let gone: Vec<plan::Change> = tx
                    .prepare_cached(
                        "DELETE FROM documents WHERE rowid IN (
                             SELECT rowid FROM documents WHERE expire_time IS NOT NULL AND expire_time <= ?1 LIMIT ?2)
                         RETURNING collection, scope, id, rev",
                    )?
                    .query_map(params![now, limit], |r| {
                        Ok(plan::Change {
                            kind: plan::ChangeKind::Expired,
                            key: Key {
                                collection: r.get(0)?,
                                scope: r.get(1)?,
                                id: r.get(2)?,
                            },
                            rev: r.get(3)?,
                            document: None,
                        })
                    })?
                    .collect::<rusqlite::Result<_>>()?;
                feed::record(&tx, &gone, now)?;
                tx.commit()?;
                Ok(gone.len())
            })
            .await?;
        if reaped > 0 {
            self.wakeups.notify();
        }
        Ok(reaped)
    }

    async fn changes(&self, op: &changes::ChangesOp) -> StoreResult<changes::Changes> {
        self.read_changes(op).await
    }

    async fn feed_bounds(&self) -> StoreResult<changes::FeedBounds> {
        self.bounds().await
    }

    async fn prune_changes(&self, before: Micros, limit: usize) -> StoreResult<usize> {
        self.prune(before, limit).await
    }

    fn wakeups(&self) -> changes::Wakeups {
        self.wakeups.clone()
    }

    async fn has_scopes(&self, collection: &str) -> StoreResult<bool> {
        let collection = collection.to_string();
        self.with_reader(move |conn| {
            // A range of the primary key (collection, scope, id).
            let mut stmt = conn.prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM documents WHERE collection = ?1 AND scope > '')",
            )?;
            Ok(stmt.query_row([collection], |r| r.get(0))?)
        })
        .await
    }

    async fn list_collections(&self) -> StoreResult<Vec<String>> {
        self.with_reader(|conn| {
            let mut stmt = conn.prepare_cached("SELECT name FROM collections ORDER BY name")?;
            let names = stmt
                .query_map([], |r| r.get(0))?
                .collect::<rusqlite::Result<Vec<String>>>()?;
            Ok(names)
        })
        .await
    }

    async fn ping(&self) -> StoreResult<()> {
        self.with_reader(|conn| Ok(conn.query_row("SELECT 1", [], |_| Ok(()))?))
            .await
    }

    fn pool_stats(&self) -> PoolStats {
        // The writer, plus the readers that exist.
        let writer_idle = usize::from(self.writer.try_lock().is_ok());
        match &self.readers {
            Some(pool) => {
                let idle = pool.idle.lock().unwrap_or_else(|e| e.into_inner()).len();
                let busy = pool.size - pool.permits.available_permits();
                PoolStats {
                    max: pool.size + 1,
                    open: idle + busy + 1,
                    idle: idle + writer_idle,
                    waiting: 0,
                }
            }
            None => PoolStats {
                max: 1,
                open: 1,
                idle: writer_idle,
                waiting: 0,
            },
        }
    }

    async fn close(&self) {
        if let Some(pool) = &self.readers {
            pool.permits.close();
            pool.idle.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
        let result = self
            .with_writer(|conn| {
                // Fold the WAL back into the database file so it is complete on its own.
                conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
                Ok(())
            })
            .await;
        match result {
            Ok(()) => tracing::info!("SQLite store closed (WAL checkpointed)"),
            Err(e) => tracing::warn!(error = %e, "SQLite checkpoint at shutdown failed"),
        }
    }
}

#[cfg(test)]
mod tests;
