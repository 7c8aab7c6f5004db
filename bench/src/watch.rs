//! The `watch` workload: the end-to-end latency of the change feed, from a
//! Save's answer at the writer to its SAVED event at each watcher.
//!
//! Saves go at a fixed rate (open loop, as `load::open` sends them) to the
//! writing sidecar; watchers stream the collection's changes from the watching
//! sidecar (the same process on SQLite, a second process on the same database
//! on PostgreSQL and MariaDB, as a Deployment's replicas would). Each answer's
//! rev is stamped with the instant the writer got it, each event with the
//! instant the watcher got it; the latency is the difference (0 when the event
//! came first: the commit precedes the answer). The run is repeated without
//! watchers, so the watching process's CPU without them gives the CPU each
//! watcher adds.

use crate::drivers::{self, Client, Shared};
use crate::process;
use crate::workload::{doc_id, Rng, COLLECTION};
use docsidecar::proto::{self, change_event::Kind};
use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One watch run: `watchers` streams while Saves go at `rate`.
#[derive(Debug, Clone, Serialize)]
pub struct WatchResult {
    pub watchers: usize,
    /// `same` (watchers on the writing sidecar) or `second` (another process).
    pub watcher_sidecar: String,
    pub rate: f64,
    /// Saves answered per second: the measured window's Saves over the time
    /// from its start to the last answer (a writer that cannot keep the rate
    /// answers late, and this is then below `rate`).
    pub writes_per_sec: f64,
    /// The writer did not keep the rate (under 95 % of it).
    pub saturated: bool,
    pub write_p50_ms: f64,
    pub write_errors: u64,
    pub write_p99_ms: f64,
    /// Events matched with an answered Save, over all watchers.
    pub events: u64,
    /// (Save, watcher) pairs whose event never came within the drain time.
    pub missing: u64,
    /// Events that arrived before the Save's answer (counted as 0 ms).
    pub before_answer: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// CPU of the process serving the watchers over the window, in mCPU.
    pub watcher_process_mcpu: Option<f64>,
    /// CPU of the writing sidecar (the same process on SQLite), in mCPU.
    pub writer_process_mcpu: Option<f64>,
}

/// What the watch runs need.
pub struct WatchPlan<'a> {
    /// The writing sidecar's clients.
    pub writers: &'a [Client],
    pub writer_pid: Option<u32>,
    /// The watching sidecar's address and process.
    pub watch_address: &'a str,
    pub watch_pid: Option<u32>,
    pub same_process: bool,
    pub watchers: usize,
    pub rate: f64,
    pub docs: u64,
    pub warmup: Duration,
    pub duration: Duration,
    pub seed: u64,
}

/// Revs answered (or seen) and when.
type Stamps = Vec<(String, Instant)>;

/// The measured window's answers, the Saves' latency, the errors, and the time
/// from the window's start to the last answer.
type Written = (Stamps, Histogram<u64>, u64, Duration);

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("valid bounds")
}

