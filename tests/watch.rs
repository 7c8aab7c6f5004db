//! The change feed's checker: writers through several sidecars on one
//! database do random conditional saves, updates, deletes and
//! multi-collection Writes for a bounded time, while watchers connect,
//! disconnect and resume from their last token, and a sidecar is restarted
//! mid-run. At the end every watcher's log, its resumed pieces joined, must
//! be the committed history: every acknowledged change once, in commit order
//! per document, nothing that was not committed.

mod common;

use common::*;
use docsidecar::proto::{
    change_event::Kind, field_transform, mutation::Op, DeleteRequest, FieldTransform, GetRequest,
    ListRequest, Mutation, SaveRequest, UpdateRequest, WatchRequest, WriteRequest,
};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

const COLLECTIONS: [&str; 2] = ["ledger", "audit"];
const DOCS: usize = 8;

/// What the writers know for sure: each acknowledged change of a document,
/// with the rev it replaced (conditional writes: a chain per document).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Change {
    collection: String,
    id: String,
    kind: Kind,
    rev: String,
}

#[derive(Default)]
struct History {
    /// Acknowledged changes, each with the rev it was conditional on
    /// (`None`: the document was absent).
    acked: Vec<(Change, Option<String>)>,
    /// Calls whose outcome is unknown (failed after reaching the server).
    unknown: usize,
}

/// The live sidecars' clients; a restart swaps one.
type Sidecars = Arc<RwLock<Vec<Client>>>;

fn pick(sidecars: &Sidecars, n: u64) -> Client {
    let all = sidecars.read().unwrap();
    all[(n as usize) % all.len()].clone()
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

async fn current(c: &mut Client, collection: &str, id: &str) -> Option<String> {
    c.get(GetRequest {
        collection: collection.into(),
        id: id.into(),
        ..Default::default()
    })
    .await
    .ok()
    .map(|d| d.into_inner().rev)
}

/// One writer: conditional changes of random documents until `until`.
async fn writer(seed: u64, sidecars: Sidecars, history: Arc<Mutex<History>>, until: Instant) {
    let mut rng = Rng(seed);
    while Instant::now() < until {
        let mut c = pick(&sidecars, rng.below(100));
        let collection = COLLECTIONS[rng.below(2) as usize];
        let id = format!("d{}", rng.below(DOCS as u64));
        let prev = current(&mut c, collection, &id).await;
        let expected = prev.clone().unwrap_or_default();
        let op = rng.below(10);
        let outcome: Result<Vec<(Change, Option<String>)>, tonic::Status> = match (op, &prev) {
            (0..=1, Some(rev)) => c
                .delete(DeleteRequest {
                    collection: collection.into(),
                    id: id.clone(),
                    expected_rev: rev.clone(),
                    ..Default::default()
                })
                .await
                .map(|_| {
                    let change = Change {
                        collection: collection.into(),
                        id: id.clone(),
                        kind: Kind::Deleted,
                        rev: rev.clone(),
                    };
                    vec![(change, prev.clone())]
                }),
            (2..=4, Some(rev)) => c
                .update(UpdateRequest {
                    collection: collection.into(),
                    id: id.clone(),
                    expected_rev: rev.clone(),
                    transforms: vec![FieldTransform {
                        field: "n".into(),
                        op: Some(field_transform::Op::Increment(num(1.0))),
                    }],
                    ..Default::default()
                })
                .await
                .map(|r| {
                    let change = Change {
                        collection: collection.into(),
                        id: id.clone(),
                        kind: Kind::Saved,
                        rev: r.into_inner().rev,
                    };
                    vec![(change, prev.clone())]
                }),
            (5..=6, _) => {
                // Two collections, one transaction.
                let other = COLLECTIONS
                    [(COLLECTIONS.iter().position(|c| *c == collection).unwrap() + 1) % 2];
                let other_prev = current(&mut c, other, &id).await;
                let save = |col: &str, rev: &Option<String>| Mutation {
                    op: Some(Op::Save(SaveRequest {
                        collection: col.into(),
                        id: id.clone(),
                        data: Some(object(vec![("n", num(0.0))]).into()),
                        expected_rev: rev.clone().unwrap_or_default(),
                        create_only: rev.is_none(),
                        ..Default::default()
                    })),
                };
                c.write(WriteRequest {
                    mutations: vec![save(collection, &prev), save(other, &other_prev)],
                })
                .await
                .map(|r| {
                    let results = r.into_inner().results;
                    vec![
                        (
                            Change {
                                collection: collection.into(),
                                id: id.clone(),
                                kind: Kind::Saved,
                                rev: results[0].rev.clone(),
                            },
                            prev.clone(),
                        ),
                        (
                            Change {
                                collection: other.into(),
                                id: id.clone(),
                                kind: Kind::Saved,
                                rev: results[1].rev.clone(),
                            },
                            other_prev,
                        ),
                    ]
                })
            }
            _ => c
                .save(SaveRequest {
                    collection: collection.into(),
                    id: id.clone(),
                    data: Some(object(vec![("n", num(0.0))]).into()),
                    expected_rev: expected,
                    create_only: prev.is_none(),
                    ..Default::default()
                })
                .await
                .map(|r| {
                    let change = Change {
                        collection: collection.into(),
                        id: id.clone(),
                        kind: Kind::Saved,
                        rev: r.into_inner().rev,
                    };
                    vec![(change, prev.clone())]
                }),
        };
        let mut h = history.lock().unwrap();
        match outcome {
            Ok(changes) => h.acked.extend(changes),
            // Lost races are answers: nothing was written.
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::Aborted | tonic::Code::AlreadyExists | tonic::Code::NotFound
                ) => {}
            Err(_) => h.unknown += 1,
        }
    }
}

