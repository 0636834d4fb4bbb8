//! A Portcullis server on 127.0.0.1:0, with its handles.

use portcullis::config::Config;
use portcullis::server::Server;

use std::net::SocketAddr;

use tokio::sync::oneshot;

/// Every check off: no DNS traffic at all.
pub const NO_CHECKS: &str = "checks:\n  spf: {mode: off}\n  dkim: {mode: off}\n  dmarc: {mode: off}\n  arc: {mode: off}\n  iprev: {mode: off}\n  dnsbl: {mode: off}\n";

/// A rules directory with no rules.
pub const EMPTY_RULES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/rules-empty");

/// A running Portcullis with its handles (rules, checks, reloaders), for
/// tests that look inside or reload. Same defaults as `Gate`.
pub struct Running {
    pub addr: SocketAddr,
    pub metrics: Option<SocketAddr>,
    pub rules: std::sync::Arc<portcullis::rules::RuleWatcher>,
    pub engine: std::sync::Arc<portcullis::checks::Engine>,
    pub config: portcullis::server::ConfigReloader,
    pub tls: portcullis::server::TlsReloader,
}

/// Starts a server with a typed config (see `config::test_config`).
pub async fn start_server_config(cfg: Config) -> Running {
    let server = Server::bind(cfg).await.expect("bind");
    let running = Running {
        addr: server.local_addrs()[0],
        metrics: server.metrics_addr(),
        rules: server.rules(),
        engine: server.engine(),
        config: server.config_reloader(),
        tls: server.tls_reloader(),
    };
    tokio::spawn(server.run(std::future::pending()));
    running
}

/// A running Portcullis.
pub struct Gate {
    pub addr: SocketAddr,
    /// The first TCP milter listener, when the config has one.
    pub milter: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    pub done: tokio::task::JoinHandle<()>,
}

impl Gate {
    /// Starts Portcullis with the test defaults (`config::test_config`).
    pub async fn start(upstream: SocketAddr) -> Gate {
        Self::start_config(super::config::test_config(upstream)).await
    }

    /// Starts Portcullis with a typed config (see `config::test_config`).
    pub async fn start_config(cfg: Config) -> Gate {
        Self::start_clocked(cfg, std::sync::Arc::new(portcullis::state::SystemClock)).await
    }

    /// `start_config` with the clock the state store decides by.
    pub async fn start_clocked(
        cfg: Config,
        clock: std::sync::Arc<dyn portcullis::state::Clock>,
    ) -> Gate {
        let server = Server::bind_with_clock(cfg, clock).await.expect("bind");
        // As `portcullis run` does: learn upstream's EHLO before serving.
        let _ = server.upstream().probe().await;
        let addr = server
            .local_addrs()
            .first()
            .copied()
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        let milter = server.milter_addrs().first().copied();
        let (tx, rx) = oneshot::channel();
        let done = tokio::spawn(server.run(async move {
            let _ = rx.await;
        }));
        Gate {
            addr,
            milter,
            stop: Some(tx),
            done,
        }
    }

    /// Begins graceful shutdown.
    pub fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}
