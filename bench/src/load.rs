//! Load generation: closed loop (N workers, each sending its next request when the
//! previous one returns) and open loop (a fixed rate over a fixed number of
//! connections, latency measured from each request's dispatch by an independent
//! ticker, so a slow answer delays the requests queued behind it and is charged
//! for them: no coordinated omission).

use crate::drivers::{Client, Shared};
use crate::process;
use crate::workload::{Rng, Workload};
use hdrhistogram::Histogram;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What one run measured.
pub struct Measured {
    /// Latency in nanoseconds (open loop: from the intended send time).
    pub latency: Histogram<u64>,
    /// Open loop: from the actual send to the answer (the server's service time).
    pub service: Histogram<u64>,
    pub ops: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// The measurement window (warm-up excluded).
    pub window: Duration,
    /// Requests still queued when the run had to stop (open loop, overload).
    pub abandoned: u64,
    pub cpu_mcpu: Option<f64>,
    pub peak_rss_kb: Option<u64>,
    /// CPU of the harness itself (load generator and clients; for the raw
    /// target, the driver too), in mCPU.
    pub client_mcpu: Option<f64>,
}

fn histogram() -> Histogram<u64> {
    // 1 ns to 100 s at 3 significant digits.
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("valid bounds")
}

fn nanos(d: Duration) -> u64 {
    (d.as_nanos() as u64).clamp(1, 100_000_000_000)
}

struct Part {
    latency: Histogram<u64>,
    service: Histogram<u64>,
    ops: u64,
    errors: u64,
    first_error: Option<String>,
    abandoned: u64,
}

impl Part {
    fn new() -> Part {
        Part {
            latency: histogram(),
            service: histogram(),
            ops: 0,
            errors: 0,
            first_error: None,
            abandoned: 0,
        }
    }

    fn result(&mut self, result: Result<(), String>) -> bool {
        match result {
            Ok(()) => true,
            Err(e) => {
                self.errors += 1;
                self.first_error.get_or_insert(e);
                false
            }
        }
    }
}

/// Process readings over the measurement window: CPU and peak RSS of `pid`.
struct Probe {
    pid: Option<u32>,
    ticks: Option<u64>,
    own_ticks: Option<u64>,
    started: Instant,
}

/// What a [`Probe`] read: (target mCPU, target peak RSS kB, harness mCPU).
type Readings = (Option<f64>, Option<u64>, Option<f64>);

impl Probe {
    fn start(pid: Option<u32>) -> Probe {
        if let Some(pid) = pid {
            process::reset_peak_rss(pid);
        }
        Probe {
            pid,
            ticks: pid.and_then(process::cpu_ticks),
            own_ticks: process::cpu_ticks(std::process::id()),
            started: Instant::now(),
        }
    }

    fn finish(self) -> Readings {
        let wall = self.started.elapsed();
        let own = match (self.own_ticks, process::cpu_ticks(std::process::id())) {
            (Some(a), Some(b)) => Some(process::mcpu(a, b, wall)),
            _ => None,
        };
        let Some(pid) = self.pid else {
            return (None, None, own);
        };
        let cpu = match (self.ticks, process::cpu_ticks(pid)) {
            (Some(a), Some(b)) => Some(process::mcpu(a, b, wall)),
            _ => None,
        };
        (cpu, process::status_kb(pid, "VmHWM"), own)
    }
}

pub struct Plan {
    pub workload: Workload,
    pub docs: u64,
    pub warmup: Duration,
    pub duration: Duration,
    /// The process to measure (the sidecar or the floor), if any.
    pub pid: Option<u32>,
    pub seed: u64,
}

fn merge(parts: Vec<Part>, window: Duration, probe: Readings) -> Measured {
    let mut m = Measured {
        latency: histogram(),
        service: histogram(),
        ops: 0,
        errors: 0,
        first_error: None,
        window,
        abandoned: 0,
        cpu_mcpu: probe.0,
        peak_rss_kb: probe.1,
        client_mcpu: probe.2,
    };
    for p in parts {
        let _ = m.latency.add(&p.latency);
        let _ = m.service.add(&p.service);
        m.ops += p.ops;
        m.errors += p.errors;
        m.abandoned += p.abandoned;
        if m.first_error.is_none() {
            m.first_error = p.first_error;
        }
    }
    m
}

