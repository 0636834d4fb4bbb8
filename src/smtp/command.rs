//! Client commands: classified by `smtp-proto`, with the raw line kept so
//! MAIL and RCPT reach upstream exactly as the client wrote them.

use smtp_proto::Request;

/// One parsed client command. `line` is the raw command without its CRLF.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Ehlo(String),
    Helo(String),
    Mail(MailCmd),
    Rcpt(RcptCmd),
    Data,
    Rset,
    Noop,
    Quit,
    Vrfy,
    Help,
    StartTls,
    /// Recognised but not offered (AUTH, BDAT, ETRN, EXPN, XCLIENT, ...).
    NotImplemented(&'static str),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailCmd {
    pub address: String,
    pub size: Option<u64>,
    /// Parameter keywords as written (upper-cased), e.g. `SIZE`, `BODY`.
    pub params: Vec<String>,
    pub body_8bit: bool,
    pub body_binary: bool,
    pub smtputf8: bool,
    pub line: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RcptCmd {
    pub address: String,
    pub params: Vec<String>,
    pub line: Vec<u8>,
}

/// Why a command line was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandError {
    Unknown,
    Syntax(&'static str),
    BadParameter,
    UnsupportedParameter(String),
}

/// Parses one command line (`line` without CRLF).
pub fn parse(line: &[u8]) -> Result<Command, CommandError> {
    let mut with_crlf = Vec::with_capacity(line.len() + 2);
    with_crlf.extend_from_slice(line);
    with_crlf.extend_from_slice(b"\r\n");
    // XCLIENT/XFORWARD from clients are never honoured: smtp-proto does not know
    // them, so name them here to answer 502 rather than 500.
    let verb = line
        .split(|&b| b == b' ')
        .next()
        .unwrap_or_default()
        .to_ascii_uppercase();
    match verb.as_slice() {
        b"XCLIENT" => return Ok(Command::NotImplemented("XCLIENT")),
        b"XFORWARD" => return Ok(Command::NotImplemented("XFORWARD")),
        _ => {}
    }
    let parsed = Request::parse(&mut with_crlf.iter());
    match parsed {
        Ok(req) => Ok(match req {
            Request::Ehlo { host } => Command::Ehlo(host.into_owned()),
            Request::Helo { host } => Command::Helo(host.into_owned()),
            Request::Lhlo { .. } => Command::NotImplemented("LHLO"),
            Request::Mail { from } => Command::Mail(MailCmd {
                address: from.address.into_owned(),
                size: (from.size != 0).then_some(from.size as u64),
                params: param_keywords(line),
                body_8bit: from.flags & smtp_proto::MAIL_BODY_8BITMIME != 0,
                body_binary: from.flags & smtp_proto::MAIL_BODY_BINARYMIME != 0,
                smtputf8: from.flags & smtp_proto::MAIL_SMTPUTF8 != 0,
                line: line.to_vec(),
            }),
            Request::Rcpt { to } => Command::Rcpt(RcptCmd {
                address: to.address.into_owned(),
                params: param_keywords(line),
                line: line.to_vec(),
            }),
            Request::Data => Command::Data,
            Request::Rset => Command::Rset,
            Request::Noop { .. } => Command::Noop,
            Request::Quit => Command::Quit,
            Request::Vrfy { .. } => Command::Vrfy,
            Request::Help { .. } => Command::Help,
            Request::StartTls => Command::StartTls,
            other => Command::NotImplemented(other.name()),
        }),
        Err(smtp_proto::Error::UnknownCommand) => Err(CommandError::Unknown),
        Err(smtp_proto::Error::SyntaxError { syntax }) => Err(CommandError::Syntax(syntax)),
        Err(smtp_proto::Error::UnsupportedParameter { param }) => {
            Err(CommandError::UnsupportedParameter(param))
        }
        Err(_) => Err(CommandError::BadParameter),
    }
}

/// The ESMTP parameter keywords after the path in MAIL/RCPT, upper-cased.
/// The path is skipped with quote awareness so `<"a>b"@x>` is handled.
fn param_keywords(line: &[u8]) -> Vec<String> {
    let Some(open) = memchr::memchr(b'<', line) else {
        return Vec::new();
    };
    let mut in_quote = false;
    let mut escaped = false;
    let mut end = None;
    for (i, &b) in line[open + 1..].iter().enumerate() {
        match b {
            _ if escaped => escaped = false,
            b'\\' if in_quote => escaped = true,
            b'"' => in_quote = !in_quote,
            b'>' if !in_quote => {
                end = Some(open + 1 + i);
                break;
            }
            _ => {}
        }
    }
    let Some(end) = end else {
        return Vec::new();
    };
    line[end + 1..]
        .split(|&b| b == b' ')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let k = p.split(|&b| b == b'=').next().unwrap_or_default();
            String::from_utf8_lossy(k).to_ascii_uppercase()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mail_keeps_raw_line_and_params() {
        let line = b"MAIL FROM:<a@x.test> SIZE=1000 BODY=8BITMIME RET=HDRS ENVID=abc";
        let Ok(Command::Mail(m)) = parse(line) else {
            panic!("not parsed")
        };
        assert_eq!(m.address, "a@x.test");
        assert_eq!(m.size, Some(1000));
        assert!(m.body_8bit);
        assert_eq!(m.params, vec!["SIZE", "BODY", "RET", "ENVID"]);
        assert_eq!(m.line, line);
    }

    #[test]
    fn quoted_local_part_with_angle() {
        let Ok(Command::Rcpt(r)) = parse(b"RCPT TO:<\"a>b\"@x.test> NOTIFY=NEVER") else {
            panic!("not parsed")
        };
        assert_eq!(r.params, vec!["NOTIFY"]);
    }

    #[test]
    fn null_sender_and_errors() {
        let Ok(Command::Mail(m)) = parse(b"MAIL FROM:<>") else {
            panic!()
        };
        assert_eq!(m.address, "");
        assert!(m.params.is_empty());
        assert_eq!(parse(b"FROB"), Err(CommandError::Unknown));
        assert!(matches!(
            parse(b"MAIL TO:<a@b>"),
            Err(CommandError::Syntax(_))
        ));
        assert!(matches!(
            parse(b"MAIL FROM:<a@b> FOO=1"),
            Err(CommandError::UnsupportedParameter(_))
        ));
        assert_eq!(
            parse(b"XCLIENT ADDR=1.2.3.4"),
            Ok(Command::NotImplemented("XCLIENT"))
        );
        assert_eq!(
            parse(b"ehlo client.test"),
            Ok(Command::Ehlo("client.test".into()))
        );
        assert_eq!(parse(b"BDAT 10 LAST"), Ok(Command::NotImplemented("BDAT")));
    }
}
