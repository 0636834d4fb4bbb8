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
use crate::checks::{Hold, Screen, Screened, Stage};
use crate::config::{BareNewline, Config};
use crate::gate::{Door, Peer, Shared, Snapshot, refused_connection};
use crate::runtime::Stream;
use crate::runtime::shutdown::{Phase, ShutdownSignal};
mod conn;
mod data;
pub mod ehlo;
mod mail;
mod rcpt;
mod relay;
mod starttls;
mod txn;

use crate::gate::ledger::{Client, Ending, Ledger, Refusal, Said, TxnPhase};
use crate::session::ehlo::Offer;
use crate::telemetry::Verdict;
use crate::telemetry::events;
use crate::upstream::{ClientIdentity, OpenError, UpStage, UpstreamConn, UpstreamError};
use crate::verdict::Decision;
use crate::wire::command::{self, Command, CommandError, MailCmd, RcptCmd};
use crate::wire::data::DataReader;
use crate::wire::path::Kind;
use crate::wire::reply::{self, Reply, UpstreamReply};
use conn::ClientConn;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsAcceptor;

/// The negotiated TLS parameters, for the log line.
#[derive(Debug, Clone)]
struct TlsInfo {
    version: String,
    cipher: String,
}

const COMMAND_READ: usize = 1024;
/// How long the replies written while shutting down may take.
const FAREWELL_WRITE: Duration = Duration::from_secs(2);
/// Reply bytes a client may have queued before we write them and wait
/// (a pipelined batch of 100 RCPTs gets about 3 KiB).
const REPLY_QUEUE_CAP: usize = 8 * 1024;
/// How often a stalled write looks again at its limit (stress may begin).
const WRITE_RECHECK: Duration = Duration::from_secs(1);
/// The read buffer's room while a message arrives: 32 KiB is the largest
/// size jemalloc's thread cache keeps, so that the buffer a message needs
/// (freed after it) comes back without a trip to the arena (64 KiB took
/// 2-3% of the proxy's CPU in allocation and shrinking).
const DATA_READ: usize = 32 * 1024;

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
    conn: ClientConn,
    shared: Arc<Shared>,
    peer: Peer,
    helo: Option<String>,
    esmtp: bool,
    /// Boxed: most sessions never have it, and every idle one holds this.
    tls: Option<Box<TlsInfo>>,
    offer: Offer,
    txn: Option<Box<Ledger>>,
    upstream: Option<Box<UpstreamConn>>,
    errors: u32,
    /// Whether the client has sent MAIL yet (under stress the time to
    /// MAIL is bounded).
    reached_mail: bool,
    /// Why a write to the client failed (it ended the session).
    write_failed: Option<conn::WriteFailed>,
    /// Runs the checks of this client, with the rules it started with.
    screen: Screen,
    /// Likewise the config, checks and certificate.
    rt: Arc<Snapshot>,
}

impl Session {
    pub fn new(
        io: Box<dyn Stream>,
        peer: Peer,
        shared: Arc<Shared>,
        shutdown: ShutdownSignal,
        initial: Vec<u8>,
    ) -> Session {
        let rt = shared.snapshot();
        let deadline = tokio::time::Instant::now() + rt.cfg.timeouts.session.0;
        // DNSBL and iprev start now and are awaited only when needed.
        let screen = Screen::new(
            Arc::clone(&rt.engine),
            Arc::clone(&rt.rules),
            peer.addr.ip(),
            shared.upstream.wants_client_name(),
        );
        Session {
            rt,
            screen,
            conn: ClientConn::new(io, initial, shutdown, deadline),
            peer,
            helo: None,
            esmtp: false,
            tls: None,
            offer: Offer::default(),
            txn: None,
            upstream: None,
            errors: 0,
            reached_mail: false,
            write_failed: None,
            shared,
        }
    }

    /// Refuses the connection before the greeting: the reply, the log
    /// line, and the close.
    async fn refuse_connection(&mut self, r: &Reply, reason: &str) {
        self.reply(r);
        refused_connection(Door::Proxy, &self.peer.id, self.peer.addr.ip(), r, reason);
        let _ = self.flush().await;
        self.close().await;
    }

    /// Runs the session to its end.
    ///
    /// The session's future is what every connection holds while it is
    /// idle, so the steps that await much (the opening checks, each
    /// command, the farewell) are boxed: their state exists only while
    /// they run, and an idle session is little more than `Session`.
    ///
    /// Boxed: an `async fn` taking the session by value would hold it
    /// twice (the argument and its moved copy).
    pub async fn run(mut self: Box<Self>) {
        self.serve().await
    }

    async fn serve(&mut self) {
        if !Box::pin(self.open()).await {
            return;
        }
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
        Box::pin(self.finish()).await;
    }

    /// The transaction left open, the last replies, the close, and the
    /// upstream connection back to the pool (or QUIT: a transaction left
    /// open there is never handed to another client).
    async fn finish(&mut self) {
        self.end_txn_abandoned(self.gone());
        let _ = self.flush().await;
        // Before the close: once a client sees its connection end, the
        // next session finds the upstream connection ready.
        if let Some(up) = self.upstream.take() {
            self.shared.upstream.release(up);
        }
        self.close().await;
    }

