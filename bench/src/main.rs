//! docsidecar-bench: drives a docsidecar process over real gRPC (TCP and Unix
//! socket) and measures it against two baselines in the same run: the raw driver
//! (tokio-postgres or rusqlite, in-process, the same SQL) and the transport floor
//! (a no-op tonic server answering the same messages). See BENCHMARKS.md.
//!
//! # Layout
//!
//! - [`workload`]: the document, the operations and the workloads.
//! - [`drivers`]: the clients of every target (gRPC, raw PostgreSQL, raw SQLite).
//! - [`floor`]: the no-op gRPC server (`floor-server`, started by the harness).
//! - [`process`]: starting, measuring (/proc) and stopping the processes.
//! - [`load`]: closed and open loop, HDR histograms.
//! - [`watch`]: the `watch` workload (change-feed latency, watchers' CPU).
//! - [`reap`]: the `reap` workload (the expiry reaper's rate, Gets meanwhile).
//! - [`query`]: the `query` workload (Query and Count on up to a million
//!   documents loaded in bulk, against the raw driver with the same SQL).
//! - [`report`]: the table, the JSON file and the PNG chart.

mod drivers;
mod floor;
mod load;
mod process;
mod query;
mod reap;
mod report;
mod watch;
mod workload;

use clap::{Parser, Subcommand};
use drivers::{Client, PageRef, Shared};
use load::Plan;
use process::{Process, SidecarSpec};
use report::{Report, RunResult, SidecarInfo};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use workload::{doc_id, Payload, Workload, COLLECTION, PAGE_SIZE};

