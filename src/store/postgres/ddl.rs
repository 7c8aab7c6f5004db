//! Tables and DDL: one table per collection in the configured schema, created
//! on first write in development (auto_create) or by `docsidecar migrate`.

use super::error::{describe, is_create_race, is_insufficient_privilege, map_pg_error};
use crate::store::{is_valid_name, StoreError, StoreResult, NAME_RULE};
use deadpool_postgres::{GenericClient, Transaction};
use std::collections::HashSet;
use std::sync::RwLock;

/// The quoted, schema-qualified table of a collection. Both names are checked
/// against the name rule first: they are the only text spliced into SQL.
pub(super) fn qualified_table(schema: &str, collection: &str) -> StoreResult<String> {
    for (what, name) in [("schema", schema), ("collection", collection)] {
        if !is_valid_name(name) {
            return Err(StoreError::Internal(format!(
                "{what} name {name:?} reached the PostgreSQL store unvalidated: {what} {NAME_RULE}"
            )));
        }
    }
    Ok(format!("\"{schema}\".\"{collection}\""))
}

/// Any identifier in double quotes, embedded quotes doubled: for names the
/// database itself gave (the current database) or checked ones (roles).
pub(super) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The DDL of a collection's table; `docsidecar migrate` uses it too, so that
/// both create the same columns (the store reads them by position and type).
pub(super) fn table_ddl(schema: &str, collection: &str) -> StoreResult<String> {
    Ok(create_table_sql(&qualified_table(schema, collection)?))
}

fn create_table_sql(table: &str) -> String {
    // COLLATE "C": ids sort by bytes, as the other stores and the page tokens expect.
    format!(
        "CREATE TABLE IF NOT EXISTS {table} (
            id          text COLLATE \"C\" PRIMARY KEY,
            rev         text NOT NULL,
            data        jsonb NOT NULL,
            create_time bigint NOT NULL,
            update_time bigint NOT NULL
        )"
    )
}

/// The tables of one schema, and those known to exist so that writes need no
/// catalog lookup for them.
pub(super) struct Tables {
    /// Validated against the name rule, so it is safe inside double quotes.
    pub(super) schema: String,
    known: RwLock<HashSet<String>>,
}

impl Tables {
    pub(super) fn new(schema: String) -> StoreResult<Tables> {
        if !is_valid_name(&schema) {
            return Err(StoreError::Internal(format!(
                "PostgreSQL schema {schema:?} is invalid: DOCSIDECAR_SCHEMA {NAME_RULE}"
            )));
        }
        Ok(Tables {
            schema,
            known: RwLock::default(),
        })
    }

    pub(super) fn table(&self, collection: &str) -> StoreResult<String> {
        qualified_table(&self.schema, collection)
    }

    pub(super) fn known(&self, collection: &str) -> bool {
        self.known
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(collection)
    }

    pub(super) fn remember<'a>(&self, collections: impl IntoIterator<Item = &'a str>) {
        let mut known = self.known.write().unwrap_or_else(|e| e.into_inner());
        known.extend(collections.into_iter().map(str::to_string));
    }

    pub(super) fn forget<'a>(&self, collections: impl IntoIterator<Item = &'a str>) {
        let mut known = self.known.write().unwrap_or_else(|e| e.into_inner());
        for collection in collections {
            known.remove(collection);
        }
    }

    /// A write to a collection without a table while tables are not created here.
    pub(super) fn no_table(&self, collection: &str) -> StoreError {
        StoreError::PermissionDenied(format!(
            "collection `{collection}` has no table in schema `{}` and this sidecar does not create tables (auto_create = false): declare it in the policy and run `docsidecar migrate`",
            self.schema
        ))
    }

    /// Creates the schema when it is missing. Checked first because `CREATE SCHEMA
    /// IF NOT EXISTS` demands CREATE on the database even when the schema exists.
    pub(super) async fn ensure_schema(
        &self,
        client: &impl GenericClient,
        target: &str,
    ) -> StoreResult<()> {
        let exists: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = $1)",
                &[&self.schema],
            )
            .await
            .and_then(|row| row.try_get(0))
            .map_err(|e| map_pg_error(&e, target))?;
        if exists {
            return Ok(());
        }
        match client
            .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS \"{}\"", self.schema))
            .await
        {
            Ok(()) => {
                tracing::info!(schema = %self.schema, "created PostgreSQL schema");
                Ok(())
            }
            Err(e) if is_create_race(&e) => Ok(()),
            Err(e) if is_insufficient_privilege(&e) => Err(StoreError::PermissionDenied(format!(
                "schema `{}` does not exist and the database role may not create it: run `docsidecar migrate` ({})",
                self.schema,
                describe(&e)
            ))),
            Err(e) => Err(map_pg_error(&e, target)),
        }
    }

    /// Which of `collections` have a table.
    pub(super) async fn existing(
        &self,
        client: &impl GenericClient,
        collections: &[&str],
    ) -> Result<HashSet<String>, tokio_postgres::Error> {
        let stmt = client
            .prepare_cached(
                "SELECT c.relname::text FROM pg_catalog.pg_class c
                 JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = $1 AND c.relname = ANY($2) AND c.relkind IN ('r', 'p')",
            )
            .await?;
        client
            .query(&stmt, &[&self.schema, &collections])
            .await?
            .iter()
            .map(|row| row.try_get::<_, String>(0))
            .collect()
    }

    /// Creates a collection's table inside a write's transaction, so that it
    /// disappears again if the write fails.
    pub(super) async fn create_in(
        &self,
        tx: &mut Transaction<'_>,
        collection: &str,
        target: &str,
    ) -> StoreResult<()> {
        let pg = |e: tokio_postgres::Error| map_pg_error(&e, target);
        let table = self.table(collection)?;
        // A savepoint: losing the race to another creator aborts only this statement.
        let savepoint = tx.savepoint("docsidecar_create_table").await.map_err(pg)?;
        match savepoint.batch_execute(&create_table_sql(&table)).await {
            Ok(()) => {
                savepoint.commit().await.map_err(pg)?;
                tracing::info!(schema = %self.schema, collection, "created the table of a new collection");
                Ok(())
            }
            // The other creator committed before this statement gave up: the table exists.
            Err(e) if is_create_race(&e) => savepoint.rollback().await.map_err(pg),
            Err(e) if is_insufficient_privilege(&e) => Err(StoreError::PermissionDenied(format!(
                "collection `{collection}` has no table and the database role may not create one in schema `{}`: run `docsidecar migrate` ({})",
                self.schema,
                describe(&e)
            ))),
            Err(e) => Err(pg(e)),
        }
    }
}
