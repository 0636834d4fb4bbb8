//! How a listener's accepts go: an accept that fails for want of
//! descriptors backs off instead of spinning, is logged once per episode
//! (when it begins, and with its counts when it ends), is counted, and
//! makes `/readyz` say not ready while it lasts; connections refused at the
//! listener's own limit likewise, logged once per episode.

use super::descriptors;
use crate::telemetry::events::{AcceptTrouble, Trouble};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// An episode ends after this long without a failure.
pub const QUIET: Duration = Duration::from_secs(10);
/// Back-off after a failed accept: doubled each time, up to the maximum.
const BACKOFF_MIN: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// One listener's accept health, shared with the status page.
#[derive(Debug)]
pub struct AcceptHealth {
    /// `smtp`, `milter` or `http` (a metric label).
    pub kind: &'static str,
    /// What the log and `/readyz` call it: `smtp 127.0.0.1:25`.
    pub name: String,
    /// Accepts failing for want of descriptors (not ready while it lasts).
    failing: Mutex<Option<Episode>>,
    /// Other accept errors (a connection reset before it was taken).
    errors: Mutex<Option<Episode>>,
    full: Mutex<Option<Episode>>,
    backoff: Mutex<Duration>,
    /// Held back for an accept when there is no descriptor left.
    pub spare: descriptors::Spare,
}

#[derive(Debug, Clone, Copy)]
struct Episode {
    began: Instant,
    last: Instant,
    count: u64,
}

impl AcceptHealth {
    pub fn new(kind: &'static str, name: String) -> AcceptHealth {
        AcceptHealth {
            kind,
            name,
            failing: Mutex::new(None),
            errors: Mutex::new(None),
            full: Mutex::new(None),
            backoff: Mutex::new(BACKOFF_MIN),
            spare: descriptors::Spare::new(),
        }
    }

    /// An accept failed; returns how long to wait before the next.
    pub fn failed(&self, e: &std::io::Error) -> Duration {
        if descriptors::exhausted(e) {
            self.note(&self.failing, Trouble::Descriptors, &e.to_string());
        } else {
            self.note(&self.errors, Trouble::Error, &e.to_string());
        }
        let mut b = lock(&self.backoff);
        let wait = *b;
        *b = (*b * 2).min(BACKOFF_MAX);
        wait
    }

    /// A connection refused at the listener's own limit (`reason`).
    pub fn refused(&self, reason: &str) {
        self.note(&self.full, Trouble::Full, reason);
    }

    /// An accept succeeded: the back-off starts over, and an episode quiet
    /// for long enough ends (logged with its counts).
    pub fn accepted(&self) {
        *lock(&self.backoff) = BACKOFF_MIN;
        self.end_if_quiet();
    }

    fn note(&self, which: &Mutex<Option<Episode>>, trouble: Trouble, detail: &str) {
        let now = Instant::now();
        let mut e = lock(which);
        let began = e.is_none();
        let ep = e.get_or_insert(Episode {
            began: now,
            last: now,
            count: 0,
        });
        ep.last = now;
        ep.count += 1;
        AcceptTrouble {
            listener: &self.name,
            kind: self.kind,
            trouble,
            detail,
            began,
            ended: None,
        }
        .emit();
    }

    fn end_if_quiet(&self) {
        for (which, trouble) in [
            (&self.failing, Trouble::Descriptors),
            (&self.errors, Trouble::Error),
            (&self.full, Trouble::Full),
        ] {
            let mut e = lock(which);
            if let Some(ep) = *e
                && ep.last.elapsed() >= QUIET
            {
                *e = None;
                AcceptTrouble {
                    listener: &self.name,
                    kind: self.kind,
                    trouble,
                    detail: "",
                    began: false,
                    ended: Some((ep.count, ep.last.duration_since(ep.began))),
                }
                .emit();
            }
        }
    }

    /// For `/readyz`: why this listener is not taking connections as it
    /// should now (accepts failing within the last `QUIET`), or None.
    pub fn trouble(&self) -> Option<String> {
        self.end_if_quiet();
        let e = (*lock(&self.failing))?;
        Some(format!(
            "{}: accept failing ({} failures in {}s, last {}s ago): out of descriptors?",
            self.name,
            e.count,
            e.last.duration_since(e.began).as_secs(),
            e.last.elapsed().as_secs()
        ))
    }

    /// Connections refused at the listener's limit in the current episode.
    pub fn refusing(&self) -> Option<u64> {
        lock(&self.full).map(|e| e.count)
    }
}

impl crate::telemetry::http::AcceptWatch for AcceptHealth {
    fn failed(&self, e: &std::io::Error) -> Duration {
        AcceptHealth::failed(self, e)
    }
    fn accepted(&self) {
        AcceptHealth::accepted(self)
    }
    fn out_of_descriptors(&self, e: &std::io::Error) -> bool {
        descriptors::exhausted(e)
    }
    fn release_spare(&self) -> bool {
        self.spare.release()
    }
    fn restore_spare(&self) {
        self.spare.restore()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_back_off_and_show_until_quiet() {
        let h = AcceptHealth::new("milter", "milter 127.0.0.1:8891".into());
        assert!(h.trouble().is_none());
        let emfile = std::io::Error::from_raw_os_error(24);
        let waits: Vec<Duration> = (0..8).map(|_| h.failed(&emfile)).collect();
        assert_eq!(waits[0], BACKOFF_MIN);
        assert!(waits.windows(2).all(|w| w[1] >= w[0]));
        assert_eq!(*waits.last().unwrap(), BACKOFF_MAX);
        let t = h.trouble().unwrap();
        assert!(
            t.contains("8 failures") && t.contains("milter 127.0.0.1:8891"),
            "{t}"
        );
        h.accepted();
        // Not quiet long enough yet: still shown, back-off reset.
        assert!(h.trouble().is_some());
        assert_eq!(h.failed(&emfile), BACKOFF_MIN);
    }

    #[test]
    fn other_accept_errors_back_off_but_leave_readiness_alone() {
        let h = AcceptHealth::new("smtp", "smtp 127.0.0.1:25".into());
        let aborted = std::io::Error::from_raw_os_error(103); // ECONNABORTED
        assert_eq!(h.failed(&aborted), BACKOFF_MIN);
        assert!(h.failed(&aborted) > BACKOFF_MIN);
        assert!(h.trouble().is_none());
    }

    #[test]
    fn refusals_at_the_limit_are_counted_per_episode() {
        let h = AcceptHealth::new("milter", "milter".into());
        h.refused("limit:connections");
        h.refused("limit:connections_per_ip");
        assert_eq!(h.refusing(), Some(2));
        assert!(h.trouble().is_none());
    }
}
