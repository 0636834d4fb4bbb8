//! A plain SMTP client, and the messages tests send.

use portcullis::wire::reply::parse_reply;

use std::net::SocketAddr;

use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// A plain SMTP client for tests.
pub struct Client {
    pub sock: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        let sock = TcpStream::connect(addr).await.unwrap();
        Client {
            sock,
            buf: Vec::new(),
        }
    }

    /// Connects from a chosen loopback source address (e.g. 127.0.0.2).
    pub async fn connect_from(addr: SocketAddr, from: &str) -> Client {
        let s = TcpSocket::new_v4().unwrap();
        s.bind(format!("{from}:0").parse().unwrap()).unwrap();
        let sock = s.connect(addr).await.unwrap();
        Client {
            sock,
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.sock.write_all(bytes).await.unwrap();
    }

    pub async fn line(&mut self, s: &str) {
        self.send(format!("{s}\r\n").as_bytes()).await;
    }

    /// Reads one full reply (all lines); returns it as text. Panics after 10 s.
    pub async fn reply(&mut self) -> String {
        self.try_reply(Duration::from_secs(10))
            .await
            .expect("a reply before timeout/close")
    }

    /// One reply, or None if the connection closed or `limit` passed.
    pub async fn try_reply(&mut self, limit: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Ok(Some((r, used))) = parse_reply(&self.buf) {
                self.buf.drain(..used);
                return Some(String::from_utf8_lossy(&r.raw).into_owned());
            }
            let mut tmp = [0u8; 8192];
            match tokio::time::timeout_at(deadline, self.sock.read(&mut tmp)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
                Ok(Ok(n)) => self.buf.extend_from_slice(&tmp[..n]),
            }
        }
    }

    /// Sends a line and asserts the reply starts with `want`.
    pub async fn cmd(&mut self, s: &str, want: &str) -> String {
        self.line(s).await;
        let r = self.reply().await;
        assert!(r.starts_with(want), "{s:?}: wanted {want:?}, got {r:?}");
        r
    }

    /// True once the server has closed the connection (within 5 s).
    pub async fn closed(&mut self) -> bool {
        let mut tmp = [0u8; 1024];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), self.sock.read(&mut tmp)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }

    /// Greeting + EHLO.
    pub async fn hello(addr: SocketAddr) -> Client {
        let mut c = Client::connect(addr).await;
        let g = c.reply().await;
        assert!(g.starts_with("220 "), "{g}");
        c.cmd("EHLO client.test", "250").await;
        c
    }

    /// One whole transaction; returns the final reply.
    pub async fn send_mail(&mut self, from: &str, rcpts: &[&str], body: &[u8]) -> String {
        self.cmd(&format!("MAIL FROM:<{from}>"), "250").await;
        for r in rcpts {
            self.cmd(&format!("RCPT TO:<{r}>"), "250").await;
        }
        self.cmd("DATA", "354").await;
        let mut wire = Vec::new();
        portcullis::wire::data::write_stuffed(body, |s| wire.extend_from_slice(s));
        self.send(&wire).await;
        self.reply().await
    }
}

/// Splits the header fields Portcullis prepends (Authentication-Results,
/// X-Spam-*) off a stored message; returns them and the client's message.
pub fn split_ours(data: &[u8]) -> (String, Vec<u8>) {
    let text = data;
    let mut pos = 0;
    let mut in_ours = false;
    while pos < text.len() {
        let end = text[pos..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .map_or(text.len(), |i| pos + i + 2);
        let line = &text[pos..end];
        let continuation = line.first().is_some_and(|b| *b == b' ' || *b == b'\t');
        let ours = line.starts_with(b"Authentication-Results:") || line.starts_with(b"X-Spam-");
        if ours || (continuation && in_ours) {
            in_ours = true;
            pos = end;
        } else {
            break;
        }
    }
    (
        String::from_utf8_lossy(&text[..pos]).into_owned(),
        text[pos..].to_vec(),
    )
}

/// A message with the given Message-ID and body.
pub fn message(id: &str, body: &str) -> Vec<u8> {
    format!(
        "From: a@sender.test\r\nTo: b@example.test\r\nSubject: test\r\nMessage-ID: <{id}@sender.test>\r\n\r\n{body}"
    )
    .into_bytes()
}

/// A message with one base64 attachment.
pub fn with_attachment(name: &str, declared: &str, content: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(content);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(76)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "Subject: documents\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n--b1\r\nContent-Type: text/plain\r\n\r\nplease see the attachment\r\n--b1\r\nContent-Type: {declared}\r\nContent-Disposition: attachment; filename=\"{name}\"\r\nContent-Transfer-Encoding: base64\r\n\r\n{}\r\n--b1--\r\n",
        lines.join("\r\n")
    )
}
