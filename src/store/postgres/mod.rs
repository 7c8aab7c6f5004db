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
mod feed;
mod keys;
pub mod migrate;
mod pool;
mod queries;
mod scopes;
pub mod tls;
mod verify;
mod write;

use super::*;
use crate::background::{Backoff, Tasks};
use error::{map_pg_error, OpError};
use futures_util::{pin_mut, TryStreamExt};
use pool::Pools;
use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

/// The document columns, in the order [`row_to_doc`] reads them. `data` travels as
/// JSON text both ways; PostgreSQL parses it into `jsonb` and prints it back.
const COLUMNS: &str = "scope, id, rev, data::text, create_time, update_time, expire_time";

/// The time on the database's clock in microseconds, plus the offset that
/// tests move ([`Clock`]), which every statement using it passes as `$1`.
const NOW: &str = "((extract(epoch from now()) * 1000000)::bigint + $1::bigint)";

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
    pub tls: crate::store::tls::DbTls,
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
            tls: Default::default(),
            declared: Declared::Any,
        }
    }
}

impl fmt::Display for PgTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cfg = &self.config;
        let ports = cfg.get_ports();
        let hosts: Vec<String> = cfg
            .get_hosts()
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let host = match h {
                    tokio_postgres::config::Host::Tcp(h) => h.clone(),
                    tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
                };
                // One port for every host, or one per host.
                let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
                format!("{host}:{port}")
            })
            .collect();
        let hosts = if hosts.is_empty() {
            "localhost:5432".to_string()
        } else {
            hosts.join(",")
        };
        write!(
            f,
            "{}@{hosts}/{}",
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
    /// The reaper's connection, outside the pool.
    reaper: tokio::sync::Mutex<Option<(tokio_postgres::Client, u64)>>,
    tables: ddl::Tables,
    auto_create: bool,
    clock: Clock,
    /// Whether a query's index is created on first use: without a policy
    /// (development) only; with one, indexes come from `migrate`.
    auto_index: bool,
    /// Indexes created on first use (no policy), so each is created once.
    indexed: sql::CreatedIndexes,
    /// The key columns each table's valid indexes hold.
    keys: keys::KeyColumns,
    wakeups: changes::Wakeups,
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
        key: Key {
            collection: collection.to_string(),
            scope: row.try_get(0)?,
            id: row.try_get(1)?,
        },
        rev: row.try_get(2)?,
        data: row.try_get(3)?,
        create_time: row.try_get(4)?,
        update_time: row.try_get(5)?,
        expire_time: row.try_get(6)?,
    })
}

/// Parameters as `query_raw` takes them.
fn params<'a>(
    p: &'a [&'a (dyn ToSql + Sync)],
) -> impl ExactSizeIterator<Item = &'a dyn ToSql> + 'a {
    p.iter().map(|p| *p as &dyn ToSql)
}

