//! The client byte stream of a session (`ClientConn`): it owns the socket
//! (plain or TLS), the read and write buffers, the session deadline and
//! the shutdown signal. Stage handlers never touch the buffers: they read
//! a command line or message bytes, queue replies and flush through it.
//!
//! Also here, on `Session`: the waits whose deadlines depend on session
//! state (a command line under stress, the time to MAIL).

use super::*;

pub(super) struct ClientConn {
    io: Box<dyn Stream>,
    rbuf: Vec<u8>,
    rpos: usize,
    wbuf: Vec<u8>,
    pub(super) shutdown: ShutdownSignal,
    /// The session's end (`timeouts.session`); no wait goes past it.
    pub(super) deadline: tokio::time::Instant,
}

/// A command line taken from the buffer, or why there is none.
pub(super) enum Taken {
    Line(Vec<u8>),
    TooLong,
    BareNewline,
    /// Not a whole line yet.
    More,
}

impl ClientConn {
    pub(super) fn new(
        io: Box<dyn Stream>,
        initial: Vec<u8>,
        shutdown: ShutdownSignal,
        deadline: tokio::time::Instant,
    ) -> ClientConn {
        ClientConn {
            io,
            rbuf: initial,
            rpos: 0,
            wbuf: Vec::new(),
            shutdown,
            deadline,
        }
    }

    /// Queues a reply; written at the next flush.
    pub(super) fn queue(&mut self, r: &Reply) {
        r.write_to(&mut self.wbuf);
    }

    /// Queues bytes already in reply form (greeting, EHLO, relayed replies).
    pub(super) fn queue_raw(&mut self, bytes: &[u8]) {
        self.wbuf.extend_from_slice(bytes);
    }

    /// Queues a reply written in place (no buffer of its own).
    pub(super) fn queue_with(&mut self, write: impl FnOnce(&mut Vec<u8>)) {
        write(&mut self.wbuf);
    }

    /// Reply bytes queued and not yet written.
    pub(super) fn queued(&self) -> usize {
        self.wbuf.len()
    }

    /// postscreen's pregreet test: whether the client sends anything
    /// within `delay` (a shutdown ends the wait as "no").
    pub(super) async fn talks_within(&mut self, delay: Duration) -> bool {
        if !self.rbuf.is_empty() {
            return true;
        }
        self.rbuf.reserve(COMMAND_READ);
        tokio::select! {
            _ = tokio::time::sleep(delay) => false,
            _ = self.shutdown.reached(Phase::Draining) => false,
            r = self.io.read_buf(&mut self.rbuf) => matches!(r, Ok(n) if n > 0),
        }
    }

    /// Ends the connection (a TLS close_notify is a write too, so it
    /// gets the short farewell bound: the client may not be reading).
    pub(super) async fn close(&mut self) {
        let _ = tokio::time::timeout(FAREWELL_WRITE, self.io.shutdown()).await;
    }

    /// Writes the queued replies within `limit()` of starting and the
    /// session deadline; gives way to the shutdown phase `stop_at`. The
    /// limit is asked again every `WRITE_RECHECK` while the write waits
    /// (stress mode may begin meanwhile). What was written is not written
    /// again.
    pub(super) async fn flush(
        &mut self,
        mut limit: impl FnMut() -> Duration,
        stop_at: Phase,
    ) -> Result<(), FlushError> {
        if let Some(written) = self.write_now() {
            return written;
        }
        let started = tokio::time::Instant::now();
        let watch_shutdown = self.shutdown.phase() < stop_at;
        let mut done = 0;
        let written = loop {
            let until = (started + limit()).min(self.deadline);
            let slice = until.min(tokio::time::Instant::now() + WRITE_RECHECK);
            let (io, wbuf, shutdown) = (&mut self.io, &self.wbuf, &mut self.shutdown);
            let done = &mut done;
            let r = tokio::select! {
                biased;
                _ = shutdown.reached(stop_at), if watch_shutdown => break Err(FlushError::Shutdown),
                r = tokio::time::timeout_at(slice, async {
                    while *done < wbuf.len() {
                        match io.write(&wbuf[*done..]).await? {
                            0 => return Err(std::io::ErrorKind::WriteZero.into()),
                            n => *done += n,
                        }
                    }
                    io.flush().await
                }) => r,
            };
            match r {
                Ok(Ok(())) => break Ok(()),
                Ok(Err(e)) => break Err(FlushError::Io(e)),
                Err(_) if slice >= until => {
                    break Err(FlushError::Io(std::io::ErrorKind::TimedOut.into()));
                }
                Err(_) => {}
            }
        };
        self.wbuf.drain(..done);
        self.release_written();
        written
    }

