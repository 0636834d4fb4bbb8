//! The rule file format (serde). See `rules/README.md` for the user's view.

use crate::config::Bytes;
use serde::{Deserialize, Deserializer, de};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleFile {
    #[serde(default)]
    pub rules: Vec<RuleDef>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleDef {
    pub id: RuleId,
    pub description: String,
    #[serde(default)]
    pub stage: Option<Stage>,
    pub when: Cond,
    pub action: ActionDef,
    #[serde(default)]
    pub mode: RuleMode,
}

/// An `UPPER_SNAKE` rule id, checked where it is written.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RuleId(pub String);

impl<'de> Deserialize<'de> for RuleId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let ok = !s.is_empty()
            && s.starts_with(|c: char| c.is_ascii_uppercase())
            && s.bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
        if ok {
            Ok(RuleId(s))
        } else {
            Err(de::Error::custom(format!(
                "rule id {s:?} must be UPPER_SNAKE (A-Z, 0-9, _)"
            )))
        }
    }
}

pub use crate::wire::stage::Stage;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RuleMode {
    #[default]
    Enforce,
    /// Evaluated, logged and counted; never acted on.
    Shadow,
}

/// A condition: one target with its matcher, or a combinator. Written as a
/// map with one key (`helo: {regex: ...}`, `all: [...]`).
#[derive(Debug)]
pub enum Cond {
    All(Vec<Cond>),
    Any(Vec<Cond>),
    Not(Box<Cond>),
    ClientIp(IpMatcher),
    Reverse(Matcher),
    Helo(Matcher),
    MailFrom(Matcher),
    MailDomain(Matcher),
    Rcpt(Matcher),
    RcptLocal(Matcher),
    RcptDomain(Matcher),
    Header(HeaderMatcher),
    Subject(Matcher),
    Body(Matcher),
    /// The hosts the message links to (HTML link targets, URLs and bare
    /// names in the text), lower-case, IDN in punycode.
    UrlDomain(Matcher),
    AttachmentName(Matcher),
    AttachmentType(Matcher),
    ArchiveName(Matcher),
    ArchiveType(Matcher),
    /// A ZIP attachment with a member that needs a password.
    EncryptedArchive(bool),
    /// A ZIP attachment past the bounds (entries, ratio, size).
    ArchiveBomb(bool),
    /// An attachment or archive member named like `invoice.pdf.exe`.
    DoubleExtension(bool),
    Size(Cmp),
    RcptCount(Cmp),
    Tls(bool),
    Spf(Vec<String>),
    Dkim(Vec<String>),
    Dmarc(Vec<String>),
    Iprev(Vec<String>),
    /// DNSBL zones that listed the client.
    Dnsbl(Vec<String>),
    /// Greylisting's outcome for the recipient.
    Greylist(Vec<String>),
    /// clamd's verdict on the message: clean, virus, error, skipped.
    Antivirus(Vec<String>),
    /// URL blocklist zones that listed a domain the message links to.
    Uribl(Vec<String>),
    /// The external scanner's verdict: its action (`reject`,
    /// `soft_reject`, `add_header`, `no_action`, ...; spamd `spam`,
    /// `ham`), `error` or `skipped`.
    Scanner(Vec<String>),
}

const COND_KEYS: &[&str] = &[
    "all",
    "any",
    "not",
    "client_ip",
    "reverse",
    "helo",
    "mail_from",
    "mail_domain",
    "rcpt",
    "rcpt_local",
    "rcpt_domain",
    "header",
    "subject",
    "body",
    "attachment_name",
    "attachment_type",
    "size",
    "rcpt_count",
    "tls",
    "spf",
    "dkim",
    "dmarc",
    "iprev",
    "dnsbl",
    "greylist",
    "antivirus",
    "archive_name",
    "archive_type",
    "encrypted_archive",
    "archive_bomb",
    "double_extension",
    "url_domain",
    "uribl",
    "scanner",
];

