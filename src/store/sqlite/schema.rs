//! The SQLite schema: versioned migrations, recorded in `schema_migrations`.

use crate::store::{now_micros, StoreError, StoreResult};
use rusqlite::{params, Connection, TransactionBehavior};

/// A versioned schema change; applied once, in order, recorded in `schema_migrations`.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: i64,
    pub description: &'static str,
    pub sql: &'static str,
}

/// The schema, oldest first. Append only: a released migration never changes.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        description: "collections and documents",
        sql: "
            CREATE TABLE collections (
                name        TEXT PRIMARY KEY,
                create_time INTEGER NOT NULL
            );
            CREATE TABLE documents (
                collection  TEXT NOT NULL REFERENCES collections (name),
                id          TEXT NOT NULL,
                rev         TEXT NOT NULL,
                data        TEXT NOT NULL,
                create_time INTEGER NOT NULL,
                update_time INTEGER NOT NULL,
                PRIMARY KEY (collection, id)
            );",
    },
    Migration {
        version: 2,
        description: "row scopes and expiry",
        // Keyed by (collection, scope, id): each scope has its own id space.
        // (collection, id, scope) serves multi-scope walks in (id, scope)
        // order; the partial index finds expired rows for the reaper without
        // touching the others. TEXT compares as bytes (BINARY), the order of
        // ids everywhere.
        sql: "
            CREATE TABLE documents_v2 (
                collection  TEXT NOT NULL REFERENCES collections (name),
                scope       TEXT NOT NULL,
                id          TEXT NOT NULL,
                rev         TEXT NOT NULL,
                data        TEXT NOT NULL,
                create_time INTEGER NOT NULL,
                update_time INTEGER NOT NULL,
                expire_time INTEGER,
                PRIMARY KEY (collection, scope, id)
            );
            INSERT INTO documents_v2 (collection, scope, id, rev, data, create_time, update_time)
                SELECT collection, '', id, rev, data, create_time, update_time FROM documents;
            DROP TABLE documents;
            ALTER TABLE documents_v2 RENAME TO documents;
            CREATE INDEX documents_by_id ON documents (collection, id, scope);
            CREATE INDEX documents_by_expiry ON documents (expire_time) WHERE expire_time IS NOT NULL;",
    },
    Migration {
        version: 3,
        description: "the change feed",
        // One writer at a time: AUTOINCREMENT positions follow commit order
        // and are never reused, even after pruning. `feed` holds the feed's
        // identity (tokens of another database are refused) and how far it
        // was pruned.
        sql: "
            CREATE TABLE changes (
                position    INTEGER PRIMARY KEY AUTOINCREMENT,
                collection  TEXT NOT NULL,
                scope       TEXT NOT NULL,
                id          TEXT NOT NULL,
                rev         TEXT NOT NULL,
                kind        INTEGER NOT NULL,
                data        TEXT,
                create_time INTEGER,
                update_time INTEGER,
                expire_time INTEGER,
                commit_time INTEGER NOT NULL
            );
            CREATE INDEX changes_by_time ON changes (commit_time);
            CREATE TABLE feed (
                one            INTEGER PRIMARY KEY CHECK (one = 1),
                feed_id        BLOB NOT NULL,
                pruned_through INTEGER NOT NULL
            );
            INSERT INTO feed VALUES (1, randomblob(16), 0);",
    },
];

/// Applies the migrations that `conn`'s database lacks, in one transaction.
/// A database newer than `migrations` is refused.
pub fn migrate(conn: &mut Connection, migrations: &[Migration]) -> StoreResult<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version     INTEGER PRIMARY KEY,
            description TEXT NOT NULL,
            applied_at  INTEGER NOT NULL
        )",
    )?;
    let current: i64 = tx.query_row(
        "SELECT coalesce(max(version), 0) FROM schema_migrations",
        [],
        |r| r.get(0),
    )?;
    let latest = migrations.last().map_or(0, |m| m.version);
    if current > latest {
        return Err(StoreError::Internal(format!(
            "the database schema is at version {current}, newer than this docsidecar supports ({latest}): run a newer docsidecar"
        )));
    }
    for m in migrations.iter().filter(|m| m.version > current) {
        tx.execute_batch(m.sql)?;
        tx.execute(
            "INSERT INTO schema_migrations (version, description, applied_at) VALUES (?1, ?2, ?3)",
            params![m.version, m.description, now_micros()],
        )?;
        tracing::info!(
            version = m.version,
            description = m.description,
            "applied SQLite migration"
        );
    }
    tx.commit()?;
    Ok(())
}
