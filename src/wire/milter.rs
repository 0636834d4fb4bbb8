//! The milter protocol as Sendmail 8.14+ and Postfix speak it (version 6),
//! sans-IO: the packets of both sides, encoded to and decoded from bytes.
//! A packet is a 4-octet big-endian length (counting the command octet),
//! one command octet, and its data; strings are NUL-terminated. Written
//! from the protocol's description (the constants of libmilter's
//! `mfdef.h`); the Rust milter crates are GPL and not used.
//!
//! The decoder takes bytes as they arrive, in any split, and refuses a
//! packet longer than its limit as soon as the length is read, before
//! buffering it (a hostile or broken peer cannot make it hold more).

use std::borrow::Cow;
use std::fmt;

/// The protocol version we speak (Postfix `milter_protocol = 6`).
pub const VERSION: u32 = 6;

/// Largest body chunk an MTA sends unless told otherwise.
pub const CHUNK: usize = 65_535;

/// Actions a filter may take (SMFIF_*), offered by the MTA, asked for by us.
pub mod action {
    pub const ADD_HEADERS: u32 = 0x01;
    pub const CHANGE_BODY: u32 = 0x02;
    pub const ADD_RCPT: u32 = 0x04;
    pub const DELETE_RCPT: u32 = 0x08;
    pub const CHANGE_HEADERS: u32 = 0x10;
    pub const QUARANTINE: u32 = 0x20;
    pub const CHANGE_FROM: u32 = 0x40;
    pub const ADD_RCPT_PARAMS: u32 = 0x80;
    pub const SET_MACROS: u32 = 0x100;
}

/// The stages a macro list is asked for (SMFIM_*).
pub mod stage {
    pub const CONNECT: u32 = 0;
    pub const HELO: u32 = 1;
    pub const MAIL: u32 = 2;
    pub const RCPT: u32 = 3;
    pub const DATA: u32 = 4;
    pub const END_OF_MESSAGE: u32 = 5;
    pub const END_OF_HEADERS: u32 = 6;
}

/// Protocol steps (SMFIP_*): what the MTA need not send, or need not wait
/// for a reply to.
pub mod step {
    pub const NO_CONNECT: u32 = 0x01;
    pub const NO_HELO: u32 = 0x02;
    pub const NO_MAIL: u32 = 0x04;
    pub const NO_RCPT: u32 = 0x08;
    pub const NO_BODY: u32 = 0x10;
    pub const NO_HEADERS: u32 = 0x20;
    pub const NO_EOH: u32 = 0x40;
    pub const NO_REPLY_HEADER: u32 = 0x80;
    pub const NO_UNKNOWN: u32 = 0x100;
    pub const NO_DATA: u32 = 0x200;
    pub const SKIP: u32 = 0x400;
    pub const REJECTED_RCPTS: u32 = 0x800;
    pub const NO_REPLY_CONNECT: u32 = 0x1000;
    pub const NO_REPLY_HELO: u32 = 0x2000;
    pub const NO_REPLY_MAIL: u32 = 0x4000;
    pub const NO_REPLY_RCPT: u32 = 0x8000;
    pub const NO_REPLY_DATA: u32 = 0x10000;
    pub const NO_REPLY_UNKNOWN: u32 = 0x20000;
    pub const NO_REPLY_EOH: u32 = 0x40000;
    pub const NO_REPLY_BODY: u32 = 0x80000;
    /// Header values keep their leading space (what DKIM signed).
    pub const HEADER_LEADING_SPACE: u32 = 0x100000;
}

/// The address family in a connect packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Family {
    /// No address (a local submission, or unknown).
    Unknown,
    /// A Unix socket: its path.
    Unix {
        path: Vec<u8>,
    },
    Inet {
        port: u16,
        address: Vec<u8>,
    },
    Inet6 {
        port: u16,
        address: Vec<u8>,
    },
}

