//! One transaction, MAIL to the end of the message: its record
//! (`gate::ledger`, with its phase), the message being kept, and how it
//! ends.

use super::conversation::{Client, Conversation, State};
use super::headers::Assembled;
use crate::checks::{Hold, Stage};
use crate::gate::Door;
use crate::gate::ledger::{self, Ending, Ledger, Said, TxnPhase};
use crate::runtime::limits::MemoryBudget;
use crate::telemetry::Verdict;
use crate::wire::milter::Response;
use crate::wire::reply::Reply;
use std::time::Instant;

pub(super) struct Txn {
    /// Sender, recipients and refusals, score, and the phase (a doomed
    /// transaction carries the MAIL verdict for each RCPT).
    pub(super) ledger: Ledger,
    pub(super) message: Assembled,
    /// The message's size, and whether it is kept within the size limit
    /// and the memory budget (past either, it is read on but not kept).
    pub(super) hold: Hold,
}

impl Txn {
    pub(super) fn new(
        sender: String,
        started: Instant,
        score: f64,
        phase: TxnPhase,
        max_size: u64,
        budget: &std::sync::Arc<MemoryBudget>,
    ) -> Txn {
        Txn {
            ledger: Ledger::new(sender, started, score, phase),
            message: Assembled::default(),
            hold: Hold::new(max_size, budget),
        }
    }

    /// The transaction's log line, as the proxy writes it, with
    /// `mode=milter` and the MTA's queue id (its `i` macro) for an accepted
    /// message (else empty).
    pub(super) fn record(
        &self,
        c: &Client,
        verdict: Verdict,
        stage: Stage,
        r: &Reply,
        reason: &str,
        queue_id: &str,
    ) {
        self.ledger.record(
            &c.client(),
            &Ending {
                verdict,
                stage,
                said: &Said::from(r),
                reason,
                upstream: "",
                queue_id,
                size: self.hold.size(),
            },
        );
    }
}

impl Conversation {
    /// Ends the open transaction without a final reply: logged as what its
    /// refusals were, or abandoned for `why`.
    pub(super) fn abandon(&mut self, why: &str) {
        let Some(c) = self.screening() else {
            return;
        };
        c.mail_refused = None;
        let Some(t) = c.txn.take() else {
            return;
        };
        t.ledger.record_abandoned(&c.client(), why, t.hold.size());
    }

    /// Ends the SMTP session (its open transaction abandoned for `why`).
    pub(super) fn end_session(&mut self, why: &str) {
        self.abandon(why);
        self.state = State::Idle;
    }
}

impl Client {
    /// This SMTP session's client, for its transactions' log lines.
    fn client(&self) -> ledger::Client<'_> {
        ledger::Client {
            door: Door::Milter,
            session: &self.id,
            ip: self.ip,
            helo: &self.helo,
            tls: self.tls.as_ref().map(|(v, c)| (v.as_str(), c.as_str())),
            screen: &self.screen,
        }
    }
}

/// Our reply, as the MTA will send it to the client.
pub(super) fn reply_code(r: &Reply) -> Response {
    let mut text = Vec::new();
    r.write_to(&mut text);
    while text.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        text.pop();
    }
    Response::ReplyCode(text)
}
