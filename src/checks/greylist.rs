//! Greylisting at RCPT (RFC 6647), as postgrey and rspamd do it. The
//! triplet is the client network (/24, /64), the sender and the
//! recipient. An unknown triplet is told to come back after `delay`; a
//! retry within `retry_window` after that passes, and the triplet is
//! remembered for `allow_ttl`. A client network and sender domain that
//! passed `auto_allow_after` times skip greylisting for `allow_ttl`. A
//! bounce (null sender) to a recipient that passed before is not delayed.
//!
//! State lives in the `state::Store`, so several instances sharing Redis
//! agree. Decisions compare the first-seen time kept in the value against
//! the store's clock; the store's expiry only frees space.

use super::{Check, Facts, Hook, done};
use crate::config::{Action, GreylistConfig, GreylistWhen, Mode, Thresholds};
use crate::runtime::limits::network;
use crate::state::{Store, StoreError};
use crate::telemetry::events::Greylisted;
use crate::verdict::{self, Finding};
use std::sync::Arc;
use std::time::Duration;

pub struct Greylist {
    cfg: GreylistConfig,
    /// `thresholds.greylist`, for `when: score`.
    from_score: Option<f64>,
    store: Arc<Store>,
    /// Allowances seen lately (key -> until when, by the store's clock):
    /// most mail comes from allowed pairs, and this spares a round trip.
    allowed: moka::sync::Cache<String, u64>,
}

/// How long an allowance seen in the store is trusted without asking again.
const ALLOWED_CACHE_MS: u64 = 60_000;

/// What greylisting said of one recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// First seen now: come back in this many seconds.
    New(u64),
    /// Seen, but the delay has not passed: come back in this many seconds.
    Early(u64),
    /// A retry after the delay (or a triplet that passed before).
    Passed,
    /// The network and sender domain are auto-allowed, or a bounce to a
    /// recipient that passed before.
    Allowed,
}

impl Outcome {
    pub fn word(self) -> &'static str {
        match self {
            Outcome::New(_) => "new",
            Outcome::Early(_) => "early",
            Outcome::Passed => "passed",
            Outcome::Allowed => "allowed",
        }
    }
}

/// The triplet value once it has passed.
const PASSED: &str = "p";

impl Greylist {
    pub fn new(cfg: &GreylistConfig, t: &Thresholds, store: Arc<Store>) -> Greylist {
        Greylist {
            cfg: cfg.clone(),
            from_score: t.greylist,
            store,
            allowed: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_millis(ALLOWED_CACHE_MS))
                .build(),
        }
    }

    /// The decision for one recipient, and what it leaves in the store.
    pub async fn decide(
        &self,
        client: std::net::IpAddr,
        sender: &str,
        rcpt: &str,
    ) -> Result<Outcome, StoreError> {
        let c = &self.cfg;
        let net = network(client, c.network_prefix_v4, c.network_prefix_v6);
        let (sender, rcpt) = (sender.to_ascii_lowercase(), rcpt.to_ascii_lowercase());
        let allow_ttl = c.allow_ttl.0;
        if sender.is_empty() && self.store.get(&format!("gl:r:{rcpt}")).await?.is_some() {
            return Ok(Outcome::Allowed);
        }
        let domain = sender.rsplit_once('@').map_or("", |(_, d)| d);
        let pair = format!("{net}/{domain}");
        let allow_key = format!("gl:a:{pair}");
        let now = self.store.now_ms();
        if self
            .allowed
            .get(&allow_key)
            .is_some_and(|until| until > now)
        {
            return Ok(Outcome::Allowed);
        }
        if self.store.get(&allow_key).await?.is_some() {
            self.allowed.insert(allow_key, now + ALLOWED_CACHE_MS);
            return Ok(Outcome::Allowed);
        }
        let key = format!("gl:t:{net}/{sender}/{rcpt}");
        let (delay, window) = (c.delay.0, c.retry_window.0);
        let seen = self
            .store
            .get_or_set(&key, &now.to_string(), delay + window)
            .await?;
        let first = match seen.as_deref() {
            None => return Ok(Outcome::New(delay.as_secs())),
            Some(PASSED) => return Ok(Outcome::Passed),
            Some(v) => v.parse::<u64>().unwrap_or(now),
        };
        let age = Duration::from_millis(now.saturating_sub(first));
        if age < delay {
            let wait = (delay - age).as_secs().max(1);
            return Ok(Outcome::Early(wait));
        }
        if age > delay + window {
            // Came back too late: start again.
            self.store
                .set(&key, &now.to_string(), delay + window)
                .await?;
            return Ok(Outcome::New(delay.as_secs()));
        }
        self.store.set(&key, PASSED, allow_ttl).await?;
        self.store
            .set(&format!("gl:r:{rcpt}"), "1", allow_ttl)
            .await?;
        let passed = self.store.incr(&format!("gl:n:{pair}"), allow_ttl).await?;
        if passed >= i64::from(c.auto_allow_after) && !domain.is_empty() {
            self.store
                .set(&format!("gl:a:{pair}"), "1", allow_ttl)
                .await?;
        }
        Ok(Outcome::Passed)
    }

    fn wanted(&self, f: &Facts) -> bool {
        let policy = f.txn.policy.as_deref();
        if policy.and_then(|p| p.mode("greylist")) == Some(Mode::Off) {
            return false;
        }
        match self.cfg.when {
            GreylistWhen::Always => true,
            GreylistWhen::Score => {
                let score: f64 = f
                    .txn
                    .found
                    .findings
                    .iter()
                    .map(|f| match f.action {
                        Action::Score(s) => s,
                        _ => 0.0,
                    })
                    .sum();
                let from = policy
                    .and_then(|p| p.thresholds.greylist)
                    .or(self.from_score);
                from.is_some_and(|t| score >= t)
            }
        }
    }
}

impl Check for Greylist {
    fn off(&self) -> bool {
        self.cfg.mode == Mode::Off
    }

    fn rcpt<'a>(&'a self, f: &'a mut Facts) -> Hook<'a> {
        if self.off() {
            return done();
        }
        Box::pin(async move {
            if !self.wanted(f) {
                return;
            }
            if f.client.dns_allowed {
                // A DNS allow list vouches for it (checks.dnsbl.allow_threshold).
                f.txn.found.log.greylist = "skipped:dnswl".into();
                return;
            }
            let decided = self.decide(f.client.ip, &f.txn.sender, &f.txn.rcpt).await;
            let found = &mut f.txn.found;
            let (word, finding) = match decided {
                Ok(o @ (Outcome::New(wait) | Outcome::Early(wait))) => (
                    o.word(),
                    Some((Action::Tempfail, verdict::greylisted(wait))),
                ),
                Ok(o) => (o.word(), None),
                // Logged and counted by the store; `on_error` decides.
                Err(_) => (
                    "error",
                    (self.cfg.on_error == Action::Tempfail)
                        .then(|| (Action::Tempfail, verdict::state_tempfail())),
                ),
            };
            Greylisted { outcome: word }.emit();
            found.log.greylist = word.to_string();
            if let Some((action, reply)) = finding {
                found.findings.push(Finding::under(
                    self.cfg.mode,
                    "greylist",
                    action,
                    word.into(),
                    format!("greylist:{word}"),
                    reply,
                ));
            }
        })
    }
}
