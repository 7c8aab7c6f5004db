//! Writes: one READ COMMITTED transaction per call. Each mutation reads its
//! row with `FOR UPDATE` (so a concurrent writer of the same document waits
//! and the decision is made on the latest committed row), the shared planner
//! decides, and one statement applies the outcome.

use super::error::{describe, is_conflict, OpError};
use super::pool::Conn;
use super::{PostgresStore, COLUMNS, NOW};
use crate::store::plan::Action;
use crate::store::sql::locked_row;
use crate::store::{Document, Mutation, StoreError, StoreResult, Written};
use deadpool_postgres::{GenericClient, Object};
use std::collections::BTreeSet;
use tokio_postgres::IsolationLevel;

/// Attempts of a write that lost an insert race (two transactions inserting
/// the same new document: the loser re-runs and sees the winner's row).
const ATTEMPTS: usize = 3;

/// The stored row of `mutation`'s document, live or expired, locked.
async fn stored(
    c: &impl GenericClient,
    table: &str,
    mutation: &Mutation,
) -> Result<Option<Document>, OpError> {
    let sql = locked_row(COLUMNS, table, mutation.needs_stored_data(), ["$1", "$2"]);
    let key = mutation.key();
    let stmt = c.prepare_cached(&sql).await?;
    let row = c.query_opt(&stmt, &[&key.scope, &key.id]).await?;
    Ok(row
        .map(|r| super::row_to_doc(&key.collection, &r))
        .transpose()?)
}

/// Applies a planned action.
async fn apply(c: &impl GenericClient, table: &str, action: &Action) -> Result<(), OpError> {
    let (sql, doc) = match action {
        Action::Insert(d) => (
            format!(
                "INSERT INTO {table} (scope, id, rev, data, create_time, update_time, expire_time)
                 VALUES ($1, $2, $3, $4::text::jsonb, $5, $6, $7)"
            ),
            d,
        ),
        Action::Replace(d) => (
            format!(
                "UPDATE {table} SET rev = $3, data = $4::text::jsonb, create_time = $5, update_time = $6, expire_time = $7
                 WHERE scope = $1 AND id = $2"
            ),
            d,
        ),
        Action::Delete(k) => {
            let stmt = c
                .prepare_cached(&format!("DELETE FROM {table} WHERE scope = $1 AND id = $2"))
                .await?;
            c.execute(&stmt, &[&k.scope, &k.id]).await?;
            return Ok(());
        }
        Action::Nothing => return Ok(()),
    };
    let stmt = c.prepare_cached(&sql).await?;
    c.execute(
        &stmt,
        &[
            &doc.key.scope,
            &doc.key.id,
            &doc.rev,
            &doc.data,
            &doc.create_time,
            &doc.update_time,
            &doc.expire_time,
        ],
    )
    .await?;
    Ok(())
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

    /// Collections some save of `mutations` needs a table for that does not
    /// exist yet (auto_create only). Looked up before BEGIN: inside the
    /// transaction a statement on a missing table would abort everything.
    async fn missing_tables<'m>(
        &self,
        client: &Object,
        mutations: &'m [Mutation],
    ) -> StoreResult<BTreeSet<&'m str>> {
        if !self.auto_create {
            return Ok(BTreeSet::new());
        }
        let unknown = Mutation::unknown_collections(mutations, |c| self.tables.known(c));
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
        if !missing.is_empty() {
            self.tables.ensure_schema(client, &self.target).await?;
        }
        Ok(missing)
    }

    /// One attempt of a write. `Ok(None)`: a cached table was missing, retry.
    async fn write_once(
        &self,
        client: &mut Object,
        mutations: &[Mutation],
        tables: &[String],
    ) -> Result<Option<Vec<Written>>, Retry> {
        let missing = self.missing_tables(client, mutations).await?;
        // READ COMMITTED whatever the role's default: each statement sees tables
        // that other sessions created meanwhile, and FOR UPDATE reads the
        // latest committed row.
        let mut tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::ReadCommitted)
            .start()
            .await
            .map_err(|e| self.pg(e))?;
        // The transaction's time, on the database's clock.
        let now: i64 = tx
            .query_one(&format!("SELECT {NOW}"), &[&self.clock.offset()])
            .await
            .and_then(|r| r.try_get(0))
            .map_err(|e| self.pg(e))?;
        let mut created: Vec<&str> = Vec::new();
        let mut results = Vec::with_capacity(mutations.len());
        // Returning early drops `tx`, which rolls everything back (table creations too).
        for (index, (mutation, table)) in mutations.iter().zip(tables).enumerate() {
            let collection = mutation.collection();
            let create = missing.contains(collection) && !created.contains(&collection);
            if create {
                created.push(collection);
            }
            let result = async {
                if create {
                    self.tables.create_in(&mut tx, collection).await?;
                }
                let row = stored(&tx, table, mutation).await?;
                let planned = mutation.plan(row, now)?;
                apply(&tx, table, &planned.action).await?;
                super::feed::record(&tx, &self.tables.schema, &planned.changes, now).await?;
                Ok::<_, OpError>(planned.written)
            }
            .await;
            match result {
                Ok(written) => results.push(written),
                Err(e) if e.is_missing_table() => {
                    return match mutation {
                        _ if !self.auto_create => {
                            Err(self.tables.no_table(collection).in_mutation(index).into())
                        }
                        Mutation::Delete(op) if op.allow_missing => {
                            results.push(Written::Deleted);
                            // Nothing to delete in a collection that does not exist.
                            continue;
                        }
                        Mutation::Delete(op) => Err(StoreError::not_found(collection, &op.key.id)
                            .in_mutation(index)
                            .into()),
                        _ => Ok(None),
                    };
                }
                Err(OpError::Pg(e)) if is_conflict(&e) => {
                    return Err(Retry::Race(
                        StoreError::unavailable(format!(
                            "the write conflicted with a concurrent transaction ({}); retry",
                            describe(&e)
                        ))
                        .in_mutation(index),
                    ));
                }
                Err(e) => return Err(e.resolve(&self.target).in_mutation(index).into()),
            }
        }
        tx.commit().await.map_err(|e| {
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
