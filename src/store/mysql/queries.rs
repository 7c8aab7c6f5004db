//! Reads on MySQL/MariaDB: Get, List and BatchGet by key, and queries.
//!
//! A query is pushed down to SQL on the generated key columns of its fields
//! (see `keys`), which the declared indexes (`indexes`) serve, when every
//! field it filters or orders on has them; the sidecar checks each row
//! against the filters again (exact even where the SQL is loosened: long
//! strings, arrays, objects, array containment). A page whose order meets a
//! key the columns do not hold whole, or a query on fields without columns,
//! is evaluated by the sidecar on the rows it reads instead (the scan):
//! filters and order compare the same sort keys as every store
//! ([`crate::store::key`], computed in Rust from each row's JSON), so the
//! answers are the other stores' by construction. The scan reads the
//! collection's live rows of the scope in primary-key order, a chunk at a
//! time.
//!
//! - Without an order, matches stream into the page in id order and the scan
//!   stops when the page is full.
//! - With an order, a first pass keeps the positions (order keys, id, scope)
//!   of the best `limit + 1` matches after the cursor, so memory stays within
//!   a page; a second pass reads those documents, within the budget, and
//!   keeps the ones that still match at the same position.

use super::{bytes, ddl, indexes, int, keys, list_shape, row_to_doc, MysqlStore, COLUMNS, LIVE};
use crate::store::query::{self, Cursor, Field, Query};
use crate::store::{
    Batch, BatchGetOp, Budget, Document, DocumentStore, Key, ListOp, Page, PageBuilder, Scopes,
    StoreError, StoreResult,
};
use mysql_async::Value;
use serde_json::Value as Json;
use std::cmp::Ordering;
use std::collections::BTreeSet;
use std::sync::Arc;

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
        if let Some(relation) = self.pushdown(q).await? {
            if let Some(page) = self.indexed_page(q, &relation, budget).await? {
                return Ok(page);
            }
        }
        self.scanned_page(q, budget).await
    }

    /// A page read by the scan (see the module's documentation).
    pub(super) async fn scanned_page(&self, q: &Query, budget: Budget) -> StoreResult<Page> {
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
        if let Some(relation) = self.pushdown(q).await? {
            if let Some(sql) = keys::query_sql(q, None) {
                return self.indexed_count(q, &relation, sql).await;
            }
        }
        let mut n = 0;
        self.scan_matches(q, None, |_, _| {
            n += 1;
            Ok(true)
        })
        .await?;
        Ok(n)
    }
}

/// Queries on the key columns (see `keys`).
impl MysqlStore {
    /// The relation whose key columns serve `q`, or `None`: a field without
    /// columns there, or one no SQL may name (then the scan serves it).
    /// Without a policy the index `q` needs is created first.
    pub(super) async fn pushdown(&self, q: &Query) -> StoreResult<Option<String>> {
        let fields = keys::sql_fields(q);
        if !fields.iter().all(|p| keys::pushable(p)) {
            return Ok(None);
        }
        self.index_for(q).await;
        let relation = self.relation_for(&q.collection, &q.scopes).await?;
        if fields.is_empty() {
            return Ok(Some(relation));
        }
        let columns = self.columns_of(&relation).await?;
        let served = fields
            .iter()
            .all(|p| keys::columns(p).iter().all(|c| columns.contains(c)));
        Ok(served.then_some(relation))
    }

    /// The columns of a relation, looked up again now and then.
    async fn columns_of(&self, relation: &str) -> StoreResult<Arc<BTreeSet<String>>> {
        if let Some(columns) = self.columns.get(relation) {
            return Ok(columns);
        }
        let mut c = self.pools.acquire().await?;
        let result = indexes::relation_columns(c.conn(), relation).await;
        c.done(&result);
        let columns = Arc::new(result.map_err(|e| e.resolve(&self.target))?);
        self.columns.set(relation, columns.clone());
        Ok(columns)
    }

    /// Development (tables created on demand): creates the index `q` needs
    /// on first use. A failure leaves the query to the scan.
    async fn index_for(&self, q: &Query) {
        let Some(index) = q.needed_index().filter(|_| self.auto_index) else {
            return;
        };
        let name = format!("{}.{}", q.collection, keys::index_name(&index));
        if self.indexed.contains(&name) {
            return;
        }
        let Ok(mut c) = self.pools.acquire().await else {
            return;
        };
        let result = indexes::create(c.conn(), &q.collection, &index).await;
        c.done(&result);
        match result {
            Ok(true) => {
                tracing::info!(collection = %q.collection, index = %index, "created an index on first use (no policy)");
            }
            Ok(false) => {}
            // No table yet: nothing to index, nothing to find.
            Err(e) if e.is_missing_table() => return,
            Err(e) => {
                tracing::warn!(collection = %q.collection, index = %index, error = %e, "could not create the index a query needs: it scans");
            }
        }
        self.columns.forget(&format!("`{}`", q.collection));
        self.indexed.insert(name);
    }

