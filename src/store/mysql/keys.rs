//! Sort keys as generated columns, so that MySQL/MariaDB indexes serve
//! queries. Per field path, two `VIRTUAL` columns computed from `data`:
//!
//! - `k$<hash>` `VARBINARY(256)`: the key bytes ([`crate::store::key`]) of
//!   null, false, true and strings (tag, UTF-8 bytes, `0x00`; cut at 256
//!   bytes), only the tag for numbers (`0x30`), arrays (`0x50`) and
//!   objects (`0x60`); NULL when the field is missing;
//! - `n$<hash>` `DOUBLE`: the number, NULL for the other types.
//!
//! Bytes, never text: `JSON_VALUE` and friends return a case- and
//! accent-insensitive collation on MariaDB ('abc' = 'ABC'). `(k, n)` orders
//! exactly as the keys for every value whose key the column holds whole
//! ("exact": scalars, strings up to 254 bytes); a long string, an array or
//! an object sorts correctly against every exact key but not against its
//! own kind, so conditions on those are loosened here and checked again by
//! the sidecar, and a page whose order meets one is read by the scan
//! instead (see `queries`).
//!
//! Field paths reach SQL only as `$."key"` with keys of a plain alphabet
//! ([`pushable`]); other paths are never pushed down.

use super::bytes;
use crate::store::key::{ARRAY, NUMBER, OBJECT, STRING};
use crate::store::query::{Condition, Cursor, Field, Filter, Index, Query};
use crate::store::{FieldPath, Scopes};
use mysql_async::Value;
use std::ops::Bound;

/// Bytes of a key a `k$` column holds at most (strings longer are cut).
pub(super) const KEY_BYTES: usize = 256;

/// The JSON types MySQL and MariaDB report for numbers.
const NUMBER_TYPES: &str = "'INTEGER', 'UNSIGNED INTEGER', 'DOUBLE', 'DECIMAL'";

fn fnv(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Whether a path may reach SQL: every key of ASCII letters, digits, `_`
/// and `-`, so `$."key"` needs no escaping anywhere.
pub(super) fn pushable(path: &FieldPath) -> bool {
    path.segments().iter().all(|s| {
        !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    })
}

/// The key and number columns of a path (unquoted): `k$…`, `n$…`.
pub(super) fn columns(path: &FieldPath) -> [String; 2] {
    let hash = format!("{:012x}", fnv(&path.to_string()) >> 16);
    [format!("k${hash}"), format!("n${hash}")]
}

/// The name of a declared index on its table: `q` and a hash of its shape.
pub(super) fn index_name(index: &Index) -> String {
    format!("q{:012x}", fnv(&index.to_string()) >> 16)
}

/// Whether `name` is one of ours ([`index_name`]).
pub(super) fn is_index_name(name: &str) -> bool {
    name.len() == 13
        && name.starts_with('q')
        && name[1..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// `ADD COLUMN` clauses of a pushable path's two columns.
pub(super) fn column_ddl(path: &FieldPath) -> [String; 2] {
    let json_path = path
        .segments()
        .iter()
        .map(|s| format!(".\"{s}\""))
        .collect::<String>();
    let e = format!("JSON_EXTRACT(data, '${json_path}')");
    let [k, n] = columns(path);
    let shown = path.to_string();
    [
        format!(
            "ADD COLUMN `{k}` VARBINARY({KEY_BYTES}) AS (CASE JSON_TYPE({e})
                WHEN 'NULL' THEN x'10'
                WHEN 'BOOLEAN' THEN IF(JSON_UNQUOTE({e}) = 'true', x'21', x'20')
                WHEN 'STRING' THEN LEFT(CONCAT(x'40', CAST(JSON_UNQUOTE({e}) AS BINARY), x'00'), {KEY_BYTES})
                WHEN 'ARRAY' THEN x'50'
                WHEN 'OBJECT' THEN x'60'
                WHEN 'INTEGER' THEN x'30' WHEN 'UNSIGNED INTEGER' THEN x'30'
                WHEN 'DOUBLE' THEN x'30' WHEN 'DECIMAL' THEN x'30' END) VIRTUAL
             COMMENT 'docsidecar sort key of {shown}'"
        ),
        // + 0e0: -0 becomes 0, as in the keys.
        format!(
            "ADD COLUMN `{n}` DOUBLE AS (IF(JSON_TYPE({e}) IN ({NUMBER_TYPES}),
                CAST(JSON_UNQUOTE({e}) AS DOUBLE) + 0e0, NULL)) VIRTUAL
             COMMENT 'docsidecar number of {shown}'"
        ),
    ]
}

