//! Client commands: classified by `smtp-proto`, with the raw line kept so
//! MAIL and RCPT reach upstream exactly as the client wrote them.

use crate::wire::path::{self, Kind, PathError};
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
    /// A reverse-path (MAIL) or forward-path (RCPT) that RFC 5321 refuses.
    BadPath(Kind, PathError),
    /// A HELO/EHLO name that is not UTF-8: no MTA behind us would take it
    /// (Postfix: `500 5.5.2 Error: bad UTF-8 syntax`).
    BadHelo,
}

/// Parses one command line (`line` without CRLF).
pub fn parse(line: &[u8]) -> Result<Command, CommandError> {
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
        b"EHLO" | b"HELO" => return hello(line, verb.as_slice() == b"EHLO"),
        b"MAIL" | b"RCPT" => {
            if let Some(cmd) = mail_or_rcpt(line, verb.as_slice() == b"MAIL") {
                return cmd;
            }
        }
        _ => {}
    }
    let mut with_crlf = Vec::with_capacity(line.len() + 2);
    with_crlf.extend_from_slice(line);
    with_crlf.extend_from_slice(b"\r\n");
    let parsed = Request::parse(&mut with_crlf.iter());
    match parsed {
        Ok(req) => Ok(match req {
            Request::Lhlo { .. } => Command::NotImplemented("LHLO"),
            // Only reached when the line is not `MAIL FROM:`/`RCPT TO:` as
            // `mail_or_rcpt` reads it: never pass an unchecked path on.
            Request::Mail { .. } => return Err(CommandError::Syntax("MAIL FROM:<address>")),
            Request::Rcpt { .. } => return Err(CommandError::Syntax("RCPT TO:<address>")),
            Request::Data => Command::Data,
            Request::Rset => Command::Rset,
            Request::Noop { .. } => Command::Noop,
            Request::Quit => Command::Quit,
            Request::Vrfy { .. } => Command::Vrfy,
            Request::Help { .. } => Command::Help,
            Request::StartTls => Command::StartTls,
            other => Command::NotImplemented(other.name()),
        }),
        Err(e) => Err(proto_error(e)),
    }
}

/// MAIL and RCPT: the path checked by `path`, the parameters by smtp-proto
/// (given a stand-in path). None when the line is not `VERB FROM:`/`TO:`
/// at all, for smtp-proto to answer.
fn mail_or_rcpt(line: &[u8], mail: bool) -> Option<Result<Command, CommandError>> {
    let (keyword, kind) = if mail {
        (&b"FROM"[..], Kind::Reverse)
    } else {
        (&b"TO"[..], Kind::Forward)
    };
    let rest = skip_spaces(line.get(4..)?);
    let rest = rest
        .get(..keyword.len())
        .filter(|k| k.eq_ignore_ascii_case(keyword))
        .map(|_| skip_spaces(&rest[keyword.len()..]))?;
    let arg = skip_spaces(rest.strip_prefix(b":")?);
    let p = match path::parse(arg, kind) {
        Ok(p) => p,
        Err(e) => return Some(Err(CommandError::BadPath(kind, e))),
    };
    let params = &arg[p.end..];
    let mut stand_in = Vec::with_capacity(params.len() + 24);
    stand_in.extend_from_slice(if mail {
        b"MAIL FROM:<>"
    } else {
        b"RCPT TO:<postmaster>"
    });
    stand_in.extend_from_slice(params);
    stand_in.extend_from_slice(b"\r\n");
    let address = String::from_utf8_lossy(p.mailbox).into_owned();
    Some(match Request::parse(&mut stand_in.iter()) {
        Ok(Request::Mail { from }) => Ok(Command::Mail(MailCmd {
            address,
            size: (from.size != 0).then_some(from.size as u64),
            params: param_keywords(params),
            body_8bit: from.flags & smtp_proto::MAIL_BODY_8BITMIME != 0,
            body_binary: from.flags & smtp_proto::MAIL_BODY_BINARYMIME != 0,
            smtputf8: from.flags & smtp_proto::MAIL_SMTPUTF8 != 0,
            line: line.to_vec(),
        })),
        Ok(Request::Rcpt { .. }) => Ok(Command::Rcpt(RcptCmd {
            address,
            params: param_keywords(params),
            line: line.to_vec(),
        })),
        Ok(_) => Err(CommandError::BadParameter),
        Err(e) => Err(proto_error(e)),
    })
}

/// EHLO/HELO: the first word after the verb, taken as the client wrote it
/// (as Postfix does; its form is a matter for checks and rules, not for
/// the dialogue). It must be UTF-8: no MTA behind us takes anything else.
fn hello(line: &[u8], esmtp: bool) -> Result<Command, CommandError> {
    let rest = line.get(4..).unwrap_or_default();
    if !rest.is_empty() && rest[0] != b' ' {
        return Err(CommandError::Unknown);
    }
    let name = skip_spaces(rest)
        .split(|&b| b == b' ')
        .next()
        .unwrap_or_default();
    if name.is_empty() {
        return Err(CommandError::Syntax(if esmtp {
            "EHLO hostname"
        } else {
            "HELO hostname"
        }));
    }
    let Ok(name) = std::str::from_utf8(name) else {
        return Err(CommandError::BadHelo);
    };
    Ok(if esmtp {
        Command::Ehlo(name.to_string())
    } else {
        Command::Helo(name.to_string())
    })
}

fn skip_spaces(s: &[u8]) -> &[u8] {
    let n = s.iter().take_while(|&&b| b == b' ').count();
    &s[n..]
}

fn proto_error(e: smtp_proto::Error) -> CommandError {
    match e {
        smtp_proto::Error::UnknownCommand => CommandError::Unknown,
        smtp_proto::Error::SyntaxError { syntax } => CommandError::Syntax(syntax),
        smtp_proto::Error::UnsupportedParameter { param } => {
            CommandError::UnsupportedParameter(param)
        }
        _ => CommandError::BadParameter,
    }
}

/// The ESMTP parameter keywords (what follows the path), upper-cased.
fn param_keywords(params: &[u8]) -> Vec<String> {
    params
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
