//! Every operational event as a struct whose `emit()` writes its log line
//! (if it has one) and bumps its metrics. Code elsewhere never names a
//! metric: it builds an event and emits it. The per-transaction line and
//! refused connections are in `txlog`.
//!
//! A leaf: it imports nothing from the crate, so any layer may emit.

use super::metrics::Cached;
use metrics::{Counter, Gauge};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

fn flag(b: bool) -> f64 {
    if b { 1.0 } else { 0.0 }
}

/// Upstream began, or stopped, answering its probe or connections.
pub struct UpstreamState<'a> {
    pub upstream: SocketAddr,
    pub error: Option<&'a str>,
}

impl UpstreamState<'_> {
    pub fn emit(&self) {
        metrics::gauge!("portcullis_upstream_up").set(flag(self.error.is_none()));
        match self.error {
            None => tracing::info!(upstream = %self.upstream, "upstream answers"),
            Some(e) => tracing::error!(
                upstream = %self.upstream,
                error = %e,
                "upstream does not answer: clients get 4xx until it does"
            ),
        }
    }
}

/// How a client session got its upstream connection (`opened`, `reused`
/// from the pool) or that a pooled one failed its check (`went_bad`).
pub fn upstream_connection(kind: &'static str) {
    static OPENED: Cached<Counter> = Cached::new();
    static REUSED: Cached<Counter> = Cached::new();
    let make = || metrics::counter!("portcullis_upstream_connections_total", "kind" => kind);
    match kind {
        "opened" => OPENED.with(make, |c| c.increment(1)),
        "reused" => REUSED.with(make, |c| c.increment(1)),
        _ => make().increment(1),
    }
}

/// Upstream connections idle in the pool now.
pub fn upstream_pool_idle(n: usize) {
    static IDLE: Cached<Gauge> = Cached::new();
    IDLE.with(
        || metrics::gauge!("portcullis_upstream_pool_idle"),
        |g| g.set(n as f64),
    );
}

/// What the gate runs with, logged at start and after each config
/// reload: each check's mode (record mode says its actions are only
/// logged), and what `check` warns about in the config.
pub struct Posture<'a> {
    /// (check, mode, what the mode means).
    pub modes: &'a [(String, &'static str, &'static str)],
    pub warnings: &'a [String],
}

impl Posture<'_> {
    pub fn emit(&self) {
        for (check, mode, meaning) in self.modes {
            tracing::info!(check = %check, mode = *mode, meaning = *meaning, "check mode");
        }
        for w in self.warnings {
            tracing::warn!(warning = %w, "config");
        }
    }
}

/// One message asked of clamd: `clean`, `virus`, `error`, or `skipped`
/// (over `max_size`).
pub struct AntivirusScan<'a> {
    pub result: &'static str,
    pub took: Option<Duration>,
    pub error: Option<&'a str>,
}

impl AntivirusScan<'_> {
    pub fn emit(&self) {
        metrics::counter!("portcullis_antivirus_scans_total", "result" => self.result).increment(1);
        if let Some(t) = self.took {
            metrics::histogram!("portcullis_antivirus_seconds").record(t.as_secs_f64());
        }
        if let Some(e) = self.error {
            tracing::warn!(error = %e, "antivirus: no verdict from clamd");
        }
    }
}

/// One message asked of rspamd or spamd.
pub struct ScannerScan<'a> {
    pub scanner: &'static str,
    /// `ok`, `error`, `skipped`.
    pub result: &'static str,
    pub took: Option<Duration>,
    pub error: Option<&'a str>,
}

impl ScannerScan<'_> {
    pub fn emit(&self) {
        metrics::counter!("portcullis_scanner_scans_total", "scanner" => self.scanner, "result" => self.result)
            .increment(1);
        if let Some(t) = self.took {
            metrics::histogram!("portcullis_scanner_seconds", "scanner" => self.scanner)
                .record(t.as_secs_f64());
        }
        if let Some(e) = self.error {
            tracing::warn!(scanner = self.scanner, error = %e, "scanner: no opinion");
        }
    }
}