/// Fields an index may have: InnoDB keys hold 3072 bytes, the scope and id
/// take 1024 and each field 264.
pub(super) const MAX_INDEX_FIELDS: usize = 7;

/// The index's column list: the scope, each field's two columns in its
/// direction, then the id; `None` when MySQL/MariaDB cannot index it.
pub(super) fn index_columns(index: &Index) -> Option<String> {
    if index.fields.len() > MAX_INDEX_FIELDS {
        return None;
    }
    let mut out = vec!["scope".to_string()];
    for o in &index.fields {
        let Field::Path(path) = &o.field else {
            continue;
        };
        if !pushable(path) {
            return None;
        }
        let desc = if o.descending { " DESC" } else { "" };
        for c in columns(path) {
            out.push(format!("`{c}`{desc}"));
        }
    }
    out.push("id".into());
    Some(out.join(", "))
}

/// A key as the columns hold it.
#[derive(Debug, Clone, PartialEq)]
enum Point {
    /// The `k` column equals these bytes and `n` is NULL.
    Bytes(Vec<u8>),
    /// A number: `k` is `0x30`, `n` this (`None`: below every number, the
    /// bare tag `0x30` as a range's edge).
    Number(Option<f64>),
    /// A long string, array or object: `k` holds only this much of it.
    Cut(Vec<u8>),
}

/// Whether the columns hold this key whole (it sorts exactly in SQL).
pub(super) fn is_exact(key: &[u8]) -> bool {
    !matches!(point(key), Point::Cut(_))
}

fn point(key: &[u8]) -> Point {
    match key {
        [NUMBER] => Point::Number(None),
        [NUMBER, rest @ ..] if rest.len() == 8 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(rest);
            let ordered = u64::from_be_bytes(b);
            let bits = if ordered >> 63 == 1 {
                ordered & !(1 << 63)
            } else {
                !ordered
            };
            Point::Number(Some(f64::from_bits(bits)))
        }
        [STRING, ..] if key.len() > KEY_BYTES => Point::Cut(key[..KEY_BYTES].to_vec()),
        // The columns hold only the tag: even a range's edge is not exact.
        [tag @ (ARRAY | OBJECT), ..] => Point::Cut(vec![*tag]),
        _ => Point::Bytes(key.to_vec()),
    }
}

/// A query as SQL on the columns: conditions, ORDER BY and parameters.
/// `exact`: the conditions select exactly the matches (else a superset,
/// which the sidecar narrows with [`crate::store::query::matches`]).
#[derive(Debug, Default)]
pub(super) struct Sql {
    pub(super) conditions: Vec<String>,
    pub(super) order_by: Vec<String>,
    pub(super) params: Vec<Value>,
    pub(super) exact: bool,
}

fn cols(path: &FieldPath) -> (String, String) {
    let [k, n] = columns(path);
    (format!("`{k}`"), format!("`{n}`"))
}

