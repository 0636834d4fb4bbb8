//! DNS blocklists: queries, return-code filters, error answers, self-tests.
//!
//! An answer outside 127.0.0.0/8 or a Spamhaus-style error code
//! (127.255.255.252/254/255: typo'd zone, public resolver, over quota) is
//! never a listing: the zone is marked unusable and the gate fails open
//! for it. RFC 5782 test entries (127.0.0.2 listed, 127.0.0.1 not; for
//! domain lists TEST listed, INVALID not) are checked at start and every
//! `self_test_interval`; a zone that fails is disabled until it passes.

use super::{Check, Client, Facts, Found, Hook, Pending, done};
use crate::config::{Action, DnsblConfig, Mode, Zone, ZoneType};
use crate::dns::{AAnswer, Dns};
use crate::telemetry::events::DnsblZone;
use crate::verdict::{self, Finding};
use futures_util::future::join_all;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// One zone with its health.
pub struct ZoneState {
    pub conf: Zone,
    usable: AtomicBool,
    /// Times the zone answered with an error code or garbage.
    pub errors: AtomicU64,
}

impl ZoneState {
    pub fn usable(&self) -> bool {
        self.usable.load(Ordering::Acquire)
    }

    fn disable(&self, why: &str) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        DnsblZone {
            zone: &self.conf.zone,
            usable: false,
            changed: self.usable.swap(false, Ordering::AcqRel),
            reason: why,
        }
        .emit();
    }

    fn enable(&self) {
        DnsblZone {
            zone: &self.conf.zone,
            usable: true,
            changed: !self.usable.swap(true, Ordering::AcqRel),
            reason: "",
        }
        .emit();
    }
}

/// A listing found for a client.
#[derive(Debug, Clone, PartialEq)]
pub struct Listing {
    pub zone: String,
    /// What was looked up: the IP, or the domain for domain lists.
    pub subject: String,
    pub codes: Vec<Ipv4Addr>,
    pub txt: Option<String>,
    pub score: f64,
    pub action: Option<Action>,
    pub text: Option<String>,
}

/// What one lookup in one zone came to.
#[derive(Debug, Clone, PartialEq)]
pub enum ZoneOutcome {
    Listed(Listing),
    Clean,
    /// DNS trouble; the zone is skipped for this client.
    Failed(String),
    /// The zone is disabled (failed self-test or gave error codes).
    Unusable,
}

pub struct Dnsbl {
    pub zones: Vec<Arc<ZoneState>>,
    dns: Arc<Dns>,
}

/// Error answers that must never be read as a listing: outside 127/8,
/// Spamhaus's 127.255.255.252-255 (typo'd zone, public resolver, over
/// quota), the DBL's 127.0.1.255 (IP queries refused), and 127.0.0.1,
/// which RFC 5782 forbids as a listing and URIBL answers to resolvers it
/// refuses.
fn is_error_code(a: Ipv4Addr) -> bool {
    let o = a.octets();
    o[0] != 127
        || (o[1] == 255 && o[2] == 255 && o[3] >= 252)
        || o == [127, 0, 0, 1]
        || o == [127, 0, 1, 255]
}

impl Dnsbl {
    pub fn new(zones: &[Zone], dns: Arc<Dns>) -> Dnsbl {
        Dnsbl {
            zones: zones
                .iter()
                .map(|z| {
                    DnsblZone {
                        zone: &z.zone,
                        usable: true,
                        changed: false,
                        reason: "",
                    }
                    .emit();
                    Arc::new(ZoneState {
                        conf: z.clone(),
                        usable: AtomicBool::new(true),
                        errors: AtomicU64::new(0),
                    })
                })
                .collect(),
            dns,
        }
    }

    /// The resolver the zones are asked through.
    pub fn dns(&self) -> &Dns {
        &self.dns
    }

    pub fn ip_zones(&self) -> impl Iterator<Item = &Arc<ZoneState>> {
        self.zones.iter().filter(|z| z.conf.kind == ZoneType::Ip)
    }

    pub fn domain_zones(&self) -> impl Iterator<Item = &Arc<ZoneState>> {
        self.zones
            .iter()
            .filter(|z| z.conf.kind == ZoneType::Domain)
    }

