//! The pool over one or several hosts, failover between them, password
//! rotation, and the connection guard that kills an abandoned call.
//!
//! New connections go to the host that served last (the first listed at
//! start-up), else to the next one in order that answers and accepts writes:
//! not `read_only`, and on a Galera node `wsrep_ready` (preferably `Synced`).
//! When a call loses its connection (the host died, a Galera node left the
//! primary component, a server turned read-only), the pool stops reusing
//! every connection it made to hosts before that moment, so the next calls
//! probe the hosts again and go on elsewhere, without a restart.

use super::error::{describe, OpError};
use super::{Host, MysqlTarget};
use crate::background::Tasks;
use crate::metrics;
use crate::store::tls::{DbTls, SslMode};
use crate::store::{PoolStats, StoreError, StoreResult};
use deadpool::managed::{self, Metrics, Object, PoolError, RecycleError, RecycleResult};
use mysql_async::prelude::*;
use mysql_async::{ClientIdentity, DriverError, Opts, OptsBuilder, SslOpts};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// Prepared statements kept per connection: a few per collection.
const STATEMENT_CACHE: usize = 256;

/// A connection idle this long is pinged before it is handed out again (a
/// server's `wait_timeout`, a load balancer or a dead host may have closed it).
const IDLE_CHECK_AFTER: Duration = Duration::from_secs(10);

/// Set on every new connection: READ COMMITTED (a locking read sees the
/// latest committed row and takes no gap locks, so inserts of new ids do not
/// deadlock each other), strict values, UTC, and UTF-8 text.
const SESSION_SETUP: [&str; 2] = [
    "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
    "SET NAMES utf8mb4, time_zone = '+00:00', sql_mode = 'STRICT_ALL_TABLES,NO_ENGINE_SUBSTITUTION,ERROR_FOR_DIVISION_BY_ZERO'",
];

/// A pooled connection with what the pool knows of it.
pub(super) struct Session {
    pub(super) conn: mysql_async::Conn,
    /// Index of its host in the target's list.
    pub(super) host: usize,
    /// The host is a Galera node.
    pub(super) galera: bool,
    /// The host is MariaDB (else MySQL).
    pub(super) mariadb: bool,
    epoch: u64,
    generation: u64,
}

/// What a server says about itself on a new connection.
struct Probe {
    mariadb: bool,
    galera: bool,
    /// Why it must not serve writes, when it must not.
    refused: Option<String>,
    /// Why it should only serve when no other host can.
    degraded: Option<String>,
}

/// The password in use; a rotation makes a new generation.
struct Credentials {
    password: Option<String>,
    generation: u64,
}

/// Which host serves, and since when (the epoch counts switches and losses).
struct HostState {
    preferred: usize,
    epoch: u64,
}

/// Makes and checks connections: the deadpool manager.
pub(super) struct Hosts {
    hosts: Vec<Host>,
    user: String,
    /// `None`: connect without a default database (migrate creates it).
    database: Option<String>,
    tls: DbTls,
    credentials: RwLock<Arc<Credentials>>,
    state: Mutex<HostState>,
    /// Time for one host to answer; several fit in an acquire timeout.
    connect_timeout: Duration,
    /// `user@hosts/database` for messages and logs; never the password.
    pub(super) target: String,
}

fn ssl_opts(tls: &DbTls) -> SslOpts {
    let mut ssl = SslOpts::default();
    if let Some(ca) = &tls.root_cert {
        // The driver reads the file itself; a copy is read for the expiry gauge.
        if let Ok(pem) = std::fs::read(ca) {
            use rustls::pki_types::{pem::PemObject, CertificateDer};
            let cas: Vec<_> = CertificateDer::pem_slice_iter(&pem)
                .filter_map(Result::ok)
                .collect();
            crate::x509::record_expiry("database_ca", &cas);
        }
        ssl = ssl
            .with_root_certs(vec![ca.clone().into()])
            .with_disable_built_in_roots(true);
    }
    if let (Some(cert), Some(key)) = (&tls.client_cert, &tls.client_key) {
        ssl = ssl.with_client_identity(Some(ClientIdentity::new(
            cert.clone().into(),
            key.clone().into(),
        )));
    }
    if !tls.verifies_ca() {
        ssl = ssl.with_danger_accept_invalid_certs(true);
    } else if tls.mode != SslMode::VerifyFull {
        ssl = ssl.with_danger_skip_domain_validation(true);
    }
    ssl
}

