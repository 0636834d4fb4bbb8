//! Reverse and forward paths of MAIL and RCPT (RFC 5321 §4.1.2, with the
//! UTF-8 of RFC 6531), checked before anything reaches upstream.
//!
//! Strict where a broken path cannot be a deliverable address: an empty or
//! missing domain, a bad character, a local part over 64 octets, a domain
//! over 255, a malformed address literal, bytes after the closing `>`.
//! Lenient, like Postfix, where real mail bends the grammar harmlessly: dots
//! in odd places of the local part (`a..b@`, seen from mobile carriers), `_`
//! in domain labels, a trailing root dot, a path without angle brackets, a
//! space after the colon. Source routes are accepted and ignored.

use std::net::{Ipv4Addr, Ipv6Addr};

/// RFC 5321 §4.5.3.1.1 and §4.5.3.1.2.
pub const MAX_LOCAL_PART: usize = 64;
pub const MAX_DOMAIN: usize = 255;
const MAX_LABEL: usize = 63;

/// Which path is being read: the reverse-path may be empty (`<>`), the
/// forward-path may be `<Postmaster>` with no domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Reverse,
    Forward,
}

/// Why a path is refused (for logs and tests; the reply is the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("missing or unterminated path")]
    Unterminated,
    #[error("characters after the path")]
    TrailingGarbage,
    #[error("empty path where an address is required")]
    Empty,
    #[error("bad source route")]
    SourceRoute,
    #[error("no @domain")]
    NoDomain,
    #[error("empty local part")]
    EmptyLocalPart,
    #[error("local part over 64 octets")]
    LocalPartTooLong,
    #[error("bad character in local part")]
    BadLocalPart,
    #[error("domain over 255 octets")]
    DomainTooLong,
    #[error("bad domain")]
    BadDomain,
    #[error("bad address literal")]
    BadLiteral,
}

/// A checked path: the mailbox (source route dropped, quotes kept as
/// written), and where the path ends in the argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Path<'a> {
    pub mailbox: &'a [u8],
    pub end: usize,
}

/// Reads the path at the start of `arg` (what follows `FROM:`/`TO:`, with
/// leading spaces already skipped). What follows it must be nothing or a
/// space and the ESMTP parameters.
pub fn parse(arg: &[u8], kind: Kind) -> Result<Path<'_>, PathError> {
    let (inner, end) = if arg.first() == Some(&b'<') {
        let close = closing_angle(arg).ok_or(PathError::Unterminated)?;
        (&arg[1..close], close + 1)
    } else {
        // No brackets: the mailbox runs to the first space (Postfix takes it).
        let end = memchr::memchr(b' ', arg).unwrap_or(arg.len());
        if end == 0 {
            return Err(PathError::Unterminated);
        }
        (&arg[..end], end)
    };
    if end < arg.len() && arg[end] != b' ' {
        return Err(PathError::TrailingGarbage);
    }
    let mailbox = strip_source_route(inner)?;
    if mailbox.is_empty() {
        return match kind {
            Kind::Reverse => Ok(Path { mailbox, end }),
            Kind::Forward => Err(PathError::Empty),
        };
    }
    if kind == Kind::Forward && mailbox.eq_ignore_ascii_case(b"postmaster") {
        return Ok(Path { mailbox, end });
    }
    check_mailbox(mailbox)?;
    Ok(Path { mailbox, end })
}

/// The `>` that closes the path, skipping quoted strings.
fn closing_angle(arg: &[u8]) -> Option<usize> {
    let mut in_quote = false;
    let mut escaped = false;
    for (i, &b) in arg.iter().enumerate().skip(1) {
        match b {
            _ if escaped => escaped = false,
            b'\\' if in_quote => escaped = true,
            b'"' => in_quote = !in_quote,
            b'>' if !in_quote => return Some(i),
            _ => {}
        }
    }
    None
}

