//! Start-up, wiring and shutdown: the one place that knows every part.

use crate::admin::{self, Lifecycle};
use crate::api::{DocumentApi, Limits};
use crate::auth::{AuthError, AuthLayer, Authenticator};
use crate::config::{ConfigError, Database, DbArgs, ListenAddr, ServeArgs};
use crate::deadline::DeadlineLayer;
use crate::policy::{ClientSpec, Policy, PolicyError, Scope};
use crate::proto::document_service_server::{DocumentServiceServer, SERVICE_NAME};
use crate::store::{DocumentStore, MemoryStore, PgOptions, PostgresStore, SqliteStore, StoreError};
use crate::telemetry::RequestLogLayer;
use crate::tls::{TlsError, TlsFiles, TlsReloader};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tokio_stream::StreamExt;
use tonic::transport::server::Router;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;
use tower::layer::util::{Identity, Stack};
use tracing::{info, warn};

/// Why the sidecar could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot open the store: {0}")]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot reach the sidecar: {0}")]
    Client(String),
}

/// How a stop was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGTERM from Kubernetes: not ready at once, new calls still served for the
    /// shutdown delay (endpoints take a moment to forget the pod), then drain.
    Graceful,
    /// SIGINT (a person at a terminal) or an admin request: drain at once.
    Immediate,
}

/// Serves until SIGTERM or SIGINT.
pub async fn serve(args: ServeArgs) -> Result<(), StartError> {
    Server::bind(args).await?.run_until(shutdown_signal()).await
}

/// Resolves when SIGTERM (Kubernetes' graceful stop) or SIGINT (Ctrl-C) arrives.
pub async fn shutdown_signal() -> Stop {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops the server");
            let _ = tokio::signal::ctrl_c().await;
            return Stop::Immediate;
        }
    };
    tokio::select! {
        _ = term.recv() => {
            info!("SIGTERM received");
            Stop::Graceful
        }
        _ = tokio::signal::ctrl_c() => {
            info!("SIGINT received");
            Stop::Immediate
        }
    }
}

fn default_pool_size() -> usize {
    2 * std::thread::available_parallelism().map_or(1, |n| n.get()) + 1
}

/// Opens the configured store, applying its schema migrations.
pub async fn open_store(
    db: &DbArgs,
    schema: &str,
    auto_create: bool,
) -> Result<Arc<dyn DocumentStore>, StartError> {
    let database = db.database()?;
    info!(database = ?database, "opening store");
    let pool_size = db.db_pool_size.unwrap_or_else(default_pool_size).max(1);
    Ok(match database {
        Database::Memory => Arc::new(MemoryStore::new()),
        Database::Sqlite(target) => {
            Arc::new(SqliteStore::open(&target, pool_size, db.db_acquire_timeout).await?)
        }
        Database::Postgres(cfg) => {
            let options = PgOptions {
                schema: schema.to_string(),
                pool_size,
                acquire_timeout: db.db_acquire_timeout,
                max_retries: db.db_max_retries,
                retry_delay: db.db_retry_delay,
                auto_create,
                // A URL's own password is fixed; a mounted password file may rotate.
                password_file: db
                    .db_pass
                    .is_none()
                    .then(|| db.db_pass_file.clone())
                    .flatten(),
            };
            Arc::new(PostgresStore::connect(*cfg, options).await?)
        }
    })
}

enum Listener {
    Tcp(TcpListener),
    Tls(TcpListener, Arc<TlsReloader>),
    Unix(UnixListener, PathBuf),
}

/// The admin listener's address, its task, and the sender that stops it.
type AdminListener = (
    SocketAddr,
    tokio::task::JoinHandle<()>,
    tokio::sync::oneshot::Sender<()>,
);

