//! Queries on PostgreSQL: `docsidecar_key(jsonb)`, a PL/pgSQL function in the
//! schema, computes the same sort keys as `store::key` (a test compares them
//! on random values), so filters and order are byte comparisons of keys and
//! indexes are expression indexes on the function, created by `migrate`
//! (CONCURRENTLY) or, without a policy, on first use.

use super::{PostgresStore, COLUMNS, NOW};
use crate::store::query::{Field, Index, Query};
use crate::store::sql::{self, Dialect, Param};
use crate::store::{Budget, FieldPath, Page, PageBuilder, StoreResult};
use std::collections::BTreeSet;
use std::sync::Arc;
use tokio_postgres::types::ToSql;

/// The key function, as [`crate::store::key`] encodes: tag byte, payload.
pub(super) fn key_function_ddl(schema: &str) -> String {
    format!(
        r#"CREATE OR REPLACE FUNCTION "{schema}".docsidecar_key(v jsonb) RETURNS bytea
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $fn$
DECLARE
    out bytea;
    b bytea;
    k text;
    e jsonb;
BEGIN
    CASE jsonb_typeof(v)
    WHEN 'null' THEN RETURN '\x10'::bytea;
    WHEN 'boolean' THEN RETURN CASE WHEN v = 'true'::jsonb THEN '\x21'::bytea ELSE '\x20'::bytea END;
    WHEN 'number' THEN
        -- IEEE bits, big-endian; -0 is 0; negatives inverted, positives' sign flipped.
        b := float8send(CASE WHEN v::float8 = 0 THEN 0::float8 ELSE v::float8 END);
        IF get_byte(b, 0) >= 128 THEN
            FOR i IN 0..7 LOOP b := set_byte(b, i, 255 - get_byte(b, i)); END LOOP;
        ELSE
            b := set_byte(b, 0, get_byte(b, 0) + 128);
        END IF;
        RETURN '\x30'::bytea || b;
    WHEN 'string' THEN
        RETURN '\x40'::bytea || convert_to(v #>> '{{}}', 'UTF8') || '\x00'::bytea;
    WHEN 'array' THEN
        out := '\x50'::bytea;
        FOR e IN SELECT x FROM jsonb_array_elements(v) WITH ORDINALITY AS t(x, n) ORDER BY n LOOP
            out := out || "{schema}".docsidecar_key(e);
        END LOOP;
        RETURN out || '\x00'::bytea;
    ELSE
        out := '\x60'::bytea;
        FOR k, e IN SELECT key, value FROM jsonb_each(v) ORDER BY key COLLATE "C" LOOP
            out := out || '\x40'::bytea || convert_to(k, 'UTF8') || '\x00'::bytea || "{schema}".docsidecar_key(e);
        END LOOP;
        RETURN out || '\x00'::bytea;
    END CASE;
END
$fn$"#
    )
}

/// A path as a `text[]` literal: keys single-quoted, quotes doubled.
pub(super) fn path_array(path: &FieldPath) -> String {
    let keys: Vec<String> = path
        .segments()
        .iter()
        .map(|k| format!("'{}'", k.replace('\'', "''")))
        .collect();
    format!("ARRAY[{}]::text[]", keys.join(", "))
}

struct Postgres<'s> {
    schema: &'s str,
    /// The table's usable key columns ([`super::keys`]): a field that has
    /// one is compared on it, so that an index serves it under row-level
    /// security; any other on the key expression.
    columns: &'s BTreeSet<String>,
}

impl Dialect for Postgres<'_> {
    fn columns(&self) -> &'static str {
        COLUMNS
    }

    fn placeholder(&self, n: usize) -> String {
        format!("${n}")
    }

    fn key(&self, path: &FieldPath) -> String {
        let column = super::keys::key_column(path);
        if self.columns.contains(&column) {
            return super::ddl::quote_ident(&column);
        }
        format!(
            "\"{}\".docsidecar_key(data #> {})",
            self.schema,
            path_array(path)
        )
    }

    fn array_contains(&self, path: &FieldPath, param: &str) -> Option<String> {
        let value = format!("data #> {}", path_array(path));
        Some(format!(
            "(jsonb_typeof({value}) = 'array' AND EXISTS (SELECT 1 FROM jsonb_array_elements({value}) item
              WHERE \"{0}\".docsidecar_key(item) IN (SELECT \"{0}\".docsidecar_key(w) FROM jsonb_array_elements({param}::text::jsonb) w)))",
            self.schema
        ))
    }
}

/// The name of an index of a collection: `collection$q…`, unique per shape.
pub(super) fn index_name(collection: &str, index: &Index) -> String {
    let hash = index
        .to_string()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    super::ddl::object_name(collection, &format!("q{:012x}", hash >> 16))
}

