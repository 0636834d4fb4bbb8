//! The SMTP client side: everything that talks to the MTA behind us.
//!
//! `Upstream` is shared by all sessions. It probes upstream's EHLO at start
//! and every `probe_interval` (what we may offer clients depends on it),
//! resolves `client_identity: auto`, and opens per-session connections.
//! What upstream can do is learned, not guessed: every EHLO reply the gate
//! sees refreshes it, a failed probe is retried with backoff (1 s, 2 s, 4 s
//! ... up to the interval), and a client's EHLO while nothing is known
//! probes at once, so start-up order does not matter.

mod capabilities;
mod connection;
mod pool;
mod tls;

pub use crate::wire::identity::{ClientIdentity, DnsName, Identity, proxy_header, xclient_line};
pub use capabilities::Capabilities;
pub use connection::{Dial, UpStage, UpTimeouts, UpstreamConn, UpstreamError};
pub use pool::Pool;
pub use tls::UpstreamTlsError;

use crate::config::{Config, IdentityMode as Mode, UpstreamTls as UpstreamTlsMode};
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio_rustls::rustls::pki_types::ServerName;

/// Why a probe could not settle how to reach upstream.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("upstream unreachable: {0}")]
    Unreachable(#[from] UpstreamError),
    #[error(
        "upstream {0} offers no XCLIENT ADDR and does not expect a PROXY header; \
         set upstream.client_identity to xclient (Postfix smtpd_authorized_xclient_hosts), \
         proxy-v2/proxy-v1 (Exim hosts_proxy, Postfix smtpd_upstream_proxy_protocol), \
         or none to pass no client address"
    )]
    NoIdentity(SocketAddr),
}

#[derive(Debug, Default)]
struct State {
    capabilities: Option<Arc<Capabilities>>,
    identity: Option<Identity>,
    last_error: Option<String>,
    /// Whether the latest probe or connection succeeded (None: not tried yet).
    answering: Option<bool>,
}

/// Upstream as the latest probe or connection found it, for the status page.
#[derive(Debug, Clone)]
pub struct Health {
    pub answering: Option<bool>,
    pub last_error: Option<String>,
}

pub struct Upstream {
    pub addr: SocketAddr,
    dial: Dial,
    mode: Mode,
    probe_interval: Duration,
    state: RwLock<State>,
    /// One probe at a time; others wait for its result.
    probing: tokio::sync::Mutex<()>,
    /// Ready connections between client sessions.
    pub pool: Pool,
}

/// The first retry after a failed probe; doubled up to `probe_interval`.
const FIRST_RETRY: Duration = Duration::from_secs(1);

/// When the refresh loop probes next.
#[derive(Debug)]
struct Backoff {
    interval: Duration,
    retry: Duration,
}

impl Backoff {
    fn new(interval: Duration) -> Self {
        Backoff {
            interval,
            retry: FIRST_RETRY,
        }
    }

    /// The wait after a probe's result: the interval after a success;
    /// after upstream failed, 1 s, 2 s, 4 s ... up to the interval. A
    /// failure of ours (out of descriptors under a flood) is retried at
    /// 1 s without growing the backoff, so /readyz recovers as soon as the
    /// flood's connections go, not one backed-off interval later.
    fn after<T>(&mut self, result: &Result<T, ProbeError>) -> Duration {
        match result {
            Ok(_) => {
                self.retry = FIRST_RETRY;
                self.interval
            }
            Err(ProbeError::Unreachable(e)) if e.is_local() => FIRST_RETRY.min(self.interval),
            Err(_) => {
                let wait = self.retry.min(self.interval);
                self.retry = (self.retry * 2).min(self.interval);
                wait
            }
        }
    }
}

/// How long the `auto` probe waits for a greeting before trying PROXY v2.
const AUTO_GREETING_WAIT: Duration = Duration::from_secs(3);

