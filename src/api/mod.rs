//! The gRPC layer: validate, authorize, call the store, convert. No SQL here;
//! every error becomes a `Status` in one place (`error.rs`).

mod access;
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
use crate::policy::{Need, Permissions};
use crate::proto::{self, document_service_server::DocumentService};
use crate::store::{self, DocumentStore};
use crate::telemetry::record_collection;
use access::Caller;
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
    /// The service's permissions, for calls the auth layer did not narrow.
    permissions: Arc<Permissions>,
}

/// A document as the caller may see it: hidden fields removed.
fn shown(mut doc: store::Document, protected: &store::Protected) -> store::Document {
    doc.data = protected.strip(doc.data);
    doc
}

fn shown_all(docs: Vec<store::Document>, protected: &store::Protected) -> Vec<proto::Document> {
    convert::documents(docs.into_iter().map(|d| shown(d, protected)).collect())
}

impl DocumentApi {
    pub fn new(
        store: Arc<dyn DocumentStore>,
        limits: Limits,
        indexes: Indexes,
        watch: WatchLimits,
        draining: tokio::sync::watch::Receiver<bool>,
        permissions: Arc<Permissions>,
    ) -> Self {
        DocumentApi {
            store,
            limits,
            indexes,
            watch_slots: Arc::new(tokio::sync::Semaphore::new(watch.max_streams)),
            watch,
            draining,
            permissions,
        }
    }

    /// A resume token at or before whatever is read next: List-then-Watch
    /// from it misses nothing.
    async fn resume_token(&self) -> Result<String, Status> {
        let bounds = self.store.feed_bounds().await?;
        Ok(watch::resume_token(bounds.feed_id, bounds.head))
    }

    /// The caller's permissions, as the auth layer established them (the
    /// service's own when it did not narrow them).
    fn caller<T>(&self, request: &Request<T>) -> Caller<'_> {
        Caller {
            permissions: request
                .extensions()
                .get::<Arc<Permissions>>()
                .unwrap_or(&self.permissions)
                .clone(),
            store: self.store.as_ref(),
        }
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
    fn accept<T: Accept>(&self, request: Request<T>) -> Result<(Caller<'_>, T::Valid), Status> {
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
        let (caller, mut key) = self.accept(request)?;
        let protected = caller.document(&mut key, Need::Read).await?;
        let doc = self.store.get(&key).await?;
        Ok(Response::new(document(shown(doc, &protected))?))
    }

    async fn save(
        &self,
        request: Request<proto::SaveRequest>,
    ) -> Result<Response<proto::SaveResponse>, Status> {
        let (caller, mut op) = self.accept(request)?;
        op.protected = caller.document(&mut op.key, Need::Write).await?;
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
        let (caller, mut op) = self.accept(request)?;
        op.protected = caller.document(&mut op.key, Need::Write).await?;
        let protected = op.protected.clone();
        let saved = self.write_one(store::Mutation::Update(op)).await?;
        let doc = shown(saved.document, &protected);
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
        let (caller, mut op) = self.accept(request)?;
        caller.document(&mut op.key, Need::Write).await?;
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
        let (caller, mut list) = self.accept(request)?;
        let requested = match &list.scopes {
            store::Scopes::One(scope) => scope.as_str(),
            store::Scopes::All => "",
        };
        let (scopes, protected) = caller.read(&list.collection, requested)?;
        list.scopes = scopes;
        let resume_token = self.resume_token().await?;
        let page = self.store.list(&list, RESPONSE_BUDGET).await?;
        let next_page_token = match page.documents.last() {
            Some(last) if page.more => {
                page_token::encode(&list.collection, &last.key.id, &last.key.scope)
            }
            _ => String::new(),
        };
        let documents = shown_all(page.documents, &protected);
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
        let (caller, mut batch) = self.accept(request)?;
        let (scope, protected) = caller
            .scope(&batch.collection, &batch.scope, Need::Read)
            .await?;
        batch.scope = scope;
        let found = self.store.batch_get(&batch, RESPONSE_BUDGET).await?;
        let mut ids = batch.ids.into_iter();
        let looked_up: Vec<String> = ids.by_ref().take(found.looked_up).collect();
        let present: HashSet<&str> = found.documents.iter().map(|d| d.key.id.as_str()).collect();
        let missing_ids = looked_up
            .iter()
            .filter(|id| !present.contains(id.as_str()))
            .cloned()
            .collect();
        let documents = shown_all(found.documents, &protected);
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
        let ops = convert::mutations(mutations, &self.limits, &caller).await?;
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
        let (query::Validated { query, fingerprint }, protected) = query::query(request, &caller)?;
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
        let documents = shown_all(page.documents, &protected);
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
        let query = query::count(request, &caller)?;
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
            caller.permissions.collections()
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
                caller.rights(c, Need::Read)?;
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
            permissions: caller.permissions.clone(),
        };
        Ok(Response::new(watcher.stream(permit)))
    }

    async fn list_collections(
        &self,
        request: Request<proto::ListCollectionsRequest>,
    ) -> Result<Response<proto::ListCollectionsResponse>, Status> {
        let caller = self.caller(&request);
        // With a policy, the caller's declared collections; open, whatever exists.
        let collections = match caller.permissions.collections() {
            Some(collections) => collections,
            None => self.store.list_collections().await?,
        };
        Ok(Response::new(proto::ListCollectionsResponse {
            collections,
        }))
    }
}
