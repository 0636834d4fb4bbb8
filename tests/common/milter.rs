//! A scripted MTA for the milter front door: it negotiates as Postfix
//! does (protocol 6, every action and step offered unless told), then
//! sends packets and reads our answers.

use portcullis::wire::milter::{Command, Decoder, Family, Response, step};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct Mta {
    sock: TcpStream,
    decoder: Decoder,
    /// The steps we agreed to (what we will not answer).
    pub steps: u32,
    pub actions: u32,
}

/// Every step Postfix 3.7 offers.
pub const POSTFIX_STEPS: u32 = 0x1f_ffff;

impl Mta {
    /// Connects and negotiates, offering every action and `steps`.
    pub async fn connect(addr: SocketAddr, steps: u32) -> Mta {
        let sock = TcpStream::connect(addr).await.unwrap();
        let mut m = Mta {
            sock,
            decoder: Decoder::new(1 << 20),
            steps: 0,
            actions: 0,
        };
        let r = m
            .ask(Command::Negotiate {
                version: 6,
                actions: 0x1ff,
                steps,
            })
            .await;
        let Response::Negotiate {
            version,
            actions,
            steps,
            ..
        } = r
        else {
            panic!("not a negotiation reply: {r:?}");
        };
        assert_eq!(version, 6);
        (m.actions, m.steps) = (actions, steps);
        m
    }

    pub async fn send(&mut self, c: Command) {
        let mut out = Vec::new();
        c.encode(&mut out);
        self.sock.write_all(&out).await.unwrap();
    }

    /// Sends raw bytes (hostile input).
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        let _ = self.sock.write_all(bytes).await;
    }

    /// The next packet from the filter (panics after 10 s).
    pub async fn read(&mut self) -> Response {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(r) = self.decoder.response().unwrap() {
                return r;
            }
            let n = tokio::time::timeout(Duration::from_secs(10), self.sock.read(&mut buf))
                .await
                .expect("an answer within 10 s")
                .unwrap();
            assert!(n > 0, "the filter closed the connection");
            self.decoder.feed(&buf[..n]);
        }
    }

    /// Whether the filter closed the connection (within 5 s).
    pub async fn closed(&mut self) -> bool {
        let mut buf = [0u8; 256];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), self.sock.read(&mut buf)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }

    pub async fn ask(&mut self, c: Command) -> Response {
        self.send(c).await;
        self.read().await
    }

    /// Sends `c`; when the filter answers this step, its answer.
    pub async fn step(&mut self, c: Command, no_reply: u32) -> Option<Response> {
        if self.steps & no_reply != 0 {
            self.send(c).await;
            None
        } else {
            Some(self.ask(c).await)
        }
    }

    /// Macros for a stage, then the command; the filter's answer unless
    /// it agreed not to answer this step (`no_reply`).
    pub async fn with_macros(
        &mut self,
        stage: u8,
        macros: &[(&str, &str)],
        c: Command,
        no_reply: u32,
    ) -> Option<Response> {
        let pairs = macros
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect();
        self.send(Command::Macros { stage, pairs }).await;
        self.step(c, no_reply).await
    }

    /// Connect from `ip` (port 54321) named `name`: the filter's answer,
    /// or `None` where it agreed not to answer CONNECT (Postfix's offer).
    pub async fn connect_from(&mut self, ip: &str, name: &str) -> Option<Response> {
        let family = if ip.contains(':') {
            Family::Inet6 {
                port: 54321,
                address: ip.as_bytes().to_vec(),
            }
        } else {
            Family::Inet {
                port: 54321,
                address: ip.as_bytes().to_vec(),
            }
        };
        self.with_macros(
            b'C',
            &[("j", "mx.example.test"), ("{daemon_name}", "smtpd")],
            Command::Connect {
                hostname: name.as_bytes().to_vec(),
                family,
            },
            step::NO_REPLY_CONNECT,
        )
        .await
    }

    /// HELO: the filter's answer, or `None` where it agreed not to answer.
    pub async fn helo(&mut self, name: &str) -> Option<Response> {
        self.step(Command::Helo(name.as_bytes().to_vec()), step::NO_REPLY_HELO)
            .await
    }

    /// MAIL: the filter's answer, or `None` where it agreed not to answer
    /// (its refusal then comes at RCPT).
    pub async fn mail(&mut self, from: &str) -> Option<Response> {
        self.step(
            Command::Mail(vec![format!("<{from}>").into_bytes()]),
            step::NO_REPLY_MAIL,
        )
        .await
    }

    pub async fn rcpt(&mut self, to: &str) -> Response {
        self.ask(Command::Rcpt(vec![format!("<{to}>").into_bytes()]))
            .await
    }

    /// DATA, the message's header fields and body (as Postfix sends them:
    /// values with their leading space when agreed, body with CRLF), and
    /// the end of the message: every answer to it, the last being final.
    pub async fn message(&mut self, msg: &str) -> Vec<Response> {
        self.message_sent(msg).await;
        self.end_of_message().await
    }

    /// Sends DATA, the header fields and the body of `msg`, without the
    /// end of the message.
    pub async fn message_sent(&mut self, msg: &str) {
        self.step(Command::Data, step::NO_REPLY_DATA).await;
        let (head, body) = msg.split_once("\r\n\r\n").unwrap_or((msg, ""));
        let leading = self.steps & step::HEADER_LEADING_SPACE != 0;
        let mut fields: Vec<(String, String)> = Vec::new();
        for line in head.split("\r\n") {
            if line.starts_with([' ', '\t']) {
                let last = fields.last_mut().unwrap();
                last.1.push('\n');
                last.1.push_str(line);
            } else if let Some((n, v)) = line.split_once(':') {
                let v = if leading { v } else { v.trim_start() };
                fields.push((n.to_string(), v.to_string()));
            }
        }
        for (name, value) in fields {
            let c = Command::Header {
                name: name.into_bytes(),
                value: value.into_bytes(),
            };
            if let Some(r) = self.step(c, step::NO_REPLY_HEADER).await {
                assert_eq!(r, Response::Continue);
            }
        }
        self.step(Command::EndOfHeaders, step::NO_REPLY_EOH).await;
        for chunk in body.as_bytes().chunks(65_535) {
            if let Some(r) = self
                .step(Command::Body(chunk.to_vec()), step::NO_REPLY_BODY)
                .await
            {
                assert_eq!(r, Response::Continue);
            }
        }
    }

    /// The end of the message, and our answers to it.
    pub async fn end_of_message(&mut self) -> Vec<Response> {
        self.send(Command::EndOfMessage(Vec::new())).await;
        let mut all = Vec::new();
        loop {
            let r = self.read().await;
            let last = matches!(
                r,
                Response::Continue
                    | Response::Accept
                    | Response::Reject
                    | Response::Tempfail
                    | Response::Discard
                    | Response::ReplyCode(_)
            );
            all.push(r);
            if last {
                return all;
            }
        }
    }
}

/// The text of a reply-code answer.
pub fn code_text(r: &Response) -> String {
    match r {
        Response::ReplyCode(t) => String::from_utf8_lossy(t).into_owned(),
        other => format!("{other:?}"),
    }
}
