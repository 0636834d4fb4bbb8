//! The transaction screen: runs the checks for one client connection,
//! stage by stage, as facts arrive. It does no socket I/O (the lookups it
//! starts are the checks' own), so any front door can drive it: the proxy
//! session, `portcullis explain`, and a milter conversation (connect,
//! helo, mail, rcpt, then the headers and body chunks assembled into the
//! message for `data`).
//!
//! Calls, in dialogue order: `new` (connect), `helo`, `tls`, `greeting`
//! (only with `reject_at: connect`), then per transaction `mail`, `rcpt`
//! with `rcpt_accepted` for each recipient the MTA took, and `data`.

use super::auth_results::{self, forged_results};
use super::dnsbl::ZoneOutcome;
use super::policy::view;
use super::pool::{self, SharedMessage};
use super::reputation::Known;
use super::{
    CheckLog, Client, Engine, Facts, Found, Message, Pending, TxnFacts, client_name, iprev,
};
use crate::config::Action;
use crate::config::{Mode, Thresholds};
use crate::rules::RuleSet;
use crate::rules::policy::{self, Policy};
use crate::verdict::{self, Decision, Finding, Outcome};
use crate::wire::identity::DnsName;
use crate::wire::reply::Reply;
use mail_auth::AuthenticatedMessage;
use std::net::IpAddr;
use std::ops::Range;
use std::sync::Arc;

pub struct Screen {
    engine: Arc<Engine>,
    facts: Facts,
    pending: Pending,
    /// The lookups of `start` have been started.
    started: bool,
    /// Look up the client's name for the MTA even when iprev is off.
    want_names: bool,
    /// What earlier connections showed (reputation).
    known: Known,
    /// The connection's own findings, found once and copied into each
    /// transaction.
    connection: Option<Box<Found>>,
    /// The rules the session started with (a policy may use fewer).
    gate_rules: Arc<RuleSet>,
    /// With policies or lists per recipient: what the MAIL stage found,
    /// judged again under each recipient's policy.
    mail_found: Option<Box<Found>>,
    /// The policy (by address; 0: the gate's) and allow-listing the
    /// transaction's recipients share.
    txn_key: Option<(usize, bool)>,
}

/// What the allow and block lists say of one recipient's sender and client.
enum Listed {
    None,
    /// `entry(origin)`.
    Allow(String),
    Block(String),
}

/// What the checks at MAIL came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Screened {
    /// A limit or rate limit: refuse this command now (no transaction).
    Refused { reply: Reply, reason: String },
    /// The verdict on everything before RCPT.
    Verdict(Outcome),
}

/// The end-of-DATA result: decision, our header block, and forged
/// Authentication-Results fields to drop from the message.
#[derive(Debug, Clone, PartialEq)]
pub struct DataChecks {
    pub outcome: Outcome,
    pub headers: String,
    pub remove: Vec<Range<usize>>,
}

impl Screen {
    /// A client connected: its allow-listing, and the lookups that start
    /// now. `want_names`: the MTA is to be told the client's DNS name
    /// (XCLIENT), so look it up even when iprev is off.
    pub fn new(engine: Arc<Engine>, rules: Arc<RuleSet>, ip: IpAddr, want_names: bool) -> Screen {
        let ip = ip.to_canonical();
        let allowed = engine.cfg.allow.clients.iter().any(|n| n.contains(&ip));
        let client = Client {
            ip,
            tls: false,
            helo: String::new(),
            allowed,
            dnsbl_known_good: false,
            dnsbl: Vec::new(),
            dns_allowed: false,
            iprev: None,
            names: None,
        };
        Screen {
            facts: Facts {
                client,
                txn: super::LazyTxn::default(),
                rules: Arc::clone(&rules),
            },
            gate_rules: rules,
            mail_found: None,
            txn_key: None,
            engine,
            pending: Pending::default(),
            started: false,
            want_names,
            known: Known::default(),
            connection: None,
        }
    }

    /// Starts the lookups of the checks (once): from `admit`, or at the
    /// first stage that needs them when a front door does not call it.
    fn start(&mut self) {
        if std::mem::replace(&mut self.started, true) {
            return;
        }
        let client = &self.facts.client;
        if !client.allowed {
            for c in &self.engine.checks {
                c.start(client, &mut self.pending);
            }
        }
        if self.want_names {
            iprev::start_lookup(&self.engine.dns, client, &mut self.pending);
        }
    }

    /// Whether the greeting test (pregreet) is still to be made: not when
    /// the client passed it lately.
    pub fn greeting_test_wanted(&self) -> bool {
        !self.known.greeting_passed && !self.facts.client.allowed
    }

    /// The client waited for the greeting.
    pub async fn greeting_test_passed(&self) {
        if let Some(r) = &self.engine.reputation {
            r.greeting_passed(self.facts.client.ip).await;
        }
    }

    /// The client was refused at connect (pregreet, DNSBL): remembered.
    pub async fn refused_at_connect(&self, why: &str) {
        if let Some(r) = &self.engine.reputation {
            r.failed(self.facts.client.ip, why).await;
        }
    }

    /// The MTA vouches for this client (it authenticated): no checks, as
    /// for an allow-listed one.
    pub fn allow_client(&mut self) {
        self.facts.client.allowed = true;
    }

