//! Rules: YAML files administrators write in `rules_dir`, loaded in name
//! order, validated in full (errors name `file:line:column` and the rule),
//! compiled to RegexSets, and swapped atomically on reload. Sessions keep
//! the set they started with.

pub mod archive;
mod compile;
pub mod cost;
mod engine;
mod eval;
mod index;
mod input;
pub mod links;
pub mod model;
pub mod policy;

/// A rule file larger than this is not one.
const MAX_RULE_FILE: u64 = 16 << 20;
/// Lists hold millions of entries (tens of MB); larger is a mistake.
const MAX_LIST_FILE: u64 = 256 << 20;

pub use engine::{Hit, Matched, Rule, RuleAction};
pub use input::{Input, LinkFacts, MessageFacts, OwnedInput};
pub use model::{RuleMode, Stage};

use crate::telemetry::events::RulesReload;
use crate::yaml;
use arc_swap::ArcSwap;
use compile::Compiler;
use engine::Compiled;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// One problem in the rules, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub rule: Option<String>,
    pub message: String,
}

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        if let Some(r) = &self.rule {
            write!(f, "{r}: ")?;
        }
        f.write_str(&self.message)
    }
}

/// Every error found, not only the first.
#[derive(Debug, Clone, thiserror::Error)]
pub struct RuleErrors(pub Vec<RuleError>);

impl From<crate::yaml::YamlError> for RuleError {
    /// A file that is not valid YAML of the expected shape, where serde
    /// stopped.
    fn from(e: crate::yaml::YamlError) -> RuleError {
        RuleError {
            file: e.file,
            line: e.line,
            column: e.column,
            rule: None,
            message: if e.path.is_empty() || e.path == "." {
                e.message
            } else {
                format!("{}: {}", e.path, e.message)
            },
        }
    }
}

impl fmt::Display for RuleErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// A loaded, compiled set of rules.
pub struct RuleSet {
    compiled: Compiled,
    pub files: Vec<PathBuf>,
    /// The list files the rules read (watched for changes like the rules).
    pub lists: Vec<PathBuf>,
    pub loaded_at: SystemTime,
    /// Policies per recipient domain or address (`policies/*.yaml`).
    pub policies: policy::Policies,
    /// What its DATA stage has cost per KiB (where the check pool runs it).
    pub data_cost: cost::DataCost,
}

impl RuleSet {
    pub fn empty() -> RuleSet {
        RuleSet {
            compiled: Compiled::empty(),
            files: Vec::new(),
            lists: Vec::new(),
            loaded_at: SystemTime::now(),
            policies: policy::Policies::default(),
            data_cost: cost::DataCost::default(),
        }
    }

    pub fn rules(&self) -> &[Rule] {
        &self.compiled.rules
    }

    pub fn evaluate(&self, stage: Stage, facts: &Input<'_>) -> Vec<Hit> {
        self.compiled.evaluate(stage, facts)
    }

    /// Whether a rule reads the message's links (`url_domain`); if none
    /// does, the rules never look for them.
    pub fn uses_links(&self) -> bool {
        self.compiled.uses_links
    }

    /// Whether a rule reads the header `name` (any case).
    pub fn reads_header(&self, name: &str) -> bool {
        let read = &self.compiled.headers_read;
        read.iter().any(|h| h.eq_ignore_ascii_case(name))
    }

    /// URL blocklist zones the rules name.
    pub fn uribl_zones(&self) -> impl Iterator<Item = &str> {
        self.compiled.uribl_zones.iter().map(String::as_str)
    }

    /// DNSBL zones the rules name.
    pub fn dnsbl_zones(&self) -> impl Iterator<Item = &str> {
        self.compiled.dnsbl_zones.iter().map(String::as_str)
    }

    pub fn has_stage(&self, stage: Stage) -> bool {
        self.compiled.rules.iter().any(|r| r.stage == stage)
    }