#[derive(Parser)]
#[command(
    name = "docsidecar-bench",
    version,
    about = "Benchmarks docsidecar over gRPC against the raw driver and a no-op gRPC server",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// The transport floor: a no-op DocumentService (started by the harness).
    #[command(hide = true)]
    FloorServer(floor::FloorArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Database to benchmark; repeat for several. `sqlite` (a temporary file, the
    /// default), `sqlite:///path.db`, `postgres://user@host:port/db`, or
    /// `mysql://user@host:port/db` (MariaDB/MySQL; `mariadb://` too: the run uses
    /// a fresh database `bench_<pid>` on that server, dropped at the end).
    #[arg(long = "database-url", value_name = "URL")]
    database_urls: Vec<String>,
    /// The sidecar binary [default: `docsidecar` beside this binary, i.e.
    /// target/release/docsidecar after `cargo build --release`].
    #[arg(long, value_name = "PATH")]
    sidecar: Option<PathBuf>,
    /// Benchmark a running sidecar at ADDR (`host:port` or `unix:/path`) instead of
    /// starting one; it must serve the same database (and `--schema`).
    #[arg(long, value_name = "ADDR")]
    target: Option<String>,
    /// With `--target`: its process id, for CPU and RSS.
    #[arg(long, value_name = "PID", requires = "target")]
    target_pid: Option<u32>,
    /// PostgreSQL schema (MariaDB: database) for the run [default: bench_<pid>];
    /// dropped before and after the run, except with `--target`, whose sidecar owns it.
    #[arg(long)]
    schema: Option<String>,
    /// Preloaded documents [default: 10000].
    #[arg(long)]
    docs: Option<u64>,
    /// Document size as JSON, in bytes.
    #[arg(long, default_value_t = 1024)]
    payload: usize,
    /// Connection pool size of the sidecar and the raw driver [default: 2 × cores + 1,
    /// the sidecar's default].
    #[arg(long)]
    pool_size: Option<usize>,
    /// Workloads to run [default: all].
    #[arg(long, value_enum, value_delimiter = ',')]
    workloads: Vec<Workload>,
    /// Closed-loop concurrencies [default: 1,16,64].
    #[arg(long, value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// Open-loop rate, requests per second [default: 1000].
    #[arg(long)]
    rate: Option<f64>,
    /// gRPC connections per target (closed loop: at most this many; open loop: this many).
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Seconds of warm-up before each measurement [default: 0.5].
    #[arg(long)]
    warmup: Option<f64>,
    /// Seconds measured per closed-loop run [default: 2].
    #[arg(long)]
    duration: Option<f64>,
    /// Seconds measured per open-loop Get run [default: 10].
    #[arg(long)]
    open_duration: Option<f64>,
    /// Seconds measured per open-loop run of the other workloads [default: 3].
    #[arg(long)]
    open_duration_other: Option<f64>,
    /// Targets to measure [default: all]: raw, floor, sidecar, floor-uds, sidecar-uds.
    #[arg(long, value_delimiter = ',')]
    targets: Vec<String>,
    /// Extra environment of the started sidecar, KEY=VALUE (repeatable), for
    /// experiments such as TOKIO_WORKER_THREADS=1.
    #[arg(long, value_name = "KEY=VALUE")]
    sidecar_env: Vec<String>,
    /// `watch` workload: watch streams [default: 10].
    #[arg(long, default_value_t = 10)]
    watchers: usize,
    /// `reap` workload: expired documents to reap [default: 100000].
    #[arg(long)]
    reap_docs: Option<u64>,
    /// `query` workload: the collection's sizes, measured in turn as it grows
    /// [default: 10000,100000,1000000].
    #[arg(long, value_delimiter = ',')]
    query_docs: Vec<u64>,
    /// Unix-socket targets for every workload, not only Get.
    #[arg(long)]
    uds_all: bool,
    /// Start-up measurements (fresh SQLite file each) [default: 5].
    #[arg(long)]
    startup_runs: Option<usize>,
    /// Where the JSON and PNG reports go.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// No PNG chart.
    #[arg(long)]
    no_png: bool,
    /// A run of seconds, for smoke tests: few documents, short runs, concurrency 1
    /// and 16, 200 req/s. The figures mean nothing.
    #[arg(long)]
    quick: bool,
}

/// The settings after `--quick` and the defaults.
struct Resolved {
    docs: u64,
    pool_size: usize,
    workloads: Vec<Workload>,
    concurrency: Vec<usize>,
    rate: f64,
    warmup: Duration,
    duration: Duration,
    open_get: Duration,
    open_other: Duration,
    startup_runs: usize,
    reap_docs: u64,
    query_docs: Vec<u64>,
}

impl RunArgs {
    fn resolve(&self) -> Result<Resolved, String> {
        let q = self.quick;
        let secs = |v: Option<f64>, normal: f64, quick: f64| -> Result<Duration, String> {
            Duration::try_from_secs_f64(v.unwrap_or(if q { quick } else { normal }))
                .map_err(|e| format!("invalid duration: {e}"))
        };
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let r = Resolved {
            docs: self.docs.unwrap_or(if q { 400 } else { 10_000 }),
            pool_size: self.pool_size.unwrap_or(2 * cpus + 1).max(1),
            workloads: if self.workloads.is_empty() {
                Workload::ALL.to_vec()
            } else {
                self.workloads.clone()
            },
            concurrency: if self.concurrency.is_empty() {
                if q {
                    vec![1, 16]
                } else {
                    vec![1, 16, 64]
                }
            } else {
                self.concurrency.clone()
            },
            rate: self.rate.unwrap_or(if q { 200.0 } else { 1000.0 }),
            warmup: secs(self.warmup, 0.5, 0.05)?,
            duration: secs(self.duration, 2.0, 0.2)?,
            open_get: secs(self.open_duration, 10.0, 0.3)?,
            open_other: secs(self.open_duration_other, 3.0, 0.3)?,
            startup_runs: self.startup_runs.unwrap_or(if q { 2 } else { 5 }),
            reap_docs: self.reap_docs.unwrap_or(if q { 2000 } else { 100_000 }),
            query_docs: if !self.query_docs.is_empty() {
                self.query_docs.clone()
            } else if q {
                vec![1000, 3000]
            } else {
                vec![10_000, 100_000, 1_000_000]
            },
        };
        if r.query_docs.windows(2).any(|w| w[0] >= w[1])
            || r.query_docs
                .first()
                .is_some_and(|&n| n < query::PAGE as u64)
        {
            return Err(format!(
                "--query-docs must grow, from at least {}",
                query::PAGE
            ));
        }
        if r.docs < (2 * PAGE_SIZE) as u64 {
            return Err(format!("--docs must be at least {}", 2 * PAGE_SIZE));
        }
        const TARGETS: [&str; 5] = ["raw", "floor", "sidecar", "floor-uds", "sidecar-uds"];
        if let Some(t) = self.targets.iter().find(|t| !TARGETS.contains(&t.as_str())) {
            return Err(format!("unknown target `{t}`: expected one of {TARGETS:?}"));
        }
        if let Some(kv) = self.sidecar_env.iter().find(|kv| !kv.contains('=')) {
            return Err(format!("--sidecar-env `{kv}`: expected KEY=VALUE"));
        }
        if r.concurrency.contains(&0) || self.connections == 0 || r.rate <= 0.0 {
            return Err("concurrency, connections and rate must be positive".into());
        }
        Ok(r)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Some(Cmd::FloorServer(args)) => runtime.block_on(floor::serve(args)),
        None => runtime.block_on(async {
            tokio::select! {
                result = run(cli.run) => result,
                signal = interrupted() => {
                    process::kill_children();
                    Err(format!("interrupted by {signal}; the processes it started are stopped"))
                }
            }
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return "SIGINT";
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = tokio::signal::ctrl_c() => "SIGINT",
    }
}

async fn run(args: RunArgs) -> Result<(), String> {
    let resolved = args.resolve()?;
    let urls = if args.database_urls.is_empty() {
        vec!["sqlite".to_string()]
    } else {
        args.database_urls.clone()
    };
    for url in &urls {
        // Refused before anything is started or written.
        Db::parse(url, Path::new("/"))?;
    }
    std::fs::create_dir_all(&args.out)
        .map_err(|e| format!("cannot create {}: {e}", args.out.display()))?;
    let mut missed = false;
    for url in &urls {
        let report = run_database(&args, &resolved, url).await?;
        println!("{}", report::table(&report));
        missed |= report.targets.iter().any(|t| t.met == Some(false));
        let json = args.out.join(format!("{}.json", report.database));
        report::write_json(&report, &json)?;
        println!("report: {}", json.display());
        if !args.no_png {
            let png = args.out.join(format!("{}.png", report.database));
            match report::write_png(&report, &png) {
                Ok(()) => println!("chart:  {}", png.display()),
                Err(e) => eprintln!(
                    "warning: no PNG chart: {e} (the font {} is needed)",
                    report::FONT
                ),
            }
        }
    }
    if missed {
        println!("\nsome targets were missed: see [targets] above");
    }
    Ok(())
}

/// The database of one run, as the sidecar and the raw driver reach it.
enum Db {
    Sqlite(PathBuf),
    Postgres(String),
    /// The server's URL as given (`mysql://` or `mariadb://`); the run's
    /// database replaces its path.
    Mysql(String),
}

impl Db {
    fn parse(url: &str, tmp: &Path) -> Result<Db, String> {
        if url == "sqlite" {
            return Ok(Db::Sqlite(tmp.join("bench.db")));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Db::Postgres(url.to_string()));
        }
        if url.starts_with("mysql://") || url.starts_with("mariadb://") {
            return Ok(Db::Mysql(url.to_string()));
        }
        match url.strip_prefix("sqlite://") {
            Some(path) if !path.is_empty() && !path.contains(":memory:") => {
                let path = PathBuf::from(path);
                let path = if path.is_absolute() {
                    path
                } else {
                    std::env::current_dir().map_err(|e| e.to_string())?.join(path)
                };
                Ok(Db::Sqlite(path))
            }
            _ => Err(format!(
                "unsupported --database-url `{url}`: use sqlite, sqlite:///path.db, postgres://user@host:port/db or mysql://user@host:port/db"
            )),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Db::Sqlite(_) => "sqlite",
            Db::Postgres(_) => "postgres",
            Db::Mysql(_) => "mariadb",
        }
    }

    /// The URL the sidecar is given (for MariaDB: the run's database, `schema`).
    fn sidecar_url(&self, schema: &str) -> String {
        match self {
            Db::Sqlite(path) => format!("sqlite://{}", path.display()),
            Db::Postgres(url) => url.clone(),
            Db::Mysql(url) => mysql_url(url, Some(schema)),
        }
    }
}

/// A MySQL URL on `database` (none: the server only), as mysql_async reads it.
fn mysql_url(url: &str, database: Option<&str>) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let (authority, query) = match rest.split_once('/') {
        Some((authority, path)) => (authority, path.split_once('?').map(|(_, q)| q)),
        None => (rest.split_once('?').map_or(rest, |(a, _)| a), None),
    };
    let query = query.map_or(String::new(), |q| format!("?{q}"));
    format!("mysql://{authority}/{}{query}", database.unwrap_or(""))
}

/// A MariaDB admin connection (no database) for the run database's set-up and clean-up.
async fn mysql_admin(url: &str) -> Result<mysql_async::Conn, String> {
    let opts = mysql_async::Opts::from_url(&mysql_url(url, None)).map_err(|e| e.to_string())?;
    mysql_async::Conn::new(mysql_async::OptsBuilder::from_opts(opts).prefer_socket(false))
        .await
        .map_err(|e| format!("cannot connect to MariaDB: {e}"))
}

/// Drops the run's database (a `bench` one only, unless `--schema` named it).
async fn mysql_drop(conn: &mut mysql_async::Conn, database: &str) -> Result<(), String> {
    use mysql_async::prelude::Queryable;
    conn.query_drop(format!("DROP DATABASE IF EXISTS `{database}`"))
        .await
        .map_err(|e| format!("cannot drop database {database}: {e}"))
}

/// The sidecar binary: the flag, else `docsidecar` beside this binary.
fn sidecar_binary(args: &RunArgs) -> Result<PathBuf, String> {
    if let Some(path) = &args.sidecar {
        return if path.is_file() {
            Ok(path.clone())
        } else {
            Err(format!("--sidecar {}: no such file", path.display()))
        };
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let beside = exe.with_file_name("docsidecar");
    if beside.is_file() {
        Ok(beside)
    } else {
        Err(format!(
            "no sidecar binary at {}: run `cargo build --release --locked` first, or pass --sidecar PATH",
            beside.display()
        ))
    }
}

/// A PostgreSQL admin connection for the schema's set-up and clean-up.
async fn pg_admin(url: &str) -> Result<tokio_postgres::Client, String> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("cannot connect to PostgreSQL: {e}"))?;
    tokio::spawn(connection);
    Ok(client)
}