    /// Before the greeting: admission, the greeting test, a refusal at
    /// connect; then the greeting is queued. False: the client was
    /// refused and the connection closed.
    async fn open(&mut self) -> bool {
        // Connection rate limits and what earlier connections showed; the
        // checks' lookups start here, while the greeting test runs.
        if let Some((r, reason)) = self.screen.admit().await {
            self.refuse_connection(&r, &reason).await;
            return false;
        }
        if let Some(delay) = self.rt.cfg.greeting.delay
            && self.screen.greeting_test_wanted()
        {
            // A DNS allow list ends the test early, as postscreen's
            // dnsbl_allowlist_threshold does.
            let talked = tokio::select! {
                talked = self.conn.talks_within(delay.0) => Some(talked),
                () = self.screen.dns_allowed() => None,
            };
            match talked {
                Some(true) => {
                    self.screen.refused_at_connect("pregreet").await;
                    self.refuse_connection(&reply::PREGREET, "pregreet").await;
                    return false;
                }
                Some(false) => self.screen.greeting_test_passed().await,
                None => {}
            }
        }
        if let Some((r, reason)) = self.screen.refuse_at_connect().await {
            tracing::debug!(session = %self.peer.id, dnsbl = ?self.screen.log().dnsbl, "refused at connect");
            self.refuse_connection(&r, &reason).await;
            return false;
        }
        let greeting = format!("220 {} ESMTP Portcullis\r\n", self.rt.cfg.hostname);
        self.conn.queue_raw(greeting.as_bytes());
        true
    }

    fn cfg(&self) -> &Config {
        &self.rt.cfg
    }

    fn reply(&mut self, r: &Reply) {
        self.conn.queue(r);
    }

    /// A protocol error: reply, and hang up after `max_errors` (fewer
    /// under stress).
    fn error(&mut self, r: Reply) -> Next {
        self.errors = self.errors.saturating_add(1);
        let max = if self.shared.limits.stressed() {
            self.cfg()
                .stress
                .max_errors
                .min(self.cfg().limits.max_errors)
        } else {
            self.cfg().limits.max_errors
        };
        if usize::try_from(self.errors).is_ok_and(|n| n >= max) {
            self.reply(&reply::TOO_MANY_ERRORS);
            return Next::Close;
        }
        self.reply(&r);
        Next::Continue
    }

    /// One command. Each that awaits (upstream, the checks) runs as a
    /// boxed future of its own, sized for that command: a future is as
    /// large as its largest state, and this whole function boxed per
    /// command was 4 KB allocated and copied for each, NOOP and QUIT too.
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
            Command::Ehlo(host) => Box::pin(self.hello(host, true)).await,
            Command::Helo(host) => Box::pin(self.hello(host, false)).await,
            Command::Mail(m) => Box::pin(self.mail(m)).await,
            Command::Rcpt(r) => Box::pin(self.rcpt(r)).await,
            Command::Data => Box::pin(self.data()).await,
            Command::Rset => {
                Box::pin(self.end_transaction("rset", UpReset::Always)).await;
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
            Command::StartTls => Box::pin(self.starttls()).await,
            Command::NotImplemented(_) => self.error(reply::NOT_IMPLEMENTED),
        }
    }
}

/// A session over a loopback connection, for tests that look at it
/// without running it; and the listener it came through.
#[cfg(test)]
pub(crate) async fn for_tests(
    shared: Arc<Shared>,
    signal: ShutdownSignal,
) -> (Session, tokio::net::TcpListener) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    let peer = Peer {
        id: crate::telemetry::session_id(),
        addr,
        local: addr,
    };
    (
        Session::new(Box::new(sock), peer, shared, signal, Vec::new()),
        l,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A command's future is made and moved (into its box) whole, at its
    /// largest state's size, for every command: the dispatch is small and
    /// each command that awaits boxes only its own, and the rare upstream
    /// steps (a probe, a new connection) are boxed apart. Debug-build
    /// sizes before: the dispatch 4,120 bytes for any command, EHLO 3,544,
    /// MAIL 3,984; after: 144, 1,232, 2,656.
    #[tokio::test]
    async fn a_command_s_future_is_sized_for_that_command() {
        let shared = crate::gate::shared_for_tests(
            "hostname: gate.test\nlisten: [{addr: 127.0.0.1:0}]\nupstream: {addr: 127.0.0.1:2525}\n",
            "rules: []\n",
        );
        let shutdown = crate::runtime::shutdown::Shutdown::new();
        let (mut s, _listener) = for_tests(shared, shutdown.signal()).await;
        let dispatch = std::mem::size_of_val(&s.handle(b"NOOP"));
        let Ok(Command::Ehlo(host)) = command::parse(b"EHLO client.test") else {
            panic!("EHLO parses");
        };
        let hello = std::mem::size_of_val(&s.hello(host, true));
        let Ok(Command::Mail(m)) = command::parse(b"MAIL FROM:<a@sender.test>") else {
            panic!("MAIL parses");
        };
        let mail = std::mem::size_of_val(&s.mail(m));
        println!("dispatch {dispatch}, EHLO {hello}, MAIL {mail} bytes");
        assert!(dispatch <= 256, "the dispatch is {dispatch} bytes");
        assert!(hello <= 1_600, "EHLO's future is {hello} bytes");
        assert!(mail <= 3_000, "MAIL's future is {mail} bytes");
    }
}
