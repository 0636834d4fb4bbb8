//! One client session: the SMTP state machine, relaying each transaction
//! live to upstream. Generic over the byte stream, so tests drive it over an
//! in-memory pipe.
//!
//! Order of replies: commands are handled one at a time in arrival order and
//! replies are queued; the queue is flushed whenever no complete command is
//! buffered (RFC 2920), so pipelined batches get one write.
//!
//! # States
//!
//! The client's transaction and upstream's must never drift apart: whatever
//! the client can send next, upstream must be in the state that makes our
//! relaying of it mean the same thing. `Session::txn` holds the client side;
//! `UpstreamConn::in_transaction` says whether upstream holds an open MAIL.
//!
//! | state   | `txn`                    | upstream holds         | legal (others: 503 5.5.1)                   |
//! |---------|--------------------------|------------------------|---------------------------------------------|
//! | Greeted | none, no HELO            | no connection          | EHLO HELO STARTTLS NOOP RSET VRFY HELP QUIT |
//! | Ready   | none                     | nothing, or idle conn  | the above, MAIL                             |
//! | Doomed  | `TxnPhase::Doomed`       | nothing (never told)   | the above but MAIL; RCPT (refused); DATA    |
//! | Open    | `TxnPhase::Open`, 0 rcpt | MAIL                   | RCPT; DATA (554 no valid recipients)        |
//! | Open    | `TxnPhase::Open`, n rcpt | MAIL and the n RCPTs   | RCPT, DATA                                  |
//! | Broken  | `TxnPhase::Broken`       | connection lost        | RCPT, DATA (451 4.4.2)                      |
//!
//! Transitions that end a transaction:
//!
//! | event                                   | client side        | upstream side                        |
//! |-----------------------------------------|--------------------|--------------------------------------|
//! | upstream's final reply after the dot    | ends (logged)      | ended by upstream itself             |
//! | local refusal after the dot             | ends (logged)      | RSET                                 |
//! | upstream refuses DATA (not 354)         | ends (logged)      | RSET                                 |
//! | RSET                                    | ends (abandoned)   | RSET, always while connected         |
//! | EHLO / HELO                             | ends (abandoned)   | RSET (new name: reconnect at MAIL)   |
//! | STARTTLS                                | ends (abandoned)   | connection closed                    |
//! | QUIT, disconnect, timeout, shutdown     | ends (abandoned)   | QUIT, or closed mid-DATA             |
//! | upstream lost or 421                    | `TxnPhase::Broken` | connection dropped                   |
//!
//! `end_transaction` is the one place that ends both sides; every row above
//! goes through it (or through `finish_txn` plus upstream's own end).

use crate::checks::pool::SharedMessage;
use crate::checks::{CheckLog, Checker, ConnChecks, Envelope, Outcome, Pipeline, Stage, TxnChecks};
use crate::config::{Action, BareNewline, Config, RejectAt};
use crate::rules::{Facts, RuleSet, RuleStage, Rules};
use crate::runtime::Stream;
use crate::runtime::limits::{ConnectionLimits, MemoryBudget, Reservation};
use crate::runtime::shutdown::{Phase, ShutdownSignal};
use crate::smtp::ehlo::Offer;
use crate::telemetry::events;
use crate::telemetry::{RefusedConnection, TxnRecord, Verdict};
use crate::upstream::{ClientIdentity, OpenError, UpStage, Upstream, UpstreamConn, UpstreamError};
use crate::verdict::Decision;
use crate::wire::command::{self, Command, CommandError, MailCmd, RcptCmd};
use crate::wire::data::DataReader;
use crate::wire::path::Kind;
use crate::wire::reply::{self, Reply, UpstreamReply};
use arc_swap::ArcSwap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsAcceptor;

/// Everything a session reads that a reload can change. A session takes
/// the current one when it starts and keeps it to the end; a reload of the
/// config or the certificate builds a new one.
pub struct Runtime {
    pub cfg: Arc<Config>,
    pub checks: Pipeline,
    /// DNSBL, SPF, DKIM, DMARC, ARC, iprev.
    pub checker: Arc<Checker>,
    /// STARTTLS, when a certificate is configured.
    pub tls: Option<TlsAcceptor>,
}

impl Runtime {
    /// The size and recipient limits as a check pipeline.
    pub fn limit_checks(cfg: &Config) -> Pipeline {
        Pipeline::new(vec![Box::new(crate::checks::Limits {
            max_message_size: cfg.limits.max_message_size.0,
            max_recipients: cfg.limits.max_recipients,
        })])
    }
}

/// What all sessions share.
pub struct Shared {
    pub runtime: ArcSwap<Runtime>,
    pub upstream: Arc<Upstream>,
    pub budget: Arc<MemoryBudget>,
    /// Open sessions; tells when the gate is under stress.
    pub limits: Arc<ConnectionLimits>,
    /// The administrators' rules, reloadable.
    pub rules: Arc<Rules>,
}

impl Shared {
    /// The runtime new sessions get.
    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.load_full()
    }
}

