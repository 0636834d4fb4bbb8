//! The listener side: accept loops, connection limits, incoming PROXY
//! headers, session tasks, and graceful shutdown.

mod listener;
mod milter_in;
pub mod notify;
mod preflight;
pub mod proxy_header;
mod reload;
mod status;
pub mod tls;

use listener::{accept_loop, bind};
pub use preflight::{bind_test, preflight};
pub use reload::{ConfigReloader, OnHangup, Reloaded, TlsReloader};
use status::StatusPage;

use crate::checks::Engine;
use crate::config::{Config, Listen};
use crate::dns::Dns;
use crate::gate::{Door, Peer, Shared, Snapshot, refused_connection};
use crate::rules::{RuleSet, RuleWatcher};
use crate::runtime::accept::AcceptHealth;
use crate::runtime::descriptors;
use crate::runtime::limits::{ConnectionBounds, ConnectionLimits, MemoryBudget};
use crate::runtime::shutdown::{self, Phase, Shutdown};
use crate::runtime::workers::{Workers, workers};
use crate::session::Session;
use crate::state::{Clock, Store, SystemClock};
use crate::telemetry::events::{ConfigReload, ConnectionClosed, ConnectionOpened};
use crate::upstream::Upstream;
use crate::wire::reply::{self, Reply};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::task::TaskTracker;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot listen on {path}: {source}")]
    BindUnix {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("tls: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("{0}")]
    Dns(#[from] crate::dns::DnsFailure),
    #[error("{0}")]
    Rules(#[from] crate::rules::RuleErrors),
    #[error("upstream tls: {0}")]
    UpstreamTls(#[from] crate::upstream::UpstreamTlsError),
    #[error("state: {0}")]
    State(#[from] crate::state::StoreError),
}

pub struct Server {
    /// One reloader (and its counters) for SIGHUP and the status page.
    config_reloads: ConfigReloader,
    /// Each SMTP listener's sockets, one per connection thread.
    listeners: Vec<(Vec<std::net::TcpListener>, Listen)>,
    /// The connection threads the sockets were bound for (None: none could
    /// start, and connections run on the caller's runtime).
    workers: Option<&'static Workers>,
    milters: Vec<milter_in::MilterListener>,
    metrics: Option<TcpListener>,
    shared: Arc<Shared>,
    limits: Arc<ConnectionLimits>,
    shutdown: Arc<Shutdown>,
}

/// After the drain deadline, how long sessions get to write their 421.
const ABORT_GRACE: Duration = Duration::from_secs(5);
/// Past `timeouts.session`, how long a session has to say 421 and close
/// before it is dropped.
const SESSION_GRACE: Duration = Duration::from_secs(2);

impl Server {
    /// Binds every listener and builds what sessions share. Does not touch upstream.
    pub async fn bind(cfg: Config) -> Result<Server, ServerError> {
        Self::bind_with_clock(cfg, Arc::new(SystemClock)).await
    }

    /// `bind`, with the clock the state store decides by (tests drive it).
    pub async fn bind_with_clock(
        cfg: Config,
        clock: Arc<dyn Clock>,
    ) -> Result<Server, ServerError> {
        let cfg = Arc::new(cfg);
        let workers = workers(cfg.threads);
        let threads = workers.map_or(1, Workers::len);
        let mut listeners = Vec::new();
        for l in &cfg.listen {
            let sock = bind(l, threads).map_err(|source| ServerError::Bind {
                addr: l.addr,
                source,
            })?;
            listeners.push((sock, l.clone()));
        }
        let mut milters = Vec::new();
        for l in &cfg.milter.listen {
            milters.push(milter_in::bind(l, threads)?);
        }
        if !milters.is_empty() {
            tracing::info!(
                listen = ?cfg.milter.listen,
                "milter listeners bound; the greeting test (greeting.delay) does not apply to milter connections"
            );
        }
        let metrics = match cfg.metrics.listen {
            Some(addr) => {
                let listener = crate::telemetry::http::bind(addr)
                    .await
                    .map_err(|source| ServerError::Bind { addr, source })?;
                // Now, so that what start-up finds (upstream, DNS) is counted.
                crate::telemetry::metrics::install();
                Some(listener)
            }
            None => None,
        };
        let rules = crate::rules::load(&cfg)?;
        let store = Arc::new(Store::open(&cfg.state, clock)?);
        let snapshot = build_snapshot(Arc::clone(&cfg), rules.current(), &store)?;
        let shared = Arc::new(Shared {
            store,
            upstream: Arc::new(Upstream::new(&cfg)?),
            budget: MemoryBudget::new(cfg.limits.memory_budget.as_usize()),
            limits: ConnectionLimits::new(ConnectionBounds::of(&cfg)),
            snapshot: arc_swap::ArcSwap::from_pointee(snapshot),
            rules,
        });
        // A rules reload is a new snapshot for new sessions, like any other.
        let weak = Arc::downgrade(&shared);
        shared.rules.on_reload(move |set| {
            if let Some(shared) = weak.upgrade() {
                shared.snapshot.rcu(|rt| Snapshot {
                    rules: Arc::clone(&set),
                    ..Snapshot::clone(rt)
                });
            }
        });
        let config_reloads = ConfigReloader {
            shared: Arc::clone(&shared),
            started_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            ok: Arc::new(AtomicU64::new(0)),
            failed: Arc::new(AtomicU64::new(0)),
            needs_restart: Arc::default(),
        };
        Ok(Server {
            config_reloads,
            listeners,
            workers,
            milters,
            metrics,
            limits: Arc::clone(&shared.limits),
            shared,
            shutdown: Arc::new(Shutdown::new()),
        })
    }

    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|(l, _)| l.first()?.local_addr().ok())
            .collect()
    }

    /// The bound TCP milter listeners' addresses.
    pub fn milter_addrs(&self) -> Vec<SocketAddr> {
        self.milters.iter().filter_map(|m| m.local_addr()).collect()
    }

    pub fn rules(&self) -> Arc<RuleWatcher> {
        Arc::clone(&self.shared.rules)
    }

    pub fn engine(&self) -> Arc<Engine> {
        Arc::clone(&self.shared.snapshot().engine)
    }

    /// Applies a reloaded config where that is safe.
    pub fn config_reloader(&self) -> ConfigReloader {
        self.config_reloads.clone()
    }

    /// Where `/metrics` and the status page are served, if configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn upstream(&self) -> Arc<Upstream> {
        Arc::clone(&self.shared.upstream)
    }

    /// Logs what the gate runs with and probes the state store (start-up).
    pub async fn announce(&self) {
        announce(&self.shared).await;
    }

    /// Reloads the TLS certificate and key (SIGHUP). New STARTTLS handshakes
    /// use them; on error the old ones stay in force.
    pub fn tls_reloader(&self) -> TlsReloader {
        TlsReloader(Arc::clone(&self.shared))
    }

    /// What SIGHUP does, for the log file given and the config file the
    /// gate was started with (if any).
    pub fn on_hangup(
        &self,
        log: crate::telemetry::LogTarget,
        config_path: Option<std::path::PathBuf>,
    ) -> OnHangup {
        OnHangup {
            log,
            rules: self.rules(),
            config: self.config_reloader(),
            tls: self.tls_reloader(),
            config_path,
        }
    }

    /// Serves until `stop` resolves, then drains: no new connections,
    /// transactions in flight get `timeouts.shutdown` to finish, the rest 421.
    pub async fn run(self, stop: impl Future<Output = ()>) {
        let watchdog = notify::spawn_watchdog();
        // Milter-only (no SMTP listener): there is no upstream to watch.
        let refresh = (!self.listeners.is_empty()).then(|| self.shared.upstream.spawn_refresh());
        let reaper = (!self.listeners.is_empty()).then(|| self.shared.upstream.spawn_pool_reaper());
        // Each listener's accept health, for the log, metrics and /readyz.
        let smtp_health: Vec<Arc<AcceptHealth>> = self
            .listeners
            .iter()
            .map(|(_, l)| Arc::new(AcceptHealth::new("smtp", format!("smtp {}", l.addr))))
            .collect();
        let milter_health: Vec<Arc<AcceptHealth>> = self
            .milters
            .iter()
            .map(|m| Arc::new(AcceptHealth::new("milter", format!("milter {}", m.name()))))
            .collect();
        let http_health = self
            .metrics
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map(|a| Arc::new(AcceptHealth::new("http", format!("http {a}"))));
        let accepting: Vec<Arc<AcceptHealth>> = smtp_health
            .iter()
            .chain(&milter_health)
            .chain(&http_health)
            .cloned()
            .collect();
        let metrics_task = match (
            self.metrics,
            crate::telemetry::metrics::install(),
            http_health,
        ) {
            (Some(listener), Some(handle), Some(http_health)) => {
                let status = Arc::new(StatusPage {
                    accepting,
                    config: self.config_reloads.clone(),
                    started: std::time::Instant::now(),
                    shared: Arc::clone(&self.shared),
                    limits: Arc::clone(&self.limits),
                    handle: handle.clone(),
                    shutdown: Arc::clone(&self.shutdown),
                    bound: (self.listeners.len(), self.milters.len()),
                });
                Some(tokio::spawn(crate::telemetry::http::serve(
                    listener,
                    handle,
                    status,
                    http_health,
                    descriptors::HTTP_CONNECTIONS,
                )))
            }
            _ => None,
        };
        // Checks that the nameservers of whichever config is current answer.
        let shared = Arc::clone(&self.shared);
        let dns_check = tokio::spawn(async move {
            loop {
                let wait = if shared.check_nameservers().await {
                    crate::dns::health::CHECK_UP
                } else {
                    crate::dns::health::CHECK_DOWN
                };
                tokio::time::sleep(wait).await;
            }
        });
        // Tests the DNSBL zones of whichever checks are current (they can be
        // swapped by a config reload).
        let shared = Arc::clone(&self.shared);
        let self_test = Some(tokio::spawn(async move {
            loop {
                let engine = Arc::clone(&shared.snapshot().engine);
                for lists in [&engine.dnsbl, &engine.uribl] {
                    if !lists.zones.is_empty() {
                        lists.self_test().await;
                    }
                }
                tokio::time::sleep(engine.cfg.dnsbl.self_test_interval.0).await;
            }
        }));
        let tracker = TaskTracker::new();
        let mut accept_loops = Vec::new();
        // Each connection thread accepts on its own socket of every
        // listener, and serves what it accepted.
        let on_thread = |i: usize, run: std::pin::Pin<Box<dyn Future<Output = ()> + Send>>| {
            match self.workers {
                Some(w) => w.spawn_on(i, run),
                None => tokio::spawn(run),
            }
        };
        for ((sockets, conf), health) in self.listeners.into_iter().zip(smtp_health) {
            for (i, listener) in sockets.into_iter().enumerate() {
                accept_loops.push(on_thread(
                    i,
                    Box::pin(accept_loop(
                        listener,
                        conf.clone(),
                        Arc::clone(&self.shared),
                        Arc::clone(&self.limits),
                        Arc::clone(&self.shutdown),
                        tracker.clone(),
                        Arc::clone(&health),
                    )),
                ));
            }
        }
        let cfg = self.shared.snapshot().cfg.clone();
        let milter_limits = ConnectionLimits::new(ConnectionBounds::milter(&cfg));
        for (m, health) in self.milters.into_iter().zip(milter_health) {
            for (i, socket) in m.each_thread().into_iter().enumerate() {
                accept_loops.push(on_thread(
                    i,
                    Box::pin(milter_in::accept_loop(
                        socket,
                        Arc::clone(&self.shared),
                        Arc::clone(&self.shutdown),
                        tracker.clone(),
                        Arc::clone(&milter_limits),
                        Arc::clone(&health),
                    )),
                ));
            }
        }
        stop.await;
        notify::stopping();
        tracing::info!(
            open = self.limits.open(),
            "shutting down: draining sessions"
        );
        self.shutdown.set(Phase::Draining);
        for l in accept_loops {
            let _ = l.await;
        }
        tracker.close();
        let deadline = self.shared.snapshot().cfg.timeouts.shutdown.0;
        if tokio::time::timeout(deadline, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                open = self.limits.open(),
                "drain deadline passed: closing the rest with 421"
            );
            self.shutdown.set(Phase::Abort);
            let _ = tokio::time::timeout(ABORT_GRACE, tracker.wait()).await;
        }
        if let Some(r) = refresh {
            r.abort();
        }
        if let Some(r) = reaper {
            r.abort();
        }
        // Upstream hears QUIT on every connection it was keeping for us.
        self.shared.upstream.close_pool().await;
        if let Some(w) = watchdog {
            w.abort();
        }
        dns_check.abort();
        if let Some(t) = metrics_task {
            t.abort();
        }
        if let Some(t) = self_test {
            t.abort();
        }
        match self.shared.store.save() {
            Ok(0) => {}
            Ok(n) => tracing::info!(entries = n, "state saved"),
            Err(e) => tracing::warn!(error = %e, "state not saved"),
        }
        tracing::info!("stopped");
    }
}

/// What sessions read from a config: the checks with their own DNS, and
/// the STARTTLS acceptor.
pub fn build_snapshot(
    cfg: Arc<Config>,
    rules: Arc<RuleSet>,
    store: &Arc<Store>,
) -> Result<Snapshot, ServerError> {
    let tls = match &cfg.tls {
        Some(t) => Some(tls::acceptor(&t.cert, &t.key)?),
        None => None,
    };
    let dns = Dns::new(&cfg.dns)?;
    Ok(Snapshot {
        engine: Arc::new(Engine::new(&cfg, dns, Arc::clone(store))),
        rules,
        tls,
        cfg,
    })
}

/// Raises the descriptor limit as far as it goes (the soft limit to the
/// hard one) and says, at start, when the configured limits do not fit in
/// it. Process-wide: called once, by `portcullis run`, before binding.
pub fn raise_descriptors(cfg: &Config) {
    let Some(l) = descriptors::raise() else {
        return;
    };
    let needs = descriptors::Needs::of(cfg);
    tracing::info!(
        limit = l.soft,
        was = l.was,
        needed = needs.total(),
        "open descriptors: soft limit raised to the hard limit"
    );
    if let Some(why) = needs.shortfall(l.soft) {
        tracing::warn!("{why}");
    }
}

/// Logs each check's mode and the config's warnings, and probes the state
/// store: a store that does not answer is an error line and
/// `portcullis_state_up 0`, now rather than at the first greylisted
/// message. At start and after each config reload.
pub(crate) async fn announce(shared: &Shared) {
    let cfg = &shared.snapshot().cfg;
    let modes: Vec<(String, &'static str, &'static str)> = cfg
        .checks
        .modes()
        .into_iter()
        .map(|(name, m)| (name, m.as_str(), m.meaning()))
        .collect();
    crate::telemetry::events::Posture {
        modes: &modes,
        warnings: &cfg.warnings(),
    }
    .emit();
    if let Err(e) = shared.store.probe(STATE_PROBE).await {
        crate::telemetry::events::StateStoreDown {
            backend: shared.store.backend(),
            error: &e,
        }
        .emit();
    }
}

/// How long the state store has to answer `announce`'s probe.
const STATE_PROBE: Duration = Duration::from_secs(2);

/// When the configured limits would not fit in the descriptors `run`
/// gets here (the hard limit of this process; under systemd the unit's
/// LimitNOFILE): a warning for `check`, or None.
pub fn descriptor_warning(cfg: &Config) -> Option<String> {
    let l = descriptors::current()?;
    descriptors::Needs::of(cfg)
        .shortfall(l.hard)
        .map(|w| format!("descriptors (hard limit of this shell): {w}"))
}
