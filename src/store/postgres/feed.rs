//! The change feed on PostgreSQL (see `store::changes` for the design):
//! writers insert their changes unnumbered (`_changes.position` NULL) in the
//! writing transaction; the sequencer, whichever sidecar holds the
//! transaction-level advisory lock, numbers committed changes in batches and
//! moves `_feed.head` in the same transaction. Readers see a batch entirely
//! or not at all. Wake-ups travel as `NOTIFY` with an empty payload (any role
//! may LISTEN); polling is the truth.

use super::error::describe;
use super::{PostgresStore, NOW};
use crate::background::Tasks;
use crate::store::changes::{ChangeRecord, Changes, ChangesOp, FeedBounds};
use crate::store::plan::{Change, ChangeKind};
use crate::store::{Document, Key, Micros, StoreResult};
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::types::ToSql;

/// Changes numbered per sequencer transaction.
const BATCH: i64 = 1000;
/// How often the sequencer looks without a wake-up.
const SEQUENCE_EVERY: Duration = Duration::from_millis(100);

/// The feed's tables: the changes, and the feed's identity, head and pruning.
pub(super) fn feed_ddl(schema: &str) -> String {
    format!(
        r#"CREATE TABLE IF NOT EXISTS "{schema}"._changes (
            seq         bigserial PRIMARY KEY,
            position    bigint UNIQUE,
            collection  text COLLATE "C" NOT NULL,
            scope       text COLLATE "C" NOT NULL,
            id          text COLLATE "C" NOT NULL,
            rev         text NOT NULL,
            kind        smallint NOT NULL,
            data        jsonb,
            create_time bigint,
            update_time bigint,
            expire_time bigint,
            commit_time bigint NOT NULL
        );
        CREATE INDEX IF NOT EXISTS "_changes$unsequenced" ON "{schema}"._changes (seq) WHERE position IS NULL;
        CREATE INDEX IF NOT EXISTS "_changes$time" ON "{schema}"._changes (commit_time) WHERE position IS NOT NULL;
        CREATE TABLE IF NOT EXISTS "{schema}"._feed (
            one            integer PRIMARY KEY CHECK (one = 1),
            feed_id        uuid NOT NULL,
            head           bigint NOT NULL,
            pruned_through bigint NOT NULL
        );
        INSERT INTO "{schema}"._feed VALUES (1, gen_random_uuid(), 0, 0) ON CONFLICT DO NOTHING;"#
    )
}

/// What the runtime role needs of the feed: insert changes, number them,
/// read them, prune them (`migrate` grants exactly these).
pub(super) const RUNTIME_PRIVILEGES: &[(&str, &[&str])] = &[
    ("_changes", &["DELETE", "INSERT", "SELECT", "UPDATE"]),
    ("_feed", &["SELECT", "UPDATE"]),
    ("_changes_seq_seq", &["USAGE"]),
];

/// The NOTIFY channel of a schema's feed.
pub(super) fn channel(schema: &str) -> String {
    format!("docsidecar_feed_{schema}")
}

/// The statement that records a write's changes inside the writing
/// transaction, unnumbered: an `INSERT` that may follow `WITH w AS (…)`, the
/// document's own write (`after_write`). Its parameters start at `$first`,
/// in the order [`record_params`] gives them. The changes are numbered
/// (`seq`) in their order; after a document write they are inserted only
/// once that write has run (it is read to the end first), so its errors
/// come first, as when they were two statements. The wake-up is the
/// writer's: [`notify`], after COMMIT.
pub(super) fn record_sql(schema: &str, first: usize, after_write: bool) -> String {
    let p = |n: usize| format!("${}", first + n);
    let done = if after_write {
        " CROSS JOIN (SELECT count(*) FROM w) AS done"
    } else {
        ""
    };
    format!(
        r#"INSERT INTO "{schema}"._changes (collection, scope, id, rev, kind, data, create_time, update_time, expire_time, commit_time)
           SELECT u.collection, u.scope, u.id, u.rev, u.kind, u.data::jsonb, u.create_time, u.update_time, u.expire_time, {}::bigint
           FROM unnest({}::text[], {}::text[], {}::text[], {}::text[], {}::int2[], {}::text[], {}::int8[], {}::int8[], {}::int8[])
                WITH ORDINALITY AS u(collection, scope, id, rev, kind, data, create_time, update_time, expire_time, n){done}
           ORDER BY u.n"#,
        p(9),
        p(0),
        p(1),
        p(2),
        p(3),
        p(4),
        p(5),
        p(6),
        p(7),
        p(8),
    )
}

