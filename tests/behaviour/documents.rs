//! Get, Save, Delete, List and BatchGet.

use super::support::*;
use crate::common::*;
use docsidecar::proto::{BatchGetRequest, ListRequest};
use prost_types::Struct;
use std::collections::BTreeSet;
use tonic::Code;

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
    assert_eq!(got.data.map(Struct::from), Some(data));
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
