//! SMTP replies: our own (typed, class-consistent) and upstream's (relayed raw).

use std::borrow::Cow;

/// An enhanced status code (RFC 3463) `class.subject.detail`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Enhanced {
    pub subject: u16,
    pub detail: u16,
}

/// A reply we generate. The enhanced code's class is derived from the basic
/// code, so a `4xx` with a `5.x.x` cannot be written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub enhanced: Option<Enhanced>,
    pub text: Cow<'static, str>,
}

impl Reply {
    pub const fn new(code: u16, subject: u16, detail: u16, text: &'static str) -> Reply {
        Reply {
            code,
            enhanced: Some(Enhanced { subject, detail }),
            text: Cow::Borrowed(text),
        }
    }

    pub fn with_text(mut self, text: impl Into<Cow<'static, str>>) -> Reply {
        self.text = text.into();
        self
    }

    pub fn class(&self) -> u16 {
        self.code / 100
    }

    pub fn is_positive(&self) -> bool {
        self.code < 400
    }

    /// The enhanced code as text, e.g. `5.7.1`.
    pub fn enhanced_code(&self) -> Option<String> {
        self.enhanced
            .map(|e| format!("{}.{}.{}", self.class(), e.subject, e.detail))
    }

    /// Appends the wire form (CRLF terminated, multi-line if `text` has `\n`).
    /// The numbers are written digit by digit: a reply is written for
    /// every command, and `format!` cost two allocations per line.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let mut lines = self.text.split('\n').peekable();
        while let Some(line) = lines.next() {
            push_decimal(out, self.code);
            out.push(if lines.peek().is_some() { b'-' } else { b' ' });
            if let Some(e) = self.enhanced {
                push_decimal(out, self.class());
                out.push(b'.');
                push_decimal(out, e.subject);
                out.push(b'.');
                push_decimal(out, e.detail);
                out.push(b' ');
            }
            out.extend_from_slice(line.trim_end_matches('\r').as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
}

/// Appends `n` in decimal.
fn push_decimal(out: &mut Vec<u8>, n: u16) {
    let mut digits = [0u8; 5];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

// The replies Portcullis itself gives; one table so codes stay consistent.
pub const OK: Reply = Reply::new(250, 0, 0, "OK");
pub const MAIL_OK: Reply = Reply::new(250, 1, 0, "Sender OK");
pub const RSET_OK: Reply = Reply::new(250, 0, 0, "Flushed");
pub const NOOP_OK: Reply = Reply::new(250, 0, 0, "OK");
pub const VRFY: Reply = Reply::new(
    252,
    5,
    0,
    "Cannot VRFY user, but will accept message and attempt delivery",
);
pub const HELP: Reply = Reply::new(214, 0, 0, "See RFC 5321");
pub const START_DATA: Reply = Reply {
    code: 354,
    enhanced: None,
    text: Cow::Borrowed("End data with <CR><LF>.<CR><LF>"),
};
pub const BYE: Reply = Reply::new(221, 0, 0, "Bye");
pub const READY_TLS: Reply = Reply::new(220, 0, 0, "Ready to start TLS");

pub const SYNTAX: Reply = Reply::new(500, 5, 2, "Syntax error, command unrecognized");
pub const LINE_TOO_LONG: Reply = Reply::new(500, 5, 2, "Line too long");
pub const PARAM_SYNTAX: Reply = Reply::new(501, 5, 4, "Syntax error in parameters");
pub const BAD_HELO: Reply = Reply::new(501, 5, 2, "Invalid HELO name: not UTF-8");
pub const BAD_SENDER: Reply = Reply::new(501, 1, 7, "Bad sender address syntax");
pub const BAD_RECIPIENT: Reply = Reply::new(501, 1, 3, "Bad recipient address syntax");
pub const NOT_IMPLEMENTED: Reply = Reply::new(502, 5, 1, "Command not implemented");
pub const NEED_HELO: Reply = Reply::new(503, 5, 1, "Send EHLO/HELO first");
pub const NESTED_MAIL: Reply = Reply::new(503, 5, 1, "Sender already specified");
pub const NEED_MAIL: Reply = Reply::new(503, 5, 1, "Need MAIL command");
pub const NEED_RCPT: Reply = Reply::new(554, 5, 1, "No valid recipients");
pub const PARAM_UNSUPPORTED: Reply = Reply::new(555, 5, 4, "Unsupported parameter");
// 554, as Postfix and Exim answer it.
pub const TLS_ALREADY: Reply = Reply::new(554, 5, 1, "TLS already active");

pub const BARE_NEWLINE_IN_COMMAND: Reply = Reply::new(500, 5, 2, "Bare <CR> or <LF> in command");
pub const PREGREET: Reply = Reply::new(554, 5, 1, "Protocol error: talked before the greeting");
pub const NUL_IN_COMMAND: Reply = Reply::new(500, 5, 2, "NUL byte in command");
pub const BARE_NEWLINE: Reply = Reply::new(550, 5, 2, "Bare <CR> or <LF> received");
pub const NUL_IN_DATA: Reply = Reply::new(554, 6, 0, "NUL byte in message");
pub const LONG_LINE_IN_DATA: Reply = Reply::new(554, 6, 0, "Message line too long");
pub const SIZE_EXCEEDED: Reply = Reply::new(552, 3, 4, "Message size exceeds fixed limit");
pub const TOO_MANY_RCPTS: Reply = Reply::new(452, 5, 3, "Too many recipients");
pub const OUT_OF_MEMORY: Reply =
    Reply::new(452, 3, 1, "Insufficient system storage, try again later");

pub const TOO_MANY_CONNECTIONS: Reply =
    Reply::new(421, 7, 0, "Too many connections, try again later");
/// No descriptor left for a session (RFC 3463 4.3.2: not accepting
/// network messages).
pub const OUT_OF_DESCRIPTORS: Reply = Reply::new(421, 3, 2, "Too busy, try again later");
pub const TOO_MANY_ERRORS: Reply = Reply::new(421, 7, 0, "Too many errors, closing connection");
pub const TIMEOUT: Reply = Reply::new(421, 4, 2, "Timeout, closing connection");
pub const TOO_SLOW_UNDER_STRESS: Reply =
    Reply::new(421, 4, 2, "Too slow while busy, try again later");
pub const SHUTTING_DOWN: Reply = Reply::new(421, 3, 2, "Service shutting down, try again later");
pub const PROXY_REFUSED: Reply =
    Reply::new(421, 7, 0, "PROXY header required from a trusted proxy");

pub const UPSTREAM_UNAVAILABLE: Reply = Reply::new(
    451,
    4,
    1,
    "Mail server temporarily unavailable, try again later",
);
pub const UPSTREAM_LOST: Reply =
    Reply::new(451, 4, 2, "Connection to mail server lost, try again later");

/// One reply read from upstream, kept as the raw CRLF-terminated lines so it
/// reaches the client exactly as upstream sent it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamReply {
    pub code: u16,
    pub raw: Vec<u8>,
}

impl UpstreamReply {
    pub fn class(&self) -> u16 {
        self.code / 100
    }

    pub fn is_positive(&self) -> bool {
        self.code < 400
    }

    /// The text of the last line, without the code (for logs).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(self.last_text()).into_owned()
    }

    fn last_text(&self) -> &[u8] {
        let body = self.raw.strip_suffix(b"\r\n").unwrap_or(&self.raw);
        let last = body.rsplit(|&b| b == b'\n').next().unwrap_or(body);
        last.get(4..).unwrap_or_default()
    }

    /// The enhanced status code at the start of the last line, if any.
    /// Read in place: this runs for every reply upstream gives.
    pub fn enhanced(&self) -> String {
        let text = self.last_text();
        let first = text.split(|&b| b == b' ').next().unwrap_or_default();
        let number = |p: &[u8]| {
            (!p.is_empty() && p.len() <= 3 && p.iter().all(u8::is_ascii_digit))
                .then(|| p.iter().fold(0u16, |v, d| v * 10 + u16::from(d - b'0')))
        };
        let mut parts = first.split(|&b| b == b'.');
        let ok = match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(class), Some(subject), Some(detail), None) => {
                number(class) == Some(self.class())
                    && number(subject).is_some()
                    && number(detail).is_some()
            }
            _ => false,
        };
        if ok {
            String::from_utf8_lossy(first).into_owned()
        } else {
            String::new()
        }
    }

    /// Each line's text without the code and separator (for EHLO keywords).
    pub fn lines(&self) -> impl Iterator<Item = &[u8]> {
        self.raw
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| {
                let l = l.strip_suffix(b"\r").unwrap_or(l);
                l.get(4..).unwrap_or_default()
            })
    }
}

