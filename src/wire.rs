//! The API's `google.protobuf.Struct` fields (`Document.data`, `SaveRequest.data`,
//! `UpdateRequest.merge`) as [`Data`]: a `prost_types::Struct` tree when decoded
//! from a request, or, for a document read from a store, the protobuf encoding
//! written straight from its stored JSON text. A read never builds the tree of
//! maps, boxes and strings only to encode and drop it (issue 17: a List of 100
//! costs the sidecar a fifth less CPU without it).
//!
//! The generated types take `Data` through prost's `extern_path` (build.rs); it
//! encodes and decodes as the same message, so clients see no difference.

use prost::bytes::{Buf, BufMut};
use prost::encoding::{encode_varint, encoded_len_varint, DecodeContext, WireType};
use prost::{DecodeError, Message};
use prost_types::Struct;
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::OnceLock;

/// A `google.protobuf.Struct`: a tree, or its encoding made from JSON text.
#[derive(Clone)]
pub struct Data(Repr);

#[derive(Clone)]
enum Repr {
    Tree(Struct),
    /// The message body, and the tree decoded from it on first look (tests,
    /// debugging), never on the serving path.
    Wire(Vec<u8>, OnceLock<Struct>),
}

impl Data {
    /// The Struct of the JSON object `text`, encoded without building a tree.
    /// Numbers become doubles and duplicate keys are kept in order (a decoder
    /// keeps the last), as parsing the text into a Struct would give.
    pub fn from_json(text: &str) -> Result<Data, serde_json::Error> {
        let mut out = Vec::with_capacity(text.len() + text.len() / 4);
        let mut de = serde_json::Deserializer::from_str(text);
        de.deserialize_map(Body {
            out: &mut out,
            top: true,
        })?;
        de.end()?;
        Ok(Data(Repr::Wire(out, OnceLock::new())))
    }

    /// The tree; decoded from the encoding when this holds one.
    pub fn tree(&self) -> &Struct {
        match &self.0 {
            Repr::Tree(tree) => tree,
            // The bytes were encoded here, so they decode.
            Repr::Wire(bytes, tree) => {
                tree.get_or_init(|| Struct::decode(&bytes[..]).unwrap_or_default())
            }
        }
    }

    /// The tree, owned.
    pub fn into_tree(self) -> Struct {
        match self.0 {
            Repr::Tree(tree) => tree,
            Repr::Wire(bytes, mut tree) => tree
                .take()
                .unwrap_or_else(|| Struct::decode(&bytes[..]).unwrap_or_default()),
        }
    }

    fn tree_mut(&mut self) -> &mut Struct {
        if let Repr::Wire(..) = self.0 {
            let tree = std::mem::take(self).into_tree();
            self.0 = Repr::Tree(tree);
        }
        match &mut self.0 {
            Repr::Tree(tree) => tree,
            Repr::Wire(..) => unreachable!("converted above"),
        }
    }
}

impl Default for Data {
    fn default() -> Self {
        Data(Repr::Tree(Struct::default()))
    }
}

impl Deref for Data {
    type Target = Struct;

    fn deref(&self) -> &Struct {
        self.tree()
    }
}

/// Changing the tree drops the encoding it was made from.
impl DerefMut for Data {
    fn deref_mut(&mut self) -> &mut Struct {
        self.tree_mut()
    }
}

impl From<Struct> for Data {
    fn from(tree: Struct) -> Self {
        Data(Repr::Tree(tree))
    }
}

impl From<Data> for Struct {
    fn from(data: Data) -> Self {
        data.into_tree()
    }
}

impl PartialEq for Data {
    fn eq(&self, other: &Self) -> bool {
        self.tree() == other.tree()
    }
}

impl PartialEq<Struct> for Data {
    fn eq(&self, other: &Struct) -> bool {
        self.tree() == other
    }
}

impl fmt::Debug for Data {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.tree().fmt(f)
    }
}

impl Message for Data {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        match &self.0 {
            Repr::Tree(tree) => tree.encode_raw(buf),
            Repr::Wire(bytes, _) => buf.put_slice(bytes),
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        self.tree_mut().merge_field(tag, wire_type, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        match &self.0 {
            Repr::Tree(tree) => tree.encoded_len(),
            Repr::Wire(bytes, _) => bytes.len(),
        }
    }