impl PostgresStore {
    /// Builds the pool, waits for the database (retrying with a doubling delay,
    /// at most 30 s; `max_retries` 0 retries forever) and, with `auto_create`,
    /// makes sure the schema exists. A rotated password file is picked up by a
    /// watcher in `tasks`.
    pub async fn connect(target: &PgTarget, tasks: &Tasks, clock: Clock) -> StoreResult<Self> {
        let tables = ddl::Tables::new(target.schema.clone())?;
        let name = target.to_string();
        let pool_size = target.pool_size.max(1);
        let mut config = target.config.clone();
        tls::apply(&target.tls, &mut config);
        let pools = Pools::new(
            config,
            tls::connector(&target.tls)?,
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
            reaper: tokio::sync::Mutex::default(),
            tables,
            auto_create: target.auto_create,
            clock,
            auto_index: target.auto_create && matches!(target.declared, Declared::Any),
            indexed: Default::default(),
            keys: Default::default(),
            wakeups: changes::Wakeups::default(),
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
                    StoreError::unavailable(format!(
                        "PostgreSQL at {} did not answer after {} attempt(s): {error}",
                        store.target,
                        backoff.attempts_made()
                    ))
                } else {
                    // Retrying cannot fix a wrong password or a missing database.
                    StoreError::unavailable(format!(
                        "PostgreSQL at {} refused the connection: {error} (not retried: fix the role, password, database or TLS settings)",
                        store.target
                    ))
                }
            })?;
        // The policy's collections first: their tables and this role's
        // privileges say more than the schema version alone.
        if let Declared::Only(declared) = &target.declared {
            store.verify_declared(declared).await?;
        }
        store.check_schema().await?;
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

    /// Starts the change feed's sequencer and listener in `tasks`.
    pub fn start_feed(self: &Arc<Self>, tasks: &Tasks) {
        feed::spawn(self.clone(), tasks);
    }

    fn pg(&self, e: tokio_postgres::Error) -> StoreError {
        map_pg_error(&e, &self.target)
    }

    /// Checks the schema version this release needs (see [`ddl::SCHEMA_VERSION`]);
    /// a development sidecar (auto_create) creates or upgrades the schema itself.
    /// Refuses to serve a policy's collections without their tables (unless
    /// they are made on first use) or without the privileges their access needs.
    async fn verify_declared(&self, declared: &BTreeMap<String, Grant>) -> StoreResult<()> {
        let conn = self.pools.acquire().await?;
        let result = verify::declared(&*conn, &self.tables, declared, self.auto_create).await;
        conn.release();
        let verified = result.map_err(|e| self.pg(e))?;
        if let Some(problem) = verified.problem(&self.tables.schema) {
            return Err(problem);
        }
        self.tables
            .remember(verified.present.iter().map(String::as_str));
        Ok(())
    }

    async fn check_schema(&self) -> StoreResult<()> {
        let mut conn = self.pools.acquire().await?;
        let version = self.tables.version(&***conn).await;
        let result = match version {
            Ok(Some(v)) if v > ddl::SCHEMA_VERSION => Err(StoreError::Internal(format!(
                "schema `{}` is at version {v}, newer than this docsidecar supports ({}): run a newer docsidecar",
                self.tables.schema,
                ddl::SCHEMA_VERSION
            ))),
            Ok(Some(v)) if v == ddl::SCHEMA_VERSION => Ok(()),
            _ if self.auto_create => {
                match self.tables.ensure_schema(&*conn, &self.target).await {
                    Ok(()) => self.tables.upgrade(&mut conn, &self.target).await,
                    Err(e) => Err(e),
                }
            }
            Ok(found) => Err(StoreError::table_missing(format!(
                "schema `{}` is {}, and this docsidecar needs version {}: run `docsidecar migrate` with the admin account first",
                self.tables.schema,
                found.map_or("not migrated".to_string(), |v| format!("at version {v}")),
                ddl::SCHEMA_VERSION
            ))),
            Err(e) => Err(self.pg(e)),
        };
        conn.release();
        result
    }

    /// Streams the rows of one read statement (prepared once per connection)
    /// into `take` until it returns false: a page stops reading at its budget.
    /// The connection goes back to the pool afterwards; an abandoned call
    /// cancels its query instead (see [`pool::Conn`]). A collection without a
    /// table has no rows.
    async fn scan(
        &self,
        sql: &str,
        args: &[&(dyn ToSql + Sync)],
        mut take: impl FnMut(Row) -> StoreResult<bool> + Send,
    ) -> StoreResult<()> {
        let c = self.pools.acquire().await?;
        let result = async {
            let stmt = c.prepare_cached(sql).await.map_err(OpError::from)?;
            let rows = c
                .query_raw(&stmt, params(args))
                .await
                .map_err(OpError::from)?;
            pin_mut!(rows);
            while let Some(row) = rows.try_next().await.map_err(OpError::from)? {
                if !take(row)? {
                    break;
                }
            }
            Ok::<_, OpError>(())
        }
        .await;
        c.release();
        match result {
            Ok(()) => Ok(()),
            Err(e) if e.is_missing_table() => Ok(()),
            Err(e) => Err(e.resolve(&self.target)),
        }
    }

    /// Every row of a read statement; see [`Self::scan`].
    async fn select(&self, sql: &str, args: &[&(dyn ToSql + Sync)]) -> StoreResult<Vec<Row>> {
        let mut rows = Vec::new();
        self.scan(sql, args, |row| {
            rows.push(row);
            Ok(true)
        })
        .await?;
        Ok(rows)
    }

    /// Deletes up to `limit` expired rows, collection by collection, each batch
    /// one statement: rows other sidecars' reapers hold are skipped, a table
    /// locked longer than the lock timeout waits for the next round.
    async fn reap_with(&self, client: &tokio_postgres::Client, limit: usize) -> StoreResult<usize> {
        let collections = self
            .tables
            .collections(client)
            .await
            .map_err(|e| self.pg(e))?;
        let mut reaped = 0;
        for collection in collections {
            if reaped >= limit {
                break;
            }
            let table = self.tables.table(&collection)?;
            // The EXPIRED changes are recorded by the same statement.
            let sql = format!(
                "WITH doomed AS (
                     SELECT ctid FROM {table} WHERE expire_time <= {NOW}
                     LIMIT $2 FOR UPDATE SKIP LOCKED),
                 gone AS (DELETE FROM {table} WHERE ctid IN (SELECT ctid FROM doomed) RETURNING scope, id, rev)
                 {}",
                feed::expired_insert(&self.tables.schema, &collection)
            );
            let batch = i64::try_from(limit - reaped).unwrap_or(i64::MAX);
            match client.execute(&sql, &[&self.clock.offset(), &batch]).await {
                Ok(0) => {}
                Ok(n) => {
                    reaped += n as usize;
                    let channel = feed::channel(&self.tables.schema);
                    let _ = client
                        .execute("SELECT pg_notify($1, '')", &[&channel])
                        .await;
                    self.wakeups.notify();
                }
                Err(e)
                    if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) =>
                {
                    tracing::debug!(collection, "reaper skipped a locked table");
                }
                Err(e) if error::is_missing_table(&e) => {}
                Err(e) => return Err(self.pg(e)),
            }
        }
        Ok(reaped)
    }

    fn document(&self, collection: &str, row: &Row) -> StoreResult<Document> {
        row_to_doc(collection, row).map_err(|e| self.pg(e))
    }
}

