//! Field protection from a service's policy, enforced by the sidecar on every
//! write and read: `read_only_fields` may not be set or changed (a value
//! equal to the stored one is accepted, so Get-then-Save works; a Save that
//! leaves them out keeps the stored values), and `hidden_fields` are never
//! shown, filtered or ordered on, and never written.
//!
//! Whether a write touching a hidden field is refused depends on the request
//! alone, never on what is stored: an answer that varied with the stored
//! value would reveal it. A request touches hidden field `h` when it names `h`
//! or a field inside it, or replaces or removes an object that holds `h`.
//! Untouched hidden fields keep their stored values.

use super::update::Transform;
use super::value::{self, parent_mut};
use super::{FieldPath, Protection, StoreError, StoreResult};
use serde_json::Value;

/// The fields a service may not set or see, from its policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Protected {
    pub read_only: Vec<FieldPath>,
    pub hidden: Vec<FieldPath>,
}

fn refused(field: &FieldPath, protection: Protection) -> StoreError {
    StoreError::Protected {
        field: field.to_string(),
        protection,
    }
}

impl Protected {
    pub fn is_empty(&self) -> bool {
        self.read_only.is_empty() && self.hidden.is_empty()
    }

    /// The hidden field that `field` is, holds or lies in: a filter or an
    /// order on it would reveal the hidden value.
    pub fn hidden_overlap(&self, field: &FieldPath) -> Option<&FieldPath> {
        self.hidden
            .iter()
            .find(|h| field.is_within(h) || h.is_within(field))
    }

    /// A stored document's JSON as this service may see it: hidden fields
    /// removed. Unchanged (no copy) when it holds none of them.
    pub fn strip(&self, data: String) -> String {
        if self.hidden.is_empty() {
            return data;
        }
        let Ok(mut doc) = serde_json::from_str::<Value>(&data) else {
            // Not a JSON object: the API refuses to show it at all.
            return data;
        };
        let mut removed = false;
        for path in &self.hidden {
            if let Ok(Some(parent)) = parent_mut(&mut doc, path, false) {
                let leaf = path.segments().last().map(String::as_str).unwrap_or("");
                removed |= parent.remove(leaf).is_some();
            }
        }
        if removed {
            doc.to_string()
        } else {
            data
        }
    }

    /// Refuses a Save whose document sets a hidden field, or puts a
    /// non-object where an object holding one belongs.
    pub(super) fn check_save(&self, new: &Value) -> StoreResult<()> {
        for hidden in &self.hidden {
            let segments = hidden.segments();
            let mut at = new;
            for (depth, key) in segments.iter().enumerate() {
                let Some(next) = at.as_object().and_then(|m| m.get(key)) else {
                    break;
                };
                if depth + 1 == segments.len() || !next.is_object() {
                    return Err(refused(hidden, Protection::Hidden));
                }
                at = next;
            }
        }
        Ok(())
    }

    /// Refuses an Update whose merge patch or transforms touch a hidden field.
    pub(super) fn check_update(
        &self,
        merge: Option<&Value>,
        transforms: &[Transform],
    ) -> StoreResult<()> {
        if let Some(patch) = merge {
            // In a merge patch, `null` removes and a non-object replaces: both
            // touch whatever the key held.
            self.check_save(patch)?;
        }
        for t in transforms {
            if let Some(hidden) = self.hidden_overlap(&t.field) {
                return Err(refused(hidden, Protection::Hidden));
            }
        }
        Ok(())
    }

    /// Makes a written document keep what this service may not change:
    /// hidden fields get their stored values back (the request could not
    /// touch them), and read-only fields must equal the stored ones; with
    /// `keep_omitted` (a Save), a read-only field left out takes the stored
    /// value first.
    pub(super) fn apply(
        &self,
        new: &mut Value,
        old: Option<&Value>,
        keep_omitted: bool,
    ) -> StoreResult<()> {
        for hidden in &self.hidden {
            if let Some(stored) = old.and_then(|o| value::get(o, hidden)) {
                put(new, hidden, stored.clone())
                    .map_err(|_| refused(hidden, Protection::Hidden))?;
            }
        }
        for path in &self.read_only {
            let stored = old.and_then(|o| value::get(o, path));
            if keep_omitted && value::get(new, path).is_none() {
                if let Some(stored) = stored {
                    // A parent that is not an object fails the check below.
                    let _ = put(new, path, stored.clone());
                }
            }
            let same = match (value::get(new, path), stored) {
                (None, None) => true,
                (Some(a), Some(b)) => value::equal(a, b),
                _ => false,
            };
            if !same {
                return Err(refused(path, Protection::ReadOnly));
            }
        }
        Ok(())
    }
}

