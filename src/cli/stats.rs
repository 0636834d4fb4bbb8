//! `portcullis stats`: rejection rates from Portcullis's own log lines
//! (json or logfmt, plain or gzip), as a table, JSON, or an HTML report.

use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;

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

/// Where a line of ours begins: json, or logfmt with or without our own
/// timestamp (without it when stdout was the journal).
fn is_ours(s: &str) -> bool {
    s.starts_with('{')
        || s.starts_with("ts=")
        || s.starts_with("timestamp=")
        || s.starts_with("level=")
}

/// A line as journald or syslog wrote it (`journalctl -o short`:
/// "Nov 30 10:26:02 host portcullis[812]: {...}"): the prefix and the part
/// after it. Lines without one (`-o cat`, our own files) are kept whole;
/// a syslog priority (`<6>`, our stdout under systemd) is dropped.
fn split_syslog_prefix(l: &str) -> (&str, &str) {
    let l = match l.as_bytes() {
        [b'<', d, b'>', ..] if d.is_ascii_digit() => &l[3..],
        _ => l,
    };
    if is_ours(l) {
        return ("", l);
    }
    for (i, _) in l.match_indices(": ") {
        if is_ours(&l[i + 2..]) {
            return (&l[..i], &l[i + 2..]);
        }
    }
    ("", l)
}

/// Reads the time journald or syslog put in front of a line, for lines
/// that carry none of their own (written to the journal, which keeps the
/// time itself). Prefix times are local unless they carry an offset.
pub struct PrefixClock {
    pub now: jiff::Timestamp,
    pub tz: jiff::tz::TimeZone,
}

impl PrefixClock {
    pub fn system() -> PrefixClock {
        PrefixClock {
            now: jiff::Timestamp::now(),
            tz: jiff::tz::TimeZone::system(),
        }
    }

    /// The prefix's time as RFC 3339 UTC (`2026-11-30T10:26:02Z`), from
    /// `-o short-iso[-precise]` and rsyslog (`2026-11-30T10:26:02+0000`),
    /// or `-o short[-precise]` (`Nov 30 10:26:02`: the year is the one that
    /// puts it at most a day ahead of now).
    pub fn time_of(&self, prefix: &str) -> Option<String> {
        let first = prefix.split(' ').next()?;
        if first.len() >= 19 && first.as_bytes()[4] == b'-' {
            // jiff wants the offset as +00:00; journald writes +0000.
            let fixed = match first.len().checked_sub(5).map(|i| first.split_at(i)) {
                Some((head, off))
                    if (off.starts_with('+') || off.starts_with('-'))
                        && off[1..].bytes().all(|b| b.is_ascii_digit()) =>
                {
                    format!("{head}{}:{}", &off[..3], &off[3..])
                }
                _ => first.to_string(),
            };
            return fixed.parse::<jiff::Timestamp>().ok().map(|t| t.to_string());
        }
        let mut parts = prefix.split_ascii_whitespace();
        let (month, day, clock) = (parts.next()?, parts.next()?, parts.next()?);
        let month = [
            "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
        ]
        .iter()
        .position(|m| *m == month)? as i8
            + 1;
        let day: i8 = day.parse().ok()?;
        let time: jiff::civil::Time = clock.parse().ok()?;
        let year = self.now.to_zoned_datetime(self.tz.clone()).year();
        let at = |y: i16| {
            jiff::civil::date(y, month, day)
                .to_datetime(time)
                .to_zoned_datetime(self.tz.clone())
                .ok()
                .map(|z| z.timestamp())
        };
        let t = at(year)?;
        let t = if t > self.now + jiff::SignedDuration::from_hours(24) {
            at(year - 1)?
        } else {
            t
        };
        Some(t.to_string())
    }
}