/// Opens a Watch stream of the collection from now and reads SAVED events
/// until `stop`, stamping each with its arrival.
async fn watcher(
    address: String,
    ready: tokio::sync::mpsc::Sender<Result<(), String>>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Stamps {
    let mut seen = Stamps::new();
    let channel = match drivers::connect(&address).await {
        Ok(c) => c,
        Err(e) => {
            let _ = ready.send(Err(e)).await;
            return seen;
        }
    };
    let mut client = docsidecar::DocumentServiceClient::new(channel);
    let request = proto::WatchRequest {
        collections: vec![COLLECTION.into()],
        resume_token: String::new(),
        include_documents: false,
    };
    let mut stream = match client.watch(request).await {
        Ok(s) => s.into_inner(),
        Err(e) => {
            let _ = ready.send(Err(format!("Watch: {e}"))).await;
            return seen;
        }
    };
    let _ = ready.send(Ok(())).await;
    let mut stop = stop;
    loop {
        tokio::select! {
            message = stream.message() => match message {
                Ok(Some(event)) => {
                    let at = Instant::now();
                    if event.kind() == Kind::Saved && event.collection == COLLECTION {
                        seen.push((event.rev, at));
                    }
                }
                Ok(None) | Err(_) => break,
            },
            _ = stop.changed() => break,
        }
    }
    seen
}

/// Saves at `rate` over the writer clients for warm-up + duration; the answers
/// of the measured window, stamped, and the Saves' latency histogram.
async fn write_at_rate(plan: &WatchPlan<'_>, shared: Arc<Shared>) -> Written {
    let lanes = plan.writers.len().max(1);
    let begin = Instant::now() + Duration::from_millis(20);
    let measure_from = begin + plan.warmup;
    let end = measure_from + plan.duration;
    let answers = Arc::new(Mutex::new((Stamps::new(), histogram(), 0u64)));
    let mut senders = Vec::with_capacity(lanes);
    let mut tasks = Vec::with_capacity(lanes);
    for lane in 0..lanes {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
        senders.push(tx);
        let mut client = plan.writers[lane].clone();
        let (shared, answers) = (shared.clone(), answers.clone());
        let docs = plan.docs;
        let mut rng = Rng::new(plan.seed.wrapping_mul(1000).wrapping_add(lane as u64));
        tasks.push(tokio::spawn(async move {
            let Client::Grpc(grpc) = &mut client else {
                return;
            };
            while let Some(intended) = rx.recv().await {
                let request = proto::SaveRequest {
                    collection: COLLECTION.into(),
                    id: doc_id(rng.below(docs)),
                    data: Some(shared.payload.data.clone()),
                    ..Default::default()
                };
                let result = grpc.save(request).await;
                let at = Instant::now();
                if intended < measure_from {
                    continue;
                }
                let mut a = answers.lock().unwrap_or_else(|e| e.into_inner());
                match result {
                    Ok(answer) => {
                        a.0.push((answer.into_inner().rev, at));
                        let nanos = (at - intended).as_nanos() as u64;
                        a.1.saturating_record(nanos.max(1));
                    }
                    Err(_) => a.2 += 1,
                }
            }
        }));
    }
    let interval = Duration::from_secs_f64(1.0 / plan.rate.max(0.001));
    let ticker = std::thread::spawn(move || {
        let mut k: u32 = 0;
        loop {
            let at = begin + interval * k;
            if at >= end {
                break;
            }
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            let _ = senders[k as usize % lanes].send(Instant::now());
            k = k.wrapping_add(1);
        }
    });
    let _ = tokio::task::spawn_blocking(move || ticker.join()).await;
    for task in tasks {
        let _ = task.await;
    }
    let mut a = answers.lock().unwrap_or_else(|e| e.into_inner());
    let last = a.0.iter().map(|(_, at)| *at).max().unwrap_or(end);
    let span = last
        .saturating_duration_since(measure_from)
        .max(plan.duration);
    let (stamps, hist, errors) = (
        std::mem::take(&mut a.0),
        a.1.clone(),
        std::mem::replace(&mut a.2, 0),
    );
    (stamps, hist, errors, span)
}

/// One run with `plan.watchers` watchers (0: the CPU baseline).
pub async fn run(plan: &WatchPlan<'_>, shared: Arc<Shared>) -> Result<WatchResult, String> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(plan.watchers.max(1));
    let mut watchers = Vec::with_capacity(plan.watchers);
    for _ in 0..plan.watchers {
        watchers.push(tokio::spawn(watcher(
            plan.watch_address.to_string(),
            ready_tx.clone(),
            stop_rx.clone(),
        )));
    }
    drop(ready_tx);
    for _ in 0..plan.watchers {
        match ready_rx.recv().await {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(format!("a watcher could not start: {e}")),
            None => return Err("the watchers ended before starting".into()),
        }
    }
    // The streams are open; let them settle on the feed's head.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ticks = |pid: Option<u32>| pid.and_then(process::cpu_ticks);
    let cpu_from = (
        ticks(plan.watch_pid),
        ticks(plan.writer_pid),
        Instant::now(),
    );
    let (answers, save_latency, write_errors, window) = write_at_rate(plan, shared).await;
    let wall = cpu_from.2.elapsed();
    let mcpu = |before: Option<u64>, pid: Option<u32>| match (before, ticks(pid)) {
        (Some(a), Some(b)) => Some(process::mcpu(a, b, wall)),
        _ => None,
    };
    let watcher_process_mcpu = mcpu(cpu_from.0, plan.watch_pid);
    let writer_process_mcpu = mcpu(cpu_from.1, plan.writer_pid);
    // Stragglers: a polling feed delivers within its interval (0.5 s by default).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let _ = stop_tx.send(true);
    let acked: HashMap<&str, Instant> = answers.iter().map(|(r, t)| (r.as_str(), *t)).collect();
    let mut latency = histogram();
    let (mut events, mut before_answer, mut missing) = (0u64, 0u64, 0u64);
    for w in watchers {
        let seen = w.await.map_err(|e| e.to_string())?;
        let mut matched = 0u64;
        for (rev, at) in &seen {
            if let Some(acked_at) = acked.get(rev.as_str()) {
                matched += 1;
                let lag = at.saturating_duration_since(*acked_at);
                if lag.is_zero() {
                    before_answer += 1;
                }
                latency.saturating_record((lag.as_nanos() as u64).max(1));
            }
        }
        events += matched;
        missing += (acked.len() as u64).saturating_sub(matched);
    }
    let ms = |q: f64| latency.value_at_quantile(q) as f64 / 1e6;
    let writes_per_sec = answers.len() as f64 / window.as_secs_f64().max(1e-9);
    Ok(WatchResult {
        watchers: plan.watchers,
        watcher_sidecar: if plan.same_process { "same" } else { "second" }.into(),
        rate: plan.rate,
        writes_per_sec,
        saturated: writes_per_sec < 0.95 * plan.rate,
        write_p50_ms: save_latency.value_at_quantile(0.5) as f64 / 1e6,
        write_errors,
        write_p99_ms: save_latency.value_at_quantile(0.99) as f64 / 1e6,
        events,
        missing,
        before_answer,
        p50_ms: if events > 0 { ms(0.5) } else { 0.0 },
        p90_ms: if events > 0 { ms(0.9) } else { 0.0 },
        p99_ms: if events > 0 { ms(0.99) } else { 0.0 },
        max_ms: latency.max() as f64 / 1e6,
        watcher_process_mcpu,
        writer_process_mcpu,
    })
}

/// The CPU each watcher adds: the watching process with `n` watchers against
/// the run without watchers, divided by `n`.
pub fn mcpu_per_watcher(with: &WatchResult, without: &WatchResult) -> Option<f64> {
    let (a, b) = (with.watcher_process_mcpu?, without.watcher_process_mcpu?);
    (with.watchers > 0).then(|| (a - b) / with.watchers as f64)
}

/// Write throughput of the raw driver with and without the change record in
/// each Save's transaction (MariaDB, closed loop): what the change log costs
/// the database, the sidecar having no switch to turn it off.
#[derive(Debug, Clone, Serialize)]
pub struct ChangeLogCost {
    pub concurrency: usize,
    pub with_per_sec: f64,
    pub without_per_sec: f64,
    pub ratio: f64,
}

/// Every figure of the watch workload on one database.
#[derive(Debug, Clone, Serialize)]
pub struct WatchReport {
    pub runs: Vec<WatchResult>,
    pub mcpu_per_watcher: Option<f64>,
    pub change_log: Option<ChangeLogCost>,
}

/// What `measure` needs from the run.
pub struct WatchSetup<'a> {
    pub spec: Option<&'a crate::process::SidecarSpec<'a>>,
    pub same_process: bool,
    pub writers: &'a [Client],
    pub writer_address: &'a str,
    pub writer_pid: Option<u32>,
    pub watchers: usize,
    pub rate: f64,
    pub docs: u64,
    pub warmup: Duration,
    pub duration: Duration,
    /// MariaDB: the raw driver's URL, for the change log's cost.
    pub raw_mysql: Option<(String, usize)>,
}

