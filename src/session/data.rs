//! DATA: reading the message, the end-of-message checks, and the relay
//! of an accepted message to upstream.

use super::*;

/// A received message and its share of the memory budget, given back when
/// the last holder (the session, or a rule evaluation past its budget)
/// lets it go.
pub(super) struct Held {
    pub(super) bytes: Vec<u8>,
    pub(super) _reservation: Reservation,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Session {
    pub(super) async fn data(&mut self) -> Next {
        let Some(txn) = self.txn.as_ref() else {
            return self.error(reply::NEED_MAIL);
        };
        if matches!(txn.phase, TxnPhase::Broken) {
            self.finish_txn(0, Stage::Data, &reply::UPSTREAM_LOST, "upstream:lost", "");
            self.reply(&reply::UPSTREAM_LOST);
            return Next::Continue;
        }
        if txn.rcpts == 0 {
            // The transaction stays open on both sides, as in Postfix.
            return self.error(reply::NEED_RCPT);
        }
        self.reply(&reply::START_DATA);
        let cfg = Arc::clone(&self.rt.cfg);
        let mut reader = DataReader::new(cfg.limits.max_message_size.0, cfg.smtp.max_line_length);
        let mut msg: Vec<u8> = Vec::new();
        let mut reservation = self.shared.budget.reservation();
        let mut over_budget = false;
        loop {
            let done = self.conn.feed_data(&mut reader, &mut msg);
            if reader.is_storing() && !reservation.ensure(msg.capacity()) {
                over_budget = true;
                reader.stop_storing();
            }
            if !reader.is_storing() && msg.capacity() > 0 {
                msg = Vec::new();
                reservation.release();
            }
            if done {
                break;
            }
            let until = tokio::time::Instant::now() + cfg.timeouts.data.0;
            match self.fill(until, DATA_READ).await {
                Fill::Data => {}
                Fill::Closed => {
                    // Nothing reaches upstream: its connection closes before any dot.
                    self.drop_upstream();
                    self.end_txn_abandoned("disconnect");
                    return Next::Close;
                }
                Fill::Timeout => {
                    self.drop_upstream();
                    self.finish_txn(
                        reader.size(),
                        Stage::Data,
                        &reply::TIMEOUT,
                        "timeout:data",
                        "",
                    );
                    self.reply(&reply::TIMEOUT);
                    return Next::Close;
                }
                Fill::Shutdown => {
                    self.drop_upstream();
                    self.finish_txn(
                        reader.size(),
                        Stage::Data,
                        &reply::SHUTTING_DOWN,
                        "shutdown",
                        "",
                    );
                    self.reply(&reply::SHUTTING_DOWN);
                    return Next::Close;
                }
            }
        }
        self.conn.shrink();
        let size = reader.size();
        let a = reader.anomalies;
        // Rules on the message parse it whole (decoded parts, headers): up
        // to its size again, held from the budget like the message itself.
        if !over_budget
            && self.rules.has_stage(Stage::Data)
            && !reservation.ensure(msg.capacity() + msg.len())
        {
            over_budget = true;
        }
        let local_refusal = if reader.oversized() {
            Some((reply::SIZE_EXCEEDED, "limit:size"))
        } else if over_budget {
            Some((reply::OUT_OF_MEMORY, "limit:memory_budget"))
        } else if a.nul {
            Some((reply::NUL_IN_DATA, "protocol:nul"))
        } else if a.bare_newline() && cfg.smtp.bare_newline == BareNewline::Reject {
            Some((reply::BARE_NEWLINE, "protocol:bare_newline"))
        } else if a.long_line {
            Some((reply::LONG_LINE_IN_DATA, "protocol:line_length"))
        } else {
            None
        };
        let local_refusal = match local_refusal {
            Some(r) => Some(r),
            None => {
                let mut env = self.envelope();
                env.message = Some(&msg);
                match self.rt.checks.run(Stage::Data, &env).await {
                    Outcome::Refuse { reply, reason } => Some((reply, reason)),
                    Outcome::Continue => None,
                }
            }
        };
        if let Some((r, reason)) = local_refusal {
            drop(msg);
            self.finish_txn(size, Stage::Data, &r, reason, "");
            self.end_transaction("", UpReset::IfOpen).await;
            self.reply(&r);
            return Next::Continue;
        }
        // From here the message is shared with the rule pool; it stays
        // counted against the budget until the last holder lets it go.
        let msg = Arc::new(Held {
            bytes: msg,
            _reservation: reservation,
        });
        let Some(mut checks) = self.txn.as_mut().map(|t| std::mem::take(&mut t.checks)) else {
            return Next::Continue;
        };
        let facts = Facts {
            rcpts: self
                .txn
                .iter()
                .flat_map(|t| t.rcpt_list.iter().map(String::as_str))
                .collect(),
            size: Some(size),
            ..self.facts()
        };
        let checked = self
            .checker
            .at_data(
                &self.conn_checks,
                &mut checks,
                &self.rules,
                facts,
                &(Arc::clone(&msg) as SharedMessage),
            )
            .await;
        if let Some(t) = self.txn.as_mut() {
            t.checks = checks;
            t.score = checked.outcome.score;
        }
        match checked.outcome.decision {
            Decision::Reject(r) | Decision::Tempfail(r) => {
                drop(msg);
                self.finish_txn(size, Stage::Data, &r, &checked.outcome.reason, "");
                self.end_transaction("", UpReset::IfOpen).await;
                self.reply(&r);
                return Next::Continue;
            }
            Decision::Accept | Decision::Tag => {}
        }
        // Our headers first, then the message without forged
        // Authentication-Results fields: slices, never a copy of the body.
        let mut parts: Vec<&[u8]> = Vec::with_capacity(checked.remove.len() + 2);
        parts.push(checked.headers.as_bytes());
        let mut pos = 0;
        for r in &checked.remove {
            parts.push(&msg.bytes[pos..r.start]);
            pos = r.end;
        }
        parts.push(&msg.bytes[pos..]);
        let reason = checked.outcome.reason.clone();
        let tagged = checked.outcome.decision == Decision::Tag;
        let result = match self.upstream.as_mut() {
            Some(up) => up.data(&parts).await,
            None => Err(UpstreamError::Closed {
                stage: UpStage::Data,
            }),
        };
        drop(parts);
        drop(msg);
        match result {
            Ok(r) => {
                let reason = if r.is_positive() {
                    reason.as_str()
                } else {
                    "upstream"
                };
                if tagged && r.is_positive() {
                    // Accepted by upstream, but marked as spam by us.
                    let said = Said::from(&r);
                    self.log_txn(Verdict::Tag, Stage::Data, &said, reason, &r.text(), size);
                    self.txn = None;
                } else {
                    self.finish_txn(size, Stage::Data, &r, reason, &r.text());
                }
                self.relay(&r);
                // A refusal of DATA itself (before 354) leaves upstream
                // mid-transaction; the client's ended with our reply.
                self.end_transaction("", UpReset::IfOpen).await;
            }
            Err(e) => {
                self.upstream_failed(&e);
                self.finish_txn(
                    size,
                    Stage::Data,
                    &reply::UPSTREAM_LOST,
                    "upstream:lost",
                    &e.to_string(),
                );
                self.reply(&reply::UPSTREAM_LOST);
            }
        }
        Next::Continue
    }
}
