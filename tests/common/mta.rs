//! A scripted upstream MTA: replies by stage, faults, what it stored.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// A message the fake MTA stored (it answered 250 after the dot).
#[derive(Debug, Clone)]
pub struct Stored {
    pub helo: String,
    pub xclient: Option<String>,
    pub proxy: Option<Vec<u8>>,
    pub mail: String,
    pub rcpts: Vec<String>,
    /// Unstuffed content, as a strict reader sees it.
    pub data: Vec<u8>,
    /// The transaction came over STARTTLS.
    pub tls: bool,
    /// The number of the connection it came over (from 1).
    pub conn: usize,
}

#[derive(Debug, Default)]
pub struct Recorded {
    /// Every command line received, with the number of its connection.
    pub commands: Vec<(usize, String)>,
    pub stored: Vec<Stored>,
    /// DATA phases that ended without a final dot (connection closed).
    pub data_aborted: usize,
    /// Connections that reached the greeting.
    pub connections: usize,
}

/// How the fake MTA behaves. Replies are full lines without CRLF.
#[derive(Clone)]
pub struct Script {
    pub greeting: String,
    pub ehlo_keywords: Vec<String>,
    /// Expect a PROXY header before the greeting.
    pub expect_proxy: bool,
    /// With `expect_proxy`: when no header came within this, greet anyway and
    /// refuse every command with 503, as Exim 4.96 does after its
    /// `proxy_protocol_timeout`.
    pub proxy_timeout: Option<Duration>,
    /// Reply overrides by stage: "ehlo", "xclient", "mail", "rcpt", "data", "dot", "rset".
    pub replies: HashMap<&'static str, String>,
    /// Close the connection instead of replying at this stage
    /// ("greeting", "mail", "rcpt", "data", "body", "dot").
    pub drop_at: Option<&'static str>,
    /// Wait this long before replying at the given stage.
    pub delay: Option<(&'static str, Duration)>,
    /// Misbehave only this many times (then behave); None = always.
    pub faults: Option<usize>,
    /// Behave this many times at a fault's stage before misbehaving.
    pub spare: usize,
    /// Read DATA like a careless MTA that any bare CR/LF "." line fools
    /// (and that drops NULs): a smuggling leak then shows as a 2nd message.
    pub lenient: bool,
    /// Offer STARTTLS with this acceptor.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Refuse EHLO/HELO names containing this, as a Postfix with
    /// restrictions on the HELO name would.
    pub refuse_helo: Option<&'static str>,
    /// Like Postfix at its smtpd_timeout: when no command comes for this
    /// long, say 421 and hang up.
    pub idle_close: Option<Duration>,
}

impl Default for Script {
    fn default() -> Self {
        Script {
            greeting: "220 fake.test ESMTP".into(),
            ehlo_keywords: vec![
                "PIPELINING".into(),
                "SIZE 52428800".into(),
                "8BITMIME".into(),
                "DSN".into(),
                "ENHANCEDSTATUSCODES".into(),
                "XCLIENT NAME ADDR PROTO HELO PORT".into(),
            ],
            expect_proxy: false,
            proxy_timeout: None,
            replies: HashMap::new(),
            drop_at: None,
            delay: None,
            faults: None,
            spare: 0,
            lenient: false,
            tls: None,
            refuse_helo: None,
            idle_close: None,
        }
    }
}

impl Script {
    pub fn reply(mut self, stage: &'static str, line: &str) -> Self {
        self.replies.insert(stage, line.to_string());
        self
    }
    pub fn drop_at(mut self, stage: &'static str) -> Self {
        self.drop_at = Some(stage);
        self
    }
    /// Offers CHUNKING and takes BDAT, as Postfix 3.4+ does.
    pub fn with_chunking(mut self) -> Self {
        self.ehlo_keywords.push("CHUNKING".into());
        self
    }
    pub fn without_xclient(mut self) -> Self {
        self.ehlo_keywords.retain(|k| !k.starts_with("XCLIENT"));
        self
    }
}

pub struct FakeMta {
    pub addr: SocketAddr,
    pub rec: Arc<Mutex<Recorded>>,
    accept: tokio::task::AbortHandle,
}

impl FakeMta {
    pub async fn start(script: Script) -> FakeMta {
        Self::start_at("127.0.0.1:0".parse().unwrap(), script).await
    }

