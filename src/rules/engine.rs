//! The compiled form of the rules: what a value is matched in (`Target`),
//! the condition tree, the rules and their actions. Every regex of one
//! target (one header name, the body, the subject, ...) goes into one
//! `RegexSet`, run once per value, so the cost grows with the message, not
//! with the number of rules. `compile.rs` builds it, `eval.rs` runs it over
//! the facts of `input.rs`.

use super::index::{DomainSet, NetSet};
use super::model::{Cmp, RuleMode, Stage};
use crate::wire::reply::Reply;
use regex::{Regex, RegexSet};
use std::collections::HashSet;
use std::sync::atomic::AtomicU64;

/// What a value is matched in.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    Reverse,
    Helo,
    MailFrom,
    MailDomain,
    Rcpt,
    RcptLocal,
    RcptDomain,
    /// Lower-case header name.
    Header(String),
    Subject,
    Body,
    AttachmentName,
    AttachmentType,
    /// Members of ZIP attachments.
    ArchiveName,
    ArchiveType,
    /// Hosts the message links to.
    UrlDomain,
}

impl Target {
    /// The first stage at which the value is known.
    pub(super) fn stage(&self) -> Stage {
        match self {
            Target::Reverse => Stage::Connect,
            Target::Helo => Stage::Helo,
            Target::MailFrom | Target::MailDomain => Stage::Mail,
            Target::Rcpt | Target::RcptLocal | Target::RcptDomain => Stage::Rcpt,
            _ => Stage::Data,
        }
    }

    pub(super) fn name(&self) -> String {
        match self {
            Target::Reverse => "reverse".into(),
            Target::Helo => "helo".into(),
            Target::MailFrom => "mail_from".into(),
            Target::MailDomain => "mail_domain".into(),
            Target::Rcpt => "rcpt".into(),
            Target::RcptLocal => "rcpt_local".into(),
            Target::RcptDomain => "rcpt_domain".into(),
            Target::Header(h) => format!("header {h}"),
            Target::Subject => "subject".into(),
            Target::Body => "body".into(),
            Target::AttachmentName => "attachment_name".into(),
            Target::ArchiveName => "archive_name".into(),
            Target::ArchiveType => "archive_type".into(),
            Target::AttachmentType => "attachment_type".into(),
            Target::UrlDomain => "url_domain".into(),
        }
    }

