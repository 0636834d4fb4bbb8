//! EHLO/HELO: the greeting exchange, and our EHLO reply (what we implement
//! and upstream also supports).

use super::{Next, Session, UpReset};
use crate::upstream::Capabilities;
use crate::wire::command::{MailCmd, RcptCmd};
use std::io::Write;

/// What this session offered the client, fixed at EHLO time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Offer {
    pub size: u64,
    pub eight_bit_mime: bool,
    pub smtputf8: bool,
    pub dsn: bool,
    pub starttls: bool,
}

impl Offer {
    /// `upstream` is `None` until upstream has answered a probe; then we offer
    /// only what needs nothing from it.
    pub fn new(upstream: Option<&Capabilities>, max_size: u64, starttls: bool) -> Offer {
        // Read in place: a copy would copy the XCLIENT names, at every EHLO
        // (a client may send thousands).
        let up = |f: fn(&Capabilities) -> bool| upstream.is_some_and(f);
        // Never announce more than upstream takes.
        let size = match upstream.and_then(|u| u.size) {
            Some(s) if s > 0 => s.min(max_size),
            _ => max_size,
        };
        Offer {
            size,
            eight_bit_mime: up(|u| u.eight_bit_mime),
            smtputf8: up(|u| u.smtputf8),
            dsn: up(|u| u.dsn),
            starttls,
        }
    }

    /// The multi-line 250 reply to EHLO.
    ///
    /// Written straight into `out`, allocating nothing else: a client that
    /// pipelines EHLO after EHLO gets it thousands of times.
    pub fn write_reply(&self, hostname: &str, out: &mut Vec<u8>) {
        let line = |out: &mut Vec<u8>, keyword: &[u8]| {
            out.extend_from_slice(b"250-");
            out.extend_from_slice(keyword);
            out.extend_from_slice(b"\r\n");
        };
        line(out, hostname.as_bytes());
        line(out, b"PIPELINING");
        // Into a Vec, io::Write cannot fail.
        let _ = write!(out, "250-SIZE {}\r\n", self.size);
        for (offered, keyword) in [
            (self.eight_bit_mime, &b"8BITMIME"[..]),
            (self.smtputf8, b"SMTPUTF8"),
            (self.dsn, b"DSN"),
            (self.starttls, b"STARTTLS"),
        ] {
            if offered {
                line(out, keyword);
            }
        }
        // The last line: "250 ", not "250-".
        out.extend_from_slice(b"250 ENHANCEDSTATUSCODES\r\n");
    }

    /// The first MAIL parameter we did not offer, if any.
    pub fn unsupported_mail_param(&self, m: &MailCmd) -> Option<String> {
        if m.body_binary || (m.body_8bit && !self.eight_bit_mime) {
            return Some("BODY".into());
        }
        m.params
            .iter()
            .find(|p| match p.as_str() {
                "SIZE" | "BODY" => false,
                "SMTPUTF8" => !self.smtputf8,
                "RET" | "ENVID" => !self.dsn,
                _ => true,
            })
            .cloned()
    }

    /// The first RCPT parameter we did not offer, if any.
    pub fn unsupported_rcpt_param(&self, r: &RcptCmd) -> Option<String> {
        r.params
            .iter()
            .find(|p| !(matches!(p.as_str(), "NOTIFY" | "ORCPT") && self.dsn))
            .cloned()
    }
}

impl Session {
    pub(super) async fn hello(&mut self, host: String, esmtp: bool) -> Next {
        // RFC 5321 4.1.4: EHLO/HELO aborts a transaction, on both sides.
        self.end_transaction("helo", UpReset::IfOpen).await;
        self.screen.helo(&host);
        self.helo = Some(host);
        self.esmtp = esmtp;
        let cfg = &self.rt.cfg;
        let caps = self.shared.upstream.capabilities_for_client().await;
        let starttls = self.tls.is_none() && self.rt.tls.clone().is_some();
        self.offer = Offer::new(caps.as_deref(), cfg.limits.max_message_size.0, starttls);
        if esmtp {
            self.conn
                .queue_with(|out| self.offer.write_reply(&cfg.hostname, out));
        } else {
            self.conn.queue_with(|out| {
                out.extend_from_slice(b"250 ");
                out.extend_from_slice(cfg.hostname.as_bytes());
                out.extend_from_slice(b"\r\n");
            });
        }
        Next::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::command::{Command, parse};

    fn mail(line: &str) -> MailCmd {
        match parse(line.as_bytes()) {
            Ok(Command::Mail(m)) => m,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn offers_intersection() {
        let up = Capabilities {
            eight_bit_mime: true,
            dsn: true,
            size: Some(10_000_000),
            ..Capabilities::default()
        };
        let o = Offer::new(Some(&up), 25 << 20, false);
        let mut out = Vec::new();
        o.write_reply("mx.test", &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "250-mx.test\r\n250-PIPELINING\r\n250-SIZE 10000000\r\n250-8BITMIME\r\n250-DSN\r\n250 ENHANCEDSTATUSCODES\r\n"
        );
        assert_eq!(
            o.unsupported_mail_param(&mail("MAIL FROM:<a@b> BODY=8BITMIME RET=HDRS")),
            None
        );
        assert_eq!(
            o.unsupported_mail_param(&mail("MAIL FROM:<a@b> SMTPUTF8")),
            Some("SMTPUTF8".into())
        );
        let none = Offer::new(None, 1000, true);
        assert_eq!(
            none.unsupported_mail_param(&mail("MAIL FROM:<a@b> BODY=8BITMIME")),
            Some("BODY".into())
        );
        assert_eq!(
            none.unsupported_mail_param(&mail("MAIL FROM:<a@b> BODY=7BIT SIZE=5")),
            None
        );
    }
}
