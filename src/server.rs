//! Start-up, wiring and shutdown: the one place that knows every part.
//!
//! [`Server::bind`] opens everything that can fail (listener, TLS files,
//! tokens, the store) so that a misconfiguration stops start-up;
//! [`Server::run_until`] serves until asked to stop, then drains.

use crate::admin::{self, Lifecycle};
use crate::api::{DocumentApi, Indexes, Limits};
use crate::auth::{AuthError, AuthLayer, Authenticator};
use crate::background::Tasks;
use crate::config::{ConfigError, ListenAddr, ServeConfig};
use crate::deadline::DeadlineLayer;
use crate::limits::{ReadLimitLayer, RequestLimitsLayer};
use crate::policy::{ClientSpec, Permissions, PolicyError};
use crate::proto::document_service_server::{DocumentServiceServer, SERVICE_NAME};
use crate::store::{self, Clock, DocumentStore, StoreError};
use crate::telemetry::{self, RequestLogLayer, TracedStore};
use crate::tls::{TlsError, TlsReloader};
use crate::transport::{self, Listener};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tonic::body::Body;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;
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

impl From<crate::config::ResolveError> for StartError {
    fn from(e: crate::config::ResolveError) -> Self {
        match e {
            crate::config::ResolveError::Config(e) => StartError::Config(e),
            crate::config::ResolveError::Policy(e) => StartError::Policy(e),
        }
    }
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
pub async fn serve(config: ServeConfig) -> Result<(), StartError> {
    let served = Server::bind(config)
        .await?
        .run_until(shutdown_signal())
        .await;
    // The exporter's last batch; it blocks, and its calls need the runtime.
    let _ = tokio::task::spawn_blocking(telemetry::shutdown_tracing).await;
    served
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

/// A sidecar with its store open and its socket bound, ready to serve.
pub struct Server {
    listener: Listener,
    store: Arc<dyn DocumentStore>,
    auth: Arc<Authenticator>,
    permissions: Arc<Permissions>,
    lifecycle: Arc<Lifecycle>,
    admin_addr: Option<SocketAddr>,
    /// Every background task: watchers, health checks, the admin listener.
    tasks: Tasks,
    clock: Clock,
    config: ServeConfig,
}

impl Server {
    /// Binds the listener and opens the store. `--listen 127.0.0.1:0` picks a free port.
    pub async fn bind(config: ServeConfig) -> Result<Server, StartError> {
        if config.admin_listen.is_some() {
            // Metrics are recorded only when something can scrape them, and from
            // the start: loading certificates records their expiry.
            admin::prometheus();
        }
        let permissions = Arc::new(
            config
                .policy
                .as_ref()
                .map_or_else(Permissions::open, |p| p.permissions()),
        );
        let mut clients = config
            .policy
            .as_ref()
            .map(|p| p.clients.clone())
            .unwrap_or_default();
        if let Some(token_file) = &config.token_file {
            clients.push(ClientSpec {
                name: ClientSpec::name_of(token_file),
                token_file: token_file.clone(),
                permissions: permissions.clone(),
            });
        }
        let auth = Arc::new(Authenticator::new(clients, permissions.clone())?);
        if !auth.enabled() {
            warn!("no client tokens configured: calls are not authenticated; listen on a Unix socket or loopback only");
        }
        let mut listener =
            transport::bind(&config.listen)
                .await
                .map_err(|source| StartError::Listen {
                    addr: config.listen.to_string(),
                    source,
                })?;
        if let Some(files) = &config.tls {
            let tls = TlsReloader::new(files.clone())?;
            info!(mutual = tls.mutual(), "TLS enabled on the gRPC port");
            listener = listener.with_tls(Arc::new(tls)).map_err(|_| {
                ConfigError::Invalid(
                    "TLS applies to TCP listeners; a Unix socket is already private to the pod"
                        .into(),
                )
            })?;
        }
        let tasks = Tasks::new();
        // The admin listener comes up before the store, so that the startup
        // probe has an answer while the database is awaited.
        let lifecycle = Lifecycle::new();
        let admin_addr = match &config.admin_listen {
            Some(addr) => Some(start_admin(addr, &lifecycle, &tasks).await?),
            None => None,
        };
        let clock = Clock::default();
        let mut store = store::open(&config.target, &tasks, clock.clone()).await?;
        if telemetry::tracing_enabled() {
            store = Arc::new(TracedStore::new(store, db_system(&config.target)));
        }
        let stats = store.clone();
        lifecycle.set_pool_stats(Box::new(move || stats.pool_stats()));
        Ok(Server {
            listener,
            store,
            auth,
            permissions,
            lifecycle,
            admin_addr,
            tasks,
            clock,
            config,
        })
    }

    /// The stores' clock: tests move it to cross an expiry without waiting.
    pub fn clock(&self) -> Clock {
        self.clock.clone()
    }

    /// Pings the database and closes the store, for `docsidecar check`.
    pub async fn check(self) -> Result<(), StartError> {
        let result = self.store.ping().await;
        self.store.close().await;
        self.tasks.stop().await;
        Ok(result?)
    }

    /// Where the admin listener listens, when there is one.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Where the server listens (the real port when 0 was asked for).
    pub fn local_addr(&self) -> ListenAddr {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` resolves (or the admin endpoint asks), then stops
    /// as [`Stop`] says: drains in-flight calls for at most the grace period,
    /// stops the background tasks and closes the store.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = Stop> + Send + 'static,
    ) -> Result<(), StartError> {
        let Server {
            listener,
            store,
            auth,
            permissions,
            lifecycle,
            admin_addr: _,
            tasks,
            clock: _,
            config,
        } = self;
        tasks.spawn(auth.clone().watch());
        if let Listener::Tls(_, tls) = &listener {
            tasks.spawn(tls.clone().watch());
        }
        let (reporter, health_service) = tonic_health::server::health_reporter();
        set_health(&reporter, ServingStatus::Serving).await;
        tasks.spawn(watch_health(
            store.clone(),
            reporter.clone(),
            lifecycle.clone(),
            config.health_interval,
        ));

        tasks.spawn(crate::reaper::run(store.clone(), config.reaping));
        tasks.spawn(crate::reaper::prune_changes(
            store.clone(),
            config.change_retention,
        ));
        // Turns true when draining starts: Watch streams end at once.
        let (draining_tx, draining) = tokio::sync::watch::channel(false);

        let indexes = Indexes {
            declared: config.policy.as_ref().map(|p| p.indexes.clone()),
            allow_scans: config
                .policy
                .as_ref()
                .map(|p| p.allow_scans.clone())
                .unwrap_or_default(),
            logged: Default::default(),
        };
        let api = DocumentApi::new(
            store.clone(),
            Limits {
                max_document_bytes: config.max_document_bytes,
            },
            indexes,
            config.watch.clone(),
            draining,
            permissions,
        );
        let documents = DocumentServiceServer::new(api)
            .max_decoding_message_size(config.max_message_bytes)
            .max_encoding_message_size(usize::MAX);
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let routes = tonic::service::Routes::new(health_service)
            .add_service(reflection().build_v1()?)
            .add_service(reflection().build_v1alpha()?)
            .add_service(documents)
            .prepare();
        // Turns true when the grace period is over; see `deadline.rs`.
        let (abandon, abandoned) = tokio::sync::watch::channel(false);
        // The request path, outermost first: log, size limits, authenticate,
        // enforce the deadline, take a turn for a read of many documents.
        let service = tower::ServiceBuilder::new()
            .layer(RequestLogLayer::new(
                config.policy.as_ref().map(|p| p.service.as_str()),
                config
                    .policy
                    .as_ref()
                    .map_or_else(crate::metrics::CollectionLabels::open, |p| {
                        crate::metrics::CollectionLabels::declared(p.collections.keys())
                    }),
            ))
            .layer(RequestLimitsLayer::new(
                config.connections.max_header_bytes,
                config.max_message_bytes,
            ))
            .layer(AuthLayer::new(auth))
            .layer(DeadlineLayer::new(abandoned))
            .layer(ReadLimitLayer::new(config.max_concurrent_reads))
            .service(routes);

        let drain = Drain {
            draining: draining_tx,
            lifecycle: lifecycle.clone(),
            reporter,
            delay: config.shutdown_delay,
            grace: config.shutdown_grace,
            abandon,
        };
        crate::metrics::build_info();
        lifecycle.set_started();
        info!(listen = %listener.local_addr(), "serving docsidecar.v1.DocumentService");
        drain
            .serve(listener, service, config.connections.clone(), shutdown)
            .await;
        tasks.stop().await;
        store.close().await;
        info!("stopped");
        Ok(())
    }
}

/// The database as OpenTelemetry's `db.system` names it.
fn db_system(target: &store::Target) -> &'static str {
    match target {
        store::Target::Memory => "memory",
        store::Target::Sqlite(_) => "sqlite",
        store::Target::Postgres(_) => "postgresql",
        store::Target::Mysql(_) => "mysql",
    }
}

/// Binds the admin listener and serves it in `tasks`.
async fn start_admin(
    addr: &str,
    lifecycle: &Arc<Lifecycle>,
    tasks: &Tasks,
) -> Result<SocketAddr, StartError> {
    let err = |source| StartError::Listen {
        addr: addr.to_string(),
        source,
    };
    let listener = TcpListener::bind(addr).await.map_err(err)?;
    let local = listener.local_addr().map_err(err)?;
    info!(admin = %local, "admin listener up");
    tasks.spawn(admin::serve(
        listener,
        lifecycle.clone(),
        tasks.stopping().wait(),
    ));
    Ok(local)
}

/// How the server stops: not ready at once, new calls still served for the
/// shutdown delay (SIGTERM only), then in-flight calls get the grace period,
/// then those still running end UNAVAILABLE.
struct Drain {
    /// Ends the Watch streams (they would otherwise hold the drain).
    draining: tokio::sync::watch::Sender<bool>,
    lifecycle: Arc<Lifecycle>,
    reporter: HealthReporter,
    delay: Duration,
    grace: Duration,
    /// Ends the calls that outlive the grace period; see `deadline.rs`.
    abandon: tokio::sync::watch::Sender<bool>,
}

impl Drain {
    async fn serve<S>(
        self,
        listener: Listener,
        service: S,
        limits: transport::Limits,
        shutdown: impl Future<Output = Stop> + Send + 'static,
    ) where
        S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
    {
        let Drain {
            draining: watch_draining,
            lifecycle,
            reporter,
            delay,
            grace,
            abandon,
        } = self;
        let (draining_tx, draining) = tokio::sync::oneshot::channel();
        let signal = async move {
            let stop = tokio::select! {
                stop = shutdown => stop,
                () = lifecycle.stop_requested() => Stop::Immediate,
            };
            // Not ready from now on, whatever the database says.
            lifecycle.set_draining();
            watch_draining.send_replace(true);
            set_health(&reporter, ServingStatus::NotServing).await;
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
        let serve = transport::serve(listener, service, limits, signal);
        tokio::pin!(serve);
        tokio::select! {
            biased;
            () = &mut serve => {}
            _ = draining => {
                if tokio::time::timeout(grace, &mut serve).await.is_err() {
                    warn!(grace_secs = grace.as_secs_f64(), "grace period over: abandoning calls still in flight (UNAVAILABLE)");
                    let _ = abandon.send(true);
                    // A moment for those answers to reach their callers.
                    let _ = tokio::time::timeout(Duration::from_secs(1), &mut serve).await;
                }
            }
        }
    }
}

async fn set_health(reporter: &HealthReporter, status: ServingStatus) {
    reporter.set_service_status("", status).await;
    reporter.set_service_status(SERVICE_NAME, status).await;
}

/// Keeps the health service in step with the store: NOT_SERVING while the
/// database does not answer. Once draining, readiness belongs to the drain.
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
        crate::metrics::health_check(ok);
        if lifecycle.draining() {
            return;
        }
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
