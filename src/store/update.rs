//! Partial updates: an RFC 7396 merge patch, then field transforms, applied to
//! a document's JSON inside the writing transaction. One implementation for
//! every store, so numbers (IEEE doubles), array equality (the value rules in
//! [`super::value`]) and error messages are the same everywhere.

use super::path::FieldPath;
use super::value::{self, parent_mut, type_name};
use super::Micros;
use serde_json::{Map, Value};

/// What a transform does to its field.
#[derive(Debug, Clone, PartialEq)]
pub enum TransformOp {
    /// Adds a number; a missing field counts as 0.
    Increment(f64),
    /// Keeps the larger; a missing field becomes the number.
    Maximum(f64),
    /// Keeps the smaller; a missing field becomes the number.
    Minimum(f64),
    /// Array union: appends each value not held yet.
    AppendMissing(Vec<Value>),
    /// Removes every occurrence of each value.
    RemoveAll(Vec<Value>),
    /// The commit time, RFC 3339 with microseconds, UTC.
    ServerTime,
}

/// A server-side change of one field.
#[derive(Debug, Clone, PartialEq)]
pub struct Transform {
    pub field: FieldPath,
    pub op: TransformOp,
}

/// Applies an RFC 7396 merge patch: `null` removes a key, objects merge
/// recursively, anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(map) = target else {
        return;
    };
    for (key, value) in patch {
        if value.is_null() {
            map.remove(key);
        } else {
            merge_patch(map.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

/// Applies `transforms` in order. An error names the index of the failing
/// transform and says why (a value of the wrong type, a non-finite result).
pub fn apply_transforms(
    doc: &mut Value,
    transforms: &[Transform],
    now: Micros,
) -> Result<(), (usize, String)> {
    for (index, transform) in transforms.iter().enumerate() {
        apply(doc, transform, now).map_err(|m| (index, m))?;
    }
    Ok(())
}

fn apply(doc: &mut Value, transform: &Transform, now: Micros) -> Result<(), String> {
    let field = &transform.field;
    let leaf = field
        .segments()
        .last()
        .expect("a parsed path has a key")
        .clone();
    let wrong = |v: &Value, wanted: &str| {
        format!(
            "field `{field}` is {}; {wanted} applies to {}",
            type_name(v),
            match wanted {
                "append_missing" | "remove_all" => "arrays",
                _ => "numbers",
            }
        )
    };
    // remove_all leaves a missing field (and its missing parents) missing.
    let create = !matches!(transform.op, TransformOp::RemoveAll(_));
    let Some(parent) =
        parent_mut(doc, field, create).map_err(|e| format!("field `{field}`: {e}"))?
    else {
        return Ok(());
    };
    let current = parent.get(&leaf);
    let new = match &transform.op {
        TransformOp::Increment(n) | TransformOp::Maximum(n) | TransformOp::Minimum(n) => {
            let name = match transform.op {
                TransformOp::Increment(_) => "increment",
                TransformOp::Maximum(_) => "maximum",
                _ => "minimum",
            };
            let result = match current {
                None => match transform.op {
                    TransformOp::Increment(_) => 0.0 + n,
                    _ => *n,
                },
                Some(v) => {
                    let old = value::number(v).ok_or_else(|| wrong(v, name))?;
                    match transform.op {
                        TransformOp::Increment(_) => old + n,
                        TransformOp::Maximum(_) => old.max(*n),
                        _ => old.min(*n),
                    }
                }
            };
            number(result).ok_or_else(|| {
                format!("field `{field}`: {name} gives {result}, which is not a finite number")
            })?
        }
        TransformOp::AppendMissing(values) => {
            let mut items = match current {
                None => Vec::new(),
                Some(Value::Array(items)) => items.clone(),
                Some(v) => return Err(wrong(v, "append_missing")),
            };
            for v in values {
                if !items.iter().any(|item| value::equal(item, v)) {
                    items.push(v.clone());
                }
            }
            Value::Array(items)
        }
        TransformOp::RemoveAll(values) => match current {
            None => return Ok(()),
            Some(Value::Array(items)) => Value::Array(
                items
                    .iter()
                    .filter(|item| !values.iter().any(|v| value::equal(item, v)))
                    .cloned()
                    .collect(),
            ),
            Some(v) => return Err(wrong(v, "remove_all")),
        },
        TransformOp::ServerTime => Value::String(rfc3339_micros(now)),
    };
    parent.insert(leaf, new);
    Ok(())
}

/// A finite double as a JSON number.
fn number(n: f64) -> Option<Value> {
    serde_json::Number::from_f64(n).map(Value::Number)
}

/// `2026-11-23T17:35:00.123456Z`: RFC 3339, microseconds, UTC.
pub fn rfc3339_micros(micros: Micros) -> String {
    let secs = micros.div_euclid(1_000_000);
    let frac = micros.rem_euclid(1_000_000);
    let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{frac:06}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn t(field: &str, op: TransformOp) -> Transform {
        Transform {
            field: FieldPath::parse(field).unwrap(),
            op,
        }
    }

    #[test]
    fn merge_patch_follows_rfc_7396() {
        // The RFC's own example (appendix A, the long one).
        let mut doc = json!({"title": "Goodbye!", "author": {"givenName": "John", "familyName": "Doe"},
            "tags": ["example", "sample"], "content": "This will be unchanged"});
        merge_patch(
            &mut doc,
            &json!({"title": "Hello!", "phoneNumber": "+01-123-456-7890",
                "author": {"familyName": null}, "tags": ["example"]}),
        );
        assert_eq!(
            doc,
            json!({"title": "Hello!", "author": {"givenName": "John"}, "tags": ["example"],
                "content": "This will be unchanged", "phoneNumber": "+01-123-456-7890"})
        );
        let mut doc = json!({"a": "b"});
        merge_patch(&mut doc, &json!({"a": {"b": "c"}}));
        assert_eq!(doc, json!({"a": {"b": "c"}}));
    }

    #[test]
    fn transforms() {
        let mut doc = json!({"n": 1, "s": "x", "tags": ["a", {"k": 1}], "o": {}});
        apply_transforms(
            &mut doc,
            &[
                t("n", TransformOp::Increment(2.5)),
                t("stats.views", TransformOp::Increment(1.0)),
                t("hi", TransformOp::Maximum(3.0)),
                t("n", TransformOp::Minimum(-1.0)),
                t(
                    "tags",
                    TransformOp::AppendMissing(vec![json!({"k": 1.0}), json!("b"), json!("b")]),
                ),
                t("tags", TransformOp::RemoveAll(vec![json!("a")])),
                t("gone.x", TransformOp::RemoveAll(vec![json!(1)])),
                t("at", TransformOp::ServerTime),
            ],
            1_700_000_000_123_456,
        )
        .unwrap();
        assert_eq!(
            doc,
            json!({"n": -1.0, "s": "x", "tags": [{"k": 1}, "b"], "o": {},
                "stats": {"views": 1.0}, "hi": 3.0, "at": "2023-11-14T22:13:20.123456Z"})
        );
        let err = apply_transforms(
            &mut doc,
            &[
                t("o", TransformOp::Maximum(1.0)),
                t("s", TransformOp::Increment(1.0)),
            ],
            0,
        )
        .unwrap_err();
        assert_eq!(
            err,
            (
                0,
                "field `o` is an object; maximum applies to numbers".into()
            )
        );
        let err =
            apply_transforms(&mut doc, &[t("s.x", TransformOp::Increment(1.0))], 0).unwrap_err();
        assert_eq!(err.1, "field `s.x`: `s` is a string, not an object");
        let err = apply_transforms(
            &mut doc,
            &[
                t("n", TransformOp::Increment(f64::MAX)),
                t("n", TransformOp::Increment(f64::MAX)),
            ],
            0,
        )
        .unwrap_err();
        assert!(err.1.contains("not a finite number"), "{err:?}");
    }

    #[test]
    fn server_time_format() {
        assert_eq!(rfc3339_micros(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(rfc3339_micros(-1), "1969-12-31T23:59:59.999999Z");
        assert_eq!(
            rfc3339_micros(951_782_400_000_000),
            "2000-02-29T00:00:00.000000Z"
        );
    }
}
