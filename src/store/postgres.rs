//! PostgreSQL store (tokio-postgres behind a deadpool pool).
//!
//! Each collection is the table of the same name in one schema, so grants and
//! row-level security are plain SQL on `schema.collection`. Conditional writes are
//! decided by the writing statement itself (`UPDATE … WHERE rev = $2`,
//! `INSERT … ON CONFLICT`), never by an earlier read. Statements are prepared once
//! per connection. A call whose future is dropped mid-query (the client's deadline
//! passed) cancels that query on the server and discards its connection.

use super::*;
use crate::config::describe_postgres;
use deadpool_postgres::{
    GenericClient, Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime,
    TimeoutType, Transaction,
};
use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::sync::RwLock;
use std::time::Duration;
use tokio_postgres::error::SqlState;
use tokio_postgres::{IsolationLevel, NoTls, Row};

/// Longest wait between start-up connection attempts.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);
/// Shortest wait between start-up connection attempts: never spin on a refused port.
const MIN_RETRY_DELAY: Duration = Duration::from_millis(10);

/// The document columns, in the order [`row_to_doc`] reads them. `data` travels as
/// JSON text both ways; PostgreSQL parses it into `jsonb` and prints it back.
const COLUMNS: &str = "id, rev, data::text, create_time, update_time";

/// Settings of the PostgreSQL store beside the connection config.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// Schema holding one table per collection; must match the collection name rule.
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
    /// The mounted password file (`DB_PASS_FILE`), watched for rotation.
    pub password_file: Option<std::path::PathBuf>,
}

/// How often the password file is checked for a rotated password.
const PASSWORD_CHECK_EVERY: Duration = Duration::from_secs(1);

/// The current pool. A rotated password gets a new pool; the old one is only
/// dropped, never closed, so calls holding or awaiting its connections finish on
/// them, and those connections close as they come back.
struct PoolSlot {
    pool: RwLock<Pool>,
    cfg: tokio_postgres::Config,
    pool_size: usize,
    acquire_timeout: Duration,
}

impl PoolSlot {
    fn build(
        cfg: tokio_postgres::Config,
        pool_size: usize,
        acquire_timeout: Duration,
    ) -> StoreResult<Pool> {
        let manager = Manager::from_config(
            cfg,
            NoTls,
            ManagerConfig {
                // Fast: `is_closed` catches dead connections without a round trip.
                recycling_method: RecyclingMethod::Fast,
            },
        );
        Pool::builder(manager)
            .max_size(pool_size)
            .wait_timeout(Some(acquire_timeout))
            .create_timeout(Some(acquire_timeout))
            .recycle_timeout(Some(acquire_timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Internal(format!("cannot build the PostgreSQL pool: {e}")))
    }

    fn current(&self) -> Pool {
        self.pool.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Switches to `password` once a connection with it succeeds; until then the
    /// old pool keeps serving.
    async fn rotate(&self, password: &str, target: &str) -> bool {
        let mut cfg = self.cfg.clone();
        cfg.password(password);
        let Ok(pool) = Self::build(cfg, self.pool_size, self.acquire_timeout) else {
            return false;
        };
        match pool.get().await {
            Ok(conn) => drop(conn),
            Err(e) => {
                tracing::warn!(
                    target_db = %target,
                    error = %e,
                    "the rotated database password does not work yet; the previous connections keep serving"
                );
                return false;
            }
        }
        *self.pool.write().unwrap_or_else(|e| e.into_inner()) = pool;
        tracing::info!(
            target_db = %target,
            "database password rotated: new connections use it, the old ones retire as their calls finish"
        );
        true
    }
}

/// Re-reads the password file; stops when the store is gone.
async fn watch_password(slot: std::sync::Weak<PoolSlot>, file: std::path::PathBuf, target: String) {
    let mut current = crate::config::read_secret(&file, "the database password").ok();
    let mut ticker = tokio::time::interval(PASSWORD_CHECK_EVERY);
    loop {
        ticker.tick().await;
        let Some(slot) = slot.upgrade() else { return };
        let path = file.clone();
        let read = tokio::task::spawn_blocking(move || {
            crate::config::read_secret(&path, "the database password")
        })
        .await;
        let Ok(Ok(password)) = read else { continue };
        if current.as_deref() != Some(password.as_str()) && slot.rotate(&password, &target).await {
            current = Some(password);
        }
    }
}

/// Documents in PostgreSQL: one table per collection in one schema.
pub struct PostgresStore {
    pool: std::sync::Arc<PoolSlot>,
    /// Validated against the collection rule, so it is safe inside double quotes.
    schema: String,
    auto_create: bool,
    acquire_timeout: Duration,
    pool_size: usize,
    /// `user@host:port/db` for messages and logs; never the password.
    target: String,
    /// Tables known to exist, so `write` needs no catalog lookup for them.
    known_tables: RwLock<HashSet<String>>,
}

impl fmt::Debug for PostgresStore {
    // The pool's config holds the password: show only where it points.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("target", &self.target)
            .field("schema", &self.schema)
            .field("auto_create", &self.auto_create)
            .finish_non_exhaustive()
    }
}

/// The quoted, schema-qualified table of a collection. Both names are checked
/// against the collection rule first: they are the only text spliced into SQL.
fn qualified_table(schema: &str, collection: &str) -> StoreResult<String> {
    if !is_valid_name(schema) {
        return Err(StoreError::Internal(format!(
            "schema name `{schema}` does not match ^[a-z][a-z0-9_]{{0,62}}$"
        )));
    }
    if !is_valid_name(collection) {
        return Err(StoreError::Internal(format!(
            "collection name `{collection}` reached the PostgreSQL store unvalidated: it does not match ^[a-z][a-z0-9_]{{0,62}}$"
        )));
    }
    Ok(format!("\"{schema}\".\"{collection}\""))
}

/// The DDL of a collection's table. `docsidecar migrate` should use it too, so that
/// both create the same columns (the store reads them by position and type).
pub fn table_ddl(schema: &str, collection: &str) -> StoreResult<String> {
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

/// An error inside one operation, before it is put in a caller's terms: a missing
/// table means "not found" to a read and "create it" to a write.
#[derive(Debug)]
enum OpError {
    Pg(tokio_postgres::Error),
    Store(StoreError),
}

impl From<tokio_postgres::Error> for OpError {
    fn from(e: tokio_postgres::Error) -> Self {
        OpError::Pg(e)
    }
}

impl From<StoreError> for OpError {
    fn from(e: StoreError) -> Self {
        OpError::Store(e)
    }
}

impl OpError {
    fn is_missing_table(&self) -> bool {
        matches!(self, OpError::Pg(e) if is_missing_table(e))
    }
}

/// The table (or its whole schema) does not exist.
fn is_missing_table(e: &tokio_postgres::Error) -> bool {
    matches!(e.code(), Some(c) if *c == SqlState::UNDEFINED_TABLE || *c == SqlState::INVALID_SCHEMA_NAME)
}

/// Lost a race against another session creating the same table or schema: the
/// object exists now, which is all the loser wanted. Depending on where the two
/// `CREATE ... IF NOT EXISTS` collide in the catalog, PostgreSQL reports a
/// unique violation, a duplicate table or a duplicate object (the row type).
fn is_create_race(e: &tokio_postgres::Error) -> bool {
    matches!(e.code(), Some(c) if *c == SqlState::UNIQUE_VIOLATION
        || *c == SqlState::DUPLICATE_TABLE
        || *c == SqlState::DUPLICATE_OBJECT
        || *c == SqlState::DUPLICATE_SCHEMA)
}

/// A tokio-postgres error with its causes; server errors as their message and
/// SQLSTATE. None of these parts carries the password or the connection string.
fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} (SQLSTATE {})", db.message(), db.code().code());
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Maps a tokio-postgres error to what a caller can act on.
fn map_pg_error(e: &tokio_postgres::Error, target: &str) -> StoreError {
    let Some(code) = e.code() else {
        // No SQLSTATE: the connection broke or timed out, unless a value did not
        // convert (a bug, not the database's absence).
        let io = std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>());
        return if e.is_closed() || io || e.to_string().starts_with("timeout") {
            StoreError::Unavailable(format!(
                "lost the connection to PostgreSQL at {target}: {}; retry",
                describe(e)
            ))
        } else {
            StoreError::Internal(format!("PostgreSQL client error: {}", describe(e)))
        };
    };
    let sqlstate = code.code();
    if *code == SqlState::INSUFFICIENT_PRIVILEGE {
        StoreError::PermissionDenied(format!(
            "the database role may not do this: {}; grant it with `docsidecar migrate --grant-to`",
            describe(e)
        ))
    } else if sqlstate.starts_with("08") // connection exception
        || sqlstate.starts_with("53") // insufficient resources, e.g. too many connections
        || sqlstate.starts_with("57P") // shutting down, starting up, session timeouts
        || *code == SqlState::READ_ONLY_SQL_TRANSACTION
    // a standby during failover
    {
        StoreError::Unavailable(format!(
            "PostgreSQL at {target} is unavailable: {}; retry",
            describe(e)
        ))
    } else if *code == SqlState::T_R_SERIALIZATION_FAILURE
        || *code == SqlState::T_R_DEADLOCK_DETECTED
    {
        StoreError::Unavailable(format!(
            "the operation conflicted with a concurrent transaction: {}; retry",
            describe(e)
        ))
    } else if *code == SqlState::QUERY_CANCELED {
        StoreError::Unavailable(format!(
            "PostgreSQL cancelled the statement: {}; retry",
            describe(e)
        ))
    } else if sqlstate.starts_with("22") {
        // Data exceptions, e.g. jsonb refuses the \u0000 escape in strings.
        StoreError::Internal(format!(
            "PostgreSQL cannot store this value: {}",
            describe(e)
        ))
    } else {
        StoreError::Internal(format!("PostgreSQL error: {}", describe(e)))
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

/// A pooled connection that cancels its query if dropped before [`Conn::release`]:
/// dropping a call's future (the client's deadline) must not leave the query
/// running on the server.
struct Conn {
    object: Option<Object>,
}

impl Conn {
    fn client(&mut self) -> StoreResult<&mut Object> {
        self.object.as_mut().ok_or_else(|| {
            StoreError::Internal("the PostgreSQL connection was already released".into())
        })
    }

    /// The call finished, with or without an error: back to the pool.
    fn release(mut self) {
        drop(self.object.take());
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let Some(object) = self.object.take() else {
            return;
        };
        // Abandoned mid-call. The connection leaves the pool for good: a cancel
        // request that arrives late must not hit the next caller's query.
        let token = object.cancel_token();
        let client = Object::take(object);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                match token.cancel_query(NoTls).await {
                    Ok(()) => tracing::debug!("cancelled the query of an abandoned call"),
                    Err(e) => tracing::debug!(error = %describe(&e), "could not cancel the query of an abandoned call"),
                }
                drop(client);
            });
        }
    }
}

