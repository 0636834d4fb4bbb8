//! Whether the configured nameservers answer at all.
//!
//! Each nameserver is asked for the root's NS records on its own, at start,
//! after every config reload and then periodically. Any DNS answer counts,
//! an error code included (an authoritative server that refuses recursion
//! still answers quickly); only silence or a refused connection does not.
//! A nameserver that does not answer is logged by address, shown on the
//! status page and in `portcullis_dns_nameserver_up`. While none answers,
//! lookups get a short deadline (`DOWN_TIMEOUT`), so that every session
//! does not wait the full timeout for a temperror it is bound to get.

use crate::config::DnsConfig;
use crate::telemetry::events;
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{Name, RecordType};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Per-query deadline while no nameserver answers.
pub const DOWN_TIMEOUT: Duration = Duration::from_millis(100);
/// How often the nameservers are checked while they answer, and while not.
pub const CHECK_UP: Duration = Duration::from_secs(60);
pub const CHECK_DOWN: Duration = Duration::from_secs(5);

/// One nameserver as the latest check found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NsState {
    NotChecked,
    Answers,
    Silent(String),
}

pub struct Nameservers {
    probes: Vec<(SocketAddr, TokioResolver)>,
    states: Mutex<Vec<NsState>>,
    /// False once a check found that none answers; true until then.
    answering: AtomicBool,
}

/// The resolver config for these nameservers, UDP with TCP fallback.
pub fn resolver_config(servers: &[SocketAddr]) -> ResolverConfig {
    let servers = servers
        .iter()
        .map(|ns| {
            let (mut udp, mut tcp) = (ConnectionConfig::udp(), ConnectionConfig::tcp());
            (udp.port, tcp.port) = (ns.port(), ns.port());
            NameServerConfig::new(ns.ip(), true, vec![udp, tcp])
        })
        .collect();
    ResolverConfig::from_name_servers(servers)
}

impl Nameservers {
    pub fn new(cfg: &DnsConfig) -> Result<Nameservers, NetError> {
        let mut probes = Vec::new();
        for ns in &cfg.nameservers {
            let mut opts = ResolverOpts::default();
            opts.timeout = cfg.timeout.0;
            opts.attempts = 0;
            opts.cache_size = 0;
            let r = TokioResolver::builder_with_config(
                resolver_config(std::slice::from_ref(ns)),
                TokioRuntimeProvider::default(),
            )
            .with_options(opts)
            .build()?;
            probes.push((*ns, r));
        }
        Ok(Nameservers {
            states: Mutex::new(vec![NsState::NotChecked; probes.len()]),
            probes,
            answering: AtomicBool::new(true),
        })
    }

    /// Whether any nameserver answered the latest check (true before the first).
    pub fn answering(&self) -> bool {
        self.answering.load(Ordering::Relaxed)
    }

    pub fn states(&self) -> Vec<(SocketAddr, NsState)> {
        let states = self.states.lock().map(|s| s.clone()).unwrap_or_default();
        self.probes.iter().map(|(a, _)| *a).zip(states).collect()
    }

    /// Asks every nameserver once, in parallel; logs and counts each change.
    pub async fn check(&self) -> bool {
        let answers = futures_util::future::join_all(self.probes.iter().map(|(_, r)| async {
            match r.lookup(Name::root(), RecordType::NS).await {
                Ok(_) | Err(NetError::Dns(_)) => NsState::Answers,
                Err(e) => NsState::Silent(e.to_string()),
            }
        }))
        .await;
        let mut any = false;
        if let Ok(mut states) = self.states.lock() {
            for (((addr, _), old), new) in self.probes.iter().zip(states.iter_mut()).zip(answers) {
                let up = new == NsState::Answers;
                any |= up;
                let changed = !matches!(
                    (&*old, &new),
                    (NsState::Answers, NsState::Answers) | (NsState::Silent(_), NsState::Silent(_))
                );
                events::Nameserver {
                    nameserver: *addr,
                    silent: match &new {
                        NsState::Silent(e) => Some(e.as_str()),
                        _ => None,
                    },
                    changed,
                }
                .emit();
                *old = new;
            }
        }
        let was = self.answering.swap(any, Ordering::Relaxed);
        let nameservers: Vec<SocketAddr> = self.probes.iter().map(|(a, _)| *a).collect();
        events::DnsHealth {
            up: any,
            went_down: was && !any,
            nameservers: &nameservers,
        }
        .emit();
        any
    }
}