/// The URL blocklist lookups of one message.
pub struct UriblLookups<'a> {
    /// Zones that listed a domain of it, each once.
    pub listed: &'a [String],
    /// Lookups that failed or did not answer within the budget.
    pub failed: usize,
    pub took: Duration,
}

impl UriblLookups<'_> {
    pub fn emit(&self) {
        for zone in self.listed {
            metrics::counter!("portcullis_uribl_listed_total", "zone" => zone.clone()).increment(1);
        }
        if self.failed > 0 {
            metrics::counter!("portcullis_uribl_failed_total").increment(self.failed as u64);
        }
        metrics::histogram!("portcullis_uribl_seconds").record(self.took.as_secs_f64());
    }
}

/// The state store did not answer the probe at start or after a reload.
pub struct StateStoreDown<'a> {
    pub backend: &'static str,
    pub error: &'a dyn std::fmt::Display,
}

impl StateStoreDown<'_> {
    pub fn emit(&self) {
        metrics::gauge!("portcullis_state_up", "backend" => self.backend).set(0.0);
        tracing::error!(
            backend = self.backend,
            error = %self.error,
            "state store does not answer: greylisting, rate limits and reputation apply their on_error until it does"
        );
    }
}

/// A session's upstream connection failed (or could not be opened).
pub struct UpstreamFailed<'a> {
    pub session: &'a str,
    pub stage: &'static str,
    pub error: &'a dyn std::fmt::Display,
    /// Could not be opened at all (the client gets 4xx at MAIL).
    pub unavailable: bool,
}

impl UpstreamFailed<'_> {
    pub fn emit(&self) {
        metrics::counter!("portcullis_upstream_errors_total", "stage" => self.stage).increment(1);
        if self.unavailable {
            tracing::warn!(session = %self.session, error = %self.error, "upstream unavailable");
        } else {
            tracing::warn!(session = %self.session, error = %self.error, stage = self.stage, "upstream failed");
        }
    }
}

/// The outcome of a config reload.
pub enum ConfigReload<'a> {
    Done {
        config: &'a Path,
        applied: &'a [String],
        needs_restart: &'a [String],
    },
    Failed {
        error: &'a str,
    },
}

impl ConfigReload<'_> {
    pub fn emit(&self) {
        match self {
            ConfigReload::Done {
                config,
                applied,
                needs_restart,
            } => {
                metrics::counter!("portcullis_reloads_total", "what" => "config", "result" => "ok")
                    .increment(1);
                tracing::info!(
                    config = %config.display(),
                    applied = ?applied,
                    "config reloaded: in force for new sessions"
                );
                if !needs_restart.is_empty() {
                    tracing::warn!(
                        keys = ?needs_restart,
                        "config reload: these keys keep their running values until a restart"
                    );
                }
            }
            ConfigReload::Failed { error } => {
                metrics::counter!("portcullis_reloads_total", "what" => "config", "result" => "failed")
                    .increment(1);
                tracing::error!(error = %error, "config reload failed; the running config stays in force");
            }
        }
    }
}

/// The outcome of a rules reload.
pub enum RulesReload<'a> {
    Done { rules: usize, dir: &'a Path },
    Failed { errors: &'a dyn std::fmt::Display },
}

impl RulesReload<'_> {
    pub fn emit(&self) {
        match self {
            RulesReload::Done { rules, dir } => {
                metrics::counter!("portcullis_reloads_total", "what" => "rules", "result" => "ok")
                    .increment(1);
                tracing::info!(rules = rules, dir = %dir.display(), "rules reloaded");
            }
            RulesReload::Failed { errors } => {
                metrics::counter!("portcullis_reloads_total", "what" => "rules", "result" => "failed")
                    .increment(1);
                tracing::error!(errors = %errors, "rules reload failed; the previous rules stay in force");
            }
        }
    }
}

/// A client connection was admitted (a slot taken).
pub struct ConnectionOpened;

static TOTAL: Cached<Counter> = Cached::new();
static OPEN: Cached<Gauge> = Cached::new();

