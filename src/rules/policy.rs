//! Policies per recipient domain or address: one YAML file each under
//! `policies/` in the rules directory, loaded, checked and reloaded with
//! the rules. A policy changes, for its recipients, the score thresholds,
//! check modes, the action of a finding, greylisting, which rule files
//! apply, and adds allow and block lists. A recipient without one gets
//! the gate's (the config's `checks`).
//!
//! A policy does not run checks of its own: the checks run once, as the
//! gate configures them, and a policy is a view over what they found
//! (`Policy::view`). So a check the gate has `off` cannot be turned on for
//! one domain; `check` says so.

use super::{RuleError, RuleSet};
use crate::config::{Action, Mode, Thresholds};
use ipnet::IpNet;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The subdirectory of the rules directory that holds the policies.
pub const DIR: &str = "policies";

/// One policy file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    /// Recipient domains; `*.example.org` for every subdomain.
    #[serde(default)]
    domains: Vec<String>,
    /// Recipient addresses (before any domain's policy).
    #[serde(default)]
    recipients: Vec<String>,
    #[serde(default)]
    thresholds: ThresholdOverrides,
    #[serde(default)]
    checks: BTreeMap<CheckName, ModeOverride>,
    /// A finding's action by its reason (`spf:softfail`, `dmarc:quarantine`,
    /// `dnsbl:zen.spamhaus.org`, `rule:ID`).
    #[serde(default)]
    actions: BTreeMap<String, Action>,
    /// Rule files (names in the rules directory) that apply; all if unset.
    #[serde(default)]
    rules: Option<Vec<String>>,
    #[serde(default)]
    allow: ListDef,
    #[serde(default)]
    block: ListDef,
}

/// Thresholds a policy sets; the gate's stand for the others.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThresholdOverrides {
    pub reject: Option<f64>,
    pub tempfail: Option<f64>,
    pub tag: Option<f64>,
    pub greylist: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
enum CheckName {
    Dnsbl,
    Spf,
    Dkim,
    Dmarc,
    Arc,
    Iprev,
    Greylist,
    Antivirus,
    Uribl,
    Scanner,
}

