//! The checks engine: DNSBL and iprev started at connect, SPF at MAIL,
//! DKIM, DMARC and ARC at the end of DATA (all through mail-auth), each
//! turned into `Finding`s by its configured mode and actions, and the
//! Authentication-Results header (RFC 8601) for the message.

use super::client_name;
use super::dnsbl::{Dnsbl, ZoneOutcome};
use super::pool::{self, RulePool, SharedMessage};
use crate::config::{Action, ChecksConfig, Mode, Overrun};
use crate::dns::Dns;
use crate::rules::{Facts, Hit, OwnedFacts, RuleAction, RuleSet, Stage};
use crate::upstream::DnsName;
use crate::verdict::{self, Finding, Outcome};
use mail_auth::dmarc::Policy;
use mail_auth::dmarc::verify::DmarcParameters;
use mail_auth::dns::Parameters;
use mail_auth::headers::HeaderWriter;
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{
    AuthenticatedMessage, AuthenticationResults, DkimResult, DmarcResult, IprevOutput, IprevResult,
    SpfOutput, SpfResult,
};
use std::net::IpAddr;
use std::ops::Range;
use std::sync::Arc;
use tokio::task::JoinHandle;

/// Shared by all sessions.
pub struct Checker {
    pub cfg: ChecksConfig,
    hostname: String,
    pub dns: Arc<Dns>,
    pub dnsbl: Arc<Dnsbl>,
    /// Where the rules on the whole message run.
    pool: RulePool,
}

/// Per client connection: lookups started at connect, awaited when needed.
pub struct ConnChecks {
    ip: IpAddr,
    /// Allow-listed client: no checks at all.
    pub allowed: bool,
    dnsbl_task: Option<JoinHandle<Vec<ZoneOutcome>>>,
    /// PTR plus forward confirmation: for iprev and for upstream.
    iprev_task: Option<JoinHandle<IprevOutput>>,
    /// iprev is a check here (not only a name lookup for upstream).
    iprev_on: bool,
    dnsbl_ip: Option<Vec<ZoneOutcome>>,
    iprev: Option<IprevOutput>,
    /// XCLIENT NAME and REVERSE_NAME, once the lookup has finished; the
    /// first is the verified reverse name.
    names: Option<(DnsName, DnsName)>,
}

/// What a transaction's checks found so far; kept for the DATA stage and the log.
#[derive(Default)]
pub struct TxnChecks {
    pub skipped: bool,
    pub findings: Vec<Finding>,
    helo: String,
    sender: String,
    spf_helo: Option<SpfOutput>,
    spf_mail: Option<SpfOutput>,
    pub log: CheckLog,
    /// Headers added by rules (`add_header`).
    pub add_headers: Vec<String>,
}

/// The check results for the transaction log line.
#[derive(Debug, Clone, Default)]
pub struct CheckLog {
    pub spf: String,
    pub dkim: String,
    pub dmarc: String,
    pub iprev: String,
    pub arc: String,
    /// `zone=code,code` for each listing.
    pub dnsbl: Vec<String>,
    /// The zones of those listings, for the rules.
    pub dnsbl_zones: Vec<String>,
    /// Rules that matched: `ID`, or `ID(shadow)`.
    pub rules: Vec<String>,
    /// Every check and rule finding with its effect: `spf:softfail=3`,
    /// `dnsbl:zen.spamhaus.org=reject`.
    pub hits: Vec<String>,
}

/// The end-of-DATA result: decision, our header block, and forged
/// Authentication-Results fields to drop from the message.
pub struct DataChecks {
    pub outcome: Outcome,
    pub headers: String,
    pub remove: Vec<Range<usize>>,
}

impl ConnChecks {
    /// The verified reverse name, once the lookup has finished.
    pub fn reverse(&self) -> Option<&str> {
        self.names.as_ref().and_then(|(name, _)| name.known())
    }

    /// The client's names for upstream (NAME, REVERSE_NAME), waiting for
    /// the lookup started at connect (bounded by the DNS timeout).
    pub async fn client_names(&mut self) -> (DnsName, DnsName) {
        self.finish_name_lookup().await;
        self.names.clone().unwrap_or_default()
    }

    async fn finish_name_lookup(&mut self) {
        let Some(t) = self.iprev_task.take() else {
            return;
        };
        let Ok(r) = t.await else { return };
        self.names = Some(client_name::from_iprev(&r));
        if self.iprev_on {
            self.iprev = Some(r);
        }
    }
}

