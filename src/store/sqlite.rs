//! Embedded SQLite store (rusqlite, bundled SQLite).
//!
//! One writer connection serializes writes; a small pool of read-only connections
//! lets reads run in parallel beside it (WAL journal). rusqlite blocks, so every
//! call runs on tokio's blocking pool, never on an async worker. Conditional writes
//! read and write inside one `BEGIN IMMEDIATE` transaction.

use super::*;
use crate::metrics;
use rusqlite::{
    params, Connection, OpenFlags, OptionalExtension, Transaction, TransactionBehavior,
};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

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
}

impl std::fmt::Display for SqliteTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.path {
            SqlitePath::File(p) => write!(f, "{}", p.display()),
            SqlitePath::Memory => f.write_str(":memory:"),
        }
    }
}

/// A versioned schema change; applied once, in order, recorded in `schema_migrations`.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: i64,
    pub description: &'static str,
    pub sql: &'static str,
}

/// The schema, oldest first. Append only: a released migration never changes.
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    description: "collections and documents",
    sql: "
        CREATE TABLE collections (
            name        TEXT PRIMARY KEY,
            create_time INTEGER NOT NULL
        );
        CREATE TABLE documents (
            collection  TEXT NOT NULL REFERENCES collections (name),
            id          TEXT NOT NULL,
            rev         TEXT NOT NULL,
            data        TEXT NOT NULL,
            create_time INTEGER NOT NULL,
            update_time INTEGER NOT NULL,
            PRIMARY KEY (collection, id)
        );",
}];

/// How long a connection waits for another process's lock before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

pub struct SqliteStore {
    writer: Arc<tokio::sync::Mutex<Connection>>,
    /// Read-only connections; `None` for an in-memory database, which each
    /// connection would see as a different database, so reads use the writer.
    readers: Option<Arc<ReaderPool>>,
    acquire_timeout: Duration,
}

struct ReaderPool {
    path: std::path::PathBuf,
    size: usize,
    idle: Mutex<Vec<Connection>>,
    permits: Arc<Semaphore>,
}

impl ReaderPool {
    fn take(&self) -> rusqlite::Result<Connection> {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        match idle {
            Some(conn) => Ok(conn),
            None => open_reader(&self.path),
        }
    }

    /// An open connection, if one is idle (no I/O).
    fn take_idle(&self) -> Option<Connection> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }

    fn give_back(&self, conn: Connection, _permit: OwnedSemaphorePermit) {
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(conn);
    }
}

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // FULL: a write acknowledged to the client survives a power cut, not just a crash.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.set_prepared_statement_cache_capacity(32);
    Ok(())
}

fn open_reader(path: &std::path::Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI,
    )?;
    configure(&conn)?;
    Ok(conn)
}

/// Applies the migrations that `conn`'s database lacks, in one transaction.
pub fn migrate(conn: &mut Connection, migrations: &[Migration]) -> StoreResult<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version     INTEGER PRIMARY KEY,
            description TEXT NOT NULL,
            applied_at  INTEGER NOT NULL
        )",
    )?;
    let current: i64 = tx.query_row(
        "SELECT coalesce(max(version), 0) FROM schema_migrations",
        [],
        |r| r.get(0),
    )?;
    let latest = migrations.last().map_or(0, |m| m.version);
    if current > latest {
        return Err(StoreError::Internal(format!(
            "the database schema is at version {current}, newer than this docsidecar supports ({latest}): run a newer docsidecar"
        )));
    }
    for m in migrations.iter().filter(|m| m.version > current) {
        tx.execute_batch(m.sql)?;
        tx.execute(
            "INSERT INTO schema_migrations (version, description, applied_at) VALUES (?1, ?2, ?3)",
            params![m.version, m.description, now_micros()],
        )?;
        tracing::info!(
            version = m.version,
            description = m.description,
            "applied SQLite migration"
        );
    }
    tx.commit()?;
    Ok(())
}

impl SqliteStore {
    /// Opens (creating if needed) and migrates the database.
    pub async fn open(target: &SqliteTarget) -> StoreResult<Self> {
        let SqliteTarget {
            path,
            readers,
            acquire_timeout,
        } = target.clone();
        let (writer, path) = tokio::task::spawn_blocking(move || -> StoreResult<_> {
            let (mut conn, path) = match path {
                SqlitePath::Memory => (Connection::open_in_memory()?, None),
                SqlitePath::File(path) => (Connection::open(&path)?, Some(path)),
            };
            if path.is_some() {
                let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
                if !mode.eq_ignore_ascii_case("wal") {
                    tracing::warn!(%mode, "SQLite could not switch to WAL; reads will wait for writes");
                }
            }
            configure(&conn)?;
            migrate(&mut conn, MIGRATIONS)?;
            Ok((conn, path))
        })
        .await
        .map_err(join_error)??;

        let readers = path.map(|path| {
            Arc::new(ReaderPool {
                path,
                size: readers.max(1),
                idle: Mutex::new(Vec::new()),
                permits: Arc::new(Semaphore::new(readers.max(1))),
            })
        });
        Ok(SqliteStore {
            writer: Arc::new(tokio::sync::Mutex::new(writer)),
            readers,
            acquire_timeout,
        })
    }

