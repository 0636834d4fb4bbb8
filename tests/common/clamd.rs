//! A scripted clamd on loopback: it reads one INSTREAM per connection and
//! answers `stream: NAME FOUND` when the stream holds the marker, else
//! `stream: OK`; or, silent, never answers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub struct FakeClamd {
    pub addr: SocketAddr,
    /// Streams read to their end.
    pub scanned: Arc<AtomicUsize>,
}

impl FakeClamd {
    /// Finds `marker` as the virus `name`.
    pub async fn start(marker: &'static [u8], name: &'static str) -> FakeClamd {
        Self::serve(Some((marker, name))).await
    }

    /// Reads every stream and never answers (a clamd that hangs).
    pub async fn silent() -> FakeClamd {
        Self::serve(None).await
    }

    async fn serve(script: Option<(&'static [u8], &'static str)>) -> FakeClamd {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let scanned = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&scanned);
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let count = Arc::clone(&count);
                tokio::spawn(async move {
                    let mut cmd = [0u8; 10];
                    if s.read_exact(&mut cmd).await.is_err() || &cmd != b"zINSTREAM\0" {
                        return;
                    }
                    let mut stream = Vec::new();
                    loop {
                        let mut len = [0u8; 4];
                        if s.read_exact(&mut len).await.is_err() {
                            return;
                        }
                        let len = u32::from_be_bytes(len) as usize;
                        if len == 0 {
                            break;
                        }
                        let mut chunk = vec![0u8; len];
                        if s.read_exact(&mut chunk).await.is_err() {
                            return;
                        }
                        stream.extend_from_slice(&chunk);
                    }
                    count.fetch_add(1, Ordering::SeqCst);
                    let Some((marker, name)) = script else {
                        // Hold the connection, say nothing.
                        tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
                        return;
                    };
                    let infected = stream.windows(marker.len()).any(|w| w == marker);
                    let reply = if infected {
                        format!("stream: {name} FOUND\0")
                    } else {
                        "stream: OK\0".to_string()
                    };
                    let _ = s.write_all(reply.as_bytes()).await;
                });
            }
        });
        FakeClamd { addr, scanned }
    }

    pub fn scanned(&self) -> usize {
        self.scanned.load(Ordering::SeqCst)
    }
}
