//! Passing the real client to upstream: XCLIENT (Postfix) or a PROXY header
//! (Exim `hosts_proxy`, Postfix `smtpd_upstream_proxy_protocol`).

use std::net::SocketAddr;

/// The resolved way to pass the client identity on one upstream connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identity {
    Xclient,
    ProxyV1,
    ProxyV2,
    None,
}

impl Identity {
    pub fn as_str(self) -> &'static str {
        match self {
            Identity::Xclient => "xclient",
            Identity::ProxyV1 => "proxy-v1",
            Identity::ProxyV2 => "proxy-v2",
            Identity::None => "none",
        }
    }
}

/// A client's DNS name as Postfix's XCLIENT carries it: a name, or why
/// there is none. Postfix treats `[UNAVAILABLE]` as a permanent failure
/// (`reject_unknown_client_hostname` refuses with 5xx) and `[TEMPUNAVAIL]`
/// as a temporary one (4xx).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum DnsName {
    Known(String),
    #[default]
    Unavailable,
    TempUnavailable,
}

impl DnsName {
    fn xclient_value(&self) -> &str {
        match self {
            DnsName::Known(n) => n,
            DnsName::Unavailable => "[UNAVAILABLE]",
            DnsName::TempUnavailable => "[TEMPUNAVAIL]",
        }
    }

    pub fn known(&self) -> Option<&str> {
        match self {
            DnsName::Known(n) => Some(n),
            _ => None,
        }
    }
}

/// What upstream should believe about the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    pub addr: SocketAddr,
    /// The address the client connected to (ours).
    pub local: SocketAddr,
    pub helo: Option<String>,
    /// The forward-confirmed reverse name (XCLIENT NAME).
    pub name: DnsName,
    /// The reverse name, confirmed or not (XCLIENT REVERSE_NAME).
    pub reverse_name: DnsName,
    pub esmtp: bool,
}

/// Postfix refuses an XCLIENT attribute value longer than this (after
/// xtext encoding): `smtpd` answers `501 5.5.4 Bad ... syntax`.
pub const XCLIENT_MAX_VALUE: usize = 255;