/// The parameters of [`record_sql`]: one array per column, then the commit
/// time.
pub(super) fn record_params<'a>(
    changes: &'a [Change],
    now: Micros,
) -> Vec<Box<dyn ToSql + Sync + Send + 'a>> {
    let column = |f: fn(&'a Change) -> Option<&'a str>| -> Vec<Option<&'a str>> {
        changes.iter().map(f).collect()
    };
    let time = |f: fn(&Document) -> Option<i64>| -> Vec<Option<i64>> {
        changes
            .iter()
            .map(|c| c.document.as_ref().and_then(f))
            .collect()
    };
    vec![
        Box::new(column(|c| Some(&c.key.collection))),
        Box::new(column(|c| Some(&c.key.scope))),
        Box::new(column(|c| Some(&c.key.id))),
        Box::new(column(|c| Some(&c.rev))),
        Box::new(changes.iter().map(|c| c.kind.code()).collect::<Vec<i16>>()),
        Box::new(column(|c| c.document.as_ref().map(|d| d.data.as_str()))),
        Box::new(time(|d| Some(d.create_time))),
        Box::new(time(|d| Some(d.update_time))),
        Box::new(time(|d| d.expire_time)),
        Box::new(now),
    ]
}

/// The wake-up after a write that recorded changes committed: its own
/// transaction, sent right after COMMIT. Inside the writing transaction a
/// NOTIFY holds PostgreSQL's notification lock from before the commit
/// record is flushed until the commit ends, so every notifying writer of
/// the database commits alone (no group commit: BENCHMARKS.md, issue 17).
/// Listeners learn of the change as soon as before, give or take that
/// round trip; a wake-up lost with a crashed sidecar is made up by polling.
pub(super) fn notify(schema: &str) -> String {
    format!("NOTIFY \"{}\"", channel(schema))
}

fn record_of(row: &tokio_postgres::Row) -> Result<ChangeRecord, tokio_postgres::Error> {
    let key = Key {
        collection: row.try_get(1)?,
        scope: row.try_get(2)?,
        id: row.try_get(3)?,
    };
    let rev: String = row.try_get(4)?;
    let data: Option<String> = row.try_get(6)?;
    let document = match data {
        Some(data) => Some(Document {
            key: key.clone(),
            rev: rev.clone(),
            data,
            create_time: row.try_get::<_, Option<i64>>(7)?.unwrap_or_default(),
            update_time: row.try_get::<_, Option<i64>>(8)?.unwrap_or_default(),
            expire_time: row.try_get(9)?,
        }),
        None => None,
    };
    Ok(ChangeRecord {
        position: row.try_get::<_, i64>(0)? as u64,
        kind: ChangeKind::from_code(row.try_get(5)?).unwrap_or(ChangeKind::Saved),
        key,
        rev,
        document,
        commit_time: row.try_get(10)?,
    })
}

