//! In-memory store for tests and demos, and the reference every other store is
//! compared with: the same semantics as the databases, nothing persisted.

use super::plan::{self, Action};
use super::*;
use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::RwLock;

/// A collection's documents by (id, scope): the order of List and of
/// multi-scope walks.
type Collection = BTreeMap<(String, String), Document>;

/// Documents in ordered maps and the change feed, behind one lock; a write
/// holds the lock for the whole transaction, so conditions and changes are
/// decided together and positions follow commit order.
#[derive(Debug, Default)]
pub struct MemoryStore {
    collections: RwLock<State>,
    clock: Clock,
    wakeups: changes::Wakeups,
    feed_id: u128,
}

#[derive(Debug, Default)]
struct State {
    docs: BTreeMap<String, Collection>,
    feed: std::collections::VecDeque<changes::ChangeRecord>,
    /// The last position given.
    head: changes::Position,
    pruned_through: changes::Position,
}

impl State {
    fn record(&mut self, change: plan::Change, commit_time: Micros) {
        self.head += 1;
        self.feed.push_back(changes::ChangeRecord {
            position: self.head,
            kind: change.kind,
            key: change.key,
            rev: change.rev,
            document: change.document,
            commit_time,
        });
    }
}

fn slot(key: &Key) -> (String, String) {
    (key.id.clone(), key.scope.clone())
}

