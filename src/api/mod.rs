//! The gRPC layer: validate, authorize, call the store, convert. No SQL here;
//! every error becomes a `Status` in one place (`error.rs`).

mod convert;
mod error;
pub mod json;
pub mod page_token;
mod query;
pub mod size;
pub mod validate;
mod watch;

pub use query::Indexes;
pub use watch::WatchLimits;

pub use error::ApiError;

use crate::metrics;
use crate::policy::{Need, Scope};
use crate::proto::{self, document_service_server::DocumentService};
use crate::store::{self, DocumentStore};
use crate::telemetry::record_collection;
use convert::{document, timestamp, Accept};
use std::collections::HashSet;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// Responses stop growing past this many bytes of encoded documents, so they
/// stay under the 4 MiB that gRPC clients accept by default; the next page or
/// call picks up the rest. Stores apply it while reading rows.
pub const RESPONSE_BUDGET: store::Budget = store::Budget {
    bytes: 3 * 1024 * 1024,
    cost: size::document_len,
};

/// Request limits that operators may tune.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_document_bytes: usize,
}

/// The `docsidecar.v1.DocumentService` implementation.
pub struct DocumentApi {
    store: Arc<dyn DocumentStore>,
    limits: Limits,
    indexes: Indexes,
    watch: WatchLimits,
    /// Watch streams served at once.
    watch_slots: Arc<tokio::sync::Semaphore>,
    /// Turns true when the sidecar starts shutting down: watch streams end.
    draining: tokio::sync::watch::Receiver<bool>,
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
    pub fn new(
        store: Arc<dyn DocumentStore>,
        limits: Limits,
        indexes: Indexes,
        watch: WatchLimits,
        draining: tokio::sync::watch::Receiver<bool>,
        scope: Scope,
    ) -> Self {
        DocumentApi {
            store,
            limits,
            indexes,
            watch_slots: Arc::new(tokio::sync::Semaphore::new(watch.max_streams)),
            watch,
            draining,
            scope,
        }
    }