    pub fn helo(&mut self, name: &str) {
        self.facts.client.helo = name.to_string();
    }

    pub fn tls(&mut self, on: bool) {
        self.facts.client.tls = on;
    }

    pub fn facts(&self) -> &Facts {
        &self.facts
    }

    pub fn allowed(&self) -> bool {
        self.facts.client.allowed
    }

    /// The verified reverse name, once the lookup has finished.
    pub fn reverse(&self) -> Option<&str> {
        self.facts.client.reverse()
    }

    /// The check results of the current transaction for its log line,
    /// with every finding that had an effect.
    pub fn log(&self) -> CheckLog {
        let found = &self.facts.txn.found;
        let mut log = found.log.clone();
        let findings = view(self.policy(), &found.findings);
        log.hits.extend(effects(&findings));
        let t = self.thresholds();
        for (i, f) in findings.iter().enumerate() {
            let Some(action) = f.would.filter(|a| *a != Action::Accept) else {
                continue;
            };
            let mut enforced = findings.to_vec();
            enforced[i].action = action;
            // Read back by `stats` with `Verdict::parse`.
            let word = match verdict::decide(&enforced, &t).decision {
                Decision::Reject(_) => crate::telemetry::Verdict::Reject,
                Decision::Tempfail(_) => crate::telemetry::Verdict::Tempfail,
                Decision::Tag => crate::telemetry::Verdict::Tag,
                Decision::Accept => crate::telemetry::Verdict::Accept,
            }
            .as_str();
            log.would.push(format!("{}={word}", f.reason));
        }
        log
    }

    /// The client's names for upstream (NAME, REVERSE_NAME), waiting for
    /// the lookup started at connect (bounded by the DNS timeout).
    pub async fn client_names(&mut self) -> (DnsName, DnsName) {
        self.start();
        self.settle_names().await;
        self.facts
            .client
            .names
            .as_deref()
            .cloned()
            .unwrap_or_default()
    }

    /// Whether to serve this client at all (connection rate limits), before
    /// the greeting. Some: refuse it with this reply and reason.
    pub async fn admit(&mut self) -> Option<(Reply, String)> {
        if self.facts.client.allowed {
            self.start();
            return None;
        }
        let engine = Arc::clone(&self.engine);
        if let Some(r) = &engine.reputation {
            self.known = r.known(self.facts.client.ip).await;
            if let Some(why) = &self.known.failed {
                let reply = Reply::new(421, 7, 0, "Refused lately").with_text(format!(
                    "Service unavailable; client [{}] was refused lately ({why}), try again later",
                    self.facts.client.ip
                ));
                return Some((reply, format!("reputation:{why}")));
            }
            self.facts.client.dnsbl_known_good = self.known.dnsbl_passed;
        }
        self.start();
        for c in engine.checks.iter().filter(|c| !c.always()) {
            c.admit(&mut self.facts).await;
            if self.facts.txn.found.refuse_now.is_some()
                && let Some(refused) = self.facts.txn.found.refuse_now.take()
            {
                return Some(refused);
            }
        }
        None
    }

    /// With `reject_at: connect`, whether to refuse the client before the
    /// greeting (the DNSBL listings of its address, iprev): 554 for a
    /// rejection (remembered by reputation), 421 for a tempfail, with the
    /// reason for the log. Every front door asks this after `admit`.
    pub async fn refuse_at_connect(&mut self) -> Option<(Reply, String)> {
        if self.engine.cfg.reject_at != crate::config::RejectAt::Connect {
            return None;
        }
        let outcome = self.greeting().await;
        let reply = match outcome.decision {
            Decision::Reject(r) => Reply { code: 554, ..r },
            Decision::Tempfail(r) => Reply { code: 421, ..r },
            _ => return None,
        };
        if reply.code == 554 {
            self.refused_at_connect(&outcome.reason).await;
        }
        Some((reply, outcome.reason))
    }

    /// For `reject_at: connect`: the verdict on the connection before the
    /// greeting (the DNSBL listings of its address, iprev).
    pub async fn greeting(&mut self) -> Outcome {
        self.facts.txn.set(TxnFacts::default());
        if !self.facts.client.allowed {
            self.facts.txn.found = self.connection().await;
        }
        verdict::decide(&self.facts.txn.found.findings, self.engine.thresholds())
    }

    /// MAIL: the limits, then (unless the client or sender is allow-listed)
    /// the connection's findings and every check of the MAIL stage.
    pub async fn mail(&mut self, sender: &str, declared_size: Option<u64>) -> Screened {
        self.facts.txn.set(TxnFacts {
            sender: sender.to_string(),
            declared_size,
            ..TxnFacts::default()
        });
        self.facts.rules = Arc::clone(&self.gate_rules);
        self.mail_found = None;
        self.txn_key = None;
        let engine = Arc::clone(&self.engine);
        for c in engine.checks.iter().filter(|c| c.always()) {
            c.mail(&mut self.facts).await;
            if let Some((reply, reason)) = self.facts.txn.found.refuse_now.take() {
                return Screened::Refused { reply, reason };
            }
        }
        if self.facts.client.allowed || self.allowed_sender(sender) {
            self.facts.txn.found.skipped = true;
            return Screened::Verdict(verdict::decide(&[], engine.thresholds()));
        }
        self.facts.txn.found = self.connection().await;
        for c in engine.checks.iter().filter(|c| !c.always()) {
            c.mail(&mut self.facts).await;
            if let Some((reply, reason)) = self.facts.txn.found.refuse_now.take() {
                return Screened::Refused { reply, reason };
            }
        }
        let outcome = self.decide();
        if self.per_recipient() {
            // Each recipient's policy and lists judge this at RCPT.
            self.mail_found = Some(Box::new(self.facts.txn.found.clone()));
            return Screened::Verdict(Outcome {
                decision: Decision::Accept,
                reason: String::new(),
                score: outcome.score,
            });
        }
        Screened::Verdict(outcome)
    }

