//! Connections: one writer serializes writes; a small pool of read-only
//! connections lets reads run beside it (WAL journal). rusqlite blocks, so
//! work runs on tokio's blocking pool, except point reads (see
//! [`SqliteStore::read_point`]).

use super::SqliteStore;
use crate::metrics;
use crate::store::{StoreError, StoreResult};
use rusqlite::{Connection, OpenFlags};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How long a connection waits for another process's lock before giving up.
pub(super) const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) struct ReaderPool {
    path: std::path::PathBuf,
    pub(super) size: usize,
    pub(super) idle: Mutex<Vec<Connection>>,
    pub(super) permits: Arc<Semaphore>,
}

impl ReaderPool {
    pub(super) fn new(path: std::path::PathBuf, size: usize) -> ReaderPool {
        ReaderPool {
            path,
            size: size.max(1),
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(size.max(1))),
        }
    }

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

pub(super) fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // FULL: a write acknowledged to the client survives a power cut, not just a crash.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.set_prepared_statement_cache_capacity(32);
    super::queries::register(conn)
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

impl SqliteStore {
    /// A permit for one reader connection, waited for at most `acquire_timeout`.
    async fn reader_permit(&self, pool: &Arc<ReaderPool>) -> StoreResult<OwnedSemaphorePermit> {
        let started = std::time::Instant::now();
        let permit =
            tokio::time::timeout(self.acquire_timeout, pool.permits.clone().acquire_owned())
                .await
                .map_err(|_| self.busy())?
                .map_err(|_| StoreError::shutting_down("the SQLite store is closed"))?;
        metrics::pool_acquired(started);
        Ok(permit)
    }

    /// Runs a point read (one primary-key lookup) on the calling worker thread.
    /// Such a read takes a few microseconds, less than the two thread hand-offs
    /// of `spawn_blocking`, which made up most of a Get's cost (BENCHMARKS.md).
    /// It never waits there: with no idle connection to reuse, or a database
    /// locked by another process, the read goes to [`Self::with_reader`] instead.
    pub(super) async fn read_point<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: Fn(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let Some(pool) = &self.readers else {
            return self.with_writer(move |conn| Ok(f(conn)?)).await;
        };
        let permit = self.reader_permit(pool).await?;
        let Some(conn) = pool.take_idle() else {
            drop(permit);
            return self.with_reader(move |conn| Ok(f(conn)?)).await;
        };
        // No lock waits on a worker thread: a busy database fails at once here.
        let result = conn.busy_timeout(Duration::ZERO).and_then(|()| f(&conn));
        match conn.busy_timeout(BUSY_TIMEOUT) {
            Ok(()) => pool.give_back(conn, permit),
            // A connection in an unknown state is closed, not reused.
            Err(_) => drop((conn, permit)),
        }
        match result {
            Err(e) if is_busy(&e) => self.with_reader(move |conn| Ok(f(conn)?)).await,
            result => Ok(result?),
        }
    }

    /// Runs `f` on a read connection, off the async workers.
    pub(super) async fn with_reader<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    {
        let Some(pool) = &self.readers else {
            return self.with_writer(move |conn| f(conn)).await;
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
    pub(super) async fn with_writer<T, F>(&self, f: F) -> StoreResult<T>
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

    pub(super) fn busy(&self) -> StoreError {
        StoreError::pool_exhausted(format!(
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
