//! PostgreSQL store (tokio-postgres behind a deadpool pool).
//!
//! Each collection is the table of the same name in one schema, so grants and
//! row-level security are plain SQL on `schema.collection`. Statements are
//! prepared once per connection. A call whose future is dropped mid-query (the
//! client's deadline passed) cancels that query on the server and discards its
//! connection.
//!
//! - [`pool`]: the pool, password rotation, the cancelling connection guard;
//! - [`error`]: PostgreSQL errors in a caller's terms;
//! - [`ddl`]: tables, the schema, table creation on first write;
//! - [`write`]: saves, deletes and atomic writes;
//! - [`migrate`]: `docsidecar migrate` (tables and grants, admin account);
//! - [`tls`]: TLS to the server, with libpq's `sslmode` semantics;
//! - [`verify`]: the start-up check of the declared collections' tables and
//!   the runtime role's privileges.

mod ddl;
mod error;
pub mod migrate;
mod pool;
pub mod tls;
mod verify;
mod write;

pub use tls::{PgTls, SslMode};

use super::*;
use crate::background::{Backoff, Tasks};
use error::map_pg_error;
use pool::Pools;
use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;
use tokio_postgres::Row;

/// The document columns, in the order [`row_to_doc`] reads them. `data` travels as
/// JSON text both ways; PostgreSQL parses it into `jsonb` and prints it back.
const COLUMNS: &str = "id, rev, data::text, create_time, update_time";

/// Where the PostgreSQL store connects and how. `Display` and `Debug` show
/// `user@host:port/db`, never the password.
#[derive(Clone)]
pub struct PgTarget {
    /// Host, port, database, user and password.
    pub config: tokio_postgres::Config,
    /// The mounted password file (`DB_PASS_FILE`), watched for rotation.
    pub password_file: Option<PathBuf>,
    /// Schema holding one table per collection; must match the name rule.
    pub schema: String,
    /// Connections to keep at most.
    pub pool_size: usize,
    /// How long a call waits for a pooled connection before UNAVAILABLE.
    pub acquire_timeout: Duration,
    /// Connection attempts at start-up (0: retry forever).
    pub max_retries: u32,
    /// First wait between start-up attempts; doubles up to 30 s.
    pub retry_delay: Duration,
    /// Create the schema and the collections' tables on demand. Off in production,
    /// where `docsidecar migrate` creates them and the runtime role has no DDL rights.
    pub auto_create: bool,
    /// TLS to the server.
    pub tls: PgTls,
    /// The collections a policy declares and what each needs: start-up checks
    /// that their tables exist and that the role holds those privileges.
    pub declared: Declared,
}

/// The collections a PostgreSQL store is expected to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Declared {
    /// No policy (development): any collection, tables made on first write.
    Any,
    /// These collections, with the privileges each needs.
    Only(BTreeMap<String, Grant>),
}

impl PgTarget {
    /// A target with the defaults for everything but the connection.
    pub fn new(config: tokio_postgres::Config) -> PgTarget {
        PgTarget {
            config,
            password_file: None,
            schema: "docsidecar".into(),
            pool_size: 4,
            acquire_timeout: Duration::from_secs(5),
            max_retries: 10,
            retry_delay: Duration::from_secs(1),
            auto_create: true,
            tls: PgTls::default(),
            declared: Declared::Any,
        }
    }
}

impl fmt::Display for PgTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cfg = &self.config;
        let host = cfg
            .get_hosts()
            .first()
            .map(|h| match h {
                tokio_postgres::config::Host::Tcp(h) => h.clone(),
                tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
            })
            .unwrap_or_else(|| "localhost".into());
        let port = cfg.get_ports().first().copied().unwrap_or(5432);
        write!(
            f,
            "{}@{host}:{port}/{}",
            cfg.get_user().unwrap_or("?"),
            cfg.get_dbname().unwrap_or("?")
        )
    }
}

impl fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PgTarget({self}, schema {}, sslmode {})",
            self.schema, self.tls.mode
        )
    }
}

/// Documents in PostgreSQL: one table per collection in one schema.
pub struct PostgresStore {
    pools: Arc<Pools>,
    tables: ddl::Tables,
    auto_create: bool,
    /// `user@host:port/db` for messages and logs; never the password.
    target: String,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("target", &self.target)
            .field("schema", &self.tables.schema)
            .field("auto_create", &self.auto_create)
            .finish_non_exhaustive()
    }
}

fn row_to_doc(collection: &str, row: &Row) -> Result<Document, tokio_postgres::Error> {
    Ok(Document {
        collection: collection.to_string(),
        id: row.try_get(0)?,
        rev: row.try_get(1)?,
        data: row.try_get(2)?,
        create_time: row.try_get(3)?,
        update_time: row.try_get(4)?,
    })
}