impl Sql {
    fn bytes(&mut self, b: &[u8]) -> &'static str {
        self.params.push(Value::Bytes(b.to_vec()));
        "?"
    }

    fn double(&mut self, f: f64) -> &'static str {
        self.params.push(Value::Double(f));
        "?"
    }

    /// `(k, n) op point` in the keys' order, `op` one of `>`, `>=`, `<`, `<=`.
    fn compare(&mut self, (k, n): &(String, String), op: &str, p: &Point) -> String {
        let strict = &op[..1];
        match p {
            Point::Bytes(b) => format!("{k} {op} {}", self.bytes(b)),
            Point::Cut(b) => {
                self.exact = false;
                // Loosened to the inclusive comparison with the part held.
                format!("{k} {strict}= {}", self.bytes(b))
            }
            Point::Number(None) if strict == ">" => {
                format!("({k} > x'30' OR ({k} = x'30' AND {n} IS NOT NULL))")
            }
            Point::Number(None) => format!("{k} < x'30'"),
            Point::Number(Some(f)) => {
                format!(
                    "({k} {strict} x'30' OR ({k} = x'30' AND {n} {op} {}))",
                    self.double(*f)
                )
            }
        }
    }

    /// `(k, n)` is one of `keys` (loosened for cut keys).
    fn one_of(&mut self, (k, n): &(String, String), keys: &[Vec<u8>], exact_only: bool) -> String {
        let (mut bytes, mut numbers) = (Vec::new(), Vec::new());
        for key in keys {
            match point(key) {
                Point::Bytes(b) => bytes.push(b),
                Point::Cut(b) if !exact_only => {
                    self.exact = false;
                    bytes.push(b);
                }
                Point::Cut(_) => self.exact = false,
                Point::Number(Some(f)) => numbers.push(f),
                Point::Number(None) => {}
            }
        }
        let mut parts = Vec::new();
        if !bytes.is_empty() {
            let marks: Vec<&str> = bytes.iter().map(|b| self.bytes(b)).collect();
            // n IS NULL holds for every non-number, and tells the planner
            // that the index's next column is fixed too (its order follows).
            parts.push(format!("({k} IN ({}) AND {n} IS NULL)", marks.join(", ")));
        }
        if !numbers.is_empty() {
            let marks: Vec<&str> = numbers.iter().map(|f| self.double(*f)).collect();
            parts.push(format!("({k} = x'30' AND {n} IN ({}))", marks.join(", ")));
        }
        match parts.len() {
            0 => "1 = 0".into(),
            1 => parts.remove(0),
            _ => format!("({})", parts.join(" OR ")),
        }
    }

    fn filter(&mut self, filter: &Filter) {
        let Field::Path(path) = &filter.field else {
            let c = self.id_condition(&filter.condition);
            self.conditions.push(c);
            return;
        };
        let c = cols(path);
        let k = &c.0;
        let sql = match &filter.condition {
            Condition::In(keys) => self.one_of(&c, keys, false),
            Condition::NotIn(keys) => {
                let none = self.one_of(&c, keys, true);
                format!("({k} IS NOT NULL AND NOT {none})")
            }
            Condition::Exists(true) => format!("{k} IS NOT NULL"),
            Condition::Exists(false) => format!("{k} IS NULL"),
            Condition::Range(low, high) => {
                if let Some(sql) = self.number_range(&c, low, high) {
                    self.conditions.push(sql);
                    return;
                }
                let mut parts = vec![format!("{k} IS NOT NULL")];
                match low {
                    Bound::Included(b) => parts.push(self.compare(&c, ">=", &point(b))),
                    Bound::Excluded(b) => parts.push(self.compare(&c, ">", &point(b))),
                    Bound::Unbounded => {}
                }
                match high {
                    Bound::Included(b) => parts.push(self.compare(&c, "<=", &point(b))),
                    Bound::Excluded(b) => parts.push(self.compare(&c, "<", &point(b))),
                    Bound::Unbounded => {}
                }
                format!("({})", parts.join(" AND "))
            }
            Condition::ArrayContainsAny(_) => {
                // Checked by the sidecar on the rows read.
                self.exact = false;
                return;
            }
        };
        self.conditions.push(sql);
    }

    /// A range within the numbers (a typed comparison with a number) as
    /// `k = 0x30` and bounds on `n`, which an index serves as one range.
    fn number_range(
        &mut self,
        (k, n): &(String, String),
        low: &Bound<Vec<u8>>,
        high: &Bound<Vec<u8>>,
    ) -> Option<String> {
        // Each bound: None (not within the numbers), or the comparison on n
        // it needs (None: every number passes it).
        let on_n = |bound: &Bound<Vec<u8>>, upper: bool| -> Option<Option<(&str, f64)>> {
            let (key, inclusive) = match bound {
                Bound::Included(k) => (k, true),
                Bound::Excluded(k) => (k, false),
                Bound::Unbounded => return None,
            };
            match (point(key), upper) {
                (Point::Number(None), false) => Some(None),
                (Point::Bytes(b), true) if b == [NUMBER + 1] => Some(None),
                (Point::Number(Some(f)), upper) => {
                    let op = match (upper, inclusive) {
                        (false, true) => ">=",
                        (false, false) => ">",
                        (true, true) => "<=",
                        (true, false) => "<",
                    };
                    Some(Some((op, f)))
                }
                _ => None,
            }
        };
        let (low, high) = (on_n(low, false)?, on_n(high, true)?);
        let mut parts = vec![format!("{k} = x'30'")];
        for (op, f) in low.into_iter().chain(high) {
            let mark = self.double(f);
            parts.push(format!("{n} {op} {mark}"));
        }
        Some(format!("({})", parts.join(" AND ")))
    }

    /// A condition on `__id__` (a string): on the id column's bytes.
    fn id_condition(&mut self, condition: &Condition) -> String {
        let ids = |keys: &[Vec<u8>]| -> Vec<String> {
            keys.iter()
                .filter_map(|k| crate::store::sql::id_of(k))
                .collect()
        };
        match condition {
            Condition::In(keys) | Condition::NotIn(keys) => {
                let not = matches!(condition, Condition::NotIn(_));
                let ids = ids(keys);
                if ids.is_empty() {
                    return if not { "1 = 1" } else { "1 = 0" }.into();
                }
                let marks: Vec<&str> = ids.iter().map(|id| self.bytes(id.as_bytes())).collect();
                let not = if not { "NOT " } else { "" };
                format!("id {not}IN ({})", marks.join(", "))
            }
            Condition::Exists(true) => "1 = 1".into(),
            Condition::Exists(false) | Condition::ArrayContainsAny(_) => "1 = 0".into(),
            Condition::Range(low, high) => {
                let mut parts = vec!["1 = 1".to_string()];
                for (bound, strict, edge) in [(low, ">", STRING), (high, "<", STRING + 1)] {
                    let (k, op) = match bound {
                        Bound::Unbounded => continue,
                        Bound::Included(k) => (k, format!("{strict}=")),
                        Bound::Excluded(k) => (k, strict.to_string()),
                    };
                    if k.as_slice() == [edge] {
                        continue;
                    }
                    match crate::store::sql::id_of(k) {
                        Some(id) => {
                            let mark = self.bytes(id.as_bytes());
                            parts.push(format!("id {op} {mark}"));
                        }
                        // A typed comparison with another type: no id matches.
                        None => return "1 = 0".into(),
                    }
                }
                parts.join(" AND ")
            }
        }
    }
}

