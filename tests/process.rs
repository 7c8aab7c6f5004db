//! The real binary as operators run it: start-up, configuration errors,
//! signals, persistence across restarts, Unix sockets.

mod common;

use common::sidecar::{Sidecar, BIN};
use common::*;
use docsidecar::proto::{mutation::Op, GetRequest, Mutation, SaveRequest, WriteRequest};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use tonic::transport::{Channel, Endpoint};

async fn client(addr: &str) -> Client {
    Client::connect(format!("http://{addr}"))
        .await
        .expect("connects")
}

fn save(id: &str, n: f64) -> SaveRequest {
    SaveRequest {
        collection: "notes".into(),
        id: id.into(),
        data: Some(object(vec![("n", num(n))]).into()),
        ..Default::default()
    }
}

#[tokio::test]
async fn sigterm_and_sigint_stop_gracefully_with_exit_code_zero() {
    for signal in ["TERM", "INT"] {
        let dir = tempfile::tempdir().unwrap();
        let mut sidecar = Sidecar::spawn(&["--listen", "127.0.0.1:0"], dir.path());
        let addr = sidecar.listening();
        client(&addr).await.save(save("a", 1.0)).await.unwrap();
        sidecar.signal(signal);
        let (status, logs) = sidecar.wait().await;
        assert_eq!(status.code(), Some(0), "SIG{signal}: {logs:#?}");
        let logs = logs.join("\n");
        assert!(logs.contains(&format!("SIG{signal} received")), "{logs}");
        assert!(logs.contains("WAL checkpointed"), "{logs}");
        // The default store is a SQLite file in the working directory.
        assert!(dir.path().join("docsidecar.db").exists());
    }
}

