//! Expiry: absent the instant it expires, to every read and condition; the
//! database's clock, moved by the test instead of waiting.

use super::support::*;
use super::updates::{transform, update};
use crate::common::*;
use docsidecar::proto::{
    field_transform::Op as T, save_request, update_request, BatchGetRequest, ListRequest,
    SaveRequest,
};
use prost_types::{Duration, Timestamp};
use tonic::Code;

const SECOND: i64 = 1_000_000;

fn ttl(seconds: i64) -> Option<save_request::Expiration> {
    Some(save_request::Expiration::Ttl(Duration {
        seconds,
        nanos: 0,
    }))
}

fn micros(ts: &Timestamp) -> i64 {
    ts.seconds * SECOND + i64::from(ts.nanos) / 1000
}

async fn ids(client: &mut Client, collection: &str) -> Vec<String> {
    client
        .list(ListRequest {
            collection: collection.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .documents
        .into_iter()
        .map(|d| d.id)
        .collect()
}

pub async fn expired_documents_are_absent_to_every_read_and_condition(mut t: TestServer) {
    let c = &mut t.client;
    let saved = c
        .save(SaveRequest {
            expiration: ttl(10),
            ..save("docs", "e", doc(1.0))
        })
        .await
        .unwrap()
        .into_inner();
    c.save(save("docs", "forever", doc(2.0))).await.unwrap();
    let stored = c.get(get("docs", "e")).await.unwrap().into_inner();
    let expire = micros(
        stored
            .expire_time
            .as_ref()
            .expect("expire_time is reported"),
    );
    assert_eq!(
        expire,
        micros(saved.update_time.as_ref().unwrap()) + 10 * SECOND
    );

    // Just before the instant: still there.
    t.clock.advance(10 * SECOND - SECOND / 5);
    assert_eq!(
        c.get(get("docs", "e")).await.unwrap().into_inner().rev,
        saved.rev
    );
    // From the instant on: absent to every read…
    t.clock.advance(SECOND / 5);
    assert_status(c.get(get("docs", "e")).await, Code::NotFound, "not found");
    assert_eq!(ids(c, "docs").await, ["forever"]);
    let batch = c
        .batch_get(BatchGetRequest {
            collection: "docs".into(),
            ids: vec!["e".into(), "forever".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(batch.missing_ids, ["e"]);
    // …and to every condition.
    assert_status(
        c.save(SaveRequest {
            expected_rev: saved.rev.clone(),
            ..save("docs", "e", doc(3.0))
        })
        .await,
        Code::Aborted,
        "does not exist",
    );
    assert_status(
        c.delete(delete("docs", "e", "")).await,
        Code::NotFound,
        "not found",
    );
    assert_status(
        c.update(update("docs", "e")).await,
        Code::NotFound,
        "not found",
    );
    let again = c
        .save(SaveRequest {
            create_only: true,
            ..save("docs", "e", doc(4.0))
        })
        .await
        .unwrap()
        .into_inner();
    assert!(again.created, "a save over an expired document creates it");
    let fresh = c.get(get("docs", "e")).await.unwrap().into_inner();
    assert_eq!(fresh.expire_time, None);
    assert_eq!(
        fresh.create_time, again.update_time,
        "a new life, a new create_time"
    );
}

pub async fn update_keeps_the_expiry_and_save_clears_it(mut t: TestServer) {
    let c = &mut t.client;
    c.save(SaveRequest {
        expiration: ttl(60),
        ..save("docs", "k", doc(1.0))
    })
    .await
    .unwrap();
    let before = c
        .get(get("docs", "k"))
        .await
        .unwrap()
        .into_inner()
        .expire_time;
    assert!(before.is_some());
    let mut bump = update("docs", "k");
    bump.transforms = vec![transform("n", T::Increment(num(1.0)))];
    let updated = c.update(bump).await.unwrap().into_inner();
    assert_eq!(
        updated.document.unwrap().expire_time,
        before,
        "an increment never wipes a TTL"
    );
    let mut extend = update("docs", "k");
    extend.expiration = Some(update_request::Expiration::Ttl(Duration {
        seconds: 3600,
        nanos: 0,
    }));
    let extended = c
        .update(extend)
        .await
        .unwrap()
        .into_inner()
        .document
        .unwrap();
    assert!(micros(extended.expire_time.as_ref().unwrap()) > micros(before.as_ref().unwrap()));
    c.save(save("docs", "k", doc(2.0))).await.unwrap();
    assert_eq!(
        c.get(get("docs", "k"))
            .await
            .unwrap()
            .into_inner()
            .expire_time,
        None
    );
    // An absolute instant works too.
    let at = Timestamp {
        seconds: extended.update_time.unwrap().seconds + 120,
        nanos: 0,
    };
    c.save(SaveRequest {
        expiration: Some(save_request::Expiration::ExpireTime(at)),
        ..save("docs", "k", doc(3.0))
    })
    .await
    .unwrap();
    assert_eq!(
        c.get(get("docs", "k"))
            .await
            .unwrap()
            .into_inner()
            .expire_time,
        Some(at)
    );
}

pub async fn expiry_must_be_in_the_future(mut t: TestServer) {
    let c = &mut t.client;
    let past = Timestamp {
        seconds: 1_000_000_000,
        nanos: 0,
    };
    assert_status(
        c.save(SaveRequest {
            expiration: Some(save_request::Expiration::ExpireTime(past)),
            ..save("docs", "p", doc(1.0))
        })
        .await,
        Code::InvalidArgument,
        "not in the future",
    );
    for (seconds, nanos) in [(0, 0), (-5, 0), (0, -1)] {
        assert_status(
            c.save(SaveRequest {
                expiration: Some(save_request::Expiration::Ttl(Duration { seconds, nanos })),
                ..save("docs", "p", doc(1.0))
            })
            .await,
            Code::InvalidArgument,
            "ttl must be positive",
        );
    }
    assert_status(c.get(get("docs", "p")).await, Code::NotFound, "not found");
}

/// The reaper deletes expired rows while writes extend their documents: a
/// Save acknowledged over an expired document always survives.
pub async fn a_save_racing_the_reaper_wins(t: TestServer) {
    let backend = t.backend;
    drop(t);
    let Some(t) =
        TestServer::start(backend, &["--reap-interval", "0.002", "--reap-batch", "7"]).await
    else {
        return;
    };
    let mut c = t.client.clone();
    for round in 0..40 {
        let ids: Vec<String> = (0..20).map(|i| format!("r{round}-{i}")).collect();
        for id in &ids {
            c.save(SaveRequest {
                expiration: ttl(1),
                ..save("race", id, doc(1.0))
            })
            .await
            .unwrap();
        }
        t.clock.advance(2 * SECOND);
        // Half are saved again (no expiry) while the reaper deletes the others.
        let mut revs = Vec::new();
        for id in ids.iter().step_by(2) {
            let saved = c
                .save(save("race", id, doc(2.0)))
                .await
                .unwrap()
                .into_inner();
            assert!(saved.created, "an expired document is absent");
            revs.push((id.clone(), saved.rev));
        }
        for (id, rev) in revs {
            let doc = c.get(get("race", &id)).await.unwrap().into_inner();
            assert_eq!(doc.rev, rev, "round {round}: the newer Save wins");
        }
    }
}
