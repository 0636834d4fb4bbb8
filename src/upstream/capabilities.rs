//! What upstream offers in its EHLO reply.

use crate::wire::reply::UpstreamReply;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub pipelining: bool,
    pub size: Option<u64>,
    pub eight_bit_mime: bool,
    pub smtputf8: bool,
    pub dsn: bool,
    pub enhanced_status_codes: bool,
    pub starttls: bool,
    /// BDAT (RFC 3030): the message in one chunk, its size said first.
    pub chunking: bool,
    /// XCLIENT attribute names, upper-cased, when XCLIENT is offered.
    pub xclient: Option<Vec<String>>,
}

impl Capabilities {
    /// Reads the keywords of a 250 EHLO reply (the first line is the greeting).
    pub fn from_ehlo(reply: &UpstreamReply) -> Capabilities {
        let mut c = Capabilities::default();
        for line in reply.lines().skip(1) {
            let text = String::from_utf8_lossy(line);
            let mut words = text.split_ascii_whitespace();
            let Some(kw) = words.next() else { continue };
            match kw.to_ascii_uppercase().as_str() {
                "PIPELINING" => c.pipelining = true,
                "SIZE" => c.size = words.next().and_then(|n| n.parse().ok()).or(Some(0)),
                "8BITMIME" => c.eight_bit_mime = true,
                "SMTPUTF8" => c.smtputf8 = true,
                "DSN" => c.dsn = true,
                "ENHANCEDSTATUSCODES" => c.enhanced_status_codes = true,
                "STARTTLS" => c.starttls = true,
                "CHUNKING" => c.chunking = true,
                "XCLIENT" => c.xclient = Some(words.map(|w| w.to_ascii_uppercase()).collect()),
                _ => {}
            }
        }
        c
    }

    /// True when XCLIENT can carry the client address.
    pub fn xclient_addr(&self) -> bool {
        self.xclient
            .as_ref()
            .is_some_and(|a| a.iter().any(|x| x == "ADDR"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::reply::parse_reply;

    #[test]
    fn postfix_ehlo() {
        let raw = b"250-mx.example.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-VRFY\r\n250-ETRN\r\n250-XCLIENT NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN DESTADDR DESTPORT\r\n250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250-DSN\r\n250-SMTPUTF8\r\n250 CHUNKING\r\n";
        let (r, _) = parse_reply(raw).unwrap().unwrap();
        let c = Capabilities::from_ehlo(&r);
        assert!(c.pipelining && c.eight_bit_mime && c.dsn && c.smtputf8 && c.enhanced_status_codes);
        assert_eq!(c.size, Some(10240000));
        assert!(c.xclient_addr());
        assert!(c.chunking);
        assert!(!c.starttls);
    }

    #[test]
    fn smtp_sink_ehlo_with_empty_last_line() {
        let raw =
            b"250-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-XCLIENT NAME HELO\r\n250 \r\n";
        let (r, _) = parse_reply(raw).unwrap().unwrap();
        let c = Capabilities::from_ehlo(&r);
        assert!(c.pipelining && c.eight_bit_mime);
        assert!(!c.xclient_addr());
        assert!(!c.chunking);
    }
}