/// The watch workload: a run without watchers, one with `watchers`, and on
/// MariaDB the change log's cost to the raw driver.
pub async fn measure(setup: &WatchSetup<'_>, shared: Arc<Shared>) -> Result<WatchReport, String> {
    // PostgreSQL and MariaDB: the watchers' own sidecar on the same database.
    let mut second = None;
    let (watch_address, watch_pid) = if setup.same_process {
        (setup.writer_address.to_string(), setup.writer_pid)
    } else {
        let spec = setup
            .spec
            .ok_or("the watch workload starts a second sidecar: not with --target")?;
        let (p, address) = spec.start("127.0.0.1:0")?;
        let pid = p.pid;
        second = Some(p);
        (address, Some(pid))
    };
    let mut runs = Vec::new();
    for (i, watchers) in [0, setup.watchers].into_iter().enumerate() {
        let plan = WatchPlan {
            writers: setup.writers,
            writer_pid: setup.writer_pid,
            watch_address: &watch_address,
            watch_pid,
            same_process: setup.same_process,
            watchers,
            rate: setup.rate,
            docs: setup.docs,
            warmup: setup.warmup,
            duration: setup.duration,
            seed: 7000 + i as u64,
        };
        let result = run(&plan, shared.clone()).await?;
        eprintln!(
            "watch  {:>2} watchers ({} sidecar): {:.0} writes/s, {} events, {} missing, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; watching process {} mCPU",
            result.watchers,
            result.watcher_sidecar,
            result.writes_per_sec,
            result.events,
            result.missing,
            result.p50_ms,
            result.p99_ms,
            result.max_ms,
            result
                .watcher_process_mcpu
                .map_or("-".into(), |c| format!("{c:.0}")),
        );
        runs.push(result);
    }
    if let Some(p) = second {
        let _ = p.stop(Duration::from_secs(15));
    }
    let mcpu_per_watcher = match runs.as_slice() {
        [without, with] => mcpu_per_watcher(with, without),
        _ => None,
    };
    let mut change_log = None;
    if let Some((url, pool_size)) = &setup.raw_mysql {
        let concurrency = 16;
        let mut rates = Vec::new();
        for on in [true, false] {
            let mut raw = crate::drivers::RawMysql::new(url, *pool_size)?;
            raw.change_log = on;
            let clients = [Client::Mysql(Arc::new(raw))];
            let plan = crate::load::Plan {
                workload: crate::workload::Workload::Save,
                docs: setup.docs,
                warmup: setup.warmup,
                duration: setup.duration,
                pid: None,
                seed: 9000,
            };
            let m = crate::load::closed(&clients, concurrency, shared.clone(), &plan).await;
            rates.push(m.ops as f64 / m.window.as_secs_f64().max(1e-9));
        }
        let cost = ChangeLogCost {
            concurrency,
            with_per_sec: rates[0],
            without_per_sec: rates[1],
            ratio: rates[0] / rates[1].max(1e-9),
        };
        eprintln!(
            "watch  raw Save c={concurrency}: {:.0}/s with the change record, {:.0}/s without ({:.2}x)",
            cost.with_per_sec, cost.without_per_sec, cost.ratio
        );
        change_log = Some(cost);
    }
    Ok(WatchReport {
        runs,
        mcpu_per_watcher,
        change_log,
    })
}
