//! One transaction's record, kept the same way by both doors, and the one
//! place it becomes a log line with its metrics (pingora's single logging
//! hook). A new log key, or a new way for a transaction to end, is one
//! edit here.

use super::Door;
use crate::checks::{Screen, Stage};
use crate::telemetry::{TxnRecord, Verdict};
use crate::verdict::Decision;
use crate::wire::reply::{Reply, UpstreamReply};
use std::net::IpAddr;
use std::time::Instant;

/// The client of a transaction, as either door knows it.
pub struct Client<'a> {
    pub door: Door,
    pub session: &'a str,
    pub ip: IpAddr,
    pub helo: &'a str,
    /// The TLS version and cipher, when the client used TLS.
    pub tls: Option<(&'a str, &'a str)>,
    /// What the checks found for this client and transaction.
    pub screen: &'a Screen,
}

/// A reply's code and enhanced code, for the log line.
#[derive(Debug, Clone, Default)]
pub struct Said {
    pub code: u16,
    pub enhanced: String,
}

impl From<&Reply> for Said {
    fn from(r: &Reply) -> Said {
        Said {
            code: r.code,
            enhanced: r.enhanced_code().unwrap_or_default(),
        }
    }
}

impl From<&UpstreamReply> for Said {
    fn from(r: &UpstreamReply) -> Said {
        Said {
            code: r.code,
            enhanced: r.enhanced(),
        }
    }
}

/// A recipient refused (by us, or by upstream in proxy mode), remembered
/// for the log line of a transaction that ends with none accepted.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub said: Said,
    pub reason: String,
    /// Upstream's text, when upstream refused it.
    pub upstream: String,
}

impl Refusal {
    /// A refusal of ours.
    pub fn ours(r: &Reply, reason: String) -> Refusal {
        Refusal {
            said: Said::from(r),
            reason,
            upstream: String::new(),
        }
    }
}

/// How a transaction ended, for its log line.
pub struct Ending<'a> {
    pub verdict: Verdict,
    pub stage: Stage,
    pub said: &'a Said,
    pub reason: &'a str,
    /// Upstream's final reply (proxy mode), else empty.
    pub upstream: &'a str,
    /// The MTA's queue id for an accepted message, else empty.
    pub queue_id: &'a str,
    pub size: u64,
}

/// Where a transaction stands, in both doors (each door's state table).
#[derive(Debug, Clone)]
pub enum TxnPhase {
    /// MAIL accepted: recipients are checked (and in proxy mode relayed)
    /// as they come.
    Open,
    /// A verdict reached at MAIL, delivered at each RCPT (delayed reject),
    /// so that the log line names sender and recipients; upstream never
    /// hears of the transaction.
    Doomed { reply: Reply, reason: String },
    /// Proxy mode: upstream failed mid-transaction; RCPT and DATA get 4xx.
    Broken,
}

impl TxnPhase {
    /// After the MAIL checks: doomed by a refusal, else open.
    pub fn after_mail(decision: Decision, reason: String) -> TxnPhase {
        match decision {
            Decision::Reject(reply) | Decision::Tempfail(reply) => {
                TxnPhase::Doomed { reply, reason }
            }
            Decision::Accept | Decision::Tag => TxnPhase::Open,
        }
    }

    /// The MAIL verdict a doomed transaction gives each recipient.
    pub fn doom(&self) -> Option<(Reply, String)> {
        match self {
            TxnPhase::Doomed { reply, reason } => Some((reply.clone(), reason.clone())),
            TxnPhase::Open | TxnPhase::Broken => None,
        }
    }
}

/// The record of one transaction, from MAIL to its end.
#[derive(Debug, Clone)]
pub struct Ledger {
    pub phase: TxnPhase,
    pub mail_from: String,
    pub started: Instant,
    /// Summed score of the transaction's latest decision.
    pub score: f64,
    /// Recipients accepted.
    pub rcpts: usize,
    /// The last recipient refused, to tell reject from tempfail when none
    /// was accepted.
    pub last_refusal: Option<Refusal>,
}

impl Ledger {
    pub fn new(mail_from: String, started: Instant, score: f64, phase: TxnPhase) -> Ledger {
        Ledger {
            phase,
            mail_from,
            started,
            score,
            rcpts: 0,
            last_refusal: None,
        }
    }

