//! The report: a table on stdout, a JSON file and a PNG chart.

use crate::load::Measured;
use serde::Serialize;
use std::fmt::Write as _;
use std::path::Path;

/// One run: a workload against a target in one mode.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub workload: String,
    pub target: String,
    /// `closed` or `open`.
    pub mode: String,
    /// Closed loop: workers; open loop: connections.
    pub concurrency: usize,
    /// Open loop: the requests per second asked for.
    pub rate: Option<f64>,
    pub ops: u64,
    pub ops_per_sec: f64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
    /// Open loop: send → answer, without the wait in the lane's queue.
    pub service_p50_us: Option<f64>,
    pub service_p99_us: Option<f64>,
    /// Open loop: requests still queued when the run stopped (overload).
    pub abandoned: u64,
    /// Open loop: the target could not keep the rate (under 95 % of it answered).
    pub saturated: bool,
    /// CPU of the measured process (sidecar or floor) over the window, in mCPU.
    pub cpu_mcpu: Option<f64>,
    /// Peak RSS of the measured process during the run, in MB (MiB).
    pub peak_rss_mb: Option<f64>,
    /// CPU of the harness process (load generator, gRPC clients; for `raw`, the
    /// driver too), in mCPU.
    pub client_mcpu: Option<f64>,
}

impl RunResult {
    pub fn new(
        workload: &str,
        target: &str,
        mode: &str,
        concurrency: usize,
        rate: Option<f64>,
        m: &Measured,
    ) -> RunResult {
        let us = |v: u64| v as f64 / 1000.0;
        let secs = m.window.as_secs_f64().max(1e-9);
        let ops_per_sec = m.ops as f64 / secs;
        let open = rate.is_some();
        RunResult {
            workload: workload.into(),
            target: target.into(),
            mode: mode.into(),
            concurrency,
            rate,
            ops: m.ops,
            ops_per_sec,
            errors: m.errors,
            first_error: m.first_error.clone(),
            p50_us: us(m.latency.value_at_quantile(0.50)),
            p90_us: us(m.latency.value_at_quantile(0.90)),
            p99_us: us(m.latency.value_at_quantile(0.99)),
            p999_us: us(m.latency.value_at_quantile(0.999)),
            max_us: us(m.latency.max()),
            mean_us: m.latency.mean() / 1000.0,
            service_p50_us: open.then(|| us(m.service.value_at_quantile(0.50))),
            service_p99_us: open.then(|| us(m.service.value_at_quantile(0.99))),
            abandoned: m.abandoned,
            saturated: rate.is_some_and(|r| ops_per_sec < 0.95 * r) || m.abandoned > 0,
            cpu_mcpu: m.cpu_mcpu,
            peak_rss_mb: m.peak_rss_kb.map(|kb| kb as f64 / 1024.0),
            client_mcpu: m.client_mcpu,
        }
    }
}

/// The sidecar compared with a baseline in the same workload and mode.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub workload: String,
    pub mode: String,
    pub concurrency: usize,
    pub target: String,
    pub baseline: String,
    /// target ops/s ÷ baseline ops/s.
    pub throughput_ratio: f64,
    /// target − baseline, in microseconds.
    pub p50_added_us: f64,
    pub p99_added_us: f64,
    pub p999_added_us: f64,
}

/// One target of the issue, with the measured figure.
#[derive(Debug, Clone, Serialize)]
pub struct TargetCheck {
    pub name: String,
    pub figure: String,
    pub limit: String,
    /// None: not measured in this run.
    pub met: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub memory_gb: f64,
}

