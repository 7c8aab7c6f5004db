//! Queries on SQLite: two SQL functions written in Rust compute what the other
//! stores keep in key columns. `docsidecar_key(data, path)` is a field's sort
//! key (see `store::key`); `docsidecar_contains(data, path, values)` tells
//! array containment. Both are deterministic, so declared indexes are partial
//! expression indexes on `docsidecar_key(...)`, one set per collection, which
//! SQLite uses when a query spells the same expression.

use super::{row_to_doc, SqliteStore, COLUMNS};
use crate::store::query::{Index, Query};
use crate::store::sql::{self, Dialect, Param};
use crate::store::{value, Budget, FieldPath, Page, PageBuilder, StoreResult};
use rusqlite::functions::FunctionFlags;
use rusqlite::{Connection, ToSql};
use std::collections::BTreeMap;

/// Registers the functions on a connection; every connection needs them,
/// since an index on them is useless (and an error) without.
pub(super) fn register(conn: &Connection) -> rusqlite::Result<()> {
    let flags = FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC;
    conn.create_scalar_function("docsidecar_key", 2, flags, |ctx| {
        let (Some(data), Some(path)) =
            (ctx.get::<Option<String>>(0)?, ctx.get::<Option<String>>(1)?)
        else {
            return Ok(None);
        };
        Ok(field(&data, &path).map(|v| crate::store::key::encode(&v)))
    })?;
    conn.create_scalar_function("docsidecar_contains", 3, flags, |ctx| {
        let data: String = ctx.get(0)?;
        let path: String = ctx.get(1)?;
        let wanted: String = ctx.get(2)?;
        let wanted: Vec<serde_json::Value> = serde_json::from_str(&wanted).unwrap_or_default();
        Ok(match field(&data, &path) {
            Some(serde_json::Value::Array(items)) => items
                .iter()
                .any(|item| wanted.iter().any(|w| value::equal(item, w))),
            _ => false,
        })
    })
}

/// The value at a path (a JSON array of keys) of a document's JSON text.
fn field(data: &str, path: &str) -> Option<serde_json::Value> {
    let keys: Vec<String> = serde_json::from_str(path).ok()?;
    let doc: serde_json::Value = serde_json::from_str(data).ok()?;
    value::get(&doc, &FieldPath::from_segments(&keys)).cloned()
}

struct Sqlite;

impl Dialect for Sqlite {
    fn columns(&self) -> &'static str {
        COLUMNS
    }

    fn placeholder(&self, n: usize) -> String {
        format!("?{n}")
    }

    fn key(&self, path: &FieldPath) -> String {
        format!("docsidecar_key(data, {})", sql::path_literal(path))
    }

    fn array_contains(&self, path: &FieldPath, param: &str) -> Option<String> {
        Some(format!(
            "docsidecar_contains(data, {}, {param})",
            sql::path_literal(path)
        ))
    }
}

/// The statement of a query (or, with `count`, of its count) and its
/// parameters, `?1` being `now`. The collection is a literal (a validated
/// name) so that the partial indexes of that collection apply.
fn statement(q: &Query, now: i64, count: bool) -> (String, Vec<Box<dyn ToSql>>) {
    let conditions = vec![
        format!("collection = '{}'", q.collection),
        "(expire_time IS NULL OR expire_time > ?1)".to_string(),
    ];
    let (sql, params) = sql::statement(q, &Sqlite, "documents", conditions, count);
    (sql, bind(now, &params))
}

fn bind(now: i64, params: &[Param]) -> Vec<Box<dyn ToSql>> {
    let mut out: Vec<Box<dyn ToSql>> = vec![Box::new(now)];
    for p in params {
        out.push(match p {
            Param::Bytes(b) => Box::new(b.clone()),
            Param::Text(t) | Param::Json(t) => Box::new(t.clone()),
        });
    }
    out
}

/// The name of a declared index of a collection: `q$collection$hash`.
fn index_name(collection: &str, index: &Index) -> String {
    let text = index.to_string();
    let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("q${collection}${hash:016x}")
}

