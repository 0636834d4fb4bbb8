//! Configuration: serde structs, load -> parse -> validate.
//!
//! Every key has a default, unknown keys are errors, and every error names
//! `file:line:column` and the key path. The reference file `portcullis.yaml`
//! at the top of the repository is also the embedded default.

mod checks;
pub mod reload;
mod units;

pub use checks::{
    Action, Allow, ArcConfig, ChecksConfig, DkimConfig, DmarcConfig, DnsConfig, DnsblConfig,
    GreylistConfig, GreylistWhen, IprevConfig, MessageRules, Mode, Overrun, Rate, RateCount,
    RateKey, RateLimit, RejectAt, ReputationConfig, ReturnFilter, SpfConfig, Thresholds, Zone,
    ZoneType,
};
pub use units::{Bytes, Secs, parse_size};

/// For fields declared with `deserialize_with` (the same rule as `Secs`).
fn deserialize_nonzero_secs<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Secs, D::Error> {
    Secs::deserialize(d)
}

use crate::yaml::{self, YamlError};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The annotated reference config, embedded as the default.
pub const DEFAULT_CONFIG: &str = include_str!("../../portcullis.yaml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Yaml(#[from] YamlError),
    #[error("{file}:{line}:{column}: {key}: {message}")]
    Invalid {
        file: String,
        line: usize,
        column: usize,
        key: String,
        message: String,
    },
    /// Several problems, one per line.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Several(Vec<ConfigError>),
}

/// Config files are small; anything larger is not one (`/dev/zero`).
const MAX_CONFIG_FILE: u64 = 1 << 20;

/// Reads a text file of at most `limit` bytes: a regular file only, so
/// that a device or a FIFO cannot be read until memory runs out.
pub fn read_text(path: &Path, limit: u64) -> std::io::Result<String> {
    use std::io::Read;
    let f = std::fs::File::open(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    if meta.len() > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {limit} bytes"),
        ));
    }
    let mut text = String::new();
    f.take(limit + 1).read_to_string(&mut text)?;
    if text.len() as u64 > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {limit} bytes"),
        ));
    }
    Ok(text)
}

/// The largest message a gate may be told to hold in memory.
const MAX_MESSAGE_SIZE: u64 = 1 << 30;

/// This machine's memory, from /proc/meminfo (None elsewhere).
fn total_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    kb.checked_mul(1024)
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Our name in the greeting, EHLO replies and the log.
    pub hostname: String,
    pub listen: Vec<Listen>,
    /// The MTA behind the SMTP listeners (none for a milter-only gate).
    #[serde(default = "no_upstream")]
    pub upstream: UpstreamConfig,
    #[serde(default)]
    pub tls: Option<Tls>,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default)]
    pub stress: Stress,
    #[serde(default)]
    pub smtp: Smtp,
    #[serde(default)]
    pub greeting: Greeting,
    #[serde(default)]
    pub dns: DnsConfig,
    #[serde(default)]
    pub checks: ChecksConfig,
    #[serde(default)]
    pub metrics: Metrics,
    /// Directory of rule files (`*.yaml`). Unset: `rules` if it exists.
    #[serde(default)]
    pub rules_dir: Option<PathBuf>,
    #[serde(default)]
    pub log: Log,
    /// Where greylisting keeps what it has seen.
    #[serde(default)]
    pub state: StateConfig,
    /// The milter front door (inside Postfix or Sendmail).
    #[serde(default)]
    pub milter: MilterConfig,
}

/// Milter listeners: the MTA (Postfix `smtpd_milters`, Sendmail
/// `INPUT_MAIL_FILTER`) asks us about each connection and message, and
/// the same checks and rules answer as in proxy mode.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MilterConfig {
    /// `127.0.0.1:8891`, `[::1]:8891`, or `unix:/run/portcullis/milter.sock`.
    pub listen: Vec<MilterListen>,
    /// Longest packet taken from the MTA (a body chunk is 64 KiB; a header
    /// field up to Postfix's header_size_limit, 100 KiB by default).
    pub max_packet: Bytes,
    /// How long the MTA may take to send its next packet. The MTA holds the
    /// connection while its client is idle, so this must be longer than
    /// its own client timeout (Postfix smtpd_timeout, 300s).
    pub timeout: Secs,
    /// A message tagged as spam also goes to the MTA's quarantine (Postfix:
    /// the hold queue), besides getting our X-Spam-* fields.
    pub quarantine_tagged: bool,
    /// MTA connections held at once, over all milter listeners; more are
    /// closed at once (the MTA applies its milter_default_action).
    pub max_connections: usize,
    /// Likewise, from one address (TCP listeners).
    pub max_connections_per_ip: usize,
    /// How long a new connection may take to finish the option
    /// negotiation (an MTA sends it at once).
    pub negotiate_timeout: Secs,
}

