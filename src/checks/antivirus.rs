//! ClamAV at the end of DATA. The message goes to clamd with INSTREAM
//! (clamd(8)): `zINSTREAM\0`, then chunks, each a 4-octet big-endian length
//! and its octets, then a length of zero; clamd answers `stream: OK`,
//! `stream: NAME FOUND` or `... ERROR`, ended by a NUL, and closes.
//!
//! At most `connections` scans run at once, and a message's scan (waiting
//! for a connection included) ends within `timeout`; clamd down, slow or
//! failing is `on_error`. Runs for allow-listed clients too: an allowed
//! sender's compromised account still sends viruses.

use super::daemon::Daemon;
use super::{Check, Facts, Hook, Message};
use crate::config::{Action, AntivirusConfig, Endpoint, Mode};
use crate::telemetry::events::AntivirusScan;
use crate::verdict::{self, Finding};
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Octets per INSTREAM chunk (clamd reads up to StreamMaxLength in all).
const CHUNK: usize = 64 * 1024;

/// clamd's reply is one short line; anything longer is not clamd.
const MAX_REPLY: usize = 4096;

/// What clamd said of one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Clean,
    Virus(String),
    /// clamd could not scan it, or was not there, or too slow.
    Error(String),
}

impl Verdict {
    /// The log's `antivirus` value: `clean`, `virus:NAME`, `error`.
    pub fn word(&self) -> String {
        match self {
            Verdict::Clean => "clean".into(),
            Verdict::Virus(name) => format!("virus:{name}"),
            Verdict::Error(_) => "error".into(),
        }
    }
}

/// Reads clamd's reply to a stream scan (without its NUL).
pub fn parse_reply(reply: &[u8]) -> Verdict {
    let text = String::from_utf8_lossy(reply);
    let text = text.trim_end_matches(['\0', '\n', '\r']).trim();
    // `stream: ...`, or `N: stream: ...` in a session.
    let rest = text.split_once("stream: ").map(|(_, r)| r).unwrap_or(text);
    if rest == "OK" {
        Verdict::Clean
    } else if let Some(name) = rest.strip_suffix(" FOUND") {
        // The name goes into a reply line and the log: printable only.
        let name: String = name
            .chars()
            .filter(|c| c.is_ascii_graphic())
            .take(200)
            .collect();
        Verdict::Virus(name)
    } else if text.is_empty() {
        Verdict::Error("no reply".into())
    } else {
        Verdict::Error(text.chars().take(200).collect())
    }
}

/// Streams `message` over `io` and reads the verdict.
pub async fn instream<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S, message: &[u8]) -> Verdict {
    let sent = async {
        io.write_all(b"zINSTREAM\0").await?;
        for chunk in message.chunks(CHUNK) {
            // Both fit: chunks are 64 KiB.
            let len = u32::try_from(chunk.len()).unwrap_or(u32::MAX).to_be_bytes();
            io.write_all(&len).await?;
            io.write_all(chunk).await?;
        }
        io.write_all(&[0, 0, 0, 0]).await?;
        io.flush().await
    }
    .await;
    // clamd stops reading at StreamMaxLength and answers; read what it
    // said even when the rest could not be written.
    let mut reply = Vec::with_capacity(64);
    let mut buf = [0u8; 512];
    while reply.len() < MAX_REPLY && !reply.contains(&0) {
        match io.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => reply.extend_from_slice(&buf[..n]),
            Err(e) => return Verdict::Error(format!("reading clamd's reply: {e}")),
        }
    }
    match (sent, reply.is_empty()) {
        (Err(e), true) => Verdict::Error(format!("writing to clamd: {e}")),
        _ => parse_reply(reply.split(|b| *b == 0).next().unwrap_or_default()),
    }
}

/// A connection to clamd, over TCP or a Unix socket.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

async fn connect(at: &Endpoint) -> std::io::Result<Box<dyn Io>> {
    Ok(match at {
        Endpoint::Tcp(a) => Box::new(tokio::net::TcpStream::connect(a).await?),
        Endpoint::Unix(p) => Box::new(tokio::net::UnixStream::connect(p).await?),
    })
}

/// Connects to clamd and scans `message`.
async fn scan(at: &Endpoint, message: &[u8]) -> Verdict {
    match connect(at).await {
        Ok(mut s) => instream(&mut s, message).await,
        Err(e) => Verdict::Error(format!("connecting to clamd at {at}: {e}")),
    }
}

/// clamd's answer to PING (`PONG` when it is clamd), for `check`.
pub async fn ping(at: &Endpoint) -> std::io::Result<Vec<u8>> {
    let mut s = connect(at).await?;
    s.write_all(b"zPING\0").await?;
    let mut reply = Vec::new();
    (&mut s)
        .take(MAX_REPLY as u64)
        .read_to_end(&mut reply)
        .await?;
    Ok(reply)
}

