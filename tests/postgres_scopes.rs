//! Row scopes enforced by PostgreSQL itself: `migrate` turns the policies of
//! the services sharing a collection into row-level security per runtime
//! role, so a direct connection with a runtime role cannot cross scopes
//! either; old tables and the hand-written owner recipe move over.

mod common;

use common::pg_roles::*;
use common::*;
use docsidecar::proto::{change_event::Kind, GetRequest, ListRequest, SaveRequest, WatchRequest};
use std::path::{Path, PathBuf};
use tonic::Code;

fn policy(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, format!("service = \"{name}\"\n{body}")).unwrap();
    path
}

fn scoped(scope: &str) -> String {
    format!("[collections.integrations]\naccess = \"read-write\"\nscope = \"{scope}\"\n")
}

const REPORT: &str = "[collections.integrations]\naccess = \"read-only\"\nallow_scans = true\n";

struct Shared {
    fx: Fixture,
    url: String,
    dir: tempfile::TempDir,
    /// twitch, discord, report: their roles.
    roles: [String; 3],
}

impl Shared {
    async fn new(url: String) -> Shared {
        let u = uuid::Uuid::now_v7().simple().to_string()[20..].to_string();
        let roles = ["twitch", "discord", "report"].map(|r| format!("{r}_{u}"));
        let fx = Fixture {
            admin: pg_connect(&url).await,
            schema: format!("scopes_{u}"),
            roles: roles.to_vec(),
        };
        for role in &roles {
            fx.admin
                .batch_execute(&format!(
                    "CREATE ROLE \"{role}\" LOGIN PASSWORD 'pw-{role}'"
                ))
                .await
                .unwrap();
        }
        Shared {
            fx,
            url,
            dir: tempfile::tempdir().unwrap(),
            roles,
        }
    }

    fn migrate(&self, name: &str, body: &str, role: &str, extra: &[&str]) -> (bool, String) {
        let path = policy(self.dir.path(), name, body);
        let mut args = vec!["--grant-to", role];
        args.extend(extra);
        outcome(migrate_with(&self.url, &self.fx.schema, &path, &args))
    }

    /// A direct connection as `role`, with the schema on the search path.
    async fn connect_as(&self, role: &str) -> tokio_postgres::Client {
        let c = pg_connect(&url_as(&self.url, role, &format!("pw-{role}"))).await;
        c.batch_execute(&format!("SET search_path = \"{}\"", self.fx.schema))
            .await
            .unwrap();
        c
    }

    /// The sidecar of service `name`, running as `role`.
    async fn sidecar(&self, name: &str, role: &str) -> TestServer {
        let path = self.dir.path().join(format!("{name}.toml"));
        let url = url_as(&self.url, role, &format!("pw-{role}"));
        TestServer::start_at(
            Backend::Postgres,
            Some(&url),
            &[
                "--schema",
                &self.fx.schema,
                "--policy",
                path.to_str().unwrap(),
            ],
        )
        .await
    }
}

/// What the database said.
fn said(e: tokio_postgres::Error) -> String {
    e.as_db_error()
        .map_or_else(|| e.to_string(), |db| db.message().to_string())
}