/// `--since`/`--until` as the RFC 3339 UTC prefix lines are compared with:
/// `24h`, `90m`, `7d` (that long before `now`), `today`, `yesterday`
/// (their UTC midnight), or an absolute prefix as given (`2026-11-29T08`).
pub fn resolve_time(s: &str, now: std::time::SystemTime) -> Result<String, String> {
    let day = std::time::Duration::from_secs(86_400);
    let midnight = |t: std::time::SystemTime| -> String {
        let stamp = humantime::format_rfc3339_seconds(t).to_string();
        format!("{}T00:00:00Z", &stamp[..10])
    };
    match s {
        "today" => return Ok(midnight(now)),
        "yesterday" => return Ok(midnight(now - day)),
        _ => {}
    }
    let b = s.as_bytes();
    if b.len() >= 4 && b[..4].iter().all(u8::is_ascii_digit) && b.get(4).is_none_or(|&c| c == b'-')
    {
        return Ok(s.to_string());
    }
    let ago = humantime::parse_duration(s).map_err(|_| {
        format!("{s:?}: not a time (2026-11-29T08), a span (24h, 7d) or today/yesterday")
    })?;
    let t = now
        .checked_sub(ago)
        .ok_or_else(|| format!("{s:?} reaches before 1970"))?;
    Ok(humantime::format_rfc3339_seconds(t).to_string())
}

/// One of our log lines (json or logfmt, with or without a journald or
/// syslog prefix) as its keys and values, with its time (ours, else the
/// prefix's; empty when neither has one). `None` for lines not ours.
pub fn read_fields(raw: &str, clock: &PrefixClock) -> Option<(String, HashMap<String, String>)> {
    let (prefix, l) = split_syslog_prefix(raw.trim());
    if !is_ours(l) {
        return None;
    }
    let fields: HashMap<String, String> = if l.starts_with('{') {
        let v: serde_json::Value = serde_json::from_str(l).ok()?;
        v.as_object()?
            .iter()
            .map(|(k, v)| {
                let s = match v {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (k.clone(), s)
            })
            .collect()
    } else {
        logfmt(l)
    };
    // Ours when we wrote one; else the journal's (see telemetry::init).
    let time = fields
        .get("timestamp")
        .or_else(|| fields.get("ts"))
        .cloned()
        .or_else(|| clock.time_of(prefix))
        .unwrap_or_default();
    Some((time, fields))
}

/// Parses one log line; `None` for lines that are not our transaction or
/// refused-connection lines.
fn parse_line(l: &str, clock: &PrefixClock) -> Option<Line> {
    let (time, fields) = read_fields(l, clock)?;
    let event = fields.get("event")?.clone();
    if event != "transaction" && event != "refused" {
        return None;
    }
    let get = |k: &str| fields.get(k).cloned().unwrap_or_default();
    Some(Line {
        time,
        event,
        verdict: get("verdict"),
        reason: get("reason"),
        code: get("code"),
        client_ip: get("client_ip"),
        mail_from: get("mail_from"),
        dnsbl: get("dnsbl"),
        rules: get("rules"),
        greylist: get("greylist"),
        rate_limit: get("rate_limit"),
        mode: fields
            .get("mode")
            .cloned()
            .unwrap_or_else(|| "proxy".into()),
        spf: get("spf"),
        dkim: get("dkim"),
        dmarc: get("dmarc"),
        would: get("would"),
    })
}

/// `key=value key="quoted value"` pairs.
fn logfmt(l: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut chars = l.chars().peekable();
    loop {
        while chars.peek() == Some(&' ') {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c == ' ' {
                break;
            }
            key.push(c);
            chars.next();
        }
        if key.is_empty() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'=') {
            chars.next();
            if chars.peek() == Some(&'"') {
                chars.next();
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => {
                            if let Some(n) = chars.next() {
                                value.push(n);
                            }
                        }
                        '"' => break,
                        c => value.push(c),
                    }
                }
            } else {
                while let Some(&c) = chars.peek() {
                    if c == ' ' {
                        break;
                    }
                    value.push(c);
                    chars.next();
                }
            }
        }
        out.insert(key, value);
    }
    out
}