pub struct Antivirus {
    cfg: AntivirusConfig,
    clamd: Daemon,
}

impl Antivirus {
    pub fn new(cfg: &AntivirusConfig) -> Antivirus {
        Antivirus {
            cfg: cfg.clone(),
            clamd: Daemon::new(cfg.connections, cfg.timeout.0),
        }
    }

    /// The verdict on `message`, within the deadline.
    async fn judge(&self, message: &[u8]) -> Verdict {
        let work = scan(&self.cfg.clamd, message);
        self.clamd
            .ask("checks.antivirus.timeout", work)
            .await
            .unwrap_or_else(Verdict::Error)
    }
}

impl Check for Antivirus {
    fn off(&self) -> bool {
        self.cfg.mode == Mode::Off
    }

    fn always(&self) -> bool {
        true
    }

    fn data<'a, 'm: 'a>(&'m self, f: &'a mut Facts, m: &'a mut Message<'m>) -> Hook<'a> {
        Box::pin(async move {
            let c = &self.cfg;
            if self.off() {
                return;
            }
            let message: &[u8] = m.shared.as_ref().as_ref();
            let found = &mut f.txn.found;
            if message.len() as u64 > c.max_size.0 {
                found.log.antivirus = "skipped:size".into();
                AntivirusScan {
                    result: "skipped",
                    took: None,
                    error: None,
                }
                .emit();
                return;
            }
            let start = Instant::now();
            let v = self.judge(message).await;
            found.log.antivirus = v.word();
            let (action, reply, reason) = match &v {
                Verdict::Clean => (Action::Accept, verdict::virus(None, ""), String::new()),
                Verdict::Virus(name) => (
                    c.virus,
                    verdict::virus(c.text.as_deref(), name),
                    format!("antivirus:{name}"),
                ),
                Verdict::Error(_) => (
                    c.on_error,
                    verdict::scanner_tempfail(),
                    "antivirus:error".into(),
                ),
            };
            AntivirusScan {
                result: match v {
                    Verdict::Clean => "clean",
                    Verdict::Virus(_) => "virus",
                    Verdict::Error(_) => "error",
                },
                took: Some(start.elapsed()),
                error: match &v {
                    Verdict::Error(e) => Some(e),
                    _ => None,
                },
            }
            .emit();
            if action != Action::Accept {
                found.findings.push(Finding::under(
                    c.mode,
                    "antivirus",
                    action,
                    v.word(),
                    reason,
                    reply,
                ));
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clamd_replies_are_read() {
        assert_eq!(parse_reply(b"stream: OK"), Verdict::Clean);
        assert_eq!(parse_reply(b"stream: OK\0"), Verdict::Clean);
        assert_eq!(
            parse_reply(b"stream: Eicar-Test-Signature FOUND"),
            Verdict::Virus("Eicar-Test-Signature".into())
        );
        assert_eq!(
            parse_reply(b"1: stream: Portcullis.Test.UNOFFICIAL FOUND"),
            Verdict::Virus("Portcullis.Test.UNOFFICIAL".into())
        );
        assert!(matches!(
            parse_reply(b"INSTREAM size limit exceeded. ERROR"),
            Verdict::Error(e) if e.contains("size limit")
        ));
        assert!(matches!(parse_reply(b""), Verdict::Error(_)));
        // A name cannot put a line break into our reply.
        assert_eq!(
            parse_reply(b"stream: Bad\r\nName FOUND"),
            Verdict::Virus("BadName".into())
        );
    }

    #[tokio::test]
    async fn the_message_is_streamed_in_chunks_and_the_verdict_read() {
        let (mut ours, mut clamd) = tokio::io::duplex(1 << 20);
        let message = vec![b'x'; CHUNK * 2 + 10];
        let server = tokio::spawn(async move {
            let mut cmd = [0u8; 10];
            clamd.read_exact(&mut cmd).await.unwrap();
            assert_eq!(&cmd, b"zINSTREAM\0");
            let mut got = Vec::new();
            let mut sizes = Vec::new();
            loop {
                let mut len = [0u8; 4];
                clamd.read_exact(&mut len).await.unwrap();
                let len = u32::from_be_bytes(len) as usize;
                sizes.push(len);
                if len == 0 {
                    break;
                }
                let mut chunk = vec![0u8; len];
                clamd.read_exact(&mut chunk).await.unwrap();
                got.extend_from_slice(&chunk);
            }
            clamd.write_all(b"stream: OK\0").await.unwrap();
            (got.len(), sizes)
        });
        assert_eq!(instream(&mut ours, &message).await, Verdict::Clean);
        let (n, sizes) = server.await.unwrap();
        assert_eq!(n, message.len());
        assert_eq!(sizes, [CHUNK, CHUNK, 10, 0]);
    }
}
