//! The transaction log line: a stable set of keys, one line per transaction.

use std::net::IpAddr;
use std::time::Duration;

/// The keys of the transaction and refused-connection lines, written here
/// and read back by `stats` and `trace` from the same names.
pub mod key {
    pub const EVENT: &str = "event";
    pub const MODE: &str = "mode";
    pub const SESSION: &str = "session";
    pub const CLIENT_IP: &str = "client_ip";
    pub const HELO: &str = "helo";
    pub const TLS: &str = "tls";
    pub const TLS_VERSION: &str = "tls_version";
    pub const TLS_CIPHER: &str = "tls_cipher";
    pub const MAIL_FROM: &str = "mail_from";
    pub const RCPT_COUNT: &str = "rcpt_count";
    pub const SIZE: &str = "size";
    pub const VERDICT: &str = "verdict";
    pub const STAGE: &str = "stage";
    pub const CODE: &str = "code";
    pub const ENHANCED: &str = "enhanced";
    pub const REASON: &str = "reason";
    pub const UPSTREAM_REPLY: &str = "upstream_reply";
    pub const QUEUE_ID: &str = "queue_id";
    pub const DURATION_MS: &str = "duration_ms";
    pub const REVERSE: &str = "reverse";
    pub const SPF: &str = "spf";
    pub const DKIM: &str = "dkim";
    pub const DMARC: &str = "dmarc";
    pub const ARC: &str = "arc";
    pub const ANTIVIRUS: &str = "antivirus";
    pub const IPREV: &str = "iprev";
    pub const GREYLIST: &str = "greylist";
    pub const RATE_LIMIT: &str = "rate_limit";
    pub const DNSBL: &str = "dnsbl";
    pub const URIBL: &str = "uribl";
    pub const SCANNER: &str = "scanner";
    pub const SCANNER_SYMBOLS: &str = "scanner_symbols";
    pub const RULES: &str = "rules";
    pub const POLICY: &str = "policy";
    pub const MESSAGE_ID: &str = "message_id";
    pub const LIST: &str = "list";
    pub const RCPT_DOMAINS: &str = "rcpt_domains";
    pub const HITS: &str = "hits";
    pub const WOULD: &str = "would";
    pub const SCORE: &str = "score";
    pub const RCPTS: &str = "rcpts";
}

/// The `event` values of those lines.
pub mod event_name {
    pub const TRANSACTION: &str = "transaction";
    pub const REFUSED: &str = "refused";
    pub const RECIPIENTS: &str = "recipients";
}

/// How a transaction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    /// Accepted with X-Spam-Flag: YES.
    Tag,
    Reject,
    Tempfail,
    /// The client went away or reset before a final reply.
    Abandoned,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Accept => "accept",
            Verdict::Tag => "tag",
            Verdict::Reject => "reject",
            Verdict::Tempfail => "tempfail",
            Verdict::Abandoned => "abandoned",
        }
    }

    /// The verdict `as_str` wrote (`stats` reads the log with it).
    pub fn parse(s: &str) -> Option<Verdict> {
        [
            Verdict::Accept,
            Verdict::Tag,
            Verdict::Reject,
            Verdict::Tempfail,
            Verdict::Abandoned,
        ]
        .into_iter()
        .find(|v| v.as_str() == s)
    }

    /// The verdict a reply code stands for.
    pub fn from_code(code: u16) -> Verdict {
        match code / 100 {
            2 | 3 => Verdict::Accept,
            4 => Verdict::Tempfail,
            _ => Verdict::Reject,
        }
    }
}

/// The check results for the transaction log line.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CheckLog {
    pub spf: String,
    pub dkim: String,
    pub dmarc: String,
    pub iprev: String,
    pub arc: String,
    /// clamd's verdict: `clean`, `virus:NAME`, `error`, `skipped:size`.
    pub antivirus: String,
    /// Greylisting's outcome for the last recipient it judged.
    pub greylist: String,
    /// Rate limits that were exceeded, by name.
    pub rate_limits: Vec<String>,
    /// `zone=code,code` for each listing.
    pub dnsbl: Vec<String>,
    /// The zones of those listings, for the rules.
    pub dnsbl_zones: Vec<String>,
    /// `zone:domain=code` for each domain the message links to that a
    /// URL blocklist listed.
    pub uribl: Vec<String>,
    /// The zones of those listings, each once, for the rules.
    pub uribl_zones: Vec<String>,
    /// The external scanner's opinion: `rspamd:7.50:add_header`,
    /// `spamassassin:1000.00:spam`, `rspamd:error`, `rspamd:skipped:size`.
    pub scanner: String,
    /// Its symbols, highest scores first: `BAYES_SPAM=5.10`.
    pub scanner_symbols: Vec<String>,
    /// The message's Message-ID (without brackets), once DATA was read.
    pub message_id: String,
    /// The recipients' policy (`policies/NAME.yaml`); empty: the gate's.
    pub policy: String,
    /// An allow or block entry that decided: `allow:ENTRY(ORIGIN)`, where
    /// ORIGIN is a policy, a list file's `file:line`, or `store`.
    pub list: String,
    /// The domains of the recipients judged (accepted or not).
    pub rcpt_domains: Vec<String>,
    /// Rules that matched: `ID`, or `ID(shadow)`.
    pub rules: Vec<String>,
    /// Every check and rule finding with its effect: `spf:softfail=3`,
    /// `dnsbl:zen.spamhaus.org=reject`.
    pub hits: Vec<String>,
    /// `reason=verdict` for record-mode findings and shadow rules: the
    /// transaction's verdict had that one alone been enforced.
    pub would: Vec<String>,
}