/// One target under measurement.
struct Target {
    name: &'static str,
    clients: Vec<Client>,
    pid: Option<u32>,
}

async fn run_database(args: &RunArgs, r: &Resolved, url: &str) -> Result<Report, String> {
    let tmp = tempfile::Builder::new()
        .prefix("docsidecar-bench-")
        .tempdir()
        .map_err(|e| format!("cannot create a temporary directory: {e}"))?;
    let db = Db::parse(url, tmp.path())?;
    let schema = args
        .schema
        .clone()
        .unwrap_or_else(|| format!("bench_{}", std::process::id()));
    if !docsidecar::store::is_valid_name(&schema) {
        return Err(format!(
            "--schema `{schema}` must match ^[a-z][a-z0-9_]{{0,62}}$"
        ));
    }
    eprintln!(
        "== {} ({} documents of {} B, pool {})",
        db.name(),
        r.docs,
        args.payload,
        r.pool_size
    );
    let mut admin = match &db {
        Db::Postgres(url) => Admin::Pg(pg_admin(url).await?),
        Db::Mysql(url) => Admin::Mysql(mysql_admin(url).await?),
        Db::Sqlite(_) => Admin::None,
    };
    if args.target.is_none() {
        if admin.exists(&schema).await? && !schema.starts_with("bench") {
            return Err(format!(
                "schema (database) `{schema}` exists and is not a bench_ one: pick another --schema"
            ));
        }
        admin.drop(&schema).await?;
    }
    let result = measure(args, r, &db, &schema, tmp.path(), &mut admin).await;
    if args.target.is_none() {
        if let Err(e) = admin.drop(&schema).await {
            eprintln!("warning: {e}");
        }
    }
    result
}