/// What the MTA sends (SMFIC_*).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// 'O': the versions, actions and steps it offers.
    Negotiate {
        version: u32,
        actions: u32,
        steps: u32,
    },
    /// 'D': macros for the command named by `stage` (e.g. b'C', b'M').
    Macros {
        stage: u8,
        pairs: Vec<(Vec<u8>, Vec<u8>)>,
    },
    /// 'C': the client's name (or `[addr]`) and address.
    Connect { hostname: Vec<u8>, family: Family },
    /// 'H': the HELO/EHLO argument.
    Helo(Vec<u8>),
    /// 'M': the sender (with angle brackets) and ESMTP parameters.
    Mail(Vec<Vec<u8>>),
    /// 'R': one recipient and its parameters.
    Rcpt(Vec<Vec<u8>>),
    /// 'T': DATA.
    Data,
    /// 'L': one header field.
    Header { name: Vec<u8>, value: Vec<u8> },
    /// 'N': the end of the header.
    EndOfHeaders,
    /// 'B': a piece of the body.
    Body(Vec<u8>),
    /// 'E': the end of the message (perhaps with a last piece).
    EndOfMessage(Vec<u8>),
    /// 'A': the transaction ended early (RSET, a refusal elsewhere).
    Abort,
    /// 'Q': the connection ends.
    Quit,
    /// 'K': the connection ends, and a new one follows on this channel.
    QuitNewConnection,
    /// 'U': an SMTP command the MTA does not know.
    Unknown(Vec<u8>),
}

