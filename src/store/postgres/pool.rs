//! The connection pool, password rotation, the health connection, and the
//! connection guard that cancels an abandoned call's query.

use super::error::{describe, ProbeError};
use super::tls::Connector;
use crate::background::Tasks;
use crate::metrics;
use crate::store::{PoolStats, StoreError, StoreResult};
use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime, TimeoutType,
};
use std::ops::{Deref, DerefMut};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// A connection's future, which delivers its notifications (over TLS or not:
/// the stream type is the connector's).
pub(super) type PgConnection = tokio_postgres::Connection<
    tokio_postgres::Socket,
    <Connector as tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>>::Stream,
>;

/// The current pool. A rotated password gets a new pool; the old one is only
/// dropped, never closed, so calls holding or awaiting its connections finish on
/// them, and those connections close as they come back.
pub(super) struct Pools {
    /// The pool, and the config its connections are made with (the current
    /// password).
    pool: RwLock<(Pool, tokio_postgres::Config)>,
    /// Bumped when the password rotates: connections made before retire.
    generation: std::sync::atomic::AtomicU64,
    tls: Connector,
    size: usize,
    acquire_timeout: Duration,
    /// `user@host:port/db` for messages and logs; never the password.
    target: String,
    /// Readiness probes run on this connection, outside the pool, so that calls
    /// holding every pooled connection cannot make a live database look dead.
    health: tokio::sync::Mutex<Option<tokio_postgres::Client>>,
    /// Owns the health connection's driver task.
    tasks: Tasks,
}