impl Machine {
    pub fn read() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or_else(|| "unknown".into(), |(_, m)| m.trim().to_string());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or_else(|_| "unknown".into(), |k| k.trim().to_string());
        let memory_gb = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            })
            .map_or(0.0, |kb| (kb / 1024.0 / 1024.0 * 10.0).round() / 10.0);
        Machine {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model,
            kernel,
            memory_gb,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub docs: u64,
    pub payload_bytes: usize,
    pub pool_size: usize,
    pub connections: usize,
    pub concurrency: Vec<usize>,
    pub rate: f64,
    pub warmup_secs: f64,
    pub closed_secs: f64,
    pub open_get_secs: f64,
    pub open_other_secs: f64,
    pub quick: bool,
    pub command: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct SidecarInfo {
    pub binary: Option<String>,
    /// Spawn → first SERVING health check on a fresh SQLite file, in ms.
    pub startup_ms: Vec<f64>,
    pub startup_median_ms: Option<f64>,
    /// RSS after start-up, before any load, in MB (MiB).
    pub idle_rss_mb: Option<f64>,
    pub idle_rss_uds_mb: Option<f64>,
    /// Of the idle RSS, the anonymous memory (heap, stacks): what the sidecar
    /// allocated, as opposed to pages of its executable mapped from the page cache.
    pub idle_rss_anon_mb: Option<f64>,
    /// VmHWM over the sidecar's whole life (preload included), in MB.
    pub lifetime_peak_rss_mb: Option<f64>,
    /// Warnings and errors the sidecar logged during the run.
    pub problems: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `sqlite`, `postgres` or `mariadb`.
    pub database: String,
    pub generated_unix: u64,
    pub machine: Machine,
    pub settings: Settings,
    pub sidecar: SidecarInfo,
    pub results: Vec<RunResult>,
    pub comparisons: Vec<Comparison>,
    pub targets: Vec<TargetCheck>,
    /// The `watch` workload, when it ran.
    pub watch: Option<crate::watch::WatchReport>,
    /// The `reap` workload, when it ran.
    pub reap: Option<crate::reap::ReapResult>,
    /// The `query` workload, when it ran.
    pub query: Option<crate::query::QueryReport>,
}

pub fn find<'a>(
    results: &'a [RunResult],
    workload: &str,
    target: &str,
    mode: &str,
    concurrency: usize,
) -> Option<&'a RunResult> {
    results.iter().find(|r| {
        r.workload == workload
            && r.target == target
            && r.mode == mode
            && r.concurrency == concurrency
    })
}

/// Every sidecar run against each baseline measured alongside it.
pub fn compare(results: &[RunResult]) -> Vec<Comparison> {
    let pairs = [
        ("sidecar", "raw"),
        ("sidecar", "floor"),
        ("sidecar-uds", "raw"),
        ("sidecar-uds", "floor-uds"),
    ];
    let mut out = Vec::new();
    for r in results.iter().filter(|r| r.target.starts_with("sidecar")) {
        for (target, baseline) in pairs {
            if r.target != target {
                continue;
            }
            if let Some(b) = find(results, &r.workload, baseline, &r.mode, r.concurrency) {
                out.push(Comparison {
                    workload: r.workload.clone(),
                    mode: r.mode.clone(),
                    concurrency: r.concurrency,
                    target: target.into(),
                    baseline: baseline.into(),
                    throughput_ratio: r.ops_per_sec / b.ops_per_sec.max(1e-9),
                    p50_added_us: r.p50_us - b.p50_us,
                    p99_added_us: r.p99_us - b.p99_us,
                    p999_added_us: r.p999_us - b.p999_us,
                });
            }
        }
    }
    out
}

fn ms(us: f64) -> String {
    format!("{:.3}", us / 1000.0)
}

