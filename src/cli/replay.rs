//! `portcullis replay`: what would today's config and rules do to mail
//! already received? Reads messages from Maildirs, mbox files and `.eml`
//! files, rebuilds each one's transaction from its headers (the envelope
//! from Return-Path and Delivered-To / X-Original-To, the client from the
//! topmost Received field the MTA wrote), and runs it through the same
//! screen as `explain`. Prints one line per message and a summary; with
//! `--log`, the messages whose verdict changed since they were logged.
//!
//! Bounded in memory whatever the size of the input: an mbox is read as
//! a stream, one message at a time, each held only up to the config's
//! `limits.max_message_size` (past that it is reported and skipped).

use super::explain::{Explained, Judge, Sample};
use crate::checks::Screened;
use crate::config::{Config, Mode};
use crate::telemetry::{Verdict, key};
use crate::verdict::Decision;
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// What the command was asked.
pub struct Options {
    pub paths: Vec<PathBuf>,
    /// The client's address and HELO name when Received does not say.
    pub ip: Option<IpAddr>,
    pub helo: Option<String>,
    pub no_dns: bool,
    pub json: bool,
    /// Our log files, to compare verdicts with.
    pub logs: Vec<PathBuf>,
}

/// One message read, or why it could not be.
struct Item {
    /// `path`, or `path#N` for the Nth message of an mbox.
    name: String,
    raw: Result<Vec<u8>, String>,
}

/// What one message got.
#[derive(Debug, Clone, PartialEq)]
pub struct Judged {
    pub verdict: Verdict,
    pub code: u16,
    pub reason: String,
    pub message_id: String,
    pub queue_id: String,
}

/// The run's counts.
#[derive(Debug, Default)]
pub struct Summary {
    pub messages: u64,
    pub errors: u64,
    pub by_verdict: BTreeMap<&'static str, u64>,
    pub refused_by_reason: BTreeMap<String, u64>,
    pub compared: u64,
    pub changed: u64,
}

