//! Logs, traces and the request layer.
//!
//! # Layout
//! - here: subscriber set-up, the JSON span fields, the per-call labels,
//!   a rate limit for lines that a client could make frequent;
//! - `request`: the tower layer that gives every gRPC call one span (service,
//!   method, collection), one event (code, latency) and its metrics;
//! - `otel`: OpenTelemetry export over OTLP, on when `OTEL_EXPORTER_OTLP_*`
//!   names an endpoint, and the W3C trace context of incoming calls;
//! - `store`: a store decorator that opens a span per store call (tracing only).

mod otel;
mod request;
mod store;

pub use otel::{enabled as tracing_enabled, pool_wait_span, shutdown as shutdown_tracing};
pub use request::{RequestLog, RequestLogLayer};
pub use store::TracedStore;

use crate::metrics::{CollectionLabels, SharedLabel};
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tonic::Code;
use tracing::Span;
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::field::VisitOutput;
use tracing_subscriber::fmt::format::{DefaultVisitor, FormatFields, Writer};
use tracing_subscriber::fmt::FormattedFields;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

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
/// or a file gets no escape sequences. Spans are exported over OTLP when the
/// standard `OTEL_*` variables name an endpoint (see `otel`); call it within
/// the Tokio runtime, which the exporter uses.
pub fn init(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let colour = std::io::stdout().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let otel = otel::layer();
    let logs = tracing_subscriber::fmt::layer()
        .with_ansi(colour)
        .with_target(false);
    let logs = match format {
        // The spans' OpenTelemetry names and kinds are not for the logs.
        LogFormat::Text if otel.is_some() => logs.fmt_fields(TextFields).boxed(),
        LogFormat::Text => logs.boxed(),
        LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .fmt_fields(JsonSpanFields)
            .boxed(),
    };
    let _ = tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(otel)
        .try_init();
}

/// Fields as tracing-subscriber's `DefaultFields` writes them, less the
/// `otel.*` ones (a span's OpenTelemetry name and kind, given when the span is
/// created, never recorded later: a field added later would leave a blank).
#[derive(Debug, Default)]
struct TextFields;

struct TextVisitor<'a>(DefaultVisitor<'a>);

impl tracing::field::Visit for TextVisitor<'_> {
    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        self.0.record_f64(field, value);
    }

    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.0.record_i64(field, value);
    }

    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.0.record_u64(field, value);
    }

    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.0.record_bool(field, value);
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if !field.name().starts_with("otel.") {
            self.0.record_str(field, value);
        }
    }

    fn record_error(
        &mut self,
        field: &tracing::field::Field,
        value: &(dyn std::error::Error + 'static),
    ) {
        self.0.record_error(field, value);
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
        if !field.name().starts_with("otel.") {
            self.0.record_debug(field, value);
        }
    }
}

impl<'writer> FormatFields<'writer> for TextFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        let mut visitor = TextVisitor(DefaultVisitor::new(writer, true));
        fields.record(&mut visitor);
        visitor.0.finish()
    }
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
        // The span's name and kind for OpenTelemetry: not for the logs.
        if !field.name().starts_with("otel.") {
            self.0.insert(field.name(), value.into());
        }
    }

    fn record_bytes(&mut self, field: &tracing::field::Field, value: &[u8]) {
        self.0.insert(field.name(), value.into());
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
        match field.name() {
            // Log records bridged from the `log` crate: metadata, not fields.
            name if name.starts_with("log.") || name.starts_with("otel.") => {}
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

/// What the request layer labels one call's metrics with, filled in as the
/// call is understood: the collection by the handler, the client by the auth
/// layer. Reached through [`CALL`], which the request layer sets around the call.
#[derive(Debug)]
pub(crate) struct CallLabels {
    collections: Arc<CollectionLabels>,
    collection: OnceLock<SharedLabel>,
    client: OnceLock<SharedLabel>,
}

impl CallLabels {
    fn new(collections: Arc<CollectionLabels>) -> CallLabels {
        CallLabels {
            collections,
            collection: OnceLock::new(),
            client: OnceLock::new(),
        }
    }
}

tokio::task_local! {
    /// The labels of the call this task serves (set by the request layer).
    pub(crate) static CALL: Arc<CallLabels>;
}

/// Names the collection of the current request in its span and its metrics.
pub fn record_collection(collection: &str) {
    let _ = CALL.try_with(|call| {
        let _ = call.collection.set(call.collections.label(collection));
    });
    if crate::store::is_valid_name(collection) {
        Span::current().record("collection", collection);
    } else {
        Span::current().record("collection", crate::quote::shown(collection).as_str());
    }
}

/// Names the authenticated client (its `[[clients]]` entry) in the current
/// call's metrics.
pub fn record_client(name: &SharedLabel) {
    let _ = CALL.try_with(|call| {
        let _ = call.client.set(name.clone());
    });
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

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::field;

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
    fn text_lines_leave_out_the_opentelemetry_name_and_kind() {
        let buffer = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || Sink(sink.clone()))
            .with_ansi(false)
            .with_target(false)
            .without_time()
            .fmt_fields(TextFields)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!(
                "rpc",
                method = "Get",
                trace_id = field::Empty,
                otel.name = "docsidecar.v1.DocumentService/Get",
                otel.kind = "server",
            );
            span.record("trace_id", "4bf92f35");
            let _entered = span.enter();
            let wait = tracing::info_span!("pool.acquire", otel.kind = "internal");
            let _wait = wait.enter();
            tracing::info!(code = "OK", "request");
        });
        let text = String::from_utf8(buffer.lock().unwrap().clone()).unwrap();
        assert!(
            text.contains(
                r#"rpc{method="Get" trace_id="4bf92f35"}:pool.acquire: request code="OK""#
            ),
            "{text}"
        );
        assert!(!text.contains("otel"), "{text}");
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
}
