//! The tally: our transaction and refused-connection lines counted into
//! a `Report`, within a time window.

use super::{Count, Day, Greylisting, Hour, Rate, Report, WhatIf, Window, percent};
use crate::cli::logs::{PrefixClock, read_fields};
use crate::telemetry::{Verdict, event_name, key};
use std::collections::{BTreeMap, HashMap, HashSet};

/// One transaction or refused-connection line, reduced to what stats use.
#[derive(Debug, Default, Clone)]
struct Line {
    time: String,
    event: String,
    verdict: String,
    reason: String,
    code: String,
    client_ip: String,
    mail_from: String,
    dnsbl: String,
    /// `zone:domain=code` per listed link.
    uribl: String,
    /// `rspamd:7.50:add_header`: counted by scanner and action.
    scanner: String,
    rules: String,
    greylist: String,
    rate_limit: String,
    /// The front door (`proxy`, `milter`); lines from before it was logged
    /// were all proxy.
    mode: String,
    spf: String,
    dkim: String,
    dmarc: String,
    /// clamd's verdict (`virus:NAME` counted by name).
    antivirus: String,
    /// `reason=verdict` per record-mode check or shadow rule.
    would: String,
    policy: String,
    rcpt_domains: String,
}

/// Parses one log line; `None` for lines that are not our transaction or
/// refused-connection lines.
fn parse_line(l: &str, clock: &PrefixClock) -> Option<Line> {
    let (time, fields) = read_fields(l, clock)?;
    let event = fields.get(key::EVENT)?.clone();
    if event != event_name::TRANSACTION && event != event_name::REFUSED {
        return None;
    }
    let get = |k: &str| fields.get(k).cloned().unwrap_or_default();
    Some(Line {
        time,
        event,
        verdict: get(key::VERDICT),
        reason: get(key::REASON),
        code: get(key::CODE),
        client_ip: get(key::CLIENT_IP),
        mail_from: get(key::MAIL_FROM),
        dnsbl: get(key::DNSBL),
        uribl: get(key::URIBL),
        scanner: get(key::SCANNER),
        rules: get(key::RULES),
        greylist: get(key::GREYLIST),
        rate_limit: get(key::RATE_LIMIT),
        mode: fields
            .get(key::MODE)
            .cloned()
            .unwrap_or_else(|| "proxy".into()),
        spf: get(key::SPF),
        dkim: get(key::DKIM),
        dmarc: get(key::DMARC),
        antivirus: get(key::ANTIVIRUS),
        would: get(key::WOULD),
        policy: get(key::POLICY),
        rcpt_domains: get(key::RCPT_DOMAINS),
    })
}

fn network(ip: &str) -> String {
    match ip.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(v4)) => {
            let o = v4.octets();
            format!("{}.{}.{}.0/24", o[0], o[1], o[2])
        }
        Ok(std::net::IpAddr::V6(v6)) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}::/48", s[0], s[1], s[2])
        }
        Err(_) => ip.to_string(),
    }
}

/// The sender's domain, lower case; `<>` for the null sender.
fn sender_domain(mail_from: &str) -> String {
    match mail_from.rsplit_once('@') {
        Some((_, d)) => d.to_ascii_lowercase(),
        None => "<>".to_string(),
    }
}

/// Per what-if entry: the counts and whom its refusals would have hit.
#[derive(Default)]
struct WhatIfCount {
    fired: u64,
    reject: u64,
    tempfail: u64,
    accepted: u64,
    senders: HashMap<String, u64>,
    nets: HashMap<String, u64>,
}

/// Rejection rates by name, most transactions first.
fn rates(m: HashMap<String, [u64; 3]>, top: Option<usize>) -> Vec<Rate> {
    let mut v: Vec<Rate> = m
        .into_iter()
        .map(|(name, [transactions, rejected, tempfailed])| Rate {
            name,
            transactions,
            rejected,
            tempfailed,
        })
        .collect();
    v.sort_by(|a, b| {
        b.transactions
            .cmp(&a.transactions)
            .then(a.name.cmp(&b.name))
    });
    if let Some(n) = top {
        v.truncate(n);
    }
    v
}

