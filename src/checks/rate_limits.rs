//! Named rate limits (`checks.rate_limits`), counted in the state store so
//! that they hold across every instance sharing it. Connections are
//! counted when the client connects (421 4.7.0 before the greeting),
//! transactions at MAIL and recipients at RCPT (451 4.7.1 for that
//! command), bytes at the end of DATA (451 4.7.1 for the message).
//! A store that fails lets the command through (logged and counted by
//! the store): a rate limit is not worth refusing mail for.
//!
//! Round trips are what a shared store costs, so a `Counter` spares them
//! where it can without loosening any limit: a refusal is remembered for
//! as long as GCRA says it holds (other instances can only fill the bucket
//! further, so it is exact), and a limit with a large burst takes units
//! from the store in leases of up to 1% of the burst (at most 64), used
//! here one at a time for up to a second. A lease is paid for when taken,
//! so a limit is never exceeded; units leased and left unused make it at
//! most 1% stricter per instance. Limits whose burst is under 200 are
//! counted one by one, exactly.

use super::{Check, Facts, Hook, Message, done};
use crate::config::{Action, Mode, RateCount, RateKey, RateLimit};
use crate::runtime::limits::network;
use crate::state::{Store, StoreError};
use crate::telemetry::events::RateLimited;
use crate::verdict::Finding;
use crate::wire::reply::Reply;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One configured limit, with its bucket worked out.
struct Limit {
    cfg: RateLimit,
    /// Time for one unit to come back.
    interval: Duration,
    /// How much time's worth of units the bucket holds.
    burst: Duration,
    /// Units taken from the store at once (1: exact, one by one).
    lease: u64,
}

impl Limit {
    fn new(cfg: &RateLimit) -> Limit {
        let count = cfg.rate.count.max(1);
        let interval = cfg.rate.per / u32::try_from(count).unwrap_or(u32::MAX);
        let units = cfg.burst.unwrap_or(count);
        Limit {
            interval,
            burst: interval.saturating_mul(u32::try_from(units).unwrap_or(u32::MAX)),
            lease: lease_for(units),
            cfg: cfg.clone(),
        }
    }
}

/// Units leased at once for a bucket of `burst` units: 1% of it, 1 to 64.
pub fn lease_for(burst: u64) -> u64 {
    (burst / 100).clamp(1, 64)
}

/// How long leased units may be used before they lapse.
const LEASE_LIFE_US: u64 = 1_000_000;

pub struct RateLimits {
    limits: Vec<Limit>,
    counter: Counter,
}

impl RateLimits {
    pub fn new(limits: &[RateLimit], store: Arc<Store>) -> RateLimits {
        RateLimits {
            limits: limits.iter().map(Limit::new).collect(),
            counter: Counter::new(store),
        }
    }

    fn counts(&self, what: RateCount) -> bool {
        self.limits.iter().any(|l| l.cfg.count == what)
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
        for l in self.limits.iter().filter(|l| l.cfg.count == what) {
            let Some(key) = key_of(l.cfg.key, f) else {
                continue;
            };
            let key = format!("rl:{}:{key}", l.cfg.name);
            let Ok(Some(wait)) = self.counter.take(&key, l, cost).await else {
                continue;
            };
            let l = &l.cfg;
            RateLimited {
                name: &l.name,
                enforced: l.mode == Mode::Enforce,
            }
            .emit();
            let found = &mut f.txn.found;
            found.log.rate_limits.push(l.name.clone());
            let secs = u64::try_from(wait.as_millis().div_ceil(1000)).unwrap_or(u64::MAX);
            if l.mode == Mode::Enforce {
                refuse = refuse.or_else(|| Some(reply(l, what, secs)));
            } else {
                // Record mode: kept for the log's `would`.
                found.findings.push(Finding {
                    check: "rate_limit",
                    result: "exceeded".into(),
                    action: Action::Accept,
                    would: Some(Action::Tempfail),
                    reason: format!("rate_limit:{}", l.name),
                    reply: reply(l, what, secs),
                });
            }
        }
        refuse
    }
}

/// Takes units from the store's buckets for one instance, sparing round
/// trips as the module's head says.
pub struct Counter {
    store: Arc<Store>,
    /// Per bucket key: what this instance knows of it.
    known: moka::sync::Cache<String, Arc<Mutex<Known>>>,
}

#[derive(Default)]
struct Known {
    /// Leased units not yet used, and until when (µs) they may be.
    left: u64,
    lease_until: u64,
    /// No single unit fits before this time (µs).
    refused_until: u64,
}

impl Counter {
    pub fn new(store: Arc<Store>) -> Counter {
        Counter {
            store,
            known: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(Duration::from_secs(600))
                .build(),
        }
    }

    /// Takes `cost` units from the bucket under `key` (refilling one unit
    /// per `interval`, holding `burst`): None when taken, else how long
    /// until it would fit. Costs other than 1 (bytes) go to the store as
    /// they are.
    pub async fn take_units(
        &self,
        key: &str,
        interval: Duration,
        burst: Duration,
        lease: u64,
        cost: u64,
    ) -> Result<Option<Duration>, StoreError> {
        if cost != 1 {
            return self.store.gcra(key, interval, burst, cost).await;
        }
        let now = self.store.clock().now_us();
        let known = self.known.get_with_by_ref(key, Default::default);
        if let Ok(mut k) = known.lock() {
            // Units already paid for go first, even when the store refuses.
            if k.left > 0 && k.lease_until > now {
                k.left -= 1;
                return Ok(None);
            }
            if k.refused_until > now {
                return Ok(Some(Duration::from_micros(k.refused_until - now)));
            }
        }
        if lease > 1
            && self
                .store
                .gcra(key, interval, burst, lease)
                .await?
                .is_none()
        {
            if let Ok(mut k) = known.lock() {
                k.left += lease - 1;
                k.lease_until = now + LEASE_LIFE_US;
            }
            return Ok(None);
        }
        let wait = self.store.gcra(key, interval, burst, 1).await?;
        if let (Some(w), Ok(mut k)) = (wait, known.lock()) {
            k.refused_until = now.saturating_add(u64::try_from(w.as_micros()).unwrap_or(u64::MAX));
        }
        Ok(wait)
    }

    async fn take(&self, key: &str, l: &Limit, cost: u64) -> Result<Option<Duration>, StoreError> {
        self.take_units(key, l.interval, l.burst, l.lease, cost)
            .await
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
                let why = reason(f);
                f.txn.found.findings.push(Finding::under(
                    Mode::Enforce,
                    "rate_limit",
                    Action::Tempfail,
                    "exceeded".into(),
                    why,
                    r,
                ));
            }
        })
    }
}
