//! Writes: one READ COMMITTED transaction per call. Each mutation reads its
//! row with `FOR UPDATE` (a concurrent writer of the same document on this
//! server waits, and the decision is made on the latest committed row), the
//! shared planner decides, and one statement applies the outcome.
//!
//! A transaction that loses to a concurrent one is re-run as a whole,
//! checks included, a few times: an InnoDB deadlock, a Galera certification
//! failure (another node committed a conflicting write first; reported as a
//! deadlock, error 1213 / SQLSTATE 40001, by any statement or by COMMIT), or
//! an insert that lost a race to an insert of the same new document. A
//! re-run reads the rows again, so a conditional write is never applied on
//! the strength of an outdated check.

use super::error::{describe, is_connection_lost, OpError};
use super::pool::Conn;
use super::{bytes, row_to_doc, MysqlStore, COLUMNS, NOW};
use crate::metrics;
use crate::store::plan::Action;
use crate::store::sql::locked_row;
use crate::store::{Document, Mutation, StoreError, StoreResult, Written};
use mysql_async::prelude::*;
use mysql_async::{Row, Value};
use std::time::Duration;

/// A reaped row: scope, id, rev, and the database's time.
type Reaped = (Vec<u8>, Vec<u8>, Vec<u8>, i64);

/// Attempts of a write that conflicted with a concurrent transaction.
const ATTEMPTS: u32 = 8;

/// Why one attempt of a write failed.
enum Retry {
    /// Lost to a concurrent transaction: run it again.
    Conflict(StoreError),
    /// A table believed to exist is gone (dropped behind the cache's back).
    TableGone,
    No(StoreError),
}

impl From<StoreError> for Retry {
    fn from(e: StoreError) -> Self {
        Retry::No(e)
    }
}

/// A short random pause before re-running a transaction that lost a
/// conflict, growing with the attempts, so that the contenders spread out.
fn pause(attempt: u32) -> Duration {
    let jitter = (uuid::Uuid::now_v7().as_u128() & 0xffff) as u64;
    let ceiling = 1u64 << attempt.min(6);
    Duration::from_micros(500 + jitter * ceiling * 1000 / 0xffff)
}

/// The stored row of `mutation`'s document, live or expired, locked.
async fn stored(
    conn: &mut mysql_async::Conn,
    table: &str,
    mutation: &Mutation,
) -> Result<Option<Document>, OpError> {
    let sql = locked_row(COLUMNS, table, mutation.needs_stored_data(), ["?", "?"]);
    let key = mutation.key();
    let row: Option<Row> = conn
        .exec_first(sql, (key.scope.as_bytes(), key.id.as_bytes()))
        .await?;
    row.map(|r| row_to_doc(&key.collection, r)).transpose()
}

/// Applies a planned action.
async fn apply(conn: &mut mysql_async::Conn, table: &str, action: &Action) -> Result<(), OpError> {
    let (sql, d) = match action {
        Action::Insert(d) => (
            format!(
                "INSERT INTO {table} (scope, id, rev, data, create_time, update_time, expire_time)
                 VALUES (?, ?, ?, ?, ?, ?, ?)"
            ),
            d,
        ),
        Action::Replace(d) => (
            format!(
                "UPDATE {table} SET scope = ?, id = ?, rev = ?, data = ?, create_time = ?, update_time = ?, expire_time = ?
                 WHERE scope = ? AND id = ?"
            ),
            d,
        ),
        Action::Delete(k) => {
            let sql = format!("DELETE FROM {table} WHERE scope = ? AND id = ?");
            conn.exec_drop(sql, (k.scope.as_bytes(), k.id.as_bytes()))
                .await?;
            return Ok(());
        }
        Action::Nothing => return Ok(()),
    };
    let mut params: Vec<Value> = vec![
        bytes(&d.key.scope),
        bytes(&d.key.id),
        bytes(&d.rev),
        Value::Bytes(d.data.as_bytes().to_vec()),
        d.create_time.into(),
        d.update_time.into(),
        d.expire_time.into(),
    ];
    if matches!(action, Action::Replace(_)) {
        params.extend([bytes(&d.key.scope), bytes(&d.key.id)]);
    }
    conn.exec_drop(sql, params).await?;
    Ok(())
}