/// Why a byte sequence is not a well-formed reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("malformed reply line")]
    Malformed,
    #[error("reply too long")]
    TooLong,
}

/// Most lines and bytes accepted in one upstream reply.
pub const MAX_REPLY_LINES: usize = 100;
pub const MAX_REPLY_BYTES: usize = 64 * 1024;

/// Tries to split one complete reply off the front of `buf`.
/// `Ok(None)` means more bytes are needed.
pub fn parse_reply(buf: &[u8]) -> Result<Option<(UpstreamReply, usize)>, ReplyError> {
    let mut pos = 0;
    let mut code = None;
    for _ in 0..MAX_REPLY_LINES {
        let Some(nl) = memchr::memchr(b'\n', &buf[pos..]) else {
            return if buf.len() > MAX_REPLY_BYTES {
                Err(ReplyError::TooLong)
            } else {
                Ok(None)
            };
        };
        let line = &buf[pos..pos + nl + 1];
        if line.len() < 4 || !line[..3].iter().all(u8::is_ascii_digit) {
            return Err(ReplyError::Malformed);
        }
        let this: u16 =
            (line[0] - b'0') as u16 * 100 + (line[1] - b'0') as u16 * 10 + (line[2] - b'0') as u16;
        if !(200..=599).contains(&this) || code.is_some_and(|c| c != this) {
            return Err(ReplyError::Malformed);
        }
        code = Some(this);
        pos += nl + 1;
        match line[3] {
            b'-' => continue,
            b' ' | b'\r' | b'\n' => {
                return Ok(Some((
                    UpstreamReply {
                        code: this,
                        raw: canonical_lines(&buf[..pos]),
                    },
                    pos,
                )));
            }
            _ => return Err(ReplyError::Malformed),
        }
    }
    Err(ReplyError::TooLong)
}