/// The fields whose columns the SQL of `q` reads (array containment is
/// checked by the sidecar and needs none).
pub(super) fn sql_fields(q: &Query) -> Vec<&FieldPath> {
    q.fields_of(|f| !matches!(f.condition, Condition::ArrayContainsAny(_)))
}

/// The SQL of `q` after `cursor` (its keys exact), or `None` when a cursor
/// key is not: such a page is read by the scan.
pub(super) fn query_sql(q: &Query, cursor: Option<&Cursor>) -> Option<Sql> {
    let mut sql = Sql {
        exact: true,
        ..Sql::default()
    };
    if let Scopes::One(scope) = &q.scopes {
        sql.conditions.push("scope = ?".into());
        sql.params.push(bytes(scope));
    }
    for filter in &q.filters {
        sql.filter(filter);
    }
    // The keyset terms: (expression, descending, value).
    let mut terms: Vec<(String, bool, Option<Value>)> = Vec::new();
    for (i, o) in q.order.iter().enumerate() {
        let key = cursor.map(|c| c.keys.get(i).cloned().unwrap_or_default());
        let Field::Path(path) = &o.field else {
            sql.order_by
                .push(if o.descending { "id DESC" } else { "id" }.into());
            let id = key.map(|k| crate::store::sql::id_of(&k).map(|id| bytes(&id)));
            match id {
                Some(None) => return None,
                id => terms.push(("id".into(), o.descending, id.flatten())),
            }
            continue;
        };
        let (k, n) = cols(path);
        sql.conditions.push(format!("{k} IS NOT NULL"));
        let dir = if o.descending { " DESC" } else { "" };
        sql.order_by.push(format!("{k}{dir}"));
        sql.order_by.push(format!("{n}{dir}"));
        match key.map(|k| point(&k)) {
            None => {
                terms.push((k, o.descending, None));
                terms.push((n, o.descending, None));
            }
            Some(Point::Bytes(b)) => terms.push((k, o.descending, Some(Value::Bytes(b)))),
            Some(Point::Number(Some(f))) => {
                terms.push((k, o.descending, Some(Value::Bytes(vec![NUMBER]))));
                terms.push((n, o.descending, Some(Value::Double(f))));
            }
            Some(_) => return None,
        }
    }
    sql.order_by.push("id".into());
    if matches!(q.scopes, Scopes::All) {
        sql.order_by.push("scope".into());
    }
    if let Some(c) = cursor {
        terms.push(("id".into(), false, Some(bytes(&c.id))));
        if matches!(q.scopes, Scopes::All) {
            terms.push(("scope".into(), false, Some(bytes(&c.scope))));
        }
        let terms: Vec<(String, bool, Value)> = terms
            .into_iter()
            .filter_map(|(e, d, v)| v.map(|v| (e, d, v)))
            .collect();
        let mut branches = Vec::new();
        for i in 0..terms.len() {
            let mut conj = Vec::new();
            for (expr, _, value) in &terms[..i] {
                sql.params.push(value.clone());
                conj.push(format!("{expr} = ?"));
            }
            let (expr, desc, value) = &terms[i];
            sql.params.push(value.clone());
            conj.push(format!("{expr} {} ?", if *desc { "<" } else { ">" }));
            branches.push(format!("({})", conj.join(" AND ")));
        }
        sql.conditions.push(format!("({})", branches.join(" OR ")));
    }
    Some(sql)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::key::encode;
    use serde_json::json;

    #[test]
    fn points_hold_what_the_columns_hold() {
        for n in [-1e300, -2.5, 0.0, 5e-324, 1.0, 9007199254740993.0] {
            assert_eq!(point(&encode(&json!(n))), Point::Number(Some(n)));
        }
        assert_eq!(point(&encode(&json!(-0.0))), Point::Number(Some(0.0)));
        assert_eq!(point(&[NUMBER]), Point::Number(None));
        assert_eq!(
            point(&encode(&json!("ab"))),
            Point::Bytes(b"\x40ab\x00".to_vec())
        );
        let long = "x".repeat(KEY_BYTES - 2);
        assert!(is_exact(&encode(&json!(long))));
        let longer = "x".repeat(KEY_BYTES - 1);
        assert!(!is_exact(&encode(&json!(longer))));
        assert!(!is_exact(&encode(&json!([]))));
        assert!(!is_exact(&encode(&json!({}))));
        assert!(!is_exact(&[ARRAY]));
        assert!(is_exact(&encode(&json!(null))));
    }

    #[test]
    fn only_plain_paths_reach_sql() {
        let p = |s: &str| FieldPath::parse(s).unwrap();
        assert!(pushable(&p("customer.id")));
        assert!(pushable(&p("`a-b`.`1`")));
        for bad in ["`a\"b`", "`a'b`", "`a\\\\b`", "`é`", "`a b`", "`a.b`"] {
            assert!(!pushable(&p(bad)), "{bad}");
        }
        let [k, n] = columns(&p("customer.id"));
        assert!(k.starts_with("k$") && n.starts_with("n$") && k[2..] == n[2..]);
        assert_ne!(columns(&p("a")), columns(&p("b")));
        let i = Index::parse(&["a".into(), "b desc".into()]).unwrap();
        assert!(is_index_name(&index_name(&i)));
        assert!(!is_index_name("expire_time"));
        assert_eq!(index_columns(&i).unwrap().matches(" DESC").count(), 2);
    }
}