    /// Starts on a given address (e.g. one a gate was told about before
    /// its MTA was up).
    pub async fn start_at(addr: SocketAddr, script: Script) -> FakeMta {
        let sock = TcpSocket::new_v4().unwrap();
        sock.set_reuseaddr(true).unwrap();
        sock.bind(addr).unwrap();
        let listener = sock.listen(1024).unwrap();
        let addr = listener.local_addr().unwrap();
        let rec = Arc::new(Mutex::new(Recorded::default()));
        let r2 = Arc::clone(&rec);
        let script = Arc::new(script);
        let faults = Arc::new(Faults {
            left: AtomicUsize::new(script.faults.unwrap_or(usize::MAX)),
            spare: AtomicUsize::new(script.spare),
        });
        let accept = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                tokio::spawn(serve(
                    sock,
                    Arc::clone(&script),
                    Arc::clone(&r2),
                    Arc::clone(&faults),
                ));
            }
        })
        .abort_handle();
        FakeMta { addr, rec, accept }
    }

    /// Closes the listener: new connections are refused (the MTA is down).
    pub fn stop_listening(&self) {
        self.accept.abort();
    }

    pub fn stored(&self) -> Vec<Stored> {
        self.rec.lock().unwrap().stored.clone()
    }

    pub fn commands(&self) -> Vec<String> {
        self.rec
            .lock()
            .unwrap()
            .commands
            .iter()
            .map(|(_, c)| c.clone())
            .collect()
    }

    /// The commands of the first connection that sent `verb` (e.g. "XCLIENT").
    pub fn connection_with(&self, verb: &str) -> Vec<String> {
        let rec = self.rec.lock().unwrap();
        let Some((conn, _)) = rec.commands.iter().find(|(_, c)| c.starts_with(verb)) else {
            return Vec::new();
        };
        rec.commands
            .iter()
            .filter(|(n, _)| n == conn)
            .map(|(_, c)| c.clone())
            .collect()
    }

    /// Connections that reached the greeting.
    pub fn connections(&self) -> usize {
        self.rec.lock().unwrap().connections
    }

    /// The commands connection `n` (from 1) received, in order.
    pub fn commands_on(&self, n: usize) -> Vec<String> {
        let rec = self.rec.lock().unwrap();
        rec.commands
            .iter()
            .filter(|(c, _)| *c == n)
            .map(|(_, c)| c.clone())
            .collect()
    }

    /// Commands starting with `verb` (upper-case), e.g. "MAIL".
    pub fn count(&self, verb: &str) -> usize {
        self.commands()
            .iter()
            .filter(|c| c.to_ascii_uppercase().starts_with(verb))
            .count()
    }
}

/// The verbs of command lines (upper-case), e.g. from `commands_on`.
pub fn verbs(cmds: &[String]) -> Vec<String> {
    cmds.iter()
        .map(|c| c.split(' ').next().unwrap_or("").to_ascii_uppercase())
        .collect()
}

struct Conn {
    sock: Box<dyn portcullis::runtime::Stream>,
    buf: Vec<u8>,
}

