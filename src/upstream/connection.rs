//! One SMTP client connection to the MTA behind us.

use super::capabilities::Capabilities;
use crate::runtime::Stream;
use crate::runtime::deadline::Deadline;
use crate::wire::data::Stuffed;
use crate::wire::identity::{ClientIdentity, Identity, proxy_header, xclient_line};
use crate::wire::reply::{UpstreamReply, parse_reply};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;

/// The stage an upstream failure happened at (for logs and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpStage {
    Connect,
    Greeting,
    Ehlo,
    /// The EHLO that carries the client's own HELO name (after XCLIENT, or
    /// with a PROXY header): a refusal there is about the client's input.
    ClientHelo,
    Xclient,
    Mail,
    Rcpt,
    Data,
    Message,
    Rset,
    Tls,
}

impl UpStage {
    pub fn as_str(self) -> &'static str {
        match self {
            UpStage::Connect => "connect",
            UpStage::Greeting => "greeting",
            UpStage::Ehlo => "ehlo",
            UpStage::ClientHelo => "client_helo",
            UpStage::Xclient => "xclient",
            UpStage::Mail => "mail",
            UpStage::Rcpt => "rcpt",
            UpStage::Data => "data",
            UpStage::Message => "message",
            UpStage::Rset => "rset",
            UpStage::Tls => "starttls",
        }
    }
}

/// Upstream trouble. Every variant is temporary from the client's point of
/// view: the session answers 4xx and the sender retries.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("no reply within {limit:?} at {}", stage.as_str())]
    Timeout { stage: UpStage, limit: Duration },
    #[error("connection closed at {}", stage.as_str())]
    Closed { stage: UpStage },
    #[error("i/o error at {}: {source}", stage.as_str())]
    Io {
        stage: UpStage,
        source: std::io::Error,
    },
    #[error("malformed reply at {}", stage.as_str())]
    BadReply { stage: UpStage },
    #[error("refused at {}: {}", stage.as_str(), reply.text())]
    Refused {
        stage: UpStage,
        reply: UpstreamReply,
    },
}

impl UpstreamError {
    /// Whether the failure is ours (out of descriptors or socket memory),
    /// not upstream's: it passes when our connections go, not with backoff.
    pub fn is_local(&self) -> bool {
        matches!(self, UpstreamError::Connect { source, .. } if crate::runtime::descriptors::exhausted(source))
    }

    pub fn stage(&self) -> UpStage {
        match self {
            UpstreamError::Connect { .. } => UpStage::Connect,
            UpstreamError::Timeout { stage, .. }
            | UpstreamError::Closed { stage }
            | UpstreamError::Io { stage, .. }
            | UpstreamError::BadReply { stage }
            | UpstreamError::Refused { stage, .. } => *stage,
        }
    }
}

/// Timeouts for one upstream connection.
#[derive(Debug, Clone, Copy)]
pub struct UpTimeouts {
    pub connect: Duration,
    pub command: Duration,
    pub data: Duration,
}