    /// Loads every `*.yaml` in `dir`, in name order.
    pub fn load_dir(dir: &Path) -> Result<RuleSet, RuleErrors> {
        let top = |message: String| {
            RuleErrors(vec![RuleError {
                file: dir.display().to_string(),
                line: 1,
                column: 1,
                rule: None,
                message,
            }])
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| top(format!("cannot read rules directory: {e}")))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml") && p.is_file())
            .collect();
        files.sort();
        let mut texts = Vec::new();
        for f in &files {
            let text = crate::config::read_text(f, MAX_RULE_FILE)
                .map_err(|e| top(format!("{}: {e}", f.display())))?;
            texts.push((f.clone(), text));
        }
        let refs: Vec<(PathBuf, &str)> =
            texts.iter().map(|(p, t)| (p.clone(), t.as_str())).collect();
        let rules = Self::load_texts(dir, &refs);
        let mut lists = Vec::new();
        let policies = policy::Policies::load(dir, &refs, &mut lists);
        match (rules, policies) {
            (Ok(mut set), Ok(p)) => {
                set.policies = p;
                set.lists.extend(lists);
                set.lists.sort();
                set.lists.dedup();
                Ok(set)
            }
            (Err(mut e), Err(p)) => {
                e.0.extend(p);
                Err(e)
            }
            (Err(e), Ok(_)) => Err(e),
            (Ok(_), Err(p)) => Err(RuleErrors(p)),
        }
    }

    /// Loads rule files given as (path, text); list files are read from `dir`
    /// (a regular file each, of bounded size: `/dev/zero` is not a list).
    pub fn load_texts(dir: &Path, files: &[(PathBuf, &str)]) -> Result<RuleSet, RuleErrors> {
        let lists = std::cell::RefCell::new(Vec::new());
        let read_list = |name: &str| -> Result<Vec<String>, String> {
            let path = dir.join(name);
            lists.borrow_mut().push(path.clone());
            let text = crate::config::read_text(&path, MAX_LIST_FILE)
                .map_err(|e| format!("list file {}: {e}", path.display()))?;
            Ok(text
                .lines()
                .map(|l| l.split('#').next().unwrap_or("").trim())
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect())
        };
        let mut compiler = Compiler::new(&read_list);
        let mut errors = Vec::new();
        let mut rules = Vec::new();
        let mut seen: BTreeMap<String, String> = BTreeMap::new();
        for (path, text) in files {
            let file = path.display().to_string();
            let parsed: model::RuleFile = match yaml::parse(text, path) {
                Ok(f) => f,
                Err(e) => {
                    errors.push(RuleError::from(e));
                    continue;
                }
            };
            let mut in_file: BTreeMap<String, usize> = BTreeMap::new();
            for def in parsed.rules {
                let id = def.id.0.clone();
                let nth = in_file.entry(id.clone()).or_insert(0);
                // A duplicate is reported where it stands, not at the first.
                let (line, column) = locate_nth_rule(text, &id, *nth, None);
                *nth += 1;
                if let Some(other) = seen.get(&id) {
                    errors.push(RuleError {
                        file: file.clone(),
                        line,
                        column,
                        rule: Some(id.clone()),
                        message: format!("duplicate rule id (first defined in {other})"),
                    });
                    continue;
                }
                seen.insert(id.clone(), format!("{file}:{line}"));
                match compiler.rule(def) {
                    Ok(r) => rules.push(r),
                    Err(e) => {
                        let (line, column) = locate_rule(text, &id, e.near.as_deref());
                        errors.push(RuleError {
                            file: file.clone(),
                            line,
                            column,
                            rule: Some(e.rule),
                            message: e.message,
                        });
                    }
                }
            }
        }
        if !errors.is_empty() {
            return Err(RuleErrors(errors));
        }
        let compiled = compiler.finish(rules).map_err(|m| {
            RuleErrors(vec![RuleError {
                file: dir.display().to_string(),
                line: 1,
                column: 1,
                rule: None,
                message: m,
            }])
        })?;
        let mut lists = lists.take();
        lists.sort();
        lists.dedup();
        Ok(RuleSet {
            compiled,
            files: files.iter().map(|(p, _)| p.clone()).collect(),
            lists,
            loaded_at: SystemTime::now(),
            policies: policy::Policies::default(),
            data_cost: cost::DataCost::default(),
        })
    }

