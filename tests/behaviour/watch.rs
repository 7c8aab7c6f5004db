//! Watch: committed changes in order, once each; resume tokens; documents as
//! committed; List-then-Watch; PROGRESS; token validation.

use super::support::*;
use crate::common::*;
use docsidecar::proto::{
    change_event::Kind, save_request, ChangeEvent, ListRequest, SaveRequest, WatchRequest,
};
use prost_types::Duration;
use tonic::{Code, Streaming};

pub async fn watch(client: &mut Client, request: WatchRequest) -> Streaming<ChangeEvent> {
    client.watch(request).await.unwrap().into_inner()
}

/// The next event that is not PROGRESS, within a generous time.
pub async fn next_change(stream: &mut Streaming<ChangeEvent>) -> ChangeEvent {
    loop {
        let event = tokio::time::timeout(std::time::Duration::from_secs(20), stream.message())
            .await
            .expect("an event in time")
            .unwrap()
            .expect("the stream goes on");
        if event.kind() != Kind::Progress {
            return event;
        }
    }
}

fn watching(collections: &[&str]) -> WatchRequest {
    WatchRequest {
        collections: collections.iter().map(|c| c.to_string()).collect(),
        ..Default::default()
    }
}

pub async fn watch_delivers_committed_changes_in_order(mut t: TestServer) {
    let c = &mut t.client;
    let mut events = watch(c, watching(&["orders"])).await;
    let first = c
        .save(save("orders", "a", doc(1.0)))
        .await
        .unwrap()
        .into_inner();
    c.save(save("unwatched", "x", doc(1.0))).await.unwrap();
    let second = c
        .save(save("orders", "a", doc(2.0)))
        .await
        .unwrap()
        .into_inner();
    c.delete(delete("orders", "a", "")).await.unwrap();
    let expected = [
        (Kind::Saved, first.rev.clone()),
        (Kind::Saved, second.rev.clone()),
        (Kind::Deleted, second.rev.clone()),
    ];
    let mut tokens = Vec::new();
    for (kind, rev) in expected {
        let e = next_change(&mut events).await;
        assert_eq!(
            (e.kind(), e.collection.as_str(), e.id.as_str()),
            (kind, "orders", "a")
        );
        assert_eq!(e.rev, rev);
        assert!(e.document.is_none(), "no documents unless asked");
        assert!(e.commit_time.is_some());
        tokens.push(e.resume_token);
    }
    // Resuming after the first event delivers the rest, once.
    let mut resumed = watch(
        c,
        WatchRequest {
            resume_token: tokens[0].clone(),
            include_documents: true,
            ..watching(&["orders"])
        },
    )
    .await;
    let e = next_change(&mut resumed).await;
    assert_eq!(
        (e.kind(), e.rev.as_str()),
        (Kind::Saved, second.rev.as_str())
    );
    // The document as that change committed it.
    assert_eq!(number_field(&e.document.unwrap().data.unwrap(), "n"), 2.0);
    let e = next_change(&mut resumed).await;
    assert_eq!(e.kind(), Kind::Deleted);
    assert!(e.document.is_none());
}

pub async fn list_then_watch_misses_nothing(mut t: TestServer) {
    let c = &mut t.client;
    c.save(save("orders", "before", doc(1.0))).await.unwrap();
    let page = c
        .list(ListRequest {
            collection: "orders".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.documents.len(), 1);
    let after = c
        .save(save("orders", "after", doc(2.0)))
        .await
        .unwrap()
        .into_inner();
    let mut events = watch(
        c,
        WatchRequest {
            resume_token: page.resume_token,
            ..watching(&[])
        },
    )
    .await;
    // A change may be seen twice, never missed.
    loop {
        let e = next_change(&mut events).await;
        if e.id == "after" {
            assert_eq!(e.rev, after.rev);
            break;
        }
        assert_eq!(e.id, "before");
    }
}

pub async fn a_write_over_an_expired_document_reports_the_expiry(mut t: TestServer) {
    let c = &mut t.client;
    let old = c
        .save(SaveRequest {
            expiration: Some(save_request::Expiration::Ttl(Duration {
                seconds: 5,
                nanos: 0,
            })),
            ..save("orders", "e", doc(1.0))
        })
        .await
        .unwrap()
        .into_inner();
    let mut events = watch(c, watching(&["orders"])).await;
    t.clock.advance(6_000_000);
    let new = c
        .save(save("orders", "e", doc(2.0)))
        .await
        .unwrap()
        .into_inner();
    let e = next_change(&mut events).await;
    assert_eq!(
        (e.kind(), e.rev.as_str()),
        (Kind::Expired, old.rev.as_str())
    );
    let e = next_change(&mut events).await;
    assert_eq!((e.kind(), e.rev.as_str()), (Kind::Saved, new.rev.as_str()));
}

pub async fn quiet_streams_send_progress(t: TestServer) {
    let backend = t.backend;
    drop(t);
    let Some(mut t) = TestServer::start(backend, &["--watch-progress", "0.2"]).await else {
        return;
    };
    let mut events = watch(&mut t.client, watching(&["quiet"])).await;
    let e = tokio::time::timeout(std::time::Duration::from_secs(10), events.message())
        .await
        .expect("a PROGRESS event in time")
        .unwrap()
        .unwrap();
    assert_eq!(e.kind(), Kind::Progress);
    assert!(!e.resume_token.is_empty());
    assert!(e.id.is_empty() && e.collection.is_empty());
    // Its token resumes.
    let saved = t
        .client
        .save(save("quiet", "q", doc(1.0)))
        .await
        .unwrap()
        .into_inner();
    let mut resumed = watch(
        &mut t.client,
        WatchRequest {
            resume_token: e.resume_token,
            ..watching(&["quiet"])
        },
    )
    .await;
    assert_eq!(next_change(&mut resumed).await.rev, saved.rev);
}

pub async fn resume_tokens_are_validated(mut t: TestServer) {
    let c = &mut t.client;
    for token in [
        "garbage",
        "AwAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    ] {
        let status = c
            .watch(WatchRequest {
                resume_token: token.into(),
                ..watching(&["orders"])
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
        assert!(
            status.message().contains("resume_token"),
            "{}",
            status.message()
        );
    }
    assert_status(
        c.watch(watching(&["Bad-Name"])).await,
        Code::InvalidArgument,
        "is invalid",
    );
}
