//! Key columns: how declared query indexes serve a role under row-level
//! security. PostgreSQL evaluates a scoped role's own conditions only after
//! its policy unless they are LEAKPROOF, and `docsidecar_key(data #> path)`
//! is not (PL/pgSQL over jsonb operators): an expression index on it would
//! serve such a role by its scope alone. So `migrate` gives every field of a
//! declared index a `bytea` key column, kept by a trigger, and indexes those
//! columns: bytea comparisons are leakproof, so the planner puts them into
//! the index scan for every role.
//!
//! `migrate` builds online: the columns and the trigger in its transaction
//! (brief locks), then the backfill in small batches, then
//! `CREATE INDEX CONCURRENTLY`. `_indexes` records which service declared each
//! index; `_keys` the key columns and whether they are filled. An index no
//! service declares any more is dropped; its key columns stay, kept by the
//! trigger, so declaring it again needs no backfill.
//!
//! A sidecar uses a key column once a valid index holds it (the index is
//! built after the backfill), learnt from the catalog and refreshed every
//! [`REFRESH`]; until then a query spells the key expression, which gives the
//! same answers.

use super::ddl::{object_name, qualified_table, quote_ident};
use super::migrate::pg_error;
use super::queries::{key_list, path_array};
use crate::store::query::{Field, Index};
use crate::store::{FieldPath, StoreResult};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_postgres::Client;
use tokio_postgres::GenericClient;
use tracing::info;

/// How long a sidecar trusts what it read of a table's key columns.
pub(super) const REFRESH: Duration = Duration::from_secs(30);

/// Rows per backfill statement: short row locks, a short transaction.
const BATCH: i64 = 2000;