fn counts(m: HashMap<String, u64>, total: u64, top: Option<usize>) -> Vec<Count> {
    let mut v: Vec<Count> = m
        .into_iter()
        .map(|(name, count)| Count {
            name,
            count,
            rate: percent(count, total),
        })
        .collect();
    v.sort_by(|a, b| b.count.cmp(&a.count).then(a.name.cmp(&b.name)));
    if let Some(n) = top {
        v.truncate(n);
    }
    v
}

pub fn compute(lines: impl Iterator<Item = String>, w: &Window) -> Report {
    compute_at(lines, w, &PrefixClock::system())
}

/// `compute`, reading journal prefix times by `clock`.
pub fn compute_at(lines: impl Iterator<Item = String>, w: &Window, clock: &PrefixClock) -> Report {
    let mut t = Tally::default();
    for raw in lines {
        let Some(l) = parse_line(&raw, clock) else {
            continue;
        };
        t.lines += 1;
        if l.time.is_empty() {
            t.untimed += 1;
            if w.since.is_some() || w.until.is_some() {
                continue;
            }
        }
        if w.since.as_deref().is_some_and(|s| l.time.as_str() < s)
            || w.until.as_deref().is_some_and(|u| l.time.as_str() >= u)
        {
            continue;
        }
        if l.event == event_name::REFUSED {
            t.refused_connection(&l);
        } else {
            t.transaction(&l);
        }
    }
    t.report()
}

/// Counts by name.
type Counts = HashMap<String, u64>;

fn bump(m: &mut Counts, name: &str) {
    *m.entry(name.to_string()).or_insert(0) += 1;
}

/// The counts so far, one table each, as the lines are read.
#[derive(Default)]
struct Tally {
    lines: u64,
    untimed: u64,
    transactions: u64,
    refused_connections: u64,
    refused: Counts,
    modes: Counts,
    verdicts: Counts,
    reasons: Counts,
    tempfails: Counts,
    spf: Counts,
    dkim: Counts,
    dmarc: Counts,
    antivirus: Counts,
    rules: Counts,
    shadow: Counts,
    codes: Counts,
    zones: Counts,
    uribl_zones: Counts,
    uribl_domains: Counts,
    scanner: Counts,
    /// (transactions, rejected, tempfailed) by policy and by recipient domain.
    policies: HashMap<String, [u64; 3]>,
    rcpt_domains: HashMap<String, [u64; 3]>,
    nets: Counts,
    senders: Counts,
    greylist: Counts,
    limits: Counts,
    hours: BTreeMap<String, Hour>,
    what_if: HashMap<String, WhatIfCount>,
    /// (client network, sender) pairs greylisted, and those that passed.
    told: HashSet<(String, String)>,
    passed: HashSet<(String, String)>,
}

impl Tally {
    fn refused_connection(&mut self, l: &Line) {
        self.refused_connections += 1;
        bump(&mut self.refused, &l.reason);
        if let Some(name) = l.reason.strip_prefix("rate_limit:") {
            bump(&mut self.limits, name);
        }
    }

