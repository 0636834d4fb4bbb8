//! Reading Portcullis's own log lines, for `stats` and `trace`: files
//! (plain or gzip) or standard input, our lines (json or logfmt) told from
//! others, with or without a journald or syslog prefix, and each line's
//! time (ours, else the prefix's).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

/// A log file that cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("opening {}: {source}", path.display())]
pub struct LogError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// The lines of the logs named (plain, or gzip by their `.gz` ending), or
/// of standard input when none is named.
pub fn log_lines(files: &[PathBuf]) -> Result<impl Iterator<Item = String>, LogError> {
    let mut readers: Vec<Box<dyn Read>> = Vec::new();
    if files.is_empty() {
        readers.push(Box::new(std::io::stdin()));
    }
    for f in files {
        let file = std::fs::File::open(f).map_err(|source| LogError {
            path: f.clone(),
            source,
        })?;
        if f.extension().is_some_and(|e| e == "gz") {
            readers.push(Box::new(flate2::read::MultiGzDecoder::new(file)));
        } else {
            readers.push(Box::new(file));
        }
    }
    Ok(readers
        .into_iter()
        .flat_map(|r| BufReader::new(r).lines().map_while(Result::ok)))
}

/// What the logs named are called in a message: their paths, or
/// "standard input".
pub fn input_name(files: &[PathBuf]) -> String {
    if files.is_empty() {
        return "standard input".to_string();
    }
    files
        .iter()
        .map(|f| Path::display(f).to_string())
        .collect::<Vec<_>>()
        .join(", ")
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
