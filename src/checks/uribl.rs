//! URL blocklists at the end of DATA: the registrable domains of what the
//! message links to (`rules::links`), looked up in domain zones such as
//! dbl.spamhaus.org or multi.surbl.org, and IP-literal links in address
//! zones, through the DNSBL machinery (return-code filters and bit masks,
//! error answers that disable a zone instead of listing, self-tests,
//! the DNS cache).
//!
//! Bounded per message: at most `max_domains` domains (link targets
//! first), every lookup within one `timeout`; what has not answered by
//! then counts as a DNS failure (`on_error`). A zone scores once per
//! message however many of its domains are listed; the log names each.

use super::dnsbl::{Dnsbl, Listing, ZoneOutcome};
use super::{Check, Facts, Found, Hook, Message};
use crate::config::{Action, Mode, UriblConfig};
use crate::rules::links::{Links, registrable};
use crate::telemetry::events::UriblLookups;
use crate::verdict::{self, Finding};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

/// One zone's lookup for one domain or address.
type Lookup<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = ZoneOutcome> + Send + 'a>>;

pub struct Uribl {
    cfg: UriblConfig,
    lists: Arc<Dnsbl>,
    /// Never looked up, with their subdomains: the allow list and the
    /// registrable domain of our own hostname.
    skip: Vec<String>,
}

impl Uribl {
    pub fn new(cfg: &UriblConfig, hostname: &str, lists: Arc<Dnsbl>) -> Uribl {
        let mut skip: Vec<String> = cfg
            .allow
            .iter()
            .map(|d| d.trim_end_matches('.').to_ascii_lowercase())
            .collect();
        skip.extend(registrable(&hostname.to_ascii_lowercase()));
        Uribl {
            cfg: cfg.clone(),
            lists,
            skip,
        }
    }

    fn on(&self) -> bool {
        self.cfg.mode != Mode::Off && !self.lists.zones.is_empty()
    }

    /// What to look up for `links`: the registrable domains of hosts not
    /// skipped (nor in a recipient's domain), then the addresses, at most
    /// `max_domains` in all, in the order the links were ranked.
    pub fn subjects(&self, links: &Links, rcpts: &[String]) -> (Vec<String>, Vec<IpAddr>) {
        let ours: Vec<String> = rcpts
            .iter()
            .filter_map(|r| r.rsplit_once('@'))
            .filter_map(|(_, d)| registrable(&d.to_ascii_lowercase()))
            .collect();
        let under = |host: &str, d: &str| host == d || host.ends_with(&format!(".{d}"));
        let max = self.cfg.max_domains;
        let mut domains: Vec<String> = Vec::new();
        for h in &links.hosts {
            if domains.len() >= max {
                break;
            }
            if self.skip.iter().chain(&ours).any(|d| under(h, d)) {
                continue;
            }
            if let Some(d) = registrable(h).filter(|d| !domains.contains(d)) {
                domains.push(d);
            }
        }
        let room = max - domains.len();
        let ips = if self.lists.ip_zones().next().is_some() {
            links.ips.iter().take(room).copied().collect()
        } else {
            Vec::new()
        };
        (domains, ips)
    }

    /// Every lookup for `domains` and `ips`, together within the budget.
    /// Returns the answers and how many did not come (failed or late).
    async fn look_up(&self, domains: &[String], ips: &[IpAddr]) -> (Vec<Listing>, usize) {
        let dns = self.lists.dns();
        let mut lookups: FuturesUnordered<Lookup<'_>> = FuturesUnordered::new();
        for d in domains {
            for z in self.lists.domain_zones() {
                let name = format!("{d}.{}.", z.conf.zone.trim_end_matches('.'));
                lookups.push(Box::pin(
                    async move { Dnsbl::lookup(dns, z, d, &name).await },
                ));
            }
        }
        for ip in ips {
            for z in self.lists.ip_zones() {
                let name = Dnsbl::ip_name(*ip, &z.conf.zone);
                let subject = ip.to_string();
                lookups.push(Box::pin(async move {
                    Dnsbl::lookup(dns, z, &subject, &name).await
                }));
            }
        }
        let deadline = tokio::time::Instant::now() + self.cfg.timeout.0;
        let (mut listed, mut failed) = (Vec::new(), 0);
        loop {
            match tokio::time::timeout_at(deadline, lookups.next()).await {
                Ok(Some(ZoneOutcome::Listed(l))) => listed.push(l),
                Ok(Some(ZoneOutcome::Failed(e))) => {
                    tracing::debug!(error = %e, "URL blocklist lookup failed");
                    failed += 1;
                }
                Ok(Some(ZoneOutcome::Clean | ZoneOutcome::Unusable)) => {}
                Ok(None) => break,
                Err(_) => {
                    tracing::debug!(
                        pending = lookups.len(),
                        "URL blocklist lookups past checks.uribl.timeout"
                    );
                    failed += lookups.len();
                    break;
                }
            }
        }
        (listed, failed)
    }

    /// Log entries and findings: each listed domain is logged, each zone
    /// scores (or refuses) once, for the first of its domains in link order.
    fn record(
        &self,
        domains: &[String],
        mut listed: Vec<Listing>,
        failed: usize,
        found: &mut Found,
    ) {
        let rank = |s: &str| domains.iter().position(|d| d == s).unwrap_or(usize::MAX);
        listed.sort_by_key(|l| rank(&l.subject));
        for hit in &listed {
            let codes: Vec<String> = hit.codes.iter().map(|c| c.to_string()).collect();
            found
                .log
                .uribl
                .push(format!("{}:{}={}", hit.zone, hit.subject, codes.join("+")));
            if found.log.uribl_zones.contains(&hit.zone) {
                continue;
            }
            found.log.uribl_zones.push(hit.zone.clone());
            let action = hit.action.unwrap_or(Action::Score(hit.score));
            found.findings.push(Finding::under(
                self.cfg.mode,
                "uribl",
                action,
                hit.subject.clone(),
                format!("uribl:{}", hit.zone),
                verdict::uribl_listed(
                    hit.text.as_deref(),
                    &hit.zone,
                    &hit.subject,
                    hit.txt.as_deref(),
                ),
            ));
        }
        if failed > 0 && self.cfg.on_error == Action::Tempfail {
            found.findings.push(Finding::under(
                self.cfg.mode,
                "uribl",
                Action::Tempfail,
                "temperror".into(),
                "uribl:temperror".into(),
                verdict::dns_tempfail(),
            ));
        }
    }
}

impl Check for Uribl {
    fn off(&self) -> bool {
        !self.on()
    }

    fn data<'a, 'm: 'a>(&'m self, f: &'a mut Facts, m: &'a mut Message<'m>) -> Hook<'a> {
        Box::pin(async move {
            if self.off() {
                return;
            }
            let start = Instant::now();
            let links = m.links();
            let (domains, ips) = self.subjects(&links, &f.txn.rcpts);
            if domains.is_empty() && ips.is_empty() {
                return;
            }
            let (listed, failed) = self.look_up(&domains, &ips).await;
            let found = &mut f.txn.found;
            self.record(&domains, listed, failed, found);
            UriblLookups {
                listed: &found.log.uribl_zones,
                failed,
                took: start.elapsed(),
            }
            .emit();
        })
    }
}
