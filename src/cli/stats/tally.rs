//! The tally: our transaction and refused-connection lines counted into
//! a `Report`, within a time window.

use super::{Count, Day, Greylisting, Hour, Report, WhatIf, Window, percent};
use crate::cli::logs::{PrefixClock, read_fields};
use crate::telemetry::{Verdict, event_name, key};
use std::collections::{BTreeMap, HashMap};

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
    rules: String,
    greylist: String,
    rate_limit: String,
    /// The front door (`proxy`, `milter`); lines from before it was logged
    /// were all proxy.
    mode: String,
    spf: String,
    dkim: String,
    dmarc: String,
    /// `reason=verdict` per record-mode check or shadow rule.
    would: String,
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
        would: get(key::WOULD),
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
    let mut r = Report::default();
    let (
        mut verdicts,
        mut reasons,
        mut rules,
        mut shadow,
        mut codes,
        mut zones,
        mut nets,
        mut senders,
    ) = (
        HashMap::new(),
        HashMap::new(),
        HashMap::new(),
        HashMap::new(),
        HashMap::new(),
        HashMap::new(),
        HashMap::new(),
        HashMap::new(),
    );
    let mut hours: BTreeMap<String, Hour> = BTreeMap::new();
    let mut refused: HashMap<String, u64> = HashMap::new();
    let mut greylist: HashMap<String, u64> = HashMap::new();
    let mut limits: HashMap<String, u64> = HashMap::new();
    let mut modes: HashMap<String, u64> = HashMap::new();
    let mut tempfails: HashMap<String, u64> = HashMap::new();
    let mut what_if: HashMap<String, WhatIfCount> = HashMap::new();
    let (mut spf, mut dkim, mut dmarc): (
        HashMap<String, u64>,
        HashMap<String, u64>,
        HashMap<String, u64>,
    ) = Default::default();
    let (mut told, mut passed) = (
        std::collections::HashSet::new(),
        std::collections::HashSet::new(),
    );
    for raw in lines {
        let Some(l) = parse_line(&raw, clock) else {
            continue;
        };
        r.lines += 1;
        if l.time.is_empty() {
            r.untimed += 1;
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
            r.refused_connections += 1;
            *refused.entry(l.reason.clone()).or_insert(0) += 1;
            if let Some(name) = l.reason.strip_prefix("rate_limit:") {
                *limits.entry(name.to_string()).or_insert(0) += 1;
            }
            continue;
        }
        for name in l.rate_limit.split_whitespace() {
            *limits.entry(name.to_string()).or_insert(0) += 1;
        }
        if !l.greylist.is_empty() {
            *greylist.entry(l.greylist.clone()).or_insert(0) += 1;
            let pair = (network(&l.client_ip), l.mail_from.to_ascii_lowercase());
            match l.greylist.as_str() {
                "new" | "early" => {
                    told.insert(pair);
                }
                "passed" => {
                    passed.insert(pair);
                }
                _ => {}
            }
        }
        r.transactions += 1;
        *modes.entry(l.mode.clone()).or_insert(0) += 1;
        for (result, table) in [
            (&l.spf, &mut spf),
            (&l.dkim, &mut dkim),
            (&l.dmarc, &mut dmarc),
        ] {
            if !result.is_empty() {
                *table.entry(result.clone()).or_insert(0) += 1;
            }
        }
        *verdicts.entry(l.verdict.clone()).or_insert(0) += 1;
        for entry in l.would.split_whitespace() {
            let Some((name, word)) = entry.rsplit_once('=') else {
                continue;
            };
            let w = what_if.entry(name.to_string()).or_default();
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
            *w.senders.entry(sender_domain(&l.mail_from)).or_insert(0) += 1;
            *w.nets.entry(network(&l.client_ip)).or_insert(0) += 1;
        }
        if !l.code.is_empty() && l.code != "0" {
            *codes.entry(l.code.clone()).or_insert(0) += 1;
        }
        let hour_key: String = if l.time.is_empty() {
            "(no time)".into()
        } else {
            l.time.chars().take(13).collect()
        };
        let h = hours.entry(hour_key.clone()).or_insert_with(|| Hour {
            hour: hour_key,
            transactions: 0,
            rejected: 0,
            tempfailed: 0,
            reasons: BTreeMap::new(),
        });
        h.transactions += 1;
        for rule in l.rules.split_whitespace() {
            match rule.strip_suffix("(shadow)") {
                Some(id) => *shadow.entry(id.to_string()).or_insert(0) += 1,
                None => *rules.entry(rule.to_string()).or_insert(0) += 1,
            }
        }
        for z in l.dnsbl.split_whitespace() {
            *zones
                .entry(z.split('=').next().unwrap_or(z).to_string())
                .or_insert(0) += 1;
        }
        let reason = if l.reason.is_empty() {
            "unknown".to_string()
        } else {
            l.reason.clone()
        };
        match Verdict::parse(&l.verdict) {
            Some(Verdict::Reject) => {
                h.rejected += 1;
                *h.reasons.entry(reason.clone()).or_insert(0) += 1;
                *reasons.entry(reason).or_insert(0) += 1;
                *nets.entry(network(&l.client_ip)).or_insert(0) += 1;
                *senders.entry(sender_domain(&l.mail_from)).or_insert(0) += 1;
            }
            Some(Verdict::Tempfail) => {
                h.tempfailed += 1;
                *tempfails.entry(reason).or_insert(0) += 1;
            }
            _ => {}
        }
    }
    let t = r.transactions;
    r.refused_reasons = counts(refused, r.refused_connections, None);
    r.modes = counts(modes, t, None);
    r.verdicts = counts(verdicts, t, None);
    r.reject_reasons = counts(reasons, t, None);
    r.tempfail_reasons = counts(tempfails, t, None);
    r.spf = counts(spf, t, None);
    r.dkim = counts(dkim, t, None);
    r.dmarc = counts(dmarc, t, None);
    r.rules = counts(rules, t, None);
    r.shadow_rules = counts(shadow, t, None);
    r.codes = counts(codes, t, None);
    r.dnsbl_zones = counts(zones, t, None);
    r.top_networks = counts(nets, t, Some(10));
    r.top_sender_domains = counts(senders, t, Some(10));
    r.hours = hours.into_values().collect();
    let mut days: BTreeMap<String, Day> = BTreeMap::new();
    for h in &r.hours {
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
    r.days = days.into_values().collect();
    let mut what_if: Vec<WhatIf> = what_if
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
    what_if.sort_by(|a, b| {
        (b.would_reject + b.would_tempfail, b.fired)
            .cmp(&(a.would_reject + a.would_tempfail, a.fired))
            .then_with(|| a.name.cmp(&b.name))
    });
    r.what_if = what_if;
    r.rate_limits = counts(limits, t, None);
    let came_back = told.intersection(&passed).count() as u64;
    let greylisted = told.len() as u64;
    r.greylisting = Greylisting {
        outcomes: counts(greylist, t, None),
        greylisted,
        came_back,
        never_retried: greylisted - came_back,
        came_back_rate: percent(came_back, greylisted),
    };
    r
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