/// Makes every line end in CRLF (some servers end replies with bare LF).
fn canonical_lines(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len() + 4);
    for line in raw.split_inclusive(|&b| b == b'\n') {
        let l = line.strip_suffix(b"\n").unwrap_or(line);
        let l = l.strip_suffix(b"\r").unwrap_or(l);
        out.extend_from_slice(l);
        out.extend_from_slice(b"\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_single_and_multi_line() {
        let mut out = Vec::new();
        SIZE_EXCEEDED.write_to(&mut out);
        assert_eq!(out, b"552 5.3.4 Message size exceeds fixed limit\r\n");
        out.clear();
        Reply::new(250, 0, 0, "a\nb").write_to(&mut out);
        assert_eq!(out, b"250-2.0.0 a\r\n250 2.0.0 b\r\n");
        out.clear();
        START_DATA.write_to(&mut out);
        assert_eq!(out, b"354 End data with <CR><LF>.<CR><LF>\r\n");
        // Every width of number the digits are written for.
        out.clear();
        Reply::new(554, 10, 65535, "x").write_to(&mut out);
        assert_eq!(out, b"554 5.10.65535 x\r\n");
        for n in [0u16, 7, 10, 99, 100, 599, 1000, 65535] {
            out.clear();
            push_decimal(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
        }
    }

    #[test]
    fn class_follows_code() {
        assert_eq!(TOO_MANY_RCPTS.enhanced_code().as_deref(), Some("4.5.3"));
        assert_eq!(SHUTTING_DOWN.enhanced_code().as_deref(), Some("4.3.2"));
        assert_eq!(VRFY.enhanced_code().as_deref(), Some("2.5.0"));
    }

    #[test]
    fn parses_upstream_replies() {
        assert_eq!(parse_reply(b"250-a\r\n250 b"), Ok(None));
        let (r, n) = parse_reply(b"250-a\r\n250 b\r\nrest").unwrap().unwrap();
        assert_eq!((r.code, n), (250, 14));
        assert_eq!(r.raw, b"250-a\r\n250 b\r\n");
        assert_eq!(r.text(), "b");
        assert_eq!(r.enhanced(), "");
        let (r, _) = parse_reply(b"550 5.1.1 <x>: unknown\r\n").unwrap().unwrap();
        assert_eq!(r.enhanced(), "5.1.1");
        let (r, _) = parse_reply(b"450 5.1.1 class mismatch\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(r.enhanced(), "");
        for (raw, enhanced) in [
            (&b"250-a\r\n250 2.0.0 Ok: queued\r\n"[..], "2.0.0"),
            (b"550 5.7.1\r\n", "5.7.1"),
            (b"550 05.7.1 x\r\n", "05.7.1"),
            (b"550 5.1.1.1 x\r\n", ""),
            (b"550 5.1 x\r\n", ""),
            (b"550 5..1 x\r\n", ""),
            (b"550 5.1234.1 x\r\n", ""),
            (b"550 5.a.1 x\r\n", ""),
            (b"550 x 5.1.1\r\n", ""),
        ] {
            let (r, _) = parse_reply(raw).unwrap().unwrap();
            assert_eq!(r.enhanced(), enhanced, "{raw:?}");
        }
        let (r, _) = parse_reply(b"250\n").unwrap().unwrap();
        assert_eq!(r.raw, b"250\r\n");
        assert_eq!(
            parse_reply(b"250-a\r\n251 b\r\n"),
            Err(ReplyError::Malformed)
        );
        assert_eq!(parse_reply(b"hello\r\n"), Err(ReplyError::Malformed));
        assert_eq!(parse_reply(b"999 x\r\n"), Err(ReplyError::Malformed));
        let (r, _) = parse_reply(b"250-mx\r\n250-PIPELINING\r\n250 \r\n")
            .unwrap()
            .unwrap();
        let lines: Vec<_> = r.lines().collect();
        assert_eq!(lines, vec![&b"mx"[..], b"PIPELINING", b""]);
    }
}