fn status_value(rows: &[(String, String)], name: &str) -> Option<String> {
    rows.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.clone())
}

impl Hosts {
    fn state(&self) -> std::sync::MutexGuard<'_, HostState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn credentials(&self) -> Arc<Credentials> {
        self.credentials
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn opts(&self, host: usize, password: Option<&str>, tls: bool) -> Opts {
        let h = &self.hosts[host];
        let mut opts = OptsBuilder::default()
            .ip_or_hostname(h.name.clone())
            .tcp_port(h.port)
            .user(Some(self.user.clone()))
            .pass(password.map(str::to_string))
            .db_name(self.database.clone())
            // TCP as configured: a socket would skip TLS and change the account's host.
            .prefer_socket(false)
            .tcp_nodelay(true)
            .tcp_keepalive(Some(Duration::from_secs(10)))
            .stmt_cache_size(STATEMENT_CACHE)
            .connect_attribute("program_name", "docsidecar")
            .setup(SESSION_SETUP.to_vec());
        if tls {
            opts = opts.ssl_opts(ssl_opts(&self.tls));
        }
        opts.into()
    }

    /// A connection to `host`, TLS as the settings say (`prefer` falls back
    /// to plain TCP when the server has no TLS).
    async fn dial(&self, host: usize, password: Option<&str>) -> Result<mysql_async::Conn, String> {
        let dial = |tls| {
            let opts = self.opts(host, password, tls);
            tokio::time::timeout(self.connect_timeout, mysql_async::Conn::new(opts))
        };
        let tls = self.tls.mode != SslMode::Disable;
        let result = match dial(tls).await {
            Ok(Err(mysql_async::Error::Driver(DriverError::NoClientSslFlagFromServer)))
                if self.tls.mode == SslMode::Prefer =>
            {
                dial(false).await
            }
            other => other,
        };
        match result {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(describe(&e)),
            Err(_) => Err(format!("no answer within {:?}", self.connect_timeout)),
        }
    }

    /// What the server at the other end of `conn` is and whether it takes writes.
    async fn probe(conn: &mut mysql_async::Conn) -> Result<Probe, mysql_async::Error> {
        let vars: Vec<(String, String)> = conn
            .query(
                "SHOW GLOBAL VARIABLES WHERE Variable_name IN ('version', 'read_only', 'wsrep_on')",
            )
            .await?;
        let on = |name| status_value(&vars, name).is_some_and(|v| v.eq_ignore_ascii_case("ON"));
        let mut probe = Probe {
            mariadb: status_value(&vars, "version").is_some_and(|v| v.contains("MariaDB")),
            galera: on("wsrep_on"),
            refused: on("read_only")
                .then(|| "read-only (a replica, or a server being maintained)".to_string()),
            degraded: None,
        };
        if probe.galera {
            let status: Vec<(String, String)> = conn
                .query("SHOW GLOBAL STATUS WHERE Variable_name IN ('wsrep_ready', 'wsrep_local_state_comment', 'wsrep_cluster_status')")
                .await?;
            let get = |name| status_value(&status, name).unwrap_or_default();
            let state = get("wsrep_local_state_comment");
            if !get("wsrep_ready").eq_ignore_ascii_case("ON") {
                probe.refused = Some(format!(
                    "Galera node not ready ({state}, cluster {})",
                    get("wsrep_cluster_status")
                ));
            } else if state != "Synced" {
                probe.degraded = Some(format!("Galera node {state}"));
            }
        }
        Ok(probe)
    }