    /// A permit for one reader connection, waited for at most `acquire_timeout`.
    async fn reader_permit(&self, pool: &Arc<ReaderPool>) -> StoreResult<OwnedSemaphorePermit> {
        let started = std::time::Instant::now();
        let permit =
            tokio::time::timeout(self.acquire_timeout, pool.permits.clone().acquire_owned())
                .await
                .map_err(|_| self.busy())?
                .map_err(|_| StoreError::Unavailable("the store is closed".into()))?;
        metrics::pool_acquired(started);
        Ok(permit)
    }

    /// Runs a point read (one primary-key lookup) on the calling worker thread.
    /// Such a read takes a few microseconds, less than the two thread hand-offs
    /// of `spawn_blocking`, which made up most of a Get's cost (BENCHMARKS.md).
    /// It never waits there: with no idle connection to reuse, or a database
    /// locked by another process, the read goes to [`Self::read`] instead.
    async fn read_point<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: Fn(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let Some(pool) = &self.readers else {
            return self.write(move |conn| Ok(f(conn)?)).await;
        };
        let permit = self.reader_permit(pool).await?;
        let Some(conn) = pool.take_idle() else {
            drop(permit);
            return self.read(move |conn| Ok(f(conn)?)).await;
        };
        // No lock waits on a worker thread: a busy database fails at once here.
        let result = conn.busy_timeout(Duration::ZERO).and_then(|()| f(&conn));
        match conn.busy_timeout(BUSY_TIMEOUT) {
            Ok(()) => pool.give_back(conn, permit),
            // A connection in an unknown state is closed, not reused.
            Err(_) => drop((conn, permit)),
        }
        match result {
            Err(e) if is_busy(&e) => self.read(move |conn| Ok(f(conn)?)).await,
            result => Ok(result?),
        }
    }

    /// Runs `f` on a read connection, off the async workers.
    async fn read<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    {
        let Some(pool) = &self.readers else {
            return self.write(move |conn| f(conn)).await;
        };
        let permit = self.reader_permit(pool).await?;
        let pool = pool.clone();
        // The connection goes back to the pool from the blocking task itself, so
        // a caller that gives up (deadline) does not leak it.
        tokio::task::spawn_blocking(move || {
            let conn = pool.take()?;
            let result = f(&conn);
            pool.give_back(conn, permit);
            result
        })
        .await
        .map_err(join_error)?
    }

    /// Runs `f` on the single writer connection, off the async workers.
    async fn write<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> StoreResult<T> + Send + 'static,
    {
        let started = std::time::Instant::now();
        let mut conn = tokio::time::timeout(self.acquire_timeout, self.writer.clone().lock_owned())
            .await
            .map_err(|_| self.busy())?;
        metrics::pool_acquired(started);
        tokio::task::spawn_blocking(move || f(&mut conn))
            .await
            .map_err(join_error)?
    }

    fn busy(&self) -> StoreError {
        StoreError::Unavailable(format!(
            "no SQLite connection became free within {:?}; retry",
            self.acquire_timeout
        ))
    }
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

fn join_error(e: tokio::task::JoinError) -> StoreError {
    StoreError::Internal(format!("a SQLite task failed: {e}"))
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        use rusqlite::ErrorCode::*;
        match e.sqlite_error_code() {
            Some(DatabaseBusy | DatabaseLocked) => StoreError::Unavailable(
                "the SQLite database is locked by another writer; retry".into(),
            ),
            Some(ReadOnly | PermissionDenied | CannotOpen) => {
                StoreError::Unavailable(format!("the SQLite database cannot be written: {e}"))
            }
            _ => StoreError::Internal(format!("SQLite: {e}")),
        }
    }
}

const DOC_COLUMNS: &str = "id, rev, data, create_time, update_time";
const GET_SQL: &str = "SELECT id, rev, data, create_time, update_time FROM documents WHERE collection = ?1 AND id = ?2";

fn row_to_doc(collection: &str, row: &rusqlite::Row<'_>) -> rusqlite::Result<Document> {
    Ok(Document {
        collection: collection.to_string(),
        id: row.get(0)?,
        rev: row.get(1)?,
        data: row.get(2)?,
        create_time: row.get(3)?,
        update_time: row.get(4)?,
    })
}

