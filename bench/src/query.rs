//! The `query` workload (issue 14): Query and Count on a collection of up to
//! a million documents, through the sidecar and through the raw driver with
//! the SQL the sidecar runs.
//!
//! The documents (`orders`) have a realistic shape: `status` (5 values),
//! `customer` (up to 10 000 ids), `created_at` (an ISO timestamp), `tags` (an
//! array) and a little payload. The sidecar runs with a policy declaring
//! `[["customer", "created_at desc"], ["status"]]`; `docsidecar migrate`
//! runs before anything is loaded. The documents are then written straight
//! into the sidecar's table by the database's bulk path (SQLite: one
//! transaction of prepared inserts; PostgreSQL: COPY; MariaDB: multi-row
//! INSERTs), base columns only (scope, id, rev, data, create_time,
//! update_time), so that whatever the store derives from them (indexes, key
//! columns, triggers, generated columns) is the store's own doing; then
//! ANALYZE.
//!
//! The collection grows in stages (10k, 100k, 1M by default); at each, the
//! time of one page (closed loop, one worker) is measured on customers that
//! have a full page at every stage, so a flat figure shows an index at work.
//! At the last stage: throughput at concurrency 16 and latency at the
//! open-loop rate (raw, sidecar, and a transport floor answering pages of 50
//! canned documents of the same size), and the time of a Count of one status
//! (a fifth of the collection). Before anything is measured at a stage, the
//! sidecar and the raw driver must return the same pages and counts.
//!
//! The customer of document `i` is `i mod n`, where `n` is the stage's size
//! over 50 (at most 10 000): the first 10 000 documents hold 200 customers
//! of 50, the next 90 000 2 000 customers more, the rest 10 000; so
//! customers `0..200` have a full page from the first stage on, and every
//! customer one at 100k documents and more.

use crate::drivers::{Client, Shared};
use crate::load::{self, Plan};
use crate::process::{self, SidecarSpec};
use crate::report::RunResult;
use crate::workload::{Rng, Workload};
use crate::{Admin, Db};
use docsidecar::proto;
use serde::Serialize;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The queried collection.
pub const COLLECTION: &str = "orders";
/// Documents per page.
pub const PAGE: usize = 50;
/// The most customers.
pub const CUSTOMERS: u64 = 10_000;
/// Closed-loop workers of the throughput run.
pub const CONCURRENCY: usize = 16;
/// The values of `status`.
pub const STATUSES: [&str; 5] = ["open", "paid", "shipped", "delivered", "cancelled"];
/// The declared indexes, as the policy spells them.
pub const INDEXES: &str = r#"[["customer", "created_at desc"], ["status"]]"#;
const TAGS: [&str; 8] = [
    "gift",
    "express",
    "bulk",
    "fragile",
    "promo",
    "b2b",
    "subscription",
    "return",
];

/// The `k`th customer's id.
pub fn customer(k: u64) -> String {
    format!("c{k:05}")
}

/// The `k`th status (modulo 5).
pub fn status(k: u64) -> &'static str {
    STATUSES[(k % STATUSES.len() as u64) as usize]
}

/// The sort key of a string field's value, as the SQL stores compare it
/// (`docsidecar_key`).
pub fn string_key(s: &str) -> Vec<u8> {
    docsidecar::store::key::encode(&serde_json::Value::String(s.into()))
}

/// Customers of a collection of `size` documents.
fn customers_at(size: u64) -> u64 {
    (size / PAGE as u64).clamp(1, CUSTOMERS)
}

/// The id of document `i`.
fn order_id(i: u64) -> String {
    format!("o{i:07}")
}

fn mix(i: u64, salt: u64) -> u64 {
    Rng::new(i.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ salt).next_u64()
}