#[tokio::test]
async fn sqlite_documents_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let url = "sqlite://data.db";
    let mut revs = Vec::new();
    {
        let mut sidecar = Sidecar::spawn(
            &["--listen", "127.0.0.1:0", "--database-url", url],
            dir.path(),
        );
        let mut c = client(&sidecar.listening()).await;
        let mutations = (0..200)
            .map(|i| Mutation {
                op: Some(Op::Save(save(&format!("bulk-{i:03}"), f64::from(i)))),
            })
            .collect();
        c.write(WriteRequest { mutations }).await.unwrap();
        for i in 0..5 {
            revs.push(
                c.save(save(&format!("single-{i}"), 1.0))
                    .await
                    .unwrap()
                    .into_inner()
                    .rev,
            );
        }
        sidecar.signal("TERM");
        assert_eq!(sidecar.wait().await.0.code(), Some(0));
    }
    // A clean stop folds the WAL into the database file.
    let wal = dir.path().join("data.db-wal");
    assert!(!wal.exists() || std::fs::metadata(&wal).unwrap().len() == 0);

    let mut sidecar = Sidecar::spawn(
        &["--listen", "127.0.0.1:0", "--database-url", url],
        dir.path(),
    );
    let mut c = client(&sidecar.listening()).await;
    for (i, rev) in revs.iter().enumerate() {
        let doc = c
            .get(GetRequest {
                collection: "notes".into(),
                id: format!("single-{i}"),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(&doc.rev, rev);
    }
    let doc = c
        .get(GetRequest {
            collection: "notes".into(),
            id: "bulk-199".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(number_field(doc.data.as_ref().unwrap(), "n"), 199.0);
    sidecar.signal("TERM");
    let (status, logs) = sidecar.wait().await;
    assert_eq!(status.code(), Some(0));
    assert!(
        !logs.join("\n").contains("applied SQLite migration"),
        "the second start has nothing to migrate"
    );
}

#[tokio::test]
async fn serves_on_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("docsidecar.sock");
    let listen = format!("unix:{}", socket.display());
    let mut sidecar = Sidecar::spawn(
        &["--listen", &listen, "--database-url", "memory://"],
        dir.path(),
    );
    assert_eq!(sidecar.listening(), listen);

    let path = socket.clone();
    // The URI is required by the API but unused: the connector dials the socket.
    let channel: Channel = Endpoint::try_from("http://[::1]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .unwrap();
    let mut c = Client::new(channel);
    let saved = c.save(save("via-socket", 1.0)).await.unwrap().into_inner();
    assert!(saved.created);
    sidecar.signal("TERM");
    assert_eq!(sidecar.wait().await.0.code(), Some(0));
    assert!(!socket.exists(), "the socket file is removed at exit");
}

fn run(args: &[&str], envs: &[(&str, &str)]) -> (Option<i32>, String) {
    let out = Command::new(BIN)
        .args(args)
        .env_clear()
        .envs(envs.iter().copied())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

#[test]
fn help_documents_every_setting_with_its_variable() {
    let (code, help) = run(&["--help"], &[]);
    assert_eq!(code, Some(0));
    for var in [
        "DOCSIDECAR_LISTEN",
        "DATABASE_URL",
        "DATABASE_URL_FILE",
        "DB_TYPE",
        "DB_HOST",
        "DB_PORT",
        "DB_NAME",
        "DB_USER",
        "DB_PASS",
        "DB_PASS_FILE",
        "DB_POOL_SIZE",
        "DB_MAX_RETRIES",
        "DB_RETRY_DELAY",
        "DOCSIDECAR_SCHEMA",
        "DOCSIDECAR_LOG_FORMAT",
    ] {
        assert!(
            help.contains(&format!("env: {var}")),
            "--help lacks {var}:\n{help}"
        );
    }
    let (code, help) = run(&["migrate", "--help"], &[]);
    assert_eq!(code, Some(0));
    for var in [
        "MIGRATE_DATABASE_URL",
        "MIGRATE_DB_HOST",
        "MIGRATE_DB_PASS_FILE",
    ] {
        assert!(
            help.contains(&format!("env: {var}")),
            "migrate --help lacks {var}:\n{help}"
        );
    }
}

#[test]
fn bad_configuration_fails_clearly_without_leaking_secrets() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[("DATABASE_URL", "mongodb://root:hunter2@db/app")],
            "unsupported scheme `mongodb`",
        ),
        (
            &[("DATABASE_URL", "mysql://root:hunter2@db:notaport/app")],
            "is not a host, host:port",
        ),
        (
            &[("DATABASE_URL", "postgres://app:hunter2@db:notaport/app")],
            "not a valid PostgreSQL URL",
        ),
        (&[("DATABASE_URL", "sqlite://")], "names no file"),
        (
            &[("DATABASE_URL_FILE", "/nonexistent/secret")],
            "cannot read the database URL from /nonexistent/secret",
        ),
        (&[("DOCSIDECAR_LISTEN", "nowhere")], "is not HOST:PORT"),
        (&[("DB_TYPE", "oracle")], "oracle"),
        (&[("DB_HOST", "db"), ("DB_PASS", "hunter2")], "DB_TYPE"),
    ];
    for (envs, expected) in cases {
        let (code, out) = run(&[], envs);
        assert_ne!(code, Some(0), "{envs:?} should fail");
        assert!(
            out.contains(expected),
            "{envs:?}: `{out}` lacks `{expected}`"
        );
        assert!(!out.contains("hunter2"), "a password leaked: {out}");
    }
}

#[test]
fn migrate_prepares_a_sqlite_file_and_exits() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("m.db");
    let url = format!("sqlite://{}", db.display());
    let (code, out) = run(&["migrate"], &[("MIGRATE_DATABASE_URL", &url)]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("applied SQLite migration"), "{out}");
    let conn = rusqlite::Connection::open(&db).unwrap();
    let version: i64 = conn
        .query_row("SELECT max(version) FROM schema_migrations", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert!(version >= 1);
}

#[test]
fn a_malformed_policy_stops_start_up_at_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "service = \"api\"\n\n[collections.agents]\naccess = \"read-write-ish\"\n",
    )
    .unwrap();
    let (code, out) = run(
        &["--policy", policy.to_str().unwrap()],
        &[("DATABASE_URL", "memory://")],
    );
    assert_ne!(code, Some(0));
    assert!(
        out.contains("policy.toml") && out.contains("line 4"),
        "{out}"
    );
    assert!(out.contains("read-write-ish"), "{out}");
}

#[tokio::test]
async fn no_secret_reaches_the_logs_even_at_trace_level() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "tok-s3cret-1-aaaaaaaa\n").unwrap();
    std::fs::write(dir.path().join("pass"), "db-s3cret-2\n").unwrap();
    let mut child = Command::new(BIN)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--token-file",
            "token",
            "--database-url",
            "memory://",
        ])
        .current_dir(dir.path())
        .env_clear()
        .env("DOCSIDECAR_LOG_FORMAT", "json")
        .env("RUST_LOG", "trace")
        .env("DOCSIDECAR_SHUTDOWN_DELAY", "0")
        .env("DB_PASS_FILE", "pass")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut logs = Vec::new();
    let addr = loop {
        let line = lines.next().expect("serving line").unwrap();
        logs.push(line.clone());
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v["message"] == "serving docsidecar.v1.DocumentService" {
            break v["listen"].as_str().unwrap().to_string();
        }
    };
    let mut c = client(&addr).await;
    for token in ["tok-s3cret-1-aaaaaaaa", "wrong-s3cret-3-aaaaaaa"] {
        let mut request = tonic::Request::new(save("x", 1.0));
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        let _ = c.save(request).await;
    }
    drop(c);
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let rest = tokio::task::spawn_blocking(move || lines.map_while(Result::ok).collect::<Vec<_>>())
        .await
        .unwrap();
    logs.extend(rest);
    assert!(child.wait().unwrap().success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    let all = format!("{}\n{stderr}", logs.join("\n"));
    assert!(
        all.contains("UNAUTHENTICATED"),
        "the refused call is logged"
    );
    for secret in [
        "tok-s3cret-1-aaaaaaaa",
        "wrong-s3cret-3-aaaaaaa",
        "db-s3cret-2",
    ] {
        assert!(!all.contains(secret), "{secret} leaked into the logs");
    }
}

