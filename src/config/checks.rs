//! Config for DNS and the checks (DNSBL, SPF, DKIM, DMARC, ARC, iprev).

use super::Secs;
use super::units::deserialize_nonzero_secs;
use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer, de};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Resolvers to ask (addr:port). Run a local one: DNSBL operators refuse
    /// queries that come through public resolvers.
    pub nameservers: Vec<SocketAddr>,
    pub timeout: Secs,
    pub attempts: usize,
    /// Answers are cached for their TTL, clamped to these bounds.
    pub min_ttl: Secs,
    pub max_ttl: Secs,
    /// Entries per cache.
    pub cache_size: u64,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            nameservers: vec![SocketAddr::from(([127, 0, 0, 1], 53))],
            timeout: Secs(Duration::from_secs(3)),
            attempts: 2,
            min_ttl: Secs(Duration::from_secs(30)),
            max_ttl: Secs(Duration::from_secs(3600)),
            cache_size: 100_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Not run.
    Off,
    /// Run, logged and put in Authentication-Results; never acted on.
    #[default]
    Record,
    /// Run and acted on.
    Enforce,
}

/// What a check result leads to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Action {
    Accept,
    Reject,
    Tempfail,
    /// Add the X-Spam headers whatever the score.
    Tag,
    Score(f64),
}

impl Action {
    /// The config's word for it.
    pub fn word(self) -> &'static str {
        match self {
            Action::Accept => "accept",
            Action::Reject => "reject",
            Action::Tempfail => "tempfail",
            Action::Tag => "tag",
            Action::Score(_) => "score",
        }
    }
}

