//! Least privilege on real PostgreSQL roles: `docsidecar migrate` with the admin
//! account creates tables and grants; each service's sidecar runs with a role
//! that the database itself confines to that service's tables.

mod common;

use common::pg_roles::*;
use common::*;
use docsidecar::proto::{GetRequest, ListCollectionsRequest, ListRequest, SaveRequest};
use prost_types::Struct;
use std::process::Command;
use tonic::Code;

fn save(collection: &str, id: &str, data: Struct) -> SaveRequest {
    SaveRequest {
        collection: collection.into(),
        id: id.into(),
        data: Some(data.into()),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_service_role_is_confined_to_its_tables_by_the_database() {
    let Some(admin_url) = postgres_url().await else {
        return;
    };
    let u = uuid::Uuid::now_v7().simple().to_string()[20..].to_string();
    let (role_a, role_b, schema) = (
        format!("svc_a_{u}"),
        format!("svc_b_{u}"),
        format!("shared_{u}"),
    );
    let fx = Fixture {
        admin: pg_connect(&admin_url).await,
        schema: schema.clone(),
        roles: vec![role_a.clone(), role_b.clone()],
    };
    for role in &fx.roles {
        fx.admin
            .batch_execute(&format!(
                "CREATE ROLE \"{role}\" LOGIN PASSWORD 'pw-{role}'"
            ))
            .await
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let policy_a = dir.path().join("a.toml");
    std::fs::write(
        &policy_a,
        "service = \"service-a\"\n[collections.orders]\naccess = \"read-write\"\n[collections.catalog]\naccess = \"read-only\"\n[collections.events]\naccess = \"read-write\"\n",
    )
    .unwrap();
    let policy_b = dir.path().join("b.toml");
    std::fs::write(
        &policy_b,
        "service = \"service-b\"\n[collections.payments]\naccess = \"read-write\"\n[collections.events]\naccess = \"read-write\"\n",
    )
    .unwrap();

    // Several replicas' init containers may migrate at once: all succeed.
    let runs: Vec<_> = (0..3)
        .map(|_| {
            let (url, schema, policy, role) = (
                admin_url.clone(),
                schema.clone(),
                policy_a.clone(),
                role_a.clone(),
            );
            std::thread::spawn(move || migrate(&url, &schema, &policy, &role))
        })
        .collect();
    for run in runs {
        let out = run.join().unwrap();
        assert!(
            out.status.success(),
            "migrate A: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let out = migrate(&admin_url, &schema, &policy_b, &role_b);
    assert!(
        out.status.success(),
        "migrate B: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    // The shared table: row-level security keeps each service to its own rows.
    fx.admin
        .batch_execute(&format!(
            "ALTER TABLE \"{schema}\".events ENABLE ROW LEVEL SECURITY;
             CREATE POLICY own_rows ON \"{schema}\".events
                 USING (data->>'owner' = current_user)
                 WITH CHECK (data->>'owner' = current_user);"
        ))
        .await
        .unwrap();

    // A's sidecar, production mode: its policy, its role, no DDL rights.
    let url_a = url_as(&admin_url, &role_a, &format!("pw-{role_a}"));
    let policy_arg = policy_a.to_str().unwrap().to_string();
    let t = TestServer::start_at(
        Backend::Postgres,
        Some(&url_a),
        &["--schema", &schema, "--policy", &policy_arg],
    )
    .await;
    let mut c = t.client.clone();
    c.save(save("orders", "o1", object(vec![("total", num(3.5))])))
        .await
        .unwrap();
    c.get(GetRequest {
        collection: "orders".into(),
        id: "o1".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let status = c
        .save(save("catalog", "c1", object(vec![])))
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::PermissionDenied,
        "{}",
        status.message()
    );
    let status = c
        .save(save("payments", "p1", object(vec![])))
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::PermissionDenied,
        "{}",
        status.message()
    );
    let listed = c
        .list_collections(ListCollectionsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.collections, ["catalog", "events", "orders"]);

    // Row-level security through the sidecar: own rows in, others' rows refused.
    c.save(save(
        "events",
        "e-a",
        object(vec![("owner", string(&role_a))]),
    ))
    .await
    .unwrap();
    let status = c
        .save(save(
            "events",
            "e-forged",
            object(vec![("owner", string(&role_b))]),
        ))
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::PermissionDenied,
        "{}",
        status.message()
    );
    fx.admin
        .execute(
            &format!("INSERT INTO \"{schema}\".events (id, rev, data, create_time, update_time) VALUES ('e-b', 'r', $1::text::jsonb, 0, 0)"),
            &[&format!("{{\"owner\":\"{role_b}\"}}")],
        )
        .await
        .unwrap();
    let page = c
        .list(ListRequest {
            collection: "events".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<&str> = page.documents.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["e-a"], "A sees only its own rows of the shared table");

    // The database enforces the same, whatever connects with A's role.
    let direct = pg_connect(&url_a).await;
    let refused = |sql: String| {
        let direct = &direct;
        async move {
            let err = direct.batch_execute(&sql).await.expect_err(&sql);
            assert_eq!(
                err.code(),
                Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
                "{sql}: {err}"
            );
        }
    };
    refused(format!("SELECT * FROM \"{schema}\".payments")).await;
    refused(format!(
        "INSERT INTO \"{schema}\".catalog (id, rev, data, create_time, update_time) VALUES ('x', 'r', '{{}}', 0, 0)"
    ))
    .await;
    refused(format!("CREATE TABLE \"{schema}\".evil (x int)")).await;
    refused(format!("DROP TABLE \"{schema}\".orders")).await;
    // The schema version is readable (the sidecar refuses a schema it does
    // not know: contract, "Schema evolution"), never writable.
    refused(format!(
        "INSERT INTO \"{schema}\"._migrations (version, description) VALUES (99, 'x')"
    ))
    .await;
    direct
        .batch_execute(&format!("SELECT count(*) FROM \"{schema}\".catalog"))
        .await
        .expect("read-only means SELECT");
    // Exactly the declared privileges, nothing else.
    let grants: Vec<(String, String)> = fx
        .admin
        .query(
            "SELECT table_name::text, privilege_type::text FROM information_schema.role_table_grants
             WHERE grantee = $1 AND table_schema = $2 ORDER BY 1, 2",
            &[&role_a, &schema],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let expected: Vec<(String, String)> = [
        // The change feed: writes record changes, the sequencer numbers
        // them, watchers read them, retention prunes them.
        ("_changes", "DELETE"),
        ("_changes", "INSERT"),
        ("_changes", "SELECT"),
        ("_changes", "UPDATE"),
        ("_feed", "SELECT"),
        ("_feed", "UPDATE"),
        ("_migrations", "SELECT"),
        ("catalog", "SELECT"),
        ("events", "DELETE"),
        ("events", "INSERT"),
        ("events", "SELECT"),
        ("events", "UPDATE"),
        ("orders", "DELETE"),
        ("orders", "INSERT"),
        ("orders", "SELECT"),
        ("orders", "UPDATE"),
    ]
    .iter()
    .map(|(t, p)| (t.to_string(), p.to_string()))
    .collect();
    assert_eq!(grants, expected);

    t.stop().await;
    fx.cleanup().await;
}

/// The privileges `role` holds on `table` (of those a collection may need).
async fn privileges(admin: &tokio_postgres::Client, role: &str, table: &str) -> Vec<String> {
    let mut held = Vec::new();
    for privilege in ["SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE"] {
        let has: bool = admin
            .query_one(
                "SELECT has_table_privilege($1, $2, $3)",
                &[&role, &table, &privilege],
            )
            .await
            .unwrap()
            .get(0);
        if has {
            held.push(privilege.to_string());
        }
    }
    held
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_converges_grants_to_the_policy_and_can_revoke_temp_from_public() {
    let Some(server_url) = postgres_url().await else {
        return;
    };
    let u = uuid::Uuid::now_v7().simple().to_string()[20..].to_string();
    let (database, role) = (format!("mig_{u}"), format!("rt_{u}"));
    let server = pg_connect(&server_url).await;
    // A database of its own: revoking TEMP from PUBLIC touches the whole database.
    for sql in [
        format!("CREATE DATABASE \"{database}\""),
        format!("CREATE ROLE \"{role}\" LOGIN PASSWORD 'pw'"),
    ] {
        server.batch_execute(&sql).await.unwrap();
    }
    let url = url_of_database(&server_url, &database);
    let role_url = url_as(&url, &role, "pw");
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    let schema = "docsidecar";
    let run = |policy_text: &str, args: &[&str]| {
        std::fs::write(&policy, policy_text).unwrap();
        let mut all = vec!["--grant-to", role.as_str()];
        all.extend(args);
        outcome(migrate_with(&url, schema, &policy, &all))
    };
    let v1 = "service = \"s\"\n[collections.orders]\naccess = \"read-write\"\n[collections.catalog]\naccess = \"read-only\"\n";
    let v2 = "service = \"s\"\n[collections.orders]\naccess = \"read-only\"\n";
    let (ok, out) = run(v1, &[]);
    assert!(ok, "{out}");
    assert!(
        out.contains("granted DELETE, INSERT, SELECT, UPDATE on docsidecar.orders"),
        "{out}"
    );
    assert!(
        out.contains("granted SELECT on docsidecar.catalog"),
        "{out}"
    );
    let admin = pg_connect(&url).await;
    assert_eq!(
        privileges(&admin, &role, "docsidecar.orders").await,
        ["SELECT", "INSERT", "UPDATE", "DELETE"]
    );
    // Drift: a table outside the policy, and grants nobody declared.
    admin
        .batch_execute(&format!(
            "CREATE TABLE docsidecar.legacy (x int);
             GRANT SELECT, INSERT ON docsidecar.legacy TO \"{role}\";
             GRANT TRUNCATE ON docsidecar.orders TO \"{role}\";
             GRANT CREATE ON SCHEMA docsidecar TO \"{role}\";"
        ))
        .await
        .unwrap();

    // The policy drops `catalog` and makes `orders` read-only: migrate
    // converges to exactly that and reports each change.
    let (ok, out) = run(v2, &[]);
    assert!(ok, "{out}");
    for change in [
        "revoked CREATE on schema docsidecar",
        "revoked SELECT on docsidecar.catalog",
        "revoked INSERT, SELECT on docsidecar.legacy",
        "revoked DELETE, INSERT, TRUNCATE, UPDATE on docsidecar.orders",
    ] {
        assert!(out.contains(change), "{change}: {out}");
    }
    assert_eq!(
        privileges(&admin, &role, "docsidecar.orders").await,
        ["SELECT"]
    );
    assert!(privileges(&admin, &role, "docsidecar.catalog")
        .await
        .is_empty());
    assert!(privileges(&admin, &role, "docsidecar.legacy")
        .await
        .is_empty());
    let can_create: bool = admin
        .query_one(
            "SELECT has_schema_privilege($1, 'docsidecar', 'CREATE')",
            &[&role],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!can_create);
    // PUBLIC holds TEMPORARY: the runtime role can create temporary tables,
    // which migrate points out.
    assert!(out.contains("PUBLIC holds TEMPORARY"), "{out}");
    let as_role = pg_connect(&role_url).await;
    as_role
        .batch_execute("CREATE TEMP TABLE scratch (x int)")
        .await
        .expect("TEMP through PUBLIC");
    drop(as_role);

    // With the option, TEMP is revoked from PUBLIC, said to affect every role.
    let (ok, out) = run(v2, &["--revoke-public-temp"]);
    assert!(ok, "{out}");
    assert!(out.contains("revoked TEMPORARY on database"), "{out}");
    assert!(out.contains("affects every role"), "{out}");
    assert!(
        !out.contains("revoked SELECT"),
        "nothing else changed: {out}"
    );
    let as_role = pg_connect(&role_url).await;
    let err = as_role
        .batch_execute("CREATE TEMP TABLE scratch (x int)")
        .await
        .expect_err("no TEMP any more");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
        "{err}"
    );
    drop(as_role);
    // Converged: another run changes nothing.
    let (ok, out) = run(v2, &["--revoke-public-temp"]);
    assert!(ok, "{out}");
    assert!(
        !out.contains("revoked") && !out.contains("granted "),
        "{out}"
    );

    drop(admin);
    for sql in [
        format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{database}'"
        ),
        format!("DROP DATABASE \"{database}\""),
        format!("DROP ROLE \"{role}\""),
    ] {
        let _ = server.batch_execute(&sql).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_and_start_up_refuse_missing_tables_and_privileges_and_say_to_migrate() {
    let Some(admin_url) = postgres_url().await else {
        return;
    };
    let u = uuid::Uuid::now_v7().simple().to_string()[20..].to_string();
    let (schema, role) = (format!("chk_{u}"), format!("rt_{u}"));
    let fx = Fixture {
        admin: pg_connect(&admin_url).await,
        schema: schema.clone(),
        roles: vec![role.clone()],
    };
    fx.admin
        .batch_execute(&format!("CREATE ROLE \"{role}\" LOGIN PASSWORD 'pw'"))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "service = \"s\"\n[collections.orders]\naccess = \"read-write\"\n[collections.catalog]\naccess = \"read-only\"\n",
    )
    .unwrap();
    let role_url = url_as(&admin_url, &role, "pw");
    let sidecar = |command: &[&str]| {
        outcome(
            Command::new(BIN)
                .args(command)
                .args(["--listen", "127.0.0.1:0"])
                .env_clear()
                .env("DATABASE_URL", &role_url)
                .env("DOCSIDECAR_SCHEMA", &schema)
                .env("DOCSIDECAR_POLICY", &policy)
                .env("DB_MAX_RETRIES", "1")
                .output()
                .unwrap(),
        )
    };

    // `migrate` never ran: no tables. `check` fails, and so does start-up
    // (the process exits instead of serving).
    for command in [&["check"][..], &["serve"][..]] {
        let (ok, out) = sidecar(command);
        assert!(!ok, "{command:?}: {out}");
        assert!(out.contains("collections `catalog`, `orders`"), "{out}");
        assert!(out.contains("run `docsidecar migrate`"), "{out}");
    }
    // Tables, but no grants for the runtime role.
    let (ok, out) = outcome(migrate_with(&admin_url, &schema, &policy, &[]));
    assert!(ok, "{out}");
    let (ok, out) = sidecar(&["check"]);
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!("role `{role}` lacks USAGE on schema")),
        "{out}"
    );
    assert!(out.contains("SELECT on `catalog`"), "{out}");
    assert!(
        out.contains("SELECT, INSERT, UPDATE, DELETE on `orders`"),
        "{out}"
    );
    assert!(out.contains(&format!("--grant-to {role}")), "{out}");
    // Granted: check passes.
    let (ok, out) = outcome(migrate(&admin_url, &schema, &policy, &role));
    assert!(ok, "{out}");
    let (ok, out) = sidecar(&["check"]);
    assert!(ok, "{out}");
    assert!(out.contains("configuration and database OK"), "{out}");
    fx.cleanup().await;
}