/// `2025-01-01T00:00:00.000Z` plus `ms` milliseconds, as ISO 8601 (UTC).
fn iso(ms: u64) -> String {
    let secs = 1_735_689_600 + ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// Document `i` of a collection loaded in stages of `sizes`: its id and JSON.
fn document(i: u64, sizes: &[u64]) -> (String, String) {
    let stage = sizes.iter().copied().find(|&s| i < s).unwrap_or(u64::MAX);
    let customer = customer(i % customers_at(stage));
    let tags: Vec<&str> = (0..1 + mix(i, 3) % 3)
        .map(|t| TAGS[(mix(i, 4 + t) % TAGS.len() as u64) as usize])
        .collect();
    let data = serde_json::json!({
        "customer": customer,
        "status": status(mix(i, 1)),
        // Within a year, to the millisecond.
        "created_at": iso(mix(i, 2) % 31_536_000_000),
        "tags": tags,
        "total": (mix(i, 5) % 100_000) as f64 / 100.0,
        "currency": "EUR",
        "items": 1 + mix(i, 6) % 9,
        "note": "Leave at the door; call on arrival. Fragile items are packed separately, invoice by mail.",
    });
    (order_id(i), data.to_string())
}

/// The mean JSON size of the first thousand documents, in bytes.
fn mean_document_bytes(sizes: &[u64]) -> usize {
    let total: usize = (0..1000).map(|i| document(i, sizes).1.len()).sum();
    total / 1000
}

/// The policy of the query sidecar and of `migrate`.
fn policy() -> String {
    format!(
        "service = \"docsidecar-bench\"\n\
         # Tables and indexes come from `docsidecar migrate` only, as in production.\n\
         auto_create = false\n\n\
         [collections.{COLLECTION}]\naccess = \"read-write\"\nindexes = {INDEXES}\n"
    )
}

/// The SQL the raw driver runs: the statements the sidecar's stores build for
/// this query and this count (`src/store/sql.rs`, each store's `queries.rs`),
/// with the same parameters.
#[derive(Debug, Clone, Serialize)]
pub struct RawSql {
    pub query: String,
    pub count: String,
}

const PG_COLUMNS: &str = "scope, id, rev, data::text, create_time, update_time, expire_time";
const PG_LIVE: &str =
    "(expire_time IS NULL OR expire_time > ((extract(epoch from now()) * 1000000)::bigint + $1::bigint))";

/// The key column `migrate` gives a declared field on PostgreSQL: `k$` and
/// an FNV-1a hash of the path's JSON (`src/store/postgres/keys.rs`; the
/// column's comment names the field).
pub fn pg_key_column(field: &str) -> String {
    let json = serde_json::to_string(&[field]).unwrap_or_default();
    let hash = json.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("\"k${:012x}\"", hash >> 16)
}

/// PostgreSQL: `$1` the clock offset (0), `$2` the scope (''), `$3` the
/// value's key (bytea). The declared fields' `bytea` key columns, kept by the
/// store's trigger and indexed by `migrate`, as the sidecar compares them.
pub fn pg_sql(schema: &str) -> RawSql {
    let table = format!("\"{schema}\".\"{COLLECTION}\"");
    RawSql {
        query: format!(
            "SELECT {PG_COLUMNS} FROM {table} WHERE {PG_LIVE} AND scope = $2 AND {c} IN ($3) AND {t} IS NOT NULL ORDER BY {t} DESC, id LIMIT {}",
            PAGE + 1,
            c = pg_key_column("customer"),
            t = pg_key_column("created_at"),
        ),
        count: format!(
            "SELECT count(*) FROM {table} WHERE {PG_LIVE} AND scope = $2 AND {} IN ($3)",
            pg_key_column("status")
        ),
    }
}

/// SQLite: `?1` now (µs), `?2` the scope (''), `?3` the value's key (blob);
/// `docsidecar_key` is registered on the connection ([`register_key`]).
pub fn sqlite_sql() -> RawSql {
    let key = |field: &str| format!("docsidecar_key(data, '[\"{field}\"]')");
    let from = format!(
        "FROM documents WHERE collection = '{COLLECTION}' AND (expire_time IS NULL OR expire_time > ?1) AND scope = ?2"
    );
    RawSql {
        query: format!(
            "SELECT scope, id, rev, data, create_time, update_time, expire_time {from} AND {c} IN (?3) AND {t} IS NOT NULL ORDER BY {t} DESC, id LIMIT {}",
            PAGE + 1,
            c = key("customer"),
            t = key("created_at"),
        ),
        count: format!("SELECT count(*) {from} AND {} IN (?3)", key("status")),
    }
}

/// The key and number columns MariaDB/MySQL give a declared field: `k$`,
/// `n$` and an FNV-1a hash of the dotted path (`src/store/mysql/keys.rs`),
/// generated from `data`.
pub fn mysql_key_columns(field: &str) -> (String, String) {
    let hash = field.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let hash = format!("{:012x}", hash >> 16);
    (format!("`k${hash}`"), format!("`n${hash}`"))
}

/// MariaDB: the declared fields' generated key columns (a string's key in
/// `k$`, `n$` NULL), as the sidecar compares them. Parameters: the clock
/// offset (0), the scope (''), the value's key (bytes).
pub fn mysql_sql() -> RawSql {
    let live = "(expire_time IS NULL OR expire_time > (TIMESTAMPDIFF(MICROSECOND, '1970-01-01', UTC_TIMESTAMP(6)) + ?))";
    let (ck, cn) = mysql_key_columns("customer");
    let (tk, tn) = mysql_key_columns("created_at");
    let (sk, sn) = mysql_key_columns("status");
    RawSql {
        query: format!(
            "SELECT scope, id, rev, data, create_time, update_time, expire_time FROM `{COLLECTION}` WHERE {live} AND scope = ? AND ({ck} IN (?) AND {cn} IS NULL) AND {tk} IS NOT NULL ORDER BY {tk} DESC, {tn} DESC, id LIMIT {}",
            PAGE + 1
        ),
        count: format!(
            "SELECT COUNT(*) FROM `{COLLECTION}` WHERE {live} AND scope = ? AND ({sk} IN (?) AND {sn} IS NULL)"
        ),
    }
}

/// Registers `docsidecar_key(data, path)` on a SQLite connection: the
/// sidecar's function (`src/store/sqlite/queries.rs`), which its indexes are
/// built on and without which a connection can neither use nor maintain them.
pub fn register_key(conn: &rusqlite::Connection) -> rusqlite::Result<()> {
    use rusqlite::functions::FunctionFlags;
    let flags = FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC;
    conn.create_scalar_function("docsidecar_key", 2, flags, |ctx| {
        let (Some(data), Some(path)) =
            (ctx.get::<Option<String>>(0)?, ctx.get::<Option<String>>(1)?)
        else {
            return Ok(None);
        };
        let (Ok(keys), Ok(doc)) = (
            serde_json::from_str::<Vec<String>>(&path),
            serde_json::from_str::<serde_json::Value>(&data),
        ) else {
            return Ok(None);
        };
        let path = docsidecar::store::FieldPath::from_segments(&keys);
        Ok(docsidecar::store::sql::key_of_json(&doc, &path))
    })
}

/// The gRPC Query of customer `k`'s first page, newest first.
pub fn query_request(k: u64) -> proto::QueryRequest {
    use proto::{filter::Operator, order::Direction};
    proto::QueryRequest {
        collection: COLLECTION.into(),
        scope: String::new(),
        filters: vec![proto::Filter {
            field: "customer".into(),
            op: Operator::Equal as i32,
            value: Some(string_value(&customer(k))),
        }],
        order_by: vec![proto::Order {
            field: "created_at".into(),
            direction: Direction::Descending as i32,
        }],
        page_size: PAGE as i32,
        page_token: String::new(),
    }
}

/// The gRPC Count of status `k`.
pub fn count_request(k: u64) -> proto::CountRequest {
    proto::CountRequest {
        collection: COLLECTION.into(),
        scope: String::new(),
        filters: vec![proto::Filter {
            field: "status".into(),
            op: proto::filter::Operator::Equal as i32,
            value: Some(string_value(status(k))),
        }],
    }
}

fn string_value(s: &str) -> prost_types::Value {
    prost_types::Value {
        kind: Some(prost_types::value::Kind::StringValue(s.into())),
    }
}

/// One stage: the collection's size, how long loading took, one page's time.
#[derive(Debug, Clone, Serialize)]
pub struct Stage {
    pub docs: u64,
    /// Loading the stage's new documents (and ANALYZE), in seconds.
    pub load_secs: f64,
    /// Customers the page runs draw from (each has a full page).
    pub customers: u64,
    /// Closed loop, one worker: raw, then sidecar.
    pub page: Vec<RunResult>,
}

#[derive(Debug, Clone, Serialize)]
pub struct QueryReport {
    pub collection: String,
    pub page_size: usize,
    pub indexes: String,
    /// Mean JSON size of a document, in bytes (the floor's canned documents
    /// have this size).
    pub document_bytes: usize,
    /// The SQL of the raw target.
    pub raw_sql: RawSql,
    /// The database's plan of the raw query, then of the raw count, at the
    /// last stage (EXPLAIN; SQLite: EXPLAIN QUERY PLAN).
    pub raw_plan: Vec<String>,
    pub stages: Vec<Stage>,
    /// At the last stage, every customer: closed loop at [`CONCURRENCY`] and
    /// the open loop at the run's rate: raw, sidecar, and the transport floor
    /// (a no-op gRPC server answering pages of 50 canned documents of the
    /// same size).
    pub throughput: Vec<RunResult>,
    pub latency: Vec<RunResult>,
    /// Count of one status at the last stage, closed loop, one worker.
    pub count: Vec<RunResult>,
    /// What the Count of `status(0)` returned (sidecar) at the last stage.
    pub counted: u64,
    /// Runs left out, and why.
    pub skipped: Vec<String>,
}

/// What the query run needs from the harness.
pub struct QuerySetup<'a> {
    pub db: &'a Db,
    pub schema: &'a str,
    pub tmp: &'a Path,
    pub spec: SidecarSpec<'a>,
    pub raw: Client,
    pub sizes: Vec<u64>,
    pub connections: usize,
    pub rate: f64,
    pub warmup: Duration,
    pub duration: Duration,
    pub open_duration: Duration,
}

