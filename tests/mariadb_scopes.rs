//! Row scopes enforced by MariaDB itself: `migrate` turns the policies of
//! the services sharing a collection into views filtered to each scope
//! `WITH CHECK OPTION`, granted per runtime account (nothing on the table),
//! so a direct connection with a runtime account cannot cross scopes either.

mod common;

use common::mariadb::{connect, mariadb_url, MariaDb};
use common::pg_roles::outcome;
use common::*;
use docsidecar::proto::{
    change_event::Kind, save_request, GetRequest, ListCollectionsRequest, ListRequest, SaveRequest,
    WatchRequest,
};
use mysql_async::prelude::*;
use mysql_async::Opts;
use std::path::{Path, PathBuf};
use std::process::Command;
use tonic::Code;

const BIN: &str = env!("CARGO_BIN_EXE_docsidecar");
/// "command denied to user … for table …"
const DENIED: u16 = 1142;
/// "CHECK OPTION failed"
const CHECK_FAILED: u16 = 1369;

fn policy(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!("service = \"{name}\"\nauto_create = false\n{body}"),
    )
    .unwrap();
    path
}

fn scoped(scope: &str) -> String {
    format!("[collections.platform_integrations]\naccess = \"read-write\"\nscope = \"{scope}\"\n")
}

const REPORT: &str =
    "[collections.platform_integrations]\naccess = \"read-only\"\nallow_scans = true\n";

/// The test's database and runtime accounts (dropped, also on a panic).
struct Shared {
    server: String,
    db: MariaDb,
    dir: tempfile::TempDir,
    /// twitch, discord, report: their users (`'user'@'%'`, password `pw-user`).
    users: [String; 3],
}

impl Shared {
    async fn new(server: String) -> Shared {
        let db = MariaDb::create_at(&server).await;
        let u = uuid::Uuid::now_v7().simple().to_string()[20..].to_string();
        let users = ["twitch", "discord", "report"].map(|r| format!("{r}_{u}"));
        let mut admin = db.conn().await;
        for user in &users {
            admin
                .query_drop(format!(
                    "CREATE USER '{user}'@'%' IDENTIFIED BY 'pw-{user}'"
                ))
                .await
                .unwrap();
        }
        admin.disconnect().await.unwrap();
        Shared {
            server,
            db,
            dir: tempfile::tempdir().unwrap(),
            users,
        }
    }

    fn migrate(&self, name: &str, body: &str, user: &str) -> (bool, String) {
        let path = policy(self.dir.path(), name, body);
        outcome(
            Command::new(BIN)
                .args(["migrate", "--grant-to", &format!("'{user}'@'%'")])
                .env_clear()
                .env("MIGRATE_DATABASE_URL", &self.db.url)
                .env("DOCSIDECAR_POLICY", path)
                .output()
                .unwrap(),
        )
    }

    fn url_as(&self, user: &str) -> String {
        let host = self
            .server
            .trim_start_matches("mysql://")
            .split('@')
            .nth(1)
            .unwrap();
        format!("mysql://{user}:pw-{user}@{host}/{}", self.db.name)
    }

    /// A direct connection as `user`.
    async fn connect_as(&self, user: &str) -> mysql_async::Conn {
        connect(Opts::from_url(&self.url_as(user)).unwrap())
            .await
            .unwrap()
    }

    /// The sidecar of service `name`, running as `user`, its reaper quick.
    async fn sidecar(&self, name: &str, user: &str) -> TestServer {
        let path = self.dir.path().join(format!("{name}.toml"));
        TestServer::start_at(
            Backend::Mariadb,
            Some(&self.url_as(user)),
            &[
                "--policy",
                path.to_str().unwrap(),
                "--reap-interval",
                "0.05",
            ],
        )
        .await
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        let (server, users) = (self.server.clone(), self.users.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(mut c) = connect(Opts::from_url(&server).unwrap()).await {
                    for user in users {
                        let _ = c
                            .query_drop(format!("DROP USER IF EXISTS '{user}'@'%'"))
                            .await;
                    }
                    let _ = c.disconnect().await;
                }
            });
        })
        .join();
    }
}

/// What the database says to `sql`: `Ok`, or the server's error code.
async fn attempt(conn: &mut mysql_async::Conn, sql: &str) -> Result<(), u16> {
    match conn.query_drop(sql).await {
        Ok(()) => Ok(()),
        Err(mysql_async::Error::Server(e)) => Err(e.code),
        Err(e) => panic!("{sql}: {e}"),
    }
}