/// One watcher: streams from its last token through random sidecars,
/// dropping and resuming the stream now and then, until `until`; then
/// catches up until it has seen every acknowledged change.
async fn watcher(
    seed: u64,
    sidecars: Sidecars,
    start: String,
    until: Instant,
    history: Arc<Mutex<History>>,
) -> Vec<(Change, u64)> {
    let mut rng = Rng(seed);
    let mut token = start;
    let mut log: Vec<(Change, u64)> = Vec::new();
    let mut seq = 0u64;
    let mut pieces = 0;
    loop {
        let catching_up = Instant::now() >= until;
        let mut c = pick(&sidecars, rng.below(100));
        let stream = c
            .watch(WatchRequest {
                collections: COLLECTIONS.iter().map(|s| s.to_string()).collect(),
                resume_token: token.clone(),
                ..Default::default()
            })
            .await;
        let Ok(stream) = stream else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        pieces += 1;
        let mut stream = stream.into_inner();
        let piece_ends = Instant::now()
            + Duration::from_millis(if catching_up {
                3000
            } else {
                100 + rng.below(900)
            });
        loop {
            let left = piece_ends.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, stream.message()).await {
                Ok(Ok(Some(e))) => {
                    token = e.resume_token.clone();
                    if e.kind() == Kind::Progress {
                        continue;
                    }
                    seq += 1;
                    let kind = e.kind();
                    log.push((
                        Change {
                            collection: e.collection,
                            id: e.id,
                            kind,
                            rev: e.rev,
                        },
                        seq,
                    ));
                }
                // Ended (a restart, a deadline), or time to drop it: resume.
                _ => break,
            }
        }
        if catching_up {
            let h = history.lock().unwrap();
            let seen: HashSet<&Change> = log.iter().map(|(c, _)| c).collect();
            if h.acked.iter().all(|(c, _)| seen.contains(c)) {
                println!("watcher {seed}: {} events in {pieces} pieces", log.len());
                return log;
            }
            if Instant::now() > until + Duration::from_secs(60) {
                panic!("watcher {seed} did not see every acknowledged change within a minute");
            }
        }
    }
}