impl CheckName {
    /// As findings name their check.
    fn as_str(self) -> &'static str {
        match self {
            CheckName::Dnsbl => "dnsbl",
            CheckName::Spf => "spf",
            CheckName::Dkim => "dkim",
            CheckName::Dmarc => "dmarc",
            CheckName::Arc => "arc",
            CheckName::Iprev => "iprev",
            CheckName::Greylist => "greylist",
            CheckName::Antivirus => "antivirus",
            CheckName::Uribl => "uribl",
            CheckName::Scanner => "scanner",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModeOverride {
    mode: Mode,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListDef {
    /// Sender addresses, or domains (with their subdomains).
    #[serde(default)]
    senders: Vec<String>,
    #[serde(default)]
    clients: Vec<IpNet>,
    /// List files (one entry per line: address, domain or network; `#`
    /// comments), relative to the rules directory.
    #[serde(default)]
    files: Vec<String>,
}

/// Allow or block entries, each with where it came from (for the log).
#[derive(Debug, Default)]
pub struct Lists {
    /// Addresses and domains, lower case, to their origin.
    senders: HashMap<String, Arc<str>>,
    clients: Vec<(IpNet, Arc<str>)>,
}

impl Lists {
    /// The config's entries (already validated), with `origin`.
    pub fn from_config(senders: &[String], clients: &[IpNet], origin: &str) -> Lists {
        let origin: Arc<str> = Arc::from(origin);
        let mut l = Lists::default();
        for s in senders {
            let _ = l.add_sender(s, &origin);
        }
        l.clients = clients.iter().map(|n| (*n, Arc::clone(&origin))).collect();
        l
    }

    pub fn is_empty(&self) -> bool {
        self.senders.is_empty() && self.clients.is_empty()
    }

    /// The entry a sender or client matches, as `entry(origin)`.
    pub fn matching(&self, sender: &str, ip: IpAddr) -> Option<String> {
        if !self.senders.is_empty() {
            let sender = sender.to_ascii_lowercase();
            for key in sender_keys(&sender) {
                if let Some(origin) = self.senders.get(key) {
                    return Some(format!("{key}({origin})"));
                }
            }
        }
        self.clients
            .iter()
            .find(|(n, _)| n.contains(&ip))
            .map(|(n, origin)| format!("{n}({origin})"))
    }

    fn add_sender(&mut self, entry: &str, origin: &Arc<str>) -> Result<(), String> {
        let e = entry.trim().trim_end_matches('.').to_ascii_lowercase();
        let domain = e.rsplit_once('@').map_or(e.as_str(), |(_, d)| d);
        if domain.is_empty() || !domain.contains('.') || domain.contains(char::is_whitespace) {
            return Err(format!(
                "{entry:?} is not a sender address or domain (user@example.org, example.org)"
            ));
        }
        self.senders.entry(e).or_insert_with(|| Arc::clone(origin));
        Ok(())
    }

    /// One line of a list file: an address, a domain, or a network.
    fn add_line(&mut self, entry: &str, origin: &Arc<str>) -> Result<(), String> {
        if let Ok(net) = entry.parse::<IpNet>() {
            self.clients.push((net, Arc::clone(origin)));
            return Ok(());
        }
        if let Ok(ip) = entry.parse::<IpAddr>() {
            self.clients.push((IpNet::from(ip), Arc::clone(origin)));
            return Ok(());
        }
        self.add_sender(entry, origin)
    }
}

/// What a sender is looked up by in a list: the address, its domain, and
/// each parent domain (`a@x.example.org`, `x.example.org`, `example.org`).
pub fn sender_keys(sender: &str) -> impl Iterator<Item = &str> {
    let domain = sender.rsplit_once('@').map(|(_, d)| d);
    let addr = domain.map(|_| sender);
    let parents = domain.into_iter().flat_map(|d| {
        std::iter::successors(Some(d), |d| d.split_once('.').map(|(_, rest)| rest))
            .filter(|d| d.contains('.'))
    });
    addr.into_iter().chain(parents)
}

/// One policy, as loaded.
pub struct Policy {
    /// The file's name without `.yaml`: the log's `policy` key.
    pub name: String,
    pub file: PathBuf,
    pub thresholds: ThresholdOverrides,
    modes: Vec<(&'static str, Mode)>,
    actions: HashMap<String, Action>,
    /// The rules that apply, when not all of them.
    pub rules: Option<Arc<RuleSet>>,
    pub allow: Lists,
    pub block: Lists,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Policy({})", self.file.display())
    }
}

impl Policy {
    /// The thresholds in force: this policy's, else the gate's.
    pub fn thresholds(&self, gate: &Thresholds) -> Thresholds {
        let o = &self.thresholds;
        Thresholds {
            reject: o.reject.or(gate.reject),
            tempfail: o.tempfail.or(gate.tempfail),
            tag: o.tag.or(gate.tag),
            greylist: o.greylist.or(gate.greylist),
        }
    }

    /// The mode this policy sets for a check, if it sets one.
    pub fn mode(&self, check: &str) -> Option<Mode> {
        self.modes
            .iter()
            .find(|(c, _)| *c == check)
            .map(|(_, m)| *m)
    }

    /// The action this policy gives findings with this reason, if any.
    pub fn action(&self, reason: &str) -> Option<Action> {
        self.actions.get(reason).copied()
    }

    /// Whether it changes any finding (modes or actions).
    pub fn changes_findings(&self) -> bool {
        !self.modes.is_empty() || !self.actions.is_empty()
    }
}

/// Why a recipient got its policy, for `explain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Why {
    Recipient,
    Domain(String),
    Subdomain(String),
}

impl std::fmt::Display for Why {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Why::Recipient => f.write_str("the recipient is listed"),
            Why::Domain(d) => write!(f, "the recipient's domain is {d}"),
            Why::Subdomain(d) => write!(f, "the recipient's domain is under *.{d}"),
        }
    }
}

/// Every policy of a rules directory, by what it covers.
#[derive(Debug, Default)]
pub struct Policies {
    pub all: Vec<Arc<Policy>>,
    by_rcpt: HashMap<String, usize>,
    by_domain: HashMap<String, usize>,
    /// `*.example.org` entries, by `example.org`.
    by_parent: HashMap<String, usize>,
}

impl Policies {
    pub fn is_empty(&self) -> bool {
        self.all.is_empty()
    }

    /// The policy for a recipient address, and why; None: the gate's.
    pub fn find(&self, rcpt: &str) -> Option<(&Arc<Policy>, Why)> {
        if self.all.is_empty() {
            return None;
        }
        let rcpt = rcpt.to_ascii_lowercase();
        let rcpt = rcpt.trim_end_matches('.');
        if let Some(i) = self.by_rcpt.get(rcpt) {
            return Some((&self.all[*i], Why::Recipient));
        }
        let domain = rcpt.rsplit_once('@')?.1;
        if let Some(i) = self.by_domain.get(domain) {
            return Some((&self.all[*i], Why::Domain(domain.to_string())));
        }
        let mut d = domain;
        while let Some((_, parent)) = d.split_once('.') {
            if let Some(i) = self.by_parent.get(parent) {
                return Some((&self.all[*i], Why::Subdomain(parent.to_string())));
            }
            d = parent;
        }
        None
    }