/// An index's keys for `CREATE INDEX`: each field's `key` expression in
/// its declared direction, comma-separated.
pub(super) fn key_list(index: &Index, key: impl Fn(&FieldPath) -> String) -> String {
    let keys: Vec<String> = index
        .fields
        .iter()
        .filter_map(|o| match &o.field {
            Field::Path(p) => Some(format!(
                "{}{}",
                key(p),
                if o.descending { " DESC" } else { "" }
            )),
            Field::Id => None,
        })
        .collect();
    keys.join(", ")
}

/// `CREATE INDEX` of a declared index: by scope, the keys in the declared
/// directions, then id. `concurrently` for `migrate` on a live table.
pub(super) fn index_ddl(
    schema: &str,
    collection: &str,
    index: &Index,
    concurrently: bool,
) -> StoreResult<String> {
    let table = super::ddl::qualified_table(schema, collection)?;
    let none = BTreeSet::new();
    let dialect = Postgres {
        schema,
        columns: &none,
    };
    let keys = key_list(index, |p| dialect.key(p));
    Ok(format!(
        "CREATE INDEX {}IF NOT EXISTS {} ON {table} (scope, {}, id)",
        if concurrently { "CONCURRENTLY " } else { "" },
        index_name(collection, index),
        keys
    ))
}

/// A query's statement and parameters (`$1` is the clock offset).
fn statement(
    schema: &str,
    columns: &BTreeSet<String>,
    table: &str,
    q: &Query,
    count: bool,
) -> (String, Vec<Param>) {
    let expiry = vec![format!("(expire_time IS NULL OR expire_time > {NOW})")];
    sql::statement(q, &Postgres { schema, columns }, table, expiry, count)
}

/// Bound parameters, boxed for tokio-postgres.
pub(super) type Bound = Vec<Box<dyn ToSql + Sync + Send>>;

/// The statement's parameters as tokio-postgres takes them.
fn bind(offset: i64, params: &[Param]) -> Bound {
    let mut out: Vec<Box<dyn ToSql + Sync + Send>> = vec![Box::new(offset)];
    for p in params {
        out.push(match p {
            Param::Bytes(b) => Box::new(b.clone()),
            Param::Text(t) => Box::new(t.clone()),
            Param::Json(j) => Box::new(j.clone()),
        });
    }
    out
}

impl PostgresStore {
    /// Creates the index a query needs, in development (no policy: indexes
    /// appear on first use).
    async fn index_for(&self, q: &Query) -> StoreResult<()> {
        let Some(index) = q.needed_index().filter(|_| self.auto_index) else {
            return Ok(());
        };
        let name = index_name(&q.collection, &index);
        if self.indexed.contains(&name) {
            return Ok(());
        }
        let ddl = index_ddl(&self.tables.schema, &q.collection, &index, false)?;
        let c = self.pools.acquire().await?;
        let result = c.batch_execute(&ddl).await;
        c.release();
        match result {
            Ok(()) => {
                tracing::info!(collection = %q.collection, index = %index, "created an index on first use (no policy)");
            }
            // No table yet: nothing to index, nothing to find.
            Err(e) if super::error::is_missing_table(&e) => return Ok(()),
            Err(e) if super::error::is_create_race(&e) => {}
            Err(e) => return Err(self.pg(e)),
        }
        self.indexed.insert(name);
        Ok(())
    }

    /// The statement of a query (or, with `count`, of its count) and its
    /// parameters, once the index it needs exists.
    pub(super) async fn prepared(&self, q: &Query, count: bool) -> StoreResult<(String, Bound)> {
        self.index_for(q).await?;
        let table = self.tables.table(&q.collection)?;
        let columns = self.key_columns(q).await?;
        let (sql, params) = statement(&self.tables.schema, &columns, &table, q, count);
        Ok((sql, bind(self.clock.offset(), &params)))
    }

    /// The key columns a query may use: none when it names no field.
    async fn key_columns(&self, q: &Query) -> StoreResult<Arc<BTreeSet<String>>> {
        if q.fields().is_empty() {
            return Ok(Arc::default());
        }
        if let Some(columns) = self.keys.fresh(&q.collection) {
            return Ok(columns);
        }
        let c = self.pools.acquire().await?;
        let result = self
            .keys
            .load(&***c, &self.tables.schema, &q.collection)
            .await;
        c.release();
        result.map_err(|e| self.pg(e))
    }

    pub(super) async fn run_query(&self, q: &Query, budget: Budget) -> StoreResult<Page> {
        let (sql, params) = self.prepared(q, false).await?;
        let args: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p.as_ref() as _).collect();
        let mut page = PageBuilder::new(q.limit, budget);
        self.scan(&sql, &args, |row| {
            Ok(page.push(self.document(&q.collection, &row)?))
        })
        .await?;
        Ok(page.finish())
    }

    pub(super) async fn run_count(&self, q: &Query) -> StoreResult<u64> {
        let (sql, params) = self.prepared(q, true).await?;
        let args: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p.as_ref() as _).collect();
        let rows = self.select(&sql, &args).await?;
        Ok(rows.first().map_or(0, |r| r.get::<_, i64>(0)) as u64)
    }
}
