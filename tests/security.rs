//! Scoped access over gRPC: the policy file, bearer tokens and their rotation,
//! on the embedded stores (PostgreSQL roles and grants: tests/postgres_roles.rs).

mod common;

use common::*;
use docsidecar::proto::{
    mutation::Op, BatchGetRequest, DeleteRequest, GetRequest, ListCollectionsRequest, ListRequest,
    Mutation, SaveRequest, WriteRequest,
};
use std::path::Path;
use std::time::Duration;
use tonic::{Code, Request};

fn authed<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

fn save(collection: &str, id: &str) -> SaveRequest {
    SaveRequest {
        collection: collection.into(),
        id: id.into(),
        data: Some(object(vec![("x", num(1.0))]).into()),
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

/// A policy with a read-write and a read-only collection, an app client and a
/// narrower reporting client.
fn write_policy(dir: &Path) -> String {
    std::fs::write(dir.join("app-token"), "app-s3cret-aaaaaaaa\n").unwrap();
    std::fs::write(dir.join("report-token"), "report-s3cret-aaaaaaa\n").unwrap();
    let policy = format!(
        r#"
service = "backend-api"

[collections.agents]
access = "read-write"

[collections.catalog]
access = "read-only"

[[clients]]
token_file = "{0}/app-token"

[[clients]]
token_file = "{0}/report-token"
collections = ["agents"]
access = "read-only"
"#,
        dir.display()
    );
    let path = dir.join("policy.toml");
    std::fs::write(&path, policy).unwrap();
    path.display().to_string()
}

async fn with_policy(backend: Backend) -> (TestServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let policy = write_policy(dir.path());
    let t = TestServer::start(backend, &["--policy", &policy])
        .await
        .unwrap();
    (t, dir)
}

#[track_caller]
fn denied<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, contains: &str) {
    let status = result.expect_err("the call should be refused");
    assert_eq!(status.code(), code, "{}", status.message());
    assert!(status.message().contains(contains), "{}", status.message());
    assert!(
        !status.message().contains("s3cret"),
        "a token leaked: {}",
        status.message()
    );
}

async fn policy_scopes_collections_and_access(backend: Backend) {
    let (t, _dir) = with_policy(backend).await;
    let mut c = t.client.clone();
    let app = "app-s3cret-aaaaaaaa";
    c.save(authed(save("agents", "a1"), app)).await.unwrap();
    c.get(authed(get("agents", "a1"), app)).await.unwrap();
    // Undeclared collection: refused before the database is touched, read or write.
    denied(
        c.get(authed(get("secrets", "x"), app)).await,
        Code::PermissionDenied,
        "not in this caller's scope",
    );
    denied(
        c.save(authed(save("secrets", "x"), app)).await,
        Code::PermissionDenied,
        "`agents`, `catalog`",
    );
    denied(
        c.list(authed(
            ListRequest {
                collection: "secrets".into(),
                ..Default::default()
            },
            app,
        ))
        .await,
        Code::PermissionDenied,
        "secrets",
    );
    // Read-only collection: reads pass, writes do not.
    denied(
        c.get(authed(get("catalog", "x"), app)).await,
        Code::NotFound,
        "x",
    );
    c.batch_get(authed(
        BatchGetRequest {
            collection: "catalog".into(),
            ids: vec!["x".into()],
            ..Default::default()
        },
        app,
    ))
    .await
    .unwrap();
    denied(
        c.save(authed(save("catalog", "x"), app)).await,
        Code::PermissionDenied,
        "read-only",
    );
    denied(
        c.delete(authed(
            DeleteRequest {
                collection: "catalog".into(),
                id: "x".into(),
                expected_rev: String::new(),
                ..Default::default()
            },
            app,
        ))
        .await,
        Code::PermissionDenied,
        "read-only",
    );
    // A Write is refused whole, naming the mutation.
    let write = WriteRequest {
        mutations: vec![
            Mutation {
                op: Some(Op::Save(save("agents", "a2"))),
            },
            Mutation {
                op: Some(Op::Save(save("catalog", "c1"))),
            },
        ],
    };
    let status = c.write(authed(write, app)).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status.message().starts_with("mutation 1: "),
        "{}",
        status.message()
    );
    denied(
        c.get(authed(get("agents", "a2"), app)).await,
        Code::NotFound,
        "a2",
    );
    // ListCollections: the declared ones only.
    let listed = c
        .list_collections(authed(ListCollectionsRequest {}, app))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.collections, ["agents", "catalog"]);

    // The reporting client reads agents only.
    let report = "report-s3cret-aaaaaaa";
    c.get(authed(get("agents", "a1"), report)).await.unwrap();
    denied(
        c.save(authed(save("agents", "a9"), report)).await,
        Code::PermissionDenied,
        "read-only",
    );
    denied(
        c.get(authed(get("catalog", "x"), report)).await,
        Code::PermissionDenied,
        "not in this caller's scope",
    );
    let listed = c
        .list_collections(authed(ListCollectionsRequest {}, report))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.collections, ["agents"]);
}

async fn tokens_are_required_and_rotate(backend: Backend) {
    let (t, dir) = with_policy(backend).await;
    let mut c = t.client.clone();
    denied(
        c.get(get("agents", "a")).await,
        Code::Unauthenticated,
        "Bearer",
    );
    denied(
        c.get(authed(get("agents", "a"), "wrong")).await,
        Code::Unauthenticated,
        "not valid",
    );
    let mut basic = Request::new(get("agents", "a"));
    basic
        .metadata_mut()
        .insert("authorization", "Basic YXBwOnMzY3JldA==".parse().unwrap());
    denied(c.get(basic).await, Code::Unauthenticated, "Bearer <token>");

    // Health needs no token: the kubelet's probe carries none.
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    HealthClient::new(t.channel.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();

    // A Secret update rewrites the file: the new token works, the old one stops.
    let tmp = dir.path().join("app-token.new");
    std::fs::write(&tmp, "app-rotated-s3cret-aaaa\n").unwrap();
    std::fs::rename(&tmp, dir.path().join("app-token")).unwrap();
    let mut rotated = false;
    for _ in 0..60 {
        if c.save(authed(save("agents", "r"), "app-rotated-s3cret-aaaa"))
            .await
            .is_ok()
        {
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(rotated, "the rotated token was not accepted within 6 s");
    denied(
        c.get(authed(get("agents", "r"), "app-s3cret-aaaaaaaa"))
            .await,
        Code::Unauthenticated,
        "not valid",
    );
}

async fn token_file_shorthand_without_policy(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "only-s3cret-aaaaaaaa").unwrap();
    let t = TestServer::start(backend, &["--token-file", token.to_str().unwrap()])
        .await
        .unwrap();
    let mut c = t.client.clone();
    denied(
        c.save(save("anything", "a")).await,
        Code::Unauthenticated,
        "authorization",
    );
    c.save(authed(save("anything", "a"), "only-s3cret-aaaaaaaa"))
        .await
        .unwrap();
}

macro_rules! each_store {
    ($($case:ident),*) => {
        mod memory { $(#[tokio::test] async fn $case() { super::$case(crate::Backend::Memory).await })* }
        mod sqlite { $(#[tokio::test] async fn $case() { super::$case(crate::Backend::Sqlite).await })* }
    };
}

each_store!(
    policy_scopes_collections_and_access,
    tokens_are_required_and_rotate,
    token_file_shorthand_without_policy
);
