//! Atomic writes across collections.

use super::support::*;
use crate::common::*;
use docsidecar::proto::{mutation::Op, ListCollectionsRequest, Mutation, WriteRequest};
use tonic::Code;

pub fn save_op(collection: &str, id: &str, n: f64) -> Mutation {
    Mutation {
        op: Some(Op::Save(save(collection, id, doc(n)))),
    }
}

pub fn delete_op(collection: &str, id: &str, expected_rev: &str) -> Mutation {
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
