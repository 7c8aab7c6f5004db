//! Sort keys: an order-preserving byte encoding of JSON values. Comparing two
//! keys byte by byte (memcmp: PostgreSQL `bytea`, MySQL `VARBINARY`, SQLite
//! `BLOB`) gives exactly the contract's value order ([`super::value::compare`]),
//! and equal keys mean equal values. Every store filters and orders on keys,
//! so queries give the same answers everywhere, and the comparisons are plain
//! byte comparisons that any index serves (and that PostgreSQL's row-level
//! security may push into an index scan: they are leakproof).
//!
//! Layout: a type tag, then the payload.
//! - null `0x10`; false `0x20`; true `0x21`;
//! - number `0x30` + 8 bytes: the IEEE double's bits, sign bit flipped for
//!   positives and all bits inverted for negatives (so they sort as numbers);
//! - string `0x40` + its UTF-8 bytes + `0x00` (documents hold no U+0000);
//! - array `0x50` + each element's key + `0x00`;
//! - object `0x60` + for each key in byte order: the key as a string, then the
//!   value's key; then `0x00`.
//!
//! Every tag is above `0x00`, so a shorter array, object or string sorts first.

use serde_json::Value;

pub const NULL: u8 = 0x10;
pub const FALSE: u8 = 0x20;
pub const TRUE: u8 = 0x21;
pub const NUMBER: u8 = 0x30;
pub const STRING: u8 = 0x40;
pub const ARRAY: u8 = 0x50;
pub const OBJECT: u8 = 0x60;

/// The key of a value.
pub fn encode(value: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(16);
    push(&mut out, value);
    out
}

fn push(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Null => out.push(NULL),
        Value::Bool(false) => out.push(FALSE),
        Value::Bool(true) => out.push(TRUE),
        Value::Number(n) => push_number(out, n.as_f64().unwrap_or(0.0)),
        Value::String(s) => push_string(out, s),
        Value::Array(items) => {
            out.push(ARRAY);
            for item in items {
                push(out, item);
            }
            out.push(0);
        }
        Value::Object(map) => {
            out.push(OBJECT);
            // serde_json's map iterates keys in `String` order, which is byte order.
            for (k, v) in map {
                push_string(out, k);
                push(out, v);
            }
            out.push(0);
        }
    }
}

fn push_number(out: &mut Vec<u8>, n: f64) {
    // -0 and +0 are the same number.
    let n = if n == 0.0 { 0.0 } else { n };
    let bits = n.to_bits();
    let ordered = if bits >> 63 == 1 {
        !bits
    } else {
        bits | 1 << 63
    };
    out.push(NUMBER);
    out.extend_from_slice(&ordered.to_be_bytes());
}

fn push_string(out: &mut Vec<u8>, s: &str) {
    out.push(STRING);
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

/// The key of a document id, as `__id__` compares: a string.
pub fn id_key(id: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(id.len() + 2);
    push_string(&mut out, id);
    out
}

/// The range of keys of one JSON type, `[low, high)`: a typed comparison
/// (number with number, string with string, bool with bool) stays inside it.
pub fn type_range(value: &Value) -> (Vec<u8>, Vec<u8>) {
    let (low, high) = match value {
        Value::Null => (NULL, NULL + 1),
        Value::Bool(_) => (FALSE, TRUE + 1),
        Value::Number(_) => (NUMBER, NUMBER + 1),
        Value::String(_) => (STRING, STRING + 1),
        Value::Array(_) => (ARRAY, ARRAY + 1),
        Value::Object(_) => (OBJECT, OBJECT + 1),
    };
    (vec![low], vec![high])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::value::compare;
    use proptest::prelude::*;

    fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<f64>()
                .prop_filter("finite", |n| n.is_finite())
                .prop_map(|n| serde_json::json!(n)),
            (-3i64..3).prop_map(|n| serde_json::json!(n)),
            "[a-c\u{e9}\u{1F600}]{0,4}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map("[a-c]{0,2}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn keys_sort_as_the_values_do(a in json(), b in json()) {
            prop_assert_eq!(encode(&a).cmp(&encode(&b)), compare(&a, &b), "{} vs {}", a, b);
        }

        #[test]
        fn typed_ranges_hold_exactly_one_type(a in json(), b in json()) {
            let (low, high) = type_range(&a);
            let key = encode(&b);
            let same_type = std::mem::discriminant(&a) == std::mem::discriminant(&b);
            prop_assert_eq!(key >= low && key < high, same_type);
        }
    }

    #[test]
    fn numbers() {
        let keys: Vec<Vec<u8>> = [-1e300, -2.5, -0.0, 0.0, 1e-300, 1.0, 2.0, 1e300]
            .iter()
            .map(|n| encode(&serde_json::json!(n)))
            .collect();
        assert!(keys.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(keys[2], keys[3], "-0 == +0");
        assert_eq!(
            encode(&serde_json::json!(1)),
            encode(&serde_json::json!(1.0))
        );
    }
}
