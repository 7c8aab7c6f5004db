//! Background work: one owner, one way to stop.
//!
//! [`Tasks`] holds every background task of the server (health checks, file
//! watchers, the admin listener, a store's own work) in one `JoinSet`; stopping
//! it ends them all the same way. [`FileWatcher`] is the one poller for files
//! that change under a running sidecar: client tokens, TLS certificates and the
//! database password, as Kubernetes rewrites mounted Secrets.

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, warn};

/// The background tasks of one server. Cheap to clone: clones share the set.
#[derive(Clone)]
pub struct Tasks {
    set: Arc<Mutex<JoinSet<()>>>,
    stop: Arc<watch::Sender<bool>>,
}

impl Default for Tasks {
    fn default() -> Self {
        Tasks {
            set: Arc::default(),
            stop: Arc::new(watch::channel(false).0),
        }
    }
}

impl Tasks {
    pub fn new() -> Tasks {
        Tasks::default()
    }

    /// Runs `task` until it finishes or [`Tasks::stop`] is called.
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let stopping = self.stopping();
        let mut set = self.set.lock().unwrap_or_else(|e| e.into_inner());
        // Reap finished tasks so the set does not grow with them.
        while set.try_join_next().is_some() {}
        set.spawn(async move {
            tokio::select! {
                () = task => {}
                () = stopping.wait() => {}
            }
        });
    }

    /// A signal that resolves once the tasks are told to stop.
    pub fn stopping(&self) -> Stopping {
        Stopping(self.stop.subscribe())
    }

    /// Tells every task to stop and waits for them.
    pub async fn stop(&self) {
        self.stop.send_replace(true);
        let mut set = std::mem::take(&mut *self.set.lock().unwrap_or_else(|e| e.into_inner()));
        while let Some(result) = set.join_next().await {
            if let Err(e) = result {
                if e.is_panic() {
                    warn!(error = %e, "a background task panicked");
                }
            }
        }
    }
}

/// Resolves once the owning [`Tasks`] stops (mini-redis's `Shutdown`).
#[derive(Clone)]
pub struct Stopping(watch::Receiver<bool>);

impl Stopping {
    pub async fn wait(mut self) {
        // An error means the sender is gone, which is a stop too.
        let _ = self.0.wait_for(|stop| *stop).await;
    }
}

/// Polls a set of files and hands their contents to a callback when they change.
pub struct FileWatcher {
    files: Vec<PathBuf>,
    every: Duration,
    /// The contents when the watcher was made: the caller has just read the
    /// files and acts on them, so only later changes are news.
    accepted: Option<Vec<Vec<u8>>>,
}

/// How often watched files are checked: Kubernetes updates mounted Secrets
/// within a minute or so, so a second is plenty and costs a few `read`s.
pub const WATCH_EVERY: Duration = Duration::from_secs(1);

/// Hands each new, non-empty password in `file` to `rotate` for as long as
/// `owner` lives (the watcher holds it weakly and stops with it): password
/// rotation for every store that connects with one.
pub fn watch_password<T, F, Fut>(owner: &Arc<T>, file: PathBuf, tasks: &Tasks, rotate: F)
where
    T: Send + Sync + 'static,
    F: Fn(Arc<T>, String) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = bool> + Send,
{
    let owner = Arc::downgrade(owner);
    tasks.spawn(FileWatcher::new(vec![file]).run(move |contents| {
        let (owner, rotate) = (owner.clone(), rotate.clone());
        async move {
            let password = String::from_utf8_lossy(&contents[0]).trim().to_string();
            match owner.upgrade() {
                Some(owner) if !password.is_empty() => rotate(owner, password).await,
                _ => false,
            }
        }
    }));
}

impl FileWatcher {
    /// A watcher of `files`, as they are now (read here, at start-up).
    pub fn new(files: Vec<PathBuf>) -> FileWatcher {
        let accepted = read_all(&files);
        FileWatcher {
            files,
            every: WATCH_EVERY,
            accepted,
        }
    }

    pub fn every(mut self, every: Duration) -> FileWatcher {
        self.every = every;
        self
    }

    /// The files' current contents, read off the async workers.
    async fn read(files: Vec<PathBuf>) -> Option<Vec<Vec<u8>>> {
        tokio::task::spawn_blocking(move || read_all(&files))
            .await
            .ok()
            .flatten()
    }

