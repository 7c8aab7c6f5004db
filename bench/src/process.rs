//! The processes under test: the sidecar and the transport floor, started,
//! measured through /proc and stopped by the harness.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Clock ticks per second of /proc/<pid>/stat (USER_HZ; 100 on Linux).
const CLK_TCK: f64 = 100.0;

/// utime + stime of a process, in clock ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Field 3 (state) is fields[0]; utime and stime are fields 14 and 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Milli-CPUs used between two tick readings over `wall`.
pub fn mcpu(before: u64, after: u64, wall: Duration) -> f64 {
    (after.saturating_sub(before)) as f64 / CLK_TCK / wall.as_secs_f64().max(1e-9) * 1000.0
}

/// A `/proc/<pid>/status` figure in kB (`VmRSS`, `VmHWM`).
pub fn status_kb(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Resets the peak RSS (VmHWM) to the current RSS, so a run's peak is its own.
pub fn reset_peak_rss(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// Children alive now, killed if the harness is interrupted (Ctrl-C, SIGTERM).
static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());

fn children() -> std::sync::MutexGuard<'static, Vec<u32>> {
    CHILDREN.lock().unwrap_or_else(|e| e.into_inner())
}

/// Kills every child still running; for an interrupted run.
pub fn kill_children() {
    for pid in children().drain(..) {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
}

/// A child process whose output lines are collected in the background (a full
/// pipe would block its logging).
pub struct Process {
    child: Child,
    pub pid: u32,
    lines: mpsc::Receiver<String>,
    pub logs: Arc<Mutex<Vec<String>>>,
    name: String,
}

impl Process {
    pub fn spawn(mut command: Command, name: &str) -> Result<Process, String> {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {name} ({command:?}): {e}"))?;
        let (tx, lines) = mpsc::channel();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let streams: [Box<dyn std::io::Read + Send>; 2] = [
            Box::new(child.stdout.take().expect("piped")),
            Box::new(child.stderr.take().expect("piped")),
        ];
        for stream in streams {
            let (tx, logs) = (tx.clone(), logs.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let mut logs = logs.lock().unwrap_or_else(|e| e.into_inner());
                    // Keep the start and the latest lines for error reports.
                    if logs.len() >= 400 {
                        logs.drain(200..300);
                    }
                    logs.push(line.clone());
                    drop(logs);
                    let _ = tx.send(line);
                }
            });
        }
        children().push(child.id());
        Ok(Process {
            pid: child.id(),
            child,
            lines,
            logs,
            name: name.to_string(),
        })
    }

    /// Waits for the first line that `found` accepts.
    pub fn wait_for<T>(
        &mut self,
        timeout: Duration,
        mut found: impl FnMut(&str) -> Option<T>,
    ) -> Result<T, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(t) = found(&line) {
                        return Ok(t);
                    }
                }
                Err(_) => {
                    let status = self.child.try_wait().ok().flatten();
                    return Err(format!(
                        "{} did not get ready within {timeout:?} (exit status: {status:?}); its output:\n{}",
                        self.name,
                        self.logs().join("\n")
                    ));
                }
            }
        }
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Log lines at warn or error level so far (JSON logs).
    pub fn problems(&self) -> Vec<String> {
        self.logs()
            .into_iter()
            .filter(|l| l.contains("\"level\":\"WARN\"") || l.contains("\"level\":\"ERROR\""))
            .filter(|l| !l.contains("no policy") && !l.contains("no client tokens"))
            .collect()
    }

    /// SIGTERM, then up to `grace` to exit; killed after that.
    pub fn stop(mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        eprintln!(
            "warning: {} did not exit within {grace:?} of SIGTERM; killed",
            self.name
        );
        let _ = self.child.kill();
        self.child.wait().ok()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        children().retain(|pid| *pid != self.pid);
        // An error path must not leave a server behind.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// How the harness starts the sidecar.
pub struct SidecarSpec<'a> {
    pub binary: &'a Path,
    pub database_url: String,
    pub schema: &'a str,
    pub pool_size: usize,
    /// Extra environment (experiments).
    pub env: Vec<(String, String)>,
}