impl Upstream {
    pub fn new(cfg: &Config) -> Result<Upstream, UpstreamTlsError> {
        let t = &cfg.upstream.timeouts;
        let tls = match cfg.upstream.tls {
            UpstreamTlsMode::None => None,
            UpstreamTlsMode::Starttls => {
                let name = match &cfg.upstream.tls_name {
                    Some(n) => ServerName::try_from(n.clone()).map_err(|e| UpstreamTlsError {
                        path: "upstream.tls_name".into(),
                        message: e.to_string(),
                    })?,
                    None => ServerName::IpAddress(cfg.upstream.addr.ip().into()),
                };
                Some((tls::connector(cfg.upstream.tls_ca.as_deref())?, name))
            }
        };
        let fixed = match cfg.upstream.client_identity {
            Mode::Xclient => Some(Identity::Xclient),
            Mode::ProxyV1 => Some(Identity::ProxyV1),
            Mode::ProxyV2 => Some(Identity::ProxyV2),
            Mode::None => Some(Identity::None),
            Mode::Auto => None,
        };
        Ok(Upstream {
            addr: cfg.upstream.addr,
            dial: Dial {
                addr: cfg.upstream.addr,
                helo: cfg.upstream_helo().to_string(),
                timeouts: UpTimeouts {
                    connect: t.connect.0,
                    command: t.command.0,
                    data: t.data.0,
                },
                tls,
                chunking: cfg.upstream.chunking,
            },
            mode: cfg.upstream.client_identity,
            probe_interval: cfg.upstream.probe_interval.0,
            state: RwLock::new(State {
                identity: fixed,
                ..State::default()
            }),
            probing: tokio::sync::Mutex::new(()),
            pool: Pool::new(&cfg.upstream.pool),
        })
    }

    /// Upstream's capabilities from the latest EHLO, if any succeeded.
    pub fn capabilities(&self) -> Option<Arc<Capabilities>> {
        self.state.read().ok().and_then(|s| s.capabilities.clone())
    }

    /// Whether upstream is told the client's DNS name (XCLIENT NAME,
    /// REVERSE_NAME), so sessions must look it up.
    pub fn wants_client_name(&self) -> bool {
        match self.mode {
            Mode::Xclient => true,
            Mode::Auto => matches!(self.identity(), None | Some(Identity::Xclient)),
            Mode::ProxyV1 | Mode::ProxyV2 | Mode::None => false,
        }
    }

    /// How the client identity is passed, once known.
    pub fn identity(&self) -> Option<Identity> {
        self.state.read().ok().and_then(|s| s.identity)
    }

    fn record(&self, caps: Option<Capabilities>, identity: Option<Identity>, err: Option<String>) {
        // The common case, a connection confirming what is known, takes
        // no write lock and allocates nothing.
        if identity.is_none()
            && err.is_none()
            && let Ok(s) = self.state.read()
            && s.answering == Some(true)
            && caps
                .as_ref()
                .is_none_or(|c| s.capabilities.as_deref() == Some(c))
        {
            return;
        }
        let Ok(mut s) = self.state.write() else {
            return;
        };
        if let Some(c) = caps {
            s.capabilities = Some(Arc::new(c));
        }
        if identity.is_some() {
            s.identity = identity;
        }
        let now = err.is_none();
        // Every connection records; only a change is logged and counted.
        if s.answering != Some(now) {
            crate::telemetry::events::UpstreamState {
                upstream: self.addr,
                error: err.as_deref(),
            }
            .emit();
        }
        s.answering = Some(now);
        s.last_error = err;
    }

    /// Whether upstream answered its latest probe or connection.
    pub fn health(&self) -> Health {
        match self.state.read() {
            Ok(s) => Health {
                answering: s.answering,
                last_error: s.last_error.clone(),
            },
            Err(_) => Health {
                answering: None,
                last_error: None,
            },
        }
    }

    /// Upstream's capabilities for a client's EHLO. While none are known
    /// (upstream was down at every probe so far), probe now, within the
    /// connect timeout; a probe already under way is waited for instead.
    pub async fn capabilities_for_client(&self) -> Option<Arc<Capabilities>> {
        if let Some(c) = self.capabilities() {
            return Some(c);
        }
        Box::pin(self.learn_capabilities()).await
    }

