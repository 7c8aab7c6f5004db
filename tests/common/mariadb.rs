//! MariaDB for tests: the local server of the test run ([`mariadb_url`]) with
//! a fresh database per test ([`MariaDb`]), and private servers started by the
//! tests ([`MariaServer`], optionally with TLS from a test CA), built from
//! [`MariaNode`], which the Galera harness uses too.

use super::pki::{ServerCert, TlsFiles};
use super::procs::{self, Guarded};
use mysql_async::prelude::*;
use mysql_async::{Conn, Opts, OptsBuilder, SslOpts};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The MariaDB/MySQL server of the test run, or `None` to skip. With
/// `DOCSIDECAR_REQUIRE_DB=1` (CI) an unreachable server fails the test instead.
pub async fn mariadb_url() -> Option<String> {
    let url = std::env::var("DOCSIDECAR_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into());
    let opts = match Opts::from_url(&url) {
        Ok(o) => o,
        Err(e) => panic!("DOCSIDECAR_TEST_MYSQL_URL {url:?}: {e}"),
    };
    match ping(plain(opts)).await {
        Ok(()) => Some(url),
        Err(e) => procs::skip(&format!(
            "MariaDB is unreachable ({e}); set DOCSIDECAR_TEST_MYSQL_URL"
        )),
    }
}

/// `opts` as the harness uses them: TCP only (mysql_async would otherwise
/// switch to the server's unix socket, bypassing TLS), short connect timeout.
fn plain(opts: Opts) -> Opts {
    OptsBuilder::from_opts(opts).prefer_socket(false).into()
}

/// Connects with a 10 s limit.
pub async fn connect(opts: Opts) -> Result<Conn, String> {
    match tokio::time::timeout(Duration::from_secs(10), Conn::new(opts)).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err("connect timed out".into()),
    }
}

/// Connects, retrying for up to `within` (each failure is logged): for a
/// node that may be briefly unavailable, e.g. a Galera node around a view
/// change (mysql_async runs a query while connecting).
pub async fn connect_retry(opts: Opts, within: Duration) -> Conn {
    procs::poll("a MariaDB connection", within, || async {
        connect(opts.clone()).await.inspect_err(|e| {
            eprintln!(
                "connecting to {}:{} failed (retrying): {e}",
                opts.ip_or_hostname(),
                opts.tcp_port()
            )
        })
    })
    .await
    .unwrap()
}

async fn ping(opts: Opts) -> Result<(), String> {
    let mut conn = connect(opts).await?;
    let one: Option<i64> = conn
        .query_first("SELECT 1")
        .await
        .map_err(|e| e.to_string())?;
    let _ = conn.disconnect().await;
    if one == Some(1) {
        Ok(())
    } else {
        Err(format!("SELECT 1 returned {one:?}"))
    }
}

/// `mysql://user[:pass]@host:port[/db]` for `opts` (no TLS parameters).
fn url_of(opts: &Opts, db: Option<&str>) -> String {
    let user = opts.user().unwrap_or("root");
    let auth = match opts.pass() {
        Some(p) if !p.is_empty() => format!("{user}:{p}"),
        _ => user.to_string(),
    };
    let mut url = format!(
        "mysql://{auth}@{}:{}",
        opts.ip_or_hostname(),
        opts.tcp_port()
    );
    if let Some(db) = db {
        url.push('/');
        url.push_str(db);
    }
    url
}

/// A database of its own for one test (`t_<uuid>`), dropped when this value
/// is dropped, also when the test panics.
pub struct MariaDb {
    /// The database name.
    pub name: String,
    /// `mysql://user@host:port/<name>` (no TLS parameters).
    pub url: String,
    opts: Opts,
}

impl MariaDb {
    /// A fresh database on the server of the test run; `None` to skip.
    pub async fn create() -> Option<MariaDb> {
        let url = mariadb_url().await?;
        Some(Self::create_at(&url).await)
    }

    /// A fresh database on the server at `url`.
    pub async fn create_at(url: &str) -> MariaDb {
        Self::create_on(Opts::from_url(url).unwrap()).await
    }

