//! Process plumbing shared by the private-server harnesses (PostgreSQL clusters,
//! MariaDB nodes, Galera): free ports, polling with a deadline, and the
//! watchdogs that make sure no server outlives the test process.
//!
//! Servers shared by a whole test binary live in `static`s, which are never
//! dropped; a server started by a test that is killed (timeout, Ctrl-C) is not
//! dropped either. So every server is started with a shell watchdog that polls
//! the test process's pid and kills the server once it is gone, and every
//! harness directory gets a reaper that removes it afterwards.

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// True when a missing or unreachable database must fail the test (CI).
pub fn require_db() -> bool {
    std::env::var("DOCSIDECAR_REQUIRE_DB").is_ok_and(|v| v == "1")
}

/// Skips (returns `None`) with a message, or panics under `DOCSIDECAR_REQUIRE_DB=1`.
pub fn skip<T>(why: &str) -> Option<T> {
    if require_db() {
        panic!("DOCSIDECAR_REQUIRE_DB=1 but {why}");
    }
    eprintln!("skipped: {why}");
    None
}

/// True when this process runs as root (servers then run as their own users).
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// `n` distinct free TCP ports on 127.0.0.1, below the kernel's ephemeral
/// range when it leaves room (10000..32768 by default): a server restarted on
/// its port then never finds it taken by some outgoing connection's local
/// port, and a client polling a stopped server never connects to itself.
/// All listeners are held until the last port is picked, so the ports are
/// distinct; another process may still take one before the server binds it
/// (rare, and the start then fails loudly).
pub fn free_ports(n: usize) -> Vec<u16> {
    use std::hash::{BuildHasher, Hasher};
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (from, to) = (10000u16, low);
    let mut listeners = Vec::new();
    let seed = std::collections::hash_map::RandomState::new();
    let mut attempt = 0u64;
    while listeners.len() < n {
        let port = if to > from + 1000 && attempt < 10_000 {
            let mut h = seed.build_hasher();
            h.write_u64(attempt);
            from + (h.finish() % u64::from(to - from)) as u16
        } else {
            0
        };
        attempt += 1;
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            listeners.push(l);
        }
    }
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// A fresh directory under the temp dir, named `<prefix><pid>-<uuid>`, that
/// `user` (when given, i.e. as root) owns. Not removed on drop: see [`reap_on_exit`].
pub fn fresh_dir(prefix: &str, user: Option<&str>) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "{prefix}{}-{}",
        std::process::id(),
        uuid::Uuid::now_v7().simple()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    if let Some(user) = user {
        chown_r(user, &dir);
    }
    dir
}

/// `chown -R user:user path`.
pub fn chown_r(user: &str, path: &Path) {
    let ok = Command::new("chown")
        .arg("-R")
        .arg(format!("{user}:{user}"))
        .arg(path)
        .status()
        .expect("chown runs");
    assert!(ok.success(), "chown -R {user} {}", path.display());
}

/// Single-quotes `s` for `sh`.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Runs `script` (sh) once this test process has exited, whatever the way it
/// exits (normal end, panic, SIGKILL): the usual cleanup of a harness
/// directory. The reaper is a background subshell of a shell that exits at
/// once (so it is nobody's zombie), with its stdio on /dev/null so that it
/// never holds a pipe of the caller (`cargo test | tee`) open.
pub fn reap_on_exit(script: &str) {
    let me = std::process::id();
    let reaper = format!("while kill -0 {me} 2>/dev/null; do sleep 1; done; {script}");
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("( {reaper} ) >/dev/null 2>&1 </dev/null &"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("sh starts");
    assert!(ok.success(), "the reaper did not start");
}

/// A server process started under a watchdog shell.
pub struct Guarded {
    /// The watchdog shell: it exits when the server exits.
    pub watchdog: Child,
    /// The server's own pid (signal it directly: `kill -9 <pid>`).
    pub pid: u32,
}

impl Guarded {
    /// Starts `program args` with its stdout and stderr appended to `log`,
    /// under a watchdog that SIGKILLs it when this test process is gone.
    ///
    /// The shell starts the server in the background, prints its pid, then
    /// waits for it; a subshell polls this process's pid twice a second and
    /// kills the server when it has disappeared.
    pub fn spawn(program: &Path, args: &[String], log: &Path) -> Guarded {
        let me = std::process::id();
        let script = format!(
            r#""$@" >>{log} 2>&1 </dev/null &
n=$!
echo "$n"
exec >/dev/null
( while kill -0 {me} 2>/dev/null; do sleep 0.5; done; kill -9 "$n" 2>/dev/null ) &
w=$!
wait "$n"
kill "$w" 2>/dev/null
"#,
            log = sh_quote(log.to_str().unwrap()),
        );
        let mut watchdog = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("sh")
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("sh starts");
        let mut line = String::new();
        BufReader::new(watchdog.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("watchdog prints the pid");
        let pid = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("watchdog printed {line:?}, not a pid"));
        Guarded { watchdog, pid }
    }

    /// True while the server runs (its watchdog exits with it).
    pub fn running(&mut self) -> bool {
        matches!(self.watchdog.try_wait(), Ok(None))
    }

    /// SIGKILLs the server and waits until it is gone.
    pub async fn kill(&mut self) {
        let _ = Command::new("kill")
            .args(["-9", &self.pid.to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.running() {
            assert!(
                Instant::now() < deadline,
                "pid {} survives SIGKILL for 30 s",
                self.pid
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Calls `probe` every 200 ms until it returns `Ok`, or until `timeout` has
/// passed: then the error names `what` and the last failure.
pub async fn poll<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let last = match probe().await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(format!("{what}: still not after {timeout:?}: {last}"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The last `lines` lines of a log file, for failure messages.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
