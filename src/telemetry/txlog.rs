//! The transaction log line: a stable set of keys, one line per transaction.

use std::net::IpAddr;
use std::time::Duration;

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
    /// Greylisting's outcome for the last recipient it judged.
    pub greylist: String,
    /// Rate limits that were exceeded, by name.
    pub rate_limits: Vec<String>,
    /// `zone=code,code` for each listing.
    pub dnsbl: Vec<String>,
    /// The zones of those listings, for the rules.
    pub dnsbl_zones: Vec<String>,
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
    pub fn emit(&self) {
        metrics::counter!(
            "portcullis_transactions_total",
            "verdict" => self.verdict.as_str(),
            "reason" => super::metrics::reason_label(self.reason)
        )
        .increment(1);
        metrics::counter!("portcullis_data_bytes_total").increment(self.size);
        // Recipient addresses only at debug level (they are personal data).
        if tracing::enabled!(target: "portcullis::txn", tracing::Level::DEBUG)
            && !self.rcpt_addrs.is_empty()
        {
            tracing::debug!(target: "portcullis::txn", event = "recipients", session = self.session, rcpts = %self.rcpt_addrs.join(" "));
        }
        tracing::info!(
            target: "portcullis::txn",
            event = "transaction",
            mode = self.mode,
            session = self.session,
            client_ip = %self.client_ip,
            helo = self.helo,
            tls = self.tls,
            tls_version = self.tls_version,
            tls_cipher = self.tls_cipher,
            mail_from = self.mail_from,
            rcpt_count = self.rcpt_count as u64,
            size = self.size,
            verdict = self.verdict.as_str(),
            stage = self.stage,
            code = self.code as u64,
            enhanced = self.enhanced,
            reason = self.reason,
            upstream_reply = self.upstream_reply,
            queue_id = self.queue_id,
            duration_ms = self.duration.as_secs_f64() * 1000.0,
            reverse = %self.reverse,
            spf = self.checks.spf.as_str(),
            dkim = self.checks.dkim.as_str(),
            dmarc = self.checks.dmarc.as_str(),
            arc = self.checks.arc.as_str(),
            iprev = self.checks.iprev.as_str(),
            greylist = self.checks.greylist.as_str(),
            rate_limit = %self.checks.rate_limits.join(" "),
            dnsbl = %self.checks.dnsbl.join(" "),
            rules = %self.checks.rules.join(" "),
            hits = %self.checks.hits.join(" "),
            would = %self.checks.would.join(" "),
            score = self.score,
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
        metrics::counter!("portcullis_connections_refused_total", "reason" => super::metrics::reason_label(self.reason))
            .increment(1);
        tracing::info!(
            target: "portcullis::txn",
            event = "refused",
            mode = self.mode,
            session = self.session,
            client_ip = %self.client_ip,
            verdict = "reject",
            stage = "connect",
            code = self.code as u64,
            enhanced = self.enhanced,
            reason = self.reason,
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
    if let Some((_, rest)) = reply.split_once("queued as ") {
        return word(rest);
    }
    if let Some((_, rest)) = reply.split_once("id=") {
        return word(rest);
    }
    match reply.split_once(" Message accepted") {
        Some((id, _)) => word(id.rsplit(' ').next().unwrap_or("")),
        None => "",
    }
}

#[cfg(test)]
mod tests {
    use super::queue_id_in;

    #[test]
    fn queue_ids_of_the_common_mtas() {
        assert_eq!(queue_id_in("2.0.0 Ok: queued as 4F2B91C0A2"), "4F2B91C0A2");
        assert_eq!(queue_id_in("OK id=1tQ2xY-000123-AB"), "1tQ2xY-000123-AB");
        assert_eq!(
            queue_id_in("2.0.0 4AUAbc12345678 Message accepted for delivery"),
            "4AUAbc12345678"
        );
        assert_eq!(queue_id_in("5.1.1 no such user"), "");
    }
}
