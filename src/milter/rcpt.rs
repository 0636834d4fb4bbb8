//! RCPT: a refusal reached at CONNECT or MAIL (given here when the MTA
//! did not wait for it there), the MAIL verdict of a doomed transaction,
//! or the recipient's checks.

use super::conversation::{Conversation, State};
use super::mail::address;
use super::txn::reply_code;
use crate::gate::ledger::Refusal;
use crate::wire::milter::Response;

impl Conversation {
    pub(super) async fn rcpt(&mut self, args: &[Vec<u8>]) -> Response {
        if let State::Settled(answer) = &self.state {
            return answer.clone();
        }
        let Some(c) = self.screening() else {
            return Response::Continue;
        };
        if let Some(refused) = &c.mail_refused {
            return refused.clone();
        }
        let Some(t) = c.txn.as_mut() else {
            return Response::Continue;
        };
        let rcpt = address(args.first().map_or(&[][..], Vec::as_slice));
        let refusal = match t.ledger.phase.doom() {
            Some(doom) => Some(doom),
            None => c.screen.rcpt(&rcpt).await,
        };
        match refusal {
            Some((r, reason)) => {
                let answer = reply_code(&r);
                t.ledger.last_refusal = Some(Refusal::ours(&r, reason));
                answer
            }
            None => {
                t.ledger.rcpts += 1;
                c.screen.rcpt_accepted(&rcpt);
                Response::Continue
            }
        }
    }
}
