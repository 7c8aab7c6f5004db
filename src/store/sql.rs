//! SQL shared by the SQL stores: a query's filters, cursor and order as a
//! WHERE clause and an ORDER BY on sort keys. Each store says how to name a
//! field's key and a parameter ([`Dialect`]); values always travel as
//! parameters, and field paths only as the store's own, validated spelling.

use super::key::{self, STRING};
use super::query::{Condition, Field, Filter, Query};
use super::Scopes;
use std::ops::Bound;

/// The statement that reads a written document's row, live or expired,
/// under a row lock: `columns` (whose data column is spelled with `data`),
/// the data read as `''` when the planner needs only the rest; `scope` and
/// `id` are the store's placeholders.
pub fn locked_row(columns: &str, table: &str, with_data: bool, [scope, id]: [&str; 2]) -> String {
    let columns = if with_data {
        columns.to_string()
    } else {
        columns.replace("data", "''")
    };
    format!("SELECT {columns} FROM {table} WHERE scope = {scope} AND id = {id} FOR UPDATE")
}

/// Indexes a store created on first use (no policy), so each is created once.
#[derive(Debug, Default)]
pub struct CreatedIndexes(std::sync::Mutex<std::collections::HashSet<String>>);

impl CreatedIndexes {
    pub fn contains(&self, name: &str) -> bool {
        self.names().contains(name)
    }

    pub fn insert(&self, name: String) {
        self.names().insert(name);
    }

    fn names(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        // A panic elsewhere leaves the set as it was: still a valid set.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A bind parameter of a generated statement.
#[derive(Debug, Clone, PartialEq)]
pub enum Param {
    Bytes(Vec<u8>),
    Text(String),
    /// JSON text (array containment operands).
    Json(String),
}

/// What differs between the SQL stores.
pub trait Dialect {
    /// The placeholder of the `n`th parameter (1-based).
    fn placeholder(&self, n: usize) -> String;
    /// The expression of a field's sort key (NULL when the field is missing).
    fn key(&self, path: &super::FieldPath) -> String;
    /// An expression true when the field is an array holding one of the JSON
    /// values in parameter `param`, or `None` when the store evaluates that
    /// filter itself on the rows it reads.
    fn array_contains(&self, path: &super::FieldPath, param: &str) -> Option<String>;
    /// The columns a page selects, in the order the store reads them.
    fn columns(&self) -> &'static str;
}

/// A query as SQL: conditions to AND into the WHERE clause, the ORDER BY
/// list, their parameters (numbered from the `first` given), and the filters
/// left for the store to check on each row.
#[derive(Debug, Default)]
pub struct Parts {
    pub conditions: Vec<String>,
    pub order_by: Vec<String>,
    pub params: Vec<Param>,
    pub residual: Vec<Filter>,
}

struct Builder<'d> {
    dialect: &'d dyn Dialect,
    first: usize,
    parts: Parts,
}

impl Builder<'_> {
    fn param(&mut self, p: Param) -> String {
        self.parts.params.push(p);
        self.dialect
            .placeholder(self.first + self.parts.params.len() - 1)
    }

