//! A private PostgreSQL cluster for tests that stop, restart or reconfigure the
//! server: initdb + pg_ctl from the installed binaries, on a free port, in a
//! directory of its own. initdb refuses to run as root, so as root the cluster
//! runs as the `postgres` user.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct Cluster {
    pub port: u16,
    dir: tempfile::TempDir,
    bin: PathBuf,
    as_postgres: bool,
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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Cluster {
    /// Creates and starts a cluster, or `None` (skip) when PostgreSQL is not
    /// installed; with `DOCSIDECAR_REQUIRE_DB=1` a missing install fails instead.
    /// `auth` is the pg_hba method for TCP connections (`trust`, `scram-sha-256`).
    pub fn start(auth: &str) -> Option<Cluster> {
        let Some(bin) = pg_bin() else {
            if std::env::var("DOCSIDECAR_REQUIRE_DB").is_ok_and(|v| v == "1") {
                panic!(
                    "DOCSIDECAR_REQUIRE_DB=1 but no PostgreSQL binaries under /usr/lib/postgresql"
                );
            }
            eprintln!("skipped: no PostgreSQL binaries under /usr/lib/postgresql");
            return None;
        };
        let as_postgres = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
        let dir = tempfile::Builder::new()
            .prefix("docsidecar-pg-")
            .tempdir()
            .unwrap();
        let cluster = Cluster {
            port: free_port(),
            dir,
            bin,
            as_postgres,
        };
        if as_postgres {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(cluster.dir.path())
                .status()
                .unwrap();
            assert!(ok.success());
        }
        let data = cluster.data();
        let pwfile = cluster.dir.path().join("pw");
        std::fs::write(&pwfile, "postgres\n").unwrap();
        if as_postgres {
            Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&pwfile)
                .status()
                .unwrap();
        }
        cluster.run(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "--auth-local=trust",
                &format!("--auth-host={auth}"),
                &format!("--pwfile={}", pwfile.display()),
                "--no-sync",
            ],
        );
        // Keep it small and fast: no fsync (test data), few connections.
        std::fs::write(
            data.join("postgresql.auto.conf"),
            format!(
                "port = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nfsync = off\nmax_connections = 40\nshared_buffers = '16MB'\npassword_encryption = 'scram-sha-256'\n",
                cluster.port,
                cluster.dir.path().display()
            ),
        )
        .unwrap();
        cluster.pg_ctl_start();
        Some(cluster)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn run(&self, tool: &str, args: &[&str]) -> Output {
        let exe = self.bin.join(tool);
        let out = if self.as_postgres {
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&exe)
                .args(args)
                .output()
        } else {
            Command::new(&exe).args(args).output()
        }
        .unwrap();
        assert!(
            out.status.success(),
            "{tool} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    pub fn pg_ctl_start(&self) {
        let log = self.dir.path().join("server.log");
        self.run(
            "pg_ctl",
            &[
                "-D",
                self.data().to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
    }

    /// Stops the server: `fast` disconnects clients and aborts their transactions.
    pub fn pg_ctl_stop(&self) {
        self.run(
            "pg_ctl",
            &[
                "-D",
                self.data().to_str().unwrap(),
                "-m",
                "fast",
                "-w",
                "stop",
            ],
        );
    }

    /// A superuser URL (the superuser's password is `postgres`).
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://postgres:postgres@127.0.0.1:{}/{database}",
            self.port
        )
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let exe = self.bin.join("pg_ctl");
        let data = self.data();
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        };
        let _ = cmd
            .args(["-D", data.to_str().unwrap(), "-m", "immediate", "stop"])
            .output();
    }
}