    /// Whether recipients of one transaction can be judged differently
    /// (policies, or allow and block entries in the state store): then
    /// the verdict on the MAIL stage is given per recipient, at RCPT.
    fn per_recipient(&self) -> bool {
        !self.gate_rules.policies.is_empty() || self.engine.lists_store.is_some()
    }

    /// The policy and lists for one recipient: a block-listed sender or
    /// client is refused (550 5.7.1); a recipient judged otherwise than
    /// the transaction's first is deferred to another transaction (452
    /// 4.5.3); the first chooses the transaction's policy, under which the
    /// MAIL stage's verdict is given to each recipient.
    async fn judge_recipient(&mut self, rcpt: &str) -> Option<(Reply, String)> {
        let found = self.policy_of(rcpt);
        let policy = found.as_ref().map(|(p, _)| Arc::clone(p));
        match self.listed(policy.as_deref(), rcpt).await {
            Listed::Block(entry) => return Some(self.blocked(&entry)),
            listed => {
                let allowed = match &listed {
                    Listed::Allow(entry) => Some(entry.clone()),
                    _ => None,
                };
                let key = (
                    policy.as_ref().map_or(0, |p| Arc::as_ptr(p) as usize),
                    allowed.is_some(),
                );
                if self.txn_key.is_some_and(|k| k != key) && !self.facts.txn.rcpts.is_empty() {
                    return Some((verdict::policy_split(), "policy:split".into()));
                }
                if self.txn_key != Some(key) {
                    self.adopt(policy, allowed);
                    self.txn_key = Some(key);
                }
            }
        }
        let o = self.decide();
        match o.decision {
            Decision::Reject(r) | Decision::Tempfail(r) => Some((r, o.reason)),
            _ => None,
        }
    }

    /// The policy for a recipient (None: the gate's), and why.
    pub fn policy_of(&self, rcpt: &str) -> Option<(Arc<Policy>, policy::Why)> {
        self.gate_rules
            .policies
            .find(rcpt)
            .map(|(p, why)| (Arc::clone(p), why))
    }

    /// The transaction takes `policy`: the MAIL stage's findings again,
    /// with the policy's rules when it names its own, and allow-listed.
    fn adopt(&mut self, policy: Option<Arc<Policy>>, allowed: Option<String>) {
        let Some(base) = &self.mail_found else { return };
        let rules = policy
            .as_ref()
            .and_then(|p| p.rules.clone())
            .unwrap_or_else(|| Arc::clone(&self.gate_rules));
        let rcpt = std::mem::take(&mut self.facts.txn.rcpt);
        let list = std::mem::take(&mut self.facts.txn.found.log.list);
        self.facts.txn.found = (**base).clone();
        if !Arc::ptr_eq(&rules, &self.gate_rules) {
            super::rules::unapply(&mut self.facts.txn.found);
            self.facts.rules = rules;
            super::rules::mail_stage(&mut self.facts);
        } else {
            self.facts.rules = rules;
        }
        let found = &mut self.facts.txn.found;
        found.log.policy = policy.as_ref().map(|p| p.name.clone()).unwrap_or_default();
        found.log.list = list;
        if let Some(entry) = allowed {
            found.skipped = true;
            found.log.list = format!("allow:{entry}");
        }
        self.facts.txn.rcpt = rcpt;
        self.facts.txn.policy = policy;
    }

    /// The entry of the gate's block list (`checks.block`) this
    /// transaction's sender or client matches.
    fn gate_block(&self) -> Option<String> {
        if self.engine.block.is_empty() {
            return None;
        }
        let (sender, ip) = (self.facts.txn.sender.as_str(), self.facts.client.ip);
        self.engine.block.matching(sender, ip)
    }

    /// A recipient refused by a block list's `entry`: the reply and reason,
    /// and the entry in the log line.
    fn blocked(&mut self, entry: &str) -> (Reply, String) {
        self.facts.txn.found.log.list = format!("block:{entry}");
        (verdict::blocked(), "list:block".into())
    }

