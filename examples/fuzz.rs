//! A fuzz probe of the gRPC surface: many requests of three kinds against a real
//! `docsidecar` process, with the table of answers and the server's peak memory.
//!
//! - `bytes`: a random body (sometimes a broken gRPC frame) to a random method;
//! - `mutated`: a valid request, encoded, then bit-flipped, truncated or spliced;
//! - `adversarial`: a well-formed request full of edge values (NUL, long and
//!   unicode strings, NaN-like numbers, deep nesting, bad tokens, odd paths).
//!
//! ```sh
//! cargo build && cargo run --example fuzz -- --binary target/debug/docsidecar \
//!     --database memory:// --requests 100000
//! ```
//!
//! `--memory-probe` instead loads 300 documents of 100 KiB and runs 64 concurrent
//! `List(page_size=1000)` and `BatchGet` of all ids for 10 s, then prints the
//! server's peak RSS (the bound the README states).
//!
//! It fails (exit 1) on a crash, a hang, an UNKNOWN status or an INTERNAL one
//! (each a sidecar fault), printing samples of what caused them.

use bytes::Bytes;
use docsidecar::proto::{
    field_transform, mutation, update_request, BatchGetRequest, CountRequest, DeleteRequest,
    FieldTransform, Filter, GetRequest, ListCollectionsRequest, ListRequest, Mutation, Order,
    QueryRequest, SaveRequest, UpdateRequest, WatchRequest, WriteRequest,
};
use prost::Message;
use prost_types::{value::Kind, Duration as PbDuration, ListValue, Struct, Timestamp, Value};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const METHODS: [&str; 11] = [
    "Get",
    "Save",
    "Update",
    "Delete",
    "List",
    "BatchGet",
    "Write",
    "Query",
    "Count",
    "Watch",
    "ListCollections",
];

/// xorshift64*: reproducible from `--seed`, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn odd_strings() -> Vec<String> {
    vec![
        String::new(),
        "a".into(),
        "\0".into(),
        "a\0b".into(),
        "x".repeat(513),
        "x".repeat(20_000),
        "é".into(),
        "😀".repeat(200),
        "'; DROP TABLE people; --".into(),
        "../../etc/passwd".into(),
        "__id__".into(),
        "a.b".into(),
        "`a.b`.c".into(),
        "`".into(),
        "a..b".into(),
        " ".into(),
        "a ".into(),
        "\u{202e}rtl".into(),
        "\u{fffd}".into(),
        "\n\t".into(),
        "\u{7f}".into(),
        "%00".into(),
        "9".repeat(40),
        "-1".into(),
        "AAAAAAAAAAAAAAAA".into(),
        "////".into(),
        "$".into(),
        "_changes".into(),
        "sqlite_master".into(),
        "pg_catalog".into(),
    ]
}

struct Gen {
    rng: Rng,
    odd: Vec<String>,
}