/// Runs the replay, writing to `out`; the summary at the end.
pub async fn run(
    cfg: Config,
    opts: &Options,
    out: &mut dyn std::io::Write,
) -> Result<Summary, String> {
    let max = cfg.limits.max_message_size.0;
    let hostname = cfg.hostname.clone();
    // State built up over time would judge old mail by what the replay
    // itself did: greylisting, rate limits and reputation do not apply.
    let judge = Judge::with(cfg, opts.no_dns, |c| {
        c.greylist.mode = Mode::Off;
        c.rate_limits.clear();
        c.reputation.enabled = false;
    })?;
    let before = match opts.logs.is_empty() {
        true => None,
        false => Some(logged_verdicts(&opts.logs)?),
    };
    let mut summary = Summary::default();
    let mut failed_to_write = None;
    let mut each = |item: Item, summary: &mut Summary, judged: Result<Judged, String>| {
        summary.messages += 1;
        let line = match judged {
            Err(e) => {
                summary.errors += 1;
                if opts.json {
                    serde_json::json!({"message": item.name, "error": e}).to_string()
                } else {
                    format!("{}: error: {e}", item.name)
                }
            }
            Ok(j) => {
                *summary.by_verdict.entry(j.verdict.as_str()).or_insert(0) += 1;
                if matches!(j.verdict, Verdict::Reject | Verdict::Tempfail) {
                    *summary
                        .refused_by_reason
                        .entry(j.reason.clone())
                        .or_insert(0) += 1;
                }
                let was = before.as_ref().and_then(|b| {
                    b.get(&format!("q:{}", j.queue_id))
                        .filter(|_| !j.queue_id.is_empty())
                        .or_else(|| {
                            b.get(&format!("m:{}", j.message_id))
                                .filter(|_| !j.message_id.is_empty())
                        })
                });
                if let Some(was) = was {
                    summary.compared += 1;
                    summary.changed += u64::from(was != j.verdict.as_str());
                }
                let changed = was.filter(|w| *w != j.verdict.as_str());
                if opts.json {
                    let mut v = serde_json::json!({
                        "message": item.name,
                        "message_id": j.message_id,
                        "verdict": j.verdict.as_str(),
                        "code": j.code,
                        "reason": j.reason,
                    });
                    if let Some(was) = was {
                        v["was"] = serde_json::Value::from(was.as_str());
                    }
                    v.to_string()
                } else {
                    let mut l = format!(
                        "{}: {} {} {}",
                        item.name,
                        j.verdict.as_str(),
                        j.code,
                        if j.reason.is_empty() { "-" } else { &j.reason }
                    );
                    if let Some(was) = changed {
                        l.push_str(&format!(" (changed: was {was})"));
                    }
                    l
                }
            }
        };
        if let Err(e) = writeln!(out, "{line}") {
            failed_to_write.get_or_insert(e.to_string());
        }
    };
    for path in &opts.paths {
        let mut items = Vec::new();
        let mut sink = |item: Item| items.push(item);
        // An mbox is judged as it is read; the others are small per item.
        if path.is_file() && is_mbox(path) {
            let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
            let mut reader = Mbox::new(BufReader::new(file), max);
            let mut n = 0;
            while let Some(raw) = reader.next_message() {
                n += 1;
                let item = Item {
                    name: format!("{}#{n}", path.display()),
                    raw,
                };
                let judged = judge_one(&judge, &item, opts, &hostname).await;
                each(item, &mut summary, judged);
            }
            continue;
        }
        files_of(path, max, &mut sink)?;
        for item in items {
            let judged = judge_one(&judge, &item, opts, &hostname).await;
            each(item, &mut summary, judged);
        }
    }
    if let Some(e) = failed_to_write {
        return Err(format!("writing the results: {e}"));
    }
    let text = summary_text(&summary, opts.logs.is_empty());
    if opts.json {
        let v = serde_json::json!({"summary": {
            "messages": summary.messages,
            "errors": summary.errors,
            "verdicts": summary.by_verdict,
            "refused_by_reason": summary.refused_by_reason,
            "compared": summary.compared,
            "changed": summary.changed,
        }});
        let _ = writeln!(out, "{v}");
    } else {
        let _ = write!(out, "{text}");
    }
    Ok(summary)
}

fn summary_text(s: &Summary, no_log: bool) -> String {
    let mut o = format!(
        "\n{} messages: {} could not be judged\n",
        s.messages, s.errors
    );
    for v in ["accept", "tag", "tempfail", "reject"] {
        o.push_str(&format!(
            "  {v:<9} {}\n",
            s.by_verdict.get(v).copied().unwrap_or(0)
        ));
    }
    if !s.refused_by_reason.is_empty() {
        o.push_str("refused by reason:\n");
        let mut v: Vec<(&String, &u64)> = s.refused_by_reason.iter().collect();
        v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        for (r, n) in v {
            o.push_str(&format!("  {r:<40} {n}\n"));
        }
    }
    if !no_log {
        o.push_str(&format!(
            "compared with the log: {} found, {} changed\n",
            s.compared, s.changed
        ));
    }
    o
}

/// The verdicts our log lines gave, by `q:QUEUE_ID` and `m:MESSAGE_ID`.
fn logged_verdicts(files: &[PathBuf]) -> Result<HashMap<String, String>, String> {
    let clock = super::logs::PrefixClock::system();
    let mut m = HashMap::new();
    for line in super::logs::log_lines(files).map_err(|e| e.to_string())? {
        let Some((_, f)) = super::logs::read_fields(&line, &clock) else {
            continue;
        };
        let Some(verdict) = f.get(key::VERDICT) else {
            continue;
        };
        for (k, prefix) in [(key::QUEUE_ID, "q"), (key::MESSAGE_ID, "m")] {
            if let Some(id) = f.get(k).filter(|v| !v.is_empty()) {
                m.insert(format!("{prefix}:{id}"), verdict.clone());
            }
        }
    }
    Ok(m)
}