/// `concurrency` workers over `clients` (worker i uses client i mod len).
pub async fn closed(
    clients: &[Client],
    concurrency: usize,
    shared: Arc<Shared>,
    plan: &Plan,
) -> Measured {
    let begin = Instant::now();
    let measure_from = begin + plan.warmup;
    let end = measure_from + plan.duration;
    let mut tasks = Vec::with_capacity(concurrency);
    for worker in 0..concurrency {
        let mut client = clients[worker % clients.len()].clone();
        let shared = shared.clone();
        let (workload, docs) = (plan.workload, plan.docs);
        let mut rng = Rng::new(plan.seed.wrapping_mul(1000).wrapping_add(worker as u64));
        tasks.push(tokio::spawn(async move {
            let mut part = Part::new();
            let pages = shared.pages.len();
            loop {
                let op = workload.next(&mut rng, docs, pages);
                let sent = Instant::now();
                if sent >= end {
                    break;
                }
                let result = client.run(&op, &shared).await;
                let done = Instant::now();
                if sent >= measure_from && part.result(result) {
                    part.latency.saturating_record(nanos(done - sent));
                    part.ops += 1;
                }
            }
            part
        }));
    }
    tokio::time::sleep_until(measure_from.into()).await;
    let probe = Probe::start(plan.pid);
    tokio::time::sleep_until(end.into()).await;
    let probe = probe.finish();
    let mut parts = Vec::with_capacity(tasks.len());
    for task in tasks {
        if let Ok(part) = task.await {
            parts.push(part);
        }
    }
    merge(parts, plan.duration, probe)
}

/// `rate` requests per second spread over `lanes` connections (lane i uses client
/// i mod len), each lane sending its requests one after the other.
pub async fn open(
    clients: &[Client],
    lanes: usize,
    rate: f64,
    shared: Arc<Shared>,
    plan: &Plan,
) -> Measured {
    let lanes = lanes.max(1);
    let begin = Instant::now() + Duration::from_millis(20);
    let measure_from = begin + plan.warmup;
    let end = measure_from + plan.duration;
    // An overloaded target stops the run this long after its end; what is still
    // queued then is recorded with the latency it has reached, not executed.
    let cutoff = end + Duration::from_secs(2).max(plan.duration / 2);
    let mut senders = Vec::with_capacity(lanes);
    let mut tasks = Vec::with_capacity(lanes);
    for lane in 0..lanes {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
        senders.push(tx);
        let mut client = clients[lane % clients.len()].clone();
        let shared = shared.clone();
        let (workload, docs) = (plan.workload, plan.docs);
        let mut rng = Rng::new(plan.seed.wrapping_mul(1000).wrapping_add(lane as u64));
        tasks.push(tokio::spawn(async move {
            let mut part = Part::new();
            let pages = shared.pages.len();
            while let Some(intended) = rx.recv().await {
                let counted = intended >= measure_from;
                let sent = Instant::now();
                if sent >= cutoff {
                    if counted {
                        part.latency.saturating_record(nanos(sent - intended));
                        part.abandoned += 1;
                    }
                    continue;
                }
                let op = workload.next(&mut rng, docs, pages);
                let result = client.run(&op, &shared).await;
                let done = Instant::now();
                if counted && part.result(result) {
                    part.latency.saturating_record(nanos(done - intended));
                    part.service.saturating_record(nanos(done - sent));
                    part.ops += 1;
                }
            }
            part
        }));
    }
    // The ticker: its own thread, so its schedule never waits for an answer. Each
    // request's intended time is the instant the ticker hands it to its lane
    // (its sleep overshoots by tens of microseconds, which is the harness's, not
    // the target's); ticks keep to the ideal schedule, so the rate does not drift.
    let interval = Duration::from_secs_f64(1.0 / rate.max(0.001));
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
    tokio::time::sleep_until(measure_from.into()).await;
    let probe = Probe::start(plan.pid);
    tokio::time::sleep_until(end.into()).await;
    let probe = probe.finish();
    let _ = tokio::task::spawn_blocking(move || ticker.join()).await;
    let mut parts = Vec::with_capacity(tasks.len());
    for task in tasks {
        if let Ok(part) = task.await {
            parts.push(part);
        }
    }
    merge(parts, plan.duration, probe)
}
