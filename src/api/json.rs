//! `google.protobuf.Struct` to JSON text and back, without an intermediate
//! `serde_json::Value`: validation walks the Struct once, serialization writes
//! it straight out, and reads parse JSON straight into protobuf values.

use crate::store::MAX_DEPTH;
use prost_types::{value::Kind, Struct, Value};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use std::fmt;

/// Where a value sits in the document, rendered only for an error message.
enum Path<'a> {
    Root(&'a str),
    Key(&'a Path<'a>, &'a str),
    Index(&'a Path<'a>, usize),
}

impl fmt::Display for Path<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Path::Root(name) => f.write_str(name),
            Path::Key(parent, key) if is_plain_key(key) => write!(f, "{parent}.{key}"),
            Path::Key(parent, key) => write!(f, "{parent}[{}]", super::validate::shown(key)),
            Path::Index(parent, i) => write!(f, "{parent}[{i}]"),
        }
    }
}

fn is_plain_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 40
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Checks what JSON cannot hold or the contract forbids: NaN and infinities,
/// values without a kind, nesting deeper than [`MAX_DEPTH`].
pub fn validate(data: &Struct) -> Result<(), String> {
    validate_as(data, "data")
}

/// [`validate`] for a Struct that the request calls `name` (`merge`).
pub fn validate_as(data: &Struct, name: &str) -> Result<(), String> {
    check_struct(data, &Path::Root(name), 1)
}

/// Checks one Value that the request calls `name` (a transform's operand);
/// it counts as nested one level in a document.
pub fn validate_value(value: &Value, name: &str) -> Result<(), String> {
    check_value(value, &Path::Root(name), 2)
}

/// A validated Value as JSON.
pub fn to_json_value(value: &Value) -> serde_json::Value {
    serde_json::to_value(JsonValue(value)).unwrap_or(serde_json::Value::Null)
}

/// A validated Struct as a JSON object.
pub fn to_json_object(data: &Struct) -> serde_json::Value {
    serde_json::to_value(JsonStruct(data)).unwrap_or_default()
}

fn check_struct(s: &Struct, path: &Path<'_>, depth: usize) -> Result<(), String> {
    for (key, value) in &s.fields {
        let path = Path::Key(path, key);
        if key.contains('\0') {
            return Err(nul(&path, "key"));
        }
        check_value(value, &path, depth)?;
    }
    Ok(())
}

/// U+0000 is valid JSON, but PostgreSQL's jsonb cannot hold it; refusing it on
/// every store keeps documents portable between them.
fn nul(path: &Path<'_>, what: &str) -> String {
    format!("{path}: the {what} contains U+0000, which documents cannot hold (PostgreSQL's jsonb refuses it)")
}

fn check_value(value: &Value, path: &Path<'_>, depth: usize) -> Result<(), String> {
    match &value.kind {
        None => Err(format!(
            "{path} is a Value with no kind set: set null_value for a JSON null"
        )),
        Some(Kind::NumberValue(n)) if !n.is_finite() => Err(format!(
            "{path} is {n}: JSON numbers must be finite (no NaN or infinity)"
        )),
        Some(Kind::StringValue(v)) if v.contains('\0') => Err(nul(path, "string")),
        Some(Kind::StructValue(s)) => {
            nested(path, depth)?;
            check_struct(s, path, depth + 1)
        }
        Some(Kind::ListValue(list)) => {
            nested(path, depth)?;
            for (i, v) in list.values.iter().enumerate() {
                check_value(v, &Path::Index(path, i), depth + 1)?;
            }
            Ok(())
        }
        Some(_) => Ok(()),
    }
}

fn nested(path: &Path<'_>, depth: usize) -> Result<(), String> {
    if depth >= MAX_DEPTH {
        return Err(format!(
            "{path} nests deeper than {MAX_DEPTH} levels of objects and arrays (the document is level 1): flatten the document"
        ));
    }
    Ok(())
}

/// JSON text of a validated Struct (keys sorted, as the Struct holds them).
pub fn to_json(data: &Struct) -> String {
    // Serializing a validated Struct to a String cannot fail.
    serde_json::to_string(&JsonStruct(data)).unwrap_or_else(|_| "{}".into())
}

struct JsonStruct<'a>(&'a Struct);
struct JsonValue<'a>(&'a Value);

impl Serialize for JsonStruct<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.fields.len()))?;
        for (k, v) in &self.0.fields {
            map.serialize_entry(k, &JsonValue(v))?;
        }
        map.end()
    }
}