    /// Loads `dir/policies/*.yaml`. `rule_texts` are the rule files
    /// loaded (for policies naming some of them); list files read are
    /// added to `lists` (watched for changes).
    pub fn load(
        dir: &Path,
        rule_texts: &[(PathBuf, &str)],
        lists: &mut Vec<PathBuf>,
    ) -> Result<Policies, Vec<RuleError>> {
        let pdir = dir.join(DIR);
        if !pdir.is_dir() {
            return Ok(Policies::default());
        }
        let mut files: Vec<PathBuf> = match std::fs::read_dir(&pdir) {
            Ok(rd) => rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml") && p.is_file())
                .collect(),
            Err(e) => return Err(vec![error(&pdir, 1, 1, format!("cannot read: {e}"))]),
        };
        files.sort();
        let mut texts = Vec::new();
        for f in &files {
            match crate::config::read_text(f, super::MAX_RULE_FILE) {
                Ok(t) => texts.push((f.clone(), t)),
                Err(e) => return Err(vec![error(f, 1, 1, format!("cannot read: {e}"))]),
            }
        }
        let refs: Vec<(PathBuf, &str)> =
            texts.iter().map(|(p, t)| (p.clone(), t.as_str())).collect();
        Self::load_texts(dir, &refs, rule_texts, lists)
    }

    /// Loads policies given as (path, text).
    pub fn load_texts(
        dir: &Path,
        files: &[(PathBuf, &str)],
        rule_texts: &[(PathBuf, &str)],
        lists: &mut Vec<PathBuf>,
    ) -> Result<Policies, Vec<RuleError>> {
        let mut out = Policies::default();
        let mut errors = Vec::new();
        // Policies naming the same rule files share one compiled set.
        let mut subsets: HashMap<Vec<String>, Arc<RuleSet>> = HashMap::new();
        let mut owner: HashMap<String, String> = HashMap::new();
        for (path, text) in files {
            let def: PolicyFile = match crate::yaml::parse(text, path) {
                Ok(d) => d,
                Err(e) => {
                    errors.push(RuleError::from(e));
                    continue;
                }
            };
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let at = |needle: &str| locate(text, needle);
            let mut err = |needle: &str, message: String| {
                let (line, column) = at(needle);
                errors.push(error(path, line, column, message));
            };
            if def.domains.is_empty() && def.recipients.is_empty() {
                err(
                    "",
                    "a policy needs domains or recipients it applies to".into(),
                );
            }
            let index = out.all.len();
            for d in &def.domains {
                let d = d.trim_end_matches('.').to_ascii_lowercase();
                let (table, key) = match d.strip_prefix("*.") {
                    Some(parent) => (&mut out.by_parent, parent.to_string()),
                    None => (&mut out.by_domain, d.clone()),
                };
                if !is_domain(&key) {
                    err(&d, format!("domains: {d:?} is not a domain"));
                    continue;
                }
                if let Some(other) = owner.insert(d.clone(), name.clone()) {
                    err(&d, format!("domains: {d} is also in policy {other}"));
                    continue;
                }
                table.insert(key, index);
            }
            for r in &def.recipients {
                let r = r.trim_end_matches('.').to_ascii_lowercase();
                if !r.contains('@') {
                    err(&r, format!("recipients: {r:?} is not an address"));
                    continue;
                }
                if let Some(other) = owner.insert(r.clone(), name.clone()) {
                    err(&r, format!("recipients: {r} is also in policy {other}"));
                    continue;
                }
                out.by_rcpt.insert(r, index);
            }
            for reason in def.actions.keys() {
                if !reason.contains(':') {
                    err(
                        reason,
                        format!(
                            "actions: {reason:?} is not a finding's reason (spf:softfail, dmarc:quarantine, dnsbl:ZONE, rule:ID)"
                        ),
                    );
                }
            }
            let rules = match &def.rules {
                None => None,
                Some(names) => {
                    let mut key = names.clone();
                    key.sort();
                    key.dedup();
                    let mut chosen = Vec::new();
                    for n in &key {
                        match rule_texts.iter().find(|(p, _)| {
                            p.file_name()
                                .is_some_and(|f| f.to_string_lossy() == n.as_str())
                        }) {
                            Some((p, t)) => chosen.push((p.clone(), *t)),
                            None => err(n, format!("rules: no rule file {n} in {}", dir.display())),
                        }
                    }
                    if let Some(set) = subsets.get(&key) {
                        Some(Arc::clone(set))
                    } else {
                        match RuleSet::load_texts(dir, &chosen) {
                            Ok(set) => {
                                let set = Arc::new(set);
                                subsets.insert(key, Arc::clone(&set));
                                Some(set)
                            }
                            // The rule files' own errors are reported for them.
                            Err(_) => None,
                        }
                    }
                }
            };
            let mut lists_of = |def: &ListDef, what: &str| -> Lists {
                let mut l = Lists::default();
                let origin: Arc<str> = Arc::from(format!("policy {name}"));
                for s in &def.senders {
                    if let Err(m) = l.add_sender(s, &origin) {
                        let (line, column) = locate(text, s);
                        errors.push(error(path, line, column, format!("{what}.senders: {m}")));
                    }
                }
                for c in &def.clients {
                    l.clients.push((*c, Arc::clone(&origin)));
                }
                for f in &def.files {
                    let p = dir.join(f);
                    lists.push(p.clone());
                    let body = match crate::config::read_text(&p, super::MAX_LIST_FILE) {
                        Ok(b) => b,
                        Err(e) => {
                            let (line, column) = locate(text, f);
                            errors.push(error(
                                path,
                                line,
                                column,
                                format!("{what}.files: {}: {e}", p.display()),
                            ));
                            continue;
                        }
                    };
                    for (i, raw) in body.lines().enumerate() {
                        let entry = raw.split('#').next().unwrap_or("").trim();
                        if entry.is_empty() {
                            continue;
                        }
                        let origin: Arc<str> = Arc::from(format!("{f}:{}", i + 1));
                        if let Err(m) = l.add_line(entry, &origin) {
                            let column = raw.find(entry).unwrap_or(0) + 1;
                            errors.push(error(&p, i + 1, column, m));
                        }
                    }
                }
                l
            };
            let allow = lists_of(&def.allow, "allow");
            let block = lists_of(&def.block, "block");
            out.all.push(Arc::new(Policy {
                name,
                file: path.clone(),
                thresholds: def.thresholds,
                modes: def
                    .checks
                    .iter()
                    .map(|(c, m)| (c.as_str(), m.mode))
                    .collect(),
                actions: def.actions.into_iter().collect(),
                rules,
                allow,
                block,
            }));
        }
        if errors.is_empty() {
            Ok(out)
        } else {
            Err(errors)
        }
    }

