//! Tables and DDL: one table per collection in the configured schema, created
//! on first write in development (auto_create) or by `docsidecar migrate`.

use super::error::{describe, is_create_race, is_insufficient_privilege, map_pg_error, OpError};
use crate::store::{is_valid_name, StoreError, StoreResult, NAME_RULE};
use deadpool_postgres::GenericClient;
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

/// The name of an object (an index) belonging to a collection's table:
/// `collection$suffix`, which no collection can be named (`$` is not allowed
/// in collection names); a long collection name is cut and made unique with a
/// hash, as PostgreSQL identifiers are at most 63 bytes.
pub(super) fn object_name(collection: &str, suffix: &str) -> String {
    let name = if collection.len() + 1 + suffix.len() <= 63 {
        format!("{collection}${suffix}")
    } else {
        let hash = collection.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        let keep = 63 - suffix.len() - 1 - 8 - 1;
        format!("{}${:08x}${suffix}", &collection[..keep], hash as u32)
    };
    format!("\"{name}\"")
}

/// The DDL of a collection's table; `docsidecar migrate` uses it too, so that
/// both create the same columns (the store reads them by position and type).
/// Validates both names.
pub(super) fn table_ddl(schema: &str, collection: &str) -> StoreResult<String> {
    let table = qualified_table(schema, collection)?;
    // COLLATE "C": ids and scopes sort by bytes, as the other stores and the
    // page tokens expect. Keyed by (scope, id): each row scope has its own id
    // space; unscoped collections keep scope ''.
    Ok(format!(
        "CREATE TABLE IF NOT EXISTS {table} (
            scope       text COLLATE \"C\" NOT NULL DEFAULT '',
            id          text COLLATE \"C\" NOT NULL,
            rev         text NOT NULL,
            data        jsonb NOT NULL,
            create_time bigint NOT NULL,
            update_time bigint NOT NULL,
            expire_time bigint,
            PRIMARY KEY (scope, id)
        );
        {}",
        expiry_index(collection, &table)
    ))
}

/// The partial index the reaper finds expired rows by.
fn expiry_index(collection: &str, table: &str) -> String {
    format!(
        "CREATE INDEX IF NOT EXISTS {} ON {table} (expire_time) WHERE expire_time IS NOT NULL;",
        object_name(collection, "expiry")
    )
}

/// Brings a table created by an earlier release up to [`SCHEMA_VERSION`]:
/// columns added with defaults, so replicas of that release keep working
/// (expand); their primary key (`id`) stays until the collection is scoped.
pub(super) fn upgrade_ddl(schema: &str, collection: &str) -> StoreResult<String> {
    let table = qualified_table(schema, collection)?;
    Ok(format!(
        "ALTER TABLE {table}
            ADD COLUMN IF NOT EXISTS scope text COLLATE \"C\" NOT NULL DEFAULT '',
            ADD COLUMN IF NOT EXISTS expire_time bigint;
        {}",
        expiry_index(collection, &table)
    ))
}

/// The docsidecar schema version this release writes and needs; recorded in
/// `_migrations` (see `migrate`).
pub(super) const SCHEMA_VERSION: i32 = 4;

/// Every version, for `_migrations`.
pub(super) const SCHEMA_CHANGES: &[(i32, &str)] = &[
    (1, "schema and migration history"),
    (2, "row scopes and expiry"),
    (3, "the sort-key function of queries"),
    (4, "the change feed"),
];