impl PostgresStore {
    pub(super) async fn read_changes(&self, op: &ChangesOp) -> StoreResult<Changes> {
        let schema = &self.tables.schema;
        // One statement, one snapshot: the changes and the head they are under.
        let sql = format!(
            r#"SELECT c.position, c.collection, c.scope, c.id, c.rev, c.kind, c.data::text,
                      c.create_time, c.update_time, c.expire_time, c.commit_time, f.head
               FROM "{schema}"._feed f
               LEFT JOIN LATERAL (
                   SELECT * FROM "{schema}"._changes
                   WHERE position > $1 AND ($2::text[] IS NULL OR collection = ANY($2))
                   ORDER BY position LIMIT $3) c ON true
               WHERE f.one = 1 ORDER BY c.position"#
        );
        let after = op.after as i64;
        let limit = op.limit as i64;
        let rows = self
            .select(&sql, &[&after, &op.collections, &limit])
            .await?;
        let mut records = Vec::with_capacity(rows.len());
        let mut head = 0u64;
        for row in &rows {
            head = row.try_get::<_, i64>(11).map_err(|e| self.pg(e))? as u64;
            if row
                .try_get::<_, Option<i64>>(0)
                .map_err(|e| self.pg(e))?
                .is_some()
            {
                records.push(record_of(row).map_err(|e| self.pg(e))?);
            }
        }
        let through = match records.last() {
            Some(last) if records.len() == op.limit => last.position,
            _ => head.max(op.after),
        };
        Ok(Changes { records, through })
    }

    pub(super) async fn bounds(&self) -> StoreResult<FeedBounds> {
        let sql = format!(
            r#"SELECT feed_id::text, head, pruned_through FROM "{}"._feed WHERE one = 1"#,
            self.tables.schema
        );
        let rows = self.select(&sql, &[]).await?;
        let row = rows.first().ok_or_else(|| {
            crate::store::StoreError::table_missing(
                "the change feed is not set up: run `docsidecar migrate`",
            )
        })?;
        let id: String = row.get(0);
        Ok(FeedBounds {
            feed_id: uuid::Uuid::parse_str(&id).map_or(0, |u| u.as_u128()),
            head: row.get::<_, i64>(1) as u64,
            pruned_through: row.get::<_, i64>(2) as u64,
        })
    }

    /// The bounds once every change committed before the call is numbered:
    /// waits (briefly) for the sequencer to catch up with the newest change
    /// now visible.
    pub(super) async fn settled_bounds(&self) -> StoreResult<FeedBounds> {
        let schema = &self.tables.schema;
        let newest = self
            .select(&format!(r#"SELECT max(seq) FROM "{schema}"._changes"#), &[])
            .await?
            .first()
            .and_then(|r| r.get::<_, Option<i64>>(0));
        if let Some(newest) = newest {
            let pending = format!(
                r#"SELECT EXISTS (SELECT 1 FROM "{schema}"._changes WHERE position IS NULL AND seq <= $1)"#
            );
            let pending = &pending;
            self.wakeups
                .settle(move || async move {
                    Ok(self
                        .select(pending, &[&newest])
                        .await?
                        .first()
                        .is_some_and(|r| r.get(0)))
                })
                .await?;
        }
        self.bounds().await
    }

    /// Numbers the committed unnumbered changes, if this sidecar holds the
    /// sequencer lock; how many it numbered.
    pub(super) async fn sequence(
        &self,
        client: &mut tokio_postgres::Client,
    ) -> Result<u64, tokio_postgres::Error> {
        let schema = &self.tables.schema;
        let tx = client.transaction().await?;
        let ours: bool = tx
            .query_one(
                "SELECT pg_try_advisory_xact_lock(hashtext('docsidecar feed ' || $1::text))",
                &[schema],
            )
            .await?
            .get(0);
        if !ours {
            return Ok(0);
        }
        let numbered = tx
            .execute(
                &format!(
                    r#"WITH batch AS (
                           SELECT seq, row_number() OVER (ORDER BY seq) AS n FROM (
                               SELECT seq FROM "{schema}"._changes WHERE position IS NULL ORDER BY seq LIMIT $1) s),
                       head AS (SELECT head FROM "{schema}"._feed WHERE one = 1)
                       UPDATE "{schema}"._changes c SET position = (SELECT head FROM head) + b.n
                       FROM batch b WHERE c.seq = b.seq"#
                ),
                &[&BATCH],
            )
            .await?;
        if numbered > 0 {
            tx.execute(
                &format!(r#"UPDATE "{schema}"._feed SET head = head + $1 WHERE one = 1"#),
                &[&(numbered as i64)],
            )
            .await?;
            tx.execute("SELECT pg_notify($1, '')", &[&channel(schema)])
                .await?;
        }
        tx.commit().await?;
        Ok(numbered)
    }

    pub(super) async fn prune(&self, before: Micros, limit: usize) -> StoreResult<usize> {
        let schema = &self.tables.schema;
        // The oldest numbered changes, a prefix of the positions.
        let sql = format!(
            r#"WITH last AS (
                   SELECT max(position) AS p FROM (
                       SELECT position FROM "{schema}"._changes
                       WHERE position IS NOT NULL AND commit_time < $1 ORDER BY position LIMIT $2) s),
               gone AS (DELETE FROM "{schema}"._changes WHERE position <= (SELECT p FROM last) RETURNING 1),
               moved AS (UPDATE "{schema}"._feed SET pruned_through = greatest(pruned_through, (SELECT p FROM last))
                         WHERE one = 1 AND (SELECT p FROM last) IS NOT NULL RETURNING 1)
               SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM moved)"#
        );
        let limit = limit as i64;
        let rows = self.select(&sql, &[&before, &limit]).await?;
        Ok(rows.first().map_or(0, |r| r.get::<_, i64>(0)) as usize)
    }
}

