//! What both front doors (the proxy session and the milter conversation)
//! stand on: the snapshot a reload swaps (`Snapshot`), the handles every
//! connection shares, and who is on the other end. Neither door imports
//! the other; both import this. `ledger`: one transaction's record and
//! its log line, the same for both doors.

pub mod ledger;

use crate::checks::Engine;
use crate::config::Config;
use crate::rules::{RuleSet, RuleWatcher};
use crate::runtime::limits::{ConnectionLimits, MemoryBudget};
use crate::telemetry::RefusedConnection;
use crate::upstream::Upstream;
use crate::wire::reply::Reply;
use arc_swap::ArcSwap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use tokio_rustls::TlsAcceptor;

/// Everything a session (or milter conversation) reads that a reload can
/// change. It takes the current one when it starts and keeps it to the end; every reload
/// (config, rules, certificate) builds a new one.
#[derive(Clone)]
pub struct Snapshot {
    pub cfg: Arc<Config>,
    /// The checks: limits, DNSBL, iprev, SPF, DKIM, DMARC, ARC, rules.
    pub engine: Arc<Engine>,
    /// The administrators' rules.
    pub rules: Arc<RuleSet>,
    /// STARTTLS, when a certificate is configured.
    pub tls: Option<TlsAcceptor>,
}

/// What every connection shares, through either door.
pub struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    pub upstream: Arc<Upstream>,
    pub budget: Arc<MemoryBudget>,
    /// Open sessions; tells when the gate is under stress.
    pub limits: Arc<ConnectionLimits>,
    /// Loads and watches the rules (each reload swaps `snapshot`).
    pub rules: Arc<RuleWatcher>,
    /// Greylisting's memory, kept across reloads.
    pub store: Arc<crate::state::Store>,
}

impl Shared {
    /// The snapshot new sessions get.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Checks the current nameservers when anything asks them (a check,
    /// or upstream wanting client names); true when they answer or when
    /// nothing uses DNS.
    pub async fn check_nameservers(&self) -> bool {
        let rt = self.snapshot();
        if !rt.engine.uses_dns() && !self.upstream.wants_client_name() {
            return true;
        }
        rt.engine.dns.check_nameservers().await
    }
}

/// Who is on the other end.
#[derive(Debug, Clone)]
pub struct Peer {
    pub id: crate::telemetry::SessionId,
    pub addr: SocketAddr,
    pub local: SocketAddr,
}

/// The front door a connection came through, as the log line's `mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Door {
    Proxy,
    Milter,
}

impl Door {
    pub fn mode(self) -> &'static str {
        match self {
            Door::Proxy => "proxy",
            Door::Milter => "milter",
        }
    }
}

/// The one place a connection refused before or at the greeting is logged
/// and counted, whichever door (or the listener) refused it with `r`.
pub fn refused_connection(door: Door, session: &str, client_ip: IpAddr, r: &Reply, reason: &str) {
    RefusedConnection {
        mode: door.mode(),
        session,
        client_ip,
        code: r.code,
        enhanced: &r.enhanced_code().unwrap_or_default(),
        reason,
    }
    .emit();
}

/// A gate's shared handles with no listener, for the doors' unit tests:
/// the config given (DNS checks off unless it says otherwise) and the rules
/// in `rules` (one YAML file's text).
#[cfg(test)]
pub(crate) fn shared_for_tests(yaml: &str, rules: &str) -> Arc<Shared> {
    use crate::state::{Store, SystemClock};
    use std::path::{Path, PathBuf};
    let cfg =
        Arc::new(Config::parse(yaml, Path::new("test.yaml")).unwrap_or_else(|e| panic!("{e}")));
    let set = RuleSet::load_texts(Path::new("."), &[(PathBuf::from("r.yaml"), rules)])
        .unwrap_or_else(|e| panic!("{e}"));
    let watcher = RuleWatcher::new(PathBuf::from("."), set, Default::default());
    let set = watcher.current();
    let store = Arc::new(Store::in_memory(1000, Arc::new(SystemClock)));
    let dns = crate::dns::Dns::new(&cfg.dns).unwrap_or_else(|e| panic!("{e}"));
    let snapshot = Snapshot {
        engine: Arc::new(Engine::new(&cfg, dns, Arc::clone(&store))),
        rules: Arc::clone(&set),
        tls: None,
        cfg: Arc::clone(&cfg),
    };
    Arc::new(Shared {
        snapshot: ArcSwap::from_pointee(snapshot),
        upstream: Arc::new(Upstream::new(&cfg).unwrap_or_else(|e| panic!("{e}"))),
        budget: MemoryBudget::new(cfg.limits.memory_budget.as_usize()),
        limits: ConnectionLimits::new(crate::runtime::limits::ConnectionBounds::of(&cfg)),
        rules: watcher,
        store,
    })
}