    fn list(&mut self, keys: &[Vec<u8>]) -> String {
        keys.iter()
            .map(|k| self.param(Param::Bytes(k.clone())))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn condition(&mut self, filter: &Filter) -> Option<String> {
        let Field::Path(path) = &filter.field else {
            return Some(self.id_condition(&filter.condition));
        };
        let k = self.dialect.key(path);
        Some(match &filter.condition {
            Condition::In(keys) => format!("{k} IN ({})", self.list(keys)),
            Condition::NotIn(keys) => {
                format!("({k} IS NOT NULL AND {k} NOT IN ({}))", self.list(keys))
            }
            Condition::Exists(true) => format!("{k} IS NOT NULL"),
            Condition::Exists(false) => format!("{k} IS NULL"),
            Condition::Range(low, high) => {
                let mut parts = Vec::new();
                match low {
                    Bound::Included(b) => {
                        parts.push(format!("{k} >= {}", self.param(Param::Bytes(b.clone()))))
                    }
                    Bound::Excluded(b) => {
                        parts.push(format!("{k} > {}", self.param(Param::Bytes(b.clone()))))
                    }
                    Bound::Unbounded => parts.push(format!("{k} IS NOT NULL")),
                }
                match high {
                    Bound::Included(b) => {
                        parts.push(format!("{k} <= {}", self.param(Param::Bytes(b.clone()))))
                    }
                    Bound::Excluded(b) => {
                        parts.push(format!("{k} < {}", self.param(Param::Bytes(b.clone()))))
                    }
                    Bound::Unbounded => {}
                }
                format!("({})", parts.join(" AND "))
            }
            Condition::ArrayContainsAny(values) => {
                let json = serde_json::Value::Array(values.clone()).to_string();
                let p = self.param(Param::Json(json));
                match self.dialect.array_contains(path, &p) {
                    Some(sql) => sql,
                    None => {
                        self.parts.params.pop();
                        self.parts.residual.push(filter.clone());
                        return None;
                    }
                }
            }
        })
    }

    /// A condition on `__id__`: ids are strings, compared as the id column's
    /// bytes, so the primary key serves it.
    fn id_condition(&mut self, condition: &Condition) -> String {
        let ids =
            |keys: &[Vec<u8>]| -> Vec<String> { keys.iter().filter_map(|k| id_of(k)).collect() };
        match condition {
            Condition::In(keys) | Condition::NotIn(keys) => {
                let not = if matches!(condition, Condition::NotIn(_)) {
                    "NOT "
                } else {
                    ""
                };
                let ids = ids(keys);
                if ids.is_empty() {
                    // In no id: nothing matches; in none of no ids: all do.
                    return if not.is_empty() { "1 = 0" } else { "1 = 1" }.into();
                }
                let list: Vec<String> = ids
                    .into_iter()
                    .map(|id| self.param(Param::Text(id)))
                    .collect();
                format!("id {not}IN ({})", list.join(", "))
            }
            Condition::Exists(exists) => if *exists { "1 = 1" } else { "1 = 0" }.into(),
            Condition::ArrayContainsAny(_) => "1 = 0".into(),
            Condition::Range(low, high) => {
                let mut parts = Vec::new();
                for (bound, op_in, op_ex, edge) in
                    [(low, ">=", ">", STRING), (high, "<=", "<", STRING + 1)]
                {
                    match bound {
                        Bound::Unbounded => {}
                        Bound::Included(k) | Bound::Excluded(k) if k.as_slice() == [edge] => {}
                        Bound::Included(k) | Bound::Excluded(k) => match id_of(k) {
                            Some(id) => {
                                let op = if matches!(bound, Bound::Included(_)) {
                                    op_in
                                } else {
                                    op_ex
                                };
                                let p = self.param(Param::Text(id));
                                parts.push(format!("id {op} {p}"));
                            }
                            // A typed comparison with another type: no id matches.
                            None => return "1 = 0".into(),
                        },
                    }
                }
                if parts.is_empty() {
                    "1 = 1".into()
                } else {
                    parts.join(" AND ")
                }
            }
        }
    }
}

/// The id a string key holds.
pub fn id_of(key: &[u8]) -> Option<String> {
    let body = key.strip_prefix(&[STRING])?.strip_suffix(&[0])?;
    String::from_utf8(body.to_vec()).ok()
}

/// The WHERE conditions, ORDER BY and parameters of `query` (scope, expiry
/// and collection are the store's own). Ordered fields must exist.
pub fn query_parts(query: &Query, dialect: &dyn Dialect, first: usize) -> Parts {
    let mut b = Builder {
        dialect,
        first,
        parts: Parts::default(),
    };
    for filter in &query.filters {
        if let Some(c) = b.condition(filter) {
            b.parts.conditions.push(c);
        }
    }
    let mut terms: Vec<(String, bool)> = Vec::new();
    for o in &query.order {
        let expr = match &o.field {
            Field::Id => "id".to_string(),
            Field::Path(p) => dialect.key(p),
        };
        if !matches!(o.field, Field::Id) {
            b.parts.conditions.push(format!("{expr} IS NOT NULL"));
        }
        terms.push((expr, o.descending));
    }
    let all_scopes = matches!(query.scopes, Scopes::All);
    if let Some(cursor) = &query.after {
        // Keyset: after the cursor in the order, one OR-branch per key.
        let mut values: Vec<(String, bool, Param)> = terms
            .iter()
            .zip(&cursor.keys)
            .map(|((e, d), k)| (e.clone(), *d, Param::Bytes(k.clone())))
            .collect();
        values.push(("id".into(), false, Param::Text(cursor.id.clone())));
        if all_scopes {
            values.push(("scope".into(), false, Param::Text(cursor.scope.clone())));
        }
        let mut branches = Vec::new();
        for i in 0..values.len() {
            let mut conj = Vec::new();
            for (expr, _, value) in &values[..i] {
                let p = b.param(value.clone());
                conj.push(format!("{expr} = {p}"));
            }
            let (expr, desc, value) = &values[i];
            let p = b.param(value.clone());
            conj.push(format!("{expr} {} {p}", if *desc { "<" } else { ">" }));
            branches.push(format!("({})", conj.join(" AND ")));
        }
        b.parts
            .conditions
            .push(format!("({})", branches.join(" OR ")));
        // Implied by the branches, but a bound an index range can start at:
        // without it a deep page would scan every earlier page's rows.
        let (expr, desc, value) = &values[0];
        let p = b.param(value.clone());
        b.parts
            .conditions
            .push(format!("{expr} {} {p}", if *desc { "<=" } else { ">=" }));
    }
    b.parts.order_by = terms
        .into_iter()
        .map(|(e, d)| if d { format!("{e} DESC") } else { e })
        .collect();
    b.parts.order_by.push("id".into());
    if all_scopes {
        b.parts.order_by.push("scope".into());
    }
    b.parts
}

/// A query's statement from `from` (or, with `count`, its count) and its
/// parameters: the store's own `conditions` (which may use parameter 1, the
/// clock), the scope as parameter 2 when the query has one, then the query's.
pub fn statement(
    q: &Query,
    dialect: &dyn Dialect,
    from: &str,
    mut conditions: Vec<String>,
    count: bool,
) -> (String, Vec<Param>) {
    let mut params = Vec::new();
    if let Scopes::One(scope) = &q.scopes {
        conditions.push(format!("scope = {}", dialect.placeholder(2)));
        params.push(Param::Text(scope.clone()));
    }
    let parts = query_parts(q, dialect, params.len() + 2);
    conditions.extend(parts.conditions);
    params.extend(parts.params);
    let sql = if count {
        format!(
            "SELECT count(*) FROM {from} WHERE {}",
            conditions.join(" AND ")
        )
    } else {
        format!(
            "SELECT {} FROM {from} WHERE {} ORDER BY {} LIMIT {}",
            dialect.columns(),
            conditions.join(" AND "),
            parts.order_by.join(", "),
            super::Page::fetch_limit(q.limit)
        )
    };
    (sql, params)
}

/// A field path as a JSON array of its keys: the stores' unambiguous
/// spelling of a path inside SQL text (`'["customer","id"]'`), single quotes
/// doubled so it is a safe literal.
pub fn path_literal(path: &super::FieldPath) -> String {
    let json = serde_json::to_string(path.segments()).unwrap_or_else(|_| "[]".into());
    format!("'{}'", json.replace('\'', "''"))
}

/// The key a store computes for a field of stored JSON text (the memory and
/// SQLite stores, and the key columns the others write).
pub fn key_of_json(data: &serde_json::Value, path: &super::FieldPath) -> Option<Vec<u8>> {
    super::value::get(data, path).map(key::encode)
}
