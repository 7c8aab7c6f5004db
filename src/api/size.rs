//! The encoded protobuf size of a document, computed from its stored JSON
//! without building the `Struct`: the response budget counts encoded bytes
//! (contract, "Budgets"), and stores apply it while they read rows.

use crate::store::Document;
use serde::de::{Deserializer, MapAccess, SeqAccess, Visitor};
use std::fmt;

/// Bytes of a varint.
fn varint(n: usize) -> usize {
    prost::encoding::encoded_len_varint(n as u64)
}

/// Bytes of a length-delimited field (tag, length, body), tag < 16.
fn delimited(body: usize) -> usize {
    1 + varint(body) + body
}

/// A non-empty string field; proto3 leaves empty ones out.
fn string_field(s: &str) -> usize {
    if s.is_empty() {
        0
    } else {
        delimited(s.len())
    }
}

/// A `google.protobuf.Timestamp` field of a whole number of microseconds, as
/// the API converts it (clamped to the protobuf range).
fn timestamp_field(micros: i64) -> usize {
    delimited(prost::Message::encoded_len(&super::convert::timestamp(
        micros,
    )))
}

/// The size of `docsidecar.v1.Document` as the API encodes `doc`; a document
/// whose JSON does not parse counts as its text (it is answered as an error).
pub fn document_len(doc: &Document) -> usize {
    let data = struct_len(&doc.data).unwrap_or(doc.data.len());
    string_field(&doc.key.collection)
        + string_field(&doc.key.id)
        + string_field(&doc.rev)
        + delimited(data)
        + timestamp_field(doc.create_time)
        + timestamp_field(doc.update_time)
        + doc.expire_time.map_or(0, timestamp_field)
        + string_field(&doc.key.scope)
}

/// The body size of the `google.protobuf.Struct` that the JSON object `text`
/// converts to.
pub fn struct_len(text: &str) -> Option<usize> {
    let mut de = serde_json::Deserializer::from_str(text);
    de.deserialize_map(Len { value: false }).ok()
}

/// Computes the encoded body size of what it visits: a `Value` message, or
/// with `value: false` at the top, the bare `Struct` of an object.
#[derive(Clone, Copy)]
struct Len {
    value: bool,
}

impl Len {
    fn wrap(self, field_body: usize) -> usize {
        if self.value {
            delimited(field_body)
        } else {
            field_body
        }
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for Len {
    type Value = usize;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<usize, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Len {
    type Value = usize;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    // Scalars, as their `Value.kind` field: null and bool are varints, a
    // number a fixed64, a string length-delimited.
    fn visit_unit<E>(self) -> Result<usize, E> {
        Ok(2)
    }
    fn visit_bool<E>(self, _: bool) -> Result<usize, E> {
        Ok(2)
    }
    fn visit_i64<E>(self, _: i64) -> Result<usize, E> {
        Ok(9)
    }
    fn visit_u64<E>(self, _: u64) -> Result<usize, E> {
        Ok(9)
    }
    fn visit_f64<E>(self, _: f64) -> Result<usize, E> {
        Ok(9)
    }
    fn visit_str<E>(self, s: &str) -> Result<usize, E> {
        Ok(delimited(s.len()))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<usize, A::Error> {
        // ListValue: each element a length-delimited Value.
        let mut body = 0;
        while let Some(len) = seq.next_element_seed(Len { value: true })? {
            body += delimited(len);
        }
        Ok(self.wrap(body))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<usize, A::Error> {
        // Struct: each field a map entry {key = 1, value = 2}; an empty key is
        // left out of the entry, as prost encodes maps.
        let mut body = 0;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            let value = map.next_value_seed(Len { value: true })?;
            let entry = string_field(&key) + delimited(value);
            body += delimited(entry);
        }
        Ok(self.wrap(body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Key;
    use proptest::prelude::*;
    use prost::Message;

    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::Bool),
            (-1e12f64..1e12).prop_map(|n| serde_json::json!(n)),
            any::<i32>().prop_map(|n| serde_json::json!(n)),
            "\\PC{0,12}".prop_map(serde_json::Value::String),
        ];
        leaf.prop_recursive(4, 40, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
                prop::collection::btree_map("\\PC{0,6}", inner, 0..6)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn matches_prost(fields in prop::collection::btree_map("\\PC{0,8}", json_value(), 0..8),
                         micros in any::<i64>().prop_map(|m| m / 1024),
                         expire in proptest::option::of(0i64..i64::MAX / 2),
                         scope in "[a-z]{0,3}") {
            let text = serde_json::Value::Object(fields.into_iter().collect()).to_string();
            let doc = Document {
                key: Key::new("col", scope, "an-id"),
                rev: "r".repeat(32),
                data: text,
                create_time: micros,
                update_time: 0,
                expire_time: expire,
            };
            let encoded = super::super::convert::document(doc.clone()).unwrap().encoded_len();
            prop_assert_eq!(document_len(&doc), encoded);
        }
    }
}