impl MemoryStore {
    pub fn new(clock: Clock) -> Self {
        MemoryStore {
            collections: RwLock::default(),
            clock,
            wakeups: changes::Wakeups::default(),
            feed_id: uuid::Uuid::now_v7().as_u128(),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        // A poisoned lock means a panic mid-write; the maps are still consistent
        // because every change is undone on failure before the guard drops.
        self.collections.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_lock(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.collections.write().unwrap_or_else(|e| e.into_inner())
    }
}

impl MemoryStore {
    /// The live documents of a query's collection and scopes that match its
    /// filters, with their parsed data.
    fn matching(&self, q: &query::Query) -> StoreResult<Vec<(Document, serde_json::Value)>> {
        let now = self.clock.now();
        let all = self.read();
        let Some(docs) = all.docs.get(&q.collection) else {
            return Ok(Vec::new());
        };
        let mut found = Vec::new();
        for doc in docs.values() {
            let in_scope = match &q.scopes {
                Scopes::One(scope) => doc.key.scope == *scope,
                Scopes::All => true,
            };
            if !in_scope || !doc.is_live(now) {
                continue;
            }
            let data: serde_json::Value = serde_json::from_str(&doc.data).map_err(|e| {
                StoreError::Internal(format!(
                    "document `{}` in collection `{}` holds invalid JSON: {e}",
                    doc.key.id, doc.key.collection
                ))
            })?;
            if query::matches(&q.filters, doc, &data) {
                found.push((doc.clone(), data));
            }
        }
        Ok(found)
    }
}

/// Undo record of a write in progress.
enum Undo {
    /// The previous state of one document.
    Doc(Key, Option<Document>),
    /// A collection created by this write.
    Collection(String),
}

/// Applies a planned action, remembering how to undo it.
fn apply(all: &mut BTreeMap<String, Collection>, action: Action, undo: &mut Vec<Undo>) {
    let (key, doc) = match action {
        Action::Insert(doc) | Action::Replace(doc) => (doc.key.clone(), Some(doc)),
        Action::Delete(key) => (key, None),
        Action::Nothing => return,
    };
    if !all.contains_key(&key.collection) {
        undo.push(Undo::Collection(key.collection.clone()));
    }
    let docs = all.entry(key.collection.clone()).or_default();
    let previous = match doc {
        Some(doc) => docs.insert(slot(&key), doc),
        None => docs.remove(&slot(&key)),
    };
    undo.push(Undo::Doc(key, previous));
}

fn rollback(all: &mut BTreeMap<String, Collection>, undo: Vec<Undo>) {
    for step in undo.into_iter().rev() {
        match step {
            Undo::Doc(key, previous) => {
                let docs = all.entry(key.collection.clone()).or_default();
                match previous {
                    Some(doc) => docs.insert(slot(&key), doc),
                    None => docs.remove(&slot(&key)),
                };
            }
            Undo::Collection(collection) => {
                all.remove(&collection);
            }
        }
    }
}

#[async_trait]
impl DocumentStore for MemoryStore {
    async fn get(&self, key: &Key) -> StoreResult<Document> {
        let now = self.clock.now();
        self.read()
            .docs
            .get(&key.collection)
            .and_then(|docs| docs.get(&slot(key)))
            .filter(|d| d.is_live(now))
            .cloned()
            .ok_or_else(|| StoreError::not_found(&key.collection, &key.id))
    }

    async fn write(&self, mutations: Vec<Mutation>) -> StoreResult<Vec<Written>> {
        let mut state = self.write_lock();
        let now = self.clock.now();
        let mut undo = Vec::with_capacity(mutations.len());
        let mut results = Vec::with_capacity(mutations.len());
        let mut changes = Vec::with_capacity(mutations.len());
        for (index, mutation) in mutations.iter().enumerate() {
            let key = mutation.key();
            let stored = state
                .docs
                .get(&key.collection)
                .and_then(|docs| docs.get(&slot(key)))
                .cloned();
            match mutation.plan(stored, now) {
                Ok(planned) => {
                    apply(&mut state.docs, planned.action, &mut undo);
                    results.push(planned.written);
                    changes.extend(planned.changes);
                }
                Err(e) => {
                    rollback(&mut state.docs, undo);
                    return Err(e.in_mutation(index));
                }
            }
        }
        for change in changes {
            state.record(change, now);
        }
        drop(state);
        self.wakeups.notify();
        Ok(results)
    }

    async fn list(&self, op: &ListOp, budget: Budget) -> StoreResult<Page> {
        let now = self.clock.now();
        let all = self.read();
        let Some(docs) = all.docs.get(&op.collection) else {
            return Ok(Page::default());
        };
        let start = match &op.after {
            Some((id, scope)) => Bound::Excluded((id.clone(), scope.clone())),
            None => Bound::Unbounded,
        };
        let rows = docs
            .range((start, Bound::Unbounded))
            .map(|(_, d)| d)
            .filter(|d| d.is_live(now))
            .filter(|d| match &op.scopes {
                Scopes::One(scope) => d.key.scope == *scope,
                Scopes::All => true,
            })
            .map(|d| Ok::<_, StoreError>(d.clone()));
        Page::collect(rows, op.limit, budget)
    }

    async fn batch_get(&self, op: &BatchGetOp, budget: Budget) -> StoreResult<Batch> {
        let now = self.clock.now();
        let all = self.read();
        let mut batch = Batch::default();
        let mut spending = budget.start();
        let Some(docs) = all.docs.get(&op.collection) else {
            batch.looked_up = op.ids.len();
            return Ok(batch);
        };
        for id in &op.ids {
            let found = docs
                .get(&(id.clone(), op.scope.clone()))
                .filter(|d| d.is_live(now))
                .cloned();
            if !batch.add(
                &mut spending,
                std::slice::from_ref(id),
                found.into_iter().collect(),
            ) {
                break;
            }
        }
        Ok(batch)
    }

    async fn query(&self, q: &query::Query, budget: Budget) -> StoreResult<Page> {
        let mut found = self.matching(q)?;
        // Only documents that have every ordered field are returned.
        let mut positioned: Vec<(Vec<Vec<u8>>, Document)> = Vec::with_capacity(found.len());
        for (doc, data) in found.drain(..) {
            if let Some(keys) = query::order_keys(&q.order, &doc, &data) {
                positioned.push((keys, doc));
            }
        }
        let position = |(keys, doc): &(Vec<Vec<u8>>, Document)| {
            (keys.clone(), doc.key.id.clone(), doc.key.scope.clone())
        };
        positioned.sort_by(|a, b| {
            let (a, b) = (position(a), position(b));
            query::compare_positions(&q.order, (&a.0, &a.1, &a.2), (&b.0, &b.1, &b.2))
        });
        let rows = positioned
            .into_iter()
            .filter(|entry| match &q.after {
                None => true,
                Some(c) => {
                    let p = position(entry);
                    query::compare_positions(
                        &q.order,
                        (&p.0, &p.1, &p.2),
                        (&c.keys, &c.id, &c.scope),
                    )
                    .is_gt()
                }
            })
            .map(|(_, doc)| Ok::<_, StoreError>(doc));
        Page::collect(rows, q.limit, budget)
    }

    async fn count(&self, q: &query::Query) -> StoreResult<u64> {
        Ok(self.matching(q)?.len() as u64)
    }

    async fn reap_expired(&self, limit: usize) -> StoreResult<usize> {
        let now = self.clock.now();
        let mut state = self.write_lock();
        let mut expired = Vec::new();
        for docs in state.docs.values() {
            expired.extend(
                docs.values()
                    .filter(|d| !d.is_live(now))
                    .take(limit - expired.len())
                    .map(|d| (d.key.clone(), d.rev.clone())),
            );
            if expired.len() == limit {
                break;
            }
        }
        for (key, rev) in &expired {
            if let Some(docs) = state.docs.get_mut(&key.collection) {
                docs.remove(&slot(key));
            }
            let change = plan::Change {
                kind: plan::ChangeKind::Expired,
                key: key.clone(),
                rev: rev.clone(),
                document: None,
            };
            state.record(change, now);
        }
        drop(state);
        if !expired.is_empty() {
            self.wakeups.notify();
        }
        Ok(expired.len())
    }

    async fn changes(&self, op: &changes::ChangesOp) -> StoreResult<changes::Changes> {
        let state = self.read();
        let records: Vec<changes::ChangeRecord> = state
            .feed
            .iter()
            .filter(|r| {
                r.position > op.after
                    && op
                        .collections
                        .as_ref()
                        .is_none_or(|c| c.contains(&r.key.collection))
            })
            .take(op.limit)
            .cloned()
            .collect();
        let through = match records.last() {
            Some(last) if records.len() == op.limit => last.position,
            _ => state.head.max(op.after),
        };
        Ok(changes::Changes { records, through })
    }

    async fn feed_bounds(&self) -> StoreResult<changes::FeedBounds> {
        let state = self.read();
        Ok(changes::FeedBounds {
            pruned_through: state.pruned_through,
            head: state.head,
            feed_id: self.feed_id,
        })
    }

    async fn prune_changes(&self, before: Micros, limit: usize) -> StoreResult<usize> {
        let mut state = self.write_lock();
        let mut pruned = 0;
        while pruned < limit && state.feed.front().is_some_and(|r| r.commit_time < before) {
            if let Some(r) = state.feed.pop_front() {
                state.pruned_through = r.position;
            }
            pruned += 1;
        }
        Ok(pruned)
    }

    fn wakeups(&self) -> changes::Wakeups {
        self.wakeups.clone()
    }

    async fn has_scopes(&self, collection: &str) -> StoreResult<bool> {
        Ok(self
            .read()
            .docs
            .get(collection)
            .is_some_and(|docs| docs.values().any(|d| !d.key.scope.is_empty())))
    }

    async fn list_collections(&self) -> StoreResult<Vec<String>> {
        Ok(self.read().docs.keys().cloned().collect())
    }

    async fn ping(&self) -> StoreResult<()> {
        Ok(())
    }

    async fn close(&self) {}
}
