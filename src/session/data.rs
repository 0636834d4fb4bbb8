//! DATA: reading the message, the end-of-message checks, and the relay
//! of an accepted message to upstream.

use super::*;
use crate::checks::DataChecks;
use crate::runtime::limits::Held;

/// A message as read from the client, before any check.
struct Received {
    msg: Vec<u8>,
    /// Its size, and whether it was kept within the size limit and budget.
    hold: Hold,
    anomalies: crate::wire::data::Anomalies,
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
        let mut received = match self.read_message().await {
            Ok(r) => r,
            Err(next) => return next,
        };
        let size = received.hold.size();
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
        let msg = Arc::new(Held::new(received.msg, received.hold.take_reservation()));
        let checked = self.screen.data(&(Arc::clone(&msg) as SharedMessage)).await;
        if let Some(t) = self.txn.as_mut() {
            t.score = checked.outcome.score;
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
        let max = cfg.limits.max_message_size.0;
        let mut reader = DataReader::new(max, cfg.smtp.max_line_length);
        let mut msg: Vec<u8> = Vec::new();
        let mut hold = Hold::new(max, &self.shared.budget);
        loop {
            let done = self.conn.feed_data(&mut reader, &mut msg);
            if !hold.grew(reader.size(), msg.capacity()) {
                reader.stop_storing();
                if msg.capacity() > 0 {
                    msg = Vec::new();
                }
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
        let parse = self.screen.facts().rules.has_stage(Stage::Data);
        hold.before_checks(parse, msg.capacity(), msg.len());
        Ok(Received {
            anomalies: reader.anomalies,
            hold,
            msg,
        })
    }

    /// A refusal of the message as read (size, memory, hostile bytes),
    /// before any check runs.
    fn local_refusal(&self, m: &Received) -> Option<(Reply, &'static str)> {
        let a = &m.anomalies;
        if let Some(refused) = m.hold.refusal() {
            Some(refused)
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
