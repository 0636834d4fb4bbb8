//! File descriptors: the process's limit raised as far as it may go, the
//! descriptors the configured listeners can hold at most, and one spare
//! descriptor kept per listener so that, with none left, it can still take
//! a connection to answer it (postscreen and nginx do the same).

use crate::config::Config;
use std::sync::Mutex;

/// Descriptors kept for everything that is not a client connection: the
/// listeners, log and state files, DNS sockets, the state store, the
/// runtime's own.
pub const BASE: u64 = 64;

/// Connections the monitoring (HTTP) listener serves at once.
pub const HTTP_CONNECTIONS: usize = 256;

/// The soft limit on open descriptors, after raising it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// Before we raised it.
    pub was: u64,
    pub soft: u64,
    pub hard: u64,
}

/// Raises the soft descriptor limit to the hard one (the unit's
/// LimitNOFILE, or what the shell gave us). None where there is none.
pub fn raise() -> Option<Limit> {
    let (was, hard) = rlimit::Resource::NOFILE.get().ok()?;
    let soft = rlimit::increase_nofile_limit(hard).unwrap_or(was);
    Some(Limit { was, soft, hard })
}

/// The current soft limit (without raising it).
pub fn current() -> Option<Limit> {
    let (soft, hard) = rlimit::Resource::NOFILE.get().ok()?;
    Some(Limit {
        was: soft,
        soft,
        hard,
    })
}

/// What the configured listeners can hold at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Needs {
    /// Two per SMTP session (the client and its upstream connection).
    pub smtp: u64,
    pub milter: u64,
    pub http: u64,
    /// The connection threads' own: each has its runtime's epoll and
    /// eventfd, and a socket of its own on every TCP listener (SMTP and
    /// milter; `SO_REUSEPORT`).
    pub threads: u64,
}

/// Descriptors of one connection thread's runtime (epoll, eventfd).
const PER_THREAD: u64 = 2;

impl Needs {
    pub fn of(cfg: &Config) -> Needs {
        Needs {
            smtp: if cfg.listen.is_empty() {
                0
            } else {
                2 * cfg.limits.max_connections as u64
            },
            milter: if cfg.milter.listen.is_empty() {
                0
            } else {
                cfg.milter.max_connections as u64
            },
            http: if cfg.metrics.listen.is_some() {
                HTTP_CONNECTIONS as u64
            } else {
                0
            },
            threads: {
                let tcp = cfg.listen.len()
                    + cfg
                        .milter
                        .listen
                        .iter()
                        .filter(|l| matches!(l, crate::config::Endpoint::Tcp(_)))
                        .count();
                crate::runtime::workers::count(cfg.threads) as u64 * (PER_THREAD + tcp as u64)
            },
        }
    }

    /// With the base reserve and one spare per listener kind.
    pub fn total(&self) -> u64 {
        BASE + self.smtp + self.milter + self.http + self.threads + 3
    }

    /// Why the limits do not fit in `limit` descriptors, or None.
    pub fn shortfall(&self, limit: u64) -> Option<String> {
        let total = self.total();
        (total > limit).then(|| {
            format!(
                "the configured limits can hold {total} descriptors (SMTP {}: two per \
                 limits.max_connections, milter {}: milter.max_connections, HTTP {}, \
                 connection threads {}: their runtimes and listening sockets, {BASE} for \
                 the rest) but the process may open {limit}: raise LimitNOFILE (ulimit \
                 -n) or lower the limits (or threads); past it, connections are answered \
                 421 or refused and /readyz says why",
                self.smtp, self.milter, self.http, self.threads
            )
        })
    }
}

/// Whether an accept (or socket) failed for want of descriptors.
pub fn exhausted(e: &std::io::Error) -> bool {
    // EMFILE (the process's limit), ENFILE (the system's), and ENOBUFS /
    // ENOMEM (socket buffers) all pass with time, not with retrying now.
    matches!(e.raw_os_error(), Some(24 | 23 | 105 | 12))
}

/// One descriptor held back for the moment there are none.
#[derive(Debug)]
pub struct Spare(Mutex<Option<std::fs::File>>);

impl Spare {
    pub fn new() -> Spare {
        Spare(Mutex::new(open_spare()))
    }

    /// Gives the descriptor back to the process (for one accept).
    pub fn release(&self) -> bool {
        self.lock().take().is_some()
    }

    /// Takes a descriptor again, when there is one.
    pub fn restore(&self) {
        let mut s = self.lock();
        if s.is_none() {
            *s = open_spare();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<std::fs::File>> {
        match self.0.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

impl Default for Spare {
    fn default() -> Self {
        Spare::new()
    }
}

fn open_spare() -> Option<std::fs::File> {
    std::fs::File::open("/dev/null").ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needs_count_every_listener_and_say_what_to_change() {
        let mut cfg = Config::parse(
            "hostname: t\nlisten: [{addr: 127.0.0.1:25}]\nupstream: {addr: 127.0.0.1:10025}\nmetrics: {listen: 127.0.0.1:9100}\nmilter: {listen: [127.0.0.1:8891]}\n",
            std::path::Path::new("t.yaml"),
        )
        .unwrap();
        let n = Needs::of(&cfg);
        assert_eq!(n.smtp, 2000);
        assert_eq!(n.milter, cfg.milter.max_connections as u64);
        assert_eq!(n.http, HTTP_CONNECTIONS as u64);
        assert!(n.shortfall(20_000).is_none());
        let why = n.shortfall(1024).unwrap();
        assert!(
            why.contains("LimitNOFILE") && why.contains("SMTP 2000"),
            "{why}"
        );
        cfg.milter.listen.clear();
        cfg.metrics.listen = None;
        cfg.threads = 1;
        assert_eq!(Needs::of(&cfg).total(), BASE + 2000 + 3 + 3);
    }

    /// Each connection thread has its own socket on every TCP listener
    /// and its runtime's two descriptors; a Unix milter socket is one.
    #[test]
    fn connection_threads_count_their_listening_sockets() {
        let mut cfg = Config::parse(
            "hostname: t\nlisten: [{addr: 127.0.0.1:25}, {addr: 127.0.0.1:587}]\nupstream: {addr: 127.0.0.1:10025}\nmilter: {listen: [127.0.0.1:8891, unix:/run/m.sock]}\nthreads: 32\n",
            std::path::Path::new("t.yaml"),
        )
        .unwrap();
        // Two SMTP listeners and one TCP milter listener: 3 sockets a thread.
        assert_eq!(Needs::of(&cfg).threads, 32 * (2 + 3));
        let why = Needs::of(&cfg).shortfall(2000).unwrap();
        assert!(why.contains("connection threads 160"), "{why}");
        cfg.threads = 1;
        assert_eq!(Needs::of(&cfg).threads, 2 + 3);
    }

    #[test]
    fn the_spare_is_given_back_and_taken_again() {
        let s = Spare::new();
        assert!(s.release());
        assert!(!s.release());
        s.restore();
        assert!(s.release());
    }

    #[test]
    fn out_of_descriptors_is_told_from_other_errors() {
        assert!(exhausted(&std::io::Error::from_raw_os_error(24)));
        assert!(exhausted(&std::io::Error::from_raw_os_error(23)));
        assert!(!exhausted(&std::io::Error::from_raw_os_error(104)));
    }
}