async fn keys(c: &tokio_postgres::Client, sql: &str) -> Vec<(String, String)> {
    c.query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

fn save(id: &str, n: f64) -> SaveRequest {
    SaveRequest {
        collection: "integrations".into(),
        id: id.into(),
        data: Some(object(vec![("n", num(n))]).into()),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_runtime_role_is_kept_to_its_scope_by_the_database() {
    let Some(url) = postgres_url().await else {
        return;
    };
    let s = Shared::new(url).await;
    let [twitch, discord, report] = s.roles.clone();
    for (name, body, role) in [
        ("twitch", scoped("twitch"), &twitch),
        ("discord", scoped("discord"), &discord),
        ("report", REPORT.to_string(), &report),
    ] {
        let (ok, out) = s.migrate(name, &body, role, &[]);
        assert!(ok, "migrate {name}: {out}");
        assert!(out.contains(&format!("role {role} reaches")), "{out}");
    }
    // Converged: a rerun changes nothing.
    let (ok, out) = s.migrate("twitch", &scoped("twitch"), &twitch, &[]);
    assert!(ok, "{out}");
    assert!(
        !out.contains("reaches") && !out.contains("dropped"),
        "a rerun changed policies: {out}"
    );
    // A writer without a scope on a scoped collection is refused.
    let rogue = s.roles[2].clone();
    let (ok, out) = s.migrate(
        "rogue",
        "[collections.integrations]\naccess = \"read-write\"\n",
        &rogue,
        &[],
    );
    assert!(!ok, "{out}");
    assert!(
        out.contains("every read-write declaration names its scope"),
        "{out}"
    );
    // The refused run left the reporting role's declaration as it was.
    let (ok, out) = s.migrate("report", REPORT, &report, &[]);
    assert!(ok && !out.contains("reaches"), "{out}");

    let a = s.sidecar("twitch", &twitch).await;
    let b = s.sidecar("discord", &discord).await;
    let r = s.sidecar("report", &report).await;
    let (mut ca, mut cb) = (a.client.clone(), b.client.clone());
    let start = ca
        .list(ListRequest {
            collection: "integrations".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .resume_token;
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
            collection: "integrations".into(),
            id: "only-b".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let listed = r
        .client
        .clone()
        .list(ListRequest {
            collection: "integrations".into(),
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

    // Under row-level security each sidecar numbers and reads the changes it
    // may see: A's feed carries A's change only, the reporting one all three.
    for (client, expected) in [(&mut ca, 1), (&mut r.client.clone(), 3)] {
        let mut events = client
            .watch(WatchRequest {
                collections: vec!["integrations".into()],
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
        }
    }

    // A direct connection with a runtime role: its scope only, both ways.
    let direct = s.connect_as(&twitch).await;
    let rows = "SELECT id, scope FROM integrations ORDER BY id, scope";
    assert_eq!(
        keys(&direct, rows).await,
        [("x".to_string(), "twitch".to_string())]
    );
    let forged = direct
        .execute(
            "INSERT INTO integrations (scope, id, rev, data, create_time, update_time)
             VALUES ('discord', 'forged', 'r', '{}', 0, 0)",
            &[],
        )
        .await
        .map_err(said)
        .unwrap_err();
    assert!(forged.contains("row-level security"), "{forged}");
    for sql in [
        "UPDATE integrations SET data = '{}' WHERE scope = 'discord'",
        "DELETE FROM integrations WHERE scope = 'discord'",
    ] {
        assert_eq!(direct.execute(sql, &[]).await.unwrap(), 0, "{sql}");
    }
    let moved = direct
        .execute(
            "UPDATE integrations SET scope = 'discord' WHERE id = 'x'",
            &[],
        )
        .await
        .map_err(said)
        .unwrap_err();
    assert!(moved.contains("row-level security"), "{moved}");
    // The change feed too: only its own changes, and none forged for another.
    let feed = "SELECT DISTINCT collection, scope FROM _changes ORDER BY 1, 2";
    assert_eq!(
        keys(&direct, feed).await,
        [("integrations".to_string(), "twitch".to_string())]
    );
    let forged = direct
        .execute(
            "INSERT INTO _changes (collection, scope, id, rev, kind, commit_time)
             VALUES ('integrations', 'discord', 'x', 'r', 1, 0)",
            &[],
        )
        .await
        .map_err(said)
        .unwrap_err();
    assert!(forged.contains("row-level security"), "{forged}");
    let other = s.connect_as(&discord).await;
    assert_eq!(
        keys(&other, rows).await,
        [
            ("only-b".to_string(), "discord".to_string()),
            ("x".into(), "discord".into())
        ]
    );
    // The reporting role reads both scopes and writes nothing.
    let reporting = s.connect_as(&report).await;
    assert_eq!(keys(&reporting, rows).await.len(), 3);
    let denied = reporting
        .execute("DELETE FROM integrations", &[])
        .await
        .map_err(said)
        .unwrap_err();
    assert!(denied.contains("permission denied"), "{denied}");
    // Even the table owner is subject (FORCE): a role that owns nothing here
    // but is the owner in a careless setup would still be confined.
    let forced: bool =
        s.fx.admin
            .query_one(
                "SELECT relforcerowsecurity FROM pg_class WHERE oid = $1::text::regclass",
                &[&format!("\"{}\".integrations", s.fx.schema)],
            )
            .await
            .unwrap()
            .get(0);
    assert!(forced);
    for t in [a, b, r] {
        t.stop().await;
    }
    s.fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_tables_and_the_owner_recipe_move_to_scopes() {
    let Some(url) = postgres_url().await else {
        return;
    };
    let s = Shared::new(url).await;
    let [twitch, discord, _] = s.roles.clone();
    let schema = s.fx.schema.clone();
    // The old recipe: one unscoped table, the owner's role in `data.owner`,
    // hand-written row-level security; the table as an earlier release keyed it.
    let plain = "[collections.integrations]\naccess = \"read-write\"\n";
    for (name, role) in [("twitch", &twitch), ("discord", &discord)] {
        let (ok, out) = s.migrate(name, plain, role, &[]);
        assert!(ok, "{out}");
    }
    s.fx.admin
        .batch_execute(&format!(
            "SET search_path = \"{schema}\";
             ALTER TABLE integrations DROP CONSTRAINT integrations_pkey;
             ALTER TABLE integrations ADD PRIMARY KEY (id);
             INSERT INTO integrations (id, rev, data, create_time, update_time) VALUES
                 ('t1', 'r', '{{\"owner\": \"{twitch}\"}}', 0, 0),
                 ('d1', 'r', '{{\"owner\": \"{discord}\"}}', 0, 0);
             ALTER TABLE integrations ENABLE ROW LEVEL SECURITY;
             CREATE POLICY own_rows ON integrations
                 USING (data->>'owner' = current_user) WITH CHECK (data->>'owner' = current_user);
             RESET search_path;"
        ))
        .await
        .unwrap();

    // Scoping a table keyed by id alone waits for the contract step.
    let (ok, out) = s.migrate("twitch", &scoped("twitch"), &twitch, &[]);
    assert!(!ok, "{out}");
    assert!(out.contains("--contract"), "{out}");
    let (ok, out) = s.migrate(
        "twitch",
        &scoped("twitch"),
        &twitch,
        &["--contract", "--adopt-owner-field", "owner"],
    );
    assert!(ok, "{out}");
    assert!(out.contains("keyed by (scope, id)"), "{out}");
    assert!(
        out.contains("is not docsidecar's"),
        "the old policy is pointed out: {out}"
    );
    assert!(
        out.contains("rows without a scope"),
        "discord's row waits: {out}"
    );
    let (ok, out) = s.migrate(
        "discord",
        &scoped("discord"),
        &discord,
        &["--adopt-owner-field", "owner"],
    );
    assert!(ok, "{out}");
    s.fx.admin
        .batch_execute(&format!(
            "DROP POLICY own_rows ON \"{schema}\".integrations"
        ))
        .await
        .unwrap();
    let all = keys(
        &s.fx.admin,
        &format!("SELECT id, scope FROM \"{schema}\".integrations ORDER BY id"),
    )
    .await;
    assert_eq!(
        all,
        [
            ("d1".to_string(), "discord".to_string()),
            ("t1".into(), "twitch".into())
        ]
    );

    // Each service now finds its rows by scope, and the same id in both.
    let a = s.sidecar("twitch", &twitch).await;
    let mut c = a.client.clone();
    let got = c
        .get(GetRequest {
            collection: "integrations".into(),
            id: "t1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.scope, "twitch");
    c.save(SaveRequest {
        create_only: true,
        ..save("d1", 1.0)
    })
    .await
    .unwrap();
    let direct = s.connect_as(&discord).await;
    let theirs = keys(
        &direct,
        &format!("SELECT id, scope FROM \"{schema}\".integrations ORDER BY id"),
    )
    .await;
    assert_eq!(theirs, [("d1".to_string(), "discord".to_string())]);
    a.stop().await;
    s.fx.cleanup().await;
}