/// The negotiated TLS parameters, for the log line.
#[derive(Debug, Clone)]
struct TlsInfo {
    version: String,
    cipher: String,
}

/// Who is on the other end.
#[derive(Debug, Clone)]
pub struct Peer {
    pub id: String,
    pub addr: SocketAddr,
    pub local: SocketAddr,
}

const COMMAND_READ: usize = 1024;
/// How long the replies written while shutting down may take.
const FAREWELL_WRITE: Duration = Duration::from_secs(2);
const DATA_READ: usize = 64 * 1024;

/// Where a transaction stands (see the state table at the top).
#[derive(Debug, Clone)]
enum TxnPhase {
    /// MAIL accepted and relayed; upstream holds the same transaction.
    Open,
    /// A verdict reached at MAIL, delivered at each RCPT (delayed reject);
    /// upstream never heard of this transaction.
    Doomed { reply: Reply, reason: String },
    /// Upstream failed mid-transaction: everything else answers 4xx.
    Broken,
}

/// One MAIL..end-of-transaction.
struct Txn {
    mail: MailCmd,
    phase: TxnPhase,
    rcpts: usize,
    started: Instant,
    /// The last refusal at RCPT, to tell reject from tempfail if nothing was accepted.
    last_rcpt_refusal: Option<Refusal>,
    checks: TxnChecks,
    /// Summed score of this transaction's latest decision, for the log.
    score: f64,
    /// Recipients upstream accepted (for the rules at DATA).
    rcpt_list: Vec<String>,
}

impl Txn {
    fn new(mail: MailCmd, started: Instant, checks: TxnChecks, score: f64, phase: TxnPhase) -> Txn {
        Txn {
            mail,
            phase,
            rcpts: 0,
            started,
            last_rcpt_refusal: None,
            checks,
            score,
            rcpt_list: Vec::new(),
        }
    }
}

/// A received message and its share of the memory budget, given back when
/// the last holder (the session, or a rule evaluation past its budget)
/// lets it go.
struct Held {
    bytes: Vec<u8>,
    _reservation: Reservation,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

/// A reply's code and enhanced code, for the log line.
struct Said {
    code: u16,
    enhanced: String,
}

impl From<&Reply> for Said {
    fn from(r: &Reply) -> Said {
        Said {
            code: r.code,
            enhanced: r.enhanced_code().unwrap_or_default(),
        }
    }
}

impl From<&UpstreamReply> for Said {
    fn from(r: &UpstreamReply) -> Said {
        Said {
            code: r.code,
            enhanced: r.enhanced(),
        }
    }
}

/// A refusal remembered for the log line.
struct Refusal {
    code: u16,
    enhanced: String,
    reason: String,
    upstream: String,
}

/// How writing the queued replies went.
#[derive(Debug, PartialEq, Eq)]
enum Flushed {
    Done,
    /// The client did not take them in time, or the connection failed.
    Failed,
    /// A shutdown came first; what was not written is still queued.
    Shutdown,
}

enum Fill {
    Data,
    Closed,
    Timeout,
    Shutdown,
}

enum Line {
    Command(Vec<u8>),
    BareNewline,
    TooLong,
    Closed,
    Timeout,
    /// Under stress: a command took longer than `stress.command`.
    StressTimeout,
    /// Under stress: no MAIL within `stress.time_to_mail` of connecting.
    TooSlow,
    Shutdown,
}

/// Why no upstream connection could be had for a MAIL.
enum Unavailable {
    /// Upstream is down or misbehaving: 451, counted as an outage.
    Down,
    /// Upstream refused the client's HELO name: relayed as upstream said.
    Refused(UpstreamReply),
}

/// What `end_transaction` does to upstream.
#[derive(Clone, Copy)]
enum UpReset {
    /// RSET when upstream holds a transaction.
    IfOpen,
    /// RSET whenever connected (the client's own RSET).
    Always,
    /// QUIT and close (the connection's context changed, e.g. STARTTLS).
    Close,
}

/// How a session ends.
enum Next {
    Continue,
    Close,
}

pub struct Session {
    io: Box<dyn Stream>,
    rbuf: Vec<u8>,
    rpos: usize,
    wbuf: Vec<u8>,
    shared: Arc<Shared>,
    peer: Peer,
    shutdown: ShutdownSignal,
    deadline: tokio::time::Instant,
    helo: Option<String>,
    esmtp: bool,
    tls: Option<TlsInfo>,
    offer: Offer,
    txn: Option<Txn>,
    upstream: Option<UpstreamConn>,
    /// The HELO name upstream was told about on the open connection.
    upstream_helo: Option<String>,
    errors: usize,
    /// When the client connected, and whether it has sent MAIL yet (under
    /// stress the time to MAIL is bounded).
    connected: tokio::time::Instant,
    reached_mail: bool,
    conn_checks: ConnChecks,
    /// The rules this session started with (a reload affects new sessions).
    rules: Arc<RuleSet>,
    /// Likewise the config, checks and certificate.
    rt: Arc<Runtime>,
    checker: Arc<Checker>,
}

impl Session {
    pub fn new(
        io: Box<dyn Stream>,
        peer: Peer,
        shared: Arc<Shared>,
        shutdown: ShutdownSignal,
        initial: Vec<u8>,
    ) -> Session {
        let rt = shared.runtime();
        let deadline = tokio::time::Instant::now() + rt.cfg.timeouts.session.0;
        // DNSBL and iprev start now and are awaited only when needed.
        let checker = Arc::clone(&rt.checker);
        let conn_checks = checker.connect(peer.addr.ip(), shared.upstream.wants_client_name());
        Session {
            rt,
            checker,
            rules: shared.rules.current(),
            conn_checks,
            io,
            rbuf: initial,
            rpos: 0,
            wbuf: Vec::with_capacity(256),
            peer,
            shutdown,
            deadline,
            helo: None,
            esmtp: false,
            tls: None,
            offer: Offer::default(),
            txn: None,
            upstream: None,
            upstream_helo: None,
            errors: 0,
            connected: tokio::time::Instant::now(),
            reached_mail: false,
            shared,
        }
    }