/// What the filter answers (SMFIR_*).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// 'O': what we take of the offer, and (with `action::SET_MACROS`)
    /// the macros wanted at each stage (`stage::*`), space separated
    /// (ours are constants, not copied for each MTA connection).
    Negotiate {
        version: u32,
        actions: u32,
        steps: u32,
        macros: Vec<(u32, Cow<'static, [u8]>)>,
    },
    /// 'c'
    Continue,
    /// 'a': accept, ask nothing more of this message or connection.
    Accept,
    /// 'r'
    Reject,
    /// 't'
    Tempfail,
    /// 'd'
    Discard,
    /// 'p': still working.
    Progress,
    /// 'y': reject or tempfail with this SMTP reply ("550 5.7.1 text").
    ReplyCode(Vec<u8>),
    /// 'h': append a header field.
    AddHeader { name: Vec<u8>, value: Vec<u8> },
    /// 'i': insert a header field at `index` (0: first).
    InsertHeader {
        index: u32,
        name: Vec<u8>,
        value: Vec<u8>,
    },
    /// 'm': change the `index`th (from 1) field named `name`; an empty
    /// value deletes it.
    ChangeHeader {
        index: u32,
        name: Vec<u8>,
        value: Vec<u8>,
    },
    /// 'q': hold the message in the MTA's quarantine.
    Quarantine(Vec<u8>),
    /// 'l': the macros wanted at `stage` (0: connect ... ), space separated.
    SetMacros { stage: u32, macros: Vec<u8> },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MilterError {
    #[error("packet of {0} octets is over the limit of {1}")]
    TooLarge(usize, usize),
    #[error("empty packet (no command)")]
    Empty,
    #[error("unknown packet code {0:?}")]
    UnknownCode(char),
    #[error("malformed {code:?} packet: {why}")]
    Malformed { code: char, why: &'static str },
}

/// Splits packets off a byte stream, in whatever pieces it arrives.
pub struct Decoder {
    buf: Vec<u8>,
    /// Start of the first unread packet in `buf`.
    at: usize,
    max: usize,
}

impl Decoder {
    /// A decoder refusing packets of more than `max_packet` octets: the
    /// length field's value (command and data), as the MTA counts it; the
    /// four octets of the length field itself are not counted.
    pub fn new(max_packet: usize) -> Decoder {
        Decoder {
            buf: Vec::new(),
            at: 0,
            max: max_packet,
        }
    }

    /// Bytes as read from the peer.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.buffer().extend_from_slice(bytes);
    }

    /// The buffer to read into (append to it): a reader that reads straight
    /// here spares a copy of every byte, body chunks included. What was
    /// decoded goes first when it is half of the buffer or more.
    pub fn buffer(&mut self) -> &mut Vec<u8> {
        if self.at > 0 && self.at >= self.buf.len() / 2 {
            self.buf.drain(..self.at);
            self.at = 0;
        }
        &mut self.buf
    }

    /// Gives back a large buffer with nothing pending in it (the peer is
    /// quiet).
    pub fn shrink(&mut self) {
        if self.at >= self.buf.len() {
            self.buf = Vec::new();
            self.at = 0;
        }
    }

    /// Octets fed and not yet decoded.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.at
    }

    /// The next whole command, if one has arrived.
    pub fn command(&mut self) -> Result<Option<Command>, MilterError> {
        self.next(Command::decode)
    }

    /// The next packet if it is a whole piece of the body ('B'): its data
    /// borrowed from the buffer, so that the chunk goes from the read
    /// straight into the message (`command` would copy it into a
    /// `Command::Body` of its own). Anything else is left for `command`.
    pub fn body(&mut self) -> Result<Option<&[u8]>, MilterError> {
        self.lend(b'B')
    }

    /// The next packet if it is a whole header field ('L'): its name and
    /// value borrowed from the buffer (as `body`), not copied into a
    /// `Command::Header` of their own. Anything else is left for `command`.
    pub fn header(&mut self) -> Result<Option<Field<'_>>, MilterError> {
        let Some(data) = self.lend(b'L')? else {
            return Ok(None);
        };
        let mut f = Fields { data, code: b'L' };
        let field = (f.str()?, f.str()?);
        f.end(Some(field))
    }

    /// The next packet if it is a whole macro packet ('D'): `each` is
    /// given every name and value, borrowed from the buffer (as `body`),
    /// instead of a `Command::Macros` of copies. Anything else is left for
    /// `command`. A malformed packet is an error after the pairs before
    /// the fault were given.
    pub fn macros(
        &mut self,
        mut each: impl FnMut(&[u8], &[u8]),
    ) -> Result<Option<()>, MilterError> {
        let Some(data) = self.lend(b'D')? else {
            return Ok(None);
        };
        let mut f = Fields { data, code: b'D' };
        f.byte()?;
        while !f.data.is_empty() {
            let (name, value) = (f.str()?, f.str()?);
            each(name, value);
        }
        Ok(Some(()))
    }

    /// The data of the next packet if it is whole and its command is
    /// `code`, lent from the buffer.
    fn lend(&mut self, code: u8) -> Result<Option<&[u8]>, MilterError> {
        let start = self.at;
        let Some(len) = self.length()? else {
            return Ok(None);
        };
        let end = start + 4 + len;
        if self.buf.len() < end || self.buf[start + 4] != code {
            return Ok(None);
        }
        // The buffer is emptied by the next call, not now: the data is lent.
        self.at = end;
        Ok(Some(&self.buf[start + 5..end]))
    }

    /// The length of the next packet once its length field has arrived,
    /// refused when empty or over the limit. A buffer fully decoded is
    /// emptied first.
    fn length(&mut self) -> Result<Option<usize>, MilterError> {
        if self.at > 0 && self.at == self.buf.len() {
            self.buf.clear();
            self.at = 0;
        }
        let Some(head) = self.buf.get(self.at..self.at + 4) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        if len == 0 {
            return Err(MilterError::Empty);
        }
        if len > self.max {
            return Err(MilterError::TooLarge(len, self.max));
        }
        Ok(Some(len))
    }

    /// The next whole response, if one has arrived.
    pub fn response(&mut self) -> Result<Option<Response>, MilterError> {
        self.next(Response::decode)
    }

    fn next<T>(
        &mut self,
        decode: impl FnOnce(u8, &[u8]) -> Result<T, MilterError>,
    ) -> Result<Option<T>, MilterError> {
        let Some(len) = self.length()? else {
            return Ok(None);
        };
        let rest = &self.buf[self.at..];
        let Some(packet) = rest.get(4..4 + len) else {
            return Ok(None);
        };
        let r = decode(packet[0], &packet[1..]);
        self.at += 4 + len;
        if self.at == self.buf.len() {
            self.buf.clear();
            self.at = 0;
        }
        r.map(Some)
    }
}

/// A header field lent by `Decoder::header`: its name and value.
pub type Field<'a> = (&'a [u8], &'a [u8]);

/// Reads NUL-terminated strings off a packet's data.
struct Fields<'a> {
    data: &'a [u8],
    code: u8,
}

impl<'a> Fields<'a> {
    fn bad(&self, why: &'static str) -> MilterError {
        MilterError::Malformed {
            code: self.code as char,
            why,
        }
    }

    fn string(&mut self) -> Result<Vec<u8>, MilterError> {
        self.str().map(<[u8]>::to_vec)
    }

