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

mod conversation;
mod headers;

pub use conversation::Conversation;

use crate::gate::Shared;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};

/// Serves one MTA connection to its end (several SMTP sessions when the
/// MTA reuses it).
pub async fn serve<S>(io: S, id: String, shared: Arc<Shared>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    Conversation::new(id, shared).run(io).await;
}
