//! What operators see: the admin endpoints (probes, metrics), the shutdown
//! sequence Kubernetes needs, and the wait / shutdown / check commands.

mod common;

use common::sidecar::{http, parse_metrics, Sidecar, BIN};
use common::*;
use docsidecar::proto::{
    mutation::Op, DeleteRequest, GetRequest, Mutation, SaveRequest, WriteRequest,
};
use std::process::Command;
use std::time::{Duration, Instant};
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

fn save(id: &str) -> SaveRequest {
    SaveRequest {
        collection: "notes".into(),
        id: id.into(),
        data: Some(object(vec![("n", num(1.0))]).into()),
        ..Default::default()
    }
}

fn get(id: &str) -> GetRequest {
    GetRequest {
        collection: "notes".into(),
        id: id.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn metrics_count_a_known_sequence_of_calls() {
    let dir = tempfile::tempdir().unwrap();
    let mut sidecar = Sidecar::spawn(
        &["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"],
        dir.path(),
    );
    let addr = sidecar.listening();
    let admin = sidecar.admin.clone().expect("admin address logged");
    let mut c = Client::connect(format!("http://{addr}")).await.unwrap();
    for id in ["a", "b", "c"] {
        c.save(save(id)).await.unwrap();
    }
    c.get(get("a")).await.unwrap();
    c.get(get("missing-1")).await.unwrap_err();
    c.get(get("missing-2")).await.unwrap_err();
    c.get(get("")).await.unwrap_err();
    c.write(WriteRequest {
        mutations: vec![
            Mutation {
                op: Some(Op::Save(save("d"))),
            },
            Mutation {
                op: Some(Op::Save(save("e"))),
            },
            Mutation {
                op: Some(Op::Delete(DeleteRequest {
                    collection: "notes".into(),
                    id: "a".into(),
                    expected_rev: String::new(),
                    ..Default::default()
                })),
            },
        ],
    })
    .await
    .unwrap();

    let (status, body) = http(&admin, "GET", "/metrics").await;
    assert_eq!(status, 200);
    let m = parse_metrics(&body);
    let expect = |key: &str, value: f64| {
        assert_eq!(m.get(key).copied(), Some(value), "{key} in\n{body}");
    };
    expect(r#"docsidecar_requests_total{code="OK",method="Save"}"#, 3.0);
    expect(r#"docsidecar_requests_total{code="OK",method="Get"}"#, 1.0);
    expect(
        r#"docsidecar_requests_total{code="NOT_FOUND",method="Get"}"#,
        2.0,
    );
    expect(
        r#"docsidecar_requests_total{code="INVALID_ARGUMENT",method="Get"}"#,
        1.0,
    );
    expect(
        r#"docsidecar_requests_total{code="OK",method="Write"}"#,
        1.0,
    );
    expect(
        r#"docsidecar_request_duration_seconds_count{method="Save"}"#,
        3.0,
    );
    expect(
        r#"docsidecar_request_duration_seconds_count{method="Get"}"#,
        4.0,
    );
    expect("docsidecar_documents_written_total", 5.0);
    expect("docsidecar_documents_deleted_total", 1.0);
    expect("docsidecar_requests_in_flight", 0.0);
    expect(
        &format!(
            r#"docsidecar_build_info{{version="{}"}}"#,
            env!("CARGO_PKG_VERSION")
        ),
        1.0,
    );
    // SQLite: the writer and its readers.
    assert!(m["docsidecar_pool_connections_max"] >= 2.0, "{body}");
    assert!(m.contains_key("docsidecar_pool_waiting"), "{body}");
    assert!(m["docsidecar_pool_acquire_seconds_count"] >= 7.0, "{body}");
    assert!(
        body.contains(r#"docsidecar_request_duration_seconds_bucket{method="Save",le="0.005"}"#),
        "{body}"
    );

    sidecar.signal("TERM");
    assert_eq!(sidecar.wait().await.0.code(), Some(0));
}

#[tokio::test]
async fn sigterm_turns_readiness_off_keeps_serving_for_the_delay_then_exits() {
    let dir = tempfile::tempdir().unwrap();
    let mut sidecar = Sidecar::spawn_with(
        &["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"],
        dir.path(),
        &[("DOCSIDECAR_SHUTDOWN_DELAY", "1.5")],
    );
    let addr = sidecar.listening();
    let admin = sidecar.admin.clone().unwrap();
    for path in ["/livez", "/readyz", "/startupz"] {
        assert_eq!(http(&admin, "GET", path).await.0, 200, "{path}");
    }
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    let mut c = Client::new(channel.clone());
    c.save(save("before")).await.unwrap();

    let signalled = Instant::now();
    sidecar.signal("TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, body) = http(&admin, "GET", "/readyz").await;
    assert_eq!((status, body.as_str()), (503, "shutting down"));
    assert_eq!(
        http(&admin, "GET", "/livez").await.0,
        200,
        "liveness stays true"
    );
    let health = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status(), ServingStatus::NotServing);
    // New calls are still served during the delay: endpoints may still route here.
    c.save(save("during-delay")).await.unwrap();

    let (status, logs) = sidecar.wait().await;
    assert_eq!(status.code(), Some(0), "{logs:#?}");
    assert!(
        signalled.elapsed() >= Duration::from_millis(1500),
        "the delay is honoured"
    );
}

#[tokio::test]
async fn wait_blocks_until_serving_and_gives_up_on_time() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let waiter = {
        let addr = addr.clone();
        std::thread::spawn(move || {
            Command::new(BIN)
                .args(["wait", "--address", &addr, "--timeout", "20"])
                .env_clear()
                .output()
                .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    let mut sidecar = Sidecar::spawn(
        &["--listen", &addr, "--database-url", "memory://"],
        dir.path(),
    );
    sidecar.listening();
    let out = tokio::task::spawn_blocking(move || waiter.join().unwrap())
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    let started = Instant::now();
    let out = Command::new(BIN)
        .args(["wait", "--address", "127.0.0.1:1", "--timeout", "1"])
        .env_clear()
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("was not SERVING within"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(5));
    sidecar.signal("TERM");
    assert_eq!(sidecar.wait().await.0.code(), Some(0));
}

#[tokio::test]
async fn shutdown_command_stops_a_local_sidecar() {
    let dir = tempfile::tempdir().unwrap();
    let mut sidecar = Sidecar::spawn(
        &[
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--database-url",
            "memory://",
        ],
        dir.path(),
    );
    sidecar.listening();
    let admin = sidecar.admin.clone().unwrap();
    let out = Command::new(BIN)
        .args(["shutdown", "--admin", &admin])
        .env_clear()
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let (status, logs) = sidecar.wait().await;
    assert_eq!(status.code(), Some(0));
    assert!(logs
        .join("\n")
        .contains("shutdown requested through the admin endpoint"));
}

#[tokio::test]
async fn check_validates_configuration_and_connectivity() {
    let dir = tempfile::tempdir().unwrap();
    let ok = Command::new(BIN)
        .args(["check"])
        .current_dir(dir.path())
        .env_clear()
        .env("DATABASE_URL", "sqlite://check.db")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "{text}");
    assert!(text.contains("configuration and database OK"), "{text}");

    let unreachable = Command::new(BIN)
        .args(["check"])
        .env_clear()
        .env("DATABASE_URL", "postgres://app:hunter2@127.0.0.1:1/app")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&unreachable.stdout);
    assert!(!unreachable.status.success(), "{text}");
    assert!(text.contains("127.0.0.1:1"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");

    let policy = dir.path().join("p.toml");
    std::fs::write(
        &policy,
        "service = \"x\"\n[[clients]]\ntoken_file = \"/nonexistent/token\"\n",
    )
    .unwrap();
    let bad = Command::new(BIN)
        .args(["check", "--policy", policy.to_str().unwrap()])
        .env_clear()
        .env("DATABASE_URL", "memory://")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&bad.stdout);
    assert!(!bad.status.success());
    assert!(text.contains("/nonexistent/token"), "{text}");
}

/// A call with a bearer token.
fn with<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

/// The `grpc_server_*` series of DocumentService calls whose labels contain all of `parts`.
fn grpc_series<'a>(
    m: &'a std::collections::BTreeMap<String, f64>,
    name: &str,
    parts: &[&str],
) -> Vec<(&'a String, f64)> {
    m.iter()
        .filter(|(k, _)| {
            k.starts_with(&format!("{name}{{"))
                && k.contains(r#"grpc_service="docsidecar.v1.DocumentService""#)
                && parts.iter().all(|p| k.contains(p))
        })
        .map(|(k, v)| (k, *v))
        .collect()
}

#[tokio::test]
async fn grpc_metrics_name_the_service_the_collection_and_the_client() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("app-token"), "app-token-aaaaaaaaaaaa\n").unwrap();
    std::fs::write(dir.path().join("report-token"), "report-token-bbbbbbbbb\n").unwrap();
    std::fs::write(
        dir.path().join("policy.toml"),
        r#"service = "backend-api"
auto_create = true
[collections.notes]
access = "read-write"
[[clients]]
name = "app"
token_file = "app-token"
[[clients]]
token_file = "report-token"
access = "read-only"
"#,
    )
    .unwrap();
    let mut sidecar = Sidecar::spawn(
        &[
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--database-url",
            "memory://",
            "--policy",
            "policy.toml",
        ],
        dir.path(),
    );
    let addr = sidecar.listening();
    let admin = sidecar.admin.clone().expect("admin address logged");
    let mut c = Client::connect(format!("http://{addr}")).await.unwrap();
    c.save(with("app-token-aaaaaaaaaaaa", save("a")))
        .await
        .unwrap();
    c.get(with("report-token-bbbbbbbbb", get("a")))
        .await
        .unwrap();
    let mut undeclared = get("a");
    undeclared.collection = "secret_stuff".into();
    c.get(with("app-token-aaaaaaaaaaaa", undeclared))
        .await
        .unwrap_err();

    let m = common::sidecar::metrics(&admin).await;
    assert_eq!(m.get("docsidecar_database_up"), Some(&1.0), "{m:#?}");
    let common = [r#"grpc_type="unary""#, r#"service="backend-api""#];
    let one = |name: &str, parts: &[&str]| {
        let all: Vec<&str> = common.iter().chain(parts).copied().collect();
        let found = grpc_series(&m, name, &all);
        assert_eq!(found.len(), 1, "{name} {all:?} in {m:#?}");
        found[0].1
    };
    let save_labels = [
        r#"grpc_method="Save""#,
        r#"collection="notes""#,
        r#"client="app""#,
    ];
    assert_eq!(
        one(
            "grpc_server_handled_total",
            &[&save_labels[..], &[r#"grpc_code="OK""#]].concat()
        ),
        1.0
    );
    assert_eq!(one("grpc_server_handling_seconds_count", &save_labels), 1.0);
    let started = grpc_series(&m, "grpc_server_started_total", &[r#"grpc_method="Save""#]);
    assert_eq!(started.len(), 1, "{m:#?}");
    // As go-grpc-prometheus labels it: the service, method and type only.
    assert!(
        started[0].0.ends_with(
            r#"{grpc_method="Save",grpc_service="docsidecar.v1.DocumentService",grpc_type="unary"}"#
        ),
        "{started:?}"
    );
    assert_eq!(started[0].1, 1.0);
    assert_eq!(
        one(
            "grpc_server_handled_total",
            &[
                r#"grpc_method="Get""#,
                r#"collection="notes""#,
                r#"client="report-token""#,
                r#"grpc_code="OK""#
            ]
        ),
        1.0,
        "a client without a name is named by its token file"
    );
    // An undeclared collection is not a label value of its own.
    one(
        "grpc_server_handled_total",
        &[
            r#"grpc_method="Get""#,
            r#"collection="other""#,
            r#"client="app""#,
        ],
    );
    assert!(!m.keys().any(|k| k.contains("secret_stuff")), "{m:#?}");
    sidecar.signal("TERM");
    assert_eq!(sidecar.wait().await.0.code(), Some(0));

    // Without a policy, the first 50 collections seen, then `other`.
    let mut sidecar = Sidecar::spawn(
        &[
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--database-url",
            "memory://",
        ],
        dir.path(),
    );
    let addr = sidecar.listening();
    let admin = sidecar.admin.clone().expect("admin address logged");
    let mut c = Client::connect(format!("http://{addr}")).await.unwrap();
    for i in 0..53 {
        let mut request = save("a");
        request.collection = format!("c{i:02}");
        c.save(request).await.unwrap();
    }
    let m = common::sidecar::metrics(&admin).await;
    let saves = grpc_series(&m, "grpc_server_handled_total", &[r#"grpc_method="Save""#]);
    assert_eq!(saves.len(), 51, "50 collections and other: {saves:#?}");
    let other: Vec<_> = saves
        .iter()
        .filter(|(k, _)| k.contains(r#"collection="other""#))
        .collect();
    assert_eq!(other.len(), 1, "{saves:#?}");
    assert_eq!(other[0].1, 3.0);
    // Labels sorted: client first, service after grpc_type.
    assert!(!saves
        .iter()
        .any(|(k, _)| k.contains(",service=") || k.contains("{client=")));
    sidecar.signal("TERM");
    assert_eq!(sidecar.wait().await.0.code(), Some(0));
}
