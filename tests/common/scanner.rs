//! A scripted rspamd normal worker on loopback: it reads one
//! `POST /checkv2` per connection, keeps the request's headers, and
//! answers with the JSON of the first rule whose marker the message holds
//! (else a clean answer), or, silent, never answers.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// (marker in the message, JSON answer)
pub type Answer = (&'static str, String);

/// One request: its header lines (lower-case names) and body length.
pub type Request = (Vec<(String, String)>, usize);

pub struct FakeRspamd {
    pub addr: SocketAddr,
    /// Each request's header lines (lower-case names) and body length.
    pub seen: Arc<Mutex<Vec<Request>>>,
}

/// An rspamd answer with `score`, `action` and symbols with scores.
pub fn answer(score: f64, action: &str, symbols: &[(&str, f64)]) -> String {
    let syms: Vec<String> = symbols
        .iter()
        .map(|(n, s)| format!(r#""{n}":{{"name":"{n}","score":{s}}}"#))
        .collect();
    format!(
        r#"{{"is_skipped":false,"score":{score},"required_score":15.0,"action":"{action}","symbols":{{{}}},"messages":{{}}}}"#,
        syms.join(",")
    )
}

impl FakeRspamd {
    pub async fn start(answers: Vec<Answer>) -> FakeRspamd {
        Self::serve(Some(answers)).await
    }

    /// Reads each request and never answers.
    pub async fn silent() -> FakeRspamd {
        Self::serve(None).await
    }

    async fn serve(answers: Option<Vec<Answer>>) -> FakeRspamd {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        let answers = answers.map(Arc::new);
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let (log, answers) = (Arc::clone(&log), answers.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 8192];
                    let head_end = loop {
                        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break p + 4;
                        }
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
                    let mut lines = head.lines();
                    if !lines.next().unwrap_or("").starts_with("POST /checkv2 ") {
                        return;
                    }
                    let headers: Vec<(String, String)> = lines
                        .filter_map(|l| l.split_once(':'))
                        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                        .collect();
                    let len: usize = headers
                        .iter()
                        .find(|(k, _)| k == "content-length")
                        .and_then(|(_, v)| v.parse().ok())
                        .unwrap_or(0);
                    while buf.len() < head_end + len {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let body = &buf[head_end..head_end + len];
                    log.lock().unwrap().push((headers, len));
                    let Some(answers) = answers else {
                        tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
                        return;
                    };
                    let json = answers
                        .iter()
                        .find(|(m, _)| body.windows(m.len()).any(|w| w == m.as_bytes()))
                        .map(|(_, j)| j.clone())
                        .unwrap_or_else(|| answer(0.5, "no action", &[("MIME_GOOD", -0.1)]));
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{json}",
                        json.len()
                    );
                    let _ = s.write_all(reply.as_bytes()).await;
                });
            }
        });
        FakeRspamd { addr, seen }
    }

    /// The requests so far.
    pub fn requests(&self) -> Vec<Request> {
        self.seen.lock().unwrap().clone()
    }
}
