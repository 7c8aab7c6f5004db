use super::schema::{migrate, Migration, MIGRATIONS};
use super::*;

const NEXT: Migration = Migration {
    version: 99,
    description: "test: an index",
    sql: "CREATE INDEX documents_by_update ON documents (collection, update_time);",
};

fn versions(conn: &Connection) -> Vec<i64> {
    let mut stmt = conn
        .prepare("SELECT version FROM schema_migrations ORDER BY version")
        .unwrap();
    stmt.query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

#[test]
fn an_old_database_is_upgraded_and_keeps_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    let mut conn = Connection::open(&path).unwrap();
    migrate(&mut conn, &MIGRATIONS[..1]).unwrap();
    conn.execute_batch(
        "INSERT INTO collections VALUES ('c', 1);
         INSERT INTO documents VALUES ('c', 'a', 'r1', '{}', 1, 1);",
    )
    .unwrap();

    let mut upgraded = MIGRATIONS.to_vec();
    upgraded.push(NEXT);
    migrate(&mut conn, &upgraded).unwrap();
    let all: Vec<i64> = upgraded.iter().map(|m| m.version).collect();
    assert_eq!(versions(&conn), all);
    // Applying again is a no-op.
    migrate(&mut conn, &upgraded).unwrap();
    assert_eq!(versions(&conn), all);
    let (rev, scope, expire): (String, String, Option<i64>) = conn
        .query_row(
            "SELECT rev, scope, expire_time FROM documents WHERE id = 'a'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!((rev.as_str(), scope.as_str(), expire), ("r1", "", None));
}

fn target(path: std::path::PathBuf) -> SqliteTarget {
    SqliteTarget {
        path: SqlitePath::File(path),
        readers: 2,
        acquire_timeout: Duration::from_secs(5),
        indexes: Default::default(),
        auto_index: true,
    }
}

/// A point read that finds the database locked by another process does not
/// fail on the worker thread: it is retried off the workers, where it may wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_point_read_is_retried_off_the_workers() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&target(dir.path().join("busy.db")), Clock::default())
        .await
        .unwrap();
    // Warm the reader pool, so that the next read takes the inline path.
    store.read_point(|_| Ok(())).await.unwrap();

    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let worker = std::thread::current().id();
    let thread = store
        .read_point(move |_| {
            if counted.fetch_add(1, Ordering::SeqCst) == 0 {
                let busy = rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY);
                return Err(rusqlite::Error::SqliteFailure(busy, None));
            }
            Ok(std::thread::current().id())
        })
        .await
        .unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_ne!(thread, worker, "the retry runs on a blocking thread");

    // Anything else is an answer, not a retry.
    let err = store
        .read_point(|_| -> rusqlite::Result<()> { Err(rusqlite::Error::QueryReturnedNoRows) })
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Internal(_)), "{err:?}");
}

#[test]
fn a_newer_database_is_refused() {
    let mut conn = Connection::open_in_memory().unwrap();
    let mut newer = MIGRATIONS.to_vec();
    newer.push(NEXT);
    migrate(&mut conn, &newer).unwrap();
    let err = migrate(&mut conn, MIGRATIONS).unwrap_err().to_string();
    assert!(err.contains("newer than this docsidecar supports"), "{err}");
}

fn plan(conn: &Connection, sql: &str) -> String {
    let plan: Vec<String> = conn
        .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
        .unwrap()
        .query_map(params!["c", "s", "a", 0, 10], |r| r.get::<_, String>(3))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    plan.join("; ")
}