/// Everything the transaction line says.
#[derive(Debug, Clone)]
pub struct TxnRecord<'a> {
    /// The front door: `proxy` or `milter`.
    pub mode: &'static str,
    pub session: &'a str,
    pub client_ip: IpAddr,
    pub helo: &'a str,
    pub tls: bool,
    pub tls_version: &'a str,
    pub tls_cipher: &'a str,
    pub mail_from: &'a str,
    pub rcpt_count: usize,
    pub size: u64,
    pub verdict: Verdict,
    pub stage: &'a str,
    pub code: u16,
    pub enhanced: &'a str,
    pub reason: &'a str,
    pub upstream_reply: &'a str,
    /// The MTA's queue id for an accepted message (from its reply in proxy
    /// mode, its `i` macro in milter mode), to find it in the MTA's log.
    pub queue_id: &'a str,
    pub duration: Duration,
    /// Verified reverse name (iprev pass), else empty.
    pub reverse: String,
    /// What the checks and rules found: the line's check keys.
    pub checks: &'a CheckLog,
    pub score: f64,
    /// Recipient addresses, logged at debug level only.
    pub rcpt_addrs: Vec<String>,
}

impl TxnRecord<'_> {
    /// Whether a transaction line would be written anywhere (a file or the
    /// console at info level or finer): when not, only `count` is needed,
    /// and the line's fields need not be gathered.
    pub fn wanted() -> bool {
        tracing::enabled!(target: "portcullis::txn", tracing::Level::INFO)
    }

    /// A transaction's metrics, without its line.
    pub fn count(verdict: Verdict, reason: &str, size: u64) {
        super::metrics::count_transaction(verdict.as_str(), reason);
        static BYTES: super::metrics::Cached<metrics::Counter> = super::metrics::Cached::new();
        BYTES.with(
            || metrics::counter!("portcullis_data_bytes_total"),
            |c| c.increment(size),
        );
    }

    pub fn emit(&self) {
        Self::count(self.verdict, self.reason, self.size);
        // Recipient addresses only at debug level (they are personal data).
        if tracing::enabled!(target: "portcullis::txn", tracing::Level::DEBUG)
            && !self.rcpt_addrs.is_empty()
        {
            tracing::event!(target: "portcullis::txn", tracing::Level::DEBUG, { key::EVENT } = event_name::RECIPIENTS, { key::SESSION } = self.session, { key::RCPTS } = tracing::field::display(self.rcpt_addrs.join(" ")));
        }
        tracing::event!(
            target: "portcullis::txn",
            tracing::Level::INFO,
            { key::EVENT } = event_name::TRANSACTION,
            { key::MODE } = self.mode,
            { key::SESSION } = self.session,
            { key::CLIENT_IP } = tracing::field::display(self.client_ip),
            { key::HELO } = self.helo,
            { key::TLS } = self.tls,
            { key::TLS_VERSION } = self.tls_version,
            { key::TLS_CIPHER } = self.tls_cipher,
            { key::MAIL_FROM } = self.mail_from,
            { key::RCPT_COUNT } = self.rcpt_count as u64,
            { key::SIZE } = self.size,
            { key::VERDICT } = self.verdict.as_str(),
            { key::STAGE } = self.stage,
            { key::CODE } = self.code as u64,
            { key::ENHANCED } = self.enhanced,
            { key::REASON } = self.reason,
            { key::UPSTREAM_REPLY } = self.upstream_reply,
            { key::QUEUE_ID } = self.queue_id,
            { key::DURATION_MS } = self.duration.as_secs_f64() * 1000.0,
            { key::REVERSE } = tracing::field::display(&self.reverse),
            { key::SPF } = self.checks.spf.as_str(),
            { key::DKIM } = self.checks.dkim.as_str(),
            { key::DMARC } = self.checks.dmarc.as_str(),
            { key::ARC } = self.checks.arc.as_str(),
            { key::IPREV } = self.checks.iprev.as_str(),
            { key::ANTIVIRUS } = self.checks.antivirus.as_str(),
            { key::GREYLIST } = self.checks.greylist.as_str(),
            { key::RATE_LIMIT } = tracing::field::display(self.checks.rate_limits.join(" ")),
            { key::DNSBL } = tracing::field::display(self.checks.dnsbl.join(" ")),
            { key::URIBL } = tracing::field::display(self.checks.uribl.join(" ")),
            { key::SCANNER } = self.checks.scanner.as_str(),
            { key::SCANNER_SYMBOLS } = tracing::field::display(self.checks.scanner_symbols.join(" ")),
            { key::RULES } = tracing::field::display(self.checks.rules.join(" ")),
            { key::POLICY } = self.checks.policy.as_str(),
            { key::MESSAGE_ID } = self.checks.message_id.as_str(),
            { key::LIST } = self.checks.list.as_str(),
            { key::RCPT_DOMAINS } = tracing::field::display(self.checks.rcpt_domains.join(" ")),
            { key::HITS } = tracing::field::display(self.checks.hits.join(" ")),
            { key::WOULD } = tracing::field::display(self.checks.would.join(" ")),
            { key::SCORE } = self.score,
        );
    }
}