impl SidecarSpec<'_> {
    /// The sidecar as an operator runs it, with JSON logs and no SIGTERM delay.
    pub fn command(&self, listen: &str) -> Command {
        let mut command = Command::new(self.binary);
        command
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("DOCSIDECAR_LISTEN", listen)
            .env("DATABASE_URL", &self.database_url)
            // The raw driver it is compared with talks plain TCP; the sidecar's
            // default (`prefer`) would negotiate TLS where the server offers it.
            // A URL's own `sslmode` still wins.
            .env("DB_SSLMODE", "disable")
            .env("DOCSIDECAR_SCHEMA", self.schema)
            .env("DB_POOL_SIZE", self.pool_size.to_string())
            .env("DOCSIDECAR_LOG_FORMAT", "json")
            .env("DOCSIDECAR_SHUTDOWN_DELAY", "0")
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        command
    }

    /// Starts the sidecar and waits for its "serving" line: the process and its address.
    pub fn start(&self, listen: &str) -> Result<(Process, String), String> {
        let mut process = Process::spawn(self.command(listen), "the sidecar")?;
        let address = process.wait_for(Duration::from_secs(60), |line| {
            let v: serde_json::Value = serde_json::from_str(line).ok()?;
            (v["message"] == "serving docsidecar.v1.DocumentService")
                .then(|| v["listen"].as_str().map(String::from))
                .flatten()
        })?;
        process.name = format!("the sidecar at {address}");
        Ok((process, address))
    }
}

/// Starts the transport floor (this binary's `floor-server`): the process and its
/// TCP address.
pub fn start_floor(payload: usize, uds: Option<&Path>) -> Result<(Process, String), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    // A wrapper (bench/callgrind-get.sh: valgrind) runs the floor under it.
    let mut command = match std::env::var_os("DOCSIDECAR_BENCH_FLOOR_WRAPPER") {
        Some(wrapper) => {
            let mut command = Command::new(wrapper);
            command.arg(exe);
            command
        }
        None => Command::new(exe),
    };
    command.args([
        "floor-server",
        "--tcp",
        "127.0.0.1:0",
        "--payload",
        &payload.to_string(),
    ]);
    if let Some(path) = uds {
        command.arg("--uds").arg(path);
    }
    let mut process = Process::spawn(command, "the transport floor")?;
    let address = process.wait_for(Duration::from_secs(30), |line| {
        line.strip_prefix("floor listening tcp=").map(String::from)
    })?;
    Ok((process, address))
}

/// Start-up time to SERVING: spawn → first successful health check, on a fresh
/// SQLite file each time.
pub fn measure_startup(binary: &Path, dir: &Path, runs: usize) -> Result<Vec<f64>, String> {
    use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let mut samples = Vec::with_capacity(runs);
    for run in 0..runs {
        let db = dir.join(format!("startup-{run}.db"));
        // A free port, so that the address is known before the process logs it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let listen = format!("127.0.0.1:{port}");
        let spec = SidecarSpec {
            binary,
            database_url: format!("sqlite://{}", db.display()),
            schema: "docsidecar",
            pool_size: 1,
            env: Vec::new(),
        };
        let mut command = spec.command(&listen);
        command.stdout(Stdio::null()).stderr(Stdio::null());
        let started = Instant::now();
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        children().push(child.id());
        let serving = rt.block_on(async {
            let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{listen}"))
                .map_err(|e| e.to_string())?;
            loop {
                if started.elapsed() > Duration::from_secs(10) {
                    return Err("the sidecar was not SERVING within 10 s".to_string());
                }
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!("the sidecar exited during start-up: {status}"));
                }
                if let Ok(channel) = endpoint.connect().await {
                    let request = tonic_health::pb::HealthCheckRequest {
                        service: "docsidecar.v1.DocumentService".into(),
                    };
                    if let Ok(response) = HealthClient::new(channel).check(request).await {
                        if response.get_ref().status() == ServingStatus::Serving {
                            return Ok(started.elapsed());
                        }
                    }
                }
                // Short polls: the figure is in milliseconds.
                std::thread::sleep(Duration::from_micros(200));
            }
        });
        let _ = child.kill();
        let _ = child.wait();
        children().retain(|pid| *pid != child.id());
        samples.push(serving?.as_secs_f64() * 1000.0);
    }
    Ok(samples)
}