/// A count with its share of all transactions.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Count {
    pub name: String,
    pub count: u64,
    /// Percent of all transactions.
    pub rate: f64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Hour {
    pub hour: String,
    pub transactions: u64,
    pub rejected: u64,
    pub tempfailed: u64,
    /// Rejections by reason in this hour.
    pub reasons: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Day {
    /// `2026-11-29` (UTC).
    pub day: String,
    pub transactions: u64,
    pub rejected: u64,
    pub tempfailed: u64,
}

/// One record-mode check or shadow rule: what enforcing it alone would
/// have changed.
#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct WhatIf {
    /// As in the log: `rule:TRYOUT`, `dnsbl:zen.spamhaus.org`, `spf:fail`.
    pub name: String,
    /// Transactions where it fired.
    pub fired: u64,
    /// ... that it would have rejected, or tempfailed, if enforced.
    pub would_reject: u64,
    pub would_tempfail: u64,
    /// ... of those refusals, transactions that were in fact accepted
    /// (the mail enforcing it would have stopped).
    pub otherwise_accepted: u64,
    /// Who the refusals would have hit.
    pub top_sender_domains: Vec<Count>,
    pub top_networks: Vec<Count>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct Report {
    /// Portcullis lines read (inside the time window or not).
    pub lines: u64,
    /// ... of which carry no time (our lines written to the journal, read
    /// back with `journalctl -o cat`): outside any --since/--until window
    /// and the per-hour table.
    pub untimed: u64,
    pub transactions: u64,
    pub refused_connections: u64,
    /// Transactions by front door (`proxy`, `milter`).
    pub modes: Vec<Count>,
    /// Refused connections by reason (rate: percent of refused connections).
    pub refused_reasons: Vec<Count>,
    pub verdicts: Vec<Count>,
    pub reject_reasons: Vec<Count>,
    /// Tempfails by reason: greylisting, DNS trouble (`*:temperror`),
    /// upstream, limits, rate limits.
    pub tempfail_reasons: Vec<Count>,
    /// Check outcomes over the transactions where the check ran.
    pub spf: Vec<Count>,
    pub dkim: Vec<Count>,
    pub dmarc: Vec<Count>,
    pub rules: Vec<Count>,
    /// What shadow rules would have hit.
    pub shadow_rules: Vec<Count>,
    pub codes: Vec<Count>,
    pub dnsbl_zones: Vec<Count>,
    pub hours: Vec<Hour>,
    pub days: Vec<Day>,
    /// Record-mode checks and shadow rules, if enforced (most refusals first).
    pub what_if: Vec<WhatIf>,
    pub top_networks: Vec<Count>,
    pub top_sender_domains: Vec<Count>,
    pub greylisting: Greylisting,
    /// Rate limits hit, by name (transactions and refused connections).
    pub rate_limits: Vec<Count>,
}

/// What greylisting did, and whether the greylisted came back: the
/// number admins want is the share of greylisted (client network,
/// sender) pairs that retried and passed.
#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct Greylisting {
    /// Transactions by outcome (`new`, `early`, `passed`, `allowed`, `error`).
    pub outcomes: Vec<Count>,
    /// (client network, sender) pairs told to come back.
    pub greylisted: u64,
    /// ... of which retried and passed later.
    pub came_back: u64,
    /// ... and never did (within the log).
    pub never_retried: u64,
    /// `came_back` in percent of `greylisted`.
    pub came_back_rate: f64,
}

