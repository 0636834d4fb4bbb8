//! The listener side: accept loops, connection limits, incoming PROXY
//! headers, session tasks, and graceful shutdown.

pub mod proxy_in;
pub mod tls;

use crate::checks::Checker;
use crate::config::{Config, Listen};
use crate::dns::Dns;
use crate::rules::Rules;
use crate::runtime::limits::{ConnectionLimits, MemoryBudget};
use crate::runtime::shutdown::{self, Phase, Shutdown};
use crate::session::{Peer, Runtime, Session, Shared};
use crate::telemetry::RefusedConnection;
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
    #[error("tls: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("{0}")]
    Dns(#[from] crate::dns::DnsFailure),
    #[error("{0}")]
    Rules(#[from] crate::rules::RuleErrors),
    #[error("upstream tls: {0}")]
    UpstreamTls(#[from] crate::upstream::UpstreamTlsError),
}

pub struct Server {
    /// One reloader (and its counters) for SIGHUP and the status page.
    config_reloads: ConfigReloader,
    listeners: Vec<(TcpListener, Listen)>,
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
        let cfg = Arc::new(cfg);
        let mut listeners = Vec::new();
        for l in &cfg.listen {
            let sock = bind(l).map_err(|source| ServerError::Bind {
                addr: l.addr,
                source,
            })?;
            listeners.push((sock, l.clone()));
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
        let shared = Arc::new(Shared {
            rules,
            upstream: Arc::new(Upstream::new(&cfg)?),
            budget: MemoryBudget::new(cfg.limits.memory_budget.as_usize()),
            limits: ConnectionLimits::new(cfg.connection_bounds()),
            runtime: arc_swap::ArcSwap::from_pointee(build_runtime(Arc::clone(&cfg))?),
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
            metrics,
            limits: Arc::clone(&shared.limits),
            shared,
            shutdown: Arc::new(Shutdown::new()),
        })
    }

    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|(l, _)| l.local_addr().ok())
            .collect()
    }

    pub fn rules(&self) -> Arc<Rules> {
        Arc::clone(&self.shared.rules)
    }

    pub fn checker(&self) -> Arc<Checker> {
        Arc::clone(&self.shared.runtime().checker)
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

    /// Reloads the TLS certificate and key (SIGHUP). New STARTTLS handshakes
    /// use them; on error the old ones stay in force.
    pub fn tls_reloader(&self) -> TlsReloader {
        TlsReloader(Arc::clone(&self.shared))
    }

    pub fn shutdown_handle(&self) -> Arc<Shutdown> {
        Arc::clone(&self.shutdown)
    }

    /// Serves until `stop` resolves, then drains: no new connections,
    /// transactions in flight get `timeouts.shutdown` to finish, the rest 421.
    pub async fn run(self, stop: impl Future<Output = ()>) {
        let refresh = self.shared.upstream.spawn_refresh();
        let metrics_task = match (self.metrics, crate::telemetry::metrics::install()) {
            (Some(listener), Some(handle)) => {
                let status = Arc::new(StatusPage {
                    config: self.config_reloads.clone(),
                    started: std::time::Instant::now(),
                    shared: Arc::clone(&self.shared),
                    limits: Arc::clone(&self.limits),
                    handle: handle.clone(),
                });
                Some(tokio::spawn(crate::telemetry::http::serve(
                    listener, handle, status,
                )))
            }
            _ => None,
        };
        // Checks that the nameservers of whichever config is current answer.
        let shared = Arc::clone(&self.shared);
        let dns_check = tokio::spawn(async move {
            loop {
                let checker = Arc::clone(&shared.runtime().checker);
                let in_use = checker.uses_dns() || shared.upstream.wants_client_name();
                let wait = if !in_use || checker.dns.check_nameservers().await {
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
                let checker = Arc::clone(&shared.runtime().checker);
                if !checker.dnsbl.zones.is_empty() {
                    checker.dnsbl.self_test().await;
                }
                tokio::time::sleep(checker.cfg.dnsbl.self_test_interval.0).await;
            }
        }));
        let tracker = TaskTracker::new();
        let mut accept_loops = Vec::new();
        for (listener, conf) in self.listeners {
            accept_loops.push(tokio::spawn(accept_loop(
                listener,
                conf,
                Arc::clone(&self.shared),
                Arc::clone(&self.limits),
                Arc::clone(&self.shutdown),
                tracker.clone(),
            )));
        }
        stop.await;
        tracing::info!(
            open = self.limits.open(),
            "shutting down: draining sessions"
        );
        self.shutdown.set(Phase::Draining);
        for l in accept_loops {
            let _ = l.await;
        }
        tracker.close();
        let deadline = self.shared.runtime().cfg.timeouts.shutdown.0;
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
        refresh.abort();
        dns_check.abort();
        if let Some(t) = metrics_task {
            t.abort();
        }
        if let Some(t) = self_test {
            t.abort();
        }
        tracing::info!("stopped");
    }
}

/// What sessions read from a config: its limits as checks, the checks
/// with their own DNS, and the STARTTLS acceptor.
pub fn build_runtime(cfg: Arc<Config>) -> Result<Runtime, ServerError> {
    let tls = match &cfg.tls {
        Some(t) => Some(tls::acceptor(&t.cert, &t.key)?),
        None => None,
    };
    let dns = Dns::new(&cfg.dns)?;
    Ok(Runtime {
        checks: Runtime::limit_checks(&cfg),
        checker: Arc::new(Checker::new(&cfg.checks, &cfg.hostname, dns)),
        tls,
        cfg,
    })
}

/// What `run` would fail on that the config file alone cannot tell: the
/// certificate and key, the log file's directory, addresses already in use.
/// One line per problem.
pub fn preflight(cfg: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    if let Some(t) = &cfg.tls
        && let Err(e) = tls::acceptor(&t.cert, &t.key)
    {
        problems.push(format!("tls: {e}"));
    }
    if let Some(f) = &cfg.log.file
        && let Some(dir) = f.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.is_dir()
    {
        problems.push(format!(
            "log.file: the directory {} does not exist",
            dir.display()
        ));
    }
    let addrs = cfg
        .listen
        .iter()
        .enumerate()
        .map(|(i, l)| (format!("listen[{i}].addr"), l.addr))
        .chain(
            cfg.metrics
                .listen
                .map(|a| ("metrics.listen".to_string(), a)),
        );
    for (key, addr) in addrs {
        if addr.port() == 0 {
            continue;
        }
        if let Err(e) = std::net::TcpListener::bind(addr) {
            problems.push(format!("{key}: cannot listen on {addr}: {e}"));
        }
    }
    problems
}

/// Binds with our own backlog: the default (128) overflows under bursts and
/// leaves clients waiting for SYN-ACK retransmits.
fn bind(l: &Listen) -> std::io::Result<TcpListener> {
    let sock = if l.addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.bind(l.addr)?;
    sock.listen(l.backlog)
}

/// The status page: uptime, version, rules, DNSBL health, live counters.
struct StatusPage {
    config: ConfigReloader,
    started: std::time::Instant,
    shared: Arc<Shared>,
    limits: Arc<ConnectionLimits>,
    handle: metrics_exporter_prometheus::PrometheusHandle,
}

impl crate::telemetry::http::Status for StatusPage {
    fn html(&self) -> String {
        use std::fmt::Write;
        let esc = |s: &str| {
            s.replace('&', "&amp;")
                .replace('<', "&lt;")
                .replace('>', "&gt;")
        };
        let rules = self.shared.rules.current();
        let loaded = rules
            .loaded_at
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut o = String::from(
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Portcullis status</title></head><body>\n",
        );
        let _ = writeln!(o, "<h1>Portcullis {}</h1>", env!("CARGO_PKG_VERSION"));
        let _ = writeln!(
            o,
            "<p>host {} &middot; up {} s &middot; {} sessions open</p>",
            esc(&self.shared.runtime().cfg.hostname),
            self.started.elapsed().as_secs(),
            self.limits.open()
        );
        let _ = writeln!(
            o,
            "<h2>Rules</h2><p>{} rules from {} files, loaded {} (unix time); reloads: {} ok, {} failed</p>",
            rules.rules().len(),
            rules.files.len(),
            loaded,
            self.shared.rules.reloads_ok.load(Ordering::Relaxed),
            self.shared.rules.reloads_failed.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            o,
            "<h2>Config</h2><p>loaded at start (unix time {}); reloads: {} ok, {} failed</p>",
            self.config.started_at,
            self.config.ok.load(Ordering::Relaxed),
            self.config.failed.load(Ordering::Relaxed)
        );
        if let Ok(keys) = self.config.needs_restart.lock()
            && !keys.is_empty()
        {
            let _ = writeln!(
                o,
                "<p>changed in the file, in force after a restart: {}</p>",
                esc(&keys.join(", "))
            );
        }
        let up = self.shared.upstream.health();
        let _ = writeln!(
            o,
            "<h2>Upstream</h2><p>{}: {}</p>",
            self.shared.upstream.addr,
            match (up.answering, &up.last_error) {
                (Some(true), _) => "answers".to_string(),
                (Some(false), e) => format!(
                    "DOES NOT ANSWER ({})",
                    esc(e.as_deref().unwrap_or("unknown error"))
                ),
                (None, _) => "not probed yet".to_string(),
            }
        );
        let checker = Arc::clone(&self.shared.runtime().checker);
        let _ = writeln!(
            o,
            "<h2>Nameservers</h2><table><tr><th>nameserver</th><th>state</th></tr>"
        );
        for (addr, state) in checker.dns.nameservers.states() {
            let state = match state {
                crate::dns::NsState::Answers => "answers".to_string(),
                crate::dns::NsState::Silent(e) => format!("DOES NOT ANSWER ({})", esc(&e)),
                crate::dns::NsState::NotChecked => "not checked yet".to_string(),
            };
            let _ = writeln!(o, "<tr><td>{addr}</td><td>{state}</td></tr>");
        }
        let _ = writeln!(o, "</table>");
        let _ = writeln!(
            o,
            "<h2>DNSBL zones</h2><table><tr><th>zone</th><th>state</th><th>errors</th></tr>"
        );
        for z in &checker.dnsbl.zones {
            let _ = writeln!(
                o,
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&z.conf.zone),
                if z.usable() { "usable" } else { "disabled" },
                z.errors.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(o, "</table>\n<h2>Counters</h2><pre>");
        for line in self.handle.render().lines().filter(|l| !l.starts_with('#')) {
            let _ = writeln!(o, "{}", esc(line));
        }
        o.push_str("</pre></body></html>\n");
        o
    }
}

/// Reloads the config file (SIGHUP). What changed is in force for new
/// sessions, certificate and DNS included, except the keys only a restart
/// can change (`config::reload`), which are logged by key path. A file
/// that does not load changes nothing.
#[derive(Clone)]
pub struct ConfigReloader {
    shared: Arc<Shared>,
    pub started_at: u64,
    pub ok: Arc<AtomicU64>,
    pub failed: Arc<AtomicU64>,
    /// Keys changed in the file that wait for a restart (status page).
    pub needs_restart: Arc<std::sync::Mutex<Vec<String>>>,
}

/// What a successful reload did, by key path.
#[derive(Debug)]
pub struct Reloaded {
    pub applied: Vec<String>,
    pub needs_restart: Vec<String>,
}

impl ConfigReloader {
    pub async fn reload(&self, path: &std::path::Path) -> Result<Reloaded, String> {
        let result = self.swap(path);
        match &result {
            Ok(r) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut keys) = self.needs_restart.lock() {
                    keys.clone_from(&r.needs_restart);
                }
                ConfigReload::Done {
                    config: path,
                    applied: &r.applied,
                    needs_restart: &r.needs_restart,
                }
                .emit();
            }
            Err(e) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                ConfigReload::Failed { error: e }.emit();
            }
        }
        if result.is_ok() {
            // Tell the admin now, not at the next message, when what the
            // new config points at does not answer.
            let rt = self.shared.runtime();
            if rt.checker.uses_dns() || self.shared.upstream.wants_client_name() {
                rt.checker.dns.check_nameservers().await;
            }
            // A failure is logged (naming upstream) and counted by the probe.
            let _ = self.shared.upstream.probe().await;
        }
        result
    }

    fn swap(&self, path: &std::path::Path) -> Result<Reloaded, String> {
        let new = Config::load(Some(path)).map_err(|e| e.to_string())?;
        let running = self.shared.runtime();
        let plan = crate::config::reload::plan(&running.cfg, new);
        let cfg = Arc::new(plan.effective);
        let unknown = crate::rules::unknown_zones(
            &self.shared.rules.current(),
            &cfg,
            self.shared.rules.dir(),
        );
        if !unknown.is_empty() {
            return Err(crate::rules::RuleErrors(unknown).to_string());
        }
        let runtime = build_runtime(cfg).map_err(|e| e.to_string())?;
        self.shared.runtime.store(Arc::new(runtime));
        Ok(Reloaded {
            applied: plan.applied,
            needs_restart: plan.needs_restart,
        })
    }
}

