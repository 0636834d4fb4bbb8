//! Rule definitions compiled: conditions into nodes, every regex of a
//! target into its one `RegexSet`, list files read, replies checked.

use super::engine::*;
use super::index::{DomainSet, NetSet};
use super::model::{ActionDef, Cond, Matcher, ReplyDef, RuleDef, RuleMode, Stage};
use crate::wire::reply::Reply;
use ipnet::IpNet;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::AtomicU64;

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
    /// Each target's regexes, at its slot.
    patterns: Vec<(Target, Vec<String>)>,
    slots: HashMap<Target, usize>,
    read_list: &'a dyn Fn(&str) -> Result<Vec<String>, String>,
    /// DNSBL zones the rules name (to check against the configured ones).
    dnsbl_zones: std::collections::BTreeSet<String>,
    /// URL blocklist zones the rules name.
    uribl_zones: std::collections::BTreeSet<String>,
    /// Whether a rule asks for a listing on any zone.
    dnsbl_any: bool,
    /// Whether a rule reads the message's links.
    uses_links: bool,
    /// Lower-case names of the headers the rules read.
    headers_read: Vec<String>,
    /// The list files of the rule being compiled that hold no entry.
    empty_lists: Vec<String>,
}

impl<'a> Compiler<'a> {
    pub fn new(read_list: &'a dyn Fn(&str) -> Result<Vec<String>, String>) -> Self {
        Compiler {
            patterns: Vec::new(),
            slots: HashMap::new(),
            read_list,
            dnsbl_zones: Default::default(),
            uribl_zones: Default::default(),
            dnsbl_any: false,
            uses_links: false,
            headers_read: Vec::new(),
            empty_lists: Vec::new(),
        }
    }

    pub fn rule(&mut self, def: RuleDef) -> Result<Rule, CompileError> {
        let id = def.id.0.clone();
        let err = |message: String, near: Option<String>| CompileError {
            rule: id.clone(),
            message,
            near,
        };
        self.empty_lists.clear();
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
            hit: Matched::new(&id, def.mode == RuleMode::Shadow, action.clone()),
            id,
            description: def.description,
            stage,
            mode: def.mode,
            action,
            cond,
            hits: AtomicU64::new(0),
            metric: Default::default(),
            empty_lists: std::mem::take(&mut self.empty_lists),
        })
    }

    /// A list file's entries; an empty one is noted for the summary.
    fn read(&mut self, list: &str) -> Result<Vec<String>, (String, Option<String>)> {
        let entries = (self.read_list)(list).map_err(|e| (e, Some(list.to_string())))?;
        if entries.is_empty() {
            self.empty_lists.push(list.to_string());
        }
        Ok(entries)
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
                    let entries = self.read(list)?;
                    for line in entries {
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
                let name = h.name.to_ascii_lowercase();
                if !self.headers_read.contains(&name) {
                    self.headers_read.push(name.clone());
                }
                self.leaf(Target::Header(name), m)?
            }
            Cond::Subject(m) => self.leaf(Target::Subject, m)?,
            Cond::Body(m) => self.leaf(Target::Body, m)?,
            Cond::AttachmentName(m) => self.leaf(Target::AttachmentName, m)?,
            Cond::UrlDomain(m) => {
                self.uses_links = true;
                self.leaf(Target::UrlDomain, m)?
            }
            // Zones, or `any`: listed on any URL blocklist.
            Cond::Uribl(v) => {
                let zones = lower(v);
                self.uribl_zones
                    .extend(zones.iter().filter(|z| *z != "any").cloned());
                Node::Check(CheckKind::Uribl, zones)
            }
            Cond::Scanner(v) => {
                Node::Check(CheckKind::Scanner, results("scanner", v, SCANNER_RESULTS)?)
            }
            Cond::AttachmentType(m) => self.leaf(Target::AttachmentType, m)?,
            Cond::ArchiveName(m) => self.leaf(Target::ArchiveName, m)?,
            Cond::ArchiveType(m) => self.leaf(Target::ArchiveType, m)?,
            Cond::EncryptedArchive(b) => Node::Attachment(AttachmentFact::EncryptedArchive, b),
            Cond::ArchiveBomb(b) => Node::Attachment(AttachmentFact::ArchiveBomb, b),
            Cond::DoubleExtension(b) => Node::Attachment(AttachmentFact::DoubleExtension, b),
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
            Cond::Antivirus(v) => Node::Check(
                CheckKind::Antivirus,
                results("antivirus", v, ANTIVIRUS_RESULTS)?,
            ),
            Cond::Dnsbl(v) => {
                let zones = lower(v);
                // `any`: listed on any configured zone.
                self.dnsbl_any |= zones.iter().any(|z| z == "any");
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
            let entries = self.read(&list)?;
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
            let slot = *self.slots.entry(target.clone()).or_insert_with(|| {
                self.patterns.push((target.clone(), Vec::new()));
                self.patterns.len() - 1
            });
            let mut idx = Vec::new();
            for r in m.regex.map(OneOrManyExt::into_list).unwrap_or_default() {
                let pattern = if case { r.clone() } else { format!("(?i){r}") };
                // Compile alone first: a bad pattern is reported as itself.
                regex::Regex::new(&pattern)
                    .map_err(|e| (format!("bad regex {r:?}: {e}"), Some(r.clone())))?;
                let list = &mut self.patterns[slot].1;
                idx.push(list.len());
                list.push(pattern);
            }
            Leaf::Regex { slot, idx }
        };
        Ok(Node::Match(target, leaf))
    }

    pub fn finish(self, rules: Vec<Rule>) -> Result<Compiled, String> {
        let mut sets = Vec::with_capacity(self.patterns.len());
        for (t, p) in self.patterns {
            sets.push(Patterns::new(&p).map_err(|e| format!("{}: {e}", t.name()))?);
        }
        Ok(Compiled {
            rules,
            sets,
            dnsbl_zones: self.dnsbl_zones,
            uribl_zones: self.uribl_zones,
            dnsbl_any: self.dnsbl_any,
            uses_links: self.uses_links,
            headers_read: self.headers_read,
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
const ANTIVIRUS_RESULTS: &[&str] = &["clean", "virus", "error", "skipped"];
const SCANNER_RESULTS: &[&str] = &[
    "no_action",
    "greylist",
    "add_header",
    "rewrite_subject",
    "soft_reject",
    "reject",
    "spam",
    "ham",
    "error",
    "skipped",
];

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
        Node::Attachment(..) => Stage::Data,
        Node::Number(Number::Size, _) | Node::Number(Number::RcptCount, _) => Stage::Data,
        Node::Check(CheckKind::Spf, _) => Stage::Mail,
        Node::Check(
            CheckKind::Dkim
            | CheckKind::Dmarc
            | CheckKind::Antivirus
            | CheckKind::Uribl
            | CheckKind::Scanner,
            _,
        ) => Stage::Data,
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
