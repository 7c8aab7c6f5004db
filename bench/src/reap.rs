//! The `reap` workload: how fast the expiry reaper deletes a pile of expired
//! documents, and what it does to concurrent Gets.
//!
//! `docs` documents (the benchmark payload) are written through the sidecar
//! into their own collection with a one-hour TTL; every sidecar of the run but
//! the reaping one has its reaper parked (`DOCSIDECAR_REAP_INTERVAL=86400`).
//! Gets of the preloaded collection go at a fixed rate to the reaping sidecar,
//! first with nothing to reap (the baseline), then after every document of
//! the pile is expired at once (one UPDATE of `expire_time` by the harness's
//! admin connection), until the reaper has deleted them all. The deletion rate
//! is the pile over the time from the first deletion seen to the last; the
//! remaining rows are counted every 100 ms.

use crate::drivers::{Client, Shared};
use crate::process;
use crate::workload::{doc_id, Rng};
use crate::{Admin, Db};
use docsidecar::proto::{self, mutation};
use hdrhistogram::Histogram;
use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The collection of the expiring documents.
pub const REAP_COLLECTION: &str = "reap";

/// Gets at a fixed rate: how they fared.
#[derive(Debug, Clone, Serialize)]
pub struct GetLatency {
    pub gets: u64,
    pub errors: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// CPU of the reaping sidecar over the window, in mCPU.
    pub sidecar_mcpu: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReapResult {
    pub docs: u64,
    /// The reaper's settings (the sidecar's environment; defaults when unset).
    pub reap_interval: String,
    pub reap_batch: String,
    /// Writing the pile through the sidecar, in seconds.
    pub load_secs: f64,
    /// From the expiring UPDATE to the first deletion seen.
    pub first_deletion_secs: f64,
    /// From the first deletion seen to none left.
    pub reap_secs: f64,
    /// Documents deleted per second over `reap_secs`.
    pub docs_per_sec: f64,
    /// Whether every document was reaped before the cap (300 s).
    pub complete: bool,
    pub get_rate: f64,
    pub gets_idle: GetLatency,
    pub gets_reaping: GetLatency,
}

/// What the reap run needs.
pub struct ReapPlan<'a> {
    pub db: &'a Db,
    pub schema: &'a str,
    pub docs: u64,
    pub loader: Client,
    /// The reaping sidecar's clients and process.
    pub clients: Vec<Client>,
    pub pid: Option<u32>,
    pub rate: f64,
    pub idle: Duration,
    pub get_docs: u64,
    pub env: &'a [(String, String)],
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("valid bounds")
}

/// Gets at `rate` (each at its scheduled instant, on its own task, so a slow
/// answer delays none of the others; latency from the schedule) until `stop`.
async fn gets_until(
    clients: &[Client],
    rate: f64,
    docs: u64,
    shared: Arc<Shared>,
    pid: Option<u32>,
    stop: impl std::future::Future<Output = ()>,
) -> GetLatency {
    let record = Arc::new(Mutex::new((histogram(), 0u64, 0u64)));
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.001)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut rng = Rng::new(docs ^ 0x5eed);
    let before = (pid.and_then(process::cpu_ticks), Instant::now());
    let mut tasks = tokio::task::JoinSet::new();
    let mut k = 0usize;
    tokio::pin!(stop);
    loop {
        tokio::select! {
            intended = ticker.tick() => {
                let intended = intended.into_std();
                let mut client = clients[k % clients.len()].clone();
                k += 1;
                let (shared, record) = (shared.clone(), record.clone());
                let op = crate::workload::Op::Get(rng.below(docs));
                tasks.spawn(async move {
                    let result = client.run(&op, &shared).await;
                    let lag = Instant::now().saturating_duration_since(intended);
                    let mut r = record.lock().unwrap_or_else(|e| e.into_inner());
                    match result {
                        Ok(()) => {
                            r.0.saturating_record((lag.as_nanos() as u64).max(1));
                            r.1 += 1;
                        }
                        Err(_) => r.2 += 1,
                    }
                });
                while tasks.try_join_next().is_some() {}
            }
            _ = &mut stop => break,
        }
    }
    let wall = before.1.elapsed();
    let cpu = match (before.0, pid.and_then(process::cpu_ticks)) {
        (Some(a), Some(b)) => Some(process::mcpu(a, b, wall)),
        _ => None,
    };
    while tasks.join_next().await.is_some() {}
    let r = record.lock().unwrap_or_else(|e| e.into_inner());
    let ms = |q: f64| r.0.value_at_quantile(q) as f64 / 1e6;
    GetLatency {
        gets: r.1,
        errors: r.2,
        p50_ms: ms(0.5),
        p90_ms: ms(0.9),
        p99_ms: ms(0.99),
        max_ms: r.0.max() as f64 / 1e6,
        sidecar_mcpu: cpu,
    }
}