/// One message: its transaction from its headers, through the screen.
async fn judge_one(
    judge: &Judge,
    item: &Item,
    opts: &Options,
    hostname: &str,
) -> Result<Judged, String> {
    let raw = item.raw.as_ref().map_err(Clone::clone)?;
    let env = envelope(raw, hostname)?;
    let ip = opts
        .ip
        .or(env.ip)
        .ok_or("no client address in a Received field; give --ip")?;
    let helo = opts
        .helo
        .clone()
        .or(env.helo)
        .unwrap_or_else(|| format!("[{ip}]"));
    let x = judge
        .judge(&Sample {
            ip,
            helo,
            from: env.from,
            rcpts: env.rcpts,
            message: Some(raw.clone()),
            tls: env.tls,
            no_dns: opts.no_dns,
        })
        .await?;
    let (verdict, code, reason) = outcome(&x);
    Ok(Judged {
        verdict,
        code,
        reason,
        message_id: env.message_id,
        queue_id: env.queue_id,
    })
}

/// The transaction's end as the client would have seen it.
fn outcome(x: &Explained) -> (Verdict, u16, String) {
    let refused = |code: u16, reason: &str| (Verdict::from_code(code), code, reason.to_string());
    match &x.mail {
        Screened::Refused { reply, reason } => return refused(reply.code, reason),
        Screened::Verdict(o) => {
            if let Decision::Reject(r) | Decision::Tempfail(r) = &o.decision {
                return refused(r.code, &o.reason);
            }
        }
    }
    let Some(d) = &x.data else {
        // Every recipient refused: the last refusal stands.
        return match x.rcpts.iter().rev().find_map(|(_, r)| r.as_ref()) {
            Some((reply, reason)) => refused(reply.code, reason),
            None => (Verdict::Accept, 250, String::new()),
        };
    };
    match &d.outcome.decision {
        Decision::Reject(r) | Decision::Tempfail(r) => refused(r.code, &d.outcome.reason),
        Decision::Tag => (Verdict::Tag, 250, d.outcome.reason.clone()),
        Decision::Accept => (Verdict::Accept, 250, String::new()),
    }
}

/// What a stored message says of the transaction that brought it.
#[derive(Debug, Default, PartialEq)]
struct Envelope {
    from: String,
    rcpts: Vec<String>,
    ip: Option<IpAddr>,
    helo: Option<String>,
    tls: bool,
    message_id: String,
    queue_id: String,
}

fn envelope(raw: &[u8], hostname: &str) -> Result<Envelope, String> {
    let m = mail_parser::MessageParser::default()
        .parse(raw)
        .filter(|m| m.header_count() > 0)
        .ok_or("not a message: no header fields")?;
    let address = |v: &[u8]| {
        let s = String::from_utf8_lossy(v);
        s.trim()
            .trim_start_matches('<')
            .trim_end_matches('>')
            .trim()
            .to_string()
    };
    let headers = m.headers();
    let from = headers
        .all("Return-Path")
        .next()
        .map(|h| address(h.raw_value()))
        .unwrap_or_default();
    let mut rcpts: Vec<String> = ["Delivered-To", "X-Original-To"]
        .iter()
        .flat_map(|n| {
            headers
                .all(*n)
                .map(|h| address(h.raw_value()))
                .collect::<Vec<_>>()
        })
        .filter(|a| a.contains('@'))
        .collect();
    rcpts.dedup();
    if rcpts.is_empty() {
        rcpts = m
            .to()
            .into_iter()
            .flat_map(|l| {
                l.mailboxes()
                    .filter_map(|a| a.address().map(str::to_string))
                    .collect::<Vec<_>>()
            })
            .collect();
    }
    if rcpts.is_empty() {
        rcpts.push(format!("postmaster@{hostname}"));
    }
    // The topmost Received field: written by the MTA (or us) on arrival.
    let top = m.all_received().next();
    let ip = top.as_ref().and_then(|r| r.from_ip());
    let host_name = |h: mail_parser::Host<'_>| match h {
        mail_parser::Host::Name(n) => n.to_string(),
        mail_parser::Host::IpAddr(ip) => format!("[{ip}]"),
    };
    let helo = top
        .as_ref()
        .and_then(|r| r.helo().or_else(|| r.from()))
        .map(host_name);
    Ok(Envelope {
        from,
        rcpts,
        ip,
        helo,
        tls: top.as_ref().is_some_and(|r| r.tls_version().is_some()),
        message_id: m.message_id().unwrap_or_default().to_string(),
        queue_id: top
            .as_ref()
            .and_then(|r| r.id())
            .unwrap_or_default()
            .to_string(),
    })
}

