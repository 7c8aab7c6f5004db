//! Every metric the sidecar exports, declared once: the name, and the one
//! function that records it. Exported by the admin listener in Prometheus'
//! text format (see `admin`).

use crate::store::PoolStats;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Instant;

pub const REQUESTS_TOTAL: &str = "docsidecar_requests_total";
pub const REQUEST_DURATION_SECONDS: &str = "docsidecar_request_duration_seconds";
/// The gRPC server metrics under the names go-grpc-prometheus gave them,
/// which dashboards and deploy/monitoring/ expect; labelled with the policy's
/// service, the collection (bounded) and the client where tokens are on.
pub const GRPC_SERVER_STARTED_TOTAL: &str = "grpc_server_started_total";
pub const GRPC_SERVER_HANDLED_TOTAL: &str = "grpc_server_handled_total";
pub const GRPC_SERVER_HANDLING_SECONDS: &str = "grpc_server_handling_seconds";
pub const REQUESTS_IN_FLIGHT: &str = "docsidecar_requests_in_flight";
pub const POOL_ACQUIRE_SECONDS: &str = "docsidecar_pool_acquire_seconds";
pub const POOL_CONNECTIONS_MAX: &str = "docsidecar_pool_connections_max";
pub const POOL_CONNECTIONS_OPEN: &str = "docsidecar_pool_connections_open";
pub const POOL_CONNECTIONS_IDLE: &str = "docsidecar_pool_connections_idle";
pub const POOL_WAITING: &str = "docsidecar_pool_waiting";
pub const DATABASE_ERRORS_TOTAL: &str = "docsidecar_database_errors_total";
pub const DOCUMENTS_WRITTEN_TOTAL: &str = "docsidecar_documents_written_total";
pub const DOCUMENTS_DELETED_TOTAL: &str = "docsidecar_documents_deleted_total";
pub const DATABASE_FAILOVERS_TOTAL: &str = "docsidecar_database_failovers_total";
pub const TRANSACTION_RETRIES_TOTAL: &str = "docsidecar_transaction_retries_total";
pub const DOCUMENTS_EXPIRED_TOTAL: &str = "docsidecar_documents_expired_total";
pub const BUILD_INFO: &str = "docsidecar_build_info";
pub const POOL_ACQUIRE_TIMEOUTS_TOTAL: &str = "docsidecar_pool_acquire_timeouts_total";
pub const HEALTH_CHECKS_TOTAL: &str = "docsidecar_health_checks_total";
pub const DATABASE_UP: &str = "docsidecar_database_up";
pub const TLS_HANDSHAKE_FAILURES_TOTAL: &str = "docsidecar_tls_handshake_failures_total";
pub const TLS_CERTIFICATE_EXPIRY: &str = "docsidecar_tls_certificate_expiry_timestamp_seconds";
pub const CONNECTIONS_OPEN: &str = "docsidecar_connections_open";
pub const CONNECTIONS_REJECTED_TOTAL: &str = "docsidecar_connections_rejected_total";
pub const CONNECTIONS_CLOSED_IDLE_TOTAL: &str = "docsidecar_connections_closed_idle_total";
pub const ACCEPT_ERRORS_TOTAL: &str = "docsidecar_accept_errors_total";
pub const MALFORMED_DOCUMENTS_TOTAL: &str = "docsidecar_malformed_documents_total";
pub const WATCH_STREAMS_OPEN: &str = "docsidecar_watch_streams_open";
pub const WATCH_EVENTS_SENT_TOTAL: &str = "docsidecar_watch_events_sent_total";
pub const WATCH_LAG_SECONDS: &str = "docsidecar_watch_lag_seconds";
pub const WATCH_STREAMS_ENDED_TOTAL: &str = "docsidecar_watch_streams_ended_total";

/// A label value shared between calls without copying (the service, a
/// client's name, a collection).
pub type SharedLabel = metrics::SharedString;

/// The label given to collections past the bound, and to names that are not
/// collections.
pub const OTHER_COLLECTION: &str = "other";

/// Without a policy, at most this many collections get their own label; the
/// rest are counted as [`OTHER_COLLECTION`], so a client cannot grow the
/// series without bound.
pub const MAX_COLLECTION_LABELS: usize = 50;

/// The bounded values of the `collection` label.
#[derive(Debug)]
pub enum CollectionLabels {
    /// The policy's collections: nothing else exists for callers.
    Declared(BTreeMap<String, SharedLabel>),
    /// No policy: the first [`MAX_COLLECTION_LABELS`] valid names seen.
    Open(RwLock<HashMap<String, SharedLabel>>),
}