fn build(
    cfg: tokio_postgres::Config,
    tls: Connector,
    size: usize,
    acquire_timeout: Duration,
) -> StoreResult<Pool> {
    let manager = Manager::from_config(
        cfg,
        tls,
        ManagerConfig {
            // Fast: `is_closed` catches dead connections without a round trip.
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size)
        .wait_timeout(Some(acquire_timeout))
        .create_timeout(Some(acquire_timeout))
        .recycle_timeout(Some(acquire_timeout))
        .runtime(Runtime::Tokio1)
        .build()
        .map_err(|e| StoreError::Internal(format!("cannot build the PostgreSQL pool: {e}")))
}

impl Pools {
    pub(super) fn new(
        cfg: tokio_postgres::Config,
        tls: Connector,
        size: usize,
        acquire_timeout: Duration,
        target: String,
        tasks: &Tasks,
    ) -> StoreResult<Arc<Pools>> {
        Ok(Arc::new(Pools {
            pool: RwLock::new((build(cfg.clone(), tls.clone(), size, acquire_timeout)?, cfg)),
            generation: Default::default(),
            tls,
            size,
            acquire_timeout,
            target,
            health: tokio::sync::Mutex::new(None),
            tasks: tasks.clone(),
        }))
    }

    fn current(&self) -> Pool {
        self.pool
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone()
    }

    fn config(&self) -> tokio_postgres::Config {
        self.pool
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .clone()
    }

    /// Which password generation connections made now belong to.
    pub(super) fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// A connection of its own, outside the pool, for background work that
    /// must neither wait for traffic nor hold traffic's connections (the
    /// reaper, the feed's sequencer). `lock_timeout` keeps it from queueing
    /// behind DDL. Its connection is driven in the store's tasks.
    pub(super) async fn dedicated(&self, role: &str) -> StoreResult<tokio_postgres::Client> {
        let (client, connection) = self.connect_as(role).await?;
        self.drive(role, connection);
        Ok(client)
    }

    /// A connection of its own with its connection future, for LISTEN (the
    /// caller polls the connection for notifications).
    pub(super) async fn listener(&self) -> StoreResult<(tokio_postgres::Client, PgConnection)> {
        self.connect_as("listener").await
    }

    async fn connect_as(&self, role: &str) -> StoreResult<(tokio_postgres::Client, PgConnection)> {
        self.open(role, Some("-c lock_timeout=200 -c statement_timeout=30000"))
            .await
            .map_err(|e| {
                StoreError::unavailable(format!(
                    "cannot connect to PostgreSQL at {}: {}",
                    self.target,
                    describe(&e)
                ))
            })
    }

    /// Whether the database answers `SELECT 1`, asked on the health connection
    /// (opened again when it broke) within the acquire timeout. A probe
    /// abandoned half-way (its caller gave up) leaves no connection behind: the
    /// next one opens a fresh connection rather than queue behind a lost answer.
    pub(super) async fn probe(&self) -> Result<(), ProbeError> {
        let mut slot = self.health.lock().await;
        let limit = self.acquire_timeout.max(Duration::from_secs(1));
        let answered = tokio::time::timeout(limit, async {
            let client = match slot.take() {
                Some(client) if !client.is_closed() => client,
                _ => {
                    let (client, connection) = self.open("health", None).await?;
                    self.drive("health", connection);
                    client
                }
            };
            client.simple_query("SELECT 1").await?;
            Ok::<_, tokio_postgres::Error>(client)
        })
        .await;
        match answered {
            Ok(Ok(client)) => {
                *slot = Some(client);
                Ok(())
            }
            Ok(Err(e)) => Err(ProbeError::Pg(e)),
            Err(_) => Err(ProbeError::TimedOut(limit)),
        }
    }

    /// A connection outside the pool, with the current password and TLS,
    /// named for its `purpose` (`docsidecar (health)`) in `pg_stat_activity`.
    async fn open(
        &self,
        purpose: &str,
        options: Option<&str>,
    ) -> Result<(tokio_postgres::Client, PgConnection), tokio_postgres::Error> {
        let mut cfg = self.config();
        let name = format!(
            "{} ({purpose})",
            cfg.get_application_name().unwrap_or("docsidecar")
        );
        cfg.application_name(&name);
        if let Some(options) = options {
            cfg.options(options);
        }
        cfg.connect(self.tls.clone()).await
    }

    /// Drives a dedicated connection in the store's tasks; it ends when its
    /// client is dropped.
    fn drive(&self, purpose: &str, connection: PgConnection) {
        let purpose = purpose.to_string();
        self.tasks.spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(purpose, error = %describe(&e), "a dedicated PostgreSQL connection ended");
            }
        });
    }

    /// Watches the password file in `tasks`; stops when the pools are gone.
    pub(super) fn watch_password(self: &Arc<Self>, file: PathBuf, tasks: &Tasks) {
        crate::background::watch_password(
            self,
            file,
            tasks,
            |pools: Arc<Pools>, password| async move { pools.rotate(&password).await },
        );
    }

    /// Switches to `password` once a connection with it succeeds; until then the
    /// old pool keeps serving.
    async fn rotate(&self, password: &str) -> bool {
        let mut cfg = self.config();
        cfg.password(password);
        let Ok(pool) = build(
            cfg.clone(),
            self.tls.clone(),
            self.size,
            self.acquire_timeout,
        ) else {
            return false;
        };
        if let Err(e) = pool.get().await {
            tracing::warn!(
                target_db = %self.target,
                error = %e,
                "the rotated database password does not work yet; the previous connections keep serving"
            );
            return false;
        }
        *self.pool.write().unwrap_or_else(|e| e.into_inner()) = (pool, cfg);
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        // The health connection retires too: the next probe opens one with the
        // new password (so that it, too, is known to work).
        self.health.lock().await.take();
        tracing::info!(
            target_db = %self.target,
            "database password rotated: new connections use it, the old ones retire as their calls finish"
        );
        true
    }

    /// A pooled connection within the acquire timeout, or UNAVAILABLE.
    pub(super) async fn acquire(&self) -> StoreResult<Conn> {
        // The pool's own timeouts name the stage that was slow; this one bounds the total.
        let pool = self.current();
        let started = Instant::now();
        // A span of its own when the call is traced: pool saturation shows in traces.
        let wait = tokio::time::timeout(self.acquire_timeout, pool.get());
        let acquired =
            tracing::Instrument::instrument(wait, crate::telemetry::pool_wait_span()).await;
        metrics::pool_acquired(started);
        match acquired {
            Ok(Ok(object)) => Ok(Conn {
                object: Some(object),
                tls: self.tls.clone(),
            }),
            Ok(Err(e)) => Err(self.pool_error(e)),
            Err(_) => Err(self.busy()),
        }
    }

    fn busy(&self) -> StoreError {
        metrics::pool_timeout();
        StoreError::pool_exhausted(format!(
            "no PostgreSQL connection became free within {:?} (pool size {}); retry, or raise DB_POOL_SIZE or DB_ACQUIRE_TIMEOUT",
            self.acquire_timeout, self.size
        ))
    }

    fn pool_error(&self, e: PoolError) -> StoreError {
        match e {
            PoolError::Timeout(TimeoutType::Wait) => self.busy(),
            PoolError::Timeout(_) => StoreError::unavailable(format!(
                "PostgreSQL at {} did not accept a connection within {:?}; retry",
                self.target, self.acquire_timeout
            )),
            // Refused port, wrong password (a rotation not yet picked up): the
            // sidecar cannot serve until the database or its settings are fixed.
            PoolError::Backend(e) => StoreError::unavailable(format!(
                "cannot connect to PostgreSQL at {}: {}; retry",
                self.target,
                describe(&e)
            )),
            PoolError::Closed => {
                StoreError::shutting_down("the PostgreSQL store is closed (shutting down)")
            }
            PoolError::NoRuntimeSpecified | PoolError::PostCreateHook(_) => {
                StoreError::Internal(format!("PostgreSQL pool: {e}"))
            }
        }
    }

    pub(super) fn stats(&self) -> PoolStats {
        self.current().status().into()
    }

    pub(super) fn close(&self) {
        self.current().close();
        if let Ok(mut health) = self.health.try_lock() {
            health.take();
        }
    }
}

/// A pooled connection that cancels its query if dropped before
/// [`Conn::release`]: dropping a call's future (the client's deadline) must not
/// leave the query running on the server.
pub(super) struct Conn {
    object: Option<Object>,
    /// Cancel requests travel as the connection did (TLS or not).
    tls: Connector,
}

impl Conn {
    /// The call finished, with or without an error: back to the pool.
    pub(super) fn release(mut self) {
        drop(self.object.take());
    }
}

impl Deref for Conn {
    type Target = Object;

    fn deref(&self) -> &Object {
        // Present from acquire until `release` consumes the guard or it drops.
        self.object.as_ref().expect("a connection until released")
    }
}

impl DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut Object {
        self.object.as_mut().expect("a connection until released")
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
        let tls = self.tls.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                match token.cancel_query(tls).await {
                    Ok(()) => tracing::debug!("cancelled the query of an abandoned call"),
                    Err(e) => tracing::debug!(error = %describe(&e), "could not cancel the query of an abandoned call"),
                }
                drop(client);
            });
        }
    }
}