/// Whether a file is an mbox (starts with a `From ` line).
fn is_mbox(path: &Path) -> bool {
    let mut head = [0u8; 5];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok_and(|_| &head == b"From ")
}

/// The messages of a Maildir (`cur` and `new`), a directory of files, or
/// one message file.
fn files_of(path: &Path, max: u64, sink: &mut dyn FnMut(Item)) -> Result<(), String> {
    let read = |p: &Path| Item {
        name: p.display().to_string(),
        raw: crate::config::read_text(p, max)
            .map(String::into_bytes)
            .or_else(|_| read_bytes(p, max)),
    };
    if path.is_file() {
        sink(read(path));
        return Ok(());
    }
    let maildir = path.join("cur").is_dir() || path.join("new").is_dir();
    let dirs: Vec<PathBuf> = if maildir {
        vec![path.join("cur"), path.join("new")]
    } else {
        vec![path.to_path_buf()]
    };
    for d in dirs.iter().filter(|d| d.is_dir()) {
        let rd = std::fs::read_dir(d).map_err(|e| format!("{}: {e}", d.display()))?;
        let mut files: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .filter(|p| {
                // A plain directory: its message files only.
                maildir || p.extension().is_some_and(|x| x == "eml")
            })
            .collect();
        files.sort();
        for f in files {
            sink(read(&f));
        }
    }
    Ok(())
}

/// A file's bytes, refused past `max`.
fn read_bytes(p: &Path, max: u64) -> Result<Vec<u8>, String> {
    let f = std::fs::File::open(p).map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    f.take(max + 1)
        .read_to_end(&mut buf)
        .map_err(|e| e.to_string())?;
    if buf.len() as u64 > max {
        return Err(format!("larger than limits.max_message_size ({max} bytes)"));
    }
    Ok(buf)
}

/// An mbox read one message at a time (mboxrd: a `From ` line after an
/// empty line starts a message; `>From ` lines lose one `>`).
struct Mbox<R> {
    reader: R,
    max: u64,
    line: Vec<u8>,
    /// The `From ` line of the next message has been read.
    started: bool,
    done: bool,
}

impl<R: BufRead> Mbox<R> {
    fn new(reader: R, max: u64) -> Self {
        Mbox {
            reader,
            max,
            line: Vec::new(),
            started: false,
            done: false,
        }
    }

    /// Reads one line (at most `max` + 2 bytes of it are kept).
    fn read_line(&mut self) -> Option<()> {
        self.line.clear();
        let limit = self.max + 2;
        let n = (&mut self.reader)
            .take(limit)
            .read_until(b'\n', &mut self.line)
            .ok()?;
        if n == 0 {
            return None;
        }
        if !self.line.ends_with(b"\n") && n as u64 == limit {
            // An overlong line: skip to its end.
            let mut rest = Vec::new();
            loop {
                rest.clear();
                let m = (&mut self.reader)
                    .take(64 * 1024)
                    .read_until(b'\n', &mut rest)
                    .ok()?;
                if m == 0 || rest.ends_with(b"\n") {
                    break;
                }
            }
        }
        Some(())
    }