fn not_found(collection: &str, id: &str) -> StoreError {
    StoreError::not_found(collection, id)
}

/// The collection of a mutation.
fn collection_of(mutation: &Mutation) -> &str {
    match mutation {
        Mutation::Save(op) => &op.collection,
        Mutation::Delete(op) => &op.collection,
    }
}

impl PostgresStore {
    /// Builds the pool, waits for the database (retrying with a doubling delay,
    /// at most 30 s; `max_retries` 0 retries forever) and, with `auto_create`,
    /// makes sure the schema exists.
    pub async fn connect(cfg: tokio_postgres::Config, opts: PgOptions) -> StoreResult<Self> {
        if !is_valid_name(&opts.schema) {
            return Err(StoreError::Internal(format!(
                "PostgreSQL schema `{}` is invalid: DOCSIDECAR_SCHEMA must match ^[a-z][a-z0-9_]{{0,62}}$",
                opts.schema
            )));
        }
        let target = describe_postgres(&cfg);
        let pool_size = opts.pool_size.max(1);
        let slot = std::sync::Arc::new(PoolSlot {
            pool: RwLock::new(PoolSlot::build(
                cfg.clone(),
                pool_size,
                opts.acquire_timeout,
            )?),
            cfg,
            pool_size,
            acquire_timeout: opts.acquire_timeout,
        });
        if let Some(file) = opts.password_file {
            tokio::spawn(watch_password(
                std::sync::Arc::downgrade(&slot),
                file,
                target.clone(),
            ));
        }
        let store = PostgresStore {
            pool: slot,
            schema: opts.schema,
            auto_create: opts.auto_create,
            acquire_timeout: opts.acquire_timeout,
            pool_size,
            target,
            known_tables: RwLock::new(HashSet::new()),
        };
        store
            .wait_for_database(opts.max_retries, opts.retry_delay)
            .await?;
        if store.auto_create {
            let mut conn = store.conn().await?;
            let result = match conn.client() {
                Ok(client) => store.ensure_schema(&*client).await,
                Err(e) => Err(e),
            };
            conn.release();
            result?;
        }
        tracing::info!(
            target_db = %store.target,
            schema = %store.schema,
            pool_size,
            auto_create = store.auto_create,
            "connected to PostgreSQL"
        );
        Ok(store)
    }

