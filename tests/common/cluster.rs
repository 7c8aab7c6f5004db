//! A private PostgreSQL cluster for tests that stop, restart or reconfigure the
//! server: initdb + pg_ctl from the installed binaries, on a free port, in a
//! directory of its own. initdb refuses to run as root, so as root the cluster
//! runs as the `postgres` user.
//!
//! Options: TLS with a test CA ([`TlsOptions`]); the building blocks
//! ([`PgTools`], [`PgNode`]) are shared with the replicated pair in `pg_pair.rs`.

pub use super::pki::{ServerCert, TlsFiles};
use super::procs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// The installed PostgreSQL binaries, and whether they must run as `postgres`.
#[derive(Clone, Debug)]
pub struct PgTools {
    pub bin: PathBuf,
    pub as_postgres: bool,
}

fn pg_bin() -> Option<PathBuf> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop()
}

impl PgTools {
    /// The newest installed version, or `None` (skip; a failure under
    /// `DOCSIDECAR_REQUIRE_DB=1`).
    pub fn find() -> Option<PgTools> {
        let Some(bin) = pg_bin() else {
            return procs::skip("no PostgreSQL binaries under /usr/lib/postgresql");
        };
        Some(PgTools {
            bin,
            as_postgres: procs::is_root(),
        })
    }

    fn command(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }

    /// Runs a tool (as `postgres` when root) and returns its output, whatever its status.
    pub fn try_run(&self, tool: &str, args: &[&str]) -> Output {
        self.command(tool)
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("{tool} does not start: {e}"))
    }

    /// Runs a tool; panics with its output when it fails.
    pub fn run(&self, tool: &str, args: &[&str]) -> Output {
        let out = self.try_run(tool, args);
        assert!(
            out.status.success(),
            "{tool} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Makes `path` (recursively) the server user's.
    pub fn own(&self, path: &Path) {
        if self.as_postgres {
            procs::chown_r("postgres", path);
        }
    }

    /// A detached cleanup for when this test process has gone: an immediate
    /// shutdown of the servers of `datas`, then `rm -rf dir`.
    pub fn reap_on_exit(&self, datas: &[&Path], dir: &Path) {
        let pg_ctl = procs::sh_quote(self.bin.join("pg_ctl").to_str().unwrap());
        let runas = if self.as_postgres {
            "runuser -u postgres -- "
        } else {
            ""
        };
        let mut script = String::new();
        for data in datas {
            script.push_str(&format!(
                "{runas}{pg_ctl} -D {} -m immediate -w -t 20 stop >/dev/null 2>&1; ",
                procs::sh_quote(data.to_str().unwrap())
            ));
        }
        script.push_str(&format!(
            "rm -rf {}",
            procs::sh_quote(dir.to_str().unwrap())
        ));
        procs::reap_on_exit(&script);
    }
}

/// One data directory and the server on it: port, socket directory, log.
#[derive(Clone, Debug)]
pub struct PgNode {
    pub port: u16,
    pub data: PathBuf,
    /// The directory of its unix socket (for local, trusted admin connections).
    pub socket_dir: PathBuf,
    pub log: PathBuf,
}

impl PgNode {
    /// `initdb` with the superuser `postgres` (password `postgres`), local
    /// connections trusted and TCP ones authenticated with `auth`.
    pub fn initdb(&self, tools: &PgTools, auth: &str) {
        let pwfile = self.socket_dir.join(format!("pw-{}", self.port));
        std::fs::write(&pwfile, "postgres\n").unwrap();
        tools.own(&pwfile);
        tools.run(
            "initdb",
            &[
                "-D",
                self.data.to_str().unwrap(),
                "-U",
                "postgres",
                "--auth-local=trust",
                &format!("--auth-host={auth}"),
                &format!("--pwfile={}", pwfile.display()),
                "--no-sync",
            ],
        );
        let _ = std::fs::remove_file(pwfile);
    }

    /// Appends settings to `postgresql.auto.conf` (later lines win).
    pub fn configure(&self, lines: &str) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(self.data.join("postgresql.auto.conf"))
            .unwrap();
        f.write_all(lines.as_bytes()).unwrap();
    }

    /// `pg_ctl start -w`; the port and socket directory are given on the
    /// command line, so a copied data directory (pg_basebackup) needs no edit.
    pub fn start(&self, tools: &PgTools) {
        tools.run(
            "pg_ctl",
            &[
                "-D",
                self.data.to_str().unwrap(),
                "-l",
                self.log.to_str().unwrap(),
                "-o",
                &format!("-p {} -k {}", self.port, self.socket_dir.display()),
                "-w",
                "-t",
                "120",
                "start",
            ],
        );
    }

    /// `pg_ctl stop -m <mode>` (`fast`: disconnects clients, aborts their
    /// transactions; `immediate`: no shutdown checkpoint, like a crash).
    pub fn stop(&self, tools: &PgTools, mode: &str) {
        tools.run(
            "pg_ctl",
            &[
                "-D",
                self.data.to_str().unwrap(),
                "-m",
                mode,
                "-w",
                "-t",
                "120",
                "stop",
            ],
        );
    }

    /// `pg_ctl reload` (SIGHUP; the server applies it shortly after).
    pub fn reload(&self, tools: &PgTools) {
        tools.run("pg_ctl", &["-D", self.data.to_str().unwrap(), "reload"]);
    }

    /// A superuser URL over TCP (the superuser's password is `postgres`).
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://postgres:postgres@127.0.0.1:{}/{database}",
            self.port
        )
    }

    /// A superuser connection over the unix socket (trusted, never TLS):
    /// works whatever pg_hba says about TCP.
    pub async fn admin(&self) -> Result<tokio_postgres::Client, String> {
        let (client, conn) = tokio_postgres::Config::new()
            .host_path(&self.socket_dir)
            .port(self.port)
            .user("postgres")
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(10))
            .connect(tokio_postgres::NoTls)
            .await
            .map_err(|e| format!("{}: {}", self.port, super::pg_pair::pg_error(e)))?;
        tokio::spawn(conn);
        Ok(client)
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct TlsOptions {
    /// `hostssl` lines only, and `hostnossl … reject`: plain connections are refused.
    pub required: bool,
    /// The certificate presented at start (see [`Cluster::set_server_cert`]).
    pub cert: ServerCert,
}

