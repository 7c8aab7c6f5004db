//! Update: merge patches, transforms, conditions; idempotent deletes; Writes
//! that mix saves, updates and deletes.

use super::support::*;
use crate::common::*;
use docsidecar::proto::{
    field_transform::Op as T, mutation::Op, DeleteRequest, FieldTransform, Mutation, UpdateRequest,
    WriteRequest,
};
use prost_types::{ListValue, Struct, Value};
use tonic::Code;
use tonic_types::StatusExt;

pub fn update(collection: &str, id: &str) -> UpdateRequest {
    UpdateRequest {
        collection: collection.into(),
        id: id.into(),
        ..Default::default()
    }
}

pub fn transform(field: &str, op: T) -> FieldTransform {
    FieldTransform {
        field: field.into(),
        op: Some(op),
    }
}

fn values(items: Vec<Value>) -> ListValue {
    ListValue { values: items }
}

/// The document's data after `update`, as the response returned it; checks
/// that a Get returns the same.
async fn updated(client: &mut Client, request: UpdateRequest) -> Struct {
    let (collection, id) = (request.collection.clone(), request.id.clone());
    let response = client.update(request).await.unwrap().into_inner();
    let document = response.document.unwrap();
    assert_eq!(document.rev, response.rev);
    let stored = client
        .get(get(&collection, &id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stored, document);
    document.data.unwrap().into()
}

pub async fn update_applies_a_merge_patch(mut t: TestServer) {
    let c = &mut t.client;
    let first = c
        .save(save(
            "docs",
            "a",
            object(vec![
                ("a", nested(object(vec![("b", num(1.0)), ("c", num(2.0))]))),
                ("keep", boolean(true)),
                ("gone", num(1.0)),
            ]),
        ))
        .await
        .unwrap()
        .into_inner();
    let mut request = update("docs", "a");
    request.merge = Some(
        object(vec![
            ("a", nested(object(vec![("b", null()), ("d", num(3.0))]))),
            ("gone", null()),
            ("new", string("x")),
        ])
        .into(),
    );
    let response = c.update(request.clone()).await.unwrap().into_inner();
    assert!(!response.created);
    assert_ne!(response.rev, first.rev);
    let data = updated(
        c,
        UpdateRequest {
            merge: None,
            ..request
        },
    )
    .await;
    assert_eq!(
        data,
        object(vec![
            ("a", nested(object(vec![("c", num(2.0)), ("d", num(3.0))]))),
            ("keep", boolean(true)),
            ("new", string("x")),
        ])
    );
    // A patch replaces anything that is not an object on either side.
    let mut request = update("docs", "a");
    request.merge = Some(
        object(vec![
            ("a", list(vec![num(1.0)])),
            ("keep", nested(object(vec![]))),
        ])
        .into(),
    );
    let data = updated(c, request).await;
    assert_eq!(data.fields["a"], list(vec![num(1.0)]));
    assert_eq!(data.fields["keep"], nested(object(vec![])));
}

pub async fn transforms_apply_in_order(mut t: TestServer) {
    let c = &mut t.client;
    c.save(save(
        "docs",
        "t",
        object(vec![
            ("n", num(1.0)),
            (
                "tags",
                list(vec![string("a"), nested(object(vec![("k", num(1.0))]))]),
            ),
        ]),
    ))
    .await
    .unwrap();
    let mut request = update("docs", "t");
    request.transforms = vec![
        transform("n", T::Increment(num(2.5))),
        transform("stats.views", T::Increment(num(1.0))),
        transform("`odd.key`.x", T::Maximum(num(3.0))),
        transform("n", T::Minimum(num(-1.0))),
        transform("hi", T::Maximum(num(7.0))),
        transform(
            "tags",
            T::AppendMissing(values(vec![
                nested(object(vec![("k", num(1.0))])),
                string("b"),
                string("b"),
            ])),
        ),
        transform("fresh", T::AppendMissing(values(vec![num(1.0), num(1.0)]))),
        transform("tags", T::RemoveAll(values(vec![string("a")]))),
        transform("absent.list", T::RemoveAll(values(vec![num(1.0)]))),
        transform("at", T::SetToServerTime(true)),
    ];
    let data = updated(c, request).await;
    assert_eq!(number_field(&data, "n"), -1.0);
    assert_eq!(number_field(&data, "hi"), 7.0);
    let Some(prost_types::value::Kind::StructValue(stats)) = &data.fields["stats"].kind else {
        panic!("missing parents are created: {data:?}");
    };
    assert_eq!(number_field(stats, "views"), 1.0);
    assert!(data.fields.contains_key("odd.key"));
    assert_eq!(
        data.fields["tags"],
        list(vec![nested(object(vec![("k", num(1.0))])), string("b")])
    );
    assert_eq!(data.fields["fresh"], list(vec![num(1.0)]));
    assert!(
        !data.fields.contains_key("absent"),
        "remove_all leaves a missing field missing"
    );
    let Some(prost_types::value::Kind::StringValue(at)) = &data.fields["at"].kind else {
        panic!("server time is a string: {data:?}");
    };
    // RFC 3339, microseconds, UTC.
    assert_eq!(at.len(), "2026-11-23T17:35:00.123456Z".len(), "{at}");
    assert!(
        at.ends_with('Z') && at.as_bytes()[10] == b'T' && at.as_bytes()[19] == b'.',
        "{at}"
    );
}

pub async fn transforms_on_wrong_types_name_the_field(mut t: TestServer) {
    let c = &mut t.client;
    c.save(save(
        "docs",
        "w",
        object(vec![("s", string("x")), ("n", num(1.0))]),
    ))
    .await
    .unwrap();
    let cases = [
        (
            transform("s", T::Increment(num(1.0))),
            "field `s` is a string",
        ),
        (
            transform("n", T::AppendMissing(values(vec![]))),
            "field `n` is a number",
        ),
        (
            transform("s.x", T::Increment(num(1.0))),
            "`s` is a string, not an object",
        ),
        (
            transform("n", T::Increment(string("1"))),
            "transforms[0].increment must hold a finite number",
        ),
        (transform("__id__", T::Increment(num(1.0))), "__id__"),
        (
            transform("a..b", T::Increment(num(1.0))),
            "transforms[0].field",
        ),
        (
            transform("n", T::SetToServerTime(false)),
            "set_to_server_time",
        ),
        (
            FieldTransform {
                field: "n".into(),
                op: None,
            },
            "op is not set",
        ),
    ];
    for (t, message) in cases {
        let mut request = update("docs", "w");
        request.transforms = vec![t];
        let status = c.update(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
        assert!(
            status.message().contains(message),
            "{}: {message}",
            status.message()
        );
        let details = status.get_error_details();
        let field = &details
            .bad_request()
            .expect("a BadRequest")
            .field_violations[0]
            .field;
        assert!(field.starts_with("transforms[0]"), "{field}");
    }
    // Nothing changed.
    let doc = c.get(get("docs", "w")).await.unwrap().into_inner();
    assert_eq!(number_field(&doc.data.unwrap(), "n"), 1.0);
}

pub async fn update_conditions(mut t: TestServer) {
    let c = &mut t.client;
    assert_status(
        c.update(update("docs", "u")).await,
        Code::NotFound,
        "not found",
    );
    let mut request = update("docs", "u");
    request.allow_missing = true;
    request.transforms = vec![transform("n", T::Increment(num(5.0)))];
    let created = c.update(request).await.unwrap().into_inner();
    assert!(created.created);
    assert_eq!(
        number_field(&created.document.unwrap().data.unwrap(), "n"),
        5.0
    );

    let mut request = update("docs", "u");
    request.expected_rev = "stale".into();
    assert_status(c.update(request).await, Code::Aborted, "not the expected");
    // expected_rev on an absent document is ABORTED whatever allow_missing says.
    let mut request = update("docs", "nobody");
    request.expected_rev = "r".into();
    request.allow_missing = true;
    assert_status(c.update(request).await, Code::Aborted, "does not exist");

    let mut request = update("docs", "u");
    request.expected_rev = created.rev.clone();
    request.merge = Some(object(vec![("m", boolean(true))]).into());
    let response = c.update(request).await.unwrap().into_inner();
    assert!(!response.created);
    assert_ne!(response.rev, created.rev);
}

pub async fn update_results_obey_the_document_rules(mut t: TestServer) {
    let c = &mut t.client;
    let half = "x".repeat(600 * 1024);
    c.save(save("docs", "big", object(vec![("a", string(&half))])))
        .await
        .unwrap();
    let mut request = update("docs", "big");
    request.merge = Some(object(vec![("b", string(&half))]).into());
    assert_status(
        c.update(request).await,
        Code::InvalidArgument,
        "over the limit",
    );

    let mut deep = object(vec![("leaf", num(1.0))]);
    for _ in 0..18 {
        deep = object(vec![("n", nested(deep))]);
    }
    c.save(save(
        "docs",
        "deep",
        object(vec![("top", nested(object(vec![])))]),
    ))
    .await
    .unwrap();
    let mut request = update("docs", "deep");
    request.merge =
        Some(object(vec![("top", nested(object(vec![("more", nested(deep))])))]).into());
    assert_status(
        c.update(request).await,
        Code::InvalidArgument,
        "deeper than 20",
    );
}

/// 64 concurrent increments of one field (N rounds each): no update is lost.
pub async fn concurrent_increments_lose_nothing(t: TestServer) {
    const TASKS: usize = 64;
    const EACH: usize = 4;
    let mut c = t.client.clone();
    c.save(save("counters", "hits", object(vec![("n", num(0.0))])))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut handles = Vec::new();
    for _ in 0..TASKS {
        let mut c = t.client.clone();
        handles.push(tokio::spawn(async move {
            for _ in 0..EACH {
                let mut request = update("counters", "hits");
                request.transforms = vec![transform("n", T::Increment(num(1.0)))];
                c.update(request).await.unwrap();
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let doc = c.get(get("counters", "hits")).await.unwrap().into_inner();
    assert_eq!(number_field(&doc.data.unwrap(), "n"), (TASKS * EACH) as f64);
    println!(
        "{:?}: {TASKS} tasks x {EACH} increments = {} in {:?}",
        t.backend,
        TASKS * EACH,
        started.elapsed()
    );
}

pub async fn deletes_may_allow_missing(mut t: TestServer) {
    let c = &mut t.client;
    let absent = DeleteRequest {
        allow_missing: true,
        ..delete("docs", "never", "")
    };
    c.delete(absent.clone()).await.unwrap();
    // With expected_rev, an absent document is still fine; a present one needs the rev.
    c.delete(DeleteRequest {
        expected_rev: "r".into(),
        ..absent
    })
    .await
    .unwrap();
    let saved = c
        .save(save("docs", "d", doc(1.0)))
        .await
        .unwrap()
        .into_inner();
    let stale = DeleteRequest {
        allow_missing: true,
        ..delete("docs", "d", "stale")
    };
    assert_status(c.delete(stale).await, Code::Aborted, "not the expected");
    c.delete(DeleteRequest {
        allow_missing: true,
        ..delete("docs", "d", &saved.rev)
    })
    .await
    .unwrap();
    assert_status(c.get(get("docs", "d")).await, Code::NotFound, "not found");
    // In a Write, such a delete in a collection never written to leaves the
    // other mutations applied (PostgreSQL once rolled them back, answering OK).
    let mixed = c
        .write(WriteRequest {
            mutations: vec![
                super::writes::save_op("docs", "kept", 2.0),
                Mutation {
                    op: Some(Op::Delete(DeleteRequest {
                        allow_missing: true,
                        ..delete("never_written", "x", "")
                    })),
                },
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(mixed.results.len(), 2);
    let kept = c.get(get("docs", "kept")).await.unwrap().into_inner();
    assert_eq!(kept.data.map(Struct::from), Some(doc(2.0)));
}

pub async fn write_mixes_saves_updates_and_deletes(mut t: TestServer) {
    let c = &mut t.client;
    c.save(save("docs", "counter", object(vec![("n", num(1.0))])))
        .await
        .unwrap();
    c.save(save("docs", "old", doc(1.0))).await.unwrap();
    let mut bump = update("docs", "counter");
    bump.transforms = vec![transform("n", T::Increment(num(1.0)))];
    let mutation = |op| Mutation { op: Some(op) };
    let response = c
        .write(WriteRequest {
            mutations: vec![
                mutation(Op::Save(save("other", "new", doc(2.0)))),
                mutation(Op::Update(bump.clone())),
                mutation(Op::Delete(delete("docs", "old", ""))),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.results.len(), 3);
    assert!(!response.results[1].rev.is_empty());
    assert!(response.results[2].rev.is_empty());
    let counter = c.get(get("docs", "counter")).await.unwrap().into_inner();
    assert_eq!(counter.rev, response.results[1].rev);
    assert_eq!(number_field(&counter.data.unwrap(), "n"), 2.0);

    // A failing update rolls back the whole write, and is named.
    let mut bad = update("docs", "counter");
    bad.transforms = vec![transform("n", T::AppendMissing(values(vec![])))];
    let status = c
        .write(WriteRequest {
            mutations: vec![
                mutation(Op::Update(bump)),
                mutation(Op::Save(save("docs", "x", doc(1.0)))),
                mutation(Op::Update(bad)),
            ],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
    assert!(
        status.message().starts_with("mutation 2: "),
        "{}",
        status.message()
    );
    let details = status.get_error_details();
    assert_eq!(
        details.bad_request().unwrap().field_violations[0].field,
        "mutations[2].update.transforms[0]"
    );
    let counter = c.get(get("docs", "counter")).await.unwrap().into_inner();
    assert_eq!(number_field(&counter.data.unwrap(), "n"), 2.0);
    assert_status(c.get(get("docs", "x")).await, Code::NotFound, "not found");
}
