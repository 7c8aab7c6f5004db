//! Against a real server: `DOCSIDECAR_TEST_MYSQL_URL` (default
//! `mysql://root@127.0.0.1:3306`). Each test works in a fresh database and
//! drops it. Without a server they are skipped, unless
//! `DOCSIDECAR_REQUIRE_DB=1`. The document semantics are tested once for
//! every store in `tests/behaviour.rs`; these are the MySQL-specific cases.

use super::*;
use crate::store::testing::{self, save, Calls};
use mysql_async::{Opts, OptsBuilder};
use std::sync::Arc;
use std::time::Instant;

const DEFAULT_URL: &str = "mysql://root@127.0.0.1:3306";

fn url() -> String {
    std::env::var("DOCSIDECAR_TEST_MYSQL_URL").unwrap_or_else(|_| DEFAULT_URL.into())
}

fn server_opts() -> OptsBuilder {
    OptsBuilder::from_opts(Opts::from_url(&url()).expect("test URL")).prefer_socket(false)
}

/// A fresh database, dropped also when the test panics.
struct Db {
    name: String,
}

impl Drop for Db {
    fn drop(&mut self) {
        let name = self.name.clone();
        testing::clean_up(move || async move {
            if let Ok(mut c) = mysql_async::Conn::new(server_opts()).await {
                let _ = c
                    .query_drop(format!("DROP DATABASE IF EXISTS `{name}`"))
                    .await;
                let _ = c.disconnect().await;
            }
        });
    }
}

/// An admin connection to the test's database.
async fn admin(db: &Db) -> mysql_async::Conn {
    mysql_async::Conn::new(server_opts().db_name(Some(&db.name)))
        .await
        .unwrap()
}

/// A fresh database on the test server, or `None` to skip.
async fn database() -> Option<Db> {
    let mut conn = testing::reach("MariaDB", mysql_async::Conn::new(server_opts())).await?;
    let name = format!("t_{}", uuid::Uuid::now_v7().simple());
    conn.query_drop(format!("CREATE DATABASE `{name}`"))
        .await
        .unwrap();
    let _ = conn.disconnect().await;
    Some(Db { name })
}

fn target(db: &Db) -> MysqlTarget {
    let opts = Opts::from_url(&url()).unwrap();
    let mut t = MysqlTarget::new(
        vec![Host {
            name: opts.ip_or_hostname().to_string(),
            port: opts.tcp_port(),
        }],
        opts.user().unwrap_or("root"),
        &db.name,
    );
    t.password = opts.pass().map(str::to_string);
    t.pool_size = 4;
    t.max_retries = 1;
    t.retry_delay = Duration::from_millis(10);
    t
}

async fn store(db: &Db, clock: Clock) -> MysqlStore {
    MysqlStore::connect(&target(db), &Tasks::new(), clock)
        .await
        .expect("connect")
}

