//! `portcullis trace ID [LOG...]`: every line of one session, in order,
//! found by its session id or by the MTA's queue id of a message it
//! relayed (`queue_id`, what Postfix logs as "queued as"), with what each
//! transaction's checks and rules found and scored.

use super::logs::{PrefixClock, read_fields};
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
        let Some(session) = f.get("session") else {
            continue;
        };
        if session == id || f.get("queue_id").is_some_and(|q| q == id) {
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
        .filter(|(_, f)| f.get("session").is_some_and(|s| sessions.contains(s)))
        .map(|(time, fields)| Traced { time, fields })
        .collect();
    out.sort_by(|a, b| {
        (&a.fields.get("session"), &a.time).cmp(&(&b.fields.get("session"), &b.time))
    });
    out
}

/// Keys shown in a transaction's summary, so not repeated under "also".
const SHOWN: &[&str] = &[
    "timestamp",
    "ts",
    "level",
    "target",
    "event",
    "session",
    "mode",
    "client_ip",
    "helo",
    "mail_from",
    "rcpt_count",
    "size",
    "verdict",
    "stage",
    "code",
    "enhanced",
    "reason",
    "upstream_reply",
    "queue_id",
    "duration_ms",
    "spf",
    "dkim",
    "dmarc",
    "arc",
    "iprev",
    "reverse",
    "dnsbl",
    "rules",
    "hits",
    "would",
    "score",
    "greylist",
    "rate_limit",
    "tls",
    "tls_version",
    "tls_cipher",
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
        if get("session") != current {
            current = get("session").to_string();
            let _ = writeln!(
                o,
                "{}session {current}: client {} ({}), HELO {}",
                if o.is_empty() { "" } else { "\n" },
                or_dash(get("client_ip")),
                if get("mode").is_empty() {
                    "proxy"
                } else {
                    get("mode")
                },
                or_dash(get("helo")),
            );
        }
        let time = if l.time.is_empty() {
            "(no time)"
        } else {
            l.time.as_str()
        };
        match get("event") {
            "transaction" | "refused" => {
                let _ = writeln!(
                    o,
                    "{time}  {} {} at {}: {} {}{}",
                    get("event"),
                    get("verdict"),
                    or_dash(get("stage")),
                    get("code"),
                    get("enhanced"),
                    if get("reason").is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", get("reason"))
                    }
                );
                if get("event") == "transaction" {
                    let _ = writeln!(
                        o,
                        "    from <{}>, {} recipient(s), {} bytes, {} ms{}",
                        get("mail_from"),
                        or_dash(get("rcpt_count")),
                        or_dash(get("size")),
                        get("duration_ms")
                            .parse::<f64>()
                            .map_or("-".into(), |ms| format!("{ms:.1}")),
                        if get("tls") == "true" {
                            format!(", TLS {} {}", get("tls_version"), get("tls_cipher"))
                        } else {
                            String::new()
                        }
                    );
                }
                let checks: Vec<String> = ["spf", "dkim", "dmarc", "arc", "iprev", "greylist"]
                    .iter()
                    .filter(|k| !get(k).is_empty())
                    .map(|k| format!("{k}={}", get(k)))
                    .collect();
                if !checks.is_empty() {
                    let _ = writeln!(o, "    checks: {}", checks.join(" "));
                }
                for (label, key) in [
                    ("dnsbl", "dnsbl"),
                    ("rate limits", "rate_limit"),
                    ("rules matched", "rules"),
                    ("fired (effect)", "hits"),
                    ("if enforced", "would"),
                    ("upstream said", "upstream_reply"),
                    ("queue id", "queue_id"),
                ] {
                    if !get(key).is_empty() {
                        let _ = writeln!(o, "    {label}: {}", get(key));
                    }
                }
                if !get("score").is_empty() && get("event") == "transaction" {
                    let _ = writeln!(o, "    score: {}", get("score"));
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
