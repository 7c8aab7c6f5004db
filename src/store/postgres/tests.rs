//! Against a real server: `DOCSIDECAR_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`). Each test works in a fresh schema
//! and drops it. Without a server they are skipped, unless
//! `DOCSIDECAR_REQUIRE_DB=1`. The document semantics are tested once for every
//! store in `tests/behaviour.rs`; these are the PostgreSQL-specific cases.

use super::ddl::qualified_table;
use super::*;
use crate::store::testing::{self, save, Calls};
use std::sync::Arc;
use std::time::Instant;
use tokio_postgres::NoTls;

const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

pub(super) fn url() -> String {
    std::env::var("DOCSIDECAR_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_URL.into())
}

/// Drops the test's schema, also when the test panics.
pub(super) struct SchemaGuard {
    pub(super) name: String,
}

impl Drop for SchemaGuard {
    fn drop(&mut self) {
        let name = self.name.clone();
        testing::clean_up(move || async move {
            if let Ok((client, connection)) = tokio_postgres::connect(&url(), NoTls).await {
                tokio::spawn(connection);
                let sql =
                    format!("SET lock_timeout = '5s'; DROP SCHEMA IF EXISTS \"{name}\" CASCADE");
                let _ = client.batch_execute(&sql).await;
            }
        });
    }
}

/// Fields drop in order: the admin session and the pool end before the schema goes.
struct Ctx {
    admin: tokio_postgres::Client,
    store: PostgresStore,
    schema: String,
    _guard: SchemaGuard,
}

pub(super) async fn admin() -> Option<tokio_postgres::Client> {
    let (client, connection) =
        testing::reach("PostgreSQL", tokio_postgres::connect(&url(), NoTls)).await?;
    tokio::spawn(connection);
    Some(client)
}

async fn setup(adjust: impl FnOnce(&mut PgTarget)) -> Option<Ctx> {
    let admin = admin().await?;
    let schema = format!("t_{}", uuid::Uuid::now_v7().simple());
    let guard = SchemaGuard {
        name: schema.clone(),
    };
    let mut cfg: tokio_postgres::Config = url().parse().expect("test URL");
    // Tells this test's sessions apart in pg_stat_activity.
    cfg.application_name(&schema);
    let mut target = PgTarget {
        schema: schema.clone(),
        pool_size: 8,
        acquire_timeout: Duration::from_secs(10),
        max_retries: 1,
        retry_delay: Duration::from_millis(10),
        ..PgTarget::new(cfg)
    };
    adjust(&mut target);
    let store = PostgresStore::connect(&target, &Tasks::new(), Clock::default())
        .await
        .expect("connect");
    Some(Ctx {
        admin,
        store,
        schema,
        _guard: guard,
    })
}

fn delete(collection: &str, id: &str) -> DeleteOp {
    DeleteOp {
        key: Key::new(collection, "", id),
        expected_rev: None,
        allow_missing: false,
    }
}

fn kind(e: &StoreError) -> String {
    match e {
        StoreError::NotFound { .. } => "NotFound".into(),
        StoreError::AlreadyExists { .. } => "AlreadyExists".into(),
        StoreError::RevMismatch { actual, .. } => {
            format!("RevMismatch(actual: {})", actual.is_some())
        }
        StoreError::InMutation { index, source } => {
            format!("mutation {index}: {}", kind(source))
        }
        other => format!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_round_trip_and_keep_their_create_time() {
    let Some(ctx) = setup(|_| {}).await else {
        return;
    };
    let s = &ctx.store;
    let first = s
        .save_doc(save("docs", "x", r#"{"a": [1, {"b": "ü"}], "n": 1.5}"#))
        .await
        .unwrap();
    assert!(first.created);
    let doc = s.get_doc("docs", "x").await.unwrap();
    assert_eq!(doc.rev, first.document.rev);
    assert_eq!(doc.create_time, first.document.update_time);
    let data: serde_json::Value = serde_json::from_str(&doc.data).unwrap();
    assert_eq!(data, serde_json::json!({"a": [1, {"b": "ü"}], "n": 1.5}));

    tokio::time::sleep(Duration::from_millis(2)).await;
    let second = s.save_doc(save("docs", "x", "{}")).await.unwrap();
    assert!(!second.created);
    assert_ne!(second.document.rev, first.document.rev);
    let doc = s.get_doc("docs", "x").await.unwrap();
    assert_eq!(doc.create_time, first.document.update_time);
    assert_eq!(doc.update_time, second.document.update_time);
    assert!(doc.update_time > doc.create_time);

    // Ids sort by bytes.
    for id in ["b", "B", "é", "a"] {
        s.save_doc(save("docs", id, "{}")).await.unwrap();
    }
    let page = s.list_docs("docs", 10).await.unwrap();
    let ids: Vec<&str> = page.documents.iter().map(|d| d.key.id.as_str()).collect();
    assert_eq!(ids, ["B", "a", "b", "x", "é"]);
    assert!(!page.more);

    // A table in the schema that is not a collection name is not listed.
    ctx.admin
        .batch_execute(&format!(
            "CREATE TABLE \"{}\".\"Not_A_Collection\" (x int)",
            ctx.schema
        ))
        .await
        .unwrap();
    assert_eq!(s.list_collections().await.unwrap(), ["docs"]);

    // jsonb cannot hold \u0000: a clear error, not a panic.
    let err = s
        .save_doc(save("docs", "nul", r#"{"s": "\u0000"}"#))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Internal(_)), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_writes_leave_no_trace_not_even_a_table() {
    let Some(ctx) = setup(|_| {}).await else {
        return;
    };
    let s = &ctx.store;
    let err = s
        .write(vec![
            Mutation::Save(save("alpha", "a", "{}")),
            Mutation::Save(save("ghost", "x", "{}")),
            Mutation::Delete(delete("alpha", "missing")),
        ])
        .await
        .unwrap_err();
    assert_eq!(kind(&err), "mutation 2: NotFound");
    assert!(err.to_string().starts_with("mutation 2: "), "{err}");
    assert!(matches!(
        s.get_doc("alpha", "a").await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(s.list_collections().await.unwrap().is_empty());

    let mut conditional = save("beta", "a", "{}");
    conditional.expected_rev = Some("r1".into());
    assert_eq!(
        kind(&s.save_doc(conditional).await.unwrap_err()),
        "RevMismatch(actual: false)"
    );
    assert!(s.list_collections().await.unwrap().is_empty());

    testing::one_write_spans_collections(s, r#"{"v": 1}"#, r#"{"v": 2}"#).await;

    // A table dropped behind the store's back (its cache says it exists) is recreated.
    ctx.admin
        .batch_execute(&format!("DROP TABLE \"{}\".\"alpha\"", ctx.schema))
        .await
        .unwrap();
    let results = s
        .write(vec![Mutation::Save(save("alpha", "z", "{}"))])
        .await
        .unwrap();
    assert!(matches!(&results[0], Written::Saved(s) if s.created));
    assert_eq!(s.list_collections().await.unwrap(), ["alpha", "beta"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_first_writes_create_each_table_once() {
    let Some(ctx) = setup(|_| {}).await else {
        return;
    };
    let store = Arc::new(ctx.store);
    let started = Instant::now();
    let mut handles = Vec::new();
    for i in 0..20 {
        let store = store.clone();
        handles.push(tokio::spawn(async move {
            let saved = store.save_doc(save("race", &format!("d{i}"), "{}")).await?;
            assert!(saved.created);
            let written = store
                .write(vec![
                    Mutation::Save(save("race_two", &format!("d{i}"), "{}")),
                    Mutation::Save(save("race_three", &format!("d{i}"), "{}")),
                ])
                .await?;
            assert!(written
                .iter()
                .all(|w| matches!(w, Written::Saved(s) if s.created)));
            Ok::<_, StoreError>(())
        }));
    }
    for h in handles {
        h.await.unwrap().unwrap();
    }
    for collection in ["race", "race_two", "race_three"] {
        assert_eq!(
            store
                .list_docs(collection, 100)
                .await
                .unwrap()
                .documents
                .len(),
            20
        );
    }
    assert_eq!(
        store.list_collections().await.unwrap(),
        ["race", "race_three", "race_two"]
    );
    println!(
        "20 racing tasks created 3 tables in {:?}",
        started.elapsed()
    );
    drop(store);
    drop(ctx.admin);
}

/// Waits until `n` sessions of this test's store are blocked on a lock.
async fn wait_for_waiting(admin: &tokio_postgres::Client, application: &str, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let waiting: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND wait_event_type = 'Lock'",
                &[&application],
            )
            .await
            .unwrap()
            .get(0);
        if waiting == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "expected {n} blocked session(s), saw {waiting}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_call_cancels_its_query_and_frees_the_pool() {
    let Some(ctx) = setup(|o| {
        o.pool_size = 1;
        o.acquire_timeout = Duration::from_millis(300);
    })
    .await
    else {
        return;
    };
    let Ctx {
        admin,
        store,
        schema,
        _guard,
    } = ctx;
    store.save_doc(save("locked", "a", "{}")).await.unwrap();
    // A second session holds the lock; `admin` watches pg_stat_activity.
    let Some(mut locker) = super::tests::admin().await else {
        return;
    };
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute(&format!(
        "LOCK TABLE \"{schema}\".\"locked\" IN ACCESS EXCLUSIVE MODE"
    ))
    .await
    .unwrap();

    let store = Arc::new(store);
    let blocked = {
        let store = store.clone();
        tokio::spawn(async move { store.get_doc("locked", "a").await })
    };
    wait_for_waiting(&admin, &schema, 1).await;

    // The only pooled connection is busy: the database still answers on the
    // health connection (busy is not down), while a call that needs the pool
    // gets UNAVAILABLE after the acquire timeout.
    store
        .ping()
        .await
        .expect("a busy pool does not fail the health probe");
    let started = Instant::now();
    let err = store.get_doc("other", "a").await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Unavailable { reason: Unavailable::PoolExhausted, message } if message.contains("no PostgreSQL connection became free")),
        "{err:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    // The deadline passes: the future is dropped and its query cancelled on
    // the server while the lock is still held.
    let started = Instant::now();
    blocked.abort();
    assert!(blocked.await.unwrap_err().is_cancelled());
    wait_for_waiting(&admin, &schema, 0).await;
    println!(
        "abandoned query gone from the server after {:?}",
        started.elapsed()
    );

    // Its connection was discarded, so the pool's slot is free again.
    store.ping().await.unwrap();
    lock.rollback().await.unwrap();
    assert_eq!(store.get_doc("locked", "a").await.unwrap().key.id, "a");
    drop(locker);
    drop(store);
    drop(admin);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_auto_create_the_schema_and_tables_come_from_migrate() {
    let Some(ctx) = setup(|_| {}).await else {
        return;
    };
    // A fresh schema: the dev sidecar above created it; start over without it.
    ctx.admin
        .batch_execute(&format!("DROP SCHEMA \"{}\" CASCADE", ctx.schema))
        .await
        .unwrap();
    let mut cfg: tokio_postgres::Config = url().parse().unwrap();
    cfg.application_name(&ctx.schema);
    let target = PgTarget {
        schema: ctx.schema.clone(),
        auto_create: false,
        max_retries: 1,
        ..PgTarget::new(cfg)
    };
    // Not migrated: the sidecar refuses to start and says what to run.
    let err = PostgresStore::connect(&target, &Tasks::new(), Clock::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Precondition { precondition: Precondition::TableMissing, message } if message.contains("docsidecar migrate")),
        "{err:?}"
    );

    let plan = migrate::MigratePlan {
        collections: [("docs".to_string(), Grant::ReadWrite)].into(),
        ..Default::default()
    };
    migrate::migrate(&target, &plan).await.unwrap();
    let s = PostgresStore::connect(&target, &Tasks::new(), Clock::default())
        .await
        .unwrap();
    // An undeclared collection has no table: reads see nothing, writes say
    // to run migrate.
    assert!(matches!(
        s.get_doc("other", "a").await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(s.list_docs("other", 10).await.unwrap().documents.is_empty());
    let batch = BatchGetOp {
        collection: "other".into(),
        scope: String::new(),
        ids: vec!["a".into()],
    };
    let found = s.batch_get(&batch, Budget::unlimited()).await.unwrap();
    assert_eq!((found.documents.len(), found.looked_up), (0, 1));
    let err = s.save_doc(save("other", "a", "{}")).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Precondition { precondition: Precondition::TableMissing, message } if message.contains("docsidecar migrate")),
        "{err:?}"
    );
    let err = s
        .write(vec![Mutation::Save(save("other", "a", "{}"))])
        .await
        .unwrap_err();
    assert!(err.to_string().starts_with("mutation 0: "), "{err}");
    assert!(err.to_string().contains("docsidecar migrate"), "{err}");

    assert!(s.save_doc(save("docs", "a", "{}")).await.unwrap().created);
    assert_eq!(s.list_collections().await.unwrap(), ["docs"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_store_reaps() {
    let Some(ctx) = setup(|_| {}).await else {
        return;
    };
    crate::store::conformance::the_reaper_deletes_expired_rows_in_batches(
        &ctx.store,
        &ctx.store.clock,
    )
    .await;
}

#[tokio::test]
async fn an_unreachable_server_is_unavailable_without_leaking_the_password() {
    let cfg: tokio_postgres::Config = "postgres://app:hunter2@127.0.0.1:1/db".parse().unwrap();
    let started = Instant::now();
    let target = PgTarget {
        pool_size: 2,
        acquire_timeout: Duration::from_secs(2),
        max_retries: 3,
        retry_delay: Duration::from_millis(20),
        ..PgTarget::new(cfg)
    };
    let err = PostgresStore::connect(&target, &Tasks::new(), Clock::default())
        .await
        .unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
    assert!(message.contains("app@127.0.0.1:1/db"), "{message}");
    assert!(message.contains("3 attempt"), "{message}");
    assert!(!message.contains("hunter2"), "{message}");
    // 20 ms, then 40 ms between the three attempts.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn names_are_checked_before_they_reach_sql() {
    let target = PgTarget {
        schema: "Robert\"; DROP TABLE x; --".into(),
        max_retries: 1,
        retry_delay: Duration::from_millis(10),
        ..PgTarget::new(tokio_postgres::Config::new())
    };
    let err = PostgresStore::connect(&target, &Tasks::new(), Clock::default())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Internal(_)), "{err:?}");
    assert!(qualified_table("s", "ok_name").is_ok());
    for bad in ["", "A", "1a", "a-b", "a\"b", &"a".repeat(64)] {
        assert!(qualified_table("s", bad).is_err(), "{bad:?}");
    }
    assert!(qualified_table("s", &"a".repeat(63)).is_ok());
}

/// The PL/pgSQL key function and `store::key` agree byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_function_encodes_as_the_sidecar_does() {
    let Some(ctx) = setup(|_| {}).await else {
        return;
    };
    use serde_json::json;
    let mut values = vec![
        json!(null),
        json!(true),
        json!(false),
        json!(0.0),
        json!(-0.0),
        json!(-1.5),
        json!(1e300),
        json!(-1e-300),
        json!(5e-324),
        json!(123456789.125),
        json!(""),
        json!("é\u{1F600}"),
        json!([]),
        json!([1, "a", [true, null], {"z": 1, "a": {}}]),
        json!({"b": [], "a": 1, "": null, "ä": "x", "B": 2}),
    ];
    // Shortest round-trip doubles of many magnitudes.
    let mut x = 0.1f64;
    for _ in 0..60 {
        values.push(json!(x));
        values.push(json!(-x * 3.7));
        x *= 13.37;
    }
    let sql = format!("SELECT \"{}\".docsidecar_key($1::text::jsonb)", ctx.schema);
    for v in values {
        let key: Vec<u8> = ctx
            .admin
            .query_one(&sql, &[&v.to_string()])
            .await
            .unwrap()
            .get(0);
        assert_eq!(key, crate::store::key::encode(&v), "{v}");
    }
}

/// Numbers every committed change (as the sequencer does) and reads the
/// feed of `collections`.
async fn feed(store: &PostgresStore, collections: &[&str]) -> Vec<changes::ChangeRecord> {
    let mut sequencer = store.pools.dedicated("test sequencer").await.unwrap();
    while store.sequence(&mut sequencer).await.unwrap() > 0 {}
    store
        .changes(&changes::ChangesOp {
            after: 0,
            collections: Some(collections.iter().map(|c| c.to_string()).collect()),
            limit: 10_000,
        })
        .await
        .unwrap()
        .records
}

/// Writes travel pipelined (BEGIN with the first read, each write with the
/// next read, the last write with COMMIT): racing conditional saves of one
/// document still decide on the latest committed row, one at a time. Of
/// tasks saving with the rev they all read, exactly one wins; tasks doing
/// read-modify-write in two-mutation Writes lose no increment; the feed holds
/// one record per successful mutation, in commit order; a Write whose second
/// mutation is ABORTED leaves neither a document nor a change behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_conditional_writes_decide_on_the_latest_row_and_feed_in_commit_order() {
    let Some(ctx) = setup(|_| {}).await else {
        return;
    };
    let store = Arc::new(ctx.store);
    let first = store.save_doc(save("c", "x", r#"{"n":0}"#)).await.unwrap();
    let rev0 = first.document.rev.clone();

    // Everyone read rev0: exactly one save with it wins.
    let mut handles = Vec::new();
    for i in 0..16 {
        let store = store.clone();
        let rev0 = rev0.clone();
        handles.push(tokio::spawn(async move {
            let mut op = save("c", "x", &format!(r#"{{"n":0,"by":{i}}}"#));
            op.expected_rev = Some(rev0);
            store.save_doc(op).await
        }));
    }
    let mut won = 0;
    for h in handles {
        match h.await.unwrap() {
            Ok(saved) => {
                won += 1;
                assert!(!saved.created);
            }
            Err(e) => assert_eq!(kind(&e), "RevMismatch(actual: true)"),
        }
    }
    assert_eq!(won, 1, "exactly one conditional save wins");

    // Read-modify-write increments, each with a log entry in the same Write.
    let tasks = 8;
    let rounds = 5;
    let mut handles = Vec::new();
    for t in 0..tasks {
        let store = store.clone();
        handles.push(tokio::spawn(async move {
            let mut aborted = 0;
            for _ in 0..rounds {
                loop {
                    let doc = store.get_doc("c", "x").await.unwrap();
                    let n = serde_json::from_str::<serde_json::Value>(&doc.data).unwrap()["n"]
                        .as_i64()
                        .unwrap();
                    let mut op = save("c", "x", &format!(r#"{{"n":{}}}"#, n + 1));
                    op.expected_rev = Some(doc.rev);
                    let mut log = save("c_log", &format!("{}", n + 1), &format!(r#"{{"t":{t}}}"#));
                    log.create_only = true;
                    match store
                        .write(vec![Mutation::Save(op), Mutation::Save(log)])
                        .await
                    {
                        Ok(written) => {
                            assert_eq!(written.len(), 2);
                            break;
                        }
                        Err(e) => {
                            assert_eq!(kind(&e), "mutation 0: RevMismatch(actual: true)");
                            aborted += 1;
                        }
                    }
                }
            }
            aborted
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let total = tasks * rounds;
    let doc = store.get_doc("c", "x").await.unwrap();
    assert_eq!(
        doc.data,
        format!(r#"{{"n": {total}}}"#),
        "no increment lost"
    );
    assert_eq!(
        store
            .list_docs("c_log", 1000)
            .await
            .unwrap()
            .documents
            .len(),
        total
    );

    // A Write that fails at its second mutation applies nothing.
    let mut stale = save("c", "x", r#"{"n":-1}"#);
    stale.expected_rev = Some(rev0.clone());
    let e = store
        .write(vec![
            Mutation::Save(save("c_log", "never", "{}")),
            Mutation::Save(stale),
        ])
        .await
        .unwrap_err();
    assert_eq!(kind(&e), "mutation 1: RevMismatch(actual: true)");
    assert!(matches!(
        store.get_doc("c_log", "never").await,
        Err(StoreError::NotFound { .. })
    ));

    // One record per successful mutation, in commit order: the counter
    // climbs by one from record to record, each next to its log entry.
    let records = feed(&store, &["c", "c_log"]).await;
    let ns: Vec<i64> = records
        .iter()
        .filter(|r| r.key.collection == "c")
        .map(|r| {
            let data = &r.document.as_ref().unwrap().data;
            serde_json::from_str::<serde_json::Value>(data).unwrap()["n"]
                .as_i64()
                .unwrap()
        })
        .collect();
    let expected: Vec<i64> = [0, 0].into_iter().chain(1..=total as i64).collect();
    assert_eq!(
        ns, expected,
        "the first save, the one winner, then every increment in order"
    );
    let logs: Vec<&str> = records
        .iter()
        .filter(|r| r.key.collection == "c_log")
        .map(|r| r.key.id.as_str())
        .collect();
    let expected: Vec<String> = (1..=total).map(|n| n.to_string()).collect();
    assert_eq!(logs, expected);
    for pair in records.windows(2) {
        assert!(pair[0].position < pair[1].position);
    }
    // Each increment's two records are adjacent (one transaction).
    for (i, r) in records.iter().enumerate().skip(2) {
        if r.key.collection == "c_log" {
            assert_eq!(records[i - 1].key.collection, "c");
            assert_eq!(records[i - 1].commit_time, r.commit_time);
        }
    }
    drop(store);
    drop(ctx.admin);
}

/// A delete in a collection that has no table is decided before the
/// transaction: a failed read there would abort it, and COMMIT would then
/// silently roll back the Write's other mutations while reporting them done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_in_a_collection_without_a_table_leaves_the_rest_of_the_write_applied() {
    let Some(ctx) = setup(|_| {}).await else {
        return;
    };
    let s = &ctx.store;
    s.save_doc(save("here", "a", "{}")).await.unwrap();
    let gone = || {
        let mut d = delete("nowhere", "x");
        d.allow_missing = true;
        Mutation::Delete(d)
    };
    let written = s
        .write(vec![Mutation::Save(save("here", "b", "{}")), gone()])
        .await
        .unwrap();
    assert!(matches!(written[1], Written::Deleted));
    s.get_doc("here", "b").await.expect("the save is applied");
    // The delete first, then a save that creates the collection.
    s.write(vec![gone(), Mutation::Save(save("nowhere", "y", "{}"))])
        .await
        .unwrap();
    s.get_doc("nowhere", "y").await.unwrap();
    // Alone; and without allow_missing, NOT_FOUND with nothing applied.
    assert_eq!(s.write(vec![gone()]).await.unwrap(), [Written::Deleted]);
    let e = s
        .write(vec![
            Mutation::Save(save("here", "c", "{}")),
            Mutation::Delete(delete("elsewhere", "x")),
        ])
        .await
        .unwrap_err();
    assert_eq!(kind(&e), "mutation 1: NotFound");
    assert!(matches!(
        s.get_doc("here", "c").await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(!s
        .list_collections()
        .await
        .unwrap()
        .contains(&"elsewhere".to_string()));
    drop(ctx.admin);
}