    fn transaction(&mut self, l: &Line) {
        self.transactions += 1;
        let verdict = Verdict::parse(&l.verdict);
        let add = |m: &mut HashMap<String, [u64; 3]>, name: &str| {
            let r = m.entry(name.to_string()).or_insert([0; 3]);
            r[0] += 1;
            r[1] += u64::from(verdict == Some(Verdict::Reject));
            r[2] += u64::from(verdict == Some(Verdict::Tempfail));
        };
        add(
            &mut self.policies,
            if l.policy.is_empty() {
                "(gate)"
            } else {
                &l.policy
            },
        );
        for d in l.rcpt_domains.split_whitespace() {
            add(&mut self.rcpt_domains, d);
        }
        for name in l.rate_limit.split_whitespace() {
            bump(&mut self.limits, name);
        }
        self.greylisting(l);
        bump(&mut self.modes, &l.mode);
        for (result, table) in [
            (&l.spf, &mut self.spf),
            (&l.dkim, &mut self.dkim),
            (&l.dmarc, &mut self.dmarc),
            (&l.antivirus, &mut self.antivirus),
        ] {
            if !result.is_empty() {
                bump(table, result);
            }
        }
        bump(&mut self.verdicts, &l.verdict);
        self.what_if(l);
        if !l.code.is_empty() && l.code != "0" {
            bump(&mut self.codes, &l.code);
        }
        for rule in l.rules.split_whitespace() {
            match rule.strip_suffix("(shadow)") {
                Some(id) => bump(&mut self.shadow, id),
                None => bump(&mut self.rules, rule),
            }
        }
        for z in l.dnsbl.split_whitespace() {
            bump(&mut self.zones, z.split('=').next().unwrap_or(z));
        }
        if !l.scanner.is_empty() {
            // The score varies from message to message: count the verdict.
            let mut parts = l.scanner.splitn(3, ':');
            let (name, second, third) = (parts.next(), parts.next(), parts.next());
            let verdict = match (name, second, third) {
                (Some(n), Some(w @ ("error" | "skipped")), _) => format!("{n}:{w}"),
                (Some(n), Some(_), Some(action)) => format!("{n}:{action}"),
                _ => l.scanner.clone(),
            };
            bump(&mut self.scanner, &verdict);
        }
        // A zone counts once per message, each listed domain once.
        let mut zones = HashSet::new();
        for hit in l.uribl.split_whitespace() {
            let listing = hit.split('=').next().unwrap_or(hit);
            if let Some((zone, domain)) = listing.split_once(':') {
                if zones.insert(zone) {
                    bump(&mut self.uribl_zones, zone);
                }
                bump(&mut self.uribl_domains, domain);
            }
        }
        self.outcome(l);
    }

    /// Greylisting's outcome, and the pairs told to come back or passed.
    fn greylisting(&mut self, l: &Line) {
        if l.greylist.is_empty() {
            return;
        }
        bump(&mut self.greylist, &l.greylist);
        let pair = (network(&l.client_ip), l.mail_from.to_ascii_lowercase());
        match l.greylist.as_str() {
            "new" | "early" => {
                self.told.insert(pair);
            }
            "passed" => {
                self.passed.insert(pair);
            }
            _ => {}
        }
    }

    /// What each record-mode check or shadow rule would have done alone.
    fn what_if(&mut self, l: &Line) {
        for entry in l.would.split_whitespace() {
            let Some((name, word)) = entry.rsplit_once('=') else {
                continue;
            };
            let w = self.what_if.entry(name.to_string()).or_default();
            w.fired += 1;
            match Verdict::parse(word) {
                Some(Verdict::Reject) => w.reject += 1,
                Some(Verdict::Tempfail) => w.tempfail += 1,
                _ => continue,
            }
            if matches!(
                Verdict::parse(&l.verdict),
                Some(Verdict::Accept | Verdict::Tag)
            ) {
                w.accepted += 1;
            }
            bump(&mut w.senders, &sender_domain(&l.mail_from));
            bump(&mut w.nets, &network(&l.client_ip));
        }
    }

    /// The hour's row, and rejections and tempfails by reason.
    fn outcome(&mut self, l: &Line) {
        let hour_key: String = if l.time.is_empty() {
            "(no time)".into()
        } else {
            l.time.chars().take(13).collect()
        };
        let h = self.hours.entry(hour_key.clone()).or_insert_with(|| Hour {
            hour: hour_key,
            transactions: 0,
            rejected: 0,
            tempfailed: 0,
            reasons: BTreeMap::new(),
        });
        h.transactions += 1;
        let reason = if l.reason.is_empty() {
            "unknown"
        } else {
            l.reason.as_str()
        };
        match Verdict::parse(&l.verdict) {
            Some(Verdict::Reject) => {
                h.rejected += 1;
                *h.reasons.entry(reason.to_string()).or_insert(0) += 1;
                bump(&mut self.reasons, reason);
                bump(&mut self.nets, &network(&l.client_ip));
                bump(&mut self.senders, &sender_domain(&l.mail_from));
            }
            Some(Verdict::Tempfail) => {
                h.tempfailed += 1;
                bump(&mut self.tempfails, reason);
            }
            _ => {}
        }
    }

