//! `portcullis stats`: rejection rates from Portcullis's own log lines
//! (read by `cli::logs`): the tally (`tally.rs`) into a `Report`, given
//! as a table, JSON, or an HTML page (`render.rs`, from one list of
//! sections).

mod render;
mod tally;

pub use tally::{compute, compute_at};

use serde::Serialize;
use std::collections::BTreeMap;

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

/// Transactions judged under one name (a recipient domain, a policy), and
/// how many were refused.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Rate {
    pub name: String,
    pub transactions: u64,
    pub rejected: u64,
    pub tempfailed: u64,
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
    /// clamd's verdicts: `clean`, `virus:NAME` (each virus by name),
    /// `error`, `skipped:size`.
    pub antivirus: Vec<Count>,
    pub rules: Vec<Count>,
    /// What shadow rules would have hit.
    pub shadow_rules: Vec<Count>,
    pub codes: Vec<Count>,
    pub dnsbl_zones: Vec<Count>,
    /// URL blocklist zones that listed a link, per message.
    pub uribl_zones: Vec<Count>,
    /// The listed domains (and addresses) the messages linked to, most first.
    pub uribl_domains: Vec<Count>,
    /// The external scanner's verdicts: `rspamd:reject`, `rspamd:error`.
    pub scanner: Vec<Count>,
    /// By policy (`(gate)` for recipients without one), most first.
    pub policies: Vec<Rate>,
    /// By recipient domain (a transaction counts for each of its
    /// recipients' domains), most first, at most 50.
    pub rcpt_domains: Vec<Rate>,
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

/// `n` in percent of `of` (0 when there is nothing).
fn percent(n: u64, of: u64) -> f64 {
    if of == 0 {
        0.0
    } else {
        100.0 * n as f64 / of as f64
    }
}

#[cfg(test)]
mod tests {
    use super::resolve_time;

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
}
