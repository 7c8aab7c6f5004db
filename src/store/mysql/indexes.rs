//! Query indexes on MySQL/MariaDB: the generated key columns of each indexed
//! field (see `keys`) and an index `(scope, k, n, …, id)` per declared shape,
//! added with online DDL (`ALGORITHM=INPLACE, LOCK=NONE`: writes go on).
//!
//! `migrate` records each service's declared indexes in `_indexes` (that
//! service's rows replaced on each of its runs), creates the indexes any
//! service declares, and drops ours (`q…`) that none declares any more.
//! Generated columns stay: they are `VIRTUAL` (no storage), and the scope
//! views select them. Without a policy (development) a query's index is
//! created on first use.

use super::error::OpError;
use super::keys::{
    column_ddl, columns, index_columns, index_name, is_index_name, pushable, MAX_INDEX_FIELDS,
};
use super::pool::Conn;
use crate::store::query::{Field, Index};
use crate::store::{is_valid_name, MigratePlan};
use mysql_async::prelude::*;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// "ALGORITHM=… is not supported" (MySQL and MariaDB).
const ALTER_NOT_SUPPORTED: u16 = 1845;
const ALTER_NOT_SUPPORTED_REASON: u16 = 1846;
const DUP_FIELDNAME: u16 = 1060;
const DUP_KEYNAME: u16 = 1061;
const CANT_DROP_FIELD_OR_KEY: u16 = 1091;

pub(super) const INDEXES_DDL: &str = "CREATE TABLE IF NOT EXISTS `_indexes` (
        service    VARBINARY(200) NOT NULL,
        collection VARBINARY(64) NOT NULL,
        name       VARBINARY(64) NOT NULL,
        fields     VARBINARY(4000) NOT NULL,
        PRIMARY KEY (service, collection, name)
    ) ENGINE=InnoDB";

/// Runs an `ALTER TABLE … <change>` online, or, where the server cannot
/// do that change online, as it can (with a warning).
async fn alter(conn: &mut mysql_async::Conn, table: &str, change: &str) -> Result<(), OpError> {
    let online = format!("ALTER TABLE {table} {change}, ALGORITHM=INPLACE, LOCK=NONE");
    match conn.query_drop(online).await {
        Err(mysql_async::Error::Server(s))
            if s.code == ALTER_NOT_SUPPORTED || s.code == ALTER_NOT_SUPPORTED_REASON =>
        {
            warn!(table, change, reason = %s.message, "this change cannot be made online here: writes to the table wait while it runs");
            Ok(conn
                .query_drop(format!("ALTER TABLE {table} {change}"))
                .await?)
        }
        other => Ok(other?),
    }
}

/// The columns of a table or view (as this account sees them).
pub(super) async fn relation_columns(
    conn: &mut mysql_async::Conn,
    relation: &str,
) -> Result<BTreeSet<String>, OpError> {
    let names: Vec<Vec<u8>> = conn
        .exec(
            "SELECT COLUMN_NAME FROM information_schema.COLUMNS
             WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?",
            (relation.trim_matches('`'),),
        )
        .await?;
    Ok(names
        .into_iter()
        .filter_map(|n| String::from_utf8(n).ok())
        .collect())
}

/// Our indexes on each table: table → index names.
async fn existing(
    conn: &mut mysql_async::Conn,
) -> Result<BTreeMap<String, BTreeSet<String>>, OpError> {
    let rows: Vec<(Vec<u8>, Vec<u8>)> = conn
        .query(
            "SELECT TABLE_NAME, INDEX_NAME FROM information_schema.STATISTICS
             WHERE TABLE_SCHEMA = DATABASE() AND SEQ_IN_INDEX = 1",
        )
        .await?;
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (table, index) in rows {
        let (Ok(table), Ok(index)) = (String::from_utf8(table), String::from_utf8(index)) else {
            continue;
        };
        if is_valid_name(&table) && is_index_name(&index) {
            out.entry(table).or_default().insert(index);
        }
    }
    Ok(out)
}

/// Creates `index` on `collection`'s table: the missing key columns, then
/// the index. False when a path cannot be indexed here (see
/// [`pushable`]).
pub(super) async fn create(
    conn: &mut mysql_async::Conn,
    collection: &str,
    index: &Index,
) -> Result<bool, OpError> {
    let Some(list) = index_columns(index) else {
        return Ok(false);
    };
    let table = super::ddl::table(collection)?;
    let have = relation_columns(conn, collection).await?;
    let mut added = Vec::new();
    for o in &index.fields {
        let Field::Path(path) = &o.field else {
            continue;
        };
        let names = columns(path);
        if !pushable(path) {
            return Ok(false);
        }
        for (name, ddl) in names.iter().zip(column_ddl(path)) {
            if !have.contains(name) && !added.contains(name) {
                match alter(conn, &table, &ddl).await {
                    Err(e) if e.code() == Some(DUP_FIELDNAME) => {}
                    other => other?,
                }
                added.push(name.clone());
            }
        }
    }
    let name = index_name(index);
    match alter(conn, &table, &format!("ADD INDEX `{name}` ({list})")).await {
        Err(e) if e.code() == Some(DUP_KEYNAME) => {}
        other => other?,
    }
    Ok(true)
}

/// The fields of a declared index as recorded: the policy's spelling.
fn fields_text(index: &Index) -> String {
    let fields: Vec<String> = index
        .fields
        .iter()
        .map(|o| format!("{}{}", o.field, if o.descending { " desc" } else { "" }))
        .collect();
    serde_json::to_string(&fields).unwrap_or_default()
}