    /// The query name for `ip` in `zone` (IPv4 reversed octets, IPv6 nibbles).
    pub fn ip_name(ip: IpAddr, zone: &str) -> String {
        zone_name(&reversed(ip), zone)
    }

    /// Looks `subject` up in `zone` (an IP for ip zones, a domain for
    /// domain zones); it is written out only for a listing.
    pub async fn lookup(
        dns: &Dns,
        zone: &ZoneState,
        subject: &(impl std::fmt::Display + ?Sized),
        name: &str,
    ) -> ZoneOutcome {
        if !zone.usable() {
            return ZoneOutcome::Unusable;
        }
        Self::outcome(zone, subject, name, dns.lookup_a(name, true).await)
    }

    /// What `zone`'s answer (or failure) for `name` says of `subject`.
    fn outcome(
        zone: &ZoneState,
        subject: &(impl std::fmt::Display + ?Sized),
        name: &str,
        answer: Result<AAnswer, crate::dns::DnsFailure>,
    ) -> ZoneOutcome {
        match answer {
            Ok(AAnswer::NotFound) => ZoneOutcome::Clean,
            Ok(AAnswer::Found { addrs, txt }) => {
                if let Some(bad) = addrs.iter().find(|a| is_error_code(**a)) {
                    zone.disable(&format!("error answer {bad} for {name}"));
                    return ZoneOutcome::Unusable;
                }
                let f = &zone.conf.returns;
                let codes: Vec<Ipv4Addr> = addrs
                    .into_iter()
                    .filter(|a| f.is_empty() || f.iter().any(|r| r.matches(*a)))
                    .collect();
                if codes.is_empty() {
                    return ZoneOutcome::Clean;
                }
                ZoneOutcome::Listed(Listing {
                    zone: zone.conf.zone.clone(),
                    subject: subject.to_string(),
                    codes,
                    txt,
                    score: zone.conf.score,
                    action: zone.conf.action,
                    text: zone.conf.text.clone(),
                })
            }
            Err(e) => ZoneOutcome::Failed(e.to_string()),
        }
    }

    /// `check_ip` when the cache has every zone's answer: no query, no
    /// future, no task. None when one of them has to be asked.
    pub fn check_ip_cached(&self, ip: IpAddr) -> Option<Vec<ZoneOutcome>> {
        let reversed = reversed(ip);
        let (mut out, mut hits) = (Vec::new(), 0);
        for z in self.ip_zones() {
            if !z.usable() {
                out.push(ZoneOutcome::Unusable);
                continue;
            }
            let name = zone_name(&reversed, &z.conf.zone);
            let answer = self.dns.peek_a(&name, true)?;
            hits += 1;
            out.push(Self::outcome(z, &ip, &name, Ok(answer)));
        }
        self.dns.note_cache_hits(hits);
        Some(out)
    }

    /// All ip zones for `ip`, queried in parallel. The address is reversed
    /// and written out once for all of them.
    pub async fn check_ip(&self, ip: IpAddr) -> Vec<ZoneOutcome> {
        let reversed = reversed(ip);
        let lookups = self.ip_zones().map(|z| {
            let name = zone_name(&reversed, &z.conf.zone);
            let dns = &self.dns;
            async move { Self::lookup(dns, z, &ip, &name).await }
        });
        join_all(lookups).await
    }

    /// All domain zones for each of `domains`, in parallel.
    pub async fn check_domains(&self, domains: &[String]) -> Vec<ZoneOutcome> {
        let mut lookups = Vec::new();
        for d in domains {
            let d = d.trim_end_matches('.').to_ascii_lowercase();
            if d.is_empty() || d.parse::<IpAddr>().is_ok() || !d.contains('.') {
                continue;
            }
            for z in self.domain_zones() {
                let name = format!("{d}.{}.", z.conf.zone.trim_end_matches('.'));
                let (dns, z, subject) = (Arc::clone(&self.dns), Arc::clone(z), d.clone());
                lookups.push(async move { Self::lookup(&dns, &z, &subject, &name).await });
            }
        }
        join_all(lookups).await
    }

