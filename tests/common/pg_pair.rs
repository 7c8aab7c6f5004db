//! A PostgreSQL primary and a streaming standby on loopback, for failover
//! tests: `wal_level = replica`, a `replicator` role with a pg_hba
//! `replication` line, and a standby made by `pg_basebackup -R` on a port of
//! its own. Optionally synchronous (`synchronous_commit = remote_apply`,
//! `synchronous_standby_names = '*'`): a commit is acknowledged only once the
//! standby has applied it, so a read there right after the ack sees it.
//!
//! One pair per mode is started once per test binary ([`PgPair::shared`]) and
//! never dropped: its servers are stopped and its directory removed by a
//! reaper when the test process has gone. Tests that change the topology
//! (stop, promote) hold [`PgPair::exclusive`]; the others hold
//! [`PgPair::steady`]. Taking either first repairs what an earlier test left:
//! a stopped primary is started again, and after a promotion the other node
//! is rebuilt as a standby of the new primary (so the roles may have swapped:
//! always ask for [`PgPair::primary_url`] and [`PgPair::standby_url`]).

use super::cluster::{pg_hba, PgNode, PgTools};
use super::procs;
use std::ops::Deref;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::{OnceCell, RwLock, RwLockReadGuard, RwLockWriteGuard};

pub const REPLICATION_USER: &str = "replicator";
pub const REPLICATION_PASSWORD: &str = "replicator";

#[derive(Clone, Debug)]
pub struct PgPairOptions {
    /// `synchronous_commit = remote_apply` and `synchronous_standby_names = '*'`
    /// on the primary.
    pub synchronous: bool,
    /// The pg_hba method for TCP connections, replication included.
    pub auth: String,
}

impl Default for PgPairOptions {
    fn default() -> Self {
        PgPairOptions {
            synchronous: false,
            auth: "trust".into(),
        }
    }
}

#[derive(Debug)]
struct State {
    primary: usize,
    running: [bool; 2],
    /// The other node is a standby streaming from the primary.
    standby_ok: bool,
}

pub struct PgPair {
    tools: PgTools,
    dir: PathBuf,
    nodes: [PgNode; 2],
    opts: PgPairOptions,
    state: Mutex<State>,
    topology: RwLock<()>,
    /// A private pair (not shared): dropped at the end of its test.
    owned: bool,
}

static SHARED_ASYNC: OnceCell<Result<Option<PgPair>, String>> = OnceCell::const_new();
static SHARED_SYNC: OnceCell<Result<Option<PgPair>, String>> = OnceCell::const_new();

/// Runs blocking process work off the async runtime (a test's writers keep running).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// A tokio-postgres error with the server's message (its Display is just "db error").
pub fn pg_error(e: tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => format!("{e:?}"),
    }
}

async fn query_i64(node: &PgNode, sql: &str) -> Result<i64, String> {
    let c = node.admin().await?;
    let row = c.query_one(sql, &[]).await.map_err(pg_error)?;
    Ok(row.get(0))
}

async fn query_string(node: &PgNode, sql: &str) -> Result<String, String> {
    let c = node.admin().await?;
    let row = c.query_one(sql, &[]).await.map_err(pg_error)?;
    Ok(row.get(0))
}