impl ConnectionOpened {
    pub fn emit(&self) {
        TOTAL.with(
            || metrics::counter!("portcullis_connections_total"),
            |c| c.increment(1),
        );
        OPEN.with(
            || metrics::gauge!("portcullis_connections_open"),
            |g| g.increment(1.0),
        );
    }
}

/// An admitted connection ended; `deadline`: it was dropped at the hard
/// session deadline.
pub struct ConnectionClosed<'a> {
    pub session: &'a str,
    pub deadline: bool,
}

impl ConnectionClosed<'_> {
    pub fn emit(&self) {
        if self.deadline {
            metrics::counter!("portcullis_session_deadline_total").increment(1);
            tracing::info!(session = %self.session, "session deadline passed: closed");
        }
        OPEN.with(
            || metrics::gauge!("portcullis_connections_open"),
            |g| g.decrement(1.0),
        );
    }
}

/// Stress mode began or ended.
pub struct StressChanged {
    pub on: bool,
    pub open: usize,
    pub at: usize,
}

impl StressChanged {
    pub fn emit(&self) {
        metrics::gauge!("portcullis_stress").set(flag(self.on));
        if self.on {
            metrics::counter!("portcullis_stress_episodes_total").increment(1);
            tracing::warn!(
                open = self.open,
                at = self.at,
                "stress mode on: shorter deadlines"
            );
        } else {
            tracing::info!(open = self.open, "stress mode off");
        }
    }
}

/// A session closed by stress mode's shorter deadlines.
pub struct ClosedUnderStress<'a> {
    pub session: &'a str,
    pub client: IpAddr,
    /// `command` or `time_to_mail`.
    pub reason: &'static str,
}

impl ClosedUnderStress<'_> {
    pub fn emit(&self) {
        metrics::counter!("portcullis_stress_closed_total", "reason" => self.reason).increment(1);
        tracing::info!(session = %self.session, client = %self.client, reason = self.reason, "closed under stress");
    }
}

/// A client that does not read its replies lost its session.
pub struct ClientWriteStall<'a> {
    pub session: &'a str,
    pub client: IpAddr,
    /// `write_timeout`, `write_timeout_stress` (the stress deadline) or
    /// `write_error` (the connection failed).
    pub reason: &'static str,
    /// Reply bytes it left unread.
    pub queued: usize,
    pub error: &'a dyn std::fmt::Display,
}

impl ClientWriteStall<'_> {
    pub fn emit(&self) {
        metrics::counter!("portcullis_client_write_stalls_total", "reason" => self.reason)
            .increment(1);
        if self.reason == "write_timeout_stress" {
            metrics::counter!("portcullis_stress_closed_total", "reason" => "write").increment(1);
        }
        if self.reason == "write_error" {
            tracing::debug!(session = %self.session, error = %self.error, "client write failed");
            return;
        }
        tracing::info!(
            session = %self.session,
            client = %self.client,
            reason = self.reason,
            queued = self.queued,
            "client does not read its replies: session closed"
        );
    }
}

/// What went wrong at a listener's accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trouble {
    /// Out of descriptors (EMFILE, ENFILE) or socket memory.
    Descriptors,
    /// Another accept error.
    Error,
    /// Refused at the listener's own connection limit.
    Full,
}

impl Trouble {
    fn label(self) -> &'static str {
        match self {
            Trouble::Descriptors => "descriptors",
            Trouble::Error => "error",
            Trouble::Full => "limit",
        }
    }
}

/// A listener's accept failed, or refused a connection at its limit:
/// counted each time, logged when an episode begins and when it ends
/// (`ended`: how many, over how long).
pub struct AcceptTrouble<'a> {
    pub listener: &'a str,
    /// `smtp`, `milter` or `http`.
    pub kind: &'static str,
    pub trouble: Trouble,
    pub detail: &'a str,
    pub began: bool,
    pub ended: Option<(u64, Duration)>,
}