/// Rows left in the pile's collection.
async fn remaining(db: &Db, admin: &mut Admin, schema: &str) -> Result<u64, String> {
    use mysql_async::prelude::Queryable;
    match (db, admin) {
        (Db::Sqlite(path), _) => {
            let path = path.clone();
            tokio::task::spawn_blocking(move || {
                let conn = rusqlite::Connection::open(&path).map_err(|e| e.to_string())?;
                conn.busy_timeout(Duration::from_secs(5))
                    .map_err(|e| e.to_string())?;
                conn.query_row(
                    "SELECT count(*) FROM documents WHERE collection = ?1",
                    [REAP_COLLECTION],
                    |r| r.get::<_, i64>(0),
                )
                .map(|n| n as u64)
                .map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| e.to_string())?
        }
        (Db::Postgres(_), Admin::Pg(c)) => c
            .query_one(
                &format!("SELECT count(*) FROM \"{schema}\".\"{REAP_COLLECTION}\""),
                &[],
            )
            .await
            .map(|row| row.get::<_, i64>(0) as u64)
            .map_err(|e| e.to_string()),
        (Db::Mysql(_), Admin::Mysql(c)) => c
            .query_first::<u64, _>(format!(
                "SELECT count(*) FROM `{schema}`.`{REAP_COLLECTION}`"
            ))
            .await
            .map(Option::unwrap_or_default)
            .map_err(|e| e.to_string()),
        _ => Err("no admin connection for this database".into()),
    }
}

/// Expires every document of the pile now (the database's time, less a second).
async fn expire_all(db: &Db, admin: &mut Admin, schema: &str) -> Result<u64, String> {
    use mysql_async::prelude::Queryable;
    let at = docsidecar::store::now_micros() - 1_000_000;
    match (db, admin) {
        (Db::Sqlite(path), _) => {
            let path = path.clone();
            tokio::task::spawn_blocking(move || {
                let conn = rusqlite::Connection::open(&path).map_err(|e| e.to_string())?;
                conn.busy_timeout(Duration::from_secs(10))
                    .map_err(|e| e.to_string())?;
                conn.execute(
                    "UPDATE documents SET expire_time = ?1 WHERE collection = ?2",
                    rusqlite::params![at, REAP_COLLECTION],
                )
                .map(|n| n as u64)
                .map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| e.to_string())?
        }
        (Db::Postgres(_), Admin::Pg(c)) => c
            .execute(
                &format!("UPDATE \"{schema}\".\"{REAP_COLLECTION}\" SET expire_time = $1"),
                &[&at],
            )
            .await
            .map_err(|e| e.to_string()),
        (Db::Mysql(_), Admin::Mysql(c)) => {
            c.exec_drop(
                format!("UPDATE `{schema}`.`{REAP_COLLECTION}` SET expire_time = ?"),
                (at,),
            )
            .await
            .map_err(|e| e.to_string())?;
            Ok(c.affected_rows())
        }
        _ => Err("no admin connection for this database".into()),
    }
}

/// Writes the pile: `docs` documents with a one-hour TTL, 500 a Write.
async fn load(plan: &ReapPlan<'_>, shared: &Shared) -> Result<(), String> {
    let Client::Grpc(grpc) = &plan.loader else {
        return Err("the loader must be a gRPC client".into());
    };
    let ids: Vec<u64> = (0..plan.docs).collect();
    let chunks: Vec<&[u64]> = ids.chunks(500).collect();
    // Two Writes in flight: the database, not the round trip, sets the pace.
    for pair in chunks.chunks(2) {
        let mut calls = Vec::new();
        for chunk in pair {
            let mut grpc = grpc.clone();
            let request = proto::WriteRequest {
                mutations: chunk
                    .iter()
                    .map(|&i| proto::Mutation {
                        op: Some(mutation::Op::Save(proto::SaveRequest {
                            collection: REAP_COLLECTION.into(),
                            id: doc_id(i),
                            data: Some(shared.payload.data.clone()),
                            expiration: Some(proto::save_request::Expiration::Ttl(
                                prost_types::Duration {
                                    seconds: 3600,
                                    nanos: 0,
                                },
                            )),
                            ..Default::default()
                        })),
                    })
                    .collect(),
            };
            calls.push(async move { grpc.write(request).await });
        }
        for result in futures_util::future::join_all(calls).await {
            result
                .map_err(|e| format!("loading the pile failed: {:?}: {}", e.code(), e.message()))?;
        }
    }
    Ok(())
}

fn setting(env: &[(String, String)], key: &str, default: &str) -> String {
    env.iter()
        .rev()
        .find(|(k, _)| k == key)
        .map_or(default.to_string(), |(_, v)| v.clone())
}

pub async fn run(
    plan: &ReapPlan<'_>,
    admin: &mut Admin,
    shared: Arc<Shared>,
) -> Result<ReapResult, String> {
    let started = Instant::now();
    load(plan, &shared).await?;
    let load_secs = started.elapsed().as_secs_f64();
    let loaded = remaining(plan.db, admin, plan.schema).await?;
    if loaded != plan.docs {
        return Err(format!(
            "the pile holds {loaded} documents after loading, expected {}",
            plan.docs
        ));
    }
    eprintln!("reap: loaded {loaded} documents in {load_secs:.1} s");
    let idle = plan.idle;
    let gets_idle = gets_until(
        &plan.clients,
        plan.rate,
        plan.get_docs,
        shared.clone(),
        plan.pid,
        tokio::time::sleep(idle),
    )
    .await;
    eprintln!(
        "reap: Gets at {}/s, nothing to reap: p50 {:.3} ms, p99 {:.3} ms",
        plan.rate, gets_idle.p50_ms, gets_idle.p99_ms
    );
    let expired = expire_all(plan.db, admin, plan.schema).await?;
    let expired_at = Instant::now();
    // Watches the pile shrink; resolves when it is empty or at the cap.
    let (mut first, mut last, mut complete) = (None, None, false);
    let watch = async {
        let cap = Duration::from_secs(300);
        while expired_at.elapsed() < cap {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let left = match remaining(plan.db, admin, plan.schema).await {
                Ok(n) => n,
                Err(e) => {
                    eprintln!("reap: counting failed: {e}");
                    continue;
                }
            };
            let now = Instant::now();
            if left < expired && first.is_none() {
                first = Some(now);
            }
            if left == 0 {
                last = Some(now);
                complete = true;
                return;
            }
        }
    };
    let gets_reaping = gets_until(
        &plan.clients,
        plan.rate,
        plan.get_docs,
        shared.clone(),
        plan.pid,
        watch,
    )
    .await;
    let first = first.unwrap_or(expired_at);
    let last = last.unwrap_or_else(Instant::now);
    let reap_secs = last.saturating_duration_since(first).as_secs_f64();
    let result = ReapResult {
        docs: expired,
        reap_interval: setting(plan.env, "DOCSIDECAR_REAP_INTERVAL", "1"),
        reap_batch: setting(plan.env, "DOCSIDECAR_REAP_BATCH", "500"),
        load_secs,
        first_deletion_secs: first.saturating_duration_since(expired_at).as_secs_f64(),
        reap_secs,
        docs_per_sec: expired as f64 / reap_secs.max(1e-3),
        complete,
        get_rate: plan.rate,
        gets_idle,
        gets_reaping,
    };
    eprintln!(
        "reap: {} documents in {:.2} s ({:.0}/s, first deletion after {:.2} s); Gets meanwhile: p50 {:.3} ms, p99 {:.3} ms",
        result.docs,
        result.reap_secs,
        result.docs_per_sec,
        result.first_deletion_secs,
        result.gets_reaping.p50_ms,
        result.gets_reaping.p99_ms
    );
    Ok(result)
}

/// Starts the reaping sidecar (the run's settings, the reaper as configured),
/// runs the reap workload against it and stops it.
pub async fn measure(
    spec: &crate::process::SidecarSpec<'_>,
    plan: ReapPlan<'_>,
    connections: usize,
    admin: &mut Admin,
    shared: Arc<Shared>,
) -> Result<ReapResult, String> {
    let (process, address) = spec.start("127.0.0.1:0")?;
    let plan = ReapPlan {
        clients: crate::drivers::grpc_clients(&address, connections).await?,
        pid: Some(process.pid),
        ..plan
    };
    let result = run(&plan, admin, shared).await;
    let _ = process.stop(Duration::from_secs(15));
    result
}
