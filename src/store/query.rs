//! Queries: filters and order on field values, compared as sort keys
//! ([`super::key`]), so every store answers the same. A query is checked and
//! converted by the API; stores turn it into SQL on keys (or evaluate it, the
//! memory store). Which declared index serves a query is decided here, from
//! the declarations, never from a database planner.

use super::key::{self, encode};
use super::path::FieldPath;
use super::{value, Document, Scopes};
use serde_json::Value;
use std::cmp::Ordering;
use std::fmt;
use std::ops::Bound;

/// What a filter or an order names: the document id or a field.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Field {
    Id,
    Path(FieldPath),
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Field::Id => f.write_str(super::path::ID_FIELD),
            Field::Path(p) => p.fmt(f),
        }
    }
}

/// A condition on a field's key (`None` when the document lacks the field).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    /// The key is one of these (EQUAL is a one-element list).
    In(Vec<Vec<u8>>),
    /// The field exists and its key is none of these (NOT_EQUAL, NOT_IN).
    NotIn(Vec<Vec<u8>>),
    /// The key lies in this range, within one JSON type (typed comparisons).
    Range(Bound<Vec<u8>>, Bound<Vec<u8>>),
    /// The field exists (true) or not (false).
    Exists(bool),
    /// The field is an array holding one of these values (ARRAY_CONTAINS and
    /// _ANY). Compared by value; no index serves it.
    ArrayContainsAny(Vec<Value>),
}

/// One filter: all of a query's filters must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    pub field: Field,
    pub condition: Condition,
}

/// One sort key of a query, before the final id (then scope) tie-break.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Order {
    pub field: Field,
    pub descending: bool,
}

/// Where the previous page stopped: the last document's order keys, id, scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub keys: Vec<Vec<u8>>,
    pub id: String,
    pub scope: String,
}

/// A query of one collection.
#[derive(Debug, Clone)]
pub struct Query {
    pub collection: String,
    pub scopes: Scopes,
    pub filters: Vec<Filter>,
    pub order: Vec<Order>,
    pub after: Option<Cursor>,
    pub limit: usize,
}

/// A declared index: fields in order, each ascending or descending.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Index {
    pub fields: Vec<Order>,
}

impl fmt::Display for Index {
    /// As the policy declares it: `["customer.id", "created_at desc"]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, o) in self.fields.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            let desc = if o.descending { " desc" } else { "" };
            write!(f, "\"{}{desc}\"", o.field)?;
        }
        f.write_str("]")
    }
}