impl AcceptTrouble<'_> {
    pub fn emit(&self) {
        let what = self.trouble.label();
        if let Some((count, lasted)) = self.ended {
            tracing::info!(
                listener = %self.listener,
                trouble = what,
                count,
                lasted = ?lasted,
                "listener: episode over"
            );
            return;
        }
        let counter = if self.trouble == Trouble::Full {
            "portcullis_listener_refused_total"
        } else {
            "portcullis_accept_failures_total"
        };
        metrics::counter!(counter, "listener" => self.kind, "reason" => what).increment(1);
        if !self.began {
            return;
        }
        match self.trouble {
            Trouble::Full => tracing::warn!(
                listener = %self.listener,
                reason = %self.detail,
                "listener at its connection limit: refusing connections (logged once per episode)"
            ),
            Trouble::Descriptors => tracing::error!(
                listener = %self.listener,
                trouble = what,
                error = %self.detail,
                "accept failing: backing off (logged once per episode; /readyz says not ready)"
            ),
            Trouble::Error => tracing::warn!(
                listener = %self.listener,
                trouble = what,
                error = %self.detail,
                "accept failed: backing off (logged once per episode)"
            ),
        }
    }
}

/// Message bytes held in memory now, across sessions.
pub struct MemoryHeld(pub usize);

impl MemoryHeld {
    pub fn emit(&self) {
        static HELD: Cached<Gauge> = Cached::new();
        HELD.with(
            || metrics::gauge!("portcullis_memory_budget_bytes"),
            |g| g.set(self.0 as f64),
        );
    }
}

/// A message's rule evaluation passed its budget.
pub struct RulesOverrun<'a> {
    pub budget: Duration,
    pub then: &'a dyn std::fmt::Debug,
}

impl RulesOverrun<'_> {
    pub fn emit(&self) {
        metrics::counter!("portcullis_rules_overrun_total").increment(1);
        tracing::warn!(budget = ?self.budget, then = ?self.then, "message rules overran their budget");
    }
}

/// A rule matched.
pub struct RuleHit<'a> {
    pub rule: &'a str,
    pub shadow: bool,
    /// The rule's own handle (a rule's id and mode are fixed).
    pub metric: &'a Cached<Counter>,
}

impl RuleHit<'_> {
    pub fn emit(&self) {
        let make = || {
            metrics::counter!(
                "portcullis_rule_hits_total",
                "rule" => self.rule.to_string(),
                "shadow" => if self.shadow { "true" } else { "false" }
            )
        };
        self.metric.with(make, |c| c.increment(1));
    }
}

/// A DNSBL zone's state: usable (passed its self-test, or configured) or
/// disabled. Logged when it changes.
pub struct DnsblZone<'a> {
    pub zone: &'a str,
    pub usable: bool,
    pub changed: bool,
    pub reason: &'a str,
}

impl DnsblZone<'_> {
    pub fn emit(&self) {
        metrics::gauge!("portcullis_dnsbl_zone_usable", "zone" => self.zone.to_string())
            .set(flag(self.usable));
        if !self.changed {
            return;
        }
        if self.usable {
            tracing::info!(zone = %self.zone, "DNSBL zone passed its self-test: enabled");
        } else {
            tracing::error!(zone = %self.zone, reason = self.reason, "DNSBL zone disabled: failing open for it");
        }
    }
}

/// One nameserver's health check.
pub struct Nameserver<'a> {
    pub nameserver: SocketAddr,
    /// None: it answers.
    pub silent: Option<&'a str>,
    pub changed: bool,
}

impl Nameserver<'_> {
    pub fn emit(&self) {
        metrics::gauge!("portcullis_dns_nameserver_up", "nameserver" => self.nameserver.to_string())
            .set(flag(self.silent.is_none()));
        if !self.changed {
            return;
        }
        match self.silent {
            None => tracing::info!(nameserver = %self.nameserver, "DNS: nameserver answers"),
            Some(e) => tracing::error!(
                nameserver = %self.nameserver,
                error = %e,
                "DNS: nameserver does not answer (dns.nameservers)"
            ),
        }
    }
}

