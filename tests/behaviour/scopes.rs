//! Row scopes and protected fields, as services sharing a database see them:
//! each case starts more servers on the first one's database, each with its
//! own policy. (The memory store lives in one process; it cannot be shared.)

use super::queries::{filter, order};
use super::support::*;
use super::updates::{transform, update};
use super::watch::watch;
use crate::common::*;
use docsidecar::proto::{
    change_event::Kind, field_transform::Op as T, filter::Operator, mutation::Op, order::Direction,
    BatchGetRequest, ChangeEvent, CountRequest, GetRequest, ListRequest, Mutation, QueryRequest,
    SaveRequest, WatchRequest, WriteRequest,
};
use prost_types::Struct;
use std::path::Path;
use tonic::{Code, Streaming};

fn policy(dir: &Path, name: &str, body: &str) -> String {
    let path = dir.join(format!("{name}.toml"));
    let text = format!("service = \"{name}\"\nauto_create = true\n{body}");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

fn scoped(scope: &str) -> String {
    format!("[collections.integrations]\naccess = \"read-write\"\nscope = \"{scope}\"\n")
}

fn in_scope<T>(mut request: T, scope: &str, set: impl FnOnce(&mut T, String)) -> T {
    set(&mut request, scope.into());
    request
}

async fn list_keys(c: &mut Client, scope: &str, page_size: i32) -> Vec<(String, String)> {
    let mut keys = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = c
            .list(ListRequest {
                collection: "integrations".into(),
                scope: scope.into(),
                page_size,
                page_token,
            })
            .await
            .unwrap()
            .into_inner();
        keys.extend(page.documents.into_iter().map(|d| (d.id, d.scope)));
        if page.next_page_token.is_empty() {
            return keys;
        }
        page_token = page.next_page_token;
    }
}