async fn ids(s: &MysqlStore, collection: &str) -> Vec<String> {
    let page = s.list_docs(collection, 100).await.unwrap();
    page.documents.into_iter().map(|d| d.key.id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_keep_their_json_text_and_ids_sort_as_bytes() {
    let Some(db) = database().await else {
        return;
    };
    let s = store(&db, Clock::default()).await;
    // The text the sidecar produced comes back byte for byte: MySQL never
    // reprints numbers (1e300, 5e-324, 0.1, -0.0, a float past 2^53) or
    // reorders keys, and unicode and escapes stay as written.
    let text = r#"{"z":1e300,"a":5e-324,"m":0.1,"neg":-0.0,"big":9007199254740993.0,"u":"é 漢字 🎉 \u0001 \"q\" \\","nested":{"b":[1.5,null,true]}}"#;
    s.save_doc(save("docs", "x", text)).await.unwrap();
    assert_eq!(s.get_doc("docs", "x").await.unwrap().data, text);
    let mut c = admin(&db).await;
    let stored: Option<String> = c
        .query_first("SELECT data FROM docs WHERE id = 'x'")
        .await
        .unwrap();
    assert_eq!(stored.as_deref(), Some(text));
    let values: serde_json::Value = serde_json::from_str(text).unwrap();
    assert_eq!(values["a"].as_f64(), Some(5e-324));

    // Ids are bytes: trailing spaces and case matter, and they sort by byte.
    for id in ["b", "B", "é", "a", "a "] {
        s.save_doc(save("docs", id, "{}")).await.unwrap();
    }
    assert_eq!(ids(&s, "docs").await, ["B", "a", "a ", "b", "x", "é"]);
    assert_ne!(
        s.get_doc("docs", "a").await.unwrap().rev,
        s.get_doc("docs", "a ").await.unwrap().rev
    );

    // Tables outside the catalog are not collections.
    c.query_drop("CREATE TABLE other_app (id INT PRIMARY KEY)")
        .await
        .unwrap();
    assert_eq!(s.list_collections().await.unwrap(), ["docs"]);
    c.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_writes_leave_nothing_behind() {
    let Some(db) = database().await else {
        return;
    };
    let s = store(&db, Clock::default()).await;
    let err = s
        .write(vec![
            Mutation::Save(save("alpha", "a", "{}")),
            Mutation::Save(save("ghost", "x", "{}")),
            Mutation::Delete(DeleteOp {
                key: Key::new("alpha", "", "missing"),
                expected_rev: None,
                allow_missing: false,
            }),
        ])
        .await
        .unwrap_err();
    assert!(err.to_string().starts_with("mutation 2: "), "{err}");
    assert!(matches!(
        s.get_doc("alpha", "a").await,
        Err(StoreError::NotFound { .. })
    ));
    // DDL commits, so the tables may exist, but the catalog says nothing.
    assert!(s.list_collections().await.unwrap().is_empty());

    testing::one_write_spans_collections(&s, r#"{"v":1}"#, r#"{"v":2}"#).await;

    // A table dropped behind the store's back (its cache says it exists) is recreated.
    let mut c = admin(&db).await;
    c.query_drop("DROP TABLE alpha").await.unwrap();
    let saved = s.save_doc(save("alpha", "z", "{}")).await.unwrap();
    assert!(saved.created);
    assert_eq!(s.list_collections().await.unwrap(), ["alpha", "beta"]);
    c.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_rows_are_absent_and_reaped_once_by_concurrent_reapers() {
    let Some(db) = database().await else {
        return;
    };
    let clock = Clock::default();
    let s = Arc::new(store(&db, clock.clone()).await);
    let other = Arc::new(store(&db, clock.clone()).await);
    let mut ops = Vec::new();
    for i in 0..60 {
        let mut op = save("ttl", &format!("d{i:02}"), "{}");
        op.expiry = Expiry::After(60_000_000);
        ops.push(Mutation::Save(op));
    }
    ops.push(Mutation::Save(save("ttl", "forever", "{}")));
    s.write(ops).await.unwrap();
    assert_eq!(ids(&s, "ttl").await.len(), 61);

    // A minute later (the database's clock plus the offset) they are gone to
    // every read, and a create_only write over one succeeds.
    clock.advance(61_000_000);
    assert!(matches!(
        s.get_doc("ttl", "d00").await,
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(ids(&s, "ttl").await, ["forever"]);
    let batch = BatchGetOp {
        collection: "ttl".into(),
        scope: String::new(),
        ids: vec!["d01".into(), "forever".into()],
    };
    let found = s.batch_get(&batch, Budget::unlimited()).await.unwrap();
    assert_eq!(found.documents.len(), 1);
    let mut op = save("ttl", "d00", "{}");
    op.create_only = true;
    assert!(s.save_doc(op).await.unwrap().created);

    // Two stores reap at once, in small batches: each row once.
    let reap = |store: Arc<MysqlStore>| async move {
        let mut total = 0;
        loop {
            let n = store.reap_expired(7).await.unwrap();
            if n == 0 {
                return total;
            }
            total += n;
        }
    };
    let (a, b) = tokio::join!(reap(s.clone()), reap(other.clone()));
    assert_eq!(a + b, 59, "{a} + {b}");
    let mut c = admin(&db).await;
    let left: Option<i64> = c.query_first("SELECT COUNT(*) FROM ttl").await.unwrap();
    assert_eq!(left, Some(2));
    c.disconnect().await.unwrap();
}

/// Waits until `n` of this database's sessions wait for a table lock.
async fn wait_for_waiting(c: &mut mysql_async::Conn, db: &str, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: Option<i64> = c
            .exec_first(
                "SELECT COUNT(*) FROM information_schema.PROCESSLIST
                 WHERE DB = ? AND STATE LIKE 'Waiting for table%'",
                (db,),
            )
            .await
            .unwrap();
        if waiting == Some(n) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "expected {n} waiting session(s), saw {waiting:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_call_is_killed_on_the_server_and_frees_the_pool() {
    let Some(db) = database().await else {
        return;
    };
    let mut t = target(&db);
    t.pool_size = 1;
    t.acquire_timeout = Duration::from_millis(300);
    let s = Arc::new(
        MysqlStore::connect(&t, &Tasks::new(), Clock::default())
            .await
            .unwrap(),
    );
    s.save_doc(save("locked", "a", "{}")).await.unwrap();
    // Another session holds the table; `watch` looks at the process list.
    let mut locker = admin(&db).await;
    let mut watch = admin(&db).await;
    locker.query_drop("LOCK TABLES locked WRITE").await.unwrap();
    let blocked = {
        let s = s.clone();
        tokio::spawn(async move { s.get_doc("locked", "a").await })
    };
    wait_for_waiting(&mut watch, &db.name, 1).await;

    // The only connection is busy: UNAVAILABLE after the acquire timeout.
    let err = s.ping().await.unwrap_err();
    assert!(
        matches!(
            &err,
            StoreError::Unavailable {
                reason: Unavailable::PoolExhausted,
                ..
            }
        ),
        "{err:?}"
    );

    // The deadline passes: the future is dropped and its statement killed
    // on the server while the lock is still held.
    blocked.abort();
    assert!(blocked.await.unwrap_err().is_cancelled());
    wait_for_waiting(&mut watch, &db.name, 0).await;
    // Its connection left the pool, so the slot is free again.
    s.ping().await.unwrap();
    locker.query_drop("UNLOCK TABLES").await.unwrap();
    assert_eq!(s.get_doc("locked", "a").await.unwrap().key.id, "a");
    locker.disconnect().await.unwrap();
    watch.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_auto_create_the_tables_come_from_migrate() {
    let Some(db) = database().await else {
        return;
    };
    let t = MysqlTarget {
        auto_create: false,
        ..target(&db)
    };
    // Not migrated: the sidecar refuses to start and says what to run.
    let err = MysqlStore::connect(&t, &Tasks::new(), Clock::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Precondition { precondition: Precondition::TableMissing, message } if message.contains("docsidecar migrate")),
        "{err:?}"
    );
    let plan = MigratePlan {
        collections: [("docs".to_string(), Grant::ReadWrite)].into(),
        ..Default::default()
    };
    migrate::migrate(&t, &plan).await.unwrap();
    migrate::migrate(&t, &plan).await.unwrap();
    let s = MysqlStore::connect(&t, &Tasks::new(), Clock::default())
        .await
        .unwrap();
    assert!(matches!(
        s.get_doc("other", "a").await,
        Err(StoreError::NotFound { .. })
    ));
    let err = s.save_doc(save("other", "a", "{}")).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Precondition { precondition: Precondition::TableMissing, message } if message.contains("docsidecar migrate")),
        "{err:?}"
    );
    assert!(s.save_doc(save("docs", "a", "{}")).await.unwrap().created);
    assert_eq!(s.list_collections().await.unwrap(), ["docs"]);

    // A database migrated by a newer release is refused, not damaged.
    let mut c = admin(&db).await;
    c.query_drop("INSERT INTO `_migrations` VALUES (99, 'future', 0)")
        .await
        .unwrap();
    c.disconnect().await.unwrap();
    for t in [
        t.clone(),
        MysqlTarget {
            auto_create: true,
            ..t.clone()
        },
    ] {
        let err = MysqlStore::connect(&t, &Tasks::new(), Clock::default())
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("newer than this docsidecar"),
            "{err}"
        );
    }
    let err = migrate::migrate(&t, &plan).await.unwrap_err();
    assert!(
        err.to_string().contains("newer than this docsidecar"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_hosts_are_skipped_and_no_password_leaks() {
    let Some(db) = database().await else {
        return;
    };
    // A closed port first in the list: new connections go to the next host.
    let mut t = target(&db);
    t.hosts.insert(
        0,
        Host {
            name: "127.0.0.1".into(),
            port: 1,
        },
    );
    let s = MysqlStore::connect(&t, &Tasks::new(), Clock::default())
        .await
        .unwrap();
    s.save_doc(save("docs", "a", "{}")).await.unwrap();
    assert_eq!(s.pool_stats().max, 4);

    // Nothing answers: UNAVAILABLE, naming every host, never the password.
    let mut t = target(&db);
    t.hosts = vec![
        Host {
            name: "127.0.0.1".into(),
            port: 1,
        },
        Host {
            name: "127.0.0.1".into(),
            port: 2,
        },
    ];
    t.password = Some("hunter2".into());
    t.max_retries = 2;
    let err = MysqlStore::connect(&t, &Tasks::new(), Clock::default())
        .await
        .unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
    assert!(message.contains("127.0.0.1:1,127.0.0.1:2"), "{message}");
    assert!(message.contains("2 attempt"), "{message}");
    assert!(!message.contains("hunter2"), "{message}");
    assert!(!format!("{t:?} {t}").contains("hunter2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_password_is_used_once_it_works() {
    let Some(db) = database().await else {
        return;
    };
    let user = format!("rot_{}", &uuid::Uuid::now_v7().simple().to_string()[20..]);
    let mut c = admin(&db).await;
    c.query_drop(format!(
        "CREATE USER '{user}'@'%' IDENTIFIED BY 'one'; GRANT ALL ON `{}`.* TO '{user}'@'%'",
        db.name
    ))
    .await
    .unwrap();
    let mut t = target(&db);
    t.user = user.clone();
    t.password = Some("one".into());
    let s = MysqlStore::connect(&t, &Tasks::new(), Clock::default())
        .await
        .unwrap();
    s.save_doc(save("docs", "a", "{}")).await.unwrap();

    // The database changes the password; the file is not updated yet, then
    // it is. A password that does not work is not taken.
    c.query_drop(format!("ALTER USER '{user}'@'%' IDENTIFIED BY 'two'"))
        .await
        .unwrap();
    assert!(!s.pools.rotate("wrong".into()).await);
    assert!(s.pools.rotate("two".into()).await);
    // The old connections retire: even with all of them killed, calls go on
    // through new connections, which log in with the new password.
    let sessions: Vec<u64> = c
        .exec(
            "SELECT ID FROM information_schema.PROCESSLIST WHERE USER = ?",
            (&user,),
        )
        .await
        .unwrap();
    assert!(!sessions.is_empty());
    for id in sessions {
        let _ = c.query_drop(format!("KILL {id}")).await;
    }
    s.save_doc(save("docs", "b", "{}")).await.unwrap();
    assert_eq!(ids(&s, "docs").await, ["a", "b"]);
    c.query_drop(format!("DROP USER '{user}'@'%'"))
        .await
        .unwrap();
    c.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reaper_deletes_expired_rows_in_batches() {
    let Some(db) = database().await else {
        return;
    };
    let clock = Clock::default();
    let s = store(&db, clock.clone()).await;
    crate::store::conformance::the_reaper_deletes_expired_rows_in_batches(&s, &clock).await;
}

mod indexes;
