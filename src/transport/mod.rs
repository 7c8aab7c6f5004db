//! The gRPC port: binding the listener, accepting connections within a limit,
//! and serving HTTP/2 on each with bounded streams, keepalive pings, handshake
//! and idle timeouts; then a graceful drain.
//!
//! tonic's own `serve` has none of these limits and spins on accept errors
//! (EMFILE), so the sidecar drives hyper itself and hands it tonic's routes.
//!
//! - [`listener`]: binding TCP or a Unix socket (never taking over a live one);
//! - [`connection`]: one connection's life (TLS, timeouts, its calls).

mod connection;
pub mod listener;

pub use listener::{bind, ListenAddr, Listener};

use crate::metrics;
use crate::telemetry::RateLimited;
use connection::Connection;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tonic::body::Body;
use tracing::{debug, warn};

/// The connection limits of the gRPC port; every one is a setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once; more are closed as soon as accepted.
    pub max_connections: usize,
    /// HTTP/2 streams (calls) in flight on one connection.
    pub max_concurrent_streams: u32,
    /// How often each connection is pinged to find dead peers.
    pub keepalive_interval: Duration,
    /// How long a ping may go unanswered.
    pub keepalive_timeout: Duration,
    /// Time to finish the TLS handshake and send the HTTP/2 preface.
    pub handshake_timeout: Duration,
    /// Time a connection may stay open without a call in flight.
    pub idle_timeout: Duration,
    /// The request header budget (HTTP/2's header list size): above it a call is
    /// answered RESOURCE_EXHAUSTED, see [`crate::limits`].
    pub max_header_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            max_concurrent_streams: 100,
            keepalive_interval: Duration::from_secs(60),
            keepalive_timeout: Duration::from_secs(20),
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            max_header_bytes: 16 * 1024,
        }
    }
}

impl Limits {
    /// What HTTP/2 itself accepts: sixteen times the budget, so that headers
    /// over the budget still reach the sidecar, which answers them with a gRPC
    /// status. Above this the HTTP/2 library (h2) answers HTTP 431 itself, and a
    /// header block of more than about 1.25 times this in encoded frames, or
    /// four times this decoded, is abuse to it: it closes the connection.
    pub fn http2_header_list_size(&self) -> u32 {
        u32::try_from(self.max_header_bytes.saturating_mul(16)).unwrap_or(u32::MAX)
    }
}

/// The first pause after a failed accept (out of file descriptors, say), and
/// the longest: the loop must not spin a core while the condition lasts.
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(5), Duration::from_secs(1));

/// Serves `service` on every connection `listener` accepts until `stop`
/// resolves, then stops accepting (the socket closes), asks every connection to
/// finish (HTTP/2 GOAWAY: calls in flight complete, new ones go elsewhere) and
/// waits for them. Dropping the returned future closes what is left.
pub async fn serve<S>(
    listener: Listener,
    service: S,
    limits: Limits,
    stop: impl Future<Output = ()>,
) where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let limits = Arc::new(limits);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let (draining, drained) = watch::channel(false);
    let mut connections = JoinSet::new();
    let rejected_log = RateLimited::new(Duration::from_secs(10));
    let accept_log = RateLimited::new(Duration::from_secs(10));
    let mut backoff = ACCEPT_BACKOFF.0;
    tokio::pin!(stop);
    loop {
        // Reap finished connections so the set does not grow with them.
        while connections.try_join_next().is_some() {}
        let accepted = tokio::select! {
            biased;
            () = &mut stop => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok(stream) => {
                backoff = ACCEPT_BACKOFF.0;
                stream
            }
            // The client gave up before we accepted: nothing to wait for.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionAborted => continue,
            Err(e) => {
                metrics::accept_error();
                if let Some(suppressed) = accept_log.allow() {
                    warn!(error = %e, retry_in = ?backoff, suppressed, "accepting a connection failed (out of file descriptors?); backing off");
                }
                tokio::select! {
                    biased;
                    () = &mut stop => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF.1);
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            metrics::connection_rejected();
            if let Some(suppressed) = rejected_log.allow() {
                warn!(
                    peer = %stream.peer(),
                    max_connections = limits.max_connections,
                    suppressed,
                    "connection limit reached (DOCSIDECAR_MAX_CONNECTIONS): closing a new connection"
                );
            }
            continue;
        };
        let connection = Connection {
            stream,
            limits: limits.clone(),
            draining: drained.clone(),
            permit,
        };
        connections.spawn(connection.serve(service.clone()));
    }
    // Stop accepting now: the kernel refuses new connections from here on.
    drop(listener);
    let _ = draining.send(true);
    debug!(
        connections = connections.len(),
        "draining the open connections"
    );
    while connections.join_next().await.is_some() {}
}
