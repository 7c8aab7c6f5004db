//! A three-node MariaDB Galera cluster on loopback, started once per test
//! binary ([`Galera::shared`]) and shared by its tests.
//!
//! Each node has its own data directory (one `mariadb-install-db`, copied),
//! `my.cnf`, and four ports: client, group communication, IST and SST (rsync).
//! Node 0 bootstraps the cluster (`--wsrep-new-cluster`), nodes 1 and 2 join it
//! by SST. Nodes run under watchdogs ([`super::procs::Guarded`]), so they die
//! with the test process even though the cluster, in a `static`, is never
//! dropped; a reaper removes the directory afterwards.
//!
//! Tests that kill or restart nodes hold [`Galera::exclusive`]; the others hold
//! [`Galera::steady`]. Taking either first restarts any node an earlier test
//! left dead (a panic between `kill` and `restart`).
//!
//! Reads right after a write on another node need `SET SESSION
//! wsrep_sync_wait = 1`: Galera replication is synchronous, but applying on the
//! other nodes is not.

use super::mariadb::{base_cnf, run_once, MariaNode, MariaTools};
use super::procs;
use mysql_async::prelude::*;
use mysql_async::{Opts, OptsBuilder};
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::sync::{Mutex, OnceCell, RwLock, RwLockReadGuard, RwLockWriteGuard};

pub const NODES: usize = 3;

/// How long a node may take to form, join or rejoin (generous: a loaded
/// 2-core machine, and a joiner waits for the donor of another).
const JOIN_TIMEOUT: Duration = Duration::from_secs(180);

