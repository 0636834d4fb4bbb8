//! Rules compiled for matching: every regex of one target (one header name,
//! the body, the subject, ...) goes into one `RegexSet`, run once per value,
//! so the cost grows with the message, not with the number of rules.

use super::index::{DomainSet, NetSet};
use super::model::{ActionDef, Cmp, Cond, Matcher, ReplyDef, RuleDef, RuleMode, Stage};
use crate::wire::reply::Reply;
use ipnet::IpNet;
use regex::RegexSet;
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

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
}

impl Target {
    /// The first stage at which the value is known.
    fn stage(&self) -> Stage {
        match self {
            Target::Reverse => Stage::Connect,
            Target::Helo => Stage::Helo,
            Target::MailFrom | Target::MailDomain => Stage::Mail,
            Target::Rcpt | Target::RcptLocal | Target::RcptDomain => Stage::Rcpt,
            _ => Stage::Data,
        }
    }

    fn name(&self) -> String {
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
            Target::AttachmentType => "attachment_type".into(),
        }
    }

    /// Targets whose values are domains (lists hold domains for them).
    fn is_domain(&self) -> bool {
        matches!(
            self,
            Target::Reverse | Target::Helo | Target::MailDomain | Target::RcptDomain
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Number {
    Size,
    RcptCount,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckKind {
    Spf,
    Dkim,
    Dmarc,
    Iprev,
    Dnsbl,
    Greylist,
}

#[derive(Debug)]
enum Leaf {
    Exact {
        set: HashSet<String>,
        case: bool,
    },
    Domain(DomainSet),
    /// Indices into the target's RegexSet.
    Regex(Vec<usize>),
}

#[derive(Debug)]
enum Node {
    All(Vec<Node>),
    Any(Vec<Node>),
    Not(Box<Node>),
    Match(Target, Leaf),
    Ip(NetSet),
    Number(Number, Cmp),
    Tls(bool),
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
    cond: Node,
    /// Times the rule matched (shadow rules included).
    pub hits: AtomicU64,
}

/// A matched rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    pub id: String,
    pub shadow: bool,
    pub action: RuleAction,
}

/// What the rules can look at; fields fill in as the dialogue goes on.
#[derive(Debug, Default, Clone)]
pub struct Input<'a> {
    pub ip: Option<IpAddr>,
    pub reverse: Option<&'a str>,
    pub helo: Option<&'a str>,
    pub mail_from: Option<&'a str>,
    /// At RCPT: the recipient being checked; at DATA: all of them.
    pub rcpts: Vec<&'a str>,
    pub rcpt_count: usize,
    pub tls: bool,
    pub size: Option<u64>,
    pub message: Option<&'a MessageFacts>,
    pub spf: &'a str,
    pub dkim: &'a str,
    pub dmarc: &'a str,
    pub iprev: &'a str,
    pub greylist: &'a str,
    pub dnsbl: Vec<&'a str>,
}

/// `Input` with everything owned, to evaluate the rules away from the
/// session (on the blocking pool).
#[derive(Debug, Default, Clone)]
pub struct OwnedInput {
    pub ip: Option<IpAddr>,
    pub reverse: Option<String>,
    pub helo: Option<String>,
    pub mail_from: Option<String>,
    pub rcpts: Vec<String>,
    pub rcpt_count: usize,
    pub tls: bool,
    pub size: Option<u64>,
    pub spf: String,
    pub dkim: String,
    pub dmarc: String,
    pub iprev: String,
    pub greylist: String,
    pub dnsbl: Vec<String>,
}

impl OwnedInput {
    pub fn new(f: &Input<'_>) -> OwnedInput {
        OwnedInput {
            ip: f.ip,
            reverse: f.reverse.map(str::to_string),
            helo: f.helo.map(str::to_string),
            mail_from: f.mail_from.map(str::to_string),
            rcpts: f.rcpts.iter().map(|r| r.to_string()).collect(),
            rcpt_count: f.rcpt_count,
            tls: f.tls,
            size: f.size,
            spf: f.spf.to_string(),
            dkim: f.dkim.to_string(),
            dmarc: f.dmarc.to_string(),
            iprev: f.iprev.to_string(),
            greylist: f.greylist.to_string(),
            dnsbl: f.dnsbl.iter().map(|z| z.to_string()).collect(),
        }
    }

    /// The borrowed view, with the parsed message.
    pub fn view<'a>(&'a self, message: Option<&'a MessageFacts>) -> Input<'a> {
        Input {
            ip: self.ip,
            reverse: self.reverse.as_deref(),
            helo: self.helo.as_deref(),
            mail_from: self.mail_from.as_deref(),
            rcpts: self.rcpts.iter().map(String::as_str).collect(),
            rcpt_count: self.rcpt_count,
            tls: self.tls,
            size: self.size,
            message,
            spf: &self.spf,
            dkim: &self.dkim,
            dmarc: &self.dmarc,
            iprev: &self.iprev,
            greylist: &self.greylist,
            dnsbl: self.dnsbl.iter().map(String::as_str).collect(),
        }
    }
}

/// A message as the rules see it: decoded (mail-parser), parsed once.
#[derive(Debug, Default)]
pub struct MessageFacts {
    /// Lower-case name, decoded value; every occurrence.
    pub headers: Vec<(String, String)>,
    pub subject: Option<String>,
    /// Decoded text parts (not raw base64).
    pub body: Vec<String>,
    pub attachment_names: Vec<String>,
    /// `type/subtype`, lower-case.
    pub attachment_types: Vec<String>,
}

impl MessageFacts {
    pub fn parse(raw: &[u8]) -> MessageFacts {
        let Some(msg) = mail_parser::MessageParser::default().parse(raw) else {
            return MessageFacts::default();
        };
        let mut f = MessageFacts {
            subject: msg.subject().map(str::to_string),
            ..MessageFacts::default()
        };
        for h in msg.headers() {
            let value = match h.value().as_text() {
                Some(t) => t.to_string(),
                None => String::from_utf8_lossy(h.raw_value()).trim().to_string(),
            };
            f.headers.push((h.raw_name().to_ascii_lowercase(), value));
        }
        f.body = msg.text_bodies().map(|t| t.into_owned()).collect();
        for a in msg.attachments() {
            if let Some(n) = a.attachment_name() {
                f.attachment_names.push(n.to_string());
            }
            if let Some(ct) = a.content_type() {
                let t = match ct.subtype() {
                    Some(s) => format!("{}/{}", ct.ctype(), s),
                    None => ct.ctype().to_string(),
                };
                f.attachment_types.push(t.to_ascii_lowercase());
            }
        }
        f
    }
}

/// A compile problem, located by the loader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompileError {
    pub rule: String,
    pub message: String,
    /// Text to look for in the file to place the error (a regex, a file name).
    pub near: Option<String>,
}

