//! Reads on MySQL/MariaDB: Get, List and BatchGet by key, and queries,
//! evaluated by the sidecar on the rows it reads:
//! filters and order compare the same sort keys as every store
//! ([`crate::store::key`], computed in Rust from each row's JSON), so the
//! answers are the other stores' by construction. The collection's live rows
//! of the scope are read in primary-key order, a chunk at a time; no SQL
//! index serves a field yet, so every query scans (declared indexes are
//! accepted and not created on this store).
//!
//! - Without an order, matches stream into the page in id order and the scan
//!   stops when the page is full.
//! - With an order, a first pass keeps the positions (order keys, id, scope)
//!   of the best `limit + 1` matches after the cursor, so memory stays within
//!   a page; a second pass reads those documents, within the budget, and
//!   keeps the ones that still match at the same position.

use super::{bytes, ddl, int, list_shape, row_to_doc, MysqlStore, COLUMNS, LIVE};
use crate::store::query::{self, Query};
use crate::store::{
    Batch, BatchGetOp, Budget, Document, DocumentStore, Key, ListOp, Page, PageBuilder, Scopes,
    StoreError, StoreResult,
};
use mysql_async::Value;
use serde_json::Value as Json;
use std::cmp::Ordering;

/// Rows read per statement of a scan.
const CHUNK: u64 = 500;

/// A match's place in a query's order: its order keys, id and scope.
type Position = (Vec<Vec<u8>>, String, String);

fn parse(doc: &Document) -> StoreResult<Json> {
    serde_json::from_str(&doc.data).map_err(|e| {
        StoreError::Internal(format!(
            "document `{}` in collection `{}` holds invalid JSON: {e}",
            doc.key.id, doc.key.collection
        ))
    })
}

/// The next `limit` live rows of `table` after `(id, scope)`, in (id, scope)
/// order: one scope's, or every scope's.
fn keyset(
    table: &str,
    scopes: &Scopes,
    (after_id, after_scope): (&str, &str),
    offset: i64,
    limit: u64,
) -> (String, Vec<Value>) {
    match scopes {
        Scopes::One(scope) => (
            format!("SELECT {COLUMNS} FROM {table} WHERE scope = ? AND id > ? AND {LIVE} ORDER BY id LIMIT ?"),
            vec![bytes(scope), bytes(after_id), offset.into(), limit.into()],
        ),
        Scopes::All => (
            format!("SELECT {COLUMNS} FROM {table} WHERE (id > ? OR (id = ? AND scope > ?)) AND {LIVE} ORDER BY id, scope LIMIT ?"),
            vec![bytes(after_id), bytes(after_id), bytes(after_scope), offset.into(), limit.into()],
        ),
    }
}

fn compare(q: &Query, a: &Position, b: &Position) -> Ordering {
    query::compare_positions(&q.order, (&a.0, &a.1, &a.2), (&b.0, &b.1, &b.2))
}

impl MysqlStore {
    /// What a read of `scopes` reads: one scope's relation (a view for a
    /// scoped account), or the table.
    async fn relation_for(&self, collection: &str, scopes: &Scopes) -> StoreResult<String> {
        match scopes {
            Scopes::One(scope) => self.relation(collection, scope).await,
            Scopes::All => ddl::table(collection),
        }
    }

    /// Calls `each` with every live row of the query's scope (and the
    /// document's parsed JSON) that matches its filters, in (id, scope)
    /// order after `start`, until it returns false.
    async fn scan_matches(
        &self,
        q: &Query,
        start: Option<(String, String)>,
        mut each: impl FnMut(Document, Json) -> StoreResult<bool> + Send,
    ) -> StoreResult<()> {
        let table = self.relation_for(&q.collection, &q.scopes).await?;
        let offset = self.clock.offset();
        // Ids are never empty: '' is before the first row.
        let (mut after_id, mut after_scope) = start.unwrap_or_default();
        loop {
            let (sql, params) = keyset(&table, &q.scopes, (&after_id, &after_scope), offset, CHUNK);
            let (mut read, mut go_on, mut failed) = (0, true, None);
            self.scan(&sql, params, |row| {
                let doc = row_to_doc(&q.collection, row)?;
                read += 1;
                after_id.clone_from(&doc.key.id);
                after_scope.clone_from(&doc.key.scope);
                let data = match parse(&doc) {
                    Ok(data) => data,
                    Err(e) => {
                        failed = Some(e);
                        return Ok(false);
                    }
                };
                if query::matches(&q.filters, &doc, &data) {
                    match each(doc, data) {
                        Ok(more) => go_on = more,
                        Err(e) => failed = Some(e),
                    }
                }
                Ok(go_on && failed.is_none())
            })
            .await?;
            if let Some(e) = failed {
                return Err(e);
            }
            if !go_on || read < CHUNK {
                return Ok(());
            }
        }
    }