    async fn wait_for_database(&self, max_retries: u32, retry_delay: Duration) -> StoreResult<()> {
        let mut delay = retry_delay.max(MIN_RETRY_DELAY);
        let mut attempt: u32 = 0;
        loop {
            attempt = attempt.saturating_add(1);
            let error = match self.ping().await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            if max_retries != 0 && attempt >= max_retries {
                return Err(StoreError::Unavailable(format!(
                    "PostgreSQL at {} did not answer after {attempt} attempt(s): {error}",
                    self.target
                )));
            }
            tracing::warn!(
                target_db = %self.target,
                attempt,
                retry_in = ?delay,
                error = %error,
                "PostgreSQL is not reachable yet; retrying"
            );
            tokio::time::sleep(delay).await;
            delay = delay.saturating_mul(2).min(MAX_RETRY_DELAY);
        }
    }

    /// A pooled connection within the acquire timeout, or UNAVAILABLE.
    async fn conn(&self) -> StoreResult<Conn> {
        // The pool's own timeouts name the stage that was slow; this one bounds the total.
        let pool = self.pool.current();
        let started = std::time::Instant::now();
        let acquired = tokio::time::timeout(self.acquire_timeout, pool.get()).await;
        record_acquire(started);
        match acquired {
            Ok(Ok(object)) => Ok(Conn {
                object: Some(object),
            }),
            Ok(Err(e)) => Err(self.pool_error(e)),
            Err(_) => Err(self.busy()),
        }
    }

    fn busy(&self) -> StoreError {
        StoreError::Unavailable(format!(
            "no PostgreSQL connection became free within {:?} (pool size {}); retry, or raise DB_POOL_SIZE or DB_ACQUIRE_TIMEOUT",
            self.acquire_timeout, self.pool_size
        ))
    }

    fn pool_error(&self, e: PoolError) -> StoreError {
        match e {
            PoolError::Timeout(TimeoutType::Wait) => self.busy(),
            PoolError::Timeout(_) => StoreError::Unavailable(format!(
                "PostgreSQL at {} did not accept a connection within {:?}; retry",
                self.target, self.acquire_timeout
            )),
            // Wrong password, unknown database, refused port: the sidecar cannot
            // serve until the database or its settings are fixed.
            PoolError::Backend(e) => StoreError::Unavailable(format!(
                "cannot connect to PostgreSQL at {}: {}; retry",
                self.target,
                describe(&e)
            )),
            PoolError::Closed => {
                StoreError::Unavailable("the PostgreSQL store is closed (shutting down)".into())
            }
            PoolError::NoRuntimeSpecified | PoolError::PostCreateHook(_) => {
                StoreError::Internal(format!("PostgreSQL pool: {e}"))
            }
        }
    }

    fn pg(&self, e: tokio_postgres::Error) -> StoreError {
        map_pg_error(&e, &self.target)
    }

    /// An operation's error in caller's terms, for cases where a missing table
    /// has no special meaning.
    fn resolve(&self, e: OpError) -> StoreError {
        match e {
            OpError::Pg(e) => self.pg(e),
            OpError::Store(e) => e,
        }
    }

    fn table(&self, collection: &str) -> StoreResult<String> {
        qualified_table(&self.schema, collection)
    }

    /// A write to a collection without a table while tables are not created here.
    fn no_table(&self, collection: &str) -> StoreError {
        StoreError::PermissionDenied(format!(
            "collection `{collection}` has no table in schema `{}` and this sidecar does not create tables (auto_create = false): declare it in the policy and run `docsidecar migrate`",
            self.schema
        ))
    }

    fn known(&self, collection: &str) -> bool {
        self.known_tables
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(collection)
    }

