//! A recipient's policy as a view over what the checks found: the checks
//! run once, as the gate configures them; a policy (`rules::policy`)
//! changes what their findings lead to for its recipients.

use crate::config::{Action, Mode};
use crate::rules::policy::Policy;
use crate::verdict::{self, Finding};
use std::borrow::Cow;

/// The findings as `policy` sees them: its check modes and its actions in
/// place of the gate's. Borrowed when it changes nothing.
pub fn view<'f>(policy: Option<&Policy>, findings: &'f [Finding]) -> Cow<'f, [Finding]> {
    match policy {
        Some(p) if p.changes_findings() => {
            Cow::Owned(findings.iter().filter_map(|f| see(p, f)).collect())
        }
        _ => Cow::Borrowed(findings),
    }
}

/// One finding as `policy` sees it (None: its check is off there).
pub fn see(policy: &Policy, f: &Finding) -> Option<Finding> {
    let mode = policy.mode(f.check);
    let action = policy.action(&f.reason);
    if mode.is_none() && action.is_none() {
        return Some(f.clone());
    }
    // What the finding leads to when enforced.
    let raw = action.unwrap_or(f.would.unwrap_or(f.action));
    let enforced = match mode {
        Some(Mode::Off) => return None,
        Some(m) => m == Mode::Enforce,
        // A shadow rule or a record-mode check stays so.
        None => f.would.is_none(),
    };
    let mut seen = f.clone();
    seen.action = if enforced { raw } else { Action::Accept };
    seen.would = (!enforced && raw != Action::Accept).then_some(raw);
    if matches!(raw, Action::Reject | Action::Tempfail) && seen.reply.code < 400 {
        // A result the gate accepts has no refusal of its own.
        seen.reply = verdict::policy_refused(&f.reason, raw == Action::Tempfail);
    }
    Some(seen)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::policy::Policies;
    use crate::wire::reply::Reply;
    use std::path::{Path, PathBuf};

    fn finding(
        check: &'static str,
        reason: &str,
        action: Action,
        would: Option<Action>,
    ) -> Finding {
        Finding {
            check,
            result: "x".into(),
            action,
            would,
            reason: reason.into(),
            reply: Reply::new(250, 0, 0, "ok"),
        }
    }

    #[test]
    fn the_view_applies_modes_and_actions() {
        let p = Policies::load_texts(
            Path::new("."),
            &[(
                PathBuf::from("policies/a.yaml"),
                "domains: [a.test]\nchecks: {spf: {mode: enforce}, dnsbl: {mode: off}, dkim: {mode: record}}\nactions: {'dmarc:quarantine': reject, 'rule:A': {score: 1}}\n",
            )],
            &[],
            &mut Vec::new(),
        )
        .unwrap();
        let p = &p.all[0];
        let found = vec![
            // record mode at the gate
            finding("spf", "spf:fail", Action::Accept, Some(Action::Reject)),
            finding("dnsbl", "dnsbl:z.test", Action::Reject, None),
            finding("dkim", "dkim:fail", Action::Score(2.0), None),
            // accepted by the gate, refused by the policy
            finding("dmarc", "dmarc:quarantine", Action::Accept, None),
            finding("rule", "rule:A", Action::Reject, None),
            finding("iprev", "iprev:fail", Action::Score(1.0), None),
        ];
        let v = view(Some(p), &found);
        let got: Vec<(&str, Action, Option<Action>)> =
            v.iter().map(|f| (f.check, f.action, f.would)).collect();
        assert_eq!(
            got,
            [
                ("spf", Action::Reject, None),
                ("dkim", Action::Accept, Some(Action::Score(2.0))),
                ("dmarc", Action::Reject, None),
                ("rule", Action::Score(1.0), None),
                ("iprev", Action::Score(1.0), None),
            ]
        );
        // A refusal the gate never had gets a reply of its own.
        assert_eq!(v[2].reply.code, 550);
        assert_eq!(v[2].reply.enhanced_code().as_deref(), Some("5.7.1"));
        assert!(matches!(view(None, &found), Cow::Borrowed(_)));
    }
}