/// `docsidecar migrate` with the query policy, as an init container runs it.
fn migrate(spec: &SidecarSpec<'_>, policy: &Path) -> Result<(), String> {
    let output = std::process::Command::new(spec.binary)
        .arg("migrate")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("MIGRATE_DATABASE_URL", &spec.database_url)
        .env("MIGRATE_DB_SSLMODE", "disable")
        .env("DOCSIDECAR_SCHEMA", spec.schema)
        .env("DOCSIDECAR_POLICY", policy)
        .env("DOCSIDECAR_LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .output()
        .map_err(|e| format!("cannot run docsidecar migrate: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "docsidecar migrate failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// Writes documents `from..to` into the sidecar's table by the database's bulk
/// path, then ANALYZE.
async fn load(
    db: &Db,
    schema: &str,
    admin: &mut Admin,
    sizes: &[u64],
    (from, to): (u64, u64),
) -> Result<(), String> {
    let now = docsidecar::store::now_micros();
    let sizes = sizes.to_vec();
    match (db, admin) {
        (Db::Sqlite(path), _) => {
            let path = path.clone();
            tokio::task::spawn_blocking(move || -> rusqlite::Result<()> {
                let mut conn = rusqlite::Connection::open(&path)?;
                conn.busy_timeout(Duration::from_secs(30))?;
                register_key(&conn)?;
                let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                tx.execute(
                    "INSERT OR IGNORE INTO collections (name, create_time) VALUES (?1, ?2)",
                    rusqlite::params![COLLECTION, now],
                )?;
                {
                    let mut insert = tx.prepare(&format!(
                        "INSERT INTO documents (collection, scope, id, rev, data, create_time, update_time)
                         VALUES ('{COLLECTION}', '', ?1, ?2, ?3, ?4, ?4)"
                    ))?;
                    for i in from..to {
                        let (id, json) = document(i, &sizes);
                        insert.execute(rusqlite::params![
                            id,
                            docsidecar::store::new_rev(),
                            json,
                            now
                        ])?;
                    }
                }
                tx.commit()?;
                conn.execute_batch("ANALYZE")
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("loading SQLite: {e}"))
        }
        (Db::Postgres(_), Admin::Pg(c)) => {
            use futures_util::SinkExt;
            let pg = |e: tokio_postgres::Error| format!("loading PostgreSQL: {e}");
            let table = format!("\"{schema}\".\"{COLLECTION}\"");
            let sink = c
                .copy_in::<_, bytes::Bytes>(&format!(
                    "COPY {table} (scope, id, rev, data, create_time, update_time) FROM STDIN"
                ))
                .await
                .map_err(pg)?;
            futures_util::pin_mut!(sink);
            let mut chunk = String::with_capacity(1 << 20);
            for i in from..to {
                let (id, json) = document(i, &sizes);
                // COPY's text format: tab-separated, backslash escapes.
                let json = json
                    .replace('\\', "\\\\")
                    .replace('\t', "\\t")
                    .replace('\n', "\\n")
                    .replace('\r', "\\r");
                let rev = docsidecar::store::new_rev();
                chunk.push_str(&format!("\t{id}\t{rev}\t{json}\t{now}\t{now}\n"));
                if chunk.len() >= 1 << 20 || i + 1 == to {
                    let full = std::mem::replace(&mut chunk, String::with_capacity(1 << 20));
                    sink.send(bytes::Bytes::from(full)).await.map_err(pg)?;
                }
            }
            sink.as_mut().finish().await.map_err(pg)?;
            c.batch_execute(&format!("ANALYZE {table}"))
                .await
                .map_err(pg)
        }
        (Db::Mysql(_), Admin::Mysql(c)) => {
            use mysql_async::prelude::Queryable;
            use mysql_async::Value;
            let my = |e: mysql_async::Error| format!("loading MariaDB: {e}");
            const ROWS: u64 = 1000;
            let table = format!("`{schema}`.`{COLLECTION}`");
            let mut start = from;
            while start < to {
                c.query_drop("START TRANSACTION").await.map_err(my)?;
                // 50 statements of 1000 rows per transaction.
                for _ in 0..50 {
                    if start >= to {
                        break;
                    }
                    let end = (start + ROWS).min(to);
                    let rows = vec!["(?, ?, ?, ?, ?, ?)"; (end - start) as usize].join(", ");
                    let mut params = Vec::with_capacity(6 * (end - start) as usize);
                    for i in start..end {
                        let (id, json) = document(i, &sizes);
                        params.extend([
                            Value::Bytes(Vec::new()),
                            Value::Bytes(id.into_bytes()),
                            Value::Bytes(docsidecar::store::new_rev().into_bytes()),
                            Value::Bytes(json.into_bytes()),
                            Value::Int(now),
                            Value::Int(now),
                        ]);
                    }
                    c.exec_drop(
                        format!(
                            "INSERT INTO {table} (scope, id, rev, data, create_time, update_time) VALUES {rows}"
                        ),
                        params,
                    )
                    .await
                    .map_err(my)?;
                    start = end;
                }
                c.query_drop("COMMIT").await.map_err(my)?;
            }
            c.query_drop(format!("ANALYZE TABLE {table}"))
                .await
                .map_err(my)
        }
        _ => Err("no admin connection for this database".into()),
    }
}

/// The ids of customer `k`'s first page, and of a status's count, from one
/// client: what the sidecar and the raw driver must agree on.
async fn answers(client: &Client, k: u64) -> Result<(Vec<String>, u64), String> {
    let mut client = client.clone();
    let ids = client.query_ids(k).await?;
    let count = client.count(k).await?;
    Ok((ids, count))
}

/// Sidecar and raw return the same page for a few customers and the same
/// count; a page is full where the customer has 50 documents.
async fn check_same(sidecar: &Client, raw: &Client, customers: u64) -> Result<(), String> {
    for k in [0, customers / 2, customers - 1] {
        let (s, r) = (answers(sidecar, k).await?, answers(raw, k).await?);
        if s != r {
            return Err(format!(
                "the sidecar and the raw driver disagree on customer {} / status {}: sidecar {} ids (first {:?}), count {}; raw {} ids (first {:?}), count {}",
                customer(k),
                status(k),
                s.0.len(),
                s.0.first(),
                s.1,
                r.0.len(),
                r.0.first(),
                r.1
            ));
        }
        if s.0.is_empty() {
            return Err(format!("customer {} has no documents", customer(k)));
        }
    }
    Ok(())
}

fn log(r: &RunResult, extra: &str) {
    eprintln!(
        "query {:<6} {:<5} c={:<3} {:<8} {:>8.0} ops/s  p50 {:>8.3} ms  p99 {:>8.3} ms{}{extra}",
        r.workload,
        r.mode,
        r.concurrency,
        r.target,
        r.ops_per_sec,
        r.p50_us / 1000.0,
        r.p99_us / 1000.0,
        r.first_error.as_ref().map_or(String::new(), |e| format!(
            "  {} errors, first: {e}",
            r.errors
        )),
    );
}

/// One closed-loop run of `workload` over `draw` customers (statuses).
async fn closed(
    target: (&str, &[Client], Option<u32>),
    workload: Workload,
    concurrency: usize,
    draw: u64,
    setup: &QuerySetup<'_>,
    shared: &Arc<Shared>,
    seed: u64,
) -> RunResult {
    let (name, clients, pid) = target;
    // A Count may take longer than the warm-up: the first one counts (the
    // checks before warmed the caches), and the run is long enough for a few.
    let (warmup, duration) = match workload {
        Workload::Count => (Duration::ZERO, setup.duration.max(Duration::from_secs(3))),
        _ => (setup.warmup, setup.duration),
    };
    let plan = Plan {
        workload,
        docs: draw,
        warmup,
        duration,
        pid,
        seed,
    };
    let clients = &clients[..clients.len().min(concurrency)];
    let m = load::closed(clients, concurrency, shared.clone(), &plan).await;
    let r = RunResult::new(workload.name(), name, "closed", concurrency, None, &m);
    log(&r, "");
    r
}

/// The median time of a few sequential Queries through `client`.
async fn probe(client: &Client, shared: &Shared, customers: u64) -> Result<Duration, String> {
    let mut times = Vec::new();
    for k in 0..3 {
        let started = Instant::now();
        let mut c = client.clone();
        c.run(&crate::workload::Op::Query(k % customers), shared)
            .await?;
        times.push(started.elapsed());
    }
    times.sort();
    Ok(times[1])
}

/// Runs the query workload: migrate, load by stages, measure; the query
/// sidecar is started after migrate and stopped at the end.
pub async fn measure(
    setup: QuerySetup<'_>,
    admin: &mut Admin,
    shared: Arc<Shared>,
) -> Result<QueryReport, String> {
    let policy_path = setup.tmp.join("query-policy.toml");
    std::fs::write(&policy_path, policy()).map_err(|e| format!("cannot write the policy: {e}"))?;
    {
        let spec = &setup.spec;
        let started = Instant::now();
        tokio::task::block_in_place(|| migrate(spec, &policy_path))?;
        eprintln!(
            "query: migrate with {INDEXES} took {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    let mut spec_env = setup.spec.env.clone();
    spec_env.push((
        "DOCSIDECAR_POLICY".into(),
        policy_path.display().to_string(),
    ));
    let spec = SidecarSpec {
        binary: setup.spec.binary,
        database_url: setup.spec.database_url.clone(),
        schema: setup.spec.schema,
        pool_size: setup.spec.pool_size,
        env: spec_env,
    };
    let (sidecar, address) = spec.start("127.0.0.1:0")?;
    let bytes = mean_document_bytes(&setup.sizes);
    let (floor, floor_address) = process::start_floor(bytes, None)?;
    let floor_clients = crate::drivers::grpc_clients(&floor_address, setup.connections).await?;
    let floor_target = (floor_clients, floor.pid);
    let result = run(
        &setup,
        admin,
        shared,
        (&address, sidecar.pid),
        &floor_target,
    )
    .await;
    drop(floor);
    let problems = sidecar.problems();
    let _ = sidecar.stop(Duration::from_secs(15));
    if !problems.is_empty() {
        eprintln!(
            "query: the sidecar logged {} warnings or errors, first: {}",
            problems.len(),
            problems[0]
        );
    }
    result
}

async fn run(
    setup: &QuerySetup<'_>,
    admin: &mut Admin,
    shared: Arc<Shared>,
    (address, pid): (&str, u32),
    floor: &(Vec<Client>, u32),
) -> Result<QueryReport, String> {
    let sidecars = crate::drivers::grpc_clients(address, setup.connections).await?;
    let raw = std::slice::from_ref(&setup.raw);
    let raw_sql = match setup.db {
        Db::Sqlite(_) => sqlite_sql(),
        Db::Postgres(_) => pg_sql(setup.schema),
        Db::Mysql(_) => mysql_sql(),
    };
    let mut report = QueryReport {
        collection: COLLECTION.into(),
        page_size: PAGE,
        indexes: INDEXES.into(),
        document_bytes: mean_document_bytes(&setup.sizes),
        raw_sql,
        raw_plan: Vec::new(),
        stages: Vec::new(),
        throughput: Vec::new(),
        latency: Vec::new(),
        count: Vec::new(),
        counted: 0,
        skipped: Vec::new(),
    };
    let mut loaded = 0;
    let mut seed = 7_000;
    let hot = customers_at(setup.sizes[0]);
    for (n, &size) in setup.sizes.iter().enumerate() {
        let started = Instant::now();
        load(setup.db, setup.schema, admin, &setup.sizes, (loaded, size)).await?;
        let load_secs = started.elapsed().as_secs_f64();
        eprintln!("query: loaded documents {loaded}..{size} in {load_secs:.1} s (with ANALYZE)");
        loaded = size;
        if n == 0 {
            // The first Query and Count: where the store builds a declared
            // index on first use, it does so now, on the smallest collection.
            let started = Instant::now();
            answers(&sidecars[0], 0).await?;
            eprintln!(
                "query: first Query and Count {:.1} s",
                started.elapsed().as_secs_f64()
            );
        }
        check_same(&sidecars[0], &setup.raw, hot).await?;
        let single = probe(&sidecars[0], &shared, hot).await?;
        let mut page = Vec::new();
        if single > Duration::from_secs(2) {
            report.skipped.push(format!(
                "page runs at {size} documents: a page takes {:.1} s",
                single.as_secs_f64()
            ));
        } else {
            for (name, clients, pid) in [("raw", raw, None), ("sidecar", &sidecars[..], Some(pid))]
            {
                seed += 1;
                page.push(
                    closed(
                        (name, clients, pid),
                        Workload::Query,
                        1,
                        hot,
                        setup,
                        &shared,
                        seed,
                    )
                    .await,
                );
            }
        }
        report.stages.push(Stage {
            docs: size,
            load_secs,
            customers: hot,
            page,
        });
    }

    // The last stage: every customer.
    report.raw_plan = setup.raw.explain().await?;
    for line in &report.raw_plan {
        eprintln!("query: plan: {line}");
    }
    let last = *setup.sizes.last().expect("at least one size");
    let customers = customers_at(last);
    check_same(&sidecars[0], &setup.raw, customers).await?;
    let single = probe(&sidecars[0], &shared, customers).await?;
    let targets = [
        ("raw", raw, None),
        ("floor", &floor.0[..], Some(floor.1)),
        ("sidecar", &sidecars[..], Some(pid)),
    ];
    if single > Duration::from_millis(500) {
        report.skipped.push(format!(
            "concurrency {CONCURRENCY}: a page takes {:.1} s",
            single.as_secs_f64()
        ));
    } else {
        for (name, clients, pid) in targets {
            seed += 1;
            report.throughput.push(
                closed(
                    (name, clients, pid),
                    Workload::Query,
                    CONCURRENCY,
                    customers,
                    setup,
                    &shared,
                    seed,
                )
                .await,
            );
        }
    }
    // 16 lanes at the rate: each lane has 16 / rate seconds per request.
    if single.as_secs_f64() > setup.connections as f64 / setup.rate {
        report.skipped.push(format!(
            "open loop at {}/s: a page takes {:.1} ms, more than {} lanes can keep",
            setup.rate,
            single.as_secs_f64() * 1000.0,
            setup.connections
        ));
    } else {
        for (name, clients, pid) in targets {
            seed += 1;
            let plan = Plan {
                workload: Workload::Query,
                docs: customers,
                warmup: setup.warmup,
                duration: setup.open_duration,
                pid,
                seed,
            };
            let m = load::open(
                clients,
                setup.connections,
                setup.rate,
                shared.clone(),
                &plan,
            )
            .await;
            let r = RunResult::new(
                "query",
                name,
                "open",
                setup.connections,
                Some(setup.rate),
                &m,
            );
            log(&r, "");
            report.latency.push(r);
        }
    }
    for (name, clients, pid) in [targets[0], targets[2]] {
        seed += 1;
        // Always status 0: one fifth of the collection.
        report.count.push(
            closed(
                (name, clients, pid),
                Workload::Count,
                1,
                1,
                setup,
                &shared,
                seed,
            )
            .await,
        );
    }
    report.counted = answers(&sidecars[0], 0).await?.1;
    eprintln!("query: Count of status {} = {}", status(0), report.counted);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_iso_and_sort_as_time() {
        assert_eq!(iso(0), "2025-01-01T00:00:00.000Z");
        assert_eq!(iso(59 * 86_400_000 + 1), "2025-03-01T00:00:00.001Z");
        assert_eq!(iso(31_535_999_999), "2025-12-31T23:59:59.999Z");
        assert!(iso(1_000) < iso(86_400_000));
    }

    #[test]
    fn early_customers_have_a_full_page_at_every_stage() {
        let sizes = [10_000, 100_000];
        let hot = customers_at(sizes[0]);
        assert_eq!(hot, 200);
        let mut per = std::collections::HashMap::new();
        for i in 0..sizes[0] {
            let (_, json) = document(i, &sizes);
            let v: serde_json::Value = serde_json::from_str(&json).unwrap();
            *per.entry(v["customer"].as_str().unwrap().to_string())
                .or_insert(0) += 1;
        }
        assert_eq!(per.len(), 200);
        assert!(per.values().all(|&n| n == PAGE));
        assert_eq!(customers_at(1_000_000), CUSTOMERS);
    }
}