#[test]
fn list_pages_are_range_scans_of_an_index() {
    let mut conn = Connection::open_in_memory().unwrap();
    migrate(&mut conn, MIGRATIONS).unwrap();
    let one = plan(
        &conn,
        &format!("SELECT {COLUMNS} FROM documents WHERE collection = ?1 AND scope = ?2 AND id > ?3 AND {LIVE} ORDER BY id LIMIT ?5"),
    );
    assert!(one.contains("(collection=? AND scope=? AND id>?)"), "{one}");
    assert!(!one.contains("TEMP B-TREE"), "no sort step: {one}");
    let all = plan(
        &conn,
        &format!("SELECT {COLUMNS} FROM documents WHERE collection = ?1 AND (id, scope) > (?3, ?2) AND {LIVE} ORDER BY id, scope LIMIT ?5"),
    );
    assert!(all.contains("documents_by_id"), "{all}");
    assert!(all.contains("(collection=? AND (id,scope)>(?,?))"), "{all}");
    assert!(!all.contains("TEMP B-TREE"), "no sort step: {all}");
}

#[tokio::test]
async fn the_sqlite_store_reaps() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::default();
    let store = SqliteStore::open(&target(dir.path().join("reap.db")), clock.clone())
        .await
        .unwrap();
    crate::store::conformance::the_reaper_deletes_expired_rows_in_batches(&store, &clock).await;
}

#[test]
fn queries_use_the_declared_indexes() {
    use crate::store::key::encode;
    use crate::store::query::{Condition, Field, Filter, Index, Order, Query};
    let mut conn = Connection::open_in_memory().unwrap();
    migrate(&mut conn, MIGRATIONS).unwrap();
    super::queries::register(&conn).unwrap();
    let indexes = [
        Index::parse(&["status".into()]).unwrap(),
        Index::parse(&["customer.id".into(), "created desc".into()]).unwrap(),
    ];
    for index in &indexes {
        conn.execute_batch(&super::queries::declared_index("orders", index))
            .unwrap();
    }
    // 10k rows in the collection, 1k in another; statistics, as a live
    // database has them.
    conn.execute_batch("INSERT INTO collections VALUES ('orders', 0), ('other', 0)")
        .unwrap();
    {
        let tx = conn.transaction().unwrap();
        for i in 0..11_000 {
            let collection = if i < 10_000 { "orders" } else { "other" };
            let data = format!(
                r#"{{"status": "{}", "customer": {{"id": {}}}, "created": {i}}}"#,
                ["open", "paid", "shipped", "closed", "void"][i % 5],
                i % 1000
            );
            tx.execute(
                "INSERT INTO documents (collection, scope, id, rev, data, create_time, update_time) VALUES (?1, '', ?2, 'r', ?3, 0, 0)",
                params![collection, format!("d{i:05}"), data],
            )
            .unwrap();
        }
        tx.commit().unwrap();
    }
    conn.execute_batch("ANALYZE").unwrap();
    let path = |p: &str| Field::Path(crate::store::FieldPath::parse(p).unwrap());
    let eq = |p: &str, v: serde_json::Value| Filter {
        field: path(p),
        condition: Condition::In(vec![encode(&v)]),
    };
    let query = |filters, order| Query {
        collection: "orders".into(),
        scopes: Scopes::One(String::new()),
        filters,
        order,
        after: None,
        limit: 50,
    };
    let by_status = query(vec![eq("status", serde_json::json!("open"))], vec![]);
    let plan = super::queries::explain(&conn, &by_status);
    assert!(plan.contains("USING INDEX q$orders$"), "{plan}");
    assert!(!plan.contains("SCAN documents"), "{plan}");
    let newest_of_customer = query(
        vec![eq("customer.id", serde_json::json!(42))],
        vec![Order {
            field: path("created"),
            descending: true,
        }],
    );
    let plan = super::queries::explain(&conn, &newest_of_customer);
    assert!(plan.contains("USING INDEX q$orders$"), "{plan}");
    assert!(
        !plan.contains("TEMP B-TREE"),
        "the index gives the order: {plan}"
    );
}

