//! The client byte stream of a session: the pregreet wait, reading
//! command lines under their deadlines (stress included), queued replies
//! and their flush with a write deadline, and the close.

use super::*;

impl Session {
    /// postscreen's pregreet test: wait `delay` before the greeting; a
    /// client that sends anything meanwhile is a bot that does not listen.
    /// A client that waits simply continues in this session.
    pub(super) async fn talks_before_greeting(&mut self, delay: Duration) -> bool {
        if !self.rbuf.is_empty() {
            return true;
        }
        self.rbuf.reserve(COMMAND_READ);
        let io = &mut self.io;
        let rbuf = &mut self.rbuf;
        let shutdown = &mut self.shutdown;
        tokio::select! {
            _ = tokio::time::sleep(delay) => false,
            _ = shutdown.reached(Phase::Draining) => false,
            r = io.read_buf(rbuf) => matches!(r, Ok(n) if n > 0),
        }
    }

    /// The shutdown phase that stops this session's waits: between
    /// transactions a drain closes the session; inside one it waits for the
    /// abort, so the transaction can finish.
    pub(super) fn stop_phase(&self) -> Phase {
        if self.txn.is_some() {
            Phase::Abort
        } else {
            Phase::Draining
        }
    }

    /// Ends the client connection (a TLS close_notify is a write too).
    pub(super) async fn close(&mut self) {
        let limit = self.rt.cfg.timeouts.command.0;
        let _ = tokio::time::timeout(limit, self.io.shutdown()).await;
    }

    /// Writes the queued replies. A client that does not read cannot hold
    /// the session: the write must finish within `timeouts.command` and
    /// the session deadline, and gives way to a shutdown (a drain between
    /// transactions, the abort inside one).
    pub(super) async fn flush(&mut self) -> Flushed {
        if self.wbuf.is_empty() {
            return Flushed::Done;
        }
        let stop_at = self.stop_phase();
        // Once shutting down, the last replies (421 4.3.2) get a short while.
        let limit = if self.shutdown.phase() >= stop_at {
            FAREWELL_WRITE.min(self.rt.cfg.timeouts.command.0)
        } else {
            self.rt.cfg.timeouts.command.0
        };
        let until = (tokio::time::Instant::now() + limit).min(self.deadline);
        let io = &mut self.io;
        let wbuf = &self.wbuf;
        let shutdown = &mut self.shutdown;
        let watch_shutdown = shutdown.phase() < stop_at;
        // Progress is kept, so that what was written is not written again.
        let mut done = 0;
        let written = tokio::select! {
            biased;
            _ = shutdown.reached(stop_at), if watch_shutdown => {
                Err(std::io::ErrorKind::Interrupted.into())
            }
            r = tokio::time::timeout_at(until, async {
                while done < wbuf.len() {
                    match io.write(&wbuf[done..]).await? {
                        0 => return Err(std::io::ErrorKind::WriteZero.into()),
                        n => done += n,
                    }
                }
                io.flush().await
            }) => r.unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into())),
        };
        self.wbuf.drain(..done);
        match written {
            Ok(()) => Flushed::Done,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Flushed::Shutdown,
            Err(e) => {
                events::ClientWriteStall {
                    session: &self.peer.id,
                    error: &e,
                }
                .emit();
                Flushed::Failed
            }
        }
    }

    /// Flushes queued replies and reads more input.
    pub(super) async fn fill(&mut self, until: tokio::time::Instant, chunk: usize) -> Fill {
        match self.flush().await {
            Flushed::Done => {}
            Flushed::Failed => return Fill::Closed,
            Flushed::Shutdown => return Fill::Shutdown,
        }
        if self.rpos > 0 {
            self.rbuf.drain(..self.rpos);
            self.rpos = 0;
        }
        self.rbuf.reserve(chunk);
        let until = until.min(self.deadline);
        let stop_at = self.stop_phase();
        let io = &mut self.io;
        let rbuf = &mut self.rbuf;
        let shutdown = &mut self.shutdown;
        tokio::select! {
            biased;
            _ = shutdown.reached(stop_at) => Fill::Shutdown,
            r = tokio::time::timeout_at(until, io.read_buf(rbuf)) => match r {
                Ok(Ok(0)) | Ok(Err(_)) => Fill::Closed,
                Ok(Ok(_)) => Fill::Data,
                Err(_) => Fill::Timeout,
            },
        }
    }

    /// The next command line, without its line end.
    pub(super) async fn next_line(&mut self) -> Line {
        let max = self.cfg().smtp.max_command_line;
        // One deadline for the whole command line, however it trickles in;
        // under stress (looked at again at every read) a shorter one, and
        // a bound on the time to MAIL.
        let started = tokio::time::Instant::now();
        let mut discarding = false;
        loop {
            let pending = &self.rbuf[self.rpos..];
            if let Some(nl) = memchr::memchr(b'\n', pending) {
                let start = self.rpos;
                self.rpos += nl + 1;
                if discarding || nl + 1 > max {
                    return Line::TooLong;
                }
                let mut end = start + nl;
                let crlf = end > start && self.rbuf[end - 1] == b'\r';
                if crlf {
                    end -= 1;
                }
                let line = &self.rbuf[start..end];
                // A CR inside a command, or (in reject mode) a line ended by
                // a bare LF, is the raw material of smuggling: refuse it.
                if memchr::memchr(b'\r', line).is_some()
                    || (!crlf && self.cfg().smtp.bare_newline == BareNewline::Reject)
                {
                    return Line::BareNewline;
                }
                return Line::Command(line.to_vec());
            }
            if pending.len() >= max {
                // Keep sync: drop what we have and answer once the line ends.
                discarding = true;
                self.rpos = self.rbuf.len();
            }
            let stressed = self.shared.limits.stressed();
            let stress = &self.rt.cfg.stress;
            let mut until = started + self.cfg().timeouts.command.0;
            let mut too_slow = false;
            if stressed {
                until = until.min(started + stress.command.0);
                let to_mail = self.connected + stress.time_to_mail.0;
                if !self.reached_mail && to_mail < until {
                    until = to_mail;
                    too_slow = true;
                }
            }
            match self.fill(until, COMMAND_READ).await {
                Fill::Data => {}
                Fill::Closed => return Line::Closed,
                Fill::Timeout if too_slow => return Line::TooSlow,
                Fill::Timeout if stressed => return Line::StressTimeout,
                Fill::Timeout => return Line::Timeout,
                Fill::Shutdown => return Line::Shutdown,
            }
        }
    }
}