    /// The next NUL-terminated string, borrowed.
    fn str(&mut self) -> Result<&'a [u8], MilterError> {
        let end = self
            .data
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| self.bad("a string without its NUL"))?;
        let s = &self.data[..end];
        self.data = &self.data[end + 1..];
        Ok(s)
    }

    fn u32(&mut self) -> Result<u32, MilterError> {
        let Some(b) = self.data.get(..4) else {
            return Err(self.bad("short of a 32-bit number"));
        };
        let n = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        self.data = &self.data[4..];
        Ok(n)
    }

    fn u16(&mut self) -> Result<u16, MilterError> {
        let Some(b) = self.data.get(..2) else {
            return Err(self.bad("short of a port"));
        };
        let n = u16::from_be_bytes([b[0], b[1]]);
        self.data = &self.data[2..];
        Ok(n)
    }

    fn byte(&mut self) -> Result<u8, MilterError> {
        let (&b, rest) = self
            .data
            .split_first()
            .ok_or_else(|| self.bad("short of a byte"))?;
        self.data = rest;
        Ok(b)
    }

    /// Every string left (at least one).
    fn strings(&mut self) -> Result<Vec<Vec<u8>>, MilterError> {
        let mut all = vec![self.string()?];
        while !self.data.is_empty() {
            all.push(self.string()?);
        }
        Ok(all)
    }

    fn end<T>(&self, v: T) -> Result<T, MilterError> {
        if self.data.is_empty() {
            Ok(v)
        } else {
            Err(self.bad("trailing octets"))
        }
    }
}

impl Command {
    fn decode(code: u8, data: &[u8]) -> Result<Command, MilterError> {
        let mut f = Fields { data, code };
        let c = match code {
            b'O' => Command::Negotiate {
                version: f.u32()?,
                actions: f.u32()?,
                steps: f.u32()?,
            },
            b'D' => {
                let stage = f.byte()?;
                let mut pairs = Vec::new();
                while !f.data.is_empty() {
                    pairs.push((f.string()?, f.string()?));
                }
                Command::Macros { stage, pairs }
            }
            b'C' => {
                let hostname = f.string()?;
                let family = match f.byte()? {
                    b'U' => Family::Unknown,
                    b'L' => {
                        let _port = f.u16()?;
                        Family::Unix { path: f.string()? }
                    }
                    b'4' => Family::Inet {
                        port: f.u16()?,
                        address: f.string()?,
                    },
                    b'6' => Family::Inet6 {
                        port: f.u16()?,
                        address: f.string()?,
                    },
                    _ => return Err(f.bad("unknown address family")),
                };
                Command::Connect { hostname, family }
            }
            b'H' => Command::Helo(f.string()?),
            b'M' => Command::Mail(f.strings()?),
            b'R' => Command::Rcpt(f.strings()?),
            b'T' => Command::Data,
            b'L' => Command::Header {
                name: f.string()?,
                value: f.string()?,
            },
            b'N' => Command::EndOfHeaders,
            b'B' => return Ok(Command::Body(data.to_vec())),
            b'E' => return Ok(Command::EndOfMessage(data.to_vec())),
            b'A' => Command::Abort,
            b'Q' => Command::Quit,
            b'K' => Command::QuitNewConnection,
            b'U' => Command::Unknown(f.string()?),
            _ => return Err(MilterError::UnknownCode(code as char)),
        };
        f.end(c)
    }

    /// Appends this packet to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut p = Packet::start(out);
        match self {
            Command::Negotiate {
                version,
                actions,
                steps,
            } => p.code(b'O').u32(*version).u32(*actions).u32(*steps),
            Command::Macros { stage, pairs } => {
                p.code(b'D').raw(&[*stage]);
                for (k, v) in pairs {
                    p.string(k).string(v);
                }
                &mut p
            }
            Command::Connect { hostname, family } => {
                p.code(b'C').string(hostname);
                match family {
                    Family::Unknown => p.raw(b"U"),
                    Family::Unix { path } => p.raw(b"L").u16(0).string(path),
                    Family::Inet { port, address } => p.raw(b"4").u16(*port).string(address),
                    Family::Inet6 { port, address } => p.raw(b"6").u16(*port).string(address),
                }
            }
            Command::Helo(h) => p.code(b'H').string(h),
            Command::Mail(args) => p.code(b'M').strings(args),
            Command::Rcpt(args) => p.code(b'R').strings(args),
            Command::Data => p.code(b'T'),
            Command::Header { name, value } => p.code(b'L').string(name).string(value),
            Command::EndOfHeaders => p.code(b'N'),
            Command::Body(b) => p.code(b'B').raw(b),
            Command::EndOfMessage(b) => p.code(b'E').raw(b),
            Command::Abort => p.code(b'A'),
            Command::Quit => p.code(b'Q'),
            Command::QuitNewConnection => p.code(b'K'),
            Command::Unknown(c) => p.code(b'U').string(c),
        };
        p.finish();
    }
}