impl CheckLog {
    /// `facts` with every check result known so far, so that rules at any
    /// stage see the results of the checks before them.
    pub fn with_results<'a>(&'a self, facts: Facts<'a>) -> Facts<'a> {
        Facts {
            spf: &self.spf,
            dkim: &self.dkim,
            dmarc: &self.dmarc,
            iprev: &self.iprev,
            dnsbl: self.dnsbl_zones.iter().map(String::as_str).collect(),
            ..facts
        }
    }
}

impl Checker {
    pub fn new(cfg: &ChecksConfig, hostname: &str, dns: Arc<Dns>) -> Checker {
        Checker {
            cfg: cfg.clone(),
            hostname: hostname.to_string(),
            dnsbl: Arc::new(Dnsbl::new(&cfg.dnsbl.zones, Arc::clone(&dns))),
            dns,
            pool: RulePool::new(&cfg.message_rules),
        }
    }

    /// Whether any check asks DNS (and so its nameservers are worth checking).
    pub fn uses_dns(&self) -> bool {
        let c = &self.cfg;
        [
            c.spf.mode,
            c.dkim.mode,
            c.dmarc.mode,
            c.arc.mode,
            c.iprev.mode,
        ]
        .iter()
        .any(|m| *m != Mode::Off)
            || (c.dnsbl.mode != Mode::Off && !self.dnsbl.zones.is_empty())
    }

    /// Starts the DNSBL and iprev lookups for a new client, in the
    /// background. `want_names`: upstream is to be told the client's DNS
    /// name (XCLIENT), so look it up even when iprev is off.
    pub fn connect(&self, ip: IpAddr, want_names: bool) -> ConnChecks {
        let ip = ip.to_canonical();
        let allowed = self.cfg.allow.clients.iter().any(|n| n.contains(&ip));
        let iprev_on = self.cfg.iprev.mode != Mode::Off && !allowed;
        let mut c = ConnChecks {
            ip,
            allowed,
            dnsbl_task: None,
            iprev_task: None,
            iprev_on,
            dnsbl_ip: None,
            iprev: None,
            names: None,
        };
        if !allowed && self.cfg.dnsbl.mode != Mode::Off && self.dnsbl.ip_zones().next().is_some() {
            let bl = Arc::clone(&self.dnsbl);
            c.dnsbl_task = Some(tokio::spawn(async move { bl.check_ip(ip).await }));
        }
        if iprev_on || want_names {
            let dns = Arc::clone(&self.dns);
            c.iprev_task = Some(tokio::spawn(async move {
                let (auth, cache) = dns.auth();
                auth.verify_iprev(Parameters::new(ip).with_cache(cache))
                    .await
            }));
        }
        c
    }

    async fn await_connect(&self, c: &mut ConnChecks) {
        if let Some(t) = c.dnsbl_task.take() {
            c.dnsbl_ip = Some(t.await.unwrap_or_default());
        }
        c.finish_name_lookup().await;
    }

    /// For `reject_at: connect`: the DNSBL verdict before the greeting.
    pub async fn at_connect(&self, c: &mut ConnChecks) -> (Outcome, CheckLog) {
        let mut findings = Vec::new();
        let mut log = CheckLog::default();
        if !c.allowed {
            if let Some(t) = c.dnsbl_task.take() {
                c.dnsbl_ip = Some(t.await.unwrap_or_default());
            }
            self.dnsbl_findings(
                c.ip,
                c.dnsbl_ip.as_deref().unwrap_or_default(),
                &mut findings,
                &mut log,
            );
        }
        (verdict::decide(&findings, &self.cfg.thresholds), log)
    }

