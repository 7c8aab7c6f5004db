//! Writes: one READ COMMITTED transaction per call. Each mutation reads its
//! row with `FOR UPDATE` (so a concurrent writer of the same document waits
//! and the decision is made on the latest committed row), the shared planner
//! decides, and one statement applies the outcome and records its changes.
//!
//! Round trips (BENCHMARKS.md, issue 17): statements that do not depend on
//! each other's answers travel together (tokio-postgres pipelines queries
//! issued concurrently on one connection, and the server runs them in the
//! order sent). `BEGIN` goes with the first read, which also reads the
//! transaction's time; each mutation's write goes with the next mutation's
//! read; the last write goes with `COMMIT` (and the change feed's NOTIFY,
//! which runs after it, see `feed::notify`). A Save is two round trips; a
//! Write of n mutations n + 1.

use super::error::{describe, is_conflict, OpError};
use super::pool::Conn;
use super::{PostgresStore, COLUMNS, NOW};
use crate::store::plan::{Action, Change, Planned};
use crate::store::sql::locked_row;
use crate::store::{Document, Micros, Mutation, StoreError, StoreResult, Written};
use deadpool_postgres::{GenericClient, Object};
use futures_util::future::join;
use std::collections::BTreeSet;
use std::task::Poll;
use tokio_postgres::types::ToSql;

/// Attempts of a write that lost an insert race (two transactions inserting
/// the same new document: the loser re-runs and sees the winner's row).
const ATTEMPTS: usize = 3;

/// READ COMMITTED whatever the role's default: each statement sees tables
/// that other sessions created meanwhile, and FOR UPDATE reads the latest
/// committed row.
const BEGIN: &str = "BEGIN ISOLATION LEVEL READ COMMITTED";

/// The stored row of `mutation`'s document, live or expired, locked, and the
/// transaction's time on the database's clock, in one statement (a row
/// always comes back; its document columns are NULL when there is no row).
async fn stored(
    c: &impl GenericClient,
    table: &str,
    mutation: &Mutation,
    offset: &i64,
) -> Result<(Option<Document>, Micros), OpError> {
    let locked = locked_row(COLUMNS, table, mutation.needs_stored_data(), ["$2", "$3"]);
    let sql = format!(
        "WITH r AS ({locked}) SELECT r.*, {NOW} FROM (VALUES (0)) AS one LEFT JOIN r ON true"
    );
    let key = mutation.key();
    let stmt = c.prepare_cached(&sql).await?;
    let row = c.query_one(&stmt, &[offset, &key.scope, &key.id]).await?;
    let now: Micros = row.try_get(7)?;
    let doc = match row.try_get::<_, Option<String>>(1)? {
        Some(_) => Some(super::row_to_doc(&key.collection, &row)?),
        None => None,
    };
    Ok((doc, now))
}

/// A statement's parameters, owned or borrowed from its mutation's plan.
type Params<'a> = Vec<Box<dyn ToSql + Sync + Send + 'a>>;

/// A planned mutation not yet applied: its action and changes.
struct Pending {
    index: usize,
    action: Action,
    changes: Vec<Change>,
}

/// The one statement that applies `action` and records `changes` (at `now`),
/// with its parameters; `None` when there is nothing to do.
fn statement<'a>(
    schema: &str,
    table: &str,
    action: &'a Action,
    changes: &'a [Change],
    now: Micros,
) -> Option<(String, Params<'a>)> {
    let mut params: Params<'a> = Vec::new();
    let document = |params: &mut Params<'a>, d: &'a Document| {
        params.push(Box::new(d.key.scope.as_str()));
        params.push(Box::new(d.key.id.as_str()));
        params.push(Box::new(d.rev.as_str()));
        params.push(Box::new(d.data.as_str()));
        params.push(Box::new(d.create_time));
        params.push(Box::new(d.update_time));
        params.push(Box::new(d.expire_time));
    };
    let write = match action {
        Action::Insert(d) => {
            document(&mut params, d);
            Some(format!(
                "INSERT INTO {table} (scope, id, rev, data, create_time, update_time, expire_time)
                 VALUES ($1, $2, $3, $4::text::jsonb, $5, $6, $7)"
            ))
        }
        Action::Replace(d) => {
            document(&mut params, d);
            Some(format!(
                "UPDATE {table} SET rev = $3, data = $4::text::jsonb, create_time = $5, update_time = $6, expire_time = $7
                 WHERE scope = $1 AND id = $2"
            ))
        }
        Action::Delete(k) => {
            params.push(Box::new(k.scope.as_str()));
            params.push(Box::new(k.id.as_str()));
            Some(format!("DELETE FROM {table} WHERE scope = $1 AND id = $2"))
        }
        Action::Nothing => None,
    };
    if changes.is_empty() {
        return write.map(|sql| (sql, params));
    }
    let record = super::feed::record_sql(schema, params.len() + 1, write.is_some());
    let sql = match write {
        Some(write) => format!("WITH w AS ({write} RETURNING 1) {record}"),
        None => record,
    };
    params.extend(super::feed::record_params(changes, now));
    Some((sql, params))
}