impl Serialize for Action {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match self {
            Action::Accept => s.serialize_str("accept"),
            Action::Reject => s.serialize_str("reject"),
            Action::Tempfail => s.serialize_str("tempfail"),
            Action::Tag => s.serialize_str("tag"),
            Action::Score(n) => {
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry("score", n)?;
                m.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for Action {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Word(String),
            Score { score: f64 },
        }
        match Raw::deserialize(d)? {
            Raw::Score { score } if score.is_finite() => Ok(Action::Score(score)),
            Raw::Score { .. } => Err(de::Error::custom("score must be a finite number")),
            Raw::Word(w) => match w.as_str() {
                "accept" => Ok(Action::Accept),
                "reject" => Ok(Action::Reject),
                "tempfail" => Ok(Action::Tempfail),
                "tag" => Ok(Action::Tag),
                other => Err(de::Error::custom(format!(
                    "unknown action {other:?}; use accept, reject, tempfail, tag or {{score: N}}"
                ))),
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RejectAt {
    /// Answer 554 instead of the greeting (only DNSBL and allow-lists are known then).
    Connect,
    /// Delayed reject: refuse each RCPT, so the log knows sender and recipient.
    #[default]
    Rcpt,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChecksConfig {
    pub reject_at: RejectAt,
    pub thresholds: Thresholds,
    pub allow: Allow,
    /// Clients and senders refused at RCPT (550 5.7.1), for every recipient.
    pub block: Block,
    pub dnsbl: DnsblConfig,
    pub spf: SpfConfig,
    pub dkim: DkimConfig,
    pub dmarc: DmarcConfig,
    pub arc: ArcConfig,
    pub iprev: IprevConfig,
    pub greylist: GreylistConfig,
    /// ClamAV's clamd, asked about every message at the end of DATA.
    pub antivirus: AntivirusConfig,
    /// Domain blocklists (DBL, SURBL, URIBL) asked about what the message links to.
    pub uribl: UriblConfig,
    /// rspamd or SpamAssassin asked for a second opinion at the end of DATA.
    pub scanner: ScannerConfig,
    /// Named rate limits, held across every instance sharing the state.
    pub rate_limits: Vec<RateLimit>,
    /// Remember clients that passed or failed, as postscreen's cache does.
    pub reputation: ReputationConfig,
    pub message_rules: MessageRules,
    /// Add `X-Spam-Report` to delivered mail: every check and rule that
    /// had an effect, with it. Off by default: it tells senders which
    /// rules they tripped.
    pub report_header: bool,
}

/// Client reputation, like postscreen's cache, kept in the state store (so
/// every instance sharing it knows): a client that passed the greeting
/// test skips it, one whose address no DNSBL listed skips those lookups,
/// each for its TTL; one refused at connect is refused again (421) for
/// `fail_ttl` without any test.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReputationConfig {
    pub enabled: bool,
    pub greeting_pass_ttl: Secs,
    pub dnsbl_pass_ttl: Secs,
    pub fail_ttl: Secs,
}

impl Default for ReputationConfig {
    fn default() -> Self {
        let day = 24 * 3600;
        ReputationConfig {
            enabled: false,
            greeting_pass_ttl: Secs(Duration::from_secs(7 * day)),
            dnsbl_pass_ttl: Secs(Duration::from_secs(day)),
            fail_ttl: Secs(Duration::from_secs(3600)),
        }
    }
}

/// One rate limit: at most `rate` of what `count` counts per `key`, with
/// bursts of `burst` (GCRA: the same on both state backends).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub name: String,
    pub key: RateKey,
    /// `100/1m`, `2000/1h`.
    pub rate: Rate,
    /// Taken at once before the rate applies (default: the rate's count).
    #[serde(default)]
    pub burst: Option<u64>,
    pub count: RateCount,
    /// `record`: log the hit, refuse nothing.
    #[serde(default = "enforce")]
    pub mode: Mode,
    /// Reply text (the code is 421 4.7.0 at connect, 451 4.7.1 later).
    #[serde(default)]
    pub text: Option<String>,
}

fn enforce() -> Mode {
    Mode::Enforce
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RateKey {
    ClientAddress,
    ClientNetwork,
    Sender,
    SenderDomain,
    Recipient,
    RecipientDomain,
    Helo,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RateCount {
    /// At connect: 421 4.7.0 before the greeting.
    Connections,
    /// At MAIL.
    Transactions,
    /// At RCPT, each.
    Recipients,
    /// At the end of DATA, the message's size.
    Bytes,
}

/// `count/period`, e.g. `100/1m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u64,
    pub per: Duration,
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let bad = || de::Error::custom(format!("rate {s:?} is not like 100/1m"));
        let (n, per) = s.split_once('/').ok_or_else(bad)?;
        let count: u64 = n.trim().parse().map_err(|_| bad())?;
        let per = humantime::parse_duration(per.trim()).map_err(|_| bad())?;
        if count == 0 || per.is_zero() {
            return Err(de::Error::custom(format!("rate {s:?} must be above zero")));
        }
        // Buckets count in microseconds.
        if per.as_micros() < u128::from(count) {
            return Err(de::Error::custom(format!(
                "rate {s:?} is more than a million a second"
            )));
        }
        Ok(Rate { count, per })
    }
}

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!(
            "{}/{}",
            self.count,
            humantime::format_duration(self.per)
        ))
    }
}

/// Greylisting, as postgrey and rspamd do it: an unknown (client network,
/// sender, recipient) is told to come back later; real MTAs do.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GreylistConfig {
    /// Off by default: it delays first mail from every new sender.
    pub mode: Mode,
    /// `always`, or `score`: only when the score so far reaches
    /// `thresholds.greylist`.
    pub when: GreylistWhen,
    /// A retry passes after this long.
    pub delay: Secs,
    /// ... and within this long after the first attempt.
    pub retry_window: Secs,
    /// After this many passed triplets from a client network and sender
    /// domain, that pair skips greylisting ...
    pub auto_allow_after: u32,
    /// ... for this long (also how long a passed triplet is remembered).
    pub allow_ttl: Secs,
    /// The client network of a triplet.
    pub network_prefix_v4: u8,
    pub network_prefix_v6: u8,
    /// When the state store fails: `accept` (the default) or `tempfail`.
    pub on_error: Action,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum GreylistWhen {
    #[default]
    Always,
    Score,
}

impl Default for GreylistConfig {
    fn default() -> Self {
        let day = 24 * 3600;
        GreylistConfig {
            mode: Mode::Off,
            when: GreylistWhen::Always,
            delay: Secs(Duration::from_secs(300)),
            retry_window: Secs(Duration::from_secs(day)),
            auto_allow_after: 5,
            allow_ttl: Secs(Duration::from_secs(35 * day)),
            network_prefix_v4: 24,
            network_prefix_v6: 64,
            on_error: Action::Accept,
        }
    }
}

/// Where and for how long the rules on a whole message run: on a bounded
/// pool of threads, never on the threads that serve the sessions.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MessageRules {
    /// Threads evaluating at once (0: one per CPU).
    pub workers: usize,
    /// Time one message's evaluation may take, waiting for a thread included.
    pub budget: Secs,
    /// Past the budget: `tempfail` (451 4.7.0, the sender retries) or `accept`.
    pub on_overrun: Overrun,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Overrun {
    Tempfail,
    Accept,
}

impl Default for MessageRules {
    fn default() -> Self {
        MessageRules {
            workers: 0,
            budget: Secs(std::time::Duration::from_secs(10)),
            on_overrun: Overrun::Tempfail,
        }
    }
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::Record => "record",
            Mode::Enforce => "enforce",
        }
    }

    /// What the mode means, for `check`, the start-up log and the status
    /// page: record mode is the one that surprises.
    pub fn meaning(self) -> &'static str {
        match self {
            Mode::Off => "not run",
            Mode::Record => "actions are logged (would=...), not applied",
            Mode::Enforce => "actions are applied",
        }
    }
}

