//! The request layer: every gRPC call gets one span (service, method,
//! collection; a child of the caller's trace when tracing is on), one log
//! event (code, latency) and its metrics.

use super::{code_name, otel, CallLabels, CALL};
use crate::metrics;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;
use tonic::Code;
use tower::{Layer, Service};
use tracing::{field, Instrument, Level, Span};

/// Success and a client's own cancellation are routine (debug), a caller's
/// mistake is worth a note (info), the sidecar's or the database's trouble is
/// a warning or an error.
fn level(code: Code) -> Level {
    match code {
        Code::Ok | Code::Cancelled => Level::DEBUG,
        Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted => Level::WARN,
        Code::Internal | Code::Unknown | Code::DataLoss | Code::Unimplemented => Level::ERROR,
        _ => Level::INFO,
    }
}

/// Reads the status of a gRPC response from its headers: errors of unary calls
/// come as trailers-only responses; no `grpc-status` header means the call is
/// streaming its answer, which for unary calls is success.
fn response_code<B>(response: &http::Response<B>) -> (Code, String) {
    let headers = response.headers();
    let code = headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(Code::Ok, Code::from_i32);
    let message = headers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .map(percent_decode)
        .unwrap_or_default();
    (code, message)
}

/// grpc-message is percent-encoded on the wire.
fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// What a call is, in bounded label values whatever paths clients send.
#[derive(Debug, Clone, Copy)]
struct Call {
    grpc_service: &'static str,
    method: &'static str,
    grpc_type: &'static str,
}

impl Call {
    fn of(grpc_service: &str, method: &str) -> Call {
        const SERVICES: &[&str] = &[
            "docsidecar.v1.DocumentService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ];
        const METHODS: &[&str] = &[
            "Get",
            "Save",
            "Update",
            "Delete",
            "List",
            "BatchGet",
            "Write",
            "Query",
            "Count",
            "ListCollections",
            "Check",
            "Watch",
            "ServerReflectionInfo",
        ];
        let known = |names: &[&'static str], name: &str| {
            names
                .iter()
                .find(|n| **n == name)
                .copied()
                .unwrap_or("other")
        };
        let method = known(METHODS, method);
        Call {
            grpc_service: known(SERVICES, grpc_service),
            method,
            grpc_type: match method {
                // DocumentService's and Health's.
                "Watch" => "server_stream",
                "ServerReflectionInfo" => "bidi_stream",
                _ => "unary",
            },
        }
    }

    fn labels<'a>(&self, service: Option<&'a metrics::SharedLabel>) -> metrics::RequestLabels<'a> {
        metrics::RequestLabels {
            grpc_service: self.grpc_service,
            method: self.method,
            grpc_type: self.grpc_type,
            service,
            collection: None,
            client: None,
        }
    }
}

/// Tower layer that logs, traces and measures every request; see [`RequestLog`].
#[derive(Debug, Clone)]
pub struct RequestLogLayer {
    /// The policy's `service`, a field of every call's span and a label of its metrics.
    service: Option<metrics::SharedLabel>,
    /// The bounded collection labels of the metrics.
    collections: Arc<metrics::CollectionLabels>,
}

impl RequestLogLayer {
    /// `service` names this sidecar's service (the policy's) in every call's
    /// span and metrics; `collections` bounds the collection label.
    pub fn new(service: Option<&str>, collections: metrics::CollectionLabels) -> RequestLogLayer {
        RequestLogLayer {
            service: service.map(|s| metrics::SharedLabel::from(Arc::<str>::from(s))),
            collections: Arc::new(collections),
        }
    }
}

impl<S> Layer<S> for RequestLogLayer {
    type Service = RequestLog<S>;