    /// Policies that set a mode for a check the gate does not run
    /// (`off`): they could never change anything.
    pub fn modes_of_checks_off(&self, off: &[String]) -> Vec<RuleError> {
        let mut errors = Vec::new();
        for p in &self.all {
            for (check, mode) in &p.modes {
                if *mode != Mode::Off && off.iter().any(|o| o == check) {
                    let text = std::fs::read_to_string(&p.file).unwrap_or_default();
                    let (line, column) = locate(&text, &format!("{check}:"));
                    errors.push(error(
                        &p.file,
                        line,
                        column,
                        format!(
                            "checks.{check}: the gate has {check} off, and a policy only changes what the gate's checks find; set checks.{check}.mode to record in the config"
                        ),
                    ));
                }
            }
        }
        errors
    }
}

fn error(file: &Path, line: usize, column: usize, message: String) -> RuleError {
    RuleError {
        file: file.display().to_string(),
        line,
        column,
        rule: None,
        message,
    }
}

/// The line and column of the first place `needle` is written (1:1 if it
/// is not found as written, e.g. after case folding).
fn locate(text: &str, needle: &str) -> (usize, usize) {
    if needle.is_empty() {
        return (1, 1);
    }
    for (i, line) in text.lines().enumerate() {
        let code = line.split('#').next().unwrap_or("");
        if let Some(c) = code.to_ascii_lowercase().find(&needle.to_ascii_lowercase()) {
            return (i + 1, c + 1);
        }
    }
    (1, 1)
}

