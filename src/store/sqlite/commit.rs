//! Group commit: concurrent Writes share one transaction and one fsync.
//! A Write queues itself and waits for the writer connection; whoever gets
//! it takes every queued Write into one `BEGIN IMMEDIATE` transaction, each
//! in a savepoint of its own (so a Write that fails rolls back alone and
//! fails alone), commits once, and answers each. No Write is answered before
//! the commit that holds it: `synchronous=FULL` keeps its meaning.

use super::{feed, immediate, stored, SqliteStore};
use crate::metrics;
use crate::store::plan;
use crate::store::{Micros, Mutation, StoreError, StoreResult, Written};
use rusqlite::Connection;
use std::sync::Mutex;
use tokio::sync::oneshot;

/// One Write waiting for the writer.
struct Job {
    serial: u64,
    mutations: Vec<Mutation>,
    now: Micros,
    reply: oneshot::Sender<StoreResult<Vec<Written>>>,
}

/// The Writes waiting for the writer connection, in arrival order.
#[derive(Default)]
pub(super) struct Queue {
    jobs: Mutex<(u64, Vec<Job>)>,
    /// Transactions run so far (tests read it).
    pub(super) transactions: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue").finish_non_exhaustive()
    }
}

impl Queue {
    fn push(
        &self,
        mutations: Vec<Mutation>,
        now: Micros,
    ) -> (u64, oneshot::Receiver<StoreResult<Vec<Written>>>) {
        let (reply, answer) = oneshot::channel();
        let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        jobs.0 += 1;
        let serial = jobs.0;
        jobs.1.push(Job {
            serial,
            mutations,
            now,
            reply,
        });
        (serial, answer)
    }

    fn take(&self) -> Vec<Job> {
        std::mem::take(&mut self.jobs.lock().unwrap_or_else(|e| e.into_inner()).1)
    }

    /// Takes a job back out if no writer has taken it yet.
    fn withdraw(&self, serial: u64) -> bool {
        let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        let before = jobs.1.len();
        jobs.1.retain(|j| j.serial != serial);
        jobs.1.len() < before
    }
}

/// Withdraws a queued Write when its caller's future is dropped.
struct Pending<'q> {
    queue: &'q Queue,
    serial: u64,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.queue.withdraw(self.serial);
    }
}

impl SqliteStore {
    /// A Write, committed with whatever other Writes wait at the same time.
    pub(super) async fn commit(&self, mutations: Vec<Mutation>) -> StoreResult<Vec<Written>> {
        let started = std::time::Instant::now();
        let (serial, mut answer) = self.queue.push(mutations, self.clock.now());
        // A caller that goes away (a deadline, a cancelled call) before a
        // writer took its Write takes the Write back: it is never applied later.
        let _pending = Pending {
            queue: &self.queue,
            serial,
        };
        let lock = tokio::time::timeout(self.acquire_timeout, self.writer.clone().lock_owned());
        let answered = tokio::select! {
            // Another Write's turn at the writer took this one along.
            answer = &mut answer => answer,
            conn = lock => {
                match conn {
                    Ok(mut conn) => {
                        metrics::pool_acquired(started);
                        let jobs = self.queue.take();
                        if !jobs.is_empty() {
                            self.queue.transactions.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            tokio::task::spawn_blocking(move || run(&mut conn, jobs))
                                .await
                                .map_err(|e| StoreError::Internal(format!("a SQLite task failed: {e}")))?;
                        }
                    }
                    Err(_) if self.queue.withdraw(serial) => return Err(self.busy()),
                    // Taken by a writer just now: its answer is coming.
                    Err(_) => {}
                }
                answer.await
            }
        };
        answered.unwrap_or_else(|_| {
            Err(StoreError::Internal(
                "a SQLite group commit ended without answering".into(),
            ))
        })
    }
}

/// Runs `jobs` in one transaction, each in its own savepoint, and answers
/// each after the commit (or with the commit's failure).
fn run(conn: &mut Connection, jobs: Vec<Job>) {
    let mut tx = match immediate(conn) {
        Ok(tx) => tx,
        Err(e) => {
            let e = failure(&e);
            for job in jobs {
                let _ = job.reply.send(Err(e()));
            }
            return;
        }
    };
    let mut done = Vec::with_capacity(jobs.len());
    for job in jobs {
        let result = (|| {
            // Dropped without `commit`, a savepoint rolls back.
            let sp = tx.savepoint()?;
            let mut results = Vec::with_capacity(job.mutations.len());
            for (index, mutation) in job.mutations.iter().enumerate() {
                let planned = stored(&sp, mutation.key(), mutation.needs_stored_data())
                    .map_err(StoreError::from)
                    .and_then(|row| mutation.plan(row, job.now))
                    .and_then(|planned| {
                        super::apply(&sp, &planned.action)?;
                        feed::record(&sp, &planned.changes, job.now)?;
                        Ok::<plan::Planned, StoreError>(planned)
                    })
                    .map_err(|e| e.in_mutation(index))?;
                results.push(planned.written);
            }
            sp.commit()?;
            Ok(results)
        })();
        done.push((job.reply, result));
    }
    let committed = tx.commit().map_err(|e| failure(&e));
    for (reply, result) in done {
        let result = match (&committed, result) {
            (Err(e), Ok(_)) => Err(e()),
            (_, result) => result,
        };
        let _ = reply.send(result);
    }
}

/// A maker of the error `e` means, for each Write it fails.
fn failure(e: &rusqlite::Error) -> impl Fn() -> StoreError {
    let again = match e {
        rusqlite::Error::SqliteFailure(code, message) => Some((*code, message.clone())),
        _ => None,
    };
    let text = e.to_string();
    move || match &again {
        Some((code, message)) => {
            StoreError::from(rusqlite::Error::SqliteFailure(*code, message.clone()))
        }
        None => StoreError::Internal(format!("SQLite: {text}")),
    }
}