    /// RFC 5782 section 5 test entries: the listed one must be listed and the
    /// unlisted one must not; otherwise the zone is disabled.
    pub async fn self_test(&self) {
        for z in &self.zones {
            let zone = z.conf.zone.trim_end_matches('.');
            let (listed, unlisted) = match z.conf.kind {
                ZoneType::Ip => (format!("2.0.0.127.{zone}."), format!("1.0.0.127.{zone}.")),
                ZoneType::Domain => (format!("test.{zone}."), format!("invalid.{zone}.")),
            };
            let pos = self.dns.lookup_a(&listed, false).await;
            let neg = self.dns.lookup_a(&unlisted, false).await;
            let ok_pos = matches!(&pos, Ok(AAnswer::Found { addrs, .. }) if addrs.iter().all(|a| !is_error_code(*a)));
            let ok_neg = matches!(&neg, Ok(AAnswer::NotFound));
            if ok_pos && ok_neg {
                z.enable();
            } else {
                let why = format!("self-test: {listed} -> {pos:?}, {unlisted} -> {neg:?}");
                z.disable(&why);
            }
        }
    }
}

/// `ip` as DNS lists key it, without a zone: IPv4 octets in reverse
/// (`1.2.0.192`), IPv6 nibbles in reverse (RFC 5782 section 2.4). Written
/// by hand rather than through `fmt`, which cost more per client than the
/// cached lookups that use it.
pub fn reversed(ip: IpAddr) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(64);
    match ip.to_canonical() {
        IpAddr::V4(a) => {
            for (i, o) in a.octets().iter().rev().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                if *o >= 100 {
                    out.push(char::from(b'0' + o / 100));
                }
                if *o >= 10 {
                    out.push(char::from(b'0' + o / 10 % 10));
                }
                out.push(char::from(b'0' + o % 10));
            }
        }
        IpAddr::V6(a) => {
            for (i, b) in a.octets().iter().rev().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                out.push(char::from(HEX[usize::from(b & 0xf)]));
                out.push('.');
                out.push(char::from(HEX[usize::from(b >> 4)]));
            }
        }
    }
    out
}

/// `reversed.zone.`, the query name in one zone.
fn zone_name(reversed: &str, zone: &str) -> String {
    let zone = zone.trim_end_matches('.');
    let mut name = String::with_capacity(reversed.len() + zone.len() + 2);
    name.push_str(reversed);
    name.push('.');
    name.push_str(zone);
    name.push('.');
    name
}

/// DNSBL as a check: the client's address from `connect` (looked up in
/// the background from the moment the client connects), the HELO name,
/// sender domain and reverse name in domain lists at MAIL.
pub struct DnsblCheck {
    cfg: DnsblConfig,
    dnsbl: Arc<Dnsbl>,
}

impl DnsblCheck {
    pub fn new(cfg: &DnsblConfig, dnsbl: Arc<Dnsbl>) -> DnsblCheck {
        DnsblCheck {
            cfg: cfg.clone(),
            dnsbl,
        }
    }

    fn on(&self) -> bool {
        self.cfg.mode != Mode::Off
    }

    /// Findings and log entries for the answers of a lookup.
    fn record(&self, ip: IpAddr, outcomes: &[ZoneOutcome], found: &mut Found) {
        for o in outcomes {
            match o {
                ZoneOutcome::Listed(hit) => {
                    let codes: Vec<String> = hit.codes.iter().map(|c| c.to_string()).collect();
                    found
                        .log
                        .dnsbl
                        .push(format!("{}={}", hit.zone, codes.join("+")));
                    found.log.dnsbl_zones.push(hit.zone.clone());
                    let action = hit.action.unwrap_or(Action::Score(hit.score));
                    let ip = ip.to_string();
                    found.findings.push(Finding::under(
                        self.cfg.mode,
                        "dnsbl",
                        action,
                        codes.join("+"),
                        format!("dnsbl:{}", hit.zone),
                        verdict::dnsbl_listed(
                            hit.text.as_deref(),
                            &hit.zone,
                            &ip,
                            hit.txt.as_deref(),
                        ),
                    ));
                }
                ZoneOutcome::Failed(e) => {
                    tracing::warn!(error = %e, "DNSBL lookup failed");
                    if self.cfg.on_error == Action::Tempfail {
                        found.findings.push(Finding::under(
                            self.cfg.mode,
                            "dnsbl",
                            Action::Tempfail,
                            "temperror".into(),
                            "dnsbl:temperror".into(),
                            verdict::dns_tempfail(),
                        ));
                    }
                }
                ZoneOutcome::Clean | ZoneOutcome::Unusable => {}
            }
        }
    }
}