/// The targets that this database's run can decide.
pub fn check_targets(report: &Report, concurrency_max: usize) -> Vec<TargetCheck> {
    let mut checks = Vec::new();
    let results = &report.results;
    let c = report.settings.connections;
    let cmp = |target: &str, baseline: &str, mode: &str, conc: usize| {
        report.comparisons.iter().find(|x| {
            x.workload == "get"
                && x.target == target
                && x.baseline == baseline
                && x.mode == mode
                && x.concurrency == conc
        })
    };
    if report.database == "postgres" {
        let rate = report.settings.rate;
        if let Some(x) = cmp("sidecar", "raw", "open", c) {
            checks.push(TargetCheck {
                name: format!("Get at {rate} req/s on PostgreSQL: p50 added over the raw driver"),
                figure: format!("{:+.3} ms", x.p50_added_us / 1000.0),
                limit: "<= 0.05 ms".into(),
                met: Some(x.p50_added_us <= 50.0),
            });
            checks.push(TargetCheck {
                name: format!("Get at {rate} req/s on PostgreSQL: p99 added over the raw driver"),
                figure: format!("{:+.3} ms", x.p99_added_us / 1000.0),
                limit: "<= 0.2 ms".into(),
                met: Some(x.p99_added_us <= 200.0),
            });
        }
        if let Some(r) = find(results, "get", "sidecar", "open", c) {
            checks.push(TargetCheck {
                name: format!("Get at {rate} req/s on PostgreSQL: sidecar CPU"),
                figure: r.cpu_mcpu.map_or("n/a".into(), |v| format!("{v:.0} mCPU")),
                limit: "<= 40 mCPU".into(),
                met: r.cpu_mcpu.map(|v| v <= 40.0),
            });
            checks.push(TargetCheck {
                name: format!("Get at {rate} req/s on PostgreSQL: sidecar peak RSS"),
                figure: r.peak_rss_mb.map_or("n/a".into(), |v| format!("{v:.1} MB")),
                limit: "<= 20 MB".into(),
                met: r.peak_rss_mb.map(|v| v <= 20.0),
            });
        }
        if let Some(x) = cmp("sidecar", "raw", "closed", concurrency_max) {
            checks.push(TargetCheck {
                name: format!(
                    "closed-loop Get at concurrency {concurrency_max} on PostgreSQL: throughput vs the raw driver"
                ),
                figure: format!("{:.2}x", x.throughput_ratio),
                limit: ">= 0.8x".into(),
                met: Some(x.throughput_ratio >= 0.8),
            });
        }
    } else if report.database == "sqlite" {
        if let Some(x) = cmp("sidecar", "floor", "closed", concurrency_max) {
            checks.push(TargetCheck {
                name: format!(
                    "closed-loop Get at concurrency {concurrency_max} on SQLite: throughput vs the transport floor"
                ),
                figure: format!("{:.2}x", x.throughput_ratio),
                limit: ">= 0.8x".into(),
                met: Some(x.throughput_ratio >= 0.8),
            });
        }
        if let Some(median) = report.sidecar.startup_median_ms {
            let max = report
                .sidecar
                .startup_ms
                .iter()
                .cloned()
                .fold(0.0, f64::max);
            checks.push(TargetCheck {
                name: "start-up to SERVING on SQLite (median of runs)".into(),
                figure: format!("{median:.1} ms (max {max:.1} ms)"),
                limit: "<= 50 ms".into(),
                met: Some(median <= 50.0),
            });
        }
        if let Some(idle) = report.sidecar.idle_rss_mb {
            checks.push(TargetCheck {
                name: "idle RSS on SQLite".into(),
                figure: match report.sidecar.idle_rss_anon_mb {
                    Some(anon) => format!("{idle:.1} MB ({anon:.1} MB anonymous)"),
                    None => format!("{idle:.1} MB"),
                },
                limit: "<= 10 MB".into(),
                met: Some(idle <= 10.0),
            });
        }
    }
    if let Some(w) = &report.watch {
        let limit = match report.database.as_str() {
            "postgres" => Some(50.0),
            "sqlite" => Some(10.0),
            _ => None,
        };
        if let (Some(run), Some(limit)) = (w.runs.iter().find(|r| r.watchers > 0), limit) {
            checks.push(TargetCheck {
                name: format!(
                    "Watch on {}: Save answer -> event p99 at {} writes/s, {} watchers",
                    report.database, run.rate, run.watchers
                ),
                figure: if run.saturated {
                    format!(
                        "{:.2} ms (the writer kept only {:.0} writes/s)",
                        run.p99_ms, run.writes_per_sec
                    )
                } else {
                    format!("{:.2} ms", run.p99_ms)
                },
                limit: format!("<= {limit} ms"),
                met: Some(run.p99_ms <= limit && run.missing == 0),
            });
        }
        if let Some(c) = &w.change_log {
            checks.push(TargetCheck {
                name: format!(
                    "write throughput with the change log vs without (raw driver, Save c={})",
                    c.concurrency
                ),
                figure: format!("{:.2}x", c.ratio),
                limit: ">= 0.9x".into(),
                met: Some(c.ratio >= 0.9),
            });
        }
    }
    checks
}

