//! Request builders and checks shared by the cases.

use crate::common::*;
use docsidecar::proto::{
    mutation::Op, DeleteRequest, GetRequest, ListRequest, Mutation, SaveRequest, WriteRequest,
};
use prost_types::Struct;
use tonic::Code;
use tonic_types::StatusExt;

/// The ErrorInfo reason of an error.
pub fn reason(status: &tonic::Status) -> String {
    let details = status.get_error_details();
    let info = details.error_info().expect("an ErrorInfo");
    assert_eq!(info.domain, "docsidecar.dev");
    info.reason.clone()
}

pub fn save(collection: &str, id: &str, data: Struct) -> SaveRequest {
    SaveRequest {
        collection: collection.into(),
        id: id.into(),
        data: Some(data.into()),
        ..Default::default()
    }
}

pub fn get(collection: &str, id: &str) -> GetRequest {
    GetRequest {
        collection: collection.into(),
        id: id.into(),
        ..Default::default()
    }
}

pub fn delete(collection: &str, id: &str, expected_rev: &str) -> DeleteRequest {
    DeleteRequest {
        collection: collection.into(),
        id: id.into(),
        expected_rev: expected_rev.into(),
        ..Default::default()
    }
}

pub fn doc(n: f64) -> Struct {
    object(vec![("n", num(n))])
}

#[track_caller]
pub fn assert_status<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: Code,
    contains: &str,
) {
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
pub async fn walk(client: &mut Client, collection: &str, page_size: i32) -> Vec<String> {
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

pub async fn bulk_insert(client: &mut Client, collection: &str, ids: &[String]) {
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
