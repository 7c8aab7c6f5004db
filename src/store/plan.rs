//! The write planner: what a mutation does, decided once for every store from
//! what is stored and the time. A backend reads the stored row inside its
//! writing transaction (locking it), calls [`Mutation::plan`], and applies the
//! [`Action`]; it records the [`Change`]s for the change feed in the same
//! transaction.
//!
//! Expired documents are absent to every condition: `create_only` succeeds
//! over one, `expected_rev` fails, an Update without `allow_missing` is
//! NOT_FOUND, a write over one reports `created` and records the expiry
//! before its own change.

use super::update::{apply_transforms, merge_patch};
use super::value;
use super::{
    new_rev, Document, Expiry, Key, Micros, Mutation, Saved, StoreError, StoreResult, Written,
    MAX_DEPTH,
};
use serde_json::Value;

/// What to do to the row.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// No row exists: insert this one.
    Insert(Document),
    /// A row exists (live or expired): replace it with this one.
    Replace(Document),
    /// Delete the row.
    Delete(Key),
    /// Leave everything as it is.
    Nothing,
}

/// What a committed change did, for the change feed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    Saved,
    Deleted,
    Expired,
}

/// One change of one document.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub kind: ChangeKind,
    pub key: Key,
    /// The rev written (Saved) or removed (Deleted, Expired).
    pub rev: String,
    /// The document as written (Saved).
    pub document: Option<Document>,
}

/// A mutation's decided outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    pub action: Action,
    pub written: Written,
    pub changes: Vec<Change>,
}

impl Mutation {
    /// The collections, each once and in order, that a save or update of
    /// `mutations` writes to and `known` does not know (a delete needs no table).
    pub fn unknown_collections(mutations: &[Mutation], known: impl Fn(&str) -> bool) -> Vec<&str> {
        mutations
            .iter()
            .filter(|m| !matches!(m, Mutation::Delete(_)) && !known(m.collection()))
            .map(Mutation::collection)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect()
    }

    /// Whether [`Mutation::plan`] reads the stored document's data; when not,
    /// a store may pass the stored row with empty `data`.
    pub fn needs_stored_data(&self) -> bool {
        match self {
            Mutation::Save(op) => !op.protected.is_empty(),
            Mutation::Update(_) => true,
            Mutation::Delete(_) => false,
        }
    }

    /// Decides this mutation against the stored row (`None`: no row; an
    /// expired row counts as absent) at `now`, the transaction's time.
    pub fn plan(&self, stored: Option<Document>, now: Micros) -> StoreResult<Planned> {
        let live = stored.as_ref().filter(|d| d.is_live(now));
        let key = self.key();
        let check_rev = |expected: &Option<String>| match expected {
            Some(expected) if live.map(|d| &d.rev) != Some(expected) => {
                Err(StoreError::RevMismatch {
                    collection: key.collection.clone(),
                    id: key.id.clone(),
                    expected: expected.clone(),
                    actual: live.map(|d| d.rev.clone()),
                })
            }
            _ => Ok(()),
        };
        match self {
            Mutation::Save(op) => {
                if op.create_only && live.is_some() {
                    return Err(StoreError::already_exists(&key.collection, &key.id));
                }
                check_rev(&op.expected_rev)?;
                let data = if op.protected.is_empty() {
                    op.data.clone()
                } else {
                    let mut data: Value = parse(&op.data, key)?;
                    op.protected.check_save(&data)?;
                    let old = live.map(|d| parse(&d.data, key)).transpose()?;
                    op.protected.apply(&mut data, old.as_ref(), true)?;
                    data.to_string()
                };
                let expire_time = expire_time(op.expiry, live, now, "expire_time")?;
                let is_live = live.is_some();
                Ok(put(stored, is_live, key, data, expire_time, now))
            }
            Mutation::Update(op) => {
                check_rev(&op.expected_rev)?;
                op.protected
                    .check_update(op.merge.as_ref(), &op.transforms)?;
                if live.is_none() && !op.allow_missing {
                    return Err(StoreError::not_found(&key.collection, &key.id));
                }
                let old = live.map(|d| parse(&d.data, key)).transpose()?;
                let mut data = old
                    .clone()
                    .unwrap_or_else(|| Value::Object(Default::default()));
                if let Some(patch) = &op.merge {
                    merge_patch(&mut data, patch);
                }
                apply_transforms(&mut data, &op.transforms, now).map_err(|(i, message)| {
                    StoreError::invalid(format!("transforms[{i}]"), message)
                })?;
                op.protected.apply(&mut data, old.as_ref(), false)?;
                if value::depth(&data) > MAX_DEPTH {
                    return Err(StoreError::invalid(
                        "merge",
                        format!("the updated document nests deeper than {MAX_DEPTH} levels of objects and arrays"),
                    ));
                }
                let data = data.to_string();
                if data.len() > op.max_bytes {
                    return Err(StoreError::invalid(
                        "merge",
                        format!(
                            "the updated document is {} bytes as JSON, over the limit of {} bytes per document",
                            data.len(),
                            op.max_bytes
                        ),
                    ));
                }
                let expire_time = expire_time(op.expiry, live, now, "expire_time")?;
                let is_live = live.is_some();
                Ok(put(stored, is_live, key, data, expire_time, now))
            }
            Mutation::Delete(op) => {
                let Some(live) = live else {
                    if op.allow_missing {
                        return Ok(Planned {
                            action: Action::Nothing,
                            written: Written::Deleted,
                            changes: Vec::new(),
                        });
                    }
                    return Err(StoreError::not_found(&key.collection, &key.id));
                };
                check_rev(&op.expected_rev)?;
                Ok(Planned {
                    action: Action::Delete(key.clone()),
                    written: Written::Deleted,
                    changes: vec![Change {
                        kind: ChangeKind::Deleted,
                        key: key.clone(),
                        rev: live.rev.clone(),
                        document: None,
                    }],
                })
            }
        }
    }
}