/// Sets `path` in `doc`, creating missing parent objects.
fn put(doc: &mut Value, path: &FieldPath, v: Value) -> Result<(), String> {
    let leaf = path.segments().last().cloned().unwrap_or_default();
    if let Some(parent) = parent_mut(doc, path, true)? {
        parent.insert(leaf, v);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::TransformOp;
    use serde_json::json;

    fn protected() -> Protected {
        Protected {
            read_only: vec![FieldPath::parse("status").unwrap()],
            hidden: vec![FieldPath::parse("secret.ssn").unwrap()],
        }
    }

    fn is_hidden(r: StoreResult<()>) -> bool {
        matches!(
            r,
            Err(StoreError::Protected {
                protection: Protection::Hidden,
                ..
            })
        )
    }

    #[test]
    fn hidden_fields_are_stripped_from_what_is_shown() {
        let p = protected();
        let data = json!({"secret": {"ssn": "1", "x": 2}, "a": 1}).to_string();
        let shown: Value = serde_json::from_str(&p.strip(data)).unwrap();
        assert_eq!(shown, json!({"secret": {"x": 2}, "a": 1}));
        let plain = r#"{"a":1}"#.to_string();
        assert_eq!(p.strip(plain.clone()), plain);
    }

    #[test]
    fn a_request_touching_a_hidden_field_is_refused_whatever_is_stored() {
        let p = protected();
        for doc in [
            json!({"secret": {"ssn": "1"}}),
            json!({"secret": {"ssn": null}}),
            json!({"secret": "flat"}),
            json!({"secret": ["ssn"]}),
        ] {
            assert!(is_hidden(p.check_save(&doc)), "{doc}");
        }
        for doc in [json!({"secret": {"x": 1}}), json!({"other": 1}), json!({})] {
            assert!(p.check_save(&doc).is_ok(), "{doc}");
        }
        // A merge patch's null removes the object holding the field.
        assert!(is_hidden(
            p.check_update(Some(&json!({"secret": null})), &[])
        ));
        assert!(p
            .check_update(Some(&json!({"secret": {"x": null}})), &[])
            .is_ok());
        for field in ["secret", "secret.ssn", "secret.ssn.deep"] {
            let t = Transform {
                field: FieldPath::parse(field).unwrap(),
                op: TransformOp::Increment(1.0),
            };
            assert!(is_hidden(p.check_update(None, &[t])), "{field}");
        }
        let sibling = Transform {
            field: FieldPath::parse("secret.count").unwrap(),
            op: TransformOp::Increment(1.0),
        };
        assert!(p.check_update(None, &[sibling]).is_ok());
    }

    #[test]
    fn stored_hidden_and_read_only_values_are_kept() {
        let p = protected();
        let old = json!({"status": "new", "secret": {"ssn": "1"}, "x": 1});
        let mut new = json!({"x": 2});
        p.apply(&mut new, Some(&old), true).unwrap();
        assert_eq!(
            new,
            json!({"status": "new", "secret": {"ssn": "1"}, "x": 2})
        );
        // An Update that dropped the read-only field is refused; unchanged passes.
        let mut dropped = json!({"x": 2});
        assert!(p.apply(&mut dropped, Some(&old), false).is_err());
        let mut same = json!({"status": "new", "x": 3});
        p.apply(&mut same, Some(&old), false).unwrap();
        // Set at creation: refused.
        let mut created = json!({"status": "done"});
        assert!(matches!(
            p.apply(&mut created, None, true),
            Err(StoreError::Protected {
                protection: Protection::ReadOnly,
                ..
            })
        ));
    }
}