/// The query table, when it ran.
fn query_table(q: &crate::query::QueryReport, out: &mut String) {
    let _ = writeln!(
        out,
        "\n[query] `{}` ({} B documents), indexes {}: Query customer = ?, order by created_at desc, {} a page; Count status = ?",
        q.collection, q.document_bytes, q.indexes, q.page_size
    );
    let ms = |r: &RunResult| r.p50_us / 1000.0;
    let _ = writeln!(
        out,
        "{:>9} {:>8} {:>9} {:>13} {:>13} {:>13} {:>13}",
        "docs", "load s", "customers", "raw p50 ms", "raw mean ms", "side p50 ms", "side mean ms"
    );
    for s in &q.stages {
        let get = |t: &str| s.page.iter().find(|r| r.target == t);
        let cell = |r: Option<&RunResult>, f: &dyn Fn(&RunResult) -> f64| {
            r.map_or("-".to_string(), |r| format!("{:.3}", f(r)))
        };
        let _ = writeln!(
            out,
            "{:>9} {:>8.1} {:>9} {:>13} {:>13} {:>13} {:>13}",
            s.docs,
            s.load_secs,
            s.customers,
            cell(get("raw"), &ms),
            cell(get("raw"), &|r| r.mean_us / 1000.0),
            cell(get("sidecar"), &ms),
            cell(get("sidecar"), &|r| r.mean_us / 1000.0),
        );
    }
    for (what, runs) in [
        ("closed", &q.throughput),
        ("open", &q.latency),
        ("count", &q.count),
    ] {
        for r in runs.iter() {
            let _ = writeln!(
                out,
                "  {what:<6} c={:<3} {:<8} {:>9.0} ops/s  p50 {:>9.3} ms  p99 {:>9.3} ms  errors {}{}",
                r.concurrency,
                r.target,
                r.ops_per_sec,
                ms(r),
                r.p99_us / 1000.0,
                r.errors,
                r.cpu_mcpu.map_or(String::new(), |c| format!("  {c:.0} mCPU")),
            );
        }
        let find = |t: &str| runs.iter().find(|r| r.target == t);
        for base in ["raw", "floor"] {
            if let (Some(b), Some(side)) = (find(base), find("sidecar")) {
                if b.ops_per_sec > 0.0 {
                    let _ = writeln!(
                        out,
                        "  {what:<6} sidecar / {base}: {:.2}x",
                        side.ops_per_sec / b.ops_per_sec
                    );
                }
            }
        }
    }
    let _ = writeln!(out, "  Count matched {} documents", q.counted);
    for s in &q.skipped {
        let _ = writeln!(out, "  skipped: {s}");
    }
    let _ = writeln!(out, "  raw query SQL: {}", q.raw_sql.query);
    let _ = writeln!(out, "  raw count SQL: {}", q.raw_sql.count);
    for line in &q.raw_plan {
        let _ = writeln!(out, "  raw plan: {line}");
    }
}