    /// At MAIL: DNSBL (ip and domain lists), iprev and SPF, as one verdict.
    pub async fn at_mail(
        &self,
        c: &mut ConnChecks,
        rules: &RuleSet,
        tls: bool,
        helo: &str,
        sender: &str,
    ) -> (TxnChecks, Outcome) {
        let mut t = TxnChecks {
            helo: helo.to_string(),
            sender: sender.to_string(),
            ..TxnChecks::default()
        };
        let sender_domain = sender.rsplit_once('@').map(|(_, d)| d.to_ascii_lowercase());
        let allowed_sender = sender_domain.as_deref().is_some_and(|d| {
            self.cfg.allow.senders.iter().any(|a| {
                let a = a.trim_end_matches('.').to_ascii_lowercase();
                d == a || d.ends_with(&format!(".{a}"))
            })
        });
        if c.allowed || allowed_sender {
            t.skipped = true;
            return (t, verdict::decide(&[], &self.cfg.thresholds));
        }
        self.await_connect(c).await;
        let mut findings = Vec::new();
        let mut log = CheckLog::default();
        self.dnsbl_findings(
            c.ip,
            c.dnsbl_ip.as_deref().unwrap_or_default(),
            &mut findings,
            &mut log,
        );
        if self.cfg.dnsbl.mode != Mode::Off && self.dnsbl.domain_zones().next().is_some() {
            let mut domains = vec![helo.to_string()];
            domains.extend(sender_domain.clone());
            domains.extend(c.reverse().map(str::to_string));
            domains.dedup();
            let outcomes = self.dnsbl.check_domains(&domains).await;
            self.dnsbl_findings(c.ip, &outcomes, &mut findings, &mut log);
        }
        if let Some(r) = &c.iprev {
            self.iprev_finding(c.ip, r, &mut findings, &mut log);
        }
        if self.cfg.spf.mode != Mode::Off {
            let (auth, cache) = self.dns.auth();
            let ip = c.ip.to_string();
            if self.cfg.spf.helo && helo.contains('.') && helo.parse::<IpAddr>().is_err() {
                let out = auth
                    .check_host(
                        Parameters::new(SpfParameters::helo(c.ip, helo, &self.hostname))
                            .with_cache(cache),
                    )
                    .await;
                if out.result() == SpfResult::Fail {
                    let action = self.act(self.cfg.spf.mode, self.cfg.spf.fail);
                    findings.push(Finding {
                        check: "spf",
                        result: "fail".into(),
                        action,
                        reason: "spf:helo_fail".into(),
                        reply: verdict::spf_fail(self.cfg.spf.text.as_deref(), helo, &ip),
                    });
                }
                t.spf_helo = Some(out);
            }
            let out = auth
                .check_host(
                    Parameters::new(SpfParameters::mail_from(c.ip, helo, &self.hostname, sender))
                        .with_cache(cache),
                )
                .await;
            let domain = out.domain().to_string();
            let s = &self.cfg.spf;
            let (word, action, reply) = match out.result() {
                SpfResult::Pass => ("pass", s.pass, None),
                SpfResult::Fail => (
                    "fail",
                    s.fail,
                    Some(verdict::spf_fail(s.text.as_deref(), &domain, &ip)),
                ),
                SpfResult::SoftFail => ("softfail", s.softfail, None),
                SpfResult::Neutral => ("neutral", s.neutral, None),
                SpfResult::None => ("none", s.none, None),
                SpfResult::TempError => (
                    "temperror",
                    s.temperror,
                    Some(verdict::spf_temperror(&domain)),
                ),
                SpfResult::PermError => (
                    "permerror",
                    s.permerror,
                    Some(verdict::spf_permerror(&domain)),
                ),
            };
            log.spf = word.to_string();
            findings.push(Finding {
                check: "spf",
                result: word.into(),
                action: self.act(s.mode, action),
                reason: format!("spf:{word}"),
                reply: reply.unwrap_or_else(|| verdict::spam_score(0.0)),
            });
            t.spf_mail = Some(out);
        }
        // The rules of the stages before DATA see every check result.
        let facts = log.with_results(Facts {
            ip: Some(c.ip),
            reverse: c.reverse(),
            helo: Some(helo),
            mail_from: Some(sender),
            tls,
            ..Facts::default()
        });
        let mut hits = Vec::new();
        for stage in [Stage::Connect, Stage::Helo, Stage::Mail] {
            hits.extend(rules.evaluate(stage, &facts));
        }
        let accepted = apply_rule_hits(&hits, &mut findings, &mut log, &mut t.add_headers);
        t.log = log;
        if accepted {
            // An allow-list rule: skip the remaining checks and rules.
            t.skipped = true;
            return (t, verdict::decide(&[], &self.cfg.thresholds));
        }
        let outcome = verdict::decide(&findings, &self.cfg.thresholds);
        t.findings = findings;
        (t, outcome)
    }