async fn count(c: &mut Client, scope: &str) -> i64 {
    c.count(CountRequest {
        collection: "integrations".into(),
        scope: scope.into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .count
}

/// The events a stream sends before its first PROGRESS.
async fn until_progress(stream: &mut Streaming<ChangeEvent>) -> Vec<ChangeEvent> {
    let mut events = Vec::new();
    loop {
        let event = tokio::time::timeout(std::time::Duration::from_secs(20), stream.message())
            .await
            .expect("an event in time")
            .unwrap()
            .expect("the stream goes on");
        if event.kind() == Kind::Progress {
            return events;
        }
        events.push(event);
    }
}

/// A status as another scope's id would give it, with the id replaced: an
/// id taken in another scope must answer exactly as one taken nowhere.
fn shape(status: tonic::Status, id: &str) -> (Code, String, String) {
    let r = reason(&status);
    (status.code(), status.message().replace(id, "<id>"), r)
}

pub async fn each_scope_sees_only_its_own_rows(t: TestServer) {
    let dir = tempfile::tempdir().unwrap();
    let progress = ["--watch-progress", "1"];
    let twitch = policy(dir.path(), "twitch", &scoped("twitch"));
    let discord = policy(dir.path(), "discord", &scoped("discord"));
    let report = policy(
        dir.path(),
        "report",
        "[collections.integrations]\naccess = \"read-only\"\nallow_scans = true\n",
    );
    let mut a = t
        .share(&["--policy", &twitch, progress[0], progress[1]])
        .await;
    let mut b = t.share(&["--policy", &discord]).await;
    let mut r = t.share(&["--policy", &report]).await;
    let start = a
        .client
        .list(ListRequest {
            collection: "integrations".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .resume_token;

    // One id, two scopes, two documents; create_only cannot probe the other.
    let create = |n: f64| SaveRequest {
        create_only: true,
        ..save("integrations", "x", doc(n))
    };
    let made_a = a.client.save(create(1.0)).await.unwrap().into_inner();
    let made_b = b.client.save(create(2.0)).await.unwrap().into_inner();
    assert!(made_a.created && made_b.created);
    let only_b = b
        .client
        .save(save("integrations", "only-b", doc(3.0)))
        .await
        .unwrap()
        .into_inner();
    let got = a
        .client
        .get(get("integrations", "x"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            number_field(got.data.as_ref().unwrap(), "n"),
            got.scope.as_str()
        ),
        (1.0, "twitch")
    );
    let got = b
        .client
        .get(get("integrations", "x"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            number_field(got.data.as_ref().unwrap(), "n"),
            got.scope.as_str()
        ),
        (2.0, "discord")
    );

    // Naming the own scope works; another is refused without a look.
    let named = in_scope(get("integrations", "x"), "twitch", |r, s| r.scope = s);
    assert_eq!(
        a.client.get(named).await.unwrap().into_inner().rev,
        made_a.rev
    );
    let other = in_scope(get("integrations", "x"), "discord", |r, s| r.scope = s);
    let denied = a.client.get(other).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert_eq!(reason(&denied), "SCOPE_NOT_ALLOWED");

    // Another scope's id answers as an id taken nowhere, for every RPC.
    let unseen = |status: tonic::Status| shape(status, "only-b");
    let never = |status: tonic::Status| shape(status, "never");
    let c = &mut a.client;
    assert_eq!(
        unseen(c.get(get("integrations", "only-b")).await.unwrap_err()),
        never(c.get(get("integrations", "never")).await.unwrap_err())
    );
    assert_eq!(
        unseen(
            c.delete(delete("integrations", "only-b", ""))
                .await
                .unwrap_err()
        ),
        never(
            c.delete(delete("integrations", "never", ""))
                .await
                .unwrap_err()
        )
    );
    assert_eq!(
        unseen(
            c.update(update("integrations", "only-b"))
                .await
                .unwrap_err()
        ),
        never(c.update(update("integrations", "never")).await.unwrap_err())
    );
    let conditional = |id: &str| SaveRequest {
        expected_rev: only_b.rev.clone(),
        ..save("integrations", id, doc(9.0))
    };
    assert_eq!(
        unseen(c.save(conditional("only-b")).await.unwrap_err()),
        never(c.save(conditional("never")).await.unwrap_err())
    );
    let batch = c
        .batch_get(BatchGetRequest {
            collection: "integrations".into(),
            ids: vec!["x".into(), "only-b".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(batch.documents.len(), 1);
    assert_eq!(batch.documents[0].rev, made_a.rev);
    assert_eq!(batch.missing_ids, ["only-b"]);

    // Walks, counts and queries stay in the scope.
    assert_eq!(list_keys(c, "", 1).await, [("x".into(), "twitch".into())]);
    assert_eq!(count(c, "").await, 1);
    let everything = c
        .query(QueryRequest {
            collection: "integrations".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(everything.documents.len(), 1);
    assert_eq!(count(&mut b.client, "").await, 2);
    // A Write touching only-b in A's scope creates A's own document.
    let write = WriteRequest {
        mutations: vec![Mutation {
            op: Some(Op::Save(save("integrations", "only-b", doc(4.0)))),
        }],
    };
    c.write(write).await.unwrap();
    let theirs = b
        .client
        .get(get("integrations", "only-b"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(theirs.rev, only_b.rev, "B's document is untouched");

    // Watch: A's stream carries A's changes only.
    let mut stream = watch(
        c,
        WatchRequest {
            collections: vec!["integrations".into()],
            resume_token: start,
            ..Default::default()
        },
    )
    .await;
    let events = until_progress(&mut stream).await;
    let seen: Vec<(&str, &str)> = events
        .iter()
        .map(|e| (e.id.as_str(), e.scope.as_str()))
        .collect();
    assert_eq!(seen, [("x", "twitch"), ("only-b", "twitch")]);

    // The reporting service reads every scope, in (id, scope) order, page by page.
    let all = vec![
        ("only-b".to_string(), "discord".to_string()),
        ("only-b".into(), "twitch".into()),
        ("x".into(), "discord".into()),
        ("x".into(), "twitch".into()),
    ];
    assert_eq!(list_keys(&mut r.client, "", 1).await, all);
    assert_eq!(list_keys(&mut r.client, "", 100).await, all);
    let discord = vec![all[0].clone(), all[2].clone()];
    assert_eq!(list_keys(&mut r.client, "discord", 1).await, discord);
    assert_eq!(count(&mut r.client, "").await, 4);
    assert_eq!(count(&mut r.client, "twitch").await, 2);
    let needs_scope = r.client.get(get("integrations", "x")).await.unwrap_err();
    assert_eq!(needs_scope.code(), Code::InvalidArgument);
    assert!(
        needs_scope.message().contains("scope is required"),
        "{}",
        needs_scope.message()
    );
    let got = r
        .client
        .get(in_scope(get("integrations", "x"), "discord", |r, s| {
            r.scope = s
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.rev, made_b.rev);
    let write = r
        .client
        .save(save("integrations", "y", doc(1.0)))
        .await
        .unwrap_err();
    assert_eq!(reason(&write), "COLLECTION_READ_ONLY");
    let ordered = QueryRequest {
        collection: "integrations".into(),
        order_by: vec![order("n", Direction::Descending)],
        ..Default::default()
    };
    let ids: Vec<(String, String)> = r
        .client
        .query(ordered)
        .await
        .unwrap()
        .into_inner()
        .documents
        .into_iter()
        .map(|d| (d.id, d.scope))
        .collect();
    assert_eq!(ids[0], ("only-b".into(), "twitch".into()), "n = 4 first");
    for s in [a, b, r] {
        s.stop().await;
    }
}

fn account(status: &str, ssn: &str, name: &str) -> Struct {
    object(vec![
        ("status", string(status)),
        (
            "secret",
            nested(object(vec![("ssn", string(ssn)), ("pin", num(1.0))])),
        ),
        ("name", string(name)),
    ])
}

fn has_ssn(data: &Struct) -> bool {
    match data.fields.get("secret").and_then(|v| v.kind.as_ref()) {
        Some(prost_types::value::Kind::StructValue(s)) => s.fields.contains_key("ssn"),
        _ => false,
    }
}

fn text_field(data: &Struct, key: &str) -> String {
    match data.fields.get(key).and_then(|v| v.kind.as_ref()) {
        Some(prost_types::value::Kind::StringValue(s)) => s.clone(),
        other => panic!("{key} is {other:?}"),
    }
}

#[track_caller]
fn refused<T: std::fmt::Debug>(result: Result<T, tonic::Status>, why: &str, field: &str) {
    let status = result.unwrap_err();
    assert_eq!(
        status.code(),
        Code::PermissionDenied,
        "{}",
        status.message()
    );
    assert_eq!(reason(&status), why);
    assert!(status.message().contains(field), "{}", status.message());
}

pub async fn read_only_and_hidden_fields_are_enforced(mut t: TestServer) {
    let dir = tempfile::tempdir().unwrap();
    let guarded = policy(
        dir.path(),
        "guarded",
        "[collections.accounts]\naccess = \"read-write\"\nallow_scans = true\nread_only_fields = [\"status\"]\nhidden_fields = [\"secret.ssn\"]\n",
    );
    // The open server plays the service that owns the protected fields.
    let owner = &mut t.client;
    owner
        .save(save("accounts", "a1", account("new", "123", "x")))
        .await
        .unwrap();
    let mut p = t.share(&["--policy", &guarded]).await;
    let c = &mut p.client;
    let start = c
        .list(ListRequest {
            collection: "accounts".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        !has_ssn(start.documents[0].data.as_ref().unwrap()),
        "List hides it"
    );
    let mut events = watch(
        c,
        WatchRequest {
            collections: vec!["accounts".into()],
            include_documents: true,
            resume_token: start.resume_token,
        },
    )
    .await;

    let got = c.get(get("accounts", "a1")).await.unwrap().into_inner();
    let data = got.data.clone().unwrap();
    assert!(!has_ssn(&data), "Get hides it");
    assert_eq!(text_field(&data, "status"), "new");

    // Get-then-Save works: hidden and read-only values are kept.
    c.save(SaveRequest {
        data: Some(data),
        ..save("accounts", "a1", Struct::default())
    })
    .await
    .unwrap();
    c.save(save("accounts", "a1", object(vec![("name", string("y"))])))
        .await
        .unwrap();
    let stored = t
        .client
        .get(get("accounts", "a1"))
        .await
        .unwrap()
        .into_inner();
    let stored = stored.data.unwrap();
    assert!(has_ssn(&stored));
    assert_eq!(
        (text_field(&stored, "status"), text_field(&stored, "name")),
        ("new".into(), "y".into())
    );

    let c = &mut p.client;
    // Read-only: changed or set at creation is refused; unchanged is accepted.
    refused(
        c.save(save(
            "accounts",
            "a1",
            object(vec![("status", string("done"))]),
        ))
        .await,
        "FIELD_READ_ONLY",
        "status",
    );
    c.save(save(
        "accounts",
        "a1",
        object(vec![("status", string("new"))]),
    ))
    .await
    .unwrap();
    refused(
        c.save(save(
            "accounts",
            "a2",
            object(vec![("status", string("x"))]),
        ))
        .await,
        "FIELD_READ_ONLY",
        "status",
    );
    let mut set_status = update("accounts", "a1");
    set_status.merge = Some(object(vec![("status", string("done"))]).into());
    refused(c.update(set_status).await, "FIELD_READ_ONLY", "status");

    // Hidden: any value (even the stored one) and any enclosing object refused.
    for ssn in ["999", "123"] {
        let body = object(vec![("secret", nested(object(vec![("ssn", string(ssn))])))]);
        refused(
            c.save(save("accounts", "a1", body)).await,
            "FIELD_HIDDEN",
            "secret.ssn",
        );
    }
    let mut clear = update("accounts", "a1");
    clear.merge = Some(object(vec![("secret", null())]).into());
    refused(c.update(clear).await, "FIELD_HIDDEN", "secret.ssn");
    let mut bump = update("accounts", "a1");
    bump.transforms = vec![transform("secret.ssn", T::Increment(num(1.0)))];
    refused(c.update(bump).await, "FIELD_HIDDEN", "secret.ssn");
    let write = WriteRequest {
        mutations: vec![
            Mutation {
                op: Some(Op::Save(save("accounts", "a3", doc(1.0)))),
            },
            Mutation {
                op: Some(Op::Save(save(
                    "accounts",
                    "a1",
                    object(vec![("secret", string("flat"))]),
                ))),
            },
        ],
    };
    let status = c.write(write).await.unwrap_err();
    assert!(
        status.message().starts_with("mutation 1:"),
        "{}",
        status.message()
    );
    assert_eq!(reason(&status), "FIELD_HIDDEN");

    // A sibling of the hidden field is fine; the response hides it still.
    let mut pin = update("accounts", "a1");
    pin.merge = Some(object(vec![("secret", nested(object(vec![("pin", num(2.0))])))]).into());
    let updated = c.update(pin).await.unwrap().into_inner();
    assert!(!has_ssn(updated.document.unwrap().data.as_ref().unwrap()));

    // Queries may not filter or order on it, nor on what holds it.
    let on = |field: &str| QueryRequest {
        collection: "accounts".into(),
        filters: vec![filter(field, Operator::Equal, string("123"))],
        ..Default::default()
    };
    refused(
        c.query(on("secret.ssn")).await,
        "FIELD_HIDDEN",
        "secret.ssn",
    );
    refused(c.query(on("secret")).await, "FIELD_HIDDEN", "secret.ssn");
    refused(
        c.count(CountRequest {
            collection: "accounts".into(),
            filters: vec![filter("secret.ssn", Operator::Exists, boolean(true))],
            ..Default::default()
        })
        .await,
        "FIELD_HIDDEN",
        "secret.ssn",
    );
    let ordered = QueryRequest {
        collection: "accounts".into(),
        order_by: vec![order("secret.ssn", Direction::Ascending)],
        ..Default::default()
    };
    refused(c.query(ordered).await, "FIELD_HIDDEN", "secret.ssn");
    let new = QueryRequest {
        collection: "accounts".into(),
        filters: vec![filter("status", Operator::Equal, string("new"))],
        ..Default::default()
    };
    let found = c.query(new).await.unwrap().into_inner().documents;
    assert_eq!(found.len(), 1);
    assert!(!has_ssn(found[0].data.as_ref().unwrap()));
    let batch = c
        .batch_get(BatchGetRequest {
            collection: "accounts".into(),
            ids: vec!["a1".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!has_ssn(batch.documents[0].data.as_ref().unwrap()));

    // The owner's value survived everything; events never carried it.
    let stored = t
        .client
        .get(get("accounts", "a1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(text_field(&stored.data.unwrap(), "status"), "new");
    t.client
        .save(save("accounts", "a1", account("new", "456", "z")))
        .await
        .unwrap();
    let mut saw_owner_write = false;
    while !saw_owner_write {
        let event = super::watch::next_change(&mut events).await;
        let data = event.document.expect("include_documents").data.unwrap();
        assert!(!has_ssn(&data), "an event carried the hidden field");
        saw_owner_write = data.fields.contains_key("name") && text_field(&data, "name") == "z";
    }
    let denied = p.client.get(GetRequest {
        scope: "any".into(),
        ..get("accounts", "a1")
    });
    assert_status(denied.await, Code::InvalidArgument, "has no row scopes");
    p.stop().await;
}