/// The watch, reap and query tables, when they ran.
fn special_tables(report: &Report, out: &mut String) {
    if let Some(q) = &report.query {
        query_table(q, out);
    }
    if let Some(w) = &report.watch {
        let _ = writeln!(
            out,
            "\n[watch] Save answer -> SAVED event at each watcher, ms; CPU of the watching process"
        );
        let _ = writeln!(
            out,
            "{:>8} {:<8} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7} {:>7}",
            "watchers",
            "sidecar",
            "writes/s",
            "save p50",
            "save p99",
            "events",
            "missing",
            "p50",
            "p90",
            "p99",
            "max",
            "mCPU",
            "w-mCPU"
        );
        for r in &w.runs {
            let _ = writeln!(
                out,
                "{:>8} {:<8} {:>9.0} {:>9.2} {:>9.2} {:>9} {:>8} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>7} {:>7}",
                r.watchers,
                r.watcher_sidecar,
                r.writes_per_sec,
                r.write_p50_ms,
                r.write_p99_ms,
                r.events,
                r.missing,
                r.p50_ms,
                r.p90_ms,
                r.p99_ms,
                r.max_ms,
                r.watcher_process_mcpu
                    .map_or("-".into(), |v| format!("{v:.0}")),
                r.writer_process_mcpu
                    .map_or("-".into(), |v| format!("{v:.0}")),
            );
        }
        if let Some(v) = w.mcpu_per_watcher {
            let _ = writeln!(out, "  CPU added per watcher: {v:.1} mCPU");
        }
        if let Some(c) = &w.change_log {
            let _ = writeln!(
                out,
                "  raw Save c={}: {:.0}/s with the change record, {:.0}/s without ({:.2}x)",
                c.concurrency, c.with_per_sec, c.without_per_sec, c.ratio
            );
        }
    }
    if let Some(r) = &report.reap {
        let _ = writeln!(
            out,
            "\n[reap] {} expired documents (REAP_INTERVAL {}, REAP_BATCH {}): reaped in {:.2} s, {:.0}/s{} (first deletion {:.2} s after expiry; loading took {:.1} s)",
            r.docs,
            r.reap_interval,
            r.reap_batch,
            r.reap_secs,
            r.docs_per_sec,
            if r.complete { "" } else { " (INCOMPLETE at the cap)" },
            r.first_deletion_secs,
            r.load_secs
        );
        for (name, g) in [("idle", &r.gets_idle), ("reaping", &r.gets_reaping)] {
            let _ = writeln!(
                out,
                "  Gets at {}/s, {name:<8}: {} gets, {} errors, p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms, max {:.3} ms, sidecar {} mCPU",
                r.get_rate,
                g.gets,
                g.errors,
                g.p50_ms,
                g.p90_ms,
                g.p99_ms,
                g.max_ms,
                g.sidecar_mcpu.map_or("-".into(), |v| format!("{v:.0}"))
            );
        }
    }
}

