//! The checks of a parsed config's values: what serde cannot say (a host
//! name, a listener without its upstream, a bound that switches itself
//! off), every problem of the file reported at once.

use super::error::locate_key;
use super::*;

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

impl Config {
    pub(super) fn validate(&self, text: &str, file: &Path) -> Result<(), ConfigError> {
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
        self.validate_listeners(&mut fail);
        self.validate_limits(&mut fail);
        self.validate_checks(&mut fail);
        self.validate_services(&mut fail);
        self.validate_bounds(&mut fail);
        match errors.len() {
            0 => Ok(()),
            1 => Err(errors.remove(0)),
            _ => Err(ConfigError::Several(errors)),
        }
    }

    /// Our name, the listeners, and the upstream they need.
    fn validate_listeners(&self, fail: &mut impl FnMut(&str, String)) {
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
    }

    /// Connection, recipient, error and memory limits, and the network prefixes they count by.
    fn validate_limits(&self, fail: &mut impl FnMut(&str, String)) {
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
        if l.memory_budget < l.max_message_size {
            fail(
                "limits.memory_budget",
                format!(
                    "{} is smaller than limits.max_message_size ({})",
                    l.memory_budget, l.max_message_size
                ),
            );
        }
        // Greylisting counts clients by network too.
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
    }

    /// Rate limits (names unique, bursts), DNSBL zones.
    fn validate_checks(&self, fail: &mut impl FnMut(&str, String)) {
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
    }

    /// The state store, stress mode, the SMTP line limits, DNS and the log filter.
    fn validate_services(&self, fail: &mut impl FnMut(&str, String)) {
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
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            fail("log.level", format!("invalid filter: {e}"));
        }
    }

    /// Every duration within its range: none that overflows a deadline,
    /// none short enough to turn a probe into a flood.
    fn validate_durations(&self, fail: &mut impl FnMut(&str, String)) {
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
    }

    /// Sane minimums and maximums: no duration that overflows a deadline,
    /// no interval that turns a probe into a flood, no size that switches
    /// a bound off.
    fn validate_bounds(&self, fail: &mut impl FnMut(&str, String)) {
        self.validate_durations(fail);
        let secs = |s: u64| Duration::from_secs(s);
        let u = &self.upstream;
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