    /// Upstream's capabilities not known yet: probe (or wait for the probe
    /// under way), up to the connect timeout.
    async fn learn_capabilities(&self) -> Option<Arc<Capabilities>> {
        let limit = self.dial.timeouts.connect;
        match self.probing.try_lock() {
            Ok(_guard) => {
                let _ = tokio::time::timeout(limit, self.probe_unlocked()).await;
            }
            Err(_) => {
                let _ = tokio::time::timeout(limit, self.probing.lock()).await;
            }
        }
        self.capabilities()
    }

    /// Connects once, learns upstream's EHLO and (for `auto`) how to pass the
    /// client identity.
    pub async fn probe(&self) -> Result<Identity, ProbeError> {
        let _guard = self.probing.lock().await;
        self.probe_unlocked().await
    }

    async fn probe_unlocked(&self) -> Result<Identity, ProbeError> {
        let result = self.probe_inner().await;
        match &result {
            Ok(id) => {
                tracing::debug!(upstream = %self.addr, identity = id.as_str(), "upstream probe ok");
            }
            Err(e) => self.record(None, None, Some(e.to_string())),
        }
        result
    }

    async fn probe_inner(&self) -> Result<Identity, ProbeError> {
        let identity = match (self.mode, self.identity()) {
            (Mode::Auto, None) => self.detect().await?,
            (_, Some(id)) => id,
            (_, None) => Identity::None,
        };
        let conn = UpstreamConn::open(&self.dial, identity, None).await?;
        let caps = conn.capabilities.clone();
        conn.quit().await;
        if self.mode == Mode::Auto && identity == Identity::Xclient && !caps.xclient_addr() {
            // Upstream stopped offering XCLIENT since we last looked.
            return Err(ProbeError::NoIdentity(self.addr));
        }
        self.record(Some(caps), Some(identity), None);
        Ok(identity)
    }

    /// `auto`: XCLIENT when offered; otherwise PROXY v2 when upstream takes
    /// it. A silent listener goes straight to PROXY v2. One that greeted but
    /// offers no XCLIENT is tried with PROXY v2 too: a listener waiting for a
    /// PROXY header may greet once its own wait runs out and then refuse
    /// every command (Exim after `proxy_protocol_timeout`, 3 s, as long as
    /// our greeting wait). A plain SMTP server reads the v2 signature's
    /// `QUIT` and hangs up, so that try fails and nothing else is sent.
    async fn detect(&self) -> Result<Identity, ProbeError> {
        let wait = AUTO_GREETING_WAIT.min(self.dial.timeouts.connect);
        if UpstreamConn::connect_silent(&self.dial, wait)
            .await?
            .is_some()
        {
            if let Ok(conn) = UpstreamConn::open(&self.dial, Identity::None, None).await {
                let xclient = conn.capabilities.xclient_addr();
                conn.quit().await;
                if xclient {
                    return Ok(Identity::Xclient);
                }
            }
            return match UpstreamConn::open(&self.dial, Identity::ProxyV2, None).await {
                Ok(conn) => {
                    conn.quit().await;
                    Ok(Identity::ProxyV2)
                }
                Err(_) => Err(ProbeError::NoIdentity(self.addr)),
            };
        }
        let conn = UpstreamConn::open(&self.dial, Identity::ProxyV2, None).await?;
        conn.quit().await;
        Ok(Identity::ProxyV2)
    }