/// Reloads the certificate and key from the configured files (SIGHUP
/// without a config file to reload).
#[derive(Clone)]
pub struct TlsReloader(Arc<Shared>);

impl TlsReloader {
    pub fn reload(&self) -> Result<(), tls::TlsError> {
        let rt = self.0.runtime();
        let Some(t) = &rt.cfg.tls else {
            return Ok(());
        };
        let acceptor = tls::acceptor(&t.cert, &t.key)?;
        self.0.runtime.store(Arc::new(Runtime {
            cfg: Arc::clone(&rt.cfg),
            checks: Runtime::limit_checks(&rt.cfg),
            checker: Arc::clone(&rt.checker),
            tls: Some(acceptor),
        }));
        Ok(())
    }
}

fn session_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static EPOCH: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    });
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{:08x}{:06x}", epoch as u32, n)
}

async fn accept_loop(
    listener: TcpListener,
    conf: Listen,
    shared: Arc<Shared>,
    limits: Arc<ConnectionLimits>,
    shutdown: Arc<Shutdown>,
    tracker: TaskTracker,
) {
    let mut signal = shutdown.signal();
    let conf = Arc::new(conf);
    loop {
        let accepted = tokio::select! {
            _ = signal.reached(Phase::Draining) => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((sock, peer)) => {
                tracker.spawn(connection(
                    sock,
                    peer,
                    Arc::clone(&conf),
                    Arc::clone(&shared),
                    Arc::clone(&limits),
                    shutdown.signal(),
                ));
            }
            Err(e) => {
                // Usually EMFILE: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn refuse(
    sock: &mut TcpStream,
    id: &str,
    ip: std::net::IpAddr,
    r: &Reply,
    reason: &str,
    limit: Duration,
) {
    let mut out = Vec::new();
    r.write_to(&mut out);
    let _ = tokio::time::timeout(limit, async {
        let _ = sock.write_all(&out).await;
        let _ = sock.shutdown().await;
    })
    .await;
    RefusedConnection {
        session: id,
        client_ip: ip,
        code: r.code,
        enhanced: &r.enhanced_code().unwrap_or_default(),
        reason,
    }
    .emit();
}

async fn connection(
    mut sock: TcpStream,
    peer: SocketAddr,
    conf: Arc<Listen>,
    shared: Arc<Shared>,
    limits: Arc<ConnectionLimits>,
    signal: shutdown::ShutdownSignal,
) {
    let _ = sock.set_nodelay(true);
    let id = session_id();
    let wait = shared.runtime().cfg.timeouts.command.0;
    let Ok(local) = sock.local_addr() else { return };
    let (client, local, initial) = if conf.proxy_protocol {
        if !Config::is_trusted_proxy(&conf, peer.ip().to_canonical()) {
            refuse(
                &mut sock,
                &id,
                peer.ip(),
                &reply::PROXY_REFUSED,
                "proxy:untrusted",
                wait,
            )
            .await;
            return;
        }
        match proxy_in::read(&mut sock, wait).await {
            Ok(p) => (
                p.source.unwrap_or(peer),
                p.destination.unwrap_or(local),
                p.rest,
            ),
            Err(e) => {
                tracing::info!(session = %id, proxy = %peer, error = %e, "bad PROXY header");
                refuse(
                    &mut sock,
                    &id,
                    peer.ip(),
                    &reply::PROXY_REFUSED,
                    "proxy:invalid",
                    wait,
                )
                .await;
                return;
            }
        }
    } else {
        (peer, local, Vec::new())
    };
    let _guard = match limits.acquire(client.ip()) {
        Ok(g) => {
            ConnectionOpened.emit();
            g
        }
        Err(r) => {
            refuse(
                &mut sock,
                &id,
                client.ip(),
                &reply::TOO_MANY_CONNECTIONS,
                r.reason(),
                wait,
            )
            .await;
            return;
        }
    };
    let id_for_log = id.clone();
    let peer = Peer {
        id,
        addr: client,
        local,
    };
    // The session watches its deadline at every read and write; this is
    // the backstop for anything else it might wait on.
    let hard = shared.runtime().cfg.timeouts.session.0 + SESSION_GRACE;
    let session = Session::new(Box::new(sock), peer, shared, signal, initial);
    let deadline = tokio::time::timeout(hard, session.run()).await.is_err();
    ConnectionClosed {
        session: &id_for_log,
        deadline,
    }
    .emit();
}