    /// At the end of DATA: DKIM, DMARC, ARC; the final verdict over all
    /// findings; our Authentication-Results header; forged ones to remove.
    /// Parsing the message, hashing its body and verifying signatures is
    /// CPU work, so it runs on the check threads (`pool::check_threads`),
    /// never on the threads that serve the sessions.
    pub async fn at_data(
        self: &Arc<Self>,
        c: &ConnChecks,
        t: &mut TxnChecks,
        rules: &Arc<RuleSet>,
        facts: Facts<'_>,
        shared: &SharedMessage,
    ) -> DataChecks {
        // A small message costs microseconds: the hop to another thread
        // would cost more than it saves (a quarter of the throughput in
        // the load benchmark), and so would copying what it needs.
        let threads =
            pool::check_threads().filter(|_| (**shared).as_ref().len() > pool::INLINE_CHECK_BYTES);
        let Some(threads) = threads else {
            return self
                .authenticate(c.ip, c.iprev.as_ref(), t, rules, facts, shared)
                .await;
        };
        let (me, rules, shared) = (Arc::clone(self), Arc::clone(rules), Arc::clone(shared));
        let (ip, iprev, facts) = (c.ip, c.iprev.clone(), OwnedFacts::new(&facts));
        let mut txn = std::mem::take(t);
        let done = threads
            .spawn(async move {
                let data = me
                    .authenticate(
                        ip,
                        iprev.as_ref(),
                        &mut txn,
                        &rules,
                        facts.view(None),
                        &shared,
                    )
                    .await;
                (txn, data)
            })
            .await;
        match done {
            Ok((txn, data)) => {
                *t = txn;
                data
            }
            Err(e) => {
                // A bug, not the sender's fault: the sender retries.
                tracing::error!(error = %e, "end-of-message checks failed");
                DataChecks {
                    outcome: verdict::Outcome {
                        decision: verdict::Decision::Tempfail(verdict::checks_failed()),
                        score: 0.0,
                        reason: "checks:failed".into(),
                    },
                    headers: String::new(),
                    remove: Vec::new(),
                }
            }
        }
    }