/// The stored rev and create time of one document, read inside a transaction.
fn current(
    tx: &Transaction<'_>,
    collection: &str,
    id: &str,
) -> rusqlite::Result<Option<(String, Micros)>> {
    tx.prepare_cached("SELECT rev, create_time FROM documents WHERE collection = ?1 AND id = ?2")?
        .query_row(params![collection, id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()
}

fn save_in(tx: &Transaction<'_>, op: &SaveOp, now: Micros) -> StoreResult<Saved> {
    let existing = current(tx, &op.collection, &op.id)?;
    op.check(existing.as_ref().map(|(rev, _)| rev.as_str()))?;
    let rev = new_rev();
    if existing.is_some() {
        tx.prepare_cached("UPDATE documents SET rev = ?3, data = ?4, update_time = ?5 WHERE collection = ?1 AND id = ?2")?
            .execute(params![op.collection, op.id, rev, op.data, now])?;
    } else {
        tx.prepare_cached("INSERT OR IGNORE INTO collections (name, create_time) VALUES (?1, ?2)")?
            .execute(params![op.collection, now])?;
        tx.prepare_cached(
            "INSERT INTO documents (collection, id, rev, data, create_time, update_time) VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
        )?
        .execute(params![op.collection, op.id, rev, op.data, now])?;
    }
    Ok(Saved {
        rev,
        update_time: now,
        created: existing.is_none(),
    })
}

fn delete_in(tx: &Transaction<'_>, op: &DeleteOp) -> StoreResult<()> {
    let existing = current(tx, &op.collection, &op.id)?;
    op.check(existing.as_ref().map(|(rev, _)| rev.as_str()))?;
    tx.prepare_cached("DELETE FROM documents WHERE collection = ?1 AND id = ?2")?
        .execute(params![op.collection, op.id])?;
    Ok(())
}

fn immediate(conn: &mut Connection) -> rusqlite::Result<Transaction<'_>> {
    conn.transaction_with_behavior(TransactionBehavior::Immediate)
}

#[async_trait]
impl DocumentStore for SqliteStore {
    async fn get(&self, collection: &str, id: &str) -> StoreResult<Document> {
        let (collection, id) = (collection.to_string(), id.to_string());
        let found = {
            let (collection, id) = (collection.clone(), id.clone());
            self.read_point(move |conn| {
                conn.prepare_cached(GET_SQL)?
                    .query_row(params![collection, id], |r| row_to_doc(&collection, r))
                    .optional()
            })
            .await?
        };
        found.ok_or_else(|| StoreError::not_found(&collection, &id))
    }

    async fn save(&self, op: SaveOp) -> StoreResult<Saved> {
        self.write(move |conn| {
            let tx = immediate(conn)?;
            let saved = save_in(&tx, &op, now_micros())?;
            tx.commit()?;
            Ok(saved)
        })
        .await
    }

    async fn delete(&self, op: DeleteOp) -> StoreResult<()> {
        self.write(move |conn| {
            let tx = immediate(conn)?;
            delete_in(&tx, &op)?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn list(&self, collection: &str, after: Option<&str>, limit: usize) -> StoreResult<Page> {
        let collection = collection.to_string();
        let after = after.map(str::to_string);
        self.read(move |conn| {
            // Keyset pagination: a range scan of the primary key from `after`, never
            // OFFSET. Two statements, because `?2 IS NULL OR id > ?2` would hide
            // the range from the query planner.
            let fetch = i64::try_from(Page::fetch_limit(limit)).unwrap_or(i64::MAX);
            let rows = match &after {
                Some(after) => conn
                    .prepare_cached(&format!(
                        "SELECT {DOC_COLUMNS} FROM documents WHERE collection = ?1 AND id > ?2 ORDER BY id LIMIT ?3"
                    ))?
                    .query_map(params![collection, after, fetch], |r| row_to_doc(&collection, r))?
                    .collect::<rusqlite::Result<Vec<_>>>()?,
                None => conn
                    .prepare_cached(&format!(
                        "SELECT {DOC_COLUMNS} FROM documents WHERE collection = ?1 ORDER BY id LIMIT ?2"
                    ))?
                    .query_map(params![collection, fetch], |r| row_to_doc(&collection, r))?
                    .collect::<rusqlite::Result<Vec<_>>>()?,
            };
            Ok(Page::from_rows(rows, limit))
        })
        .await
    }

    async fn batch_get(&self, collection: &str, ids: &[String]) -> StoreResult<Vec<Document>> {
        let collection = collection.to_string();
        let ids = serde_json::to_string(ids).map_err(|e| StoreError::Internal(e.to_string()))?;
        self.read(move |conn| {
            // One statement: the ids travel as one JSON array bind parameter.
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {DOC_COLUMNS} FROM documents WHERE collection = ?1 AND id IN (SELECT value FROM json_each(?2))"
            ))?;
            let docs = stmt
                .query_map(params![collection, ids], |r| row_to_doc(&collection, r))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(docs)
        })
        .await
    }

    async fn write(&self, mutations: Vec<Mutation>) -> StoreResult<Vec<Written>> {
        self.write(move |conn| {
            let tx = immediate(conn)?;
            let now = now_micros();
            let mut results = Vec::with_capacity(mutations.len());
            for (index, mutation) in mutations.iter().enumerate() {
                // Returning early drops `tx`, which rolls everything back.
                let written = match mutation {
                    Mutation::Save(op) => save_in(&tx, op, now).map(Written::Saved),
                    Mutation::Delete(op) => delete_in(&tx, op).map(|()| Written::Deleted),
                }
                .map_err(|e| e.in_mutation(index))?;
                results.push(written);
            }
            tx.commit()?;
            Ok(results)
        })
        .await
    }

    async fn list_collections(&self) -> StoreResult<Vec<String>> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached("SELECT name FROM collections ORDER BY name")?;
            let names = stmt
                .query_map([], |r| r.get(0))?
                .collect::<rusqlite::Result<Vec<String>>>()?;
            Ok(names)
        })
        .await
    }

    async fn ping(&self) -> StoreResult<()> {
        self.read(|conn| Ok(conn.query_row("SELECT 1", [], |_| Ok(()))?))
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
            .write(|conn| {
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
mod tests {
    use super::*;

    const V2: Migration = Migration {
        version: 2,
        description: "test: an index",
        sql: "CREATE INDEX documents_by_update ON documents (collection, update_time);",
    };

    fn versions(conn: &Connection) -> Vec<i64> {
        let mut stmt = conn
            .prepare("SELECT version FROM schema_migrations ORDER BY version")
            .unwrap();
        stmt.query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }

    #[test]
    fn an_old_database_is_upgraded_and_keeps_its_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        let mut conn = Connection::open(&path).unwrap();
        migrate(&mut conn, &MIGRATIONS[..1]).unwrap();
        conn.execute_batch(
            "INSERT INTO collections VALUES ('c', 1);
             INSERT INTO documents VALUES ('c', 'a', 'r1', '{}', 1, 1);",
        )
        .unwrap();

        let upgraded = [MIGRATIONS[0], V2];
        migrate(&mut conn, &upgraded).unwrap();
        assert_eq!(versions(&conn), vec![1, 2]);
        // Applying again is a no-op.
        migrate(&mut conn, &upgraded).unwrap();
        assert_eq!(versions(&conn), vec![1, 2]);
        let rev: String = conn
            .query_row("SELECT rev FROM documents WHERE id = 'a'", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rev, "r1");
    }

    /// A point read that finds the database locked by another process does not
    /// fail on the worker thread: it is retried off the workers, where it may wait.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_busy_point_read_is_retried_off_the_workers() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let target = SqliteTarget {
            path: SqlitePath::File(dir.path().join("busy.db")),
            readers: 2,
            acquire_timeout: Duration::from_secs(5),
        };
        let store = SqliteStore::open(&target).await.unwrap();
        // Warm the reader pool, so that the next read takes the inline path.
        store.read_point(|_| Ok(())).await.unwrap();

        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let worker = std::thread::current().id();
        let thread = store
            .read_point(move |_| {
                if counted.fetch_add(1, Ordering::SeqCst) == 0 {
                    let busy = rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY);
                    return Err(rusqlite::Error::SqliteFailure(busy, None));
                }
                Ok(std::thread::current().id())
            })
            .await
            .unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_ne!(thread, worker, "the retry runs on a blocking thread");

        // Anything else is an answer, not a retry.
        let err = store
            .read_point(|_| -> rusqlite::Result<()> { Err(rusqlite::Error::QueryReturnedNoRows) })
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Internal(_)), "{err:?}");
    }

    #[test]
    fn a_newer_database_is_refused() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn, &[MIGRATIONS[0], V2]).unwrap();
        let err = migrate(&mut conn, MIGRATIONS).unwrap_err().to_string();
        assert!(err.contains("newer than this docsidecar supports"), "{err}");
    }

    #[test]
    fn list_pages_are_range_scans_of_the_primary_key() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn, MIGRATIONS).unwrap();
        let plan: Vec<String> = conn
            .prepare(&format!(
                "EXPLAIN QUERY PLAN SELECT {DOC_COLUMNS} FROM documents WHERE collection = ?1 AND id > ?2 ORDER BY id LIMIT ?3"
            ))
            .unwrap()
            .query_map(params!["c", "a", 10], |r| r.get::<_, String>(3))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let plan = plan.join("; ");
        assert!(plan.contains("(collection=? AND id>?)"), "{plan}");
        assert!(!plan.contains("TEMP B-TREE"), "no sort step: {plan}");
    }
}