    pub(super) async fn run_query(&self, q: &Query, budget: Budget) -> StoreResult<Page> {
        let after = q
            .after
            .as_ref()
            .map(|c| (c.keys.clone(), c.id.clone(), c.scope.clone()));
        let is_after = |p: &Position| after.as_ref().is_none_or(|c| compare(q, p, c).is_gt());
        if q.order.is_empty() {
            // Rows come in the query's order: start right after the cursor.
            let start = after.as_ref().map(|c| (c.1.clone(), c.2.clone()));
            let mut page = PageBuilder::new(q.limit, budget);
            self.scan_matches(q, start, |doc, _| Ok(page.push(doc)))
                .await?;
            return Ok(page.finish());
        }
        // First pass: the best `limit + 1` positions after the cursor.
        let keep = Page::fetch_limit(q.limit);
        let mut best: Vec<Position> = Vec::new();
        self.scan_matches(q, None, |doc, data| {
            if let Some(keys) = query::order_keys(&q.order, &doc, &data) {
                let position = (keys, doc.key.id, doc.key.scope);
                if is_after(&position) {
                    best.push(position);
                    if best.len() >= 2 * keep {
                        best.sort_by(|a, b| compare(q, a, b));
                        best.truncate(keep);
                    }
                }
            }
            Ok(true)
        })
        .await?;
        best.sort_by(|a, b| compare(q, a, b));
        best.truncate(keep);
        // Second pass: those documents, in order, each scope's run at once.
        let mut page = PageBuilder::new(q.limit, budget);
        let mut skipped = false;
        let mut i = 0;
        'runs: while i < best.len() {
            let scope = best[i].2.clone();
            let run: Vec<&Position> = best[i..].iter().take_while(|p| p.2 == scope).collect();
            i += run.len();
            let op = BatchGetOp {
                collection: q.collection.clone(),
                scope,
                ids: run.iter().map(|p| p.1.clone()).collect(),
            };
            let found = self.batch_get(&op, Budget::unlimited()).await?;
            let mut found = found.documents.into_iter().peekable();
            for position in run {
                let Some(doc) = found.next_if(|d| d.key.id == position.1) else {
                    skipped = true;
                    continue;
                };
                let data = parse(&doc)?;
                let same = query::matches(&q.filters, &doc, &data)
                    && query::order_keys(&q.order, &doc, &data).as_ref() == Some(&position.0);
                if !same {
                    skipped = true;
                } else if !page.push(doc) {
                    break 'runs;
                }
            }
        }
        let mut page = page.finish();
        // A document that changed between the passes leaves a gap: more may follow.
        page.more |= skipped && best.len() == keep;
        Ok(page)
    }

    pub(super) async fn run_count(&self, q: &Query) -> StoreResult<u64> {
        let mut n = 0;
        self.scan_matches(q, None, |_, _| {
            n += 1;
            Ok(true)
        })
        .await?;
        Ok(n)
    }
}

/// Reads by key, each one statement (see [`MysqlStore::scan`]).
impl MysqlStore {
    pub(super) async fn get_once(&self, key: &Key) -> StoreResult<Document> {
        let table = self.relation(&key.collection, &key.scope).await?;
        let sql = format!("SELECT {COLUMNS} FROM {table} WHERE scope = ? AND id = ? AND {LIVE}");
        let params = vec![
            bytes(&key.scope),
            bytes(&key.id),
            self.clock.offset().into(),
        ];
        let mut found = None;
        self.scan(&sql, params, |row| {
            found = Some(row_to_doc(&key.collection, row)?);
            Ok(false)
        })
        .await?;
        found.ok_or_else(|| StoreError::not_found(&key.collection, &key.id))
    }

    pub(super) async fn list_once(&self, op: &ListOp, budget: Budget) -> StoreResult<Page> {
        let table = self.relation_for(&op.collection, &op.scopes).await?;
        let fetch = u64::try_from(Page::fetch_limit(op.limit)).unwrap_or(u64::MAX);
        let (after_id, after_scope) = op.after.clone().unwrap_or_default();
        let offset = self.clock.offset();
        // Keyset pagination on the primary key, never OFFSET; rows stream
        // until the page is full.
        let (sql, params) = keyset(&table, &op.scopes, (&after_id, &after_scope), offset, fetch);
        let mut page = PageBuilder::new(op.limit, budget);
        self.scan(&sql, params, |row| {
            Ok(page.push(row_to_doc(&op.collection, row)?))
        })
        .await?;
        Ok(page.finish())
    }

    pub(super) async fn batch_get_once(
        &self,
        op: &BatchGetOp,
        budget: Budget,
    ) -> StoreResult<Batch> {
        let table = self.relation(&op.collection, &op.scope).await?;
        let mut batch = Batch::in_one_statement(op.ids.len());
        let Some(last) = op.ids.last() else {
            return Ok(batch);
        };
        // One statement; rows come in request order (FIELD gives each id's
        // position, comparing bytes), so the budget stops the reading and the
        // position says how far it got. The list is padded with the last id
        // to one of a few lengths.
        let shape = list_shape(op.ids.len());
        let marks = vec!["?"; shape].join(", ");
        let sql = format!(
            "SELECT {COLUMNS}, FIELD(id, {marks}) AS n FROM {table}
             WHERE scope = ? AND id IN ({marks}) AND {LIVE} ORDER BY n"
        );
        let ids: Vec<Value> = op
            .ids
            .iter()
            .chain(std::iter::repeat(last))
            .take(shape)
            .map(|id| bytes(id))
            .collect();
        let mut params = ids.clone();
        params.push(bytes(&op.scope));
        params.extend(ids);
        params.push(self.clock.offset().into());
        let mut spending = budget.start();
        self.scan(&sql, params, |mut row| {
            let n = int(&mut row, 7)?;
            Ok(batch.take(&mut spending, row_to_doc(&op.collection, row)?, n))
        })
        .await?;
        Ok(batch)
    }
}
