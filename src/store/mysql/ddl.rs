//! Tables and DDL: one table per collection in docsidecar's database, the
//! `_collections` catalog and the `_migrations` schema version, created on
//! first write in development (auto_create) or by `docsidecar migrate`.
//!
//! Names starting with `_` can never be collections (see
//! [`crate::store::NAME_PATTERN`]), so docsidecar's own tables never collide
//! with one. Every table has a primary key (Galera replicates by it).

use super::error::{code, OpError};
use crate::store::{is_valid_name, StoreError, StoreResult, NAME_RULE};
use mysql_async::prelude::*;
use mysql_async::Conn;
use std::collections::HashSet;
use std::sync::RwLock;

/// The docsidecar schema version this release writes and needs; recorded in
/// `_migrations` (see `migrate`).
pub(super) const SCHEMA_VERSION: i32 = 2;

/// Every version, for `_migrations`.
pub(super) const SCHEMA_CHANGES: &[(i32, &str)] = &[
    (
        1,
        "collections keyed by (scope, id) with expiry; catalog and migration history",
    ),
    (2, "the change feed"),
];

/// docsidecar's own tables: the catalog of collections and the schema
/// version (both readable by the runtime account), and migrate's lease.
pub(super) const CATALOG_DDL: [&str; 2] = [
    "CREATE TABLE IF NOT EXISTS `_collections` (
        name        VARBINARY(64) NOT NULL PRIMARY KEY,
        create_time BIGINT NOT NULL
    ) ENGINE=InnoDB",
    "CREATE TABLE IF NOT EXISTS `_migrations` (
        version     INT NOT NULL PRIMARY KEY,
        description VARCHAR(200) NOT NULL,
        applied_at  BIGINT NOT NULL
    ) ENGINE=InnoDB",
];

/// The quoted table of a collection. The name is checked against the name
/// rule first: it is the only text spliced into SQL.
pub(super) fn table(collection: &str) -> StoreResult<String> {
    if !is_valid_name(collection) {
        return Err(StoreError::Internal(format!(
            "collection name {collection:?} reached the MySQL store unvalidated: collection {NAME_RULE}"
        )));
    }
    Ok(format!("`{collection}`"))
}

/// Database names we quote ourselves: a plain alphabet, at most 64 bytes.
pub fn is_valid_database(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b == b'-')
}

/// The DDL of a collection's table; `docsidecar migrate` uses it too.
/// `mariadb`: the column type `JSON` is MariaDB's `LONGTEXT` with a
/// `JSON_VALID` check, which keeps the text as written; MySQL's `JSON` would
/// reprint it (numbers, key order), so there the same column is spelled out.
pub(super) fn table_ddl(collection: &str, mariadb: bool) -> StoreResult<String> {
    let table = table(collection)?;
    let data = if mariadb {
        "JSON NOT NULL"
    } else {
        "LONGTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL CHECK (JSON_VALID(data))"
    };
    // VARBINARY: ids and scopes compare and sort as bytes. Keyed by
    // (scope, id): each row scope has its own id space; unscoped
    // collections keep scope ''. The expiry index serves the reaper.
    Ok(format!(
        "CREATE TABLE IF NOT EXISTS {table} (
            scope       VARBINARY(512) NOT NULL DEFAULT '',
            id          VARBINARY(512) NOT NULL,
            rev         VARBINARY(64) NOT NULL,
            data        {data},
            create_time BIGINT NOT NULL,
            update_time BIGINT NOT NULL,
            expire_time BIGINT NULL,
            PRIMARY KEY (scope, id),
            KEY expire_time (expire_time)
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"
    ))
}

/// Records every version after `current` in `_migrations`.
pub(super) async fn record_versions(conn: &mut Conn, current: i32) -> Result<(), OpError> {
    for (version, description) in SCHEMA_CHANGES.iter().filter(|m| m.0 > current) {
        conn.exec_drop(
            "INSERT IGNORE INTO `_migrations` (version, description, applied_at)
             VALUES (?, ?, TIMESTAMPDIFF(MICROSECOND, '1970-01-01', UTC_TIMESTAMP(6)))",
            (version, description),
        )
        .await?;
        tracing::info!(version, description, "applied MySQL/MariaDB migration");
    }
    Ok(())
}

/// The collections' tables of one database, and what is known of them so
/// that writes need no catalog lookup.
pub(super) struct Tables {
    /// Validated by [`is_valid_database`].
    pub(super) database: String,
    /// Collections whose tables exist.
    known: RwLock<HashSet<String>>,
    /// Collections recorded in the catalog.
    cataloged: RwLock<HashSet<String>>,
}

fn has(set: &RwLock<HashSet<String>>, name: &str) -> bool {
    set.read().unwrap_or_else(|e| e.into_inner()).contains(name)
}

fn add<'a>(set: &RwLock<HashSet<String>>, names: impl IntoIterator<Item = &'a str>) {
    let mut set = set.write().unwrap_or_else(|e| e.into_inner());
    set.extend(names.into_iter().map(str::to_string));
}

impl Tables {
    pub(super) fn new(database: &str) -> StoreResult<Tables> {
        if !is_valid_database(database) {
            return Err(StoreError::Internal(format!(
                "MySQL database name {database:?} is invalid: use ASCII letters, digits, `_`, `$` and `-`, at most 64"
            )));
        }
        Ok(Tables {
            database: database.to_string(),
            known: RwLock::default(),
            cataloged: RwLock::default(),
        })
    }