/// Compiles rule definitions. `read_list` loads a list file by its name.
pub struct Compiler<'a> {
    patterns: HashMap<Target, Vec<String>>,
    read_list: &'a dyn Fn(&str) -> Result<Vec<String>, String>,
    /// DNSBL zones the rules name (to check against the configured ones).
    dnsbl_zones: std::collections::BTreeSet<String>,
}

/// Every rule plus the regex sets, ready to match.
pub struct Compiled {
    pub rules: Vec<Rule>,
    sets: HashMap<Target, RegexSet>,
    pub dnsbl_zones: std::collections::BTreeSet<String>,
}

impl<'a> Compiler<'a> {
    pub fn new(read_list: &'a dyn Fn(&str) -> Result<Vec<String>, String>) -> Self {
        Compiler {
            patterns: HashMap::new(),
            read_list,
            dnsbl_zones: Default::default(),
        }
    }

    pub fn rule(&mut self, def: RuleDef) -> Result<Rule, CompileError> {
        let id = def.id.0.clone();
        let err = |message: String, near: Option<String>| CompileError {
            rule: id.clone(),
            message,
            near,
        };
        let cond = self.node(def.when).map_err(|(m, n)| err(m, n))?;
        let needed = node_stage(&cond);
        let stage = match def.stage {
            Some(s) if s < needed => {
                return Err(err(
                    format!(
                        "a condition here is only known at {}, so it can never match at stage {}",
                        needed.as_str(),
                        s.as_str()
                    ),
                    Some("stage:".into()),
                ));
            }
            Some(s) => s,
            None => needed,
        };
        let action =
            compile_action(&def.action, &id).map_err(|m| err(m, Some("action:".into())))?;
        Ok(Rule {
            id,
            description: def.description,
            stage,
            mode: def.mode,
            action,
            cond,
            hits: AtomicU64::new(0),
        })
    }