    async fn authenticate(
        &self,
        ip: IpAddr,
        iprev: Option<&IprevOutput>,
        t: &mut TxnChecks,
        rules: &Arc<RuleSet>,
        facts: Facts<'_>,
        shared: &SharedMessage,
    ) -> DataChecks {
        let message: &[u8] = (**shared).as_ref();
        let Some(msg) = AuthenticatedMessage::parse(message) else {
            // No header block at all: nothing to verify or to remove.
            let outcome = verdict::decide(&t.findings, &self.cfg.thresholds);
            let headers = format!("Authentication-Results: {};\r\n\tnone\r\n", self.hostname);
            return DataChecks {
                outcome,
                headers,
                remove: Vec::new(),
            };
        };
        let remove = forged_results(&msg, message, &self.hostname);
        if t.skipped {
            return DataChecks {
                outcome: verdict::decide(&[], &self.cfg.thresholds),
                headers: format!("Authentication-Results: {};\r\n\tnone\r\n", self.hostname),
                remove,
            };
        }
        let (auth, cache) = self.dns.auth();
        let from = msg.first_from_address().to_string();
        let from_domain = from
            .rsplit_once('@')
            .map(|(_, d)| d.to_string())
            .unwrap_or_default();
        let mut results = AuthenticationResults::new(&self.hostname);
        let mut findings = std::mem::take(&mut t.findings);

        let dkim = if self.cfg.dkim.mode != Mode::Off || self.cfg.dmarc.mode != Mode::Off {
            auth.verify_dkim(Parameters::new(&msg).with_cache(cache))
                .await
        } else {
            Vec::new()
        };
        if self.cfg.dkim.mode != Mode::Off {
            results = results.with_dkim_results(&dkim, &from);
            let best = dkim_summary(&dkim);
            t.log.dkim = best.to_string();
            let d = &self.cfg.dkim;
            let (action, reply) = match best {
                // mail-auth reports a signature that does not verify (body
                // hash, bad signature) as neutral; for us both are failures.
                "fail" | "neutral" => (d.fail, verdict::dkim_fail(d.text.as_deref(), &from_domain)),
                "temperror" => (d.temperror, verdict::dkim_temperror()),
                "permerror" => (
                    d.permerror,
                    verdict::dkim_fail(d.text.as_deref(), &from_domain),
                ),
                _ => (Action::Accept, verdict::dkim_fail(None, &from_domain)),
            };
            if action != Action::Accept {
                findings.push(Finding {
                    check: "dkim",
                    result: best.into(),
                    action: self.act(d.mode, action),
                    reason: format!("dkim:{best}"),
                    reply,
                });
            }
        }
        let spf_params = SpfParameters::mail_from(ip, &t.helo, &self.hostname, &t.sender);
        if let Some(spf) = &t.spf_mail {
            results = results.with_spf_result(spf, &spf_params);
        }
        if let Some(spf) = &t.spf_helo {
            results =
                results.with_spf_result(spf, &SpfParameters::helo(ip, &t.helo, &self.hostname));
        }
        if self.cfg.dmarc.mode != Mode::Off
            && let Some(spf) = &t.spf_mail
        {
            for from in msg.from_addresses() {
                if let Some((_, domain)) = from.rsplit_once('@') {
                    cache.shield_public_suffixes(domain);
                }
            }
            let dmarc = auth
                .verify_dmarc(
                    Parameters::new(DmarcParameters::new(&msg, &dkim, spf.domain(), spf))
                        .with_cache(cache),
                )
                .await;
            results = results.with_dmarc_result(&dmarc);
            let m = &self.cfg.dmarc;
            let policy = dmarc.policy();
            let (word, action, reply) = match dmarc.result() {
                DmarcResult::Pass => ("pass", Action::Accept, None),
                DmarcResult::None => ("none", Action::Accept, None),
                DmarcResult::PermError(_) => ("permerror", Action::Accept, None),
                DmarcResult::TempError(_) => (
                    "temperror",
                    m.temperror,
                    Some(verdict::dmarc_temperror(dmarc.domain())),
                ),
                DmarcResult::Fail(_) => {
                    let action = match policy {
                        Policy::Reject => m.reject,
                        Policy::Quarantine => m.quarantine,
                        Policy::None | Policy::Unspecified => m.none,
                    };
                    (
                        "fail",
                        action,
                        Some(verdict::dmarc_reject(m.text.as_deref(), dmarc.domain())),
                    )
                }
            };
            let policy_word = match policy {
                Policy::Reject => "reject",
                Policy::Quarantine => "quarantine",
                Policy::None => "none",
                Policy::Unspecified => "",
            };
            t.log.dmarc = if policy_word.is_empty() || word == "pass" {
                word.to_string()
            } else {
                format!("{word}:{policy_word}")
            };
            if action != Action::Accept {
                findings.push(Finding {
                    check: "dmarc",
                    result: word.into(),
                    action: self.act(m.mode, action),
                    reason: if policy_word.is_empty() {
                        format!("dmarc:{word}")
                    } else {
                        format!("dmarc:{policy_word}")
                    },
                    reply: reply.unwrap_or_else(|| verdict::spam_score(0.0)),
                });
            }
        }
        if self.cfg.arc.mode != Mode::Off && !msg.arc_seals().is_empty() {
            let arc = auth
                .verify_arc(Parameters::new(&msg).with_cache(cache))
                .await;
            t.log.arc = dkim_word(arc.result()).to_string();
            results = results.with_arc_result(&arc, ip);
        }
        if let Some(r) = &iprev {
            results = results.with_iprev_result(r, ip);
        }
        let mut accepted = false;
        if rules.has_stage(Stage::Data) {
            let facts = OwnedFacts::new(&t.log.with_results(facts));
            match self
                .pool
                .evaluate(Arc::clone(rules), facts, Arc::clone(shared))
                .await
            {
                Ok(hits) => {
                    accepted =
                        apply_rule_hits(&hits, &mut findings, &mut t.log, &mut t.add_headers);
                }
                Err(o) => {
                    t.log.hits.push("rules:overrun".into());
                    if o.then == Overrun::Tempfail {
                        findings.push(Finding {
                            check: "rules",
                            result: "overrun".into(),
                            action: Action::Tempfail,
                            reason: "rules:overrun".into(),
                            reply: verdict::rules_overrun(),
                        });
                    }
                }
            }
        }
        let outcome = if accepted {
            verdict::decide(&[], &self.cfg.thresholds)
        } else {
            verdict::decide(&findings, &self.cfg.thresholds)
        };
        let mut headers = results.to_header();
        if outcome.decision == verdict::Decision::Tag || self.cfg.thresholds.tag.is_some() {
            let flag = if outcome.decision == verdict::Decision::Tag {
                "YES"
            } else {
                "NO"
            };
            headers.push_str(&format!(
                "X-Spam-Flag: {flag}\r\nX-Spam-Score: {:.1}\r\n",
                outcome.score
            ));
        }
        for h in &t.add_headers {
            headers.push_str(h);
        }
        t.findings = findings;
        DataChecks {
            outcome,
            headers,
            remove,
        }
    }