impl Conn {
    async fn line(&mut self) -> Option<String> {
        loop {
            if let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
                let l: Vec<u8> = self.buf.drain(..=nl).collect();
                let s = String::from_utf8_lossy(&l);
                return Some(s.trim_end_matches(['\r', '\n']).to_string());
            }
            let mut tmp = [0u8; 65536];
            match self.sock.read(&mut tmp).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
            }
        }
    }

    async fn send(&mut self, s: &str) -> bool {
        self.sock
            .write_all(format!("{s}\r\n").as_bytes())
            .await
            .is_ok()
    }

    /// A careless reader: NULs dropped, any of CRLF, LF or CR ends a line,
    /// and a "." line ends the message. What follows is read as commands.
    async fn lenient_data(&mut self) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        loop {
            self.buf.retain(|&b| b != 0);
            let mut i = 0;
            while let Some(rel) = self.buf[i..].iter().position(|&b| b == b'\r' || b == b'\n') {
                let end = i + rel;
                let mut next = end + 1;
                if self.buf[end] == b'\r' {
                    if next >= self.buf.len() {
                        break; // need to know whether LF follows
                    }
                    if self.buf[next] == b'\n' {
                        next += 1;
                    }
                }
                let line = self.buf[i..end].to_vec();
                i = next;
                if line == b"." {
                    self.buf.drain(..i);
                    return Some(out);
                }
                let line = line.strip_prefix(b".").unwrap_or(&line);
                out.extend_from_slice(line);
                out.extend_from_slice(b"\r\n");
            }
            self.buf.drain(..i);
            let mut tmp = [0u8; 65536];
            match self.sock.read(&mut tmp).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
            }
        }
    }

    /// A BDAT chunk: exactly `size` octets, whatever they hold. None:
    /// closed first (or, with `drop_mid`, hung up once some arrived).
    async fn chunk(&mut self, size: usize, drop_mid: bool) -> Option<Vec<u8>> {
        loop {
            if self.buf.len() >= size {
                return Some(self.buf.drain(..size).collect());
            }
            if drop_mid && !self.buf.is_empty() {
                return None;
            }
            let mut tmp = [0u8; 65536];
            match self.sock.read(&mut tmp).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
            }
        }
    }

    /// Strict DATA reading: only CRLF.CRLF ends; unstuffs. None: closed first.
    async fn data(&mut self, drop_mid: bool) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        let mut reader = portcullis::wire::data::DataReader::new(u64::MAX, usize::MAX);
        loop {
            if !self.buf.is_empty() {
                if drop_mid {
                    // Some of the body arrived: hang up before the dot.
                    return None;
                }
                let p = reader.feed(&self.buf, &mut out);
                self.buf.drain(..p.consumed);
                if p.done {
                    return Some(out);
                }
            }
            let mut tmp = [0u8; 65536];
            match self.sock.read(&mut tmp).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
            }
        }
    }
}

/// The misbehaviour budget: spared chances first, then faults.
struct Faults {
    left: AtomicUsize,
    spare: AtomicUsize,
}

/// Takes one fault from the budget; false while sparing or once it is spent.
fn fault(f: &Faults) -> bool {
    let take = |n: &AtomicUsize| {
        n.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    };
    !take(&f.spare) && take(&f.left)
}

