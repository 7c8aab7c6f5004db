//! A steady write load through a sidecar, for failover tests: writers save
//! new documents and record what was acknowledged (id → rev), when, and the
//! errors by code and reason.

use super::{num, object, procs, Client};
use docsidecar::proto::SaveRequest;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic_types::StatusExt;

/// What the writers saw.
#[derive(Default)]
pub struct Load {
    /// Acknowledged writes: id → rev.
    pub acked: BTreeMap<String, String>,
    /// When each acknowledged call started and ended.
    pub times: Vec<(Instant, Instant)>,
    /// Errors by code and ErrorInfo reason.
    pub errors: BTreeMap<String, usize>,
}

impl Load {
    /// From `since` to the first acknowledged call that started after it.
    pub fn recovery(&self, since: Instant) -> Duration {
        self.times
            .iter()
            .filter(|(s, _)| *s > since)
            .map(|(_, e)| e.duration_since(since))
            .min()
            .expect("a write acknowledged after the event")
    }

    /// The longest acknowledged call.
    pub fn longest(&self) -> Duration {
        self.times
            .iter()
            .map(|(s, e)| e.duration_since(*s))
            .max()
            .unwrap_or_default()
    }

    /// The acknowledged writes missing from `stored` (id → rev), or stored
    /// with another rev.
    pub fn missing_from(&self, stored: &std::collections::HashMap<String, String>) -> Vec<String> {
        self.acked
            .iter()
            .filter(|(id, rev)| stored.get(*id) != Some(rev))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Panics on any error that is not UNAVAILABLE or ABORTED.
    pub fn assert_errors_retryable(&self) {
        for code in self.errors.keys() {
            assert!(
                code.starts_with("Unavailable") || code.starts_with("Aborted"),
                "{:?}",
                self.errors
            );
        }
    }
}

/// Writers saving new documents into `collection` until stopped.
pub struct Writers {
    pub load: Arc<Mutex<Load>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Writers {
    /// `n` writers through `client`, each pausing `pace` between calls (a
    /// steady load, not a flood: the machine also runs the database servers).
    pub fn start(client: &Client, collection: &str, n: usize, pace: Duration) -> Writers {
        let load = Arc::new(Mutex::new(Load::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..n)
            .map(|w| {
                let (mut client, load, stop) = (client.clone(), load.clone(), stop.clone());
                let collection = collection.to_string();
                tokio::spawn(async move {
                    let mut i = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let id = format!("w{w}-{i:06}");
                        i += 1;
                        let request = SaveRequest {
                            collection: collection.clone(),
                            id: id.clone(),
                            data: Some(object(vec![("i", num(i as f64))]).into()),
                            ..Default::default()
                        };
                        let started = Instant::now();
                        match client.save(request).await {
                            Ok(r) => {
                                let mut load = load.lock().unwrap();
                                load.acked.insert(id, r.into_inner().rev);
                                load.times.push((started, Instant::now()));
                            }
                            Err(s) => {
                                let reason = s
                                    .get_error_details()
                                    .error_info()
                                    .map(|e| e.reason.clone())
                                    .unwrap_or_default();
                                let key = format!("{:?} {reason}", s.code());
                                *load.lock().unwrap().errors.entry(key).or_default() += 1;
                            }
                        }
                        tokio::time::sleep(pace).await;
                    }
                })
            })
            .collect();
        Writers { load, stop, tasks }
    }

    /// Waits until `n` calls that started after `since` are acknowledged.
    pub async fn acked_after(&self, since: Instant, n: usize, what: &str) {
        procs::poll(what, Duration::from_secs(120), || async {
            let load = self.load.lock().unwrap();
            let count = load.times.iter().filter(|(s, _)| *s > since).count();
            (count >= n).then_some(()).ok_or(format!("{count} of {n}"))
        })
        .await
        .unwrap();
    }

    /// Stops the writers and waits for them.
    pub async fn stop(self) -> Arc<Mutex<Load>> {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
        self.load
    }
}