    /// `portcullis check`'s summary: rules per stage and action, shadow rules.
    pub fn summary(&self) -> String {
        // (applied, shadow) per stage and action: a shadow rule refuses
        // nothing, so it is not counted as a refusal.
        let mut by: BTreeMap<(Stage, &str), (usize, usize)> = BTreeMap::new();
        let mut shadow = Vec::new();
        let mut empty = Vec::new();
        for r in self.rules() {
            let n = by.entry((r.stage, r.action.kind())).or_default();
            if r.mode == RuleMode::Shadow {
                n.1 += 1;
                shadow.push(r.id.as_str());
            } else {
                n.0 += 1;
            }
            if !r.empty_lists.is_empty() {
                empty.push(format!("{} ({})", r.id, r.empty_lists.join(", ")));
            }
        }
        let mut out = format!(
            "{} rules from {} files\n  {:<8} {:<10} {:>7} {:>7}\n",
            self.rules().len(),
            self.files.len(),
            "stage",
            "action",
            "applied",
            "shadow"
        );
        for ((stage, action), (applied, shadowed)) in by {
            out.push_str(&format!(
                "  {:<8} {:<10} {applied:>7} {shadowed:>7}\n",
                stage.as_str(),
                action
            ));
        }
        if shadow.is_empty() {
            out.push_str("  shadow: none\n");
        } else {
            out.push_str(&format!(
                "  shadow: {}\n    (try-out mode: a match is logged as rules=ID(shadow) and changes nothing; set the rule's mode: enforce to apply it)\n",
                shadow.join(", ")
            ));
        }
        if !empty.is_empty() {
            out.push_str(&format!(
                "  empty lists: {} (a condition on an empty list never matches)\n",
                empty.join(", ")
            ));
        }
        out
    }
}

/// Finds the rule's `id:` line; with `near`, the first line after it that
/// contains that text (the offending regex, list file or key).
fn locate_rule(text: &str, id: &str, near: Option<&str>) -> (usize, usize) {
    locate_nth_rule(text, id, 0, near)
}

/// Like `locate_rule`, for the `nth` (from 0) definition of `id` in the file.
fn locate_nth_rule(text: &str, id: &str, nth: usize, near: Option<&str>) -> (usize, usize) {
    let mut start = None;
    let mut seen = 0;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim_start().trim_start_matches("- ").trim_start();
        if let Some(rest) = t.strip_prefix("id:")
            && rest.trim().trim_matches(['"', '\'']) == id
        {
            seen += 1;
            if seen <= nth {
                continue;
            }
            start = Some(i);
            let col = line.find("id:").unwrap_or(0) + 1;
            if near.is_none() {
                return (i + 1, col);
            }
            break;
        }
    }
    let Some(start) = start else { return (1, 1) };
    if let Some(n) = near {
        for (i, line) in text.lines().enumerate().skip(start) {
            if let Some(c) = line.find(n) {
                return (i + 1, c + 1);
            }
            let t = line.trim_start().trim_start_matches("- ");
            if i > start && t.starts_with("id:") {
                break;
            }
        }
    }
    let line = text.lines().nth(start).unwrap_or("");
    (start + 1, line.find("id:").unwrap_or(0) + 1)
}

/// The configured rules, or the default `rules` directory when it exists.
pub fn load(cfg: &crate::config::Config) -> Result<Arc<RuleWatcher>, RuleErrors> {
    let (dir, required) = cfg.rules_dir();
    let zones = configured_zones(cfg);
    if !required && !dir.is_dir() {
        tracing::info!("no rules directory: running without rules");
        return Ok(RuleWatcher::new(dir, RuleSet::empty(), zones));
    }
    let set = RuleSet::load_dir(&dir)?;
    let unknown = unknown_zones(&set, &zones, &dir);
    if !unknown.is_empty() {
        return Err(RuleErrors(unknown));
    }
    Ok(RuleWatcher::new(dir, set, zones))
}

/// The zones a config's checks query, as rules name them.
#[derive(Debug, Clone, Default)]
pub struct Zones {
    pub dnsbl: Vec<String>,
    pub uribl: Vec<String>,
    /// Checks the config has off (a policy cannot switch them on).
    pub checks_off: Vec<String>,
}

