//! In-memory store for tests and demos: the same semantics as the databases,
//! nothing persisted.

use super::*;
use std::collections::BTreeMap;
use std::sync::RwLock;

type Collection = BTreeMap<String, Document>;

/// Documents in ordered maps behind one lock; a write holds the lock for the
/// whole transaction, so conditions and changes are decided together.
#[derive(Debug, Default)]
pub struct MemoryStore {
    collections: RwLock<BTreeMap<String, Collection>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Collection>> {
        // A poisoned lock means a panic mid-write; the maps are still consistent
        // because every change is undone on failure before the guard drops.
        self.collections.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_lock(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Collection>> {
        self.collections.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// Undo record of a write in progress.
enum Undo {
    /// The previous state of one document.
    Doc(String, String, Option<Document>),
    /// A collection created by this write.
    Collection(String),
}

fn apply_save(
    all: &mut BTreeMap<String, Collection>,
    op: SaveOp,
    now: Micros,
    undo: &mut Vec<Undo>,
) -> StoreResult<Saved> {
    let existing = all.get(&op.collection).and_then(|docs| docs.get(&op.id));
    op.check(existing.map(|d| d.rev.as_str()))?;
    let created = existing.is_none();
    let create_time = existing.map_or(now, |d| d.create_time);
    let rev = new_rev();
    let doc = Document {
        collection: op.collection.clone(),
        id: op.id.clone(),
        rev: rev.clone(),
        data: op.data,
        create_time,
        update_time: now,
    };
    if !all.contains_key(&op.collection) {
        undo.push(Undo::Collection(op.collection.clone()));
    }
    let previous = all
        .entry(op.collection.clone())
        .or_default()
        .insert(op.id.clone(), doc);
    undo.push(Undo::Doc(op.collection, op.id, previous));
    Ok(Saved {
        rev,
        update_time: now,
        created,
    })
}

fn apply_delete(
    all: &mut BTreeMap<String, Collection>,
    op: DeleteOp,
    undo: &mut Vec<Undo>,
) -> StoreResult<()> {
    let existing = all.get(&op.collection).and_then(|docs| docs.get(&op.id));
    op.check(existing.map(|d| d.rev.as_str()))?;
    let previous = all
        .get_mut(&op.collection)
        .and_then(|docs| docs.remove(&op.id));
    undo.push(Undo::Doc(op.collection, op.id, previous));
    Ok(())
}

fn rollback(all: &mut BTreeMap<String, Collection>, undo: Vec<Undo>) {
    for step in undo.into_iter().rev() {
        match step {
            Undo::Doc(collection, id, previous) => {
                let docs = all.entry(collection).or_default();
                match previous {
                    Some(doc) => docs.insert(id, doc),
                    None => docs.remove(&id),
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
    async fn get(&self, collection: &str, id: &str) -> StoreResult<Document> {
        self.read()
            .get(collection)
            .and_then(|docs| docs.get(id))
            .cloned()
            .ok_or_else(|| StoreError::not_found(collection, id))
    }

    async fn save(&self, op: SaveOp) -> StoreResult<Saved> {
        apply_save(&mut self.write_lock(), op, now_micros(), &mut Vec::new())
    }

    async fn delete(&self, op: DeleteOp) -> StoreResult<()> {
        apply_delete(&mut self.write_lock(), op, &mut Vec::new())
    }

    async fn list(&self, collection: &str, after: Option<&str>, limit: usize) -> StoreResult<Page> {
        let all = self.read();
        let Some(docs) = all.get(collection) else {
            return Ok(Page::default());
        };
        let range = match after {
            Some(after) => {
                docs.range::<str, _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded))
            }
            None => docs.range::<str, _>(..),
        };
        let rows = range.take(Page::fetch_limit(limit)).map(|(_, d)| d.clone());
        Ok(Page::from_rows(rows.collect(), limit))
    }

    async fn batch_get(&self, collection: &str, ids: &[String]) -> StoreResult<Vec<Document>> {
        let all = self.read();
        let Some(docs) = all.get(collection) else {
            return Ok(Vec::new());
        };
        Ok(ids.iter().filter_map(|id| docs.get(id).cloned()).collect())
    }

    async fn write(&self, mutations: Vec<Mutation>) -> StoreResult<Vec<Written>> {
        let mut all = self.write_lock();
        let now = now_micros();
        let mut undo = Vec::with_capacity(mutations.len());
        let mut results = Vec::with_capacity(mutations.len());
        for (index, mutation) in mutations.into_iter().enumerate() {
            let result = match mutation {
                Mutation::Save(op) => apply_save(&mut all, op, now, &mut undo).map(Written::Saved),
                Mutation::Delete(op) => {
                    apply_delete(&mut all, op, &mut undo).map(|()| Written::Deleted)
                }
            };
            match result {
                Ok(written) => results.push(written),
                Err(e) => {
                    rollback(&mut all, undo);
                    return Err(e.in_mutation(index));
                }
            }
        }
        Ok(results)
    }

    async fn list_collections(&self) -> StoreResult<Vec<String>> {
        Ok(self.read().keys().cloned().collect())
    }

    async fn ping(&self) -> StoreResult<()> {
        Ok(())
    }

    async fn close(&self) {}
}
