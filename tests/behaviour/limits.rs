//! Validation, limits, concurrency, health and reflection.

use super::support::*;
use crate::common::*;
use docsidecar::proto::{ListCollectionsRequest, ListRequest};
use prost_types::Struct;
use std::collections::BTreeSet;
use tonic::Code;

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
    assert_eq!(got.data.map(Struct::from), Some(nest(20)));
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
        Some(fits.into())
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