/// A sidecar with its store open and its socket bound, ready to serve.
pub struct Server {
    listener: Listener,
    store: Arc<dyn DocumentStore>,
    auth: Arc<Authenticator>,
    scope: Scope,
    lifecycle: Arc<Lifecycle>,
    admin: Option<AdminListener>,
    args: ServeArgs,
}

/// The policy (if any), and what follows from it.
pub fn load_policy(path: Option<&std::path::Path>) -> Result<Option<Policy>, PolicyError> {
    let Some(path) = path else {
        warn!("no policy (DOCSIDECAR_POLICY): running open, every collection readable and writable; development only");
        return Ok(None);
    };
    let policy = Policy::load(path)?;
    info!(
        service = %policy.service,
        collections = policy.collections.len(),
        clients = policy.clients.len(),
        auto_create = policy.auto_create,
        "policy loaded"
    );
    Ok(Some(policy))
}

impl Server {
    /// Binds the listener and opens the store. `--listen 127.0.0.1:0` picks a free port.
    pub async fn bind(args: ServeArgs) -> Result<Server, StartError> {
        let policy = load_policy(args.common.policy.as_deref())?;
        let scope = policy.as_ref().map_or_else(Scope::open, Policy::scope);
        let mut clients = policy
            .as_ref()
            .map(|p| p.clients.clone())
            .unwrap_or_default();
        if let Some(token_file) = &args.token_file {
            clients.push(ClientSpec {
                token_file: token_file.clone(),
                scope: scope.clone(),
            });
        }
        let auth = Arc::new(Authenticator::new(clients, scope.clone())?);
        if !auth.enabled() {
            warn!("no client tokens configured: calls are not authenticated; listen on a Unix socket or loopback only");
        }
        let mut listener = bind(&args.listen).await?;
        if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
            let Listener::Tcp(tcp) = listener else {
                return Err(ConfigError::Invalid(
                    "TLS applies to TCP listeners; a Unix socket is already private to the pod"
                        .into(),
                )
                .into());
            };
            let tls = TlsReloader::new(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: args.tls_client_ca.clone(),
            })?;
            info!(mutual = tls.mutual(), "TLS enabled on the gRPC port");
            listener = Listener::Tls(tcp, Arc::new(tls));
        }
        // The admin listener comes up before the store, so that the startup
        // probe has an answer while the database is awaited.
        let lifecycle = Lifecycle::new();
        let admin = match &args.admin_listen {
            Some(addr) => {
                let l = TcpListener::bind(addr.as_str()).await.map_err(|source| {
                    StartError::Listen {
                        addr: addr.clone(),
                        source,
                    }
                })?;
                let local = l.local_addr().map_err(|source| StartError::Listen {
                    addr: addr.clone(),
                    source,
                })?;
                info!(admin = %local, "admin listener up");
                // Metrics are recorded only when something can scrape them.
                admin::prometheus();
                let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
                let task = tokio::spawn(admin::serve(l, lifecycle.clone(), async {
                    let _ = stopped.await;
                }));
                Some((local, task, stop))
            }
            None => None,
        };
        let db: DbArgs = args.db.clone().into();
        // Without a policy (development) tables appear on first write; with one,
        // only if the policy says so.
        let auto_create = policy.as_ref().is_none_or(|p| p.auto_create);
        let store = open_store(&db, &args.common.schema, auto_create).await?;
        lifecycle.set_store(store.clone());
        Ok(Server {
            listener,
            store,
            auth,
            scope,
            lifecycle,
            admin,
            args,
        })
    }

    /// Pings the database and closes the store, for `docsidecar check`.
    pub async fn check(self) -> Result<(), StartError> {
        let result = self.store.ping().await;
        self.store.close().await;
        Ok(result?)
    }

    /// Where the admin listener listens, when there is one.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|(addr, _, _)| *addr)
    }

    /// Where the server listens (the real port when 0 was asked for).
    pub fn local_addr(&self) -> ListenAddr {
        match &self.listener {
            Listener::Tcp(l) | Listener::Tls(l, _) => ListenAddr::Tcp(l.local_addr().map_or_else(
                |_| self.args.listen.to_string(),
                |a: SocketAddr| a.to_string(),
            )),
            Listener::Unix(_, path) => ListenAddr::Unix(path.clone()),
        }
    }

    /// Serves until `shutdown` resolves (or the admin endpoint asks), then stops
    /// as [`Stop`] says: drains in-flight calls for at most the grace period and
    /// closes the store.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = Stop> + Send + 'static,
    ) -> Result<(), StartError> {
        let Server {
            listener,
            store,
            auth,
            scope,
            lifecycle,
            admin,
            args,
        } = self;
        let token_watcher = tokio::spawn(auth.clone().watch(crate::auth::RELOAD_EVERY));
        let (reporter, health_service) = tonic_health::server::health_reporter();
        set_health(&reporter, ServingStatus::Serving).await;
        let watcher = tokio::spawn(watch_health(
            store.clone(),
            reporter.clone(),
            lifecycle.clone(),
            args.health_interval,
        ));

        let api = DocumentApi::new(
            store.clone(),
            Limits {
                max_document_bytes: args.max_document_bytes,
            },
            scope,
        );
        let documents = DocumentServiceServer::new(api)
            .max_decoding_message_size(args.max_message_bytes)
            .max_encoding_message_size(usize::MAX);
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        // Turns true when the grace period is over; see `deadline.rs`.
        let (abandon_tx, abandon_rx) = tokio::sync::watch::channel(false);
        let router = tonic::transport::Server::builder()
            .layer(RequestLogLayer)
            .layer(AuthLayer::new(auth))
            .layer(DeadlineLayer::new(abandon_rx))
            .add_service(health_service)
            .add_service(reflection().build_v1()?)
            .add_service(reflection().build_v1alpha()?)
            .add_service(documents);

        let (draining_tx, draining_rx) = tokio::sync::oneshot::channel();
        let drain_reporter = reporter.clone();
        let stop_watcher = watcher.abort_handle();
        let drain_lifecycle = lifecycle.clone();
        let delay = args.shutdown_delay;
        let signal = async move {
            let stop = tokio::select! {
                stop = shutdown => stop,
                _ = drain_lifecycle.stop_requested() => Stop::Immediate,
            };
            // Not ready from now on, whatever the database says.
            stop_watcher.abort();
            drain_lifecycle.set_draining();
            set_health(&drain_reporter, ServingStatus::NotServing).await;
            if stop == Stop::Graceful && !delay.is_zero() {
                info!(
                    delay_secs = delay.as_secs_f64(),
                    "shutting down: not ready; still serving new calls while endpoints update"
                );
                tokio::time::sleep(delay).await;
            }
            info!("shutting down: no new connections, draining in-flight calls");
            let _ = draining_tx.send(());
        };

        let local = match &listener {
            Listener::Tcp(l) | Listener::Tls(l, _) => {
                l.local_addr().map(|a| a.to_string()).unwrap_or_default()
            }
            Listener::Unix(_, path) => format!("unix:{}", path.display()),
        };
        metrics::gauge!("docsidecar_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
        lifecycle.set_started();
        info!(listen = %local, "serving docsidecar.v1.DocumentService");
        let result = match listener {
            Listener::Tcp(l) => {
                // Small request/response pairs: do not let Nagle delay them.
                let incoming = TcpListenerStream::new(l).map(|s| {
                    s.inspect(|s| {
                        let _ = s.set_nodelay(true);
                    })
                });
                drain(
                    router,
                    incoming,
                    signal,
                    draining_rx,
                    args.shutdown_grace,
                    abandon_tx,
                )
                .await
            }
            Listener::Tls(l, tls) => {
                drain(
                    router,
                    tls.incoming(l),
                    signal,
                    draining_rx,
                    args.shutdown_grace,
                    abandon_tx,
                )
                .await
            }
            Listener::Unix(l, path) => {
                let result = drain(
                    router,
                    UnixListenerStream::new(l),
                    signal,
                    draining_rx,
                    args.shutdown_grace,
                    abandon_tx,
                )
                .await;
                let _ = std::fs::remove_file(&path);
                result
            }
        };
        watcher.abort();
        token_watcher.abort();
        store.close().await;
        if let Some((_, task, stop)) = admin {
            let _ = stop.send(());
            let _ = task.await;
        }
        info!("stopped");
        result
    }
}