    /// Runs the session to its end.
    pub async fn run(mut self) {
        if let Some(delay) = self.rt.cfg.greeting.delay
            && self.talks_before_greeting(delay.0).await
        {
            self.reply(&reply::PREGREET);
            RefusedConnection {
                session: &self.peer.id,
                client_ip: self.peer.addr.ip(),
                code: reply::PREGREET.code,
                enhanced: &reply::PREGREET.enhanced_code().unwrap_or_default(),
                reason: "pregreet",
            }
            .emit();
            let _ = self.flush().await;
            self.close().await;
            return;
        }
        if self.rt.cfg.checks.reject_at == RejectAt::Connect {
            let checker = Arc::clone(&self.checker);
            let (outcome, log) = checker.at_connect(&mut self.conn_checks).await;
            let refusal = match outcome.decision {
                Decision::Reject(r) => Some(Reply { code: 554, ..r }),
                Decision::Tempfail(r) => Some(Reply { code: 421, ..r }),
                _ => None,
            };
            if let Some(r) = refusal {
                self.reply(&r);
                RefusedConnection {
                    session: &self.peer.id,
                    client_ip: self.peer.addr.ip(),
                    code: r.code,
                    enhanced: &r.enhanced_code().unwrap_or_default(),
                    reason: &outcome.reason,
                }
                .emit();
                tracing::debug!(session = %self.peer.id, dnsbl = ?log.dnsbl, "refused at connect");
                let _ = self.flush().await;
                self.close().await;
                return;
            }
        }
        let greeting = format!("220 {} ESMTP Portcullis\r\n", self.rt.cfg.hostname);
        self.wbuf.extend_from_slice(greeting.as_bytes());
        loop {
            let line = self.next_line().await;
            let next = match line {
                Line::Command(l) => self.handle(&l).await,
                Line::TooLong => self.error(reply::LINE_TOO_LONG),
                Line::BareNewline => self.error(reply::BARE_NEWLINE_IN_COMMAND),
                Line::Closed => Next::Close,
                Line::Timeout => {
                    self.reply(&reply::TIMEOUT);
                    Next::Close
                }
                Line::StressTimeout | Line::TooSlow => {
                    let why = if matches!(line, Line::TooSlow) {
                        "time_to_mail"
                    } else {
                        "command"
                    };
                    events::ClosedUnderStress {
                        session: &self.peer.id,
                        client: self.peer.addr.ip(),
                        reason: why,
                    }
                    .emit();
                    self.reply(&reply::TOO_SLOW_UNDER_STRESS);
                    Next::Close
                }
                Line::Shutdown => {
                    self.reply(&reply::SHUTTING_DOWN);
                    Next::Close
                }
            };
            if let Next::Close = next {
                break;
            }
        }
        self.end_txn_abandoned("disconnect");
        let _ = self.flush().await;
        self.close().await;
        if let Some(up) = self.upstream.take() {
            up.quit().await;
        }
    }