/// Only lines within [since, until) count; both compare as text on the
/// RFC 3339 UTC timestamps, so `2026-11-29` and `2026-11-29T13` work.
#[derive(Debug, Default, Clone)]
pub struct Window {
    pub since: Option<String>,
    pub until: Option<String>,
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

/// `n` in percent of `of` (0 when there is nothing).
fn percent(n: u64, of: u64) -> f64 {
    if of == 0 {
        0.0
    } else {
        100.0 * n as f64 / of as f64
    }
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
        if l.event == "refused" {
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
            match word {
                "reject" => w.reject += 1,
                "tempfail" => w.tempfail += 1,
                _ => continue,
            }
            if matches!(l.verdict.as_str(), "accept" | "tag") {
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
        match l.verdict.as_str() {
            "reject" => {
                h.rejected += 1;
                *h.reasons.entry(reason.clone()).or_insert(0) += 1;
                *reasons.entry(reason).or_insert(0) += 1;
                *nets.entry(network(&l.client_ip)).or_insert(0) += 1;
                *senders.entry(sender_domain(&l.mail_from)).or_insert(0) += 1;
            }
            "tempfail" => {
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

impl Report {
    pub fn to_text(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "transactions: {}   refused connections: {}",
            self.transactions, self.refused_connections
        );
        let section = |o: &mut String, title: &str, v: &[Count]| {
            if v.is_empty() {
                return;
            }
            let _ = writeln!(o, "\n{title}");
            for c in v {
                let _ = writeln!(o, "  {:<40} {:>8} {:>7.2}%", c.name, c.count, c.rate);
            }
        };
        section(&mut o, "front doors (mode)", &self.modes);
        section(&mut o, "verdicts", &self.verdicts);
        section(
            &mut o,
            "refused connections by reason (% of refused)",
            &self.refused_reasons,
        );
        section(&mut o, "rejections by reason", &self.reject_reasons);
        section(&mut o, "tempfails by reason", &self.tempfail_reasons);
        section(&mut o, "SPF results", &self.spf);
        section(&mut o, "DKIM results", &self.dkim);
        section(&mut o, "DMARC results", &self.dmarc);
        section(&mut o, "rules (enforced)", &self.rules);
        section(&mut o, "shadow rules (would have hit)", &self.shadow_rules);
        if !self.what_if.is_empty() {
            let _ = writeln!(
                o,
                "\nwhat if enforced (record-mode checks and shadow rules, each alone)\n  {:<40} {:>8} {:>8} {:>9} {:>18}",
                "", "fired", "reject", "tempfail", "otherwise accepted"
            );
            for w in &self.what_if {
                let _ = writeln!(
                    o,
                    "  {:<40} {:>8} {:>8} {:>9} {:>18}",
                    w.name, w.fired, w.would_reject, w.would_tempfail, w.otherwise_accepted
                );
                let list = |v: &[Count]| {
                    v.iter()
                        .map(|c| format!("{} {}", c.name, c.count))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                if !w.top_sender_domains.is_empty() {
                    let _ = writeln!(
                        o,
                        "      would hit: {}; networks {}",
                        list(&w.top_sender_domains),
                        list(&w.top_networks)
                    );
                }
            }
        }
        section(&mut o, "reply codes", &self.codes);
        section(&mut o, "DNSBL zones", &self.dnsbl_zones);
        section(&mut o, "greylisting", &self.greylisting.outcomes);
        let g = &self.greylisting;
        if g.greylisted > 0 {
            let _ = writeln!(
                o,
                "  greylisted client/sender pairs: {}, came back and passed: {} ({:.1}%), never retried: {}",
                g.greylisted, g.came_back, g.came_back_rate, g.never_retried
            );
        }
        section(&mut o, "rate limits hit", &self.rate_limits);
        if !self.hours.is_empty() {
            let _ = writeln!(
                o,
                "\nper hour (UTC)       transactions  rejected  tempfailed  reject rate"
            );
            for h in &self.hours {
                let _ = writeln!(
                    o,
                    "  {:<18} {:>12} {:>9} {:>11} {:>11.2}%",
                    h.hour,
                    h.transactions,
                    h.rejected,
                    h.tempfailed,
                    percent(h.rejected, h.transactions)
                );
            }
        }
        if self.days.len() > 1 {
            let _ = writeln!(
                o,
                "\nper day (UTC)        transactions  rejected  tempfailed  reject rate"
            );
            for d in &self.days {
                let _ = writeln!(
                    o,
                    "  {:<18} {:>12} {:>9} {:>11} {:>11.2}%",
                    d.day,
                    d.transactions,
                    d.rejected,
                    d.tempfailed,
                    percent(d.rejected, d.transactions)
                );
            }
        }
        section(&mut o, "top refused client networks", &self.top_networks);
        section(
            &mut o,
            "top refused sender domains",
            &self.top_sender_domains,
        );
        o
    }

    /// A self-contained HTML page: tables and an inline SVG chart of the
    /// rejection rate per hour, stacked by reason. No scripts, no network.
    pub fn to_html(&self) -> String {
        let esc = |s: &str| {
            s.replace('&', "&amp;")
                .replace('<', "&lt;")
                .replace('>', "&gt;")
                .replace('"', "&quot;")
        };
        let mut o = String::from(
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Portcullis rejection report</title>\n<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:1.5em}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}td:first-child,th:first-child{text-align:left}</style></head><body>\n",
        );
        let _ = writeln!(
            o,
            "<h1>Portcullis rejection report</h1>\n<p>{} transactions, {} refused connections.</p>",
            self.transactions, self.refused_connections
        );
        // Chart: one bar per hour, height = rejection rate, stacked by reason.
        let reasons: Vec<String> = self.reject_reasons.iter().map(|c| c.name.clone()).collect();
        let palette = [
            "#d62728", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
            "#1f77b4", "#2ca02c",
        ];
        let (bw, ch) = (24.0, 200.0);
        let width = 60.0 + bw * self.hours.len().max(1) as f64;
        let _ = writeln!(
            o,
            "<h2>Rejection rate per hour, by reason</h2>\n<svg width=\"{width}\" height=\"{}\" role=\"img\" aria-label=\"rejection rate per hour\">",
            ch + 45.0
        );
        let _ = writeln!(
            o,
            "<line x1=\"50\" y1=\"10\" x2=\"50\" y2=\"{}\" stroke=\"black\"/><text x=\"5\" y=\"15\" font-size=\"10\">100%</text><text x=\"5\" y=\"{}\" font-size=\"10\">0%</text>",
            ch + 10.0,
            ch + 10.0
        );
        for (i, h) in self.hours.iter().enumerate() {
            let x = 55.0 + bw * i as f64;
            let mut y = ch + 10.0;
            for (j, reason) in reasons.iter().enumerate() {
                let n = h.reasons.get(reason).copied().unwrap_or(0);
                if n == 0 || h.transactions == 0 {
                    continue;
                }
                let hgt = ch * n as f64 / h.transactions as f64;
                y -= hgt;
                let _ = writeln!(
                    o,
                    "<rect x=\"{x}\" y=\"{y:.1}\" width=\"{}\" height=\"{hgt:.1}\" fill=\"{}\"><title>{} {}: {n}</title></rect>",
                    bw - 4.0,
                    palette[j % palette.len()],
                    esc(&h.hour),
                    esc(reason)
                );
            }
            let _ = writeln!(
                o,
                "<text x=\"{x}\" y=\"{}\" font-size=\"8\">{}</text>",
                ch + 25.0,
                esc(h.hour.get(11..13).unwrap_or(""))
            );
            // The date under the first hour of each day.
            let day = h.hour.get(..10).unwrap_or("");
            if i == 0 || self.hours[i - 1].hour.get(..10) != Some(day) {
                let _ = writeln!(
                    o,
                    "<text x=\"{x}\" y=\"{}\" font-size=\"8\">{}</text>",
                    ch + 37.0,
                    esc(day)
                );
            }
        }
        let _ = writeln!(o, "</svg>\n<p>");
        for (j, reason) in reasons.iter().enumerate() {
            let _ = write!(
                o,
                "<span style=\"color:{}\">&#9632;</span> {} &nbsp; ",
                palette[j % palette.len()],
                esc(reason)
            );
        }
        let _ = writeln!(o, "</p>");
        let table = |o: &mut String, title: &str, v: &[Count]| {
            let _ = writeln!(
                o,
                "<h2>{}</h2>\n<table><tr><th>name</th><th>count</th><th>% of transactions</th></tr>",
                esc(title)
            );
            for c in v {
                let _ = writeln!(
                    o,
                    "<tr><td>{}</td><td>{}</td><td>{:.2}</td></tr>",
                    esc(&c.name),
                    c.count,
                    c.rate
                );
            }
            let _ = writeln!(o, "</table>");
        };
        table(&mut o, "Front doors (mode)", &self.modes);
        table(&mut o, "Verdicts", &self.verdicts);
        table(
            &mut o,
            "Refused connections by reason (% of refused)",
            &self.refused_reasons,
        );
        table(&mut o, "Rejections by reason", &self.reject_reasons);
        table(&mut o, "Tempfails by reason", &self.tempfail_reasons);
        table(&mut o, "SPF results", &self.spf);
        table(&mut o, "DKIM results", &self.dkim);
        table(&mut o, "DMARC results", &self.dmarc);
        table(&mut o, "Rules (enforced)", &self.rules);
        table(&mut o, "Shadow rules (would have hit)", &self.shadow_rules);
        if !self.what_if.is_empty() {
            let _ = writeln!(
                o,
                "<h2>What if enforced (record-mode checks and shadow rules, each alone)</h2>\n<table><tr><th>name</th><th>fired</th><th>would reject</th><th>would tempfail</th><th>otherwise accepted</th><th>would hit (sender domains)</th><th>networks</th></tr>"
            );
            let list = |v: &[Count]| {
                v.iter()
                    .map(|c| format!("{} {}", esc(&c.name), c.count))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            for w in &self.what_if {
                let _ = writeln!(
                    o,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    esc(&w.name),
                    w.fired,
                    w.would_reject,
                    w.would_tempfail,
                    w.otherwise_accepted,
                    list(&w.top_sender_domains),
                    list(&w.top_networks)
                );
            }
            let _ = writeln!(o, "</table>");
        }
        table(&mut o, "Reply codes", &self.codes);
        table(&mut o, "DNSBL zones", &self.dnsbl_zones);
        table(&mut o, "Greylisting", &self.greylisting.outcomes);
        let g = &self.greylisting;
        if g.greylisted > 0 {
            let _ = writeln!(
                o,
                "<p>Greylisted client/sender pairs: {}; came back and passed: {} ({:.1}%); never retried: {}</p>",
                g.greylisted, g.came_back, g.came_back_rate, g.never_retried
            );
        }
        table(&mut o, "Rate limits hit", &self.rate_limits);
        let periods = |o: &mut String, title: &str, rows: Vec<(&str, u64, u64, u64)>| {
            let _ = writeln!(
                o,
                "<h2>{title}</h2>\n<table><tr><th>UTC</th><th>transactions</th><th>rejected</th><th>tempfailed</th><th>reject rate %</th></tr>"
            );
            for (when, t, r, tf) in rows {
                let _ = writeln!(
                    o,
                    "<tr><td>{}</td><td>{t}</td><td>{r}</td><td>{tf}</td><td>{:.2}</td></tr>",
                    esc(when),
                    percent(r, t)
                );
            }
            let _ = writeln!(o, "</table>");
        };
        periods(
            &mut o,
            "Per day",
            self.days
                .iter()
                .map(|d| (d.day.as_str(), d.transactions, d.rejected, d.tempfailed))
                .collect(),
        );
        periods(
            &mut o,
            "Per hour",
            self.hours
                .iter()
                .map(|h| (h.hour.as_str(), h.transactions, h.rejected, h.tempfailed))
                .collect(),
        );
        table(&mut o, "Top refused client networks", &self.top_networks);
        table(
            &mut o,
            "Top refused sender domains",
            &self.top_sender_domains,
        );
        o.push_str("</body></html>\n");
        o
    }
}

#[cfg(test)]
mod tests {
    use super::{PrefixClock, resolve_time, split_syslog_prefix};

    #[test]
    fn relative_times() {
        // 2026-11-30T11:30:00Z
        let now = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_796_038_200);
        assert_eq!(resolve_time("24h", now).unwrap(), "2026-11-29T11:30:00Z");
        assert_eq!(resolve_time("90m", now).unwrap(), "2026-11-30T10:00:00Z");
        assert_eq!(resolve_time("today", now).unwrap(), "2026-11-30T00:00:00Z");
        assert_eq!(
            resolve_time("yesterday", now).unwrap(),
            "2026-11-29T00:00:00Z"
        );
        assert_eq!(resolve_time("2026-11-29T08", now).unwrap(), "2026-11-29T08");
        assert_eq!(resolve_time("2026", now).unwrap(), "2026");
        assert!(resolve_time("last week", now).is_err());
    }

    #[test]
    fn syslog_prefixes() {
        let json = r#"{"event":"transaction"}"#;
        assert_eq!(
            split_syslog_prefix(&format!("Nov 30 10:26:02 mx portcullis[812]: {json}")),
            ("Nov 30 10:26:02 mx portcullis[812]", json)
        );
        assert_eq!(
            split_syslog_prefix("2026-11-30T10:26:02+0000 mx portcullis[812]: ts=2026 event=x").1,
            "ts=2026 event=x"
        );
        assert_eq!(
            split_syslog_prefix("Nov 30 10:26:02 mx portcullis[812]: level=INFO event=x").1,
            "level=INFO event=x"
        );
        assert_eq!(split_syslog_prefix(json), ("", json));
        assert_eq!(split_syslog_prefix(&format!("<6>{json}")), ("", json));
        assert_eq!(
            split_syslog_prefix("Nov 30 mx kernel: hello").1,
            "Nov 30 mx kernel: hello"
        );
    }

    #[test]
    fn prefix_times() {
        let at = |now: &str, tz: &str| PrefixClock {
            now: now.parse().unwrap(),
            tz: jiff::tz::TimeZone::get(tz).unwrap(),
        };
        let utc = at("2026-11-30T12:00:00Z", "UTC");
        let t = |c: &PrefixClock, p: &str| c.time_of(p).unwrap_or_default();
        assert_eq!(
            t(&utc, "Nov 30 10:26:02 mx portcullis[812]"),
            "2026-11-30T10:26:02Z"
        );
        assert_eq!(
            t(&utc, "Nov 30 10:26:02.250000 mx portcullis[812]"),
            "2026-11-30T10:26:02.25Z"
        );
        // -o short-iso, rsyslog, -o short-iso-precise: the offset says.
        assert_eq!(
            t(&utc, "2026-11-30T11:26:02+0100 mx p[1]"),
            "2026-11-30T10:26:02Z"
        );
        assert_eq!(
            t(&utc, "2026-11-30T10:26:02+00:00 mx p[1]"),
            "2026-11-30T10:26:02Z"
        );
        assert_eq!(
            t(&utc, "2026-11-30T10:26:02.5-0500 mx p[1]"),
            "2026-11-30T15:26:02.5Z"
        );
        // Local times without an offset are read in the local zone.
        let berlin = at("2026-11-30T12:00:00Z", "Europe/Berlin");
        assert_eq!(
            t(&berlin, "Nov 30 10:26:02 mx p[1]"),
            "2026-11-30T09:26:02Z"
        );
        // No year: a date more than a day ahead is last year's.
        let new_year = at("2027-01-01T00:30:00Z", "UTC");
        assert_eq!(
            t(&new_year, "Dec 31 23:59:59 mx p[1]"),
            "2026-12-31T23:59:59Z"
        );
        assert_eq!(
            t(&new_year, "Jan  1 00:10:00 mx p[1]"),
            "2027-01-01T00:10:00Z"
        );
        assert_eq!(utc.time_of("mx kernel"), None);
        assert_eq!(utc.time_of(""), None);
    }

    use super::*;

    #[test]
    fn logfmt_pairs() {
        let m = logfmt(
            r#"ts=2026-11-29T01:00:00Z event=transaction reason="spf:fail x" empty= q="a\"b""#,
        );
        assert_eq!(m["reason"], "spf:fail x");
        assert_eq!(m["empty"], "");
        assert_eq!(m["q"], "a\"b");
        assert_eq!(m["event"], "transaction");
    }

    #[test]
    fn networks() {
        assert_eq!(network("192.0.2.77"), "192.0.2.0/24");
        assert_eq!(network("2001:db8:1:2::5"), "2001:db8:1::/48");
    }
}
