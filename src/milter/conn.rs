//! The MTA connection's bytes: read packets within the deadlines, answer
//! each through the conversation, write within `timeouts.write`, and give
//! the buffers back while the MTA is quiet.

use super::conversation::{Conversation, Flow};
use crate::runtime::deadline::Deadline;
use crate::runtime::scratch::read_quiet;
use crate::wire::milter::{Decoder, MilterError, Response};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Read size: a body chunk is at most 64 KiB.
const READ: usize = 64 * 1024;
/// Read size while the MTA is quiet (a command or macro packet).
const IDLE_READ: usize = 512;
/// What the reply buffer starts with.
const REPLIES: usize = 512;
/// A connection quiet this long gives its buffers back.
const BUSY: Duration = Duration::from_secs(1);

impl Conversation {
    /// Serves the MTA until it quits, goes silent past `milter.timeout`
    /// (before the option negotiation: `milter.negotiate_timeout` from
    /// connecting), or sends what is not the protocol.
    ///
    /// Boxed, and each packet's handling boxed: what an idle MTA
    /// connection holds is little more than the conversation.
    pub async fn run<S: AsyncRead + AsyncWrite + Unpin>(mut self: Box<Self>, mut io: S) {
        let cfg = Arc::clone(&self.shared.snapshot().cfg);
        let wait = cfg.milter.timeout.0;
        // An MTA reads its replies at once; one that does not is cut off
        // as a client would be.
        let write_limit = cfg.timeouts.write.0;
        let negotiate_by = tokio::time::Instant::now() + cfg.milter.negotiate_timeout.0;
        // Read straight into the decoder's buffer, and body chunks lent from
        // it into the message: each byte of the body is copied once after
        // the read. Not zeroed: read_buf fills it (a fresh 64 KiB memset
        // per MTA connection was 3% of the profile). Small while the MTA
        // is quiet, grown while it sends a message.
        let mut decoder = Decoder::new(cfg.milter.max_packet.as_usize());
        let mut want = IDLE_READ;
        // Room for the replies to a packet group (our header edits at the
        // end of a message are the longest).
        let mut out = Vec::with_capacity(REPLIES);
        // One timer for every read, moved on at each (about 6 a message),
        // as upstream connections keep theirs.
        let mut deadline = Deadline::new();
        let why = 'conversation: loop {
            loop {
                match self.lent(&mut decoder) {
                    Ok(Some(answer)) => {
                        if let Some(r) = answer {
                            r.encode(&mut out);
                        }
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(milter = %self.id, error = %e, "milter protocol error; closing");
                        break 'conversation "protocol";
                    }
                }
                match decoder.command() {
                    Ok(Some(c)) => {
                        if let Flow::Quit = self.handle(c, &mut out).await {
                            let _ = write(&mut io, &out, write_limit).await;
                            break 'conversation "quit";
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(milter = %self.id, error = %e, "milter protocol error; closing");
                        break 'conversation "protocol";
                    }
                }
            }
            if !out.is_empty() {
                if !write(&mut io, &out, write_limit).await {
                    break "disconnect";
                }
                out.clear();
            }
            let until = if self.negotiated {
                tokio::time::Instant::now() + wait
            } else {
                negotiate_by
            };
            let into = decoder.buffer();
            into.reserve(want);
            let quick = until.min(tokio::time::Instant::now() + BUSY);
            let read = match deadline.within(quick, io.read_buf(into)).await {
                Some(r) => Some(r),
                None => {
                    // Quiet: an idle MTA connection keeps no buffer.
                    out = Vec::new();
                    decoder.shrink();
                    want = IDLE_READ;
                    let quiet = read_quiet(&mut io, decoder.buffer(), &mut []);
                    deadline.within(until, quiet).await
                }
            };
            match read {
                Some(Ok(0)) | Some(Err(_)) => break "disconnect",
                None if !self.negotiated => break "negotiate_timeout",
                None => break "timeout",
                Some(Ok(n)) => {
                    if n >= want {
                        want = (want * 8).min(READ);
                    }
                }
            }
        };
        if why == "negotiate_timeout" {
            tracing::info!(milter = %self.id, "no option negotiation in time; closing");
        }
        self.end_session(why);
    }
}

impl Conversation {
    /// Serves the next packet if it is one of those a message brings most
    /// (a body chunk, a header field, macros), lent from the read buffer
    /// rather than decoded into copies: Some(its answer, if any), or None
    /// when the next packet is another or not whole yet.
    fn lent(&mut self, decoder: &mut Decoder) -> Result<Option<Option<Response>>, MilterError> {
        if let Some(chunk) = decoder.body()? {
            return Ok(Some(self.body(chunk)));
        }
        if let Some((name, value)) = decoder.header()? {
            return Ok(Some(self.header(name, value)));
        }
        let macros = &mut self.macros;
        Ok(decoder.macros(|n, v| macros.set(n, v))?.map(|()| None))
    }
}

/// Writes within `wait`; false when the MTA did not take it.
async fn write<S: AsyncWrite + Unpin>(io: &mut S, out: &[u8], wait: Duration) -> bool {
    matches!(
        tokio::time::timeout(wait, io.write_all(out)).await,
        Ok(Ok(()))
    )
}
