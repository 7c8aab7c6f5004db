//! Errors with details: the reason, the request field at fault, the current
//! rev, BatchGet's budget, and unbounded input kept out of messages.

use super::support::*;
use crate::common::*;
use docsidecar::proto::{mutation::Op, BatchGetRequest, Mutation, SaveRequest, WriteRequest};
use tonic::Code;
use tonic_types::StatusExt;

pub async fn errors_carry_reasons_and_details(mut t: TestServer) {
    let c = &mut t.client;
    let status = c.get(get("docs", "nope")).await.unwrap_err();
    assert_eq!(
        (status.code(), reason(&status).as_str()),
        (Code::NotFound, "DOCUMENT_NOT_FOUND")
    );

    let saved = c
        .save(save("docs", "a", doc(1.0)))
        .await
        .unwrap()
        .into_inner();
    let status = c
        .save(SaveRequest {
            expected_rev: "stale".into(),
            ..save("docs", "a", doc(2.0))
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "REV_MISMATCH");
    let details = status.get_error_details();
    assert_eq!(
        details.error_info().unwrap().metadata["current_rev"],
        saved.rev
    );

    let status = c
        .save(SaveRequest {
            create_only: true,
            ..save("docs", "a", doc(2.0))
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "DOCUMENT_EXISTS");

    // mutation 3's data is missing: the field path names it.
    let mutation = |op| Mutation { op: Some(op) };
    let mut mutations: Vec<Mutation> = (0..3)
        .map(|i| mutation(Op::Save(save("docs", &format!("w{i}"), doc(1.0)))))
        .collect();
    mutations.push(mutation(Op::Save(SaveRequest {
        data: None,
        ..save("docs", "w3", doc(1.0))
    })));
    let status = c.write(WriteRequest { mutations }).await.unwrap_err();
    assert_eq!(
        (status.code(), reason(&status).as_str()),
        (Code::InvalidArgument, "INVALID_ARGUMENT")
    );
    let details = status.get_error_details();
    let violations = &details.bad_request().unwrap().field_violations;
    assert_eq!(violations[0].field, "mutations[3].save.data");

    let status = c
        .list(docsidecar::proto::ListRequest {
            collection: "docs".into(),
            page_token: "forged".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "PAGE_TOKEN_INVALID");
}

/// `expected_rev` is checked like an id, and what a message quotes is cut.
pub async fn expected_rev_is_validated_and_never_echoed_whole(mut t: TestServer) {
    let c = &mut t.client;
    c.save(save("docs", "a", doc(1.0))).await.unwrap();
    let status = c
        .save(SaveRequest {
            expected_rev: "a\0b".into(),
            ..save("docs", "a", doc(2.0))
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
    assert!(
        status.message().contains("expected_rev"),
        "{}",
        status.message()
    );
    let huge = "r".repeat(20 * 1024);
    let status = c
        .save(SaveRequest {
            expected_rev: huge,
            ..save("docs", "a", doc(2.0))
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().len() < 1024,
        "{} bytes",
        status.message().len()
    );
    let long = "r".repeat(500);
    let status = c
        .save(SaveRequest {
            expected_rev: long,
            ..save("docs", "a", doc(2.0))
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Aborted);
    assert!(
        status.message().len() < 1024,
        "{} bytes",
        status.message().len()
    );
}

/// BatchGet stops at the response budget: the rest comes back in
/// `unprocessed_ids`, and every response stays under a client's 4 MiB.
pub async fn batch_get_stays_within_the_budget(mut t: TestServer) {
    let c = &mut t.client;
    let big = "x".repeat(900 * 1024);
    let ids: Vec<String> = (0..6).map(|i| format!("big{i}")).collect();
    for id in &ids {
        c.save(save("blobs", id, object(vec![("b", string(&big))])))
            .await
            .unwrap();
    }
    let mut asked: Vec<String> = vec!["absent".into()];
    asked.extend(ids.iter().cloned());
    let mut found = Vec::new();
    let mut missing = Vec::new();
    let mut calls = 0;
    while !asked.is_empty() {
        calls += 1;
        let response = c
            .batch_get(BatchGetRequest {
                collection: "blobs".into(),
                ids: asked.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!response.documents.is_empty(), "progress on every call");
        assert!(prost::Message::encoded_len(&response) < 4 * 1024 * 1024);
        found.extend(response.documents.into_iter().map(|d| d.id));
        missing.extend(response.missing_ids);
        asked = response.unprocessed_ids;
    }
    assert_eq!(found, ids);
    assert_eq!(missing, ["absent"]);
    assert!(calls >= 2, "six 900 KiB documents do not fit one response");
}