    fn remember<'a>(&self, collections: impl IntoIterator<Item = &'a str>) {
        let mut known = self.known_tables.write().unwrap_or_else(|e| e.into_inner());
        known.extend(collections.into_iter().map(str::to_string));
    }

    fn forget<'a>(&self, collections: impl IntoIterator<Item = &'a str>) {
        let mut known = self.known_tables.write().unwrap_or_else(|e| e.into_inner());
        for collection in collections {
            known.remove(collection);
        }
    }

    /// Creates the schema when it is missing. Checked first because `CREATE SCHEMA
    /// IF NOT EXISTS` demands CREATE on the database even when the schema exists.
    async fn ensure_schema(&self, client: &impl GenericClient) -> StoreResult<()> {
        let exists: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = $1)",
                &[&self.schema],
            )
            .await
            .and_then(|row| row.try_get(0))
            .map_err(|e| self.pg(e))?;
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
            Err(e) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => Err(StoreError::PermissionDenied(format!(
                "schema `{}` does not exist and the database role may not create it: run `docsidecar migrate` ({})",
                self.schema,
                describe(&e)
            ))),
            Err(e) => Err(self.pg(e)),
        }
    }

    /// Which of `collections` have a table.
    async fn existing_tables(
        &self,
        client: &impl GenericClient,
        collections: &[&str],
    ) -> StoreResult<HashSet<String>> {
        let rows = async {
            let stmt = client
                .prepare_cached(
                    "SELECT c.relname::text FROM pg_catalog.pg_class c
                     JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                     WHERE n.nspname = $1 AND c.relname = ANY($2) AND c.relkind IN ('r', 'p')",
                )
                .await?;
            client.query(&stmt, &[&self.schema, &collections]).await
        }
        .await
        .map_err(|e| self.pg(e))?;
        rows.iter()
            .map(|row| row.try_get::<_, String>(0))
            .collect::<Result<_, _>>()
            .map_err(|e| self.pg(e))
    }

    /// Creates a collection's table inside a write's transaction, so that it
    /// disappears again if the write fails.
    async fn create_table_in(
        &self,
        tx: &mut Transaction<'_>,
        collection: &str,
        table: &str,
    ) -> StoreResult<()> {
        // A savepoint: losing the race to another creator aborts only this statement.
        let savepoint = tx
            .savepoint("docsidecar_create_table")
            .await
            .map_err(|e| self.pg(e))?;
        match savepoint.batch_execute(&create_table_sql(table)).await {
            Ok(()) => {
                savepoint.commit().await.map_err(|e| self.pg(e))?;
                tracing::info!(schema = %self.schema, collection, "created the table of a new collection");
                Ok(())
            }
            // The other creator committed before this statement gave up: the table exists.
            Err(e) if is_create_race(&e) => savepoint.rollback().await.map_err(|e| self.pg(e)),
            Err(e) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => Err(StoreError::PermissionDenied(format!(
                "collection `{collection}` has no table and the database role may not create one in schema `{}`: run `docsidecar migrate` ({})",
                self.schema,
                describe(&e)
            ))),
            Err(e) => Err(self.pg(e)),
        }
    }

    async fn current_rev(
        &self,
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

    /// One save, each case decided by a single statement.
    async fn save_in(
        &self,
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
        match (op.expected_rev.as_deref(), op.create_only) {
            (Some(expected), false) => {
                // Compare-and-set; a concurrent writer's row lock makes this wait
                // and re-check the rev of the committed row.
                let stmt = c
                    .prepare_cached(&format!(
                        "UPDATE {table} SET rev = $3, data = $4::text::jsonb, update_time = $5 WHERE id = $1 AND rev = $2"
                    ))
                    .await?;
                if c.execute(&stmt, &[&op.id, &expected, &rev, &op.data, &now])
                    .await?
                    == 1
                {
                    return Ok(saved(false));
                }
                let actual = self.current_rev(c, table, &op.id).await?;
                Err(StoreError::RevMismatch {
                    collection: op.collection.clone(),
                    id: op.id.clone(),
                    expected: expected.to_string(),
                    actual,
                }
                .into())
            }
            (Some(expected), true) => {
                // Can never write: present is AlreadyExists, absent has no rev to match.
                match self.current_rev(c, table, &op.id).await? {
                    Some(_) => Err(StoreError::already_exists(&op.collection, &op.id).into()),
                    None => Err(StoreError::RevMismatch {
                        collection: op.collection.clone(),
                        id: op.id.clone(),
                        expected: expected.to_string(),
                        actual: None,
                    }
                    .into()),
                }
            }
            (None, true) => {
                let stmt = c
                    .prepare_cached(&format!(
                        "INSERT INTO {table} (id, rev, data, create_time, update_time)
                         VALUES ($1, $2, $3::text::jsonb, $4, $4) ON CONFLICT (id) DO NOTHING"
                    ))
                    .await?;
                if c.execute(&stmt, &[&op.id, &rev, &op.data, &now]).await? == 1 {
                    Ok(saved(true))
                } else {
                    Err(StoreError::already_exists(&op.collection, &op.id).into())
                }
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
                Ok(saved(row.try_get(0)?))
            }
        }
    }

    async fn delete_in(
        &self,
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
        let Some(expected) = &op.expected_rev else {
            return Err(not_found(&op.collection, &op.id).into());
        };
        match self.current_rev(c, table, &op.id).await? {
            None => Err(not_found(&op.collection, &op.id).into()),
            Some(actual) => Err(StoreError::RevMismatch {
                collection: op.collection.clone(),
                id: op.id.clone(),
                expected: expected.clone(),
                actual: Some(actual),
            }
            .into()),
        }
    }

    /// Runs `mutations` in one transaction; retries once when a table believed to
    /// exist turned out to be gone (dropped behind the cache's back).
    async fn run_write(
        &self,
        conn: &mut Conn,
        mutations: &[Mutation],
    ) -> StoreResult<Vec<Written>> {
        let tables = mutations
            .iter()
            .enumerate()
            .map(|(index, m)| {
                self.table(collection_of(m))
                    .map_err(|e| e.in_mutation(index))
            })
            .collect::<StoreResult<Vec<_>>>()?;
        for _ in 0..2 {
            if let Some(results) = self.write_once(conn.client()?, mutations, &tables).await? {
                return Ok(results);
            }
            self.forget(mutations.iter().map(collection_of));
        }
        Err(StoreError::Unavailable(
            "a collection's table disappeared while writing to it (dropped concurrently?); retry"
                .into(),
        ))
    }

    /// One attempt of a write. `Ok(None)`: a cached table was missing, retry.
    async fn write_once(
        &self,
        client: &mut Object,
        mutations: &[Mutation],
        tables: &[String],
    ) -> StoreResult<Option<Vec<Written>>> {
        // Tables for saves are looked up before BEGIN: inside the transaction a
        // statement on a missing table would abort everything.
        let mut missing = BTreeSet::new();
        if self.auto_create {
            let unknown: BTreeSet<&str> = mutations
                .iter()
                .filter_map(|m| match m {
                    Mutation::Save(op) if !self.known(&op.collection) => {
                        Some(op.collection.as_str())
                    }
                    _ => None,
                })
                .collect();
            if !unknown.is_empty() {
                let unknown: Vec<&str> = unknown.into_iter().collect();
                let existing = self.existing_tables(&*client, &unknown).await?;
                self.remember(existing.iter().map(String::as_str));
                missing = unknown
                    .into_iter()
                    .filter(|c| !existing.contains(*c))
                    .collect();
                if !missing.is_empty() {
                    self.ensure_schema(&*client).await?;
                }
            }
        }

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
            let result = match mutation {
                Mutation::Save(op) => {
                    let collection = op.collection.as_str();
                    if missing.contains(collection) && !created.contains(&collection) {
                        self.create_table_in(&mut tx, collection, table)
                            .await
                            .map_err(|e| e.in_mutation(index))?;
                        created.push(collection);
                    }
                    self.save_in(&tx, table, op, now).await.map(Some)
                }
                Mutation::Delete(op) => self.delete_in(&tx, table, op).await.map(|()| None),
            };
            match result {
                Ok(written) => results.push(written),
                Err(e) if e.is_missing_table() => {
                    return match mutation {
                        _ if !self.auto_create => {
                            Err(self.no_table(collection_of(mutation)).in_mutation(index))
                        }
                        Mutation::Save(_) => Ok(None),
                        Mutation::Delete(op) => {
                            Err(not_found(&op.collection, &op.id).in_mutation(index))
                        }
                    };
                }
                Err(e) => return Err(self.resolve(e).in_mutation(index)),
            }
        }
        tx.commit().await.map_err(|e| self.pg(e))?;
        self.remember(created);
        Ok(Some(results))
    }
}

/// Unwraps the mutation index of a one-mutation write run on behalf of a plain call.
fn single(e: StoreError) -> StoreError {
    match e {
        StoreError::InMutation { source, .. } => *source,
        e => e,
    }
}

#[async_trait]
impl DocumentStore for PostgresStore {
    async fn get(&self, collection: &str, id: &str) -> StoreResult<Document> {
        let table = self.table(collection)?;
        let mut conn = self.conn().await?;
        let result: Result<Option<Row>, OpError> = async {
            let c = conn.client()?;
            let stmt = c
                .prepare_cached(&format!("SELECT {COLUMNS} FROM {table} WHERE id = $1"))
                .await?;
            Ok(c.query_opt(&stmt, &[&id]).await?)
        }
        .await;
        conn.release();
        match result {
            Ok(Some(row)) => row_to_doc(collection, &row).map_err(|e| self.pg(e)),
            Ok(None) => Err(not_found(collection, id)),
            Err(e) if e.is_missing_table() => Err(not_found(collection, id)),
            Err(e) => Err(self.resolve(e)),
        }
    }