/// The human-readable report.
pub fn table(report: &Report) -> String {
    let mut out = String::new();
    let s = &report.settings;
    let _ = writeln!(
        out,
        "\ndocsidecar benchmark — {} — {} docs of {} B, pool {}, {} CPU(s) ({}), kernel {}",
        report.database,
        s.docs,
        s.payload_bytes,
        s.pool_size,
        report.machine.cpus,
        report.machine.cpu_model,
        report.machine.kernel
    );
    let _ = writeln!(
        out,
        "latencies in ms; open loop: {} req/s over {} connections, measured from the intended send time (CO-corrected);\nmCPU and RSS: the process serving the target (sidecar or floor); client: the harness process (for raw: driver included)",
        s.rate, s.connections
    );
    let mut workloads: Vec<&str> = Vec::new();
    for r in &report.results {
        if !workloads.contains(&r.workload.as_str()) {
            workloads.push(&r.workload);
        }
    }
    for w in workloads {
        let _ = writeln!(out, "\n[{w}]");
        let _ = writeln!(
            out,
            "{:<7} {:>4} {:<12} {:>10} {:>8} {:>8} {:>8} {:>8} {:>7} {:>7} {:>7} {:>6}  notes",
            "mode",
            "c",
            "target",
            "ops/s",
            "p50",
            "p90",
            "p99",
            "p99.9",
            "mCPU",
            "RSS MB",
            "client",
            "errors"
        );
        for r in report.results.iter().filter(|r| r.workload == w) {
            let mut notes = String::new();
            if r.saturated {
                notes.push_str("saturated ");
            }
            if let Some(e) = &r.first_error {
                let _ = write!(notes, "first error: {e}");
            }
            let _ = writeln!(
                out,
                "{:<7} {:>4} {:<12} {:>10.0} {:>8} {:>8} {:>8} {:>8} {:>7} {:>7} {:>7} {:>6}  {}",
                r.mode,
                r.concurrency,
                r.target,
                r.ops_per_sec,
                ms(r.p50_us),
                ms(r.p90_us),
                ms(r.p99_us),
                ms(r.p999_us),
                r.cpu_mcpu.map_or("-".into(), |v| format!("{v:.0}")),
                r.peak_rss_mb.map_or("-".into(), |v| format!("{v:.1}")),
                r.client_mcpu.map_or("-".into(), |v| format!("{v:.0}")),
                r.errors,
                notes.trim_end()
            );
        }
        let rows: Vec<&Comparison> = report
            .comparisons
            .iter()
            .filter(|c| c.workload == w)
            .collect();
        if !rows.is_empty() {
            let _ = writeln!(
                out,
                "  ratios (target vs baseline): throughput ×, p50/p99 added in ms"
            );
            for c in rows {
                let _ = writeln!(
                    out,
                    "  {:<7} {:>4} {:>11} / {:<9} {:>6.2}x  p50 {:>+8.3}  p99 {:>+8.3}",
                    c.mode,
                    c.concurrency,
                    c.target,
                    c.baseline,
                    c.throughput_ratio,
                    c.p50_added_us / 1000.0,
                    c.p99_added_us / 1000.0
                );
            }
        }
    }
    special_tables(report, &mut out);
    let sc = &report.sidecar;
    let _ = writeln!(out, "\n[sidecar process]");
    if let Some(m) = sc.startup_median_ms {
        let _ = writeln!(
            out,
            "  start-up to SERVING (SQLite): median {m:.1} ms over {} runs {:?}",
            sc.startup_ms.len(),
            sc.startup_ms
                .iter()
                .map(|v| (v * 10.0).round() / 10.0)
                .collect::<Vec<_>>()
        );
    }
    if let Some(v) = sc.idle_rss_mb {
        let anon = sc.idle_rss_anon_mb.map_or(String::new(), |a| {
            format!(" ({a:.1} MB anonymous, the rest mapped code)")
        });
        let _ = writeln!(out, "  idle RSS after start-up: {v:.1} MB{anon}");
    }
    if let Some(v) = sc.lifetime_peak_rss_mb {
        let _ = writeln!(
            out,
            "  peak RSS over the whole run (preload included): {v:.1} MB"
        );
    }
    if !sc.problems.is_empty() {
        let _ = writeln!(
            out,
            "  the sidecar logged {} warning(s)/error(s), first: {}",
            sc.problems.len(),
            sc.problems[0]
        );
    }
    if !report.targets.is_empty() {
        let _ = writeln!(out, "\n[targets]");
        for t in &report.targets {
            let verdict = match t.met {
                Some(true) => "met",
                Some(false) => "MISSED",
                None => "n/a",
            };
            let _ = writeln!(
                out,
                "  {:<7} {} — {} (limit {})",
                verdict, t.name, t.figure, t.limit
            );
        }
    }
    out
}

pub fn write_json(report: &Report, path: &Path) -> Result<(), String> {
    let text = serde_json::to_string_pretty(report).map_err(|e| e.to_string())?;
    std::fs::write(path, text + "\n").map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// The font plotters draws with; read at run time (no font crate that links C).
pub const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

fn register_font() -> Result<(), String> {
    static REGISTERED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let bytes = std::fs::read(FONT).map_err(|e| format!("{FONT}: {e}"))?;
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", plotters::style::FontStyle::Normal, bytes)
                .map_err(|_| format!("{FONT} is not a usable font"))
        })
        .clone()
}