impl Response {
    fn decode(code: u8, data: &[u8]) -> Result<Response, MilterError> {
        let mut f = Fields { data, code };
        let r = match code {
            b'O' => {
                let (version, actions, steps) = (f.u32()?, f.u32()?, f.u32()?);
                let mut macros = Vec::new();
                while !f.data.is_empty() {
                    macros.push((f.u32()?, Cow::Owned(f.string()?)));
                }
                Response::Negotiate {
                    version,
                    actions,
                    steps,
                    macros,
                }
            }
            b'c' => Response::Continue,
            b'a' => Response::Accept,
            b'r' => Response::Reject,
            b't' => Response::Tempfail,
            b'd' => Response::Discard,
            b'p' => Response::Progress,
            b'y' => Response::ReplyCode(f.string()?),
            b'h' => Response::AddHeader {
                name: f.string()?,
                value: f.string()?,
            },
            b'i' => Response::InsertHeader {
                index: f.u32()?,
                name: f.string()?,
                value: f.string()?,
            },
            b'm' => Response::ChangeHeader {
                index: f.u32()?,
                name: f.string()?,
                value: f.string()?,
            },
            b'q' => Response::Quarantine(f.string()?),
            b'l' => Response::SetMacros {
                stage: f.u32()?,
                macros: f.string()?,
            },
            _ => return Err(MilterError::UnknownCode(code as char)),
        };
        f.end(r)
    }

    /// Appends this packet to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut p = Packet::start(out);
        match self {
            Response::Negotiate {
                version,
                actions,
                steps,
                macros,
            } => {
                p.code(b'O').u32(*version).u32(*actions).u32(*steps);
                for (stage, names) in macros {
                    p.u32(*stage).string(names);
                }
                &mut p
            }
            Response::Continue => p.code(b'c'),
            Response::Accept => p.code(b'a'),
            Response::Reject => p.code(b'r'),
            Response::Tempfail => p.code(b't'),
            Response::Discard => p.code(b'd'),
            Response::Progress => p.code(b'p'),
            Response::ReplyCode(t) => p.code(b'y').string(t),
            Response::AddHeader { name, value } => p.code(b'h').string(name).string(value),
            Response::InsertHeader { index, name, value } => {
                p.code(b'i').u32(*index).string(name).string(value)
            }
            Response::ChangeHeader { index, name, value } => {
                p.code(b'm').u32(*index).string(name).string(value)
            }
            Response::Quarantine(r) => p.code(b'q').string(r),
            Response::SetMacros { stage, macros } => p.code(b'l').u32(*stage).string(macros),
        };
        p.finish();
    }
}

/// One packet being written: the length is filled in at the end.
struct Packet<'a> {
    out: &'a mut Vec<u8>,
    start: usize,
}

impl<'a> Packet<'a> {
    fn start(out: &'a mut Vec<u8>) -> Packet<'a> {
        let start = out.len();
        out.extend_from_slice(&[0; 4]);
        Packet { out, start }
    }

    fn code(&mut self, c: u8) -> &mut Self {
        self.out.push(c);
        self
    }

    fn raw(&mut self, b: &[u8]) -> &mut Self {
        self.out.extend_from_slice(b);
        self
    }

    fn string(&mut self, s: &[u8]) -> &mut Self {
        self.out.extend_from_slice(s);
        self.out.push(0);
        self
    }

    fn strings(&mut self, all: &[Vec<u8>]) -> &mut Self {
        for s in all {
            self.string(s);
        }
        self
    }

    fn u32(&mut self, n: u32) -> &mut Self {
        self.raw(&n.to_be_bytes())
    }

    fn u16(&mut self, n: u16) -> &mut Self {
        self.raw(&n.to_be_bytes())
    }

    fn finish(self) {
        let len = u32::try_from(self.out.len() - self.start - 4).unwrap_or(u32::MAX);
        self.out[self.start..self.start + 4].copy_from_slice(&len.to_be_bytes());
    }
}

impl fmt::Display for Command {
    /// The packet's name, for logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Command::Negotiate { .. } => "negotiate",
            Command::Macros { .. } => "macros",
            Command::Connect { .. } => "connect",
            Command::Helo(_) => "helo",
            Command::Mail(_) => "mail",
            Command::Rcpt(_) => "rcpt",
            Command::Data => "data",
            Command::Header { .. } => "header",
            Command::EndOfHeaders => "eoh",
            Command::Body(_) => "body",
            Command::EndOfMessage(_) => "eom",
            Command::Abort => "abort",
            Command::Quit => "quit",
            Command::QuitNewConnection => "quit_nc",
            Command::Unknown(_) => "unknown",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(c: &Command) -> Vec<u8> {
        let mut out = Vec::new();
        c.encode(&mut out);
        out
    }