    fn report(self) -> Report {
        let t = self.transactions;
        let hours: Vec<Hour> = self.hours.into_values().collect();
        let came_back = self.told.intersection(&self.passed).count() as u64;
        let greylisted = self.told.len() as u64;
        Report {
            lines: self.lines,
            untimed: self.untimed,
            transactions: t,
            refused_connections: self.refused_connections,
            refused_reasons: counts(self.refused, self.refused_connections, None),
            modes: counts(self.modes, t, None),
            verdicts: counts(self.verdicts, t, None),
            reject_reasons: counts(self.reasons, t, None),
            tempfail_reasons: counts(self.tempfails, t, None),
            spf: counts(self.spf, t, None),
            dkim: counts(self.dkim, t, None),
            dmarc: counts(self.dmarc, t, None),
            antivirus: counts(self.antivirus, t, None),
            rules: counts(self.rules, t, None),
            shadow_rules: counts(self.shadow, t, None),
            codes: counts(self.codes, t, None),
            dnsbl_zones: counts(self.zones, t, None),
            uribl_zones: counts(self.uribl_zones, t, None),
            uribl_domains: counts(self.uribl_domains, t, Some(20)),
            scanner: counts(self.scanner, t, None),
            policies: rates(self.policies, None),
            rcpt_domains: rates(self.rcpt_domains, Some(50)),
            top_networks: counts(self.nets, t, Some(10)),
            top_sender_domains: counts(self.senders, t, Some(10)),
            days: days(&hours),
            hours,
            what_if: what_if(self.what_if),
            rate_limits: counts(self.limits, t, None),
            greylisting: Greylisting {
                outcomes: counts(self.greylist, t, None),
                greylisted,
                came_back,
                never_retried: greylisted - came_back,
                came_back_rate: percent(came_back, greylisted),
            },
        }
    }
}

/// The hours summed by UTC day.
fn days(hours: &[Hour]) -> Vec<Day> {
    let mut days: BTreeMap<String, Day> = BTreeMap::new();
    for h in hours {
        let key: String = h.hour.chars().take(10).collect();
        let d = days.entry(key.clone()).or_insert_with(|| Day {
            day: key,
            transactions: 0,
            rejected: 0,
            tempfailed: 0,
        });
        d.transactions += h.transactions;
        d.rejected += h.rejected;
        d.tempfailed += h.tempfailed;
    }
    days.into_values().collect()
}

/// The what-if entries, most refusals first.
fn what_if(m: HashMap<String, WhatIfCount>) -> Vec<WhatIf> {
    let mut v: Vec<WhatIf> = m
        .into_iter()
        .map(|(name, w)| {
            let refused = w.reject + w.tempfail;
            WhatIf {
                name,
                fired: w.fired,
                would_reject: w.reject,
                would_tempfail: w.tempfail,
                otherwise_accepted: w.accepted,
                top_sender_domains: counts(w.senders, refused, Some(3)),
                top_networks: counts(w.nets, refused, Some(3)),
            }
        })
        .collect();
    v.sort_by(|a, b| {
        (b.would_reject + b.would_tempfail, b.fired)
            .cmp(&(a.would_reject + a.would_tempfail, a.fired))
            .then_with(|| a.name.cmp(&b.name))
    });
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks() {
        assert_eq!(network("192.0.2.77"), "192.0.2.0/24");
        assert_eq!(network("2001:db8:1:2::5"), "2001:db8:1::/48");
    }
}
