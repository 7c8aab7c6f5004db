//! The change feed: every write records its changes in the same transaction
//! (see [`super::plan::Change`]), and each committed change gets a
//! **position**: a number that grows in commit order, with no gaps a reader
//! could later see filled. Watchers read "the changes after position p".
//!
//! How each store makes positions commit-ordered without stalling:
//! - memory and SQLite have one writer at a time: the position is assigned
//!   inside the writing transaction, so position order is commit order;
//! - PostgreSQL and MySQL/MariaDB have concurrent writers whose sequence
//!   values become visible out of order. Writers insert their changes with no
//!   position; a **sequencer** (whichever sidecar holds the sequencer lock)
//!   numbers *committed* changes in batches, in one transaction. A reader sees
//!   a batch entirely or not at all, and a change only gets a position once it
//!   is committed, so a position, once visible, is never preceded by one that
//!   appears later. Changes of one document keep their commit order because
//!   the second writer waits for the first's row lock, so its change row is
//!   inserted (and numbered) after the first committed. No transaction outside
//!   docsidecar's tables can hold the feed back, and no counter row is touched
//!   per write (no Galera certification hotspot): the sequencer takes one lock
//!   per batch. The delay is the sequencer's wake-up (a notification or a
//!   short poll) plus one transaction.

use super::plan::ChangeKind;
use super::{Document, Key, Micros};

/// A position in the change feed; 0 is before the first change.
pub type Position = u64;

/// One committed change, positioned.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeRecord {
    pub position: Position,
    pub kind: ChangeKind,
    pub key: Key,
    /// The rev written (Saved) or removed (Deleted, Expired).
    pub rev: String,
    /// For Saved: the document as the change committed it.
    pub document: Option<Document>,
    pub commit_time: Micros,
}

/// What a watcher reads: changes after a position, of some collections.
#[derive(Debug, Clone)]
pub struct ChangesOp {
    pub after: Position,
    /// The collections to read (`None`: every collection).
    pub collections: Option<Vec<String>>,
    pub limit: usize,
}

/// A read of the feed: the changes found, and the position the read covered
/// (every change up to it was examined), which a PROGRESS event can carry.
#[derive(Debug, Clone, Default)]
pub struct Changes {
    pub records: Vec<ChangeRecord>,
    pub through: Position,
}

/// The bounds of the feed: the oldest position still resumable (tokens
/// before it are expired) and the newest one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeedBounds {
    /// Changes at or before this position were pruned.
    pub pruned_through: Position,
    pub head: Position,
    /// Identifies the database the positions belong to.
    pub feed_id: u128,
}

impl ChangeKind {
    pub fn code(self) -> i16 {
        match self {
            ChangeKind::Saved => 1,
            ChangeKind::Deleted => 2,
            ChangeKind::Expired => 3,
        }
    }

    pub fn from_code(code: i16) -> Option<ChangeKind> {
        match code {
            1 => Some(ChangeKind::Saved),
            2 => Some(ChangeKind::Deleted),
            3 => Some(ChangeKind::Expired),
            _ => None,
        }
    }
}

/// Wakes watchers when changes may have been committed: in-process writes,
/// and (PostgreSQL) notifications from other sidecars. A hint only: watchers
/// always read the feed itself.
#[derive(Debug, Clone)]
pub struct Wakeups {
    tx: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
}

impl Default for Wakeups {
    fn default() -> Self {
        Wakeups {
            tx: std::sync::Arc::new(tokio::sync::watch::channel(0).0),
        }
    }
}

impl Wakeups {
    pub fn notify(&self) {
        self.tx.send_modify(|n| *n = n.wrapping_add(1));
    }

    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.tx.subscribe()
    }

    /// Waits, two seconds at the most, until `pending` reports no unnumbered
    /// change left, waking the sequencer each time one is.
    pub async fn settle<F, Fut>(&self, mut pending: F) -> super::StoreResult<()>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = super::StoreResult<bool>>,
    {
        let mut wakeups = self.subscribe();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
        while pending().await? {
            self.notify();
            if tokio::time::timeout_at(deadline, wakeups.changed())
                .await
                .is_err()
            {
                // The sequencer is elsewhere and slow: "now" is a little earlier.
                break;
            }
        }
        Ok(())
    }
}