/// RFC 3461 xtext: `+HH` for `+`, `=`, and bytes outside `!`..`~`.
fn xtext(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(b as char);
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

/// An xtext attribute value upstream can take: too long a value (an 8-bit
/// HELO name triples in xtext) is sent as `[UNAVAILABLE]`; the client's
/// HELO name still reaches upstream in the EHLO that follows XCLIENT.
fn attribute(value: &str) -> String {
    let x = xtext(value);
    if x.len() > XCLIENT_MAX_VALUE {
        "[UNAVAILABLE]".into()
    } else {
        x
    }
}

/// Builds the XCLIENT command (without CRLF) using only the attributes upstream offers.
pub fn xclient_line(c: &ClientIdentity, offered: &[String]) -> String {
    let has = |a: &str| offered.iter().any(|o| o == a);
    let mut line = String::from("XCLIENT");
    if has("ADDR") {
        let ip = c.addr.ip().to_canonical();
        match ip {
            std::net::IpAddr::V4(v4) => line.push_str(&format!(" ADDR={v4}")),
            std::net::IpAddr::V6(v6) => line.push_str(&format!(" ADDR=IPV6:{v6}")),
        }
    }
    if has("PORT") {
        line.push_str(&format!(" PORT={}", c.addr.port()));
    }
    if has("NAME") {
        line.push_str(&format!(" NAME={}", attribute(c.name.xclient_value())));
    }
    if has("REVERSE_NAME") {
        let value = attribute(c.reverse_name.xclient_value());
        line.push_str(&format!(" REVERSE_NAME={value}"));
    }
    if has("HELO") {
        let helo = c.helo.as_deref().unwrap_or("[UNAVAILABLE]");
        line.push_str(&format!(" HELO={}", attribute(helo)));
    }
    if has("PROTO") {
        line.push_str(if c.esmtp {
            " PROTO=ESMTP"
        } else {
            " PROTO=SMTP"
        });
    }
    if has("DESTADDR") {
        match c.local.ip().to_canonical() {
            std::net::IpAddr::V4(v4) => line.push_str(&format!(" DESTADDR={v4}")),
            std::net::IpAddr::V6(v6) => line.push_str(&format!(" DESTADDR=IPV6:{v6}")),
        }
    }
    if has("DESTPORT") {
        line.push_str(&format!(" DESTPORT={}", c.local.port()));
    }
    line
}

/// A PROXY protocol header announcing `src` -> `dst`.
pub fn proxy_header(version: Identity, src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (src, dst) = same_family(src, dst);
    match version {
        Identity::ProxyV1 => {
            let addrs = match (src, dst) {
                (SocketAddr::V4(s), SocketAddr::V4(d)) => {
                    ppp::v1::Addresses::new_tcp4(*s.ip(), *d.ip(), s.port(), d.port())
                }
                (SocketAddr::V6(s), SocketAddr::V6(d)) => {
                    ppp::v1::Addresses::new_tcp6(*s.ip(), *d.ip(), s.port(), d.port())
                }
                _ => ppp::v1::Addresses::Unknown,
            };
            addrs.to_string().into_bytes()
        }
        _ => {
            let builder = ppp::v2::Builder::with_addresses(
                ppp::v2::Version::Two | ppp::v2::Command::Proxy,
                ppp::v2::Protocol::Stream,
                (src, dst),
            );
            // Building into a Vec cannot fail for plain addresses.
            builder.build().unwrap_or_default()
        }
    }
}

/// Maps both ends into one family (IPv4-mapped IPv6 becomes IPv4; a mixed
/// pair becomes IPv6) because PROXY headers carry a single family.
fn same_family(src: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
    let s = SocketAddr::new(src.ip().to_canonical(), src.port());
    let d = SocketAddr::new(dst.ip().to_canonical(), dst.port());
    match (s, d) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) | (SocketAddr::V6(_), SocketAddr::V6(_)) => (s, d),
        _ => {
            let v6 = |a: SocketAddr| match a {
                SocketAddr::V4(v4) => SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port()),
                v6 => v6,
            };
            (v6(s), v6(d))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> ClientIdentity {
        ClientIdentity {
            addr: "203.0.113.5:40000".parse().unwrap(),
            local: "127.0.0.1:25".parse().unwrap(),
            helo: Some("mail spammer=x".into()),
            name: DnsName::Unavailable,
            reverse_name: DnsName::Known("mail.spammer.test".into()),
            esmtp: true,
        }
    }

    #[test]
    fn xclient_uses_offered_attributes_and_xtext() {
        let all: Vec<String> = "NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN DESTADDR DESTPORT"
            .split(' ')
            .map(String::from)
            .collect();
        assert_eq!(
            xclient_line(&client(), &all),
            "XCLIENT ADDR=203.0.113.5 PORT=40000 NAME=[UNAVAILABLE] REVERSE_NAME=mail.spammer.test HELO=mail+20spammer+3Dx PROTO=ESMTP DESTADDR=127.0.0.1 DESTPORT=25"
        );
        let mut temp = client();
        temp.name = DnsName::TempUnavailable;
        temp.reverse_name = DnsName::TempUnavailable;
        let name = vec!["NAME".to_string(), "REVERSE_NAME".to_string()];
        assert_eq!(
            xclient_line(&temp, &name),
            "XCLIENT NAME=[TEMPUNAVAIL] REVERSE_NAME=[TEMPUNAVAIL]"
        );
        // An 8-bit HELO of 86 octets is 258 in xtext: past Postfix's limit.
        let mut long = client();
        long.helo = Some("é".repeat(43));
        let helo = vec!["HELO".to_string()];
        assert_eq!(xclient_line(&long, &helo), "XCLIENT HELO=[UNAVAILABLE]");
        long.helo = Some("é".repeat(42));
        assert_eq!(
            xclient_line(&long, &helo).len(),
            "XCLIENT HELO=".len() + 252
        );
        let some = vec!["ADDR".to_string()];
        assert_eq!(xclient_line(&client(), &some), "XCLIENT ADDR=203.0.113.5");
        let mut v6 = client();
        v6.addr = "[2001:db8::1]:1".parse().unwrap();
        assert_eq!(xclient_line(&v6, &some), "XCLIENT ADDR=IPV6:2001:db8::1");
    }

    #[test]
    fn proxy_headers() {
        let c = client();
        assert_eq!(
            proxy_header(Identity::ProxyV1, c.addr, c.local),
            b"PROXY TCP4 203.0.113.5 127.0.0.1 40000 25\r\n"
        );
        let v2 = proxy_header(Identity::ProxyV2, c.addr, c.local);
        let parsed = ppp::v2::Header::try_from(v2.as_slice()).unwrap();
        assert_eq!(
            parsed.addresses,
            ppp::v2::Addresses::from((c.addr, c.local))
        );
        let mixed = proxy_header(
            Identity::ProxyV1,
            "[2001:db8::1]:5".parse().unwrap(),
            c.local,
        );
        assert_eq!(mixed, b"PROXY TCP6 2001:db8::1 ::ffff:127.0.0.1 5 25\r\n");
    }
}
