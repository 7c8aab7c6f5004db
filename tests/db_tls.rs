//! TLS to private PostgreSQL and MariaDB servers with a test CA
//! (tests/common/cluster.rs, tests/common/mariadb.rs): verify-full accepts
//! the local names, refuses a certificate for another name and an unknown CA,
//! and a TLS-required server refuses plain connections.

mod common;

use clap::Parser;
use common::cluster::{Cluster, ClusterOptions, ServerCert, TlsOptions};
use common::mariadb::{self, MariaDb, MariaServer, MariaServerOptions, MariaTlsOptions};
use common::pg_pair::pg_error;
use common::pki;
use common::{num, object, Backend, TestServer};
use docsidecar::config::Cli;
use docsidecar::proto::SaveRequest;
use docsidecar::server::Server;
use mysql_async::prelude::*;
use mysql_async::OptsBuilder;
use tokio_postgres::config::SslMode;

fn pg_config(host: &str, port: u16, ssl: SslMode) -> tokio_postgres::Config {
    let mut config = tokio_postgres::Config::new();
    config
        .host(host)
        .port(port)
        .user("postgres")
        .password("postgres")
        .dbname("postgres")
        .ssl_mode(ssl);
    config
}

/// Connects over TLS with `tls`; whether the session is encrypted.
async fn pg_tls_connect(
    host: &str,
    port: u16,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
) -> Result<bool, String> {
    let (client, conn) = pg_config(host, port, SslMode::Require)
        .connect(tls)
        .await
        .map_err(|e| format!("{e:?}"))?;
    tokio::spawn(conn);
    let ssl: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .map_err(pg_error)?
        .get(0);
    Ok(ssl)
}

#[tokio::test]
async fn postgres_verify_full_accepts_local_names_and_refuses_a_wrong_one() {
    let Some(cluster) = Cluster::start_with(&ClusterOptions {
        tls: Some(TlsOptions {
            required: true,
            cert: ServerCert::Localhost,
        }),
        ..ClusterOptions::default()
    }) else {
        return;
    };
    let ca = cluster.tls().ca_pem.clone();
    assert!(cluster.ca_file().exists());
    for host in ["localhost", "127.0.0.1"] {
        let ssl = pg_tls_connect(host, cluster.port, pki::pg_tls(&ca))
            .await
            .unwrap_or_else(|e| panic!("verify-full to {host}: {e}"));
        assert!(ssl, "{host}: the session is not encrypted");
    }

    // TLS required: a plain connection is refused by pg_hba.
    let err = pg_config("127.0.0.1", cluster.port, SslMode::Disable)
        .connect(tokio_postgres::NoTls)
        .await
        .err()
        .expect("a plain connection is refused");
    assert!(pg_error(err).contains("no encryption"));

    // Another CA: refused.
    let other = pki::TestCa::new("another CA").pem();
    let err = pg_tls_connect("127.0.0.1", cluster.port, pki::pg_tls(&other))
        .await
        .unwrap_err();
    assert!(err.contains("UnknownIssuer"), "{err}");

    // A certificate for another name, from the same CA: verify-full refuses
    // it, verify-ca (no name check) accepts it.
    cluster.set_server_cert(ServerCert::WrongHost).await;
    for host in ["localhost", "127.0.0.1"] {
        let err = pg_tls_connect(host, cluster.port, pki::pg_tls(&ca))
            .await
            .unwrap_err();
        assert!(err.contains("NotValidForName"), "{host}: {err}");
        let verify_ca =
            tokio_postgres_rustls::MakeRustlsConnect::new(pki::client_config_verify_ca(&ca));
        assert!(pg_tls_connect(host, cluster.port, verify_ca).await.unwrap());
    }
    cluster.set_server_cert(ServerCert::Localhost).await;
    assert!(pg_tls_connect("localhost", cluster.port, pki::pg_tls(&ca))
        .await
        .unwrap());
}

#[tokio::test]
async fn postgres_tls_optional_still_accepts_plain_connections() {
    let Some(cluster) = Cluster::start_with(&ClusterOptions {
        auth: "scram-sha-256".into(),
        tls: Some(TlsOptions::default()),
    }) else {
        return;
    };
    let (client, conn) = pg_config("127.0.0.1", cluster.port, SslMode::Disable)
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let ssl: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!ssl);
    let ca = cluster.tls().ca_pem.clone();
    assert!(pg_tls_connect("localhost", cluster.port, pki::pg_tls(&ca))
        .await
        .unwrap());
}

/// `Ssl_version` of a session (empty without TLS).
async fn mysql_tls_version(opts: mysql_async::Opts) -> Result<String, String> {
    let mut conn = mariadb::connect(opts).await?;
    let row: Option<(String, String)> = conn
        .query_first("SHOW SESSION STATUS LIKE 'Ssl_version'")
        .await
        .map_err(|e| e.to_string())?;
    let _ = conn.disconnect().await;
    Ok(row.map(|r| r.1).unwrap_or_default())
}