impl CollectionLabels {
    pub fn declared<'a>(names: impl IntoIterator<Item = &'a String>) -> CollectionLabels {
        CollectionLabels::Declared(
            names
                .into_iter()
                .map(|n| (n.clone(), SharedLabel::from(Arc::<str>::from(n.as_str()))))
                .collect(),
        )
    }

    pub fn open() -> CollectionLabels {
        CollectionLabels::Open(RwLock::new(HashMap::new()))
    }

    /// The label of `collection`: its own name while the bound allows, else
    /// [`OTHER_COLLECTION`].
    pub fn label(&self, collection: &str) -> SharedLabel {
        let other = || SharedLabel::const_str(OTHER_COLLECTION);
        match self {
            CollectionLabels::Declared(names) => {
                names.get(collection).cloned().unwrap_or_else(other)
            }
            CollectionLabels::Open(seen) => {
                if let Some(label) = seen
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(collection)
                {
                    return label.clone();
                }
                if !crate::store::is_valid_name(collection) {
                    return other();
                }
                let mut seen = seen.write().unwrap_or_else(|e| e.into_inner());
                if let Some(label) = seen.get(collection) {
                    return label.clone();
                }
                if seen.len() >= MAX_COLLECTION_LABELS {
                    return other();
                }
                let label = SharedLabel::from(Arc::<str>::from(collection));
                seen.insert(collection.to_string(), label.clone());
                label
            }
        }
    }
}

/// The labels of one call. The service, collection and client are left out
/// when there is none (no policy; a call that names no collection; no client
/// tokens). Every value is bounded.
#[derive(Debug, Clone, Copy)]
pub struct RequestLabels<'a> {
    /// `docsidecar.v1.DocumentService`, the health or reflection service, or `other`.
    pub grpc_service: &'static str,
    pub method: &'static str,
    /// unary, server_stream or bidi_stream.
    pub grpc_type: &'static str,
    pub service: Option<&'a SharedLabel>,
    pub collection: Option<&'a SharedLabel>,
    pub client: Option<&'a SharedLabel>,
}

impl RequestLabels<'_> {
    fn grpc(&self) -> Vec<metrics::Label> {
        let mut labels = Vec::with_capacity(7);
        labels.push(metrics::Label::from_static_parts(
            "grpc_service",
            self.grpc_service,
        ));
        labels.push(metrics::Label::from_static_parts(
            "grpc_method",
            self.method,
        ));
        labels.push(metrics::Label::from_static_parts(
            "grpc_type",
            self.grpc_type,
        ));
        let optional = [
            ("service", self.service),
            ("collection", self.collection),
            ("client", self.client),
        ];
        for (key, value) in optional {
            if let Some(value) = value {
                labels.push(metrics::Label::new(key, value.clone()));
            }
        }
        labels
    }
}

/// A call began; labelled as go-grpc-prometheus does (the collection and
/// client are not known yet).
pub fn request_started(labels: RequestLabels<'_>) {
    let labels = RequestLabels {
        service: None,
        collection: None,
        client: None,
        ..labels
    };
    metrics::counter!(GRPC_SERVER_STARTED_TOTAL, labels.grpc()).increment(1);
}

/// One finished call: its labels, status and latency.
pub fn request(labels: RequestLabels<'_>, code: &'static str, seconds: f64) {
    metrics::histogram!(REQUEST_DURATION_SECONDS, "method" => labels.method).record(seconds);
    metrics::counter!(REQUESTS_TOTAL, "method" => labels.method, "code" => code).increment(1);
    let mut grpc = labels.grpc();
    metrics::histogram!(GRPC_SERVER_HANDLING_SECONDS, grpc.clone()).record(seconds);
    grpc.push(metrics::Label::from_static_parts("grpc_code", code));
    metrics::counter!(GRPC_SERVER_HANDLED_TOTAL, grpc).increment(1);
}

/// Counts a call in flight for as long as it lives, even if it is dropped.
pub struct InFlight(());

impl InFlight {
    pub fn start() -> InFlight {
        metrics::gauge!(REQUESTS_IN_FLIGHT).increment(1.0);
        InFlight(())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::gauge!(REQUESTS_IN_FLIGHT).decrement(1.0);
    }
}

/// How long a call waited for a database connection.
pub fn pool_acquired(started: Instant) {
    metrics::histogram!(POOL_ACQUIRE_SECONDS).record(started.elapsed().as_secs_f64());
}

/// The pool's figures at scrape time.
pub fn pool(stats: PoolStats) {
    metrics::gauge!(POOL_CONNECTIONS_MAX).set(stats.max as f64);
    metrics::gauge!(POOL_CONNECTIONS_OPEN).set(stats.open as f64);
    metrics::gauge!(POOL_CONNECTIONS_IDLE).set(stats.idle as f64);
    metrics::gauge!(POOL_WAITING).set(stats.waiting as f64);
}

/// A failure of the database rather than of the request (`kind` is bounded:
/// unavailable, permission_denied, internal).
pub fn database_error(kind: &'static str) {
    metrics::counter!(DATABASE_ERRORS_TOTAL, "kind" => kind).increment(1);
}

/// Documents written and deleted by a successful call.
pub fn documents_changed(saved: u64, deleted: u64) {
    if saved > 0 {
        metrics::counter!(DOCUMENTS_WRITTEN_TOTAL).increment(saved);
    }
    if deleted > 0 {
        metrics::counter!(DOCUMENTS_DELETED_TOTAL).increment(deleted);
    }
}

