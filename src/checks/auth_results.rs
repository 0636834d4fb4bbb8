//! The headers we add and remove: our Authentication-Results (RFC 8601)
//! from every check's result, X-Spam-Flag and X-Spam-Score, rules'
//! `add_header` lines, and forged Authentication-Results fields that
//! claim our authserv-id (dropped, as a border MTA must).

use super::{Check, Facts, Hook, Message, done};
use crate::config::{ChecksConfig, Mode, Thresholds};
use crate::verdict::{Decision, Outcome};
use mail_auth::headers::HeaderWriter;
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{AuthenticatedMessage, AuthenticationResults};
use std::fmt::Write as _;
use std::ops::Range;

/// Writes our Authentication-Results header from the results of the
/// checks before it; runs last.
pub struct AuthResults {
    hostname: String,
    dkim_on: bool,
}

impl AuthResults {
    pub fn new(cfg: &ChecksConfig, hostname: &str) -> AuthResults {
        AuthResults {
            hostname: hostname.to_string(),
            dkim_on: cfg.dkim.mode != Mode::Off,
        }
    }
}

impl Check for AuthResults {
    fn data<'a, 'm: 'a>(&'m self, f: &'a mut Facts, m: &'a mut Message<'m>) -> Hook<'a> {
        let (ip, helo, sender) = (f.client.ip, &f.client.helo, &f.txn.sender);
        let mut results = AuthenticationResults::new(&self.hostname);
        if self.dkim_on {
            results = results.with_dkim_results(&m.dkim, &m.from);
        }
        if let Some(spf) = &f.txn.spf_mail {
            let params = SpfParameters::mail_from(ip, helo, &self.hostname, sender);
            results = results.with_spf_result(spf, &params);
        }
        if let Some(spf) = &f.txn.spf_helo {
            results = results.with_spf_result(spf, &SpfParameters::helo(ip, helo, &self.hostname));
        }
        if let Some(dmarc) = &m.dmarc {
            results = results.with_dmarc_result(dmarc);
        }
        if let Some(arc) = &m.arc {
            results = results.with_arc_result(arc, ip);
        }
        if let Some(r) = &f.client.iprev {
            results = results.with_iprev_result(r, ip);
        }
        m.headers = results.to_header();
        done()
    }
}

/// The header for a message that was not checked (allow-listed, or no
/// header block to check).
pub fn none(hostname: &str) -> String {
    format!("Authentication-Results: {hostname};\r\n\tnone\r\n")
}

/// Completes our header block once the verdict is known: X-Spam-Flag and
/// X-Spam-Score when tagging is configured, then the rules' headers.
pub fn finish(headers: &mut String, outcome: &Outcome, t: &Thresholds, added: &[String]) {
    let tagged = outcome.decision == Decision::Tag;
    if tagged || t.tag.is_some() {
        let flag = if tagged { "YES" } else { "NO" };
        // Written in place: no String of its own per message.
        let _ = write!(
            headers,
            "X-Spam-Flag: {flag}\r\nX-Spam-Score: {:.1}\r\n",
            outcome.score
        );
    }
    for h in added {
        headers.push_str(h);
    }
}

/// `X-Spam-Report: score=6.0; dnsbl:zen.spamhaus.org=5, rule:PRIZE=1`:
/// the findings that had an effect (as the log's `hits`), folded to stay
/// within 78 octets a line (RFC 5322 2.1.1).
pub fn report(score: f64, hits: &[String]) -> String {
    let mut out = format!("X-Spam-Report: score={score:.1};");
    let mut line = out.len();
    if hits.is_empty() {
        out.push_str(" none");
    }
    for (i, h) in hits.iter().enumerate() {
        let item = if i + 1 < hits.len() {
            format!("{h},")
        } else {
            h.clone()
        };
        if line + 1 + item.len() > 78 {
            out.push_str("\r\n\t");
            line = 1;
        } else {
            out.push(' ');
            line += 1;
        }
        out.push_str(&item);
        line += item.len();
    }
    out.push_str("\r\n");
    out
}

/// Byte ranges of Authentication-Results fields that claim our authserv-id
/// (RFC 8601 section 5: a border MTA must remove them).
pub fn forged_results(
    msg: &AuthenticatedMessage<'_>,
    raw: &[u8],
    authserv_id: &str,
) -> Vec<Range<usize>> {
    let base = raw.as_ptr() as usize;
    let headers = msg.headers();
    let body = msg.body_offset().min(raw.len());
    let mut out = Vec::new();
    for (i, (name, value)) in headers.iter().enumerate() {
        if !name.eq_ignore_ascii_case(b"Authentication-Results") {
            continue;
        }
        let id = String::from_utf8_lossy(value);
        let id = strip_comments(&id);
        let claimed = id
            .split(';')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .next()
            .unwrap_or("");
        if !claimed.eq_ignore_ascii_case(authserv_id) {
            continue;
        }
        let start = name.as_ptr() as usize - base;
        let end = headers
            .get(i + 1)
            .map(|(n, _)| n.as_ptr() as usize - base)
            .unwrap_or_else(|| {
                let v_end = value.as_ptr() as usize - base + value.len();
                v_end.min(body)
            });
        if start < end && end <= raw.len() {
            out.push(start..end);
        }
    }
    out
}

/// Drops RFC 5322 comments `( ... )` so `(forged) mx.test;` still names mx.test.
fn strip_comments(s: &str) -> String {
    let mut depth = 0u32;
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '(' => depth += 1,
            ')' if depth > 0 => depth -= 1,
            _ if depth == 0 => out.push(ch),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forged_authentication_results_are_found() {
        let raw = b"Authentication-Results: mx.test; spf=pass smtp.mailfrom=a@b\r\n\
Received: from x\r\n\
Authentication-Results: (comment) MX.TEST;\r\n\tdkim=pass header.d=b\r\n\
Authentication-Results: other.test; dkim=fail\r\n\
Subject: hi\r\n\r\nbody\r\n";
        let msg = AuthenticatedMessage::parse(raw).unwrap();
        let r = forged_results(&msg, raw, "mx.test");
        assert_eq!(r.len(), 2);
        let mut kept = Vec::new();
        let mut pos = 0;
        for range in &r {
            kept.extend_from_slice(&raw[pos..range.start]);
            pos = range.end;
        }
        kept.extend_from_slice(&raw[pos..]);
        assert_eq!(
            String::from_utf8(kept).unwrap(),
            "Received: from x\r\nAuthentication-Results: other.test; dkim=fail\r\nSubject: hi\r\n\r\nbody\r\n"
        );
    }
}