impl Default for MilterConfig {
    fn default() -> Self {
        MilterConfig {
            listen: Vec::new(),
            max_packet: Bytes(512 * 1024),
            timeout: Secs(Duration::from_secs(900)),
            quarantine_tagged: false,
            max_connections: 500,
            max_connections_per_ip: 250,
            negotiate_timeout: Secs(Duration::from_secs(10)),
        }
    }
}

/// Where a milter listener is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MilterListen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl<'de> Deserialize<'de> for MilterListen {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(serde::de::Error::custom("unix: needs a socket path"));
            }
            return Ok(MilterListen::Unix(PathBuf::from(path)));
        }
        let addr = s.strip_prefix("inet:").unwrap_or(&s);
        addr.parse().map(MilterListen::Tcp).map_err(|_| {
            serde::de::Error::custom(format!(
                "{s:?} is not like 127.0.0.1:8891 or unix:/run/portcullis/milter.sock"
            ))
        })
    }
}

impl Serialize for MilterListen {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            MilterListen::Tcp(a) => s.serialize_str(&a.to_string()),
            MilterListen::Unix(p) => s.serialize_str(&format!("unix:{}", p.display())),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum StateBackend {
    /// In this process; saved to `file` on shutdown, loaded on start.
    #[default]
    Embedded,
    /// Redis or Valkey at `url`, shared by every instance.
    Redis,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    pub backend: StateBackend,
    /// `redis://host:port/db`; for a cluster, nodes separated by commas.
    pub url: String,
    /// `url` names Redis Cluster nodes.
    pub cluster: bool,
    /// Embedded: where the state is saved on shutdown (unset: not saved).
    pub file: Option<PathBuf>,
    /// Embedded: entries held at most (the oldest go first).
    pub max_entries: usize,
    /// Each store call's deadline; past it, each feature's `on_error`.
    pub timeout: Secs,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            backend: StateBackend::Embedded,
            url: "redis://127.0.0.1:6379".into(),
            cluster: false,
            file: None,
            max_entries: 1_000_000,
            timeout: Secs(Duration::from_millis(100)),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    pub addr: SocketAddr,
    /// Expect a PROXY v1/v2 header from a load balancer on this listener.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// Peers allowed to send a PROXY header; anyone else is refused.
    #[serde(default)]
    pub trusted_proxies: Vec<IpNet>,
    /// Kernel accept queue length (bursts of connections wait here).
    #[serde(default = "default_backlog")]
    pub backlog: u32,
}

fn default_backlog() -> u32 {
    1024
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum IdentityMode {
    Auto,
    Xclient,
    ProxyV1,
    ProxyV2,
    None,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub addr: SocketAddr,
    #[serde(default = "default_identity")]
    pub client_identity: IdentityMode,
    /// Name we give in our own EHLO to upstream; defaults to `hostname`.
    #[serde(default)]
    pub helo_name: Option<String>,
    #[serde(default)]
    pub timeouts: UpstreamTimeouts,
    /// How often upstream's EHLO capabilities are probed again.
    #[serde(default = "default_probe_interval")]
    pub probe_interval: Secs,
    /// STARTTLS towards upstream.
    #[serde(default)]
    pub tls: UpstreamTls,
    /// CA certificate(s) to verify upstream's certificate; unset: encrypt only.
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// Name expected in upstream's certificate (default: its IP address).
    #[serde(default)]
    pub tls_name: Option<String>,
}

/// `upstream` left out: an address no MTA has, refused by validation
/// unless there is no SMTP listener (milter only).
fn no_upstream() -> UpstreamConfig {
    UpstreamConfig {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        client_identity: default_identity(),
        helo_name: None,
        timeouts: UpstreamTimeouts::default(),
        probe_interval: default_probe_interval(),
        tls: UpstreamTls::None,
        tls_ca: None,
        tls_name: None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamTls {
    #[default]
    None,
    Starttls,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamTimeouts {
    pub connect: Secs,
    pub command: Secs,
    pub data: Secs,
}

impl Default for UpstreamTimeouts {
    fn default() -> Self {
        Self {
            connect: Secs(Duration::from_secs(10)),
            command: Secs(Duration::from_secs(60)),
            data: Secs(Duration::from_secs(600)),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// Per client network: `network_prefix_v4` / `network_prefix_v6`.
    pub max_connections_per_network: usize,
    pub network_prefix_v4: u8,
    pub network_prefix_v6: u8,
    pub max_message_size: Bytes,
    pub max_recipients: usize,
    pub max_errors: usize,
    /// Bytes of message data buffered across all sessions at once.
    pub memory_budget: Bytes,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_connections: 1000,
            max_connections_per_ip: 20,
            max_connections_per_network: 100,
            network_prefix_v4: 24,
            network_prefix_v6: 64,
            max_message_size: Bytes(25 << 20),
            max_recipients: 100,
            max_errors: 10,
            memory_budget: Bytes(512 << 20),
        }
    }
}

/// Stress mode (Postfix's `${stress?...}`): when most connection slots
/// are taken, sessions get shorter deadlines so that slow or idle clients
/// cannot keep everyone else out.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Stress {
    /// Percent of `limits.max_connections` open from which stress mode is on.
    pub at_percent: u8,
    /// Under stress, the time one whole command line may take, and the
    /// time a write of our replies may take.
    pub command: Secs,
    /// Under stress, the time from connect to MAIL; later: 421 4.4.2.
    pub time_to_mail: Secs,
    /// Under stress, protocol errors before 421 4.7.0.
    pub max_errors: usize,
}

impl Default for Stress {
    fn default() -> Self {
        Self {
            at_percent: 80,
            command: Secs(Duration::from_secs(10)),
            time_to_mail: Secs(Duration::from_secs(30)),
            max_errors: 1,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// Idle time allowed between client commands.
    pub command: Secs,
    /// Idle time allowed between reads while the client sends DATA.
    pub data: Secs,
    /// Total lifetime of one client session.
    pub session: Secs,
    /// How long writing our queued replies may take. Replies are small,
    /// so only a client that does not read its socket stalls a write.
    pub write: Secs,
    /// On SIGTERM, how long transactions in flight may take to finish.
    pub shutdown: Secs,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            command: Secs(Duration::from_secs(300)),
            data: Secs(Duration::from_secs(600)),
            session: Secs(Duration::from_secs(1800)),
            write: Secs(Duration::from_secs(20)),
            shutdown: Secs(Duration::from_secs(30)),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Smtp {
    /// Longest command line accepted, CRLF included (RFC 5321: 512).
    pub max_command_line: usize,
    /// Longest message text line, CRLF excluded (RFC 5321: 998).
    pub max_line_length: usize,
    /// What to do with a bare CR or LF in a message (SMTP smuggling defence).
    pub bare_newline: BareNewline,
}

impl Default for Smtp {
    fn default() -> Self {
        Self {
            max_command_line: 512,
            max_line_length: 998,
            bare_newline: BareNewline::Reject,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Greeting {
    /// Wait this long before the 220; clients that talk first are refused
    /// (postscreen's pregreet test). Unset: greet at once.
    pub delay: Option<Secs>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BareNewline {
    /// Read to the real end of data, then refuse with 550 5.5.2.
    Reject,
    /// Turn bare CR/LF into CRLF; only CRLF.CRLF still ends the message.
    Normalize,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Metrics {
    /// Where to serve `/metrics` (Prometheus) and `/` (status page). Unset: off.
    pub listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Json,
    Logfmt,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    pub format: LogFormat,
    /// tracing filter directive: `info`, `debug`, `portcullis=debug`.
    pub level: String,
    /// Log to this file instead of stdout; reopened on SIGHUP (logrotate).
    pub file: Option<PathBuf>,
}

impl Default for Log {
    fn default() -> Self {
        Self {
            format: LogFormat::Json,
            level: "info".into(),
            file: None,
        }
    }
}

fn default_identity() -> IdentityMode {
    IdentityMode::Auto
}

fn default_probe_interval() -> Secs {
    Secs(Duration::from_secs(60))
}

impl Config {
    /// Loads and validates a config file; `None` means the embedded default.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        match path {
            Some(p) => {
                let text = read_text(p, MAX_CONFIG_FILE).map_err(|source| ConfigError::Io {
                    path: p.display().to_string(),
                    source,
                })?;
                let mut cfg = Self::parse(&text, p)?;
                cfg.resolve_paths(p.parent().unwrap_or(Path::new(".")));
                Ok(cfg)
            }
            None => Self::parse(DEFAULT_CONFIG, Path::new("<embedded portcullis.yaml>")),
        }
    }

    /// Parses and validates config text read from `file`.
    pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
        let cfg: Config = yaml::parse(text, file)?;
        cfg.validate(text, file)?;
        Ok(cfg)
    }

    fn validate(&self, text: &str, file: &Path) -> Result<(), ConfigError> {
        // Every problem of the file is reported, not only the first.
        let mut errors = Vec::new();
        let mut fail = |key: &str, message: String| {
            let (line, column) = locate_key(text, key);
            errors.push(ConfigError::Invalid {
                file: file.display().to_string(),
                line,
                column,
                key: key.to_string(),
                message,
            });
        };
        if !is_domain_like(&self.hostname) {
            fail(
                "hostname",
                format!("{:?} is not a host name", self.hostname),
            );
        }
        if !self.listen.is_empty() && self.upstream.addr.port() == 0 {
            fail(
                "upstream",
                "the SMTP listeners (listen) need an upstream MTA to relay to".into(),
            );
        }
        if self.listen.is_empty() && self.milter.listen.is_empty() {
            fail(
                "listen",
                "at least one listener (or milter.listen) is needed".into(),
            );
        }
        for (i, l) in self.listen.iter().enumerate() {
            if !l.trusted_proxies.is_empty() && !l.proxy_protocol {
                fail(
                    &format!("listen[{i}].trusted_proxies"),
                    "set only with proxy_protocol: true".into(),
                );
            }
            if l.proxy_protocol && l.trusted_proxies.is_empty() {
                fail(
                    &format!("listen[{i}].proxy_protocol"),
                    "needs trusted_proxies (the load balancers allowed to send PROXY headers)"
                        .into(),
                );
            }
        }
        if let Some(h) = &self.upstream.helo_name
            && !is_domain_like(h)
        {
            fail("upstream.helo_name", format!("{h:?} is not a host name"));
        }
        let l = &self.limits;
        for (key, v) in [
            ("limits.max_connections", l.max_connections),
            ("limits.max_connections_per_ip", l.max_connections_per_ip),
            (
                "limits.max_connections_per_network",
                l.max_connections_per_network,
            ),
            ("limits.max_recipients", l.max_recipients),
            ("limits.max_errors", l.max_errors),
        ] {
            if v == 0 {
                fail(key, "must be at least 1".into());
            }
        }
        if l.network_prefix_v4 > 32 {
            fail("limits.network_prefix_v4", "must be 0 to 32".into());
        }
        if l.network_prefix_v6 > 128 {
            fail("limits.network_prefix_v6", "must be 0 to 128".into());
        }
        let gl = &self.checks.greylist;
        if gl.network_prefix_v4 > 32 {
            fail(
                "checks.greylist.network_prefix_v4",
                "must be 0 to 32".into(),
            );
        }
        if gl.network_prefix_v6 > 128 {
            fail(
                "checks.greylist.network_prefix_v6",
                "must be 0 to 128".into(),
            );
        }
        let mut names = std::collections::HashSet::new();
        for (i, l) in self.checks.rate_limits.iter().enumerate() {
            let key = format!("checks.rate_limits[{i}].name");
            if l.name.is_empty()
                || !l
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                fail(&key, format!("{:?}: use letters, digits, _ and -", l.name));
            } else if !names.insert(l.name.as_str()) {
                fail(&key, format!("{:?} is used twice", l.name));
            }
            if l.burst == Some(0) {
                fail(
                    &format!("checks.rate_limits[{i}].burst"),
                    "must be at least 1".into(),
                );
            }
        }
        if self.state.max_entries == 0 {
            fail("state.max_entries", "must be at least 1".into());
        }
        if self.state.backend == StateBackend::Redis
            && let Some(bad) = self
                .state
                .url
                .split(',')
                .map(str::trim)
                .find(|u| !u.starts_with("redis://") && !u.starts_with("rediss://"))
        {
            fail(
                "state.url",
                format!("{bad:?} is not a redis:// or rediss:// URL"),
            );
        }
        if !(1..=100).contains(&self.stress.at_percent) {
            fail("stress.at_percent", "must be 1 to 100".into());
        }
        if l.memory_budget < l.max_message_size {
            fail(
                "limits.memory_budget",
                format!(
                    "{} is smaller than limits.max_message_size ({})",
                    l.memory_budget, l.max_message_size
                ),
            );
        }
        if !(512..=65536).contains(&self.smtp.max_command_line) {
            fail(
                "smtp.max_command_line",
                "must be between 512 and 65536".into(),
            );
        }
        if self.smtp.max_line_length < 998 {
            fail(
                "smtp.max_line_length",
                "must be at least 998 (RFC 5321)".into(),
            );
        }
        if self.dns.nameservers.is_empty() {
            fail(
                "dns.nameservers",
                "at least one nameserver is needed".into(),
            );
        }
        if self.dns.attempts == 0 {
            fail("dns.attempts", "must be at least 1".into());
        }
        if self.dns.min_ttl > self.dns.max_ttl {
            fail("dns.min_ttl", "is larger than dns.max_ttl".into());
        }
        for (i, z) in self.checks.dnsbl.zones.iter().enumerate() {
            if !is_domain_like(&z.zone) {
                fail(
                    &format!("checks.dnsbl.zones[{i}].zone"),
                    format!("{:?} is not a DNS zone", z.zone),
                );
            }
            if matches!(z.action, Some(Action::Score(_))) {
                fail(
                    &format!("checks.dnsbl.zones[{i}].action"),
                    "use the zone's score: key for scores".into(),
                );
            }
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            fail("log.level", format!("invalid filter: {e}"));
        }
        self.validate_bounds(&mut fail);
        match errors.len() {
            0 => Ok(()),
            1 => Err(errors.remove(0)),
            _ => Err(ConfigError::Several(errors)),
        }
    }

    /// Sane minimums and maximums: no duration that overflows a deadline,
    /// no interval that turns a probe into a flood, no size that switches
    /// a bound off.
    fn validate_bounds(&self, fail: &mut impl FnMut(&str, String)) {
        let gl = &self.checks.greylist;
        let secs = |s: u64| Duration::from_secs(s);
        let ms = |m: u64| Duration::from_millis(m);
        let t = &self.timeouts;
        let u = &self.upstream;
        for (key, v, min, max) in [
            ("timeouts.command", t.command.0, secs(1), secs(3600)),
            ("timeouts.data", t.data.0, secs(1), secs(3600)),
            ("timeouts.session", t.session.0, secs(1), secs(86400)),
            ("timeouts.write", t.write.0, secs(1), secs(3600)),
            ("timeouts.shutdown", t.shutdown.0, secs(1), secs(3600)),
            (
                "upstream.timeouts.connect",
                u.timeouts.connect.0,
                ms(100),
                secs(600),
            ),
            (
                "upstream.timeouts.command",
                u.timeouts.command.0,
                ms(100),
                secs(3600),
            ),
            (
                "upstream.timeouts.data",
                u.timeouts.data.0,
                ms(100),
                secs(3600),
            ),
            (
                "upstream.probe_interval",
                u.probe_interval.0,
                secs(1),
                secs(86400),
            ),
            ("stress.command", self.stress.command.0, secs(1), secs(3600)),
            (
                "stress.time_to_mail",
                self.stress.time_to_mail.0,
                secs(1),
                secs(3600),
            ),
            ("dns.timeout", self.dns.timeout.0, ms(100), secs(60)),
            ("dns.max_ttl", self.dns.max_ttl.0, secs(1), secs(7 * 86400)),
            (
                "checks.dnsbl.self_test_interval",
                self.checks.dnsbl.self_test_interval.0,
                secs(10),
                secs(7 * 86400),
            ),
            (
                "checks.message_rules.budget",
                self.checks.message_rules.budget.0,
                ms(100),
                secs(600),
            ),
            ("checks.greylist.delay", gl.delay.0, secs(1), secs(86400)),
            (
                "checks.greylist.retry_window",
                gl.retry_window.0,
                secs(60),
                secs(30 * 86400),
            ),
            (
                "checks.greylist.allow_ttl",
                gl.allow_ttl.0,
                secs(60),
                secs(366 * 86400),
            ),
            ("state.timeout", self.state.timeout.0, ms(10), secs(10)),
            (
                "milter.negotiate_timeout",
                self.milter.negotiate_timeout.0,
                secs(1),
                secs(300),
            ),
        ] {
            if v < min || v > max {
                fail(
                    key,
                    format!(
                        "{} is outside {} to {}",
                        humantime::format_duration(v),
                        humantime::format_duration(min),
                        humantime::format_duration(max)
                    ),
                );
            }
        }
        if let Some(d) = self.greeting.delay
            && d.0 > secs(300)
        {
            fail("greeting.delay", "must be at most 5m".into());
        }
        let m = &self.milter;
        if m.max_connections == 0 {
            fail("milter.max_connections", "must be at least 1".into());
        }
        if m.max_connections_per_ip == 0 || m.max_connections_per_ip > m.max_connections {
            fail(
                "milter.max_connections_per_ip",
                format!(
                    "must be 1 to milter.max_connections ({})",
                    m.max_connections
                ),
            );
        }
        let l = &self.limits;
        if l.max_message_size > Bytes(MAX_MESSAGE_SIZE) {
            fail(
                "limits.max_message_size",
                format!("{} is over the 1 GiB a gate can hold", l.max_message_size),
            );
        }
        if let Some(ram) = total_memory()
            && l.memory_budget.0 > ram
        {
            fail(
                "limits.memory_budget",
                format!(
                    "{} is more than this machine's memory ({ram} bytes)",
                    l.memory_budget
                ),
            );
        }
        let th = &self.checks.thresholds;
        let order = [
            ("tag", th.tag),
            ("tempfail", th.tempfail),
            ("reject", th.reject),
        ];
        for (i, (low, a)) in order.iter().enumerate() {
            for (high, b) in &order[i + 1..] {
                if let (Some(a), Some(b)) = (a, b)
                    && a >= b
                {
                    fail(
                        &format!("checks.thresholds.{low}"),
                        format!("{a} must be below checks.thresholds.{high} ({b})"),
                    );
                }
            }
        }
        for (i, l) in self.listen.iter().enumerate() {
            let same_port = l.addr.port() == u.addr.port();
            let covers = l.addr == u.addr
                || (same_port
                    && l.addr.ip().is_unspecified()
                    && (u.addr.ip().is_loopback() || u.addr.ip().is_unspecified()));
            if covers {
                fail(
                    "upstream.addr",
                    format!(
                        "{} is our own listener listen[{i}] ({}): every MAIL would come back to us",
                        u.addr, l.addr
                    ),
                );
            }
            if l.addr.port() != 0 && self.metrics.listen == Some(l.addr) {
                fail("metrics.listen", format!("{} is also listen[{i}]", l.addr));
            }
        }
    }

    /// Relative paths in a config file mean "beside the config file", not
    /// "in whatever directory the gate was started from" (systemd: `/`).
    fn resolve_paths(&mut self, dir: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        };
        match &mut self.rules_dir {
            Some(r) => fix(r),
            None => self.rules_dir = Some(dir.join("rules")).filter(|r| r.is_dir()),
        }
        if let Some(t) = &mut self.tls {
            fix(&mut t.cert);
            fix(&mut t.key);
        }
        if let Some(f) = &mut self.log.file {
            fix(f);
        }
        if let Some(ca) = &mut self.upstream.tls_ca {
            fix(ca);
        }
    }

    /// The name we use in EHLO towards upstream.
    pub fn upstream_helo(&self) -> &str {
        self.upstream.helo_name.as_deref().unwrap_or(&self.hostname)
    }

    /// True when `ip` may send a PROXY header on listener `l`.
    pub fn is_trusted_proxy(l: &Listen, ip: IpAddr) -> bool {
        l.trusted_proxies.iter().any(|n| n.contains(&ip))
    }
}

/// A loose host-name check: labels of letters, digits and hyphens.
fn is_domain_like(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Finds the line and column of the last segment of a dotted key path, for
/// errors found after parsing. Falls back to 1:1.
fn locate_key(text: &str, key: &str) -> (usize, usize) {
    let last = key.rsplit('.').next().unwrap_or(key);
    let last = last.split('[').next().unwrap_or(last);
    let needle = format!("{last}:");
    for (i, line) in text.lines().enumerate() {
        let t = line.trim_start().trim_start_matches("- ");
        if t.starts_with(&needle) {
            return (i + 1, line.len() - t.len() + 1);
        }
    }
    (1, 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("t.yaml"))
    }

    #[test]
    fn embedded_default_loads() {
        let c = Config::load(None).expect("embedded config is valid");
        assert_eq!(c.listen[0].addr, "127.0.0.1:2525".parse().unwrap());
        assert_eq!(c.upstream.addr, "127.0.0.1:25".parse().unwrap());
        assert_eq!(c.limits.max_message_size, Bytes(25 << 20));
    }

    #[test]
    fn unknown_key_is_an_error_with_location_and_path() {
        let e = parse(
            "hostname: mx.test\nlisten: [{addr: 127.0.0.1:1}]\nupstream:\n  addr: 127.0.0.1:2\n  timeouts:\n    conect: 5s\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("t.yaml:6:5: upstream.timeouts"), "{e}");
        assert!(e.contains("unknown field `conect`"), "{e}");
    }

    #[test]
    fn bad_duration_and_size_are_located() {
        let e = parse(
            "hostname: mx.test\nlisten: [{addr: 127.0.0.1:1}]\nupstream: {addr: 127.0.0.1:2}\ntimeouts:\n  command: soon\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("t.yaml:5:3: timeouts.command: invalid duration \"soon\""),
            "{e}"
        );
        let e = parse(
            "hostname: mx.test\nlisten: [{addr: 127.0.0.1:1}]\nupstream: {addr: 127.0.0.1:2}\nlimits:\n  max_message_size: 25Mib\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("t.yaml:5:") && e.contains("limits.max_message_size"),
            "{e}"
        );
    }

    #[test]
    fn semantic_errors_are_located() {
        let e = parse(
            "hostname: mx.test\nlisten: [{addr: 127.0.0.1:1}]\nupstream: {addr: 127.0.0.1:2}\nlimits:\n  max_recipients: 0\n",
        )
        .unwrap_err()
        .to_string();
        assert_eq!(e, "t.yaml:5:3: limits.max_recipients: must be at least 1");
        let e = parse(
            "hostname: mx.test\nlisten:\n  - addr: 127.0.0.1:1\n    proxy_protocol: true\nupstream: {addr: 127.0.0.1:2}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("t.yaml:4:5: listen[0].proxy_protocol"), "{e}");
    }

    #[test]
    fn identity_spellings() {
        for (s, want) in [
            ("auto", IdentityMode::Auto),
            ("xclient", IdentityMode::Xclient),
            ("proxy-v1", IdentityMode::ProxyV1),
            ("proxy-v2", IdentityMode::ProxyV2),
            ("none", IdentityMode::None),
        ] {
            let c = parse(&format!(
                "hostname: mx.test\nlisten: [{{addr: 127.0.0.1:1}}]\nupstream: {{addr: 127.0.0.1:2, client_identity: {s}}}\n"
            ))
            .unwrap();
            assert_eq!(c.upstream.client_identity, want);
        }
    }
}
