//! The change feed on MySQL/MariaDB (see `store::changes` for the design):
//! writers insert their changes unnumbered in the writing transaction; a
//! sequencer numbers committed changes in batches under the `_feed` row's
//! lock (one lock per batch, not per write: no certification hotspot on
//! Galera; a sequencer that loses a certification race just tries again).
//! Watchers of other sidecars find new changes by polling.
//!
//! Positions stay in commit order for dependent writes on Galera too: a
//! second writer of a document only commits after the first's write is
//! applied on its node, whose auto-increment counter has then moved past the
//! first change's `seq`.

use super::error::OpError;
use super::{bytes, MysqlStore};
use crate::background::Tasks;
use crate::store::changes::{ChangeRecord, Changes, ChangesOp, FeedBounds};
use crate::store::plan::{Change, ChangeKind};
use crate::store::{Document, Key, Micros, StoreResult};
use mysql_async::prelude::*;
use mysql_async::{Row, Value};
use std::sync::Arc;
use std::time::Duration;

/// Changes numbered per sequencer transaction.
const BATCH: u64 = 1000;
/// How often the sequencer looks without a wake-up from this sidecar.
const SEQUENCE_EVERY: Duration = Duration::from_millis(100);

/// The feed's tables (created with the catalog).
pub(super) const FEED_DDL: [&str; 3] = [
    "CREATE TABLE IF NOT EXISTS `_changes` (
        seq         BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
        position    BIGINT NULL,
        collection  VARBINARY(64) NOT NULL,
        scope       VARBINARY(512) NOT NULL,
        id          VARBINARY(512) NOT NULL,
        rev         VARBINARY(64) NOT NULL,
        kind        SMALLINT NOT NULL,
        data        LONGTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL,
        create_time BIGINT NULL,
        update_time BIGINT NULL,
        expire_time BIGINT NULL,
        commit_time BIGINT NOT NULL,
        UNIQUE KEY by_position (position),
        KEY by_time (commit_time)
    ) ENGINE=InnoDB",
    "CREATE TABLE IF NOT EXISTS `_feed` (
        one            INT NOT NULL PRIMARY KEY,
        feed_id        BINARY(16) NOT NULL,
        head           BIGINT NOT NULL,
        pruned_through BIGINT NOT NULL
    ) ENGINE=InnoDB",
    "INSERT IGNORE INTO `_feed` VALUES (1, UNHEX(REPLACE(UUID(), '-', '')), 0, 0)",
];

/// What the runtime account needs of the feed's tables.
pub(super) const FEED_GRANTS: [(&str, &str); 2] = [
    ("_changes", "SELECT, INSERT, UPDATE, DELETE"),
    ("_feed", "SELECT, UPDATE"),
];

