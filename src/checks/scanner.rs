//! A second opinion at the end of DATA: rspamd's HTTP check API
//! (`POST /checkv2` on its normal worker, JSON back) or SpamAssassin's
//! spamd (`SYMBOLS SPAMC/1.5`), so that an admin keeps the Bayes and fuzzy
//! hashes they trained. Their score, times `score_factor`, adds to ours;
//! with `use_action` their verdict applies too. Bounded like clamd: at
//! most `connections` scans at once, one `timeout` per message (waiting
//! included), `on_error` when the scanner is down, slow or says nonsense.
//! The message is handed over without a copy (it is shared, and counted
//! against the memory budget while the scan holds it).

use super::daemon::Daemon;
use super::pool::SharedMessage;
use super::{Check, Facts, Hook, Message};
use crate::config::{Action, Mode, ScannerConfig, ScannerKind};
use crate::telemetry::events::ScannerScan;
use crate::verdict::{self, Finding};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Symbols kept for the log and X-Spam-Report (the highest scores).
const MAX_SYMBOLS: usize = 16;

/// The most we read of a scanner's answer.
const MAX_REPLY: usize = 1 << 20;

/// What a scanner said of one message.
#[derive(Debug, Clone, PartialEq)]
pub struct Opinion {
    pub score: f64,
    /// rspamd's action (`no action`, `add header`, `soft reject`,
    /// `reject`, ...); spamd: `spam` or `ham`.
    pub action: String,
    /// Symbol names, with their scores where the scanner gives them,
    /// highest first.
    pub symbols: Vec<(String, Option<f64>)>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ScanError {
    #[error("{0}")]
    Io(String),
    #[error("unexpected answer: {0}")]
    Answer(String),
}

/// Reads rspamd's `/checkv2` JSON.
pub fn parse_rspamd(body: &[u8]) -> Result<Opinion, ScanError> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| ScanError::Answer(format!("not JSON: {e}")))?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        return Err(ScanError::Answer(e.chars().take(200).collect()));
    }
    let score = v
        .get("score")
        .and_then(|s| s.as_f64())
        .filter(|s| s.is_finite())
        .ok_or_else(|| ScanError::Answer("no score".into()))?;
    let action = v
        .get("action")
        .and_then(|a| a.as_str())
        .unwrap_or("no action")
        .to_string();
    let mut symbols: Vec<(String, Option<f64>)> = v
        .get("symbols")
        .and_then(|s| s.as_object())
        .map(|m| {
            m.iter()
                .map(|(name, s)| (name.clone(), s.get("score").and_then(|x| x.as_f64())))
                .collect()
        })
        .unwrap_or_default();
    sort_symbols(&mut symbols);
    Ok(Opinion {
        score,
        action,
        symbols,
    })
}

/// Reads spamd's answer to SYMBOLS: `SPAMD/1.1 0 EX_OK`, headers with
/// `Spam: True ; 7.5 / 5.0`, a blank line, the symbol names.
pub fn parse_spamd(reply: &[u8]) -> Result<Opinion, ScanError> {
    let text = String::from_utf8_lossy(reply);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text.as_ref(), ""));
    let mut lines = head.lines();
    let status = lines.next().unwrap_or("");
    let mut parts = status.split_whitespace();
    if !parts.next().is_some_and(|p| p.starts_with("SPAMD/")) || parts.next() != Some("0") {
        return Err(ScanError::Answer(status.chars().take(200).collect()));
    }
    let spam = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("spam"))
        .map(|(_, v)| v.trim().to_string())
        .ok_or_else(|| ScanError::Answer("no Spam header".into()))?;
    // `True ; 7.5 / 5.0`
    let (flag, scores) = spam.split_once(';').unwrap_or((&spam, ""));
    let score = scores
        .split('/')
        .next()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite())
        .ok_or_else(|| ScanError::Answer(format!("Spam: {spam}")))?;
    let symbols = body
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .take(MAX_SYMBOLS)
        .map(|s| (s.to_string(), None))
        .collect();
    let action = if flag.trim().eq_ignore_ascii_case("true") {
        "spam"
    } else {
        "ham"
    };
    Ok(Opinion {
        score,
        action: action.into(),
        symbols,
    })
}

/// Highest scores first (by size: a strong ham sign tells as much), then
/// by name; at most `MAX_SYMBOLS`.
fn sort_symbols(symbols: &mut Vec<(String, Option<f64>)>) {
    symbols.sort_by(|a, b| {
        let size = |s: &Option<f64>| s.map_or(0.0, f64::abs);
        size(&b.1)
            .total_cmp(&size(&a.1))
            .then_with(|| a.0.cmp(&b.0))
    });
    symbols.truncate(MAX_SYMBOLS);
}

/// The envelope as the scanner is told it.
pub struct Envelope<'a> {
    pub ip: std::net::IpAddr,
    pub helo: &'a str,
    pub sender: &'a str,
    pub rcpts: &'a [String],
    pub reverse: Option<&'a str>,
}

/// The message's bytes as an HTTP body, without a copy.
struct Body(SharedMessage);

