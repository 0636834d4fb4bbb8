//! moka caches behind mail-auth's `DnsCache` hook: every entry lives for its
//! DNS TTL clamped to `[min_ttl, max_ttl]`.

use mail_auth::dns::{DnsCache, Mx, Negative, RecordSet, ResolverCache, TxtRecord};
use moka::sync::Cache;
use std::borrow::Borrow;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Clone)]
struct Entry<V> {
    value: V,
    ttl: Duration,
}

struct Ttl;

impl<K, V> moka::Expiry<K, Entry<V>> for Ttl {
    fn expire_after_create(&self, _: &K, v: &Entry<V>, _: Instant) -> Option<Duration> {
        Some(v.ttl)
    }
}

/// One record type's cache.
pub struct Typed<K, V> {
    inner: Cache<K, Entry<V>>,
    min: Duration,
    max: Duration,
}

impl<K, V> Typed<K, V>
where
    K: Hash + Eq + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn new(capacity: u64, min: Duration, max: Duration) -> Self {
        Typed {
            inner: Cache::builder()
                .max_capacity(capacity)
                .expire_after(Ttl)
                .build(),
            min,
            max,
        }
    }

    pub fn entry_count(&self) -> u64 {
        self.inner.run_pending_tasks();
        self.inner.entry_count()
    }
}

impl<K, V> ResolverCache<K, V> for Typed<K, V>
where
    K: Hash + Eq + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn get<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.inner.get(name).map(|e| e.value)
    }

    fn remove<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.inner.remove(name).map(|e| e.value)
    }

    fn insert(&self, key: K, value: V, valid_until: Instant) {
        let ttl = valid_until
            .saturating_duration_since(Instant::now())
            .clamp(self.min, self.max);
        self.inner.insert(key, Entry { value, ttl });
    }
}

/// The record caches handed to SPF, DKIM, DMARC, ARC and iprev.
pub struct RecordCache {
    pub txt: Typed<Box<str>, TxtRecord>,
    pub mx: Typed<Box<str>, Result<RecordSet<Mx>, Negative>>,
    pub ipv4: Typed<Box<str>, Result<RecordSet<Ipv4Addr>, Negative>>,
    pub ipv6: Typed<Box<str>, Result<RecordSet<Ipv6Addr>, Negative>>,
    pub ptr: Typed<IpAddr, Result<RecordSet<Box<str>>, Negative>>,
}

impl RecordCache {
    pub fn new(capacity: u64, min: Duration, max: Duration) -> RecordCache {
        RecordCache {
            txt: Typed::new(capacity, min, max),
            mx: Typed::new(capacity, min, max),
            ipv4: Typed::new(capacity, min, max),
            ipv6: Typed::new(capacity, min, max),
            ptr: Typed::new(capacity, min, max),
        }
    }
}

impl DnsCache for RecordCache {
    type Txt = Typed<Box<str>, TxtRecord>;
    type Mx = Typed<Box<str>, Result<RecordSet<Mx>, Negative>>;
    type Ipv4 = Typed<Box<str>, Result<RecordSet<Ipv4Addr>, Negative>>;
    type Ipv6 = Typed<Box<str>, Result<RecordSet<Ipv6Addr>, Negative>>;
    type Ptr = Typed<IpAddr, Result<RecordSet<Box<str>>, Negative>>;

    fn txt(&self) -> Option<&Self::Txt> {
        Some(&self.txt)
    }
    fn mx(&self) -> Option<&Self::Mx> {
        Some(&self.mx)
    }
    fn ipv4(&self) -> Option<&Self::Ipv4> {
        Some(&self.ipv4)
    }
    fn ipv6(&self) -> Option<&Self::Ipv6> {
        Some(&self.ipv6)
    }
    fn ptr(&self) -> Option<&Self::Ptr> {
        Some(&self.ptr)
    }
}

impl RecordCache {
    /// Makes DMARC's tree walk (RFC 9989) stop below the public suffix of
    /// `domain`: `_dmarc.<suffix>` and above read as "no record" without a
    /// query. The Organizational Domain is then what RFC 7489 finds with the
    /// Public Suffix List, and a policy found at the author's or the
    /// organization's name cannot be voided by a registry's name server
    /// failing a lookup the decision does not need.
    pub fn shield_public_suffixes(&self, domain: &str) {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        let Some(suffix) = psl::suffix_str(&domain) else {
            return;
        };
        let mut name = suffix;
        loop {
            let key: Box<str> = format!("_dmarc.{name}.").into();
            if self.txt.get::<str>(&key).is_none() {
                let none = Negative {
                    code: mail_auth::hickory_resolver::proto::op::ResponseCode::NXDomain,
                };
                self.txt
                    .insert(key, TxtRecord::Error(none.into()), far_future());
            }
            match name.split_once('.') {
                Some((_, parent)) => name = parent,
                None => break,
            }
        }
    }
}

/// An expiry the cache clamps to its `max_ttl`.
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(365 * 24 * 3600)
}

/// Records what one lookup would have cached, to learn its expiry.
#[derive(Default)]
pub(super) struct Capture {
    until: Mutex<Option<Instant>>,
}

impl Capture {
    pub(super) fn valid_until(&self) -> Option<Instant> {
        self.until.lock().ok().and_then(|u| *u)
    }
}

impl ResolverCache<Box<str>, Result<RecordSet<Ipv4Addr>, Negative>> for Capture {
    fn get<Q>(&self, _: &Q) -> Option<Result<RecordSet<Ipv4Addr>, Negative>>
    where
        Box<str>: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        None
    }

    fn remove<Q>(&self, _: &Q) -> Option<Result<RecordSet<Ipv4Addr>, Negative>>
    where
        Box<str>: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        None
    }

    fn insert(&self, _: Box<str>, _: Result<RecordSet<Ipv4Addr>, Negative>, valid_until: Instant) {
        if let Ok(mut u) = self.until.lock() {
            *u = Some(valid_until);
        }
    }
}