    /// The next message: its bytes (CRLF line ends), or why not.
    fn next_message(&mut self) -> Option<Result<Vec<u8>, String>> {
        if self.done {
            return None;
        }
        while !self.started {
            self.read_line()?;
            self.started = self.line.starts_with(b"From ");
        }
        let mut msg = Vec::new();
        let mut too_big = false;
        let mut blank_before = false;
        loop {
            if self.read_line().is_none() {
                self.done = true;
                break;
            }
            if blank_before && self.line.starts_with(b"From ") {
                break;
            }
            let body = self
                .line
                .strip_suffix(b"\n")
                .unwrap_or(&self.line)
                .strip_suffix(b"\r")
                .unwrap_or(self.line.strip_suffix(b"\n").unwrap_or(&self.line));
            blank_before = body.is_empty();
            let body = match body.iter().position(|b| *b != b'>') {
                Some(i) if i > 0 && body[i..].starts_with(b"From ") => &body[1..],
                _ => body,
            };
            if too_big {
                continue;
            }
            if (msg.len() + body.len() + 2) as u64 > self.max {
                too_big = true;
                msg = Vec::new();
                continue;
            }
            msg.extend_from_slice(body);
            msg.extend_from_slice(b"\r\n");
        }
        if too_big {
            return Some(Err(format!(
                "larger than limits.max_message_size ({} bytes)",
                self.max
            )));
        }
        // The empty line before the next `From ` belongs to the mbox.
        if msg.ends_with(b"\r\n\r\n") {
            msg.truncate(msg.len() - 2);
        }
        Some(Ok(msg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn messages(mbox: &str, max: u64) -> Vec<Result<String, String>> {
        let mut m = Mbox::new(mbox.as_bytes(), max);
        let mut out = Vec::new();
        while let Some(r) = m.next_message() {
            out.push(r.map(|b| String::from_utf8(b).unwrap()));
        }
        out
    }

    #[test]
    fn mbox_messages_split_at_from_lines_and_unquote() {
        let mbox = "From a@x Thu Jan  1 00:00:00 2026\nSubject: one\n\nbody\n>From the start\n>>From deeper\nFrom inside a line is kept\n\nFrom b@x Thu Jan  1 00:00:00 2026\nSubject: two\n\nlast\n";
        let got = messages(mbox, 1 << 20);
        assert_eq!(
            got,
            [
                Ok("Subject: one\r\n\r\nbody\r\nFrom the start\r\n>From deeper\r\nFrom inside a line is kept\r\n".to_string()),
                Ok("Subject: two\r\n\r\nlast\r\n".to_string()),
            ]
        );
    }

    #[test]
    fn an_oversized_message_is_an_error_and_the_next_is_read() {
        let big = "x".repeat(500);
        let mbox = format!("From a\nSubject: big\n\n{big}\n{big}\n\nFrom b\nSubject: ok\n\nhi\n");
        let got = messages(&mbox, 300);
        assert!(
            got[0]
                .as_ref()
                .is_err_and(|e| e.contains("max_message_size")),
            "{got:?}"
        );
        assert_eq!(got[1], Ok("Subject: ok\r\n\r\nhi\r\n".to_string()));
    }

    #[test]
    fn the_envelope_comes_from_the_headers_the_mta_wrote() {
        let raw = b"Return-Path: <bounce@sender.test>\r\nDelivered-To: b@example.test\r\nX-Original-To: alias@example.test\r\nReceived: from mx.sender.test (mx.sender.test [192.0.2.7])\r\n\tby gate.example.test (Postfix) with ESMTPS id 4Xyz1234\r\n\tfor <alias@example.test>; Sat, 5 Dec 2026 06:00:00 +0000\r\nReceived: from older (older [198.51.100.1]) by mx.sender.test; Sat, 5 Dec 2026 05:59:00 +0000\r\nMessage-ID: <m1@sender.test>\r\nSubject: hi\r\n\r\nhi\r\n";
        let e = envelope(raw, "gate.test").unwrap();
        assert_eq!(e.from, "bounce@sender.test");
        assert_eq!(e.rcpts, ["b@example.test", "alias@example.test"]);
        assert_eq!(e.ip, Some("192.0.2.7".parse().unwrap()));
        assert_eq!(e.helo.as_deref(), Some("mx.sender.test"));
        assert_eq!(e.message_id, "m1@sender.test");
        assert_eq!(e.queue_id, "4Xyz1234");
        assert!(envelope(b"no header here", "gate.test").is_err());
    }
}