fn is_domain(d: &str) -> bool {
    d.contains('.')
        && d.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(files: &[(&str, &str)]) -> Result<Policies, Vec<RuleError>> {
        let files: Vec<(PathBuf, &str)> = files
            .iter()
            .map(|(n, t)| (PathBuf::from(format!("policies/{n}")), *t))
            .collect();
        let rules = [(
            PathBuf::from("10-a.yaml"),
            "rules:\n  - {id: A, description: d, when: {helo: {exact: [a.test]}}, action: reject}\n",
        )];
        Policies::load_texts(Path::new("."), &files, &rules, &mut Vec::new())
    }

    #[test]
    fn a_recipient_gets_its_address_then_domain_then_parent_policy() {
        let p = load(&[
            ("a.yaml", "domains: [example.org, '*.example.net']\n"),
            ("b.yaml", "recipients: [Boss@Example.org]\n"),
        ])
        .unwrap();
        let name = |r: &str| p.find(r).map(|(p, w)| (p.name.clone(), w));
        assert_eq!(name("boss@example.org"), Some(("b".into(), Why::Recipient)));
        assert_eq!(
            name("x@EXAMPLE.org"),
            Some(("a".into(), Why::Domain("example.org".into())))
        );
        assert_eq!(
            name("x@a.b.example.net"),
            Some(("a".into(), Why::Subdomain("example.net".into())))
        );
        assert_eq!(name("x@example.net"), None, "only subdomains");
        assert_eq!(name("x@sub.example.org"), None);
        assert_eq!(name("no-at-sign"), None);
    }

    #[test]
    fn errors_name_file_line_and_column() {
        let e = load(&[
            ("a.yaml", "domains: [example.org]\n"),
            (
                "b.yaml",
                "domains:\n  - example.org\nthresholds: {reject: 5}\nrules: [10-a.yaml, 99-none.yaml]\nactions: {softfail: reject}\n",
            ),
            ("c.yaml", "domains: [c.test]\nchecks: {spam: {mode: off}}\n"),
            ("d.yaml", "thresholds: {reject: 5}\n"),
        ])
        .unwrap_err();
        let lines: Vec<String> = e.iter().map(|e| e.to_string()).collect();
        let want = [
            "policies/b.yaml:2:5: domains: example.org is also in policy a",
            "policies/b.yaml:5:11: actions: \"softfail\" is not a finding's reason",
            "policies/b.yaml:4:20: rules: no rule file 99-none.yaml",
            "policies/c.yaml:2:10: checks.?: unknown variant `spam`",
            "policies/d.yaml:1:1: a policy needs domains or recipients",
        ];
        for w in want {
            assert!(
                lines.iter().any(|l| l.starts_with(w)),
                "{w}\nin\n{lines:#?}"
            );
        }
    }

    #[test]
    fn lists_match_addresses_domains_with_subdomains_and_networks() {
        let dir = std::env::temp_dir().join(format!("pc-policy-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("lists")).unwrap();
        std::fs::write(
            dir.join("lists/allow.txt"),
            "# partners\nboss@partner.test\n198.51.100.0/24  # their relay\n203.0.113.7\n",
        )
        .unwrap();
        std::fs::write(dir.join("lists/bad.txt"), "ok.test\nnot an entry\n").unwrap();
        let mut watched = Vec::new();
        let p = Policies::load_texts(
            &dir,
            &[(
                PathBuf::from("policies/a.yaml"),
                "domains: [a.test]\nallow: {senders: [friend.test], files: [lists/allow.txt]}\n",
            )],
            &[],
            &mut watched,
        )
        .unwrap();
        assert_eq!(watched, [dir.join("lists/allow.txt")]);
        let a = &p.all[0].allow;
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            a.matching("x@mail.Friend.test", ip("192.0.2.1")).as_deref(),
            Some("friend.test(policy a)")
        );
        assert_eq!(
            a.matching("boss@partner.test", ip("192.0.2.1")).as_deref(),
            Some("boss@partner.test(lists/allow.txt:2)")
        );
        assert_eq!(a.matching("other@partner.test", ip("192.0.2.1")), None);
        assert_eq!(
            a.matching("", ip("198.51.100.9")).as_deref(),
            Some("198.51.100.0/24(lists/allow.txt:3)")
        );
        assert_eq!(
            a.matching("", ip("203.0.113.7")).as_deref(),
            Some("203.0.113.7/32(lists/allow.txt:4)")
        );
        let e = Policies::load_texts(
            &dir,
            &[(
                PathBuf::from("policies/a.yaml"),
                "domains: [a.test]\nblock: {files: [lists/bad.txt, lists/none.txt]}\n",
            )],
            &[],
            &mut Vec::new(),
        )
        .unwrap_err();
        let lines: Vec<String> = e.iter().map(|e| e.to_string()).collect();
        assert!(
            lines[0].ends_with("lists/bad.txt:2:1: \"not an entry\" is not a sender address or domain (user@example.org, example.org)"),
            "{lines:?}"
        );
        assert!(lines[1].contains("policies/a.yaml:2:"), "{lines:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sender_keys_walk_up_to_the_registrable_part() {
        let k: Vec<&str> = sender_keys("a@x.example.org").collect();
        assert_eq!(k, ["a@x.example.org", "x.example.org", "example.org"]);
        assert_eq!(sender_keys("").count(), 0);
    }
}