    /// Frees a write buffer that a burst of replies grew, once written.
    fn release_written(&mut self) {
        if self.wbuf.capacity() > REPLY_QUEUE_CAP && self.wbuf.is_empty() {
            self.wbuf = Vec::new();
        }
    }

    /// Writes the queued replies if the socket takes them all at once, as
    /// it does for a client that reads its replies: then no timer, no
    /// shutdown watch and no boxed write are set up. None: some are left
    /// queued (the socket is full), for `flush` to wait on.
    pub(super) fn write_now(&mut self) -> Option<Result<(), FlushError>> {
        use futures_util::FutureExt;
        while !self.wbuf.is_empty() {
            match self.io.write(&self.wbuf).now_or_never()? {
                Ok(0) => return Some(Err(FlushError::Io(std::io::ErrorKind::WriteZero.into()))),
                Ok(n) => {
                    self.wbuf.drain(..n);
                }
                Err(e) => return Some(Err(FlushError::Io(e))),
            }
        }
        // TLS hands its records to the socket here, and may still hold some
        // that an earlier call wrote into it: flushed even when nothing is
        // queued (a plain socket's flush is a no-op).
        let flushed = self.io.flush().now_or_never()?;
        self.release_written();
        Some(flushed.map_err(FlushError::Io))
    }

    /// Reads more input (after the flush the caller did), until `until`
    /// and the session deadline; gives way to the shutdown phase `stop_at`.
    pub(super) async fn read_more(
        &mut self,
        until: tokio::time::Instant,
        chunk: usize,
        stop_at: Phase,
    ) -> Fill {
        if self.rpos > 0 {
            self.rbuf.drain(..self.rpos);
            self.rpos = 0;
        }
        // Between commands nothing is pending: an idle session keeps no
        // buffer, and what arrives is read into the thread's scratch
        // buffer and kept at its size. Message data is read straight in.
        let scratch = chunk <= COMMAND_READ && self.rbuf.is_empty();
        if !scratch {
            self.rbuf.reserve(chunk);
        }
        let until = until.min(self.deadline);
        let (io, rbuf, wbuf, shutdown) = (
            &mut self.io,
            &mut self.rbuf,
            &mut self.wbuf,
            &mut self.shutdown,
        );
        let read = async {
            if scratch {
                // Quiet: nothing to read, nothing to write.
                crate::runtime::scratch::read_quiet(io, rbuf, &mut [wbuf]).await
            } else {
                io.read_buf(rbuf).await
            }
        };
        tokio::select! {
            biased;
            _ = shutdown.reached(stop_at) => Fill::Shutdown,
            r = tokio::time::timeout_at(until, read) => match r {
                Ok(Ok(0)) | Ok(Err(_)) => Fill::Closed,
                Ok(Ok(_)) => Fill::Data,
                Err(_) => Fill::Timeout,
            },
        }
    }

    /// Takes the next whole command line from the buffer. `discarding`: a
    /// line over `max` is being skipped to its end (to stay in sync).
    pub(super) fn take_line(
        &mut self,
        max: usize,
        bare_lf_ok: bool,
        discarding: &mut bool,
    ) -> Taken {
        let pending = &self.rbuf[self.rpos..];
        let Some(nl) = memchr::memchr(b'\n', pending) else {
            if pending.len() >= max {
                *discarding = true;
                self.rpos = self.rbuf.len();
            }
            return Taken::More;
        };
        let start = self.rpos;
        self.rpos += nl + 1;
        if *discarding || nl + 1 > max {
            *discarding = false;
            return Taken::TooLong;
        }
        let mut end = start + nl;
        let crlf = end > start && self.rbuf[end - 1] == b'\r';
        if crlf {
            end -= 1;
        }
        let line = &self.rbuf[start..end];
        // A CR inside a command, or (in reject mode) a line ended by a
        // bare LF, is the raw material of smuggling: refuse it.
        if memchr::memchr(b'\r', line).is_some() || (!crlf && !bare_lf_ok) {
            return Taken::BareNewline;
        }
        Taken::Line(line.to_vec())
    }