/// `@a.test,@b.test:mailbox` -> `mailbox`, each hop a valid domain.
fn strip_source_route(inner: &[u8]) -> Result<&[u8], PathError> {
    let Some(colon) = memchr::memchr(b':', inner).filter(|_| inner.first() == Some(&b'@')) else {
        return Ok(inner);
    };
    for hop in inner[..colon].split(|&b| b == b',') {
        let domain = hop.strip_prefix(b"@").ok_or(PathError::SourceRoute)?;
        check_domain(domain).map_err(|_| PathError::SourceRoute)?;
    }
    Ok(&inner[colon + 1..])
}

fn check_mailbox(mailbox: &[u8]) -> Result<(), PathError> {
    let at = if mailbox.first() == Some(&b'"') {
        // Quoted local part: the @ right after the closing quote.
        let close = closing_quote(mailbox).ok_or(PathError::BadLocalPart)?;
        if mailbox.get(close + 1) != Some(&b'@') {
            return Err(PathError::BadLocalPart);
        }
        close + 1
    } else {
        let at = memchr::memrchr(b'@', mailbox).ok_or(PathError::NoDomain)?;
        check_dot_string(&mailbox[..at])?;
        at
    };
    if at > MAX_LOCAL_PART {
        return Err(PathError::LocalPartTooLong);
    }
    let domain = &mailbox[at + 1..];
    if domain.first() == Some(&b'[') {
        check_literal(domain)
    } else {
        check_domain(domain)
    }
}

/// The index of the quote closing a quoted string that starts at 0, with
/// every character in it allowed (qtextSMTP, quoted-pairSMTP, UTF-8).
fn closing_quote(s: &[u8]) -> Option<usize> {
    let mut i = 1;
    while i < s.len() {
        match s[i] {
            b'"' => return Some(i),
            b'\\' => {
                let next = *s.get(i + 1)?;
                if !(32..=126).contains(&next) {
                    return None;
                }
                i += 2;
                continue;
            }
            32..=126 => {}
            0x80.. => {}
            _ => return None,
        }
        i += 1;
    }
    None
}

/// A dot-string local part: atext and dots. Leading, trailing and doubled
/// dots pass, as they do in Postfix (real addresses have them).
fn check_dot_string(local: &[u8]) -> Result<(), PathError> {
    if local.is_empty() {
        return Err(PathError::EmptyLocalPart);
    }
    if local.iter().all(|&b| b == b'.') {
        return Err(PathError::BadLocalPart);
    }
    if local.iter().all(|&b| b == b'.' || is_atext(b)) && utf8(local) {
        Ok(())
    } else {
        Err(PathError::BadLocalPart)
    }
}

/// RFC 5322 atext, plus UTF-8 bytes (RFC 6531).
fn is_atext(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&b) || b >= 0x80
}

/// Non-ASCII is allowed only as well-formed UTF-8.
fn utf8(s: &[u8]) -> bool {
    s.is_ascii() || std::str::from_utf8(s).is_ok()
}

/// A domain name: labels of letters, digits, hyphens (not at either end),
/// `_` and UTF-8, each 1 to 63 octets; a trailing root dot is allowed.
pub fn check_domain(domain: &[u8]) -> Result<(), PathError> {
    let name = domain.strip_suffix(b".").unwrap_or(domain);
    if name.is_empty() {
        return Err(PathError::NoDomain);
    }
    if domain.len() > MAX_DOMAIN {
        return Err(PathError::DomainTooLong);
    }
    if !utf8(name) {
        return Err(PathError::BadDomain);
    }
    for label in name.split(|&b| b == b'.') {
        let ok = !label.is_empty()
            && label.len() <= MAX_LABEL
            && label.first() != Some(&b'-')
            && label.last() != Some(&b'-')
            && label
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b >= 0x80);
        if !ok {
            return Err(PathError::BadDomain);
        }
    }
    // A dotted quad is an address, and RFC 5321 wants those in brackets.
    if std::str::from_utf8(name).is_ok_and(|s| s.parse::<Ipv4Addr>().is_ok()) {
        return Err(PathError::BadDomain);
    }
    Ok(())
}

