//! The PostgreSQL primary + streaming standby harness (tests/common/pg_pair.rs):
//! replication, failover by promotion, the rebuild of a standby afterwards, and
//! synchronous (remote_apply) commits.

mod common;

use common::load::Writers;
use common::pg_pair::{pg_error, PgPair, PgPairOptions};
use common::{pg_connect, procs, Backend, TestServer};
use std::time::{Duration, Instant};

fn table() -> String {
    format!("t_{}", uuid::Uuid::now_v7().simple())
}

async fn count(client: &tokio_postgres::Client, table: &str) -> i64 {
    client
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standby_follows_and_takes_over_when_promoted() {
    let Some(pair) = PgPair::shared(false).await else {
        return;
    };
    let p = pair.exclusive().await;
    let t = table();
    let primary = pg_connect(&p.primary_url("postgres")).await;
    primary
        .batch_execute(&format!(
            "CREATE TABLE {t} (id int PRIMARY KEY, v text); INSERT INTO {t} VALUES (1, 'one');"
        ))
        .await
        .unwrap();

    // Asynchronous replication: the row shows up on the standby soon.
    let standby_port = p.standby().port;
    let standby = pg_connect(&p.standby_url("postgres")).await;
    procs::poll(
        "the row on the standby",
        Duration::from_secs(30),
        || async {
            match standby
                .query_opt(&format!("SELECT v FROM {t} WHERE id = 1"), &[])
                .await
            {
                Ok(Some(row)) => Ok(row.get::<_, String>(0)),
                Ok(None) => Err("no row yet".to_string()),
                Err(e) => Err(pg_error(e)),
            }
        },
    )
    .await
    .unwrap();
    let recovering: bool = standby
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(recovering);
    let err = standby
        .batch_execute(&format!("INSERT INTO {t} VALUES (2, 'two')"))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION)
    );

    // Failover: the primary goes away, the standby is promoted and takes writes.
    p.stop_primary().await;
    assert!(primary.simple_query("SELECT 1").await.is_err());
    p.promote_standby().await;
    assert_eq!(p.primary().port, standby_port);
    standby
        .batch_execute(&format!("INSERT INTO {t} VALUES (2, 'two')"))
        .await
        .unwrap();
    let new_primary = pg_connect(&p.primary_url("postgres")).await;
    assert_eq!(count(&new_primary, &t).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failover_the_old_primary_is_rebuilt_as_a_standby() {
    let Some(pair) = PgPair::shared(false).await else {
        return;
    };
    // Promote while the primary still runs (split brain), then repair: the
    // old primary is rebuilt as a standby of the new one. (`steady` and
    // `exclusive` repair too, for whoever comes next.)
    let p = pair.exclusive().await;
    let old_primary_port = p.primary().port;
    p.promote_standby().await;
    assert_ne!(p.primary().port, old_primary_port);
    p.repair().await;
    assert_eq!(p.standby().port, old_primary_port);
    let t = table();
    let primary = pg_connect(&p.primary_url("postgres")).await;
    primary
        .batch_execute(&format!(
            "CREATE TABLE {t} (id int); INSERT INTO {t} VALUES (1);"
        ))
        .await
        .unwrap();
    let standby = pg_connect(&p.standby_url("postgres")).await;
    procs::poll(
        "the row on the rebuilt standby",
        Duration::from_secs(30),
        || async {
            match standby
                .query_one(&format!("SELECT count(*) FROM {t}"), &[])
                .await
            {
                Ok(row) if row.get::<_, i64>(0) == 1 => Ok(()),
                Ok(_) => Err("no row yet".to_string()),
                Err(e) => Err(pg_error(e)),
            }
        },
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_synchronous_commit_is_applied_on_the_standby_before_the_ack() {
    let Some(pair) = PgPair::shared(true).await else {
        return;
    };
    let p = pair.steady().await;
    let primary = pg_connect(&p.primary_url("postgres")).await;
    let setting: String = primary
        .query_one("SHOW synchronous_commit", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(setting, "remote_apply");
    let sync: i64 = primary
        .query_one(
            "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(sync, 1);

    let t = table();
    primary
        .batch_execute(&format!("CREATE TABLE {t} (id int PRIMARY KEY)"))
        .await
        .unwrap();
    let standby = pg_connect(&p.standby_url("postgres")).await;
    // No polling: each acknowledged row is visible on the standby at once.
    for id in 0..50 {
        primary
            .execute(&format!("INSERT INTO {t} VALUES ($1)"), &[&id])
            .await
            .unwrap();
        let seen = standby
            .query_opt(&format!("SELECT id FROM {t} WHERE id = $1"), &[&id])
            .await
            .unwrap();
        assert!(
            seen.is_some(),
            "row {id} acknowledged but not on the standby"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_pair_with_passwords_replicates_and_is_gone_after_drop() {
    let Some(pair) = PgPair::start(PgPairOptions {
        auth: "scram-sha-256".into(),
        ..PgPairOptions::default()
    })
    .await
    else {
        return;
    };
    let ports = [pair.primary().port, pair.standby().port];
    let primary = pg_connect(&pair.primary_url("postgres")).await;
    primary
        .batch_execute("CREATE TABLE t (id int); INSERT INTO t VALUES (1);")
        .await
        .unwrap();
    let standby = pg_connect(&pair.standby_url("postgres")).await;
    procs::poll(
        "the row on the standby",
        Duration::from_secs(30),
        || async {
            match standby.query_one("SELECT count(*) FROM t", &[]).await {
                Ok(row) if row.get::<_, i64>(0) == 1 => Ok(()),
                Ok(_) => Err("no row yet".to_string()),
                Err(e) => Err(pg_error(e)),
            }
        },
    )
    .await
    .unwrap();
    // Password authentication is on for TCP.
    let wrong = format!("postgres://postgres:wrong@127.0.0.1:{}/postgres", ports[0]);
    assert!(tokio_postgres::connect(&wrong, tokio_postgres::NoTls)
        .await
        .is_err());
    drop((primary, standby));
    drop(pair);
    for port in ports {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "port {port} still answers"
        );
    }
}

/// The sidecar given both hosts, the standby first (skipped: it does not
/// accept writes). Under a steady write load the primary stops and the
/// standby is promoted: writes resume on the new primary without a restart,
/// and with `synchronous_commit = remote_apply` every acknowledged write is
/// there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_follows_a_failover_and_loses_no_acknowledged_write() {
    let Some(pair) = PgPair::shared(true).await else {
        return;
    };
    let p = pair.exclusive().await;
    let (primary, standby) = (p.primary().port, p.standby().port);
    let url =
        format!("postgres://postgres:postgres@127.0.0.1:{standby},127.0.0.1:{primary}/postgres");
    let schema = table();
    let server = TestServer::start_at(Backend::Postgres, Some(&url), &["--schema", &schema]).await;
    let writers = Writers::start(&server.client, "load", 3, Duration::from_millis(10));
    writers
        .acked_after(Instant::now(), 50, "writes before the failover")
        .await;

    p.stop_primary().await;
    let down = Instant::now();
    p.promote_standby().await;
    let promoted = down.elapsed();
    writers
        .acked_after(down, 50, "writes after the failover")
        .await;
    let load = writers.stop().await;
    server.stop().await;

    let load = std::mem::take(&mut *load.lock().unwrap());
    assert_eq!(p.primary().port, standby);
    let new_primary = pg_connect(&p.primary_url("postgres")).await;
    let rows = new_primary
        .query(&format!("SELECT id, rev FROM \"{schema}\".load"), &[])
        .await
        .unwrap();
    let stored = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let missing = load.missing_from(&stored);
    eprintln!(
        "PostgreSQL failover under load (remote_apply): {} writes acknowledged, {} lost; errors {:?}; standby promoted {promoted:.1?} after the primary stopped, first write acknowledged {:.1?} after the stop (longest call {:.1?})",
        load.acked.len(),
        missing.len(),
        load.errors,
        load.recovery(down),
        load.longest(),
    );
    assert!(missing.is_empty(), "acknowledged but lost: {missing:?}");
    load.assert_errors_retryable();
}
