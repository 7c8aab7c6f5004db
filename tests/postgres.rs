//! PostgreSQL beyond the shared semantics: outages, pool exhaustion, deadlines.

mod common;

use common::cluster::Cluster;
use common::*;
use docsidecar::proto::{BatchGetRequest, GetRequest, ListRequest, SaveRequest};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::Code;
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

fn save(collection: &str, id: &str) -> SaveRequest {
    SaveRequest {
        collection: collection.into(),
        id: id.into(),
        data: Some(object(vec![("at", string(id))]).into()),
        ..Default::default()
    }
}

fn get(collection: &str, id: &str) -> GetRequest {
    GetRequest {
        collection: collection.into(),
        id: id.into(),
        ..Default::default()
    }
}

async fn health(t: &TestServer) -> ServingStatus {
    HealthClient::new(t.channel.clone())
        .check(HealthCheckRequest {
            service: "docsidecar.v1.DocumentService".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status()
}

/// The server answers DEADLINE_EXCEEDED (see `deadline.rs`); a tonic client
/// also runs its own timer for the same deadline and, when that fires first,
/// reports it as CANCELLED "Timeout expired". Either way the call ends on time.
#[track_caller]
fn assert_deadline(status: &tonic::Status) {
    let own_timer = status.code() == Code::Cancelled && status.message() == "Timeout expired";
    assert!(
        status.code() == Code::DeadlineExceeded || own_timer,
        "{:?}: {}",
        status.code(),
        status.message()
    );
}

async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < within {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what}: not within {within:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_outage_is_survived_without_restart_or_lost_writes() {
    let Some(cluster) = Cluster::start("trust") else {
        return;
    };
    let url = cluster.url("postgres");
    let t = TestServer::start_at(
        Backend::Postgres,
        Some(&url),
        &[
            "--health-interval",
            "0.2",
            "--db-acquire-timeout",
            "1",
            "--db-pool-size",
            "4",
            "--admin-listen",
            "127.0.0.1:0",
        ],
    )
    .await;
    assert_eq!(health(&t).await, ServingStatus::Serving);

    // Writers under load; every acknowledged id is recorded.
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let codes = Arc::new(Mutex::new(BTreeSet::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4 {
        let (mut client, acked, codes, stop) =
            (t.client.clone(), acked.clone(), codes.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let id = format!("w{w}-{n:06}");
                n += 1;
                match client.save(save("load", &id)).await {
                    Ok(_) => acked.lock().unwrap().push(id),
                    Err(s) => {
                        codes.lock().unwrap().insert(format!("{:?}", s.code()));
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before_outage = acked.lock().unwrap().len();
    assert!(before_outage > 0, "writes succeed before the outage");

    tokio::task::block_in_place(|| cluster.pg_ctl_stop());
    eventually(
        "NOT_SERVING during the outage",
        Duration::from_secs(5),
        || async { health(&t).await == ServingStatus::NotServing },
    )
    .await;
    let admin = t.admin.clone().unwrap();
    let (status, body) = common::sidecar::http(&admin, "GET", "/readyz").await;
    assert_eq!((status, body.as_str()), (503, "database unreachable"));
    assert_eq!(
        common::sidecar::http(&admin, "GET", "/livez").await.0,
        200,
        "liveness stays true"
    );
    // Calls fail fast with UNAVAILABLE while the database is down.
    let started = Instant::now();
    let status = t
        .client
        .clone()
        .get(get("load", "w0-000000"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        !status.message().contains("postgres://"),
        "{}",
        status.message()
    );

    tokio::task::block_in_place(|| cluster.pg_ctl_start());
    eventually(
        "SERVING after the database returns",
        Duration::from_secs(10),
        || async { health(&t).await == ServingStatus::Serving },
    )
    .await;
    assert_eq!(common::sidecar::http(&admin, "GET", "/readyz").await.0, 200);
    let resumed = acked.lock().unwrap().len();
    eventually(
        "writes resume without a restart",
        Duration::from_secs(10),
        || async { acked.lock().unwrap().len() > resumed + 20 },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }

    let codes = codes.lock().unwrap().clone();
    assert!(
        codes.iter().all(|c| c == "Unavailable"),
        "only UNAVAILABLE during the outage, got {codes:?}"
    );
    let acked = acked.lock().unwrap().clone();
    for chunk in acked.chunks(1000) {
        let resp = t
            .client
            .clone()
            .batch_get(BatchGetRequest {
                collection: "load".into(),
                ids: chunk.to_vec(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(
            resp.missing_ids.is_empty(),
            "acknowledged writes lost: {:?}",
            resp.missing_ids
        );
    }
    eprintln!(
        "outage: {} writes acknowledged ({before_outage} before the outage), error codes {codes:?}",
        acked.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exhausted_pool_answers_unavailable_and_deadlines_cancel_queries() {
    let Some(url) = postgres_url().await else {
        return;
    };
    let t = TestServer::start_at(
        Backend::Postgres,
        Some(&url),
        &["--db-pool-size", "2", "--db-acquire-timeout", "0.5"],
    )
    .await;
    t.client.clone().save(save("locked", "a")).await.unwrap();

    // Another session locks the table: the sidecar's reads of it block.
    let mut admin = pg_connect(&url).await;
    let tx = admin.transaction().await.unwrap();
    tx.batch_execute(&format!(
        "LOCK TABLE \"{}\".locked IN ACCESS EXCLUSIVE MODE",
        t.pg_schema()
    ))
    .await
    .unwrap();

    let mut calls = Vec::new();
    for _ in 0..6 {
        let mut client = t.client.clone();
        calls.push(tokio::spawn(async move {
            let started = Instant::now();
            let result = client.get(get("locked", "a")).await;
            (result.map(|_| ()).map_err(|s| s.code()), started.elapsed())
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // A call with a deadline while the pool is still taken.
    let mut request = tonic::Request::new(get("locked", "a"));
    request.set_timeout(Duration::from_millis(300));
    let started = Instant::now();
    let status = t.client.clone().get(request).await.unwrap_err();
    assert_deadline(&status);
    assert!(
        started.elapsed() < Duration::from_millis(600),
        "{:?}",
        started.elapsed()
    );

    tx.rollback().await.unwrap();
    let mut unavailable = 0;
    let mut ok = 0;
    for call in calls {
        match call.await.unwrap() {
            (Err(Code::Unavailable), took) => {
                assert!(
                    took < Duration::from_secs(2),
                    "UNAVAILABLE after the acquire timeout, not a hang ({took:?})"
                );
                unavailable += 1;
            }
            (Ok(()), _) => ok += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        (ok, unavailable),
        (2, 4),
        "two calls held the two connections, four timed out"
    );

    // A deadline cancels the query on the server: nothing of it lingers.
    let tx = admin.transaction().await.unwrap();
    tx.batch_execute(&format!(
        "LOCK TABLE \"{}\".locked IN ACCESS EXCLUSIVE MODE",
        t.pg_schema()
    ))
    .await
    .unwrap();
    let mut request = tonic::Request::new(get("locked", "a"));
    request.set_timeout(Duration::from_millis(300));
    assert_deadline(&t.client.clone().get(request).await.unwrap_err());
    let probe = pg_connect(&url).await;
    let schema = t.pg_schema().to_string();
    eventually(
        "the abandoned query is cancelled",
        Duration::from_secs(3),
        || {
            let (probe, schema) = (&probe, schema.clone());
            async move {
                let waiting: i64 = probe
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'docsidecar' \
                     AND state = 'active' AND query LIKE '%' || $1 || '%'",
                    &[&schema],
                )
                .await
                .unwrap()
                .get(0);
                waiting == 0
            }
        },
    )
    .await;
    tx.rollback().await.unwrap();
    // And the pool is healthy afterwards.
    t.client.clone().get(get("locked", "a")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rotated_password_is_picked_up_without_a_failed_call() {
    let Some(cluster) = Cluster::start("scram-sha-256") else {
        return;
    };
    let admin = pg_connect(&cluster.url("postgres")).await;
    admin
        .batch_execute("CREATE ROLE app LOGIN PASSWORD 'first-s3cret'; GRANT CREATE ON DATABASE postgres TO app;")
        .await
        .unwrap();
    let pass_file = cluster.dir().join("app-password");
    std::fs::write(&pass_file, "first-s3cret\n").unwrap();
    let port = cluster.port.to_string();
    let t = TestServer::start_at(
        Backend::Postgres,
        Some(&format!("postgres://app@127.0.0.1:{port}/postgres")),
        &[
            "--db-pass-file",
            pass_file.to_str().unwrap(),
            "--db-pool-size",
            "3",
        ],
    )
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let mut load = Vec::new();
    for w in 0..3 {
        let (mut client, stop, failures) = (t.client.clone(), stop.clone(), failures.clone());
        load.push(tokio::spawn(async move {
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                if let Err(s) = client.save(save("rotation", &format!("w{w}-{n}"))).await {
                    failures
                        .lock()
                        .unwrap()
                        .push(format!("{:?}: {}", s.code(), s.message()));
                }
                n += 1;
            }
            n
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The DBA changes the password, then the Secret (the file) follows.
    admin
        .batch_execute("ALTER ROLE app PASSWORD 'second-s3cret'")
        .await
        .unwrap();
    let rotated_at: std::time::SystemTime =
        admin.query_one("SELECT now()", &[]).await.unwrap().get(0);
    std::fs::write(cluster.dir().join("app-password.new"), "second-s3cret\n").unwrap();
    std::fs::rename(cluster.dir().join("app-password.new"), &pass_file).unwrap();

    // Eventually every connection of the sidecar was opened after the rotation,
    // that is, with the new password; the old ones retired.
    eventually("old connections retire", Duration::from_secs(10), || {
        let admin = &admin;
        async move {
            let row = admin
                .query_one(
                    "SELECT count(*) FILTER (WHERE backend_start < $1), count(*) FILTER (WHERE backend_start >= $1)
                     FROM pg_stat_activity WHERE usename = 'app'",
                    &[&rotated_at],
                )
                .await
                .unwrap();
            let (old, new): (i64, i64) = (row.get(0), row.get(1));
            old == 0 && new > 0
        }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let mut calls = 0;
    for l in load {
        calls += l.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "calls failed during the rotation: {failures:?}"
    );
    eprintln!("password rotation: {calls} calls, none failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_lets_in_flight_calls_finish_within_the_grace_period() {
    use common::sidecar::Sidecar;
    let Some(url) = postgres_url().await else {
        return;
    };
    let schema = format!("t_{}", uuid::Uuid::now_v7().simple());
    let dir = tempfile::tempdir().unwrap();
    let mut admin = pg_connect(&url).await;
    let start = |dir: &std::path::Path| {
        Sidecar::spawn_with(
            &[
                "--listen",
                "127.0.0.1:0",
                "--database-url",
                &url,
                "--schema",
                &schema,
            ],
            dir,
            &[("DOCSIDECAR_SHUTDOWN_GRACE", "2")],
        )
    };

    // 1. A call blocked in the database when SIGTERM arrives completes, then exit 0.
    let mut sidecar = start(dir.path());
    let addr = sidecar.listening();
    let mut c = Client::connect(format!("http://{addr}")).await.unwrap();
    c.save(save("locked", "a")).await.unwrap();
    let tx = admin.transaction().await.unwrap();
    tx.batch_execute(&format!(
        "LOCK TABLE \"{schema}\".locked IN ACCESS EXCLUSIVE MODE"
    ))
    .await
    .unwrap();
    let in_flight = {
        let mut c = c.clone();
        tokio::spawn(async move { c.get(get("locked", "a")).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    sidecar.signal("TERM");
    tokio::time::sleep(Duration::from_millis(700)).await;
    tx.rollback().await.unwrap();
    let doc = in_flight
        .await
        .unwrap()
        .expect("the in-flight call completes during the drain");
    assert_eq!(doc.into_inner().id, "a");
    let (status, logs) = sidecar.wait().await;
    assert_eq!(status.code(), Some(0), "{logs:#?}");

    // 2. A call still blocked when the grace period ends fails cleanly; exit 0 on time.
    let mut sidecar = start(dir.path());
    let addr = sidecar.listening();
    let c = Client::connect(format!("http://{addr}")).await.unwrap();
    let tx = admin.transaction().await.unwrap();
    tx.batch_execute(&format!(
        "LOCK TABLE \"{schema}\".locked IN ACCESS EXCLUSIVE MODE"
    ))
    .await
    .unwrap();
    let stuck = {
        let mut c = c.clone();
        tokio::spawn(async move { c.get(get("locked", "a")).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let signalled = Instant::now();
    sidecar.signal("TERM");
    let (status, logs) = sidecar.wait().await;
    let took = signalled.elapsed();
    assert_eq!(status.code(), Some(0), "{logs:#?}");
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(5),
        "exit after the grace period: {took:?}"
    );
    assert!(logs.join("\n").contains("grace period over"), "{logs:#?}");
    let result = tokio::time::timeout(Duration::from_secs(5), stuck)
        .await
        .expect("no hang")
        .unwrap();
    let status = result.expect_err("the abandoned call fails");
    assert_eq!(
        status.code(),
        Code::Unavailable,
        "retryable: {}",
        status.message()
    );
    tx.rollback().await.unwrap();
    admin
        .batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .await
        .unwrap();
}

/// Drops a test's schema when the test ends, also when it fails.
struct DropSchema {
    url: String,
    schema: String,
}

impl Drop for DropSchema {
    fn drop(&mut self) {
        let (url, schema) = (self.url.clone(), self.schema.clone());
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async {
                    if let Ok((client, conn)) =
                        tokio_postgres::connect(&url, tokio_postgres::NoTls).await
                    {
                        tokio::spawn(conn);
                        let _ = client
                            .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
                            .await;
                    }
                });
        })
        .join();
    }
}

/// Waits until `n` of the sidecar's queries wait for a lock in `schema`.
async fn lock_waiters(probe: &tokio_postgres::Client, schema: &str, n: i64) {
    let schema = schema.to_string();
    eventually(
        "queries waiting for the lock",
        Duration::from_secs(30),
        || {
            let schema = schema.clone();
            async move {
                let waiting: i64 = probe
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'docsidecar' \
                     AND wait_event_type = 'Lock' AND query LIKE '%' || $1 || '%'",
                    &[&schema],
                )
                .await
                .unwrap()
                .get(0);
                waiting == n
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_busy_pool_leaves_the_sidecar_ready_and_shows_in_metrics() {
    use common::sidecar::{http, metrics, sample, Sidecar};
    let Some(url) = postgres_url().await else {
        return;
    };
    let schema = format!("t_{}", uuid::Uuid::now_v7().simple());
    let _drop = DropSchema {
        url: url.clone(),
        schema: schema.clone(),
    };
    let dir = tempfile::tempdir().unwrap();
    let mut sidecar = Sidecar::spawn(
        &[
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--database-url",
            &url,
            "--schema",
            &schema,
            "--db-pool-size",
            "2",
            "--db-acquire-timeout",
            "0.3",
            "--health-interval",
            "0.1",
        ],
        dir.path(),
    );
    let addr = sidecar.listening();
    let admin_addr = sidecar.admin.clone().unwrap();
    let c = Client::connect(format!("http://{addr}")).await.unwrap();
    c.clone().save(save("slow", "a")).await.unwrap();

    // Two slow calls hold both pooled connections: they wait on a lock.
    let mut admin = pg_connect(&url).await;
    let probe = pg_connect(&url).await;
    let tx = admin.transaction().await.unwrap();
    tx.batch_execute(&format!(
        "LOCK TABLE \"{schema}\".slow IN ACCESS EXCLUSIVE MODE"
    ))
    .await
    .unwrap();
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let mut c = c.clone();
            tokio::spawn(async move { c.get(get("slow", "a")).await })
        })
        .collect();
    lock_waiters(&probe, &schema, 2).await;

    // Saturated: a third call gives up waiting for a connection.
    let status = c.clone().get(get("slow", "a")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    // Health checks keep succeeding while the pool stays held.
    let before = metrics(&admin_addr).await;
    let ok = |m: &std::collections::BTreeMap<String, f64>| {
        sample(m, r#"docsidecar_health_checks_total{result="ok"}"#)
    };
    let started = Instant::now();
    let after = loop {
        let m = metrics(&admin_addr).await;
        if ok(&m) >= ok(&before) + 3.0 {
            break m;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{m:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    lock_waiters(&probe, &schema, 2).await;
    assert_eq!(
        sample(&after, r#"docsidecar_health_checks_total{result="failed"}"#),
        0.0,
        "{after:#?}"
    );
    assert!(sample(&after, "docsidecar_pool_acquire_timeouts_total") >= 1.0);
    let (status, body) = http(&admin_addr, "GET", "/readyz").await;
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    let mut health = HealthClient::new(
        tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let serving = health
        .check(HealthCheckRequest {
            service: "docsidecar.v1.DocumentService".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status();
    assert_eq!(serving, ServingStatus::Serving);

    tx.rollback().await.unwrap();
    for call in slow {
        call.await.unwrap().expect("the slow calls complete");
    }
    sidecar.signal("TERM");
    assert_eq!(sidecar.wait().await.0.code(), Some(0));
}

#[tokio::test]
async fn permanent_start_up_errors_fail_at_once_and_transient_ones_are_retried() {
    use common::sidecar::Sidecar;
    let Some(url) = postgres_url().await else {
        return;
    };
    let cfg: tokio_postgres::Config = url.parse().unwrap();
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    let password = cfg
        .get_password()
        .map(|p| format!(":{}", String::from_utf8_lossy(p)))
        .unwrap_or_default();
    let u = &uuid::Uuid::now_v7().simple().to_string()[20..];
    let dir = tempfile::tempdir().unwrap();
    // (The reasons as the JSON log lines quote them; a server that asks for
    // passwords does not say whether the role exists.)
    let cases = [
        (
            format!("postgres://no_such_role_{u}:x@127.0.0.1:{port}/test"),
            [
                format!("role \\\"no_such_role_{u}\\\" does not exist"),
                format!("authentication failed for user \\\"no_such_role_{u}\\\""),
            ],
        ),
        (
            format!("postgres://postgres{password}@127.0.0.1:{port}/no_such_db_{u}"),
            [
                format!("database \\\"no_such_db_{u}\\\" does not exist"),
                format!("database \\\"no_such_db_{u}\\\" does not exist"),
            ],
        ),
    ];
    for (database_url, reasons) in cases {
        // A retry would wait an hour: only failing at once passes.
        let sidecar = Sidecar::spawn_with(
            &["--listen", "127.0.0.1:0"],
            dir.path(),
            &[
                ("DATABASE_URL", &database_url),
                ("DB_MAX_RETRIES", "20"),
                ("DB_RETRY_DELAY", "3600"),
            ],
        );
        let (status, logs) = sidecar.wait().await;
        let logs = logs.join("\n");
        assert_ne!(status.code(), Some(0), "{logs}");
        assert!(reasons.iter().any(|r| logs.contains(r.as_str())), "{logs}");
        assert!(logs.contains("not retried"), "{logs}");
        assert!(!logs.contains("retrying"), "{logs}");
    }
    // A refused port can heal: retried, then given up after the attempts.
    let sidecar = Sidecar::spawn_with(
        &["--listen", "127.0.0.1:0"],
        dir.path(),
        &[
            ("DATABASE_URL", "postgres://app@127.0.0.1:1/app"),
            ("DB_MAX_RETRIES", "2"),
            ("DB_RETRY_DELAY", "0.01"),
        ],
    );
    let (status, logs) = sidecar.wait().await;
    let logs = logs.join("\n");
    assert_ne!(status.code(), Some(0), "{logs}");
    assert!(logs.contains("not reachable yet; retrying"), "{logs}");
    assert!(logs.contains("after 2 attempt(s)"), "{logs}");
}

/// Rows written outside the sidecar that are not JSON objects, or whose
/// times are out of range, do not hide the other documents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_rows_do_not_hide_the_others() {
    let Some(url) = postgres_url().await else {
        return;
    };
    let t = TestServer::start_at(Backend::Postgres, Some(&url), &[]).await;
    let mut c = t.client.clone();
    for id in ["a", "c"] {
        c.save(save("mixed", id)).await.unwrap();
    }
    let admin = pg_connect(&url).await;
    let schema = t.pg_schema();
    admin
        .batch_execute(&format!(
            "INSERT INTO \"{schema}\".mixed (id, rev, data, create_time, update_time)
               VALUES ('b', 'r', '[1, 2]', 0, 0), ('d', 'r', '{{}}', -9223372036854775807, 9223372036854775807)"
        ))
        .await
        .unwrap();
    let page = c
        .list(ListRequest {
            collection: "mixed".into(),
            page_size: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // "b" is left out, and the walk goes on past it.
    assert_eq!(
        page.documents
            .iter()
            .map(|d| d.id.as_str())
            .collect::<Vec<_>>(),
        ["a"]
    );
    let rest = c
        .list(ListRequest {
            collection: "mixed".into(),
            page_token: page.next_page_token,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<&str> = rest.documents.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["c", "d"]);
    // Times out of range are clamped to what a Timestamp can hold.
    let d = &rest.documents[1];
    assert_eq!(d.create_time.unwrap().seconds, -62_135_596_800);
    assert_eq!(d.update_time.unwrap().seconds, 253_402_300_799);
    let status = c.get(get("mixed", "b")).await.unwrap_err();
    assert_eq!(status.code(), Code::Internal);
    assert!(
        status.message().contains("`b`") && status.message().contains("mixed"),
        "{}",
        status.message()
    );
}