fn fnv(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The key column of a field path: `k$` and a hash of the path (the column's
/// comment names the path).
pub(super) fn key_column(path: &FieldPath) -> String {
    let json = serde_json::to_string(path.segments()).unwrap_or_default();
    format!("k${:012x}", fnv(&json) >> 16)
}

/// The name (unquoted) of a declared index: `collection$k…`, one per shape.
pub(super) fn index_name(collection: &str, index: &Index) -> String {
    let name = object_name(
        collection,
        &format!("k{:012x}", fnv(&index.to_string()) >> 16),
    );
    name.trim_matches('"').to_string()
}

/// Whether an index name is one of docsidecar's query indexes of a collection:
/// key-column indexes (`k…`) and development's expression indexes (`q…`).
fn is_query_index(collection: &str, name: &str) -> bool {
    let Some(suffix) = name.len().checked_sub(13).and_then(|at| name.get(at..)) else {
        return false;
    };
    (suffix.starts_with('k') || suffix.starts_with('q'))
        && suffix[1..].bytes().all(|b| b.is_ascii_hexdigit())
        && object_name(collection, suffix).trim_matches('"') == name
}

fn paths(index: &Index) -> impl Iterator<Item = &FieldPath> {
    index.fields.iter().filter_map(|o| match &o.field {
        Field::Path(p) => Some(p),
        Field::Id => None,
    })
}

/// The records' tables, created by `migrate` (the runtime role reads neither).
pub(super) fn records_ddl(schema: &str) -> String {
    let s = quote_ident(schema);
    format!(
        "CREATE TABLE IF NOT EXISTS {s}._indexes (
            service    text NOT NULL,
            collection text NOT NULL,
            name       text NOT NULL,
            declared   text NOT NULL,
            fields     jsonb NOT NULL,
            PRIMARY KEY (service, collection, name));
        CREATE TABLE IF NOT EXISTS {s}._keys (
            collection  text NOT NULL,
            column_name text NOT NULL,
            path        jsonb NOT NULL,
            filled      boolean NOT NULL DEFAULT false,
            PRIMARY KEY (collection, column_name));"
    )
}

/// An index as `_indexes` keeps it: each field's path and direction.
fn fields_json(index: &Index) -> serde_json::Value {
    index
        .fields
        .iter()
        .filter_map(|o| match &o.field {
            Field::Path(p) => Some(serde_json::json!([p.segments(), o.descending])),
            Field::Id => None,
        })
        .collect()
}

fn index_of(fields: &serde_json::Value) -> Option<Index> {
    let fields = fields
        .as_array()?
        .iter()
        .map(|f| {
            let segments: Vec<String> = serde_json::from_value(f.get(0)?.clone()).ok()?;
            Some(crate::store::query::Order {
                field: Field::Path(FieldPath::from_segments(&segments)),
                descending: f.get(1)?.as_bool()?,
            })
        })
        .collect::<Option<Vec<_>>>()?;
    (!fields.is_empty()).then_some(Index { fields })
}

/// Inside `migrate`'s transaction: records this service's indexes (replacing
/// what it declared before), adds the key columns every recorded index needs
/// to its collection's table, and (re)writes each such table's trigger.
/// Returns what every service declares, by collection, for [`build`].
pub(super) async fn record(
    tx: &tokio_postgres::Transaction<'_>,
    schema: &str,
    service: &str,
    indexes: &BTreeMap<String, Vec<Index>>,
) -> StoreResult<BTreeMap<String, BTreeMap<String, Index>>> {
    tx.batch_execute(&records_ddl(schema))
        .await
        .map_err(|e| pg_error("creating the index records", e))?;
    let s = quote_ident(schema);
    tx.execute(
        &format!("DELETE FROM {s}._indexes WHERE service = $1"),
        &[&service],
    )
    .await
    .map_err(|e| pg_error("recording the declared indexes", e))?;
    for (collection, list) in indexes {
        for index in list {
            tx.execute(
                &format!("INSERT INTO {s}._indexes (service, collection, name, declared, fields) VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING"),
                &[&service, collection, &index_name(collection, index), &index.to_string(), &fields_json(index)],
            )
            .await
            .map_err(|e| pg_error("recording the declared indexes", e))?;
        }
    }
    let mut wanted: BTreeMap<String, BTreeMap<String, Index>> = BTreeMap::new();
    for row in tx
        .query(
            &format!("SELECT collection, name, fields FROM {s}._indexes"),
            &[],
        )
        .await
        .map_err(|e| pg_error("reading the declared indexes", e))?
    {
        let (collection, name): (String, String) = (row.get(0), row.get(1));
        if let Some(index) = index_of(&row.get(2)) {
            if crate::store::is_valid_name(&collection) {
                wanted.entry(collection).or_default().insert(name, index);
            }
        }
    }
    for (collection, list) in &wanted {
        let table = qualified_table(schema, collection)?;
        if !table_exists(tx, &table).await? {
            continue;
        }
        let needed: BTreeSet<&FieldPath> = list.values().flat_map(paths).collect();
        let mut added = false;
        for path in needed {
            let column = key_column(path);
            let json = serde_json::to_value(path.segments()).unwrap_or_default();
            let new = tx
                .execute(
                    &format!("INSERT INTO {s}._keys (collection, column_name, path) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING"),
                    &[collection, &column, &json],
                )
                .await
                .map_err(|e| pg_error("recording a key column", e))?;
            if new == 1 {
                let col = quote_ident(&column);
                let comment = format!("docsidecar query key of {path}").replace('\'', "''");
                tx.batch_execute(&format!(
                    "ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {col} bytea;
                     COMMENT ON COLUMN {table}.{col} IS '{comment}'"
                ))
                .await
                .map_err(|e| {
                    pg_error(
                        &format!("adding the key column of `{path}` to `{collection}`"),
                        e,
                    )
                })?;
                info!(collection, field = %path, column, "added a query key column");
                added = true;
            }
        }
        if added {
            write_trigger(tx, schema, collection).await?;
        }
    }
    Ok(wanted)
}

async fn table_exists(c: &impl GenericClient, table: &str) -> StoreResult<bool> {
    Ok(c.query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
        .await
        .map_err(|e| pg_error("looking up a table", e))?
        .get(0))
}

/// The trigger that keeps every key column of a collection's table.
async fn write_trigger(
    tx: &tokio_postgres::Transaction<'_>,
    schema: &str,
    collection: &str,
) -> StoreResult<()> {
    let s = quote_ident(schema);
    let table = qualified_table(schema, collection)?;
    let rows = tx
        .query(
            &format!(
                "SELECT column_name, path FROM {s}._keys WHERE collection = $1 ORDER BY column_name"
            ),
            &[&collection],
        )
        .await
        .map_err(|e| pg_error("reading the key columns", e))?;
    let mut sets = String::new();
    for row in rows {
        let segments: Vec<String> = serde_json::from_value(row.get(1)).unwrap_or_default();
        let path = FieldPath::from_segments(&segments);
        sets.push_str(&format!(
            "NEW.{} := {s}.docsidecar_key(NEW.data #> {});\n",
            quote_ident(&row.get::<_, String>(0)),
            path_array(&path)
        ));
    }
    let function = format!("{s}.{}", object_name(collection, "keys"));
    let trigger = object_name(collection, "keys");
    tx.batch_execute(&format!(
        "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
{sets}RETURN NEW;
END
$fn$;
DROP TRIGGER IF EXISTS {trigger} ON {table};
CREATE TRIGGER {trigger} BEFORE INSERT OR UPDATE OF data ON {table}
    FOR EACH ROW EXECUTE FUNCTION {function}();"
    ))
    .await
    .map_err(|e| pg_error(&format!("writing the key trigger of `{collection}`"), e))
}

/// After `migrate`'s transaction: fills new key columns in batches, builds
/// the wanted indexes CONCURRENTLY (rebuilding one a failed run left
/// invalid), and drops the query indexes no service declares. Serialized
/// across concurrent runs by a session advisory lock.
pub(super) async fn build(
    client: &Client,
    schema: &str,
    wanted: &BTreeMap<String, BTreeMap<String, Index>>,
) -> StoreResult<()> {
    client
        .execute(
            "SELECT pg_advisory_lock(hashtext('docsidecar indexes ' || $1::text))",
            &[&schema],
        )
        .await
        .map_err(|e| pg_error("taking the index lock", e))?;
    let result = build_locked(client, schema, wanted).await;
    let _ = client
        .execute(
            "SELECT pg_advisory_unlock(hashtext('docsidecar indexes ' || $1::text))",
            &[&schema],
        )
        .await;
    result
}

async fn build_locked(
    client: &Client,
    schema: &str,
    wanted: &BTreeMap<String, BTreeMap<String, Index>>,
) -> StoreResult<()> {
    let s = quote_ident(schema);
    let unfilled = client
        .query(
            &format!("SELECT collection, array_agg(column_name) FROM {s}._keys WHERE NOT filled GROUP BY collection"),
            &[],
        )
        .await
        .map_err(|e| pg_error("reading the key columns", e))?;
    for row in unfilled {
        // Only the columns the trigger already kept when the backfill began:
        // one another run adds meanwhile is filled by that run.
        let (collection, columns): (String, Vec<String>) = (row.get(0), row.get(1));
        let rows = backfill(client, schema, &collection).await?;
        client
            .execute(
                &format!("UPDATE {s}._keys SET filled = true WHERE collection = $1 AND column_name = ANY($2)"),
                &[&collection, &columns],
            )
            .await
            .map_err(|e| pg_error("recording a filled key column", e))?;
        info!(collection, rows, "filled the query key columns");
    }
    let existing = client
        .query(
            "SELECT c.relname, t.relname, i.indisvalid FROM pg_catalog.pg_index i
             JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid
             JOIN pg_catalog.pg_class t ON t.oid = i.indrelid
             JOIN pg_catalog.pg_namespace n ON n.oid = t.relnamespace
             WHERE n.nspname = $1",
            &[&schema],
        )
        .await
        .map_err(|e| pg_error("listing the indexes", e))?;
    let existing: HashMap<String, (String, bool)> = existing
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    for (collection, list) in wanted {
        let table = qualified_table(schema, collection)?;
        for (name, index) in list {
            let quoted = format!("{s}.{}", quote_ident(name));
            match existing.get(name) {
                Some((_, true)) => continue,
                Some((_, false)) => {
                    // A build a failed run left behind: start it again.
                    client
                        .batch_execute(&format!("DROP INDEX CONCURRENTLY IF EXISTS {quoted}"))
                        .await
                        .map_err(|e| pg_error(&format!("dropping invalid index {name}"), e))?;
                }
                None => {}
            }
            if !table_exists(client, &table).await? {
                continue;
            }
            let started = Instant::now();
            client
                .batch_execute(&index_ddl(&table, name, index))
                .await
                .map_err(|e| pg_error(&format!("building index {index} of `{collection}`"), e))?;
            info!(collection, index = %index, name, took = ?started.elapsed(), "built a query index");
        }
    }
    for (name, (table, _)) in &existing {
        let declared = wanted.get(table).is_some_and(|l| l.contains_key(name));
        if !declared && is_query_index(table, name) {
            client
                .batch_execute(&format!(
                    "DROP INDEX CONCURRENTLY IF EXISTS {s}.{}",
                    quote_ident(name)
                ))
                .await
                .map_err(|e| pg_error(&format!("dropping index {name}"), e))?;
            info!(collection = %table, name, "dropped a query index no service declares");
        }
    }
    Ok(())
}

/// `CREATE INDEX CONCURRENTLY` of a declared index on key columns: by scope
/// (scoped collections' policies compare it), the keys in the declared
/// directions, then id.
fn index_ddl(table: &str, name: &str, index: &Index) -> String {
    format!(
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS {} ON {table} (scope, {}, id)",
        quote_ident(name),
        key_list(index, |p| quote_ident(&key_column(p)))
    )
}

/// Fills a table's key columns by rewriting each row's data to itself (the
/// trigger computes them), `BATCH` rows per transaction in key order. Under
/// forced row-level security an owner that cannot bypass it sees no rows:
/// each batch lifts the force within its own transaction.
async fn backfill(client: &Client, schema: &str, collection: &str) -> StoreResult<u64> {
    let table = qualified_table(schema, collection)?;
    let lift: bool = client
        .query_one(
            "SELECT c.relforcerowsecurity AND NOT (r.rolsuper OR r.rolbypassrls)
             FROM pg_catalog.pg_class c, pg_catalog.pg_roles r
             WHERE c.oid = to_regclass($1) AND r.rolname = current_user",
            &[&table],
        )
        .await
        .map_err(|e| pg_error("reading the row-level security state", e))?
        .get(0);
    let mut after: Option<(String, String)> = None;
    let mut total = 0;
    loop {
        let (from, mut args): (&str, Vec<&(dyn tokio_postgres::types::ToSql + Sync)>) = match &after
        {
            Some((scope, id)) => ("WHERE (scope, id) > ($1, $2)", vec![scope, id]),
            None => ("", vec![]),
        };
        let end = client
            .query_opt(
                &format!(
                    "SELECT scope, id FROM {table} {from} ORDER BY scope, id OFFSET {} LIMIT 1",
                    BATCH - 1
                ),
                &args,
            )
            .await
            .map_err(|e| pg_error("backfilling the key columns", e))?
            .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)));
        let mut conditions: Vec<String> = Vec::new();
        if after.is_some() {
            conditions.push("(scope, id) > ($1, $2)".into());
        }
        if let Some((scope, id)) = &end {
            let n = args.len();
            conditions.push(format!("(scope, id) <= (${}, ${})", n + 1, n + 2));
            args.push(scope);
            args.push(id);
        }
        let filter = if conditions.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", conditions.join(" AND "))
        };
        let update = format!("UPDATE {table} SET data = data {filter}");
        total += if lift {
            run_lifted(client, &table, &update, &args).await?
        } else {
            client
                .execute(&update, &args)
                .await
                .map_err(|e| pg_error("backfilling the key columns", e))?
        };
        match end {
            Some(end) => after = Some(end),
            None => break,
        }
    }
    Ok(total)
}

