//! MySQL 8 and MariaDB 10.11+ store (mysql_async connections in a deadpool
//! pool), Galera clusters included.
//!
//! Each collection is the table of the same name in docsidecar's own
//! database, recorded in the `_collections` catalog; `_migrations` holds the
//! schema version. Ids and scopes are `VARBINARY` (compared and sorted as
//! bytes: `utf8mb4_bin` would ignore trailing spaces), documents are the JSON
//! text the sidecar produced, stored and returned byte for byte (MariaDB's
//! `JSON`: `LONGTEXT` with a `JSON_VALID` check; the same column on MySQL,
//! whose binary `JSON` type would reprint numbers and reorder keys).
//!
//! - [`pool`]: hosts (several for a Galera cluster), the pool, failover,
//!   password rotation, the connection guard that kills an abandoned call;
//! - [`error`]: server and driver errors in a caller's terms;
//! - [`ddl`]: tables, catalog and schema version, creation on first write;
//! - [`write`]: writes, retried as a whole on conflicts (Galera certification);
//! - [`queries`]: Query and Count, pushed down to SQL on generated key
//!   columns ([`keys`]) that declared indexes serve ([`indexes`]), or
//!   evaluated by the sidecar on the rows it reads;
//! - [`migrate`]: `docsidecar migrate` (tables, catalog, grants);
//! - [`scopes`]: row scopes as views with a check option, granted per
//!   account by `migrate`;
//! - [`relations`]: the table or view each statement uses.

mod ddl;
mod error;
mod feed;
mod indexes;
mod keys;
pub mod migrate;
mod pool;
mod queries;
mod relations;
mod scopes;
mod write;

use super::tls::DbTls;
use super::*;
use crate::background::{Backoff, Tasks};
use error::OpError;
use mysql_async::prelude::*;
use mysql_async::{Row, Value};
use pool::Pools;

pub use ddl::is_valid_database;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// The document columns, in the order [`row_to_doc`] reads them.
const COLUMNS: &str = "scope, id, rev, data, create_time, update_time, expire_time";

/// The time on the database's clock in microseconds (UTC, whatever the
/// server's time zone), plus the offset that tests move ([`Clock`]): one `?`.
const NOW: &str = "(TIMESTAMPDIFF(MICROSECOND, '1970-01-01', UTC_TIMESTAMP(6)) + ?)";

/// A row is live at the database's time (one `?`, the clock offset).
const LIVE: &str =
    "(expire_time IS NULL OR expire_time > (TIMESTAMPDIFF(MICROSECOND, '1970-01-01', UTC_TIMESTAMP(6)) + ?))";

/// Which server the settings name (`DB_TYPE`, the URL's scheme). Both speak
/// the same protocol; the store asks each server what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Mysql,
    Mariadb,
}

/// One database host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub name: String,
    pub port: u16,
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.name.contains(':') {
            write!(f, "[{}]:{}", self.name, self.port)
        } else {
            write!(f, "{}:{}", self.name, self.port)
        }
    }
}

/// Where the MySQL/MariaDB store connects and how. `Display` and `Debug` show
/// `user@host:port,…/database`, never the password.
#[derive(Clone)]
pub struct MysqlTarget {
    pub flavor: Flavor,
    /// Tried in order for new connections: the first that answers and
    /// accepts writes serves (every node of a Galera cluster, say).
    pub hosts: Vec<Host>,
    pub user: String,
    pub password: Option<String>,
    /// The mounted password file (`DB_PASS_FILE`), watched for rotation.
    pub password_file: Option<PathBuf>,
    /// docsidecar's own database: its tables are the collections.
    pub database: String,
    pub tls: DbTls,
    /// Connections to keep at most.
    pub pool_size: usize,
    /// How long a call waits for a pooled connection before UNAVAILABLE.
    pub acquire_timeout: Duration,
    /// Connection attempts at start-up (0: retry forever).
    pub max_retries: u32,
    /// First wait between start-up attempts; doubles up to 30 s.
    pub retry_delay: Duration,
    /// Create the database, the catalog and the collections' tables on
    /// demand. Off in production, where `docsidecar migrate` creates them and
    /// the runtime account has no DDL rights.
    pub auto_create: bool,
    /// Create the index a query needs on first use: development (no policy)
    /// only; with a policy, indexes come from `migrate`.
    pub auto_index: bool,
}

