//! The gRPC layer: validate, convert, call the store, map errors. No SQL here.

mod error;
pub mod json;
pub mod page_token;
pub mod validate;

pub use error::ApiError;

use crate::policy::{Need, Scope};
use crate::proto::{self, document_service_server::DocumentService, mutation::Op};
use crate::store::{self, DocumentStore, Micros, StoreError};
use crate::telemetry::record_collection;
use prost_types::Timestamp;
use std::collections::HashMap;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// List pages stop growing past this much JSON, so a response stays under the
/// 4 MiB that gRPC clients accept by default; the next page picks up the rest.
const LIST_PAGE_BYTES: usize = 3 * 1024 * 1024;

/// Request limits that operators may tune.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_document_bytes: usize,
}

/// The `docsidecar.v1.DocumentService` implementation.
pub struct DocumentApi {
    store: Arc<dyn DocumentStore>,
    limits: Limits,
    /// The service's scope, for calls that the auth layer did not narrow.
    scope: Scope,
}

impl DocumentApi {
    pub fn new(store: Arc<dyn DocumentStore>, limits: Limits, scope: Scope) -> Self {
        DocumentApi {
            store,
            limits,
            scope,
        }
    }

    /// The caller's scope, as the auth layer established it.
    fn scope<T>(&self, request: &Request<T>) -> Scope {
        request
            .extensions()
            .get::<Scope>()
            .unwrap_or(&self.scope)
            .clone()
    }

    /// Validates a save and turns it into a store operation (generating the id).
    fn save_op(&self, req: proto::SaveRequest) -> Result<store::SaveOp, ApiError> {
        let proto::SaveRequest {
            collection,
            id,
            data,
            expected_rev,
            create_only,
        } = req;
        validate::collection(&collection)?;
        let id = if id.is_empty() {
            store::new_id()
        } else {
            validate::id(&id, "id")?;
            id
        };
        if create_only && !expected_rev.is_empty() {
            return Err(ApiError::invalid(
                "create_only and expected_rev exclude each other: create_only requires that the document does not exist, expected_rev that it does",
            ));
        }
        let data = data.ok_or_else(|| {
            ApiError::invalid("data is required: give the document as a JSON object (Struct)")
        })?;
        json::validate(&data).map_err(ApiError::invalid)?;
        let data = json::to_json(&data);
        if data.len() > self.limits.max_document_bytes {
            return Err(ApiError::invalid(format!(
                "data is {} bytes as JSON, over the limit of {} bytes per document",
                data.len(),
                self.limits.max_document_bytes
            )));
        }
        Ok(store::SaveOp {
            collection,
            id,
            data,
            expected_rev: non_empty(expected_rev),
            create_only,
        })
    }

    fn delete_op(req: proto::DeleteRequest) -> Result<store::DeleteOp, ApiError> {
        let proto::DeleteRequest {
            collection,
            id,
            expected_rev,
        } = req;
        validate::collection(&collection)?;
        validate::id(&id, "id")?;
        Ok(store::DeleteOp {
            collection,
            id,
            expected_rev: non_empty(expected_rev),
        })
    }
}

/// Counts documents written and deleted, for metrics.
fn written(saved: u64, deleted: u64) {
    if saved > 0 {
        metrics::counter!("docsidecar_documents_written_total").increment(saved);
    }
    if deleted > 0 {
        metrics::counter!("docsidecar_documents_deleted_total").increment(deleted);
    }
}

/// The collection and id a mutation writes.
fn target(op: &store::Mutation) -> (&str, &str) {
    match op {
        store::Mutation::Save(s) => (&s.collection, &s.id),
        store::Mutation::Delete(d) => (&d.collection, &d.id),
    }
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

fn timestamp(micros: Micros) -> Timestamp {
    Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: (micros.rem_euclid(1_000_000) * 1000) as i32,
    }
}

fn document(doc: store::Document) -> Result<proto::Document, ApiError> {
    let store::Document {
        collection,
        id,
        rev,
        data,
        create_time,
        update_time,
    } = doc;
    let data = json::from_json(&data).map_err(|e| {
        StoreError::Internal(format!(
            "document `{id}` in collection `{collection}` holds invalid JSON: {e}"
        ))
    })?;
    Ok(proto::Document {
        collection,
        id,
        rev,
        data: Some(data),
        create_time: Some(timestamp(create_time)),
        update_time: Some(timestamp(update_time)),
    })
}

#[tonic::async_trait]
impl DocumentService for DocumentApi {
    async fn get(
        &self,
        request: Request<proto::GetRequest>,
    ) -> Result<Response<proto::Document>, Status> {
        let scope = self.scope(&request);
        let proto::GetRequest { collection, id } = request.into_inner();
        record_collection(&collection);
        validate::collection(&collection)?;
        validate::id(&id, "id")?;
        scope
            .check(&collection, Need::Read)
            .map_err(ApiError::from)?;
        let doc = self.store.get(&collection, &id).await?;
        Ok(Response::new(document(doc)?))
    }

    async fn save(
        &self,
        request: Request<proto::SaveRequest>,
    ) -> Result<Response<proto::SaveResponse>, Status> {
        let scope = self.scope(&request);
        let req = request.into_inner();
        record_collection(&req.collection);
        let op = self.save_op(req)?;
        scope
            .check(&op.collection, Need::Write)
            .map_err(ApiError::from)?;
        let id = op.id.clone();
        let saved = self.store.save(op).await?;
        written(1, 0);
        Ok(Response::new(proto::SaveResponse {
            id,
            rev: saved.rev,
            update_time: Some(timestamp(saved.update_time)),
            created: saved.created,
        }))
    }