/// Everything needed to open a connection to upstream.
#[derive(Clone)]
pub struct Dial {
    pub addr: SocketAddr,
    /// Our own EHLO name.
    pub helo: String,
    pub timeouts: UpTimeouts,
    /// STARTTLS to upstream, with the name its certificate is checked against.
    pub tls: Option<(TlsConnector, ServerName<'static>)>,
    /// BDAT when upstream offers CHUNKING (`upstream.chunking`).
    pub chunking: bool,
}

/// An open, greeted (and identified) SMTP connection to upstream.
pub struct UpstreamConn {
    stream: Box<dyn Stream>,
    rbuf: Vec<u8>,
    timeouts: UpTimeouts,
    pub capabilities: Capabilities,
    /// Upstream accepted a MAIL whose transaction has not ended yet (by its
    /// final reply after the dot, or by RSET).
    open_txn: bool,
    /// When it was opened, and the messages sent on it (the pool's limits).
    pub(super) born: tokio::time::Instant,
    pub(super) transactions: u32,
    /// Replies of 4xx and 5xx upstream gave on this connection: Postfix
    /// counts them per connection, whoever the client (see the pool).
    pub(super) errors: u32,
    /// Taken from the pool, and MAIL not yet answered on it for this
    /// session: a failure now is the idle connection's, not the session's.
    pub reused: bool,
    /// A reused connection's RSET (its health check) goes in one write
    /// with the next MAIL when upstream offers PIPELINING.
    pending_rset: bool,
    /// The client HELO name this connection was opened or reused with
    /// (the session compares it with the client's current one).
    pub client_helo: Option<String>,
    /// BDAT allowed by the config (used when upstream offers CHUNKING).
    chunking: bool,
    /// The connection thread whose runtime serves its socket (the pool
    /// hands it to a session there first).
    pub(super) home: Option<usize>,
    /// The reply waits' timer, kept between replies.
    deadline: Deadline,
}

const WRITE_CHUNK: usize = 64 * 1024;

/// A message's bytes framed into one bounded buffer as they go: a message
/// costs `WRITE_CHUNK` here whatever its shape, and runs longer than that
/// are written straight from the message.
struct Framer {
    chunk: Vec<u8>,
}

impl Framer {
    fn new(total: usize) -> Framer {
        Framer {
            chunk: Vec::with_capacity(WRITE_CHUNK.min(total + 32)),
        }
    }

    async fn put<W: tokio::io::AsyncWrite + Unpin + ?Sized>(
        &mut self,
        w: &mut W,
        piece: &[u8],
    ) -> std::io::Result<()> {
        if self.chunk.len() + piece.len() > WRITE_CHUNK {
            w.write_all(&self.chunk).await?;
            self.chunk.clear();
            if piece.len() > WRITE_CHUNK {
                return w.write_all(piece).await;
            }
        }
        self.chunk.extend_from_slice(piece);
        Ok(())
    }

    async fn flush<W: tokio::io::AsyncWrite + Unpin + ?Sized>(
        &mut self,
        w: &mut W,
    ) -> std::io::Result<()> {
        w.write_all(&self.chunk).await
    }
}

/// `io` within `limit`: its failure or the timeout, as at `stage`.
async fn within<T>(
    stage: UpStage,
    limit: Duration,
    io: impl std::future::Future<Output = std::io::Result<T>>,
) -> Result<T, UpstreamError> {
    match timeout(limit, io).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(UpstreamError::Io { stage, source }),
        Err(_) => Err(UpstreamError::Timeout { stage, limit }),
    }
}

async fn connect(dial: &Dial) -> Result<TcpStream, UpstreamError> {
    let addr = dial.addr;
    match timeout(dial.timeouts.connect, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => {
            // Small writes (commands, the final dot) must not wait for delayed ACKs.
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(source)) => Err(UpstreamError::Connect { addr, source }),
        Err(_) => Err(UpstreamError::Timeout {
            stage: UpStage::Connect,
            limit: dial.timeouts.connect,
        }),
    }
}

/// The reply when it has the code expected, else a refusal at `stage`.
fn expect(reply: UpstreamReply, code: u16, stage: UpStage) -> Result<UpstreamReply, UpstreamError> {
    if reply.code == code {
        Ok(reply)
    } else {
        Err(UpstreamError::Refused { stage, reply })
    }
}

impl UpstreamConn {
    /// A connection just made, before its greeting.
    fn new(tcp: TcpStream, dial: &Dial) -> UpstreamConn {
        UpstreamConn {
            stream: Box::new(tcp),
            rbuf: Vec::with_capacity(1024),
            timeouts: dial.timeouts,
            capabilities: Capabilities::default(),
            open_txn: false,
            born: tokio::time::Instant::now(),
            transactions: 0,
            errors: 0,
            reused: false,
            pending_rset: false,
            client_helo: None,
            chunking: dial.chunking,
            home: crate::runtime::workers::current(),
            deadline: Deadline::new(),
        }
    }