impl Check for DnsblCheck {
    fn off(&self) -> bool {
        !self.on()
    }

    fn start(&self, client: &Client, pending: &mut Pending) {
        if self.on() && !client.dnsbl_known_good && self.dnsbl.ip_zones().next().is_some() {
            let ip = client.ip;
            pending.dnsbl = Some(match self.dnsbl.check_ip_cached(ip) {
                Some(answers) => super::Lookup::Ready(Some(Box::new(answers))),
                None => {
                    let bl = Arc::clone(&self.dnsbl);
                    super::Lookup::spawn(async move { bl.check_ip(ip).await })
                }
            });
        }
    }

    fn connect<'a>(&'a self, f: &'a mut Facts) -> Hook<'a> {
        self.record(f.client.ip, &f.client.dnsbl, &mut f.txn.found);
        done()
    }

    fn mail<'a>(&'a self, f: &'a mut Facts) -> Hook<'a> {
        Box::pin(async move {
            if !self.on() || self.dnsbl.domain_zones().next().is_none() {
                return;
            }
            let mut domains = vec![f.client.helo.clone()];
            domains.extend(
                f.txn
                    .sender
                    .rsplit_once('@')
                    .map(|(_, d)| d.to_ascii_lowercase()),
            );
            domains.extend(f.client.reverse().map(str::to_string));
            domains.dedup();
            let outcomes = self.dnsbl.check_domains(&domains).await;
            self.record(f.client.ip, &outcomes, &mut f.txn.found);
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_error_codes() {
        assert_eq!(
            Dnsbl::ip_name("192.0.2.1".parse().unwrap(), "bl.test"),
            "1.2.0.192.bl.test."
        );
        assert_eq!(
            Dnsbl::ip_name("::ffff:192.0.2.1".parse().unwrap(), "bl.test."),
            "1.2.0.192.bl.test."
        );
        let v6 = Dnsbl::ip_name("2001:db8::2".parse().unwrap(), "bl.test");
        assert!(
            v6.starts_with("2.0.0.0.0.0.0.0") && v6.ends_with("8.b.d.0.1.0.0.2.bl.test."),
            "{v6}"
        );
        for e in [
            "127.255.255.252",
            "127.255.255.254",
            "127.255.255.255",
            "127.0.0.1",
            "127.0.1.255",
            "10.0.0.2",
        ] {
            assert!(is_error_code(e.parse().unwrap()), "{e}");
        }
        assert!(!is_error_code("127.0.0.2".parse().unwrap()));
        assert!(!is_error_code("127.0.1.2".parse().unwrap()));
    }

    /// The hand-written reversal gives what mail-auth's does, for every
    /// octet value and for IPv6 (mapped addresses as IPv4).
    #[test]
    fn reversed_names_agree_with_mail_auth() {
        use mail_auth::dns::ToReverseName;
        let mut ips: Vec<IpAddr> = (0..=255u8)
            .map(|o| IpAddr::from([o, 255 - o, o / 3, 7]))
            .collect();
        for s in [
            "0.0.0.0",
            "255.255.255.255",
            "10.0.100.9",
            "::",
            "::1",
            "2001:db8::2",
            "fe80::1234:abcd:ef01:5678",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "::ffff:192.0.2.1",
        ] {
            ips.push(s.parse().unwrap());
        }
        for ip in ips {
            assert_eq!(reversed(ip), ip.to_canonical().to_reverse_name(), "{ip}");
            assert_eq!(
                Dnsbl::ip_name(ip, "bl.test."),
                format!("{}.bl.test.", ip.to_canonical().to_reverse_name())
            );
        }
    }
}