impl Gen {
    fn string(&mut self) -> String {
        match self.rng.below(4) {
            0 => self.rng.pick(&self.odd).clone(),
            1 => {
                let n = self.rng.below(24);
                (0..n)
                    .map(|_| char::from_u32(self.rng.below(0x3000) as u32).unwrap_or('?'))
                    .collect()
            }
            _ => self
                .rng
                .pick(&["a", "b", "c", "status", "n", "tags"])
                .to_string(),
        }
    }
    fn collection(&mut self) -> String {
        if self.rng.chance(80) {
            self.rng.pick(&["people", "orders", "c_1"]).to_string()
        } else {
            self.rng
                .pick(&[
                    "",
                    "People",
                    "1abc",
                    "a-b",
                    "_changes",
                    &"a".repeat(64),
                    "é",
                ])
                .to_string()
        }
    }
    fn id(&mut self) -> String {
        if self.rng.chance(75) {
            self.rng.pick(&["a", "b", "c", "d", "ada"]).to_string()
        } else {
            self.string()
        }
    }
    fn token(&mut self) -> String {
        match self.rng.below(4) {
            0 => String::new(),
            1 => self.string(),
            2 => base64_like(&mut self.rng),
            _ => "AQdwZW9wbGUBYQ".into(),
        }
    }
    fn number(&mut self) -> f64 {
        *self.rng.pick(&[
            0.0,
            -0.0,
            1.0,
            -1.5,
            1e308,
            -1e308,
            5e-324,
            9_007_199_254_740_993.0,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::MAX,
        ])
    }
    fn value(&mut self, depth: usize) -> Value {
        let kind = match self.rng.below(if depth > 24 { 4 } else { 6 }) {
            0 => Kind::NullValue(0),
            1 => Kind::NumberValue(self.number()),
            2 => Kind::StringValue(self.string()),
            3 => Kind::BoolValue(self.rng.chance(50)),
            4 => Kind::StructValue(self.object(depth + 1)),
            _ => Kind::ListValue(self.list(depth + 1)),
        };
        // Sometimes a Value with no kind at all.
        Value {
            kind: (!self.rng.chance(3)).then_some(kind),
        }
    }
    fn list(&mut self, depth: usize) -> ListValue {
        let n = self.rng.below(4);
        ListValue {
            values: (0..n).map(|_| self.value(depth)).collect(),
        }
    }
    fn object(&mut self, depth: usize) -> Struct {
        let n = self.rng.below(if depth > 2 { 2 } else { 5 });
        let mut fields: BTreeMap<String, Value> =
            (0..n).map(|_| (self.string(), self.value(depth))).collect();
        if self.rng.chance(3) {
            // Deeper than the nesting limit, or a large document.
            let mut v = Value {
                kind: Some(Kind::NullValue(0)),
            };
            for _ in 0..self.rng.below(40) {
                v = Value {
                    kind: Some(Kind::ListValue(ListValue { values: vec![v] })),
                };
            }
            fields.insert("deep".into(), v);
        }
        if self.rng.chance(1) {
            let big = "x".repeat(self.rng.pick(&[100_000, 1_100_000]).to_owned());
            fields.insert("big".into(), string_value(big));
        }
        Struct {
            fields: fields.into_iter().collect(),
        }
    }
    fn timestamp(&mut self) -> Timestamp {
        Timestamp {
            seconds: *self.rng.pick(&[
                0,
                -1,
                1,
                4_102_444_800,
                i64::MAX,
                i64::MIN,
                253_402_300_800,
            ]),
            nanos: *self
                .rng
                .pick(&[0, -1, 999_999_999, 1_000_000_000, i32::MAX]),
        }
    }
    fn save(&mut self) -> SaveRequest {
        SaveRequest {
            collection: self.collection(),
            id: self.id(),
            data: (!self.rng.chance(5)).then(|| self.object(1).into()),
            expected_rev: if self.rng.chance(20) {
                self.string()
            } else {
                String::new()
            },
            create_only: self.rng.chance(20),
            scope: self.scope(),
            expiration: match self.rng.below(6) {
                0 => Some(docsidecar::proto::save_request::Expiration::ExpireTime(
                    self.timestamp(),
                )),
                1 => Some(docsidecar::proto::save_request::Expiration::Ttl(
                    self.duration(),
                )),
                _ => None,
            },
        }
    }
    fn duration(&mut self) -> PbDuration {
        PbDuration {
            seconds: *self.rng.pick(&[0, -5, 1, 60, i64::MAX, i64::MIN]),
            nanos: *self.rng.pick(&[0, -1, 5, 999_999_999, i32::MIN]),
        }
    }
    fn scope(&mut self) -> String {
        if self.rng.chance(85) {
            String::new()
        } else {
            self.string()
        }
    }
    fn update(&mut self) -> UpdateRequest {
        let transforms = (0..self.rng.below(3))
            .map(|_| FieldTransform {
                field: self.string(),
                op: Some(match self.rng.below(6) {
                    0 => field_transform::Op::Increment(self.value(3)),
                    1 => field_transform::Op::Maximum(self.value(3)),
                    2 => field_transform::Op::Minimum(self.value(3)),
                    3 => field_transform::Op::AppendMissing(self.list(3)),
                    4 => field_transform::Op::RemoveAll(self.list(3)),
                    _ => field_transform::Op::SetToServerTime(self.rng.chance(50)),
                }),
            })
            .collect();
        UpdateRequest {
            collection: self.collection(),
            id: self.id(),
            scope: self.scope(),
            merge: self.rng.chance(70).then(|| self.object(1).into()),
            transforms,
            expected_rev: if self.rng.chance(15) {
                self.string()
            } else {
                String::new()
            },
            allow_missing: self.rng.chance(50),
            expiration: match self.rng.below(8) {
                0 => Some(update_request::Expiration::ExpireTime(self.timestamp())),
                1 => Some(update_request::Expiration::Ttl(self.duration())),
                _ => None,
            },
        }
    }
    fn delete(&mut self) -> DeleteRequest {
        DeleteRequest {
            collection: self.collection(),
            id: self.id(),
            expected_rev: if self.rng.chance(15) {
                self.string()
            } else {
                String::new()
            },
            allow_missing: self.rng.chance(50),
            scope: self.scope(),
        }
    }
    fn filters(&mut self) -> Vec<Filter> {
        (0..self.rng.below(4))
            .map(|_| Filter {
                field: self.string(),
                op: self.rng.below(13) as i32,
                value: self.rng.chance(90).then(|| self.value(3)),
            })
            .collect()
    }
    fn page_size(&mut self) -> i32 {
        *self
            .rng
            .pick(&[0, 1, 2, 100, 1000, 1001, -1, i32::MAX, i32::MIN])
    }
    /// A valid-shaped request for `method`, encoded.
    fn request(&mut self, method: &str) -> Vec<u8> {
        match method {
            "Get" => GetRequest {
                collection: self.collection(),
                id: self.id(),
                scope: self.scope(),
            }
            .encode_to_vec(),
            "Save" => self.save().encode_to_vec(),
            "Update" => self.update().encode_to_vec(),
            "Delete" => self.delete().encode_to_vec(),
            "List" => ListRequest {
                collection: self.collection(),
                page_size: self.page_size(),
                page_token: self.token(),
                scope: self.scope(),
            }
            .encode_to_vec(),
            "BatchGet" => BatchGetRequest {
                collection: self.collection(),
                ids: (0..*self.rng.pick(&[0, 1, 3, 50, 1001]))
                    .map(|_| self.id())
                    .collect(),
                scope: self.scope(),
            }
            .encode_to_vec(),
            "Write" => WriteRequest {
                mutations: (0..*self.rng.pick(&[0, 1, 2, 5, 501]))
                    .map(|_| Mutation {
                        op: match self.rng.below(4) {
                            0 => Some(mutation::Op::Save(self.save())),
                            1 => Some(mutation::Op::Delete(self.delete())),
                            2 => Some(mutation::Op::Update(self.update())),
                            _ => None,
                        },
                    })
                    .collect(),
            }
            .encode_to_vec(),
            "Query" => QueryRequest {
                collection: self.collection(),
                scope: self.scope(),
                filters: self.filters(),
                order_by: (0..self.rng.below(3))
                    .map(|_| Order {
                        field: self.string(),
                        direction: self.rng.below(4) as i32,
                    })
                    .collect(),
                page_size: self.page_size(),
                page_token: self.token(),
            }
            .encode_to_vec(),
            "Count" => CountRequest {
                collection: self.collection(),
                scope: self.scope(),
                filters: self.filters(),
            }
            .encode_to_vec(),
            "Watch" => WatchRequest {
                collections: (0..self.rng.below(3)).map(|_| self.collection()).collect(),
                resume_token: self.token(),
                include_documents: self.rng.chance(50),
            }
            .encode_to_vec(),
            _ => ListCollectionsRequest {}.encode_to_vec(),
        }
    }
}