/// The request path, outermost first: log, authenticate, enforce the deadline.
type Layers = Stack<DeadlineLayer, Stack<AuthLayer, Stack<RequestLogLayer, Identity>>>;

/// Serves until the signal, then waits at most `grace` for in-flight calls.
async fn drain<I, IO, E>(
    router: Router<Layers>,
    incoming: I,
    signal: impl Future<Output = ()> + Send + 'static,
    draining: tokio::sync::oneshot::Receiver<()>,
    grace: Duration,
    abandon: tokio::sync::watch::Sender<bool>,
) -> Result<(), StartError>
where
    I: tokio_stream::Stream<Item = Result<IO, E>> + Send + 'static,
    IO: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static,
    IO::ConnectInfo: Clone + Send + Sync + 'static,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let serve = router.serve_with_incoming_shutdown(incoming, signal);
    tokio::pin!(serve);
    tokio::select! {
        biased;
        result = &mut serve => Ok(result?),
        _ = draining => match tokio::time::timeout(grace, &mut serve).await {
            Ok(result) => Ok(result?),
            Err(_) => {
                warn!(grace_secs = grace.as_secs_f64(), "grace period over: abandoning calls still in flight (UNAVAILABLE)");
                let _ = abandon.send(true);
                // A moment for those answers to reach their callers.
                let _ = tokio::time::timeout(Duration::from_secs(1), &mut serve).await;
                Ok(())
            }
        },
    }
}