/// Checks a watcher's log against the history.
fn check(log: &[(Change, u64)], history: &History) {
    // Exactly once.
    let mut counts: HashMap<&Change, usize> = HashMap::new();
    for (c, _) in log {
        *counts.entry(c).or_default() += 1;
    }
    let dup: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dup.is_empty(), "delivered twice: {dup:?}");
    let acked: HashSet<&Change> = history.acked.iter().map(|(c, _)| c).collect();
    // Everything committed, and nothing else (but calls of unknown outcome).
    for c in &acked {
        assert!(
            counts.contains_key(c),
            "acknowledged, never delivered: {c:?}"
        );
    }
    let extra = counts.keys().filter(|c| !acked.contains(*c)).count();
    assert!(
        extra <= history.unknown,
        "{extra} events of no acknowledged write, {} unknown outcomes",
        history.unknown
    );
    // In commit order per document: a change comes after the one it replaced.
    let at: HashMap<(&str, &str, &str), u64> = log
        .iter()
        .filter(|(c, _)| c.kind == Kind::Saved)
        .map(|(c, n)| ((c.collection.as_str(), c.id.as_str(), c.rev.as_str()), *n))
        .collect();
    for (change, prev) in &history.acked {
        let Some(prev) = prev else { continue };
        let mine = log
            .iter()
            .find(|(c, _)| c == change)
            .map(|(_, n)| *n)
            .unwrap();
        let before = at[&(
            change.collection.as_str(),
            change.id.as_str(),
            prev.as_str(),
        )];
        assert!(
            before < mine,
            "{change:?} delivered before the change it replaced ({prev})"
        );
    }
}

async fn run(backend: Backend, url: Option<&str>, extra: Vec<String>, sidecars: usize) {
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let mut servers = Vec::new();
    for _ in 0..sidecars {
        servers.push(TestServer::start_at(backend, url, &extra).await);
    }
    let clients: Sidecars = Arc::new(RwLock::new(
        servers.iter().map(|s| s.client.clone()).collect(),
    ));
    // Watchers start before any write: the whole history is theirs to see.
    let mut first = clients.read().unwrap()[0].clone();
    let start = first
        .list(ListRequest {
            collection: "ledger".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .resume_token;
    let history = Arc::new(Mutex::new(History::default()));
    let run_for = Duration::from_secs(12);
    let until = Instant::now() + run_for;
    let mut tasks = Vec::new();
    for w in 0..6 {
        tasks.push(tokio::spawn(writer(
            100 + w,
            clients.clone(),
            history.clone(),
            until,
        )));
    }
    let mut watchers = Vec::new();
    for w in 0..3 {
        watchers.push(tokio::spawn(watcher(
            w,
            clients.clone(),
            start.clone(),
            until,
            history.clone(),
        )));
    }
    // Mid-run, the last sidecar restarts on the same database.
    tokio::time::sleep(run_for / 2).await;
    let old = servers.pop().unwrap();
    old.stop().await;
    let restarted = TestServer::start_at(backend, url, &extra).await;
    clients.write().unwrap()[sidecars - 1] = restarted.client.clone();
    servers.push(restarted);
    println!("{backend:?}: a sidecar restarted");
    for t in tasks {
        t.await.unwrap();
    }
    let history_now = Arc::clone(&history);
    let mut logs = Vec::new();
    for w in watchers {
        logs.push(w.await.unwrap());
    }
    let h = history_now.lock().unwrap();
    for log in &logs {
        check(log, &h);
    }
    println!(
        "{backend:?}: {} sidecar(s), {} acknowledged changes ({} of unknown outcome), {} events checked over {} watchers; 0 gaps, 0 duplicates",
        sidecars,
        h.acked.len(),
        h.unknown,
        logs.iter().map(Vec::len).sum::<usize>(),
        logs.len()
    );
    assert!(
        h.acked.len() > 100,
        "too little load to check: {}",
        h.acked.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_feed_is_the_committed_history_on_postgres_with_two_sidecars() {
    let Some(url) = postgres_url().await else {
        return;
    };
    let schema = format!("w_{}", uuid::Uuid::now_v7().simple());
    run(
        Backend::Postgres,
        Some(&url),
        vec![
            "--schema".into(),
            schema.clone(),
            "--watch-poll".into(),
            "0.2".into(),
        ],
        2,
    )
    .await;
    let admin = pg_connect(&url).await;
    admin
        .batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_feed_is_the_committed_history_on_sqlite_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("feed.db").display());
    run(Backend::Sqlite, Some(&url), vec![], 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_feed_is_the_committed_history_on_mariadb_with_two_sidecars() {
    let Some(db) = mariadb::MariaDb::create().await else {
        return;
    };
    run(
        Backend::Mariadb,
        Some(&db.url),
        vec!["--watch-poll".into(), "0.2".into()],
        2,
    )
    .await;
}
