//! The change feed on SQLite: the `changes` table, written in each write's
//! transaction (one writer, so AUTOINCREMENT positions follow commit order).

use super::SqliteStore;
use crate::store::changes::{ChangeRecord, Changes, ChangesOp, FeedBounds};
use crate::store::plan::{Change, ChangeKind};
use crate::store::{Document, Key, Micros, StoreResult};
use rusqlite::{params, Connection, OptionalExtension};

/// Records changes inside the writing transaction.
pub(super) fn record(
    tx: &Connection,
    changes: &[Change],
    commit_time: Micros,
) -> rusqlite::Result<()> {
    let mut stmt = tx.prepare_cached(
        "INSERT INTO changes (collection, scope, id, rev, kind, data, create_time, update_time, expire_time, commit_time)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )?;
    for c in changes {
        let doc = c.document.as_ref();
        stmt.execute(params![
            c.key.collection,
            c.key.scope,
            c.key.id,
            c.rev,
            c.kind.code(),
            doc.map(|d| &d.data),
            doc.map(|d| d.create_time),
            doc.map(|d| d.update_time),
            doc.and_then(|d| d.expire_time),
            commit_time
        ])?;
    }
    Ok(())
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ChangeRecord> {
    let key = Key {
        collection: r.get(1)?,
        scope: r.get(2)?,
        id: r.get(3)?,
    };
    let rev: String = r.get(4)?;
    let kind = ChangeKind::from_code(r.get(5)?).unwrap_or(ChangeKind::Saved);
    let data: Option<String> = r.get(6)?;
    let document = match data {
        Some(data) => Some(Document {
            key: key.clone(),
            rev: rev.clone(),
            data,
            create_time: r.get::<_, Option<i64>>(7)?.unwrap_or_default(),
            update_time: r.get::<_, Option<i64>>(8)?.unwrap_or_default(),
            expire_time: r.get(9)?,
        }),
        None => None,
    };
    Ok(ChangeRecord {
        position: r.get::<_, i64>(0)? as u64,
        kind,
        key,
        rev,
        document,
        commit_time: r.get(10)?,
    })
}

fn head(conn: &Connection) -> rusqlite::Result<u64> {
    // sqlite_sequence keeps the last AUTOINCREMENT value even when the rows are pruned.
    let last: Option<i64> = conn
        .query_row(
            "SELECT seq FROM sqlite_sequence WHERE name = 'changes'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    Ok(last.unwrap_or(0) as u64)
}

impl SqliteStore {
    pub(super) async fn read_changes(&self, op: &ChangesOp) -> StoreResult<Changes> {
        let op = op.clone();
        self.with_reader(move |conn| {
            // One read transaction: the records and the head from one snapshot.
            let tx = conn.unchecked_transaction()?;
            // NULL: every collection.
            let collections = op
                .collections
                .as_ref()
                .map(|c| serde_json::to_string(c).unwrap_or_else(|_| "[]".into()));
            let records = tx
                .prepare_cached(
                    "SELECT position, collection, scope, id, rev, kind, data, create_time, update_time, expire_time, commit_time
                     FROM changes WHERE position > ?1
                       AND (?2 IS NULL OR collection IN (SELECT value FROM json_each(?2)))
                     ORDER BY position LIMIT ?3",
                )?
                .query_map(params![op.after as i64, collections, op.limit as i64], row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let through = match records.last() {
                Some(last) if records.len() == op.limit => last.position,
                _ => head(&tx)?.max(op.after),
            };
            tx.finish()?;
            Ok(Changes { records, through })
        })
        .await
    }

    pub(super) async fn bounds(&self) -> StoreResult<FeedBounds> {
        self.with_reader(|conn| {
            let tx = conn.unchecked_transaction()?;
            let (id, pruned_through): (Vec<u8>, i64) = tx.query_row(
                "SELECT feed_id, pruned_through FROM feed WHERE one = 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            let head = head(&tx)?;
            tx.finish()?;
            let mut bytes = [0u8; 16];
            let n = id.len().min(16);
            bytes[..n].copy_from_slice(&id[..n]);
            Ok(FeedBounds {
                pruned_through: pruned_through as u64,
                head,
                feed_id: u128::from_be_bytes(bytes),
            })
        })
        .await
    }

    pub(super) async fn prune(&self, before: Micros, limit: usize) -> StoreResult<usize> {
        self.with_writer(move |conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            // The oldest changes, a prefix of the positions: a token is either
            // resumable or expired, never resumed over a hole.
            let last: Option<i64> = tx
                .query_row(
                    "SELECT max(position) FROM (SELECT position FROM changes WHERE commit_time < ?1 ORDER BY position LIMIT ?2)",
                    params![before, limit as i64],
                    |r| r.get(0),
                )
                .optional()?
                .flatten();
            let Some(last) = last else {
                return Ok(0);
            };
            let pruned = tx.execute("DELETE FROM changes WHERE position <= ?1", params![last])?;
            tx.execute(
                "UPDATE feed SET pruned_through = max(pruned_through, ?1) WHERE one = 1",
                params![last],
            )?;
            tx.commit()?;
            Ok(pruned)
        })
        .await
    }
}