    #[test]
    fn a_connect_packet_as_postfix_sends_it() {
        // Length 0x1b: 'C', "mx.example\0", '4', port 25, "192.0.2.1\0".
        let wire = b"\0\0\0\x19Cmx.example\0\x34\0\x19192.0.2.1\0";
        let mut d = Decoder::new(1024);
        d.feed(wire);
        let c = d.command().unwrap().unwrap();
        assert_eq!(
            c,
            Command::Connect {
                hostname: b"mx.example".to_vec(),
                family: Family::Inet {
                    port: 25,
                    address: b"192.0.2.1".to_vec()
                }
            }
        );
        assert_eq!(bytes(&c), wire);
        assert_eq!(d.command().unwrap(), None);
    }

    #[test]
    fn negotiation_and_replies_round_trip() {
        let c = Command::Negotiate {
            version: 6,
            actions: 0x1ff,
            steps: 0x1fffff,
        };
        assert_eq!(bytes(&c)[..5], [0, 0, 0, 13, b'O']);
        let mut out = Vec::new();
        Response::ReplyCode(b"550 5.7.1 No".to_vec()).encode(&mut out);
        assert_eq!(out, b"\0\0\0\x0ey550 5.7.1 No\0");
        let mut d = Decoder::new(64);
        d.feed(&out);
        assert_eq!(
            d.response().unwrap(),
            Some(Response::ReplyCode(b"550 5.7.1 No".to_vec()))
        );
    }

    #[test]
    fn a_packet_over_the_limit_is_refused_from_its_length_alone() {
        let mut d = Decoder::new(100);
        d.feed(&[0, 0, 1, 0]);
        assert_eq!(d.command(), Err(MilterError::TooLarge(256, 100)));
        // Exactly the limit is taken: the length field is not counted.
        let mut d = Decoder::new(5);
        d.feed(&[0, 0, 0, 5, b'B', b'a', b'b', b'c', 0]);
        assert!(
            matches!(d.command(), Ok(Some(_))),
            "a packet of max_packet octets"
        );
        let mut d = Decoder::new(4);
        d.feed(&[0, 0, 0, 5]);
        assert_eq!(d.command(), Err(MilterError::TooLarge(5, 4)));
        let mut d = Decoder::new(100);
        d.feed(&[0, 0, 0, 0]);
        assert_eq!(d.command(), Err(MilterError::Empty));
    }

    #[test]
    fn malformed_packets_are_errors() {
        for (wire, code) in [
            (&b"\0\0\0\x02Hx"[..], 'H'),
            (b"\0\0\0\x04Otoo", 'O'),
            (b"\0\0\0\x04C\0X\0", 'C'),
            (b"\0\0\0\x04Dx\0y", 'D'),
            (b"\0\0\0\x03Q\0\0", 'Q'),
        ] {
            let mut d = Decoder::new(100);
            d.feed(wire);
            assert!(
                matches!(d.command(), Err(MilterError::Malformed { code: c, .. }) if c == code),
                "{wire:?}"
            );
        }
        let mut d = Decoder::new(100);
        d.feed(b"\0\0\0\x01z");
        assert_eq!(d.command(), Err(MilterError::UnknownCode('z')));
    }