#[async_trait]
impl DocumentStore for PostgresStore {
    async fn get(&self, key: &Key) -> StoreResult<Document> {
        let table = self.tables.table(&key.collection)?;
        let sql = format!(
            "SELECT {COLUMNS} FROM {table} WHERE scope = $2 AND id = $3 AND (expire_time IS NULL OR expire_time > {NOW})"
        );
        let offset = self.clock.offset();
        let rows = self.select(&sql, &[&offset, &key.scope, &key.id]).await?;
        match rows.first() {
            Some(row) => self.document(&key.collection, row),
            None => Err(StoreError::not_found(&key.collection, &key.id)),
        }
    }

    async fn write(&self, mutations: Vec<Mutation>) -> StoreResult<Vec<Written>> {
        if mutations.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.pools.acquire().await?;
        let result = self.run_write(&mut conn, &mutations).await;
        conn.release();
        if result.is_ok() {
            // Kicks this sidecar's sequencer; others hear the NOTIFY.
            self.wakeups.notify();
        }
        result
    }

    async fn list(&self, op: &ListOp, budget: Budget) -> StoreResult<Page> {
        let table = self.tables.table(&op.collection)?;
        let fetch = i64::try_from(Page::fetch_limit(op.limit)).unwrap_or(i64::MAX);
        let (after_id, after_scope) = op.after.clone().unwrap_or_default();
        let live = format!("(expire_time IS NULL OR expire_time > {NOW})");
        // Keyset pagination on an index, never OFFSET; rows stream until the
        // page is full.
        let (sql, scope) = match &op.scopes {
            Scopes::One(scope) => (
                format!("SELECT {COLUMNS} FROM {table} WHERE scope = $2 AND id > $3 AND {live} ORDER BY id LIMIT $4"),
                scope.clone(),
            ),
            Scopes::All => (
                format!("SELECT {COLUMNS} FROM {table} WHERE (id, scope) > ($3, $2) AND {live} ORDER BY id, scope LIMIT $4"),
                after_scope,
            ),
        };
        let offset = self.clock.offset();
        let mut page = PageBuilder::new(op.limit, budget);
        self.scan(&sql, &[&offset, &scope, &after_id, &fetch], |row| {
            Ok(page.push(self.document(&op.collection, &row)?))
        })
        .await?;
        Ok(page.finish())
    }

