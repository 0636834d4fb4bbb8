//! One transaction: its phase, what was said, how it ends (on both
//! sides), and its one log line.

use super::*;

/// Where a transaction stands (see the state table at the top).
#[derive(Debug, Clone)]
pub(super) enum TxnPhase {
    /// MAIL accepted and relayed; upstream holds the same transaction.
    Open,
    /// A verdict reached at MAIL, delivered at each RCPT (delayed reject);
    /// upstream never heard of this transaction.
    Doomed { reply: Reply, reason: String },
    /// Upstream failed mid-transaction: everything else answers 4xx.
    Broken,
}

/// One MAIL..end-of-transaction.
pub(super) struct Txn {
    pub(super) mail: MailCmd,
    pub(super) phase: TxnPhase,
    pub(super) rcpts: usize,
    pub(super) started: Instant,
    /// The last refusal at RCPT, to tell reject from tempfail if nothing was accepted.
    pub(super) last_rcpt_refusal: Option<RcptRefusal>,
    /// Summed score of this transaction's latest decision, for the log.
    pub(super) score: f64,
}

impl Txn {
    pub(super) fn new(mail: MailCmd, started: Instant, score: f64, phase: TxnPhase) -> Txn {
        Txn {
            mail,
            phase,
            rcpts: 0,
            started,
            last_rcpt_refusal: None,
            score,
        }
    }
}

/// A reply's code and enhanced code, for the log line.
pub(super) struct Said {
    pub(super) code: u16,
    pub(super) enhanced: String,
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

/// What a transaction's log line says of the transaction itself.
struct Logged<'a> {
    score: f64,
    checks: &'a CheckLog,
    rcpt_addrs: &'a [String],
    mail_from: &'a str,
    rcpts: usize,
    started: Instant,
}

/// How a transaction ended, for its log line.
struct Ending<'a> {
    verdict: Verdict,
    stage: Stage,
    said: &'a Said,
    reason: &'a str,
    upstream: &'a str,
    size: u64,
}

/// A refusal remembered for the log line.
pub(super) struct RcptRefusal {
    pub(super) code: u16,
    pub(super) enhanced: String,
    pub(super) reason: String,
    pub(super) upstream: String,
}

impl Session {
    /// The one place that ends a transaction on both sides (see the table
    /// at the top): logs the client's transaction, if one is still open,
    /// as abandoned for `why`, then brings upstream back to no transaction.
    pub(super) async fn end_transaction(&mut self, why: &str, up: UpReset) {
        self.end_txn_abandoned(why);
        match up {
            UpReset::Close => {
                if let Some(conn) = self.upstream.take() {
                    conn.quit().await;
                }
                self.upstream_helo = None;
            }
            UpReset::IfOpen | UpReset::Always => {
                let Some(conn) = self.upstream.as_mut() else {
                    return;
                };
                if matches!(up, UpReset::IfOpen) && !conn.in_transaction() {
                    return;
                }
                match conn.rset().await {
                    Ok(r) if r.is_positive() => {}
                    // Upstream will not reset: a fresh connection will.
                    _ => self.drop_upstream(),
                }
            }
        }
    }

    /// Logs and forgets a transaction that ended without a final reply.
    pub(super) fn end_txn_abandoned(&mut self, why: &str) {
        let Some(t) = self.txn.as_ref() else { return };
        let (verdict, code, enhanced, reason, upstream) = match (&t.last_rcpt_refusal, t.rcpts) {
            (Some(r), 0) => (
                Verdict::from_code(r.code),
                r.code,
                r.enhanced.clone(),
                r.reason.clone(),
                r.upstream.clone(),
            ),
            _ => (
                Verdict::Abandoned,
                0,
                String::new(),
                format!("client:{why}"),
                String::new(),
            ),
        };
        let said = Said { code, enhanced };
        self.log_txn(verdict, Stage::Rcpt, &said, &reason, &upstream, 0);
        self.txn = None;
    }

    pub(super) fn finish_txn(
        &mut self,
        size: u64,
        stage: Stage,
        said: impl Into<Said>,
        reason: &str,
        upstream: &str,
    ) {
        let said = said.into();
        self.log_txn(
            Verdict::from_code(said.code),
            stage,
            &said,
            reason,
            upstream,
            size,
        );
        self.txn = None;
    }

    pub(super) fn log_txn(
        &self,
        verdict: Verdict,
        stage: Stage,
        said: &Said,
        reason: &str,
        upstream: &str,
        size: u64,
    ) {
        let Some(t) = self.txn.as_ref() else { return };
        let log = self.screen.log();
        self.record(
            &Logged {
                score: t.score,
                checks: &log,
                rcpt_addrs: self.screen.rcpts(),
                mail_from: &t.mail.address,
                rcpts: t.rcpts,
                started: t.started,
            },
            &Ending {
                verdict,
                stage,
                said,
                reason,
                upstream,
                size,
            },
        );
    }

    /// A MAIL refused (by us or upstream): a transaction that never started.
    pub(super) fn log_mail_refused(
        &self,
        m: &MailCmd,
        started: Instant,
        score: f64,
        said: impl Into<Said>,
        reason: &str,
        upstream: &str,
    ) {
        let said = said.into();
        // What the checks found so far (a rate limit that refused MAIL
        // names itself here), as the milter door logs it.
        self.record(
            &Logged {
                score,
                checks: &self.screen.log(),
                rcpt_addrs: &[],
                mail_from: &m.address,
                rcpts: 0,
                started,
            },
            &Ending {
                verdict: Verdict::from_code(said.code),
                stage: Stage::Mail,
                said: &said,
                reason,
                upstream,
                size: 0,
            },
        );
    }

    /// The one place a transaction's log line is written.
    fn record(&self, t: &Logged<'_>, end: &Ending<'_>) {
        let (checks, said) = (t.checks, end.said);
        TxnRecord {
            mode: "proxy",
            session: &self.peer.id,
            client_ip: self.peer.addr.ip(),
            helo: self.helo.as_deref().unwrap_or(""),
            tls: self.tls.is_some(),
            tls_version: self.tls.as_ref().map_or("", |t| t.version.as_str()),
            tls_cipher: self.tls.as_ref().map_or("", |t| t.cipher.as_str()),
            mail_from: t.mail_from,
            rcpt_count: t.rcpts,
            size: end.size,
            verdict: end.verdict,
            stage: end.stage.as_str(),
            code: said.code,
            enhanced: &said.enhanced,
            reason: end.reason,
            upstream_reply: end.upstream,
            queue_id: if end.said.code / 100 == 2 {
                crate::telemetry::queue_id_in(end.upstream)
            } else {
                ""
            },
            duration: t.started.elapsed(),
            reverse: self.screen.reverse().unwrap_or_default().to_string(),
            checks,
            rcpt_addrs: t.rcpt_addrs.to_vec(),
            score: t.score,
        }
        .emit();
    }
}
