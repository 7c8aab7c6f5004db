//! OpenTelemetry: spans exported over OTLP/gRPC, and the W3C trace context
//! (`traceparent`, `tracestate`) of incoming calls.
//!
//! Configured by the standard variables only: on when
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT` is set
//! (and neither `OTEL_SDK_DISABLED=true` nor `OTEL_TRACES_EXPORTER=none`);
//! `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER(_ARG)`,
//! `OTEL_BSP_*`, `OTEL_EXPORTER_OTLP_(TRACES_)HEADERS` and `…_TIMEOUT` are read
//! by the SDK; an `https:` endpoint is verified with the public roots and
//! `OTEL_EXPORTER_OTLP_CERTIFICATE`. Off, nothing is extracted, recorded or allocated for tracing:
//! the layer is absent and the request layer asks [`enabled`] first.

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{Status, TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithTonicConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};
use tonic::Code;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

static ENABLED: AtomicBool = AtomicBool::new(false);
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Whether spans are exported: the request layer and the store decorator do
/// their tracing work only then.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// The export layer when the environment asks for traces. Only the sidecar's
/// own spans are exported (not hyper's or h2's, nor the exporter's own calls).
pub(super) fn layer<S>() -> Option<Box<dyn Layer<S> + Send + Sync>>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    let endpoint =
        var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT"))?;
    if var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
        || var("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"))
    {
        return None;
    }
    let protocol =
        var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL").or_else(|| var("OTEL_EXPORTER_OTLP_PROTOCOL"));
    if let Some(protocol) = protocol.filter(|p| p != "grpc") {
        // The subscriber is not installed yet: say it on stderr.
        eprintln!(
            "docsidecar: OTEL_EXPORTER_OTLP_PROTOCOL={protocol} is not supported (only grpc, port 4317): tracing is off"
        );
        return None;
    }
    let mut builder = opentelemetry_otlp::SpanExporter::builder().with_tonic();
    if endpoint.trim().starts_with("https:") {
        match tls() {
            Ok(tls) => builder = builder.with_tls_config(tls),
            Err(e) => {
                eprintln!("docsidecar: {e}: tracing is off");
                return None;
            }
        }
    }
    let exporter = match builder.build() {
        Ok(exporter) => exporter,
        Err(e) => {
            eprintln!("docsidecar: cannot export traces over OTLP ({e}): tracing is off");
            return None;
        }
    };
    let mut resource = Resource::builder();
    // The SDK's default is `unknown_service`.
    let named = var("OTEL_SERVICE_NAME").is_some()
        || var("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|a| a.contains("service.name="));
    if !named {
        resource = resource.with_service_name("docsidecar");
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    let tracer = provider.tracer("docsidecar");
    let _ = PROVIDER.set(provider);
    ENABLED.store(true, Ordering::Relaxed);
    Some(
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_location(false)
            .with_target(false)
            .with_threads(false)
            .with_tracked_inactivity(false)
            .with_filter(Targets::new().with_target("docsidecar", LevelFilter::INFO))
            .boxed(),
    )
}

/// TLS to the collector: the public roots plus `OTEL_EXPORTER_OTLP_CERTIFICATE`
/// (a CA, PEM), and a client certificate from `OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE`
/// and `OTEL_EXPORTER_OTLP_CLIENT_KEY` (each also as `…_TRACES_…`).
fn tls() -> Result<ClientTlsConfig, String> {
    let setting = |name: &str| var(&name.replace("OTLP_", "OTLP_TRACES_")).or_else(|| var(name));
    let read = |name: &str| -> Result<Option<Vec<u8>>, String> {
        setting(name)
            .map(|path| {
                std::fs::read(&path).map_err(|e| format!("cannot read {name} ({path}): {e}"))
            })
            .transpose()
    };
    let mut tls = ClientTlsConfig::new().with_webpki_roots();
    if let Some(ca) = read("OTEL_EXPORTER_OTLP_CERTIFICATE")? {
        tls = tls.ca_certificate(Certificate::from_pem(ca));
    }
    match (
        read("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE")?,
        read("OTEL_EXPORTER_OTLP_CLIENT_KEY")?,
    ) {
        (Some(cert), Some(key)) => tls = tls.identity(Identity::from_pem(cert, key)),
        (None, None) => {}
        _ => return Err(
            "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE and OTEL_EXPORTER_OTLP_CLIENT_KEY go together"
                .into(),
        ),
    }
    Ok(tls)
}

/// Sends the spans still buffered, at exit; an unreachable collector holds
/// the exit for at most 5 s.
pub fn shutdown() {
    if let Some(provider) = PROVIDER.get() {
        if let Err(e) = provider.shutdown_with_timeout(std::time::Duration::from_secs(5)) {
            tracing::warn!(error = %e, "could not export the last spans");
        }
    }
}

/// gRPC metadata as the propagator reads it.
struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Makes `span` (named and of kind server) the server span of a call: a child of the caller's span when
/// the call carries a W3C `traceparent`, with the RPC attributes of the
/// OpenTelemetry conventions, and its trace id in the logs.
pub(super) fn server_span(span: &Span, headers: &http::HeaderMap, service: &str, method: &str) {
    if headers.contains_key("traceparent") {
        let parent = TraceContextPropagator::new().extract(&Headers(headers));
        let _ = span.set_parent(parent);
    }
    span.set_attribute("rpc.system", "grpc");
    span.set_attribute("rpc.service", service.to_string());
    span.set_attribute("rpc.method", method.to_string());
    record_trace_id(span, span);
}

/// Writes the trace id of `of` into the `trace_id` field of `span`, for the logs.
pub(super) fn record_trace_id(span: &Span, of: &Span) {
    let context = of.context();
    let trace = context.span().span_context().trace_id();
    if trace != opentelemetry::trace::TraceId::INVALID {
        span.record("trace_id", tracing::field::display(trace));
    }
}

/// The call's gRPC status on its server span; the codes that are the server's
/// fault mark it as an error, as the RPC conventions say.
pub(super) fn record_status(span: &Span, code: Code) {
    span.set_attribute("rpc.grpc.status_code", code as i64);
    if matches!(
        code,
        Code::Unknown
            | Code::DeadlineExceeded
            | Code::Unimplemented
            | Code::Internal
            | Code::Unavailable
            | Code::DataLoss
    ) {
        span.set_status(Status::error(super::code_name(code)));
    }
}

/// A span around waiting for a pooled connection, when tracing is on and a
/// call is being traced; otherwise a disabled span that costs nothing.
pub fn pool_wait_span() -> Span {
    if !enabled() || Span::current().is_none() {
        return Span::none();
    }
    tracing::info_span!(
        "pool.acquire",
        otel.name = "pool.acquire",
        otel.kind = "internal"
    )
}