    /// Probes again every `probe_interval`; after a failure, sooner, with
    /// backoff (1 s, 2 s, 4 s ... up to the interval).
    pub fn spawn_refresh(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let mut backoff = Backoff::new(me.probe_interval);
            loop {
                let result = me.probe().await;
                if let Err(e) = &result {
                    tracing::debug!(upstream = %me.addr, error = %e, "upstream probe failed");
                }
                tokio::time::sleep(backoff.after(&result)).await;
            }
        })
    }

    /// A connection for one client session, passing its identity: a
    /// pooled one made the client's own (when `pooled`), or else a fresh
    /// one.
    pub async fn open(
        &self,
        client: &ClientIdentity,
        pooled: bool,
    ) -> Result<Box<UpstreamConn>, OpenError> {
        // The rare steps (a probe, a new connection) are boxed, so that
        // the common one, a pooled connection, does not make and move a
        // future sized for them (sessions box each command's future).
        let identity = match self.identity() {
            Some(id) => id,
            None => Box::pin(self.probe()).await.map_err(OpenError::Probe)?,
        };
        while pooled && self.pool.reuses(identity) {
            let (taken, stale) = self.pool.take(identity);
            close_all(stale);
            let Some(mut conn) = taken else { break };
            match conn.reuse(identity, client, &self.dial.helo).await {
                Ok(()) => {
                    crate::telemetry::events::upstream_connection("reused");
                    conn.reused = true;
                    self.record(Some(conn.capabilities.clone()), None, None);
                    return Ok(conn);
                }
                // Upstream is fine; it will not take the client's HELO name.
                Err(
                    e @ UpstreamError::Refused {
                        stage: UpStage::ClientHelo,
                        ..
                    },
                ) => {
                    close_all([conn]);
                    return Err(OpenError::Upstream(e));
                }
                Err(e) => {
                    tracing::debug!(upstream = %self.addr, error = %e, "pooled upstream connection went bad; taking another");
                    crate::telemetry::events::upstream_connection("went_bad");
                    close_all([conn]);
                }
            }
        }
        // Every EHLO reply we see refreshes what we offer clients.
        let conn = Box::pin(UpstreamConn::open(&self.dial, identity, Some(client)))
            .await
            .map_err(OpenError::Upstream)?;
        crate::telemetry::events::upstream_connection("opened");
        self.record(Some(conn.capabilities.clone()), None, None);
        Ok(Box::new(conn))
    }

    /// A session is done with its connection: kept for the next one when
    /// it can be, otherwise QUIT (in the background: the session need not
    /// wait for upstream's goodbye).
    pub fn release(&self, conn: Box<UpstreamConn>) {
        let kept = match self.identity() {
            Some(identity) => self.pool.put(conn, identity),
            None => Some(conn),
        };
        if let Some(conn) = kept {
            close_all([conn]);
        }
    }

    /// Closes idle connections once they reach their limits.
    pub fn spawn_pool_reaper(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(me.pool.sweep_interval()).await;
                close_all(me.pool.expired());
            }
        })
    }

    /// Shutting down: QUIT every idle connection and keep none from now on.
    pub async fn close_pool(&self) {
        quit_all(self.pool.drain()).await;
    }
}

/// QUITs connections, all at once.
async fn quit_all(conns: impl IntoIterator<Item = Box<UpstreamConn>>) {
    futures_util::future::join_all(conns.into_iter().map(|c| c.quit())).await;
}

/// QUITs connections in the background.
fn close_all(conns: impl IntoIterator<Item = Box<UpstreamConn>>) {
    let conns: Vec<_> = conns.into_iter().collect();
    if !conns.is_empty() {
        tokio::spawn(quit_all(conns));
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{0}")]
    Probe(ProbeError),
    #[error("{0}")]
    Upstream(UpstreamError),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(os: i32) -> Result<(), ProbeError> {
        Err(ProbeError::Unreachable(UpstreamError::Connect {
            addr: SocketAddr::from(([127, 0, 0, 1], 25)),
            source: std::io::Error::from_raw_os_error(os),
        }))
    }

    #[test]
    fn upstream_failures_back_off_and_a_success_resets() {
        let mut b = Backoff::new(Duration::from_secs(30));
        let waits: Vec<u64> = (0..7).map(|_| b.after(&refused(111)).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(b.after(&Ok(())), Duration::from_secs(30));
        assert_eq!(b.after(&refused(111)), Duration::from_secs(1));
    }

    /// Out of descriptors is our trouble: a long flood must not leave the
    /// next probe (and /readyz's recovery) one backed-off interval away.
    #[test]
    fn a_failure_for_want_of_our_descriptors_is_retried_at_once() {
        let mut b = Backoff::new(Duration::from_secs(30));
        for _ in 0..10 {
            assert_eq!(b.after(&refused(24)), Duration::from_secs(1)); // EMFILE
        }
        // Nor does it grow the backoff for upstream's own failures.
        assert_eq!(b.after(&refused(111)), Duration::from_secs(1));
        assert_eq!(b.after(&refused(23)), Duration::from_secs(1)); // ENFILE
        assert_eq!(b.after(&refused(111)), Duration::from_secs(2));
    }
}
