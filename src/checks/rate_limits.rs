//! Named rate limits (`checks.rate_limits`), counted in the state store so
//! that they hold across every instance sharing it. Connections are
//! counted when the client connects (421 4.7.0 before the greeting),
//! transactions at MAIL and recipients at RCPT (451 4.7.1 for that
//! command), bytes at the end of DATA (451 4.7.1 for the message).
//! A store that fails lets the command through (logged and counted by
//! the store): a rate limit is not worth refusing mail for.

use super::{Check, Facts, Hook, Message, act, done};
use crate::config::{Action, Mode, RateCount, RateKey, RateLimit};
use crate::runtime::limits::network;
use crate::state::Store;
use crate::telemetry::events::RateLimited;
use crate::verdict::Finding;
use crate::wire::reply::Reply;
use std::sync::Arc;

pub struct RateLimits {
    limits: Vec<RateLimit>,
    store: Arc<Store>,
}

impl RateLimits {
    pub fn new(limits: &[RateLimit], store: Arc<Store>) -> RateLimits {
        RateLimits {
            limits: limits.to_vec(),
            store,
        }
    }

    fn counts(&self, what: RateCount) -> bool {
        self.limits.iter().any(|l| l.count == what)
    }

    /// Counts one `what` against its limits; an exceeded enforced limit
    /// refuses the command now. No work (and no allocation) when no limit
    /// counts `what`.
    fn refuse_now<'a>(&'a self, f: &'a mut Facts, what: RateCount) -> Hook<'a> {
        if !self.counts(what) {
            return done();
        }
        Box::pin(async move {
            if let Some(r) = self.take(f, what, 1).await {
                f.txn.found.refuse_now = Some((r, reason(f)));
            }
        })
    }

    /// Counts `cost` against every limit on `what`; records the hits.
    /// Returns the reply of the first enforced limit that is exceeded.
    async fn take(&self, f: &mut Facts, what: RateCount, cost: u64) -> Option<Reply> {
        let mut refuse = None;
        for l in self.limits.iter().filter(|l| l.count == what) {
            let Some(key) = key_of(l.key, f) else {
                continue;
            };
            let interval = (l.rate.per.as_millis() as u64 / l.rate.count).max(1);
            let burst = l.burst.unwrap_or(l.rate.count).saturating_mul(interval);
            let key = format!("rl:{}:{key}", l.name);
            let Ok(wait_ms) = self.store.gcra(&key, interval, burst, cost).await else {
                continue;
            };
            if wait_ms == 0 {
                continue;
            }
            RateLimited {
                name: &l.name,
                enforced: l.mode == Mode::Enforce,
            }
            .emit();
            let found = &mut f.txn.found;
            found.log.rate_limits.push(l.name.clone());
            if l.mode == Mode::Enforce && refuse.is_none() {
                refuse = Some(reply(l, what, wait_ms.div_ceil(1000)));
            }
        }
        refuse
    }
}

/// `rate_limit:NAME` of the first limit hit.
fn reason(f: &Facts) -> String {
    let name = f
        .txn
        .found
        .log
        .rate_limits
        .first()
        .map_or("", String::as_str);
    format!("rate_limit:{name}")
}

fn reply(l: &RateLimit, what: RateCount, wait: u64) -> Reply {
    let (code, subject, detail) = match what {
        RateCount::Connections => (421, 7, 0),
        _ => (451, 7, 1),
    };
    let text = match &l.text {
        Some(t) => crate::verdict::fill(t, &[("limit", &l.name), ("wait", &wait.to_string())]),
        None => format!("Rate limit {} reached, try again in {wait} seconds", l.name),
    };
    Reply::new(code, subject, detail, "Rate limit reached").with_text(text)
}

/// The value a limit is kept per, from what is known now (None: not yet
/// known at this stage, the limit does not apply).
fn key_of(key: RateKey, f: &Facts) -> Option<String> {
    let domain = |a: &str| a.rsplit_once('@').map(|(_, d)| d.to_ascii_lowercase());
    let t = &f.txn;
    match key {
        RateKey::ClientAddress => Some(f.client.ip.to_string()),
        RateKey::ClientNetwork => Some(network(f.client.ip, 24, 64).to_string()),
        RateKey::Helo => Some(f.client.helo.to_ascii_lowercase()).filter(|h| !h.is_empty()),
        RateKey::Sender => Some(t.sender.to_ascii_lowercase()).filter(|_| !t.sender.is_empty()),
        RateKey::SenderDomain => domain(&t.sender),
        RateKey::Recipient => Some(t.rcpt.to_ascii_lowercase()).filter(|r| !r.is_empty()),
        RateKey::RecipientDomain => domain(&t.rcpt),
    }
}

impl Check for RateLimits {
    fn name(&self) -> &'static str {
        "rate_limits"
    }

    fn admit<'a>(&'a self, f: &'a mut Facts) -> Hook<'a> {
        self.refuse_now(f, RateCount::Connections)
    }

    fn mail<'a>(&'a self, f: &'a mut Facts) -> Hook<'a> {
        self.refuse_now(f, RateCount::Transactions)
    }

    fn rcpt<'a>(&'a self, f: &'a mut Facts) -> Hook<'a> {
        self.refuse_now(f, RateCount::Recipients)
    }

    fn data<'a, 'm: 'a>(&'m self, f: &'a mut Facts, _m: &'a mut Message<'m>) -> Hook<'a> {
        if !self.counts(RateCount::Bytes) {
            return done();
        }
        Box::pin(async move {
            let size = f.txn.size.unwrap_or(0);
            if let Some(r) = self.take(f, RateCount::Bytes, size).await {
                f.txn.found.findings.push(Finding {
                    check: "rate_limit",
                    result: "exceeded".into(),
                    action: act(Mode::Enforce, Action::Tempfail),
                    reason: reason(f),
                    reply: r,
                });
            }
        })
    }
}