    /// What the block and allow lists (the gate's, the policy's, the
    /// state store's) say of this transaction's sender and client.
    async fn listed(&self, policy: Option<&Policy>, rcpt: &str) -> Listed {
        let (sender, ip) = (self.facts.txn.sender.as_str(), self.facts.client.ip);
        if let Some(e) = self.gate_block() {
            return Listed::Block(e);
        }
        if let Some(p) = policy {
            if let Some(e) = p.block.matching(sender, ip) {
                return Listed::Block(e);
            }
            if let Some(e) = p.allow.matching(sender, ip) {
                return Listed::Allow(e);
            }
        }
        let Some(store) = &self.engine.lists_store else {
            return Listed::None;
        };
        match lists_in_store(store, sender, ip, rcpt).await {
            Ok(Some((key, word))) if word == "block" => Listed::Block(format!("{key}(store)")),
            Ok(Some((key, _))) => Listed::Allow(format!("{key}(store)")),
            Ok(None) => Listed::None,
            Err(e) => {
                // The panel's entries are unreadable: judged without them.
                tracing::warn!(error = %e, "cannot read allow and block entries from the state store");
                Listed::None
            }
        }
    }

    /// RCPT: the limits and the checks of one recipient. Some: refuse this
    /// recipient alone; scores and headers join the transaction.
    pub async fn rcpt(&mut self, rcpt: &str) -> Option<(Reply, String)> {
        self.facts.txn.rcpt = rcpt.to_string();
        let engine = Arc::clone(&self.engine);
        for c in engine.checks.iter().filter(|c| c.always()) {
            c.rcpt(&mut self.facts).await;
            if let Some(refused) = self.facts.txn.found.refuse_now.take() {
                return Some(refused);
            }
        }
        note_domain(&mut self.facts.txn.found.log.rcpt_domains, rcpt);
        if self.mail_found.is_some() {
            if let Some(refused) = self.judge_recipient(rcpt).await {
                return Some(refused);
            }
        } else if !self.facts.client.allowed
            && let Some(entry) = self.gate_block()
        {
            return Some(self.blocked(&entry));
        }
        if self.facts.txn.found.skipped {
            return None;
        }
        let before = self.facts.txn.found.findings.len();
        for c in engine.checks.iter().filter(|c| !c.always()) {
            c.rcpt(&mut self.facts).await;
            if let Some(refused) = self.facts.txn.found.refuse_now.take() {
                self.facts.txn.found.findings.truncate(before);
                return Some(refused);
            }
        }
        let policy = self.facts.txn.policy.clone();
        let t = self.thresholds();
        let found = &mut self.facts.txn.found;
        let mut new: Vec<Finding> = found.findings.split_off(before);
        if found.skipped {
            // An allow-list rule: nothing of this recipient counts.
            return None;
        }
        // Refusing as the policy sees it.
        let seen = |f: &Finding| match &policy {
            Some(p) => super::policy::see(p, f),
            None => Some(f.clone()),
        };
        let refusing = |f: &Finding| matches!(f.action, Action::Reject | Action::Tempfail);
        let refusal: Vec<Finding> = new
            .iter()
            .filter_map(seen)
            .filter(|f| refusing(f))
            .collect();
        new.retain(|f| !seen(f).is_some_and(|f| refusing(&f)));
        found.findings.extend(new);
        if refusal.is_empty() {
            return None;
        }
        match verdict::decide(&refusal, &t) {
            Outcome {
                decision: Decision::Reject(r) | Decision::Tempfail(r),
                reason,
                ..
            } => Some((r, reason)),
            _ => None,
        }
    }

    /// The MTA accepted this recipient.
    pub fn rcpt_accepted(&mut self, rcpt: &str) {
        self.facts.txn.rcpts.push(rcpt.to_string());
    }

    /// The recipients accepted so far in this transaction.
    pub fn rcpts(&self) -> &[String] {
        &self.facts.txn.rcpts
    }

    /// The end of DATA: DKIM, DMARC, ARC, the message rules, the final
    /// verdict over all findings, our header block, forged headers to drop.
    /// Parsing the message, hashing its body and verifying signatures is
    /// CPU work, so for a large message it runs on the check threads
    /// (`pool::check_threads`), never on the threads that serve sessions.
    pub async fn data(&mut self, message: &SharedMessage) -> DataChecks {
        self.facts.txn.size = Some((**message).as_ref().len() as u64);
        // A small message costs microseconds: the hop to another thread
        // would cost more than it saves (a quarter of the throughput in
        // the load benchmark), and so would copying what it needs.
        let threads =
            pool::check_threads().filter(|_| (**message).as_ref().len() > pool::INLINE_CHECK_BYTES);
        let Some(threads) = threads else {
            return check_message(&self.engine, &mut self.facts, message).await;
        };
        let engine = Arc::clone(&self.engine);
        let mut facts = Facts {
            client: self.facts.client.clone(),
            txn: std::mem::take(&mut self.facts.txn),
            rules: Arc::clone(&self.facts.rules),
        };
        let message = Arc::clone(message);
        let done = threads
            .spawn(async move {
                let data = check_message(&engine, &mut facts, &message).await;
                (facts.txn, data)
            })
            .await;
        match done {
            Ok((txn, data)) => {
                self.facts.txn = txn;
                data
            }
            Err(e) => {
                // A bug, not the sender's fault: the sender retries.
                tracing::error!(error = %e, "end-of-message checks failed");
                DataChecks {
                    outcome: Outcome {
                        decision: Decision::Tempfail(verdict::checks_failed()),
                        score: 0.0,
                        reason: "checks:failed".into(),
                    },
                    headers: String::new(),
                    remove: Vec::new(),
                }
            }
        }
    }

    fn decide(&self) -> Outcome {
        decide(&self.facts.txn.found, &self.engine, self.policy())
    }