    fn node(&mut self, c: Cond) -> Result<Node, (String, Option<String>)> {
        Ok(match c {
            Cond::All(v) => Node::All(
                v.into_iter()
                    .map(|c| self.node(c))
                    .collect::<Result<_, _>>()?,
            ),
            Cond::Any(v) => Node::Any(
                v.into_iter()
                    .map(|c| self.node(c))
                    .collect::<Result<_, _>>()?,
            ),
            Cond::Not(c) => Node::Not(Box::new(self.node(*c)?)),
            Cond::ClientIp(m) => {
                let mut nets = m.cidr.unwrap_or_default();
                if let Some(list) = &m.list {
                    for line in (self.read_list)(list).map_err(|e| (e, Some(list.clone())))? {
                        let net = line
                            .parse::<IpNet>()
                            .or_else(|_| line.parse::<IpAddr>().map(IpNet::from))
                            .map_err(|_| {
                                (
                                    format!("{list}: {line:?} is not an address or CIDR"),
                                    Some(list.clone()),
                                )
                            })?;
                        nets.push(net);
                    }
                }
                Node::Ip(NetSet::new(nets))
            }
            Cond::Reverse(m) => self.leaf(Target::Reverse, m)?,
            Cond::Helo(m) => self.leaf(Target::Helo, m)?,
            Cond::MailFrom(m) => self.leaf(Target::MailFrom, m)?,
            Cond::MailDomain(m) => self.leaf(Target::MailDomain, m)?,
            Cond::Rcpt(m) => self.leaf(Target::Rcpt, m)?,
            Cond::RcptLocal(m) => self.leaf(Target::RcptLocal, m)?,
            Cond::RcptDomain(m) => self.leaf(Target::RcptDomain, m)?,
            Cond::Header(h) => {
                let m = h.matcher();
                self.leaf(Target::Header(h.name.to_ascii_lowercase()), m)?
            }
            Cond::Subject(m) => self.leaf(Target::Subject, m)?,
            Cond::Body(m) => self.leaf(Target::Body, m)?,
            Cond::AttachmentName(m) => self.leaf(Target::AttachmentName, m)?,
            Cond::AttachmentType(m) => self.leaf(Target::AttachmentType, m)?,
            Cond::Size(c) => Node::Number(Number::Size, c),
            Cond::RcptCount(c) => Node::Number(Number::RcptCount, c),
            Cond::Tls(b) => Node::Tls(b),
            Cond::Spf(v) => Node::Check(CheckKind::Spf, results("spf", v, SPF_RESULTS)?),
            Cond::Dkim(v) => Node::Check(CheckKind::Dkim, results("dkim", v, DKIM_RESULTS)?),
            Cond::Dmarc(v) => Node::Check(CheckKind::Dmarc, results("dmarc", v, DMARC_RESULTS)?),
            Cond::Iprev(v) => Node::Check(CheckKind::Iprev, results("iprev", v, IPREV_RESULTS)?),
            Cond::Greylist(v) => Node::Check(
                CheckKind::Greylist,
                results("greylist", v, GREYLIST_RESULTS)?,
            ),
            Cond::Dnsbl(v) => {
                let zones = lower(v);
                // `any`: listed on any configured zone.
                self.dnsbl_zones
                    .extend(zones.iter().filter(|z| *z != "any").cloned());
                Node::Check(CheckKind::Dnsbl, zones)
            }
        })
    }