    /// Connects to `host` and checks that it takes writes.
    async fn open(
        &self,
        host: usize,
        password: Option<&str>,
    ) -> Result<(mysql_async::Conn, Probe), String> {
        let mut conn = self.dial(host, password).await?;
        match tokio::time::timeout(self.connect_timeout, Self::probe(&mut conn)).await {
            Ok(Ok(probe)) => Ok((conn, probe)),
            Ok(Err(e)) => Err(describe(&e)),
            Err(_) => Err(format!("no answer within {:?}", self.connect_timeout)),
        }
    }

    /// Serves from `host` from now on; the epoch of its connections.
    fn use_host(&self, host: usize) -> u64 {
        let mut state = self.state();
        if state.preferred != host {
            warn!(
                target_db = %self.target,
                from = %self.hosts[state.preferred],
                to = %self.hosts[host],
                "switched database host: new connections go to it"
            );
            metrics::database_failover();
            state.preferred = host;
            state.epoch += 1;
        }
        state.epoch
    }

    /// A call lost its connection (of `epoch`) or found its host unusable:
    /// connections made until now are not reused, and new ones probe the
    /// hosts again, starting with the one that served.
    pub(super) fn host_failed(&self, epoch: u64, host: usize, why: &str) {
        let mut state = self.state();
        if state.epoch == epoch {
            state.epoch += 1;
            warn!(
                target_db = %self.target,
                host = %self.hosts[host],
                error = why,
                "lost a database connection: the pool replaces its connections and probes the hosts again"
            );
        }
    }

    /// The options of `host` with the current password (for side connections).
    fn current_opts(&self, host: usize) -> Opts {
        let credentials = self.credentials();
        self.opts(
            host,
            credentials.password.as_deref(),
            self.tls.mode != SslMode::Disable,
        )
    }
}

impl managed::Manager for Hosts {
    type Type = Session;
    type Error = StoreError;

    async fn create(&self) -> Result<Session, StoreError> {
        let credentials = self.credentials();
        let n = self.hosts.len();
        let start = self.state().preferred;
        let mut fallback = None;
        let mut failures = Vec::new();
        for k in 0..n {
            let host = (start + k) % n;
            match self.open(host, credentials.password.as_deref()).await {
                Ok((conn, probe)) => {
                    if let Some(why) = probe.refused.clone() {
                        failures.push(format!("{}: {why}", self.hosts[host]));
                        continue;
                    }
                    if let Some(why) = probe.degraded.clone() {
                        failures.push(format!("{}: {why}", self.hosts[host]));
                        fallback.get_or_insert((host, conn, probe));
                        continue;
                    }
                    fallback = Some((host, conn, probe));
                    break;
                }
                Err(why) => failures.push(format!("{}: {why}", self.hosts[host])),
            }
        }
        let Some((host, conn, probe)) = fallback else {
            return Err(StoreError::unavailable(format!(
                "no database host of {} accepts writes now ({}); retry",
                self.target,
                failures.join("; ")
            )));
        };
        if !failures.is_empty() {
            debug!(target_db = %self.target, skipped = %failures.join("; "), "database hosts skipped");
        }
        Ok(Session {
            conn,
            host,
            galera: probe.galera,
            mariadb: probe.mariadb,
            epoch: self.use_host(host),
            generation: credentials.generation,
        })
    }

    async fn recycle(&self, session: &mut Session, metrics: &Metrics) -> RecycleResult<StoreError> {
        if session.generation != self.credentials().generation {
            return Err(RecycleError::message("the password was rotated"));
        }
        if session.epoch != self.state().epoch {
            return Err(RecycleError::message("the pool replaces its connections"));
        }
        if metrics.last_used() > IDLE_CHECK_AFTER {
            if let Err(e) = session.conn.ping().await {
                return Err(RecycleError::Message(describe(&e).into()));
            }
        }
        Ok(())
    }
}

/// The pool of connections, over every host of the target.
pub(super) struct Pools {
    pool: managed::Pool<Hosts>,
    size: usize,
    acquire_timeout: Duration,
}