/// Why a statement of an attempt failed, and what the write does about it.
enum Failed {
    /// The attempt ends with this.
    Stop(Retry),
    /// A table believed to exist is gone: forget it and run again.
    Forget,
}

impl PostgresStore {
    /// Runs `mutations` in one transaction. Retries when a table believed to
    /// exist turned out to be gone (dropped behind the cache's back), and when
    /// an insert lost a race to a concurrent insert of the same document.
    pub(super) async fn run_write(
        &self,
        conn: &mut Conn,
        mutations: &[Mutation],
    ) -> StoreResult<Vec<Written>> {
        let tables = mutations
            .iter()
            .enumerate()
            .map(|(index, m)| {
                self.tables
                    .table(m.collection())
                    .map_err(|e| e.in_mutation(index))
            })
            .collect::<StoreResult<Vec<_>>>()?;
        let mut last = None;
        for _ in 0..ATTEMPTS {
            match self.write_once(conn, mutations, &tables).await {
                Ok(Some(results)) => return Ok(results),
                Ok(None) => self
                    .tables
                    .forget(mutations.iter().map(Mutation::collection)),
                Err(Retry::Race(e)) => last = Some(e),
                Err(Retry::No(e)) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            StoreError::unavailable(
                "a collection's table disappeared while writing to it (dropped concurrently?); retry",
            )
        }))
    }

    /// Collections of `mutations` without a table (auto_create only). Looked
    /// up before BEGIN: inside the transaction a statement on a missing table
    /// would abort everything, the other mutations' work included. A save
    /// creates its table in the transaction; a delete there has nothing to
    /// delete.
    async fn missing_tables<'m>(
        &self,
        client: &Object,
        mutations: &'m [Mutation],
    ) -> StoreResult<BTreeSet<&'m str>> {
        if !self.auto_create {
            return Ok(BTreeSet::new());
        }
        let unknown: Vec<&str> = mutations
            .iter()
            .map(Mutation::collection)
            .filter(|c| !self.tables.known(c))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if unknown.is_empty() {
            return Ok(BTreeSet::new());
        }
        let existing = self
            .tables
            .existing(client, &unknown)
            .await
            .map_err(|e| self.pg(e))?;
        self.tables.remember(existing.iter().map(String::as_str));
        let missing: BTreeSet<&str> = unknown
            .into_iter()
            .filter(|c| !existing.contains(*c))
            .collect();
        let creates = mutations
            .iter()
            .any(|m| !matches!(m, Mutation::Delete(_)) && missing.contains(m.collection()));
        if creates {
            self.tables.ensure_schema(client, &self.target).await?;
        }
        Ok(missing)
    }

    /// One attempt of a write. `Ok(None)`: a cached table was missing, retry.
    /// A transaction the attempt leaves open (it failed before COMMIT) is
    /// rolled back here, before the connection is used again.
    async fn write_once(
        &self,
        client: &mut Object,
        mutations: &[Mutation],
        tables: &[String],
    ) -> Result<Option<Vec<Written>>, Retry> {
        let missing = self.missing_tables(client, mutations).await?;
        let mut open = false;
        let result = self
            .attempt(client, mutations, tables, &missing, &mut open)
            .await;
        if open {
            // A failed statement ended the attempt. Should the rollback fail,
            // the connection is broken, and the pool drops broken connections.
            if let Err(e) = client.batch_execute("ROLLBACK").await {
                tracing::debug!(error = %describe(&e), "ROLLBACK after a failed write failed");
            }
        }
        result
    }

    /// The statements of one attempt; `open` says whether a transaction is
    /// open on `client` (begun and neither committed nor rolled back).
    async fn attempt(
        &self,
        client: &Object,
        mutations: &[Mutation],
        tables: &[String],
        missing: &BTreeSet<&str>,
        open: &mut bool,
    ) -> Result<Option<Vec<Written>>, Retry> {
        let offset = self.clock.offset();
        let mut created: Vec<&str> = Vec::new();
        let mut results = Vec::with_capacity(mutations.len());
        // The previous mutation's write, sent with the next read or COMMIT.
        let mut pending: Option<Pending> = None;
        let mut now = 0;
        // Whether a change was recorded: the commit is followed by a wake-up.
        let mut recorded = false;
        for (index, (mutation, table)) in mutations.iter().zip(tables).enumerate() {
            let collection = mutation.collection();
            let absent = missing.contains(collection) && !created.contains(&collection);
            if let (true, Mutation::Delete(op)) = (absent, mutation) {
                // No table, no document: nothing to send.
                if op.allow_missing {
                    results.push(Written::Deleted);
                    continue;
                }
                return Err(StoreError::not_found(collection, &op.key.id)
                    .in_mutation(index)
                    .into());
            }
            if absent {
                created.push(collection);
                // The table must exist before the read is sent: apply what is
                // pending, begin, create.
                let flushed = pending.take();
                if let Some((p, (sql, params))) = self.write_of(flushed.as_ref(), tables, now) {
                    let done = match client.prepare_cached(&sql).await {
                        Ok(stmt) => execute(client, &stmt, &params).await,
                        Err(e) => Err(e),
                    };
                    if let Err(e) = done {
                        return self.write_failed(e.into(), p, mutations);
                    }
                }
                if !*open {
                    client.batch_execute(BEGIN).await.map_err(|e| self.pg(e))?;
                    *open = true;
                }
                if let Err(e) = self.tables.create_in(client, collection).await {
                    return ended(self.failed(e, index, mutation));
                }
            }
            let read = stored(client, table, mutation, &offset);
            let previous = pending.take();
            let read = if !*open {
                let (begun, read) = join(client.batch_execute(BEGIN), read).await;
                begun.map_err(|e| self.pg(e))?;
                *open = true;
                read
            } else if let Some((p, (sql, params))) = self.write_of(previous.as_ref(), tables, now) {
                // Prepared first: only a prepared write goes out before the
                // read in the same poll (a cache miss would reorder them).
                let stmt = match client.prepare_cached(&sql).await {
                    Ok(stmt) => stmt,
                    Err(e) => return self.write_failed(e.into(), p, mutations),
                };
                let (written, read) = join(execute(client, &stmt, &params), read).await;
                if let Err(e) = written {
                    return self.write_failed(e.into(), p, mutations);
                }
                read
            } else {
                read.await
            };
            let (row, at) = match read {
                Ok(read) => read,
                Err(e) => return ended(self.failed(e, index, mutation)),
            };
            now = at;
            let Planned {
                action,
                written,
                changes,
            } = match mutation.plan(row, now) {
                Ok(planned) => planned,
                Err(e) => return Err(e.in_mutation(index).into()),
            };
            results.push(written);
            recorded |= !changes.is_empty();
            pending = Some(Pending {
                index,
                action,
                changes,
            });
        }
        if !*open {
            // Nothing was sent: deletes in collections without a table.
            return Ok(Some(results));
        }
        let committed = match self.write_of(pending.as_ref(), tables, now) {
            Some((p, (sql, params))) => {
                let stmt = match client.prepare_cached(&sql).await {
                    Ok(stmt) => stmt,
                    Err(e) => return self.write_failed(e.into(), p, mutations),
                };
                // The write goes out on its first poll, then COMMIT, which
                // ends the transaction whatever the write did (after a failed
                // statement PostgreSQL answers it with a rollback). A write
                // that fails before it is sent (encoding its parameters) is
                // not followed by COMMIT: the transaction is rolled back (so
                // is one whose write failed before this task looked again).
                let write = execute(client, &stmt, &params);
                tokio::pin!(write);
                let (written, committed) = match futures_util::poll!(write.as_mut()) {
                    Poll::Ready(written) => (written, None),
                    Poll::Pending => {
                        let (written, committed) = join(write, self.commit(client, recorded)).await;
                        *open = false;
                        (written, Some(committed))
                    }
                };
                match (written, committed) {
                    // No answer at all: the connection broke with COMMIT sent.
                    (Err(e), Some(_)) if e.code().is_none() => Err(e),
                    (Err(e), _) => return self.write_failed(e.into(), p, mutations),
                    (Ok(_), Some(committed)) => committed,
                    // Answered already (a busy machine paused this task): COMMIT now.
                    (Ok(_), None) => {
                        let committed = self.commit(client, recorded).await;
                        *open = false;
                        committed
                    }
                }
            }
            None => {
                let committed = self.commit(client, recorded).await;
                *open = false;
                committed
            }
        };
        committed.map_err(|e| {
            if e.code().is_none() {
                // The connection died during COMMIT: applied or not, nobody knows.
                StoreError::commit_unknown(format!(
                    "the connection to PostgreSQL at {} broke during COMMIT ({}): the write may or may not be applied; read before retrying",
                    self.target,
                    describe(&e)
                ))
            } else {
                self.pg(e)
            }
        })?;
        self.tables.remember(created);
        Ok(Some(results))
    }

    /// COMMIT, and the feed's wake-up after it when the transaction recorded
    /// changes (sent together; see [`super::feed::notify`]).
    async fn commit(&self, client: &Object, recorded: bool) -> Result<(), tokio_postgres::Error> {
        if !recorded {
            return client.batch_execute("COMMIT").await;
        }
        let notify = super::feed::notify(&self.tables.schema);
        let (committed, notified) = join(
            client.batch_execute("COMMIT"),
            client.batch_execute(&notify),
        )
        .await;
        if let Err(e) = notified {
            tracing::debug!(error = %describe(&e), "the change feed's NOTIFY after a write failed");
        }
        committed
    }

    /// A pending mutation with its statement, if it has one.
    fn write_of<'a>(
        &self,
        pending: Option<&'a Pending>,
        tables: &[String],
        now: Micros,
    ) -> Option<(&'a Pending, (String, Params<'a>))> {
        let p = pending?;
        let table = &tables[p.index];
        statement(&self.tables.schema, table, &p.action, &p.changes, now).map(|s| (p, s))
    }

    /// What a failed statement of mutation `index` means for the write.
    fn failed(&self, e: OpError, index: usize, mutation: &Mutation) -> Failed {
        let collection = mutation.collection();
        match e {
            e if e.is_missing_table() => match mutation {
                _ if !self.auto_create => {
                    Failed::Stop(self.tables.no_table(collection).in_mutation(index).into())
                }
                // The table went after it was looked up: look again (the
                // transaction is aborted, the other mutations' work with it).
                Mutation::Delete(op) if op.allow_missing => Failed::Forget,
                Mutation::Delete(op) => Failed::Stop(
                    StoreError::not_found(collection, &op.key.id)
                        .in_mutation(index)
                        .into(),
                ),
                _ => Failed::Forget,
            },
            OpError::Pg(e) if is_conflict(&e) => Failed::Stop(Retry::Race(
                StoreError::unavailable(format!(
                    "the write conflicted with a concurrent transaction ({}); retry",
                    describe(&e)
                ))
                .in_mutation(index),
            )),
            e => Failed::Stop(e.resolve(&self.target).in_mutation(index).into()),
        }
    }

    /// Ends the attempt after the write of a pending mutation failed. Its
    /// row was read and locked in this transaction, so its table cannot have
    /// gone; should it have, the write runs again.
    fn write_failed(
        &self,
        e: OpError,
        p: &Pending,
        mutations: &[Mutation],
    ) -> Result<Option<Vec<Written>>, Retry> {
        ended(self.failed(e, p.index, &mutations[p.index]))
    }
}

/// Ends an attempt: `Ok(None)` runs it again.
fn ended(failed: Failed) -> Result<Option<Vec<Written>>, Retry> {
    match failed {
        Failed::Forget => Ok(None),
        Failed::Stop(e) => Err(e),
    }
}

/// Runs a prepared write with its parameters.
async fn execute(
    client: &Object,
    stmt: &tokio_postgres::Statement,
    params: &Params<'_>,
) -> Result<u64, tokio_postgres::Error> {
    let params: Vec<&(dyn ToSql + Sync)> = params
        .iter()
        .map(|p| p.as_ref() as &(dyn ToSql + Sync))
        .collect();
    client.execute(stmt, &params).await
}

/// Why one attempt of a write failed: a lost insert race is retried.
enum Retry {
    Race(StoreError),
    No(StoreError),
}

impl From<StoreError> for Retry {
    fn from(e: StoreError) -> Self {
        Retry::No(e)
    }
}