fn parse_fields(text: &[u8]) -> Option<Index> {
    let fields: Vec<String> = serde_json::from_slice(text).ok()?;
    Index::parse(&fields).ok()
}

/// One recorded declaration: service, collection, index name, fields.
type Recorded = (String, String, String, Vec<u8>);

/// Records this service's indexes, then makes every table's indexes those
/// some service declares: see the module's documentation.
pub(super) async fn converge(c: &mut Conn, plan: &MigratePlan) -> Result<(), OpError> {
    let conn = c.conn();
    conn.query_drop(INDEXES_DDL).await?;
    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
    let recorded: Vec<Recorded> = conn
        .query::<(Vec<u8>, Vec<u8>, Vec<u8>, Vec<u8>), _>(
            "SELECT service, collection, name, fields FROM `_indexes`",
        )
        .await?
        .into_iter()
        .map(|(s, c, n, f)| (text(s), text(c), text(n), f))
        .collect();
    let ours: BTreeSet<Recorded> = plan
        .indexes
        .iter()
        .filter(|(collection, _)| is_valid_name(collection))
        .flat_map(|(collection, indexes)| {
            indexes.iter().map(|i| {
                (
                    plan.service.clone(),
                    collection.clone(),
                    index_name(i),
                    fields_text(i).into_bytes(),
                )
            })
        })
        .collect();
    let before: BTreeSet<Recorded> = recorded
        .iter()
        .filter(|r| r.0 == plan.service)
        .cloned()
        .collect();
    if before != ours {
        conn.query_drop("START TRANSACTION").await?;
        conn.exec_drop(
            "DELETE FROM `_indexes` WHERE service = ?",
            (plan.service.as_bytes(),),
        )
        .await?;
        for (service, collection, name, fields) in &ours {
            conn.exec_drop(
                "INSERT INTO `_indexes` (service, collection, name, fields) VALUES (?, ?, ?, ?)",
                (
                    service.as_bytes(),
                    collection.as_bytes(),
                    name.as_bytes(),
                    fields,
                ),
            )
            .await?;
        }
        conn.query_drop("COMMIT").await?;
        info!(service = %plan.service, indexes = ours.len(), "recorded the indexes of service `{}`", plan.service);
    }
    // (collection, name) → (index, the services declaring it).
    let mut wanted: BTreeMap<(String, String), (Index, Vec<String>)> = BTreeMap::new();
    let others = recorded.into_iter().filter(|r| r.0 != plan.service);
    for (service, collection, name, fields) in others.chain(ours) {
        let Some(index) = parse_fields(&fields) else {
            warn!(service = %service, collection = %collection, "a recorded index of `{collection}` cannot be read: ignored");
            continue;
        };
        let entry = wanted
            .entry((collection, name))
            .or_insert_with(|| (index, Vec::new()));
        entry.1.push(service);
    }
    let mut present = existing(conn).await?;
    let tables: BTreeSet<String> = conn
        .query::<Vec<u8>, _>("SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() AND TABLE_TYPE = 'BASE TABLE'")
        .await?
        .into_iter()
        .filter_map(|n| String::from_utf8(n).ok())
        .collect();
    for ((collection, name), (index, services)) in &wanted {
        if !tables.contains(collection) || present.get(collection).is_some_and(|p| p.contains(name))
        {
            continue;
        }
        let started = Instant::now();
        if create(conn, collection, index).await? {
            info!(collection = %collection, index = %name, fields = %index, services = ?services, took = ?started.elapsed(), "created index {name} {index} on `{collection}`");
        } else {
            warn!(collection = %collection, fields = %index, "index {index} of `{collection}` cannot be made on MySQL/MariaDB (field keys of ASCII letters, digits, `_` and `-` only, at most {MAX_INDEX_FIELDS} fields): its queries scan");
        }
    }
    for (table, names) in &mut present {
        for name in names.iter() {
            if wanted.contains_key(&(table.clone(), name.clone())) {
                continue;
            }
            let dropped = alter(conn, &format!("`{table}`"), &format!("DROP INDEX `{name}`")).await;
            match dropped {
                Err(e) if e.code() == Some(CANT_DROP_FIELD_OR_KEY) => {}
                other => other?,
            }
            info!(collection = %table, index = %name, "dropped index {name} of `{table}`: no service declares it any more");
        }
    }
    Ok(())
}

/// The columns of each relation, as last looked up (they change only when
/// `migrate` or a first use adds some).
#[derive(Default)]
pub(super) struct ColumnCache(Mutex<HashMap<String, Looked>>);

/// When a relation's columns were looked up, and what they were.
type Looked = (Instant, Arc<BTreeSet<String>>);

/// How long a relation's columns are trusted before they are looked up again.
const COLUMNS_FOR: Duration = Duration::from_secs(30);

impl ColumnCache {
    pub(super) fn get(&self, relation: &str) -> Option<Arc<BTreeSet<String>>> {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.get(relation)
            .filter(|(at, _)| at.elapsed() < COLUMNS_FOR)
            .map(|(_, c)| c.clone())
    }

    pub(super) fn set(&self, relation: &str, columns: Arc<BTreeSet<String>>) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.insert(relation.to_string(), (Instant::now(), columns));
    }

    pub(super) fn forget(&self, relation: &str) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.remove(relation);
    }
}
