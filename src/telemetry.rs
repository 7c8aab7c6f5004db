//! Logging: subscriber set-up, a tower layer that gives every gRPC call one
//! span (service, method, collection) and one event (code, latency), and a
//! rate limit for lines that a client could make frequent.

use crate::metrics;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tonic::Code;
use tower::{Layer, Service};
use tracing::{field, Instrument, Level, Span};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::{FormatFields, Writer};
use tracing_subscriber::fmt::FormattedFields;
use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// For people.
    Text,
    /// For log collectors: one JSON object per line.
    Json,
}

/// Installs the global subscriber once; later calls (tests) are no-ops.
/// Levels come from `RUST_LOG` (default `info`). Lines go to stdout, in colour
/// only when stdout is a terminal and `NO_COLOR` is not set: a log collector
/// or a file gets no escape sequences.
pub fn init(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let colour = std::io::stdout().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_target(false);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .fmt_fields(JsonSpanFields)
            .try_init(),
    };
}

/// Span fields as one JSON object, byte for byte as tracing-subscriber's
/// `JsonFields` writes them, but cheaper, which matters because every request
/// opens a span: the object is serialized straight into a `String` (`JsonFields`
/// goes through an `io::Write` adaptor that checks UTF-8 chunk by chunk), and a
/// field recorded after the span was created (the collection, once the request is
/// decoded) is appended to the object (`JsonFields` parses the object and writes
/// it again). Events print the object through a `serde_json::Value`, so the log
/// lines are the same: keys sorted, a field recorded twice shows its last value.
/// Together these were about a sixth of the sidecar's instructions per Get
/// (callgrind, see BENCHMARKS.md).
#[derive(Debug, Default)]
struct JsonSpanFields;

/// Field values as `JsonFields`' visitor converts them.
#[derive(Default)]
struct FieldValues(std::collections::BTreeMap<&'static str, serde_json::Value>);

impl tracing::field::Visit for FieldValues {
    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        self.0.insert(field.name(), value.into());
    }

    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.0.insert(field.name(), value.into());
    }

    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.0.insert(field.name(), value.into());
    }

    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.0.insert(field.name(), value.into());
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name(), value.into());
    }

    fn record_bytes(&mut self, field: &tracing::field::Field, value: &[u8]) {
        self.0.insert(field.name(), value.into());
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
        match field.name() {
            // Log records bridged from the `log` crate: metadata, not fields.
            name if name.starts_with("log.") => {}
            name => {
                let name = name.strip_prefix("r#").unwrap_or(name);
                self.0.insert(name, format!("{value:?}").into());
            }
        }
    }
}

impl FieldValues {
    fn of(fields: impl RecordFields) -> FieldValues {
        let mut values = FieldValues::default();
        fields.record(&mut values);
        values
    }

    fn json(&self) -> Result<String, fmt::Error> {
        serde_json::to_string(&self.0).map_err(|_| fmt::Error)
    }
}

impl<'writer> FormatFields<'writer> for JsonSpanFields {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        writer.write_str(&FieldValues::of(fields).json()?)
    }

    fn add_fields(
        &self,
        current: &'writer mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        if current.fields.is_empty() {
            return self.format_fields(current.as_writer(), fields);
        }
        let added = FieldValues::of(fields);
        if added.0.is_empty() {
            return Ok(());
        }
        let added = added.json()?;
        let object = &mut current.fields;
        if object.pop() != Some('}') {
            return Err(fmt::Error);
        }
        if object.len() > 1 {
            object.push(',');
        }
        // `added` is `{…}`: its members join the object's.
        object.push_str(&added[1..]);
        Ok(())
    }
}

/// Names the collection of the current request in its span.
pub fn record_collection(collection: &str) {
    if crate::store::is_valid_name(collection) {
        Span::current().record("collection", collection);
    } else {
        Span::current().record("collection", crate::quote::shown(collection).as_str());
    }
}

/// The gRPC status name as the protocol spells it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// At most one line per period; the lines held back are counted and reported
/// with the next one. For events a client can cause at will (rejected TLS
/// handshakes, refused connections).
#[derive(Debug)]
pub struct RateLimited {
    every: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl RateLimited {
    pub fn new(every: Duration) -> RateLimited {
        RateLimited {
            every,
            state: Mutex::new((None, 0)),
        }
    }

    /// `Some(lines held back since the last one)` when a line may be written now.
    pub fn allow(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (last, held) = &mut *state;
        if last.is_some_and(|at| at.elapsed() < self.every) {
            *held += 1;
            return None;
        }
        *last = Some(Instant::now());
        Some(std::mem::take(held))
    }
}

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

/// A bounded set of method labels for metrics, whatever paths clients send.
fn method_label(method: &str) -> &'static str {
    const KNOWN: &[&str] = &[
        "Get",
        "Save",
        "Delete",
        "List",
        "BatchGet",
        "Write",
        "ListCollections",
        "Check",
        "Watch",
        "ServerReflectionInfo",
    ];
    KNOWN
        .iter()
        .find(|m| **m == method)
        .copied()
        .unwrap_or("other")
}