fn base64_like(rng: &mut Rng) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=+/";
    let n = rng.below(60);
    (0..n)
        .map(|_| ALPHABET[rng.below(ALPHABET.len())] as char)
        .collect()
}

fn string_value(s: String) -> Value {
    Value {
        kind: Some(Kind::StringValue(s)),
    }
}

fn mutate(rng: &mut Rng, mut msg: Vec<u8>) -> Vec<u8> {
    for _ in 0..=rng.below(4) {
        match rng.below(4) {
            0 if !msg.is_empty() => {
                let i = rng.below(msg.len());
                msg[i] ^= 1 << rng.below(8);
            }
            1 if !msg.is_empty() => {
                let n = rng.below(msg.len());
                msg.truncate(n);
            }
            2 => {
                let i = rng.below(msg.len() + 1);
                let n = rng.below(8) + 1;
                let extra = rng.bytes(n);
                msg.splice(i..i, extra);
            }
            _ if !msg.is_empty() => {
                let i = rng.below(msg.len());
                msg[i] = *rng.pick(&[0x00, 0x7f, 0x80, 0xff, 0x0a, 0x12, 0x1a]);
            }
            _ => {}
        }
    }
    msg
}

/// A gRPC frame around `msg`; sometimes a broken one.
fn frame(rng: &mut Rng, msg: &[u8], kind: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(msg.len() + 5);
    let broken = kind == "bytes" && rng.chance(30);
    let compressed = u8::from(broken && rng.chance(30));
    out.push(compressed);
    let len = if broken && rng.chance(50) {
        *rng.pick(&[0u32, 1, u32::MAX, msg.len() as u32 + 7])
    } else {
        msg.len() as u32
    };
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(msg);
    if broken && rng.chance(30) {
        out.extend_from_slice(&rng.bytes(3));
    }
    out
}

