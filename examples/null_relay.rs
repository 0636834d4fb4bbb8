//! An SMTP relay that checks nothing, for `benches/load.sh`: the floor
//! any proxy pays that keeps its client in step with the MTA behind it,
//! as Portcullis does. It answers the greeting, EHLO and QUIT itself and
//! passes MAIL, RCPT, DATA, the message and RSET to the MTA one at a time,
//! each answered with the MTA's own reply: the same reads and writes per
//! message as Portcullis, and nothing else (no parsing beyond the verb and
//! the end of the message, no checks, no limits, no timeouts, no log).
//! Upstream connections are kept for the next client, as Portcullis's pool
//! keeps them. One thread and one current-thread runtime, as Portcullis
//! has on a machine with 2 or 3 CPUs.
//!
//!     null_relay 127.0.0.1:12560 127.0.0.1:12525

use std::io;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Ready upstream connections, between client sessions.
type Pool = Arc<Mutex<Vec<Conn>>>;

fn main() -> io::Result<()> {
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:12560".into());
    let upstream = args.next().unwrap_or_else(|| "127.0.0.1:12525".into());
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let listener = TcpListener::bind(&listen).await?;
            let pool = Pool::default();
            loop {
                let (client, _) = listener.accept().await?;
                let (pool, upstream) = (Arc::clone(&pool), upstream.clone());
                tokio::spawn(async move {
                    let _ = serve(Conn::new(client), &upstream, &pool).await;
                });
            }
        })
}

/// A socket and what was read from it but not yet used.
struct Conn {
    io: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    fn new(io: TcpStream) -> Conn {
        let _ = io.set_nodelay(true);
        Conn {
            io,
            buf: Vec::with_capacity(4096),
        }
    }

    async fn fill(&mut self) -> io::Result<()> {
        if self.io.read_buf(&mut self.buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }

    /// The next `len` bytes that `end` says complete a unit, taken off the buffer.
    async fn take(&mut self, end: impl Fn(&[u8]) -> Option<usize>) -> io::Result<Vec<u8>> {
        loop {
            if let Some(len) = end(&self.buf) {
                return Ok(self.buf.drain(..len).collect());
            }
            self.fill().await?;
        }
    }

    async fn line(&mut self) -> io::Result<Vec<u8>> {
        self.take(|b| b.windows(2).position(|w| w == b"\r\n").map(|i| i + 2))
            .await
    }

    /// A whole reply: lines up to one whose code is followed by a space.
    async fn reply(&mut self) -> io::Result<Vec<u8>> {
        self.take(|b| {
            let mut at = 0;
            while let Some(i) = b[at..].windows(2).position(|w| w == b"\r\n") {
                let line = &b[at..at + i];
                at += i + 2;
                if line.get(3) != Some(&b'-') {
                    return Some(at);
                }
            }
            None
        })
        .await
    }

    /// The message up to and with its ending dot line.
    async fn message(&mut self) -> io::Result<Vec<u8>> {
        self.take(|b| {
            if b.starts_with(b".\r\n") {
                return Some(3);
            }
            b.windows(5).position(|w| w == b"\r\n.\r\n").map(|i| i + 5)
        })
        .await
    }

    /// Sends `what` and returns the reply to it.
    async fn ask(&mut self, what: &[u8]) -> io::Result<Vec<u8>> {
        self.io.write_all(what).await?;
        self.reply().await
    }
}

async fn serve(mut client: Conn, upstream: &str, pool: &Pool) -> io::Result<()> {
    client.io.write_all(b"220 null.relay ESMTP\r\n").await?;
    let mut mta: Option<Conn> = None;
    // Whether the MTA connection is between transactions (fit to keep).
    let mut idle = true;
    loop {
        let line = client.line().await?;
        let verb = line.get(..4).unwrap_or_default().to_ascii_uppercase();
        match &verb[..] {
            b"EHLO" | b"HELO" => {
                client
                    .io
                    .write_all(b"250-null.relay\r\n250 8BITMIME\r\n")
                    .await?
            }
            b"QUIT" => {
                client.io.write_all(b"221 2.0.0 bye\r\n").await?;
                break;
            }
            b"MAIL" | b"RCPT" | b"DATA" | b"RSET" => {
                let m = match mta.as_mut() {
                    Some(m) => m,
                    None => mta.insert(connect(upstream, pool).await?),
                };
                let mut reply = m.ask(&line).await?;
                idle = &verb[..] == b"RSET";
                if &verb[..] == b"DATA" && reply.starts_with(b"354") {
                    client.io.write_all(&reply).await?;
                    let message = client.message().await?;
                    reply = m.ask(&message).await?;
                    idle = true;
                }
                client.io.write_all(&reply).await?;
            }
            _ => client.io.write_all(b"502 5.5.2 no\r\n").await?,
        }
    }
    if let (Some(m), true) = (mta, idle)
        && let Ok(mut p) = pool.lock()
    {
        p.push(m);
    }
    Ok(())
}

/// A ready MTA connection: a kept one, or a new one greeted.
async fn connect(upstream: &str, pool: &Pool) -> io::Result<Conn> {
    if let Some(m) = pool.lock().ok().and_then(|mut p| p.pop()) {
        return Ok(m);
    }
    let mut m = Conn::new(TcpStream::connect(upstream).await?);
    m.reply().await?;
    m.ask(b"EHLO null.relay\r\n").await?;
    Ok(m)
}
