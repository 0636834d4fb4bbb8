//! What the rules look at: the dialogue's facts (`Input`, borrowed, or
//! `OwnedInput` kept across awaits) and the parsed message
//! (`MessageFacts`).

use std::net::IpAddr;

/// What the rules can look at; fields fill in as the dialogue goes on.
#[derive(Debug, Default, Clone)]
pub struct Input<'a> {
    pub ip: Option<IpAddr>,
    pub reverse: Option<&'a str>,
    pub helo: Option<&'a str>,
    pub mail_from: Option<&'a str>,
    /// At RCPT: the recipient being checked; at DATA: all of them.
    pub rcpts: Vec<&'a str>,
    pub rcpt_count: usize,
    pub tls: bool,
    pub size: Option<u64>,
    pub message: Option<&'a MessageFacts>,
    pub spf: &'a str,
    pub dkim: &'a str,
    pub dmarc: &'a str,
    pub iprev: &'a str,
    pub greylist: &'a str,
    pub antivirus: &'a str,
    pub dnsbl: Vec<&'a str>,
    /// URL blocklist zones that listed a link of the message.
    pub uribl: Vec<&'a str>,
    /// The external scanner's opinion, as logged.
    pub scanner: &'a str,
}

/// `Input` with everything owned, to evaluate the rules away from the
/// session (on the blocking pool).
#[derive(Debug, Default, Clone)]
pub struct OwnedInput {
    pub ip: Option<IpAddr>,
    pub reverse: Option<String>,
    pub helo: Option<String>,
    pub mail_from: Option<String>,
    pub rcpts: Vec<String>,
    pub rcpt_count: usize,
    pub tls: bool,
    pub size: Option<u64>,
    pub spf: String,
    pub dkim: String,
    pub dmarc: String,
    pub iprev: String,
    pub greylist: String,
    pub antivirus: String,
    pub dnsbl: Vec<String>,
    pub uribl: Vec<String>,
    pub scanner: String,
}

impl OwnedInput {
    pub fn new(f: &Input<'_>) -> OwnedInput {
        OwnedInput {
            ip: f.ip,
            reverse: f.reverse.map(str::to_string),
            helo: f.helo.map(str::to_string),
            mail_from: f.mail_from.map(str::to_string),
            rcpts: f.rcpts.iter().map(|r| r.to_string()).collect(),
            rcpt_count: f.rcpt_count,
            tls: f.tls,
            size: f.size,
            spf: f.spf.to_string(),
            dkim: f.dkim.to_string(),
            dmarc: f.dmarc.to_string(),
            iprev: f.iprev.to_string(),
            greylist: f.greylist.to_string(),
            antivirus: f.antivirus.to_string(),
            dnsbl: f.dnsbl.iter().map(|z| z.to_string()).collect(),
            uribl: f.uribl.iter().map(|z| z.to_string()).collect(),
            scanner: f.scanner.to_string(),
        }
    }

    /// The borrowed view, with the parsed message.
    pub fn view<'a>(&'a self, message: Option<&'a MessageFacts>) -> Input<'a> {
        Input {
            ip: self.ip,
            reverse: self.reverse.as_deref(),
            helo: self.helo.as_deref(),
            mail_from: self.mail_from.as_deref(),
            rcpts: self.rcpts.iter().map(String::as_str).collect(),
            rcpt_count: self.rcpt_count,
            tls: self.tls,
            size: self.size,
            message,
            spf: &self.spf,
            dkim: &self.dkim,
            dmarc: &self.dmarc,
            iprev: &self.iprev,
            greylist: &self.greylist,
            antivirus: &self.antivirus,
            dnsbl: self.dnsbl.iter().map(String::as_str).collect(),
            uribl: self.uribl.iter().map(String::as_str).collect(),
            scanner: &self.scanner,
        }
    }
}

