//! The three-node Galera harness (tests/common/galera.rs): replication across
//! nodes, and a node killed under writes that rejoins.

mod common;

use common::galera::Galera;
use common::mariadb::{connect_retry, MariaDb};
use common::procs;
use mysql_async::prelude::*;
use mysql_async::{Conn, OptsBuilder};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

async fn conn_to(galera: &Galera, node: usize, db: &MariaDb) -> Conn {
    let opts = OptsBuilder::from_opts(galera.node_opts(node)).db_name(Some(&db.name));
    // Retried (and logged): a node may refuse briefly around a view change.
    connect_retry(opts.into(), Duration::from_secs(30)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_replicate_and_a_killed_node_rejoins_in_sync() {
    let Some(galera) = Galera::shared().await else {
        return;
    };
    eprintln!("formed in {:.1?}", galera.formed_in);
    let g = galera.exclusive().await;
    assert_eq!(g.cluster_size().await, 3);

    // Write on node 0, read on node 2 (waiting for the apply: wsrep_sync_wait).
    let db = MariaDb::create_at(&g.node_url(0)).await;
    let mut c0 = conn_to(&g, 0, &db).await;
    c0.query_drop("CREATE TABLE t (id BIGINT PRIMARY KEY, v VARCHAR(40) NOT NULL)")
        .await
        .unwrap();
    c0.exec_drop("INSERT INTO t (id, v) VALUES (?, ?)", (0, "zero"))
        .await
        .unwrap();
    let mut c2 = conn_to(&g, 2, &db).await;
    c2.query_drop("SET SESSION wsrep_sync_wait = 1")
        .await
        .unwrap();
    let v: Option<String> = c2
        .query_first("SELECT v FROM t WHERE id = 0")
        .await
        .unwrap();
    assert_eq!(v.as_deref(), Some("zero"));

    // A writer on node 0 records every acknowledged id.
    let acked = Arc::new(Mutex::new(Vec::<i64>::new()));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (acked, errors, stop) = (acked.clone(), errors.clone(), stop.clone());
        tokio::spawn(async move {
            let mut id = 1i64;
            let mut longest = Duration::ZERO;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                match c0
                    .exec_drop("INSERT INTO t (id, v) VALUES (?, ?)", (id, "w"))
                    .await
                {
                    Ok(()) => acked.lock().unwrap().push(id),
                    Err(e) => errors.lock().unwrap().push(e.to_string()),
                }
                longest = longest.max(t.elapsed());
                id += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            longest
        })
    };
    let count = || acked.lock().unwrap().len();
    procs::poll(
        "writes before the kill",
        Duration::from_secs(30),
        || async { (count() >= 20).then_some(()).ok_or("too few".to_string()) },
    )
    .await
    .unwrap();

    let killed = Instant::now();
    g.kill(1).await;
    procs::poll("node 1 evicted", Duration::from_secs(60), || async {
        let s = g.node_status(0).await?;
        (s.cluster_size == 2).then_some(()).ok_or(format!("{s:?}"))
    })
    .await
    .unwrap();
    eprintln!("node 1 evicted {:.1?} after SIGKILL", killed.elapsed());
    let at_eviction = count();
    procs::poll(
        "writes with node 1 down",
        Duration::from_secs(30),
        || async {
            (count() >= at_eviction + 20)
                .then_some(())
                .ok_or("too few".to_string())
        },
    )
    .await
    .unwrap();

    let took = g.restart(1).await;
    eprintln!("node 1 restarted and synced in {took:.1?}");
    let before_stop = count();
    procs::poll(
        "writes after the rejoin",
        Duration::from_secs(30),
        || async {
            (count() >= before_stop + 20)
                .then_some(())
                .ok_or("too few".to_string())
        },
    )
    .await
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    let longest = writer.await.unwrap();
    eprintln!(
        "{} writes acknowledged, longest {longest:.1?}, errors: {:?}",
        count(),
        errors.lock().unwrap()
    );

    let s = g.node_status(1).await.unwrap();
    assert_eq!(s.state, "Synced");
    assert_eq!(s.cluster_size, 3);
    assert_eq!(g.cluster_size().await, 3);
    // Every acknowledged write is on the rejoined node.
    let mut c1 = conn_to(&g, 1, &db).await;
    c1.query_drop("SET SESSION wsrep_sync_wait = 1")
        .await
        .unwrap();
    let ids: Vec<i64> = c1.query("SELECT id FROM t WHERE id > 0").await.unwrap();
    let ids: std::collections::BTreeSet<i64> = ids.into_iter().collect();
    let missing: Vec<i64> = acked
        .lock()
        .unwrap()
        .iter()
        .filter(|id| !ids.contains(id))
        .copied()
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged but missing on node 1: {missing:?}"
    );
    assert!(
        errors.lock().unwrap().is_empty(),
        "{:?}",
        errors.lock().unwrap()
    );
    c1.disconnect().await.unwrap();
    c2.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_accepts_writes() {
    let Some(galera) = Galera::shared().await else {
        return;
    };
    let g = galera.steady().await;
    let db = MariaDb::create_at(&g.node_url(1)).await;
    let mut conns = Vec::new();
    for i in 0..3 {
        conns.push(conn_to(&g, i, &db).await);
    }
    conns[1]
        .query_drop("CREATE TABLE t (id BIGINT PRIMARY KEY AUTO_INCREMENT, node INT NOT NULL)")
        .await
        .unwrap();
    for (i, c) in conns.iter_mut().enumerate() {
        c.query_drop("SET SESSION wsrep_sync_wait = 1")
            .await
            .unwrap();
        c.exec_drop("INSERT INTO t (node) VALUES (?)", (i,))
            .await
            .unwrap();
    }
    for c in &mut conns {
        let n: Option<i64> = c.query_first("SELECT COUNT(*) FROM t").await.unwrap();
        assert_eq!(n, Some(3));
    }
    for c in conns {
        c.disconnect().await.unwrap();
    }
}

// The sidecar on the cluster: conditional writes through sidecars on
// different nodes, and a node killed under a steady write load.

use common::load::Writers;
use common::{num, number_field, object, Backend, Client, TestServer};
use docsidecar::proto::{GetRequest, SaveRequest};
use tonic::Code;

fn save(collection: &str, id: &str, n: f64, expected_rev: &str) -> SaveRequest {
    SaveRequest {
        collection: collection.into(),
        id: id.into(),
        data: Some(object(vec![("n", num(n))]).into()),
        expected_rev: expected_rev.into(),
        ..Default::default()
    }
}

fn get(collection: &str, id: &str) -> GetRequest {
    GetRequest {
        collection: collection.into(),
        id: id.into(),
        ..Default::default()
    }
}

/// A sidecar (in this process) on the given nodes of the cluster, in order.
async fn sidecar(g: &Galera, nodes: &[usize], db: &MariaDb) -> TestServer {
    let hosts: Vec<String> = nodes
        .iter()
        .map(|&i| format!("127.0.0.1:{}", g.node_port(i)))
        .collect();
    let url = format!("mysql://root@{}/{}", hosts.join(","), db.name);
    TestServer::start_at(Backend::Mariadb, Some(&url), &[]).await
}

/// Read-modify-write increments until `times` succeed: a stale read or a
/// lost race is ABORTED (read again), a conflict the store could not
/// resolve is UNAVAILABLE (retry).
async fn increment(mut client: Client, times: usize) -> (usize, usize) {
    let (mut aborted, mut unavailable) = (0, 0);
    let mut done = 0;
    while done < times {
        let doc = client.get(get("counters", "c")).await.unwrap().into_inner();
        let n = number_field(doc.data.as_ref().unwrap(), "n");
        match client.save(save("counters", "c", n + 1.0, &doc.rev)).await {
            Ok(_) => done += 1,
            Err(s) if s.code() == Code::Aborted => aborted += 1,
            Err(s) if s.code() == Code::Unavailable => unavailable += 1,
            Err(s) => panic!("{s:?}"),
        }
    }
    (aborted, unavailable)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn increments_through_sidecars_on_three_nodes_lose_no_update() {
    let Some(galera) = Galera::shared().await else {
        return;
    };
    let g = galera.steady().await;
    let db = MariaDb::create_at(&g.node_url(0)).await;
    let mut sidecars = Vec::new();
    for i in 0..3 {
        sidecars.push(sidecar(&g, &[i], &db).await);
    }
    sidecars[0]
        .client
        .save(save("counters", "c", 0.0, ""))
        .await
        .unwrap();
    let started = Instant::now();
    let (per_task, tasks_per_sidecar) = (15, 2);
    let mut tasks = Vec::new();
    for s in &sidecars {
        for _ in 0..tasks_per_sidecar {
            tasks.push(tokio::spawn(increment(s.client.clone(), per_task)));
        }
    }
    let (mut aborted, mut unavailable) = (0, 0);
    for t in tasks {
        let (a, u) = t.await.unwrap();
        aborted += a;
        unavailable += u;
    }
    let expected = (per_task * tasks_per_sidecar * sidecars.len()) as f64;
    // Every node, through its own sidecar, reads the same final count.
    for s in &mut sidecars {
        let doc = s
            .client
            .get(get("counters", "c"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(number_field(doc.data.as_ref().unwrap(), "n"), expected);
    }
    eprintln!(
        "Galera increments: {expected} through 3 sidecars on 3 nodes in {:.1?}, none lost; {aborted} ABORTED (stale rev, read again), {unavailable} UNAVAILABLE",
        started.elapsed()
    );

    // What wsrep_sync_wait costs a read here (loopback, idle cluster): a
    // causality check through the group before the statement runs.
    let mut c = conn_to(&g, 1, &db).await;
    let read = "SELECT rev FROM counters WHERE scope = '' AND id = 'c'";
    let synced = format!("SET STATEMENT wsrep_sync_wait = 1 FOR {read}");
    let [plain, synced] = median_micros(&mut c, [read, &synced]).await;
    eprintln!(
        "Galera point read, median of 300 each (interleaved): {plain} µs plain, {synced} µs with wsrep_sync_wait = 1"
    );
    c.disconnect().await.unwrap();
    for s in sidecars {
        s.stop().await;
    }
}

/// The median times of 300 runs of each query, run in turns so that the
/// machine's load weighs on both alike.
async fn median_micros(c: &mut Conn, sql: [&str; 2]) -> [u128; 2] {
    let mut micros = [Vec::new(), Vec::new()];
    for _ in 0..300 {
        for (i, sql) in sql.iter().enumerate() {
            let t = Instant::now();
            let _: Option<Vec<u8>> = c.query_first(*sql).await.unwrap();
            micros[i].push(t.elapsed().as_micros());
        }
    }
    micros.map(|mut m| {
        m.sort_unstable();
        m[m.len() / 2]
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_under_load_loses_no_acknowledged_write() {
    let Some(galera) = Galera::shared().await else {
        return;
    };
    let g = galera.exclusive().await;
    let db = MariaDb::create_at(&g.node_url(0)).await;
    // One sidecar given every node: it writes to node 0, the first listed.
    let server = sidecar(&g, &[0, 1, 2], &db).await;
    let writers = Writers::start(&server.client, "load", 3, Duration::from_millis(10));
    writers
        .acked_after(Instant::now(), 50, "writes before the kill")
        .await;

    let killed = Instant::now();
    g.kill(0).await;
    writers
        .acked_after(killed, 50, "writes after the kill")
        .await;
    let restarted = Instant::now();
    let rejoin = g.restart(0).await;
    writers
        .acked_after(restarted + rejoin, 50, "writes after the rejoin")
        .await;
    let load = writers.stop().await;
    server.stop().await;

    let load = std::mem::take(&mut *load.lock().unwrap());
    // Every acknowledged write, with its rev, on every node.
    let mut lost = 0;
    for node in 0..3 {
        let mut c = conn_to(&g, node, &db).await;
        c.query_drop("SET SESSION wsrep_sync_wait = 1")
            .await
            .unwrap();
        let rows: Vec<(String, String)> = c.query("SELECT id, rev FROM `load`").await.unwrap();
        let missing = load.missing_from(&rows.into_iter().collect());
        assert!(
            missing.is_empty(),
            "node {node} lacks acknowledged writes {missing:?}"
        );
        lost += missing.len();
        c.disconnect().await.unwrap();
    }
    eprintln!(
        "Galera node killed under load: {} writes acknowledged, {lost} lost; errors {:?}; first write acknowledged {:.1?} after the kill (longest call {:.1?}); node rejoined in {rejoin:.1?}",
        load.acked.len(),
        load.errors,
        load.recovery(killed),
        load.longest(),
    );
    load.assert_errors_retryable();
}