    pub(super) fn known(&self, collection: &str) -> bool {
        has(&self.known, collection)
    }

    pub(super) fn remember<'a>(&self, collections: impl IntoIterator<Item = &'a str>) {
        add(&self.known, collections);
    }

    pub(super) fn forget<'a>(&self, collections: impl IntoIterator<Item = &'a str>) {
        let mut known = self.known.write().unwrap_or_else(|e| e.into_inner());
        for collection in collections {
            known.remove(collection);
        }
    }

    pub(super) fn cataloged(&self, collection: &str) -> bool {
        has(&self.cataloged, collection)
    }

    pub(super) fn remember_cataloged<'a>(&self, collections: impl IntoIterator<Item = &'a str>) {
        add(&self.cataloged, collections);
    }

    /// A write to a collection without a table while tables are not created here.
    pub(super) fn no_table(&self, collection: &str) -> StoreError {
        StoreError::table_missing(format!(
            "collection `{collection}` has no table in database `{}` and this sidecar does not create tables (auto_create = false): declare it in the policy and run `docsidecar migrate`",
            self.database
        ))
    }

    /// Which of `collections` have a table (seen by this account as the
    /// table, or as a view of a scope: `<collection>$…`).
    pub(super) async fn existing(
        &self,
        conn: &mut Conn,
        collections: &[&str],
    ) -> Result<HashSet<String>, OpError> {
        let mut found = HashSet::new();
        for collection in collections {
            let names: Vec<Vec<u8>> = conn
                .exec(
                    "SELECT TABLE_NAME FROM information_schema.TABLES
                     WHERE TABLE_SCHEMA = DATABASE()
                       AND SUBSTRING_INDEX(TABLE_NAME, '$', 1) = ?",
                    (collection,),
                )
                .await?;
            let named = |n: &Vec<u8>| n.split(|&b| b == b'$').next() == Some(collection.as_bytes());
            if names.iter().any(named) {
                found.insert(collection.to_string());
            }
        }
        Ok(found)
    }

    /// Creates a collection's table (outside any transaction: DDL commits).
    pub(super) async fn create(
        &self,
        conn: &mut Conn,
        collection: &str,
        mariadb: bool,
    ) -> Result<(), OpError> {
        match conn.query_drop(table_ddl(collection, mariadb)?).await {
            Ok(()) => {
                tracing::info!(database = %self.database, collection, "created the table of a new collection");
                Ok(())
            }
            Err(e) if matches!(&e, mysql_async::Error::Server(s) if s.code == code::TABLE_ACCESS_DENIED || s.code == code::DB_ACCESS_DENIED) => {
                Err(StoreError::PermissionDenied(format!(
                    "collection `{collection}` has no table and the database account may not create one in `{}`: run `docsidecar migrate` ({})",
                    self.database,
                    super::error::describe(&e)
                ))
                .into())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The schema version recorded in `_migrations`; `None` when there is no
    /// such table (nothing was ever migrated).
    pub(super) async fn version(&self, conn: &mut Conn) -> Result<Option<i32>, OpError> {
        match conn
            .query_first::<i32, _>("SELECT COALESCE(MAX(version), 0) FROM `_migrations`")
            .await
        {
            Ok(v) => Ok(Some(v.unwrap_or(0))),
            Err(mysql_async::Error::Server(s)) if s.code == code::NO_SUCH_TABLE => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The collections in the catalog (none without a catalog).
    pub(super) async fn collections(&self, conn: &mut Conn) -> Result<Vec<String>, OpError> {
        match conn
            .query::<Vec<u8>, _>("SELECT name FROM `_collections` ORDER BY name")
            .await
        {
            Ok(names) => Ok(names
                .into_iter()
                .filter_map(|n| String::from_utf8(n).ok())
                .filter(|n| is_valid_name(n))
                .collect()),
            Err(mysql_async::Error::Server(s)) if s.code == code::NO_SUCH_TABLE => Ok(Vec::new()),
            Err(e) => Err(e.into()),
        }
    }

    /// Creates the catalog and the migration history and records the
    /// versions: what `migrate` does first, done by a development sidecar
    /// that may create tables (auto_create).
    pub(super) async fn ensure_catalog(&self, conn: &mut Conn) -> Result<(), OpError> {
        for sql in CATALOG_DDL.iter().chain(&super::feed::FEED_DDL) {
            conn.query_drop(*sql).await?;
        }
        let current = self.version(conn).await?.unwrap_or(0);
        record_versions(conn, current).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_they_reach_sql() {
        assert_eq!(table("ok_name").unwrap(), "`ok_name`");
        for bad in ["", "A", "1a", "a-b", "a`b", "_collections", &"a".repeat(64)] {
            assert!(table(bad).is_err(), "{bad:?}");
        }
        assert!(table(&"a".repeat(63)).is_ok());
        for ok in ["docsidecar", "t_0191", "app-prod", "a$b"] {
            assert!(is_valid_database(ok), "{ok}");
        }
        for bad in ["", "a`b", "a b", "a;b", "é", &"d".repeat(65)] {
            assert!(!is_valid_database(bad), "{bad}");
        }
        assert!(table_ddl("c", true).unwrap().contains("JSON NOT NULL"));
        assert!(table_ddl("c", false).unwrap().contains("JSON_VALID(data)"));
    }
}