    /// The one place a transaction's log line is written (and its metrics
    /// counted), whichever door it came through.
    pub fn record(&self, client: &Client<'_>, end: &Ending<'_>) {
        // With no line to write, the checks' log (a copy of what they
        // found, and each shadow finding's what-if verdict) is not made.
        if !TxnRecord::wanted() {
            TxnRecord::count(end.verdict, end.reason, end.size);
            return;
        }
        let (tls_version, tls_cipher) = client.tls.unwrap_or(("", ""));
        TxnRecord {
            mode: client.door.mode(),
            session: client.session,
            client_ip: client.ip,
            helo: client.helo,
            tls: client.tls.is_some(),
            tls_version,
            tls_cipher,
            mail_from: &self.mail_from,
            rcpt_count: self.rcpts,
            size: end.size,
            verdict: end.verdict,
            stage: end.stage.as_str(),
            code: end.said.code,
            enhanced: &end.said.enhanced,
            reason: end.reason,
            upstream_reply: end.upstream,
            queue_id: end.queue_id,
            duration: self.started.elapsed(),
            reverse: client.screen.reverse().unwrap_or_default().to_string(),
            checks: &client.screen.log(),
            rcpt_addrs: client.screen.rcpts().to_vec(),
            score: self.score,
        }
        .emit();
    }

    /// Logs a transaction that ended without a final reply (RSET, QUIT, a
    /// disconnect, a client that stopped reading): as its refusals when
    /// no recipient was accepted, else abandoned for `why`.
    /// `size`: what the message had reached, if it had begun.
    pub fn record_abandoned(&self, client: &Client<'_>, why: &str, size: u64) {
        let none = Said::default();
        let reason = format!("client:{why}");
        self.record(client, &self.unanswered(&none, &reason, size));
    }

    /// How a transaction without a final reply ends: as its last refusal
    /// when no recipient was accepted, else abandoned (`said` and `reason`
    /// are that ending's).
    fn unanswered<'a>(&'a self, none: &'a Said, reason: &'a str, size: u64) -> Ending<'a> {
        match (&self.last_refusal, self.rcpts) {
            (Some(r), 0) => Ending {
                verdict: Verdict::from_code(r.said.code),
                stage: Stage::Rcpt,
                said: &r.said,
                reason: &r.reason,
                upstream: &r.upstream,
                queue_id: "",
                size,
            },
            _ => Ending {
                verdict: Verdict::Abandoned,
                stage: Stage::Rcpt,
                said: none,
                reason,
                upstream: "",
                queue_id: "",
                size,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(code: u16, enhanced: &str, reason: &str) -> Refusal {
        let r = Reply::new(code, 0, 0, "").with_text("no");
        let mut refusal = Refusal::ours(&r, reason.to_string());
        refusal.said.enhanced = enhanced.to_string();
        refusal
    }

    #[test]
    fn a_refusal_at_mail_dooms_the_transaction_and_is_given_to_each_recipient() {
        let r = Reply::new(550, 7, 1, "").with_text("listed");
        let doomed = TxnPhase::after_mail(Decision::Reject(r), "dnsbl:bl.test".into());
        let (reply, reason) = doomed.doom().unwrap_or_else(|| panic!("{doomed:?}"));
        assert_eq!((reply.code, reason.as_str()), (550, "dnsbl:bl.test"));
        assert!(doomed.doom().is_some(), "every recipient gets it");
        let open = TxnPhase::after_mail(Decision::Tag, "score".into());
        assert!(matches!(open, TxnPhase::Open) && open.doom().is_none());
        assert!(TxnPhase::Broken.doom().is_none());
    }

    #[test]
    fn a_transaction_with_no_recipient_accepted_ends_as_its_last_refusal() {
        let mut l = Ledger::new("a@x.test".into(), Instant::now(), 0.0, TxnPhase::Open);
        l.last_refusal = Some(refused(550, "5.1.1", "rule:TRAP"));
        let none = Said::default();
        let end = l.unanswered(&none, "client:quit", 10);
        assert_eq!(end.verdict, Verdict::Reject);
        assert_eq!((end.said.code, end.reason), (550, "rule:TRAP"));
        // A tempfail refusal ends it as a tempfail.
        l.last_refusal = Some(refused(451, "4.7.1", "greylist"));
        let end = l.unanswered(&none, "client:quit", 10);
        assert_eq!((end.verdict, end.reason), (Verdict::Tempfail, "greylist"));
    }

    #[test]
    fn a_transaction_with_a_recipient_accepted_is_abandoned_for_why() {
        let mut l = Ledger::new("a@x.test".into(), Instant::now(), 0.0, TxnPhase::Open);
        l.last_refusal = Some(refused(550, "5.1.1", "rule:TRAP"));
        l.rcpts = 1;
        let none = Said::default();
        let end = l.unanswered(&none, "client:rset", 42);
        assert_eq!(end.verdict, Verdict::Abandoned);
        assert_eq!(
            (end.said.code, end.reason, end.size),
            (0, "client:rset", 42)
        );
        // Nothing refused and nothing accepted (RSET right after MAIL).
        let l = Ledger::new("a@x.test".into(), Instant::now(), 0.0, TxnPhase::Open);
        let end = l.unanswered(&none, "client:rset", 0);
        assert_eq!(end.verdict, Verdict::Abandoned);
    }
}