    /// A page through the key columns; `None` when its order meets a key
    /// the columns do not hold whole (the scan serves that page).
    async fn indexed_page(
        &self,
        q: &Query,
        relation: &str,
        budget: Budget,
    ) -> StoreResult<Option<Page>> {
        let mut cursor = q.after.clone();
        let mut page = PageBuilder::new(q.limit, budget);
        loop {
            let Some(sql) = keys::query_sql(q, cursor.as_ref()) else {
                tracing::debug!(collection = %q.collection, "a page starts after a key the key columns do not hold whole: read by the scan");
                return Ok(None);
            };
            // Loosened conditions may return rows the sidecar drops.
            let fetch = Page::fetch_limit(q.limit).max(if sql.exact { 0 } else { 100 });
            let statement = page_statement(relation, &sql, fetch);
            let mut params = vec![Value::from(self.clock.offset())];
            params.extend(sql.params);
            let (mut read, mut last, mut inexact, mut full) = (0, None, false, false);
            self.scan(&statement, params, |row| {
                let doc = row_to_doc(&q.collection, row)?;
                read += 1;
                let data = parse(&doc)?;
                let Some(order) = query::order_keys(&q.order, &doc, &data) else {
                    // The columns and the JSON disagree: leave it to the scan.
                    inexact = true;
                    return Ok(false);
                };
                let exact = q
                    .order
                    .iter()
                    .zip(&order)
                    .all(|(o, k)| o.field == Field::Id || keys::is_exact(k));
                last = Some(Cursor {
                    keys: order,
                    id: doc.key.id.clone(),
                    scope: doc.key.scope.clone(),
                });
                if !query::matches(&q.filters, &doc, &data) {
                    return Ok(true);
                }
                if !exact {
                    inexact = true;
                    return Ok(false);
                }
                full = !page.push(doc);
                Ok(!full)
            })
            .await?;
            if inexact {
                tracing::debug!(collection = %q.collection, "a page's order meets a key the key columns do not hold whole: read by the scan");
                return Ok(None);
            }
            if full || read < fetch {
                tracing::debug!(collection = %q.collection, "a page read through the key columns");
                return Ok(Some(page.finish()));
            }
            cursor = last;
        }
    }

    /// A count through the key columns: in SQL when its conditions are
    /// exact, else of the rows they select that match.
    async fn indexed_count(&self, q: &Query, relation: &str, sql: keys::Sql) -> StoreResult<u64> {
        let mut params = vec![Value::from(self.clock.offset())];
        params.extend(sql.params.iter().cloned());
        let mut n = 0u64;
        if sql.exact {
            let statement = format!(
                "SELECT COUNT(*) FROM {relation} WHERE {LIVE} AND {}",
                conditions(&sql)
            );
            self.scan(&statement, params, |mut row| {
                n = u64::try_from(int(&mut row, 0)?).unwrap_or(0);
                Ok(false)
            })
            .await?;
            return Ok(n);
        }
        let statement = format!(
            "SELECT {COLUMNS} FROM {relation} WHERE {LIVE} AND {}",
            conditions(&sql)
        );
        self.scan(&statement, params, |row| {
            let doc = row_to_doc(&q.collection, row)?;
            let data = parse(&doc)?;
            n += u64::from(query::matches(&q.filters, &doc, &data));
            Ok(true)
        })
        .await?;
        Ok(n)
    }
}

/// The statement of a page of at most `fetch` rows (parameters: the clock
/// offset, then the SQL's).
pub(super) fn page_statement(relation: &str, sql: &keys::Sql, fetch: usize) -> String {
    format!(
        "SELECT {COLUMNS} FROM {relation} WHERE {LIVE} AND {} ORDER BY {} LIMIT {fetch}",
        conditions(sql),
        sql.order_by.join(", ")
    )
}

fn conditions(sql: &keys::Sql) -> String {
    if sql.conditions.is_empty() {
        "1 = 1".into()
    } else {
        sql.conditions.join(" AND ")
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