impl Pools {
    /// A pool for `target`; `with_database` false connects without a default
    /// database (migrate, which creates it).
    pub(super) fn new(target: &MysqlTarget, with_database: bool) -> StoreResult<Arc<Pools>> {
        if target.hosts.is_empty() {
            return Err(StoreError::Internal(
                "no MySQL/MariaDB host configured".into(),
            ));
        }
        let size = target.pool_size.max(1);
        // Several hosts must fit in one acquire timeout when the first ones are dead.
        let per_host = target.acquire_timeout.mul_f64(0.75) / target.hosts.len() as u32;
        let hosts = Hosts {
            hosts: target.hosts.clone(),
            user: target.user.clone(),
            database: with_database.then(|| target.database.clone()),
            tls: target.tls.clone(),
            credentials: RwLock::new(Arc::new(Credentials {
                password: target.password.clone(),
                generation: 0,
            })),
            state: Mutex::new(HostState {
                preferred: 0,
                epoch: 0,
            }),
            connect_timeout: per_host.max(Duration::from_millis(200)),
            target: target.to_string(),
        };
        let pool = managed::Pool::builder(hosts)
            .max_size(size)
            .wait_timeout(Some(target.acquire_timeout))
            .create_timeout(Some(target.acquire_timeout))
            .recycle_timeout(Some(target.acquire_timeout))
            .runtime(deadpool::Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Internal(format!("cannot build the MySQL pool: {e}")))?;
        Ok(Arc::new(Pools {
            pool,
            size,
            acquire_timeout: target.acquire_timeout,
        }))
    }

    fn hosts(&self) -> &Hosts {
        self.pool.manager()
    }

    /// Watches the password file in `tasks`; stops when the pools are gone.
    pub(super) fn watch_password(self: &Arc<Self>, file: PathBuf, tasks: &Tasks) {
        crate::background::watch_password(
            self,
            file,
            tasks,
            |pools: Arc<Pools>, password| async move { pools.rotate(password).await },
        );
    }

    /// Switches to `password` once a connection with it succeeds; until then
    /// the old one keeps serving. Connections made with the old password are
    /// closed as their calls finish.
    pub(super) async fn rotate(&self, password: String) -> bool {
        let hosts = self.hosts();
        let host = hosts.state().preferred;
        if let Err(e) = hosts.dial(host, Some(&password)).await {
            warn!(
                target_db = %hosts.target,
                error = %e,
                "the rotated database password does not work yet; the previous connections keep serving"
            );
            return false;
        }
        let mut credentials = hosts.credentials.write().unwrap_or_else(|e| e.into_inner());
        *credentials = Arc::new(Credentials {
            password: Some(password),
            generation: credentials.generation + 1,
        });
        info!(
            target_db = %hosts.target,
            "database password rotated: new connections use it, the old ones retire as their calls finish"
        );
        true
    }

    /// Creates `database` when it does not exist (development, auto_create),
    /// through a connection without a default database. Errors are left to
    /// the connection attempts that follow, which report them.
    pub(super) async fn ensure_database(&self, database: &str) {
        let hosts = self.hosts();
        let host = hosts.state().preferred;
        let mut opts = OptsBuilder::from_opts(hosts.current_opts(host));
        opts = opts.db_name(None::<String>);
        let Ok(Ok(mut conn)) =
            tokio::time::timeout(hosts.connect_timeout, mysql_async::Conn::new(opts)).await
        else {
            return;
        };
        let exists: Result<Option<String>, _> = conn
            .exec_first(
                "SELECT SCHEMA_NAME FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = ?",
                (database,),
            )
            .await;
        if let Ok(None) = exists {
            let sql = format!("CREATE DATABASE IF NOT EXISTS `{database}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin");
            match conn.query_drop(sql).await {
                Ok(()) => info!(database, "created the MySQL/MariaDB database"),
                Err(e) => debug!(database, error = %describe(&e), "cannot create the database"),
            }
        }
        let _ = conn.disconnect().await;
    }