    /// A fresh database on the server `opts` reach (TLS options included).
    pub async fn create_on(opts: Opts) -> MariaDb {
        let opts = plain(opts);
        let name = format!("t_{}", uuid::Uuid::now_v7().simple());
        let mut conn = connect_retry(opts.clone(), Duration::from_secs(30)).await;
        conn.query_drop(format!("CREATE DATABASE `{name}`"))
            .await
            .unwrap();
        let _ = conn.disconnect().await;
        MariaDb {
            url: url_of(&opts, Some(&name)),
            opts: OptsBuilder::from_opts(opts).db_name(Some(&name)).into(),
            name,
        }
    }

    /// Connection options for this database.
    pub fn opts(&self) -> Opts {
        self.opts.clone()
    }

    /// A connection to this database (retried for up to 30 s).
    pub async fn conn(&self) -> Conn {
        connect_retry(self.opts(), Duration::from_secs(30)).await
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        let (opts, name) = (self.opts.clone(), self.name.clone());
        // Dropped inside a test's runtime: do the async work on a thread of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let opts = OptsBuilder::from_opts(opts).db_name(None::<String>);
                if let Ok(mut conn) = connect(opts.into()).await {
                    let drop = conn.query_drop(format!("DROP DATABASE IF EXISTS `{name}`"));
                    let _ = tokio::time::timeout(Duration::from_secs(30), drop).await;
                    let _ = conn.disconnect().await;
                }
            });
        })
        .join();
    }
}

/// The installed MariaDB server binaries.
#[derive(Clone, Debug)]
pub struct MariaTools {
    pub mariadbd: PathBuf,
    pub install_db: PathBuf,
    /// Root runs the servers as `mysql` (`--user=mysql`), in directories it owns.
    pub as_mysql: bool,
}

