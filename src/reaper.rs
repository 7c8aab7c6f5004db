//! The expiry reaper: deletes expired documents in small batches, so expired
//! rows do not pile up. Reads never depend on it (an expired document is
//! absent the instant it expires); it only reclaims space. Each batch is one
//! short transaction in the store ([`DocumentStore::reap_expired`], the one
//! place expired rows are removed), safe with several sidecars on one database.

use crate::metrics;
use crate::store::DocumentStore;
use std::sync::Arc;
use std::time::Duration;

/// How the reaper runs.
#[derive(Debug, Clone, Copy)]
pub struct Reaping {
    /// Pause between rounds.
    pub every: Duration,
    /// Documents deleted per transaction.
    pub batch: usize,
}

/// Reaps forever (run it in the server's tasks): each round deletes batches
/// until one comes back short, then waits.
pub async fn run(store: Arc<dyn DocumentStore>, reaping: Reaping) {
    let mut ticker = tokio::time::interval(reaping.every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        ticker.tick().await;
        loop {
            match store.reap_expired(reaping.batch).await {
                Ok(reaped) => {
                    failing = false;
                    metrics::documents_expired(reaped as u64);
                    if reaped < reaping.batch {
                        break;
                    }
                }
                Err(e) => {
                    // Said once per outage; the health checks report the database.
                    if !failing {
                        tracing::warn!(error = %e, "the expiry reaper cannot delete expired documents now; retrying");
                    }
                    failing = true;
                    break;
                }
            }
        }
    }
}
