//! The PROXY v1/v2 header from a trusted load balancer, parsed (sans-IO;
//! `server::proxy_header` reads it from the socket).

use std::net::SocketAddr;
use std::time::Duration;

/// Longest header we wait for (v1 is at most 107 bytes; v2 with TLVs is
/// bounded here so a peer cannot make us buffer much).
pub const MAX_HEADER: usize = 4096;

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

/// Parses a PROXY v1/v2 header at the start of `buf`; `Ok(None)`:
/// incomplete so far.
pub fn parse(buf: &[u8]) -> Result<Option<ProxiedPeer>, ProxyHeaderError> {
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
