//! Findings -> one decision and one reply.
//!
//! Every check result becomes a `Finding` with the action its config asks
//! for. The decision: any enforced `reject` refuses (several failed
//! authentication checks give 5.7.26), else any `tempfail` defers, else the
//! summed score meets the reject / tempfail / tag thresholds. Replies come
//! from the constructors below: RFC 3463 / RFC 7372 codes, and the class of
//! the enhanced code always follows the reply code (see `Reply::new`).

use crate::config::{Action, Thresholds};
use crate::wire::reply::Reply;
use std::fmt::Write;

/// One check result with what it leads to.
impl Finding {
    /// A check's finding under its `mode`: acted on in `enforce`, only
    /// recorded (`would`) in `record`.
    pub fn under(
        mode: crate::config::Mode,
        check: &'static str,
        action: Action,
        result: String,
        reason: String,
        reply: Reply,
    ) -> Finding {
        let enforced = mode == crate::config::Mode::Enforce;
        Finding {
            check,
            result,
            action: if enforced { action } else { Action::Accept },
            would: (!enforced).then_some(action),
            reason,
            reply,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    /// `dnsbl`, `spf`, `dkim`, `dmarc`, `arc`, `iprev`, ...
    pub check: &'static str,
    /// The result word (`fail`, `pass`, a DNSBL code list, ...).
    pub result: String,
    /// Effective action (`Accept` for checks in record mode).
    pub action: Action,
    /// In record mode, or from a shadow rule: the action it would have had
    /// if enforced (for the log's `would` and `stats`' what-if table).
    pub would: Option<Action>,
    /// For logs and stats: `dnsbl:zen.spamhaus.org`, `spf:fail`, ...
    pub reason: String,
    /// The reply if this finding refuses or defers.
    pub reply: Reply,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Accept,
    /// Accept, adding X-Spam headers.
    Tag,
    Tempfail(Reply),
    Reject(Reply),
}

/// The decision with its reason and the summed score.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub decision: Decision,
    pub reason: String,
    pub score: f64,
}

const AUTH_CHECKS: [&str; 3] = ["spf", "dkim", "dmarc"];

pub fn decide(findings: &[Finding], t: &Thresholds) -> Outcome {
    // A fold from +0.0: an empty f64 sum is -0.0, which would print as "-0.0".
    let score = findings.iter().fold(0.0, |acc, f| match f.action {
        Action::Score(s) => acc + s,
        _ => acc,
    });
    let rejects: Vec<&Finding> = findings
        .iter()
        .filter(|f| f.action == Action::Reject)
        .collect();
    if !rejects.is_empty() {
        let auth: Vec<&&Finding> = rejects
            .iter()
            .filter(|f| AUTH_CHECKS.contains(&f.check))
            .collect();
        let reason = join_reasons(&rejects);
        let reply = if auth.len() >= 2 {
            several_failed()
        } else {
            rejects[0].reply.clone()
        };
        return Outcome {
            decision: Decision::Reject(reply),
            reason,
            score,
        };
    }
    let tempfails: Vec<&Finding> = findings
        .iter()
        .filter(|f| f.action == Action::Tempfail)
        .collect();
    if !tempfails.is_empty() {
        return Outcome {
            decision: Decision::Tempfail(tempfails[0].reply.clone()),
            reason: join_reasons(&tempfails),
            score,
        };
    }
    let scored: Vec<&Finding> = findings
        .iter()
        .filter(|f| matches!(f.action, Action::Score(s) if s != 0.0))
        .collect();
    if t.reject.is_some_and(|r| score >= r) {
        return Outcome {
            decision: Decision::Reject(spam_score(score)),
            reason: format!("score:{}", join_reasons(&scored)),
            score,
        };
    }
    if t.tempfail.is_some_and(|r| score >= r) {
        return Outcome {
            decision: Decision::Tempfail(score_tempfail(score)),
            reason: format!("score:{}", join_reasons(&scored)),
            score,
        };
    }
    let tagged = findings.iter().any(|f| f.action == Action::Tag);
    if tagged || t.tag.is_some_and(|r| score >= r) {
        let mut reasons: Vec<&Finding> = findings
            .iter()
            .filter(|f| f.action == Action::Tag)
            .collect();
        reasons.extend(scored);
        return Outcome {
            decision: Decision::Tag,
            reason: join_reasons(&reasons),
            score,
        };
    }
    Outcome {
        decision: Decision::Accept,
        reason: String::new(),
        score,
    }
}

fn join_reasons(fs: &[&Finding]) -> String {
    let mut out = String::new();
    for f in fs {
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(&f.reason);
    }
    out
}

/// Fills `{name}` placeholders in a configured text.
pub fn fill(text: &str, vars: &[(&str, &str)]) -> String {
    let mut out = text.to_string();
    for (k, v) in vars {
        out = out.replace(&format!("{{{k}}}"), v);
    }
    // Replies are one line each: never let a value smuggle a line break.
    out.replace(['\r', '\n'], " ")
}

// The reply table.

pub fn dnsbl_listed(text: Option<&str>, zone: &str, ip: &str, txt: Option<&str>) -> Reply {
    let default = "Service unavailable; client [{ip}] blocked using {zone}{txt}";
    let t = match txt {
        Some(t) if !t.is_empty() => format!("; {t}"),
        _ => String::new(),
    };
    let txt_only = txt.unwrap_or("");
    let body = fill(text.unwrap_or(default), &[("ip", ip), ("zone", zone)]);
    let body = if text.is_some() {
        fill(&body, &[("txt", txt_only)])
    } else {
        fill(&body, &[("txt", &t)])
    };
    Reply::new(550, 7, 1, "").with_text(body)
}

/// A finding the gate accepts that a recipient's policy refuses.
pub fn policy_refused(reason: &str, tempfail: bool) -> Reply {
    let text = fill(
        "Refused by the recipient's policy ({reason})",
        &[("reason", reason)],
    );
    if tempfail {
        Reply::new(451, 7, 1, "").with_text(format!("{text}, try again later"))
    } else {
        Reply::new(550, 7, 1, "").with_text(text)
    }
}

/// A recipient whose policy differs from the transaction's: one reply
/// after DATA covers every recipient, so it comes in its own transaction
/// (RFC 5321 section 3.3; what Postfix answers past its recipient limit).
pub fn policy_split() -> Reply {
    Reply::new(
        452,
        5,
        3,
        "Recipient has a different policy, send it in another transaction",
    )
}

/// A sender or client on a block list.
pub fn blocked() -> Reply {
    Reply::new(
        550,
        7,
        1,
        "Refused: the sender or client is on the recipient's block list",
    )
}

pub fn spf_fail(text: Option<&str>, domain: &str, ip: &str) -> Reply {
    let t = text.unwrap_or("SPF fail: {domain} does not designate {ip} as permitted sender");
    Reply::new(550, 7, 23, "").with_text(fill(t, &[("domain", domain), ("ip", ip)]))
}

pub fn spf_temperror(domain: &str) -> Reply {
    Reply::new(451, 7, 24, "").with_text(fill(
        "Temporary SPF error for {domain}, try again later",
        &[("domain", domain)],
    ))
}

pub fn spf_permerror(domain: &str) -> Reply {
    Reply::new(550, 7, 24, "").with_text(fill(
        "SPF record of {domain} is invalid",
        &[("domain", domain)],
    ))
}

pub fn dkim_fail(text: Option<&str>, domain: &str) -> Reply {
    let t = text.unwrap_or("No passing DKIM signature ({domain})");
    Reply::new(550, 7, 20, "").with_text(fill(t, &[("domain", domain)]))
}

pub fn dkim_temperror() -> Reply {
    Reply::new(
        451,
        4,
        3,
        "Temporary DNS failure verifying DKIM, try again later",
    )
}

pub fn dmarc_reject(text: Option<&str>, domain: &str) -> Reply {
    let t = text.unwrap_or("DMARC policy of {domain} rejects this message");
    Reply::new(550, 7, 1, "").with_text(fill(t, &[("domain", domain)]))
}

pub fn dmarc_temperror(domain: &str) -> Reply {
    Reply::new(451, 4, 3, "").with_text(fill(
        "Temporary DNS failure for the DMARC policy of {domain}",
        &[("domain", domain)],
    ))
}

pub fn iprev_fail(text: Option<&str>, ip: &str) -> Reply {
    let t = text.unwrap_or("Reverse DNS of [{ip}] does not match");
    Reply::new(550, 7, 25, "").with_text(fill(t, &[("ip", ip)]))
}

/// A virus found by the antivirus scan: 554 5.7.0 naming it.
pub fn virus(text: Option<&str>, name: &str) -> Reply {
    let t = text.unwrap_or("Message refused: virus found ({virus})");
    Reply::new(554, 7, 0, "").with_text(fill(t, &[("virus", name)]))
}

/// A message that links to a domain (or address) on a URL blocklist. The
/// zone's `text` may use `{domain}`, `{zone}` and `{txt}`.
pub fn uribl_listed(text: Option<&str>, zone: &str, domain: &str, txt: Option<&str>) -> Reply {
    let t = text.unwrap_or("Message refused: it links to {domain}, listed on {zone}");
    let body = fill(
        t,
        &[
            ("domain", domain),
            ("ip", domain),
            ("zone", zone),
            ("txt", txt.unwrap_or("")),
        ],
    );
    Reply::new(554, 7, 1, "").with_text(body)
}

/// The external scanner said reject, and `use_action` follows it.
pub fn scanner_reject(scanner: &str) -> Reply {
    Reply::new(554, 7, 1, "").with_text(format!("Message refused as spam ({scanner})"))
}

/// The external scanner said soft reject (rspamd's greylisting or rate
/// limits), and `use_action` follows it.
pub fn scanner_soft_reject() -> Reply {
    Reply::new(451, 7, 1, "Try again later")
}

/// A scanner asked about the message did not answer in time, or failed.
pub fn scanner_tempfail() -> Reply {
    Reply::new(451, 3, 0, "Message scan failed, try again later")
}

pub fn dns_tempfail() -> Reply {
    Reply::new(451, 4, 3, "Temporary DNS failure, try again later")
}

/// Greylisting: come back in `wait` seconds (RFC 6647).
pub fn greylisted(wait: u64) -> Reply {
    Reply::new(451, 7, 1, "Greylisted")
        .with_text(format!("Greylisted, please try again in {wait} seconds"))
}

/// The state store failed and greylisting's `on_error` is `tempfail`.
pub fn state_tempfail() -> Reply {
    Reply::new(451, 3, 0, "Temporary local problem, try again later")
}

pub fn rules_overrun() -> Reply {
    Reply::new(451, 7, 0, "Message checks took too long, try again later")
}

/// The end-of-message checks could not run (a bug on our side).
pub fn checks_failed() -> Reply {
    Reply::new(451, 3, 0, "Local error in message checks, try again later")
}

pub fn several_failed() -> Reply {
    Reply::new(550, 7, 26, "Multiple authentication checks failed")
}

pub fn spam_score(score: f64) -> Reply {
    let mut t = String::new();
    let _ = write!(t, "Message refused as spam (score {score:.1})");
    Reply::new(550, 7, 1, "").with_text(t)
}

pub fn score_tempfail(score: f64) -> Reply {
    let mut t = String::new();
    let _ = write!(t, "Message deferred (score {score:.1}), try again later");
    Reply::new(451, 7, 1, "").with_text(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(check: &'static str, action: Action, reply: Reply) -> Finding {
        Finding {
            check,
            result: "x".into(),
            action,
            would: None,
            reason: format!("{check}:x"),
            reply,
        }
    }

    fn t() -> Thresholds {
        Thresholds {
            reject: Some(10.0),
            tempfail: Some(7.0),
            tag: Some(5.0),
            greylist: None,
        }
    }

    #[test]
    fn precedence_and_thresholds() {
        let spf = f("spf", Action::Reject, spf_fail(None, "a.test", "192.0.2.1"));
        let o = decide(
            &[
                f("iprev", Action::Score(3.0), iprev_fail(None, "ip")),
                spf.clone(),
            ],
            &t(),
        );
        assert_eq!(o.decision, Decision::Reject(spf.reply.clone()));
        assert_eq!(o.reason, "spf:x");
        assert_eq!(o.score, 3.0);

        let dmarc = f("dmarc", Action::Reject, dmarc_reject(None, "a.test"));
        let o = decide(&[spf, dmarc], &t());
        let Decision::Reject(r) = o.decision else {
            panic!()
        };
        assert_eq!(r.enhanced_code().unwrap(), "5.7.26");
        assert_eq!(o.reason, "spf:x,dmarc:x");

        let o = decide(&[f("spf", Action::Tempfail, spf_temperror("a.test"))], &t());
        let Decision::Tempfail(r) = o.decision else {
            panic!()
        };
        assert_eq!(
            (r.code, r.enhanced_code().unwrap().as_str()),
            (451, "4.7.24")
        );

        let s = |n| f("dnsbl", Action::Score(n), dns_tempfail());
        assert_eq!(decide(&[s(4.0)], &t()).decision, Decision::Accept);
        assert_eq!(decide(&[s(5.0)], &t()).decision, Decision::Tag);
        assert!(matches!(
            decide(&[s(7.0)], &t()).decision,
            Decision::Tempfail(_)
        ));
        let o = decide(&[s(6.0), s(4.5)], &t());
        let Decision::Reject(r) = o.decision else {
            panic!()
        };
        assert_eq!(
            (r.code, r.enhanced_code().unwrap().as_str()),
            (550, "5.7.1")
        );
        assert_eq!(o.reason, "score:dnsbl:x,dnsbl:x");
        assert_eq!(
            decide(&[f("dmarc", Action::Tag, dns_tempfail())], &t()).decision,
            Decision::Tag
        );
    }

    #[test]
    fn every_reply_is_class_consistent() {
        for r in [
            dnsbl_listed(None, "bl.test", "192.0.2.1", Some("listed")),
            spf_fail(None, "d", "i"),
            spf_temperror("d"),
            spf_permerror("d"),
            dkim_fail(None, "d"),
            dkim_temperror(),
            dmarc_reject(None, "d"),
            dmarc_temperror("d"),
            iprev_fail(None, "i"),
            dns_tempfail(),
            several_failed(),
            spam_score(1.0),
            score_tempfail(1.0),
        ] {
            let e = r.enhanced_code().unwrap();
            assert_eq!(e.as_bytes()[0], r.code.to_string().as_bytes()[0], "{r:?}");
        }
    }

    #[test]
    fn dnsbl_text_names_zone_and_reason() {
        let r = dnsbl_listed(
            None,
            "bl.test",
            "192.0.2.1",
            Some("see http://bl.test/q?192.0.2.1"),
        );
        assert_eq!(
            r.text,
            "Service unavailable; client [192.0.2.1] blocked using bl.test; see http://bl.test/q?192.0.2.1"
        );
        let r = dnsbl_listed(
            Some("Blocked by {zone}: {txt}\r\nX"),
            "bl.test",
            "ip",
            Some("why"),
        );
        assert_eq!(r.text, "Blocked by bl.test: why  X");
    }
}