    /// Body chunks are lent from the buffer, read straight into it, in any
    /// split; every other packet is left for `command`, in order.
    #[test]
    fn body_chunks_are_lent_and_other_packets_left_in_order() {
        let mut wire = Vec::new();
        for c in [
            Command::EndOfHeaders,
            Command::Body(b"first chunk\r\n".to_vec()),
            Command::Body(b"second\r\n".to_vec()),
            Command::EndOfMessage(Vec::new()),
        ] {
            c.encode(&mut wire);
        }
        for split in 1..wire.len() {
            let mut d = Decoder::new(1024);
            let (mut seen, mut body) = (Vec::new(), Vec::new());
            for piece in [&wire[..split], &wire[split..]] {
                d.buffer().extend_from_slice(piece);
                loop {
                    if let Some(chunk) = d.body().unwrap() {
                        body.extend_from_slice(chunk);
                        seen.push("body".to_string());
                        continue;
                    }
                    match d.command().unwrap() {
                        Some(c) => seen.push(c.to_string()),
                        None => break,
                    }
                }
            }
            assert_eq!(seen, ["eoh", "body", "body", "eom"], "split at {split}");
            assert_eq!(body, b"first chunk\r\nsecond\r\n");
            assert_eq!(d.pending(), 0);
        }
        // The same limits as `command`.
        let mut d = Decoder::new(4);
        d.feed(&[0, 0, 0, 5]);
        assert_eq!(d.body(), Err(MilterError::TooLarge(5, 4)));
        let mut d = Decoder::new(100);
        d.feed(&[0, 0, 0, 0]);
        assert_eq!(d.body(), Err(MilterError::Empty));
    }

    /// Header fields and macros are lent too, with what `command` would
    /// have decoded, in any split; other packets stay for `command`, in
    /// order; malformed ones are the same errors.
    #[test]
    fn header_fields_and_macros_are_lent_as_command_decodes_them() {
        let packets = [
            Command::Macros {
                stage: b'M',
                pairs: vec![
                    (b"i".to_vec(), b"4XyZ".to_vec()),
                    (b"{auth_authen}".to_vec(), Vec::new()),
                ],
            },
            Command::Mail(vec![b"<a@b.test>".to_vec()]),
            Command::Header {
                name: b"Subject".to_vec(),
                value: b" folded\n\tline".to_vec(),
            },
            Command::Macros {
                stage: b'N',
                pairs: Vec::new(),
            },
            Command::Header {
                name: b"X-Empty".to_vec(),
                value: Vec::new(),
            },
            Command::EndOfHeaders,
        ];
        let mut wire = Vec::new();
        for c in &packets {
            c.encode(&mut wire);
        }
        for split in 1..wire.len() {
            let mut d = Decoder::new(1024);
            let mut seen: Vec<Command> = Vec::new();
            for piece in [&wire[..split], &wire[split..]] {
                d.buffer().extend_from_slice(piece);
                loop {
                    if let Some((name, value)) = d.header().unwrap() {
                        seen.push(Command::Header {
                            name: name.to_vec(),
                            value: value.to_vec(),
                        });
                        continue;
                    }
                    let mut pairs = Vec::new();
                    if d.macros(|n, v| pairs.push((n.to_vec(), v.to_vec())))
                        .unwrap()
                        .is_some()
                    {
                        // The stage is not lent: this gate keeps macros
                        // by name, whatever the stage.
                        let stage = match seen.len() {
                            0 => b'M',
                            _ => b'N',
                        };
                        seen.push(Command::Macros { stage, pairs });
                        continue;
                    }
                    match d.command().unwrap() {
                        Some(c) => seen.push(c),
                        None => break,
                    }
                }
            }
            assert_eq!(seen, packets, "split at {split}");
            assert_eq!(d.pending(), 0);
        }
        for wire in [&b"\0\0\0\x04Lx\0y"[..], b"\0\0\0\x06Lx\0y\0z"] {
            let mut d = Decoder::new(100);
            d.feed(wire);
            assert!(
                matches!(d.header(), Err(MilterError::Malformed { code: 'L', .. })),
                "{wire:?}"
            );
        }
        for wire in [&b"\0\0\0\x04Dx\0y"[..], b"\0\0\0\x01D"] {
            let mut d = Decoder::new(100);
            d.feed(wire);
            assert!(
                matches!(
                    d.macros(|_, _| {}),
                    Err(MilterError::Malformed { code: 'D', .. })
                ),
                "{wire:?}"
            );
        }
        let mut d = Decoder::new(4);
        d.feed(&[0, 0, 0, 5]);
        assert_eq!(d.header(), Err(MilterError::TooLarge(5, 4)));
    }
}