    /// Feeds the buffered input to the DATA reader.
    pub(super) fn feed_data(&mut self, reader: &mut DataReader, msg: &mut Vec<u8>) -> bool {
        if self.rpos >= self.rbuf.len() {
            return false;
        }
        let pending = &self.rbuf[self.rpos..];
        if msg.capacity() == 0 && reader.is_storing() {
            // Room for what has arrived, at once: growing line by line
            // would reallocate a dozen times for a small message.
            msg.reserve(pending.len());
        }
        let p = reader.feed(pending, msg);
        self.rpos += p.consumed;
        p.done
    }

    /// After a message: the read buffer may have grown large; do not keep
    /// it while the session idles.
    pub(super) fn shrink(&mut self) {
        if self.rpos >= self.rbuf.len() {
            // The usual case, nothing after the dot yet: free it whole
            // rather than copy into a smaller one.
            self.rbuf = Vec::new();
            self.rpos = 0;
            return;
        }
        self.rbuf.drain(..self.rpos);
        self.rpos = 0;
        self.rbuf.shrink_to(COMMAND_READ);
    }

    /// STARTTLS: drops whatever was pipelined in clear text, then does the
    /// handshake within `limit`. On failure the connection is unusable.
    pub(super) async fn upgrade(
        &mut self,
        acceptor: TlsAcceptor,
        limit: Duration,
    ) -> Option<TlsInfo> {
        self.rbuf.clear();
        self.rpos = 0;
        let io = std::mem::replace(
            &mut self.io,
            Box::new(tokio::io::join(tokio::io::empty(), tokio::io::sink())),
        );
        let Ok(Ok(tls)) = tokio::time::timeout(limit, acceptor.accept(io)).await else {
            return None;
        };
        let (_, conn) = tls.get_ref();
        let info = TlsInfo {
            version: conn
                .protocol_version()
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_string(),
            cipher: conn
                .negotiated_cipher_suite()
                .and_then(|c| c.suite().as_str())
                .unwrap_or("")
                .to_string(),
        };
        self.io = Box::new(tls);
        Some(info)
    }
}

/// Why a write to the client failed (a byte, not a `&str`: every session
/// holds one).
#[derive(Clone, Copy)]
pub(super) enum WriteFailed {
    Error,
    Timeout,
    TimeoutStress,
}

impl WriteFailed {
    fn as_str(self) -> &'static str {
        match self {
            WriteFailed::Error => "write_error",
            WriteFailed::Timeout => "write_timeout",
            WriteFailed::TimeoutStress => "write_timeout_stress",
        }
    }
}

/// Why queued replies could not be written.
pub(super) enum FlushError {
    Shutdown,
    Io(std::io::Error),
}

impl Session {
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

    /// Ends the client connection (without another write to a client
    /// that stopped taking them). Over TLS that is the close_notify and
    /// the FIN; in clear text the socket's close, when the session is
    /// dropped, sends the same FIN: a shutdown first was one more system
    /// call per connection (about 6 µs of kernel time under load, where
    /// it mostly failed with ENOTCONN: the client was gone already).
    pub(super) async fn close(&mut self) {
        if self.write_failed.is_none() && self.tls.is_some() {
            self.conn.close().await;
        }
    }