/// What `MessageFacts::parse_with` does about the message's links.
pub enum LinkFacts {
    /// A check found them already.
    Found(std::sync::Arc<super::links::Links>),
    /// Find them.
    Find,
    /// No rule reads them: leave them out.
    NotWanted,
}

/// A message as the rules see it: decoded (mail-parser), parsed once.
#[derive(Debug, Default)]
pub struct MessageFacts {
    /// Lower-case name, decoded value; every occurrence.
    pub headers: Vec<(String, String)>,
    pub subject: Option<String>,
    /// Decoded text parts (not raw base64).
    pub body: Vec<String>,
    pub attachment_names: Vec<String>,
    /// `type/subtype`, lower-case: as declared, and as detected from the
    /// content when that differs.
    pub attachment_types: Vec<String>,
    /// The members of ZIP attachments (one level), and their types by content.
    pub archive_names: Vec<String>,
    pub archive_types: Vec<String>,
    /// A ZIP attachment with a member that needs a password.
    pub encrypted_archive: bool,
    /// A ZIP attachment past the bounds (entries, ratio, declared size).
    pub archive_bomb: bool,
    /// An attachment or member named like `invoice.pdf.exe`.
    pub double_extension: bool,
    /// What the text and HTML parts link to.
    pub links: std::sync::Arc<super::links::Links>,
}

impl MessageFacts {
    pub fn parse(raw: &[u8]) -> MessageFacts {
        Self::parse_with(raw, LinkFacts::Find, &|_| true)
    }

    /// As `parse`, with the links a check found already, or none when no
    /// rule reads them, and only the headers `wanted` names (decoding
    /// every header into strings cost more than the MIME parse itself).
    pub fn parse_with(raw: &[u8], links: LinkFacts, wanted: &dyn Fn(&str) -> bool) -> MessageFacts {
        let Some(msg) = mail_parser::MessageParser::default().parse(raw) else {
            return MessageFacts::default();
        };
        let mut f = MessageFacts {
            subject: msg.subject().map(str::to_string),
            links: match links {
                LinkFacts::Found(l) => l,
                LinkFacts::Find => std::sync::Arc::new(super::links::Links::of(&msg)),
                LinkFacts::NotWanted => std::sync::Arc::default(),
            },
            ..MessageFacts::default()
        };
        for h in msg.headers().iter().filter(|h| wanted(h.raw_name())) {
            let value = match h.value().as_text() {
                Some(t) => t.to_string(),
                None => String::from_utf8_lossy(h.raw_value()).trim().to_string(),
            };
            f.headers.push((h.raw_name().to_ascii_lowercase(), value));
        }
        f.body = msg.text_bodies().map(|t| t.into_owned()).collect();
        for a in msg.attachments() {
            if let Some(n) = a.attachment_name() {
                f.double_extension |= super::archive::double_extension(n);
                f.attachment_names.push(n.to_string());
            }
            let declared = a.content_type().map(|ct| {
                match ct.subtype() {
                    Some(s) => format!("{}/{}", ct.ctype(), s),
                    None => ct.ctype().to_string(),
                }
                .to_ascii_lowercase()
            });
            let decoded = a.decoded();
            let content: &[u8] = &decoded;
            let detected = super::archive::detected_type(content);
            if let Some(t) = &declared {
                f.attachment_types.push(t.clone());
            }
            if let Some(d) = detected.filter(|d| declared.as_deref() != Some(*d)) {
                f.attachment_types.push(d.to_string());
            }
            let members = if super::archive::looks_like_zip(content) {
                super::archive::zip_members(content)
            } else if super::archive::looks_like_tar_or_gzip(content) {
                super::archive::tar_or_gzip_members(content)
            } else {
                None
            };
            if let Some(c) = members {
                f.double_extension |= c.names.iter().any(|n| super::archive::double_extension(n));
                f.encrypted_archive |= c.encrypted;
                f.archive_bomb |= c.bomb;
                f.archive_names.extend(c.names);
                f.archive_types.extend(c.types);
            }
        }
        f
    }
}