impl AsRef<[u8]> for Body {
    fn as_ref(&self) -> &[u8] {
        (*self.0).as_ref()
    }
}

/// A spawned task that ends when this is dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Asks rspamd's normal worker about `message`.
async fn ask_rspamd(
    at: SocketAddr,
    env: &Envelope<'_>,
    message: &SharedMessage,
) -> Result<Opinion, ScanError> {
    use http_body_util::{BodyExt, Full, Limited};
    let io = |e: &dyn std::fmt::Display| ScanError::Io(format!("rspamd at {at}: {e}"));
    let stream = tokio::net::TcpStream::connect(at)
        .await
        .map_err(|e| io(&e))?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| io(&e))?;
    // The connection's own task, stopped however this scan ends (answered,
    // failed, or dropped at the deadline): one request per connection.
    let _driver = AbortOnDrop(tokio::spawn(conn));
    let body = Full::new(bytes::Bytes::from_owner(Body(Arc::clone(message))));
    // Header values must be visible ASCII: an 8-bit HELO name, sender or
    // recipient (SMTPUTF8) is left out rather than failing the request.
    let fits = |v: &str| v.bytes().all(|b| b.is_ascii_graphic());
    let mut req = hyper::Request::post("/checkv2")
        .header(hyper::header::HOST, at.to_string())
        .header("IP", env.ip.to_string());
    if fits(env.sender) {
        req = req.header("From", env.sender);
    }
    if fits(env.helo) && !env.helo.is_empty() {
        req = req.header("Helo", env.helo);
    }
    if let Some(name) = env.reverse.filter(|n| fits(n)) {
        req = req.header("Hostname", name);
    }
    for r in env.rcpts.iter().filter(|r| fits(r)) {
        req = req.header("Rcpt", r.as_str());
    }
    let req = req.body(body).map_err(|e| io(&e))?;
    let resp = send.send_request(req).await.map_err(|e| io(&e))?;
    let status = resp.status();
    let body = Limited::new(resp.into_body(), MAX_REPLY)
        .collect()
        .await
        .map_err(|e| io(&e))?
        .to_bytes();
    if !status.is_success() {
        let text = String::from_utf8_lossy(&body);
        return Err(ScanError::Answer(format!(
            "HTTP {status}: {}",
            text.chars().take(200).collect::<String>()
        )));
    }
    parse_rspamd(&body)
}

/// Asks spamd about `message` (SYMBOLS).
async fn ask_spamd(at: SocketAddr, message: &[u8]) -> Result<Opinion, ScanError> {
    let io = |e: std::io::Error| ScanError::Io(format!("spamd at {at}: {e}"));
    let mut s = tokio::net::TcpStream::connect(at).await.map_err(io)?;
    let head = format!(
        "SYMBOLS SPAMC/1.5\r\nContent-length: {}\r\n\r\n",
        message.len()
    );
    s.write_all(head.as_bytes()).await.map_err(io)?;
    s.write_all(message).await.map_err(io)?;
    s.shutdown().await.map_err(io)?;
    let mut reply = Vec::new();
    (&mut s)
        .take(MAX_REPLY as u64)
        .read_to_end(&mut reply)
        .await
        .map_err(io)?;
    parse_spamd(&reply)
}

/// The scanner's answer to its ping (rspamd `GET /ping`: `pong`; spamd
/// `PING`: `SPAMD/1.5 0 PONG`), for `check`: whether it is the scanner.
pub async fn ping(kind: ScannerKind, at: SocketAddr) -> std::io::Result<bool> {
    let mut s = tokio::net::TcpStream::connect(at).await?;
    let (ask, want): (&[u8], &str) = match kind {
        ScannerKind::Rspamd => (b"GET /ping HTTP/1.0\r\n\r\n", "pong"),
        ScannerKind::Spamassassin => (b"PING SPAMC/1.5\r\n\r\n", "PONG"),
    };
    s.write_all(ask).await?;
    let mut reply = Vec::new();
    (&mut s).take(4096).read_to_end(&mut reply).await?;
    Ok(String::from_utf8_lossy(&reply).contains(want))
}

pub struct Scanner {
    cfg: ScannerConfig,
    daemon: Daemon,
}

impl Scanner {
    pub fn new(cfg: &ScannerConfig) -> Scanner {
        Scanner {
            cfg: cfg.clone(),
            daemon: Daemon::new(cfg.connections, cfg.timeout.0),
        }
    }

    /// The scanner's opinion within the deadline.
    async fn judge(
        &self,
        env: &Envelope<'_>,
        message: &SharedMessage,
    ) -> Result<Opinion, ScanError> {
        let work = async {
            match self.cfg.kind {
                ScannerKind::Rspamd => ask_rspamd(self.cfg.address, env, message).await,
                ScannerKind::Spamassassin => {
                    ask_spamd(self.cfg.address, (**message).as_ref()).await
                }
            }
        };
        self.daemon
            .ask("checks.scanner.timeout", work)
            .await
            .unwrap_or_else(|e| Err(ScanError::Io(e)))
    }