/// `[192.0.2.1]` or `[IPv6:2001:db8::1]`.
fn check_literal(lit: &[u8]) -> Result<(), PathError> {
    let inner = lit
        .strip_prefix(b"[")
        .and_then(|l| l.strip_suffix(b"]"))
        .and_then(|l| std::str::from_utf8(l).ok())
        .ok_or(PathError::BadLiteral)?;
    let ok = match inner.get(..5) {
        Some(tag) if tag.eq_ignore_ascii_case("IPv6:") => inner[5..].parse::<Ipv6Addr>().is_ok(),
        _ => inner.parse::<Ipv4Addr>().is_ok(),
    };
    if ok {
        Ok(())
    } else {
        Err(PathError::BadLiteral)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fwd(s: &str) -> Result<String, PathError> {
        parse(s.as_bytes(), Kind::Forward).map(|p| String::from_utf8_lossy(p.mailbox).into())
    }

    fn rev(s: &str) -> Result<String, PathError> {
        parse(s.as_bytes(), Kind::Reverse).map(|p| String::from_utf8_lossy(p.mailbox).into())
    }

    #[test]
    fn valid_paths_pass() {
        for ok in [
            "<b@example.test>",
            "<b@[127.0.0.1]>",
            "<postmaster@[192.0.2.1]>",
            "<b@[IPv6:2001:db8::1]>",
            "<b@[ipv6:::1]>",
            "<\"quoted local\"@example.test>",
            "<\"a\\\"b\"@example.test>",
            "<\"a>b\"@example.test>",
            "<a..b@example.test>",
            "<.a@example.test>",
            "<b@exa_mple.test>",
            "<b@example.test.>",
            "<b@example>",
            "<Postmaster>",
            "<pÖstmaster@bücher.test>",
            "b@example.test",
            "<b@example.test> NOTIFY=NEVER",
        ] {
            assert!(fwd(ok).is_ok(), "{ok}: {:?}", fwd(ok));
        }
        assert_eq!(
            fwd("<@a.test,@b.test:b@example.test>").as_deref(),
            Ok("b@example.test")
        );
        assert_eq!(rev("<>").as_deref(), Ok(""));
        let local = "a".repeat(64);
        assert!(fwd(&format!("<{local}@example.test>")).is_ok());
        let domain = format!("{}.test", vec!["d".repeat(63); 3].join("."));
        assert!(domain.len() <= 255);
        assert!(fwd(&format!("<b@{domain}>")).is_ok());
    }

    #[test]
    fn broken_paths_are_refused() {
        use PathError::*;
        let long_local = format!("<{}@example.test>", "a".repeat(65));
        let long_domain = format!("<b@{}.test>", vec!["d".repeat(60); 5].join("."));
        for (bad, why) in [
            ("<nodomain@>", NoDomain),
            ("<b@example.test>x", TrailingGarbage),
            ("<b@example.test", Unterminated),
            ("<>", Empty),
            ("<@example.test>", EmptyLocalPart),
            ("<a@@b.test>", BadLocalPart),
            ("<b>", NoDomain),
            ("<a b@example.test>", BadLocalPart),
            ("<a(b@example.test>", BadLocalPart),
            ("<\"unterminated@example.test>", Unterminated),
            ("<b@exam(ple.test>", BadDomain),
            ("<b@-x.test>", BadDomain),
            ("<b@x..test>", BadDomain),
            ("<b@1.2.3.4>", BadDomain),
            ("<b@[300.1.1.1]>", BadLiteral),
            ("<b@[foo]>", BadLiteral),
            ("<b@[IPv6:1.2.3.4]>", BadLiteral),
            ("<@a.test:>", Empty),
            ("<@a..test:b@example.test>", SourceRoute),
            (long_local.as_str(), LocalPartTooLong),
            (long_domain.as_str(), DomainTooLong),
        ] {
            assert_eq!(fwd(bad), Err(why), "{bad}");
        }
        // Latin-1, not UTF-8.
        assert_eq!(
            parse(b"<b\xe9@example.test>", Kind::Forward),
            Err(BadLocalPart)
        );
        assert_eq!(parse(b"<b@ex\xe9mple.test>", Kind::Forward), Err(BadDomain));
        assert_eq!(rev("<postmaster>"), Err(NoDomain));
    }
}