async fn serve(
    sock: TcpStream,
    script: Arc<Script>,
    rec: Arc<Mutex<Recorded>>,
    faults: Arc<Faults>,
) {
    let mut c = Conn {
        sock: Box::new(sock),
        buf: Vec::new(),
    };
    let mut tls = false;
    let stage_reply = |stage: &str, default: &str| -> String {
        match script.replies.get(stage) {
            Some(r) if fault(&faults) => r.clone(),
            _ => default.to_string(),
        }
    };
    let drops = |stage: &str| script.drop_at == Some(stage) && fault(&faults);
    let delay = |stage: &str| -> Duration {
        match script.delay {
            Some((s, d)) if s == stage && fault(&faults) => d,
            _ => Duration::ZERO,
        }
    };
    let mut proxy = None;
    if script.expect_proxy {
        // Read the PROXY header: v1 up to CRLF, v2 by its length field.
        let mut head = vec![0u8; 16];
        let limit = script.proxy_timeout.unwrap_or(Duration::from_secs(3600));
        match tokio::time::timeout(limit, c.sock.read_exact(&mut head)).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return,
            Err(_) => {
                if !c.send(&script.greeting).await {
                    return;
                }
                while c.line().await.is_some() {
                    if !c
                        .send("503 Command refused, required Proxy negotiation failed")
                        .await
                    {
                        return;
                    }
                }
                return;
            }
        }
        if head.starts_with(b"PROXY ") {
            while !head.ends_with(b"\r\n") {
                let mut b = [0u8; 1];
                if c.sock.read_exact(&mut b).await.is_err() {
                    return;
                }
                head.push(b[0]);
            }
        } else {
            let len = u16::from_be_bytes([head[14], head[15]]) as usize;
            let mut rest = vec![0u8; len];
            if c.sock.read_exact(&mut rest).await.is_err() {
                return;
            }
            head.extend_from_slice(&rest);
        }
        proxy = Some(head);
    }
    if drops("greeting") {
        return;
    }
    let conn_no = {
        let mut r = rec.lock().unwrap();
        r.connections += 1;
        r.connections
    };
    tokio::time::sleep(delay("greeting")).await;
    if !c.send(&stage_reply("greeting", &script.greeting)).await {
        return;
    }
    let mut helo = String::new();
    let mut xclient = None;
    let mut mail = None;
    let mut rcpts: Vec<String> = Vec::new();
    let chunking = script.ehlo_keywords.iter().any(|k| k == "CHUNKING");
    // BDAT chunks of the transaction so far.
    let mut chunks: Vec<u8> = Vec::new();
    loop {
        let line = match script.idle_close {
            None => c.line().await,
            Some(limit) => match tokio::time::timeout(limit, c.line()).await {
                Ok(l) => l,
                Err(_) => {
                    c.send("421 4.4.2 fake.test Error: timeout exceeded").await;
                    return;
                }
            },
        };
        let Some(line) = line else { break };
        rec.lock().unwrap().commands.push((conn_no, line.clone()));
        let upper = line.to_ascii_uppercase();
        let verb = upper.split(' ').next().unwrap_or("").to_string();
        let ok = match verb.as_str() {
            "EHLO" | "HELO" => {
                // Like Postfix: a new greeting aborts any transaction.
                mail = None;
                rcpts.clear();
                helo = line[5.min(line.len())..].to_string();
                if script.refuse_helo.is_some_and(|r| helo.contains(r)) {
                    c.send(&format!(
                        "501 5.5.2 <{helo}>: Helo command rejected: Invalid name"
                    ))
                    .await;
                    continue;
                }
                let r = stage_reply("ehlo", "");
                if !r.is_empty() {
                    c.send(&r).await
                } else {
                    let mut lines = vec!["250-fake.test".to_string()];
                    for k in &script.ehlo_keywords {
                        lines.push(format!("250-{k}"));
                    }
                    if script.tls.is_some() && !tls {
                        lines.push("250-STARTTLS".into());
                    }
                    let last = lines.pop().unwrap().replacen("250-", "250 ", 1);
                    lines.push(last);
                    c.send(&lines.join("\r\n")).await
                }
            }
            "STARTTLS" if script.tls.is_some() && !tls => {
                c.send("220 2.0.0 Ready to start TLS").await;
                let plain = std::mem::replace(
                    &mut c.sock,
                    Box::new(tokio::io::join(tokio::io::empty(), tokio::io::sink())),
                );
                let Some(acceptor) = script.tls.clone() else {
                    return;
                };
                match acceptor.accept(plain).await {
                    Ok(s) => c.sock = Box::new(s),
                    Err(_) => return,
                }
                c.buf.clear();
                tls = true;
                true
            }
            // Postfix's limit on one attribute value, xtext encoded.
            "XCLIENT"
                if line
                    .split(' ')
                    .any(|a| a.split_once('=').is_some_and(|(_, v)| v.len() > 255)) =>
            {
                c.send("501 5.5.4 Error: attribute value too long").await
            }
            // Like Postfix: not inside a transaction.
            "XCLIENT" if mail.is_some() => {
                c.send("503 5.5.1 Error: MAIL transaction in progress")
                    .await
            }
            "XCLIENT" => {
                xclient = Some(line.clone());
                c.send(&stage_reply("xclient", "220 fake.test ESMTP again"))
                    .await
            }
            "MAIL" if mail.is_some() => c.send("503 5.5.1 Error: nested MAIL command").await,
            "RCPT" if mail.is_none() => c.send("503 5.5.1 Error: need MAIL command").await,
            "DATA" if rcpts.is_empty() => {
                let r = if mail.is_none() {
                    "503 5.5.1 Error: need RCPT command"
                } else {
                    "554 5.5.1 Error: no valid recipients"
                };
                c.send(r).await
            }
            "MAIL" => {
                if drops("mail") {
                    return;
                }
                tokio::time::sleep(delay("mail")).await;
                let r = stage_reply("mail", "250 2.1.0 Ok");
                if r.starts_with('2') {
                    mail = Some(line[10.min(line.len())..].to_string());
                    rcpts.clear();
                }
                c.send(&r).await
            }
            "RCPT" => {
                if drops("rcpt") {
                    return;
                }
                tokio::time::sleep(delay("rcpt")).await;
                let r = if upper.contains("UNKNOWN") {
                    "550 5.1.1 <unknown>: Recipient address rejected: User unknown".to_string()
                } else {
                    stage_reply("rcpt", "250 2.1.5 Ok")
                };
                if r.starts_with('2') {
                    rcpts.push(line[8.min(line.len())..].to_string());
                }
                c.send(&r).await
            }
            "DATA" => {
                if drops("data") {
                    return;
                }
                let r = stage_reply("data", "354 End data with <CR><LF>.<CR><LF>");
                if !r.starts_with("354") {
                    c.send(&r).await;
                    continue;
                }
                c.send(&r).await;
                let read = if script.lenient {
                    c.lenient_data().await
                } else {
                    c.data(drops("body")).await
                };
                let Some(data) = read else {
                    rec.lock().unwrap().data_aborted += 1;
                    return;
                };
                if drops("dot") {
                    return;
                }
                tokio::time::sleep(delay("dot")).await;
                let r = stage_reply("dot", "250 2.0.0 Ok: queued as FAKE");
                if r.starts_with('2') {
                    rec.lock().unwrap().stored.push(Stored {
                        helo: helo.clone(),
                        xclient: xclient.clone(),
                        proxy: proxy.clone(),
                        mail: mail.take().unwrap_or_default(),
                        rcpts: std::mem::take(&mut rcpts),
                        data,
                        tls,
                        conn: conn_no,
                    });
                }
                mail = None;
                rcpts.clear();
                c.send(&r).await
            }
            "BDAT" if chunking => {
                let mut words = upper.split_ascii_whitespace().skip(1);
                let size = words.next().and_then(|n| n.parse::<usize>().ok());
                let last = words.next() == Some("LAST");
                let Some(size) = size else {
                    c.send("501 5.5.4 Syntax: BDAT count [LAST]").await;
                    continue;
                };
                if drops("data") {
                    return;
                }
                // Read even when refused (RFC 3030): the chunk follows anyway.
                let Some(chunk) = c.chunk(size, drops("body")).await else {
                    rec.lock().unwrap().data_aborted += 1;
                    return;
                };
                if mail.is_none() || rcpts.is_empty() {
                    chunks.clear();
                    let r = if mail.is_none() {
                        "503 5.5.1 Error: need RCPT command"
                    } else {
                        "554 5.5.1 Error: no valid recipients"
                    };
                    c.send(r).await
                } else if !last {
                    chunks.extend_from_slice(&chunk);
                    c.send(&format!("250 2.0.0 Ok: {size} octets")).await
                } else {
                    chunks.extend_from_slice(&chunk);
                    if drops("dot") {
                        return;
                    }
                    tokio::time::sleep(delay("dot")).await;
                    let r = stage_reply("dot", "250 2.0.0 Ok: queued as FAKE");
                    let data = std::mem::take(&mut chunks);
                    if r.starts_with('2') {
                        rec.lock().unwrap().stored.push(Stored {
                            helo: helo.clone(),
                            xclient: xclient.clone(),
                            proxy: proxy.clone(),
                            mail: mail.take().unwrap_or_default(),
                            rcpts: std::mem::take(&mut rcpts),
                            data,
                            tls,
                            conn: conn_no,
                        });
                        mail = None;
                        rcpts.clear();
                    }
                    c.send(&r).await
                }
            }
            "RSET" => {
                chunks.clear();
                mail = None;
                rcpts.clear();
                c.send(&stage_reply("rset", "250 2.0.0 Ok")).await
            }
            "QUIT" => {
                c.send("221 2.0.0 Bye").await;
                return;
            }
            "NOOP" => c.send("250 2.0.0 Ok").await,
            _ => c.send("502 5.5.2 Error: command not recognized").await,
        };
        if !ok {
            return;
        }
    }
}