#[tokio::test]
async fn mariadb_verify_full_with_the_test_ca_and_secure_transport_required() {
    let Some(server) = MariaServer::start(MariaServerOptions {
        tls: Some(MariaTlsOptions {
            required: true,
            cert: ServerCert::Localhost,
        }),
    })
    .await
    else {
        return;
    };
    let ca_file = server.ca_file().to_path_buf();
    let opts_for = |host: &str, ssl: Option<mysql_async::SslOpts>| -> mysql_async::Opts {
        OptsBuilder::default()
            .ip_or_hostname(host)
            .tcp_port(server.port())
            .user(Some("root"))
            .prefer_socket(false)
            .ssl_opts(ssl)
            .into()
    };
    for host in ["127.0.0.1", "localhost"] {
        let version = mysql_tls_version(opts_for(host, Some(mariadb::ssl_opts(&ca_file))))
            .await
            .unwrap_or_else(|e| panic!("verify-full to {host}: {e}"));
        assert!(version.starts_with("TLSv1."), "{host}: {version:?}");
    }

    // require_secure_transport: plain TCP is refused. MariaDB 10.11 says so
    // as a plain 1045 "Access denied" (not MySQL's 3159), for the same
    // account that TLS just let in.
    let err = mysql_tls_version(opts_for("127.0.0.1", None))
        .await
        .unwrap_err();
    assert!(err.contains("1045"), "{err}");

    // Another CA: refused.
    let other = std::env::temp_dir().join(format!("other-ca-{}.pem", std::process::id()));
    std::fs::write(&other, pki::TestCa::new("another CA").pem()).unwrap();
    let err = mysql_tls_version(opts_for("127.0.0.1", Some(mariadb::ssl_opts(&other))))
        .await
        .unwrap_err();
    let _ = std::fs::remove_file(&other);
    assert!(err.contains("UnknownIssuer"), "{err}");

    // A certificate for another name, from the same CA: verify-full refuses.
    server.set_server_cert(ServerCert::WrongHost).await;
    let err = mysql_tls_version(opts_for("127.0.0.1", Some(mariadb::ssl_opts(&ca_file))))
        .await
        .unwrap_err();
    assert!(err.contains("not valid for name"), "{err}");
    // The chain itself is fine: checked against the name in the certificate
    // (`tls_hostname_override`), it passes.
    let as_named =
        mariadb::ssl_opts(&ca_file).with_danger_tls_hostname_override(Some(pki::WRONG_NAME));
    let version = mysql_tls_version(opts_for("127.0.0.1", Some(as_named)))
        .await
        .unwrap();
    assert!(version.starts_with("TLSv1."));
    // mysql_async 0.37.1's own verify-ca switch (`skip_domain_validation`,
    // URL `verify_identity=false`) is inert with rustls 0.23: it looks for
    // the text "NotValidForName" in the error, which rustls now renders as
    // "certificate not valid for name …" (blackbeam/mysql_async#404, fixed
    // by #408, not released in 0.37.1). When this assertion fails, a fixed
    // release is in use: expect Ok here instead.
    let verify_ca = mariadb::ssl_opts(&ca_file).with_danger_skip_domain_validation(true);
    let still = mysql_tls_version(opts_for("127.0.0.1", Some(verify_ca))).await;
    assert!(
        still
            .as_ref()
            .is_err_and(|e| e.contains("not valid for name")),
        "skip_domain_validation works now ({still:?}): mysql_async#404 is fixed, update this test"
    );

    // The sidecar with DB_SSLMODE=verify-full against the test CA serves;
    // the server requires TLS, so every session it opened is encrypted.
    server.set_server_cert(ServerCert::Localhost).await;
    let db = MariaDb::create_on(server.opts()).await;
    let ca = ca_file.display();
    let url = format!(
        "mysql://root@localhost:{}/{}?sslmode=verify-full&sslrootcert={ca}",
        server.port(),
        db.name
    );
    let mut sidecar = TestServer::start_at(Backend::Mariadb, Some(&url), &[]).await;
    let saved = sidecar
        .client
        .save(SaveRequest {
            collection: "secure".into(),
            id: "a".into(),
            data: Some(object(vec![("n", num(1.0))]).into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(saved.into_inner().created);
    sidecar.stop().await;
    // Settings that cannot work are refused at start-up: no TLS to a server
    // that requires it, and verify-full of a certificate for another name.
    let refused = |url: String| async move {
        let cli = Cli::try_parse_from([
            "docsidecar",
            "--listen",
            "127.0.0.1:0",
            "--db-max-retries",
            "1",
            "--database-url",
            &url,
        ])
        .unwrap();
        match Server::bind(cli.serve.resolve().unwrap()).await {
            Ok(_) => panic!("{url} served"),
            Err(e) => e.to_string(),
        }
    };
    let plain = format!(
        "mysql://root@localhost:{}/{}?sslmode=disable",
        server.port(),
        db.name
    );
    let err = refused(plain).await;
    assert!(err.contains("1045"), "{err}");
    server.set_server_cert(ServerCert::WrongHost).await;
    let err = refused(url).await;
    assert!(err.contains("not valid for name"), "{err}");
}
