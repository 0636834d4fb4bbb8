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
    /// What is valid but probably not what was meant: printed by `check`
    /// and logged at start-up, never refused.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if log_level_for(&self.log.level, TXN_TARGET).is_none_or(|l| l < tracing::Level::INFO) {
            w.push(format!(
                "log.level: {:?} writes no transaction lines ({TXN_TARGET} at info): stats and rejection rates read from the log would be zero; for fewer other lines use \"warn,{TXN_TARGET}=info\"",
                self.log.level
            ));
        }
        if !self.hostname.contains('.') {
            w.push(format!(
                "hostname: {:?} is not a public host name: it is our greeting's name and the authserv-id of the Authentication-Results we add (set this MX's name)",
                self.hostname
            ));
        }
        let dnsbl = &self.checks.dnsbl;
        if dnsbl.mode == Mode::Record {
            for z in &dnsbl.zones {
                if let Some(a @ (Action::Reject | Action::Tempfail)) = z.action {
                    w.push(format!(
                        "checks.dnsbl: record mode (the default when mode is not set): {}'s action {} is logged as would={}, not applied; set checks.dnsbl.mode: enforce to refuse listed clients",
                        z.zone,
                        a.word(),
                        a.word()
                    ));
                }
            }
        }
        w
    }

    /// Every problem of the file, not only the first.
    pub(super) fn validate(&self, text: &str, file: &Path) -> Vec<ConfigError> {
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
        errors
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
            (
                "upstream.pool.max_transactions",
                self.upstream.pool.max_transactions as usize,
            ),
        ] {
            if v == 0 {
                fail(key, "must be at least 1".into());
            }
        }
        if l.max_connections_per_ip > l.max_connections_per_network {
            fail(
                "limits.max_connections_per_ip",
                format!(
                    "{} is above limits.max_connections_per_network ({}): it could never be reached",
                    l.max_connections_per_ip, l.max_connections_per_network
                ),
            );
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
            // Every other duration is capped near a year; a longer period
            // turns the limit off without saying so.
            if l.rate.per > Duration::from_secs(366 * 86400) {
                fail(
                    &format!("checks.rate_limits[{i}].rate"),
                    format!(
                        "the period {} is over a year",
                        humantime::format_duration(l.rate.per)
                    ),
                );
            }
            let burst = l.burst.unwrap_or(l.rate.count);
            if l.count == RateCount::Bytes && burst < self.limits.max_message_size.0 {
                let key = if l.burst.is_some() { "burst" } else { "rate" };
                fail(
                    &format!("checks.rate_limits[{i}].{key}"),
                    format!(
                        "a burst of {burst} bytes (unset, it is the rate's count) is less than limits.max_message_size ({}): a message that large could never pass; set burst to at least that",
                        self.limits.max_message_size
                    ),
                );
            }
        }
        let u = &self.checks.uribl;
        for (list, zones) in [
            ("checks.dnsbl.zones", &self.checks.dnsbl.zones),
            ("checks.uribl.zones", &u.zones),
            ("checks.uribl.ip_zones", &u.ip_zones),
        ] {
            for (i, z) in zones.iter().enumerate() {
                if !is_domain_like(&z.zone) {
                    fail(
                        &format!("{list}[{i}].zone"),
                        format!("{:?} is not a DNS zone", z.zone),
                    );
                }
                if matches!(z.action, Some(Action::Score(_))) {
                    fail(
                        &format!("{list}[{i}].action"),
                        "use the zone's score: key for scores".into(),
                    );
                }
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
        } else if log_level_for(&self.log.level, TXN_TARGET).is_none()
            && log_level_for(&self.log.level, "portcullis").is_none()
        {
            fail(
                "log.level",
                format!(
                    "{:?} enables nothing Portcullis logs (a level is one of error, warn, info, debug, trace; a target starts with portcullis): use info",
                    self.log.level
                ),
            );
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
            (
                "upstream.pool.idle_timeout",
                u.pool.idle_timeout.0,
                secs(1),
                secs(3600),
            ),
            (
                "upstream.pool.max_age",
                u.pool.max_age.0,
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
                "checks.antivirus.timeout",
                self.checks.antivirus.timeout.0,
                ms(100),
                secs(600),
            ),
            (
                "checks.scanner.timeout",
                self.checks.scanner.timeout.0,
                ms(100),
                secs(600),
            ),
            (
                "checks.uribl.timeout",
                self.checks.uribl.timeout.0,
                ms(100),
                secs(60),
            ),
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
        let av = &self.checks.antivirus;
        if av.connections == 0 {
            fail("checks.antivirus.connections", "must be at least 1".into());
        }
        if matches!(av.on_error, Action::Reject | Action::Score(_) | Action::Tag) {
            fail(
                "checks.antivirus.on_error",
                "accept or tempfail (a scanner failure is not a finding about the message)".into(),
            );
        }
        let sc = &self.checks.scanner;
        if sc.connections == 0 {
            fail("checks.scanner.connections", "must be at least 1".into());
        }
        if !sc.score_factor.is_finite() || sc.score_factor < 0.0 {
            fail(
                "checks.scanner.score_factor",
                "must be a number of 0 or more".into(),
            );
        }
        if matches!(sc.on_error, Action::Reject | Action::Score(_) | Action::Tag) {
            fail(
                "checks.scanner.on_error",
                "accept or tempfail (a scanner failure is not a finding about the message)".into(),
            );
        }
        let ub = &self.checks.uribl;
        if ub.max_domains == 0 || ub.max_domains > 100 {
            fail(
                "checks.uribl.max_domains",
                "must be 1 to 100 (each is a lookup per zone while the client waits)".into(),
            );
        }
        if matches!(ub.on_error, Action::Reject | Action::Score(_) | Action::Tag) {
            fail(
                "checks.uribl.on_error",
                "accept or tempfail (a DNS failure is not a finding about the message)".into(),
            );
        }
        for (i, d) in ub.allow.iter().enumerate() {
            if !is_domain_like(d) {
                fail(
                    &format!("checks.uribl.allow[{i}]"),
                    format!("{d:?} is not a domain"),
                );
            }
        }
        for (i, s) in self.checks.block.senders.iter().enumerate() {
            let domain = s.rsplit_once('@').map_or(s.as_str(), |(_, d)| d);
            if !is_domain_like(domain.trim_end_matches('.')) || !domain.contains('.') {
                fail(
                    &format!("checks.block.senders[{i}]"),
                    format!("{s:?} is not a sender address or domain"),
                );
            }
        }
        for (i, d) in self.checks.allow.arc_sealers.iter().enumerate() {
            if !is_domain_like(d.trim_end_matches('.')) {
                fail(
                    &format!("checks.allow.arc_sealers[{i}]"),
                    format!("{d:?} is not a domain"),
                );
            }
        }
        if let Some(t) = self.checks.dnsbl.allow_threshold
            && !t.is_finite()
        {
            fail("checks.dnsbl.allow_threshold", "must be a number".into());
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
            for (j, m) in self.milter.listen.iter().enumerate() {
                if let MilterListen::Tcp(a) = m
                    && a.port() != 0
                    && *a == l.addr
                {
                    fail(
                        &format!("milter.listen[{j}]"),
                        format!("{a} is also listen[{i}]"),
                    );
                }
            }
        }
        for (j, m) in self.milter.listen.iter().enumerate() {
            if let MilterListen::Tcp(a) = m
                && a.port() != 0
                && self.metrics.listen == Some(*a)
            {
                fail(
                    &format!("milter.listen[{j}]"),
                    format!("{a} is also metrics.listen"),
                );
            }
        }
    }
}