/// The DNSBL and URL blocklist zones a config's checks query.
pub fn configured_zones(cfg: &crate::config::Config) -> Zones {
    let names = |zones: &[crate::config::Zone]| {
        zones
            .iter()
            .map(|z| z.zone.trim_end_matches('.').to_ascii_lowercase())
            .collect()
    };
    Zones {
        dnsbl: names(&cfg.checks.dnsbl.zones),
        uribl: names(&cfg.checks.uribl.all_zones()),
        checks_off: cfg
            .checks
            .modes()
            .into_iter()
            .filter(|(_, m)| *m == crate::config::Mode::Off)
            .map(|(n, _)| n)
            .collect(),
    }
}

/// Configured DNSBL zones that change nothing: no action, no score, and no
/// rule names them (or asks for `any` zone). A listing there is only logged.
pub fn idle_zones(cfg: &crate::config::Config, set: &RuleSet) -> Vec<String> {
    cfg.checks
        .dnsbl
        .zones
        .iter()
        .filter(|z| z.action.is_none() && z.score == 0.0 && !set.compiled.dnsbl_any)
        .filter(|z| {
            let name = z.zone.trim_end_matches('.').to_ascii_lowercase();
            !set.dnsbl_zones().any(|r| r.trim_end_matches('.') == name)
        })
        .map(|z| z.zone.clone())
        .collect()
}

/// DNSBL and URL blocklist zones the rules name that the checks do not
/// query: no rule can ever match them.
pub fn unknown_zones(set: &RuleSet, configured: &Zones, dir: &Path) -> Vec<RuleError> {
    let named = set
        .dnsbl_zones()
        .map(|z| ("dnsbl", "checks.dnsbl.zones", z, &configured.dnsbl))
        .chain(set.uribl_zones().map(|z| {
            (
                "uribl",
                "checks.uribl.zones or ip_zones",
                z,
                &configured.uribl,
            )
        }));
    let mut errors = set.policies.modes_of_checks_off(&configured.checks_off);
    let unknown = named
        .filter(|(_, _, z, known)| !known.iter().any(|c| c == z.trim_end_matches('.')))
        .map(|(cond, key, z, known)| RuleError {
            file: dir.display().to_string(),
            line: 1,
            column: 1,
            rule: None,
            message: format!(
                "{cond}: zone {z:?} is not in {key} ({}), so no rule can match it",
                if known.is_empty() {
                    "none configured".to_string()
                } else {
                    known.join(", ")
                }
            ),
        })
        .collect::<Vec<_>>();
    errors.extend(unknown);
    errors
}

/// The rules directory: its compiled `RuleSet` in force (swapped whole on
/// SIGHUP and when a file changes), the file watcher, and the reload
/// counts.
pub struct RuleWatcher {
    dir: PathBuf,
    current: ArcSwap<RuleSet>,
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
    watch: Mutex<Option<Watch>>,
    /// Told of every rule set a reload puts in force.
    listeners: Mutex<Vec<Listener>>,
    /// The DNSBL zones the checks query (kept in step by config reloads):
    /// a rule set naming any other is refused, on reload as at start.
    zones: std::sync::RwLock<Zones>,
}

type Listener = Box<dyn Fn(Arc<RuleSet>) + Send + Sync>;

/// The file watcher: the rules directory with its subdirectories, and the
/// directories of list files kept elsewhere.
struct Watch {
    watcher: notify::RecommendedWatcher,
    /// Directories outside the rules directory being watched.
    dirs: BTreeSet<PathBuf>,
    /// List files outside the rules directory: their events count.
    outside: Arc<std::sync::RwLock<BTreeSet<PathBuf>>>,
}

impl RuleWatcher {
    pub fn new(dir: PathBuf, set: RuleSet, zones: Zones) -> Arc<RuleWatcher> {
        Arc::new(RuleWatcher {
            dir,
            current: ArcSwap::from_pointee(set),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            watch: Mutex::new(None),
            listeners: Mutex::new(Vec::new()),
            zones: std::sync::RwLock::new(zones),
        })
    }

    /// Zones the current rules name that `zones` (a new config's) lacks.
    pub fn unknown_zones(&self, zones: &Zones) -> Vec<RuleError> {
        unknown_zones(&self.current(), zones, &self.dir)
    }

    /// A config reload changed the zones.
    pub fn set_zones(&self, zones: Zones) {
        if let Ok(mut z) = self.zones.write() {
            *z = zones;
        }
    }

