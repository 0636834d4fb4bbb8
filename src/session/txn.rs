//! One transaction (a `gate::ledger::Ledger`, with its `Phase`): how it
//! ends on both sides, and its one log line.

use super::*;

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
        let Some(t) = self.txn.take() else { return };
        t.record_abandoned(&self.client(), why, 0);
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
        t.record(
            &self.client(),
            &Ending {
                verdict,
                stage,
                said,
                reason,
                upstream,
                queue_id: queue_id(said, upstream),
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
        // With what the checks found so far (a rate limit that refused
        // MAIL names itself), as the milter door logs it.
        Ledger::new(m.address.clone(), started, score, TxnPhase::Open).record(
            &self.client(),
            &Ending {
                verdict: Verdict::from_code(said.code),
                stage: Stage::Mail,
                said: &said,
                reason,
                upstream,
                queue_id: "",
                size: 0,
            },
        );
    }

    /// This session's client, for its transactions' log lines.
    fn client(&self) -> Client<'_> {
        Client {
            door: Door::Proxy,
            session: &self.peer.id,
            ip: self.peer.addr.ip(),
            helo: self.helo.as_deref().unwrap_or(""),
            tls: self
                .tls
                .as_ref()
                .map(|t| (t.version.as_str(), t.cipher.as_str())),
            screen: &self.screen,
        }
    }
}

/// The MTA's queue id in its reply to an accepted message.
fn queue_id<'a>(said: &Said, upstream: &'a str) -> &'a str {
    if said.code / 100 == 2 {
        crate::telemetry::queue_id_in(upstream)
    } else {
        ""
    }
}
