//! The contract's value rules, on `serde_json::Value`: numbers are IEEE
//! doubles, strings compare by UTF-8 bytes, arrays element by element then by
//! length, objects as sets of (key, value) pairs; across types
//! null < false < true < numbers < strings < arrays < objects. Transforms and
//! the reference query engine (the memory store) use these; the SQL stores
//! must agree with them.

use super::path::FieldPath;
use serde_json::{Map, Value};
use std::cmp::Ordering;

/// The rank of a value's type in the cross-type order.
pub fn type_rank(v: &Value) -> u8 {
    match v {
        Value::Null => 0,
        Value::Bool(false) => 1,
        Value::Bool(true) => 2,
        Value::Number(_) => 3,
        Value::String(_) => 4,
        Value::Array(_) => 5,
        Value::Object(_) => 6,
    }
}

/// A number as the double every store holds.
pub fn number(v: &Value) -> Option<f64> {
    v.as_f64()
}

/// The contract's total order on values.
pub fn compare(a: &Value, b: &Value) -> Ordering {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap_or(0.0), y.as_f64().unwrap_or(0.0));
            // Finite doubles only (NaN is refused on the way in); -0 == +0.
            x.partial_cmp(&y).unwrap_or(Ordering::Equal)
        }
        (Value::String(x), Value::String(y)) => x.as_bytes().cmp(y.as_bytes()),
        (Value::Array(x), Value::Array(y)) => x
            .iter()
            .zip(y)
            .map(|(a, b)| compare(a, b))
            .find(|o| o.is_ne())
            .unwrap_or_else(|| x.len().cmp(&y.len())),
        (Value::Object(x), Value::Object(y)) => compare_objects(x, y),
        _ => type_rank(a).cmp(&type_rank(b)),
    }
}

/// Objects as sets of pairs: the sorted pairs element by element, then the
/// number of pairs. serde_json's map keeps keys sorted (by `String`'s byte
/// order), so key order in the text never matters.
fn compare_objects(x: &Map<String, Value>, y: &Map<String, Value>) -> Ordering {
    x.iter()
        .zip(y)
        .map(|((ka, va), (kb, vb))| {
            ka.as_bytes()
                .cmp(kb.as_bytes())
                .then_with(|| compare(va, vb))
        })
        .find(|o| o.is_ne())
        .unwrap_or_else(|| x.len().cmp(&y.len()))
}

pub fn equal(a: &Value, b: &Value) -> bool {
    compare(a, b).is_eq()
}

/// The JSON type's name, for messages.
pub fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a bool",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The value at `path`, if every key on the way exists.
pub fn get<'v>(doc: &'v Value, path: &FieldPath) -> Option<&'v Value> {
    path.segments()
        .iter()
        .try_fold(doc, |v, key| v.as_object()?.get(key))
}

/// The object that holds `path`'s last key, for changing it. Missing parent
/// objects are created when `create` is set (else `Ok(None)`); a parent that
/// exists but is not an object is an error naming it and its type.
pub fn parent_mut<'v>(
    doc: &'v mut Value,
    path: &FieldPath,
    create: bool,
) -> Result<Option<&'v mut Map<String, Value>>, String> {
    let parents = &path.segments()[..path.segments().len() - 1];
    let mut current = doc;
    for (depth, key) in parents.iter().enumerate() {
        let Value::Object(map) = current else {
            return Err(not_an_object(&parents[..depth], current));
        };
        current = match (map.contains_key(key), create) {
            (false, false) => return Ok(None),
            _ => map
                .entry(key.clone())
                .or_insert_with(|| Value::Object(Map::new())),
        };
    }
    match current {
        Value::Object(map) => Ok(Some(map)),
        other => Err(not_an_object(parents, other)),
    }
}

fn not_an_object(parent: &[String], value: &Value) -> String {
    let name = if parent.is_empty() {
        "the document".to_string()
    } else {
        format!("`{}`", FieldPath::from_segments(parent))
    };
    format!("{name} is {}, not an object", type_name(value))
}

/// The nesting depth of a value: a scalar is 0, `{}` and `[]` are 1.
pub fn depth(v: &Value) -> usize {
    match v {
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn cross_type_order() {
        let ordered = [
            json!(null),
            json!(false),
            json!(true),
            json!(-1.5),
            json!(2),
            json!(""),
            json!("B"),
            json!("a"),
            json!("é"),
            json!([]),
            json!([1]),
            json!([1, 2]),
            json!([2]),
            json!({}),
            json!({"a": 1}),
            json!({"a": 1, "b": 0}),
            json!({"a": 2}),
            json!({"b": 0}),
        ];
        for (i, a) in ordered.iter().enumerate() {
            for (j, b) in ordered.iter().enumerate() {
                assert_eq!(compare(a, b), i.cmp(&j), "{a} vs {b}");
            }
        }
        assert!(equal(&json!(1), &json!(1.0)));
        assert!(equal(
            &json!({"b": 1, "a": [true]}),
            &json!({"a": [true], "b": 1.0})
        ));
    }

    #[test]
    fn parents_are_made_or_refused() {
        let mut doc = json!({"a": {"b": 1}, "s": "x"});
        let path = FieldPath::parse("a.c.d").unwrap();
        parent_mut(&mut doc, &path, true)
            .unwrap()
            .unwrap()
            .insert("d".into(), json!(1));
        assert_eq!(doc["a"]["c"]["d"], json!(1));
        let missing = FieldPath::parse("x.y").unwrap();
        assert!(parent_mut(&mut doc, &missing, false).unwrap().is_none());
        let err = parent_mut(&mut doc, &FieldPath::parse("s.t").unwrap(), true).unwrap_err();
        assert_eq!(err, "`s` is a string, not an object");
        assert_eq!(depth(&doc), 3);
    }
}
