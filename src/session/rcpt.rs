//! RCPT: each recipient, its checks and upstream's answer.

use super::*;

impl Session {
    pub(super) async fn rcpt(&mut self, r: RcptCmd) -> Next {
        let Some(txn) = self.txn.as_ref() else {
            return self.error(reply::NEED_MAIL);
        };
        match &txn.phase {
            TxnPhase::Open => {}
            TxnPhase::Broken => {
                self.reply(&reply::UPSTREAM_LOST);
                return Next::Continue;
            }
            doomed @ TxnPhase::Doomed { .. } => {
                if let Some((reply, reason)) = doomed.doom() {
                    return self.refuse_rcpt(reply, reason);
                }
            }
        }
        if let Some(p) = self.offer.unsupported_rcpt_param(&r) {
            return self
                .error(reply::PARAM_UNSUPPORTED.with_text(format!("Unsupported parameter {p}")));
        }
        let refusal = self.screen.rcpt(&r.address).await;
        if let Some((reply, reason)) = refusal {
            return self.refuse_rcpt(reply, reason);
        }
        let Some(up) = self.upstream.as_mut() else {
            self.reply(&reply::UPSTREAM_LOST);
            return Next::Continue;
        };
        match up.command(&r.line, UpStage::Rcpt).await {
            Ok(rep) => {
                self.relay(&rep);
                if let Some(t) = self.txn.as_mut() {
                    if rep.is_positive() {
                        t.rcpts += 1;
                        self.screen.rcpt_accepted(&r.address);
                    } else {
                        t.last_refusal = Some(Refusal {
                            said: Said::from(&rep),
                            reason: "upstream".into(),
                            upstream: rep.text(),
                        });
                    }
                }
            }
            Err(e) => {
                self.upstream_failed(&e);
                self.reply(&reply::UPSTREAM_LOST);
            }
        }
        Next::Continue
    }

    /// Refuses one recipient ourselves (it never reaches upstream), keeping
    /// the refusal for the log line.
    pub(super) fn refuse_rcpt(&mut self, reply: Reply, reason: String) -> Next {
        if let Some(t) = self.txn.as_mut() {
            t.last_refusal = Some(Refusal::ours(&reply, reason));
        }
        self.reply(&reply);
        Next::Continue
    }
}
