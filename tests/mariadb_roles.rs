//! Least privilege on MariaDB: `docsidecar migrate` with the admin account
//! creates the tables and grants; the sidecar runs with an account that the
//! database itself confines to the declared collections (checked with a
//! direct connection as that account), and a changed policy converges.

mod common;

use common::mariadb::{connect, mariadb_url, MariaDb};
use common::*;
use docsidecar::proto::{GetRequest, ListCollectionsRequest, SaveRequest};
use mysql_async::prelude::*;
use mysql_async::Opts;
use std::process::Command;
use tonic::Code;

const BIN: &str = env!("CARGO_BIN_EXE_docsidecar");

fn migrate(admin_url: &str, policy: &std::path::Path, account: &str) -> std::process::Output {
    Command::new(BIN)
        .args(["migrate", "--grant-to", account])
        .env_clear()
        .env("MIGRATE_DATABASE_URL", admin_url)
        .env("DOCSIDECAR_POLICY", policy)
        .output()
        .unwrap()
}

#[track_caller]
fn assert_ok(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "migrate failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What the database says to `sql` run as the runtime account: `Ok`, or
/// the server's error code.
async fn attempt(conn: &mut mysql_async::Conn, sql: &str) -> Result<(), u16> {
    match conn.query_drop(sql).await {
        Ok(()) => Ok(()),
        Err(mysql_async::Error::Server(e)) => Err(e.code),
        Err(e) => panic!("{sql}: {e}"),
    }
}

/// Drops the test's account, also when the test panics.
struct Account {
    server: String,
    user: String,
}

impl Drop for Account {
    fn drop(&mut self) {
        let (server, user) = (self.server.clone(), self.user.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(mut c) = connect(Opts::from_url(&server).unwrap()).await {
                    let _ = c
                        .query_drop(format!("DROP USER IF EXISTS '{user}'@'%'"))
                        .await;
                    let _ = c.disconnect().await;
                }
            });
        })
        .join();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runtime_account_is_confined_to_its_tables_by_the_database() {
    let Some(server) = mariadb_url().await else {
        return;
    };
    let db = MariaDb::create_at(&server).await;
    let user = format!("svc_{}", &uuid::Uuid::now_v7().simple().to_string()[20..]);
    let account = Account {
        server: server.clone(),
        user: user.clone(),
    };
    let password = format!("pw-{user}");
    let mut admin = db.conn().await;
    admin
        .query_drop(format!(
            "CREATE USER '{user}'@'%' IDENTIFIED BY '{password}'"
        ))
        .await
        .unwrap();
    let grantee = format!("'{user}'@'%'");

    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "service = \"orders-api\"\nauto_create = false\n[collections.orders]\naccess = \"read-write\"\n[collections.catalog]\naccess = \"read-only\"\n",
    )
    .unwrap();
    // Several replicas' init containers may migrate at once: all succeed.
    let runs: Vec<_> = (0..3)
        .map(|_| {
            let (url, policy, grantee) = (db.url.clone(), policy.clone(), grantee.clone());
            std::thread::spawn(move || migrate(&url, &policy, &grantee))
        })
        .collect();
    for run in runs {
        assert_ok(&run.join().unwrap());
    }
    admin
        .query_drop("CREATE TABLE secrets (id INT PRIMARY KEY, v TEXT); INSERT INTO secrets VALUES (1, 'x')")
        .await
        .unwrap();

    // The sidecar, as the runtime account.
    let host = server
        .trim_start_matches("mysql://")
        .split('@')
        .nth(1)
        .unwrap();
    let runtime_url = format!("mysql://{user}:{password}@{host}/{}", db.name);
    let mut t = TestServer::start_at(
        Backend::Mariadb,
        Some(&runtime_url),
        &["--policy", policy.to_str().unwrap()],
    )
    .await;
    let saved = t
        .client
        .save(SaveRequest {
            collection: "orders".into(),
            id: "o1".into(),
            data: Some(object(vec![("total", num(3.0))]).into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let got = t
        .client
        .get(GetRequest {
            collection: "orders".into(),
            id: "o1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.rev, saved.rev);
    let denied = t
        .client
        .save(SaveRequest {
            collection: "catalog".into(),
            id: "c1".into(),
            data: Some(object(vec![]).into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let collections = t
        .client
        .list_collections(ListCollectionsRequest {})
        .await
        .unwrap()
        .into_inner()
        .collections;
    assert_eq!(collections, ["catalog", "orders"]);

    // A direct connection as the runtime account: DML on its read-write
    // collection, reads of its read-only one, and nothing else.
    let mut rt = connect(Opts::from_url(&runtime_url).unwrap())
        .await
        .unwrap();
    attempt(&mut rt, "SELECT * FROM orders").await.unwrap();
    attempt(&mut rt, "SELECT * FROM catalog").await.unwrap();
    attempt(&mut rt, "SELECT * FROM `_collections`")
        .await
        .unwrap();
    attempt(&mut rt, "DELETE FROM orders WHERE id = 'nothing'")
        .await
        .unwrap();
    const DENIED: u16 = 1142; // "command denied to user … for table …"
    for sql in [
        "CREATE TABLE mine (id INT PRIMARY KEY)",
        "ALTER TABLE orders ADD COLUMN extra INT",
        "DROP TABLE orders",
        "CREATE INDEX by_rev ON orders (rev)",
        "SELECT * FROM secrets",
        "SELECT * FROM `_lock`",
        "INSERT INTO catalog (id, rev, data, create_time, update_time) VALUES ('x', 'r', '{}', 0, 0)",
        "INSERT INTO `_collections` (name, create_time) VALUES ('mine', 0)",
        "UPDATE `_migrations` SET version = 99",
    ] {
        assert_eq!(attempt(&mut rt, sql).await, Err(DENIED), "{sql}");
    }
    // No database-wide privileges either (CREATE DATABASE is 1044).
    assert!(attempt(&mut rt, "CREATE DATABASE another_one")
        .await
        .is_err());
    rt.disconnect().await.unwrap();
    t.stop().await;

    // A changed policy converges: orders read-only, catalog gone, events new.
    std::fs::write(
        &policy,
        "service = \"orders-api\"\nauto_create = false\n[collections.orders]\naccess = \"read-only\"\n[collections.events]\naccess = \"read-write\"\n",
    )
    .unwrap();
    assert_ok(&migrate(&db.url, &policy, &grantee));
    let mut rt = connect(Opts::from_url(&runtime_url).unwrap())
        .await
        .unwrap();
    attempt(&mut rt, "SELECT * FROM orders").await.unwrap();
    attempt(&mut rt, "INSERT INTO events (id, rev, data, create_time, update_time) VALUES ('e', 'r', '{}', 0, 0)")
        .await
        .unwrap();
    for sql in [
        "DELETE FROM orders",
        "SELECT * FROM catalog",
        "ALTER TABLE events ADD COLUMN extra INT",
    ] {
        assert_eq!(attempt(&mut rt, sql).await, Err(DENIED), "{sql}");
    }
    rt.disconnect().await.unwrap();
    admin.disconnect().await.unwrap();
    drop(account);
}