    fn leaf(&mut self, target: Target, m: Matcher) -> Result<Node, (String, Option<String>)> {
        let set = [
            m.exact.is_some(),
            m.domain.is_some(),
            m.regex.is_some(),
            m.list.is_some(),
        ];
        if set.iter().filter(|x| **x).count() != 1 {
            return Err((
                format!(
                    "{}: give exactly one of exact, domain, regex, list",
                    target.name()
                ),
                None,
            ));
        }
        let case = m.case_sensitive;
        let leaf = if let Some(e) = m.exact {
            Leaf::Exact {
                set: e.into_vec().into_iter().map(|v| fold(v, case)).collect(),
                case,
            }
        } else if let Some(d) = m.domain {
            Leaf::Domain(DomainSet::new(d.into_vec()))
        } else if let Some(list) = m.list {
            let entries = (self.read_list)(&list).map_err(|e| (e, Some(list.clone())))?;
            if target.is_domain()
                || matches!(target, Target::MailFrom | Target::Rcpt)
                    && entries.iter().all(|e| !e.contains('@'))
            {
                Leaf::Domain(DomainSet::new(entries))
            } else {
                Leaf::Exact {
                    set: entries.into_iter().map(|v| fold(v, case)).collect(),
                    case,
                }
            }
        } else {
            let mut idx = Vec::new();
            for r in m.regex.map(OneOrManyExt::into_list).unwrap_or_default() {
                let pattern = if case { r.clone() } else { format!("(?i){r}") };
                // Compile alone first: a bad pattern is reported as itself.
                regex::Regex::new(&pattern)
                    .map_err(|e| (format!("bad regex {r:?}: {e}"), Some(r.clone())))?;
                let list = self.patterns.entry(target.clone()).or_default();
                idx.push(list.len());
                list.push(pattern);
            }
            Leaf::Regex(idx)
        };
        Ok(Node::Match(target, leaf))
    }

    pub fn finish(self, rules: Vec<Rule>) -> Result<Compiled, String> {
        let mut sets = HashMap::new();
        for (t, p) in self.patterns {
            let set = RegexSet::new(&p).map_err(|e| format!("{}: {e}", t.name()))?;
            sets.insert(t, set);
        }
        Ok(Compiled {
            rules,
            sets,
            dnsbl_zones: self.dnsbl_zones,
        })
    }
}

trait OneOrManyExt {
    fn into_list(self) -> Vec<String>;
}

impl OneOrManyExt for super::model::OneOrMany {
    fn into_list(self) -> Vec<String> {
        self.into_vec()
    }
}

// What each check can report; a rule naming anything else never matches.
const SPF_RESULTS: &[&str] = &[
    "pass",
    "fail",
    "softfail",
    "neutral",
    "none",
    "permerror",
    "temperror",
];
const DKIM_RESULTS: &[&str] = &["pass", "fail", "neutral", "none", "permerror", "temperror"];
const DMARC_RESULTS: &[&str] = &[
    "pass",
    "fail",
    "none",
    "permerror",
    "temperror",
    "fail:reject",
    "fail:quarantine",
    "fail:none",
];
const IPREV_RESULTS: &[&str] = &["pass", "fail", "none", "permerror", "temperror"];
const GREYLIST_RESULTS: &[&str] = &["new", "early", "passed", "allowed", "error"];

/// Check results of a rule condition, each one the check can report.
fn results(
    check: &str,
    v: Vec<String>,
    allowed: &[&str],
) -> Result<Vec<String>, (String, Option<String>)> {
    let v = lower(v);
    match v.iter().find(|w| !allowed.contains(&w.as_str())) {
        Some(bad) => Err((
            format!(
                "{check}: {bad:?} is not a {check} result; use one of {}",
                allowed.join(", ")
            ),
            Some(bad.clone()),
        )),
        None => Ok(v),
    }
}

fn lower(v: Vec<String>) -> Vec<String> {
    v.into_iter().map(|s| s.to_ascii_lowercase()).collect()
}

fn fold(v: String, case: bool) -> String {
    if case { v } else { v.to_lowercase() }
}