impl MysqlStore {
    /// Runs `mutations` in one transaction, re-run as a whole when it loses
    /// to a concurrent transaction (see the module's documentation), or
    /// when it was refused and this account's relations changed (see
    /// `relations`).
    pub(super) async fn run_write(&self, mutations: &[Mutation]) -> StoreResult<Vec<Written>> {
        self.retried(|| self.write_attempts(mutations)).await
    }

    async fn write_attempts(&self, mutations: &[Mutation]) -> StoreResult<Vec<Written>> {
        let mut tables = Vec::with_capacity(mutations.len());
        for (index, m) in mutations.iter().enumerate() {
            let relation = self.relation(m.collection(), &m.key().scope).await;
            tables.push(relation.map_err(|e| e.in_mutation(index))?);
        }
        let feed = self.feed_relation().await?;
        let mut last = None;
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                metrics::transaction_retried();
                tokio::time::sleep(pause(attempt)).await;
            }
            let mut c = self.pools.acquire().await?;
            match self.write_once(&mut c, mutations, &tables, &feed).await {
                Ok(results) => {
                    c.done(&Ok::<_, OpError>(()));
                    return Ok(results);
                }
                Err((retry, cause)) => {
                    self.finish_failed(c, cause).await;
                    match retry {
                        Retry::Conflict(e) => last = Some(e),
                        Retry::TableGone => self
                            .tables
                            .forget(mutations.iter().map(Mutation::collection)),
                        Retry::No(e) => return Err(e),
                    }
                }
            }
        }
        Err(last.unwrap_or_else(|| {
            StoreError::unavailable(
                "a collection's table disappeared while writing to it (dropped concurrently?); retry",
            )
        }))
    }

    /// Rolls back what an attempt left open, and hands the connection back
    /// (or closes it: a broken one, or one whose rollback failed).
    async fn finish_failed(&self, mut c: Conn, cause: Option<OpError>) {
        if let Some(cause) = cause.filter(OpError::is_host_trouble) {
            c.done(&Err::<(), _>(cause));
            return;
        }
        match c.conn().query_drop("ROLLBACK").await {
            Ok(()) => c.done(&Ok::<_, OpError>(())),
            Err(e) => c.done(&Err::<(), _>(OpError::from(e))),
        }
    }

    /// Collections some save or update of `mutations` needs a table for that
    /// does not exist yet (auto_create only): created before the transaction,
    /// since DDL commits whatever transaction is open.
    async fn create_tables(&self, c: &mut Conn, mutations: &[Mutation]) -> Result<(), OpError> {
        if !self.auto_create {
            return Ok(());
        }
        let unknown = Mutation::unknown_collections(mutations, |c| self.tables.known(c));
        if unknown.is_empty() {
            return Ok(());
        }
        let existing = self.tables.existing(c.conn(), &unknown).await?;
        let mariadb = c.mariadb();
        for collection in unknown.iter().filter(|c| !existing.contains(**c)) {
            self.tables.create(c.conn(), collection, mariadb).await?;
        }
        self.tables.remember(unknown);
        Ok(())
    }

    /// One attempt of a write; on failure, why, and the error that ended it.
    async fn write_once(
        &self,
        c: &mut Conn,
        mutations: &[Mutation],
        tables: &[String],
        feed: &str,
    ) -> Result<Vec<Written>, (Retry, Option<OpError>)> {
        let fail = |e: OpError, index: Option<usize>| {
            self.refused(&e);
            let in_mutation = |s: StoreError| match index {
                Some(i) => s.in_mutation(i),
                None => s,
            };
            if e.is_conflict() {
                let conflict = StoreError::unavailable(format!(
                    "the write conflicted with a concurrent transaction ({e}); retry"
                ));
                return (Retry::Conflict(in_mutation(conflict)), Some(e));
            }
            let (error, cause) = e.split(&self.target);
            (Retry::No(in_mutation(error)), cause)
        };
        self.create_tables(c, mutations)
            .await
            .map_err(|e| fail(e, None))?;
        let conn = c.conn();
        conn.query_drop("START TRANSACTION")
            .await
            .map_err(|e| fail(e.into(), None))?;
        // The transaction's time, on the database's clock.
        let now: i64 = conn
            .exec_first(format!("SELECT {NOW}"), (self.clock.offset(),))
            .await
            .map_err(|e| fail(e.into(), None))?
            .unwrap_or_default();
        let mut cataloged: Vec<&str> = Vec::new();
        let mut results = Vec::with_capacity(mutations.len());
        for (index, (mutation, table)) in mutations.iter().zip(tables).enumerate() {
            let collection = mutation.collection();
            let result = async {
                let row = stored(conn, table, mutation).await?;
                let planned = mutation.plan(row, now)?;
                apply(conn, table, &planned.action).await?;
                super::feed::record(conn, feed, &planned.changes, now).await?;
                // A development sidecar records the collections it creates.
                if self.auto_create
                    && matches!(planned.action, Action::Insert(_))
                    && !self.tables.cataloged(collection)
                    && !cataloged.contains(&collection)
                {
                    conn.exec_drop(
                        "INSERT IGNORE INTO `_collections` (name, create_time) VALUES (?, ?)",
                        (collection.as_bytes(), now),
                    )
                    .await?;
                    cataloged.push(collection);
                }
                Ok::<_, OpError>(planned.written)
            }
            .await;
            match result {
                Ok(written) => results.push(written),
                Err(e) if e.is_missing_table() => match mutation {
                    // Nothing to delete in a collection that has no table; a
                    // failed statement leaves the transaction open on MySQL.
                    Mutation::Delete(op) if op.allow_missing => results.push(Written::Deleted),
                    Mutation::Delete(op) => {
                        let e = StoreError::not_found(collection, &op.key.id).in_mutation(index);
                        return Err((Retry::No(e), None));
                    }
                    _ if self.auto_create => return Err((Retry::TableGone, None)),
                    _ => {
                        let e = self.tables.no_table(collection).in_mutation(index);
                        return Err((Retry::No(e), None));
                    }
                },
                Err(e) => return Err(fail(e, Some(index))),
            }
        }
        match conn.query_drop("COMMIT").await {
            Ok(()) => {
                self.tables.remember_cataloged(cataloged);
                Ok(results)
            }
            Err(e) if is_connection_lost(&e) => {
                // The connection died during COMMIT: applied or not, nobody knows.
                let unknown = StoreError::commit_unknown(format!(
                    "the connection to MySQL/MariaDB at {} broke during COMMIT ({}): the write may or may not be applied; read before retrying",
                    self.target,
                    describe(&e)
                ));
                Err((Retry::No(unknown), Some(e.into())))
            }
            Err(e) => Err(fail(e.into(), None)),
        }
    }

    /// Deletes up to `limit` expired rows of one collection in one short
    /// transaction. Rows another transaction holds are skipped (`SKIP
    /// LOCKED`), so several sidecars' reapers never wait for each other; on
    /// a Galera cluster two reapers on different nodes may still pick the
    /// same rows, and the loser's certification failure just ends its round.
    pub(super) async fn reap(
        &self,
        collection: &str,
        table: &str,
        limit: usize,
    ) -> StoreResult<usize> {
        let feed = self.feed_relation().await?;
        let mut c = self.pools.acquire().await?;
        let conn = c.conn();
        let result = async {
            conn.query_drop("START TRANSACTION").await?;
            let select = format!(
                "SELECT scope, id, rev, {NOW} FROM {table} WHERE expire_time <= {NOW}
                 ORDER BY expire_time LIMIT ? FOR UPDATE SKIP LOCKED"
            );
            let offset = self.clock.offset();
            let doomed: Vec<Reaped> = conn.exec(select, (offset, offset, limit as u64)).await?;
            let delete = format!("DELETE FROM {table} WHERE scope = ? AND id = ?");
            let mut expired = Vec::with_capacity(doomed.len());
            let mut now = 0;
            for (scope, id, rev, at) in doomed {
                conn.exec_drop(&delete, (&scope, &id)).await?;
                expired.push(super::feed::expired(collection, scope, id, rev));
                now = at;
            }
            // The EXPIRED changes commit with the deletions.
            super::feed::record(conn, &feed, &expired, now).await?;
            conn.query_drop("COMMIT").await?;
            let doomed = expired;
            Ok::<_, OpError>(doomed.len())
        }
        .await;
        match result {
            Ok(n) => {
                c.done(&Ok::<_, OpError>(()));
                Ok(n)
            }
            // No table, a read-only collection (another service reaps it), or
            // a lost race with another reaper: nothing reaped this round.
            Err(e) if e.is_missing_table() || e.is_conflict() || e.is_permission_denied() => {
                self.finish_failed(c, Some(e)).await;
                Ok(0)
            }
            Err(e) => {
                let (error, cause) = e.split(&self.target);
                self.finish_failed(c, cause).await;
                Err(error)
            }
        }
    }
}