fn galera_provider() -> Option<PathBuf> {
    [
        "/usr/lib/galera/libgalera_smm.so",
        "/usr/lib/galera-4/libgalera_smm.so",
        "/usr/lib64/galera-4/libgalera_smm.so",
        "/usr/lib64/galera/libgalera_smm.so",
        "/usr/lib/libgalera_smm.so",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

/// What a node says about itself: `wsrep_local_state_comment` and `wsrep_cluster_size`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeStatus {
    pub state: String,
    pub cluster_size: u32,
}

pub struct Galera {
    tools: MariaTools,
    dir: PathBuf,
    nodes: Mutex<Vec<MariaNode>>,
    ports: Vec<u16>,
    topology: RwLock<()>,
    /// How long the cluster took to form.
    pub formed_in: Duration,
}

static SHARED: OnceCell<Result<Option<Galera>, String>> = OnceCell::const_new();

/// Client options for a node: TCP (never the unix socket), root, no password.
fn client_opts(port: u16) -> Opts {
    OptsBuilder::default()
        .ip_or_hostname("127.0.0.1")
        .tcp_port(port)
        .user(Some("root"))
        .prefer_socket(false)
        .into()
}

/// `wsrep_local_state_comment` and `wsrep_cluster_size` of the server at `opts`.
pub async fn status_at(opts: Opts) -> Result<NodeStatus, String> {
    let mut conn = super::mariadb::connect(opts).await?;
    let rows: Vec<(String, String)> = conn
        .query(
            "SHOW STATUS WHERE Variable_name IN ('wsrep_local_state_comment', 'wsrep_cluster_size')",
        )
        .await
        .map_err(|e| e.to_string())?;
    let _ = conn.disconnect().await;
    let get = |name: &str| {
        rows.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
            .ok_or_else(|| format!("no {name}"))
    };
    Ok(NodeStatus {
        state: get("wsrep_local_state_comment")?,
        cluster_size: get("wsrep_cluster_size")?
            .parse()
            .map_err(|e| format!("{e}"))?,
    })
}

/// The node's my.cnf: the common settings plus Galera's.
fn node_cnf(dir: &Path, provider: &Path, i: usize, ports: &[u16]) -> String {
    let [client, group, ist, sst] = [0, 1, 2, 3].map(|k| ports[i * 4 + k]);
    let members: Vec<String> = (0..NODES)
        .map(|n| format!("127.0.0.1:{}", ports[n * 4 + 1]))
        .collect();
    format!(
        "{}binlog_format=ROW
innodb_autoinc_lock_mode=2
wsrep_on=ON
wsrep_provider={}
wsrep_cluster_name=docsidecar-test
wsrep_cluster_address=gcomm://{}
wsrep_node_name=node{i}
wsrep_node_address=127.0.0.1:{group}
wsrep_provider_options=\"gmcast.listen_addr=tcp://127.0.0.1:{group};ist.recv_addr=127.0.0.1:{ist};gcache.size=32M\"
wsrep_sst_receive_address=127.0.0.1:{sst}
wsrep_sst_method=rsync
",
        base_cnf(dir, client),
        provider.display(),
        members.join(","),
    )
}

/// The position `mariadbd --wsrep-recover` logged (`uuid:seqno`), when known.
fn recovered_position(log: &str) -> Option<String> {
    let pos = log
        .lines()
        .filter_map(|l| l.split("WSREP: Recovered position: ").nth(1))
        .next_back()?
        .trim()
        .to_string();
    let seqno: i64 = pos.rsplit(':').next()?.parse().ok()?;
    (seqno >= 0 && !pos.starts_with("00000000-0000-0000-0000-000000000000")).then_some(pos)
}

impl Galera {
    /// The cluster of this test binary, formed on first use (about 10–20 s);
    /// `None` to skip (no MariaDB server or Galera provider installed).
    pub async fn shared() -> Option<&'static Galera> {
        match SHARED.get_or_init(Self::form).await {
            Ok(g) => g.as_ref(),
            Err(e) => panic!("the shared Galera cluster did not form: {e}"),
        }
    }

    async fn form() -> Result<Option<Galera>, String> {
        let Some(tools) = MariaTools::find() else {
            return Ok(None);
        };
        let Some(provider) = galera_provider() else {
            return Ok(procs::skip("no Galera provider (install galera-4)"));
        };
        if !Path::new("/usr/bin/rsync").exists() && !Path::new("/bin/rsync").exists() {
            return Ok(procs::skip("no rsync (Galera's SST method here)"));
        }
        let started = Instant::now();
        let dir = procs::fresh_dir("docsidecar-galera-", tools.user());
        procs::reap_on_exit(&format!(
            "sleep 2; rm -rf {}",
            procs::sh_quote(dir.to_str().unwrap())
        ));
        let ports = procs::free_ports(NODES * 4);
        let base = dir.join("base");
        let (t, b) = (tools.clone(), base.clone());
        tokio::task::spawn_blocking(move || t.install(&b))
            .await
            .map_err(|e| e.to_string())?;
        let mut nodes = Vec::new();
        for i in 0..NODES {
            let node_dir = dir.join(format!("node{i}"));
            std::fs::create_dir_all(&node_dir).unwrap();
            let ok = std::process::Command::new("cp")
                .arg("-a")
                .arg(&base)
                .arg(node_dir.join("data"))
                .status()
                .map_err(|e| e.to_string())?;
            if !ok.success() {
                return Err("cp -a of the installed data directory failed".into());
            }
            let cnf = node_cnf(&node_dir, &provider, i, &ports);
            nodes.push(MariaNode::new(
                &tools,
                &node_dir,
                ports[i * 4],
                &cnf,
                client_opts(ports[i * 4]),
            ));
        }
        let _ = std::fs::remove_dir_all(&base);

        // Bootstrap on node 0, then both joiners at once (their SSTs from the
        // donor are serialized by Galera; a joiner retries while it waits).
        nodes[0].spawn(&tools, &["--wsrep-new-cluster".to_string()]);
        wait_synced(&mut nodes[0], 1).await?;
        eprintln!("Galera node 0 bootstrapped in {:.1?}", started.elapsed());
        for node in &mut nodes[1..] {
            node.spawn(&tools, &[]);
        }
        for node in &mut nodes[1..] {
            wait_synced(node, NODES as u32).await?;
        }
        let formed_in = started.elapsed();
        eprintln!("Galera cluster of {NODES} formed in {formed_in:.1?}");
        Ok(Some(Galera {
            tools,
            dir,
            nodes: Mutex::new(nodes),
            ports,
            topology: RwLock::new(()),
            formed_in,
        }))
    }

    /// The client port of node `i`.
    pub fn node_port(&self, i: usize) -> u16 {
        self.ports[i * 4]
    }

    /// `mysql://root@127.0.0.1:<port>` of node `i`.
    pub fn node_url(&self, i: usize) -> String {
        format!("mysql://root@127.0.0.1:{}", self.node_port(i))
    }

    /// Client options for node `i` (TCP, root).
    pub fn node_opts(&self, i: usize) -> Opts {
        client_opts(self.node_port(i))
    }

    /// The harness directory (node directories `node<i>`, logs in them).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether node `i`'s process runs.
    pub async fn running(&self, i: usize) -> bool {
        self.nodes.lock().await[i].running()
    }

    /// What node `i` says about itself.
    pub async fn node_status(&self, i: usize) -> Result<NodeStatus, String> {
        status_at(self.node_opts(i)).await
    }

    /// `wsrep_cluster_size` as the first running node that answers sees it.
    pub async fn cluster_size(&self) -> u32 {
        for i in 0..NODES {
            if !self.running(i).await {
                continue;
            }
            if let Ok(s) = self.node_status(i).await {
                return s.cluster_size;
            }
        }
        panic!("no Galera node answers");
    }

    /// Shared use: no node is killed meanwhile (by a test that plays fair).
    pub async fn steady(&self) -> GaleraRead<'_> {
        let write = self.topology.write().await;
        self.heal().await;
        GaleraRead {
            galera: self,
            _guard: write.downgrade(),
        }
    }

    /// Exclusive use, for killing and restarting nodes.
    pub async fn exclusive(&self) -> GaleraWrite<'_> {
        let write = self.topology.write().await;
        self.heal().await;
        GaleraWrite {
            galera: self,
            _guard: write,
        }
    }

    async fn heal(&self) {
        for i in 0..NODES {
            if !self.running(i).await {
                eprintln!("Galera node {i} was left dead: restarting it");
                self.restart(i).await;
            }
        }
    }

    async fn kill(&self, i: usize) {
        self.nodes.lock().await[i].kill().await;
    }

    async fn restart(&self, i: usize) -> Duration {
        let started = Instant::now();
        let mut nodes = self.nodes.lock().await;
        assert!(!nodes[i].running(), "Galera node {i} runs: kill it first");
        // The others must have evicted the node's old incarnation first:
        // until then a new one cannot join (it would wait for the eviction).
        let alive: Vec<usize> = (0..NODES)
            .filter(|&n| n != i && nodes[n].running())
            .collect();
        if let Some(&peer) = alive.first() {
            let want = alive.len() as u32;
            procs::poll(
                &format!("node {peer} seeing node {i} gone"),
                Duration::from_secs(120),
                || async {
                    let s = self.node_status(peer).await?;
                    if s.cluster_size == want {
                        Ok(())
                    } else {
                        Err(format!("{s:?}"))
                    }
                },
            )
            .await
            .unwrap();
        }
        // After a SIGKILL, grastate.dat has no position (seqno -1) and the
        // node would rejoin by a full SST; recover it from InnoDB so that it
        // rejoins by IST (what a service manager does with galera_recovery).
        let recover_log = nodes[i].dir.join("recover.log");
        let node_dir = nodes[i].dir.clone();
        let tools = self.tools.clone();
        let log = tokio::task::spawn_blocking(move || {
            run_once(
                &tools,
                &node_dir,
                &["--wsrep-recover".to_string()],
                &recover_log,
            )
        })
        .await
        .unwrap();
        let mut args = Vec::new();
        if let Some(pos) = recovered_position(&log) {
            args.push(format!("--wsrep-start-position={pos}"));
        }
        let log_path = nodes[i].error_log();
        let log_before = std::fs::metadata(&log_path).map_or(0, |m| m.len() as usize);
        nodes[i].spawn(&self.tools, &args);
        wait_synced(&mut nodes[i], NODES as u32).await.unwrap();
        let took = started.elapsed();
        let log = std::fs::read(&log_path).unwrap_or_default();
        let log = String::from_utf8_lossy(log.get(log_before..).unwrap_or_default());
        // MariaDB logs "SST received" for an IST too (the SST script runs in
        // bypass mode); the rsync script says which one it did.
        let how = if log.contains("rsync SST completed") {
            "SST (full copy)"
        } else if log.contains("IST received") {
            "IST"
        } else {
            "no state transfer"
        };
        eprintln!("Galera node {i} rejoined by {how} in {took:.1?}");
        took
    }
}