    async fn batch_get(&self, op: &BatchGetOp, budget: Budget) -> StoreResult<Batch> {
        let table = self.tables.table(&op.collection)?;
        // One statement; rows come in request order (the ids' ordinality), so
        // the budget stops the reading, and `n` says how far it got.
        let sql = format!(
            "SELECT t.scope, t.id, t.rev, t.data::text, t.create_time, t.update_time, t.expire_time, r.n
             FROM unnest($3::text[]) WITH ORDINALITY AS r(id, n)
             JOIN {table} t ON t.scope = $2 AND t.id = r.id
             WHERE t.expire_time IS NULL OR t.expire_time > {NOW}
             ORDER BY r.n"
        );
        let offset = self.clock.offset();
        let mut batch = Batch::in_one_statement(op.ids.len());
        let mut spending = budget.start();
        self.scan(&sql, &[&offset, &op.scope, &op.ids], |row| {
            let n: i64 = row.try_get(7).map_err(|e| self.pg(e))?;
            Ok(batch.take(&mut spending, self.document(&op.collection, &row)?, n))
        })
        .await?;
        Ok(batch)
    }

    async fn query(&self, q: &query::Query, budget: Budget) -> StoreResult<Page> {
        self.run_query(q, budget).await
    }

    async fn count(&self, q: &query::Query) -> StoreResult<u64> {
        self.run_count(q).await
    }

    async fn changes(&self, op: &changes::ChangesOp) -> StoreResult<changes::Changes> {
        self.read_changes(op).await
    }

    async fn feed_bounds(&self) -> StoreResult<changes::FeedBounds> {
        self.bounds().await
    }

    async fn feed_now(&self) -> StoreResult<changes::FeedBounds> {
        self.settled_bounds().await
    }

    async fn prune_changes(&self, before: Micros, limit: usize) -> StoreResult<usize> {
        self.prune(before, limit).await
    }

    fn wakeups(&self) -> changes::Wakeups {
        self.wakeups.clone()
    }

    async fn reap_expired(&self, limit: usize) -> StoreResult<usize> {
        // The reaper's own connection: it never takes one from traffic, and
        // its lock_timeout skips a table that DDL holds (next round).
        // A rotated password retires it like the pool's connections.
        let mut reaper = self.reaper.lock().await;
        let generation = self.pools.generation();
        let client = match reaper.take() {
            Some((c, made)) if !c.is_closed() && made == generation => c,
            _ => self.pools.dedicated("reaper").await?,
        };
        let result = self.reap_with(&client, limit).await;
        *reaper = Some((client, generation));
        result
    }

    async fn has_scopes(&self, collection: &str) -> StoreResult<bool> {
        let table = self.tables.table(collection)?;
        // A range of the primary key (scope, id).
        let sql = format!("SELECT EXISTS (SELECT 1 FROM {table} WHERE scope > '')");
        let rows = self.select(&sql, &[]).await?;
        Ok(rows.first().is_some_and(|r| r.get::<_, bool>(0)))
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
            StoreError::unavailable(format!(
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
mod index_tests;
#[cfg(test)]
mod tests;