    /// Calls `on_change` with the new contents whenever they differ from the
    /// last accepted ones; it returns whether it took them (a rotated password
    /// that does not work yet is offered again on the next tick). A file that
    /// cannot be read is skipped until it can: a Secret update replaces files
    /// through a symlink swap, which a reader may catch half-way.
    pub async fn run<F, Fut>(self, mut on_change: F)
    where
        F: FnMut(Vec<Vec<u8>>) -> Fut + Send,
        Fut: Future<Output = bool> + Send,
    {
        let mut accepted = self.accepted;
        let mut ticker = tokio::time::interval(self.every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            ticker.tick().await;
            let Some(contents) = Self::read(self.files.clone()).await else {
                debug!(files = ?self.files, "a watched file cannot be read now");
                continue;
            };
            if accepted.as_ref() != Some(&contents) && on_change(contents.clone()).await {
                accepted = Some(contents);
            }
        }
    }
}

fn read_all(files: &[PathBuf]) -> Option<Vec<Vec<u8>>> {
    files.iter().map(|f| std::fs::read(f).ok()).collect()
}

/// Start-up retries: a doubling delay between attempts, bounded.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    delay: Duration,
    /// Attempts in all; 0 retries forever.
    attempts: u32,
    made: u32,
}

/// Longest wait between attempts.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);
/// Shortest wait: never spin on a refused port.
const MIN_RETRY_DELAY: Duration = Duration::from_millis(10);

impl Backoff {
    pub fn new(attempts: u32, first_delay: Duration) -> Backoff {
        Backoff {
            delay: first_delay.max(MIN_RETRY_DELAY),
            attempts,
            made: 0,
        }
    }

    /// Attempts made so far.
    pub fn attempts_made(&self) -> u32 {
        self.made
    }

    /// Runs `attempt` until it succeeds, fails permanently (`is_transient`
    /// false) or the attempts are used up; returns the last error then.
    /// `on_retry` hears about each failure that will be retried.
    pub async fn retry<T, E, Fut>(
        &mut self,
        mut attempt: impl FnMut() -> Fut,
        is_transient: impl Fn(&E) -> bool,
        mut on_retry: impl FnMut(&E, u32, Duration),
    ) -> Result<T, E>
    where
        Fut: Future<Output = Result<T, E>>,
    {
        loop {
            self.made = self.made.saturating_add(1);
            let error = match attempt().await {
                Ok(value) => return Ok(value),
                Err(e) => e,
            };
            if !is_transient(&error) || (self.attempts != 0 && self.made >= self.attempts) {
                return Err(error);
            }
            on_retry(&error, self.made, self.delay);
            tokio::time::sleep(self.delay).await;
            self.delay = self.delay.saturating_mul(2).min(MAX_RETRY_DELAY);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn stopping_ends_every_task() {
        let tasks = Tasks::new();
        for _ in 0..3 {
            tasks.spawn(std::future::pending());
        }
        tokio::time::timeout(Duration::from_secs(1), tasks.stop())
            .await
            .expect("tasks stop");
    }

    #[tokio::test]
    async fn backoff_stops_on_permanent_errors_and_after_the_attempts() {
        let calls = AtomicUsize::new(0);
        let mut backoff = Backoff::new(3, Duration::from_millis(1));
        let result: Result<(), &str> = backoff
            .retry(
                || async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Err("refused")
                },
                |_| true,
                |_, _, _| {},
            )
            .await;
        assert_eq!(result, Err("refused"));
        assert_eq!(calls.load(Ordering::SeqCst), 3);

        let mut backoff = Backoff::new(0, Duration::from_millis(1));
        let result: Result<(), &str> = backoff
            .retry(|| async { Err("bad password") }, |_| false, |_, _, _| {})
            .await;
        assert_eq!(result, Err("bad password"));
        assert_eq!(backoff.attempts_made(), 1);
    }

    #[tokio::test]
    async fn file_watcher_offers_changes_until_taken() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secret");
        std::fs::write(&file, "one").unwrap();
        let offers = Arc::new(Mutex::new(Vec::new()));
        let seen = offers.clone();
        let tasks = Tasks::new();
        tasks.spawn(
            FileWatcher::new(vec![file.clone()])
                .every(Duration::from_millis(5))
                .run(move |contents| {
                    let seen = seen.clone();
                    async move {
                        let mut seen = seen.lock().unwrap();
                        seen.push(contents[0].clone());
                        // Refuse the first offer of a change: it comes again.
                        seen.len() > 1
                    }
                }),
        );
        std::fs::write(&file, "two").unwrap();
        for _ in 0..400 {
            if offers.lock().unwrap().len() >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
        tasks.stop().await;
        let offers = offers.lock().unwrap();
        assert_eq!(*offers, vec![b"two".to_vec(), b"two".to_vec()]);
    }
}
