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
            TxnPhase::Doomed { reply, reason } => {
                let (reply, reason) = (reply.clone(), reason.clone());
                return self.refuse_rcpt(reply, reason);
            }
        }
        if let Some(p) = self.offer.unsupported_rcpt_param(&r) {
            return self
                .error(reply::PARAM_UNSUPPORTED.with_text(format!("Unsupported parameter {p}")));
        }
        let outcome = self.rt.checks.run(Stage::Rcpt, &self.envelope()).await;
        let mut refusal = match outcome {
            Outcome::Refuse { reply, reason } => Some((reply, reason.to_string())),
            Outcome::Continue => None,
        };
        if refusal.is_none() {
            // Rules of the RCPT stage, for this recipient.
            let mut checks = self
                .txn
                .as_mut()
                .map(|t| std::mem::take(&mut t.checks))
                .unwrap_or_default();
            let facts = Facts {
                rcpts: vec![r.address.as_str()],
                ..self.facts()
            };
            if let Some(o) = self.checker.at_rcpt(&self.rules, &mut checks, &facts) {
                match o.decision {
                    Decision::Reject(reply) | Decision::Tempfail(reply) => {
                        refusal = Some((reply, o.reason))
                    }
                    Decision::Accept | Decision::Tag => {}
                }
            }
            if let Some(t) = self.txn.as_mut() {
                t.checks = checks;
            }
        }
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
                        t.rcpt_list.push(r.address.clone());
                    } else {
                        t.last_rcpt_refusal = Some(Refusal {
                            code: rep.code,
                            enhanced: rep.enhanced(),
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
            t.last_rcpt_refusal = Some(Refusal {
                code: reply.code,
                enhanced: reply.enhanced_code().unwrap_or_default(),
                reason,
                upstream: String::new(),
            });
        }
        self.reply(&reply);
        Next::Continue
    }
}
