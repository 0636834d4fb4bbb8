//! DATA: reading the message, the end-of-message checks, and the relay
//! of an accepted message to upstream.

use super::*;
use crate::checks::DataChecks;
use crate::runtime::limits::Held;

/// A message as read from the client, before any check.
struct Received {
    msg: Vec<u8>,
    reservation: Reservation,
    size: u64,
    anomalies: crate::wire::data::Anomalies,
    oversized: bool,
    /// It did not fit in the memory budget (and was read to its end unkept).
    over_budget: bool,
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
        if txn.ledger.rcpts == 0 {
            // The transaction stays open on both sides, as in Postfix.
            return self.error(reply::NEED_RCPT);
        }
        self.reply(&reply::START_DATA);
        let received = match self.read_message().await {
            Ok(r) => r,
            Err(next) => return next,
        };
        let size = received.size;
        let refusal = self.local_refusal(&received);
        if let Some((r, reason)) = refusal {
            drop(received);
            self.finish_txn(size, Stage::Data, &r, reason, "");
            self.end_transaction("", UpReset::IfOpen).await;
            self.reply(&r);
            return Next::Continue;
        }
        // From here the message is shared with the rule pool; it stays
        // counted against the budget until the last holder lets it go.
        let msg = Arc::new(Held::new(received.msg, received.reservation));
        let checked = self.screen.data(&(Arc::clone(&msg) as SharedMessage)).await;
        if let Some(t) = self.txn.as_mut() {
            t.ledger.score = checked.outcome.score;
        }
        match checked.outcome.decision {
            Decision::Reject(r) | Decision::Tempfail(r) => {
                drop(msg);
                self.finish_txn(size, Stage::Data, &r, &checked.outcome.reason, "");
                self.end_transaction("", UpReset::IfOpen).await;
                self.reply(&r);
                Next::Continue
            }
            Decision::Accept | Decision::Tag => self.relay_message(msg, &checked, size).await,
        }
    }

    /// Reads the message to its final dot, keeping it within the memory
    /// budget (a message that does not fit is read to its end, unkept).
    /// Err: the session ended meanwhile (closed, timed out, shut down).
    async fn read_message(&mut self) -> Result<Received, Next> {
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
            let (r, reason) = match self.fill(until, DATA_READ).await {
                Fill::Data => continue,
                Fill::Closed => {
                    // Nothing reaches upstream: its connection closes before any dot.
                    self.drop_upstream();
                    self.end_txn_abandoned(self.gone());
                    return Err(Next::Close);
                }
                Fill::Timeout => (reply::TIMEOUT, "timeout:data"),
                Fill::Shutdown => (reply::SHUTTING_DOWN, "shutdown"),
            };
            self.drop_upstream();
            self.finish_txn(reader.size(), Stage::Data, &r, reason, "");
            self.reply(&r);
            return Err(Next::Close);
        }
        self.conn.shrink();
        // Rules on the message parse it whole (decoded parts, headers): up
        // to its size again, held from the budget like the message itself.
        if !over_budget
            && self.screen.facts().rules.has_stage(Stage::Data)
            && !reservation.ensure(msg.capacity() + msg.len())
        {
            over_budget = true;
        }
        Ok(Received {
            size: reader.size(),
            anomalies: reader.anomalies,
            oversized: reader.oversized(),
            over_budget,
            msg,
            reservation,
        })
    }

    /// A refusal of the message as read (size, memory, hostile bytes),
    /// before any check runs.
    fn local_refusal(&self, m: &Received) -> Option<(Reply, &'static str)> {
        let a = &m.anomalies;
        if m.oversized {
            Some((reply::SIZE_EXCEEDED, "limit:size"))
        } else if m.over_budget {
            Some((reply::OUT_OF_MEMORY, "limit:memory_budget"))
        } else if a.nul {
            Some((reply::NUL_IN_DATA, "protocol:nul"))
        } else if a.bare_newline() && self.cfg().smtp.bare_newline == BareNewline::Reject {
            Some((reply::BARE_NEWLINE, "protocol:bare_newline"))
        } else if a.long_line {
            Some((reply::LONG_LINE_IN_DATA, "protocol:line_length"))
        } else {
            None
        }
    }

    /// Relays an accepted message to upstream and the client its answer:
    /// our headers first, then the message without forged
    /// Authentication-Results fields (slices, never a copy of the body).
    async fn relay_message(&mut self, msg: Arc<Held>, checked: &DataChecks, size: u64) -> Next {
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