/// A connection refused before or at the greeting.
#[derive(Debug, Clone)]
pub struct RefusedConnection<'a> {
    pub mode: &'static str,
    pub session: &'a str,
    pub client_ip: IpAddr,
    pub code: u16,
    pub enhanced: &'a str,
    pub reason: &'a str,
}

impl RefusedConnection<'_> {
    pub fn emit(&self) {
        metrics::counter!("portcullis_connections_refused_total", "reason" => super::metrics::reason_label(self.reason).to_string())
            .increment(1);
        tracing::event!(
            target: "portcullis::txn",
            tracing::Level::INFO,
            { key::EVENT } = event_name::REFUSED,
            { key::MODE } = self.mode,
            { key::SESSION } = self.session,
            { key::CLIENT_IP } = tracing::field::display(self.client_ip),
            { key::VERDICT } = "reject",
            { key::STAGE } = "connect",
            { key::CODE } = self.code as u64,
            { key::ENHANCED } = self.enhanced,
            { key::REASON } = self.reason,
        );
    }
}

/// The queue id in an MTA's reply to the message: Postfix's "queued as
/// 4F2B91C0A2", Exim's "id=1tQ2xY-000123-AB", Sendmail's "4A1B2C3D Message
/// accepted"; empty when there is none.
pub fn queue_id_in(reply: &str) -> &str {
    fn word(s: &str) -> &str {
        let end = s
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '.'))
            .unwrap_or(s.len());
        &s[..end]
    }
    // Searchers built once: every accepted message's reply is searched.
    use memchr::memmem::Finder;
    use std::sync::LazyLock;
    static QUEUED: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new("queued as "));
    static ID: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new("id="));
    static EXIM: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(" Message accepted"));
    let at = |f: &Finder<'_>| f.find(reply.as_bytes());
    if let Some(i) = at(&QUEUED) {
        return word(&reply[i + "queued as ".len()..]);
    }
    if let Some(i) = at(&ID) {
        return word(&reply[i + "id=".len()..]);
    }
    match at(&EXIM) {
        Some(i) => word(reply[..i].rsplit(' ').next().unwrap_or("")),
        None => "",
    }
}

#[cfg(test)]
mod tests {
    use super::queue_id_in;

    #[test]
    fn verdicts_read_back_as_written() {
        use super::Verdict;
        for v in [
            Verdict::Accept,
            Verdict::Tag,
            Verdict::Reject,
            Verdict::Tempfail,
            Verdict::Abandoned,
        ] {
            assert_eq!(Verdict::parse(v.as_str()), Some(v));
        }
        assert_eq!(Verdict::parse("rejected"), None);
    }

    #[test]
    fn queue_ids_of_the_common_mtas() {
        assert_eq!(queue_id_in("2.0.0 Ok: queued as 4F2B91C0A2"), "4F2B91C0A2");
        // Postfix's reply to BDAT names the size.
        assert_eq!(
            queue_id_in("2.0.0 Ok: 332 bytes queued as D4F939A407C"),
            "D4F939A407C"
        );
        assert_eq!(queue_id_in("OK id=1tQ2xY-000123-AB"), "1tQ2xY-000123-AB");
        assert_eq!(
            queue_id_in("2.0.0 4AUAbc12345678 Message accepted for delivery"),
            "4AUAbc12345678"
        );
        assert_eq!(queue_id_in("5.1.1 no such user"), "");
    }
}