/// A channel to a sidecar's Unix socket.
async fn unix_client(socket: &std::path::Path) -> Client {
    let path = socket.to_path_buf();
    // The URI is required by the API but unused: the connector dials the socket.
    let channel: Channel = Endpoint::try_from("http://[::1]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .unwrap();
    Client::new(channel)
}

#[tokio::test]
async fn a_live_unix_socket_is_never_taken_over_and_a_stale_one_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("docsidecar.sock");
    let listen = format!("unix:{}", socket.display());
    let args = ["--listen", listen.as_str(), "--database-url", "memory://"];
    let mut first = Sidecar::spawn(&args, dir.path());
    first.listening();
    unix_client(&socket)
        .await
        .save(save("first", 1.0))
        .await
        .unwrap();

    // A second instance on the same path refuses to start.
    let second = Sidecar::spawn(&args, dir.path());
    let (status, logs) = second.wait().await;
    assert_ne!(status.code(), Some(0));
    let logs = logs.join("\n");
    assert!(
        logs.contains("another process is serving on this socket"),
        "{logs}"
    );
    // The first still serves on it.
    unix_client(&socket)
        .await
        .get(GetRequest {
            collection: "notes".into(),
            id: "first".into(),
            ..Default::default()
        })
        .await
        .unwrap();

    // Killed, the first leaves its socket file behind; a new instance replaces it.
    first.signal("KILL");
    let _ = first.wait().await;
    assert!(socket.exists(), "a killed process leaves its socket file");
    let mut third = Sidecar::spawn(&args, dir.path());
    third.listening();
    unix_client(&socket)
        .await
        .save(save("third", 3.0))
        .await
        .unwrap();
    third.signal("TERM");
    assert_eq!(third.wait().await.0.code(), Some(0));
}

#[tokio::test]
async fn the_policy_s_service_names_every_call_in_the_logs() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("policy.toml"),
        "service = \"backend-api\"\nauto_create = true\n[collections.notes]\naccess = \"read-write\"\n",
    )
    .unwrap();
    let mut sidecar = Sidecar::spawn_with(
        &[
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            "memory://",
            "--policy",
            "policy.toml",
        ],
        dir.path(),
        &[("RUST_LOG", "docsidecar=debug")],
    );
    let addr = sidecar.listening();
    let mut c = client(&addr).await;
    c.save(save("a", 1.0)).await.unwrap();
    let _ = c
        .get(GetRequest {
            collection: "other".into(),
            id: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    for method in ["Save", "Get"] {
        let line = sidecar.wait_for_log(&format!("for {method}"), |v| {
            v["message"] == "request" && v["span"]["method"] == method
        });
        assert_eq!(line["span"]["service"], "backend-api", "{line}");
        assert_eq!(
            line["span"]["grpc_service"], "docsidecar.v1.DocumentService",
            "{line}"
        );
    }
}

/// A SQLite file the sidecar cannot write stops start-up with the reason,
/// instead of serving and failing every write. As root (CI containers) file
/// modes do not bind, so the binary then runs as `nobody` through setpriv.
#[test]
fn a_read_only_sqlite_file_stops_start_up() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ro.db");
    rusqlite::Connection::open(&file)
        .unwrap()
        .execute_batch("PRAGMA journal_mode=WAL; CREATE TABLE t(x)")
        .unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o444)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o555)).unwrap();
    let root = std::fs::metadata("/proc/self").map(|m| {
        use std::os::unix::fs::MetadataExt;
        m.uid() == 0
    });
    // nobody may not reach the build directory (a checkout in a 0700 home):
    // it runs a copy of the binary.
    let bin_dir = tempfile::tempdir().unwrap();
    let bin = bin_dir.path().join("docsidecar");
    let mut command = if root.unwrap_or(false) {
        std::fs::copy(BIN, &bin).unwrap();
        std::fs::set_permissions(bin_dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&bin);
        c
    } else {
        Command::new(BIN)
    };
    let url = format!("sqlite://{}", file.display());
    let out = command
        .env_clear()
        .env("DATABASE_URL", &url)
        .env("DOCSIDECAR_LISTEN", "127.0.0.1:0")
        .output()
        .expect("setpriv runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_ne!(out.status.code(), Some(0), "it must not serve: {text}");
    assert!(
        text.contains("read-only") || text.contains("cannot be written"),
        "{text}"
    );
}