async fn keys(conn: &mut mysql_async::Conn, sql: &str) -> Vec<(String, String)> {
    let rows: Vec<(Vec<u8>, Vec<u8>)> = conn.query(sql).await.unwrap();
    rows.into_iter()
        .map(|(a, b)| (String::from_utf8(a).unwrap(), String::from_utf8(b).unwrap()))
        .collect()
}

fn save(id: &str, n: f64) -> SaveRequest {
    SaveRequest {
        collection: "platform_integrations".into(),
        id: id.into(),
        data: Some(object(vec![("n", num(n))]).into()),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_runtime_account_is_kept_to_its_scope_by_the_database() {
    let Some(server) = mariadb_url().await else {
        return;
    };
    let s = Shared::new(server).await;
    let [twitch, discord, report] = s.users.clone();
    for (name, body, user) in [
        ("twitch", scoped("twitch"), &twitch),
        ("discord", scoped("discord"), &discord),
        ("report", REPORT.to_string(), &report),
    ] {
        let (ok, out) = s.migrate(name, &body, user);
        assert!(ok, "migrate {name}: {out}");
    }
    // Converged: a rerun changes nothing.
    let (ok, out) = s.migrate("twitch", &scoped("twitch"), &twitch);
    assert!(ok, "{out}");
    for change in ["created view", "dropped view", "revoked", "recorded the"] {
        assert!(!out.contains(change), "a rerun changed things: {out}");
    }
    // A writer without a scope on a scoped collection is refused.
    let (ok, out) = s.migrate(
        "rogue",
        "[collections.platform_integrations]\naccess = \"read-write\"\n",
        &report,
    );
    assert!(!ok, "{out}");
    assert!(
        out.contains("every read-write declaration names its scope"),
        "{out}"
    );
    // The refused run left the reporting account's declaration as it was.
    let (ok, out) = s.migrate("report", REPORT, &report);
    assert!(ok && !out.contains("recorded the"), "{out}");

    let a = s.sidecar("twitch", &twitch).await;
    let b = s.sidecar("discord", &discord).await;
    let r = s.sidecar("report", &report).await;
    let (mut ca, mut cb) = (a.client.clone(), b.client.clone());
    let start = ca
        .list(ListRequest {
            collection: "platform_integrations".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .resume_token;
    // The same id in both scopes: two documents.
    ca.save(SaveRequest {
        create_only: true,
        ..save("x", 1.0)
    })
    .await
    .unwrap();
    cb.save(SaveRequest {
        create_only: true,
        ..save("x", 2.0)
    })
    .await
    .unwrap();
    cb.save(save("only-b", 3.0)).await.unwrap();
    let status = ca
        .get(GetRequest {
            collection: "platform_integrations".into(),
            id: "only-b".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let mine = ca
        .list(ListRequest {
            collection: "platform_integrations".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(mine.documents.len(), 1);
    assert_eq!(
        (
            mine.documents[0].id.as_str(),
            mine.documents[0].scope.as_str()
        ),
        ("x", "twitch")
    );
    let listed = r
        .client
        .clone()
        .list(ListRequest {
            collection: "platform_integrations".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let seen: Vec<(&str, &str)> = listed
        .documents
        .iter()
        .map(|d| (d.id.as_str(), d.scope.as_str()))
        .collect();
    assert_eq!(
        seen,
        [("only-b", "discord"), ("x", "discord"), ("x", "twitch")]
    );

    // Each sidecar numbers and reads the changes its feed view shows: A's
    // Watch carries A's change only, the reporting one all three.
    for (client, expected) in [(&mut ca, 1), (&mut r.client.clone(), 3)] {
        let mut events = client
            .watch(WatchRequest {
                collections: vec!["platform_integrations".into()],
                resume_token: start.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let mut seen = Vec::new();
        while seen.len() < expected {
            let e = tokio::time::timeout(std::time::Duration::from_secs(20), events.message())
                .await
                .expect("changes in time")
                .unwrap()
                .unwrap();
            if e.kind() != Kind::Progress {
                seen.push((e.id, e.scope));
            }
        }
        if expected == 1 {
            assert_eq!(seen, [("x".to_string(), "twitch".to_string())]);
            // Nothing of the other scope follows.
            let more = tokio::time::timeout(std::time::Duration::from_secs(2), async {
                loop {
                    match events.message().await {
                        Ok(Some(e)) if e.kind() == Kind::Progress => continue,
                        other => return other,
                    }
                }
            })
            .await;
            assert!(more.is_err(), "another scope's change: {more:?}");
        }
    }

    // Its collection is listed, though its account sees only a view of it.
    let collections = ca
        .list_collections(ListCollectionsRequest {})
        .await
        .unwrap()
        .into_inner()
        .collections;
    assert_eq!(collections, ["platform_integrations"]);

    // A direct connection with a runtime account: its scope's view only.
    let mut direct = s.connect_as(&twitch).await;
    assert_eq!(
        attempt(&mut direct, "SELECT * FROM platform_integrations").await,
        Err(DENIED)
    );
    assert_eq!(
        attempt(&mut direct, "SELECT * FROM `platform_integrations$discord`").await,
        Err(DENIED)
    );
    assert_eq!(
        keys(
            &mut direct,
            "SELECT id, scope FROM `platform_integrations$twitch` ORDER BY id, scope"
        )
        .await,
        [("x".to_string(), "twitch".to_string())]
    );
    for sql in [
        "INSERT INTO `platform_integrations$twitch` (scope, id, rev, data, create_time, update_time)
         VALUES ('discord', 'forged', 'r', '{}', 0, 0)",
        "UPDATE `platform_integrations$twitch` SET scope = 'discord' WHERE id = 'x'",
    ] {
        assert_eq!(attempt(&mut direct, sql).await, Err(CHECK_FAILED), "{sql}");
    }
    // The change feed too: its own changes only, none forged for another.
    assert_eq!(
        attempt(&mut direct, "SELECT * FROM `_changes`").await,
        Err(DENIED)
    );
    let feeds: Vec<String> = direct
        .query(
            "SELECT TABLE_NAME FROM information_schema.TABLES
             WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME LIKE '\\_changes$%'",
        )
        .await
        .unwrap();
    assert_eq!(feeds.len(), 1, "{feeds:?}");
    let feed = &feeds[0];
    assert_eq!(
        keys(
            &mut direct,
            &format!("SELECT DISTINCT collection, scope FROM `{feed}` ORDER BY 1, 2")
        )
        .await,
        [("platform_integrations".to_string(), "twitch".to_string())]
    );
    let forged = format!(
        "INSERT INTO `{feed}` (collection, scope, id, rev, kind, commit_time)
         VALUES ('platform_integrations', 'discord', 'x', 'r', 1, 0)"
    );
    assert_eq!(attempt(&mut direct, &forged).await, Err(CHECK_FAILED));
    direct.disconnect().await.unwrap();
    let mut other = s.connect_as(&discord).await;
    assert_eq!(
        keys(
            &mut other,
            "SELECT id, scope FROM `platform_integrations$discord` ORDER BY id, scope"
        )
        .await,
        [
            ("only-b".to_string(), "discord".to_string()),
            ("x".into(), "discord".into())
        ]
    );
    assert_eq!(
        attempt(&mut other, "SELECT * FROM `platform_integrations$twitch`").await,
        Err(DENIED)
    );
    other.disconnect().await.unwrap();
    // The reporting account reads both scopes from the table and writes nothing.
    let mut reporting = s.connect_as(&report).await;
    let rows = "SELECT id, scope FROM platform_integrations ORDER BY id, scope";
    assert_eq!(keys(&mut reporting, rows).await.len(), 3);
    assert_eq!(
        attempt(&mut reporting, "DELETE FROM platform_integrations").await,
        Err(DENIED)
    );
    reporting.disconnect().await.unwrap();
    // The reaper of a scoped sidecar deletes its expired rows through its view.
    ca.save(SaveRequest {
        expiration: Some(save_request::Expiration::Ttl(prost_types::Duration {
            seconds: 1,
            nanos: 0,
        })),
        ..save("short", 4.0)
    })
    .await
    .unwrap();
    a.clock.advance(2_000_000);
    let mut admin = s.db.conn().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let left: Option<i64> = admin
            .query_first("SELECT COUNT(*) FROM platform_integrations WHERE id = 'short'")
            .await
            .unwrap();
        if left == Some(0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the row was not reaped"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    admin.disconnect().await.unwrap();
    for t in [a, b, r] {
        t.stop().await;
    }

    // A dropped declaration converges: discord reads-only elsewhere, its view goes.
    let (ok, out) = s.migrate(
        "discord",
        "[collections.other_things]\naccess = \"read-write\"\n",
        &discord,
    );
    assert!(ok, "{out}");
    assert!(
        out.contains("dropped view platform_integrations$discord"),
        "{out}"
    );
    let mut other = s.connect_as(&discord).await;
    assert_eq!(
        attempt(&mut other, "SELECT * FROM platform_integrations").await,
        Err(DENIED)
    );
    attempt(&mut other, "SELECT * FROM other_things")
        .await
        .unwrap();
    other.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_sidecar_follows_its_account_onto_the_views() {
    let Some(server) = mariadb_url().await else {
        return;
    };
    let s = Shared::new(server).await;
    let [twitch, discord, _] = s.users.clone();
    // A shared collection without scopes first.
    let plain = "[collections.platform_integrations]\naccess = \"read-write\"\n";
    for (name, user) in [("twitch", &twitch), ("discord", &discord)] {
        let (ok, out) = s.migrate(name, plain, user);
        assert!(ok, "{out}");
    }
    // The new release's sidecar starts before its `migrate` has run.
    policy(s.dir.path(), "twitch", &scoped("twitch"));
    let a = s.sidecar("twitch", &twitch).await;
    let mut ca = a.client.clone();
    ca.save(save("x", 1.0)).await.unwrap();
    // Scoped one service at a time: a warning while the other is not yet.
    let (ok, out) = s.migrate("discord", &scoped("discord"), &discord);
    assert!(ok, "{out}");
    assert!(out.contains("until its policy names a scope"), "{out}");
    let (ok, out) = s.migrate("twitch", &scoped("twitch"), &twitch);
    assert!(ok, "{out}");
    // The table went from under the running sidecar: it follows to its view.
    let got = ca
        .get(GetRequest {
            collection: "platform_integrations".into(),
            id: "x".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.scope, "twitch");
    ca.save(save("y", 2.0)).await.unwrap();
    let mut direct = s.connect_as(&twitch).await;
    assert_eq!(
        attempt(&mut direct, "SELECT * FROM platform_integrations").await,
        Err(DENIED)
    );
    assert_eq!(
        keys(
            &mut direct,
            "SELECT id, scope FROM `platform_integrations$twitch` ORDER BY id"
        )
        .await,
        [
            ("x".to_string(), "twitch".to_string()),
            ("y".into(), "twitch".into())
        ]
    );
    direct.disconnect().await.unwrap();
    a.stop().await;
}

/// Declared indexes through the binary: `migrate` creates them once (a rerun
/// changes nothing), a scoped sidecar's queries are served through its
/// view, and an index no policy declares any more is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_builds_the_declared_indexes_once_and_drops_the_undeclared() {
    use docsidecar::proto::{filter::Operator, order::Direction, Filter, Order, QueryRequest};
    let Some(server) = mariadb_url().await else {
        return;
    };
    let s = Shared::new(server).await;
    let [twitch, discord, _] = s.users.clone();
    let indexed = |scope: &str, indexes: &str| format!("{}indexes = {indexes}\n", scoped(scope));
    let twitch_policy = indexed("twitch", r#"[["n"], ["k", "n desc"]]"#);
    let (ok, out) = s.migrate("twitch", &twitch_policy, &twitch);
    assert!(ok, "{out}");
    assert_eq!(out.matches("created index").count(), 2, "{out}");
    let (ok, out) = s.migrate("discord", &indexed("discord", r#"[["n"]]"#), &discord);
    assert!(ok && !out.contains("created index"), "{out}");
    let (ok, out) = s.migrate("twitch", &twitch_policy, &twitch);
    assert!(ok, "{out}");
    for change in [
        "created index",
        "dropped index",
        "recorded the",
        "created view",
    ] {
        assert!(!out.contains(change), "a rerun changed things: {out}");
    }

    let a = s.sidecar("twitch", &twitch).await;
    let mut ca = a.client.clone();
    for (id, k, n) in [
        ("a", "x", 1.0),
        ("b", "X", 2.0),
        ("c", "x", 3.0),
        ("d", "é", 4.0),
    ] {
        let mut doc = save(id, n);
        if let Some(data) = doc.data.as_mut() {
            data.fields.insert("k".into(), string(k));
        }
        ca.save(doc).await.unwrap();
    }
    let request = QueryRequest {
        collection: "platform_integrations".into(),
        filters: vec![Filter {
            field: "k".into(),
            op: Operator::Equal.into(),
            value: Some(string("x")),
        }],
        order_by: vec![Order {
            field: "n".into(),
            direction: Direction::Descending.into(),
        }],
        ..Default::default()
    };
    let found = ca.query(request).await.unwrap().into_inner();
    let ids: Vec<&str> = found.documents.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["c", "a"]);

    // twitch no longer declares ["k", "n desc"]: dropped; ["n"] stays (and
    // discord declares it too).
    let (ok, out) = s.migrate("twitch", &indexed("twitch", r#"[["n"]]"#), &twitch);
    assert!(ok, "{out}");
    assert_eq!(out.matches("dropped index").count(), 1, "{out}");
    let (ok, out) = s.migrate("twitch", &scoped("twitch"), &twitch);
    assert!(
        ok && !out.contains("dropped index"),
        "discord still declares it: {out}"
    );
    let (ok, out) = s.migrate("discord", &scoped("discord"), &discord);
    assert!(ok && out.contains("dropped index"), "{out}");
}
