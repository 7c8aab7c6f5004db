//! The three-node Galera harness (tests/common/galera.rs): replication across
//! nodes, and a node killed under writes that rejoins.

mod common;

use common::galera::Galera;
use common::mariadb::{connect, MariaDb};
use common::procs;
use mysql_async::prelude::*;
use mysql_async::{Conn, OptsBuilder};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

async fn conn_to(galera: &Galera, node: usize, db: &MariaDb) -> Conn {
    let opts = OptsBuilder::from_opts(galera.node_opts(node)).db_name(Some(&db.name));
    connect(opts.into()).await.unwrap()
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
