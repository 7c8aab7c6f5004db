//! The behaviour suite: the document semantics of the API contract, written once
//! and run against every store over real gRPC.

mod common;

use common::*;
use docsidecar::proto::{
    mutation::Op, BatchGetRequest, DeleteRequest, GetRequest, ListCollectionsRequest, ListRequest,
    Mutation, SaveRequest, WriteRequest,
};
use prost_types::Struct;
use std::collections::BTreeSet;
use tonic::Code;

fn save(collection: &str, id: &str, data: Struct) -> SaveRequest {
    SaveRequest {
        collection: collection.into(),
        id: id.into(),
        data: Some(data),
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

fn delete(collection: &str, id: &str, expected_rev: &str) -> DeleteRequest {
    DeleteRequest {
        collection: collection.into(),
        id: id.into(),
        expected_rev: expected_rev.into(),
        ..Default::default()
    }
}

fn doc(n: f64) -> Struct {
    object(vec![("n", num(n))])
}

#[track_caller]
fn assert_status<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, contains: &str) {
    match result {
        Ok(v) => panic!("expected {code:?} ({contains}), got OK: {v:?}"),
        Err(s) => {
            assert_eq!(s.code(), code, "message: {}", s.message());
            assert!(
                s.message().contains(contains),
                "`{}` does not contain `{contains}`",
                s.message()
            );
        }
    }
}

/// Every document id of a collection, by walking List pages of `page_size`.
async fn walk(client: &mut Client, collection: &str, page_size: i32) -> Vec<String> {
    let mut ids = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list(ListRequest {
                collection: collection.into(),
                page_size,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        ids.extend(page.documents.into_iter().map(|d| d.id));
        if page.next_page_token.is_empty() {
            return ids;
        }
        token = page.next_page_token;
    }
}

async fn bulk_insert(client: &mut Client, collection: &str, ids: &[String]) {
    for chunk in ids.chunks(500) {
        let mutations = chunk
            .iter()
            .map(|id| Mutation {
                op: Some(Op::Save(save(collection, id, doc(1.0)))),
            })
            .collect();
        client.write(WriteRequest { mutations }).await.unwrap();
    }
}

pub async fn round_trips_every_json_type(mut t: TestServer) {
    let data = object(vec![
        ("null", null()),
        ("true", boolean(true)),
        ("false", boolean(false)),
        ("zero", num(0.0)),
        ("negative", num(-1.5)),
        ("big", num(1e300)),
        ("tiny", num(5e-324)),
        ("max_safe_int", num(9007199254740991.0)),
        ("text", string("plain")),
        (
            "unicode",
            string("héllo wörld ✓ 漢字 🎉 \u{1} \u{7f} \"quoted\" \\ \n\t"),
        ),
        ("empty_string", string("")),
        ("empty_object", nested(object(vec![]))),
        ("empty_list", list(vec![])),
        (
            "list",
            list(vec![
                num(1.0),
                string("two"),
                null(),
                list(vec![boolean(false)]),
            ]),
        ),
        (
            "ключ 🔑",
            nested(object(vec![(
                "deep",
                nested(object(vec![("er", num(3.0))])),
            )])),
        ),
    ]);
    let saved = t
        .client
        .save(save("things", "all-types", data.clone()))
        .await
        .unwrap()
        .into_inner();
    assert!(saved.created);
    let got = t
        .client
        .get(get("things", "all-types"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.data, Some(data));
    assert_eq!(got.collection, "things");
    assert_eq!(got.id, "all-types");
    assert_eq!(got.rev, saved.rev);
    assert_eq!(got.update_time, saved.update_time);
    assert_eq!(got.create_time, saved.update_time);
}

pub async fn save_is_an_upsert_with_fresh_revs(mut t: TestServer) {
    let first = t
        .client
        .save(save("c", "a", doc(1.0)))
        .await
        .unwrap()
        .into_inner();
    assert!(first.created);
    assert_eq!(first.id, "a");
    assert!(!first.rev.is_empty());
    let second = t
        .client
        .save(save("c", "a", doc(2.0)))
        .await
        .unwrap()
        .into_inner();
    assert!(!second.created);
    assert_ne!(first.rev, second.rev);
    let got = t.client.get(get("c", "a")).await.unwrap().into_inner();
    assert_eq!(number_field(got.data.as_ref().unwrap(), "n"), 2.0);
    assert_eq!(got.rev, second.rev);
    assert_eq!(
        got.create_time, first.update_time,
        "create_time survives updates"
    );
    let (created, updated) = (got.create_time.unwrap(), got.update_time.unwrap());
    assert!((updated.seconds, updated.nanos) >= (created.seconds, created.nanos));
}

pub async fn generated_ids_are_unique_and_time_sortable(mut t: TestServer) {
    let mut ids = Vec::new();
    for i in 0..50 {
        let saved = t
            .client
            .save(save("gen", "", doc(f64::from(i))))
            .await
            .unwrap()
            .into_inner();
        assert!(saved.created);
        ids.push(saved.id);
    }
    let mut sorted = ids.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(
        sorted, ids,
        "generated ids are unique and ascend in creation order"
    );
    assert_eq!(walk(&mut t.client, "gen", 0).await, ids);
}

pub async fn conditional_saves(mut t: TestServer) {
    let v1 = t
        .client
        .save(save("c", "a", doc(1.0)))
        .await
        .unwrap()
        .into_inner();
    // Matching rev: applies.
    let mut req = save("c", "a", doc(2.0));
    req.expected_rev = v1.rev.clone();
    let v2 = t.client.save(req.clone()).await.unwrap().into_inner();
    assert!(!v2.created);
    // Same (now stale) rev again: ABORTED, nothing changes.
    assert_status(t.client.save(req).await, Code::Aborted, &v2.rev);
    let got = t.client.get(get("c", "a")).await.unwrap().into_inner();
    assert_eq!(got.rev, v2.rev);
    // expected_rev on an absent document: ABORTED.
    let mut req = save("c", "absent", doc(1.0));
    req.expected_rev = v1.rev.clone();
    assert_status(t.client.save(req).await, Code::Aborted, "does not exist");
    assert_status(
        t.client.get(get("c", "absent")).await,
        Code::NotFound,
        "absent",
    );
    // create_only: only when absent.
    let mut req = save("c", "a", doc(3.0));
    req.create_only = true;
    assert_status(
        t.client.save(req).await,
        Code::AlreadyExists,
        "already exists",
    );
    let mut req = save("c", "fresh", doc(3.0));
    req.create_only = true;
    assert!(t.client.save(req).await.unwrap().into_inner().created);
    // Both at once contradict each other.
    let mut req = save("c", "x", doc(3.0));
    req.create_only = true;
    req.expected_rev = "r".into();
    assert_status(
        t.client.save(req).await,
        Code::InvalidArgument,
        "exclude each other",
    );
}

pub async fn get_of_missing_documents(mut t: TestServer) {
    assert_status(
        t.client.get(get("never_written", "x")).await,
        Code::NotFound,
        "`x`",
    );
    t.client.save(save("c", "a", doc(1.0))).await.unwrap();
    assert_status(
        t.client.get(get("c", "b")).await,
        Code::NotFound,
        "not found",
    );
}

pub async fn deletes(mut t: TestServer) {
    assert_status(
        t.client.delete(delete("c", "a", "")).await,
        Code::NotFound,
        "not found",
    );
    let v1 = t
        .client
        .save(save("c", "a", doc(1.0)))
        .await
        .unwrap()
        .into_inner();
    assert_status(
        t.client.delete(delete("c", "a", "stale")).await,
        Code::Aborted,
        "stale",
    );
    assert!(
        t.client.get(get("c", "a")).await.is_ok(),
        "a failed delete keeps the document"
    );
    t.client.delete(delete("c", "a", &v1.rev)).await.unwrap();
    assert_status(
        t.client.get(get("c", "a")).await,
        Code::NotFound,
        "not found",
    );
    assert_status(
        t.client.delete(delete("c", "a", "")).await,
        Code::NotFound,
        "not found",
    );
    // Recreated: a new rev, so the old one cannot match.
    let v2 = t
        .client
        .save(save("c", "a", doc(2.0)))
        .await
        .unwrap()
        .into_inner();
    assert!(v2.created);
    assert_ne!(v2.rev, v1.rev);
    t.client.delete(delete("c", "a", "")).await.unwrap();
}

pub async fn list_walks_in_id_byte_order(mut t: TestServer) {
    let mut ids: Vec<String> = (0..250)
        .map(|i| format!("doc-{:05}", (i * 7919) % 1000))
        .collect();
    ids.extend(["A", "Z", "a", "z", "é", "漢", "🎉", " space", "0"].map(String::from));
    bulk_insert(&mut t.client, "c", &ids).await;
    let expected: Vec<String> = ids
        .iter()
        .cloned()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    for page_size in [1, 7, 100, 1000] {
        assert_eq!(
            walk(&mut t.client, "c", page_size).await,
            expected,
            "page_size {page_size}"
        );
    }
    // Page size 0 means 100.
    let page = t
        .client
        .list(ListRequest {
            collection: "c".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.documents.len(), 100);
    assert!(!page.next_page_token.is_empty());
    // A last page that is exactly full says there is no more.
    let page = t
        .client
        .list(ListRequest {
            collection: "c".into(),
            page_size: ids.len() as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.documents.len(), ids.len());
    assert_eq!(page.next_page_token, "");
}

pub async fn list_page_size_is_capped_at_1000(mut t: TestServer) {
    let ids: Vec<String> = (0..1001).map(|i| format!("{i:04}")).collect();
    bulk_insert(&mut t.client, "c", &ids).await;
    let page = t
        .client
        .list(ListRequest {
            collection: "c".into(),
            page_size: 5000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.documents.len(), 1000);
    assert!(!page.next_page_token.is_empty());
}

pub async fn list_rejects_bad_requests(mut t: TestServer) {
    t.client.save(save("c", "a", doc(1.0))).await.unwrap();
    t.client.save(save("c", "b", doc(1.0))).await.unwrap();
    let list = |page_size: i32, token: &str, collection: &str| ListRequest {
        collection: collection.into(),
        page_size,
        page_token: token.into(),
        ..Default::default()
    };
    assert_status(
        t.client.list(list(-1, "", "c")).await,
        Code::InvalidArgument,
        "page_size",
    );
    for token in ["garbage", "AAAA", "!!!", "eyJpZCI6ImEifQ"] {
        assert_status(
            t.client.list(list(1, token, "c")).await,
            Code::InvalidArgument,
            "page_token",
        );
    }
    let first = t.client.list(list(1, "", "c")).await.unwrap().into_inner();
    assert!(!first.next_page_token.is_empty());
    // A token belongs to its collection.
    assert_status(
        t.client
            .list(list(1, &first.next_page_token, "other"))
            .await,
        Code::InvalidArgument,
        "page_token",
    );
    // An unknown collection is an empty list.
    let empty = t
        .client
        .list(list(10, "", "unknown"))
        .await
        .unwrap()
        .into_inner();
    assert!(empty.documents.is_empty());
    assert_eq!(empty.next_page_token, "");
}

pub async fn list_returns_survivors_exactly_once_during_inserts(mut t: TestServer) {
    let initial: Vec<String> = (0..60).map(|i| format!("m{:03}", i * 10)).collect();
    bulk_insert(&mut t.client, "c", &initial).await;
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut round = 0;
    loop {
        let page = t
            .client
            .list(ListRequest {
                collection: "c".into(),
                page_size: 7,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        seen.extend(page.documents.into_iter().map(|d| d.id));
        // Between pages: insert before and after the cursor, and delete a non-survivor.
        round += 1;
        for id in [
            format!("a{round:03}"),
            format!("m{:03}5", round * 3),
            format!("z{round:03}"),
        ] {
            t.client.save(save("c", &id, doc(0.0))).await.unwrap();
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let unique: BTreeSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no document is returned twice");
    for id in &initial {
        assert!(
            unique.contains(id),
            "{id} was present the whole walk but not returned"
        );
    }
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(sorted, seen, "pages ascend by id");
}

pub async fn batch_get_keeps_request_order(mut t: TestServer) {
    for id in ["a", "b", "c"] {
        t.client.save(save("c", id, doc(1.0))).await.unwrap();
    }
    let resp = t
        .client
        .batch_get(BatchGetRequest {
            collection: "c".into(),
            ids: ["c", "x", "a", "c", "y", "b"].map(String::from).to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let found: Vec<&str> = resp.documents.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(found, ["c", "a", "b"]);
    assert_eq!(resp.missing_ids, ["x", "y"]);
    assert!(resp
        .documents
        .iter()
        .all(|d| d.data.is_some() && !d.rev.is_empty()));

    let unknown = t
        .client
        .batch_get(BatchGetRequest {
            collection: "unknown".into(),
            ids: vec!["a".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(unknown.documents.is_empty());
    assert_eq!(unknown.missing_ids, ["a"]);

    let ids: Vec<String> = (0..1000).map(|i| i.to_string()).collect();
    let resp = t
        .client
        .batch_get(BatchGetRequest {
            collection: "c".into(),
            ids: ids.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.missing_ids.len(), 1000);
    let mut too_many = ids;
    too_many.push("one-more".into());
    assert_status(
        t.client
            .batch_get(BatchGetRequest {
                collection: "c".into(),
                ids: too_many,
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "at most 1000",
    );
    assert_status(
        t.client
            .batch_get(BatchGetRequest {
                collection: "c".into(),
                ids: vec!["ok".into(), String::new()],
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "ids[1]",
    );
}

fn save_op(collection: &str, id: &str, n: f64) -> Mutation {
    Mutation {
        op: Some(Op::Save(save(collection, id, doc(n)))),
    }
}

fn delete_op(collection: &str, id: &str, expected_rev: &str) -> Mutation {
    Mutation {
        op: Some(Op::Delete(delete(collection, id, expected_rev))),
    }
}

pub async fn write_applies_all_across_collections(mut t: TestServer) {
    let old = t
        .client
        .save(save("orders", "o1", doc(1.0)))
        .await
        .unwrap()
        .into_inner();
    let resp = t
        .client
        .write(WriteRequest {
            mutations: vec![
                save_op("orders", "o2", 2.0),
                save_op("invoices", "i1", 3.0),
                delete_op("orders", "o1", &old.rev),
                save_op("orders", "", 4.0),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.results.len(), 4);
    assert_eq!(resp.results[0].id, "o2");
    assert_eq!(resp.results[1].id, "i1");
    assert_eq!(
        (resp.results[2].id.as_str(), resp.results[2].rev.as_str()),
        ("o1", "")
    );
    let generated = &resp.results[3].id;
    assert!(!generated.is_empty());
    for (i, (c, id)) in [
        ("orders", "o2"),
        ("invoices", "i1"),
        ("orders", generated.as_str()),
    ]
    .iter()
    .enumerate()
    {
        let got = t.client.get(get(c, id)).await.unwrap().into_inner();
        let result = &resp.results[if i == 2 { 3 } else { i }];
        assert_eq!(got.rev, result.rev);
    }
    assert_status(
        t.client.get(get("orders", "o1")).await,
        Code::NotFound,
        "o1",
    );
    // The same document twice in one Write: applied in order.
    let resp = t
        .client
        .write(WriteRequest {
            mutations: vec![
                save_op("orders", "twice", 1.0),
                save_op("orders", "twice", 2.0),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    let got = t
        .client
        .get(get("orders", "twice"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.rev, resp.results[1].rev);
    assert_eq!(number_field(got.data.as_ref().unwrap(), "n"), 2.0);
}

pub async fn write_is_atomic(mut t: TestServer) {
    let keep = t
        .client
        .save(save("c", "keep", doc(1.0)))
        .await
        .unwrap()
        .into_inner();
    let before = t
        .client
        .list_collections(ListCollectionsRequest {})
        .await
        .unwrap()
        .into_inner();
    let failing = [
        (
            vec![
                save_op("c", "new", 1.0),
                save_op("brand_new", "x", 1.0),
                delete_op("c", "keep", ""),
                {
                    let mut m = save("c", "other", doc(2.0));
                    m.expected_rev = "stale-rev".into();
                    Mutation {
                        op: Some(Op::Save(m)),
                    }
                },
            ],
            Code::Aborted,
            "mutation 3:",
        ),
        (
            vec![
                save_op("c", "new", 1.0),
                delete_op("c", "keep", ""),
                delete_op("c", "missing", ""),
            ],
            Code::NotFound,
            "mutation 2:",
        ),
        (
            vec![save_op("c", "new", 1.0), {
                let mut m = save("c", "keep", doc(2.0));
                m.create_only = true;
                Mutation {
                    op: Some(Op::Save(m)),
                }
            }],
            Code::AlreadyExists,
            "mutation 1:",
        ),
        (
            vec![save_op("c", "new", 1.0), save_op("Bad", "x", 1.0)],
            Code::InvalidArgument,
            "mutation 1:",
        ),
        (
            vec![save_op("c", "new", 1.0), Mutation { op: None }],
            Code::InvalidArgument,
            "mutation 1: op is not set",
        ),
    ];
    for (mutations, code, prefix) in failing {
        let status = t
            .client
            .write(WriteRequest { mutations })
            .await
            .unwrap_err();
        assert_eq!(status.code(), code, "{}", status.message());
        assert!(status.message().starts_with(prefix), "{}", status.message());
        assert_status(t.client.get(get("c", "new")).await, Code::NotFound, "new");
        let kept = t.client.get(get("c", "keep")).await.unwrap().into_inner();
        assert_eq!(kept.rev, keep.rev, "nothing of a failed Write is applied");
    }
    assert_status(
        t.client.get(get("brand_new", "x")).await,
        Code::NotFound,
        "x",
    );
    let after = t
        .client
        .list_collections(ListCollectionsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        before.collections, after.collections,
        "a failed Write creates no collection"
    );

    let too_many = (0..501)
        .map(|i| save_op("c", &i.to_string(), 1.0))
        .collect();
    assert_status(
        t.client
            .write(WriteRequest {
                mutations: too_many,
            })
            .await,
        Code::InvalidArgument,
        "at most 500",
    );
    let most = (0..500)
        .map(|i| save_op("c", &i.to_string(), 1.0))
        .collect();
    assert_eq!(
        t.client
            .write(WriteRequest { mutations: most })
            .await
            .unwrap()
            .into_inner()
            .results
            .len(),
        500
    );
}

pub async fn ids_are_stored_literally_and_collections_isolated(mut t: TestServer) {
    let ids = [
        "'; DROP TABLE documents; --",
        "\" OR 1=1 --",
        "../../etc/passwd",
        "a/b/c",
        "%00%2F",
        "ünïcödé 🎉",
        " leading and trailing ",
        "UPPER",
        "*",
        "?",
        "$1",
    ];
    let long = "x".repeat(512);
    for (i, id) in ids.iter().copied().chain([long.as_str()]).enumerate() {
        t.client.save(save("one", id, doc(i as f64))).await.unwrap();
        t.client
            .save(save("two", id, doc(-(i as f64))))
            .await
            .unwrap();
    }
    for (i, id) in ids.iter().copied().chain([long.as_str()]).enumerate() {
        let a = t.client.get(get("one", id)).await.unwrap().into_inner();
        let b = t.client.get(get("two", id)).await.unwrap().into_inner();
        assert_eq!(a.id, id);
        assert_eq!(number_field(a.data.as_ref().unwrap(), "n"), i as f64);
        assert_eq!(number_field(b.data.as_ref().unwrap(), "n"), -(i as f64));
    }
    assert_eq!(walk(&mut t.client, "one", 5).await.len(), ids.len() + 1);
    t.client.delete(delete("one", ids[0], "")).await.unwrap();
    assert!(
        t.client.get(get("two", ids[0])).await.is_ok(),
        "deleting in one collection leaves the other"
    );
}

pub async fn invalid_requests_name_the_rule(mut t: TestServer) {
    for bad in [
        "",
        "Upper",
        "1starts_with_digit",
        "has-dash",
        "has space",
        "émoji",
        &"a".repeat(64),
    ] {
        assert_status(
            t.client.get(get(bad, "id")).await,
            Code::InvalidArgument,
            "^[a-z][a-z0-9_]{0,62}$",
        );
        assert_status(
            t.client.save(save(bad, "id", doc(1.0))).await,
            Code::InvalidArgument,
            "collection",
        );
        assert_status(
            t.client
                .list(ListRequest {
                    collection: bad.into(),
                    ..Default::default()
                })
                .await,
            Code::InvalidArgument,
            "collection",
        );
    }
    assert_status(
        t.client.get(get("c", "")).await,
        Code::InvalidArgument,
        "1 to 512 bytes",
    );
    assert_status(
        t.client.get(get("c", &"x".repeat(513))).await,
        Code::InvalidArgument,
        "513 bytes",
    );
    assert_status(
        t.client.get(get("c", "a\nb")).await,
        Code::InvalidArgument,
        "control character",
    );
    assert_status(
        t.client.delete(delete("c", "a\u{7f}", "")).await,
        Code::InvalidArgument,
        "control character",
    );
    let mut no_data = save("c", "a", doc(1.0));
    no_data.data = None;
    assert_status(
        t.client.save(no_data).await,
        Code::InvalidArgument,
        "data is required",
    );
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let data = object(vec![("ok", num(1.0)), ("bad", list(vec![num(bad)]))]);
        assert_status(
            t.client.save(save("c", "a", data)).await,
            Code::InvalidArgument,
            "data.bad[0]",
        );
    }
    for data in [
        object(vec![("s", string("a\u{0}b"))]),
        object(vec![("k\u{0}", num(1.0))]),
    ] {
        assert_status(
            t.client.save(save("c", "a", data)).await,
            Code::InvalidArgument,
            "U+0000",
        );
    }
    assert_status(t.client.get(get("c", "a")).await, Code::NotFound, "a");
}

fn nest(levels: usize) -> Struct {
    let mut s = object(vec![("leaf", boolean(true))]);
    for _ in 1..levels {
        s = object(vec![("n", nested(s))]);
    }
    s
}

pub async fn limits_of_depth_and_size(mut t: TestServer) {
    t.client.save(save("c", "deep", nest(20))).await.unwrap();
    let got = t.client.get(get("c", "deep")).await.unwrap().into_inner();
    assert_eq!(got.data, Some(nest(20)));
    assert_status(
        t.client.save(save("c", "deeper", nest(21))).await,
        Code::InvalidArgument,
        "deeper than 20",
    );
    // Arrays count as levels too.
    let mut v = boolean(true);
    for _ in 0..20 {
        v = list(vec![v]);
    }
    assert_status(
        t.client
            .save(save("c", "lists", object(vec![("l", v)])))
            .await,
        Code::InvalidArgument,
        "deeper than 20",
    );
    // Past protobuf's own recursion limit the message cannot even be decoded:
    // still the caller's error.
    assert_status(
        t.client.save(save("c", "deepest", nest(40))).await,
        Code::InvalidArgument,
        "20 levels",
    );

    // 1 MiB of JSON is the default limit: {"s":"…"} is 8 bytes plus the string.
    let limit = 1024 * 1024;
    let fits = object(vec![("s", string(&"x".repeat(limit - 8)))]);
    t.client.save(save("c", "big", fits.clone())).await.unwrap();
    assert_eq!(
        t.client
            .get(get("c", "big"))
            .await
            .unwrap()
            .into_inner()
            .data,
        Some(fits)
    );
    let over = object(vec![("s", string(&"x".repeat(limit - 7)))]);
    assert_status(
        t.client.save(save("c", "bigger", over)).await,
        Code::InvalidArgument,
        "1048577 bytes",
    );
}

pub async fn large_pages_stay_under_client_message_limits(mut t: TestServer) {
    // 10 documents of ~600 KiB: one page of 10 would exceed the 4 MiB that gRPC
    // clients accept by default, so the server splits it.
    let big = object(vec![("s", string(&"y".repeat(600 * 1024)))]);
    for i in 0..10 {
        t.client
            .save(save("c", &format!("{i:02}"), big.clone()))
            .await
            .unwrap();
    }
    let page = t
        .client
        .list(ListRequest {
            collection: "c".into(),
            page_size: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(page.documents.len() < 10 && !page.documents.is_empty());
    assert!(!page.next_page_token.is_empty());
    assert_eq!(walk(&mut t.client, "c", 10).await.len(), 10);
}

pub async fn concurrent_conditional_increments_lose_nothing(mut t: TestServer) {
    const TASKS: usize = 16;
    const INCREMENTS: usize = 10;
    t.client
        .save(save("counters", "hits", doc(0.0)))
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let mut client = t.client.clone();
        tasks.push(tokio::spawn(async move {
            let mut conflicts = 0;
            for _ in 0..INCREMENTS {
                loop {
                    let cur = client
                        .get(get("counters", "hits"))
                        .await
                        .unwrap()
                        .into_inner();
                    let n = number_field(cur.data.as_ref().unwrap(), "n");
                    let mut req = save("counters", "hits", doc(n + 1.0));
                    req.expected_rev = cur.rev;
                    match client.save(req).await {
                        Ok(_) => break,
                        Err(s) if s.code() == Code::Aborted => conflicts += 1,
                        Err(s) => panic!("unexpected {s:?}"),
                    }
                }
            }
            conflicts
        }));
    }
    let mut conflicts = 0;
    for task in tasks {
        conflicts += task.await.unwrap();
    }
    let got = t
        .client
        .get(get("counters", "hits"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        number_field(got.data.as_ref().unwrap(), "n"),
        (TASKS * INCREMENTS) as f64
    );
    eprintln!("{:?}: {conflicts} conflicts retried", t.backend);
}

pub async fn list_collections_is_sorted(mut t: TestServer) {
    let empty = t
        .client
        .list_collections(ListCollectionsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(empty.collections.is_empty());
    for c in ["zebra", "alpha", "m_1", "m_0"] {
        t.client.save(save(c, "x", doc(1.0))).await.unwrap();
    }
    t.client
        .get(get("read_only_never_written", "x"))
        .await
        .unwrap_err();
    let listed = t
        .client
        .list_collections(ListCollectionsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.collections, ["alpha", "m_0", "m_1", "zebra"]);
}

pub async fn health_and_reflection(t: TestServer) {
    use tonic_health::pb::{
        health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
    };
    let mut health = HealthClient::new(t.channel.clone());
    for service in ["", "docsidecar.v1.DocumentService"] {
        let resp = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(resp.status(), ServingStatus::Serving, "service {service:?}");
    }
    {
        use tonic_reflection::pb::v1::{
            server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
            ServerReflectionRequest,
        };
        let mut client = ServerReflectionClient::new(t.channel.clone());
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = client
            .server_reflection_info(tokio_stream::iter([req]))
            .await
            .unwrap()
            .into_inner();
        let resp = stream.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
            panic!("unexpected reflection answer");
        };
        let names: BTreeSet<String> = list.service.into_iter().map(|s| s.name).collect();
        assert!(names.contains("docsidecar.v1.DocumentService"), "{names:?}");
        assert!(names.contains("grpc.health.v1.Health"), "{names:?}");
    }
    {
        use tonic_reflection::pb::v1alpha::{
            server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
            ServerReflectionRequest,
        };
        let mut client = ServerReflectionClient::new(t.channel.clone());
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(
                "docsidecar.v1.DocumentService".into(),
            )),
        };
        let mut stream = client
            .server_reflection_info(tokio_stream::iter([req]))
            .await
            .unwrap()
            .into_inner();
        let resp = stream.message().await.unwrap().unwrap();
        let Some(MessageResponse::FileDescriptorResponse(files)) = resp.message_response else {
            panic!("unexpected v1alpha reflection answer");
        };
        assert!(!files.file_descriptor_proto.is_empty());
    }
}

/// A tiny deterministic generator: the same operations for both stores.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

#[derive(Clone, Copy)]
enum Rev {
    Unconditional,
    Current,
    Stale,
}

#[derive(Clone)]
enum RandomOp {
    Save(String, String, Struct, Rev, bool),
    Delete(String, String, Rev),
}

fn random_op(rng: &mut Lcg, step: usize) -> RandomOp {
    const COLLECTIONS: [&str; 3] = ["alpha", "beta", "c_3"];
    const IDS: [&str; 5] = ["a", "b", "Z", "é", "a b"];
    let collection = COLLECTIONS[rng.below(3) as usize].to_string();
    let id = IDS[rng.below(5) as usize].to_string();
    let rev = match rng.below(4) {
        0 | 1 => Rev::Unconditional,
        2 => Rev::Current,
        _ => Rev::Stale,
    };
    if rng.below(3) == 0 {
        RandomOp::Delete(collection, id, rev)
    } else {
        let data = object(vec![
            ("step", num(step as f64)),
            (
                "nested",
                nested(object(vec![(
                    "list",
                    list(vec![num(1.0), num(2.5), string("x"), null(), boolean(true)]),
                )])),
            ),
        ]);
        RandomOp::Save(collection, id, data, rev, rng.below(4) == 0)
    }
}

async fn random_mutation(client: &mut Client, op: &RandomOp) -> Mutation {
    let mut rev = async |collection: &str, id: &str, rev: Rev| match rev {
        Rev::Unconditional => String::new(),
        Rev::Stale => "stale".to_string(),
        Rev::Current => client
            .get(get(collection, id))
            .await
            .map_or_else(|_| "absent".to_string(), |d| d.into_inner().rev),
    };
    let op = match op {
        RandomOp::Save(c, id, data, r, create_only) => Op::Save(SaveRequest {
            expected_rev: rev(c, id, *r).await,
            create_only: *create_only,
            ..save(c, id, data.clone())
        }),
        RandomOp::Delete(c, id, r) => Op::Delete(delete(c, id, &rev(c, id, *r).await)),
    };
    Mutation { op: Some(op) }
}

/// What a failed call told the client, reduced to what every store must agree on.
fn outcome_of(status: &tonic::Status) -> String {
    let index = status
        .message()
        .strip_prefix("mutation ")
        .and_then(|m| m.split_once(':'))
        .map_or("", |(n, _)| n);
    // A rev mismatch on an absent document says so.
    let absent = status.message().contains("does not exist");
    format!("{:?} mutation={index} absent={absent}", status.code())
}

/// Runs one step on a server and describes its outcome.
async fn apply_ops(client: &mut Client, ops: &[RandomOp], batch: bool) -> String {
    let mut mutations = Vec::new();
    for op in ops {
        mutations.push(random_mutation(client, op).await);
    }
    if batch {
        match client.write(WriteRequest { mutations }).await {
            Ok(r) => format!(
                "ok {:?}",
                r.into_inner()
                    .results
                    .iter()
                    .map(|r| !r.rev.is_empty())
                    .collect::<Vec<_>>()
            ),
            Err(e) => outcome_of(&e),
        }
    } else {
        match mutations.pop().and_then(|m| m.op) {
            Some(Op::Save(op)) => match client.save(op).await {
                Ok(saved) => format!("ok created={}", saved.into_inner().created),
                Err(e) => outcome_of(&e),
            },
            Some(Op::Delete(op)) => match client.delete(op).await {
                Ok(_) => "ok deleted".into(),
                Err(e) => outcome_of(&e),
            },
            Some(Op::Update(op)) => match client.update(op).await {
                Ok(updated) => format!("ok created={}", updated.into_inner().created),
                Err(e) => outcome_of(&e),
            },
            None => "nothing".into(),
        }
    }
}

/// Everything observable, with revs and times reduced to what must agree.
async fn snapshot(client: &mut Client) -> Vec<String> {
    let collections = client
        .list_collections(ListCollectionsRequest {})
        .await
        .unwrap()
        .into_inner()
        .collections;
    let mut out = vec![format!("collections {collections:?}")];
    for collection in ["alpha", "beta", "c_3", "never"] {
        // Walk in pages of two to exercise the keyset pagination.
        let mut page_token = String::new();
        loop {
            let page = client
                .list(ListRequest {
                    collection: collection.into(),
                    page_size: 2,
                    page_token,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            for d in &page.documents {
                let (created, updated) = (d.create_time.unwrap(), d.update_time.unwrap());
                assert!((created.seconds, created.nanos) <= (updated.seconds, updated.nanos));
                out.push(format!("{collection}/{} {:?}", d.id, d.data));
            }
            page_token = page.next_page_token;
            if page_token.is_empty() {
                break;
            }
        }
        let ids: Vec<String> = ["a", "b", "Z", "é", "a b", "nope"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mut found: Vec<String> = client
            .batch_get(BatchGetRequest {
                collection: collection.into(),
                ids,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .documents
            .into_iter()
            .map(|d| d.id)
            .collect();
        found.sort();
        out.push(format!("{collection} batch {found:?}"));
    }
    out
}

/// Random saves, deletes and atomic writes, conditional or not, give the same
/// answers and leave the same documents as on the memory store, the reference.
pub async fn behaves_like_the_memory_store(mut t: TestServer) {
    let Some(mut reference) = TestServer::start(Backend::Memory, &[]).await else {
        return;
    };
    let mut rng = Lcg(7);
    for step in 0..400 {
        let batch = rng.below(4) == 0;
        let n = if batch { 1 + rng.below(3) as usize } else { 1 };
        let ops: Vec<RandomOp> = (0..n).map(|_| random_op(&mut rng, step)).collect();
        let expected = apply_ops(&mut reference.client, &ops, batch).await;
        let actual = apply_ops(&mut t.client, &ops, batch).await;
        assert_eq!(actual, expected, "step {step}");
        if step % 20 == 19 {
            assert_eq!(
                snapshot(&mut t.client).await,
                snapshot(&mut reference.client).await,
                "step {step}"
            );
        }
    }
}

/// Instantiates every case for every backend: adding a backend is one line in
/// the list at the bottom.
macro_rules! suite {
    ([$($backend:ident => $variant:ident),* $(,)?], $cases:tt) => {
        $(suite!(@backend $backend $variant $cases);)*
    };
    (@backend $backend:ident $variant:ident [$($case:ident),* $(,)?]) => {
        mod $backend {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                crate::common::run(crate::common::Backend::$variant, super::$case).await
            })*
        }
    };
}

suite!(
    [
        memory => Memory,
        sqlite => Sqlite,
        postgres => Postgres,
        mariadb => Mariadb,
    ],
    [
        round_trips_every_json_type,
        save_is_an_upsert_with_fresh_revs,
        generated_ids_are_unique_and_time_sortable,
        conditional_saves,
        get_of_missing_documents,
        deletes,
        list_walks_in_id_byte_order,
        list_page_size_is_capped_at_1000,
        list_rejects_bad_requests,
        list_returns_survivors_exactly_once_during_inserts,
        batch_get_keeps_request_order,
        write_applies_all_across_collections,
        write_is_atomic,
        ids_are_stored_literally_and_collections_isolated,
        invalid_requests_name_the_rule,
        limits_of_depth_and_size,
        large_pages_stay_under_client_message_limits,
        concurrent_conditional_increments_lose_nothing,
        list_collections_is_sorted,
        health_and_reflection,
        behaves_like_the_memory_store,
    ]
);
