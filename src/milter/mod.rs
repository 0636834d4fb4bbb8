//! The milter front door: Postfix (`smtpd_milters`) or Sendmail
//! (`INPUT_MAIL_FILTER`) asks about each connection, command and message,
//! and the same screen as the proxy's answers: same checks, rules,
//! verdicts, reply codes and log line (with `mode=milter`). The MTA keeps
//! the SMTP dialogue and the delivery; we only answer and, at the end of
//! a message, add our headers and remove forged ones.
//!
//! Not in this mode: the greeting test (the MTA greets, not us), and
//! anything upstream-related. A local submission (no client address) is
//! accepted unchecked; so is a client the MTA authenticated.
//!
//! # States
//!
//! One MTA connection (`conn.rs`) first agrees the options (OPTNEG, within
//! `milter.negotiate_timeout`; then each packet within `milter.timeout`),
//! then carries one SMTP session after another. `Conversation::state` is
//! the SMTP session; `Client::txn` its transaction, as in the proxy
//! session's table.
//!
//! | state       | holds                                   | packets that act (others: Continue, or no reply where agreed) |
//! |-------------|-----------------------------------------|----------------------------------------------------------------|
//! | `Idle`      | nothing                                 | CONNECT                                                        |
//! | `Settled`   | the answer given at CONNECT             | CONNECT (a new session), MAIL, RCPT (that answer again), QUIT_NC |
//! | `Screening` | `Client`, no `txn`                      | CONNECT, HELO, MAIL, QUIT_NC                                   |
//! | `Screening` | `TxnPhase::Open`                        | the above, RCPT (checked), header, body, end of message, ABORT |
//! | `Screening` | `TxnPhase::Doomed`                      | the above, RCPT (refused with the MAIL verdict)                |
//!
//! | packet         | file         | in `Screening`                                                        |
//! |----------------|--------------|-----------------------------------------------------------------------|
//! | OPTNEG, macros | conversation | the actions and steps agreed; macros kept for the connection          |
//! | CONNECT        | connect      | admission and connect checks: `Screening`, or refused to `Settled`    |
//! | HELO           | connect      | the name and TLS (macros) for the checks                              |
//! | MAIL           | mail         | the MAIL checks: refused now (and at each RCPT), or a `Txn` (`Open` or `Doomed`) |
//! | RCPT           | rcpt         | a MAIL refusal or verdict, or the RCPT checks                         |
//! | header, body   | message      | the message kept within `checks::Hold`                                |
//! | end of message | message      | the DATA checks: our reply, or accepted with header edits             |
//!
//! CONNECT, HELO and MAIL are not waited for when the MTA offers it
//! (Postfix does): a refusal reached at CONNECT or MAIL is logged then and
//! given at each RCPT, as Postfix's `smtpd_delay_reject` does with its own
//! client and sender restrictions; with `reject_at: connect` CONNECT is
//! answered at once. An MTA that waits at MAIL gets the refusal there.
//!
//! Transitions that end a transaction (`txn.rs`; each logs one line):
//!
//! | event                                   | logged as                           |
//! |-----------------------------------------|-------------------------------------|
//! | end of message                          | its verdict                         |
//! | MAIL (a new transaction), ABORT         | abandoned, `rset` (or its refusals) |
//! | CONNECT, QUIT_NC                        | abandoned, `quit`                   |
//! | QUIT, disconnect, timeout, protocol     | abandoned, for that reason          |

mod conn;
mod connect;
mod conversation;
mod headers;
mod mail;
mod message;
mod rcpt;
mod txn;

pub use conversation::{Conversation, STEPS};

use crate::gate::Shared;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};

/// Serves one MTA connection to its end (several SMTP sessions when the
/// MTA reuses it).
pub async fn serve<S>(io: S, id: crate::telemetry::SessionId, shared: Arc<Shared>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    Box::new(Conversation::new(id, shared)).run(io).await;
}

#[cfg(test)]
mod tests;