    fn clear(&mut self) {
        *self = Data::default();
    }
}

// Tags (field number << 3 | wire type) of the Struct family's fields.
const LEN: u8 = 2;
const STRUCT_FIELDS: u8 = 1 << 3 | LEN; // Struct.fields, and FieldsEntry.key
const ENTRY_VALUE: u8 = 2 << 3 | LEN; // FieldsEntry.value
const NULL_VALUE: u8 = 1 << 3; // Value.null_value, varint
const NUMBER_VALUE: u8 = 2 << 3 | 1; // Value.number_value, fixed64
const STRING_VALUE: u8 = 3 << 3 | LEN;
const BOOL_VALUE: u8 = 4 << 3; // varint
const STRUCT_VALUE: u8 = 5 << 3 | LEN;
const LIST_VALUE: u8 = 6 << 3 | LEN;
const LIST_VALUES: u8 = 1 << 3 | LEN; // ListValue.values

/// Opens a length-delimited body: a one-byte length slot, widened by [`close`]
/// when the body turns out to need more (bodies are small: rarely moved).
fn open(out: &mut Vec<u8>) -> usize {
    out.push(0);
    out.len()
}

fn close(out: &mut Vec<u8>, start: usize) {
    let len = out.len() - start;
    if len < 0x80 {
        out[start - 1] = len as u8;
        return;
    }
    let extra = encoded_len_varint(len as u64) - 1;
    let end = out.len();
    out.resize(end + extra, 0);
    out.copy_within(start..end, start + extra);
    let mut slot = &mut out[start - 1..start + extra];
    encode_varint(len as u64, &mut slot);
}

fn string(out: &mut Vec<u8>, tag: u8, s: &str) {
    out.push(tag);
    encode_varint(s.len() as u64, out);
    out.extend_from_slice(s.as_bytes());
}

/// Writes the JSON value it visits as the fields of a `Value`, or with `top`,
/// an object as the fields of the bare `Struct`.
struct Body<'a> {
    out: &'a mut Vec<u8>,
    top: bool,
}

impl Body<'_> {
    fn number(self, n: f64) {
        self.out.push(NUMBER_VALUE);
        self.out.extend_from_slice(&n.to_le_bytes());
    }
}

impl<'de> DeserializeSeed<'de> for Body<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Body<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.top {
            "a JSON object"
        } else {
            "a JSON value"
        })
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        self.out.extend_from_slice(&[NULL_VALUE, 0]);
        Ok(())
    }
    fn visit_bool<E>(self, b: bool) -> Result<(), E> {
        self.out.extend_from_slice(&[BOOL_VALUE, u8::from(b)]);
        Ok(())
    }
    fn visit_i64<E>(self, n: i64) -> Result<(), E> {
        self.number(n as f64);
        Ok(())
    }
    fn visit_u64<E>(self, n: u64) -> Result<(), E> {
        self.number(n as f64);
        Ok(())
    }
    fn visit_f64<E>(self, n: f64) -> Result<(), E> {
        self.number(n);
        Ok(())
    }
    fn visit_str<E>(self, s: &str) -> Result<(), E> {
        string(self.out, STRING_VALUE, s);
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let out = self.out;
        out.push(LIST_VALUE);
        let list = open(out);
        loop {
            out.push(LIST_VALUES);
            let value = open(out);
            let seed = Body {
                out: &mut *out,
                top: false,
            };
            if seq.next_element_seed(seed)?.is_none() {
                out.truncate(value - 2);
                break;
            }
            close(out, value);
        }
        close(out, list);
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let out = self.out;
        let object = (!self.top).then(|| {
            out.push(STRUCT_VALUE);
            open(out)
        });
        loop {
            out.push(STRUCT_FIELDS);
            let entry = open(out);
            if map.next_key_seed(EntryKey(&mut *out))?.is_none() {
                out.truncate(entry - 2);
                break;
            }
            out.push(ENTRY_VALUE);
            let value = open(out);
            map.next_value_seed(Body {
                out: &mut *out,
                top: false,
            })?;
            close(out, value);
            close(out, entry);
        }
        if let Some(object) = object {
            close(out, object);
        }
        Ok(())
    }
}

/// Writes a map entry's key field; an empty key is left out, as prost does.
struct EntryKey<'a>(&'a mut Vec<u8>);

