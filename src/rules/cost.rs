//! What evaluating a rule set's DATA stage has cost lately, per KiB of
//! message: the check pool runs a small message's rules on the session's
//! own thread when this says they take well under a millisecond, sparing
//! the hop to a pool thread and back (two thread wake-ups, a fifth of the
//! CPU a small message costs).
//!
//! The estimate is a decaying maximum: a slow evaluation raises it at
//! once, fast ones bring it down a 32nd at a time (from 500 times slower,
//! about 200 messages). A new rule set (every reload) starts unknown, so
//! its first messages go to the pool. A message crafted to be slow for
//! the rules (regexes are linear in their input, but some inputs cost
//! many times others) runs inline only while the estimate is low, and
//! then sends the next 200 or so to the pool.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Nanoseconds per KiB; `UNKNOWN` until a first evaluation is timed.
#[derive(Debug)]
pub struct DataCost(AtomicU64);

const UNKNOWN: u64 = u64::MAX;

impl Default for DataCost {
    fn default() -> Self {
        DataCost(AtomicU64::new(UNKNOWN))
    }
}

/// KiB of a message, at least one (parsing costs something however short).
fn kib(len: usize) -> u64 {
    (len as u64).div_ceil(1024).max(1)
}

impl DataCost {
    /// What a message of `len` bytes is expected to take; `None` when
    /// nothing was timed yet.
    pub fn predict(&self, len: usize) -> Option<Duration> {
        match self.0.load(Ordering::Relaxed) {
            UNKNOWN => None,
            per_kib => Some(Duration::from_nanos(per_kib.saturating_mul(kib(len)))),
        }
    }

    /// Records an evaluation of a `len`-byte message that took `took`.
    pub fn record(&self, len: usize, took: Duration) {
        let sample = u64::try_from(took.as_nanos()).unwrap_or(UNKNOWN - 1) / kib(len);
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                Some(if old == UNKNOWN {
                    sample
                } else {
                    sample.max(old - old / 32)
                })
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_until_timed_then_a_decaying_maximum() {
        let c = DataCost::default();
        assert_eq!(c.predict(2000), None);
        c.record(2000, Duration::from_micros(20));
        // 10 µs per KiB: a 2 KB message 20 µs, a 10 KB one 100 µs.
        assert_eq!(c.predict(2000), Some(Duration::from_micros(20)));
        assert_eq!(c.predict(10 * 1024), Some(Duration::from_micros(100)));
        // A slow one counts at once.
        c.record(1024, Duration::from_millis(5));
        assert_eq!(c.predict(1024), Some(Duration::from_millis(5)));
        // Fast ones bring it down, a 32nd at a time.
        for _ in 0..100 {
            c.record(1024, Duration::from_micros(10));
        }
        assert!(c.predict(1024) > Some(Duration::from_micros(100)));
        for _ in 0..150 {
            c.record(1024, Duration::from_micros(10));
        }
        assert_eq!(c.predict(1024), Some(Duration::from_micros(10)));
    }
}
