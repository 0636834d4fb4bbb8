//! `portcullis trace ID [LOG...]`: every line of one session, in order,
//! found by its session id or by the MTA's queue id of a message it
//! relayed (`queue_id`, what Postfix logs as "queued as"), with what each
//! transaction's checks and rules found and scored.

use super::logs::{PrefixClock, read_fields};
use crate::telemetry::{event_name, key};
use std::collections::{BTreeSet, HashMap};
use std::fmt::Write;

/// One line of the traced session(s).
#[derive(Debug, Clone)]
pub struct Traced {
    pub time: String,
    pub fields: HashMap<String, String>,
}

/// The sessions `id` names: itself if a line has it as `session`, and the
/// session of every line that has it as `queue_id`.
pub fn sessions_of(
    id: &str,
    lines: impl Iterator<Item = String>,
    clock: &PrefixClock,
) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for raw in lines {
        let Some((_, f)) = read_fields(&raw, clock) else {
            continue;
        };
        let Some(session) = f.get(key::SESSION) else {
            continue;
        };
        if session == id || f.get(key::QUEUE_ID).is_some_and(|q| q == id) {
            found.insert(session.clone());
        }
    }
    found
}

/// Every line of those sessions, by session, in time order (files may be
/// given in any order, rotated ones included); lines without a time keep
/// the order read.
pub fn lines_of(
    sessions: &BTreeSet<String>,
    lines: impl Iterator<Item = String>,
    clock: &PrefixClock,
) -> Vec<Traced> {
    let mut out: Vec<Traced> = lines
        .filter_map(|raw| read_fields(&raw, clock))
        .filter(|(_, f)| f.get(key::SESSION).is_some_and(|s| sessions.contains(s)))
        .map(|(time, fields)| Traced { time, fields })
        .collect();
    out.sort_by(|a, b| {
        (&a.fields.get(key::SESSION), &a.time).cmp(&(&b.fields.get(key::SESSION), &b.time))
    });
    out
}

/// Keys shown in a transaction's summary, so not repeated under "also".
const SHOWN: &[&str] = &[
    "timestamp",
    "ts",
    "level",
    "target",
    key::EVENT,
    key::SESSION,
    key::MODE,
    key::CLIENT_IP,
    key::HELO,
    key::MAIL_FROM,
    key::RCPT_COUNT,
    key::SIZE,
    key::VERDICT,
    key::STAGE,
    key::CODE,
    key::ENHANCED,
    key::REASON,
    key::UPSTREAM_REPLY,
    key::QUEUE_ID,
    key::DURATION_MS,
    key::SPF,
    key::DKIM,
    key::DMARC,
    key::ARC,
    key::IPREV,
    key::REVERSE,
    key::DNSBL,
    key::RULES,
    key::HITS,
    key::WOULD,
    key::SCORE,
    key::GREYLIST,
    key::RATE_LIMIT,
    key::TLS,
    key::TLS_VERSION,
    key::TLS_CIPHER,
    "message",
];

/// The lines as a person reads them: a header per session, then each line
/// with what it says; transactions with their checks, rules and scores.
pub fn render(lines: &[Traced]) -> String {
    let mut o = String::new();
    let mut current = String::new();
    for l in lines {
        let f = &l.fields;
        let get = |k: &str| f.get(k).map(String::as_str).unwrap_or("");
        if get(key::SESSION) != current {
            current = get(key::SESSION).to_string();
            let _ = writeln!(
                o,
                "{}session {current}: client {} ({}), HELO {}",
                if o.is_empty() { "" } else { "\n" },
                or_dash(get(key::CLIENT_IP)),
                if get(key::MODE).is_empty() {
                    "proxy"
                } else {
                    get(key::MODE)
                },
                or_dash(get(key::HELO)),
            );
        }
        let time = if l.time.is_empty() {
            "(no time)"
        } else {
            l.time.as_str()
        };
        match get(key::EVENT) {
            event_name::TRANSACTION | event_name::REFUSED => {
                let _ = writeln!(
                    o,
                    "{time}  {} {} at {}: {} {}{}",
                    get(key::EVENT),
                    get(key::VERDICT),
                    or_dash(get(key::STAGE)),
                    get(key::CODE),
                    get(key::ENHANCED),
                    if get(key::REASON).is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", get(key::REASON))
                    }
                );
                if get(key::EVENT) == event_name::TRANSACTION {
                    let _ = writeln!(
                        o,
                        "    from <{}>, {} recipient(s), {} bytes, {} ms{}",
                        get(key::MAIL_FROM),
                        or_dash(get(key::RCPT_COUNT)),
                        or_dash(get(key::SIZE)),
                        get(key::DURATION_MS)
                            .parse::<f64>()
                            .map_or("-".into(), |ms| format!("{ms:.1}")),
                        if get(key::TLS) == "true" {
                            format!(", TLS {} {}", get(key::TLS_VERSION), get(key::TLS_CIPHER))
                        } else {
                            String::new()
                        }
                    );
                }
                let checks: Vec<String> = [
                    key::SPF,
                    key::DKIM,
                    key::DMARC,
                    key::ARC,
                    key::IPREV,
                    key::GREYLIST,
                ]
                .iter()
                .filter(|k| !get(k).is_empty())
                .map(|k| format!("{k}={}", get(k)))
                .collect();
                if !checks.is_empty() {
                    let _ = writeln!(o, "    checks: {}", checks.join(" "));
                }
                for (label, key) in [
                    ("dnsbl", key::DNSBL),
                    ("rate limits", key::RATE_LIMIT),
                    ("rules matched", key::RULES),
                    ("fired (effect)", key::HITS),
                    ("if enforced", key::WOULD),
                    ("upstream said", key::UPSTREAM_REPLY),
                    ("queue id", key::QUEUE_ID),
                ] {
                    if !get(key).is_empty() {
                        let _ = writeln!(o, "    {label}: {}", get(key));
                    }
                }
                if !get(key::SCORE).is_empty() && get(key::EVENT) == event_name::TRANSACTION {
                    let _ = writeln!(o, "    score: {}", get(key::SCORE));
                }
            }
            _ => {
                let mut rest: Vec<String> = f
                    .iter()
                    .filter(|(k, _)| !SHOWN.contains(&k.as_str()))
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                rest.sort();
                let _ = writeln!(
                    o,
                    "{time}  {} {}{}{}",
                    or_dash(get("level")),
                    get("message"),
                    if rest.is_empty() { "" } else { "  " },
                    rest.join(" ")
                );
            }
        }
    }
    o
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}