impl<'de> Deserialize<'de> for Cond {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = Cond;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a condition: a map with one key such as helo, body, all, any, not")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Cond, A::Error> {
                let Some(key) = map.next_key::<String>()? else {
                    return Err(de::Error::custom("empty condition"));
                };
                let c = match key.as_str() {
                    "all" => Cond::All(map.next_value()?),
                    "any" => Cond::Any(map.next_value()?),
                    "not" => Cond::Not(Box::new(map.next_value()?)),
                    "client_ip" => Cond::ClientIp(map.next_value()?),
                    "reverse" => Cond::Reverse(map.next_value()?),
                    "helo" => Cond::Helo(map.next_value()?),
                    "mail_from" => Cond::MailFrom(map.next_value()?),
                    "mail_domain" => Cond::MailDomain(map.next_value()?),
                    "rcpt" => Cond::Rcpt(map.next_value()?),
                    "rcpt_local" => Cond::RcptLocal(map.next_value()?),
                    "rcpt_domain" => Cond::RcptDomain(map.next_value()?),
                    "header" => Cond::Header(map.next_value()?),
                    "subject" => Cond::Subject(map.next_value()?),
                    "body" => Cond::Body(map.next_value()?),
                    "attachment_name" => Cond::AttachmentName(map.next_value()?),
                    "attachment_type" => Cond::AttachmentType(map.next_value()?),
                    "archive_name" => Cond::ArchiveName(map.next_value()?),
                    "archive_type" => Cond::ArchiveType(map.next_value()?),
                    "encrypted_archive" => Cond::EncryptedArchive(map.next_value()?),
                    "archive_bomb" => Cond::ArchiveBomb(map.next_value()?),
                    "double_extension" => Cond::DoubleExtension(map.next_value()?),
                    "size" => Cond::Size(map.next_value()?),
                    "rcpt_count" => Cond::RcptCount(map.next_value()?),
                    "tls" => Cond::Tls(map.next_value()?),
                    "spf" => Cond::Spf(map.next_value()?),
                    "greylist" => Cond::Greylist(map.next_value()?),
                    "dkim" => Cond::Dkim(map.next_value()?),
                    "dmarc" => Cond::Dmarc(map.next_value()?),
                    "iprev" => Cond::Iprev(map.next_value()?),
                    "dnsbl" => Cond::Dnsbl(map.next_value()?),
                    "antivirus" => Cond::Antivirus(map.next_value()?),
                    "url_domain" => Cond::UrlDomain(map.next_value()?),
                    "uribl" => Cond::Uribl(map.next_value()?),
                    "scanner" => Cond::Scanner(map.next_value()?),
                    other => return Err(de::Error::unknown_field(other, COND_KEYS)),
                };
                if let Some(extra) = map.next_key::<String>()? {
                    return Err(de::Error::custom(format!(
                        "one key per condition; combine `{key}` and `{extra}` with all/any"
                    )));
                }
                Ok(c)
            }
        }
        d.deserialize_map(V)
    }
}

/// One value or a list of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// Exactly one of `exact`, `domain`, `regex`, `list`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Matcher {
    /// Whole value, case-insensitive.
    pub exact: Option<OneOrMany>,
    /// The domain or any subdomain of it.
    pub domain: Option<OneOrMany>,
    /// Regular expressions (Rust `regex` syntax), case-insensitive unless
    /// `case_sensitive: true`.
    pub regex: Option<OneOrMany>,
    /// A list file (relative to `rules_dir`): one entry per line, `#` comments.
    pub list: Option<String>,
    #[serde(default)]
    pub case_sensitive: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatcher {
    pub name: String,
    pub exact: Option<OneOrMany>,
    pub domain: Option<OneOrMany>,
    pub regex: Option<OneOrMany>,
    pub list: Option<String>,
    #[serde(default)]
    pub case_sensitive: bool,
}

impl HeaderMatcher {
    pub fn matcher(&self) -> Matcher {
        Matcher {
            exact: self.exact.clone(),
            domain: self.domain.clone(),
            regex: self.regex.clone(),
            list: self.list.clone(),
            case_sensitive: self.case_sensitive,
        }
    }
}

/// CIDRs, or a list file of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpMatcher {
    pub cidr: Option<Vec<ipnet::IpNet>>,
    pub list: Option<String>,
}

/// A numeric comparison; sizes may use units (`1MiB`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cmp {
    pub gt: Option<Bytes>,
    pub ge: Option<Bytes>,
    pub lt: Option<Bytes>,
    pub le: Option<Bytes>,
}

impl Cmp {
    pub fn matches(&self, v: u64) -> bool {
        self.gt.is_none_or(|b| v > b.0)
            && self.ge.is_none_or(|b| v >= b.0)
            && self.lt.is_none_or(|b| v < b.0)
            && self.le.is_none_or(|b| v <= b.0)
    }
}

/// What a matching rule does.
#[derive(Debug, Clone, PartialEq)]
pub enum ActionDef {
    Reject(ReplyDef),
    Tempfail(ReplyDef),
    /// Allow-list: skip the remaining checks and rules.
    Accept,
    Score(f64),
    AddHeader {
        name: String,
        value: String,
    },
    Log,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplyDef {
    pub code: Option<u16>,
    pub enhanced: Option<String>,
    pub text: Option<String>,
}

impl<'de> Deserialize<'de> for ActionDef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Header {
            name: String,
            value: String,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "snake_case", deny_unknown_fields)]
        enum Map {
            Reject(ReplyDef),
            Tempfail(ReplyDef),
            Score(f64),
            AddHeader(Header),
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Word(String),
            Map(Map),
        }
        let raw = Raw::deserialize(d).map_err(|_| {
            de::Error::custom(
                "action must be reject, tempfail, accept, log, {score: N}, {reject: {code, enhanced, text}}, {tempfail: {...}} or {add_header: {name, value}}",
            )
        })?;
        Ok(match raw {
            Raw::Word(w) => match w.as_str() {
                "reject" => ActionDef::Reject(ReplyDef::default()),
                "tempfail" => ActionDef::Tempfail(ReplyDef::default()),
                "accept" => ActionDef::Accept,
                "log" => ActionDef::Log,
                other => return Err(de::Error::custom(format!("unknown action {other:?}"))),
            },
            Raw::Map(Map::Reject(r)) => ActionDef::Reject(r),
            Raw::Map(Map::Tempfail(r)) => ActionDef::Tempfail(r),
            Raw::Map(Map::Score(s)) if s.is_finite() => ActionDef::Score(s),
            Raw::Map(Map::Score(_)) => {
                return Err(de::Error::custom("score must be a finite number"));
            }
            Raw::Map(Map::AddHeader(h)) => ActionDef::AddHeader {
                name: h.name,
                value: h.value,
            },
        })
    }
}
