//! The administrators' rules as a check. They run after every other check
//! of their stage and see its results: connect, HELO and MAIL rules at
//! MAIL, RCPT rules per recipient, DATA rules on the rule pool.

use super::pool::RulePool;
use super::{Check, Facts, Found, Hook, Message, done};
use crate::config::{Action, MessageRules, Overrun};
use crate::rules::{Hit, Input, OwnedInput, RuleAction, Stage};
use crate::verdict::{self, Finding};
use std::sync::Arc;

pub struct RuleCheck {
    /// Where the rules on the whole message run.
    pool: RulePool,
}

impl RuleCheck {
    pub fn new(cfg: &MessageRules) -> RuleCheck {
        RuleCheck {
            pool: RulePool::new(cfg),
        }
    }
}

impl Facts {
    /// What the rules see of these facts at `stage`.
    pub fn rule_input(&self, stage: Stage) -> Input<'_> {
        let (c, t, log) = (&self.client, &self.txn, &self.txn.found.log);
        let rcpts = match stage {
            Stage::Rcpt => vec![t.rcpt.as_str()],
            Stage::Data => t.rcpts.iter().map(String::as_str).collect(),
            _ => Vec::new(),
        };
        Input {
            ip: Some(c.ip),
            reverse: c.reverse(),
            helo: Some(c.helo.as_str()),
            mail_from: Some(t.sender.as_str()),
            rcpts,
            rcpt_count: t.rcpts.len(),
            tls: c.tls,
            size: t.size,
            message: None,
            spf: &log.spf,
            dkim: &log.dkim,
            dmarc: &log.dmarc,
            iprev: &log.iprev,
            greylist: &log.greylist,
            antivirus: &log.antivirus,
            dnsbl: log.dnsbl_zones.iter().map(String::as_str).collect(),
            uribl: log.uribl_zones.iter().map(String::as_str).collect(),
            scanner: &log.scanner,
        }
    }
}

/// The rules of connect, HELO and MAIL over `f`, as at MAIL.
pub(super) fn mail_stage(f: &mut Facts) {
    let mut hits = Vec::new();
    for stage in [Stage::Connect, Stage::Helo, Stage::Mail] {
        hits.extend(f.rules.evaluate(stage, &f.rule_input(stage)));
    }
    apply(&hits, &mut f.txn.found);
}

/// Takes out of `found` what the rules added to it (for a policy that
/// applies other rules to the same findings).
pub(super) fn unapply(found: &mut Found) {
    found.findings.retain(|f| f.check != "rule");
    found.log.rules.clear();
    found.add_headers.clear();
    found.skipped = false;
}

impl Check for RuleCheck {
    fn mail<'a>(&'a self, f: &'a mut Facts) -> Hook<'a> {
        mail_stage(f);
        done()
    }

    fn rcpt<'a>(&'a self, f: &'a mut Facts) -> Hook<'a> {
        if f.rules.has_stage(Stage::Rcpt) {
            let hits = f.rules.evaluate(Stage::Rcpt, &f.rule_input(Stage::Rcpt));
            apply(&hits, &mut f.txn.found);
        }
        done()
    }

    fn data<'a, 'm: 'a>(&'m self, f: &'a mut Facts, m: &'a mut Message<'m>) -> Hook<'a> {
        Box::pin(async move {
            if !f.rules.has_stage(Stage::Data) {
                return;
            }
            let input = OwnedInput::new(&f.rule_input(Stage::Data));
            let rules = Arc::clone(&f.rules);
            let links = m.links.clone();
            match self
                .pool
                .evaluate(rules, input, Arc::clone(m.shared), links)
                .await
            {
                Ok(hits) => apply(&hits, &mut f.txn.found),
                Err(o) => {
                    let found = &mut f.txn.found;
                    found.log.hits.push("rules:overrun".into());
                    if o.then == Overrun::Tempfail {
                        found.findings.push(Finding {
                            check: "rules",
                            result: "overrun".into(),
                            action: Action::Tempfail,
                            would: None,
                            reason: "rules:overrun".into(),
                            reply: verdict::rules_overrun(),
                        });
                    }
                }
            }
        })
    }
}

/// Turns rule hits into findings, log entries and headers. An enforced
/// `accept` (allow-list) rule ends the checks of the transaction.
fn apply(hits: &[Hit], found: &mut Found) {
    for h in hits {
        found.log.rules.push(h.logged.clone());
        let (action, reply) = match &h.action {
            RuleAction::Reject(r) => (Action::Reject, r.clone()),
            RuleAction::Tempfail(r) => (Action::Tempfail, r.clone()),
            RuleAction::Score(s) => (
                Action::Score(*s),
                h.score_reply
                    .get_or_init(|| verdict::spam_score(*s))
                    .clone(),
            ),
            // A shadow allow-list or header rule only logs its match.
            RuleAction::Accept => {
                found.skipped |= !h.shadow;
                continue;
            }
            RuleAction::AddHeader(line) => {
                if !h.shadow {
                    found.add_headers.push(line.clone());
                }
                continue;
            }
            RuleAction::Log => continue,
        };
        // A shadow rule acts on nothing; what it would have done is kept.
        found.findings.push(Finding {
            check: "rule",
            result: "match".into(),
            action: if h.shadow { Action::Accept } else { action },
            would: h.shadow.then_some(action),
            reason: h.reason.clone(),
            reply,
        });
    }
}