    async fn save(&self, op: SaveOp) -> StoreResult<Saved> {
        let table = self.table(&op.collection)?;
        let mut conn = self.conn().await?;
        // Fast path: one autocommit statement.
        let result = match conn.client() {
            Ok(c) => self.save_in(&*c, &table, &op, now_micros()).await,
            Err(e) => Err(e.into()),
        };
        match result {
            Ok(saved) => {
                conn.release();
                Ok(saved)
            }
            Err(e) if e.is_missing_table() && !self.auto_create => {
                conn.release();
                Err(self.no_table(&op.collection))
            }
            Err(e) if e.is_missing_table() => {
                // First write to the collection: create its table in one
                // transaction with the save, so a failing save leaves none behind.
                let result = self.run_write(&mut conn, &[Mutation::Save(op)]).await;
                conn.release();
                match result {
                    Ok(mut written) => written
                        .pop()
                        .flatten()
                        .ok_or_else(|| StoreError::Internal("a save returned no result".into())),
                    Err(e) => Err(single(e)),
                }
            }
            Err(e) => {
                conn.release();
                Err(self.resolve(e))
            }
        }
    }

    async fn delete(&self, op: DeleteOp) -> StoreResult<()> {
        let table = self.table(&op.collection)?;
        let mut conn = self.conn().await?;
        let result = match conn.client() {
            Ok(c) => self.delete_in(&*c, &table, &op).await,
            Err(e) => Err(e.into()),
        };
        conn.release();
        match result {
            Ok(()) => Ok(()),
            Err(e) if e.is_missing_table() && !self.auto_create => {
                Err(self.no_table(&op.collection))
            }
            Err(e) if e.is_missing_table() => Err(not_found(&op.collection, &op.id)),
            Err(e) => Err(self.resolve(e)),
        }
    }

    async fn list(&self, collection: &str, after: Option<&str>, limit: usize) -> StoreResult<Page> {
        let table = self.table(collection)?;
        // One row more than asked tells whether another page follows.
        let fetch = i64::try_from(limit).map_or(i64::MAX, |l| l.saturating_add(1));
        let mut conn = self.conn().await?;
        let result: Result<Vec<Row>, OpError> = async {
            let c = conn.client()?;
            // Keyset pagination on the primary key, never OFFSET.
            Ok(match after {
                Some(after) => {
                    let stmt = c
                        .prepare_cached(&format!(
                            "SELECT {COLUMNS} FROM {table} WHERE id > $1 ORDER BY id LIMIT $2"
                        ))
                        .await?;
                    c.query(&stmt, &[&after, &fetch]).await?
                }
                None => {
                    let stmt = c
                        .prepare_cached(&format!(
                            "SELECT {COLUMNS} FROM {table} ORDER BY id LIMIT $1"
                        ))
                        .await?;
                    c.query(&stmt, &[&fetch]).await?
                }
            })
        }
        .await;
        conn.release();
        let rows = match result {
            Ok(rows) => rows,
            Err(e) if e.is_missing_table() => return Ok(Page::default()),
            Err(e) => return Err(self.resolve(e)),
        };
        let mut documents = rows
            .iter()
            .map(|row| row_to_doc(collection, row))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.pg(e))?;
        let more = documents.len() > limit;
        documents.truncate(limit);
        Ok(Page { documents, more })
    }

    async fn batch_get(&self, collection: &str, ids: &[String]) -> StoreResult<Vec<Document>> {
        let table = self.table(collection)?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn().await?;
        let result: Result<Vec<Row>, OpError> = async {
            let c = conn.client()?;
            // One round trip: the ids travel as one text[] parameter.
            let stmt = c
                .prepare_cached(&format!("SELECT {COLUMNS} FROM {table} WHERE id = ANY($1)"))
                .await?;
            Ok(c.query(&stmt, &[&ids]).await?)
        }
        .await;
        conn.release();
        match result {
            Ok(rows) => rows
                .iter()
                .map(|row| row_to_doc(collection, row))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| self.pg(e)),
            Err(e) if e.is_missing_table() => Ok(Vec::new()),
            Err(e) => Err(self.resolve(e)),
        }
    }

    async fn write(&self, mutations: Vec<Mutation>) -> StoreResult<Vec<Written>> {
        if mutations.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn().await?;
        let result = self.run_write(&mut conn, &mutations).await;
        conn.release();
        result
    }

    async fn list_collections(&self) -> StoreResult<Vec<String>> {
        let mut conn = self.conn().await?;
        let result: Result<Vec<Row>, OpError> = async {
            let c = conn.client()?;
            // Only tables this role may read: roles scoped to their own tables see
            // their own collections. A missing schema simply matches nothing.
            let stmt = c
                .prepare_cached(
                    "SELECT c.relname::text FROM pg_catalog.pg_class c
                     JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                     WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') AND NOT c.relispartition
                       AND has_table_privilege(c.oid, 'SELECT')",
                )
                .await?;
            Ok(c.query(&stmt, &[&self.schema]).await?)
        }
        .await;
        conn.release();
        let rows = result.map_err(|e| self.resolve(e))?;
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

    async fn ping(&self) -> StoreResult<()> {
        let mut conn = self.conn().await?;
        let result = match conn.client() {
            Ok(c) => c.batch_execute("SELECT 1").await.map_err(|e| self.pg(e)),
            Err(e) => Err(e),
        };
        conn.release();
        result
    }

    fn pool_stats(&self) -> PoolStats {
        let status = self.pool.current().status();
        PoolStats {
            max: status.max_size,
            open: status.size,
            idle: status.available,
            waiting: status.waiting,
        }
    }

    async fn close(&self) {
        self.pool.current().close();
        tracing::info!(target_db = %self.target, "PostgreSQL store closed");
    }
}

#[cfg(test)]
mod tests {
    //! Against a real server: `DOCSIDECAR_TEST_POSTGRES_URL` (default
    //! `postgres://postgres@127.0.0.1:5432/test`). Each test works in a fresh schema
    //! and drops it. Without a server they are skipped, unless
    //! `DOCSIDECAR_REQUIRE_DB=1`.

    use super::*;
    use std::sync::Arc;
    use std::time::Instant;

    const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