fn node_stage(n: &Node) -> Stage {
    match n {
        Node::All(v) | Node::Any(v) => v.iter().map(node_stage).max().unwrap_or(Stage::Connect),
        Node::Not(n) => node_stage(n),
        Node::Match(t, _) => t.stage(),
        Node::Ip(_) | Node::Tls(_) => Stage::Connect,
        Node::Number(Number::Size, _) | Node::Number(Number::RcptCount, _) => Stage::Data,
        Node::Check(CheckKind::Spf, _) => Stage::Mail,
        Node::Check(CheckKind::Dkim | CheckKind::Dmarc, _) => Stage::Data,
        Node::Check(CheckKind::Iprev | CheckKind::Dnsbl, _) => Stage::Connect,
        Node::Check(CheckKind::Greylist, _) => Stage::Rcpt,
    }
}

fn compile_action(a: &ActionDef, id: &str) -> Result<RuleAction, String> {
    Ok(match a {
        ActionDef::Reject(r) => RuleAction::Reject(reply(r, 550, id)?),
        ActionDef::Tempfail(r) => RuleAction::Tempfail(reply(r, 451, id)?),
        ActionDef::Accept => RuleAction::Accept,
        ActionDef::Score(s) => RuleAction::Score(*s),
        ActionDef::AddHeader { name, value } => {
            let ok_name =
                !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && b != b':');
            if !ok_name || value.contains(['\r', '\n']) {
                return Err(format!("add_header: invalid header {name:?}: {value:?}"));
            }
            RuleAction::AddHeader(format!("{name}: {value}\r\n"))
        }
        ActionDef::Log => RuleAction::Log,
    })
}

/// A reply from a rule, with defaults from the table; the class of the
/// enhanced code must match the reply code.
fn reply(r: &ReplyDef, default_code: u16, id: &str) -> Result<Reply, String> {
    let code = r.code.unwrap_or(default_code);
    let class = code / 100;
    if class != default_code / 100 || !(400..=599).contains(&code) {
        return Err(format!(
            "reply code {code} does not fit this action (want {}xx)",
            default_code / 100
        ));
    }
    let enhanced = r.enhanced.clone().unwrap_or_else(|| format!("{class}.7.1"));
    let parts: Vec<&str> = enhanced.split('.').collect();
    let nums: Vec<u16> = parts.iter().filter_map(|p| p.parse().ok()).collect();
    if parts.len() != 3 || nums.len() != 3 {
        return Err(format!(
            "enhanced code {enhanced:?} is not class.subject.detail"
        ));
    }
    if nums[0] != class {
        return Err(format!(
            "enhanced code {enhanced} does not match reply code {code} (class {class})"
        ));
    }
    let text = r
        .text
        .clone()
        .unwrap_or_else(|| format!("Message refused by policy ({id})"))
        .replace(['\r', '\n'], " ");
    Ok(Reply::new(code, nums[1], nums[2], "").with_text(text))
}

/// Regex results for one evaluation, computed per target on first use.
struct Matches<'a> {
    sets: &'a HashMap<Target, RegexSet>,
    done: HashMap<Target, Vec<bool>>,
}

impl Compiled {
    pub fn empty() -> Compiled {
        Compiled {
            rules: Vec::new(),
            sets: HashMap::new(),
            dnsbl_zones: Default::default(),
        }
    }

    /// Rules of `stage` that match `facts`, in order; an enforced `accept`
    /// stops the evaluation (the remaining rules are skipped).
    pub fn evaluate(&self, stage: Stage, facts: &Input<'_>) -> Vec<Hit> {
        let mut m = Matches {
            sets: &self.sets,
            done: HashMap::new(),
        };
        let mut hits = Vec::new();
        for r in self.rules.iter().filter(|r| r.stage == stage) {
            if eval(&r.cond, facts, &mut m) {
                r.hits.fetch_add(1, Ordering::Relaxed);
                let shadow = r.mode == RuleMode::Shadow;
                crate::telemetry::events::RuleHit {
                    rule: &r.id,
                    shadow,
                }
                .emit();
                hits.push(Hit {
                    id: r.id.clone(),
                    shadow,
                    action: r.action.clone(),
                });
                if !shadow && r.action == RuleAction::Accept {
                    break;
                }
            }
        }
        hits
    }
}