/// An admin connection to the database server, for the run's schema (PostgreSQL)
/// or database (MariaDB): set-up, clean-up and row counts.
pub enum Admin {
    None,
    Pg(tokio_postgres::Client),
    Mysql(mysql_async::Conn),
}

impl Admin {
    async fn exists(&mut self, schema: &str) -> Result<bool, String> {
        use mysql_async::prelude::Queryable;
        match self {
            Admin::None => Ok(false),
            Admin::Pg(c) => c
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
                    &[&schema],
                )
                .await
                .map(|row| row.get::<_, bool>(0))
                .map_err(|e| e.to_string()),
            Admin::Mysql(c) => c
                .exec_first::<u8, _, _>(
                    "SELECT 1 FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = ?",
                    (schema,),
                )
                .await
                .map(|found| found.is_some())
                .map_err(|e| e.to_string()),
        }
    }

    async fn drop(&mut self, schema: &str) -> Result<(), String> {
        match self {
            Admin::None => Ok(()),
            Admin::Pg(c) => c
                .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
                .await
                .map_err(|e| format!("could not drop schema {schema}: {e}")),
            Admin::Mysql(c) => mysql_drop(c, schema).await,
        }
    }
}

async fn measure(
    args: &RunArgs,
    r: &Resolved,
    db: &Db,
    schema: &str,
    tmp: &Path,
    admin: &mut Admin,
) -> Result<Report, String> {
    let binary = match &args.target {
        Some(_) => sidecar_binary(args).ok(),
        None => Some(sidecar_binary(args)?),
    };
    if let Some(b) = &binary {
        if b.components().any(|c| c.as_os_str() == "debug") && !args.quick {
            eprintln!(
                "warning: {} looks like a debug build; benchmark the release build",
                b.display()
            );
        }
    }

    // Start-up to SERVING, on fresh SQLite files, before anything else loads the machine.
    let mut startup_ms = Vec::new();
    if let (Some(binary), true) = (&binary, r.startup_runs > 0) {
        let (binary, dir, runs) = (binary.clone(), tmp.to_path_buf(), r.startup_runs);
        startup_ms =
            tokio::task::spawn_blocking(move || process::measure_startup(&binary, &dir, runs))
                .await
                .map_err(|e| e.to_string())??;
        eprintln!("start-up to SERVING (SQLite): {startup_ms:.1?} ms");
    }

    // The processes under test.
    let user_env: Vec<(String, String)> = args
        .sidecar_env
        .iter()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let reaping = r.workloads.contains(&Workload::Reap);
    let sidecar_spec = |env: Vec<(String, String)>| {
        binary.as_ref().map(|binary| SidecarSpec {
            binary,
            database_url: db.sidecar_url(schema),
            schema,
            pool_size: r.pool_size,
            env,
        })
    };
    let mut env = user_env.clone();
    if reaping {
        // One reaper measured: the other sidecars' reapers are parked.
        env.push(("DOCSIDECAR_REAP_INTERVAL".into(), "86400".into()));
    }
    let spec = sidecar_spec(env);
    let mut sidecar_tcp: Option<Process> = None;
    let mut sidecar_uds: Option<Process> = None;
    let (tcp_address, uds_address) = match (&args.target, &spec) {
        (Some(target), _) => (target.clone(), None),
        (None, Some(spec)) => {
            let (p, tcp) = spec.start("127.0.0.1:0")?;
            sidecar_tcp = Some(p);
            let sock = tmp.join("sidecar.sock");
            let (u, uds) = spec.start(&format!("unix:{}", sock.display()))?;
            sidecar_uds = Some(u);
            (tcp, Some(uds))
        }
        (None, None) => return Err("no sidecar binary".into()),
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let tcp_pid = sidecar_tcp.as_ref().map(|p| p.pid).or(args.target_pid);
    let uds_pid = sidecar_uds.as_ref().map(|p| p.pid);
    let idle_rss = |pid: Option<u32>| {
        pid.and_then(|pid| process::status_kb(pid, "VmRSS"))
            .map(|kb| kb as f64 / 1024.0)
    };
    let (idle_rss_mb, idle_rss_uds_mb) = (idle_rss(tcp_pid), idle_rss(uds_pid));
    let idle_rss_anon_mb = tcp_pid
        .and_then(|pid| process::status_kb(pid, "RssAnon"))
        .map(|kb| kb as f64 / 1024.0);
    let floor_sock = tmp.join("floor.sock");
    let (floor, floor_address) = process::start_floor(args.payload, Some(&floor_sock))?;

    let payload = Payload::new(args.payload);
    let sidecar_clients = drivers::grpc_clients(&tcp_address, args.connections).await?;

    // Preload through the sidecar's Write, 500 documents a call.
    let started = std::time::Instant::now();
    let mut shared = Shared {
        payload,
        pages: Vec::new(),
    };
    let Client::Grpc(mut grpc) = sidecar_clients[0].clone() else {
        unreachable!("gRPC clients")
    };
    let ids: Vec<u64> = (0..r.docs).collect();
    for chunk in ids.chunks(500) {
        grpc.write(drivers::write_request(chunk, &shared))
            .await
            .map_err(|e| format!("preload failed: {:?}: {}", e.code(), e.message()))?;
    }
    // The pages of the List workload: the sidecar's tokens and the raw keysets.
    let mut token = String::new();
    let mut after: Option<String> = None;
    loop {
        let page = grpc
            .list(docsidecar::proto::ListRequest {
                collection: COLLECTION.into(),
                page_size: PAGE_SIZE as i32,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .map_err(|e| format!("listing the preload failed: {}", e.message()))?
            .into_inner();
        if page.documents.len() < PAGE_SIZE {
            break;
        }
        shared.pages.push(PageRef {
            token: token.clone(),
            after: after.clone(),
        });
        after = page.documents.last().map(|d| d.id.clone());
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    if shared.pages.len() as u64 != r.docs / PAGE_SIZE as u64 {
        return Err(format!(
            "the collection holds {} full pages after the preload, expected {}: is `{COLLECTION}` shared with something else?",
            shared.pages.len(),
            r.docs / PAGE_SIZE as u64
        ));
    }
    eprintln!(
        "preloaded {} documents in {:.1} s ({} pages)",
        r.docs,
        started.elapsed().as_secs_f64(),
        shared.pages.len()
    );
    let shared = Arc::new(shared);

    let raw = match db {
        Db::Postgres(url) => Client::Pg(Arc::new(RawPg::new(url, schema, r.pool_size)?)),
        Db::Sqlite(path) => Client::Sqlite(Arc::new(RawSqlite::open(path, r.pool_size)?)),
        Db::Mysql(url) => Client::Mysql(Arc::new(RawMysql::new(
            &mysql_url(url, Some(schema)),
            r.pool_size,
        )?)),
    };
    let mut targets = vec![
        Target {
            name: "raw",
            clients: vec![raw],
            pid: None,
        },
        Target {
            name: "floor",
            clients: drivers::grpc_clients(&floor_address, args.connections).await?,
            pid: Some(floor.pid),
        },
        Target {
            name: "sidecar",
            clients: sidecar_clients,
            pid: tcp_pid,
        },
    ];
    if let Some(uds) = &uds_address {
        targets.push(Target {
            name: "floor-uds",
            clients: drivers::grpc_clients(
                &format!("unix:{}", floor_sock.display()),
                args.connections,
            )
            .await?,
            pid: Some(floor.pid),
        });
        targets.push(Target {
            name: "sidecar-uds",
            clients: drivers::grpc_clients(uds, args.connections).await?,
            pid: uds_pid,
        });
    }
    // Every target answers before anything is measured.
    for t in &mut targets {
        let op = workload::Op::Get(r.docs - 1);
        t.clients[0].run(&op, &shared).await.map_err(|e| {
            format!(
                "{} does not answer Get({}): {e}",
                t.name,
                doc_id(r.docs - 1)
            )
        })?;
    }

    let mut results = Vec::new();
    let mut seed = 1u64;
    for &w in r.workloads.iter().filter(|w| !w.is_special()) {
        let here: Vec<&Target> = targets
            .iter()
            .filter(|t| w == Workload::Get || args.uds_all || !t.name.ends_with("-uds"))
            .filter(|t| args.targets.is_empty() || args.targets.iter().any(|n| n == t.name))
            .collect();
        let modes = r
            .concurrency
            .iter()
            .map(|&c| (Some(c), r.duration))
            .chain(std::iter::once((
                None,
                if w == Workload::Get {
                    r.open_get
                } else {
                    r.open_other
                },
            )));
        for (concurrency, duration) in modes {
            for t in &here {
                seed += 1;
                let plan = Plan {
                    workload: w,
                    docs: r.docs,
                    warmup: r.warmup,
                    duration,
                    pid: t.pid,
                    seed,
                };
                let result = match concurrency {
                    Some(c) => {
                        let clients = &t.clients[..t.clients.len().min(c)];
                        let m = load::closed(clients, c, shared.clone(), &plan).await;
                        RunResult::new(w.name(), t.name, "closed", c, None, &m)
                    }
                    None => {
                        let m =
                            load::open(&t.clients, args.connections, r.rate, shared.clone(), &plan)
                                .await;
                        RunResult::new(w.name(), t.name, "open", args.connections, Some(r.rate), &m)
                    }
                };
                eprintln!(
                    "{:<5} {:<6} c={:<3} {:<11} {:>9.0} ops/s  p50 {:>7.3} ms  p99 {:>7.3} ms{}{}",
                    w.name(),
                    result.mode,
                    result.concurrency,
                    t.name,
                    result.ops_per_sec,
                    result.p50_us / 1000.0,
                    result.p99_us / 1000.0,
                    result
                        .cpu_mcpu
                        .map_or(String::new(), |c| format!("  {c:.0} mCPU")),
                    result
                        .first_error
                        .as_ref()
                        .map_or(String::new(), |e| format!(
                            "  {} errors, first: {e}",
                            result.errors
                        )),
                );
                results.push(result);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    let sidecar = targets
        .iter()
        .find(|t| t.name == "sidecar")
        .ok_or("no sidecar target")?;
    let mut watch_report = None;
    if r.workloads.contains(&Workload::Watch) {
        let setup = watch::WatchSetup {
            spec: spec.as_ref(),
            same_process: matches!(db, Db::Sqlite(_)),
            writers: &sidecar.clients,
            writer_address: &tcp_address,
            writer_pid: tcp_pid,
            watchers: args.watchers,
            rate: r.rate,
            docs: r.docs,
            warmup: r.warmup,
            duration: r.open_other,
            raw_mysql: match db {
                Db::Mysql(url) => Some((mysql_url(url, Some(schema)), r.pool_size)),
                _ => None,
            },
        };
        watch_report = Some(watch::measure(&setup, shared.clone()).await?);
    }
    let mut reap_result = None;
    if let (true, Some(spec)) = (reaping, sidecar_spec(user_env.clone())) {
        let plan = reap::ReapPlan {
            db,
            schema,
            docs: r.reap_docs,
            loader: sidecar.clients[0].clone(),
            clients: Vec::new(),
            pid: None,
            rate: r.rate,
            idle: r.open_other,
            get_docs: r.docs,
            env: &user_env,
        };
        reap_result =
            Some(reap::measure(&spec, plan, args.connections, admin, shared.clone()).await?);
    }

    let mut query_report = None;
    if r.workloads.contains(&Workload::Query) {
        let spec = sidecar_spec(user_env.clone())
            .ok_or("the query workload starts its own sidecar: it needs the sidecar binary")?;
        let raw = targets
            .iter()
            .find(|t| t.name == "raw")
            .ok_or("no raw target")?
            .clients[0]
            .clone();
        let setup = query::QuerySetup {
            db,
            schema,
            tmp,
            spec,
            raw,
            sizes: r.query_docs.clone(),
            connections: args.connections,
            rate: r.rate,
            warmup: r.warmup,
            duration: r.duration,
            open_duration: r.open_other,
        };
        query_report = Some(query::measure(setup, admin, shared.clone()).await?);
    }

    drop(targets);
    let lifetime_peak_rss_mb = tcp_pid
        .and_then(|pid| process::status_kb(pid, "VmHWM"))
        .map(|kb| kb as f64 / 1024.0);
    let mut problems = Vec::new();
    for p in [sidecar_tcp, sidecar_uds].into_iter().flatten() {
        problems.extend(p.problems());
        match p.stop(Duration::from_secs(15)) {
            Some(status) if status.success() => {}
            status => eprintln!("warning: the sidecar exited with {status:?}"),
        }
    }
    drop(floor);

    let mut sorted = startup_ms.clone();
    sorted.sort_by(f64::total_cmp);
    let startup_median_ms = sorted.get(sorted.len() / 2).copied();
    let comparisons = report::compare(&results);
    let cmax = r.concurrency.iter().copied().max().unwrap_or(1);
    let mut report = Report {
        database: db.name().into(),
        generated_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        machine: report::Machine::read(),
        settings: report::Settings {
            docs: r.docs,
            payload_bytes: args.payload,
            pool_size: r.pool_size,
            connections: args.connections,
            concurrency: r.concurrency.clone(),
            rate: r.rate,
            warmup_secs: r.warmup.as_secs_f64(),
            closed_secs: r.duration.as_secs_f64(),
            open_get_secs: r.open_get.as_secs_f64(),
            open_other_secs: r.open_other.as_secs_f64(),
            quick: args.quick,
            command: std::env::args()
                .map(|a| redact_password(&a))
                .collect::<Vec<_>>()
                .join(" "),
        },
        sidecar: SidecarInfo {
            binary: binary.map(|b| b.display().to_string()),
            startup_ms,
            startup_median_ms,
            idle_rss_mb,
            idle_rss_uds_mb,
            idle_rss_anon_mb,
            lifetime_peak_rss_mb,
            problems,
        },
        results,
        comparisons,
        targets: Vec::new(),
        watch: watch_report,
        reap: reap_result,
        query: query_report,
    };
    report.targets = report::check_targets(&report, cmax);
    Ok(report)
}

use drivers::{RawMysql, RawPg, RawSqlite};

/// `scheme://user:password@host/…` with the password replaced, for the report:
/// a database URL given on the command line must not end up in a JSON file.
fn redact_password(arg: &str) -> String {
    let Some((scheme, rest)) = arg.split_once("://") else {
        return arg.to_string();
    };
    // The last `@`: a password may hold one (over-redacting beats leaking).
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return arg.to_string();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => arg.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact_password;

    #[test]
    fn passwords_in_urls_are_redacted() {
        assert_eq!(
            redact_password("--database-url=postgres://app:s3cr3t@db:5432/x"),
            "--database-url=postgres://app:***@db:5432/x"
        );
        assert_eq!(
            redact_password("postgres://app@db/x"),
            "postgres://app@db/x"
        );
        assert_eq!(
            redact_password("postgres://app:p@ss@db/x"),
            "postgres://app:***@db/x"
        );
        assert_eq!(redact_password("sqlite"), "sqlite");
        assert_eq!(redact_password("--quick"), "--quick");
    }
}
