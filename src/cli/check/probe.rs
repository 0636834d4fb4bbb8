//! `check`'s probes: does what the config points at answer now? Upstream,
//! each nameserver, the Redis state store, clamd, rspamd or spamd. Each has a deadline, and all run
//! at once. A silent peer is a warning, not an error: the MTA or the
//! resolver may start after us. An upstream that answers but cannot be
//! told the client's address is an error: `run` refuses it too.

use crate::config::{Config, StateBackend};
use crate::dns::{Nameservers, NsState};
use crate::state::{Store, SystemClock};
use crate::upstream::{ProbeError, Upstream};
use std::sync::Arc;
use std::time::Duration;

/// How long `check` waits for any one peer.
pub const PROBE_DEADLINE: Duration = Duration::from_secs(5);

#[derive(Default)]
pub struct Found {
    /// One line per peer that answered.
    pub answers: Vec<String>,
    pub warnings: Vec<String>,
    pub errors: Vec<String>,
}

pub async fn probe(cfg: &Config) -> Found {
    let (up, dns, state, clamd, scanner) = tokio::join!(
        upstream(cfg),
        nameservers(cfg),
        state(cfg),
        clamd(cfg),
        scanner(cfg)
    );
    let mut found = Found::default();
    for part in [up, dns, state, clamd, scanner] {
        found.answers.extend(part.answers);
        found.warnings.extend(part.warnings);
        found.errors.extend(part.errors);
    }
    found
}

async fn upstream(cfg: &Config) -> Found {
    let mut f = Found::default();
    // A milter-only gate has no upstream.
    if cfg.listen.is_empty() {
        return f;
    }
    let addr = cfg.upstream.addr;
    let up = match Upstream::new(cfg) {
        Ok(u) => u,
        Err(e) => {
            f.errors.push(format!("upstream: {e}"));
            return f;
        }
    };
    match tokio::time::timeout(PROBE_DEADLINE, up.probe()).await {
        Ok(Ok(id)) => f.answers.push(format!(
            "upstream {addr} answers (client identity: {})",
            id.as_str()
        )),
        Ok(Err(e @ ProbeError::NoIdentity(_))) => f.errors.push(format!("upstream: {e}")),
        Ok(Err(e))
            if cfg.upstream.tls == crate::config::UpstreamTls::Starttls
                && e.to_string().contains("starttls") =>
        {
            f.warnings.push(format!(
                "upstream.tls: starttls, but upstream {addr} does not take STARTTLS ({e}): until it does, every MAIL gets 451 4.4.1 (offer STARTTLS there, or set upstream.tls: none)"
            ))
        }
        Ok(Err(e)) => f.warnings.push(format!(
            "upstream {addr} does not answer as configured ({e}): until it does, every MAIL gets 451 4.4.1"
        )),
        Err(_) => f.warnings.push(format!(
            "upstream {addr} does not answer within {PROBE_DEADLINE:?}: until it does, every MAIL gets 451 4.4.1"
        )),
    }
    f
}

async fn nameservers(cfg: &Config) -> Found {
    let mut f = Found::default();
    let ns = match Nameservers::new(&cfg.dns) {
        Ok(ns) => ns,
        Err(e) => {
            f.errors.push(format!("dns.nameservers: {e}"));
            return f;
        }
    };
    let _ = tokio::time::timeout(PROBE_DEADLINE, ns.check()).await;
    for (addr, state) in ns.states() {
        match state {
            NsState::Answers => f.answers.push(format!("nameserver {addr} answers")),
            NsState::Silent(e) => f.warnings.push(format!(
                "dns.nameservers: {addr} does not answer ({e}): SPF, DKIM and DMARC would be temperror and DNSBLs unread while no nameserver answers"
            )),
            NsState::NotChecked => f.warnings.push(format!(
                "dns.nameservers: {addr} does not answer within {PROBE_DEADLINE:?}"
            )),
        }
    }
    f
}

async fn state(cfg: &Config) -> Found {
    let mut f = Found::default();
    if cfg.state.backend != StateBackend::Redis {
        return f;
    }
    let url = &cfg.state.url;
    match Store::open(&cfg.state, Arc::new(SystemClock)) {
        Err(e) => f.errors.push(format!("state.url: {e}")),
        Ok(store) => match store.probe(PROBE_DEADLINE).await {
            Ok(()) => f.answers.push(format!("state store {url} answers")),
            Err(e) => f.warnings.push(format!(
                "state.url: {url} does not answer as Redis ({e}): greylisting, rate limits and reputation apply their on_error until it does"
            )),
        },
    }
    f
}

/// rspamd answers `GET /ping` with pong, spamd `PING` with PONG.
async fn scanner(cfg: &Config) -> Found {
    let mut f = Found::default();
    let sc = &cfg.checks.scanner;
    if sc.mode == crate::config::Mode::Off {
        return f;
    }
    let (name, at) = (sc.kind.as_str(), sc.address);
    let ping = crate::checks::scanner::ping(sc.kind, at);
    match tokio::time::timeout(PROBE_DEADLINE, ping).await {
        Ok(Ok(true)) => f.answers.push(format!("{name} {at} answers")),
        Ok(Ok(false)) => f.warnings.push(format!(
            "checks.scanner.address: {at} does not answer as {name} (rspamd: its normal worker, 11333; spamd: 783)"
        )),
        Ok(Err(e)) => f.warnings.push(format!(
            "checks.scanner.address: {name} at {at} does not answer ({e}): every message gets checks.scanner.on_error until it does"
        )),
        Err(_) => f.warnings.push(format!(
            "checks.scanner.address: {name} at {at} does not answer within {PROBE_DEADLINE:?}"
        )),
    }
    f
}

/// clamd answers PING with PONG (clamd(8)).
async fn clamd(cfg: &Config) -> Found {
    let mut f = Found::default();
    let av = &cfg.checks.antivirus;
    if av.mode == crate::config::Mode::Off {
        return f;
    }
    let at = &av.clamd;
    let ping = crate::checks::antivirus::ping(at);
    match tokio::time::timeout(PROBE_DEADLINE, ping).await {
        Ok(Ok(r)) if r.starts_with(b"PONG") => f.answers.push(format!("clamd {at} answers")),
        Ok(Ok(r)) => f.warnings.push(format!(
            "checks.antivirus.clamd: {at} is not clamd (it answered {:?} to PING)",
            String::from_utf8_lossy(&r[..r.len().min(40)])
        )),
        Ok(Err(e)) => f.warnings.push(format!(
            "checks.antivirus.clamd: {at} does not answer ({e}): every message gets checks.antivirus.on_error until it does"
        )),
        Err(_) => f.warnings.push(format!(
            "checks.antivirus.clamd: {at} does not answer within {PROBE_DEADLINE:?}"
        )),
    }
    f
}