impl Index {
    /// Parses a declaration: `"field"` or `"field desc"` (or `asc`) each.
    pub fn parse(fields: &[String]) -> Result<Index, String> {
        if fields.is_empty() {
            return Err("an index names at least one field".into());
        }
        let fields = fields
            .iter()
            .map(|f| {
                let (path, descending) = match f.rsplit_once(' ') {
                    Some((path, "desc")) => (path, true),
                    Some((path, "asc")) => (path, false),
                    _ => (f.as_str(), false),
                };
                let path = FieldPath::parse(path.trim())
                    .map_err(|e| format!("index field {}: {e}", crate::quote::shown(f)))?;
                if path.is_id() {
                    return Err("__id__ ends every index already; do not declare it".into());
                }
                Ok(Order {
                    field: Field::Path(path),
                    descending,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Index { fields })
    }
}

impl Filter {
    fn is_equality(&self) -> bool {
        matches!(self.condition, Condition::In(_))
    }
}

impl Query {
    /// The fields whose keys the query reads (filters and order), id excluded.
    pub fn fields(&self) -> Vec<&FieldPath> {
        self.fields_of(|_| true)
    }

    /// [`Query::fields`] of the filters `keep` keeps, and of the order.
    pub fn fields_of(&self, keep: impl Fn(&Filter) -> bool) -> Vec<&FieldPath> {
        let mut fields: Vec<&FieldPath> = self
            .filters
            .iter()
            .filter(|f| keep(f))
            .map(|f| &f.field)
            .chain(self.order.iter().map(|o| &o.field))
            .filter_map(|f| match f {
                Field::Path(p) => Some(p),
                Field::Id => None,
            })
            .collect();
        fields.sort();
        fields.dedup();
        fields
    }

    /// The index this query's shape needs (the prefix rule): its equality
    /// fields, then its one inequality field, then its order. `None` when the
    /// primary key serves it (no field but `__id__`).
    pub fn needed_index(&self) -> Option<Index> {
        let mut fields: Vec<Order> = Vec::new();
        let mut push = |field: &Field, descending: bool| {
            if let Field::Path(_) = field {
                if !fields.iter().any(|o| o.field == *field) {
                    fields.push(Order {
                        field: field.clone(),
                        descending,
                    });
                }
            }
        };
        for f in self.filters.iter().filter(|f| f.is_equality()) {
            push(&f.field, false);
        }
        // The inequality field leads the order, so it comes before the others.
        let first_order = self.order.first().map(|o| &o.field);
        for f in self.filters.iter().filter(|f| !f.is_equality()) {
            if Some(&f.field) != first_order {
                push(&f.field, false);
            }
        }
        for o in &self.order {
            push(&o.field, o.descending);
        }
        (!fields.is_empty()).then_some(Index { fields })
    }

    /// Whether `index` serves this query under the prefix rule (README,
    /// "Queries"): the query's equality fields, in any order, are the index's
    /// first fields; then at most one field with other conditions, which is
    /// the first order field if there is an order; then the order fields in
    /// the index's order and directions (or all reversed). Array containment
    /// is never served by an index.
    pub fn is_served_by(&self, index: &Index) -> bool {
        if self
            .filters
            .iter()
            .any(|f| matches!(f.condition, Condition::ArrayContainsAny(_)))
        {
            return false;
        }
        let path_filters = || self.filters.iter().filter(|f| f.field != Field::Id);
        let equalities: Vec<&Field> = path_filters()
            .filter(|f| f.is_equality())
            .map(|f| &f.field)
            .collect();
        let mut others: Vec<&Field> = path_filters()
            .filter(|f| !f.is_equality() && !equalities.contains(&&f.field))
            .map(|f| &f.field)
            .collect();
        others.dedup();
        if others.len() > 1 {
            return false;
        }
        let mut rest = index.fields.iter();
        let mut eq_seen = 0;
        let distinct_eq: std::collections::BTreeSet<&Field> = equalities.iter().copied().collect();
        let mut remaining: Vec<&Order> = Vec::new();
        for o in rest.by_ref() {
            if eq_seen < distinct_eq.len() && distinct_eq.contains(&o.field) {
                eq_seen += 1;
                continue;
            }
            remaining.push(o);
            break;
        }
        if eq_seen < distinct_eq.len() {
            return false;
        }
        remaining.extend(rest);
        // The order the index must give after the equalities: the inequality
        // field (if not ordered by), then the order fields; __id__ is implicit.
        let mut wanted: Vec<(&Field, Option<bool>)> = Vec::new();
        if let Some(field) = others.first() {
            if self.order.first().map(|o| &o.field) != Some(*field) {
                if !self.order.is_empty() {
                    return false;
                }
                wanted.push((field, None));
            }
        }
        for o in &self.order {
            if o.field == Field::Id {
                break;
            }
            wanted.push((&o.field, Some(o.descending)));
        }
        if wanted.len() > remaining.len() {
            return false;
        }
        let mut flip: Option<bool> = None;
        for ((field, desc), have) in wanted.iter().zip(&remaining) {
            if have.field != **field {
                return false;
            }
            if let Some(desc) = desc {
                let reversed = *desc != have.descending;
                if *flip.get_or_insert(reversed) != reversed {
                    return false;
                }
            }
        }
        true
    }
}

/// The key of `field` in `doc` (`None`: the document lacks it), from its data.
pub fn key_of(field: &Field, doc: &Document, data: &Value) -> Option<Vec<u8>> {
    match field {
        Field::Id => Some(key::id_key(&doc.key.id)),
        Field::Path(path) => value::get(data, path).map(encode),
    }
}

impl Condition {
    /// Whether a field with this key (`None`: missing) and value satisfies it.
    pub fn holds(&self, key: Option<&[u8]>, value: Option<&Value>) -> bool {
        match (self, key) {
            (Condition::Exists(want), key) => key.is_some() == *want,
            (_, None) => false,
            (Condition::In(keys), Some(k)) => keys.iter().any(|w| w == k),
            (Condition::NotIn(keys), Some(k)) => keys.iter().all(|w| w != k),
            (Condition::Range(low, high), Some(k)) => {
                let k = k.to_vec();
                (low.as_ref(), high.as_ref()) == (Bound::Unbounded, Bound::Unbounded)
                    || ((match low {
                        Bound::Included(l) => &k >= l,
                        Bound::Excluded(l) => &k > l,
                        Bound::Unbounded => true,
                    }) && (match high {
                        Bound::Included(h) => &k <= h,
                        Bound::Excluded(h) => &k < h,
                        Bound::Unbounded => true,
                    }))
            }
            (Condition::ArrayContainsAny(wanted), Some(_)) => match value {
                Some(Value::Array(items)) => items
                    .iter()
                    .any(|item| wanted.iter().any(|w| value::equal(item, w))),
                _ => false,
            },
        }
    }
}

/// The sort keys of a document for a query's order (`None`: it lacks an
/// ordered field, so the query does not return it).
pub fn order_keys(order: &[Order], doc: &Document, data: &Value) -> Option<Vec<Vec<u8>>> {
    order.iter().map(|o| key_of(&o.field, doc, data)).collect()
}

/// Compares two documents' positions in a query's order: the order keys
/// (each in its direction), then id, then scope.
pub fn compare_positions(
    order: &[Order],
    a: (&[Vec<u8>], &str, &str),
    b: (&[Vec<u8>], &str, &str),
) -> Ordering {
    for (i, o) in order.iter().enumerate() {
        let c = a.0[i].cmp(&b.0[i]);
        let c = if o.descending { c.reverse() } else { c };
        if c.is_ne() {
            return c;
        }
    }
    a.1.as_bytes()
        .cmp(b.1.as_bytes())
        .then_with(|| a.2.as_bytes().cmp(b.2.as_bytes()))
}

/// Whether a document matches every filter (memory store, and residual
/// filters the SQL stores evaluate on streamed rows).
pub fn matches(filters: &[Filter], doc: &Document, data: &Value) -> bool {
    filters.iter().all(|f| {
        let value = match &f.field {
            Field::Id => None,
            Field::Path(p) => value::get(data, p),
        };
        let key = key_of(&f.field, doc, data);
        f.condition.holds(key.as_deref(), value)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(p: &str) -> Field {
        Field::Path(FieldPath::parse(p).unwrap())
    }

    fn query(filters: Vec<(&str, Condition)>, order: Vec<(&str, bool)>) -> Query {
        Query {
            collection: "c".into(),
            scopes: Scopes::One(String::new()),
            filters: filters
                .into_iter()
                .map(|(f, condition)| Filter {
                    field: if f == "__id__" { Field::Id } else { path(f) },
                    condition,
                })
                .collect(),
            order: order
                .into_iter()
                .map(|(f, descending)| Order {
                    field: path(f),
                    descending,
                })
                .collect(),
            after: None,
            limit: 10,
        }
    }

    fn index(fields: &[&str]) -> Index {
        Index::parse(&fields.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    fn eq() -> Condition {
        Condition::In(vec![vec![1]])
    }

    fn range() -> Condition {
        Condition::Range(Bound::Excluded(vec![1]), Bound::Unbounded)
    }

    #[test]
    fn the_prefix_rule() {
        let q = query(
            vec![("status", eq()), ("customer", eq())],
            vec![("created", true)],
        );
        assert!(q.is_served_by(&index(&["customer", "status", "created desc"])));
        assert!(
            q.is_served_by(&index(&["status", "customer", "created asc"])),
            "all reversed"
        );
        assert!(!q.is_served_by(&index(&["status", "created desc"])));
        assert!(!q.is_served_by(&index(&["status", "customer"])));
        assert!(!q.is_served_by(&index(&["created desc", "status", "customer"])));
        assert_eq!(
            q.needed_index().unwrap().to_string(),
            "[\"status\", \"customer\", \"created desc\"]"
        );

        // One inequality field, leading the order.
        let q = query(
            vec![("status", eq()), ("total", range())],
            vec![("total", false), ("at", true)],
        );
        assert!(q.is_served_by(&index(&["status", "total", "at desc"])));
        assert!(
            !q.is_served_by(&index(&["status", "total", "at"])),
            "mixed flip"
        );
        let q = query(vec![("total", range())], vec![("at", false)]);
        assert!(
            !q.is_served_by(&index(&["total", "at"])),
            "inequality must lead the order"
        );
        let q = query(vec![("a", range()), ("b", range())], vec![]);
        assert!(!q.is_served_by(&index(&["a", "b"])));
        // __id__ is always served; array containment never.
        let q = query(vec![("__id__", range())], vec![]);
        assert!(q.needed_index().is_none());
        let q = query(vec![("tags", Condition::ArrayContainsAny(vec![]))], vec![]);
        assert!(!q.is_served_by(&index(&["tags"])));
        // Extra index fields after what the query needs are fine.
        let q = query(vec![("status", eq())], vec![]);
        assert!(q.is_served_by(&index(&["status", "at"])));
    }
}