fn values<'f>(t: &Target, f: &'f Input<'f>) -> Vec<&'f str> {
    let domain = |a: &'f str| a.rsplit_once('@').map(|(_, d)| d);
    let local = |a: &'f str| a.rsplit_once('@').map(|(l, _)| l);
    match t {
        Target::Reverse => f.reverse.into_iter().collect(),
        Target::Helo => f.helo.into_iter().collect(),
        Target::MailFrom => f.mail_from.into_iter().collect(),
        Target::MailDomain => f.mail_from.and_then(domain).into_iter().collect(),
        Target::Rcpt => f.rcpts.clone(),
        Target::RcptLocal => f.rcpts.iter().filter_map(|r| local(r)).collect(),
        Target::RcptDomain => f.rcpts.iter().filter_map(|r| domain(r)).collect(),
        Target::Header(name) => f
            .message
            .map(|m| {
                m.headers
                    .iter()
                    .filter(|(n, _)| n == name)
                    .map(|(_, v)| v.as_str())
                    .collect()
            })
            .unwrap_or_default(),
        Target::Subject => f
            .message
            .and_then(|m| m.subject.as_deref())
            .into_iter()
            .collect(),
        Target::Body => f
            .message
            .map(|m| m.body.iter().map(String::as_str).collect())
            .unwrap_or_default(),
        Target::AttachmentName => f
            .message
            .map(|m| m.attachment_names.iter().map(String::as_str).collect())
            .unwrap_or_default(),
        Target::AttachmentType => f
            .message
            .map(|m| m.attachment_types.iter().map(String::as_str).collect())
            .unwrap_or_default(),
    }
}

fn eval(n: &Node, f: &Input<'_>, m: &mut Matches<'_>) -> bool {
    match n {
        Node::All(v) => v.iter().all(|n| eval(n, f, m)),
        Node::Any(v) => v.iter().any(|n| eval(n, f, m)),
        Node::Not(n) => !eval(n, f, m),
        Node::Ip(nets) => f.ip.is_some_and(|ip| nets.contains(ip)),
        Node::Tls(b) => f.tls == *b,
        Node::Number(Number::Size, c) => f.size.is_some_and(|s| c.matches(s)),
        Node::Number(Number::RcptCount, c) => c.matches(f.rcpt_count as u64),
        Node::Check(kind, words) => {
            let have: Vec<&str> = match kind {
                CheckKind::Spf => vec![f.spf],
                CheckKind::Dkim => vec![f.dkim],
                // `fail:reject` matches `fail` and `fail:reject`.
                CheckKind::Dmarc => vec![f.dmarc, f.dmarc.split(':').next().unwrap_or("")],
                CheckKind::Iprev => vec![f.iprev],
                CheckKind::Greylist => vec![f.greylist],
                CheckKind::Dnsbl => f.dnsbl.clone(),
            };
            if *kind == CheckKind::Dnsbl && words.iter().any(|w| w == "any") {
                return !f.dnsbl.is_empty();
            }
            have.iter()
                .any(|h| !h.is_empty() && words.iter().any(|w| w.eq_ignore_ascii_case(h)))
        }
        Node::Match(t, leaf) => match leaf {
            Leaf::Exact { set, case } => values(t, f).iter().any(|v| {
                if *case {
                    set.contains(*v)
                } else {
                    set.contains(&v.to_lowercase())
                }
            }),
            Leaf::Domain(ds) => values(t, f).iter().any(|v| {
                let v = match t {
                    Target::MailFrom | Target::Rcpt => v.rsplit_once('@').map_or(*v, |(_, d)| d),
                    _ => v,
                };
                ds.matches(v)
            }),
            Leaf::Regex(idx) => {
                // Each target's RegexSet runs once per evaluation; later
                // leaves of the same target only look the result up.
                if !m.done.contains_key(t) {
                    let vals = values(t, f);
                    let any = match m.sets.get(t) {
                        Some(set) if !vals.is_empty() => {
                            let mut any = vec![false; set.len()];
                            for v in &vals {
                                for i in set.matches(v).into_iter() {
                                    any[i] = true;
                                }
                            }
                            any
                        }
                        _ => Vec::new(),
                    };
                    m.done.insert(t.clone(), any);
                }
                let hits = m.done.get(t).map(Vec::as_slice).unwrap_or_default();
                idx.iter().any(|i| hits.get(*i).copied().unwrap_or(false))
            }
        },
    }
}