    /// postscreen's pregreet test: wait `delay` before the greeting; a
    /// client that sends anything meanwhile is a bot that does not listen.
    /// A client that waits simply continues in this session.
    async fn talks_before_greeting(&mut self, delay: Duration) -> bool {
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

    fn cfg(&self) -> &Config {
        &self.rt.cfg
    }

    fn reply(&mut self, r: &Reply) {
        r.write_to(&mut self.wbuf);
    }

    /// A protocol error: reply, and hang up after `max_errors` (fewer
    /// under stress).
    fn error(&mut self, r: Reply) -> Next {
        self.errors += 1;
        let max = if self.shared.limits.stressed() {
            self.cfg()
                .stress
                .max_errors
                .min(self.cfg().limits.max_errors)
        } else {
            self.cfg().limits.max_errors
        };
        if self.errors >= max {
            self.reply(&reply::TOO_MANY_ERRORS);
            return Next::Close;
        }
        self.reply(&r);
        Next::Continue
    }

    /// The shutdown phase that stops this session's waits: between
    /// transactions a drain closes the session; inside one it waits for the
    /// abort, so the transaction can finish.
    fn stop_phase(&self) -> Phase {
        if self.txn.is_some() {
            Phase::Abort
        } else {
            Phase::Draining
        }
    }

    /// Ends the client connection (a TLS close_notify is a write too).
    async fn close(&mut self) {
        let limit = self.rt.cfg.timeouts.command.0;
        let _ = tokio::time::timeout(limit, self.io.shutdown()).await;
    }

    /// Writes the queued replies. A client that does not read cannot hold
    /// the session: the write must finish within `timeouts.command` and
    /// the session deadline, and gives way to a shutdown (a drain between
    /// transactions, the abort inside one).
    async fn flush(&mut self) -> Flushed {
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
    async fn fill(&mut self, until: tokio::time::Instant, chunk: usize) -> Fill {
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
    async fn next_line(&mut self) -> Line {
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

    async fn handle(&mut self, line: &[u8]) -> Next {
        if memchr::memchr(0, line).is_some() {
            return self.error(reply::NUL_IN_COMMAND);
        }
        let cmd = match command::parse(line) {
            Ok(c) => c,
            Err(CommandError::Unknown) => return self.error(reply::SYNTAX),
            Err(CommandError::Syntax(s)) => {
                return self.error(reply::PARAM_SYNTAX.with_text(format!("Syntax: {s}")));
            }
            Err(CommandError::BadParameter) => return self.error(reply::PARAM_SYNTAX),
            Err(CommandError::BadHelo) => return self.error(reply::BAD_HELO),
            Err(CommandError::BadPath(kind, why)) => {
                tracing::debug!(session = %self.peer.id, %why, "bad path");
                return self.error(match kind {
                    Kind::Reverse => reply::BAD_SENDER,
                    Kind::Forward => reply::BAD_RECIPIENT,
                });
            }
            Err(CommandError::UnsupportedParameter(p)) => {
                return self.error(
                    reply::PARAM_UNSUPPORTED.with_text(format!("Unsupported parameter {p}")),
                );
            }
        };
        match cmd {
            Command::Ehlo(host) => self.hello(host, true).await,
            Command::Helo(host) => self.hello(host, false).await,
            Command::Mail(m) => self.mail(m).await,
            Command::Rcpt(r) => self.rcpt(r).await,
            Command::Data => self.data().await,
            Command::Rset => {
                self.end_transaction("rset", UpReset::Always).await;
                self.reply(&reply::RSET_OK);
                Next::Continue
            }
            Command::Noop => {
                self.reply(&reply::NOOP_OK);
                Next::Continue
            }
            Command::Vrfy => {
                self.reply(&reply::VRFY);
                Next::Continue
            }
            Command::Help => {
                self.reply(&reply::HELP);
                Next::Continue
            }
            Command::Quit => {
                self.end_txn_abandoned("quit");
                self.reply(&reply::BYE);
                Next::Close
            }
            Command::StartTls => self.starttls().await,
            Command::NotImplemented(_) => self.error(reply::NOT_IMPLEMENTED),
        }
    }

    async fn hello(&mut self, host: String, esmtp: bool) -> Next {
        // RFC 5321 4.1.4: EHLO/HELO aborts a transaction, on both sides.
        self.end_transaction("helo", UpReset::IfOpen).await;
        self.helo = Some(host);
        self.esmtp = esmtp;
        let cfg = &self.rt.cfg;
        let caps = self.shared.upstream.capabilities_for_client().await;
        let starttls = self.tls.is_none() && self.rt.tls.clone().is_some();
        self.offer = Offer::new(caps.as_deref(), cfg.limits.max_message_size.0, starttls);
        if esmtp {
            let mut out = std::mem::take(&mut self.wbuf);
            self.offer.write_reply(&cfg.hostname, &mut out);
            self.wbuf = out;
        } else {
            let line = format!("250 {}\r\n", cfg.hostname);
            self.wbuf.extend_from_slice(line.as_bytes());
        }
        Next::Continue
    }

    /// What the rules can see of this session and its transaction now.
    fn facts(&self) -> Facts<'_> {
        Facts {
            ip: Some(self.peer.addr.ip()),
            reverse: self.conn_checks.reverse(),
            helo: self.helo.as_deref(),
            mail_from: self.txn.as_ref().map(|t| t.mail.address.as_str()),
            rcpt_count: self.txn.as_ref().map_or(0, |t| t.rcpts),
            tls: self.tls.is_some(),
            ..Facts::default()
        }
    }

    fn envelope(&self) -> Envelope<'_> {
        Envelope {
            client: self.peer.addr,
            helo: self.helo.as_deref(),
            mail_from: self.txn.as_ref().map(|t| t.mail.address.as_str()),
            declared_size: self.txn.as_ref().and_then(|t| t.mail.size),
            rcpts: self.txn.as_ref().map_or(0, |t| t.rcpts),
            message: None,
        }
    }

    async fn mail(&mut self, m: MailCmd) -> Next {
        self.reached_mail = true;
        if self.helo.is_none() {
            return self.error(reply::NEED_HELO);
        }
        if self.txn.is_some() {
            return self.error(reply::NESTED_MAIL);
        }
        if let Some(p) = self.offer.unsupported_mail_param(&m) {
            return self
                .error(reply::PARAM_UNSUPPORTED.with_text(format!("Unsupported parameter {p}")));
        }
        let started = Instant::now();
        let outcome = {
            let mut env = self.envelope();
            env.mail_from = Some(&m.address);
            env.declared_size = m.size;
            self.rt.checks.run(Stage::Mail, &env).await
        };
        if let Outcome::Refuse { reply, reason } = outcome {
            // Refused before the checks ran: no score of its own.
            self.log_mail_refused(&m, started, 0.0, &reply, reason, "");
            self.reply(&reply);
            return Next::Continue;
        }
        let checker = Arc::clone(&self.checker);
        let helo = self.helo.clone().unwrap_or_default();
        let rules = Arc::clone(&self.rules);
        let (checks, verdict) = checker
            .at_mail(
                &mut self.conn_checks,
                &rules,
                self.tls.is_some(),
                &helo,
                &m.address,
            )
            .await;
        let score = verdict.score;
        if let Decision::Reject(reply) | Decision::Tempfail(reply) = verdict.decision {
            // Delayed reject: accept MAIL here (upstream never hears of it) and
            // refuse every RCPT, so the log line names sender and recipients.
            let phase = TxnPhase::Doomed {
                reply,
                reason: verdict.reason,
            };
            self.txn = Some(Txn::new(m, started, checks, score, phase));
            self.reply(&reply::MAIL_OK);
            return Next::Continue;
        }
        match self.ensure_upstream().await {
            Ok(()) => {}
            Err(Unavailable::Down) => {
                let r = reply::UPSTREAM_UNAVAILABLE;
                self.log_mail_refused(&m, started, score, &r, "upstream:unavailable", "");
                self.reply(&r);
                return Next::Continue;
            }
            Err(Unavailable::Refused(r)) => {
                self.log_mail_refused(&m, started, score, &r, "upstream:helo", &r.text());
                self.relay(&r);
                return Next::Continue;
            }
        }
        let Some(up) = self.upstream.as_mut() else {
            return Next::Continue;
        };
        match up.mail(&m.line).await {
            Ok(r) => {
                self.relay(&r);
                if r.is_positive() {
                    self.txn = Some(Txn::new(m, started, checks, score, TxnPhase::Open));
                } else {
                    self.log_mail_refused(&m, started, score, &r, "upstream", &r.text());
                }
            }
            Err(e) => {
                self.upstream_failed(&e);
                self.log_mail_refused(
                    &m,
                    started,
                    score,
                    &reply::UPSTREAM_LOST,
                    "upstream:lost",
                    &e.to_string(),
                );
                self.reply(&reply::UPSTREAM_LOST);
            }
        }
        Next::Continue
    }

    async fn rcpt(&mut self, r: RcptCmd) -> Next {
        let Some(txn) = self.txn.as_ref() else {
            return self.error(reply::NEED_MAIL);
        };
        match &txn.phase {
            TxnPhase::Open => {}
            TxnPhase::Broken => {
                self.reply(&reply::UPSTREAM_LOST);
                return Next::Continue;
            }
            TxnPhase::Doomed { reply, reason } => {
                let (reply, reason) = (reply.clone(), reason.clone());
                return self.refuse_rcpt(reply, reason);
            }
        }
        if let Some(p) = self.offer.unsupported_rcpt_param(&r) {
            return self
                .error(reply::PARAM_UNSUPPORTED.with_text(format!("Unsupported parameter {p}")));
        }
        let outcome = self.rt.checks.run(Stage::Rcpt, &self.envelope()).await;
        let mut refusal = match outcome {
            Outcome::Refuse { reply, reason } => Some((reply, reason.to_string())),
            Outcome::Continue => None,
        };
        if refusal.is_none() {
            // Rules of the RCPT stage, for this recipient.
            let mut checks = self
                .txn
                .as_mut()
                .map(|t| std::mem::take(&mut t.checks))
                .unwrap_or_default();
            let facts = Facts {
                rcpts: vec![r.address.as_str()],
                ..self.facts()
            };
            if let Some(o) = self.checker.at_rcpt(&self.rules, &mut checks, &facts) {
                match o.decision {
                    Decision::Reject(reply) | Decision::Tempfail(reply) => {
                        refusal = Some((reply, o.reason))
                    }
                    Decision::Accept | Decision::Tag => {}
                }
            }
            if let Some(t) = self.txn.as_mut() {
                t.checks = checks;
            }
        }
        if let Some((reply, reason)) = refusal {
            return self.refuse_rcpt(reply, reason);
        }
        let Some(up) = self.upstream.as_mut() else {
            self.reply(&reply::UPSTREAM_LOST);
            return Next::Continue;
        };
        match up.command(&r.line, UpStage::Rcpt).await {
            Ok(rep) => {
                self.relay(&rep);
                if let Some(t) = self.txn.as_mut() {
                    if rep.is_positive() {
                        t.rcpts += 1;
                        t.rcpt_list.push(r.address.clone());
                    } else {
                        t.last_rcpt_refusal = Some(Refusal {
                            code: rep.code,
                            enhanced: rep.enhanced(),
                            reason: "upstream".into(),
                            upstream: rep.text(),
                        });
                    }
                }
            }
            Err(e) => {
                self.upstream_failed(&e);
                self.reply(&reply::UPSTREAM_LOST);
            }
        }
        Next::Continue
    }

    /// Refuses one recipient ourselves (it never reaches upstream), keeping
    /// the refusal for the log line.
    fn refuse_rcpt(&mut self, reply: Reply, reason: String) -> Next {
        if let Some(t) = self.txn.as_mut() {
            t.last_rcpt_refusal = Some(Refusal {
                code: reply.code,
                enhanced: reply.enhanced_code().unwrap_or_default(),
                reason,
                upstream: String::new(),
            });
        }
        self.reply(&reply);
        Next::Continue
    }

    async fn data(&mut self) -> Next {
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
        let cfg = Arc::clone(&self.rt.cfg);
        let mut reader = DataReader::new(cfg.limits.max_message_size.0, cfg.smtp.max_line_length);
        let mut msg: Vec<u8> = Vec::new();
        let mut reservation = self.shared.budget.reservation();
        let mut over_budget = false;
        loop {
            if self.rpos < self.rbuf.len() {
                let p = reader.feed(&self.rbuf[self.rpos..], &mut msg);
                self.rpos += p.consumed;
                if reader.is_storing() && !reservation.ensure(msg.capacity()) {
                    over_budget = true;
                    reader.stop_storing();
                }
                if !reader.is_storing() && msg.capacity() > 0 {
                    msg = Vec::new();
                    reservation.release();
                }
                if p.done {
                    break;
                }
            }
            let until = tokio::time::Instant::now() + cfg.timeouts.data.0;
            match self.fill(until, DATA_READ).await {
                Fill::Data => {}
                Fill::Closed => {
                    // Nothing reaches upstream: its connection closes before any dot.
                    self.drop_upstream();
                    self.end_txn_abandoned("disconnect");
                    return Next::Close;
                }
                Fill::Timeout => {
                    self.drop_upstream();
                    self.finish_txn(
                        reader.size(),
                        Stage::Data,
                        &reply::TIMEOUT,
                        "timeout:data",
                        "",
                    );
                    self.reply(&reply::TIMEOUT);
                    return Next::Close;
                }
                Fill::Shutdown => {
                    self.drop_upstream();
                    self.finish_txn(
                        reader.size(),
                        Stage::Data,
                        &reply::SHUTTING_DOWN,
                        "shutdown",
                        "",
                    );
                    self.reply(&reply::SHUTTING_DOWN);
                    return Next::Close;
                }
            }
        }
        // The DATA buffer may have grown large; do not keep it while idle.
        self.rbuf.drain(..self.rpos);
        self.rpos = 0;
        self.rbuf.shrink_to(COMMAND_READ);
        let size = reader.size();
        let a = reader.anomalies;
        // Rules on the message parse it whole (decoded parts, headers): up
        // to its size again, held from the budget like the message itself.
        if !over_budget
            && self.rules.has_stage(RuleStage::Data)
            && !reservation.ensure(msg.capacity() + msg.len())
        {
            over_budget = true;
        }
        let local_refusal = if reader.oversized() {
            Some((reply::SIZE_EXCEEDED, "limit:size"))
        } else if over_budget {
            Some((reply::OUT_OF_MEMORY, "limit:memory_budget"))
        } else if a.nul {
            Some((reply::NUL_IN_DATA, "protocol:nul"))
        } else if a.bare_newline() && cfg.smtp.bare_newline == BareNewline::Reject {
            Some((reply::BARE_NEWLINE, "protocol:bare_newline"))
        } else if a.long_line {
            Some((reply::LONG_LINE_IN_DATA, "protocol:line_length"))
        } else {
            None
        };
        let local_refusal = match local_refusal {
            Some(r) => Some(r),
            None => {
                let mut env = self.envelope();
                env.message = Some(&msg);
                match self.rt.checks.run(Stage::Data, &env).await {
                    Outcome::Refuse { reply, reason } => Some((reply, reason)),
                    Outcome::Continue => None,
                }
            }
        };
        if let Some((r, reason)) = local_refusal {
            drop(msg);
            self.finish_txn(size, Stage::Data, &r, reason, "");
            self.end_transaction("", UpReset::IfOpen).await;
            self.reply(&r);
            return Next::Continue;
        }
        // From here the message is shared with the rule pool; it stays
        // counted against the budget until the last holder lets it go.
        let msg = Arc::new(Held {
            bytes: msg,
            _reservation: reservation,
        });
        let Some(mut checks) = self.txn.as_mut().map(|t| std::mem::take(&mut t.checks)) else {
            return Next::Continue;
        };
        let facts = Facts {
            rcpts: self
                .txn
                .iter()
                .flat_map(|t| t.rcpt_list.iter().map(String::as_str))
                .collect(),
            size: Some(size),
            ..self.facts()
        };
        let checked = self
            .checker
            .at_data(
                &self.conn_checks,
                &mut checks,
                &self.rules,
                facts,
                &(Arc::clone(&msg) as SharedMessage),
            )
            .await;
        if let Some(t) = self.txn.as_mut() {
            t.checks = checks;
            t.score = checked.outcome.score;
        }
        match checked.outcome.decision {
            Decision::Reject(r) | Decision::Tempfail(r) => {
                drop(msg);
                self.finish_txn(size, Stage::Data, &r, &checked.outcome.reason, "");
                self.end_transaction("", UpReset::IfOpen).await;
                self.reply(&r);
                return Next::Continue;
            }
            Decision::Accept | Decision::Tag => {}
        }
        // Our headers first, then the message without forged
        // Authentication-Results fields: slices, never a copy of the body.
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

    async fn starttls(&mut self) -> Next {
        let Some(acceptor) = self.rt.tls.clone() else {
            return self.error(reply::NOT_IMPLEMENTED);
        };
        if self.tls.is_some() {
            return self.error(reply::TLS_ALREADY);
        }
        self.reply(&reply::READY_TLS);
        if self.flush().await != Flushed::Done {
            return Next::Close;
        }
        // Anything pipelined after STARTTLS was sent in clear text: discard it
        // unanswered (CVE-2011-0411 class).
        self.rbuf.clear();
        self.rpos = 0;
        let io = std::mem::replace(
            &mut self.io,
            Box::new(tokio::io::join(tokio::io::empty(), tokio::io::sink())),
        );
        let limit = self.cfg().timeouts.command.0;
        match tokio::time::timeout(limit, acceptor.accept(io)).await {
            Ok(Ok(tls)) => {
                let (_, conn) = tls.get_ref();
                self.tls = Some(TlsInfo {
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
                });
                self.io = Box::new(tls);
                self.end_transaction("starttls", UpReset::Close).await;
                self.helo = None;
                self.esmtp = false;
                Next::Continue
            }
            _ => Next::Close,
        }
    }

    /// Opens the upstream connection if needed (lazily, at the first MAIL),
    /// or reopens it when the client changed its HELO name.
    async fn ensure_upstream(&mut self) -> Result<(), Unavailable> {
        if self.upstream.is_some() && self.upstream_helo == self.helo {
            return Ok(());
        }
        if let Some(old) = self.upstream.take() {
            old.quit().await;
        }
        let (name, reverse_name) = self.conn_checks.client_names().await;
        let who = ClientIdentity {
            addr: self.peer.addr,
            local: self.peer.local,
            helo: self.helo.clone(),
            name,
            reverse_name,
            esmtp: self.esmtp,
        };
        match self.shared.upstream.open(&who).await {
            Ok(conn) => {
                self.upstream = Some(conn);
                self.upstream_helo = self.helo.clone();
                Ok(())
            }
            // Upstream is up; it refused the client's HELO name: the
            // client's problem to hear about, not an upstream outage.
            Err(OpenError::Upstream(UpstreamError::Refused {
                stage: UpStage::ClientHelo,
                reply,
            })) => {
                tracing::debug!(session = %self.peer.id, reply = %reply.text(), "upstream refused the client's HELO");
                Err(Unavailable::Refused(reply))
            }
            Err(e) => {
                let stage = match &e {
                    OpenError::Upstream(u) => u.stage().as_str(),
                    OpenError::Probe(_) => "probe",
                };
                events::UpstreamFailed {
                    session: &self.peer.id,
                    stage,
                    error: &e,
                    unavailable: true,
                }
                .emit();
                Err(Unavailable::Down)
            }
        }
    }

    /// Relays upstream's reply as it is, except that a 421 (upstream closing)
    /// becomes 451: it is upstream that goes away, not this session.
    fn relay(&mut self, r: &UpstreamReply) {
        if r.code == 421 {
            self.drop_upstream();
            for line in r.raw.split_inclusive(|&b| b == b'\n') {
                self.wbuf.extend_from_slice(b"451");
                self.wbuf
                    .extend_from_slice(line.get(3..).unwrap_or_default());
            }
        } else {
            self.wbuf.extend_from_slice(&r.raw);
        }
    }

    fn upstream_failed(&mut self, e: &UpstreamError) {
        events::UpstreamFailed {
            session: &self.peer.id,
            stage: e.stage().as_str(),
            error: e,
            unavailable: false,
        }
        .emit();
        self.drop_upstream();
    }

    /// Closes the upstream connection at once, without QUIT (and so without
    /// ending any DATA in progress there). A transaction in flight can no
    /// longer complete.
    fn drop_upstream(&mut self) {
        self.upstream = None;
        self.upstream_helo = None;
        if let Some(t) = self.txn.as_mut()
            && matches!(t.phase, TxnPhase::Open)
        {
            t.phase = TxnPhase::Broken;
        }
    }

    /// The one place that ends a transaction on both sides (see the table
    /// at the top): logs the client's transaction, if one is still open,
    /// as abandoned for `why`, then brings upstream back to no transaction.
    async fn end_transaction(&mut self, why: &str, up: UpReset) {
        self.end_txn_abandoned(why);
        match up {
            UpReset::Close => {
                if let Some(conn) = self.upstream.take() {
                    conn.quit().await;
                }
                self.upstream_helo = None;
            }
            UpReset::IfOpen | UpReset::Always => {
                let Some(conn) = self.upstream.as_mut() else {
                    return;
                };
                if matches!(up, UpReset::IfOpen) && !conn.in_transaction() {
                    return;
                }
                match conn.rset().await {
                    Ok(r) if r.is_positive() => {}
                    // Upstream will not reset: a fresh connection will.
                    _ => self.drop_upstream(),
                }
            }
        }
    }

    /// Logs and forgets a transaction that ended without a final reply.
    fn end_txn_abandoned(&mut self, why: &str) {
        let Some(t) = self.txn.as_ref() else { return };
        let (verdict, code, enhanced, reason, upstream) = match (&t.last_rcpt_refusal, t.rcpts) {
            (Some(r), 0) => (
                Verdict::from_code(r.code),
                r.code,
                r.enhanced.clone(),
                r.reason.clone(),
                r.upstream.clone(),
            ),
            _ => (
                Verdict::Abandoned,
                0,
                String::new(),
                format!("client:{why}"),
                String::new(),
            ),
        };
        let said = Said { code, enhanced };
        self.log_txn(verdict, Stage::Rcpt, &said, &reason, &upstream, 0);
        self.txn = None;
    }

    fn finish_txn(
        &mut self,
        size: u64,
        stage: Stage,
        said: impl Into<Said>,
        reason: &str,
        upstream: &str,
    ) {
        let said = said.into();
        self.log_txn(
            Verdict::from_code(said.code),
            stage,
            &said,
            reason,
            upstream,
            size,
        );
        self.txn = None;
    }

    fn log_txn(
        &self,
        verdict: Verdict,
        stage: Stage,
        said: &Said,
        reason: &str,
        upstream: &str,
        size: u64,
    ) {
        let Some(t) = self.txn.as_ref() else { return };
        let mut log = t.checks.log.clone();
        log.hits = t
            .checks
            .findings
            .iter()
            .filter(|f| f.action != Action::Accept)
            .map(|f| match f.action {
                Action::Score(s) => format!("{}={s}", f.reason),
                Action::Reject => format!("{}=reject", f.reason),
                Action::Tempfail => format!("{}=tempfail", f.reason),
                Action::Tag | Action::Accept => format!("{}=tag", f.reason),
            })
            .collect();
        self.record(
            t.score,
            &log,
            &t.rcpt_list,
            &t.mail.address,
            t.rcpts,
            t.started,
            verdict,
            stage,
            said,
            reason,
            upstream,
            size,
        );
    }

    /// A MAIL refused (by us or upstream): a transaction that never started.
    fn log_mail_refused(
        &self,
        m: &MailCmd,
        started: Instant,
        score: f64,
        said: impl Into<Said>,
        reason: &str,
        upstream: &str,
    ) {
        let said = said.into();
        let verdict = Verdict::from_code(said.code);
        self.record(
            score,
            &CheckLog::default(),
            &[],
            &m.address,
            0,
            started,
            verdict,
            Stage::Mail,
            &said,
            reason,
            upstream,
            0,
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        score: f64,
        checks: &CheckLog,
        rcpt_addrs: &[String],
        mail_from: &str,
        rcpts: usize,
        started: Instant,
        verdict: Verdict,
        stage: Stage,
        said: &Said,
        reason: &str,
        upstream: &str,
        size: u64,
    ) {
        TxnRecord {
            session: &self.peer.id,
            client_ip: self.peer.addr.ip(),
            helo: self.helo.as_deref().unwrap_or(""),
            tls: self.tls.is_some(),
            tls_version: self.tls.as_ref().map_or("", |t| t.version.as_str()),
            tls_cipher: self.tls.as_ref().map_or("", |t| t.cipher.as_str()),
            mail_from,
            rcpt_count: rcpts,
            size,
            verdict,
            stage: stage.as_str(),
            code: said.code,
            enhanced: &said.enhanced,
            reason,
            upstream_reply: upstream,
            duration: started.elapsed(),
            reverse: self.conn_checks.reverse().unwrap_or_default().to_string(),
            spf: &checks.spf,
            dkim: &checks.dkim,
            dmarc: &checks.dmarc,
            arc: &checks.arc,
            iprev: &checks.iprev,
            dnsbl: checks.dnsbl.join(" "),
            rules: checks.rules.join(" "),
            hits: checks.hits.join(" "),
            rcpt_addrs: rcpt_addrs.to_vec(),
            score,
        }
        .emit();
    }
}