/// Writes the chart; Err when it cannot be drawn (no font, say): the caller warns.
pub fn write_png(report: &Report, path: &Path) -> Result<(), String> {
    register_font()?;
    chart::draw(report, path).map_err(|e| format!("cannot draw {}: {e}", path.display()))
}

mod chart {
    use super::{find, Report};
    use plotters::coord::ranged1d::SegmentValue;
    use plotters::prelude::*;
    use std::path::Path;

    type Error = Box<dyn std::error::Error>;

    const TARGETS: [(&str, RGBColor); 5] = [
        ("raw", RGBColor(31, 119, 180)),
        ("floor", RGBColor(44, 160, 44)),
        ("floor-uds", RGBColor(140, 200, 90)),
        ("sidecar", RGBColor(214, 39, 40)),
        ("sidecar-uds", RGBColor(255, 127, 14)),
    ];

    fn label(report: &Report, target: &str) -> String {
        let raw = match report.database.as_str() {
            "postgres" => "raw tokio-postgres",
            "mariadb" => "raw mysql_async",
            _ => "raw rusqlite",
        };
        match target {
            "raw" => raw.into(),
            "floor" => "no-op gRPC (TCP)".into(),
            "floor-uds" => "no-op gRPC (UDS)".into(),
            "sidecar" => "sidecar (TCP)".into(),
            "sidecar-uds" => "sidecar (UDS)".into(),
            t => t.into(),
        }
    }

    fn center(i: usize) -> SegmentValue<i32> {
        SegmentValue::CenterOf(i as i32)
    }

    /// One panel: a line per target over categorical x positions.
    #[allow(clippy::too_many_arguments)]
    fn panel(
        area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
        title: &str,
        x_names: &[String],
        y_desc: &str,
        log: bool,
        value: &dyn Fn(&str, usize) -> Option<f64>,
    ) -> Result<(), Error> {
        let mut max = 0f64;
        let mut min = f64::MAX;
        for (t, _) in TARGETS {
            for i in 0..x_names.len() {
                if let Some(v) = value(t, i) {
                    max = max.max(v);
                    min = min.min(v);
                }
            }
        }
        if max <= 0.0 {
            area.titled(title, ("sans-serif", 20))?;
            return Ok(());
        }
        let n = x_names.len() as i32;
        let names = x_names.to_vec();
        let fmt_x = move |v: &SegmentValue<i32>| match v {
            SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => {
                names.get(*i as usize).cloned().unwrap_or_default()
            }
            SegmentValue::Last => String::new(),
        };
        macro_rules! draw {
            ($chart:expr) => {{
                let mut chart = $chart;
                chart
                    .configure_mesh()
                    .x_labels(x_names.len())
                    .y_labels(8)
                    .x_label_formatter(&fmt_x)
                    .y_desc(y_desc)
                    .y_label_formatter(&|v: &f64| {
                        if *v >= 100.0 {
                            format!("{v:.0}")
                        } else if *v >= 1.0 {
                            format!("{v:.1}")
                        } else {
                            format!("{v:.2}")
                        }
                    })
                    .label_style(("sans-serif", 15))
                    .axis_desc_style(("sans-serif", 15))
                    .light_line_style(WHITE.mix(0.0))
                    .draw()?;
                for (t, color) in TARGETS {
                    let points: Vec<(SegmentValue<i32>, f64)> = (0..x_names.len())
                        .filter_map(|i| value(t, i).map(|v| (center(i), v)))
                        .collect();
                    if points.is_empty() {
                        continue;
                    }
                    let style = ShapeStyle::from(&color).stroke_width(3);
                    chart.draw_series(LineSeries::new(points.clone(), style))?;
                    chart.draw_series(
                        points
                            .iter()
                            .map(|p| Circle::new(p.clone(), 5, color.filled())),
                    )?;
                }
            }};
        }
        let mut builder = ChartBuilder::on(area);
        builder
            .caption(title, ("sans-serif", 19))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(70);
        if log {
            draw!(builder.build_cartesian_2d(
                (0..n - 1).into_segmented(),
                ((min / 2.0).max(1e-3)..max * 3.0).log_scale()
            )?);
        } else {
            draw!(builder.build_cartesian_2d((0..n - 1).into_segmented(), 0f64..max * 1.35)?);
        }
        Ok(())
    }