impl MysqlTarget {
    /// A target with the defaults for everything but the connection.
    pub fn new(hosts: Vec<Host>, user: &str, database: &str) -> MysqlTarget {
        MysqlTarget {
            flavor: Flavor::Mysql,
            hosts,
            user: user.into(),
            password: None,
            password_file: None,
            database: database.into(),
            tls: DbTls::default(),
            pool_size: 4,
            acquire_timeout: Duration::from_secs(5),
            max_retries: 10,
            retry_delay: Duration::from_secs(1),
            auto_create: true,
            auto_index: true,
        }
    }
}

impl fmt::Display for MysqlTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hosts: Vec<String> = self.hosts.iter().map(Host::to_string).collect();
        write!(f, "{}@{}/{}", self.user, hosts.join(","), self.database)
    }
}

impl fmt::Debug for MysqlTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "MysqlTarget({self}, {:?}, sslmode {})",
            self.flavor, self.tls.mode
        )
    }
}

/// Documents in MySQL/MariaDB: one table per collection in one database.
pub struct MysqlStore {
    pools: Arc<Pools>,
    tables: ddl::Tables,
    /// What this account may see: a scoped one reaches views, not tables.
    relations: relations::Relations,
    auto_create: bool,
    auto_index: bool,
    /// The columns of each relation (which key columns queries may use).
    columns: indexes::ColumnCache,
    /// Indexes created on first use (no policy).
    indexed: sql::CreatedIndexes,
    clock: Clock,
    wakeups: changes::Wakeups,
    /// `user@host:port,…/database` for messages and logs; never the password.
    target: String,
}

impl fmt::Debug for MysqlStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MysqlStore")
            .field("target", &self.target)
            .field("auto_create", &self.auto_create)
            .finish_non_exhaustive()
    }
}

fn text(row: &mut Row, i: usize) -> Result<String, OpError> {
    match row.take_opt::<Vec<u8>, _>(i) {
        Some(Ok(bytes)) => String::from_utf8(bytes).map_err(|_| {
            OpError::Store(StoreError::Internal(format!(
                "column {i} holds bytes that are not UTF-8 (written outside the sidecar?)"
            )))
        }),
        _ => Err(column(i)),
    }
}

fn column(i: usize) -> OpError {
    OpError::Store(StoreError::Internal(format!(
        "column {i} of a document row is missing or of the wrong type (a table changed outside docsidecar?)"
    )))
}

fn int(row: &mut Row, i: usize) -> Result<i64, OpError> {
    row.take_opt::<i64, _>(i)
        .and_then(Result::ok)
        .ok_or_else(|| column(i))
}

/// A document from a row of [`COLUMNS`].
fn row_to_doc(collection: &str, mut row: Row) -> Result<Document, OpError> {
    Ok(Document {
        key: Key {
            collection: collection.to_string(),
            scope: text(&mut row, 0)?,
            id: text(&mut row, 1)?,
        },
        rev: text(&mut row, 2)?,
        data: text(&mut row, 3)?,
        create_time: int(&mut row, 4)?,
        update_time: int(&mut row, 5)?,
        expire_time: row
            .take_opt::<Option<i64>, _>(6)
            .and_then(Result::ok)
            .ok_or_else(|| column(6))?,
    })
}

