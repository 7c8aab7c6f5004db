//! Test harness: a real docsidecar server on an ephemeral port, one fresh
//! database per test, and a gRPC client talking to it as users do.
#![allow(dead_code)]

pub mod cluster;
pub mod galera;
pub mod load;
pub mod mariadb;
pub mod pg_pair;
pub mod pg_roles;
pub mod pki;
pub mod procs;
pub mod sidecar;

use clap::Parser;
use docsidecar::config::Cli;
use docsidecar::proto::document_service_client::DocumentServiceClient;
use docsidecar::server::Server;
use prost_types::{value::Kind, ListValue, Struct, Value};
use std::future::Future;
use tokio::sync::oneshot;
use tonic::transport::Channel;

pub type Client = DocumentServiceClient<Channel>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Memory,
    Sqlite,
    Postgres,
    /// The local MariaDB, a fresh database per test (tests/common/mariadb.rs).
    Mariadb,
}

/// A running server and a client for it.
pub struct TestServer {
    pub client: Client,
    /// `http://host:port` of the server.
    pub local_addr: String,
    /// `host:port` of the admin listener, when `--admin-listen` was given.
    pub admin: Option<String>,
    pub channel: Channel,
    pub backend: Backend,
    /// The server's clock: move it to cross an expiry without waiting.
    pub clock: docsidecar::store::Clock,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
    pg_url: Option<String>,
    pg_schema: Option<String>,
    /// The database URL the server was given.
    database_url: String,
    /// The test's own MariaDB database, dropped with the server.
    maria: Option<mariadb::MariaDb>,
}

/// The PostgreSQL server of the test run, or `None` to skip. With
/// `DOCSIDECAR_REQUIRE_DB=1` (CI) an unreachable server fails the test instead.
pub async fn postgres_url() -> Option<String> {
    let url = std::env::var("DOCSIDECAR_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
        Ok((client, conn)) => {
            drop(client);
            drop(conn);
            Some(url)
        }
        Err(e) => {
            if std::env::var("DOCSIDECAR_REQUIRE_DB").is_ok_and(|v| v == "1") {
                panic!("DOCSIDECAR_REQUIRE_DB=1 but PostgreSQL is unreachable: {e}");
            }
            eprintln!("skipped: no PostgreSQL ({e}); set DOCSIDECAR_TEST_POSTGRES_URL");
            None
        }
    }
}

fn init_logs() {
    // Silent unless asked: TEST_LOG=1 cargo test
    if std::env::var_os("TEST_LOG").is_some() {
        docsidecar::telemetry::init(docsidecar::config::LogFormat::Text);
    }
}

impl TestServer {
    /// Starts a server on `backend` with extra command-line flags; `None` when
    /// the backend is unavailable (PostgreSQL outside CI).
    pub async fn start(backend: Backend, extra: &[&str]) -> Option<TestServer> {
        let url = match backend {
            Backend::Postgres => Some(postgres_url().await?),
            Backend::Mariadb => {
                let db = mariadb::MariaDb::create().await?;
                let mut server = Self::start_at(backend, Some(&db.url), extra).await;
                server.maria = Some(db);
                return Some(server);
            }
            _ => None,
        };
        Some(Self::start_at(backend, url.as_deref(), extra).await)
    }