    /// Writes the queued replies. A client that does not read cannot hold
    /// the session: the write must finish within `timeouts.write` (under
    /// stress `stress.command`, as for reads) and the session deadline, and
    /// gives way to a shutdown (a drain between transactions, the abort
    /// inside one). A write that fails ends the session; why is kept for
    /// the log line of a transaction still open.
    pub(super) async fn flush(&mut self) -> Flushed {
        if self.write_failed.is_some() {
            // One stalled write is all a client gets.
            return Flushed::Failed;
        }
        let stop_at = self.stop_phase();
        let write = self.rt.cfg.timeouts.write.0;
        let stress = self.rt.cfg.stress.command.0;
        // Once shutting down, the last replies (421 4.3.2) get a short while.
        let farewell = self.conn.shutdown.phase() >= stop_at;
        let limits = &self.shared.limits;
        // Whether the limit in force when the write gave up was stress's.
        let mut by_stress = false;
        let limit = || {
            by_stress = !farewell && stress < write && limits.stressed();
            if farewell {
                FAREWELL_WRITE.min(write)
            } else if by_stress {
                stress
            } else {
                write
            }
        };
        match self.conn.flush(limit, stop_at).await {
            Ok(()) => Flushed::Done,
            Err(FlushError::Shutdown) => Flushed::Shutdown,
            Err(FlushError::Io(e)) => {
                let failed = if e.kind() != std::io::ErrorKind::TimedOut {
                    WriteFailed::Error
                } else if by_stress {
                    WriteFailed::TimeoutStress
                } else {
                    WriteFailed::Timeout
                };
                self.write_failed = Some(failed);
                let reason = failed.as_str();
                events::ClientWriteStall {
                    session: &self.peer.id,
                    client: self.peer.addr.ip(),
                    reason,
                    queued: self.conn.queued(),
                    error: &e,
                }
                .emit();
                Flushed::Failed
            }
        }
    }

    /// When the client connected: its deadline less the session's time
    /// (one instant kept per session, not two).
    fn connected(&self) -> tokio::time::Instant {
        let d = self.conn.deadline;
        d.checked_sub(self.rt.cfg.timeouts.session.0).unwrap_or(d)
    }