impl PgPair {
    /// The pair of this test binary for the mode (`synchronous` or not),
    /// started on first use; `None` to skip (no PostgreSQL installed).
    pub async fn shared(synchronous: bool) -> Option<&'static PgPair> {
        let cell = if synchronous {
            &SHARED_SYNC
        } else {
            &SHARED_ASYNC
        };
        let pair = cell
            .get_or_init(|| async {
                let opts = PgPairOptions {
                    synchronous,
                    ..PgPairOptions::default()
                };
                Self::create(opts, false).await
            })
            .await;
        match pair {
            Ok(p) => p.as_ref(),
            Err(e) => panic!("the shared PostgreSQL pair did not start: {e}"),
        }
    }

    /// A private pair, stopped and removed on drop; `None` to skip.
    pub async fn start(opts: PgPairOptions) -> Option<PgPair> {
        Self::create(opts, true).await.unwrap()
    }

    async fn create(opts: PgPairOptions, owned: bool) -> Result<Option<PgPair>, String> {
        let Some(tools) = PgTools::find() else {
            return Ok(None);
        };
        let started = Instant::now();
        let user = tools.as_postgres.then_some("postgres");
        let dir = procs::fresh_dir("docsidecar-pgpair-", user);
        let ports = procs::free_ports(2);
        let nodes = [0, 1].map(|i| PgNode {
            port: ports[i],
            data: dir.join(format!("node{i}")),
            socket_dir: dir.clone(),
            log: dir.join(format!("node{i}.log")),
        });
        tools.reap_on_exit(&[&nodes[0].data, &nodes[1].data], &dir);
        let pair = PgPair {
            tools,
            dir,
            nodes,
            opts,
            state: Mutex::new(State {
                primary: 0,
                running: [false, false],
                standby_ok: false,
            }),
            topology: RwLock::new(()),
            owned,
        };
        let (tools, node, auth) = (
            pair.tools.clone(),
            pair.nodes[0].clone(),
            pair.opts.auth.clone(),
        );
        blocking(move || {
            node.initdb(&tools, &auth);
            // Small and fast (test data: no fsync). The port and the socket
            // directory are given to pg_ctl, so that a copy of this data
            // directory (the standby) can run beside it unchanged.
            node.configure(
                "listen_addresses = '127.0.0.1'\nfsync = off\nmax_connections = 40\nshared_buffers = '16MB'\npassword_encryption = 'scram-sha-256'\nwal_level = replica\nmax_wal_senders = 5\nwal_keep_size = '128MB'\nhot_standby = on\nwal_receiver_status_interval = '1s'\n",
            );
            std::fs::write(node.data.join("pg_hba.conf"), pg_hba(&auth, false)).unwrap();
            tools.own(&node.data);
            node.start(&tools);
        })
        .await;
        pair.state.lock().unwrap().running[0] = true;
        let admin = pair.nodes[0].admin().await?;
        admin
            .batch_execute(&format!(
                "CREATE ROLE {REPLICATION_USER} WITH REPLICATION LOGIN PASSWORD '{REPLICATION_PASSWORD}'"
            ))
            .await
            .map_err(pg_error)?;
        pair.heal().await?;
        eprintln!(
            "PostgreSQL pair (synchronous: {}) ready in {:.1?}",
            pair.opts.synchronous,
            started.elapsed()
        );
        Ok(Some(pair))
    }

    fn roles(&self) -> (usize, usize) {
        let p = self.state.lock().unwrap().primary;
        (p, 1 - p)
    }

    /// The current primary.
    pub fn primary(&self) -> &PgNode {
        &self.nodes[self.roles().0]
    }

    /// The current standby (after a promotion: the old primary, until rebuilt).
    pub fn standby(&self) -> &PgNode {
        &self.nodes[self.roles().1]
    }

    /// A superuser URL (password `postgres`) of the current primary.
    pub fn primary_url(&self, database: &str) -> String {
        self.primary().url(database)
    }

    /// A superuser URL of the current standby (read-only, hot standby).
    pub fn standby_url(&self, database: &str) -> String {
        self.standby().url(database)
    }

    pub fn synchronous(&self) -> bool {
        self.opts.synchronous
    }

    /// Shared use: no other test changes the topology meanwhile.
    pub async fn steady(&self) -> PairRead<'_> {
        let write = self.topology.write().await;
        self.heal().await.unwrap();
        PairRead {
            pair: self,
            _guard: write.downgrade(),
        }
    }

    /// Exclusive use, for stopping and promoting.
    pub async fn exclusive(&self) -> PairWrite<'_> {
        let write = self.topology.write().await;
        self.heal().await.unwrap();
        PairWrite {
            pair: self,
            _guard: write,
        }
    }

    /// Starts a stopped primary; rebuilds the standby when it is missing.
    async fn heal(&self) -> Result<(), String> {
        let (p, s) = self.roles();
        let (running, standby_ok) = {
            let st = self.state.lock().unwrap();
            (st.running, st.standby_ok)
        };
        if !running[p] {
            let (tools, node) = (self.tools.clone(), self.nodes[p].clone());
            blocking(move || node.start(&tools)).await;
            self.state.lock().unwrap().running[p] = true;
        }
        if standby_ok {
            return Ok(());
        }
        let started = Instant::now();
        let (tools, primary, standby) = (
            self.tools.clone(),
            self.nodes[p].clone(),
            self.nodes[s].clone(),
        );
        let was_running = running[s];
        blocking(move || {
            if was_running {
                let _ = tools.try_run(
                    "pg_ctl",
                    &[
                        "-D",
                        standby.data.to_str().unwrap(),
                        "-m",
                        "immediate",
                        "-w",
                        "stop",
                    ],
                );
            }
            let _ = std::fs::remove_dir_all(&standby.data);
            tools.run(
                "pg_basebackup",
                &[
                    "-D",
                    standby.data.to_str().unwrap(),
                    "-d",
                    &format!(
                        "host=127.0.0.1 port={} user={REPLICATION_USER} password={REPLICATION_PASSWORD}",
                        primary.port
                    ),
                    "-R",
                    "-X",
                    "stream",
                    "-c",
                    "fast",
                    "-w",
                    "--no-sync",
                ],
            );
            standby.start(&tools);
        })
        .await;
        self.state.lock().unwrap().running[s] = true;
        let primary = &self.nodes[p];
        procs::poll("the standby streaming", Duration::from_secs(60), || async {
            let n = query_i64(
                primary,
                "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
            )
            .await?;
            if n >= 1 {
                Ok(())
            } else {
                Err("no streaming standby".to_string())
            }
        })
        .await?;
        if self.opts.synchronous {
            let admin = primary.admin().await?;
            // One statement at a time: ALTER SYSTEM refuses a transaction block.
            for sql in [
                "ALTER SYSTEM SET synchronous_standby_names = '*'",
                "ALTER SYSTEM SET synchronous_commit = 'remote_apply'",
                "SELECT pg_reload_conf()",
            ] {
                admin.batch_execute(sql).await.map_err(pg_error)?;
            }
            procs::poll("a synchronous standby", Duration::from_secs(60), || async {
                let setting = query_string(primary, "SHOW synchronous_commit").await?;
                let n = query_i64(
                    primary,
                    "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'",
                )
                .await?;
                if setting == "remote_apply" && n >= 1 {
                    Ok(())
                } else {
                    Err(format!("synchronous_commit {setting}, {n} sync standbys"))
                }
            })
            .await?;
        }
        self.state.lock().unwrap().standby_ok = true;
        eprintln!("PostgreSQL standby built in {:.1?}", started.elapsed());
        Ok(())
    }
}