    /// Connects, sends a PROXY header if asked, reads the greeting, says
    /// EHLO, starts TLS if configured, and with `Identity::Xclient` sends
    /// XCLIENT and EHLO again.
    pub async fn open(
        dial: &Dial,
        identity: Identity,
        client: Option<&ClientIdentity>,
    ) -> Result<UpstreamConn, UpstreamError> {
        let tcp = connect(dial).await?;
        let local = tcp.local_addr().map_err(|source| UpstreamError::Io {
            stage: UpStage::Connect,
            source,
        })?;
        let mut conn = UpstreamConn::new(tcp, dial);
        if matches!(identity, Identity::ProxyV1 | Identity::ProxyV2) {
            let (src, dst) = match client {
                Some(c) => (c.addr, c.local),
                // A probe announces itself.
                None => (local, dial.addr),
            };
            conn.write(&proxy_header(identity, src, dst), UpStage::Connect)
                .await?;
        }
        let greeting = conn
            .read_reply(UpStage::Greeting, dial.timeouts.connect)
            .await?;
        expect(greeting, 220, UpStage::Greeting)?;
        // With a PROXY header the address is passed; the client's HELO name
        // goes in our EHLO, so upstream sees both as the client gave them.
        let (helo, stage) = match (identity, client.and_then(|c| c.helo.as_deref())) {
            (Identity::ProxyV1 | Identity::ProxyV2, Some(h)) => (h, UpStage::ClientHelo),
            _ => (dial.helo.as_str(), UpStage::Ehlo),
        };
        conn.ehlo(helo, stage).await?;
        if let Some((connector, name)) = &dial.tls {
            conn.starttls(connector, name.clone()).await?;
            conn.ehlo(helo, stage).await?;
        }
        if identity == Identity::Xclient
            && let Some(c) = client
        {
            conn.xclient(c, &dial.helo).await?;
        }
        Ok(conn)
    }

    /// Tells upstream who the client is. Upstream then starts over as for
    /// a new connection from that client (Postfix resets the session and
    /// greets again), so a pooled connection keeps nothing of its last
    /// client: every attribute upstream offers is set.
    async fn xclient(&mut self, c: &ClientIdentity, our_helo: &str) -> Result<(), UpstreamError> {
        let offered = self.capabilities.xclient.clone().unwrap_or_default();
        let line = xclient_line(c, &offered);
        let reply = self.command(line.as_bytes(), UpStage::Xclient).await?;
        expect(reply, 220, UpStage::Xclient)?;
        // After XCLIENT upstream greets again and wants a fresh EHLO, now
        // under the client's HELO name.
        match c.helo.as_deref() {
            Some(helo) => self.ehlo(helo, UpStage::ClientHelo).await,
            None => self.ehlo(our_helo, UpStage::Ehlo).await,
        }
    }

    /// Makes a pooled connection ready for a new client session: XCLIENT
    /// for the new client, or RSET when no identity is passed. The reply
    /// is the health check: anything but the expected one means the
    /// connection went bad while idle.
    pub(super) async fn reuse(
        &mut self,
        identity: Identity,
        client: &ClientIdentity,
        our_helo: &str,
    ) -> Result<(), UpstreamError> {
        match identity {
            Identity::Xclient => self.xclient(client, our_helo).await,
            // Checked with the reply to RSET ahead of MAIL's (see `mail`).
            _ if self.capabilities.pipelining => {
                self.pending_rset = true;
                Ok(())
            }
            _ => {
                let reply = self.rset().await?;
                expect(reply, 250, UpStage::Rset).map(drop)
            }
        }
    }

    /// A connection over `tcp` said to be opened on connection thread
    /// `home`, for the pool's tests.
    #[cfg(test)]
    pub(super) fn for_tests(tcp: TcpStream, home: Option<usize>) -> UpstreamConn {
        let second = Duration::from_secs(1);
        let dial = Dial {
            addr: ([127, 0, 0, 1], 0).into(),
            helo: "gate.test".into(),
            timeouts: UpTimeouts {
                connect: second,
                command: second,
                data: second,
            },
            tls: None,
            chunking: false,
        };
        UpstreamConn {
            home,
            ..UpstreamConn::new(tcp, &dial)
        }
    }