    pub fn draw(report: &Report, path: &Path) -> Result<(), Error> {
        let root = BitMapBackend::new(path, (1600, 1100)).into_drawing_area();
        root.fill(&WHITE)?;
        let s = &report.settings;
        let title = format!(
            "docsidecar on {} — {} docs of {} B, pool {}, {} CPUs ({})",
            match report.database.as_str() {
                "postgres" => "PostgreSQL",
                "mariadb" => "MariaDB",
                _ => "SQLite",
            },
            s.docs,
            s.payload_bytes,
            s.pool_size,
            report.machine.cpus,
            report.machine.cpu_model
        );
        let root = root.titled(&title, ("sans-serif", 24))?;
        let (legend, body) = root.split_vertically(40);
        // One legend for the four panels: a colour is a target everywhere.
        let shown: Vec<(&str, RGBColor)> = TARGETS
            .iter()
            .copied()
            .filter(|(t, _)| report.results.iter().any(|r| r.target == *t))
            .collect();
        let mut x = 40;
        for (t, color) in shown {
            let text = label(report, t);
            legend.draw(&PathElement::new(
                vec![(x, 20), (x + 36, 20)],
                color.stroke_width(4),
            ))?;
            legend.draw(&Circle::new((x + 18, 20), 5, color.filled()))?;
            legend.draw(&Text::new(
                text.clone(),
                (x + 44, 11),
                ("sans-serif", 17).into_font(),
            ))?;
            x += 64 + 10 * text.len() as i32;
        }
        let panels = body.split_evenly((2, 2));
        let results = &report.results;
        let conc = &s.concurrency;
        let cmax = conc.iter().copied().max().unwrap_or(1);
        let open_c = s.connections;

        let names: Vec<String> = conc.iter().map(|c| format!("{c}")).collect();
        panel(
            &panels[0],
            "Get, closed loop: throughput by concurrency (higher is better)",
            &names,
            "ops/s",
            false,
            &|t, i| find(results, "get", t, "closed", conc[i]).map(|r| r.ops_per_sec),
        )?;

        let quantiles = ["p50", "p90", "p99", "p99.9"];
        let names: Vec<String> = quantiles.iter().map(|q| q.to_string()).collect();
        panel(
            &panels[1],
            &format!(
                "Get at {} req/s over {open_c} connections: latency (lower is better)",
                s.rate
            ),
            &names,
            "ms (log)",
            true,
            &|t, i| {
                find(results, "get", t, "open", open_c)
                    .map(|r| [r.p50_us, r.p90_us, r.p99_us, r.p999_us][i] / 1000.0)
            },
        )?;

        let mut workloads: Vec<String> = Vec::new();
        for r in results {
            if !workloads.contains(&r.workload) {
                workloads.push(r.workload.clone());
            }
        }
        panel(
            &panels[2],
            &format!("Closed loop at concurrency {cmax}: throughput per workload"),
            &workloads,
            "ops/s (log)",
            true,
            &|t, i| find(results, &workloads[i], t, "closed", cmax).map(|r| r.ops_per_sec),
        )?;
        panel(
            &panels[3],
            &format!("Open loop at {} req/s: p99 latency per workload", s.rate),
            &workloads,
            "ms (log)",
            true,
            &|t, i| find(results, &workloads[i], t, "open", open_c).map(|r| r.p99_us / 1000.0),
        )?;
        root.present()?;
        Ok(())
    }
}