impl<'de> DeserializeSeed<'de> for EntryKey<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for EntryKey<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E>(self, key: &str) -> Result<(), E> {
        if !key.is_empty() {
            string(self.0, STRUCT_FIELDS, key);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use prost_types::{value::Kind, Value};

    /// What the wire encoding must equal: the text parsed into a tree.
    fn tree_of(text: &str) -> Struct {
        crate::api::json::tree::from_json(text).unwrap()
    }

    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::Bool),
            any::<f64>()
                .prop_filter("finite", |n| n.is_finite())
                .prop_map(|n| serde_json::json!(n)),
            any::<i64>().prop_map(|n| serde_json::json!(n)),
            any::<u64>().prop_map(|n| serde_json::json!(n)),
            "\\PC{0,12}".prop_map(serde_json::Value::String),
            // Long enough that lengths take two or three varint bytes.
            (100usize..20_000).prop_map(|n| serde_json::Value::String("é".repeat(n))),
        ];
        leaf.prop_recursive(6, 200, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(serde_json::Value::Array),
                prop::collection::btree_map("\\PC{0,6}", inner, 0..8)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn encodes_as_the_tree_would(fields in prop::collection::btree_map("\\PC{0,8}", json_value(), 0..8)) {
            let text = serde_json::Value::Object(fields.into_iter().collect()).to_string();
            let tree = tree_of(&text);
            let data = Data::from_json(&text).unwrap();
            // Same bytes as prost encoding the tree (keys are already sorted here).
            prop_assert_eq!(data.encode_to_vec(), tree.encode_to_vec());
            prop_assert_eq!(data.encoded_len(), tree.encoded_len());
            prop_assert_eq!(Struct::decode(&data.encode_to_vec()[..]).unwrap(), tree);
            prop_assert_eq!(crate::api::size::struct_len(&text), Some(data.encoded_len()));
        }
    }

    #[test]
    fn numbers_and_unicode_are_exact() {
        let text = r#"{"big":18446744073709551615,"neg":-9007199254740993,"f":0.1,"tiny":5e-324,"e":"\u00e9\ud83d\ude00\"\\"}"#;
        let data = Data::from_json(text).unwrap();
        let tree = Struct::decode(&data.encode_to_vec()[..]).unwrap();
        assert_eq!(tree, tree_of(text));
        let number = |k: &str| match tree.fields[k].kind {
            Some(Kind::NumberValue(n)) => n,
            _ => panic!("{k} is not a number"),
        };
        assert_eq!(number("big"), u64::MAX as f64);
        assert_eq!(number("neg"), -9007199254740993i64 as f64);
        assert_eq!(number("f"), 0.1);
        assert_eq!(number("tiny"), 5e-324);
        assert_eq!(
            tree.fields["e"],
            Value {
                kind: Some(Kind::StringValue("é😀\"\\".into()))
            }
        );
    }

    #[test]
    fn duplicate_keys_decode_to_the_last_as_a_tree_would() {
        let text = r#"{"a":1,"a":{"b":[2]}}"#;
        let data = Data::from_json(text).unwrap();
        assert_eq!(
            Struct::decode(&data.encode_to_vec()[..]).unwrap(),
            tree_of(text)
        );
    }

    #[test]
    fn what_is_not_one_json_object_is_refused() {
        for text in [
            "",
            "[]",
            "1",
            "\"s\"",
            "null",
            "{",
            "{\"a\":}",
            "{} {}",
            "{\"a\":1}x",
        ] {
            assert!(Data::from_json(text).is_err(), "{text:?}");
        }
        assert_eq!(Data::from_json(" {} ").unwrap().encoded_len(), 0);
    }

    #[test]
    fn a_decoded_message_is_a_tree_and_merges() {
        let data = Data::from_json(r#"{"a":1}"#).unwrap();
        let mut merged = data.clone();
        merged
            .merge(&Data::from_json(r#"{"b":true}"#).unwrap().encode_to_vec()[..])
            .unwrap();
        assert_eq!(merged, tree_of(r#"{"a":1,"b":true}"#));
        assert_eq!(data, tree_of(r#"{"a":1}"#));
        let mut cleared = merged;
        cleared.clear();
        assert_eq!(cleared.encoded_len(), 0);
    }
}