    /// Whether the connection is between transactions with nothing unread:
    /// the only state in which it may wait for another client.
    pub(super) fn is_clean(&self) -> bool {
        !self.open_txn && self.rbuf.is_empty()
    }

    async fn starttls(
        &mut self,
        connector: &TlsConnector,
        name: ServerName<'static>,
    ) -> Result<(), UpstreamError> {
        let reply = self.command(b"STARTTLS", UpStage::Tls).await?;
        expect(reply, 220, UpStage::Tls)?;
        let plain = std::mem::replace(
            &mut self.stream,
            Box::new(tokio::io::join(tokio::io::empty(), tokio::io::sink())),
        );
        let tls = within(
            UpStage::Tls,
            self.timeouts.command,
            connector.connect(name, plain),
        )
        .await?;
        self.stream = Box::new(tls);
        self.rbuf.clear();
        Ok(())
    }

    async fn ehlo(&mut self, name: &str, stage: UpStage) -> Result<(), UpstreamError> {
        let line = format!("EHLO {name}");
        let reply = expect(self.command(line.as_bytes(), stage).await?, 250, stage)?;
        self.capabilities = Capabilities::from_ehlo(&reply);
        Ok(())
    }

    /// Waits briefly for a greeting without sending anything; used by the
    /// `auto` probe to tell a PROXY-expecting listener (which stays silent).
    pub async fn connect_silent(
        dial: &Dial,
        wait: Duration,
    ) -> Result<Option<UpstreamReply>, UpstreamError> {
        let mut conn = UpstreamConn::new(connect(dial).await?, dial);
        match conn.read_reply(UpStage::Greeting, wait).await {
            Ok(r) => {
                let _ = conn.command(b"QUIT", UpStage::Rset).await;
                Ok(Some(r))
            }
            Err(UpstreamError::Timeout { .. }) | Err(UpstreamError::Closed { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn write(&mut self, bytes: &[u8], stage: UpStage) -> Result<(), UpstreamError> {
        within(stage, self.timeouts.command, self.stream.write_all(bytes)).await
    }

    async fn read_reply(
        &mut self,
        stage: UpStage,
        limit: Duration,
    ) -> Result<UpstreamReply, UpstreamError> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match parse_reply(&self.rbuf) {
                Ok(Some((reply, used))) => {
                    self.rbuf.drain(..used);
                    if reply.code >= 400 {
                        self.errors = self.errors.saturating_add(1);
                    }
                    return Ok(reply);
                }
                Ok(None) => {}
                Err(_) => return Err(UpstreamError::BadReply { stage }),
            }
            self.rbuf.reserve(1024);
            let read = self.stream.read_buf(&mut self.rbuf);
            match self.deadline.within(deadline, read).await {
                Some(Ok(0)) => return Err(UpstreamError::Closed { stage }),
                Some(Ok(_)) => {}
                Some(Err(source)) => return Err(UpstreamError::Io { stage, source }),
                None => return Err(UpstreamError::Timeout { stage, limit }),
            }
        }
    }

    /// Sends one command line (CRLF added) and returns upstream's reply.
    pub async fn command(
        &mut self,
        line: &[u8],
        stage: UpStage,
    ) -> Result<UpstreamReply, UpstreamError> {
        let mut buf = Vec::with_capacity(line.len() + 2);
        buf.extend_from_slice(line);
        buf.extend_from_slice(b"\r\n");
        self.write(&buf, stage).await?;
        self.read_reply(stage, self.timeouts.command).await
    }

    /// Whether upstream holds an open transaction (a MAIL it accepted).
    pub fn in_transaction(&self) -> bool {
        self.open_txn
    }

    /// Relays a MAIL command line; a positive reply opens a transaction.
    /// A reused connection's pending RSET goes first, in the same write:
    /// anything but 250 to it is an error (the connection went bad idle).
    pub async fn mail(&mut self, line: &[u8]) -> Result<UpstreamReply, UpstreamError> {
        let rset = std::mem::take(&mut self.pending_rset);
        let mut buf = Vec::with_capacity(line.len() + 8);
        if rset {
            buf.extend_from_slice(b"RSET\r\n");
        }
        buf.extend_from_slice(line);
        buf.extend_from_slice(b"\r\n");
        self.write(&buf, UpStage::Mail).await?;
        if rset {
            let reply = self
                .read_reply(UpStage::Rset, self.timeouts.command)
                .await?;
            expect(reply, 250, UpStage::Rset)?;
        }
        let r = self
            .read_reply(UpStage::Mail, self.timeouts.command)
            .await?;
        self.reused = false;
        if r.is_positive() {
            self.open_txn = true;
        }
        Ok(r)
    }

    /// RSET: a positive reply ends any transaction.
    pub async fn rset(&mut self) -> Result<UpstreamReply, UpstreamError> {
        let r = self.command(b"RSET", UpStage::Rset).await?;
        if r.is_positive() {
            self.open_txn = false;
        }
        Ok(r)
    }

    /// DATA, then the message as `parts` (our headers first, then the
    /// client's message in pieces, each made of whole CRLF lines), each
    /// dot-stuffed, then the terminator. Returns the reply to DATA if it is
    /// not 354, else the final reply. When upstream offers CHUNKING (and
    /// the config allows it), one BDAT chunk instead (`bdat`).
    pub async fn data(&mut self, parts: &[&[u8]]) -> Result<UpstreamReply, UpstreamError> {
        if self.chunking && self.capabilities.chunking {
            return self.bdat(parts).await;
        }
        let go = self.command(b"DATA", UpStage::Data).await?;
        if go.code != 354 {
            // Upstream's transaction stays open (RFC 5321 keeps it).
            return Ok(go);
        }
        let limit = self.timeouts.data;
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let stream = &mut self.stream;
        within(UpStage::Message, limit, async {
            let mut out = Framer::new(total);
            for part in parts {
                for piece in Stuffed::new(part) {
                    out.put(stream, piece).await?;
                }
            }
            out.put(stream, b".\r\n").await?;
            out.flush(stream).await
        })
        .await?;
        let r = self.read_reply(UpStage::Message, limit).await?;
        // The reply after the dot ends the transaction, whatever it says.
        self.open_txn = false;
        self.transactions = self.transactions.saturating_add(1);
        Ok(r)
    }

    /// The message as one `BDAT <size> LAST` chunk (RFC 3030), command and
    /// content in the same writes: no round trip for a 354, and the
    /// content goes as it is (no dot-stuffing; upstream reads by size, so
    /// no line of it can end the message early). What DATA would deliver,
    /// byte for byte: a part lacking a final CRLF gets one, as `Stuffed`
    /// gives it.
    async fn bdat(&mut self, parts: &[&[u8]]) -> Result<UpstreamReply, UpstreamError> {
        let crlf = |p: &[u8]| !p.is_empty() && !p.ends_with(b"\r\n");
        let total: usize = parts
            .iter()
            .map(|p| p.len() + if crlf(p) { 2 } else { 0 })
            .sum();
        let limit = self.timeouts.data;
        let stream = &mut self.stream;
        within(UpStage::Message, limit, async {
            let mut out = Framer::new(total);
            out.put(stream, format!("BDAT {total} LAST\r\n").as_bytes())
                .await?;
            for part in parts {
                out.put(stream, part).await?;
                if crlf(part) {
                    out.put(stream, b"\r\n").await?;
                }
            }
            out.flush(stream).await
        })
        .await?;
        let r = self.read_reply(UpStage::Message, limit).await?;
        // Accepted, the transaction is over; a refused chunk leaves it
        // failed but open (RFC 3030 says no more), so RSET ends it.
        if r.is_positive() {
            self.open_txn = false;
        }
        self.transactions = self.transactions.saturating_add(1);
        Ok(r)
    }

    /// Ends the connection politely; errors do not matter any more.
    pub async fn quit(mut self) {
        let _ = timeout(Duration::from_secs(2), async {
            let _ = self.stream.write_all(b"QUIT\r\n").await;
            let mut b = [0u8; 512];
            let _ = self.stream.read(&mut b).await;
        })
        .await;
    }
}