    fn url() -> String {
        std::env::var("DOCSIDECAR_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_URL.into())
    }

    /// Drops the test's schema, also when the test panics.
    struct SchemaGuard {
        name: String,
    }

    impl Drop for SchemaGuard {
        fn drop(&mut self) {
            let name = self.name.clone();
            // Drop cannot await: a thread with its own runtime does the cleanup.
            let _ = std::thread::spawn(move || {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                rt.block_on(async {
                    if let Ok((client, connection)) = tokio_postgres::connect(&url(), NoTls).await {
                        tokio::spawn(connection);
                        let sql = format!(
                            "SET lock_timeout = '5s'; DROP SCHEMA IF EXISTS \"{name}\" CASCADE"
                        );
                        let _ = client.batch_execute(&sql).await;
                    }
                });
            })
            .join();
        }
    }

    /// Fields drop in order: the admin session and the pool end before the schema goes.
    struct Ctx {
        admin: tokio_postgres::Client,
        store: PostgresStore,
        schema: String,
        _guard: SchemaGuard,
    }

    async fn admin() -> Option<tokio_postgres::Client> {
        let require = std::env::var("DOCSIDECAR_REQUIRE_DB").is_ok_and(|v| v == "1");
        match tokio::time::timeout(
            Duration::from_secs(5),
            tokio_postgres::connect(&url(), NoTls),
        )
        .await
        {
            Ok(Ok((client, connection))) => {
                tokio::spawn(connection);
                Some(client)
            }
            Ok(Err(e)) if require => {
                panic!("DOCSIDECAR_REQUIRE_DB=1 but PostgreSQL is unreachable: {e}")
            }
            Err(_) if require => panic!("DOCSIDECAR_REQUIRE_DB=1 but PostgreSQL did not answer"),
            _ => {
                println!("skipped: no PostgreSQL");
                None
            }
        }
    }

    async fn setup(adjust: impl FnOnce(&mut PgOptions)) -> Option<Ctx> {
        let admin = admin().await?;
        let schema = format!("t_{}", uuid::Uuid::now_v7().simple());
        let guard = SchemaGuard {
            name: schema.clone(),
        };
        let mut cfg: tokio_postgres::Config = url().parse().expect("test URL");
        // Tells this test's sessions apart in pg_stat_activity.
        cfg.application_name(&schema);
        let mut opts = PgOptions {
            schema: schema.clone(),
            pool_size: 8,
            acquire_timeout: Duration::from_secs(10),
            max_retries: 1,
            retry_delay: Duration::from_millis(10),
            auto_create: true,
            password_file: None,
        };
        adjust(&mut opts);
        let store = PostgresStore::connect(cfg, opts).await.expect("connect");
        Some(Ctx {
            admin,
            store,
            schema,
            _guard: guard,
        })
    }

    fn save(collection: &str, id: &str, data: &str) -> SaveOp {
        SaveOp {
            collection: collection.into(),
            id: id.into(),
            data: data.into(),
            expected_rev: None,
            create_only: false,
        }
    }

    fn kind(e: &StoreError) -> String {
        match e {
            StoreError::NotFound { .. } => "NotFound".into(),
            StoreError::AlreadyExists { .. } => "AlreadyExists".into(),
            StoreError::RevMismatch { actual, .. } => {
                format!("RevMismatch(actual: {})", actual.is_some())
            }
            StoreError::InMutation { index, source } => {
                format!("mutation {index}: {}", kind(source))
            }
            other => format!("{other:?}"),
        }
    }

    /// A tiny deterministic generator: the same operations for both stores.
    struct Lcg(u64);

    impl Lcg {
        fn below(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) % n
        }
    }

    #[derive(Clone, Copy)]
    enum Rev {
        Unconditional,
        Current,
        Stale,
    }

    #[derive(Clone)]
    enum Op {
        Save(String, String, String, Rev, bool),
        Delete(String, String, Rev),
    }