impl ChecksConfig {
    /// Each check's name and the mode in force; rate limits by name.
    pub fn modes(&self) -> Vec<(String, Mode)> {
        let mut m: Vec<(String, Mode)> = [
            ("dnsbl", self.dnsbl.mode),
            ("spf", self.spf.mode),
            ("dkim", self.dkim.mode),
            ("dmarc", self.dmarc.mode),
            ("arc", self.arc.mode),
            ("iprev", self.iprev.mode),
            ("greylist", self.greylist.mode),
            ("antivirus", self.antivirus.mode),
            ("uribl", self.uribl.mode),
            ("scanner", self.scanner.mode),
        ]
        .into_iter()
        .map(|(n, mode)| (n.to_string(), mode))
        .collect();
        m.extend(
            self.rate_limits
                .iter()
                .map(|l| (format!("rate_limit {}", l.name), l.mode)),
        );
        m
    }
}

impl Default for ChecksConfig {
    fn default() -> Self {
        ChecksConfig {
            reject_at: RejectAt::Rcpt,
            thresholds: Thresholds::default(),
            allow: Allow::default(),
            block: Block::default(),
            dnsbl: DnsblConfig::default(),
            spf: SpfConfig::default(),
            dkim: DkimConfig::default(),
            dmarc: DmarcConfig::default(),
            arc: ArcConfig::default(),
            iprev: IprevConfig::default(),
            greylist: GreylistConfig::default(),
            antivirus: AntivirusConfig::default(),
            uribl: UriblConfig::default(),
            scanner: ScannerConfig::default(),
            rate_limits: Vec::new(),
            reputation: ReputationConfig::default(),
            message_rules: MessageRules::default(),
            report_header: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Thresholds {
    /// Score at or above which the message is refused (550 5.7.1).
    pub reject: Option<f64>,
    /// Score at or above which it is deferred (451 4.7.1).
    pub tempfail: Option<f64>,
    /// Score at or above which X-Spam-Score / X-Spam-Flag headers are added.
    pub tag: Option<f64>,
    /// With `greylist.when: score`: greylist from this score on.
    pub greylist: Option<f64>,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            reject: Some(15.0),
            tempfail: None,
            tag: Some(5.0),
            greylist: None,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Allow {
    /// Clients that skip all checks.
    pub clients: Vec<IpNet>,
    /// Sender domains (and their subdomains) that skip all checks. Only
    /// sensible together with SPF or DKIM, since senders are easy to forge.
    pub senders: Vec<String>,
    /// Forwarders that do not seal (by client network): SPF is not held
    /// against the mail they relay, since it names the first sender.
    pub forwarders: Vec<IpNet>,
    /// ARC sealing domains trusted to vouch for what they forward (mailing
    /// lists, forwarding services): their valid chain, when its first
    /// ARC-Authentication-Results says the message passed, lifts a DMARC
    /// failure here.
    pub arc_sealers: Vec<String>,
    /// Also read allow and block entries from the state store (keys
    /// `list:SCOPE:ENTRY`, see the README), so a panel can change them
    /// without a reload. One read per recipient.
    pub store: bool,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Block {
    /// Client networks refused at RCPT.
    pub clients: Vec<IpNet>,
    /// Sender addresses, or domains (with their subdomains), refused at RCPT.
    pub senders: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ZoneType {
    /// Queried with the client address (reversed octets / nibbles).
    #[default]
    Ip,
    /// Queried with the HELO name, the sender domain and the reverse name.
    Domain,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Zone {
    pub zone: String,
    #[serde(default, rename = "type")]
    pub kind: ZoneType,
    /// Answers that count as a listing: `127.0.0.2`, `127.0.0.[2..11]`,
    /// `127.0.0.0/24`, or a bit mask `&0.0.0.4`. Empty: any 127/8 answer.
    #[serde(default)]
    pub returns: Vec<ReturnFilter>,
    #[serde(default)]
    pub score: f64,
    /// `reject` refuses a listed client outright, whatever the score.
    #[serde(default)]
    pub action: Option<Action>,
    /// Reply text; `{zone}`, `{ip}`, `{txt}` are filled in.
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsblConfig {
    pub mode: Mode,
    pub zones: Vec<Zone>,
    /// How often each zone is tested with RFC 5782's entries.
    #[serde(deserialize_with = "deserialize_nonzero_secs")]
    pub self_test_interval: Secs,
    /// On a DNS failure for a zone: `accept` (fail open) or `tempfail`.
    pub on_error: Action,
    /// A client whose zones' scores sum to this or less (allow lists such
    /// as list.dnswl.org carry scores below zero) skips the greeting test
    /// and greylisting, as postscreen's `dnsbl_allowlist_threshold`.
    pub allow_threshold: Option<f64>,
}

impl Default for DnsblConfig {
    fn default() -> Self {
        DnsblConfig {
            mode: Mode::Record,
            zones: Vec::new(),
            self_test_interval: Secs(Duration::from_secs(600)),
            on_error: Action::Accept,
            allow_threshold: None,
        }
    }
}

/// Per-result actions for a check; results not listed are `accept`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpfConfig {
    pub mode: Mode,
    /// Also check the HELO identity (RFC 7208 section 2.3).
    pub helo: bool,
    pub pass: Action,
    pub fail: Action,
    pub softfail: Action,
    pub neutral: Action,
    pub none: Action,
    pub temperror: Action,
    pub permerror: Action,
    pub text: Option<String>,
}

impl Default for SpfConfig {
    fn default() -> Self {
        SpfConfig {
            mode: Mode::Record,
            helo: true,
            pass: Action::Accept,
            fail: Action::Reject,
            softfail: Action::Score(3.0),
            neutral: Action::Accept,
            none: Action::Accept,
            temperror: Action::Tempfail,
            permerror: Action::Score(2.0),
            text: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DkimConfig {
    pub mode: Mode,
    /// By default a failing signature only counts through DMARC.
    pub fail: Action,
    pub temperror: Action,
    pub permerror: Action,
    pub text: Option<String>,
}

impl Default for DkimConfig {
    fn default() -> Self {
        DkimConfig {
            mode: Mode::Record,
            fail: Action::Accept,
            temperror: Action::Accept,
            permerror: Action::Accept,
            text: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DmarcConfig {
    pub mode: Mode,
    /// Failing mail from a domain with p=reject: `reject` honours it.
    pub reject: Action,
    /// Failing mail from a domain with p=quarantine.
    pub quarantine: Action,
    /// Failing mail from a domain with p=none.
    pub none: Action,
    pub temperror: Action,
    pub text: Option<String>,
}

impl Default for DmarcConfig {
    fn default() -> Self {
        DmarcConfig {
            mode: Mode::Record,
            reject: Action::Reject,
            quarantine: Action::Score(5.0),
            none: Action::Accept,
            temperror: Action::Accept,
            text: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ArcConfig {
    /// ARC results are recorded (Authentication-Results, log); never acted on.
    pub mode: Mode,
}

impl Default for ArcConfig {
    fn default() -> Self {
        ArcConfig { mode: Mode::Record }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct IprevConfig {
    pub mode: Mode,
    pub fail: Action,
    pub temperror: Action,
    pub permerror: Action,
    pub text: Option<String>,
}

impl Default for IprevConfig {
    fn default() -> Self {
        IprevConfig {
            mode: Mode::Record,
            fail: Action::Score(1.0),
            temperror: Action::Accept,
            permerror: Action::Score(1.0),
            text: None,
        }
    }
}

/// ClamAV at the end of DATA: the message is streamed to `clamd` with
/// INSTREAM. Off by default: it needs a clamd (and its 1 GiB or more of
/// signatures in memory).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AntivirusConfig {
    pub mode: Mode,
    /// clamd's TCPSocket (`127.0.0.1:3310`) or LocalSocket
    /// (`unix:/run/clamav/clamd.ctl`).
    pub clamd: super::Endpoint,
    /// Scans at once over every session (each a connection to clamd);
    /// more wait for one, within `timeout`.
    pub connections: usize,
    /// One message's scan, waiting for a connection included.
    pub timeout: Secs,
    /// Larger messages are not scanned (the log says `skipped:size`).
    /// Keep it within clamd's StreamMaxLength (25 MB by default).
    pub max_size: super::Bytes,
    /// A virus found: reject (554 5.7.0 naming it), tempfail, tag or a score.
    pub virus: Action,
    /// clamd down, slow or failing: tempfail (451 4.3.0) or accept.
    pub on_error: Action,
    /// Reply text for a virus; `{virus}` is its name.
    pub text: Option<String>,
}

impl Default for AntivirusConfig {
    fn default() -> Self {
        AntivirusConfig {
            mode: Mode::Off,
            clamd: super::Endpoint::Tcp(SocketAddr::from(([127, 0, 0, 1], 3310))),
            connections: 8,
            timeout: Secs(Duration::from_secs(30)),
            max_size: super::Bytes(25 << 20),
            virus: Action::Reject,
            on_error: Action::Tempfail,
            text: None,
        }
    }
}

/// URL blocklists: the registrable domains of the hosts a message links
/// to (HTML link targets first, then URLs in the text, then bare names),
/// looked up in domain zones such as dbl.spamhaus.org or multi.surbl.org;
/// IP-literal links in `ip_zones`. Zones have the DNSBL's `returns`
/// filters (bit masks for multi.surbl.org), scores, actions, error answers
/// and self-tests (`test` listed, `invalid` not, as RFC 5782 asks).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UriblConfig {
    pub mode: Mode,
    /// Domain zones, asked with the registrable domain (`type` is ignored).
    pub zones: Vec<Zone>,
    /// Address zones, asked with the address of IP-literal links.
    pub ip_zones: Vec<Zone>,
    /// Distinct domains (and addresses) looked up per message; the rest
    /// are not. Link targets come first.
    pub max_domains: usize,
    /// Every lookup of one message, together; past it, what has not
    /// answered counts as a DNS failure (`on_error`).
    pub timeout: Secs,
    /// Domains (and their subdomains) never looked up: your own, your
    /// partners', link shorteners you trust. The gate's hostname and the
    /// recipients' domains are skipped too.
    pub allow: Vec<String>,
    /// A zone that did not answer in time or failed: accept or tempfail.
    pub on_error: Action,
}

impl UriblConfig {
    /// The domain zones and the address zones, each of its own type.
    pub fn all_zones(&self) -> Vec<Zone> {
        let typed = |zones: &[Zone], kind| {
            zones
                .iter()
                .map(move |z| Zone { kind, ..z.clone() })
                .collect::<Vec<_>>()
        };
        let mut all = typed(&self.zones, ZoneType::Domain);
        all.extend(typed(&self.ip_zones, ZoneType::Ip));
        all
    }
}

impl Default for UriblConfig {
    fn default() -> Self {
        UriblConfig {
            mode: Mode::Record,
            zones: Vec::new(),
            ip_zones: Vec::new(),
            max_domains: 20,
            timeout: Secs(Duration::from_secs(3)),
            allow: Vec::new(),
            on_error: Action::Accept,
        }
    }
}

/// Which scanner `checks.scanner` asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ScannerKind {
    /// rspamd's HTTP check API (`/checkv2`) on its normal worker (11333).
    #[default]
    Rspamd,
    /// SpamAssassin's spamd (SPAMC/1.5, port 783).
    Spamassassin,
}

impl ScannerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ScannerKind::Rspamd => "rspamd",
            ScannerKind::Spamassassin => "spamassassin",
        }
    }
}

/// An external scanner's opinion on each message, with its trained Bayes
/// and fuzzy hashes: its score, multiplied by `score_factor`, adds to ours;
/// with `use_action`, rspamd's own action (reject, soft reject, add
/// header) or spamd's spam flag applies too.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScannerConfig {
    pub mode: Mode,
    pub kind: ScannerKind,
    /// rspamd's normal worker (`127.0.0.1:11333`) or spamd (`127.0.0.1:783`).
    pub address: SocketAddr,
    /// Scans at once over every session; more wait, within `timeout`.
    pub connections: usize,
    /// One message's scan, waiting for a connection included.
    pub timeout: Secs,
    /// Larger messages are not sent (the log says `skipped:size`).
    pub max_size: super::Bytes,
    /// Their score times this is added to ours (0 turns the score off).
    pub score_factor: f64,
    /// Also apply the scanner's own verdict: rspamd's `reject` (554 5.7.1),
    /// `soft reject` (451 4.7.1), `add header`/`rewrite subject` (tag);
    /// spamd's `Spam: True` (tag).
    pub use_action: bool,
    /// The scanner down, slow or failing: accept or tempfail (451 4.3.0).
    pub on_error: Action,
}

impl Default for ScannerConfig {
    fn default() -> Self {
        ScannerConfig {
            mode: Mode::Off,
            kind: ScannerKind::Rspamd,
            address: SocketAddr::from(([127, 0, 0, 1], 11333)),
            connections: 8,
            timeout: Secs(Duration::from_secs(15)),
            max_size: super::Bytes(20 << 20),
            score_factor: 1.0,
            use_action: false,
            on_error: Action::Accept,
        }
    }
}

/// Which DNSBL answers count as a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReturnFilter {
    /// Each octet a range (an exact value is a range of one).
    Ranges([(u8, u8); 4]),
    /// Any bit of the mask set in the answer.
    Mask(Ipv4Addr),
    Net(ipnet::Ipv4Net),
}

impl ReturnFilter {
    pub fn matches(&self, a: Ipv4Addr) -> bool {
        match self {
            ReturnFilter::Ranges(r) => a
                .octets()
                .iter()
                .zip(r)
                .all(|(o, (lo, hi))| (*lo..=*hi).contains(o)),
            ReturnFilter::Mask(m) => u32::from(a) & u32::from(*m) != 0,
            ReturnFilter::Net(n) => n.contains(&a),
        }
    }

    pub fn parse(s: &str) -> Result<ReturnFilter, String> {
        let s = s.trim();
        let bad = || {
            format!(
                "invalid return filter {s:?}; use 127.0.0.2, 127.0.0.[2..11], 127.0.0.0/24 or &0.0.0.4"
            )
        };
        if let Some(mask) = s.strip_prefix('&') {
            return mask.parse().map(ReturnFilter::Mask).map_err(|_| bad());
        }
        if s.contains('/') {
            return s.parse().map(ReturnFilter::Net).map_err(|_| bad());
        }
        // Split on dots outside `[lo..hi]`.
        let mut parts: Vec<&str> = Vec::new();
        let (mut depth, mut start) = (0, 0);
        for (i, c) in s.char_indices() {
            match c {
                '[' => depth += 1,
                ']' => depth -= 1,
                '.' if depth == 0 => {
                    parts.push(&s[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        parts.push(&s[start..]);
        if parts.len() != 4 {
            return Err(bad());
        }
        let mut r = [(0u8, 0u8); 4];
        for (i, p) in parts.iter().enumerate() {
            r[i] = if let Some(inner) = p.strip_prefix('[').and_then(|p| p.strip_suffix(']')) {
                let (lo, hi) = inner.split_once("..").ok_or_else(bad)?;
                let (lo, hi) = (
                    lo.parse().map_err(|_| bad())?,
                    hi.parse().map_err(|_| bad())?,
                );
                if lo > hi {
                    return Err(bad());
                }
                (lo, hi)
            } else {
                let v = p.parse().map_err(|_| bad())?;
                (v, v)
            };
        }
        Ok(ReturnFilter::Ranges(r))
    }
}

/// As written in the config (for comparing configs across a reload).
impl Serialize for ReturnFilter {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            ReturnFilter::Ranges(r) => s.collect_str(
                &r.iter()
                    .map(|(lo, hi)| {
                        if lo == hi {
                            lo.to_string()
                        } else {
                            format!("[{lo}..{hi}]")
                        }
                    })
                    .collect::<Vec<_>>()
                    .join("."),
            ),
            ReturnFilter::Mask(m) => s.collect_str(&format_args!("&{m}")),
            ReturnFilter::Net(n) => s.collect_str(n),
        }
    }
}

impl<'de> Deserialize<'de> for ReturnFilter {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ReturnFilter::parse(&s).map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn return_filters() {
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let f = ReturnFilter::parse("127.0.0.2").unwrap();
        assert!(f.matches(ip("127.0.0.2")) && !f.matches(ip("127.0.0.3")));
        let f = ReturnFilter::parse("127.0.0.[2..11]").unwrap();
        assert!(f.matches(ip("127.0.0.11")) && !f.matches(ip("127.0.0.12")));
        let f = ReturnFilter::parse("&0.0.0.4").unwrap();
        assert!(
            f.matches(ip("127.0.0.4")) && f.matches(ip("127.0.0.6")) && !f.matches(ip("127.0.0.2"))
        );
        let f = ReturnFilter::parse("127.0.1.0/24").unwrap();
        assert!(f.matches(ip("127.0.1.5")) && !f.matches(ip("127.0.0.5")));
        assert!(ReturnFilter::parse("127.0.0.[9..2]").is_err());
        assert!(ReturnFilter::parse("127.0.0").is_err());
        assert!(ReturnFilter::parse("&x").is_err());
    }
}
