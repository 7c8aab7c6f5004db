//! Watch: a stream of committed changes from a resume token (or from now), in
//! position order, once each. Each stream has its own producer task reading
//! the feed into a small buffer; a client that does not drain it in time is
//! ended with ABORTED (WATCH_TOO_SLOW) and resumes from its last token, so a
//! slow watcher never makes the sidecar hold more than the buffer.

use super::convert::{document, timestamp};
use super::ApiError;
use crate::metrics;
use crate::policy::{Need, Permissions};
use crate::proto::{self, change_event::Kind};
use crate::status::{status, Failure, Reason};
use crate::store::changes::{ChangeRecord, ChangesOp, FeedBounds, Position};
use crate::store::plan::ChangeKind;
use crate::store::DocumentStore;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use futures_util::StreamExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::Status;

/// Watch settings operators may tune.
#[derive(Debug, Clone)]
pub struct WatchLimits {
    /// Streams served at once.
    pub max_streams: usize,
    /// How long a client may leave a full buffer undrained before its stream
    /// ends with WATCH_TOO_SLOW.
    pub slow_after: Duration,
    /// How often a stream reads the feed without a wake-up (other sidecars'
    /// writes on databases without notifications).
    pub poll_every: Duration,
    /// A PROGRESS event at least this often while nothing else is sent (at
    /// most 10 s, the contract's bound).
    pub progress_every: Duration,
}

/// Events buffered per stream.
const BUFFER: usize = 64;
/// Changes read per query of the feed.
const READ: usize = 256;

const TOKEN_VERSION: u8 = 3;

fn checksum(bytes: &[u8]) -> [u8; 8] {
    super::page_token::fingerprint(bytes).to_be_bytes()
}

/// The token that resumes after `position` of feed `feed_id`.
pub fn resume_token(feed_id: u128, position: Position) -> String {
    let mut bytes = vec![TOKEN_VERSION];
    bytes.extend_from_slice(&feed_id.to_be_bytes());
    bytes.extend_from_slice(&position.to_be_bytes());
    let sum = checksum(&bytes);
    bytes.extend_from_slice(&sum);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Where a token resumes: validated against this feed's identity and bounds.
pub fn resume_position(token: &str, bounds: &FeedBounds) -> Result<Position, ApiError> {
    let invalid = |why: &str| {
        ApiError::Invalid {
        field: "resume_token".into(),
        message: format!(
            "resume_token {} {why}: pass the resume_token of an event, List or Query response unchanged, or none to watch from now",
            crate::quote::shown(token)
        ),
        reason: Reason::ResumeTokenInvalid,
    }
    };
    let bytes = URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| invalid("is not a resume token"))?;
    if bytes.len() != 1 + 16 + 8 + 8 || bytes[0] != TOKEN_VERSION {
        return Err(invalid("is not a resume token"));
    }
    let (body, sum) = bytes.split_at(bytes.len() - 8);
    if checksum(body) != sum {
        return Err(invalid("is not a resume token"));
    }
    let feed_id = u128::from_be_bytes(body[1..17].try_into().unwrap_or_default());
    let position = u64::from_be_bytes(body[17..25].try_into().unwrap_or_default());
    if feed_id != bounds.feed_id {
        return Err(invalid("was issued for another database"));
    }
    if position > bounds.head {
        return Err(invalid("points past the newest change"));
    }
    if position < bounds.pruned_through {
        return Err(ApiError::Refused {
            reason: Reason::ResumeTokenExpired,
            message: "resume_token is older than the change history kept (DOCSIDECAR_CHANGE_RETENTION): re-read with List and watch from its resume_token".into(),
            metadata: Vec::new(),
        });
    }
    Ok(position)
}

/// The event of a committed change.
fn event(
    r: ChangeRecord,
    include_documents: bool,
    feed_id: u128,
) -> Result<proto::ChangeEvent, ApiError> {
    let kind = match r.kind {
        ChangeKind::Saved => Kind::Saved,
        ChangeKind::Deleted => Kind::Deleted,
        ChangeKind::Expired => Kind::Expired,
    };
    let document = match r.document {
        Some(doc) if include_documents && r.kind == ChangeKind::Saved => match document(doc) {
            Ok(doc) => Some(doc),
            // A row written outside docsidecar: the event goes without it.
            Err(e) => {
                tracing::error!(error = %e, "a change's document is malformed; sent without it");
                crate::metrics::malformed_document();
                None
            }
        },
        _ => None,
    };
    Ok(proto::ChangeEvent {
        kind: kind.into(),
        collection: r.key.collection,
        scope: r.key.scope,
        id: r.key.id,
        rev: r.rev,
        document,
        commit_time: Some(timestamp(r.commit_time)),
        resume_token: resume_token(feed_id, r.position),
    })
}

fn progress(feed_id: u128, position: Position) -> proto::ChangeEvent {
    proto::ChangeEvent {
        kind: Kind::Progress.into(),
        resume_token: resume_token(feed_id, position),
        ..Default::default()
    }
}