/// Waits until the node is `Synced` in a cluster of `size`, or has exited.
async fn wait_synced(node: &mut MariaNode, size: u32) -> Result<(), String> {
    let deadline = Instant::now() + JOIN_TIMEOUT;
    loop {
        node.check_alive()?;
        let last = match status_at(node.opts.clone()).await {
            Ok(s) if s.state == "Synced" && s.cluster_size == size => return Ok(()),
            Ok(s) => format!("{s:?}"),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(format!(
                "Galera node on port {} not Synced in a cluster of {size} after {JOIN_TIMEOUT:?}: {last}\n{}",
                node.port,
                procs::tail(&node.error_log(), 30)
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The cluster in shared use; see [`Galera::steady`].
pub struct GaleraRead<'a> {
    galera: &'a Galera,
    _guard: RwLockReadGuard<'a, ()>,
}

impl Deref for GaleraRead<'_> {
    type Target = Galera;
    fn deref(&self) -> &Galera {
        self.galera
    }
}

/// The cluster in exclusive use; see [`Galera::exclusive`].
pub struct GaleraWrite<'a> {
    galera: &'a Galera,
    _guard: RwLockWriteGuard<'a, ()>,
}

impl Deref for GaleraWrite<'_> {
    type Target = Galera;
    fn deref(&self) -> &Galera {
        self.galera
    }
}

impl GaleraWrite<'_> {
    /// SIGKILLs node `i`'s mariadbd and waits until the process is gone.
    pub async fn kill(&self, i: usize) {
        self.galera.kill(i).await;
    }

    /// Starts node `i` again: it rejoins (IST when its position is
    /// recoverable and the donor's gcache still holds the gap, else SST), and
    /// this returns once it is `Synced` in a cluster of three, with how long
    /// that took.
    pub async fn restart(&self, i: usize) -> Duration {
        self.galera.restart(i).await
    }
}