/// The target of the transaction lines (what `stats` reads).
pub const TXN_TARGET: &str = "portcullis::txn";

/// The most verbose level a `log.level` filter enables for events of
/// `target` outside any span, or None when it enables nothing there: the
/// most specific directive whose target is a prefix of `target` wins, as
/// in `tracing_subscriber`'s `EnvFilter`. A bare word that is not a level
/// is a target (`verbose` enables the target `verbose`, not Portcullis).
/// Directives with span or field filters are left out: they enable events
/// only inside spans.
pub fn log_level_for(filter: &str, target: &str) -> Option<tracing::Level> {
    let mut best: Option<(usize, Option<tracing::Level>)> = None;
    for d in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        if d.contains('[') {
            continue;
        }
        let (t, level) = match d.split_once('=') {
            Some((t, l)) => (t.trim(), l.trim()),
            None => match parse_level(d) {
                Some(_) => ("", d),
                None => (d, "trace"),
            },
        };
        if !target.starts_with(t) {
            continue;
        }
        let Some(level) = parse_level(level) else {
            continue;
        };
        if best.is_none_or(|(len, _)| t.len() >= len) {
            best = Some((t.len(), level));
        }
    }
    best.and_then(|(_, l)| l)
}

/// `Some(None)` for `off`.
fn parse_level(s: &str) -> Option<Option<tracing::Level>> {
    Some(Some(match s.to_ascii_lowercase().as_str() {
        "off" => return Some(None),
        "error" | "1" => tracing::Level::ERROR,
        "warn" | "2" => tracing::Level::WARN,
        "info" | "3" => tracing::Level::INFO,
        "debug" | "4" => tracing::Level::DEBUG,
        "trace" | "5" => tracing::Level::TRACE,
        _ => return None,
    }))
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