async fn bind(addr: &ListenAddr) -> Result<Listener, StartError> {
    let err = |source| StartError::Listen {
        addr: addr.to_string(),
        source,
    };
    match addr {
        ListenAddr::Tcp(a) => Ok(Listener::Tcp(
            TcpListener::bind(a.as_str()).await.map_err(err)?,
        )),
        ListenAddr::Unix(path) => {
            // A socket file left by a previous run would make bind fail.
            if let Ok(meta) = std::fs::symlink_metadata(path) {
                use std::os::unix::fs::FileTypeExt;
                if meta.file_type().is_socket() {
                    let _ = std::fs::remove_file(path);
                }
            }
            Ok(Listener::Unix(
                UnixListener::bind(path).map_err(err)?,
                path.clone(),
            ))
        }
    }
}

async fn set_health(reporter: &HealthReporter, status: ServingStatus) {
    reporter.set_service_status("", status).await;
    reporter.set_service_status(SERVICE_NAME, status).await;
}

/// Keeps the health service in step with the store: NOT_SERVING while the
/// database does not answer.
async fn watch_health(
    store: Arc<dyn DocumentStore>,
    reporter: HealthReporter,
    lifecycle: Arc<Lifecycle>,
    every: Duration,
) {
    let mut serving = true;
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let ok = match tokio::time::timeout(every.max(Duration::from_secs(1)), store.ping()).await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                if serving {
                    warn!(error = %e, "database unreachable: health is NOT_SERVING");
                }
                false
            }
            Err(_) => {
                if serving {
                    warn!("database did not answer a ping in time: health is NOT_SERVING");
                }
                false
            }
        };
        if ok != serving {
            if ok {
                info!("database reachable again: health is SERVING");
            }
            serving = ok;
            lifecycle.set_database_ok(ok);
            let status = if ok {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            set_health(&reporter, status).await;
        }
    }
}