impl PostgresStore {
    /// Builds the pool, waits for the database (retrying with a doubling delay,
    /// at most 30 s; `max_retries` 0 retries forever) and, with `auto_create`,
    /// makes sure the schema exists. A rotated password file is picked up by a
    /// watcher in `tasks`.
    pub async fn connect(target: &PgTarget, tasks: &Tasks) -> StoreResult<Self> {
        let tables = ddl::Tables::new(target.schema.clone())?;
        let name = target.to_string();
        let pool_size = target.pool_size.max(1);
        let mut config = target.config.clone();
        target.tls.apply(&mut config);
        let pools = Pools::new(
            config,
            target.tls.connector()?,
            pool_size,
            target.acquire_timeout,
            name.clone(),
            tasks,
        )?;
        if let Some(file) = &target.password_file {
            pools.watch_password(file.clone(), tasks);
        }
        let store = PostgresStore {
            pools,
            tables,
            auto_create: target.auto_create,
            target: name,
        };
        let mut backoff = Backoff::new(target.max_retries, target.retry_delay);
        backoff
            .retry(
                || store.pools.probe(),
                |error| error.is_transient(),
                |error, attempt, delay| {
                    tracing::warn!(
                        target_db = %store.target,
                        attempt,
                        retry_in = ?delay,
                        error = %error,
                        "PostgreSQL is not reachable yet; retrying"
                    );
                },
            )
            .await
            .map_err(|error| {
                if error.is_transient() {
                    StoreError::Unavailable(format!(
                        "PostgreSQL at {} did not answer after {} attempt(s): {error}",
                        store.target,
                        backoff.attempts_made()
                    ))
                } else {
                    // Retrying cannot fix a wrong password or a missing database.
                    StoreError::Unavailable(format!(
                        "PostgreSQL at {} refused the connection: {error} (not retried: fix the role, password, database or TLS settings)",
                        store.target
                    ))
                }
            })?;
        if store.auto_create {
            let conn = store.pools.acquire().await?;
            let result = store.tables.ensure_schema(&*conn, &store.target).await;
            conn.release();
            result?;
        }
        if let Declared::Only(declared) = &target.declared {
            let conn = store.pools.acquire().await?;
            let result = verify::declared(&*conn, &store.tables, declared, store.auto_create).await;
            conn.release();
            let missing = result.map_err(|e| store.pg(e))?;
            if let Some(problem) = missing.problem(&store.tables.schema) {
                return Err(problem);
            }
            store
                .tables
                .remember(missing.present.iter().map(String::as_str));
        }
        tracing::info!(
            target_db = %store.target,
            schema = %store.tables.schema,
            pool_size,
            auto_create = store.auto_create,
            sslmode = %target.tls.mode,
            "connected to PostgreSQL"
        );
        Ok(store)
    }

    fn pg(&self, e: tokio_postgres::Error) -> StoreError {
        map_pg_error(&e, &self.target)
    }

    /// Runs one read statement (prepared once per connection) on a pooled
    /// connection and gives the connection back; an abandoned call cancels its
    /// query instead (see [`pool::Conn`]). A collection without a table has no rows.
    async fn select(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> StoreResult<Vec<Row>> {
        let c = self.pools.acquire().await?;
        let result = async {
            let stmt = c.prepare_cached(sql).await?;
            c.query(&stmt, params).await
        }
        .await;
        c.release();
        match result {
            Ok(rows) => Ok(rows),
            Err(e) if error::is_missing_table(&e) => Ok(Vec::new()),
            Err(e) => Err(self.pg(e)),
        }
    }

    fn documents(&self, collection: &str, rows: &[Row]) -> StoreResult<Vec<Document>> {
        rows.iter()
            .map(|row| row_to_doc(collection, row))
            .collect::<Result<_, _>>()
            .map_err(|e| self.pg(e))
    }

    /// Runs `mutations` atomically on a pooled connection; see [`Self::select`].
    async fn write_all(&self, mutations: &[Mutation]) -> StoreResult<Vec<Written>> {
        let mut conn = self.pools.acquire().await?;
        let result = self.run_write(&mut conn, mutations).await;
        conn.release();
        result
    }

    /// A plain save or delete: one autocommit statement on the fast path; the
    /// first write to a new collection goes through [`Self::write_all`], which
    /// creates its table in the same transaction.
    async fn write_one(&self, mutation: Mutation) -> StoreResult<Written> {
        let collection = mutation.collection().to_string();
        let table = self.tables.table(&collection)?;
        let conn = self.pools.acquire().await?;
        let result = match &mutation {
            Mutation::Save(op) => write::save_in(&*conn, &table, op, now_micros())
                .await
                .map(Written::Saved),
            Mutation::Delete(op) => write::delete_in(&*conn, &table, op)
                .await
                .map(|()| Written::Deleted),
        };
        conn.release();
        match (result, &mutation) {
            (Ok(written), _) => Ok(written),
            (Err(e), _) if e.is_missing_table() && !self.auto_create => {
                Err(self.tables.no_table(&collection))
            }
            (Err(e), Mutation::Delete(op)) if e.is_missing_table() => {
                Err(StoreError::not_found(&collection, &op.id))
            }
            (Err(e), Mutation::Save(_)) if e.is_missing_table() => {
                let mut written = self
                    .write_all(std::slice::from_ref(&mutation))
                    .await
                    .map_err(StoreError::outside_mutation)?;
                written
                    .pop()
                    .ok_or_else(|| StoreError::Internal("a save returned no result".into()))
            }
            (Err(e), _) => Err(e.resolve(&self.target)),
        }
    }
}

#[async_trait]
impl DocumentStore for PostgresStore {
    async fn get(&self, collection: &str, id: &str) -> StoreResult<Document> {
        let table = self.tables.table(collection)?;
        let sql = format!("SELECT {COLUMNS} FROM {table} WHERE id = $1");
        let rows = self.select(&sql, &[&id]).await?;
        self.documents(collection, &rows)?
            .pop()
            .ok_or_else(|| StoreError::not_found(collection, id))
    }