#[derive(Default)]
struct Tally {
    /// (kind, code) → count.
    codes: BTreeMap<(String, String), usize>,
    /// Samples of faults: (method, kind, code, message).
    faults: Vec<(String, String, String, String)>,
    hangs: usize,
}

impl Tally {
    /// Keeps a few samples of each kind of fault.
    fn sample(&mut self, method: &str, kind: &str, code: &str, message: String) {
        if self.faults.iter().filter(|f| f.2 == code).count() < 5 {
            let message = percent_encoding::percent_decode_str(&message)
                .decode_utf8_lossy()
                .into_owned();
            self.faults
                .push((method.into(), kind.into(), code.into(), message));
        }
    }
}

async fn call(
    client: &mut h2::client::SendRequest<Bytes>,
    addr: &str,
    method: &str,
    body: Vec<u8>,
) -> Result<(String, String), String> {
    let timeout = if method == "Watch" { "200m" } else { "20S" };
    let request = http::Request::builder()
        .method("POST")
        .uri(format!(
            "http://{addr}/docsidecar.v1.DocumentService/{method}"
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", timeout)
        .body(())
        .map_err(|e| e.to_string())?;
    let mut ready = client.clone().ready().await.map_err(|e| e.to_string())?;
    let (response, mut send) = ready
        .send_request(request, false)
        .map_err(|e| e.to_string())?;
    send.send_data(Bytes::from(body), true)
        .map_err(|e| e.to_string())?;
    let response = response.await.map_err(|e| format!("h2: {e}"))?;
    let (parts, mut body) = response.into_parts();
    let status_of = |headers: &http::HeaderMap| {
        headers.get("grpc-status").map(|s| {
            let message = headers
                .get("grpc-message")
                .map(|m| String::from_utf8_lossy(m.as_bytes()).into_owned())
                .unwrap_or_default();
            (String::from_utf8_lossy(s.as_bytes()).into_owned(), message)
        })
    };
    if let Some(status) = status_of(&parts.headers) {
        return Ok(status);
    }
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| format!("h2 body: {e}"))?;
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let trailers = body
        .trailers()
        .await
        .map_err(|e| format!("h2 trailers: {e}"))?;
    trailers
        .as_ref()
        .and_then(status_of)
        .ok_or_else(|| format!("no grpc-status (HTTP {})", parts.status))
}

/// The status name as gRPC spells it (the sidecar's own mapping); a value
/// outside the protocol's codes as a number.
fn code_name(code: &str) -> String {
    match code.parse::<i32>() {
        Ok(n) if (0..=16).contains(&n) => {
            docsidecar::telemetry::code_name(tonic::Code::from_i32(n)).to_string()
        }
        _ => format!("code {code}"),
    }
}

async fn connect(addr: &str) -> h2::client::SendRequest<Bytes> {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (client, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(conn);
    client
}

fn grpc_frame(msg: &[u8]) -> Vec<u8> {
    let mut out = vec![0];
    out.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    out.extend_from_slice(msg);
    out
}

/// Large documents read by many concurrent Lists and BatchGets: what the
/// response budget leaves the process holding at its peak.
async fn memory_probe(addr: &str, pid: u32) {
    const DOCS: usize = 300;
    let mut client = connect(addr).await;
    let ids: Vec<String> = (0..DOCS).map(|i| format!("doc{i:04}")).collect();
    for id in &ids {
        let save = SaveRequest {
            collection: "big".into(),
            id: id.clone(),
            data: Some(
                Struct {
                    fields: [("pad".to_string(), string_value("x".repeat(100 * 1024)))].into(),
                }
                .into(),
            ),
            ..Default::default()
        };
        let (code, message) = call(&mut client, addr, "Save", grpc_frame(&save.encode_to_vec()))
            .await
            .expect("save");
        assert_eq!(code, "0", "save: {message}");
    }
    let before = peak_rss_kib(pid);
    let stop = Instant::now() + Duration::from_secs(10);
    let calls = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for worker in 0..64 {
        let (addr, ids, calls) = (addr.to_string(), ids.clone(), calls.clone());
        tasks.push(tokio::spawn(async move {
            let mut client = connect(&addr).await;
            while Instant::now() < stop {
                let (method, body) = if worker % 2 == 0 {
                    let list = ListRequest {
                        collection: "big".into(),
                        page_size: 1000,
                        ..Default::default()
                    };
                    ("List", list.encode_to_vec())
                } else {
                    let batch = BatchGetRequest {
                        collection: "big".into(),
                        ids: ids.clone(),
                        ..Default::default()
                    };
                    ("BatchGet", batch.encode_to_vec())
                };
                let (code, message) = call(&mut client, &addr, method, grpc_frame(&body))
                    .await
                    .expect("call");
                assert_eq!(code, "0", "{method}: {message}");
                calls.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for task in tasks {
        task.await.expect("worker");
    }
    println!(
        "memory probe: {DOCS} documents of 100 KiB; 64 concurrent List(page_size=1000) and \
         BatchGet({DOCS} ids), {} calls in 10 s; peak RSS {:.1} MiB after loading, {:.1} MiB under load",
        calls.load(Ordering::Relaxed),
        before as f64 / 1024.0,
        peak_rss_kib(pid) as f64 / 1024.0
    );
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

struct Args {
    binary: String,
    database: String,
    requests: usize,
    seed: u64,
    workers: usize,
    memory_probe: bool,
}

fn args() -> Args {
    let mut args = Args {
        binary: "target/debug/docsidecar".into(),
        database: "memory://".into(),
        requests: 100_000,
        seed: 1,
        workers: 16,
        memory_probe: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--memory-probe" {
            args.memory_probe = true;
            continue;
        }
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--binary" => args.binary = value,
            "--database" => args.database = value,
            "--requests" => args.requests = value.parse().expect("--requests N"),
            "--seed" => args.seed = value.parse().expect("--seed N"),
            "--workers" => args.workers = value.parse().expect("--workers N"),
            _ => panic!("unknown flag {flag}"),
        }
    }
    args
}

#[tokio::main]
async fn main() {
    let args = args();
    let dir = tempfile::tempdir().expect("temp dir");
    let database = args
        .database
        .replace("$TMP", dir.path().to_str().expect("utf-8 temp dir"));
    let binary = std::fs::canonicalize(&args.binary).expect("--binary exists");
    let mut child = Command::new(binary)
        .env("DATABASE_URL", &database)
        .env("DOCSIDECAR_LISTEN", "127.0.0.1:0")
        .env("DOCSIDECAR_LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the sidecar starts");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    for stream in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let (tx, errors) = (tx.clone(), errors.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if line.contains("\"level\":\"ERROR\"") {
                    errors.lock().unwrap().push(line.clone());
                }
                let _ = tx.send(line);
            }
        });
    }
    let addr = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("a serving line within 30 s");
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
            if v["message"] == "serving docsidecar.v1.DocumentService" {
                break v["listen"].as_str().expect("listen address").to_string();
            }
        }
    };
    std::thread::spawn(move || while rx.recv().is_ok() {});
    if args.memory_probe {
        memory_probe(&addr, pid).await;
        let _ = child.kill();
        let _ = child.wait();
        return;
    }

    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let mut tasks = Vec::new();
    for worker in 0..args.workers {
        let (next, tally, addr) = (next.clone(), tally.clone(), addr.clone());
        let requests = args.requests;
        let mut gen = Gen {
            rng: Rng(args.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (worker as u64 + 1)),
            odd: odd_strings(),
        };
        tasks.push(tokio::spawn(async move {
            let mut client = None;
            while next.fetch_add(1, Ordering::Relaxed) < requests {
                if client.is_none() {
                    client = Some(connect(&addr).await);
                }
                let method = *gen.rng.pick(&METHODS);
                let kind = *gen
                    .rng
                    .pick(&["bytes", "mutated", "mutated", "adversarial"]);
                let msg = match kind {
                    "bytes" => {
                        let n = gen.rng.below(300);
                        gen.rng.bytes(n)
                    }
                    "mutated" => {
                        let valid = gen.request(method);
                        mutate(&mut gen.rng, valid)
                    }
                    _ => gen.request(method),
                };
                let body = frame(&mut gen.rng, &msg, kind);
                let answer = tokio::time::timeout(
                    Duration::from_secs(60),
                    call(client.as_mut().unwrap(), &addr, method, body),
                )
                .await;
                let mut t = tally.lock().unwrap();
                match answer {
                    Err(_) => {
                        t.hangs += 1;
                        t.sample(method, kind, "hang", String::new());
                    }
                    Ok(Ok((code, message))) => {
                        let name = code_name(&code);
                        if name == "UNKNOWN" || name == "INTERNAL" || name.starts_with("code ") {
                            t.sample(method, kind, &name, message);
                        }
                        *t.codes.entry((kind.into(), name)).or_default() += 1;
                    }
                    Ok(Err(transport)) => {
                        // A stream or connection error: count it and reconnect.
                        *t.codes
                            .entry((kind.into(), "transport error".into()))
                            .or_default() += 1;
                        t.sample(method, kind, "transport", transport);
                        client = None;
                    }
                }
            }
        }));
    }
    for task in tasks {
        task.await.expect("worker");
    }
    let elapsed = started.elapsed();
    let alive = child.try_wait().expect("wait").is_none();
    let rss = peak_rss_kib(pid);
    let _ = child.kill();
    let _ = child.wait();

    let t = tally.lock().unwrap();
    let kinds = ["bytes", "mutated", "adversarial"];
    let mut codes: Vec<&String> = t.codes.keys().map(|(_, c)| c).collect();
    codes.sort();
    codes.dedup();
    println!(
        "{} requests against {} in {:.1} s ({:.0}/s), seed {}",
        args.requests,
        args.database,
        elapsed.as_secs_f64(),
        args.requests as f64 / elapsed.as_secs_f64(),
        args.seed
    );
    println!("\n| status | bytes | mutated | adversarial | total |\n|---|---|---|---|---|");
    for code in &codes {
        let per: Vec<usize> = kinds
            .iter()
            .map(|k| {
                t.codes
                    .get(&(k.to_string(), code.to_string()))
                    .copied()
                    .unwrap_or(0)
            })
            .collect();
        println!(
            "| {code} | {} | {} | {} | {} |",
            per[0],
            per[1],
            per[2],
            per.iter().sum::<usize>()
        );
    }
    println!(
        "\nserver alive at the end: {alive}; peak RSS {:.1} MiB; hangs {}; error log lines {}",
        rss as f64 / 1024.0,
        t.hangs,
        errors.lock().unwrap().len()
    );
    for (method, kind, code, message) in &t.faults {
        println!("fault: {method} ({kind}) → {code}: {message}");
    }
    for line in errors.lock().unwrap().iter().take(5) {
        println!("error log: {line}");
    }
    let faults = t
        .codes
        .iter()
        .filter(|((_, c), _)| c == "UNKNOWN" || c == "INTERNAL" || c.starts_with("code "))
        .count();
    if !alive || t.hangs > 0 || faults > 0 {
        std::process::exit(1);
    }
}
