//! The gRPC layer: validate, authorize, call the store, convert. No SQL here;
//! every error becomes a `Status` in one place (`error.rs`).

mod convert;
mod error;
pub mod json;
pub mod page_token;
pub mod validate;

pub use error::ApiError;

use crate::metrics;
use crate::policy::{Need, Scope};
use crate::proto::{self, document_service_server::DocumentService};
use crate::store::{self, DocumentStore};
use crate::telemetry::record_collection;
use convert::{document, timestamp, Accept};
use std::collections::{HashMap, HashSet};
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

/// The caller, as the auth layer established it.
struct Caller(Scope);

impl Caller {
    fn authorize(&self, collection: &str, need: Need) -> Result<(), Status> {
        self.0.check(collection, need).map_err(ApiError::from)?;
        Ok(())
    }
}

impl DocumentApi {
    pub fn new(store: Arc<dyn DocumentStore>, limits: Limits, scope: Scope) -> Self {
        DocumentApi {
            store,
            limits,
            scope,
        }
    }

    /// The caller's scope, as the auth layer established it (the service's own
    /// when it did not narrow it).
    fn caller<T>(&self, request: &Request<T>) -> Caller {
        Caller(
            request
                .extensions()
                .get::<Scope>()
                .unwrap_or(&self.scope)
                .clone(),
        )
    }

    /// The opening of every handler: the caller, the collection named in the
    /// request's span, the request validated.
    fn accept<T: Accept>(&self, request: Request<T>) -> Result<(Caller, T::Valid), Status> {
        let caller = self.caller(&request);
        let request = request.into_inner();
        record_collection(request.collection());
        Ok((caller, request.accept(&self.limits)?))
    }
}

#[tonic::async_trait]
impl DocumentService for DocumentApi {
    async fn get(
        &self,
        request: Request<proto::GetRequest>,
    ) -> Result<Response<proto::Document>, Status> {
        let (caller, get) = self.accept(request)?;
        caller.authorize(&get.collection, Need::Read)?;
        let doc = self.store.get(&get.collection, &get.id).await?;
        Ok(Response::new(document(doc)?))
    }

    async fn save(
        &self,
        request: Request<proto::SaveRequest>,
    ) -> Result<Response<proto::SaveResponse>, Status> {
        let (caller, op) = self.accept(request)?;
        caller.authorize(&op.collection, Need::Write)?;
        let id = op.id.clone();
        let saved = self.store.save(op).await?;
        metrics::documents_changed(1, 0);
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
        let (caller, op) = self.accept(request)?;
        caller.authorize(&op.collection, Need::Write)?;
        self.store.delete(op).await?;
        metrics::documents_changed(0, 1);
        Ok(Response::new(proto::DeleteResponse {}))
    }

    async fn list(
        &self,
        request: Request<proto::ListRequest>,
    ) -> Result<Response<proto::ListResponse>, Status> {
        let (caller, list) = self.accept(request)?;
        caller.authorize(&list.collection, Need::Read)?;
        let page = self
            .store
            .list(&list.collection, list.after.as_deref(), list.limit)
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
            Some(last) if more => page_token::encode(&list.collection, &last.id),
            _ => String::new(),
        };
        Ok(Response::new(proto::ListResponse {
            documents,
            next_page_token,
            resume_token: String::new(),
        }))
    }

    async fn batch_get(
        &self,
        request: Request<proto::BatchGetRequest>,
    ) -> Result<Response<proto::BatchGetResponse>, Status> {
        let (caller, batch) = self.accept(request)?;
        caller.authorize(&batch.collection, Need::Read)?;
        let found = self.store.batch_get(&batch.collection, &batch.ids).await?;
        let mut by_id: HashMap<String, store::Document> =
            found.into_iter().map(|d| (d.id.clone(), d)).collect();
        let mut documents = Vec::with_capacity(by_id.len());
        let mut missing_ids = Vec::new();
        let mut seen = HashSet::with_capacity(batch.ids.len());
        // Request order; an id asked for twice is answered once.
        for id in batch.ids {
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
            unprocessed_ids: Vec::new(),
        }))
    }

    async fn write(
        &self,
        request: Request<proto::WriteRequest>,
    ) -> Result<Response<proto::WriteResponse>, Status> {
        let caller = self.caller(&request);
        let proto::WriteRequest { mutations } = request.into_inner();
        let ops = convert::mutations(mutations, &self.limits, &caller.0)?;
        let ids: Vec<String> = ops.iter().map(|op| op.id().to_string()).collect();
        let outcomes = self.store.write(ops).await?;
        let saves = outcomes
            .iter()
            .filter(|w| matches!(w, store::Written::Saved(_)))
            .count();
        metrics::documents_changed(saves as u64, (outcomes.len() - saves) as u64);
        let results = ids
            .into_iter()
            .zip(outcomes)
            .map(|(id, written)| proto::MutationResult {
                id,
                rev: match written {
                    store::Written::Saved(saved) => saved.rev,
                    store::Written::Deleted => String::new(),
                },
            })
            .collect();
        Ok(Response::new(proto::WriteResponse { results }))
    }

    async fn update(
        &self,
        _request: Request<proto::UpdateRequest>,
    ) -> Result<Response<proto::UpdateResponse>, Status> {
        Err(ApiError::unimplemented("Update").into())
    }

    async fn query(
        &self,
        _request: Request<proto::QueryRequest>,
    ) -> Result<Response<proto::QueryResponse>, Status> {
        Err(ApiError::unimplemented("Query").into())
    }

    async fn count(
        &self,
        _request: Request<proto::CountRequest>,
    ) -> Result<Response<proto::CountResponse>, Status> {
        Err(ApiError::unimplemented("Count").into())
    }

    type WatchStream = futures_util::stream::BoxStream<'static, Result<proto::ChangeEvent, Status>>;

    async fn watch(
        &self,
        _request: Request<proto::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Err(ApiError::unimplemented("Watch").into())
    }

    async fn list_collections(
        &self,
        request: Request<proto::ListCollectionsRequest>,
    ) -> Result<Response<proto::ListCollectionsResponse>, Status> {
        let caller = self.caller(&request);
        // With a policy, the caller's declared collections; open, whatever exists.
        let collections = match caller.0.collections() {
            Some(collections) => collections,
            None => self.store.list_collections().await?,
        };
        Ok(Response::new(proto::ListCollectionsResponse {
            collections,
        }))
    }
}