    fn layer(&self, inner: S) -> RequestLog<S> {
        RequestLog {
            inner,
            service: self.service.clone(),
            collections: self.collections.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RequestLog<S> {
    inner: S,
    service: Option<metrics::SharedLabel>,
    collections: Arc<metrics::CollectionLabels>,
}

/// One call's accounting: it logs and counts the call exactly once, when it
/// finishes or, if the call is dropped first (the client reset its stream
/// while the handler ran), when it is dropped, as CANCELLED.
struct Outcome {
    span: Span,
    call: Call,
    service: Option<metrics::SharedLabel>,
    labels: Arc<CallLabels>,
    start: Instant,
    recorded: bool,
    _in_flight: metrics::InFlight,
}

impl Outcome {
    fn record(&mut self, code: Code, detail: &str) {
        self.recorded = true;
        let elapsed = self.start.elapsed().as_secs_f64();
        let latency_ms = elapsed * 1000.0;
        let code_name = code_name(code);
        metrics::request(
            metrics::RequestLabels {
                collection: self.labels.collection.get(),
                client: self.labels.client.get(),
                ..self.call.labels(self.service.as_ref())
            },
            code_name,
            elapsed,
        );
        if otel::enabled() {
            otel::record_status(&self.span, code);
        }
        let _entered = self.span.enter();
        macro_rules! log {
            ($level:expr) => {
                if code == Code::Ok {
                    tracing::event!($level, code = code_name, latency_ms, "request")
                } else {
                    tracing::event!($level, code = code_name, latency_ms, detail = %detail, "request")
                }
            };
        }
        match level(code) {
            Level::DEBUG => log!(Level::DEBUG),
            Level::INFO => log!(Level::INFO),
            Level::WARN => log!(Level::WARN),
            _ => log!(Level::ERROR),
        }
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        if !self.recorded {
            self.record(
                Code::Cancelled,
                "the client cancelled the call (its stream was reset)",
            );
        }
    }
}

impl<S, B, RB> Service<http::Request<B>> for RequestLog<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: std::fmt::Display,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path();
        let method = path.rsplit('/').next().unwrap_or(path);
        // Recorded with the span: each field recorded later costs a formatting pass.
        let grpc_service = path
            .trim_start_matches('/')
            .split('/')
            .next()
            .unwrap_or_default();
        let span = if otel::enabled() {
            // The OpenTelemetry name and kind with the span, so that the logs never see them.
            let span = tracing::info_span!(
                "rpc",
                service = self.service.as_deref(),
                method,
                grpc_service,
                collection = field::Empty,
                trace_id = field::Empty,
                otel.name = format!("{grpc_service}/{method}"),
                otel.kind = "server",
            );
            otel::server_span(&span, request.headers(), grpc_service, method);
            span
        } else {
            tracing::info_span!(
                "rpc",
                service = self.service.as_deref(),
                method,
                grpc_service,
                collection = field::Empty
            )
        };
        let labels = Arc::new(CallLabels::new(self.collections.clone()));
        let call = Call::of(grpc_service, method);
        metrics::request_started(call.labels(self.service.as_ref()));
        let mut outcome = Outcome {
            span: span.clone(),
            call,
            service: self.service.clone(),
            labels: labels.clone(),
            start: Instant::now(),
            recorded: false,
            _in_flight: metrics::InFlight::start(),
        };
        // The auth layer names the client while the call is made, the
        // handler the collection while it runs.
        let future = {
            let _entered = span.enter();
            CALL.sync_scope(labels.clone(), || self.inner.call(request))
        };
        Box::pin(CALL.scope(labels, async move {
            let result = future.instrument(span).await;
            match &result {
                Ok(response) => {
                    let (code, detail) = response_code(response);
                    outcome.record(code, &detail);
                }
                Err(e) => {
                    outcome.recorded = true;
                    let _entered = outcome.span.enter();
                    tracing::error!(error = %e, "request failed in transport");
                }
            }
            result
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_grpc_messages() {
        assert_eq!(percent_decode("a%20b%3A%25"), "a b:%");
        assert_eq!(percent_decode("50%"), "50%");
        assert_eq!(percent_decode("%e2%82%ac"), "€");
    }
}