/// A full volume (here: SQLite's page limit) is DISK_FULL, not INTERNAL, and
/// reads go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_reported_and_reads_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&target(dir.path().join("full.db")), Clock::default())
        .await
        .unwrap();
    let save = |id: String, size: usize| {
        Mutation::Save(SaveOp {
            key: Key::new("docs", "", id),
            data: format!("{{\"x\": \"{}\"}}", "y".repeat(size)),
            expected_rev: None,
            create_only: false,
            expiry: Expiry::Never,
            protected: Arc::default(),
        })
    };
    DocumentStore::write(&store, vec![save("kept".into(), 10)])
        .await
        .unwrap();
    let pages: i64 = store
        .with_writer(|conn| Ok(conn.query_row("PRAGMA page_count", [], |r| r.get(0))?))
        .await
        .unwrap();
    store
        .with_writer(move |conn| {
            conn.pragma_update(None, "max_page_count", pages + 4)?;
            Ok(())
        })
        .await
        .unwrap();
    let mut full = None;
    for i in 0..100 {
        if let Err(e) = DocumentStore::write(&store, vec![save(format!("big{i}"), 20_000)]).await {
            full = Some(e.outside_mutation());
            break;
        }
    }
    let err = full.expect("the page limit is reached");
    assert!(
        matches!(err, StoreError::DiskFull(ref m) if m.contains("full")),
        "{err:?}"
    );
    let kept = store.get(&Key::new("docs", "", "kept")).await.unwrap();
    assert_eq!(kept.data, "{\"x\": \"yyyyyyyyyy\"}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_share_commits_and_fail_alone() {
    use crate::store::testing::{save, Calls};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        SqliteStore::open(&target(dir.path().join("g.db")), Clock::default())
            .await
            .unwrap(),
    );
    store.save_doc(save("c", "taken", "{}")).await.unwrap();
    let before = store
        .queue
        .transactions
        .load(std::sync::atomic::Ordering::Relaxed);
    let writes: Vec<_> = (0..64)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                // Every eighth Write fails: create_only on a taken id.
                let id = if i % 8 == 0 {
                    "taken".into()
                } else {
                    format!("d{i}")
                };
                let mut op = save("c", &id, "{}");
                op.create_only = true;
                store.write(vec![Mutation::Save(op)]).await
            })
        })
        .collect();
    let mut failed = 0;
    for w in writes {
        match w.await.unwrap() {
            Ok(written) => assert!(matches!(&written[0], Written::Saved(s) if s.created)),
            Err(e) => {
                assert!(matches!(e, StoreError::InMutation { .. }), "{e:?}");
                failed += 1;
            }
        }
    }
    assert_eq!(failed, 8);
    let transactions = store
        .queue
        .transactions
        .load(std::sync::atomic::Ordering::Relaxed)
        - before;
    assert!(
        transactions < 64,
        "{transactions} transactions for 64 concurrent Writes"
    );
    eprintln!("64 concurrent Writes in {transactions} transactions");
    // Every acknowledged Write is there, and nothing of the failed ones.
    let page = store.list_docs("c", 1000).await.unwrap();
    assert_eq!(page.documents.len(), 1 + 56);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_caller_left_before_its_commit_is_never_applied() {
    use crate::store::testing::{save, Calls};
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(
        SqliteStore::open(&target(dir.path().join("c.db")), Clock::default())
            .await
            .unwrap(),
    );
    // Hold the writer, queue a Write, then give up on it.
    let held = store.writer.clone().lock_owned().await;
    let write = store.write(vec![Mutation::Save(save("c", "late", "{}"))]);
    assert!(
        tokio::time::timeout(Duration::from_millis(100), write)
            .await
            .is_err(),
        "the writer is held"
    );
    drop(held);
    // The next Write commits alone; the abandoned one is not there.
    store.save_doc(save("c", "next", "{}")).await.unwrap();
    let ids: Vec<String> = store
        .list_docs("c", 10)
        .await
        .unwrap()
        .documents
        .into_iter()
        .map(|d| d.key.id)
        .collect();
    assert_eq!(ids, ["next"]);
}

#[test]
fn the_spelled_out_get_selects_the_columns_and_liveness_of_every_read() {
    assert_eq!(
        GET,
        format!("SELECT {COLUMNS} FROM documents WHERE collection = ?1 AND scope = ?2 AND id = ?3 AND {LIVE}")
    );
}