/// Counts a stream open for as long as it lives.
struct Open;

impl Open {
    fn new() -> Open {
        metrics::watch_streams(1.0);
        Open
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        metrics::watch_streams(-1.0);
    }
}

/// A stream's request, validated and authorized.
pub struct Watcher {
    pub store: Arc<dyn DocumentStore>,
    pub collections: Option<Vec<String>>,
    pub start: Position,
    pub feed_id: u128,
    pub include_documents: bool,
    pub limits: WatchLimits,
    /// Turns true when the sidecar starts shutting down.
    pub draining: tokio::sync::watch::Receiver<bool>,
    /// The caller's: events of rows it does not reach are left out, and
    /// hidden fields are removed from documents.
    pub permissions: Arc<Permissions>,
}

pub type WatchStream = futures_util::stream::BoxStream<'static, Result<proto::ChangeEvent, Status>>;

impl Watcher {
    /// Starts the producer and returns the stream the client reads.
    pub fn stream(self, permit: tokio::sync::OwnedSemaphorePermit) -> WatchStream {
        let (tx, rx) = tokio::sync::mpsc::channel(BUFFER);
        let ending: Arc<Mutex<Option<Status>>> = Arc::default();
        let end = ending.clone();
        tokio::spawn(async move {
            let _open = Open::new();
            let _permit = permit;
            let reason = match self.produce(&tx).await {
                Ok(()) => "client_gone",
                Err((why, status)) => {
                    *end.lock().unwrap_or_else(|e| e.into_inner()) = Some(status);
                    why
                }
            };
            metrics::watch_ended(reason);
        });
        let events = tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok);
        let last = futures_util::stream::once(async move {
            ending.lock().unwrap_or_else(|e| e.into_inner()).take()
        })
        .filter_map(|status| async move { status.map(Err) });
        events.chain(last).boxed()
    }

    /// Reads the feed and sends events until the client leaves (`Ok`) or the
    /// stream must end with a status.
    async fn produce(
        self,
        tx: &tokio::sync::mpsc::Sender<proto::ChangeEvent>,
    ) -> Result<(), (&'static str, Status)> {
        let mut position = self.start;
        let mut wakeups = self.store.wakeups().subscribe();
        let mut draining = self.draining.clone();
        let mut quiet_since = Instant::now();
        loop {
            if *draining.borrow() {
                return Err((
                    "shutting_down",
                    status(Reason::ShuttingDown, "the sidecar is shutting down: resume from the last resume_token on another one"),
                ));
            }
            let op = ChangesOp {
                after: position,
                collections: self.collections.clone(),
                limit: READ,
            };
            let changes = self
                .store
                .changes(&op)
                .await
                .map_err(|e| ("error", Status::from(e)))?;
            let full = changes.records.len() == READ;
            for mut record in changes.records {
                let at = record.position;
                let rights = self.permissions.check(&record.key.collection, Need::Read);
                let Some(rights) = rights.ok().filter(|r| r.sees(&record.key.scope)) else {
                    position = at;
                    continue;
                };
                if let Some(doc) = record.document.as_mut() {
                    doc.data = rights.protected.strip(std::mem::take(&mut doc.data));
                }
                let lag = crate::store::now_micros() - record.commit_time;
                let event = event(record, self.include_documents, self.feed_id)
                    .map_err(|e| ("error", Status::from(e)))?;
                self.send(tx, event).await?;
                position = at;
                quiet_since = Instant::now();
                metrics::watch_event_sent(lag as f64 / 1e6);
            }
            position = position.max(changes.through);
            if full {
                continue;
            }
            let progress_every = self.limits.progress_every;
            if quiet_since.elapsed() >= progress_every {
                self.send(tx, progress(self.feed_id, position)).await?;
                quiet_since = Instant::now();
            }
            let wait = progress_every
                .saturating_sub(quiet_since.elapsed())
                .min(self.limits.poll_every);
            tokio::select! {
                _ = wakeups.changed() => {}
                _ = draining.changed() => {}
                () = tokio::time::sleep(wait) => {}
                () = tx.closed() => return Ok(()),
            }
        }
    }

    async fn send(
        &self,
        tx: &tokio::sync::mpsc::Sender<proto::ChangeEvent>,
        event: proto::ChangeEvent,
    ) -> Result<(), (&'static str, Status)> {
        match tx.send_timeout(event, self.limits.slow_after).await {
            Ok(()) => Ok(()),
            Err(tokio::sync::mpsc::error::SendTimeoutError::Closed(_)) => Err(("client_gone", Status::cancelled("the client left"))),
            Err(tokio::sync::mpsc::error::SendTimeoutError::Timeout(_)) => Err((
                "too_slow",
                Failure::new(
                    Reason::WatchTooSlow,
                    format!(
                        "this watcher read no event for {:?} while {BUFFER} waited: resume from the last resume_token received",
                        self.limits.slow_after
                    ),
                )
                .into_status(),
            )),
        }
    }
}