    /// Rules of the RCPT stage for one recipient: its own verdict (a reject
    /// refuses this recipient only); scores and headers join the transaction.
    pub fn at_rcpt(
        &self,
        rules: &RuleSet,
        t: &mut TxnChecks,
        facts: &Facts<'_>,
    ) -> Option<Outcome> {
        if t.skipped || !rules.has_stage(Stage::Rcpt) {
            return None;
        }
        let hits = rules.evaluate(Stage::Rcpt, &t.log.with_results(facts.clone()));
        let mut findings = Vec::new();
        if apply_rule_hits(&hits, &mut findings, &mut t.log, &mut t.add_headers) {
            t.skipped = true;
            return None;
        }
        let refusal: Vec<Finding> = findings
            .iter()
            .filter(|f| matches!(f.action, Action::Reject | Action::Tempfail))
            .cloned()
            .collect();
        t.findings.extend(
            findings
                .into_iter()
                .filter(|f| !matches!(f.action, Action::Reject | Action::Tempfail)),
        );
        if refusal.is_empty() {
            None
        } else {
            Some(verdict::decide(&refusal, &self.cfg.thresholds))
        }
    }

    /// `record` mode never acts.
    fn act(&self, mode: Mode, action: Action) -> Action {
        if mode == Mode::Enforce {
            action
        } else {
            Action::Accept
        }
    }

    fn dnsbl_findings(
        &self,
        ip: IpAddr,
        outcomes: &[ZoneOutcome],
        findings: &mut Vec<Finding>,
        log: &mut CheckLog,
    ) {
        for o in outcomes {
            match o {
                ZoneOutcome::Listed(hit) => {
                    let codes: Vec<String> = hit.codes.iter().map(|c| c.to_string()).collect();
                    log.dnsbl.push(format!("{}={}", hit.zone, codes.join("+")));
                    log.dnsbl_zones.push(hit.zone.clone());
                    let action = match hit.action {
                        Some(a) => a,
                        None => Action::Score(hit.score),
                    };
                    let ip = ip.to_string();
                    findings.push(Finding {
                        check: "dnsbl",
                        result: codes.join("+"),
                        action: self.act(self.cfg.dnsbl.mode, action),
                        reason: format!("dnsbl:{}", hit.zone),
                        reply: verdict::dnsbl_listed(
                            hit.text.as_deref(),
                            &hit.zone,
                            &ip,
                            hit.txt.as_deref(),
                        ),
                    });
                }
                ZoneOutcome::Failed(e) => {
                    tracing::warn!(error = %e, "DNSBL lookup failed");
                    if self.cfg.dnsbl.on_error == Action::Tempfail {
                        findings.push(Finding {
                            check: "dnsbl",
                            result: "temperror".into(),
                            action: self.act(self.cfg.dnsbl.mode, Action::Tempfail),
                            reason: "dnsbl:temperror".into(),
                            reply: verdict::dns_tempfail(),
                        });
                    }
                }
                ZoneOutcome::Clean | ZoneOutcome::Unusable => {}
            }
        }
    }

    fn iprev_finding(
        &self,
        ip: IpAddr,
        r: &IprevOutput,
        findings: &mut Vec<Finding>,
        log: &mut CheckLog,
    ) {
        let i = &self.cfg.iprev;
        let (word, action) = match r.result() {
            IprevResult::Pass => ("pass", Action::Accept),
            IprevResult::Fail(_) => ("fail", i.fail),
            IprevResult::TempError(_) => ("temperror", i.temperror),
            IprevResult::PermError(_) => ("permerror", i.permerror),
            IprevResult::None => ("none", Action::Accept),
        };
        log.iprev = word.to_string();
        if action != Action::Accept {
            let reply = if action == Action::Tempfail {
                verdict::dns_tempfail()
            } else {
                verdict::iprev_fail(i.text.as_deref(), &ip.to_string())
            };
            findings.push(Finding {
                check: "iprev",
                result: word.into(),
                action: self.act(i.mode, action),
                reason: format!("iprev:{word}"),
                reply,
            });
        }
    }
}