    fn random_op(rng: &mut Lcg, step: usize) -> Op {
        const COLLECTIONS: [&str; 3] = ["alpha", "beta", "c_3"];
        const IDS: [&str; 5] = ["a", "b", "Z", "é", "a b"];
        let collection = COLLECTIONS[rng.below(3) as usize].to_string();
        let id = IDS[rng.below(5) as usize].to_string();
        let rev = match rng.below(4) {
            0 | 1 => Rev::Unconditional,
            2 => Rev::Current,
            _ => Rev::Stale,
        };
        if rng.below(3) == 0 {
            Op::Delete(collection, id, rev)
        } else {
            let data =
                format!(r#"{{"step": {step}, "nested": {{"list": [1, 2.5, "x", null, true]}}}}"#);
            Op::Save(collection, id, data, rev, rng.below(4) == 0)
        }
    }

    async fn mutation(store: &dyn DocumentStore, op: &Op) -> Mutation {
        let rev = |collection: &str, id: &str, rev: Rev| {
            let (collection, id) = (collection.to_string(), id.to_string());
            async move {
                match rev {
                    Rev::Unconditional => None,
                    Rev::Stale => Some("stale".to_string()),
                    Rev::Current => Some(
                        store
                            .get(&collection, &id)
                            .await
                            .map_or_else(|_| "absent".to_string(), |d| d.rev),
                    ),
                }
            }
        };
        match op {
            Op::Save(c, id, data, r, create_only) => Mutation::Save(SaveOp {
                collection: c.clone(),
                id: id.clone(),
                data: data.clone(),
                expected_rev: rev(c, id, *r).await,
                create_only: *create_only,
            }),
            Op::Delete(c, id, r) => Mutation::Delete(DeleteOp {
                collection: c.clone(),
                id: id.clone(),
                expected_rev: rev(c, id, *r).await,
            }),
        }
    }

    /// Runs one step on a store and describes its outcome.
    async fn apply(store: &dyn DocumentStore, ops: &[Op], batch: bool) -> String {
        let mut mutations = Vec::new();
        for op in ops {
            mutations.push(mutation(store, op).await);
        }
        if batch {
            match store.write(mutations).await {
                Ok(results) => format!(
                    "ok {:?}",
                    results
                        .iter()
                        .map(|r| r.as_ref().map(|s| s.created))
                        .collect::<Vec<_>>()
                ),
                Err(e) => kind(&e),
            }
        } else {
            match mutations.pop() {
                Some(Mutation::Save(op)) => match store.save(op).await {
                    Ok(saved) => format!("ok created={}", saved.created),
                    Err(e) => kind(&e),
                },
                Some(Mutation::Delete(op)) => match store.delete(op).await {
                    Ok(()) => "ok deleted".into(),
                    Err(e) => kind(&e),
                },
                None => "nothing".into(),
            }
        }
    }

    /// Everything observable, with revs and times reduced to what must agree.
    async fn snapshot(store: &dyn DocumentStore) -> Vec<String> {
        let mut out = vec![format!(
            "collections {:?}",
            store.list_collections().await.unwrap()
        )];
        for collection in ["alpha", "beta", "c_3", "never"] {
            // Walk in pages of two to exercise the keyset pagination.
            let mut after: Option<String> = None;
            loop {
                let page = store.list(collection, after.as_deref(), 2).await.unwrap();
                for d in &page.documents {
                    let data: serde_json::Value = serde_json::from_str(&d.data).unwrap();
                    assert!(d.create_time <= d.update_time);
                    out.push(format!("{collection}/{} {data}", d.id));
                }
                after = page.documents.last().map(|d| d.id.clone());
                if !page.more {
                    break;
                }
            }
            let ids: Vec<String> = ["a", "b", "Z", "é", "a b", "nope"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            let mut found: Vec<String> = store
                .batch_get(collection, &ids)
                .await
                .unwrap()
                .into_iter()
                .map(|d| d.id)
                .collect();
            found.sort();
            out.push(format!("{collection} batch {found:?}"));
        }
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn behaves_like_the_memory_store() {
        let Some(ctx) = setup(|_| {}).await else {
            return;
        };
        let started = Instant::now();
        let memory = MemoryStore::new();
        let mut rng = Lcg(7);
        for step in 0..400 {
            let batch = rng.below(4) == 0;
            let n = if batch { 1 + rng.below(3) as usize } else { 1 };
            let ops: Vec<Op> = (0..n).map(|_| random_op(&mut rng, step)).collect();
            let expected = apply(&memory, &ops, batch).await;
            let actual = apply(&ctx.store, &ops, batch).await;
            assert_eq!(actual, expected, "step {step}");
            if step % 20 == 19 {
                assert_eq!(
                    snapshot(&ctx.store).await,
                    snapshot(&memory).await,
                    "step {step}"
                );
            }
        }
        println!(
            "400 random steps agreed with MemoryStore in {:?}",
            started.elapsed()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn documents_round_trip_and_keep_their_create_time() {
        let Some(ctx) = setup(|_| {}).await else {
            return;
        };
        let s = &ctx.store;
        let first = s
            .save(save("docs", "x", r#"{"a": [1, {"b": "ü"}], "n": 1.5}"#))
            .await
            .unwrap();
        assert!(first.created);
        let doc = s.get("docs", "x").await.unwrap();
        assert_eq!(doc.rev, first.rev);
        assert_eq!(doc.create_time, first.update_time);
        let data: serde_json::Value = serde_json::from_str(&doc.data).unwrap();
        assert_eq!(data, serde_json::json!({"a": [1, {"b": "ü"}], "n": 1.5}));

        tokio::time::sleep(Duration::from_millis(2)).await;
        let second = s.save(save("docs", "x", "{}")).await.unwrap();
        assert!(!second.created);
        assert_ne!(second.rev, first.rev);
        let doc = s.get("docs", "x").await.unwrap();
        assert_eq!(doc.create_time, first.update_time);
        assert_eq!(doc.update_time, second.update_time);
        assert!(doc.update_time > doc.create_time);

        // Ids sort by bytes.
        for id in ["b", "B", "é", "a"] {
            s.save(save("docs", id, "{}")).await.unwrap();
        }
        let page = s.list("docs", None, 10).await.unwrap();
        let ids: Vec<&str> = page.documents.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["B", "a", "b", "x", "é"]);
        assert!(!page.more);

        // A table in the schema that is not a collection name is not listed.
        ctx.admin
            .batch_execute(&format!(
                "CREATE TABLE \"{}\".\"Not_A_Collection\" (x int)",
                ctx.schema
            ))
            .await
            .unwrap();
        assert_eq!(s.list_collections().await.unwrap(), ["docs"]);

        // jsonb cannot hold \u0000: a clear error, not a panic.
        let err = s
            .save(save("docs", "nul", r#"{"s": "\u0000"}"#))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Internal(_)), "{err:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failed_writes_leave_no_trace_not_even_a_table() {
        let Some(ctx) = setup(|_| {}).await else {
            return;
        };
        let s = &ctx.store;
        let err = s
            .write(vec![
                Mutation::Save(save("alpha", "a", "{}")),
                Mutation::Save(save("ghost", "x", "{}")),
                Mutation::Delete(DeleteOp {
                    collection: "alpha".into(),
                    id: "missing".into(),
                    expected_rev: None,
                }),
            ])
            .await
            .unwrap_err();
        assert_eq!(kind(&err), "mutation 2: NotFound");
        assert!(err.to_string().starts_with("mutation 2: "), "{err}");
        assert!(matches!(
            s.get("alpha", "a").await,
            Err(StoreError::NotFound { .. })
        ));
        assert!(s.list_collections().await.unwrap().is_empty());

        let mut conditional = save("beta", "a", "{}");
        conditional.expected_rev = Some("r1".into());
        assert_eq!(
            kind(&s.save(conditional).await.unwrap_err()),
            "RevMismatch(actual: false)"
        );
        assert!(s.list_collections().await.unwrap().is_empty());

        // One transaction across collections; the same id twice: insert, then update.
        let results = s
            .write(vec![
                Mutation::Save(save("alpha", "a", r#"{"v": 1}"#)),
                Mutation::Save(save("beta", "b", "{}")),
                Mutation::Save(save("alpha", "a", r#"{"v": 2}"#)),
            ])
            .await
            .unwrap();
        let created: Vec<bool> = results
            .iter()
            .map(|r| r.as_ref().is_some_and(|s| s.created))
            .collect();
        assert_eq!(created, [true, true, false]);
        assert_eq!(s.get("alpha", "a").await.unwrap().data, r#"{"v": 2}"#);
        assert_eq!(s.list_collections().await.unwrap(), ["alpha", "beta"]);

        // A table dropped behind the store's back (its cache says it exists) is recreated.
        ctx.admin
            .batch_execute(&format!("DROP TABLE \"{}\".\"alpha\"", ctx.schema))
            .await
            .unwrap();
        let results = s
            .write(vec![Mutation::Save(save("alpha", "z", "{}"))])
            .await
            .unwrap();
        assert!(results[0].as_ref().is_some_and(|s| s.created));
        assert_eq!(s.list_collections().await.unwrap(), ["alpha", "beta"]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_conditional_increments_lose_nothing() {
        let Some(ctx) = setup(|_| {}).await else {
            return;
        };
        let store = Arc::new(ctx.store);
        store
            .save(save("counters", "c", r#"{"n": 0}"#))
            .await
            .unwrap();
        let started = Instant::now();
        let (tasks, each) = (20, 10);
        let mut handles = Vec::new();
        for _ in 0..tasks {
            let store = store.clone();
            handles.push(tokio::spawn(async move {
                let mut conflicts = 0;
                for _ in 0..each {
                    loop {
                        let doc = store.get("counters", "c").await.unwrap();
                        let n = serde_json::from_str::<serde_json::Value>(&doc.data).unwrap()["n"]
                            .as_i64()
                            .unwrap();
                        let mut op = save("counters", "c", &format!(r#"{{"n": {}}}"#, n + 1));
                        op.expected_rev = Some(doc.rev);
                        match store.save(op).await {
                            Ok(saved) => {
                                assert!(!saved.created);
                                break;
                            }
                            Err(StoreError::RevMismatch {
                                actual: Some(_), ..
                            }) => conflicts += 1,
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
                conflicts
            }));
        }
        let mut conflicts = 0;
        for h in handles {
            conflicts += h.await.unwrap();
        }
        let doc = store.get("counters", "c").await.unwrap();
        let n = serde_json::from_str::<serde_json::Value>(&doc.data).unwrap()["n"].as_i64();
        assert_eq!(n, Some(tasks * each));
        println!(
            "{} increments from {tasks} tasks in {:?} ({conflicts} rev conflicts retried)",
            tasks * each,
            started.elapsed()
        );
        let store = Arc::into_inner(store).expect("tasks finished");
        drop(store);
        drop(ctx.admin);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn racing_first_writes_create_each_table_once() {
        let Some(ctx) = setup(|_| {}).await else {
            return;
        };
        let store = Arc::new(ctx.store);
        let started = Instant::now();
        let mut handles = Vec::new();
        for i in 0..20 {
            let store = store.clone();
            handles.push(tokio::spawn(async move {
                let saved = store.save(save("race", &format!("d{i}"), "{}")).await?;
                assert!(saved.created);
                let written = store
                    .write(vec![
                        Mutation::Save(save("race_two", &format!("d{i}"), "{}")),
                        Mutation::Save(save("race_three", &format!("d{i}"), "{}")),
                    ])
                    .await?;
                assert!(written
                    .iter()
                    .all(|w| w.as_ref().is_some_and(|s| s.created)));
                Ok::<_, StoreError>(())
            }));
        }
        for h in handles {
            h.await.unwrap().unwrap();
        }
        for collection in ["race", "race_two", "race_three"] {
            assert_eq!(
                store
                    .list(collection, None, 100)
                    .await
                    .unwrap()
                    .documents
                    .len(),
                20
            );
        }
        assert_eq!(
            store.list_collections().await.unwrap(),
            ["race", "race_three", "race_two"]
        );
        println!(
            "20 racing tasks created 3 tables in {:?}",
            started.elapsed()
        );
        drop(store);
        drop(ctx.admin);
    }

    /// Waits until `n` sessions of this test's store are blocked on a lock.
    async fn wait_for_waiting(admin: &tokio_postgres::Client, application: &str, n: i64) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let waiting: i64 = admin
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND wait_event_type = 'Lock'",
                    &[&application],
                )
                .await
                .unwrap()
                .get(0);
            if waiting == n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "expected {n} blocked session(s), saw {waiting}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_abandoned_call_cancels_its_query_and_frees_the_pool() {
        let Some(ctx) = setup(|o| {
            o.pool_size = 1;
            o.acquire_timeout = Duration::from_millis(300);
        })
        .await
        else {
            return;
        };
        let Ctx {
            admin,
            store,
            schema,
            _guard,
        } = ctx;
        store.save(save("locked", "a", "{}")).await.unwrap();
        // A second session holds the lock; `admin` watches pg_stat_activity.
        let Some(mut locker) = super::tests::admin().await else {
            return;
        };
        let lock = locker.transaction().await.unwrap();
        lock.batch_execute(&format!(
            "LOCK TABLE \"{schema}\".\"locked\" IN ACCESS EXCLUSIVE MODE"
        ))
        .await
        .unwrap();

        let store = Arc::new(store);
        let blocked = {
            let store = store.clone();
            tokio::spawn(async move { store.get("locked", "a").await })
        };
        wait_for_waiting(&admin, &schema, 1).await;

        // The only connection is busy: UNAVAILABLE after the acquire timeout.
        let started = Instant::now();
        let err = store.ping().await.unwrap_err();
        assert!(
            matches!(&err, StoreError::Unavailable(m) if m.contains("no PostgreSQL connection became free")),
            "{err:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );

        // The deadline passes: the future is dropped and its query cancelled on
        // the server while the lock is still held.
        let started = Instant::now();
        blocked.abort();
        assert!(blocked.await.unwrap_err().is_cancelled());
        wait_for_waiting(&admin, &schema, 0).await;
        println!(
            "abandoned query gone from the server after {:?}",
            started.elapsed()
        );

        // Its connection was discarded, so the pool's slot is free again.
        store.ping().await.unwrap();
        lock.rollback().await.unwrap();
        assert_eq!(store.get("locked", "a").await.unwrap().id, "a");
        drop(locker);
        drop(store);
        drop(admin);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_auto_create_writes_need_migrated_tables() {
        let Some(ctx) = setup(|o| o.auto_create = false).await else {
            return;
        };
        let s = &ctx.store;
        // Nothing exists, not even the schema: reads see an empty store.
        assert!(matches!(
            s.get("docs", "a").await,
            Err(StoreError::NotFound { .. })
        ));
        assert!(s.list("docs", None, 10).await.unwrap().documents.is_empty());
        assert!(s.batch_get("docs", &["a".into()]).await.unwrap().is_empty());
        assert!(s.list_collections().await.unwrap().is_empty());

        let err = s.save(save("docs", "a", "{}")).await.unwrap_err();
        assert!(
            matches!(&err, StoreError::PermissionDenied(m) if m.contains("docsidecar migrate")),
            "{err:?}"
        );
        let err = s
            .write(vec![Mutation::Save(save("docs", "a", "{}"))])
            .await
            .unwrap_err();
        assert!(err.to_string().starts_with("mutation 0: "), "{err}");
        assert!(err.to_string().contains("docsidecar migrate"), "{err}");

        // After a migration (here: the same DDL by hand) writes work.
        ctx.admin
            .batch_execute(&format!(
                "CREATE SCHEMA \"{0}\"; {1}",
                ctx.schema,
                table_ddl(&ctx.schema, "docs").unwrap()
            ))
            .await
            .unwrap();
        assert!(s.save(save("docs", "a", "{}")).await.unwrap().created);
        assert_eq!(s.list_collections().await.unwrap(), ["docs"]);
    }

    #[tokio::test]
    async fn an_unreachable_server_is_unavailable_without_leaking_the_password() {
        let cfg: tokio_postgres::Config = "postgres://app:hunter2@127.0.0.1:1/db".parse().unwrap();
        let started = Instant::now();
        let opts = PgOptions {
            schema: "docsidecar".into(),
            pool_size: 2,
            acquire_timeout: Duration::from_secs(2),
            max_retries: 3,
            retry_delay: Duration::from_millis(20),
            auto_create: true,
            password_file: None,
        };
        let err = PostgresStore::connect(cfg, opts).await.unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
        assert!(message.contains("app@127.0.0.1:1/db"), "{message}");
        assert!(message.contains("3 attempt"), "{message}");
        assert!(!message.contains("hunter2"), "{message}");
        // 20 ms, then 40 ms between the three attempts.
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn names_are_checked_before_they_reach_sql() {
        let opts = PgOptions {
            schema: "Robert\"; DROP TABLE x; --".into(),
            pool_size: 1,
            acquire_timeout: Duration::from_secs(1),
            max_retries: 1,
            retry_delay: Duration::from_millis(10),
            auto_create: true,
            password_file: None,
        };
        let err = PostgresStore::connect(tokio_postgres::Config::new(), opts)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Internal(_)), "{err:?}");
        assert!(qualified_table("s", "ok_name").is_ok());
        for bad in ["", "A", "1a", "a-b", "a\"b", &"a".repeat(64)] {
            assert!(qualified_table("s", bad).is_err(), "{bad:?}");
        }
        assert!(qualified_table("s", &"a".repeat(63)).is_ok());
    }
}