    /// The transaction's policy (None: the gate's).
    fn policy(&self) -> Option<&Policy> {
        self.facts.txn.policy.as_deref()
    }

    fn thresholds(&self) -> Thresholds {
        thresholds(&self.engine, self.policy())
    }

    fn allowed_sender(&self, sender: &str) -> bool {
        let Some((_, domain)) = sender.rsplit_once('@') else {
            return false;
        };
        let d = domain.to_ascii_lowercase();
        self.engine.cfg.allow.senders.iter().any(|a| {
            let a = a.trim_end_matches('.').to_ascii_lowercase();
            d == a || d.ends_with(&format!(".{a}"))
        })
    }

    /// The connection's findings: waits for the lookups started at
    /// connect, runs each check's connect stage once.
    async fn connection(&mut self) -> Found {
        if let Some(found) = &self.connection {
            return (**found).clone();
        }
        self.start();
        let looked_up = self.pending.dnsbl.is_some();
        self.settle_dnsbl().await;
        self.settle_names().await;
        let txn = std::mem::take(&mut self.facts.txn);
        let engine = Arc::clone(&self.engine);
        for c in engine.checks.iter().filter(|c| !c.always()) {
            c.connect(&mut self.facts).await;
        }
        let mut connected = std::mem::replace(&mut self.facts.txn, txn);
        let found = std::mem::take(&mut connected.found);
        let refused = found
            .findings
            .iter()
            .any(|f| f.check == "dnsbl" && matches!(f.action, Action::Reject | Action::Tempfail));
        if let Some(r) = engine.reputation.as_ref().filter(|_| looked_up && !refused) {
            r.dnsbl_passed(self.facts.client.ip).await;
        }
        self.connection = Some(Box::new(found.clone()));
        found
    }

    /// Waits for the client's DNSBL answers (cancel-safe: the lookup goes
    /// on if this wait is dropped), and judges them against the allow
    /// threshold.
    async fn settle_dnsbl(&mut self) {
        let Some(t) = self.pending.dnsbl.as_mut() else {
            return;
        };
        let outcomes = t.await.unwrap_or_default();
        self.pending.dnsbl = None;
        let cfg = &self.engine.cfg.dnsbl;
        let score: f64 = outcomes
            .iter()
            .map(|o| match o {
                ZoneOutcome::Listed(hit) => hit.score,
                _ => 0.0,
            })
            .sum();
        self.facts.client.dns_allowed = cfg.mode == Mode::Enforce
            && cfg.allow_threshold.is_some_and(|t| score <= t)
            && outcomes.iter().any(|o| matches!(o, ZoneOutcome::Listed(_)));
        self.facts.client.dnsbl = outcomes;
    }

    /// Whether a DNS allow list vouches for the client (its zones' scores
    /// sum to `checks.dnsbl.allow_threshold` or less), once the lookups
    /// started at connect have answered. Never resolves when no allow
    /// threshold is set, so that a greeting test racing it runs its course.
    pub async fn dns_allowed(&mut self) {
        if self.engine.cfg.dnsbl.allow_threshold.is_none() || self.facts.client.allowed {
            return std::future::pending().await;
        }
        self.start();
        self.settle_dnsbl().await;
        if !self.facts.client.dns_allowed {
            std::future::pending::<()>().await;
        }
    }

    async fn settle_names(&mut self) {
        let Some(t) = self.pending.iprev.take() else {
            return;
        };
        let Some(r) = t.await else { return };
        self.facts.client.names = Some(Box::new(client_name::from_iprev(&r)));
        if self.pending.iprev_is_check {
            self.facts.client.iprev = Some(Box::new(r));
        }
    }
}

/// The verdict over what was found, as the policy sees it: nothing counts
/// once the checks were skipped (an allow-list).
fn decide(found: &Found, engine: &Engine, policy: Option<&Policy>) -> Outcome {
    let findings: &[Finding] = if found.skipped { &[] } else { &found.findings };
    verdict::decide(&view(policy, findings), &thresholds(engine, policy))
}

/// A Message-ID value as the log has it: without angle brackets or
/// folding, at most 200 characters.
fn message_id(value: &[u8]) -> String {
    let value = String::from_utf8_lossy(value);
    let id = value.trim().trim_start_matches('<').trim_end_matches('>');
    // Sized once: collecting char by char grew it two or three times.
    let mut out = String::with_capacity(id.len().min(200 * 4));
    out.extend(
        id.chars()
            .filter(|c| !c.is_control() && !c.is_whitespace())
            .take(200),
    );
    out
}

/// Adds a recipient's domain to the log's list, once.
fn note_domain(domains: &mut Vec<String>, rcpt: &str) {
    let Some((_, d)) = rcpt.rsplit_once('@') else {
        return;
    };
    if !domains.iter().any(|x| x.eq_ignore_ascii_case(d)) && domains.len() < 20 {
        domains.push(d.to_ascii_lowercase());
    }
}

