//! DNS: one hickory resolver (inside mail-auth's `MessageAuthenticator`)
//! pointed at the configured nameservers, and moka caches in front of it.
//!
//! - Record caches for SPF/DKIM/DMARC/iprev lookups (`RecordCache`, handed to
//!   mail-auth), each entry kept for its TTL clamped to `[min_ttl, max_ttl]`,
//!   negative answers included.
//! - A DNSBL answer cache with the same TTL rule, read without a future
//!   (a hit at connect needs no task), and concurrent identical misses
//!   coalesced into one query (`flights`).
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
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
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
    /// name up as it is, with no key to build. Synchronous caches: a hit
    /// is a plain read, with no future to build and poll (moka's async
    /// `get` and the join of a client's zones were most of a connection's
    /// DNSBL cost when every answer was cached).
    answers: moka::sync::Cache<Box<str>, Timed>,
    answers_txt: moka::sync::Cache<Box<str>, Timed>,
    /// The misses being asked, by name and TXT wanted: a lookup of a name
    /// already being asked waits for that answer instead of asking again.
    flights: Flights,
    min_ttl: Duration,
    max_ttl: Duration,
    pub stats: DnsStats,
}

/// One query under way, and everyone waiting for its answer.
type Flight = tokio::sync::OnceCell<Result<Timed, DnsFailure>>;

/// The flights under way, by name and TXT wanted.
type Flights = Mutex<HashMap<(Box<str>, bool), Arc<Flight>>>;

/// Takes a finished (or abandoned) flight off the board, so that the next
/// lookup of that name reads the cache, or asks again after a failure.
struct Landed<'a> {
    flights: &'a Flights,
    key: (Box<str>, bool),
    flight: &'a Arc<Flight>,
}

impl Drop for Landed<'_> {
    fn drop(&mut self) {
        let mut flights = lock(self.flights);
        if flights
            .get(&self.key)
            .is_some_and(|f| Arc::ptr_eq(f, self.flight))
        {
            flights.remove(&self.key);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
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
            answers: moka::sync::Cache::builder()
                .max_capacity(cfg.cache_size.min(1024))
                .expire_after(TtlExpiry)
                .build(),
            answers_txt: moka::sync::Cache::builder()
                .max_capacity(cfg.cache_size)
                .expire_after(TtlExpiry)
                .build(),
            flights: Mutex::new(HashMap::new()),
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
        if let Some(a) = self.peek_a(name, want_txt) {
            self.note_cache_hits(1);
            return Ok(a);
        }
        let key = (Box::<str>::from(name), want_txt);
        let flight = Arc::clone(lock(&self.flights).entry(key.clone()).or_default());
        let mut fresh = false;
        let got = flight
            .get_or_init(|| async {
                let _landed = Landed {
                    flights: &self.flights,
                    key,
                    flight: &flight,
                };
                // A flight that landed between our miss and this one's
                // start has cached the answer: no second query.
                if let Some(t) = self.cache(want_txt).get(name) {
                    return Ok(t);
                }
                fresh = true;
                self.stats.queries.fetch_add(1, Ordering::Relaxed);
                let start = Instant::now();
                let r = self.query_a(name, want_txt).await;
                DnsLookup::Queried(start.elapsed()).emit();
                // Cached before the flight lands: a lookup after it reads this.
                if let Ok(t) = &r {
                    self.cache(want_txt).insert(Box::from(name), t.clone());
                }
                r
            })
            .await;
        if !fresh {
            self.note_cache_hits(1);
        }
        match got {
            Ok(t) => Ok(t.answer.clone()),
            Err(e) => {
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                DnsLookup::Failed.emit();
                Err(e.clone())
            }
        }
    }

    /// The cached answer of `lookup_a`, with no query and no future; None
    /// when it would have to ask. Not counted: a caller that uses what it
    /// found says so with `note_cache_hits` (one that goes on to
    /// `lookup_a` would count the same hit twice).
    pub fn peek_a(&self, name: &str, want_txt: bool) -> Option<AAnswer> {
        self.cache(want_txt).get(name).map(|t| t.answer)
    }

    /// Counts `n` answers taken from the cache.
    pub fn note_cache_hits(&self, n: u64) {
        self.stats.cache_hits.fetch_add(n, Ordering::Relaxed);
        for _ in 0..n {
            DnsLookup::CacheHit.emit();
        }
    }

    fn cache(&self, want_txt: bool) -> &moka::sync::Cache<Box<str>, Timed> {
        if want_txt {
            &self.answers_txt
        } else {
            &self.answers
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