impl MysqlStore {
    /// Builds the pool, waits for a host that accepts writes (retrying with a
    /// doubling delay, at most 30 s; `max_retries` 0 retries forever) and
    /// checks the schema version. With `auto_create` it creates the database
    /// and the catalog when they are missing. A rotated password file is
    /// picked up by a watcher in `tasks`.
    pub async fn connect(target: &MysqlTarget, tasks: &Tasks, clock: Clock) -> StoreResult<Self> {
        let tables = ddl::Tables::new(&target.database)?;
        let name = target.to_string();
        if target.tls.mode == super::tls::SslMode::VerifyCa {
            // mysql_async 0.37.1 asks rustls to skip the name check but does
            // not recognize rustls 0.23's error (blackbeam/mysql_async#404).
            tracing::warn!(
                target_db = %name,
                "DB_SSLMODE=verify-ca checks the host name too with this MySQL driver (mysql_async 0.37.1): the server's certificate must name the host connected to, as with verify-full"
            );
        }
        let pools = Pools::new(target, true)?;
        if let Some(file) = &target.password_file {
            pools.watch_password(file.clone(), tasks);
        }
        let store = MysqlStore {
            pools,
            tables,
            relations: relations::Relations::default(),
            auto_create: target.auto_create,
            auto_index: target.auto_create && target.auto_index,
            columns: indexes::ColumnCache::default(),
            indexed: sql::CreatedIndexes::default(),
            clock,
            wakeups: changes::Wakeups::default(),
            target: name,
        };
        let mut backoff = Backoff::new(target.max_retries, target.retry_delay);
        backoff
            .retry(
                || async {
                    if store.auto_create {
                        store.pools.ensure_database(&store.tables.database).await;
                    }
                    store.ping().await
                },
                |_| true,
                |error, attempt, delay| {
                    tracing::warn!(
                        target_db = %store.target,
                        attempt,
                        retry_in = ?delay,
                        error = %error,
                        "MySQL/MariaDB is not reachable yet; retrying"
                    );
                },
            )
            .await
            .map_err(|error| {
                StoreError::unavailable(format!(
                    "MySQL/MariaDB at {} did not answer after {} attempt(s): {error}",
                    store.target,
                    backoff.attempts_made()
                ))
            })?;
        store.check_schema().await?;
        tracing::info!(
            target_db = %store.target,
            pool_size = target.pool_size,
            auto_create = store.auto_create,
            "connected to MySQL/MariaDB"
        );
        Ok(store)
    }

    /// Checks the schema version this release needs (see
    /// [`ddl::SCHEMA_VERSION`]); a development sidecar (auto_create) creates
    /// the catalog itself.
    async fn check_schema(&self) -> StoreResult<()> {
        let mut c = self.pools.acquire().await?;
        let result = self.tables.version(c.conn()).await;
        let result = match result {
            Ok(Some(v)) if v > ddl::SCHEMA_VERSION => Err(StoreError::Internal(format!(
                "database `{}` is at docsidecar schema version {v}, newer than this docsidecar supports ({}): run a newer docsidecar",
                self.tables.database,
                ddl::SCHEMA_VERSION
            )).into()),
            Ok(Some(v)) if v == ddl::SCHEMA_VERSION => Ok(()),
            Ok(_) if self.auto_create => self.tables.ensure_catalog(c.conn()).await,
            Ok(found) => Err(StoreError::table_missing(format!(
                "database `{}` is {}, and this docsidecar needs version {}: run `docsidecar migrate` with the admin account first",
                self.tables.database,
                found.map_or("not migrated".to_string(), |v| format!("at version {v}")),
                ddl::SCHEMA_VERSION
            )).into()),
            Err(e) => Err(e),
        };
        c.done(&result);
        result.map_err(|e| e.resolve(&self.target))
    }

    /// Streams the rows of one read statement (prepared once per connection)
    /// into `take` until it returns false: a page stops keeping rows at its
    /// budget (the rest of the result is read off the socket and dropped). On
    /// a Galera node the statement first waits until the node has applied
    /// every transaction the cluster committed before it (`wsrep_sync_wait`),
    /// so a read sees the writes acknowledged through any node. A collection
    /// without a table has no rows.
    async fn scan(
        &self,
        sql: &str,
        params: Vec<Value>,
        mut take: impl FnMut(Row) -> Result<bool, OpError> + Send,
    ) -> StoreResult<()> {
        let mut c = self.pools.acquire().await?;
        let sql = if c.sync_reads() {
            format!("SET STATEMENT wsrep_sync_wait = 1 FOR {sql}")
        } else {
            sql.to_string()
        };
        let result = async {
            let mut rows = c.conn().exec_iter(sql, params).await?;
            let mut taken = Ok(());
            while let Some(row) = rows.next().await? {
                match take(row) {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => {
                        taken = Err(e);
                        break;
                    }
                }
            }
            // The rest of the result, off the socket, so the connection is clean.
            rows.drop_result().await?;
            taken?;
            Ok::<_, OpError>(())
        }
        .await;
        c.done(&result);
        match result {
            Ok(()) => Ok(()),
            Err(e) if e.is_missing_table() => Ok(()),
            Err(e) => {
                self.refused(&e);
                Err(e.resolve(&self.target))
            }
        }
    }
}

fn bytes(s: &str) -> Value {
    Value::Bytes(s.as_bytes().to_vec())
}

/// The next size up from `n` among a few, so that statements with a list of
/// ids come in a few shapes only (each shape is prepared once per connection).
fn list_shape(n: usize) -> usize {
    [1, 4, 16, 64, 256, 1024]
        .into_iter()
        .find(|&s| s >= n)
        .unwrap_or(n)
}

