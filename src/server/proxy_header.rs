//! Reading the PROXY header of an incoming connection (`listen[].proxy_protocol`).

use crate::wire::proxy::{MAX_HEADER, ProxiedPeer, ProxyHeaderError, parse};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Reads until a whole header is in, within `limit`.
pub async fn read<S: AsyncRead + Unpin>(
    io: &mut S,
    limit: Duration,
) -> Result<ProxiedPeer, ProxyHeaderError> {
    let mut buf = Vec::with_capacity(256);
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if !buf.is_empty() {
            match parse(&buf) {
                Ok(Some(p)) => return Ok(p),
                Ok(None) if buf.len() < MAX_HEADER => {}
                _ => return Err(ProxyHeaderError::Invalid),
            }
        }
        buf.reserve(256);
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Err(ProxyHeaderError::Closed),
            Ok(Ok(_)) => {}
            Err(_) => return Err(ProxyHeaderError::Timeout(limit)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::identity::{Identity, proxy_header};
    use std::net::SocketAddr;

    #[tokio::test]
    async fn v1_and_v2_with_pipelined_rest() {
        let src: SocketAddr = "198.51.100.7:40000".parse().unwrap();
        let dst: SocketAddr = "192.0.2.25:25".parse().unwrap();
        for v in [Identity::ProxyV1, Identity::ProxyV2] {
            let mut bytes = proxy_header(v, src, dst);
            bytes.extend_from_slice(b"EHLO x\r\n");
            let mut io = bytes.as_slice();
            let p = read(&mut io, Duration::from_secs(1)).await.unwrap();
            assert_eq!(p.source, Some(src));
            assert_eq!(p.destination, Some(dst));
            assert_eq!(p.rest, b"EHLO x\r\n");
        }
    }

    #[tokio::test]
    async fn garbage_and_silence() {
        let mut io: &[u8] = b"EHLO x\r\n";
        assert_eq!(
            read(&mut io, Duration::from_secs(1)).await.unwrap_err(),
            ProxyHeaderError::Invalid
        );
        let mut io: &[u8] = b"PROXY TCP4 1.2.3.4";
        assert_eq!(
            read(&mut io, Duration::from_secs(1)).await.unwrap_err(),
            ProxyHeaderError::Closed
        );
        let mut io: &[u8] = b"PROXY UNKNOWN\r\n";
        let p = read(&mut io, Duration::from_secs(1)).await.unwrap();
        assert_eq!(p.source, None);
    }
}