    /// A pooled connection within the acquire timeout, or UNAVAILABLE.
    pub(super) async fn acquire(&self) -> StoreResult<Conn> {
        let started = Instant::now();
        // A span of its own when the call is traced: pool saturation shows in traces.
        let wait = tokio::time::timeout(self.acquire_timeout, self.pool.get());
        let acquired =
            tracing::Instrument::instrument(wait, crate::telemetry::pool_wait_span()).await;
        metrics::pool_acquired(started);
        match acquired {
            Ok(Ok(object)) => Ok(Conn(Some(object))),
            Ok(Err(PoolError::Backend(e))) => Err(e),
            Ok(Err(PoolError::Timeout(managed::TimeoutType::Create))) => {
                Err(StoreError::unavailable(format!(
                    "no MySQL/MariaDB host of {} accepted a connection within {:?}; retry",
                    self.hosts().target,
                    self.acquire_timeout
                )))
            }
            Ok(Err(PoolError::Closed)) => Err(StoreError::shutting_down(
                "the MySQL/MariaDB store is closed (shutting down)",
            )),
            Ok(Err(e @ (PoolError::NoRuntimeSpecified | PoolError::PostCreateHook(_)))) => {
                Err(StoreError::Internal(format!("MySQL pool: {e:?}")))
            }
            Ok(Err(PoolError::Timeout(_))) | Err(_) => Err(StoreError::pool_exhausted(format!(
                "no MySQL/MariaDB connection became free within {:?} (pool size {}); retry, or raise DB_POOL_SIZE or DB_ACQUIRE_TIMEOUT",
                self.acquire_timeout, self.size
            ))),
        }
    }

    pub(super) fn stats(&self) -> PoolStats {
        self.pool.status().into()
    }

    pub(super) fn close(&self) {
        self.pool.close();
    }
}

/// A pooled connection. Give it back with [`Conn::done`]; dropped before
/// that (the client's deadline passed mid-call), it leaves the pool and is
/// killed on the server (`KILL`), which ends its statement and rolls back its
/// transaction, so no lock outlives the call.
pub(super) struct Conn(Option<Object<Hosts>>);

impl Conn {
    fn session(&mut self) -> &mut Session {
        // Present from acquire until `done` consumes the guard or it drops.
        self.0.as_mut().expect("a connection until done")
    }

    pub(super) fn conn(&mut self) -> &mut mysql_async::Conn {
        &mut self.session().conn
    }

    /// Reads must wait for the node to apply what the cluster committed: a
    /// MariaDB Galera node (where `SET STATEMENT wsrep_sync_wait` exists).
    pub(super) fn sync_reads(&mut self) -> bool {
        let session = self.session();
        session.galera && session.mariadb
    }

    pub(super) fn mariadb(&mut self) -> bool {
        self.session().mariadb
    }

    /// The call is over: the connection goes back to the pool, unless `result`
    /// says it broke or its host cannot serve, in which case it is closed and
    /// the pool moves on (see [`Hosts::host_failed`]).
    pub(super) fn done<T>(mut self, result: &Result<T, OpError>) {
        let Some(object) = self.0.take() else {
            return;
        };
        match result {
            Err(e) if e.is_host_trouble() => {
                if let Some(pool) = Object::pool(&object) {
                    pool.manager()
                        .host_failed(object.epoch, object.host, &e.to_string());
                }
                drop(Object::take(object));
            }
            _ => drop(object),
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let Some(object) = self.0.take() else {
            return;
        };
        let Some(pool) = Object::pool(&object) else {
            return;
        };
        let session = Object::take(object);
        let id = session.conn.id();
        let opts = pool.manager().current_opts(session.host);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        // Abandoned mid-call: its statement may still run (or wait for a
        // lock) on the server. A side connection kills it; the connection
        // itself is closed.
        runtime.spawn(async move {
            let killed = async {
                let mut side = mysql_async::Conn::new(opts).await?;
                side.query_drop(format!("KILL {id}")).await?;
                side.disconnect().await
            };
            match tokio::time::timeout(Duration::from_secs(5), killed).await {
                Ok(Ok(())) => debug!(connection = id, "killed the connection of an abandoned call"),
                Ok(Err(e)) => debug!(connection = id, error = %describe(&e), "could not kill the connection of an abandoned call"),
                Err(_) => debug!(connection = id, "could not kill the connection of an abandoned call in time"),
            }
            drop(session);
        });
    }
}
