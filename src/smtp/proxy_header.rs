//! Reading an incoming PROXY v1/v2 header from a trusted load balancer.

use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Longest header we wait for (v1 is at most 107 bytes; v2 with TLVs is
/// bounded here so a peer cannot make us buffer much).
const MAX_HEADER: usize = 4096;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProxyHeaderError {
    #[error("no PROXY header within {0:?}")]
    Timeout(Duration),
    #[error("connection closed before the PROXY header")]
    Closed,
    #[error("invalid PROXY header")]
    Invalid,
}

/// The addresses a PROXY header announced, and bytes read after it.
#[derive(Debug)]
pub struct ProxiedPeer {
    /// `None` for `PROXY UNKNOWN` / v2 LOCAL (health checks): keep the socket's.
    pub source: Option<SocketAddr>,
    pub destination: Option<SocketAddr>,
    pub rest: Vec<u8>,
}

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

/// `Ok(None)`: incomplete so far.
fn parse(buf: &[u8]) -> Result<Option<ProxiedPeer>, ProxyHeaderError> {
    use ppp::PartialResult;
    let header = ppp::HeaderResult::parse(buf);
    if header.is_incomplete() {
        return Ok(None);
    }
    match header {
        ppp::HeaderResult::V1(Ok(h)) => {
            let len = h.header.len();
            let (source, destination) = match h.addresses {
                ppp::v1::Addresses::Tcp4(a) => (
                    Some(SocketAddr::new(a.source_address.into(), a.source_port)),
                    Some(SocketAddr::new(
                        a.destination_address.into(),
                        a.destination_port,
                    )),
                ),
                ppp::v1::Addresses::Tcp6(a) => (
                    Some(SocketAddr::new(a.source_address.into(), a.source_port)),
                    Some(SocketAddr::new(
                        a.destination_address.into(),
                        a.destination_port,
                    )),
                ),
                ppp::v1::Addresses::Unknown => (None, None),
            };
            Ok(Some(ProxiedPeer {
                source,
                destination,
                rest: buf[len..].to_vec(),
            }))
        }
        ppp::HeaderResult::V2(Ok(h)) => {
            let len = h.header.len();
            let (source, destination) = match (h.command, h.addresses) {
                (ppp::v2::Command::Proxy, ppp::v2::Addresses::IPv4(a)) => (
                    Some(SocketAddr::new(a.source_address.into(), a.source_port)),
                    Some(SocketAddr::new(
                        a.destination_address.into(),
                        a.destination_port,
                    )),
                ),
                (ppp::v2::Command::Proxy, ppp::v2::Addresses::IPv6(a)) => (
                    Some(SocketAddr::new(a.source_address.into(), a.source_port)),
                    Some(SocketAddr::new(
                        a.destination_address.into(),
                        a.destination_port,
                    )),
                ),
                _ => (None, None),
            };
            Ok(Some(ProxiedPeer {
                source,
                destination,
                rest: buf[len..].to_vec(),
            }))
        }
        _ => Err(ProxyHeaderError::Invalid),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::{Identity, proxy_header};

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