    /// A resume token at or before whatever is read next: List-then-Watch
    /// from it misses nothing.
    async fn resume_token(&self) -> Result<String, Status> {
        let bounds = self.store.feed_bounds().await?;
        Ok(watch::resume_token(bounds.feed_id, bounds.head))
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

    /// Applies one save or update, with a plain call's error.
    async fn write_one(&self, mutation: store::Mutation) -> Result<store::Saved, Status> {
        let mut written = self
            .store
            .write(vec![mutation])
            .await
            .map_err(store::StoreError::outside_mutation)?;
        count_writes(&written);
        match written.pop() {
            Some(store::Written::Saved(saved)) => Ok(saved),
            other => Err(ApiError::from(store::StoreError::Internal(format!(
                "a save or update answered {other:?}"
            )))
            .into()),
        }
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

/// Counts documents written and deleted, for metrics.
fn count_writes(written: &[store::Written]) {
    let saved = written
        .iter()
        .filter(|w| matches!(w, store::Written::Saved(_)))
        .count();
    metrics::documents_changed(saved as u64, (written.len() - saved) as u64);
}

#[tonic::async_trait]
impl DocumentService for DocumentApi {
    async fn get(
        &self,
        request: Request<proto::GetRequest>,
    ) -> Result<Response<proto::Document>, Status> {
        let (caller, key) = self.accept(request)?;
        caller.authorize(&key.collection, Need::Read)?;
        let doc = self.store.get(&key).await?;
        Ok(Response::new(document(doc)?))
    }

    async fn save(
        &self,
        request: Request<proto::SaveRequest>,
    ) -> Result<Response<proto::SaveResponse>, Status> {
        let (caller, op) = self.accept(request)?;
        caller.authorize(&op.key.collection, Need::Write)?;
        let saved = self.write_one(store::Mutation::Save(op)).await?;
        Ok(Response::new(proto::SaveResponse {
            id: saved.document.key.id,
            rev: saved.document.rev,
            update_time: Some(timestamp(saved.document.update_time)),
            created: saved.created,
        }))
    }

    async fn update(
        &self,
        request: Request<proto::UpdateRequest>,
    ) -> Result<Response<proto::UpdateResponse>, Status> {
        let (caller, op) = self.accept(request)?;
        caller.authorize(&op.key.collection, Need::Write)?;
        let saved = self.write_one(store::Mutation::Update(op)).await?;
        let doc = saved.document;
        Ok(Response::new(proto::UpdateResponse {
            id: doc.key.id.clone(),
            rev: doc.rev.clone(),
            update_time: Some(timestamp(doc.update_time)),
            created: saved.created,
            document: Some(document(doc)?),
        }))
    }

    async fn delete(
        &self,
        request: Request<proto::DeleteRequest>,
    ) -> Result<Response<proto::DeleteResponse>, Status> {
        let (caller, op) = self.accept(request)?;
        caller.authorize(&op.key.collection, Need::Write)?;
        let written = self
            .store
            .write(vec![store::Mutation::Delete(op)])
            .await
            .map_err(store::StoreError::outside_mutation)?;
        count_writes(&written);
        Ok(Response::new(proto::DeleteResponse {}))
    }

    async fn list(
        &self,
        request: Request<proto::ListRequest>,
    ) -> Result<Response<proto::ListResponse>, Status> {
        let (caller, list) = self.accept(request)?;
        caller.authorize(&list.collection, Need::Read)?;
        let resume_token = self.resume_token().await?;
        let page = self.store.list(&list, RESPONSE_BUDGET).await?;
        let next_page_token = match page.documents.last() {
            Some(last) if page.more => page_token::encode(&list.collection, &last.key.id),
            _ => String::new(),
        };
        let documents = convert::documents(page.documents);
        Ok(Response::new(proto::ListResponse {
            documents,
            next_page_token,
            resume_token,
        }))
    }

    async fn batch_get(
        &self,
        request: Request<proto::BatchGetRequest>,
    ) -> Result<Response<proto::BatchGetResponse>, Status> {
        let (caller, batch) = self.accept(request)?;
        caller.authorize(&batch.collection, Need::Read)?;
        let found = self.store.batch_get(&batch, RESPONSE_BUDGET).await?;
        let mut ids = batch.ids.into_iter();
        let looked_up: Vec<String> = ids.by_ref().take(found.looked_up).collect();
        let present: HashSet<&str> = found.documents.iter().map(|d| d.key.id.as_str()).collect();
        let missing_ids = looked_up
            .iter()
            .filter(|id| !present.contains(id.as_str()))
            .cloned()
            .collect();
        let documents = convert::documents(found.documents);
        Ok(Response::new(proto::BatchGetResponse {
            documents,
            missing_ids,
            unprocessed_ids: ids.collect(),
        }))
    }

    async fn write(
        &self,
        request: Request<proto::WriteRequest>,
    ) -> Result<Response<proto::WriteResponse>, Status> {
        let caller = self.caller(&request);
        let proto::WriteRequest { mutations } = request.into_inner();
        let kinds: Vec<&str> = mutations
            .iter()
            .map(|m| m.op.as_ref().map_or("op", convert::op_name))
            .collect();
        let ops = convert::mutations(mutations, &self.limits, &caller.0)?;
        let ids: Vec<String> = ops.iter().map(|op| op.id().to_string()).collect();
        let outcomes = self
            .store
            .write(ops)
            .await
            .map_err(|e| ApiError::from(e).into_status_for(&kinds))?;
        count_writes(&outcomes);
        let results = ids
            .into_iter()
            .zip(outcomes)
            .map(|(id, written)| proto::MutationResult {
                id,
                rev: match written {
                    store::Written::Saved(saved) => saved.document.rev,
                    store::Written::Deleted => String::new(),
                },
            })
            .collect();
        Ok(Response::new(proto::WriteResponse { results }))
    }

    async fn query(
        &self,
        request: Request<proto::QueryRequest>,
    ) -> Result<Response<proto::QueryResponse>, Status> {
        let caller = self.caller(&request);
        let request = request.into_inner();
        record_collection(&request.collection);
        let query::Validated { query, fingerprint } = query::query(request, &self.limits)?;
        caller.authorize(&query.collection, Need::Read)?;
        self.indexes.check(&query)?;
        let resume_token = self.resume_token().await?;
        let page = self.store.query(&query, RESPONSE_BUDGET).await?;
        let next_page_token = match page.documents.last() {
            Some(last) if page.more => {
                let data: serde_json::Value = serde_json::from_str(&last.data).unwrap_or_default();
                let keys = store::query::order_keys(&query.order, last, &data).unwrap_or_default();
                let cursor = store::query::Cursor {
                    keys,
                    id: last.key.id.clone(),
                    scope: last.key.scope.clone(),
                };
                page_token::encode_query(&query.collection, fingerprint, &cursor)
            }
            _ => String::new(),
        };
        let documents = convert::documents(page.documents);
        Ok(Response::new(proto::QueryResponse {
            documents,
            next_page_token,
            resume_token,
        }))
    }

    async fn count(
        &self,
        request: Request<proto::CountRequest>,
    ) -> Result<Response<proto::CountResponse>, Status> {
        let caller = self.caller(&request);
        let request = request.into_inner();
        record_collection(&request.collection);
        let query = query::count(request)?;
        caller.authorize(&query.collection, Need::Read)?;
        self.indexes.check(&query)?;
        let count = self.store.count(&query).await?;
        Ok(Response::new(proto::CountResponse {
            count: i64::try_from(count).unwrap_or(i64::MAX),
        }))
    }

    type WatchStream = watch::WatchStream;

    async fn watch(
        &self,
        request: Request<proto::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let caller = self.caller(&request);
        let proto::WatchRequest {
            collections,
            resume_token,
            include_documents,
        } = request.into_inner();
        // Empty: every collection the caller may read.
        let collections = if collections.is_empty() {
            caller.0.collections()
        } else {
            for (i, c) in collections.iter().enumerate() {
                validate::collection(c).map_err(|e| match e {
                    ApiError::Invalid {
                        message, reason, ..
                    } => ApiError::Invalid {
                        field: format!("collections[{i}]"),
                        message,
                        reason,
                    },
                    e => e,
                })?;
                caller.authorize(c, Need::Read)?;
            }
            Some(collections)
        };
        let start = match resume_token.as_str() {
            "" => self.store.feed_now().await?.head,
            token => watch::resume_position(token, &self.store.feed_bounds().await?)?,
        };
        let bounds = self.store.feed_bounds().await?;
        let permit = self.watch_slots.clone().try_acquire_owned().map_err(|_| {
            metrics::watch_ended("rejected");
            Status::from(ApiError::Refused {
                reason: crate::status::Reason::WatchStreamsExhausted,
                message: format!(
                    "this sidecar serves at most {} Watch streams at once (DOCSIDECAR_MAX_WATCH_STREAMS): retry later or close idle streams",
                    self.watch.max_streams
                ),
                metadata: Vec::new(),
            })
        })?;
        let watcher = watch::Watcher {
            store: self.store.clone(),
            collections,
            start,
            feed_id: bounds.feed_id,
            include_documents,
            limits: self.watch.clone(),
            draining: self.draining.clone(),
        };
        Ok(Response::new(watcher.stream(permit)))
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