/// A pair in shared use; see [`PgPair::steady`].
pub struct PairRead<'a> {
    pair: &'a PgPair,
    _guard: RwLockReadGuard<'a, ()>,
}

impl Deref for PairRead<'_> {
    type Target = PgPair;
    fn deref(&self) -> &PgPair {
        self.pair
    }
}

/// A pair in exclusive use; see [`PgPair::exclusive`].
pub struct PairWrite<'a> {
    pair: &'a PgPair,
    _guard: RwLockWriteGuard<'a, ()>,
}

impl Deref for PairWrite<'_> {
    type Target = PgPair;
    fn deref(&self) -> &PgPair {
        self.pair
    }
}

impl PairWrite<'_> {
    /// What `steady`/`exclusive` do first: starts a stopped primary, and
    /// rebuilds the standby from the primary (pg_basebackup) after a promotion.
    pub async fn repair(&self) {
        self.pair.heal().await.unwrap();
    }

    /// Stops the primary (`pg_ctl stop -m fast`); the standby keeps trying to reconnect.
    pub async fn stop_primary(&self) {
        let (p, _) = self.pair.roles();
        let (tools, node) = (self.pair.tools.clone(), self.pair.nodes[p].clone());
        blocking(move || node.stop(&tools, "fast")).await;
        self.pair.state.lock().unwrap().running[p] = false;
    }

    /// Promotes the standby (`pg_ctl promote`) and waits until it accepts
    /// writes (`pg_is_in_recovery()` false). It becomes the primary, with
    /// asynchronous commits (it has no standby); the old primary, if it still
    /// runs, is left alone until the next `steady`/`exclusive` rebuilds it.
    pub async fn promote_standby(&self) {
        let (_, s) = self.pair.roles();
        assert!(
            self.pair.state.lock().unwrap().running[s],
            "no standby to promote"
        );
        let started = Instant::now();
        let (tools, node) = (self.pair.tools.clone(), self.pair.nodes[s].clone());
        blocking(move || {
            tools.run(
                "pg_ctl",
                &[
                    "-D",
                    node.data.to_str().unwrap(),
                    "-w",
                    "-t",
                    "120",
                    "promote",
                ],
            )
        })
        .await;
        let new = &self.pair.nodes[s];
        procs::poll("the promoted standby", Duration::from_secs(60), || async {
            let c = new.admin().await?;
            let recovering: bool = c
                .query_one("SELECT pg_is_in_recovery()", &[])
                .await
                .map_err(pg_error)?
                .get(0);
            if recovering {
                Err("still in recovery".to_string())
            } else {
                Ok(())
            }
        })
        .await
        .unwrap();
        // Its configuration is a copy of a primary's: no synchronous standby
        // to wait for now.
        if !query_string(new, "SHOW synchronous_standby_names")
            .await
            .unwrap()
            .is_empty()
        {
            let c = new.admin().await.unwrap();
            for sql in [
                "ALTER SYSTEM RESET synchronous_standby_names",
                "ALTER SYSTEM RESET synchronous_commit",
                "SELECT pg_reload_conf()",
            ] {
                c.batch_execute(sql).await.map_err(pg_error).unwrap();
            }
            procs::poll("asynchronous commits", Duration::from_secs(30), || async {
                match query_string(new, "SHOW synchronous_standby_names").await? {
                    names if names.is_empty() => Ok(()),
                    names => Err(format!("synchronous_standby_names = {names}")),
                }
            })
            .await
            .unwrap();
        }
        let mut st = self.pair.state.lock().unwrap();
        st.primary = s;
        st.standby_ok = false;
        eprintln!("PostgreSQL standby promoted in {:.1?}", started.elapsed());
    }
}

impl Drop for PgPair {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        for node in &self.nodes {
            let _ = self.tools.try_run(
                "pg_ctl",
                &[
                    "-D",
                    node.data.to_str().unwrap(),
                    "-m",
                    "immediate",
                    "-w",
                    "stop",
                ],
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
