//! `portcullis check`: loads the config and the rules as `run` would,
//! checks what start-up would refuse (`server::preflight`), and reports
//! what it found: listeners, upstream, warnings, the rules and how long
//! the message rules take on a sample.

use crate::config::Config;
use crate::rules::{MessageFacts, OwnedInput, RuleSet, Stage};
use std::fmt::Write;
use std::path::Path;
use std::time::Duration;

/// The report for standard output, or every problem found (one a line)
/// for standard error.
pub fn check(config: Option<&Path>) -> Result<String, Vec<String>> {
    let c = Config::load(config).map_err(|e| vec![e.to_string()])?;
    let rules = crate::rules::load(&c).map_err(|e| vec![e.to_string()])?;
    let problems = crate::server::preflight(&c);
    if !problems.is_empty() {
        return Err(problems);
    }
    let mut o = String::new();
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
    if let Some(w) = crate::server::descriptor_warning(&c) {
        let _ = writeln!(o, "warning: {w}");
    }
    let set = rules.current();
    let _ = writeln!(o, "rules directory: {}", rules.dir().display());
    if set.rules().is_empty() {
        let _ = writeln!(
            o,
            "warning: no rules loaded from {} (set rules_dir)",
            rules.dir().display()
        );
    }
    let _ = write!(o, "rules ok: {}", set.summary());
    sample_evaluation(&mut o, &set, c.checks.message_rules.budget.0);
    Ok(o)
}

/// Times the message rules on a sample 100 KB message, and warns when the
/// rule set is too slow for the gate's budget per message.
fn sample_evaluation(o: &mut String, set: &RuleSet, budget: Duration) {
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
        let _ = writeln!(
            o,
            "warning: the message rules are slow ({took:.1?} per 100 KB; budget {budget:?} per message): \
             larger messages may be tempfailed (checks.message_rules)"
        );
    }
}
