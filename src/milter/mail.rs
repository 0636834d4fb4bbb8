//! MAIL: the sender's checks; refused now (logged, and given again at
//! each RCPT when the MTA did not wait for it), or a transaction, open or
//! doomed by a verdict delivered at each RCPT.

use super::conversation::{Conversation, State};
use super::txn::{Txn, reply_code};
use crate::checks::{Screened, Stage};
use crate::gate::ledger::TxnPhase;
use crate::telemetry::Verdict;
use crate::wire::milter::Response;
use std::time::Instant;

impl Conversation {
    pub(super) async fn mail(&mut self, args: &[Vec<u8>]) -> Response {
        self.abandon("rset");
        // Settled at CONNECT: its answer again (the first time, when the MTA
        // did not wait at CONNECT; and again at RCPT, should it not wait
        // here either).
        if let State::Settled(answer) = &self.state {
            return answer.clone();
        }
        let authenticated = self.macro_value("{auth_authen}").is_some();
        let budget = std::sync::Arc::clone(&self.shared.budget);
        let Some(c) = self.screening() else {
            return Response::Continue;
        };
        if authenticated {
            c.screen.allow_client();
        }
        let sender = address(args.first().map_or(&[][..], Vec::as_slice));
        let size = args.iter().skip(1).find_map(|a| {
            let a = String::from_utf8_lossy(a);
            let (k, v) = a.split_once('=')?;
            k.eq_ignore_ascii_case("SIZE")
                .then(|| v.parse::<u64>().ok())?
        });
        let started = Instant::now();
        let max_size = c.rt.cfg.limits.max_message_size.0;
        let verdict = match c.screen.mail(&sender, size).await {
            Screened::Refused { reply, reason } => {
                let t = Txn::new(sender, started, 0.0, TxnPhase::Open, max_size, &budget);
                t.record(
                    c,
                    Verdict::from_code(reply.code),
                    Stage::Mail,
                    &reply,
                    &reason,
                    "",
                );
                let answer = reply_code(&reply);
                c.mail_refused = Some(answer.clone());
                return answer;
            }
            Screened::Verdict(v) => v,
        };
        let phase = TxnPhase::after_mail(verdict.decision, verdict.reason);
        c.txn = Some(Txn::new(
            sender,
            started,
            verdict.score,
            phase,
            max_size,
            &budget,
        ));
        Response::Continue
    }
}

/// A path as the MTA sends it (`<a@b>`), without the brackets.
pub(super) fn address(arg: &[u8]) -> String {
    let s = String::from_utf8_lossy(arg);
    s.trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .to_string()
}