    /// Targets whose values are domains (lists hold domains for them).
    pub(super) fn is_domain(&self) -> bool {
        matches!(
            self,
            Target::Reverse
                | Target::Helo
                | Target::MailDomain
                | Target::RcptDomain
                | Target::UrlDomain
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Number {
    Size,
    RcptCount,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachmentFact {
    EncryptedArchive,
    ArchiveBomb,
    DoubleExtension,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckKind {
    Spf,
    Dkim,
    Dmarc,
    Iprev,
    Dnsbl,
    Greylist,
    Antivirus,
    Uribl,
    Scanner,
}

#[derive(Debug)]
pub(super) enum Leaf {
    Exact {
        set: HashSet<String>,
        case: bool,
    },
    Domain(DomainSet),
    /// The target's slot in `Compiled::sets`, and indices into its patterns.
    Regex {
        slot: usize,
        idx: Vec<usize>,
    },
}

#[derive(Debug)]
pub(super) enum Node {
    All(Vec<Node>),
    Any(Vec<Node>),
    Not(Box<Node>),
    Match(Target, Leaf),
    Ip(NetSet),
    Number(Number, Cmp),
    Tls(bool),
    /// A fact of the message's attachments, and the value it must have.
    Attachment(AttachmentFact, bool),
    Check(CheckKind, Vec<String>),
}

/// The regexes of one target, run once per value. A `RegexSet` scans a
/// value once for all of them; for a handful, the regexes one by one are
/// faster, because a set forgoes the literal optimisations of a single
/// regex: three case-insensitive body patterns cost 3 µs a 2 KB body as a
/// set (an Aho-Corasick scan over every case variant), 0.5-0.7 µs one by
/// one. Beyond a handful, which is faster depends on the patterns.
#[derive(Debug)]
pub(super) enum Patterns {
    Each(Vec<Regex>),
    Set(RegexSet),
}

impl Patterns {
    /// Up to this many patterns are run one by one.
    pub(super) const EACH_MAX: usize = 4;

    pub(super) fn new(patterns: &[String]) -> Result<Patterns, regex::Error> {
        if patterns.len() <= Self::EACH_MAX {
            let each: Result<Vec<Regex>, _> = patterns.iter().map(|p| Regex::new(p)).collect();
            return each.map(Patterns::Each);
        }
        RegexSet::new(patterns).map(Patterns::Set)
    }

    pub(super) fn len(&self) -> usize {
        match self {
            Patterns::Each(v) => v.len(),
            Patterns::Set(s) => s.len(),
        }
    }

    /// Whether pattern `i` matches any of `values`.
    pub(super) fn any_match(&self, i: usize, values: &[&str]) -> bool {
        match self {
            Patterns::Each(v) => v
                .get(i)
                .is_some_and(|r| values.iter().any(|s| r.is_match(s))),
            Patterns::Set(s) => values.iter().any(|v| s.matches(v).matched(i)),
        }
    }

    /// Sets `hit[i]` for each pattern `i` that matches `value`.
    pub(super) fn mark(&self, value: &str, hit: &mut [bool]) {
        match self {
            Patterns::Each(v) => {
                for (r, h) in v.iter().zip(hit.iter_mut()) {
                    *h = *h || r.is_match(value);
                }
            }
            Patterns::Set(s) => {
                for i in s.matches(value).into_iter() {
                    if let Some(h) = hit.get_mut(i) {
                        *h = true;
                    }
                }
            }
        }
    }
}

/// A compiled action.
#[derive(Debug, Clone, PartialEq)]
pub enum RuleAction {
    Reject(Reply),
    Tempfail(Reply),
    Accept,
    Score(f64),
    AddHeader(String),
    Log,
}

impl RuleAction {
    pub fn kind(&self) -> &'static str {
        match self {
            RuleAction::Reject(_) => "reject",
            RuleAction::Tempfail(_) => "tempfail",
            RuleAction::Accept => "accept",
            RuleAction::Score(_) => "score",
            RuleAction::AddHeader(_) => "add_header",
            RuleAction::Log => "log",
        }
    }
}

#[derive(Debug)]
pub struct Rule {
    pub id: String,
    pub description: String,
    pub stage: Stage,
    pub mode: RuleMode,
    pub action: RuleAction,
    pub(super) cond: Node,
    /// Times the rule matched (shadow rules included).
    pub hits: AtomicU64,
    /// Its `portcullis_rule_hits_total` handle, made at its first match.
    pub metric: crate::telemetry::metrics::Cached<metrics::Counter>,
    /// List files it reads that hold no entry (a condition on one of them
    /// never matches).
    pub empty_lists: Vec<String>,
    /// What a match of it adds to a transaction.
    pub hit: Hit,
}

/// A matched rule: shared, made once when the rule is compiled, so that a
/// match costs no formatting (a score's reply formats a float).
pub type Hit = std::sync::Arc<Matched>;

#[derive(Debug, PartialEq)]
pub struct Matched {
    pub id: String,
    pub shadow: bool,
    pub action: RuleAction,
    /// As the log's `rules=` names it: `ID`, or `ID(shadow)`.
    pub logged: String,
    /// The finding's reason: `rule:ID`.
    pub reason: String,
    /// The reply of a score rule, made by the checks on its first match
    /// (reject and tempfail rules carry theirs).
    pub score_reply: std::sync::OnceLock<Reply>,
}

impl Matched {
    pub fn new(id: &str, shadow: bool, action: RuleAction) -> Hit {
        std::sync::Arc::new(Matched {
            id: id.to_string(),
            shadow,
            logged: if shadow {
                format!("{id}(shadow)")
            } else {
                id.to_string()
            },
            reason: format!("rule:{id}"),
            score_reply: std::sync::OnceLock::new(),
            action,
        })
    }
}

/// Every rule plus the regex sets, ready to match.
pub struct Compiled {
    pub rules: Vec<Rule>,
    /// Each target's regexes, at the slot its leaves name.
    pub(super) sets: Vec<Patterns>,
    pub dnsbl_zones: std::collections::BTreeSet<String>,
    /// URL blocklist zones the rules name.
    pub uribl_zones: std::collections::BTreeSet<String>,
    /// A rule asks for a listing on any zone (`dnsbl: [any]`).
    pub dnsbl_any: bool,
    /// A rule reads `url_domain`: the message's links must be found.
    pub uses_links: bool,
    /// Lower-case names of the headers the rules read.
    pub headers_read: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Run one by one or as a set, the patterns mark the same matches.
    #[test]
    fn patterns_one_by_one_mark_what_the_set_marks() {
        let pool = [
            "(?i)bitcoin|btc",
            "(?i)wallet",
            "(?i)recorded you|your (webcam|camera)|within 48 hours",
            r"^\[?(\d{1,3}\.){3}\d{1,3}\]?$|^\[ipv6:",
            r"\.",
            "^[^a-z]{20,}$",
            "(?i)ünïcode",
        ];
        let values = [
            "Send the BTC to my wallet",
            "I RECORDED YOU through your Camera",
            "[192.0.2.1]",
            "localhost",
            "ÜNÏCODE SHOUTING AT YOU TODAY",
            "",
            "meeting budget report\nquarter please",
        ];
        for n in 1..=pool.len() {
            let patterns: Vec<String> = pool[..n].iter().map(|p| p.to_string()).collect();
            let built = Patterns::new(&patterns).unwrap();
            assert_eq!(
                matches!(built, Patterns::Each(_)),
                n <= Patterns::EACH_MAX,
                "{n} patterns"
            );
            let each = Patterns::Each(patterns.iter().map(|p| Regex::new(p).unwrap()).collect());
            let set = Patterns::Set(RegexSet::new(&patterns).unwrap());
            for v in values {
                let (mut a, mut b) = (vec![false; n], vec![false; n]);
                each.mark(v, &mut a);
                set.mark(v, &mut b);
                assert_eq!(a, b, "{v:?} against {patterns:?}");
            }
            // Marks accumulate over the values of a target.
            let (mut a, mut b) = (vec![false; n], vec![false; n]);
            for v in values {
                each.mark(v, &mut a);
                set.mark(v, &mut b);
            }
            assert_eq!(a, b);
            assert!(
                a.iter().all(|m| *m),
                "every pattern matches one value: {a:?}"
            );
        }
    }
}