/// The stored JSON of a document; a row that is not a JSON object (written
/// outside the sidecar) cannot be updated.
fn parse(data: &str, key: &Key) -> StoreResult<Value> {
    match serde_json::from_str::<Value>(data) {
        Ok(v @ Value::Object(_)) => Ok(v),
        _ => Err(StoreError::Internal(format!(
            "document `{}` in collection `{}` does not hold a JSON object",
            key.id, key.collection
        ))),
    }
}

/// The expiry a write stores: `Keep` keeps the live document's.
fn expire_time(
    expiry: Expiry,
    live: Option<&Document>,
    now: Micros,
    field: &str,
) -> StoreResult<Option<Micros>> {
    match expiry {
        Expiry::Keep => Ok(live.and_then(|d| d.expire_time)),
        Expiry::Never => Ok(None),
        Expiry::At(t) if t <= now => Err(StoreError::invalid(
            field,
            format!(
                "{} is not in the future (the database's clock says {})",
                super::update::rfc3339_micros(t),
                super::update::rfc3339_micros(now)
            ),
        )),
        Expiry::At(t) => Ok(Some(t)),
        Expiry::After(ttl) => Ok(Some(now.saturating_add(ttl))),
    }
}

/// A write of a whole document, over whatever row is stored.
fn put(
    stored: Option<Document>,
    live: bool,
    key: &Key,
    data: String,
    expire_time: Option<Micros>,
    now: Micros,
) -> Planned {
    let create_time = match (&stored, live) {
        (Some(old), true) => old.create_time,
        _ => now,
    };
    let document = Document {
        key: key.clone(),
        rev: new_rev(),
        data,
        create_time,
        update_time: now,
        expire_time,
    };
    let mut changes = Vec::with_capacity(2);
    if let (Some(old), false) = (&stored, live) {
        // A write over an expired row removes it first.
        changes.push(Change {
            kind: ChangeKind::Expired,
            key: key.clone(),
            rev: old.rev.clone(),
            document: None,
        });
    }
    changes.push(Change {
        kind: ChangeKind::Saved,
        key: key.clone(),
        rev: document.rev.clone(),
        document: Some(document.clone()),
    });
    let action = match stored {
        Some(_) => Action::Replace(document.clone()),
        None => Action::Insert(document.clone()),
    };
    Planned {
        action,
        written: Written::Saved(Saved {
            document,
            created: !live,
        }),
        changes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{DeleteOp, FieldPath, Protected, SaveOp, Transform, TransformOp, UpdateOp};
    use serde_json::json;
    use std::sync::Arc;

    fn key() -> Key {
        Key::new("c", "", "a")
    }

    fn stored(rev: &str, data: Value, expire_time: Option<Micros>) -> Document {
        Document {
            key: key(),
            rev: rev.into(),
            data: data.to_string(),
            create_time: 10,
            update_time: 20,
            expire_time,
        }
    }

    fn save(data: Value) -> SaveOp {
        SaveOp {
            key: key(),
            data: data.to_string(),
            expected_rev: None,
            create_only: false,
            expiry: Expiry::Never,
            protected: Arc::default(),
        }
    }

    fn update() -> UpdateOp {
        UpdateOp {
            key: key(),
            merge: None,
            transforms: Vec::new(),
            expected_rev: None,
            allow_missing: false,
            expiry: Expiry::Keep,
            protected: Arc::default(),
            max_bytes: 1 << 20,
        }
    }

    fn saved(p: &Planned) -> (&Document, bool) {
        match &p.written {
            Written::Saved(s) => (&s.document, s.created),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_expired_row_is_absent_to_every_condition() {
        let now = 100;
        let expired = stored("r1", json!({"n": 1}), Some(100));
        // create_only succeeds and reports created, with the expiry recorded first.
        let op = Mutation::Save(SaveOp {
            create_only: true,
            ..save(json!({}))
        });
        let p = op.plan(Some(expired.clone()), now).unwrap();
        assert!(matches!(p.action, Action::Replace(_)));
        let (doc, created) = saved(&p);
        assert!(created);
        assert_eq!(doc.create_time, now);
        let kinds: Vec<_> = p.changes.iter().map(|c| c.kind).collect();
        assert_eq!(kinds, [ChangeKind::Expired, ChangeKind::Saved]);
        // expected_rev fails, Update is NOT_FOUND, Delete is NOT_FOUND.
        let op = Mutation::Save(SaveOp {
            expected_rev: Some("r1".into()),
            ..save(json!({}))
        });
        assert!(matches!(
            op.plan(Some(expired.clone()), now),
            Err(StoreError::RevMismatch { actual: None, .. })
        ));
        assert!(matches!(
            Mutation::Update(update()).plan(Some(expired.clone()), now),
            Err(StoreError::NotFound { .. })
        ));
        let delete = |allow_missing| {
            Mutation::Delete(DeleteOp {
                key: key(),
                expected_rev: None,
                allow_missing,
            })
        };
        assert!(matches!(
            delete(false).plan(Some(expired.clone()), now),
            Err(StoreError::NotFound { .. })
        ));
        assert_eq!(
            delete(true).plan(Some(expired), now).unwrap().action,
            Action::Nothing
        );
        // One microsecond earlier it is live.
        let live = stored("r1", json!({}), Some(101));
        assert!(matches!(
            Mutation::Save(SaveOp {
                create_only: true,
                ..save(json!({}))
            })
            .plan(Some(live), now),
            Err(StoreError::AlreadyExists { .. })
        ));
    }

    #[test]
    fn updates_merge_transform_and_keep_the_expiry() {
        let old = stored("r1", json!({"a": {"b": 1, "c": 2}, "n": 1}), Some(500));
        let op = Mutation::Update(UpdateOp {
            merge: Some(json!({"a": {"b": null, "d": 3}})),
            transforms: vec![Transform {
                field: FieldPath::parse("n").unwrap(),
                op: TransformOp::Increment(2.0),
            }],
            ..update()
        });
        let p = op.plan(Some(old), 100).unwrap();
        let (doc, created) = saved(&p);
        assert!(!created);
        assert_eq!(doc.expire_time, Some(500));
        assert_eq!(doc.create_time, 10);
        let data: Value = serde_json::from_str(&doc.data).unwrap();
        assert_eq!(data, json!({"a": {"c": 2, "d": 3}, "n": 3.0}));
        // A Save clears the expiry; allow_missing creates from {}.
        let p = Mutation::Save(save(json!({}))).plan(Some(stored("r", json!({}), Some(500))), 100);
        assert_eq!(saved(&p.unwrap()).0.expire_time, None);
        let op = Mutation::Update(UpdateOp {
            allow_missing: true,
            expiry: Expiry::After(50),
            ..update()
        });
        let p = op.plan(None, 100).unwrap();
        assert!(matches!(p.action, Action::Insert(_)));
        assert_eq!(saved(&p).0.expire_time, Some(150));
        // expected_rev with an absent document is ABORTED whatever allow_missing says.
        let op = Mutation::Update(UpdateOp {
            allow_missing: true,
            expected_rev: Some("r".into()),
            ..update()
        });
        assert!(matches!(
            op.plan(None, 100),
            Err(StoreError::RevMismatch { .. })
        ));
    }

    #[test]
    fn protected_fields() {
        let protected = Arc::new(Protected {
            read_only: vec![FieldPath::parse("status").unwrap()],
            hidden: vec![FieldPath::parse("secret.ssn").unwrap()],
        });
        let old = stored(
            "r1",
            json!({"status": "new", "secret": {"ssn": "123"}, "x": 1}),
            None,
        );
        // A Save that omits them keeps them.
        let op = Mutation::Save(SaveOp {
            protected: protected.clone(),
            ..save(json!({"x": 2}))
        });
        let p = op.plan(Some(old.clone()), 1).unwrap();
        let data: Value = serde_json::from_str(&saved(&p).0.data).unwrap();
        assert_eq!(
            data,
            json!({"status": "new", "secret": {"ssn": "123"}, "x": 2})
        );
        // Unchanged is accepted; changed or set at creation is refused.
        let op = Mutation::Save(SaveOp {
            protected: protected.clone(),
            ..save(json!({"status": "new"}))
        });
        assert!(op.plan(Some(old.clone()), 1).is_ok());
        let op = Mutation::Save(SaveOp {
            protected: protected.clone(),
            ..save(json!({"status": "done"}))
        });
        let err = op.plan(Some(old.clone()), 1).unwrap_err();
        assert!(
            matches!(err, StoreError::Protected { ref field, protection: crate::store::Protection::ReadOnly } if field == "status"),
            "{err:?}"
        );
        assert!(op.plan(None, 1).is_err());
        let op = Mutation::Update(UpdateOp {
            merge: Some(json!({"secret": null})),
            protected,
            ..update()
        });
        assert!(matches!(
            op.plan(Some(old), 1),
            Err(StoreError::Protected {
                protection: crate::store::Protection::Hidden,
                ..
            })
        ));
    }
}