    fn load_checked(&self) -> Result<RuleSet, RuleErrors> {
        let set = RuleSet::load_dir(&self.dir)?;
        let zones = self.zones.read().map(|z| z.clone()).unwrap_or_default();
        let unknown = unknown_zones(&set, &zones, &self.dir);
        if unknown.is_empty() {
            Ok(set)
        } else {
            Err(RuleErrors(unknown))
        }
    }

    /// Calls `f` with each rule set a reload puts in force.
    pub fn on_reload(&self, f: impl Fn(Arc<RuleSet>) + Send + Sync + 'static) {
        if let Ok(mut l) = self.listeners.lock() {
            l.push(Box::new(f));
        }
    }

    /// The directory the rules are loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The set new sessions use.
    pub fn current(&self) -> Arc<RuleSet> {
        self.current.load_full()
    }

    /// Loads the directory again; swaps only if everything is valid.
    pub fn reload(&self) -> Result<usize, RuleErrors> {
        match self.load_checked() {
            Ok(set) => {
                let n = set.rules().len();
                self.watch_lists(&set);
                let set = Arc::new(set);
                self.current.store(Arc::clone(&set));
                if let Ok(listeners) = self.listeners.lock() {
                    for l in listeners.iter() {
                        l(Arc::clone(&set));
                    }
                }
                self.reloads_ok.fetch_add(1, Ordering::Relaxed);
                RulesReload::Done {
                    rules: n,
                    dir: &self.dir,
                }
                .emit();
                Ok(n)
            }
            Err(e) => {
                self.reloads_failed.fetch_add(1, Ordering::Relaxed);
                RulesReload::Failed { errors: &e }.emit();
                Err(e)
            }
        }
    }

    /// Reloads when a rule file or a list file changes (debounced): the
    /// rules directory and its subdirectories, and list files named from
    /// elsewhere. False when the platform cannot watch (then: SIGHUP).
    pub fn watch(self: &Arc<Self>, debounce: Duration) -> bool {
        use notify::Watcher;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let outside: Arc<std::sync::RwLock<BTreeSet<PathBuf>>> = Arc::default();
        let (dir, lists) = (self.dir.clone(), Arc::clone(&outside));
        let watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            let Ok(ev) = ev else { return };
            if ev.kind.is_access() {
                return;
            }
            let ours = ev.paths.iter().any(|p| {
                p.starts_with(&dir) || lists.read().is_ok_and(|l| l.contains(p.as_path()))
            });
            if ours {
                let _ = tx.send(());
            }
        });
        let mut watcher = match watcher {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the rules directory; reload with SIGHUP");
                return false;
            }
        };
        if let Err(e) = watcher.watch(&self.dir, notify::RecursiveMode::Recursive) {
            tracing::warn!(error = %e, "cannot watch the rules directory; reload with SIGHUP");
            return false;
        }
        if let Ok(mut w) = self.watch.lock() {
            *w = Some(Watch {
                watcher,
                dirs: BTreeSet::new(),
                outside,
            });
        }
        self.watch_lists(&self.current());
        let me = Arc::clone(self);
        tokio::spawn(async move {
            while rx.recv().await.is_some() {
                // Editors write in several steps: wait until it is quiet.
                loop {
                    match tokio::time::timeout(debounce, rx.recv()).await {
                        Ok(Some(())) => continue,
                        Ok(None) => return,
                        Err(_) => break,
                    }
                }
                let _ = me.reload();
            }
        });
        true
    }

    /// Adds the directories of list files outside the rules directory to
    /// the watch (a list file is often replaced by rename, so its
    /// directory is watched rather than the file).
    fn watch_lists(&self, set: &RuleSet) {
        use notify::Watcher;
        let Ok(mut guard) = self.watch.lock() else {
            return;
        };
        let Some(w) = guard.as_mut() else { return };
        for list in set.lists.iter().filter(|l| !l.starts_with(&self.dir)) {
            if let Ok(mut o) = w.outside.write() {
                o.insert(list.clone());
            }
            let Some(parent) = list.parent() else {
                continue;
            };
            if w.dirs.insert(parent.to_path_buf())
                && let Err(e) = w.watcher.watch(parent, notify::RecursiveMode::NonRecursive)
            {
                tracing::warn!(list = %list.display(), error = %e, "cannot watch a list file; reload with SIGHUP");
            }
        }
    }
}