fn find_exe(names: &[&str], dirs: &[&str]) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let dirs = dirs.iter().copied().chain(path.split(':'));
    for dir in dirs {
        for name in names {
            let p = Path::new(dir).join(name);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

impl MariaTools {
    /// The server binaries, or `None` (skip; a failure under `DOCSIDECAR_REQUIRE_DB=1`).
    pub fn find() -> Option<MariaTools> {
        let sbin = ["/usr/sbin", "/usr/local/sbin", "/usr/bin", "/usr/local/bin"];
        let Some(mariadbd) = find_exe(&["mariadbd", "mysqld"], &sbin) else {
            return procs::skip("no mariadbd (install mariadb-server)");
        };
        let Some(install_db) = find_exe(&["mariadb-install-db", "mysql_install_db"], &sbin) else {
            return procs::skip("no mariadb-install-db (install mariadb-server)");
        };
        let as_mysql = procs::is_root();
        if as_mysql
            && !Command::new("id")
                .arg("mysql")
                .output()
                .is_ok_and(|o| o.status.success())
        {
            return procs::skip("running as root, but there is no `mysql` user");
        }
        Some(MariaTools {
            mariadbd,
            install_db,
            as_mysql,
        })
    }

    pub fn user(&self) -> Option<&'static str> {
        self.as_mysql.then_some("mysql")
    }

    /// `mariadb-install-db` into `datadir`: system tables, and `root` without a
    /// password (over TCP too: the harness's nodes are on loopback only).
    pub fn install(&self, datadir: &Path) {
        let mut cmd = Command::new(&self.install_db);
        cmd.arg("--no-defaults")
            .arg(format!("--datadir={}", datadir.display()))
            .args([
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                "--innodb-log-file-size=8M",
            ]);
        if self.as_mysql {
            cmd.arg("--user=mysql");
        }
        let out = cmd.output().expect("mariadb-install-db runs");
        assert!(
            out.status.success(),
            "mariadb-install-db failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The server settings of every harness node: loopback only, small and fast
/// (test data: no flush at commit), its own socket, pid file and log.
pub fn base_cnf(dir: &Path, port: u16) -> String {
    let d = dir.display();
    format!(
        "[mysqld]
datadir={d}/data
socket={d}/mariadbd.sock
pid-file={d}/mariadbd.pid
log-error={d}/error.log
tmpdir={d}
port={port}
bind-address=127.0.0.1
skip-name-resolve
default_storage_engine=InnoDB
innodb_buffer_pool_size=32M
innodb_log_file_size=8M
innodb_flush_log_at_trx_commit=2
performance_schema=OFF
max_connections=200
"
    )
}

/// The arguments of the server of node directory `dir`, before `extra`.
fn server_args(tools: &MariaTools, dir: &Path, extra: &[String]) -> Vec<String> {
    let mut args = vec![format!("--defaults-file={}", dir.join("my.cnf").display())];
    if tools.as_mysql {
        args.push("--user=mysql".into());
    }
    args.extend(extra.iter().cloned());
    args
}

/// Runs the server of node directory `dir` to completion with extra
/// arguments (`--wsrep-recover`), its log in `log`, and returns that log.
/// The node must not run meanwhile.
pub fn run_once(tools: &MariaTools, dir: &Path, extra: &[String], log: &Path) -> String {
    let _ = std::fs::remove_file(log);
    let mut extra = extra.to_vec();
    extra.push(format!("--log-error={}", log.display()));
    let out = Command::new(&tools.mariadbd)
        .args(server_args(tools, dir, &extra))
        .output()
        .expect("mariadbd runs");
    let text = std::fs::read_to_string(log).unwrap_or_default();
    assert!(
        out.status.success(),
        "mariadbd {extra:?} failed: {}{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// One MariaDB server: a directory with `my.cnf`, `data/`, `error.log`, and
/// the process (under a watchdog: it dies with the test process).
pub struct MariaNode {
    pub port: u16,
    pub dir: PathBuf,
    /// Client options (TCP; with TLS trusting the test CA when the node has TLS).
    pub opts: Opts,
    proc: Option<Guarded>,
}

impl MariaNode {
    /// Writes `dir/my.cnf` (the data directory `dir/data` must exist).
    pub fn new(tools: &MariaTools, dir: &Path, port: u16, cnf: &str, opts: Opts) -> MariaNode {
        std::fs::write(dir.join("my.cnf"), cnf).unwrap();
        if let Some(user) = tools.user() {
            procs::chown_r(user, dir);
        }
        MariaNode {
            port,
            dir: dir.to_path_buf(),
            opts,
            proc: None,
        }
    }

    pub fn error_log(&self) -> PathBuf {
        self.dir.join("error.log")
    }

    fn args(&self, tools: &MariaTools, extra: &[String]) -> Vec<String> {
        server_args(tools, &self.dir, extra)
    }

    /// Starts the server (under its watchdog), with extra arguments.
    pub fn spawn(&mut self, tools: &MariaTools, extra: &[String]) {
        assert!(
            !self.running(),
            "the node on port {} runs already",
            self.port
        );
        let args = self.args(tools, extra);
        self.proc = Some(Guarded::spawn(
            &tools.mariadbd,
            &args,
            &self.dir.join("stdout.log"),
        ));
    }

    /// Runs the server to completion with extra arguments; see [`run_once`].
    pub fn run_once(&self, tools: &MariaTools, extra: &[String], log: &Path) -> String {
        run_once(tools, &self.dir, extra, log)
    }

    pub fn running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(|p| p.running())
    }

    /// The server's pid, while it runs.
    pub fn pid(&mut self) -> Option<u32> {
        if self.running() {
            self.proc.as_ref().map(|p| p.pid)
        } else {
            None
        }
    }

    /// SIGKILLs the server and waits until it is gone.
    pub async fn kill(&mut self) {
        if let Some(p) = self.proc.as_mut() {
            p.kill().await;
        }
        self.proc = None;
    }

    /// SIGKILL without waiting (for `Drop`).
    pub fn kill_now(&mut self) {
        if let Some(mut p) = self.proc.take() {
            let _ = Command::new("kill")
                .args(["-9", &p.pid.to_string()])
                .status();
            let _ = p.watchdog.wait();
        }
    }

    /// Client options over the node's unix socket (root; no TLS there, and
    /// `require_secure_transport` accepts it).
    pub fn socket_opts(&self) -> Opts {
        OptsBuilder::default()
            .socket(Some(self.dir.join("mariadbd.sock").to_str().unwrap()))
            .user(Some("root"))
            .into()
    }

    /// A connection, or why not.
    pub async fn conn(&self) -> Result<Conn, String> {
        connect(self.opts.clone()).await
    }

    /// An error, with the end of the server's log, when the server has exited.
    pub fn check_alive(&mut self) -> Result<(), String> {
        if self.running() {
            Ok(())
        } else {
            Err(format!(
                "the MariaDB node on port {} exited; its log ends with:\n{}",
                self.port,
                procs::tail(&self.error_log(), 30)
            ))
        }
    }

    /// Waits until the server answers `SELECT 1` (or has exited: an error).
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            let last = match ping(self.opts.clone()).await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                return Err(format!(
                    "MariaDB on port {} not ready after {timeout:?}: {last}\n{}",
                    self.port,
                    procs::tail(&self.error_log(), 30)
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// TLS for a private server: `ssl_ca`, `ssl_cert`, `ssl_key` from a test CA.
#[derive(Clone, Copy, Debug, Default)]
pub struct MariaTlsOptions {
    /// `require_secure_transport = ON`: plain TCP connections are refused.
    pub required: bool,
    /// The certificate presented (read at start).
    pub cert: ServerCert,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct MariaServerOptions {
    pub tls: Option<MariaTlsOptions>,
}

/// A private MariaDB server on a free port: stopped (SIGKILL) and removed on drop.
pub struct MariaServer {
    pub node: MariaNode,
    dir: PathBuf,
    tls: Option<TlsFiles>,
}

impl MariaServer {
    /// Creates and starts a server; `None` (skip) when MariaDB is not installed.
    pub async fn start(opts: MariaServerOptions) -> Option<MariaServer> {
        let tools = MariaTools::find()?;
        let started = Instant::now();
        let dir = procs::fresh_dir("docsidecar-mariadb-", tools.user());
        procs::reap_on_exit(&format!(
            "sleep 2; rm -rf {}",
            procs::sh_quote(dir.to_str().unwrap())
        ));
        let port = procs::free_ports(1)[0];
        let data = dir.join("data");
        tools.install(&data);
        let mut cnf = base_cnf(&dir, port);
        let mut client = OptsBuilder::default()
            .ip_or_hostname("127.0.0.1")
            .tcp_port(port)
            .user(Some("root"))
            .prefer_socket(false);
        let mut tls = None;
        if let Some(t) = opts.tls {
            let files = TlsFiles::create(&dir, tools.user(), t.cert);
            cnf.push_str(&format!(
                "ssl_ca={}\nssl_cert={}\nssl_key={}\nrequire_secure_transport={}\n",
                files.ca_file.display(),
                files.cert_file.display(),
                files.key_file.display(),
                if t.required { "ON" } else { "OFF" },
            ));
            client = client.ssl_opts(Some(ssl_opts(&files.ca_file)));
            tls = Some(files);
        }
        let mut node = MariaNode::new(&tools, &dir, port, &cnf, client.into());
        node.spawn(&tools, &[]);
        if let Err(e) = node.wait_ready(Duration::from_secs(120)).await {
            panic!("{e}");
        }
        eprintln!("MariaDB server ready in {:.1?}", started.elapsed());
        Some(MariaServer { node, dir, tls })
    }

    pub fn port(&self) -> u16 {
        self.node.port
    }

    /// `mysql://root@127.0.0.1:<port>` (no TLS parameters).
    pub fn url(&self) -> String {
        format!("mysql://root@127.0.0.1:{}", self.node.port)
    }

    /// Client options: TCP, and when the server has TLS, verify-full against the test CA.
    pub fn opts(&self) -> Opts {
        self.node.opts.clone()
    }

    /// The TLS files; panics when the server was started without TLS.
    pub fn tls(&self) -> &TlsFiles {
        self.tls
            .as_ref()
            .expect("a MariaDB server started with TLS")
    }

    /// The CA certificate's path.
    pub fn ca_file(&self) -> &Path {
        &self.tls().ca_file
    }

    /// Presents another certificate from now on (`FLUSH SSL`, over the unix
    /// socket: the TCP client options may no longer verify).
    pub async fn set_server_cert(&self, cert: ServerCert) {
        self.tls().present(cert);
        let mut c = connect(self.node.socket_opts()).await.unwrap();
        c.query_drop("FLUSH SSL").await.unwrap();
        let _ = c.disconnect().await;
    }
}

/// mysql_async TLS options trusting only the CA in `ca_file`, host name
/// checked (verify-full; mysql_async's rustls backend).
pub fn ssl_opts(ca_file: &Path) -> SslOpts {
    SslOpts::default()
        .with_root_certs(vec![ca_file.to_path_buf().into()])
        .with_disable_built_in_roots(true)
}

impl Drop for MariaServer {
    fn drop(&mut self) {
        self.node.kill_now();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
