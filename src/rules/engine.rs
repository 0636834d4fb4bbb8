//! The compiled form of the rules: what a value is matched in (`Target`),
//! the condition tree, the rules and their actions. Every regex of one
//! target (one header name, the body, the subject, ...) goes into one
//! `RegexSet`, run once per value, so the cost grows with the message, not
//! with the number of rules. `compile.rs` builds it, `eval.rs` runs it over
//! the facts of `input.rs`.

use super::index::{DomainSet, NetSet};
use super::model::{Cmp, RuleMode, Stage};
use crate::wire::reply::Reply;
use regex::RegexSet;
use std::collections::{HashMap, HashSet};
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
    /// Indices into the target's RegexSet.
    Regex(Vec<usize>),
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
    /// List files it reads that hold no entry (a condition on one of them
    /// never matches).
    pub empty_lists: Vec<String>,
}

/// A matched rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    pub id: String,
    pub shadow: bool,
    pub action: RuleAction,
}

/// Every rule plus the regex sets, ready to match.
pub struct Compiled {
    pub rules: Vec<Rule>,
    pub(super) sets: HashMap<Target, RegexSet>,
    pub dnsbl_zones: std::collections::BTreeSet<String>,
    /// URL blocklist zones the rules name.
    pub uribl_zones: std::collections::BTreeSet<String>,
    /// A rule asks for a listing on any zone (`dnsbl: [any]`).
    pub dnsbl_any: bool,
    /// A rule reads `url_domain`: the message's links must be found.
    pub uses_links: bool,
}
