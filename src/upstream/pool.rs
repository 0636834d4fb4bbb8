//! Ready upstream connections kept between client sessions.
//!
//! Most senders deliver one message per connection; without a pool each
//! of them costs upstream a connect, a greeting, EHLO (twice with XCLIENT)
//! and QUIT. A connection goes back to the pool only between transactions
//! with nothing unread, and the next session makes it its own with
//! XCLIENT (upstream starts over as for a new client) or, when no client
//! identity is passed, RSET. The reply is the health check; a connection
//! that fails it is closed and the session takes another or a fresh one,
//! so a connection that went bad while idle costs the client nothing.
//! With a PROXY header the client's address is per connection: no reuse.

use super::connection::UpstreamConn;
use crate::config::PoolConfig;
use crate::telemetry::events;
use crate::wire::identity::Identity;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// Error replies after which a connection is not handed on: Postfix counts
/// 4xx and 5xx replies per connection and, past `smtpd_soft_error_limit`
/// (10), sleeps before every reply, past `smtpd_hard_error_limit` (20)
/// hangs up. One client's unknown recipients must not slow the next.
const MAX_ERRORS: u32 = 5;

struct Idle {
    conn: Box<UpstreamConn>,
    /// How the connection identifies clients (`auto` may change its mind
    /// at a later probe; a connection is reused only the same way).
    identity: Identity,
    since: Instant,
}

pub struct Pool {
    max_idle: usize,
    idle_timeout: Duration,
    max_age: Duration,
    max_transactions: u32,
    /// Most recently used last: sessions take the warmest, the reaper
    /// closes from the front.
    idle: Mutex<Vec<Idle>>,
    /// Shutting down: nothing is kept any more.
    closing: AtomicBool,
}

impl Pool {
    pub fn new(cfg: &PoolConfig) -> Pool {
        Pool {
            max_idle: cfg.max_idle,
            idle_timeout: cfg.idle_timeout.0,
            max_age: cfg.max_age.0,
            max_transactions: cfg.max_transactions,
            idle: Mutex::new(Vec::new()),
            closing: AtomicBool::new(false),
        }
    }

    /// Whether connections identified this way may be reused at all.
    pub fn reuses(&self, identity: Identity) -> bool {
        self.max_idle > 0
            && matches!(identity, Identity::Xclient | Identity::None)
            && !self.closing.load(Ordering::Relaxed)
    }

    fn worn(&self, conn: &UpstreamConn, now: Instant) -> bool {
        now.duration_since(conn.born) >= self.max_age
            || conn.transactions >= self.max_transactions
            || conn.errors >= MAX_ERRORS
    }

    /// Idle past `idle_timeout`, or worn: to be closed, not handed on.
    fn stale(&self, i: &Idle, now: Instant) -> bool {
        now.duration_since(i.since) >= self.idle_timeout || self.worn(&i.conn, now)
    }

    /// The most recently used idle connection identified as `identity`,
    /// preferring one opened on this connection thread (its socket is
    /// served by this thread's runtime), with those found stale or
    /// identified otherwise (for the caller to close).
    pub fn take(&self, identity: Identity) -> (Option<Box<UpstreamConn>>, Vec<Box<UpstreamConn>>) {
        let now = Instant::now();
        let mut stale = Vec::new();
        let Ok(mut idle) = self.idle.lock() else {
            return (None, stale);
        };
        let here = crate::runtime::workers::current();
        let (mut mine, mut any) = (None, None);
        for k in (0..idle.len()).rev() {
            if idle[k].identity != identity || self.stale(&idle[k], now) {
                stale.push(idle.remove(k).conn);
                // What was found above `k` moved down by one (`mine` is
                // only ever found last).
                any = any.map(|m: usize| m - 1);
                continue;
            }
            any = any.or(Some(k));
            if idle[k].conn.home == here {
                mine = Some(k);
                break;
            }
        }
        let conn = mine.or(any).map(|k| idle.remove(k).conn);
        events::upstream_pool_idle(idle.len());
        (conn, stale)
    }

    /// Keeps a connection a session is done with, when it is clean and
    /// within the limits and there is room; otherwise hands it back to be
    /// closed.
    pub fn put(&self, conn: Box<UpstreamConn>, identity: Identity) -> Option<Box<UpstreamConn>> {
        if !self.reuses(identity) || !conn.is_clean() || self.worn(&conn, Instant::now()) {
            return Some(conn);
        }
        let Ok(mut idle) = self.idle.lock() else {
            return Some(conn);
        };
        if idle.len() >= self.max_idle {
            return Some(conn);
        }
        idle.push(Idle {
            conn,
            identity,
            since: Instant::now(),
        });
        events::upstream_pool_idle(idle.len());
        None
    }

    /// Takes out the connections idle too long or too old.
    pub fn expired(&self) -> Vec<Box<UpstreamConn>> {
        let now = Instant::now();
        let Ok(mut idle) = self.idle.lock() else {
            return Vec::new();
        };
        let (old, keep): (Vec<Idle>, Vec<Idle>) = std::mem::take(&mut *idle)
            .into_iter()
            .partition(|i| self.stale(i, now));
        *idle = keep;
        events::upstream_pool_idle(idle.len());
        old.into_iter().map(|i| i.conn).collect()
    }

    /// Shutting down: keeps nothing from now on and hands over every idle
    /// connection to be closed.
    pub fn drain(&self) -> Vec<Box<UpstreamConn>> {
        self.closing.store(true, Ordering::Relaxed);
        let Ok(mut idle) = self.idle.lock() else {
            return Vec::new();
        };
        events::upstream_pool_idle(0);
        std::mem::take(&mut *idle)
            .into_iter()
            .map(|i| i.conn)
            .collect()
    }

    /// Idle connections now.
    pub fn idle(&self) -> usize {
        self.idle.lock().map(|i| i.len()).unwrap_or(0)
    }

    /// How often the reaper looks for expired connections.
    pub fn sweep_interval(&self) -> Duration {
        (self.idle_timeout / 2).clamp(Duration::from_millis(100), Duration::from_secs(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A session takes the connection opened on its own thread (served by
    /// its runtime) before a more recent one from another thread, and that
    /// one when there is no other.
    #[tokio::test]
    async fn a_connection_from_the_takers_own_thread_goes_first() {
        let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = upstream.local_addr().unwrap();
        let open = |home| async move {
            let tcp = tokio::net::TcpStream::connect(at).await.unwrap();
            Box::new(UpstreamConn::for_tests(tcp, home))
        };
        let pool = Pool::new(&PoolConfig::default());
        // This test's thread is no connection thread.
        let here = crate::runtime::workers::current();
        assert_eq!(here, None);
        assert!(pool.put(open(here).await, Identity::None).is_none());
        assert!(pool.put(open(Some(7)).await, Identity::None).is_none());
        let (first, stale) = pool.take(Identity::None);
        assert!(stale.is_empty());
        assert_eq!(
            first.map(|c| c.home),
            Some(here),
            "the older one, from here"
        );
        let (second, _) = pool.take(Identity::None);
        assert_eq!(
            second.map(|c| c.home),
            Some(Some(7)),
            "then the other thread's"
        );
        assert_eq!(pool.idle(), 0);
    }
}
