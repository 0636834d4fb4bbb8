//! A timer kept for the life of a connection and moved for each wait.
//!
//! `tokio::time::timeout` makes a timer per wait and drops it when the wait
//! ends: a lock on the timer wheel twice per reply, and when the new
//! deadline is the earliest the runtime knows of (an upstream reply waits
//! 60 s while the clients' reads wait 300 s), a write to the runtime's
//! eventfd to wake its own thread: two system calls per message in the
//! load benchmark. Moving a kept timer later is one atomic update.

use std::future::Future;
use std::pin::Pin;
use tokio::time::{Instant, Sleep};

/// A reusable deadline for a sequence of waits (one at a time).
#[derive(Default)]
pub struct Deadline {
    /// Made at the first wait (it needs the runtime's timer).
    sleep: Option<Pin<Box<Sleep>>>,
}

impl Deadline {
    pub fn new() -> Deadline {
        Deadline::default()
    }

    /// `work`'s output, or None if `until` came first.
    pub async fn within<F: Future>(&mut self, until: Instant, work: F) -> Option<F::Output> {
        let sleep = match &mut self.sleep {
            Some(s) => {
                s.as_mut().reset(until);
                s
            }
            None => self.sleep.insert(Box::pin(tokio::time::sleep_until(until))),
        };
        tokio::select! {
            biased;
            v = work => Some(v),
            () = sleep.as_mut() => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const MS: Duration = Duration::from_millis(1);

    #[tokio::test]
    async fn each_wait_gets_its_own_deadline_earlier_or_later() {
        let mut d = Deadline::new();
        // Work that finishes first.
        let v = d.within(Instant::now() + 200 * MS, async { 7 }).await;
        assert_eq!(v, Some(7));
        // A later deadline than the first, then an earlier one: each holds.
        let t = Instant::now();
        let never = std::future::pending::<()>();
        assert_eq!(d.within(t + 300 * MS, never).await, None);
        let took = t.elapsed();
        assert!(took >= 300 * MS && took < 2000 * MS, "{took:?}");
        let t = Instant::now();
        let never = std::future::pending::<()>();
        assert_eq!(d.within(t + 20 * MS, never).await, None);
        let took = t.elapsed();
        assert!(took >= 20 * MS && took < 250 * MS, "{took:?}");
        // After it fired, it can be moved again; work inside it finishes.
        let slow = tokio::time::sleep(30 * MS);
        assert_eq!(d.within(Instant::now() + 2000 * MS, slow).await, Some(()));
    }
}
