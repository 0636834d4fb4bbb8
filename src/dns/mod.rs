//! DNS: one hickory resolver (inside mail-auth's `MessageAuthenticator`)
//! pointed at the configured nameservers, and moka caches in front of it.
//!
//! - Record caches for SPF/DKIM/DMARC/iprev lookups (`RecordCache`, handed to
//!   mail-auth), each entry kept for its TTL clamped to `[min_ttl, max_ttl]`,
//!   negative answers included.
//! - A DNSBL answer cache with the same TTL rule, in which concurrent
//!   identical lookups are coalesced into one query (moka `try_get_with`).
//!
//! Nothing here ever consults the system resolver.

mod cache;
pub mod health;

pub use cache::RecordCache;
pub use health::{Nameservers, NsState};

use crate::config::DnsConfig;
use crate::telemetry::events::DnsLookup;
use mail_auth::MessageAuthenticator;
use mail_auth::hickory_resolver::config::ResolverOpts;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The answer to an A query (with the zone's TXT reason when listed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AAnswer {
    Found {
        addrs: Vec<Ipv4Addr>,
        txt: Option<String>,
    },
    /// NXDOMAIN or no A records.
    NotFound,
}

/// A lookup that did not produce an answer (timeout, SERVFAIL, ...).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("dns: {0}")]
pub struct DnsFailure(pub String);

#[derive(Debug, Clone)]
struct Timed {
    answer: AAnswer,
    ttl: Duration,
}

/// Counters for tests, logs and metrics.
#[derive(Debug, Default)]
pub struct DnsStats {
    /// Queries sent for DNSBL lookups (cache misses after coalescing).
    pub queries: AtomicU64,
    pub cache_hits: AtomicU64,
    pub failures: AtomicU64,
}

pub struct Dns {
    auth: MessageAuthenticator,
    /// The same nameservers with a short deadline, for while none answers.
    hurried: MessageAuthenticator,
    pub nameservers: Nameservers,
    records: RecordCache,
    /// DNSBL answers by name: A records alone (only the zones' self-tests
    /// ask for these: a few names, so a small cache), and with the TXT
    /// reason (every listing check). Two caches, so that a hit looks the
    /// name up as it is, with no key to build.
    answers: moka::future::Cache<Box<str>, Timed>,
    answers_txt: moka::future::Cache<Box<str>, Timed>,
    min_ttl: Duration,
    max_ttl: Duration,
    pub stats: DnsStats,
}

struct TtlExpiry;

impl moka::Expiry<Box<str>, Timed> for TtlExpiry {
    fn expire_after_create(
        &self,
        _: &Box<str>,
        v: &Timed,
        _: std::time::Instant,
    ) -> Option<Duration> {
        Some(v.ttl)
    }
}

impl Dns {
    pub fn new(cfg: &DnsConfig) -> Result<Arc<Dns>, DnsFailure> {
        let authenticator = |timeout: Duration, attempts: usize| {
            let mut opts = ResolverOpts::default();
            opts.timeout = timeout;
            opts.attempts = attempts;
            // Our caches are the only ones, so TTL handling and query counts are ours.
            opts.cache_size = 0;
            opts.ndots = 0;
            MessageAuthenticator::new(health::resolver_config(&cfg.nameservers), opts)
                .map(|a| a.with_max_negative_ttl(cfg.max_ttl.0))
                .map_err(|e| DnsFailure(e.to_string()))
        };
        Ok(Arc::new(Dns {
            auth: authenticator(cfg.timeout.0, cfg.attempts)?,
            hurried: authenticator(health::DOWN_TIMEOUT.min(cfg.timeout.0), 0)?,
            nameservers: Nameservers::new(cfg).map_err(|e| DnsFailure(e.to_string()))?,
            records: RecordCache::new(cfg.cache_size, cfg.min_ttl.0, cfg.max_ttl.0),
            answers: moka::future::Cache::builder()
                .max_capacity(cfg.cache_size.min(1024))
                .expire_after(TtlExpiry)
                .build(),
            answers_txt: moka::future::Cache::builder()
                .max_capacity(cfg.cache_size)
                .expire_after(TtlExpiry)
                .build(),
            min_ttl: cfg.min_ttl.0,
            max_ttl: cfg.max_ttl.0,
            stats: DnsStats::default(),
        }))
    }

    /// The authenticator (SPF, DKIM, DMARC, ARC, iprev) and its record cache.
    pub fn auth(&self) -> (&MessageAuthenticator, &RecordCache) {
        (self.resolver(), &self.records)
    }

    /// The resolver to use now: the hurried one while no nameserver answers.
    fn resolver(&self) -> &MessageAuthenticator {
        if self.nameservers.answering() {
            &self.auth
        } else {
            &self.hurried
        }
    }

    /// Checks that the nameservers answer (see `health`).
    pub async fn check_nameservers(&self) -> bool {
        self.nameservers.check().await
    }

    fn clamp(&self, ttl: Duration) -> Duration {
        ttl.clamp(self.min_ttl, self.max_ttl)
    }

    /// A records of `name` (fully qualified), plus its TXT when found and
    /// `want_txt`. Cached; concurrent identical lookups share one query.
    pub async fn lookup_a(&self, name: &str, want_txt: bool) -> Result<AAnswer, DnsFailure> {
        let answers = if want_txt {
            &self.answers_txt
        } else {
            &self.answers
        };
        // A hit is a plain read; only a miss sets up the shared query.
        if let Some(t) = answers.get(name).await {
            self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
            DnsLookup::CacheHit.emit();
            return Ok(t.answer);
        }
        let mut fresh = false;
        let got = answers
            .try_get_with(Box::from(name), async {
                fresh = true;
                self.stats.queries.fetch_add(1, Ordering::Relaxed);
                let start = Instant::now();
                let r = self.query_a(name, want_txt).await;
                DnsLookup::Queried(start.elapsed()).emit();
                r
            })
            .await;
        if !fresh {
            self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
            DnsLookup::CacheHit.emit();
        }
        match got {
            Ok(t) => Ok(t.answer),
            Err(e) => {
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                DnsLookup::Failed.emit();
                Err((*e).clone())
            }
        }
    }

    async fn query_a(&self, name: &str, want_txt: bool) -> Result<Timed, DnsFailure> {
        // The capture learns the answer's expiry (record TTL, or the SOA
        // negative TTL for NXDOMAIN) from mail-auth's cache hook.
        let capture = cache::Capture::default();
        let result = self.resolver().ipv4_lookup(name, Some(&capture)).await;
        let ttl = capture
            .valid_until()
            .map(|until| self.clamp(until.saturating_duration_since(Instant::now())))
            .unwrap_or(self.min_ttl);
        match result {
            Ok(set) => {
                let txt = if want_txt {
                    self.resolver()
                        .txt_raw_lookup(name)
                        .await
                        .ok()
                        .map(|t| String::from_utf8_lossy(&t).into_owned())
                } else {
                    None
                };
                Ok(Timed {
                    answer: AAnswer::Found {
                        addrs: set.records.to_vec(),
                        txt,
                    },
                    ttl,
                })
            }
            Err(mail_auth::Error::Dns(mail_auth::DnsError::RecordNotFound(_))) => Ok(Timed {
                answer: AAnswer::NotFound,
                ttl,
            }),
            Err(e) => Err(DnsFailure(e.to_string())),
        }
    }
}