#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// The pg_hba method for TCP connections (`trust`, `scram-sha-256`).
    pub auth: String,
    /// TLS (`ssl = on`) with certificates from a fresh test CA.
    pub tls: Option<TlsOptions>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            auth: "trust".into(),
            tls: None,
        }
    }
}

pub struct Cluster {
    pub port: u16,
    dir: tempfile::TempDir,
    tools: PgTools,
    node: PgNode,
    tls: Option<TlsFiles>,
}

/// pg_hba.conf: local connections trusted; TCP ones (loopback, databases and
/// replication) with `auth`, over TLS only when `tls_required`.
pub fn pg_hba(auth: &str, tls_required: bool) -> String {
    let mut hba = String::from("local all all trust\nlocal replication all trust\n");
    let host = if tls_required {
        hba.push_str("hostnossl all all 127.0.0.1/32 reject\nhostnossl all all ::1/128 reject\n");
        hba.push_str(
            "hostnossl replication all 127.0.0.1/32 reject\nhostnossl replication all ::1/128 reject\n",
        );
        "hostssl"
    } else {
        "host"
    };
    for db in ["all", "replication"] {
        for net in ["127.0.0.1/32", "::1/128"] {
            hba.push_str(&format!("{host} {db} all {net} {auth}\n"));
        }
    }
    hba
}

impl Cluster {
    /// Creates and starts a cluster, or `None` (skip) when PostgreSQL is not
    /// installed; with `DOCSIDECAR_REQUIRE_DB=1` a missing install fails instead.
    /// `auth` is the pg_hba method for TCP connections (`trust`, `scram-sha-256`).
    pub fn start(auth: &str) -> Option<Cluster> {
        Self::start_with(&ClusterOptions {
            auth: auth.into(),
            ..ClusterOptions::default()
        })
    }

    /// Creates and starts a cluster with options (TLS); `None` to skip.
    pub fn start_with(opts: &ClusterOptions) -> Option<Cluster> {
        let tools = PgTools::find()?;
        let dir = tempfile::Builder::new()
            .prefix("docsidecar-pg-")
            .tempdir()
            .unwrap();
        tools.own(dir.path());
        let port = procs::free_ports(1)[0];
        let node = PgNode {
            port,
            data: dir.path().join("data"),
            socket_dir: dir.path().to_path_buf(),
            log: dir.path().join("server.log"),
        };
        tools.reap_on_exit(&[&node.data], dir.path());
        node.initdb(&tools, &opts.auth);
        // Keep it small and fast: no fsync (test data), few connections.
        node.configure(&format!(
            "port = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nfsync = off\nmax_connections = 40\nshared_buffers = '16MB'\npassword_encryption = 'scram-sha-256'\n",
            port,
            dir.path().display()
        ));
        let mut tls = None;
        if let Some(t) = opts.tls {
            let user = tools.as_postgres.then_some("postgres");
            tls = Some(TlsFiles::create(&node.data, user, t.cert));
            node.configure(
                "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\nssl_ca_file = 'root.crt'\n",
            );
            std::fs::write(
                node.data.join("pg_hba.conf"),
                pg_hba(&opts.auth, t.required),
            )
            .unwrap();
        }
        tools.own(dir.path());
        node.start(&tools);
        Some(Cluster {
            port,
            dir,
            tools,
            node,
            tls,
        })
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn node(&self) -> &PgNode {
        &self.node
    }

    pub fn pg_ctl_start(&self) {
        self.node.start(&self.tools);
    }

    /// Stops the server: `fast` disconnects clients and aborts their transactions.
    pub fn pg_ctl_stop(&self) {
        self.node.stop(&self.tools, "fast");
    }

    /// A superuser URL (the superuser's password is `postgres`).
    pub fn url(&self, database: &str) -> String {
        self.node.url(database)
    }

    /// The TLS files; panics when the cluster was started without TLS.
    pub fn tls(&self) -> &TlsFiles {
        self.tls.as_ref().expect("a cluster started with TLS")
    }

    /// The CA certificate's path (`sslrootcert`).
    pub fn ca_file(&self) -> &Path {
        &self.tls().ca_file
    }

    /// Presents another certificate from now on: replaces the files, reloads,
    /// and waits until new connections get the reloaded configuration.
    pub async fn set_server_cert(&self, cert: ServerCert) {
        let admin = self.node.admin().await.unwrap();
        let before: std::time::SystemTime = admin
            .query_one("SELECT pg_conf_load_time()", &[])
            .await
            .unwrap()
            .get(0);
        self.tls().present(cert);
        self.node.reload(&self.tools);
        procs::poll(
            "the reloaded configuration",
            Duration::from_secs(30),
            || async {
                let admin = self.node.admin().await?;
                let now: std::time::SystemTime = admin
                    .query_one("SELECT pg_conf_load_time()", &[])
                    .await
                    .map_err(super::pg_pair::pg_error)?
                    .get(0);
                if now > before {
                    Ok(())
                } else {
                    Err("not reloaded yet".to_string())
                }
            },
        )
        .await
        .unwrap();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.tools.try_run(
            "pg_ctl",
            &[
                "-D",
                self.node.data.to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
    }
}