async fn run_lifted(
    client: &Client,
    table: &str,
    update: &str,
    args: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> StoreResult<u64> {
    let fail = |e| pg_error("backfilling the key columns", e);
    client.batch_execute("BEGIN").await.map_err(fail)?;
    let result = async {
        client
            .batch_execute(&format!("ALTER TABLE {table} NO FORCE ROW LEVEL SECURITY"))
            .await?;
        let n = client.execute(update, args).await?;
        client
            .batch_execute(&format!(
                "ALTER TABLE {table} FORCE ROW LEVEL SECURITY; COMMIT"
            ))
            .await?;
        Ok::<u64, tokio_postgres::Error>(n)
    }
    .await;
    if result.is_err() {
        let _ = client.batch_execute("ROLLBACK").await;
    }
    result.map_err(fail)
}

/// What a sidecar knows of each table's usable key columns.
/// A table's usable key columns, and when they were read.
type Known = (Instant, Arc<BTreeSet<String>>);

#[derive(Debug, Default)]
pub(super) struct KeyColumns {
    known: Mutex<HashMap<String, Known>>,
}

impl KeyColumns {
    /// The columns of `collection` it knows, unless older than [`REFRESH`].
    pub(super) fn fresh(&self, collection: &str) -> Option<Arc<BTreeSet<String>>> {
        let known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        known
            .get(collection)
            .filter(|(at, _)| at.elapsed() < REFRESH)
            .map(|(_, columns)| columns.clone())
    }

    /// Reads the key columns of a table that a valid index holds.
    pub(super) async fn load(
        &self,
        client: &impl GenericClient,
        schema: &str,
        collection: &str,
    ) -> Result<Arc<BTreeSet<String>>, tokio_postgres::Error> {
        let table = qualified_table(schema, collection).unwrap_or_default();
        let rows = client
            .query(
                "SELECT DISTINCT a.attname::text FROM pg_catalog.pg_index i
                 JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
                 WHERE i.indrelid = to_regclass($1) AND i.indisvalid AND i.indisready
                   AND a.attname LIKE 'k$%'",
                &[&table],
            )
            .await?;
        let columns: Arc<BTreeSet<String>> = Arc::new(rows.iter().map(|r| r.get(0)).collect());
        self.known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(collection.to_string(), (Instant::now(), columns.clone()));
        Ok(columns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_stable_and_recognised() {
        let index = Index::parse(&["customer.id".into(), "at desc".into()]).unwrap();
        let name = index_name("orders", &index);
        assert!(name.starts_with("orders$k") && name.len() == "orders$".len() + 13);
        assert!(is_query_index("orders", &name));
        assert!(!is_query_index("orders", "orders$expiry"));
        assert!(!is_query_index("order", &name));
        let path = FieldPath::parse("customer.id").unwrap();
        assert_eq!(key_column(&path), key_column(&path));
        assert!(key_column(&path).starts_with("k$"));
        assert_eq!(index_of(&fields_json(&index)), Some(index));
    }
}
