//! Traces as an operator's collector receives them: the real binary exports
//! over OTLP/gRPC to a small receiver on loopback; a call carrying a W3C
//! `traceparent` continues the caller's trace, with a child span for the
//! store's work, and no document data in any attribute.

mod common;

use common::sidecar::Sidecar;
use common::*;
use docsidecar::proto::{GetRequest, SaveRequest};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, Span};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Identity, ServerTlsConfig};

/// Every span exported to it goes down the channel, with its resource's
/// `service.name`.
struct Receiver(mpsc::UnboundedSender<(String, Span)>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .as_ref()
                .and_then(|r| text(&r.attributes, "service.name"))
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    let _ = self.0.send((service.clone(), span));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// Starts the receiver on a free loopback port, over TLS with `tls` (a
/// certificate and its key, PEM): its endpoint, and the spans.
async fn receiver(
    tls: Option<(String, String)>,
) -> (String, mpsc::UnboundedReceiver<(String, Span)>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let scheme = if tls.is_some() { "https" } else { "http" };
    let endpoint = format!("{scheme}://{}", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::unbounded_channel();
    let mut server = tonic::transport::Server::builder();
    if let Some((cert, key)) = tls {
        server = server
            .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
            .unwrap();
    }
    tokio::spawn(
        server
            .add_service(TraceServiceServer::new(Receiver(tx)))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    (endpoint, rx)
}

fn value(attributes: &[KeyValue], key: &str) -> Option<any_value::Value> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.clone())
        .and_then(|v: AnyValue| v.value)
}

fn text(attributes: &[KeyValue], key: &str) -> Option<String> {
    match value(attributes, key)? {
        any_value::Value::StringValue(s) => Some(s),
        _ => None,
    }
}

fn int(attributes: &[KeyValue], key: &str) -> Option<i64> {
    match value(attributes, key)? {
        any_value::Value::IntValue(n) => Some(n),
        _ => None,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const SAVE_PARENT: &str = "00f067aa0ba902b7";
const GET_PARENT: &str = "00f067aa0ba902b8";
/// Document data: it must not reach any span.
const SECRET: &str = "s3cret-document-value";

fn traced<T>(message: T, parent: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let metadata = request.metadata_mut();
    metadata.insert(
        "traceparent",
        format!("00-{TRACE_ID}-{parent}-01").parse().unwrap(),
    );
    metadata.insert("tracestate", "vendor=opaque".parse().unwrap());
    request
}

#[tokio::test]
async fn calls_continue_the_caller_s_trace_with_a_store_span() {
    let dir = tempfile::tempdir().unwrap();
    let received = save_and_get(dir.path(), "sqlite://data.db", &[], "sqlite").await;
    assert!(
        !received.iter().any(|s| s.name == "pool.acquire"),
        "SQLite has no pool wait"
    );
}

/// The same on PostgreSQL, where the store span holds the pool wait.
#[tokio::test]
async fn postgres_calls_trace_the_pool_wait() {
    let Some(url) = postgres_url().await else {
        return;
    };
    let schema = format!("otel_{}", std::process::id());
    let dir = tempfile::tempdir().unwrap();
    let received = save_and_get(
        dir.path(),
        &url,
        &[("DOCSIDECAR_SCHEMA", schema.as_str())],
        "postgresql",
    )
    .await;
    pg_connect(&url)
        .await
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .await
        .unwrap();
    for store in received
        .iter()
        .filter(|s| s.kind == SpanKind::Client as i32)
    {
        let wait = received
            .iter()
            .find(|s| s.parent_span_id == store.span_id && s.name == "pool.acquire")
            .unwrap_or_else(|| panic!("no pool.acquire under {}: {received:#?}", store.name));
        assert_eq!(hex(&wait.trace_id), TRACE_ID);
        assert!(wait.start_time_unix_nano >= store.start_time_unix_nano);
    }
}

/// Saves and reads a document with a `traceparent` through the real binary on
/// `database`, exporting to a receiver; checks the server and store spans
/// and the log line; returns every span received.
async fn save_and_get(
    dir: &std::path::Path,
    database: &str,
    envs: &[(&str, &str)],
    db_system: &str,
) -> Vec<Span> {
    let (endpoint, mut spans) = receiver(None).await;
    let mut all_envs = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_SERVICE_NAME", "docsidecar-test"),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ("RUST_LOG", "docsidecar=debug"),
    ];
    all_envs.extend_from_slice(envs);
    let mut sidecar = Sidecar::spawn_with(
        &["--listen", "127.0.0.1:0", "--database-url", database],
        dir,
        &all_envs,
    );
    let addr = sidecar.listening();
    let mut client = Client::connect(format!("http://{addr}")).await.unwrap();
    let save = SaveRequest {
        collection: "notes".into(),
        id: "n1".into(),
        data: Some(object(vec![("body", string(SECRET))]).into()),
        ..Default::default()
    };
    client.save(traced(save, SAVE_PARENT)).await.unwrap();
    let get = GetRequest {
        collection: "notes".into(),
        id: "n1".into(),
        ..Default::default()
    };
    client.get(traced(get, GET_PARENT)).await.unwrap();

    // Until both server spans and their store spans have arrived.
    let mut received: Vec<Span> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let server = |received: &[Span], method: &str| {
        received
            .iter()
            .find(|s| text(&s.attributes, "rpc.method").as_deref() == Some(method))
            .cloned()
    };
    loop {
        let complete = ["Save", "Get"].iter().all(|m| {
            server(&received, m)
                .is_some_and(|s| received.iter().any(|c| c.parent_span_id == s.span_id))
        });
        if complete {
            break;
        }
        match tokio::time::timeout_at(deadline, spans.recv()).await {
            Ok(Some((service, span))) => {
                assert_eq!(
                    service, "docsidecar-test",
                    "OTEL_SERVICE_NAME names the resource"
                );
                received.push(span);
            }
            _ => panic!(
                "spans missing; received {received:#?}\nlogs: {:#?}",
                sidecar.drain_logs()
            ),
        }
    }

    for (method, parent, operation) in [("Save", SAVE_PARENT, "write"), ("Get", GET_PARENT, "get")]
    {
        let span = server(&received, method).unwrap();
        assert_eq!(
            hex(&span.trace_id),
            TRACE_ID,
            "{method}: the caller's trace"
        );
        assert_eq!(
            hex(&span.parent_span_id),
            parent,
            "{method}: the caller's span is the parent"
        );
        assert_eq!(span.kind, SpanKind::Server as i32, "{method}");
        assert_eq!(span.name, format!("docsidecar.v1.DocumentService/{method}"));
        assert_eq!(
            text(&span.attributes, "rpc.system").as_deref(),
            Some("grpc")
        );
        assert_eq!(
            text(&span.attributes, "rpc.service").as_deref(),
            Some("docsidecar.v1.DocumentService")
        );
        assert_eq!(
            text(&span.attributes, "collection").as_deref(),
            Some("notes")
        );
        assert_eq!(int(&span.attributes, "rpc.grpc.status_code"), Some(0), "OK");

        let store = received
            .iter()
            .find(|s| s.parent_span_id == span.span_id && s.name.starts_with(operation))
            .unwrap_or_else(|| {
                panic!("{method}: no store span under the server span: {received:#?}")
            });
        assert_eq!(hex(&store.trace_id), TRACE_ID);
        assert_eq!(store.kind, SpanKind::Client as i32);
        assert_eq!(store.name, format!("{operation} notes"));
        assert_eq!(
            text(&store.attributes, "db.system").as_deref(),
            Some(db_system)
        );
        assert_eq!(
            text(&store.attributes, "collection").as_deref(),
            Some("notes")
        );
        assert_eq!(
            text(&store.attributes, "db.operation.name").as_deref(),
            Some(operation)
        );
    }

    // Neither document data nor anything else of the request body in spans.
    let everything = format!("{received:?}");
    assert!(
        !everything.contains(SECRET),
        "document data in a span: {everything}"
    );
    assert!(
        !everything.contains("n1\""),
        "a document id in a span: {everything}"
    );

    // The log lines of a traced call carry its trace id.
    let line = sidecar.wait_for_log("the Save request line", |v| {
        v["message"] == "request" && v["span"]["method"] == "Save"
    });
    assert_eq!(line["span"]["trace_id"], TRACE_ID, "{line}");
    assert!(line["span"].get("otel.kind").is_none(), "{line}");
    received
}

#[tokio::test]
async fn an_https_collector_is_verified_with_the_configured_ca() {
    let ca = common::pki::TestCa::new("collector CA");
    let (endpoint, mut spans) = receiver(Some(ca.issue(&["127.0.0.1"]))).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("collector-ca.pem"), ca.pem()).unwrap();
    let mut sidecar = Sidecar::spawn_with(
        &["--listen", "127.0.0.1:0", "--database-url", "memory://"],
        dir.path(),
        &[
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", endpoint.as_str()),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", "collector-ca.pem"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    );
    let addr = sidecar.listening();
    let mut client = Client::connect(format!("http://{addr}")).await.unwrap();
    let get = GetRequest {
        collection: "notes".into(),
        id: "absent".into(),
        ..Default::default()
    };
    let status = client.get(traced(get, GET_PARENT)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    let (service, span) = loop {
        match tokio::time::timeout(Duration::from_secs(30), spans.recv()).await {
            Ok(Some((service, span))) if span.kind == SpanKind::Server as i32 => {
                break (service, span)
            }
            Ok(Some(_)) => {}
            _ => panic!("no span over TLS; logs: {:#?}", sidecar.drain_logs()),
        }
    };
    assert_eq!(service, "docsidecar", "the default service name");
    assert_eq!(hex(&span.trace_id), TRACE_ID);
    assert_eq!(
        int(&span.attributes, "rpc.grpc.status_code"),
        Some(5),
        "NOT_FOUND"
    );
}