/// Tower layer that logs and measures every request; see [`RequestLog`].
#[derive(Debug, Clone, Default)]
pub struct RequestLogLayer {
    /// The policy's `service`, a field of every call's span.
    service: Option<Arc<str>>,
}

impl RequestLogLayer {
    /// `service` names this sidecar's service (the policy's) in every call's span.
    pub fn new(service: Option<&str>) -> RequestLogLayer {
        RequestLogLayer {
            service: service.map(Arc::from),
        }
    }
}

impl<S> Layer<S> for RequestLogLayer {
    type Service = RequestLog<S>;

    fn layer(&self, inner: S) -> RequestLog<S> {
        RequestLog {
            inner,
            service: self.service.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RequestLog<S> {
    inner: S,
    service: Option<Arc<str>>,
}

/// One call's accounting: it logs and counts the call exactly once, when it
/// finishes or, if the call is dropped first (the client reset its stream
/// while the handler ran), when it is dropped, as CANCELLED.
struct Outcome {
    span: Span,
    label: &'static str,
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
        metrics::request(self.label, code_name, elapsed);
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
        let span = tracing::info_span!(
            "rpc",
            service = self.service.as_deref(),
            method,
            grpc_service,
            collection = field::Empty
        );
        let mut outcome = Outcome {
            span: span.clone(),
            label: method_label(method),
            start: Instant::now(),
            recorded: false,
            _in_flight: metrics::InFlight::start(),
        };
        let future = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        Box::pin(async move {
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
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The log lines of one span with fields recorded late, as `fields` writes them.
    fn json_lines<N>(fields: N) -> Vec<serde_json::Value>
    where
        N: for<'w> FormatFields<'w> + Send + Sync + 'static,
    {
        use std::sync::{Arc, Mutex};
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let sink = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || Sink(sink.clone()))
            .with_target(false)
            .without_time()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .fmt_fields(fields)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!(
                "rpc",
                method = "Get",
                service = field::Empty,
                collection = field::Empty,
                n = field::Empty,
                r#type = field::Empty,
                ok = field::Empty,
                ratio = 0.25,
                debug = ?Some("x"),
                bytes = field::Empty
            );
            let _entered = span.enter();
            tracing::info!("before");
            span.record("service", "docsidecar.v1.DocumentService");
            span.record("collection", "a \"quoted\" name\n é");
            span.record("n", -3i64);
            span.record("type", field::debug(&[1, 2]));
            span.record("ok", true);
            span.record("bytes", &b"ab"[..]);
            tracing::info!(code = "OK", latency_ms = 1.5, "after");
            span.record("collection", "people");
            tracing::warn!("again");
            let empty = tracing::info_span!("empty");
            let _inner = empty.enter();
            tracing::info!("no fields");
        });
        let text = String::from_utf8(buffer.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    struct Sink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn appended_span_fields_log_as_tracing_subscriber_writes_them() {
        let ours = json_lines(JsonSpanFields);
        let theirs = json_lines(tracing_subscriber::fmt::format::JsonFields::default());
        assert_eq!(ours.len(), 4);
        assert_eq!(ours, theirs);
        assert_eq!(ours[2]["span"]["collection"], "people");
        assert_eq!(ours[1]["span"]["service"], "docsidecar.v1.DocumentService");
        assert_eq!(ours[1]["span"]["bytes"], serde_json::json!([97, 98]));
        assert_eq!(ours[1]["span"]["n"], -3);
        assert_eq!(ours[0]["span"]["debug"], "Some(\"x\")");
    }

    #[test]
    fn rate_limited_lines_count_what_they_hold_back() {
        let limit = RateLimited::new(Duration::from_secs(3600));
        assert_eq!(limit.allow(), Some(0), "the first line is written");
        assert_eq!(limit.allow(), None);
        assert_eq!(limit.allow(), None);
        let limit = RateLimited::new(Duration::ZERO);
        assert_eq!(limit.allow(), Some(0));
        assert_eq!(limit.allow(), Some(0));
    }

    #[test]
    fn decodes_grpc_messages() {
        assert_eq!(percent_decode("a%20b%3A%25"), "a b:%");
        assert_eq!(percent_decode("50%"), "50%");
        assert_eq!(percent_decode("%e2%82%ac"), "€");
    }
}