    async fn save(&self, op: SaveOp) -> StoreResult<Saved> {
        match self.write_one(Mutation::Save(op)).await? {
            Written::Saved(saved) => Ok(saved),
            Written::Deleted => Err(StoreError::Internal("a save deleted".into())),
        }
    }

    async fn delete(&self, op: DeleteOp) -> StoreResult<()> {
        self.write_one(Mutation::Delete(op)).await.map(drop)
    }

    async fn list(&self, collection: &str, after: Option<&str>, limit: usize) -> StoreResult<Page> {
        let table = self.tables.table(collection)?;
        let fetch = i64::try_from(Page::fetch_limit(limit)).unwrap_or(i64::MAX);
        // Keyset pagination on the primary key, never OFFSET.
        let rows = match after {
            Some(after) => {
                let sql =
                    format!("SELECT {COLUMNS} FROM {table} WHERE id > $1 ORDER BY id LIMIT $2");
                self.select(&sql, &[&after, &fetch]).await?
            }
            None => {
                let sql = format!("SELECT {COLUMNS} FROM {table} ORDER BY id LIMIT $1");
                self.select(&sql, &[&fetch]).await?
            }
        };
        Ok(Page::from_rows(self.documents(collection, &rows)?, limit))
    }

    async fn batch_get(&self, collection: &str, ids: &[String]) -> StoreResult<Vec<Document>> {
        let table = self.tables.table(collection)?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        // One round trip: the ids travel as one text[] parameter.
        let sql = format!("SELECT {COLUMNS} FROM {table} WHERE id = ANY($1)");
        let rows = self.select(&sql, &[&ids]).await?;
        self.documents(collection, &rows)
    }

    async fn write(&self, mutations: Vec<Mutation>) -> StoreResult<Vec<Written>> {
        if mutations.is_empty() {
            return Ok(Vec::new());
        }
        self.write_all(&mutations).await
    }

    async fn list_collections(&self) -> StoreResult<Vec<String>> {
        // Only tables this role may read: roles scoped to their own tables see
        // their own collections. A missing schema matches nothing.
        let rows = self
            .select(
                "SELECT c.relname::text FROM pg_catalog.pg_class c
                 JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') AND NOT c.relispartition
                   AND has_table_privilege(c.oid, 'SELECT')",
                &[&self.tables.schema],
            )
            .await?;
        let mut names = rows
            .iter()
            .map(|row| row.try_get::<_, String>(0))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.pg(e))?;
        // Other tables in the schema (a migrations table, say) are not collections.
        names.retain(|name| is_valid_name(name));
        names.sort_unstable();
        Ok(names)
    }

    /// On the health connection, never a pooled one: a pool held by slow
    /// calls is busy, not down (saturation shows in the pool metrics).
    async fn ping(&self) -> StoreResult<()> {
        self.pools.probe().await.map_err(|e| {
            StoreError::Unavailable(format!(
                "PostgreSQL at {} does not answer: {e}; retry",
                self.target
            ))
        })
    }

    fn pool_stats(&self) -> PoolStats {
        self.pools.stats()
    }

    async fn close(&self) {
        self.pools.close();
        tracing::info!(target_db = %self.target, "PostgreSQL store closed");
    }
}

#[cfg(test)]
mod tests;