/// Allow and block entries a panel wrote in the state store: the key
/// `list:SCOPE:ENTRY` holds `allow` or `block`. SCOPE is the recipient's
/// address, its domain, or `*` (every recipient); ENTRY the sender's
/// address, its domain or a parent domain, or the client's address. The
/// narrowest scope wins; within one, a block before an allow.
async fn lists_in_store(
    store: &crate::state::Store,
    sender: &str,
    ip: std::net::IpAddr,
    rcpt: &str,
) -> Result<Option<(String, String)>, crate::state::StoreError> {
    let rcpt = rcpt.to_ascii_lowercase();
    let domain = rcpt.rsplit_once('@').map(|(_, d)| d.to_string());
    let scopes = std::iter::once(rcpt.clone())
        .chain(domain)
        .chain(std::iter::once("*".to_string()));
    let sender = sender.to_ascii_lowercase();
    let ip = ip.to_string();
    let entries: Vec<&str> = policy::sender_keys(&sender)
        .chain(std::iter::once(ip.as_str()))
        .collect();
    let keys: Vec<String> = scopes
        .flat_map(|s| entries.iter().map(move |e| format!("list:{s}:{e}")))
        .collect();
    let values = store.get_many(&keys).await?;
    let per_scope = entries.len();
    for (keys, values) in keys.chunks(per_scope).zip(values.chunks(per_scope)) {
        let mut allow = None;
        for (k, v) in keys.iter().zip(values) {
            match v.as_deref() {
                Some("block") => return Ok(Some((k.clone(), "block".into()))),
                Some("allow") if allow.is_none() => allow = Some(k.clone()),
                _ => {}
            }
        }
        if let Some(k) = allow {
            return Ok(Some((k, "allow".into())));
        }
    }
    Ok(None)
}

/// The thresholds in force under a policy.
fn thresholds(engine: &Engine, policy: Option<&Policy>) -> Thresholds {
    match policy {
        Some(p) => p.thresholds(engine.thresholds()),
        None => engine.thresholds().clone(),
    }
}

/// The findings that had an effect, as the log's `hits` and X-Spam-Report
/// name them.
fn effects(findings: &[Finding]) -> impl Iterator<Item = String> + '_ {
    findings
        .iter()
        .filter(|f| f.action != Action::Accept)
        .map(hit)
}

/// A finding with an effect, for the log line: `spf:softfail=3`.
fn hit(f: &Finding) -> String {
    match f.action {
        Action::Score(s) => format!("{}={s}", f.reason),
        Action::Reject => format!("{}=reject", f.reason),
        Action::Tempfail => format!("{}=tempfail", f.reason),
        Action::Tag | Action::Accept => format!("{}=tag", f.reason),
    }
}

/// The checks of the DATA stage over one message.
async fn check_message(engine: &Engine, facts: &mut Facts, shared: &SharedMessage) -> DataChecks {
    let raw: &[u8] = (**shared).as_ref();
    let host = &engine.hostname;
    let policy = facts.txn.policy.clone();
    let policy = policy.as_deref();
    let Some(parsed) = AuthenticatedMessage::parse(raw) else {
        // No header block at all: nothing to verify or to remove.
        return DataChecks {
            outcome: decide(&facts.txn.found, engine, policy),
            headers: auth_results::none(host),
            remove: Vec::new(),
        };
    };
    let remove = forged_results(&parsed, raw, host);
    // For finding the message again (`replay --log`, the MTA's log); a
    // bounded, single-line copy.
    facts.txn.found.log.message_id = parsed
        .headers()
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(b"Message-ID"))
        .map(|(_, v)| message_id(v))
        .unwrap_or_default();
    // Allow-listed: only the checks that apply to everyone (the virus
    // scan), and a verdict on their findings alone.
    let skipped = facts.txn.found.skipped;
    let from = parsed.first_from_address().to_string();
    let from_domain = from
        .rsplit_once('@')
        .map(|(_, d)| d.to_string())
        .unwrap_or_default();
    let mut m = Message {
        shared,
        parsed: &parsed,
        from,
        from_domain,
        dkim: Vec::new(),
        dmarc: None,
        arc: None,
        headers: String::new(),
        remove,
        links: None,
    };
    let before = facts.txn.found.findings.len();
    for c in engine.checks.iter().filter(|c| !skipped || c.always()) {
        c.data(facts, &mut m).await;
    }
    if skipped {
        return DataChecks {
            outcome: verdict::decide(
                &view(policy, &facts.txn.found.findings[before..]),
                &thresholds(engine, policy),
            ),
            headers: auth_results::none(host),
            remove: m.remove,
        };
    }
    let found = &facts.txn.found;
    let outcome = decide(found, engine, policy);
    let mut headers = std::mem::take(&mut m.headers);
    auth_results::finish(
        &mut headers,
        &outcome,
        &thresholds(engine, policy),
        &found.add_headers,
    );
    if engine.cfg.report_header {
        let hits: Vec<String> = if found.skipped {
            Vec::new()
        } else {
            // The scanner's symbols after what it added up to.
            let name = found.log.scanner.split(':').next().unwrap_or("");
            effects(&view(policy, &found.findings))
                .chain(
                    found
                        .log
                        .scanner_symbols
                        .iter()
                        .map(|s| format!("{name}:{s}")),
                )
                .collect()
        };
        headers.push_str(&auth_results::report(outcome.score, &hits));
    }
    DataChecks {
        outcome,
        headers,
        remove: m.remove,
    }
}