impl Serialize for JsonValue<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.0.kind {
            None | Some(Kind::NullValue(_)) => s.serialize_unit(),
            Some(Kind::NumberValue(n)) => s.serialize_f64(*n),
            Some(Kind::StringValue(v)) => s.serialize_str(v),
            Some(Kind::BoolValue(b)) => s.serialize_bool(*b),
            Some(Kind::StructValue(v)) => JsonStruct(v).serialize(s),
            Some(Kind::ListValue(list)) => {
                let mut seq = s.serialize_seq(Some(list.values.len()))?;
                for v in &list.values {
                    seq.serialize_element(&JsonValue(v))?;
                }
                seq.end()
            }
        }
    }
}

/// Stored JSON text parsed into a Struct tree: the reference that
/// [`crate::wire::Data::from_json`] (which the server uses) is tested against.
#[cfg(test)]
pub(crate) mod tree {
    use super::*;
    use prost_types::ListValue;
    use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
    use std::collections::BTreeMap;

    /// Parses stored JSON text of an object into a Struct.
    pub fn from_json(text: &str) -> Result<Struct, serde_json::Error> {
        let ProtoValue(value) = serde_json::from_str(text)?;
        match value.kind {
            Some(Kind::StructValue(s)) => Ok(s),
            _ => Err(de::Error::custom("a stored document is not a JSON object")),
        }
    }

    struct ProtoValue(Value);

    fn kind(kind: Kind) -> ProtoValue {
        ProtoValue(Value { kind: Some(kind) })
    }

    impl<'de> Deserialize<'de> for ProtoValue {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(ProtoVisitor)
        }
    }

    struct ProtoVisitor;

    impl<'de> Visitor<'de> for ProtoVisitor {
        type Value = ProtoValue;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON value")
        }

        fn visit_unit<E>(self) -> Result<ProtoValue, E> {
            Ok(kind(Kind::NullValue(0)))
        }
        fn visit_bool<E>(self, b: bool) -> Result<ProtoValue, E> {
            Ok(kind(Kind::BoolValue(b)))
        }
        fn visit_i64<E>(self, n: i64) -> Result<ProtoValue, E> {
            Ok(kind(Kind::NumberValue(n as f64)))
        }
        fn visit_u64<E>(self, n: u64) -> Result<ProtoValue, E> {
            Ok(kind(Kind::NumberValue(n as f64)))
        }
        fn visit_f64<E>(self, n: f64) -> Result<ProtoValue, E> {
            Ok(kind(Kind::NumberValue(n)))
        }
        fn visit_str<E>(self, s: &str) -> Result<ProtoValue, E> {
            Ok(kind(Kind::StringValue(s.to_string())))
        }
        fn visit_string<E>(self, s: String) -> Result<ProtoValue, E> {
            Ok(kind(Kind::StringValue(s)))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ProtoValue, A::Error> {
            let mut values = Vec::with_capacity(seq.size_hint().unwrap_or(0));
            while let Some(ProtoValue(v)) = seq.next_element()? {
                values.push(v);
            }
            Ok(kind(Kind::ListValue(ListValue { values })))
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ProtoValue, A::Error> {
            let mut fields = BTreeMap::new();
            while let Some((k, ProtoValue(v))) = map.next_entry::<String, ProtoValue>()? {
                fields.insert(k, v);
            }
            Ok(kind(Kind::StructValue(Struct { fields })))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::tree::from_json;
    use super::*;
    use prost_types::ListValue;

    fn num(n: f64) -> Value {
        Value {
            kind: Some(Kind::NumberValue(n)),
        }
    }

    fn obj(fields: Vec<(&str, Value)>) -> Struct {
        Struct {
            fields: fields
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        }
    }

    fn nest(levels: usize) -> Struct {
        let mut s = obj(vec![("leaf", num(1.0))]);
        for _ in 1..levels {
            s = obj(vec![(
                "n",
                Value {
                    kind: Some(Kind::StructValue(s)),
                },
            )]);
        }
        s
    }

    #[test]
    fn round_trips_every_json_type() {
        let text = r#"{"a":null,"b":true,"c":-1.5e300,"d":"é\"\n","e":[1.0,[],{}],"f":{"g":0.0}}"#;
        let s = from_json(text).unwrap();
        validate(&s).unwrap();
        assert_eq!(from_json(&to_json(&s)).unwrap(), s);
    }

    #[test]
    fn depth_limit_is_twenty_levels() {
        assert!(validate(&nest(20)).is_ok());
        let err = validate(&nest(21)).unwrap_err();
        assert!(err.contains("deeper than 20"), "{err}");
        assert!(err.starts_with("data.n.n"), "{err}");
    }

    #[test]
    fn rejects_non_finite_numbers_with_a_path() {
        for n in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let list = Value {
                kind: Some(Kind::ListValue(ListValue {
                    values: vec![num(1.0), num(n)],
                })),
            };
            let err = validate(&obj(vec![("weird key", list)])).unwrap_err();
            assert!(err.starts_with("data[\"weird key\"][1]"), "{err}");
            assert!(err.contains("finite"), "{err}");
        }
    }
}
