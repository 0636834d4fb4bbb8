//! Memory across sessions and machines: a small key-value store with
//! expiring entries that greylisting (and later rate limits and client
//! reputation) keep their state in. Two backends behave the same:
//! `embedded` (in process, bounded, saved to a file on shutdown) and
//! `redis` (Redis or Valkey, single server or cluster, shared by every
//! instance). Every call has a deadline; a slow or absent store is an
//! error the caller turns into its `on_error` outcome, never a hang.
//!
//! Time comes from a `Clock`, so tests drive it instead of sleeping.
//! Decisions compare timestamps kept in the values against the clock;
//! the store's own expiry only frees space.

pub mod clock;
mod embedded;
mod remote;

pub use clock::{Clock, SystemClock, TestClock};

use crate::config::{StateBackend, StateConfig};
use crate::telemetry::events::StoreCall;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Backend(String),
}

enum Backend {
    Embedded(embedded::Embedded),
    Redis(Box<remote::Remote>),
}

pub struct Store {
    backend: Backend,
    deadline: Duration,
    clock: Arc<dyn Clock>,
    /// The last call's error, if it failed (for the status page).
    last_error: std::sync::Mutex<Option<String>>,
    /// Calls made (round trips, for Redis).
    calls: AtomicU64,
}

/// How soon a failed probe read is tried again.
const PROBE_RETRY: Duration = Duration::from_millis(100);

impl Store {
    /// The store a config asks for. Redis is connected lazily and again
    /// after every failure, in the background of the calls.
    pub fn open(cfg: &StateConfig, clock: Arc<dyn Clock>) -> Result<Store, StoreError> {
        let backend = match cfg.backend {
            StateBackend::Embedded => Backend::Embedded(embedded::Embedded::open(
                cfg.max_entries,
                cfg.file.clone(),
                Arc::clone(&clock),
            )),
            StateBackend::Redis => Backend::Redis(Box::new(remote::Remote::open(
                &cfg.url,
                cfg.cluster,
                cfg.timeout.0,
            )?)),
        };
        Ok(Store {
            backend,
            deadline: cfg.timeout.0,
            clock,
            last_error: Default::default(),
            calls: AtomicU64::new(0),
        })
    }

    /// An embedded store of `max_entries`, kept nowhere (for `explain`
    /// and tests).
    pub fn in_memory(max_entries: usize, clock: Arc<dyn Clock>) -> Store {
        Store {
            backend: Backend::Embedded(embedded::Embedded::open(
                max_entries,
                None,
                Arc::clone(&clock),
            )),
            deadline: Duration::from_millis(100),
            clock,
            last_error: Default::default(),
            calls: AtomicU64::new(0),
        }
    }

    pub fn backend(&self) -> &'static str {
        match self.backend {
            Backend::Embedded(_) => "embedded",
            Backend::Redis(_) => "redis",
        }
    }

    pub fn clock(&self) -> &dyn Clock {
        &*self.clock
    }

    /// Milliseconds since the epoch, by the store's clock.
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// Whether the store answers, within `within`: one read, tried again
    /// while a Redis connection is still being made. The embedded store
    /// always answers.
    pub async fn probe(&self, within: Duration) -> Result<(), StoreError> {
        let until = tokio::time::Instant::now() + within;
        loop {
            match self.get("portcullis:probe").await {
                Ok(_) => return Ok(()),
                Err(e) if tokio::time::Instant::now() + PROBE_RETRY >= until => return Err(e),
                Err(_) => tokio::time::sleep(PROBE_RETRY).await,
            }
        }
    }

    pub async fn get(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.call("get", async {
            match &self.backend {
                Backend::Embedded(e) => Ok(e.get(key)),
                Backend::Redis(r) => r.get(key).await,
            }
        })
        .await
    }

    /// The values under `keys`, in order: one round trip (MGET).
    pub async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<String>>, StoreError> {
        self.call("get_many", async {
            match &self.backend {
                Backend::Embedded(e) => Ok(keys.iter().map(|k| e.get(k)).collect()),
                Backend::Redis(r) => r.get_many(keys).await,
            }
        })
        .await
    }

    /// The value under `key`; when there is none, stores `value` for
    /// `ttl` and returns None. One round trip.
    pub async fn get_or_set(
        &self,
        key: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<Option<String>, StoreError> {
        self.call("get_or_set", async {
            match &self.backend {
                Backend::Embedded(e) => Ok(e.get_or_set(key, value, ttl)),
                Backend::Redis(r) => r.get_or_set(key, value, ttl).await,
            }
        })
        .await
    }

    pub async fn set(&self, key: &str, value: &str, ttl: Duration) -> Result<(), StoreError> {
        self.call("set", async {
            match &self.backend {
                Backend::Embedded(e) => {
                    e.set(key, value, ttl);
                    Ok(())
                }
                Backend::Redis(r) => r.set(key, value, ttl).await,
            }
        })
        .await
    }

    /// Adds one to the counter under `key` (created with `ttl`); returns
    /// the new count.
    pub async fn incr(&self, key: &str, ttl: Duration) -> Result<i64, StoreError> {
        self.call("incr", async {
            match &self.backend {
                Backend::Embedded(e) => Ok(e.incr(key, ttl)),
                Backend::Redis(r) => r.incr(key, ttl).await,
            }
        })
        .await
    }

    /// GCRA: takes `cost` from the bucket under `key`, which refills one
    /// unit per `interval` and holds `burst` worth of units. Ok(None):
    /// taken; Ok(Some(wait)): refused, the cost fits again after `wait`.
    /// Kept in microseconds, atomic, one round trip; `now` is the store's
    /// clock, so instances agree as far as their clocks do.
    pub async fn gcra(
        &self,
        key: &str,
        interval: Duration,
        burst: Duration,
        cost: u64,
    ) -> Result<Option<Duration>, StoreError> {
        let now = self.clock.now_us();
        let (interval, burst) = (micros(interval).max(1), micros(burst));
        let over = self
            .call("gcra", async {
                match &self.backend {
                    Backend::Embedded(e) => Ok(e.gcra(key, now, interval, burst, cost)),
                    Backend::Redis(r) => r.gcra(key, now, interval, burst, cost).await,
                }
            })
            .await?;
        Ok((over > 0).then(|| Duration::from_micros(over)))
    }

    /// Saves the embedded store to its file (nothing for Redis).
    pub fn save(&self) -> Result<usize, StoreError> {
        match &self.backend {
            Backend::Embedded(e) => e.save(),
            Backend::Redis(_) => Ok(0),
        }
    }

    /// How the last call went: None when it answered (or none was made).
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }

    /// Calls made so far (each a round trip on Redis).
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// Entries held (embedded), for the status page.
    pub fn entries(&self) -> Option<usize> {
        match &self.backend {
            Backend::Embedded(e) => Some(e.len()),
            Backend::Redis(_) => None,
        }
    }

    async fn call<T>(
        &self,
        op: &'static str,
        f: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let r = match tokio::time::timeout(self.deadline, f).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Timeout(self.deadline)),
        };
        StoreCall {
            backend: self.backend(),
            op,
            took: started.elapsed(),
            error: r.as_ref().err().map(|e| e as &dyn std::fmt::Display),
        }
        .emit();
        if let Ok(mut last) = self.last_error.lock() {
            *last = r.as_ref().err().map(ToString::to_string);
        }
        r
    }
}
