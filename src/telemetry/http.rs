//! The metrics listener: `GET /metrics` (Prometheus text) and `GET /` (a
//! small status page, plain HTML). A minimal HTTP/1.1 responder: one request
//! per connection, bounded request size and time.

use metrics_exporter_prometheus::PrometheusHandle;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// What the status page shows, gathered when it is asked for.
pub trait Status: Send + Sync {
    fn html(&self) -> String;
}

const MAX_REQUEST: usize = 8 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn serve(listener: TcpListener, handle: PrometheusHandle, status: Arc<dyn Status>) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let handle = handle.clone();
        let status = Arc::clone(&status);
        tokio::spawn(async move {
            let mut buf = Vec::with_capacity(1024);
            let read = tokio::time::timeout(REQUEST_TIMEOUT, async {
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < MAX_REQUEST {
                    let mut tmp = [0u8; 1024];
                    match sock.read(&mut tmp).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => buf.extend_from_slice(&tmp[..n]),
                    }
                }
                true
            })
            .await;
            if !matches!(read, Ok(true)) {
                return;
            }
            let line =
                String::from_utf8_lossy(buf.split(|&b| b == b'\n').next().unwrap_or_default())
                    .into_owned();
            let mut parts = line.split_whitespace();
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let (code, ctype, body) = match (method, path) {
                ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4", handle.render()),
                ("GET", "/") => ("200 OK", "text/html; charset=utf-8", status.html()),
                ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
                _ => (
                    "405 Method Not Allowed",
                    "text/plain",
                    "GET only\n".to_string(),
                ),
            };
            let head = format!(
                "HTTP/1.1 {code}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, async {
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(body.as_bytes()).await;
                let _ = sock.shutdown().await;
            })
            .await;
        });
    }
}

/// Binds the metrics listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
