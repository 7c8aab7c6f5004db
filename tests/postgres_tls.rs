//! TLS from the sidecar (serving and `migrate`) to a private PostgreSQL
//! cluster with `ssl = on` and a test CA: every `sslmode`, in the URL and as
//! the discrete `DB_SSLMODE`/`MIGRATE_DB_SSLMODE` settings.

mod common;

use clap::Parser;
use common::cluster::{Cluster, ClusterOptions, ServerCert, TlsOptions};
use common::*;
use docsidecar::config::Cli;
use docsidecar::proto::{GetRequest, SaveRequest};
use docsidecar::server::Server;
use std::process::Command;

/// Whether each session of the sidecar named `app` is encrypted (pg_stat_ssl):
/// its pool's, and its health check's (`app (health)`).
async fn encrypted(admin: &tokio_postgres::Client, app: &str) -> Vec<bool> {
    admin
        .query(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.application_name = $1 OR a.application_name = $1 || ' (health)'",
            &[&app],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// Serves with `url`, saves and reads a document, and says whether the
/// sidecar's sessions (pool and health check) were encrypted.
async fn round_trip(url: &str, app: &str, admin: &tokio_postgres::Client) -> Vec<bool> {
    let t = TestServer::start_at(Backend::Postgres, Some(url), &[]).await;
    let mut c = t.client.clone();
    c.save(SaveRequest {
        collection: "tls".into(),
        id: "a".into(),
        data: Some(object(vec![]).into()),
        ..Default::default()
    })
    .await
    .unwrap();
    c.get(GetRequest {
        collection: "tls".into(),
        id: "a".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let sessions = encrypted(admin, app).await;
    assert!(!sessions.is_empty(), "no session named {app}");
    t.stop().await;
    sessions
}

/// The start-up error of a sidecar with `url` (it must not start).
async fn start_up_error(url: &str) -> String {
    let cli = Cli::try_parse_from([
        "docsidecar",
        "--listen",
        "127.0.0.1:0",
        "--database-url",
        url,
        "--db-max-retries",
        "3",
        "--db-retry-delay",
        "3600",
    ])
    .unwrap();
    match Server::bind(cli.serve.resolve().unwrap()).await {
        Ok(_) => panic!("{url} started"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sslmode_against_a_server_with_a_test_ca() {
    let Some(cluster) = Cluster::start_with(&ClusterOptions {
        tls: Some(TlsOptions::default()),
        ..ClusterOptions::default()
    }) else {
        return;
    };
    let admin = cluster.node().admin().await.unwrap();
    let port = cluster.port;
    let ca = cluster.ca_file().display().to_string();
    let url = |host: &str, params: &str, app: &str| {
        format!(
            "postgres://postgres:postgres@{host}:{port}/postgres?application_name={app}&{params}"
        )
    };

    // require: encrypted; disable: never negotiated; prefer (the default):
    // encrypted when the server offers it.
    let sessions = round_trip(
        &url("127.0.0.1", "sslmode=require", "ds-require"),
        "ds-require",
        &admin,
    )
    .await;
    assert!(sessions.iter().all(|ssl| *ssl), "{sessions:?}");
    let sessions = round_trip(
        &url("127.0.0.1", "sslmode=disable", "ds-disable"),
        "ds-disable",
        &admin,
    )
    .await;
    assert!(sessions.iter().all(|ssl| !ssl), "{sessions:?}");
    let sessions = round_trip(&url("127.0.0.1", "", "ds-prefer"), "ds-prefer", &admin).await;
    assert!(sessions.iter().all(|ssl| *ssl), "{sessions:?}");

    // verify-full: the CA signed the certificate and it names the host.
    let full = format!("sslmode=verify-full&sslrootcert={ca}");
    let sessions = round_trip(&url("localhost", &full, "ds-full"), "ds-full", &admin).await;
    assert!(sessions.iter().all(|ssl| *ssl), "{sessions:?}");

    // A certificate from the same CA for another name: verify-full refuses it
    // at once (not a retry), verify-ca accepts it.
    cluster.set_server_cert(ServerCert::WrongHost).await;
    let err = start_up_error(&url("localhost", &full, "ds-full-wrong")).await;
    assert!(err.contains("not valid for name"), "{err}");
    assert!(err.contains("not retried"), "{err}");
    assert!(!err.contains("postgres:postgres"), "{err}");
    let verify_ca = format!("sslmode=verify-ca&sslrootcert={ca}");
    let sessions = round_trip(&url("localhost", &verify_ca, "ds-ca"), "ds-ca", &admin).await;
    assert!(sessions.iter().all(|ssl| *ssl), "{sessions:?}");

    // A CA that did not sign the certificate: refused by verify-ca too.
    let other = cluster.dir().join("other-ca.crt");
    std::fs::write(&other, common::pki::TestCa::new("another CA").pem()).unwrap();
    let err = start_up_error(&url(
        "localhost",
        &format!("sslmode=verify-ca&sslrootcert={}", other.display()),
        "ds-other",
    ))
    .await;
    assert!(err.contains("UnknownIssuer"), "{err}");

    // migrate, with the discrete MIGRATE_DB_* settings.
    let migrate = |mode: &str| {
        Command::new(common::sidecar::BIN)
            .arg("migrate")
            .env_clear()
            .env("MIGRATE_DB_TYPE", "postgresql")
            .env("MIGRATE_DB_HOST", "localhost")
            .env("MIGRATE_DB_PORT", port.to_string())
            .env("MIGRATE_DB_USER", "postgres")
            .env("MIGRATE_DB_PASS", "postgres")
            .env("MIGRATE_DB_NAME", "postgres")
            .env("MIGRATE_DB_SSLMODE", mode)
            .env("MIGRATE_DB_SSLROOTCERT", &ca)
            .env("MIGRATE_DB_MAX_RETRIES", "3")
            .env("MIGRATE_DB_RETRY_DELAY", "3600")
            .output()
            .unwrap()
    };
    let out = migrate("verify-full");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("not valid for name") && text.contains("not retried"),
        "{text}"
    );
    let out = migrate("verify-ca");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_requires_tls_refuses_disable_at_once() {
    let Some(cluster) = Cluster::start_with(&ClusterOptions {
        tls: Some(TlsOptions {
            required: true,
            cert: ServerCert::Localhost,
        }),
        ..ClusterOptions::default()
    }) else {
        return;
    };
    let port = cluster.port;
    let err = start_up_error(&format!(
        "postgres://postgres:postgres@127.0.0.1:{port}/postgres?sslmode=disable"
    ))
    .await;
    assert!(err.contains("no encryption"), "{err}");
    assert!(err.contains("not retried"), "{err}");
    // The same server with TLS: served.
    let admin = cluster.node().admin().await.unwrap();
    let sessions = round_trip(
        &format!("postgres://postgres:postgres@127.0.0.1:{port}/postgres?sslmode=require&application_name=ds-req"),
        "ds-req",
        &admin,
    )
    .await;
    assert!(sessions.iter().all(|ssl| *ssl), "{sessions:?}");
}