/// Runs the sequencer and the LISTEN connection for a store, in `tasks`:
/// notifications (other sidecars' commits, sequenced batches) wake both
/// the sequencer and this sidecar's watchers.
pub(super) fn spawn(store: Arc<PostgresStore>, tasks: &Tasks) {
    let listener = store.clone();
    tasks.spawn(async move { listen(listener).await });
    tasks.spawn(async move {
        let mut kicks = store.wakeups.subscribe();
        let mut client: Option<(tokio_postgres::Client, u64)> = None;
        loop {
            // A rotated password retires the connection, as the pool's.
            let generation = store.pools.generation();
            let c = match client.take() {
                Some((c, made)) if made == generation && !c.is_closed() => c,
                _ => match store.pools.dedicated("sequencer").await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::debug!(error = %e, "change feed sequencer cannot connect yet");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                },
            };
            let mut c = c;
            match store.sequence(&mut c).await {
                Ok(n) if n as i64 == BATCH => {
                    client = Some((c, generation));
                    continue;
                }
                Ok(_) => client = Some((c, generation)),
                Err(e) => {
                    tracing::debug!(error = %describe(&e), "change feed sequencer failed; retrying")
                }
            }
            tokio::select! {
                _ = kicks.changed() => {}
                () = tokio::time::sleep(SEQUENCE_EVERY) => {}
            }
        }
    });
}

/// LISTENs on the feed's channel and turns notifications into wake-ups.
async fn listen(store: Arc<PostgresStore>) {
    use futures_util::StreamExt;
    loop {
        let connected = store.pools.listener().await;
        let (client, mut connection) = match connected {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(error = %e, "change feed listener cannot connect yet");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        let statement = format!("LISTEN \"{}\"", channel(&store.tables.schema));
        let listen = client.batch_execute(&statement);
        tokio::pin!(listen);
        let generation = store.pools.generation();
        let mut check = tokio::time::interval(Duration::from_secs(1));
        // Drive the connection while LISTEN is sent, then forward notifications.
        let mut listening = false;
        loop {
            tokio::select! {
                done = &mut listen, if !listening => {
                    if done.is_err() { break; }
                    listening = true;
                    // Anything committed while not listening: look once.
                    store.wakeups.notify();
                }
                message = messages.next() => match message {
                    Some(Ok(tokio_postgres::AsyncMessage::Notification(_))) => store.wakeups.notify(),
                    Some(Ok(_)) => {}
                    _ => break,
                },
                // A rotated password retires this connection too.
                _ = check.tick() => if store.pools.generation() != generation { break },
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Numbers and notifies a reaped batch's EXPIRED changes: the reaper's
/// statement inserts them itself (see `reap_with`).
pub(super) fn expired_insert(schema: &str, collection: &str) -> String {
    format!(
        r#"INSERT INTO "{schema}"._changes (collection, scope, id, rev, kind, commit_time)
           SELECT '{collection}', scope, id, rev, {}, {NOW} FROM gone"#,
        ChangeKind::Expired.code()
    )
}
