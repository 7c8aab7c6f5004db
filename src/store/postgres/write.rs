//! Writes: each condition decided by the writing statement itself
//! (`UPDATE … WHERE rev = $2`, `INSERT … ON CONFLICT`), never by an earlier
//! read; when a statement matches no row, the shared checks in `store` say why.

use super::error::OpError;
use super::pool::Conn;
use super::PostgresStore;
use crate::store::{
    new_rev, now_micros, DeleteOp, Micros, Mutation, SaveOp, Saved, StoreError, StoreResult,
    Written,
};
use deadpool_postgres::{GenericClient, Object};
use std::collections::BTreeSet;
use tokio_postgres::IsolationLevel;

async fn current_rev(
    c: &impl GenericClient,
    table: &str,
    id: &str,
) -> Result<Option<String>, OpError> {
    let stmt = c
        .prepare_cached(&format!("SELECT rev FROM {table} WHERE id = $1"))
        .await?;
    let row = c.query_opt(&stmt, &[&id]).await?;
    Ok(row.map(|r| r.try_get(0)).transpose()?)
}

/// The error of a conditional statement that matched no row, from the stored
/// rev read right after it.
async fn why_not(
    c: &impl GenericClient,
    table: &str,
    id: &str,
    check: impl FnOnce(Option<&str>) -> StoreResult<()>,
) -> OpError {
    match current_rev(c, table, id).await {
        Ok(rev) => match check(rev.as_deref()) {
            Err(e) => e.into(),
            // The row changed between the two statements; the caller may retry.
            Ok(()) => {
                StoreError::Unavailable(format!("document `{id}` changed concurrently; retry"))
                    .into()
            }
        },
        Err(e) => e,
    }
}

/// One save, each case decided by a single statement.
pub(super) async fn save_in(
    c: &impl GenericClient,
    table: &str,
    op: &SaveOp,
    now: Micros,
) -> Result<Saved, OpError> {
    let rev = new_rev();
    let saved = |created| Saved {
        rev: rev.clone(),
        update_time: now,
        created,
    };
    let inserted = match (op.expected_rev.as_deref(), op.create_only) {
        (Some(expected), false) => {
            // Compare-and-set; a concurrent writer's row lock makes this wait
            // and re-check the rev of the committed row.
            let stmt = c
                .prepare_cached(&format!(
                    "UPDATE {table} SET rev = $3, data = $4::text::jsonb, update_time = $5 WHERE id = $1 AND rev = $2"
                ))
                .await?;
            c.execute(&stmt, &[&op.id, &expected, &rev, &op.data, &now])
                .await?
                == 1
        }
        // Can never write: present is AlreadyExists, absent has no rev to match.
        (Some(_), true) => false,
        (None, true) => {
            let stmt = c
                .prepare_cached(&format!(
                    "INSERT INTO {table} (id, rev, data, create_time, update_time)
                     VALUES ($1, $2, $3::text::jsonb, $4, $4) ON CONFLICT (id) DO NOTHING"
                ))
                .await?;
            return if c.execute(&stmt, &[&op.id, &rev, &op.data, &now]).await? == 1 {
                Ok(saved(true))
            } else {
                Err(why_not(c, table, &op.id, |rev| op.check(rev)).await)
            };
        }
        (None, false) => {
            // An inserted row has xmax 0; ON CONFLICT DO UPDATE locks the old
            // row first, so the updated version carries this transaction's xid.
            let stmt = c
                .prepare_cached(&format!(
                    "INSERT INTO {table} AS d (id, rev, data, create_time, update_time)
                     VALUES ($1, $2, $3::text::jsonb, $4, $4)
                     ON CONFLICT (id) DO UPDATE
                     SET rev = EXCLUDED.rev, data = EXCLUDED.data, update_time = EXCLUDED.update_time
                     RETURNING (d.xmax = 0) AS created"
                ))
                .await?;
            let row = c.query_one(&stmt, &[&op.id, &rev, &op.data, &now]).await?;
            return Ok(saved(row.try_get(0)?));
        }
    };
    if inserted {
        Ok(saved(false))
    } else {
        Err(why_not(c, table, &op.id, |rev| op.check(rev)).await)
    }
}

pub(super) async fn delete_in(
    c: &impl GenericClient,
    table: &str,
    op: &DeleteOp,
) -> Result<(), OpError> {
    let stmt = c
        .prepare_cached(&format!(
            "DELETE FROM {table} WHERE id = $1 AND ($2::text IS NULL OR rev = $2)"
        ))
        .await?;
    if c.execute(&stmt, &[&op.id, &op.expected_rev]).await? == 1 {
        return Ok(());
    }
    Err(why_not(c, table, &op.id, |rev| op.check(rev)).await)
}

impl PostgresStore {
    /// Runs `mutations` in one transaction; retries once when a table believed to
    /// exist turned out to be gone (dropped behind the cache's back).
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
        for _ in 0..2 {
            if let Some(results) = self.write_once(conn, mutations, &tables).await? {
                return Ok(results);
            }
            self.tables
                .forget(mutations.iter().map(Mutation::collection));
        }
        Err(StoreError::Unavailable(
            "a collection's table disappeared while writing to it (dropped concurrently?); retry"
                .into(),
        ))
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
        let unknown: Vec<&str> = mutations
            .iter()
            .filter_map(|m| match m {
                Mutation::Save(op) if !self.tables.known(&op.collection) => {
                    Some(op.collection.as_str())
                }
                _ => None,
            })
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
    ) -> StoreResult<Option<Vec<Written>>> {
        let missing = self.missing_tables(client, mutations).await?;
        let now = now_micros();
        // READ COMMITTED whatever the role's default: each statement sees tables
        // that other sessions created meanwhile, and conditions are re-checked on
        // the latest committed row.
        let mut tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::ReadCommitted)
            .start()
            .await
            .map_err(|e| self.pg(e))?;
        let mut created: Vec<&str> = Vec::new();
        let mut results = Vec::with_capacity(mutations.len());
        // Returning early drops `tx`, which rolls everything back (table creations too).
        for (index, (mutation, table)) in mutations.iter().zip(tables).enumerate() {
            let collection = mutation.collection();
            let result = match mutation {
                Mutation::Save(op) => {
                    if missing.contains(collection) && !created.contains(&collection) {
                        self.tables
                            .create_in(&mut tx, collection, &self.target)
                            .await
                            .map_err(|e| e.in_mutation(index))?;
                        created.push(collection);
                    }
                    save_in(&tx, table, op, now).await.map(Written::Saved)
                }
                Mutation::Delete(op) => delete_in(&tx, table, op).await.map(|()| Written::Deleted),
            };
            match result {
                Ok(written) => results.push(written),
                Err(e) if e.is_missing_table() => {
                    return match mutation {
                        _ if !self.auto_create => {
                            Err(self.tables.no_table(collection).in_mutation(index))
                        }
                        Mutation::Save(_) => Ok(None),
                        Mutation::Delete(op) => {
                            Err(StoreError::not_found(collection, &op.id).in_mutation(index))
                        }
                    };
                }
                Err(e) => return Err(e.resolve(&self.target).in_mutation(index)),
            }
        }
        tx.commit().await.map_err(|e| self.pg(e))?;
        self.tables.remember(created);
        Ok(Some(results))
    }
}
