//! A short client: save, read, list and delete a document.
//!
//! Start a sidecar (`cargo run`), then: `cargo run --example client`
//! (or `DOCSIDECAR_ADDR=http://127.0.0.1:50051 cargo run --example client`).

use docsidecar::proto::{DeleteRequest, GetRequest, ListRequest, SaveRequest};
use docsidecar::DocumentServiceClient;
use prost_types::{value::Kind, Struct, Value};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::var("DOCSIDECAR_ADDR").unwrap_or_else(|_| "http://127.0.0.1:50051".into());
    let mut client = DocumentServiceClient::connect(addr).await?;

    let data = Struct {
        fields: [
            (
                "name".to_string(),
                Value {
                    kind: Some(Kind::StringValue("Ada".into())),
                },
            ),
            (
                "age".to_string(),
                Value {
                    kind: Some(Kind::NumberValue(36.0)),
                },
            ),
        ]
        .into(),
    };
    // An empty id asks the server for a new, time-sortable one.
    let saved = client
        .save(SaveRequest {
            collection: "people".into(),
            // `proto::Data` is the API's `Struct` field type; a `prost_types::Struct` converts.
            data: Some(data.into()),
            ..Default::default()
        })
        .await?
        .into_inner();
    println!(
        "saved {} at rev {} (created: {})",
        saved.id, saved.rev, saved.created
    );

    let doc = client
        .get(GetRequest {
            collection: "people".into(),
            id: saved.id.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    println!("read {}: {:?}", doc.id, doc.data);

    let page = client
        .list(ListRequest {
            collection: "people".into(),
            page_size: 10,
            ..Default::default()
        })
        .await?
        .into_inner();
    println!("first page holds {} document(s)", page.documents.len());

    // expected_rev makes the delete conditional: ABORTED if someone wrote in between.
    client
        .delete(DeleteRequest {
            collection: "people".into(),
            id: saved.id.clone(),
            expected_rev: doc.rev,
            ..Default::default()
        })
        .await?;
    println!("deleted {}", saved.id);
    Ok(())
}
