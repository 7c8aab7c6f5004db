//! The real binary, started as an operator would, with its JSON logs collected.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_docsidecar");

/// A docsidecar process with JSON logs collected from stdout and stderr.
pub struct Sidecar {
    child: Child,
    lines: mpsc::Receiver<String>,
    pub logs: Vec<String>,
    /// The admin listener's address, once logged.
    pub admin: Option<String>,
}

impl Sidecar {
    /// Starts the binary in `dir` with a clean environment plus `envs`. The
    /// SIGTERM delay is 0 unless `envs` says otherwise.
    pub fn spawn_with(args: &[&str], dir: &Path, envs: &[(&str, &str)]) -> Sidecar {
        let mut child = Command::new(BIN)
            .args(args)
            .current_dir(dir)
            .env_clear()
            .env("DOCSIDECAR_LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .env("DOCSIDECAR_SHUTDOWN_DELAY", "0")
            .envs(envs.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("binary starts");
        let (tx, lines) = mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
        }
        Sidecar {
            child,
            lines,
            logs: Vec::new(),
            admin: None,
        }
    }

    pub fn spawn(args: &[&str], dir: &Path) -> Sidecar {
        Sidecar::spawn_with(args, dir, &[])
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the "serving" log line and returns its listen address.
    pub fn listening(&mut self) -> String {
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|_| panic!("no serving line; logs so far: {:#?}", self.logs));
            self.logs.push(line.clone());
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                if v["message"] == "admin listener up" {
                    self.admin = v["admin"].as_str().map(String::from);
                }
                if v["message"] == "serving docsidecar.v1.DocumentService" {
                    return v["listen"].as_str().unwrap().to_string();
                }
            }
        }
    }

    /// Waits for a log line that `matches` (JSON-parsed) and returns it; the
    /// lines before it are kept in `logs`.
    pub fn wait_for_log(
        &mut self,
        what: &str,
        matches: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|_| panic!("no log line {what}; logs so far: {:#?}", self.logs));
            self.logs.push(line.clone());
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                if matches(&v) {
                    return v;
                }
            }
        }
    }

    /// The log lines written so far.
    pub fn drain_logs(&mut self) -> &[String] {
        self.logs.extend(self.lines.try_iter());
        &self.logs
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for exit and returns the status and every log line. Async, so the
    /// test's clients keep answering the server's GOAWAY meanwhile.
    pub async fn wait(mut self) -> (std::process::ExitStatus, Vec<String>) {
        for _ in 0..400 {
            if let Some(status) = self.child.try_wait().unwrap() {
                tokio::time::sleep(Duration::from_millis(50)).await;
                self.logs.extend(self.lines.try_iter());
                return (status, std::mem::take(&mut self.logs));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = self.child.kill();
        self.logs.extend(self.lines.try_iter());
        panic!(
            "the sidecar did not exit within 20 s; logs: {:#?}",
            self.logs
        );
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        // A failed test must not leave a server behind.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP/1.1 request to the admin listener: (status, body).
pub async fn http(addr: &str, method: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("admin listener");
    let request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Samples of the Prometheus exposition: `name{sorted labels}` → value.
pub fn parse_metrics(text: &str) -> std::collections::BTreeMap<String, f64> {
    let mut out = std::collections::BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let (series, value) = line.rsplit_once(' ').expect("sample line");
        let key = match series.split_once('{') {
            Some((name, labels)) => {
                let mut labels: Vec<&str> = labels.trim_end_matches('}').split(',').collect();
                labels.sort();
                format!("{name}{{{}}}", labels.join(","))
            }
            None => series.to_string(),
        };
        out.insert(key, value.parse().expect("numeric sample"));
    }
    out
}

/// The admin listener's metrics, parsed.
pub async fn metrics(admin: &str) -> std::collections::BTreeMap<String, f64> {
    let (status, body) = http(admin, "GET", "/metrics").await;
    assert_eq!(status, 200, "{body}");
    parse_metrics(&body)
}

/// One sample (0 when absent), e.g. `docsidecar_connections_open` or
/// `docsidecar_requests_total{code="OK",method="Get"}` with labels sorted.
pub fn sample(metrics: &std::collections::BTreeMap<String, f64>, series: &str) -> f64 {
    metrics.get(series).copied().unwrap_or(0.0)
}
