//! The MariaDB harness on the local server (tests/common/mariadb.rs): a fresh
//! database per test, dropped afterwards, also when the test panics.

mod common;

use common::mariadb::{connect, mariadb_url, MariaDb};
use mysql_async::prelude::*;
use mysql_async::Opts;

async fn exists(url: &str, name: &str) -> bool {
    let mut conn = connect(Opts::from_url(url).unwrap()).await.unwrap();
    let n: Option<i64> = conn
        .exec_first(
            "SELECT COUNT(*) FROM information_schema.schemata WHERE schema_name = ?",
            (name,),
        )
        .await
        .unwrap();
    conn.disconnect().await.unwrap();
    n == Some(1)
}

#[tokio::test]
async fn a_fresh_database_is_usable_and_dropped_afterwards() {
    let Some(server) = mariadb_url().await else {
        return;
    };
    let db = MariaDb::create().await.unwrap();
    assert!(db.name.starts_with("t_"));
    assert!(db.url.ends_with(&format!("/{}", db.name)));
    let mut conn = db.conn().await;
    conn.query_drop("CREATE TABLE docs (id VARCHAR(64) PRIMARY KEY, body JSON NOT NULL)")
        .await
        .unwrap();
    conn.exec_drop(
        "INSERT INTO docs (id, body) VALUES (?, ?)",
        ("a", r#"{"n": 1}"#),
    )
    .await
    .unwrap();
    let n: Option<i64> = conn
        .query_first("SELECT JSON_VALUE(body, '$.n') FROM docs WHERE id = 'a'")
        .await
        .unwrap();
    assert_eq!(n, Some(1));
    conn.disconnect().await.unwrap();
    // The URL names the database.
    let mut by_url = connect(Opts::from_url(&db.url).unwrap()).await.unwrap();
    let current: Option<String> = by_url.query_first("SELECT DATABASE()").await.unwrap();
    assert_eq!(current.as_deref(), Some(db.name.as_str()));
    by_url.disconnect().await.unwrap();

    let name = db.name.clone();
    assert!(exists(&server, &name).await);
    drop(db);
    assert!(!exists(&server, &name).await);
}

#[tokio::test]
async fn the_database_is_dropped_when_its_test_panics() {
    let Some(server) = mariadb_url().await else {
        return;
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    let url = server.clone();
    let failed = tokio::spawn(async move {
        let db = MariaDb::create_at(&url).await;
        tx.send(db.name.clone()).unwrap();
        panic!("a failing test");
    })
    .await;
    assert!(failed.unwrap_err().is_panic());
    let name = rx.await.unwrap();
    assert!(!exists(&server, &name).await, "{name} survived the panic");
}