/// Records changes inside the writing transaction (unnumbered).
/// `feed`: the relation of the change feed this account writes (see
/// [`MysqlStore::feed_relation`]).
pub(super) async fn record(
    conn: &mut mysql_async::Conn,
    feed: &str,
    changes: &[Change],
    now: Micros,
) -> Result<(), OpError> {
    let sql = format!(
        "INSERT INTO {feed} (collection, scope, id, rev, kind, data, create_time, update_time, expire_time, commit_time)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    );
    for ch in changes {
        let doc = ch.document.as_ref();
        conn.exec_drop(
            &sql,
            vec![
                bytes(&ch.key.collection),
                bytes(&ch.key.scope),
                bytes(&ch.key.id),
                bytes(&ch.rev),
                Value::Int(i64::from(ch.kind.code())),
                doc.map_or(Value::NULL, |d| Value::Bytes(d.data.as_bytes().to_vec())),
                doc.map_or(Value::NULL, |d| Value::Int(d.create_time)),
                doc.map_or(Value::NULL, |d| Value::Int(d.update_time)),
                doc.and_then(|d| d.expire_time)
                    .map_or(Value::NULL, Value::Int),
                Value::Int(now),
            ],
        )
        .await?;
    }
    Ok(())
}

fn text(row: &mut Row, i: usize) -> Option<String> {
    row.take_opt::<Option<Vec<u8>>, _>(i)
        .and_then(Result::ok)
        .flatten()
        .and_then(|b| String::from_utf8(b).ok())
}

fn int(row: &mut Row, i: usize) -> Option<i64> {
    row.take_opt::<Option<i64>, _>(i)
        .and_then(Result::ok)
        .flatten()
}

/// A change row (position first), or `None` for the head-only row.
fn record_of(row: &mut Row) -> Option<ChangeRecord> {
    let position = int(row, 0)?;
    let key = Key {
        collection: text(row, 1)?,
        scope: text(row, 2)?,
        id: text(row, 3)?,
    };
    let rev = text(row, 4)?;
    let kind = ChangeKind::from_code(int(row, 5)? as i16)?;
    let document = text(row, 6).map(|data| Document {
        key: key.clone(),
        rev: rev.clone(),
        data,
        create_time: int(row, 7).unwrap_or_default(),
        update_time: int(row, 8).unwrap_or_default(),
        expire_time: int(row, 9),
    });
    Some(ChangeRecord {
        position: position as u64,
        kind,
        key,
        rev,
        document,
        commit_time: int(row, 10)?,
    })
}

impl MysqlStore {
    pub(super) async fn read_changes(&self, op: &ChangesOp) -> StoreResult<Changes> {
        // One statement, one snapshot: the changes and the head they are under.
        let (filter, mut params) = match &op.collections {
            None => (String::new(), Vec::new()),
            Some(c) if c.is_empty() => (" AND FALSE".into(), Vec::new()),
            Some(c) => (
                format!(" AND collection IN ({})", vec!["?"; c.len()].join(", ")),
                c.iter().map(|c| bytes(c)).collect(),
            ),
        };
        let feed = self.feed_relation().await?;
        let sql = format!(
            "SELECT c.position, c.collection, c.scope, c.id, c.rev, c.kind, c.data,
                    c.create_time, c.update_time, c.expire_time, c.commit_time, f.head
             FROM `_feed` f
             LEFT JOIN (SELECT * FROM {feed} WHERE position > ?{filter} ORDER BY position LIMIT ?) c ON TRUE
             WHERE f.one = 1 ORDER BY c.position"
        );
        params.insert(0, Value::Int(op.after as i64));
        params.push(Value::UInt(op.limit as u64));
        let mut records = Vec::new();
        let mut head = 0u64;
        self.scan(&sql, params, |mut row| {
            head = int(&mut row, 11).unwrap_or_default() as u64;
            if let Some(r) = record_of(&mut row) {
                records.push(r);
            }
            Ok(true)
        })
        .await?;
        let through = match records.last() {
            Some(last) if records.len() == op.limit => last.position,
            _ => head.max(op.after),
        };
        Ok(Changes { records, through })
    }

    pub(super) async fn bounds(&self) -> StoreResult<FeedBounds> {
        let mut bounds = None;
        self.scan(
            "SELECT feed_id, head, pruned_through FROM `_feed` WHERE one = 1",
            Vec::new(),
            |mut row| {
                let id: Vec<u8> = row.take_opt(0).and_then(Result::ok).unwrap_or_default();
                let mut buf = [0u8; 16];
                let n = id.len().min(16);
                buf[..n].copy_from_slice(&id[..n]);
                bounds = Some(FeedBounds {
                    feed_id: u128::from_be_bytes(buf),
                    head: int(&mut row, 1).unwrap_or_default() as u64,
                    pruned_through: int(&mut row, 2).unwrap_or_default() as u64,
                });
                Ok(false)
            },
        )
        .await?;
        bounds.ok_or_else(|| {
            crate::store::StoreError::table_missing(
                "the change feed is not set up: run `docsidecar migrate`",
            )
        })
    }

    /// The bounds once every change committed before the call is numbered
    /// ("from now"): waits briefly for the sequencer to number the newest
    /// change now visible.
    pub(super) async fn settled_bounds(&self) -> StoreResult<FeedBounds> {
        let feed = self.feed_relation().await?;
        let mut newest = None;
        let sql = format!("SELECT max(seq) FROM {feed}");
        self.scan(&sql, Vec::new(), |mut row| {
            newest = int(&mut row, 0);
            Ok(false)
        })
        .await?;
        if let Some(newest) = newest {
            let pending =
                format!("SELECT EXISTS (SELECT 1 FROM {feed} WHERE position IS NULL AND seq <= ?)");
            let pending = &pending;
            self.wakeups
                .settle(move || async move {
                    let mut waiting = false;
                    self.scan(pending, vec![Value::Int(newest)], |mut row| {
                        waiting = int(&mut row, 0).unwrap_or_default() != 0;
                        Ok(false)
                    })
                    .await?;
                    Ok(waiting)
                })
                .await?;
        }
        self.bounds().await
    }

    /// Numbers the committed unnumbered changes in one transaction under the
    /// `_feed` row's lock; how many it numbered.
    async fn sequence(&self) -> Result<u64, OpError> {
        let feed = self.feed_relation().await?;
        let mut c = self.pools.acquire().await.map_err(OpError::Store)?;
        let conn = c.conn();
        let result = async {
            conn.query_drop("START TRANSACTION").await?;
            let head: Option<i64> = conn
                .query_first("SELECT head FROM `_feed` WHERE one = 1 FOR UPDATE")
                .await?;
            let head = head.unwrap_or_default();
            conn.exec_drop("SET @docsidecar_position = ?", (head,))
                .await?;
            conn.exec_drop(
                format!("UPDATE {feed} SET position = (@docsidecar_position := @docsidecar_position + 1)
                 WHERE position IS NULL ORDER BY seq LIMIT ?"),
                (BATCH,),
            )
            .await?;
            let numbered = conn.affected_rows();
            if numbered > 0 {
                conn.exec_drop(
                    "UPDATE `_feed` SET head = ? WHERE one = 1",
                    (head + numbered as i64,),
                )
                .await?;
            }
            conn.query_drop("COMMIT").await?;
            Ok::<_, OpError>(numbered)
        }
        .await;
        c.done(&result);
        if let Err(e) = &result {
            self.refused(e);
        }
        result
    }

    pub(super) async fn prune(&self, before: Micros, limit: usize) -> StoreResult<usize> {
        let feed = self.feed_relation().await?;
        let mut c = self.pools.acquire().await?;
        let conn = c.conn();
        let result = async {
            conn.query_drop("START TRANSACTION").await?;
            // The oldest numbered changes, a prefix of the positions.
            let last: Option<Option<i64>> = conn
                .exec_first(
                    format!(
                        "SELECT max(position) FROM (SELECT position FROM {feed}
                     WHERE position IS NOT NULL AND commit_time < ? ORDER BY position LIMIT ?) s"
                    ),
                    (before, limit as u64),
                )
                .await?;
            let Some(Some(last)) = last else {
                conn.query_drop("COMMIT").await?;
                return Ok::<_, OpError>(0);
            };
            conn.exec_drop(format!("DELETE FROM {feed} WHERE position <= ?"), (last,))
                .await?;
            let pruned = conn.affected_rows() as usize;
            conn.exec_drop(
                "UPDATE `_feed` SET pruned_through = GREATEST(pruned_through, ?) WHERE one = 1",
                (last,),
            )
            .await?;
            conn.query_drop("COMMIT").await?;
            Ok(pruned)
        }
        .await;
        c.done(&result);
        result.map_err(|e| e.resolve(&self.target))
    }

    /// Starts the change feed's sequencer in `tasks`.
    pub fn start_feed(self: &Arc<Self>, tasks: &Tasks) {
        let store = self.clone();
        tasks.spawn(async move {
            let mut kicks = store.wakeups.subscribe();
            loop {
                match store.sequence().await {
                    Ok(n) if n == BATCH => continue,
                    Ok(n) if n > 0 => store.wakeups.notify(),
                    Ok(_) => {}
                    // A certification conflict with another node's sequencer,
                    // an outage: the next round tries again.
                    Err(e) => tracing::debug!(error = %e, "change feed sequencer failed; retrying"),
                }
                tokio::select! {
                    _ = kicks.changed() => {}
                    () = tokio::time::sleep(SEQUENCE_EVERY) => {}
                }
            }
        });
    }
}

/// The EXPIRED change of a reaped row.
pub(super) fn expired(collection: &str, scope: Vec<u8>, id: Vec<u8>, rev: Vec<u8>) -> Change {
    Change {
        kind: ChangeKind::Expired,
        key: Key {
            collection: collection.to_string(),
            scope: String::from_utf8_lossy(&scope).into_owned(),
            id: String::from_utf8_lossy(&id).into_owned(),
        },
        rev: String::from_utf8_lossy(&rev).into_owned(),
        document: None,
    }
}