/// What every version needs besides the tables: the query key function
/// (`CREATE OR REPLACE`, so running it again is harmless).
pub(super) fn schema_objects_ddl(schema: &str) -> String {
    format!(
        "{};\n{}",
        super::queries::key_function_ddl(schema),
        super::feed::feed_ddl(schema)
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
        StoreError::table_missing(format!(
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

    /// The schema version recorded in `_migrations`; `None` when there is no
    /// such table (nothing was ever migrated).
    pub(super) async fn version(
        &self,
        client: &impl tokio_postgres::GenericClient,
    ) -> Result<Option<i32>, tokio_postgres::Error> {
        let exists: bool = client
            .query_one(
                "SELECT to_regclass(format('%I._migrations', $1::text)) IS NOT NULL",
                &[&self.schema],
            )
            .await?
            .get(0);
        if !exists {
            return Ok(None);
        }
        let row = client
            .query_one(
                &format!(
                    "SELECT coalesce(max(version), 0) FROM \"{}\"._migrations",
                    self.schema
                ),
                &[],
            )
            .await?;
        Ok(Some(row.get(0)))
    }

    /// The collections whose tables exist in the schema.
    pub(super) async fn collections(
        &self,
        client: &impl tokio_postgres::GenericClient,
    ) -> Result<Vec<String>, tokio_postgres::Error> {
        let rows = client
            .query(
                "SELECT c.relname::text FROM pg_catalog.pg_class c
                 JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') AND NOT c.relispartition",
                &[&self.schema],
            )
            .await?;
        let mut names: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        names.retain(|n| is_valid_name(n));
        Ok(names)
    }

    /// Creates `_migrations` and brings every table to [`SCHEMA_VERSION`], in
    /// one transaction: what `migrate` does, done by a development sidecar
    /// that may create tables (auto_create).
    pub(super) async fn upgrade(
        &self,
        client: &mut deadpool_postgres::Object,
        target: &str,
    ) -> StoreResult<()> {
        let pg = |e: tokio_postgres::Error| map_pg_error(&e, target);
        let tx = client.transaction().await.map_err(pg)?;
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext('docsidecar migrate ' || $1::text))",
            &[&self.schema],
        )
        .await
        .map_err(pg)?;
        tx.batch_execute(&history_ddl(&self.schema))
            .await
            .map_err(pg)?;
        let current = self.version(&*tx).await.map_err(pg)?.unwrap_or(0);
        if current < SCHEMA_VERSION {
            tx.batch_execute(&schema_objects_ddl(&self.schema))
                .await
                .map_err(pg)?;
            for collection in self.collections(&*tx).await.map_err(pg)? {
                tx.batch_execute(&upgrade_ddl(&self.schema, &collection)?)
                    .await
                    .map_err(pg)?;
            }
            record_versions(&*tx, &self.schema, current)
                .await
                .map_err(pg)?;
            tracing::info!(schema = %self.schema, from = current, to = SCHEMA_VERSION, "upgraded the PostgreSQL schema");
        }
        tx.commit().await.map_err(pg)
    }

    /// Creates a collection's table inside a write's transaction (open on
    /// `c`), so that it disappears again if the write fails.
    pub(super) async fn create_in(
        &self,
        c: &impl GenericClient,
        collection: &str,
    ) -> Result<(), OpError> {
        // A savepoint: losing the race to another creator aborts only this statement.
        c.batch_execute("SAVEPOINT docsidecar_create_table").await?;
        match c.batch_execute(&table_ddl(&self.schema, collection)?).await {
            Ok(()) => {
                c.batch_execute("RELEASE SAVEPOINT docsidecar_create_table")
                    .await?;
                tracing::info!(schema = %self.schema, collection, "created the table of a new collection");
                Ok(())
            }
            // The other creator committed before this statement gave up: the table exists.
            Err(e) if is_create_race(&e) => Ok(c
                .batch_execute("ROLLBACK TO SAVEPOINT docsidecar_create_table")
                .await?),
            Err(e) if is_insufficient_privilege(&e) => Err(StoreError::PermissionDenied(format!(
                "collection `{collection}` has no table and the database role may not create one in schema `{}`: run `docsidecar migrate` ({})",
                self.schema,
                describe(&e)
            ))
            .into()),
            Err(e) => Err(e.into()),
        }
    }
}

/// The migration history table of a schema (and the schema itself).
pub(super) fn history_ddl(schema: &str) -> String {
    format!(
        "CREATE SCHEMA IF NOT EXISTS \"{schema}\";
         CREATE TABLE IF NOT EXISTS \"{schema}\"._migrations (
             version     integer PRIMARY KEY,
             description text NOT NULL,
             applied_at  timestamptz NOT NULL DEFAULT now()
         );"
    )
}

/// Records every version after `current` in `_migrations`.
pub(super) async fn record_versions(
    client: &impl tokio_postgres::GenericClient,
    schema: &str,
    current: i32,
) -> Result<(), tokio_postgres::Error> {
    for (version, description) in SCHEMA_CHANGES.iter().filter(|m| m.0 > current) {
        client
            .execute(
                &format!("INSERT INTO \"{schema}\"._migrations (version, description) VALUES ($1, $2) ON CONFLICT DO NOTHING"),
                &[version, description],
            )
            .await?;
        tracing::info!(version, description, "applied PostgreSQL migration");
    }
    Ok(())
}
