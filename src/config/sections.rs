//! The config file's sections, as serde reads them: every key with its
//! default, unknown keys refused.

use super::{Bytes, ChecksConfig, DnsConfig, Secs};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

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
    /// Directory of rule files (`*.yaml`). Unset: `rules` beside the
    /// config file, if it exists (for the embedded default: `rules` in
    /// the working directory).
    #[serde(default)]
    pub rules_dir: Option<PathBuf>,
    /// The directory of the config file read (None: the embedded default).
    #[serde(skip)]
    pub config_dir: Option<PathBuf>,
    #[serde(default)]
    pub log: Log,
    /// Where greylisting keeps what it has seen.
    #[serde(default)]
    pub state: StateConfig,
    /// The milter front door (inside Postfix or Sendmail).
    #[serde(default)]
    pub milter: MilterConfig,
    /// Connection threads, each accepting on every listener and serving
    /// what it accepted (0: one per two CPUs, at least one). Read at
    /// start only.
    #[serde(default)]
    pub threads: usize,
}

/// Milter listeners: the MTA (Postfix `smtpd_milters`, Sendmail
/// `INPUT_MAIL_FILTER`) asks us about each connection and message, and
/// the same checks and rules answer as in proxy mode.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MilterConfig {
    /// `127.0.0.1:8891`, `[::1]:8891`, or `unix:/run/portcullis/milter.sock`.
    pub listen: Vec<MilterListen>,
    /// Longest packet taken from the MTA, in octets after its 4-octet
    /// length field (a body chunk is 64 KiB; a header field up to
    /// Postfix's header_size_limit, 100 KiB by default).
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

/// A TCP address or a Unix socket: where a milter listener is, or where a
/// service we ask (clamd) listens. `127.0.0.1:8891`, `inet:...`, or
/// `unix:/path/to.sock`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// Where a milter listener is.
pub type MilterListen = Endpoint;

impl<'de> Deserialize<'de> for Endpoint {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(serde::de::Error::custom("unix: needs a socket path"));
            }
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        let addr = s.strip_prefix("inet:").unwrap_or(&s);
        addr.parse().map(Endpoint::Tcp).map_err(|_| {
            serde::de::Error::custom(format!(
                "{s:?} is not like 127.0.0.1:8891 or unix:/run/portcullis/milter.sock"
            ))
        })
    }
}

impl Serialize for Endpoint {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "{a}"),
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
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
    /// Ready connections kept for the next client session.
    #[serde(default)]
    pub pool: PoolConfig,
    /// The message goes as one BDAT chunk (RFC 3030) when upstream offers
    /// CHUNKING (Postfix 3.4+, Exim): a round trip fewer than DATA and its
    /// 354, and no dot-stuffing. False: always DATA.
    #[serde(default = "default_chunking")]
    pub chunking: bool,
}

/// Upstream connections kept open between client sessions (XCLIENT or no
/// client identity; a PROXY header is per connection, so never reused).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Idle connections kept at most; 0 turns reuse off.
    pub max_idle: usize,
    /// An idle connection is closed after this (well below upstream's own
    /// idle limit: Postfix smtpd_timeout is 300s).
    pub idle_timeout: Secs,
    /// A connection is not reused once this old.
    pub max_age: Secs,
    /// Nor after this many transactions.
    pub max_transactions: u32,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_idle: 16,
            idle_timeout: Secs(Duration::from_secs(5)),
            max_age: Secs(Duration::from_secs(300)),
            max_transactions: 100,
        }
    }
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
        pool: PoolConfig::default(),
        chunking: default_chunking(),
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

fn default_chunking() -> bool {
    true
}

fn default_probe_interval() -> Secs {
    Secs(Duration::from_secs(60))
}