    /// Starts a server on `backend`; PostgreSQL needs `pg_url` and gets a fresh
    /// schema; MariaDB needs the URL of its database in `pg_url`.
    pub async fn start_at(backend: Backend, pg_url: Option<&str>, extra: &[&str]) -> TestServer {
        init_logs();
        let dir = tempfile::tempdir().expect("temp dir");
        let mut pg_schema = None;
        let url = match backend {
            Backend::Memory => "memory://".to_string(),
            // A given URL shares one file between servers (and restarts).
            Backend::Sqlite => pg_url
                .map(String::from)
                .unwrap_or_else(|| format!("sqlite://{}", dir.path().join("test.db").display())),
            Backend::Postgres => {
                pg_schema = Some(format!("t_{}", uuid::Uuid::now_v7().simple()));
                pg_url.expect("a PostgreSQL URL").to_string()
            }
            Backend::Mariadb => pg_url.expect("a MariaDB database URL").to_string(),
        };
        let mut args = vec![
            "docsidecar",
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            url.as_str(),
        ];
        let schema_flag;
        if extra.contains(&"--schema") {
            // The test manages its schema itself.
            pg_schema = None;
        } else if let Some(schema) = &pg_schema {
            schema_flag = schema.clone();
            args.extend(["--schema", schema_flag.as_str()]);
        }
        args.extend(extra);
        let cli = Cli::try_parse_from(args).expect("test flags parse");
        let config = cli.serve.resolve().expect("test settings resolve");
        let server = Server::bind(config).await.expect("server starts");
        let addr = format!("http://{}", server.local_addr());
        let clock = server.clock();
        let admin = server.admin_addr().map(|a| a.to_string());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server
                .run_until(async {
                    let _ = stopped.await;
                    docsidecar::server::Stop::Immediate
                })
                .await
                .expect("server runs");
        });
        // Lazy: a TLS server refuses a plain handshake; TLS tests dial their own.
        let addr_for_tests = addr.clone();
        let channel = Channel::from_shared(addr).unwrap().connect_lazy();
        TestServer {
            local_addr: addr_for_tests,
            admin,
            client: DocumentServiceClient::new(channel.clone()),
            channel,
            backend,
            clock,
            stop: Some(stop),
            task: Some(task),
            _dir: dir,
            pg_url: pg_url.map(String::from),
            pg_schema,
            database_url: url,
            maria: None,
        }
    }

    /// Another server on this one's database (another service sharing it),
    /// with its own flags; the first server keeps owning the database. The
    /// memory store lives in one process and cannot be shared.
    pub async fn share(&self, extra: &[&str]) -> TestServer {
        let mut args: Vec<&str> = Vec::new();
        if let Some(schema) = &self.pg_schema {
            args.extend(["--schema", schema.as_str()]);
        }
        args.extend(extra);
        assert_ne!(
            self.backend,
            Backend::Memory,
            "the memory store cannot be shared"
        );
        Self::start_at(self.backend, Some(&self.database_url), &args).await
    }

    /// The PostgreSQL schema of this test's collections.
    pub fn pg_schema(&self) -> &str {
        self.pg_schema.as_deref().expect("a PostgreSQL test server")
    }

    /// Stops the server gracefully and waits for it.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("server task");
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
        // Each PostgreSQL test has its own schema; remove it whatever the outcome.
        if let Some(schema) = self.pg_schema.take() {
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    let url = std::env::var("DOCSIDECAR_TEST_POSTGRES_URL")
                        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
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
}

/// A plain PostgreSQL connection for a test's own checks.
pub async fn pg_connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connects");
    tokio::spawn(conn);
    client
}

/// Runs one behaviour case against a fresh server on `backend`.
pub async fn run<F, Fut>(backend: Backend, case: F)
where
    F: FnOnce(TestServer) -> Fut,
    Fut: Future<Output = ()>,
{
    if let Some(server) = TestServer::start(backend, &[]).await {
        case(server).await;
    }
}

// JSON-building helpers for Structs.

pub fn null() -> Value {
    Value {
        kind: Some(Kind::NullValue(0)),
    }
}
pub fn num(n: f64) -> Value {
    Value {
        kind: Some(Kind::NumberValue(n)),
    }
}
pub fn string(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.into())),
    }
}
pub fn boolean(b: bool) -> Value {
    Value {
        kind: Some(Kind::BoolValue(b)),
    }
}
pub fn list(values: Vec<Value>) -> Value {
    Value {
        kind: Some(Kind::ListValue(ListValue { values })),
    }
}
pub fn object(fields: Vec<(&str, Value)>) -> Struct {
    Struct {
        fields: fields
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    }
}
pub fn nested(s: Struct) -> Value {
    Value {
        kind: Some(Kind::StructValue(s)),
    }
}
pub fn number_field(s: &Struct, key: &str) -> f64 {
    match s.fields.get(key).and_then(|v| v.kind.as_ref()) {
        Some(Kind::NumberValue(n)) => *n,
        other => panic!("field {key} is not a number: {other:?}"),
    }
}