#[cfg(test)]
mod tests {
    //! The screen stage by stage, with no socket: every DNS check off, the
    //! limits and the rules on.
    use super::*;
    use crate::config::Config;
    use crate::dns::Dns;
    use crate::state::Store;
    use std::path::{Path, PathBuf};

    const RULES: &str = r#"rules:
  - {id: BAD_HELO, description: d, when: {helo: {exact: [bad.test]}}, action: {reject: {code: 550, enhanced: 5.7.1, text: "bad helo"}}}
  - {id: CLEAR, description: d, when: {tls: false}, action: {score: 1}}
  - {id: TRAP, description: d, when: {rcpt_local: {exact: [trap]}}, action: reject}
  - {id: VIP, description: d, when: {rcpt_local: {exact: [vip]}}, action: accept}
  - {id: FRIENDLY, description: d, when: {rcpt_local: {exact: [friend]}}, action: {score: 2}}
  - {id: PRIZE, description: d, when: {subject: {regex: prize}}, action: {score: 5}}
  - {id: MARK, description: d, when: {subject: {regex: prize}}, action: {add_header: {name: X-Prize, value: "yes"}}}
"#;

    fn config(extra: &str) -> Config {
        let yaml = format!(
            "hostname: gate.test\nlisten: [{{addr: 127.0.0.1:0}}]\nupstream: {{addr: 127.0.0.1:2525}}\nlimits: {{max_recipients: 3, max_message_size: 1000}}\nchecks:\n  spf: {{mode: off}}\n  dkim: {{mode: off}}\n  dmarc: {{mode: off}}\n  arc: {{mode: off}}\n  iprev: {{mode: off}}\n  dnsbl: {{mode: off}}\n  thresholds: {{tag: 3}}\n{extra}"
        );
        Config::parse(&yaml, Path::new("test.yaml")).unwrap()
    }

    fn screen(cfg: &Config, ip: &str) -> Screen {
        let rules = RuleSet::load_texts(Path::new("."), &[(PathBuf::from("r.yaml"), RULES)])
            .unwrap_or_else(|e| panic!("{e}"));
        let store = Store::in_memory(1000, Arc::new(crate::state::SystemClock));
        let engine = Arc::new(Engine::new(
            cfg,
            Dns::new(&cfg.dns).unwrap(),
            Arc::new(store),
        ));
        let mut s = Screen::new(engine, Arc::new(rules), ip.parse().unwrap(), false);
        s.helo("mx.sender.test");
        s
    }

    fn verdict(s: Screened) -> Outcome {
        match s {
            Screened::Verdict(o) => o,
            other => panic!("not a verdict: {other:?}"),
        }
    }

    /// The log's copy of Message-ID: bare, single-line, bounded.
    #[test]
    fn message_ids_are_logged_bare_on_one_line_and_bounded() {
        assert_eq!(message_id(b" <abc@example.test>\r\n"), "abc@example.test");
        assert_eq!(message_id(b"<a b\r\n\tc\x07@x>"), "abc@x");
        assert_eq!(message_id(b"<\xffid@x>"), "\u{fffd}id@x");
        let long = format!("<{}@x>", "é".repeat(300));
        assert_eq!(message_id(long.as_bytes()), "é".repeat(200));
        assert_eq!(message_id(b""), "");
    }

    /// A check that is off is left out of the engine (its stages are not
    /// called for every message); one on, or needed by another, stays.
    #[test]
    fn checks_that_are_off_are_left_out_of_the_engine() {
        let engine = |checks: &str| {
            let yaml = format!(
                "hostname: gate.test\nlisten: [{{addr: 127.0.0.1:0}}]\nupstream: {{addr: 127.0.0.1:2525}}\nchecks:\n{checks}"
            );
            let cfg = Config::parse(&yaml, Path::new("test.yaml")).unwrap();
            let store = Store::in_memory(1000, Arc::new(crate::state::SystemClock));
            Engine::new(&cfg, Dns::new(&cfg.dns).unwrap(), Arc::new(store))
                .checks
                .len()
        };
        let off = "  spf: {mode: off}\n  dkim: {mode: off}\n  dmarc: {mode: off}\n  arc: {mode: off}\n  dnsbl: {mode: off}\n  greylist: {mode: off}\n  uribl: {mode: off}\n  antivirus: {mode: off}\n  scanner: {mode: off}\n";
        // The limits, the rate limits, iprev, the rules and our
        // Authentication-Results field.
        assert_eq!(engine(off), 5);
        // DMARC on: DKIM is verified for it, with its own mode off.
        let dmarc = off.replace("dmarc: {mode: off}", "dmarc: {mode: record}");
        assert_eq!(engine(&dmarc), 7);
        // SPF on alone.
        assert_eq!(
            engine(&off.replace("spf: {mode: off}", "spf: {mode: enforce}")),
            6
        );
    }

    #[tokio::test]
    async fn connect_without_listings_is_greeted() {
        let mut s = screen(&config(""), "192.0.2.1");
        assert_eq!(s.greeting().await.decision, Decision::Accept);
    }