    async fn delete(
        &self,
        request: Request<proto::DeleteRequest>,
    ) -> Result<Response<proto::DeleteResponse>, Status> {
        let scope = self.scope(&request);
        let req = request.into_inner();
        record_collection(&req.collection);
        let op = Self::delete_op(req)?;
        scope
            .check(&op.collection, Need::Write)
            .map_err(ApiError::from)?;
        self.store.delete(op).await?;
        written(0, 1);
        Ok(Response::new(proto::DeleteResponse {}))
    }

    async fn list(
        &self,
        request: Request<proto::ListRequest>,
    ) -> Result<Response<proto::ListResponse>, Status> {
        let scope = self.scope(&request);
        let proto::ListRequest {
            collection,
            page_size,
            page_token,
        } = request.into_inner();
        record_collection(&collection);
        validate::collection(&collection)?;
        scope
            .check(&collection, Need::Read)
            .map_err(ApiError::from)?;
        let limit = validate::page_size(page_size)?;
        let after = match page_token.as_str() {
            "" => None,
            token => Some(page_token::decode(token, &collection).map_err(ApiError::invalid)?),
        };
        let page = self
            .store
            .list(&collection, after.as_deref(), limit)
            .await?;

        let mut more = page.more;
        let mut bytes = 0;
        let mut documents = Vec::with_capacity(page.documents.len());
        for doc in page.documents {
            if !documents.is_empty() && bytes + doc.data.len() > LIST_PAGE_BYTES {
                more = true;
                break;
            }
            bytes += doc.data.len();
            documents.push(document(doc)?);
        }
        let next_page_token = match documents.last() {
            Some(last) if more => page_token::encode(&collection, &last.id),
            _ => String::new(),
        };
        Ok(Response::new(proto::ListResponse {
            documents,
            next_page_token,
        }))
    }

    async fn batch_get(
        &self,
        request: Request<proto::BatchGetRequest>,
    ) -> Result<Response<proto::BatchGetResponse>, Status> {
        let scope = self.scope(&request);
        let proto::BatchGetRequest { collection, ids } = request.into_inner();
        record_collection(&collection);
        validate::collection(&collection)?;
        scope
            .check(&collection, Need::Read)
            .map_err(ApiError::from)?;
        validate::count("ids", ids.len(), validate::MAX_BATCH_GET_IDS)?;
        for (i, id) in ids.iter().enumerate() {
            validate::id(id, &format!("ids[{i}]"))?;
        }
        let found = self.store.batch_get(&collection, &ids).await?;
        let mut by_id: HashMap<String, store::Document> =
            found.into_iter().map(|d| (d.id.clone(), d)).collect();
        let mut documents = Vec::with_capacity(by_id.len());
        let mut missing_ids = Vec::new();
        let mut seen = std::collections::HashSet::with_capacity(ids.len());
        // Request order; an id asked for twice is answered once.
        for id in ids {
            if !seen.insert(id.clone()) {
                continue;
            }
            match by_id.remove(&id) {
                Some(doc) => documents.push(document(doc)?),
                None => missing_ids.push(id),
            }
        }
        Ok(Response::new(proto::BatchGetResponse {
            documents,
            missing_ids,
        }))
    }

    async fn write(
        &self,
        request: Request<proto::WriteRequest>,
    ) -> Result<Response<proto::WriteResponse>, Status> {
        let scope = self.scope(&request);
        let proto::WriteRequest { mutations } = request.into_inner();
        validate::count("mutations", mutations.len(), validate::MAX_WRITE_MUTATIONS)?;
        let mut ops = Vec::with_capacity(mutations.len());
        for (index, mutation) in mutations.into_iter().enumerate() {
            let op = match mutation.op {
                Some(Op::Save(save)) => self.save_op(save).map(store::Mutation::Save),
                Some(Op::Delete(delete)) => Self::delete_op(delete).map(store::Mutation::Delete),
                None => Err(ApiError::invalid("op is not set: give a save or a delete")),
            }
            .and_then(|op| {
                scope.check(target(&op).0, Need::Write)?;
                Ok(op)
            });
            ops.push(op.map_err(|e| e.in_mutation(index))?);
        }
        let ids: Vec<String> = ops.iter().map(|op| target(op).1.to_string()).collect();
        let outcomes = self.store.write(ops).await?;
        let saves = outcomes.iter().filter(|w| w.is_some()).count();
        written(saves as u64, (outcomes.len() - saves) as u64);
        let results = ids
            .into_iter()
            .zip(outcomes)
            .map(|(id, w)| proto::MutationResult {
                id,
                rev: w.map(|saved| saved.rev).unwrap_or_default(),
            })
            .collect();
        Ok(Response::new(proto::WriteResponse { results }))
    }

    async fn list_collections(
        &self,
        request: Request<proto::ListCollectionsRequest>,
    ) -> Result<Response<proto::ListCollectionsResponse>, Status> {
        let scope = self.scope(&request);
        let proto::ListCollectionsRequest {} = request.into_inner();
        // With a policy, the caller's declared collections; open, whatever exists.
        let collections = match scope.collections() {
            Some(collections) => collections,
            None => self.store.list_collections().await?,
        };
        Ok(Response::new(proto::ListCollectionsResponse {
            collections,
        }))
    }
}