/// Whether any nameserver answers; logged when none does any more.
pub struct DnsHealth<'a> {
    pub up: bool,
    pub went_down: bool,
    pub nameservers: &'a [SocketAddr],
}

impl DnsHealth<'_> {
    pub fn emit(&self) {
        metrics::gauge!("portcullis_dns_up").set(flag(self.up));
        if self.went_down {
            tracing::error!(
                nameservers = ?self.nameservers,
                "DNS: no nameserver answers; checks that need DNS get temperror at once \
                 (100 ms per query) until one does"
            );
        }
    }
}

/// A DNSBL lookup: answered from the cache, or sent (with its latency),
/// and whether it failed.
pub enum DnsLookup {
    CacheHit,
    Queried(Duration),
    Failed,
}

impl DnsLookup {
    pub fn emit(&self) {
        match self {
            DnsLookup::CacheHit => {
                static HITS: Cached<Counter> = Cached::new();
                HITS.with(
                    || metrics::counter!("portcullis_dns_cache_hits_total"),
                    |c| c.increment(1),
                );
            }
            DnsLookup::Queried(took) => {
                metrics::counter!("portcullis_dns_queries_total").increment(1);
                metrics::histogram!("portcullis_dns_query_seconds").record(took.as_secs_f64());
            }
            DnsLookup::Failed => metrics::counter!("portcullis_dns_failures_total").increment(1),
        }
    }
}

/// One call to the state store (greylisting's memory).
pub struct StoreCall<'a> {
    pub backend: &'static str,
    pub op: &'static str,
    pub took: Duration,
    pub error: Option<&'a dyn std::fmt::Display>,
}

impl StoreCall<'_> {
    pub fn emit(&self) {
        metrics::histogram!("portcullis_state_seconds", "backend" => self.backend)
            .record(self.took.as_secs_f64());
        metrics::gauge!("portcullis_state_up", "backend" => self.backend)
            .set(flag(self.error.is_none()));
        if let Some(e) = self.error {
            metrics::counter!("portcullis_state_errors_total", "backend" => self.backend)
                .increment(1);
            tracing::warn!(backend = self.backend, op = self.op, error = %e, "state store call failed");
        }
    }
}

/// A greylisting decision: `new`, `early`, `passed`, `allowed`, `error`.
pub struct Greylisted<'a> {
    pub outcome: &'a str,
}

impl Greylisted<'_> {
    pub fn emit(&self) {
        metrics::counter!("portcullis_greylist_total", "outcome" => self.outcome.to_string())
            .increment(1);
    }
}

/// A rate limit was exceeded (`enforced`: the command was refused).
pub struct RateLimited<'a> {
    pub name: &'a str,
    pub enforced: bool,
}

impl RateLimited<'_> {
    pub fn emit(&self) {
        metrics::counter!(
            "portcullis_rate_limit_hits_total",
            "limit" => self.name.to_string(),
            "enforced" => if self.enforced { "yes" } else { "no" }
        )
        .increment(1);
    }
}

#[cfg(test)]
mod tests {
    /// The rule of this module, kept: no metric is named outside telemetry/.
    #[test]
    fn no_metric_is_named_outside_telemetry() {
        fn walk(dir: &std::path::Path, out: &mut Vec<String>) {
            for e in std::fs::read_dir(dir).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    if !p.ends_with("telemetry") {
                        walk(&p, out);
                    }
                } else if p.extension().is_some_and(|x| x == "rs") {
                    let text = std::fs::read_to_string(&p).unwrap();
                    for (i, l) in text.lines().enumerate() {
                        if [
                            "metrics::counter!",
                            "metrics::gauge!",
                            "metrics::histogram!",
                        ]
                        .iter()
                        .any(|m| l.contains(m))
                        {
                            out.push(format!("{}:{}", p.display(), i + 1));
                        }
                    }
                }
            }
        }
        let mut found = Vec::new();
        walk(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
            &mut found,
        );
        assert!(
            found.is_empty(),
            "metrics named outside telemetry/: {found:?}"
        );
    }
}
