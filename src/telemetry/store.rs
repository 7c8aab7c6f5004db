//! A store decorator that wraps each call of a traced request in a span: the
//! database system, the operation and the collection, never keys or
//! documents. Installed only when tracing is on, so the store path is
//! untouched otherwise; the pools add a child span for the connection wait.

use super::otel;
use crate::store::{
    changes, query, Batch, BatchGetOp, Budget, Document, DocumentStore, Key, ListOp, Micros,
    Mutation, Page, PoolStats, StoreResult, Written,
};
use async_trait::async_trait;
use std::future::Future;
use std::sync::Arc;
use tracing::{field, Instrument, Span};

/// Traces the calls made to `inner` on behalf of a traced request.
pub struct TracedStore {
    inner: Arc<dyn DocumentStore>,
    /// `db.system` as the OpenTelemetry conventions name it (sqlite,
    /// postgresql, mysql; memory for the in-memory store).
    system: &'static str,
}

impl TracedStore {
    pub fn new(inner: Arc<dyn DocumentStore>, system: &'static str) -> TracedStore {
        TracedStore { inner, system }
    }

    /// The span of one store call, a child of the current span; none when
    /// no request is being traced (background work: the reaper, pruning).
    fn span(&self, operation: &'static str, collection: Option<&str>) -> Span {
        if Span::current().is_none() {
            return Span::none();
        }
        let name = match collection {
            Some(c) => format!("{operation} {c}"),
            None => operation.to_string(),
        };
        let span = tracing::info_span!(
            "store",
            db.system = self.system,
            db.operation.name = operation,
            collection,
            trace_id = field::Empty,
            otel.name = name,
            otel.kind = "client",
        );
        otel::record_trace_id(&span, &span);
        span
    }

    async fn traced<T>(
        &self,
        operation: &'static str,
        collection: Option<&str>,
        call: impl Future<Output = T>,
    ) -> T {
        call.instrument(self.span(operation, collection)).await
    }
}

/// The one collection a write touches, if it touches one.
fn collection_of(mutations: &[Mutation]) -> Option<&str> {
    let first = mutations.first()?.collection();
    mutations
        .iter()
        .all(|m| m.collection() == first)
        .then_some(first)
}

#[async_trait]
impl DocumentStore for TracedStore {
    async fn get(&self, key: &Key) -> StoreResult<Document> {
        self.traced("get", Some(&key.collection), self.inner.get(key))
            .await
    }

    async fn write(&self, mutations: Vec<Mutation>) -> StoreResult<Vec<Written>> {
        let span = self.span("write", collection_of(&mutations));
        self.inner.write(mutations).instrument(span).await
    }

    async fn list(&self, op: &ListOp, budget: Budget) -> StoreResult<Page> {
        self.traced("list", Some(&op.collection), self.inner.list(op, budget))
            .await
    }

    async fn batch_get(&self, op: &BatchGetOp, budget: Budget) -> StoreResult<Batch> {
        self.traced(
            "batch_get",
            Some(&op.collection),
            self.inner.batch_get(op, budget),
        )
        .await
    }

    async fn query(&self, query: &query::Query, budget: Budget) -> StoreResult<Page> {
        self.traced(
            "query",
            Some(&query.collection),
            self.inner.query(query, budget),
        )
        .await
    }

    async fn count(&self, query: &query::Query) -> StoreResult<u64> {
        self.traced("count", Some(&query.collection), self.inner.count(query))
            .await
    }

    async fn reap_expired(&self, limit: usize) -> StoreResult<usize> {
        self.inner.reap_expired(limit).await
    }

    async fn changes(&self, op: &changes::ChangesOp) -> StoreResult<changes::Changes> {
        self.traced("changes", None, self.inner.changes(op)).await
    }

    async fn feed_bounds(&self) -> StoreResult<changes::FeedBounds> {
        self.traced("feed_bounds", None, self.inner.feed_bounds())
            .await
    }

    async fn feed_now(&self) -> StoreResult<changes::FeedBounds> {
        self.traced("feed_now", None, self.inner.feed_now()).await
    }

    async fn prune_changes(&self, before: Micros, limit: usize) -> StoreResult<usize> {
        self.inner.prune_changes(before, limit).await
    }

    fn wakeups(&self) -> changes::Wakeups {
        self.inner.wakeups()
    }

    async fn list_collections(&self) -> StoreResult<Vec<String>> {
        self.traced("list_collections", None, self.inner.list_collections())
            .await
    }

    async fn has_scopes(&self, collection: &str) -> StoreResult<bool> {
        self.traced(
            "has_scopes",
            Some(collection),
            self.inner.has_scopes(collection),
        )
        .await
    }

    async fn ping(&self) -> StoreResult<()> {
        self.inner.ping().await
    }

    async fn close(&self) {
        self.inner.close().await
    }

    fn pool_stats(&self) -> PoolStats {
        self.inner.pool_stats()
    }
}