#[async_trait]
impl DocumentStore for MysqlStore {
    async fn get(&self, key: &Key) -> StoreResult<Document> {
        self.retried(|| self.get_once(key)).await
    }

    async fn write(&self, mutations: Vec<Mutation>) -> StoreResult<Vec<Written>> {
        if mutations.is_empty() {
            return Ok(Vec::new());
        }
        let result = self.run_write(&mutations).await;
        if result.is_ok() {
            // Kicks this sidecar's sequencer.
            self.wakeups.notify();
        }
        result
    }

    async fn list(&self, op: &ListOp, budget: Budget) -> StoreResult<Page> {
        self.retried(|| self.list_once(op, budget)).await
    }

    async fn batch_get(&self, op: &BatchGetOp, budget: Budget) -> StoreResult<Batch> {
        self.retried(|| self.batch_get_once(op, budget)).await
    }

    async fn query(&self, q: &query::Query, budget: Budget) -> StoreResult<Page> {
        self.retried(|| self.run_query(q, budget)).await
    }

    async fn count(&self, q: &query::Query) -> StoreResult<u64> {
        self.retried(|| self.run_count(q)).await
    }

    async fn changes(&self, op: &changes::ChangesOp) -> StoreResult<changes::Changes> {
        self.retried(|| self.read_changes(op)).await
    }

    async fn feed_bounds(&self) -> StoreResult<changes::FeedBounds> {
        self.bounds().await
    }

    async fn feed_now(&self) -> StoreResult<changes::FeedBounds> {
        self.retried(|| self.settled_bounds()).await
    }

    async fn prune_changes(&self, before: Micros, limit: usize) -> StoreResult<usize> {
        self.prune(before, limit).await
    }

    fn wakeups(&self) -> changes::Wakeups {
        self.wakeups.clone()
    }

    async fn reap_expired(&self, limit: usize) -> StoreResult<usize> {
        let mut c = self.pools.acquire().await?;
        let collections = self.tables.collections(c.conn()).await;
        c.done(&collections);
        let mut reaped = 0;
        for collection in collections.map_err(|e| e.resolve(&self.target))? {
            if reaped >= limit {
                break;
            }
            for relation in self.relations_of(&collection).await? {
                if reaped >= limit {
                    break;
                }
                reaped += self.reap(&collection, &relation, limit - reaped).await?;
            }
        }
        Ok(reaped)
    }

    async fn has_scopes(&self, collection: &str) -> StoreResult<bool> {
        let relations = self.relations_of(collection).await?;
        let table = ddl::table(collection)?;
        if relations != [table.clone()] {
            // Views of scopes: this account is confined to them.
            return Ok(true);
        }
        // A range of the primary key (scope, id).
        let sql = format!("SELECT 1 FROM {table} WHERE scope > '' LIMIT 1");
        let mut found = false;
        self.scan(&sql, Vec::new(), |_| {
            found = true;
            Ok(false)
        })
        .await?;
        Ok(found)
    }

    async fn list_collections(&self) -> StoreResult<Vec<String>> {
        // The catalog's collections whose tables, or views of a scope
        // (`<collection>$…`), this account can see (it sees only those it
        // holds a privilege on), compared as bytes.
        let sql = "SELECT DISTINCT c.name FROM `_collections` c
                   JOIN information_schema.TABLES t
                     ON t.TABLE_SCHEMA = DATABASE()
                    AND BINARY SUBSTRING_INDEX(t.TABLE_NAME, '$', 1) = c.name
                   ORDER BY c.name";
        let mut names = Vec::new();
        self.scan(sql, Vec::new(), |mut row| {
            names.push(text(&mut row, 0)?);
            Ok(true)
        })
        .await?;
        names.retain(|name| is_valid_name(name));
        Ok(names)
    }

    async fn ping(&self) -> StoreResult<()> {
        let mut c = self.pools.acquire().await?;
        let result = c.conn().ping().await.map_err(OpError::from);
        c.done(&result);
        result.map_err(|e| e.resolve(&self.target))
    }

    fn pool_stats(&self) -> PoolStats {
        self.pools.stats()
    }

    async fn close(&self) {
        self.pools.close();
        tracing::info!(target_db = %self.target, "MySQL/MariaDB store closed");
    }
}

#[cfg(test)]
mod tests;
