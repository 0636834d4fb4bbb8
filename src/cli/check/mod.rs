//! `portcullis check`, as `nginx -t` or `postfix check` are used: safe to
//! run beside the running gate (it binds nothing unless asked), every
//! problem of the config and the rules in one run, and what the file does
//! not say: which file was read, each check's mode, the rules in try-out
//! mode, and whether upstream, the nameservers and the state store answer.

mod probe;

use crate::config::{Config, installed_path};
use crate::rules::{MessageFacts, OwnedInput, RuleSet, Stage};
use std::fmt::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use probe::PROBE_DEADLINE;

pub struct Options<'a> {
    /// `--config` (or `PORTCULLIS_CONFIG`); None: the installed config
    /// when there is one, else the embedded default.
    pub config: Option<&'a Path>,
    /// Also bind the listen addresses (an address held by a process other
    /// than Portcullis is an error).
    pub bind: bool,
    /// Ask upstream, the nameservers and the state store.
    pub probe: bool,
}

/// What `check` found: the report for standard output, and every problem
/// (one a line) for standard error. Any problem: exit status 1.
pub struct Outcome {
    pub report: String,
    pub errors: Vec<String>,
}

pub fn check(opts: &Options) -> Outcome {
    let path: Option<PathBuf> = opts.config.map(Path::to_path_buf).or_else(installed_path);
    let mut o = String::new();
    match &path {
        Some(p) => {
            let _ = writeln!(o, "config: {}", p.display());
        }
        None => {
            let _ = writeln!(
                o,
                "config: the embedded default (no --config, and no {})",
                crate::config::INSTALLED_CONFIG
            );
        }
    }
    let checked = Config::load_checked(path.as_deref());
    let mut errors: Vec<String> = checked.errors.iter().map(ToString::to_string).collect();
    let Some(c) = checked.config else {
        return Outcome { report: o, errors };
    };
    let rules = match crate::rules::load(&c) {
        Ok(r) => Some(r),
        Err(e) => {
            errors.extend(e.0.iter().map(ToString::to_string));
            None
        }
    };
    errors.extend(crate::server::preflight(&c));
    if opts.bind {
        errors.extend(crate::server::bind_test(&c));
    }
    let mut warnings = c.warnings();
    warnings.extend(crate::server::descriptor_warning(&c));
    if !errors.is_empty() {
        for w in &warnings {
            let _ = writeln!(o, "warning: {w}");
        }
        return Outcome { report: o, errors };
    }
    if c.listen.is_empty() {
        let _ = writeln!(
            o,
            "config ok: milter only, {} milter listener(s)",
            c.milter.listen.len()
        );
    } else {
        let _ = writeln!(
            o,
            "config ok: {} listener(s), upstream {}, {} milter listener(s)",
            c.listen.len(),
            c.upstream.addr,
            c.milter.listen.len()
        );
    }
    let _ = writeln!(o, "checks:");
    for (name, mode) in c.checks.modes() {
        let _ = writeln!(o, "  {name:<22} {:<8} {}", mode.as_str(), mode.meaning());
    }
    if let Some(rules) = &rules {
        let set = rules.current();
        let _ = writeln!(o, "rules directory: {}", rules.dir().display());
        if set.rules().is_empty() {
            warnings.push(format!(
                "no rules loaded from {} (set rules_dir)",
                rules.dir().display()
            ));
        }
        for z in crate::rules::idle_zones(&c, &set) {
            warnings.push(format!(
                "checks.dnsbl.zones: {z} has neither action nor score, and no rule names it: a listing there changes nothing (set action: reject, or a score)"
            ));
        }
        let _ = write!(o, "rules ok: {}", set.summary());
        if !set.policies.is_empty() {
            let covered: usize = set.policies.all.len();
            let _ = writeln!(
                o,
                "policies ok: {covered} in {}",
                rules.dir().join(crate::rules::policy::DIR).display()
            );
        }
        sample_evaluation(&mut o, &mut warnings, &set, c.checks.message_rules.budget.0);
    }
    if opts.probe {
        match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => {
                let found = rt.block_on(probe::probe(&c));
                for a in found.answers {
                    let _ = writeln!(o, "{a}");
                }
                warnings.extend(found.warnings);
                errors.extend(found.errors);
            }
            Err(e) => warnings.push(format!("the probes could not start: {e}")),
        }
    }
    for w in &warnings {
        let _ = writeln!(o, "warning: {w}");
    }
    Outcome { report: o, errors }
}

/// Times the message rules on a sample 100 KB message, and warns when the
/// rule set is too slow for the gate's budget per message.
fn sample_evaluation(o: &mut String, warnings: &mut Vec<String>, set: &RuleSet, budget: Duration) {
    if !set.has_stage(Stage::Data) {
        return;
    }
    let mut sample =
        String::from("From: a@example.com\r\nTo: b@example.net\r\nSubject: sample\r\n\r\n");
    let mut i = 0;
    while sample.len() < 100 * 1024 {
        let _ = write!(
            sample,
            "Line {i} of an ordinary message, with words, numbers 12345 and a link http://example.com/{i}\r\n"
        );
        i += 1;
    }
    let start = std::time::Instant::now();
    let parsed = MessageFacts::parse(sample.as_bytes());
    let facts = OwnedInput::default();
    let _ = set.evaluate(Stage::Data, &facts.view(Some(&parsed)));
    let took = start.elapsed();
    let _ = writeln!(o, "rules: a 100 KB sample message takes {took:.1?}");
    if took * 10 > budget || took > Duration::from_millis(250) {
        warnings.push(format!(
            "the message rules are slow ({took:.1?} per 100 KB; budget {budget:?} per message): \
             larger messages may be tempfailed (checks.message_rules)"
        ));
    }
}
