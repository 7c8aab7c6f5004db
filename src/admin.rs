//! The HTTP admin listener for the kubelet and Prometheus: `/livez`, `/readyz`,
//! `/startupz`, `/metrics`, and `POST /shutdown` (from loopback only) for Jobs
//! whose main container has finished.

use crate::store::PoolStats;
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tracing::{info, warn};

/// Reads the connection pool's figures at scrape time.
pub type PoolStatsFn = Box<dyn Fn() -> PoolStats + Send + Sync>;

/// Where the sidecar is in its life; read by the probes, written by the server.
#[derive(Default)]
pub struct Lifecycle {
    /// The store's pool figures, once it is open (the admin listener starts
    /// before, to answer the startup probe).
    pool_stats: OnceLock<PoolStatsFn>,
    started: AtomicBool,
    database_ok: AtomicBool,
    draining: AtomicBool,
    stop_requested: Notify,
}

impl Lifecycle {
    pub fn new() -> Arc<Lifecycle> {
        Arc::new(Lifecycle::default())
    }

    pub fn set_pool_stats(&self, stats: PoolStatsFn) {
        let _ = self.pool_stats.set(stats);
    }

    /// The store is open and gRPC is being served.
    pub fn set_started(&self) {
        self.started.store(true, Ordering::SeqCst);
        self.database_ok.store(true, Ordering::SeqCst);
    }

    pub fn set_database_ok(&self, ok: bool) {
        self.database_ok.store(ok, Ordering::SeqCst);
    }

    /// Shutdown began: not ready any more.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub fn started(&self) -> bool {
        self.started.load(Ordering::SeqCst)
    }

    /// Why the sidecar should not get traffic, or `None` when it should.
    pub fn not_ready(&self) -> Option<&'static str> {
        if !self.started() {
            Some("starting")
        } else if self.draining() {
            Some("shutting down")
        } else if !self.database_ok.load(Ordering::SeqCst) {
            Some("database unreachable")
        } else {
            None
        }
    }

    /// Asks the server to stop, as SIGINT would (no delay).
    pub fn request_stop(&self) {
        self.stop_requested.notify_one();
    }

    /// Resolves once a stop was requested through the admin endpoint.
    pub async fn stop_requested(&self) {
        self.stop_requested.notified().await;
    }
}

/// The process-wide Prometheus recorder (metrics are global; installed once).
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            const LATENCY: &[f64] = &[
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 5.0, 10.0,
            ];
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY)
                .map(|b| b.build_recorder());
            match recorder {
                Ok(recorder) => {
                    let handle = recorder.handle();
                    if metrics::set_global_recorder(recorder).is_err() {
                        warn!("a metrics recorder was already installed; /metrics may be empty");
                    }
                    handle
                }
                Err(e) => {
                    warn!(error = %e, "metrics buckets rejected; using defaults");
                    PrometheusBuilder::new().build_recorder().handle()
                }
            }
        })
        .clone()
}

#[derive(Clone)]
struct AdminState {
    lifecycle: Arc<Lifecycle>,
    metrics: PrometheusHandle,
}

async fn livez() -> &'static str {
    // Answering at all is the proof: the runtime is not wedged.
    "ok\n"
}

async fn readyz(State(state): State<AdminState>) -> (StatusCode, &'static str) {
    match state.lifecycle.not_ready() {
        None => (StatusCode::OK, "ready\n"),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
    }
}

async fn startupz(State(state): State<AdminState>) -> (StatusCode, &'static str) {
    if state.lifecycle.started() {
        (StatusCode::OK, "started\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n")
    }
}

async fn metrics(
    State(state): State<AdminState>,
) -> ([(axum::http::HeaderName, &'static str); 1], String) {
    if let Some(stats) = state.lifecycle.pool_stats.get() {
        crate::metrics::pool(stats());
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        state.metrics.render(),
    )
}

async fn shutdown(
    State(state): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> (StatusCode, &'static str) {
    // The admin port may face the pod network; only the pod itself may stop us.
    if !peer.ip().is_loopback() {
        return (
            StatusCode::FORBIDDEN,
            "shutdown is accepted from loopback only\n",
        );
    }
    info!("shutdown requested through the admin endpoint");
    state.lifecycle.request_stop();
    (StatusCode::ACCEPTED, "shutting down\n")
}

/// Serves the admin endpoints until `stop` resolves.
pub async fn serve(
    listener: TcpListener,
    lifecycle: Arc<Lifecycle>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let state = AdminState {
        lifecycle,
        metrics: prometheus(),
    };
    let app = Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/startupz", get(startupz))
        .route("/metrics", get(metrics))
        .route("/shutdown", post(shutdown))
        .with_state(state);
    let service = app.into_make_service_with_connect_info::<SocketAddr>();
    if let Err(e) = axum::serve(listener, service)
        .with_graceful_shutdown(stop)
        .await
    {
        warn!(error = %e, "admin listener failed");
    }
}