/// Turns rule hits into findings, log entries and headers. Returns true
/// when an enforced `accept` (allow-list) rule matched.
fn apply_rule_hits(
    hits: &[Hit],
    findings: &mut Vec<Finding>,
    log: &mut CheckLog,
    headers: &mut Vec<String>,
) -> bool {
    let mut accepted = false;
    for h in hits {
        log.rules.push(if h.shadow {
            format!("{}(shadow)", h.id)
        } else {
            h.id.clone()
        });
        if h.shadow {
            continue;
        }
        let (action, reply) = match &h.action {
            RuleAction::Reject(r) => (Action::Reject, r.clone()),
            RuleAction::Tempfail(r) => (Action::Tempfail, r.clone()),
            RuleAction::Score(s) => (Action::Score(*s), verdict::spam_score(*s)),
            RuleAction::Accept => {
                accepted = true;
                continue;
            }
            RuleAction::AddHeader(line) => {
                headers.push(line.clone());
                continue;
            }
            RuleAction::Log => continue,
        };
        findings.push(Finding {
            check: "rule",
            result: "match".into(),
            action,
            reason: format!("rule:{}", h.id),
            reply,
        });
    }
    accepted
}

fn dkim_word(r: &DkimResult) -> &'static str {
    match r {
        DkimResult::Pass => "pass",
        DkimResult::Neutral(_) => "neutral",
        DkimResult::Fail(_) => "fail",
        DkimResult::PermError(_) => "permerror",
        DkimResult::TempError(_) => "temperror",
        DkimResult::None => "none",
    }
}

/// The best DKIM result over all signatures.
fn dkim_summary(dkim: &[mail_auth::DkimOutput]) -> &'static str {
    let words: Vec<&str> = dkim.iter().map(|d| dkim_word(d.result())).collect();
    for w in ["pass", "temperror", "fail", "permerror", "neutral"] {
        if words.contains(&w) {
            return w;
        }
    }
    "none"
}

/// Byte ranges of Authentication-Results fields that claim our authserv-id
/// (RFC 8601 section 5: a border MTA must remove them).
fn forged_results(
    msg: &AuthenticatedMessage<'_>,
    raw: &[u8],
    authserv_id: &str,
) -> Vec<Range<usize>> {
    let base = raw.as_ptr() as usize;
    let headers = msg.headers();
    let body = msg.body_offset().min(raw.len());
    let mut out = Vec::new();
    for (i, (name, value)) in headers.iter().enumerate() {
        if !name.eq_ignore_ascii_case(b"Authentication-Results") {
            continue;
        }
        let id = String::from_utf8_lossy(value);
        let id = strip_comments(&id);
        let claimed = id
            .split(';')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .next()
            .unwrap_or("");
        if !claimed.eq_ignore_ascii_case(authserv_id) {
            continue;
        }
        let start = name.as_ptr() as usize - base;
        let end = headers
            .get(i + 1)
            .map(|(n, _)| n.as_ptr() as usize - base)
            .unwrap_or_else(|| {
                let v_end = value.as_ptr() as usize - base + value.len();
                v_end.min(body)
            });
        if start < end && end <= raw.len() {
            out.push(start..end);
        }
    }
    out
}

/// Drops RFC 5322 comments `( ... )` so `(forged) mx.test;` still names mx.test.
fn strip_comments(s: &str) -> String {
    let mut depth = 0u32;
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '(' => depth += 1,
            ')' if depth > 0 => depth -= 1,
            _ if depth == 0 => out.push(ch),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forged_authentication_results_are_found() {
        let raw = b"Authentication-Results: mx.test; spf=pass smtp.mailfrom=a@b\r\n\
Received: from x\r\n\
Authentication-Results: (comment) MX.TEST;\r\n\tdkim=pass header.d=b\r\n\
Authentication-Results: other.test; dkim=fail\r\n\
Subject: hi\r\n\r\nbody\r\n";
        let msg = AuthenticatedMessage::parse(raw).unwrap();
        let r = forged_results(&msg, raw, "mx.test");
        assert_eq!(r.len(), 2);
        let mut kept = Vec::new();
        let mut pos = 0;
        for range in &r {
            kept.extend_from_slice(&raw[pos..range.start]);
            pos = range.end;
        }
        kept.extend_from_slice(&raw[pos..]);
        assert_eq!(
            String::from_utf8(kept).unwrap(),
            "Received: from x\r\nAuthentication-Results: other.test; dkim=fail\r\nSubject: hi\r\n\r\nbody\r\n"
        );
    }
}