    /// Why the client went away, for a transaction it leaves open.
    pub(super) fn gone(&self) -> &'static str {
        self.write_failed.map_or("disconnect", WriteFailed::as_str)
    }

    /// Flushes queued replies and reads more input.
    pub(super) async fn fill(&mut self, until: tokio::time::Instant, chunk: usize) -> Fill {
        match self.flush_boxed().await {
            Flushed::Done => {}
            Flushed::Failed => return Fill::Closed,
            Flushed::Shutdown => return Fill::Shutdown,
        }
        let stop_at = self.stop_phase();
        self.conn.read_more(until, chunk, stop_at).await
    }

    /// `flush` from the waits every idle session sits in: boxed, and only
    /// when there is something to write, so that a write's state is not
    /// part of every idle session's future.
    async fn flush_boxed(&mut self) -> Flushed {
        // A write error is left to `flush` to meet again, log and keep.
        if self.write_failed.is_none() && matches!(self.conn.write_now(), Some(Ok(()))) {
            return Flushed::Done;
        }
        Box::pin(self.flush()).await
    }

    /// The next command line, without its line end.
    pub(super) async fn next_line(&mut self) -> Line {
        let max = self.cfg().smtp.max_command_line;
        let bare_lf_ok = self.cfg().smtp.bare_newline != BareNewline::Reject;
        // One deadline for the whole command line, however it trickles in;
        // under stress (looked at again at every read) a shorter one, and
        // a bound on the time to MAIL.
        let started = tokio::time::Instant::now();
        let mut discarding = false;
        loop {
            // Pipelining does not entitle a client to unbounded replies:
            // past the cap, its next command waits until they are written.
            if self.conn.queued() >= REPLY_QUEUE_CAP {
                match self.flush_boxed().await {
                    Flushed::Done => {}
                    Flushed::Failed => return Line::Closed,
                    Flushed::Shutdown => return Line::Shutdown,
                }
            }
            match self.conn.take_line(max, bare_lf_ok, &mut discarding) {
                Taken::Line(l) => return Line::Command(l),
                Taken::TooLong => return Line::TooLong,
                Taken::BareNewline => return Line::BareNewline,
                Taken::More => {}
            }
            let stressed = self.shared.limits.stressed();
            let stress = &self.rt.cfg.stress;
            let mut until = started + self.cfg().timeouts.command.0;
            let mut too_slow = false;
            if stressed {
                until = until.min(started + stress.command.0);
                let to_mail = self.connected() + stress.time_to_mail.0;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::shutdown::Shutdown;
    use tokio::io::AsyncReadExt;

    fn conn(io: tokio::io::DuplexStream, shutdown: &Shutdown) -> ClientConn {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        ClientConn::new(Box::new(io), Vec::new(), shutdown.signal(), deadline)
    }

    /// A reader's replies go out at once; a full socket leaves the rest
    /// queued for the flush that waits (with its timeout); a gone peer
    /// is an error.
    #[tokio::test]
    async fn replies_are_written_at_once_when_the_socket_takes_them() {
        let (ours, mut theirs) = tokio::io::duplex(64);
        let running = Shutdown::new();
        let mut c = conn(ours, &running);
        c.queue(&reply::MAIL_OK);
        assert!(matches!(c.write_now(), Some(Ok(()))));
        assert_eq!(c.queued(), 0);
        let mut got = vec![0u8; 64];
        let n = theirs.read(&mut got).await.unwrap();
        assert_eq!(&got[..n], b"250 2.1.0 Sender OK\r\n");

        // 100 bytes into a 64-byte pipe nobody reads.
        c.queue_raw(&[b'x'; 100]);
        assert!(c.write_now().is_none());
        assert_eq!(c.queued(), 36);
        // The waiting flush gives up at its limit.
        let r = c.flush(|| Duration::from_millis(50), Phase::Abort).await;
        assert!(matches!(r, Err(FlushError::Io(e)) if e.kind() == std::io::ErrorKind::TimedOut));

        drop(theirs);
        c.queue(&reply::MAIL_OK);
        assert!(matches!(c.write_now(), Some(Err(_))));
    }

    /// A stream that takes every write into a buffer of its own (as TLS
    /// does) and whose flush is pending `pending_flushes` times: a full
    /// socket under TLS.
    struct Buffering {
        pending_flushes: usize,
        flushed: Arc<std::sync::atomic::AtomicBool>,
    }

    impl tokio::io::AsyncRead for Buffering {
        fn poll_read(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            _: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Pending
        }
    }

    impl tokio::io::AsyncWrite for Buffering {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::task::Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            if self.pending_flushes > 0 {
                self.pending_flushes -= 1;
                cx.waker().wake_by_ref();
                return std::task::Poll::Pending;
            }
            self.flushed
                .store(true, std::sync::atomic::Ordering::SeqCst);
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    /// Replies the stream took but has not flushed are not written yet:
    /// with nothing left queued, the next write still flushes, and only a
    /// finished flush counts as done.
    #[tokio::test]
    async fn replies_taken_but_not_flushed_are_not_done() {
        let flushed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let io = Buffering {
            pending_flushes: 2,
            flushed: Arc::clone(&flushed),
        };
        let running = Shutdown::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut c = ClientConn::new(Box::new(io), Vec::new(), running.signal(), deadline);
        c.queue(&reply::MAIL_OK);
        assert!(c.write_now().is_none());
        assert_eq!(c.queued(), 0);
        assert!(c.write_now().is_none(), "done before the flush");
        assert!(!flushed.load(std::sync::atomic::Ordering::SeqCst));
        assert!(matches!(c.write_now(), Some(Ok(()))));
        assert!(flushed.load(std::sync::atomic::Ordering::SeqCst));
        // And the waiting flush waits for it too.
        let io = Buffering {
            pending_flushes: 3,
            flushed: Arc::clone(&flushed),
        };
        flushed.store(false, std::sync::atomic::Ordering::SeqCst);
        let mut c = ClientConn::new(Box::new(io), Vec::new(), running.signal(), deadline);
        c.queue(&reply::MAIL_OK);
        let r = c.flush(|| Duration::from_secs(5), Phase::Abort).await;
        assert!(r.is_ok());
        assert!(flushed.load(std::sync::atomic::Ordering::SeqCst));
    }
}