/// `CREATE INDEX` of a declared index: the collection's rows (partial), by
/// scope, the keys in the declared directions, then id.
fn index_ddl(collection: &str, index: &Index) -> String {
    let keys: Vec<String> = index
        .fields
        .iter()
        .map(|o| {
            let crate::store::query::Field::Path(p) = &o.field else {
                return "id".into();
            };
            let desc = if o.descending { " DESC" } else { "" };
            format!("{}{desc}", Sqlite.key(p))
        })
        .collect();
    format!(
        "CREATE INDEX IF NOT EXISTS \"{}\" ON documents (collection, scope, {}, id) WHERE collection = '{collection}'",
        index_name(collection, index),
        keys.join(", ")
    )
}

/// Makes the indexes exactly the declared ones: creates the missing, drops
/// the ones no declaration names any more (`q$…` indexes only).
pub(super) fn converge(
    conn: &Connection,
    declared: &BTreeMap<String, Vec<Index>>,
) -> StoreResult<()> {
    let existing: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND name LIKE 'q$%'")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let mut wanted = std::collections::BTreeSet::new();
    for (collection, indexes) in declared {
        for index in indexes {
            conn.execute_batch(&index_ddl(collection, index))?;
            wanted.insert(index_name(collection, index));
        }
    }
    for name in existing.into_iter().filter(|n| !wanted.contains(n)) {
        conn.execute_batch(&format!(
            "DROP INDEX IF EXISTS \"{}\"",
            name.replace('"', "")
        ))?;
        tracing::info!(index = %name, "dropped an index no declaration names");
    }
    Ok(())
}

impl SqliteStore {
    /// Creates the index a query needs, in development (no policy: indexes
    /// appear on first use).
    pub(super) async fn index_for(&self, q: &Query) -> StoreResult<()> {
        let Some(index) = q.needed_index().filter(|_| self.auto_index) else {
            return Ok(());
        };
        let name = index_name(&q.collection, &index);
        if self.indexed.contains(&name) {
            return Ok(());
        }
        let ddl = index_ddl(&q.collection, &index);
        self.with_writer(move |conn| Ok(conn.execute_batch(&ddl)?))
            .await?;
        tracing::info!(collection = %q.collection, index = %index, "created an index on first use (no policy)");
        self.indexed.insert(name);
        Ok(())
    }

    pub(super) async fn run_query(&self, q: &Query, budget: Budget) -> StoreResult<Page> {
        self.index_for(q).await?;
        let now = self.clock.now();
        let q = q.clone();
        self.with_reader(move |conn| {
            let (sql, params) = statement(&q, now, false);
            let mut stmt = conn.prepare_cached(&sql)?;
            let rows = stmt.query_map(rusqlite::params_from_iter(params.iter()), |r| {
                row_to_doc(&q.collection, r)
            })?;
            let mut page = PageBuilder::new(q.limit, budget);
            for row in rows {
                if !page.push(row?) {
                    break;
                }
            }
            Ok(page.finish())
        })
        .await
    }

    pub(super) async fn run_count(&self, q: &Query) -> StoreResult<u64> {
        self.index_for(q).await?;
        let now = self.clock.now();
        let q = q.clone();
        self.with_reader(move |conn| {
            let (sql, params) = statement(&q, now, true);
            let n: i64 = conn
                .prepare_cached(&sql)?
                .query_row(rusqlite::params_from_iter(params.iter()), |r| r.get(0))?;
            Ok(n as u64)
        })
        .await
    }
}

#[cfg(test)]
pub(super) fn explain(conn: &Connection, q: &Query) -> String {
    let (sql, params) = statement(q, 0, false);
    let plan: Vec<String> = conn
        .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
        .unwrap()
        .query_map(rusqlite::params_from_iter(params.iter()), |r| {
            r.get::<_, String>(3)
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();
    plan.join("; ")
}

#[cfg(test)]
pub(super) fn declared_index(collection: &str, index: &Index) -> String {
    index_ddl(collection, index)
}