/// New connections moved to another database host (the one that served
/// died, or stopped accepting writes).
pub fn database_failover() {
    metrics::counter!(DATABASE_FAILOVERS_TOTAL).increment(1);
}

/// A transaction re-run as a whole after losing to a concurrent one (a
/// deadlock, a Galera certification conflict, an insert race).
pub fn transaction_retried() {
    metrics::counter!(TRANSACTION_RETRIES_TOTAL).increment(1);
}

/// Expired documents the reaper deleted.
pub fn documents_expired(n: u64) {
    if n > 0 {
        metrics::counter!(DOCUMENTS_EXPIRED_TOTAL).increment(n);
    }
}

pub fn build_info() {
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

/// A call gave up waiting for a pooled connection: the pool is saturated.
pub fn pool_timeout() {
    metrics::counter!(POOL_ACQUIRE_TIMEOUTS_TOTAL).increment(1);
}

/// One readiness probe of the database (`result`: ok or failed), and whether
/// the database answered the last one.
pub fn health_check(ok: bool) {
    let result = if ok { "ok" } else { "failed" };
    metrics::counter!(HEALTH_CHECKS_TOTAL, "result" => result).increment(1);
    metrics::gauge!(DATABASE_UP).set(if ok { 1.0 } else { 0.0 });
}

/// A TLS handshake on the gRPC port failed (`reason` is bounded, see `tls`).
pub fn tls_handshake_failed(reason: &'static str) {
    metrics::counter!(TLS_HANDSHAKE_FAILURES_TOTAL, "reason" => reason).increment(1);
}

/// When the certificates in use expire (`certificate`: `server`, `client_ca`,
/// `database_ca`), in Unix seconds: the earliest `notAfter` among them.
pub fn tls_certificate_expiry(certificate: &'static str, not_after: i64) {
    metrics::gauge!(TLS_CERTIFICATE_EXPIRY, "certificate" => certificate).set(not_after as f64);
}

/// Counts an open client connection for as long as it lives.
pub struct OpenConnection(());

impl OpenConnection {
    pub fn start() -> OpenConnection {
        metrics::gauge!(CONNECTIONS_OPEN).increment(1.0);
        OpenConnection(())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        metrics::gauge!(CONNECTIONS_OPEN).decrement(1.0);
    }
}

/// A connection closed at once because the connection limit was reached.
pub fn connection_rejected() {
    metrics::counter!(CONNECTIONS_REJECTED_TOTAL).increment(1);
}

/// A connection closed because it carried no call for the idle timeout (or
/// never completed its handshake).
pub fn connection_closed_idle() {
    metrics::counter!(CONNECTIONS_CLOSED_IDLE_TOTAL).increment(1);
}

/// accept() failed (out of file descriptors, say); the loop backs off.
pub fn accept_error() {
    metrics::counter!(ACCEPT_ERRORS_TOTAL).increment(1);
}

/// A Watch stream opened (+1) or ended (-1).
pub fn watch_streams(delta: f64) {
    metrics::gauge!(WATCH_STREAMS_OPEN).increment(delta);
}

/// A change delivered to a watcher, `lag` seconds after its commit.
pub fn watch_event_sent(lag: f64) {
    metrics::counter!(WATCH_EVENTS_SENT_TOTAL).increment(1);
    metrics::gauge!(WATCH_LAG_SECONDS).set(lag.max(0.0));
}

/// Why a Watch stream ended (bounded: client_gone, too_slow, shutting_down,
/// error, rejected).
pub fn watch_ended(reason: &'static str) {
    metrics::counter!(WATCH_STREAMS_ENDED_TOTAL, "reason" => reason).increment(1);
}

/// A stored row that is not a JSON object, left out of a response.
pub fn malformed_document() {
    metrics::counter!(MALFORMED_DOCUMENTS_TOTAL).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_collections_are_the_only_collection_labels() {
        let names = ["orders".to_string(), "catalog".to_string()];
        let labels = CollectionLabels::declared(&names);
        assert_eq!(&*labels.label("orders"), "orders");
        assert_eq!(&*labels.label("catalog"), "catalog");
        assert_eq!(&*labels.label("undeclared"), OTHER_COLLECTION);
        assert_eq!(&*labels.label("Not a name!"), OTHER_COLLECTION);
    }

    #[test]
    fn without_a_policy_collections_past_the_cap_fold_into_other() {
        let labels = CollectionLabels::open();
        for i in 0..MAX_COLLECTION_LABELS {
            let name = format!("c{i}");
            assert_eq!(&*labels.label(&name), name);
        }
        assert_eq!(&*labels.label("one_too_many"), OTHER_COLLECTION);
        assert_eq!(
            &*labels.label("c0"),
            "c0",
            "names seen before keep their label"
        );
        assert_eq!(&*labels.label("c49"), "c49");
        let fresh = CollectionLabels::open();
        assert_eq!(
            &*fresh.label("bad name\n"),
            OTHER_COLLECTION,
            "what is not a collection name never takes a slot"
        );
        assert_eq!(&*fresh.label("notes"), "notes");
    }
}