    #[tokio::test]
    async fn mail_runs_the_limits_then_the_rules_of_connect_helo_and_mail() {
        let mut s = screen(&config(""), "192.0.2.1");
        match s.mail("a@sender.test", Some(1001)).await {
            Screened::Refused { reply, reason } => {
                assert_eq!((reply.code, reason.as_str()), (552, "limit:size"));
            }
            other => panic!("{other:?}"),
        }
        let o = verdict(s.mail("a@sender.test", Some(1000)).await);
        assert_eq!((o.decision, o.score), (Decision::Accept, 1.0));
        assert_eq!(s.log().rules, ["CLEAR"]);
        assert_eq!(s.log().hits, ["rule:CLEAR=1"]);
        s.helo("bad.test");
        let o = verdict(s.mail("a@sender.test", None).await);
        let Decision::Reject(r) = &o.decision else {
            panic!("{o:?}")
        };
        assert_eq!((r.code, o.reason.as_str()), (550, "rule:BAD_HELO"));
        // A new transaction starts clean: STARTTLS changed what rules see.
        s.helo("mx.sender.test");
        s.tls(true);
        let o = verdict(s.mail("a@sender.test", None).await);
        assert_eq!((o.decision, o.score), (Decision::Accept, 0.0));
        assert!(s.log().rules.is_empty());
    }

    #[tokio::test]
    async fn allow_lists_skip_the_checks_but_not_the_limits() {
        let cfg = config("  allow: {clients: [192.0.2.0/24], senders: [friend.test]}\n");
        let mut s = screen(&cfg, "192.0.2.9");
        s.helo("bad.test");
        assert!(s.allowed());
        let o = verdict(s.mail("a@sender.test", None).await);
        assert_eq!(o.decision, Decision::Accept);
        assert!(s.log().rules.is_empty());
        assert!(matches!(
            s.mail("a@sender.test", Some(5000)).await,
            Screened::Refused { .. }
        ));
        let mut s = screen(&cfg, "198.51.100.1");
        s.helo("bad.test");
        let o = verdict(s.mail("a@sub.friend.test", None).await);
        assert_eq!(o.decision, Decision::Accept);
        let o = verdict(s.mail("a@sender.test", None).await);
        assert!(matches!(o.decision, Decision::Reject(_)), "{o:?}");
    }

    #[tokio::test]
    async fn rcpt_refuses_one_recipient_and_keeps_the_scores_of_others() {
        let mut s = screen(&config(""), "192.0.2.1");
        verdict(s.mail("a@sender.test", None).await);
        let (r, why) = s.rcpt("trap@example.test").await.expect("refused");
        assert_eq!((r.code, why.as_str()), (550, "rule:TRAP"));
        assert_eq!(s.rcpt("friend@example.test").await, None);
        s.rcpt_accepted("friend@example.test");
        assert_eq!(s.rcpt("b@example.test").await, None);
        s.rcpt_accepted("b@example.test");
        assert_eq!(s.rcpts(), ["friend@example.test", "b@example.test"]);
        assert_eq!(s.log().hits, ["rule:CLEAR=1", "rule:FRIENDLY=2"]);
        s.rcpt_accepted("c@example.test");
        let (r, why) = s.rcpt("d@example.test").await.expect("over the limit");
        assert_eq!((r.code, why.as_str()), (452, "limit:recipients"));
    }

    #[tokio::test]
    async fn an_accept_rule_at_rcpt_ends_the_checks() {
        let mut s = screen(&config(""), "192.0.2.1");
        verdict(s.mail("a@sender.test", None).await);
        assert_eq!(s.rcpt("vip@example.test").await, None);
        s.rcpt_accepted("vip@example.test");
        assert_eq!(s.rcpt("trap@example.test").await, None, "skipped");
        let msg: SharedMessage = Arc::new(b"Subject: prize\r\n\r\nhi\r\n".to_vec());
        let d = s.data(&msg).await;
        assert_eq!(d.outcome.decision, Decision::Accept);
        assert_eq!(
            d.headers,
            "Authentication-Results: gate.test;\r\n\tnone\r\n"
        );
    }

    #[tokio::test]
    async fn data_decides_over_every_finding_and_writes_our_headers() {
        let mut s = screen(&config(""), "192.0.2.1");
        verdict(s.mail("a@sender.test", None).await);
        assert_eq!(s.rcpt("b@example.test").await, None);
        s.rcpt_accepted("b@example.test");
        let raw = b"Authentication-Results: gate.test; spf=pass\r\nSubject: prize\r\n\r\nhi\r\n";
        let msg: SharedMessage = Arc::new(raw.to_vec());
        let d = s.data(&msg).await;
        assert_eq!(
            (d.outcome.decision.clone(), d.outcome.score),
            (Decision::Tag, 6.0)
        );
        assert!(
            d.headers.starts_with("Authentication-Results: gate.test;"),
            "{}",
            d.headers
        );
        assert!(
            d.headers
                .contains("X-Spam-Flag: YES\r\nX-Spam-Score: 6.0\r\nX-Prize: yes\r\n"),
            "{}",
            d.headers
        );
        // The forged header that claims our name is dropped.
        let forged = "Authentication-Results: gate.test; spf=pass\r\n".len();
        assert_eq!(
            d.remove,
            vec![Range {
                start: 0,
                end: forged
            }]
        );
        assert_eq!(s.log().rules, ["CLEAR", "PRIZE", "MARK"]);
        assert_eq!(s.facts().txn.size, Some(raw.len() as u64));
    }
}