    /// The scanner's own verdict, when `use_action` asks for it.
    fn own_action(&self, o: &Opinion) -> Option<(Action, crate::wire::reply::Reply)> {
        if !self.cfg.use_action {
            return None;
        }
        match o.action.as_str() {
            "reject" => Some((
                Action::Reject,
                verdict::scanner_reject(self.cfg.kind.as_str()),
            )),
            "soft reject" => Some((Action::Tempfail, verdict::scanner_soft_reject())),
            "add header" | "rewrite subject" | "spam" => {
                Some((Action::Tag, verdict::spam_score(o.score)))
            }
            _ => None,
        }
    }
}

impl Check for Scanner {
    fn off(&self) -> bool {
        self.cfg.mode == Mode::Off
    }

    fn data<'a, 'm: 'a>(&'m self, f: &'a mut Facts, m: &'a mut Message<'m>) -> Hook<'a> {
        Box::pin(async move {
            let c = &self.cfg;
            if self.off() {
                return;
            }
            let name = c.kind.as_str();
            let size = (**m.shared).as_ref().len() as u64;
            if size > c.max_size.0 {
                f.txn.found.log.scanner = format!("{name}:skipped:size");
                ScannerScan {
                    scanner: name,
                    result: "skipped",
                    took: None,
                    error: None,
                }
                .emit();
                return;
            }
            let start = Instant::now();
            let env = Envelope {
                ip: f.client.ip,
                helo: &f.client.helo,
                sender: &f.txn.sender,
                rcpts: &f.txn.rcpts,
                reverse: f.client.reverse(),
            };
            let result = self.judge(&env, m.shared).await;
            let found = &mut f.txn.found;
            ScannerScan {
                scanner: name,
                result: if result.is_ok() { "ok" } else { "error" },
                took: Some(start.elapsed()),
                error: result.as_ref().err().map(|e| e.to_string()).as_deref(),
            }
            .emit();
            let o = match result {
                Ok(o) => o,
                Err(_) => {
                    found.log.scanner = format!("{name}:error");
                    if c.on_error == Action::Tempfail {
                        found.findings.push(Finding::under(
                            c.mode,
                            "scanner",
                            Action::Tempfail,
                            "error".into(),
                            format!("{name}:error"),
                            verdict::scanner_tempfail(),
                        ));
                    }
                    return;
                }
            };
            found.log.scanner = format!("{name}:{:.2}:{}", o.score, o.action.replace(' ', "_"));
            found.log.scanner_symbols = o
                .symbols
                .iter()
                .map(|(s, score)| match score {
                    Some(x) => format!("{s}={x:.2}"),
                    None => s.clone(),
                })
                .collect();
            let reason = format!("{name}:{}", o.action.replace(' ', "_"));
            let ours = o.score * c.score_factor;
            if ours != 0.0 {
                found.findings.push(Finding::under(
                    c.mode,
                    "scanner",
                    Action::Score(ours),
                    format!("{:.2}", o.score),
                    format!("{name}:score"),
                    verdict::spam_score(ours),
                ));
            }
            if let Some((action, reply)) = self.own_action(&o) {
                found.findings.push(Finding::under(
                    c.mode,
                    "scanner",
                    action,
                    o.action.clone(),
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
    fn rspamd_answers_are_read() {
        let o = parse_rspamd(br#"{"is_skipped":false,"score":16.5,"required_score":15,"action":"reject","symbols":{"GTUBE":{"name":"GTUBE","score":15.0},"MISSING_DATE":{"name":"MISSING_DATE","score":1.0},"R_SPF_NA":{"name":"R_SPF_NA","score":0.0},"BAYES_HAM":{"name":"BAYES_HAM","score":-3.0}},"messages":{}}"#).unwrap();
        assert_eq!(o.score, 16.5);
        assert_eq!(o.action, "reject");
        let names: Vec<&str> = o.symbols.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["GTUBE", "BAYES_HAM", "MISSING_DATE", "R_SPF_NA"]);
        assert!(matches!(parse_rspamd(b"<html>"), Err(ScanError::Answer(_))));
        assert!(matches!(
            parse_rspamd(br#"{"error":"bad request"}"#),
            Err(ScanError::Answer(e)) if e == "bad request"
        ));
        assert!(parse_rspamd(br#"{"action":"reject"}"#).is_err());
    }

    #[test]
    fn spamd_answers_are_read() {
        let o = parse_spamd(b"SPAMD/1.1 0 EX_OK\r\nContent-length: 27\r\nSpam: True ; 1000.0 / 5.0\r\n\r\nGTUBE,MISSING_DATE,NO_RECEIVED").unwrap();
        assert_eq!((o.score, o.action.as_str()), (1000.0, "spam"));
        assert_eq!(o.symbols.len(), 3);
        let o = parse_spamd(b"SPAMD/1.1 0 EX_OK\r\nSpam: False ; -0.1 / 5.0\r\n\r\n").unwrap();
        assert_eq!((o.score, o.action.as_str()), (-0.1, "ham"));
        assert!(parse_spamd(b"SPAMD/1.0 76 Bad header line: x\r\n\r\n").is_err());
        assert!(parse_spamd(b"").is_err());
    }
}
