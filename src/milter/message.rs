//! The message: header fields and body chunks kept within the size limit
//! and the memory budget (`checks::Hold`), then at its end the DATA
//! checks, and on acceptance our header edits.

use super::conversation::Conversation;
use super::headers::{Assembled, HEADER_BLOCK, fields_of};
use super::txn::reply_code;
use crate::checks::Stage;
use crate::checks::pool::SharedMessage;
use crate::runtime::limits::Held;
use crate::telemetry::Verdict;
use crate::verdict::Decision;
use crate::wire::milter::{Response, action};
use crate::wire::reply;
use std::sync::Arc;

impl Conversation {
    /// Adds to the message being received, within the size limit and the
    /// memory budget (past either, it is read on but not kept).
    pub(super) fn keep(&mut self, add: impl FnOnce(&mut Assembled)) {
        let Some(t) = self.screening().and_then(|c| c.txn.as_mut()) else {
            return;
        };
        if !t.hold.keeping() {
            // Not kept, but counted: the log line gives the message's size.
            let mut unkept = Assembled::default();
            add(&mut unkept);
            t.hold.grew(t.hold.size() + unkept.len() as u64, 0);
            return;
        }
        if t.message.bytes.capacity() == 0 {
            t.message.bytes.reserve(HEADER_BLOCK);
        }
        add(&mut t.message);
        if !t
            .hold
            .grew(t.message.len() as u64, t.message.bytes.capacity())
        {
            t.message = Assembled::default();
        }
    }

    /// The end of the message: our verdict, and on acceptance the header
    /// edits, then the final reply.
    pub(super) async fn end_of_message(&mut self) -> Vec<Response> {
        let (actions, leading) = (self.actions, self.leading_space());
        let queue_id = self.macro_value("i");
        let Some(c) = self.screening() else {
            return vec![Response::Continue];
        };
        let Some(mut t) = c.txn.take() else {
            return vec![Response::Continue];
        };
        let parse = c.screen.facts().rules.has_stage(Stage::Data);
        t.hold
            .before_checks(parse, t.message.bytes.capacity(), t.message.len());
        let local = match (t.ledger.phase.doom(), t.hold.refusal()) {
            (Some(doom), _) => Some(doom),
            (None, Some((r, reason))) => Some((r, reason.to_string())),
            (None, None) => None,
        };
        if let Some((r, reason)) = local {
            t.record(c, Verdict::from_code(r.code), Stage::Data, &r, &reason, "");
            return vec![reply_code(&r)];
        }
        let mut fields = std::mem::take(&mut t.message);
        let reservation = t.hold.take_reservation();
        let held = Arc::new(Held::new(std::mem::take(&mut fields.bytes), reservation));
        let checked = c.screen.data(&(Arc::clone(&held) as SharedMessage)).await;
        t.ledger.score = checked.outcome.score;
        let reason = checked.outcome.reason.clone();
        match checked.outcome.decision {
            Decision::Reject(r) | Decision::Tempfail(r) => {
                t.record(c, Verdict::from_code(r.code), Stage::Data, &r, &reason, "");
                vec![reply_code(&r)]
            }
            d => {
                let mut edits = Vec::new();
                if actions & action::CHANGE_HEADERS != 0 {
                    // From the last, so that deleting one does not renumber
                    // the next.
                    for range in checked.remove.iter().rev() {
                        if let Some((name, index)) = fields.field_at((*held).as_ref(), range.start)
                        {
                            edits.push(Response::ChangeHeader {
                                index,
                                name,
                                value: Vec::new(),
                            });
                        }
                    }
                }
                if actions & action::ADD_HEADERS != 0 {
                    for (i, (name, value)) in
                        fields_of(&checked.headers, leading).into_iter().enumerate()
                    {
                        edits.push(Response::InsertHeader {
                            index: u32::try_from(i).unwrap_or(u32::MAX),
                            name,
                            value,
                        });
                    }
                }
                if d == Decision::Tag
                    && c.rt.cfg.milter.quarantine_tagged
                    && actions & action::QUARANTINE != 0
                {
                    let why = format!("Portcullis: {reason}");
                    edits.push(Response::Quarantine(why.into_bytes()));
                }
                edits.push(Response::Continue);
                let verdict = if d == Decision::Tag {
                    Verdict::Tag
                } else {
                    Verdict::Accept
                };
                let queue_id = queue_id.unwrap_or_default();
                t.record(c, verdict, Stage::Data, &reply::OK, &reason, &queue_id);
                edits
            }
        }
    }
}
