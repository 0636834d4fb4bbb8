//! The status page at `/`: uptime, version, rules, config reloads and
//! keys waiting for a restart, upstream and nameserver health, DNSBL zones,
//! live counters.

use super::*;
use crate::telemetry::http::Probe;

/// The status page: uptime, version, rules, DNSBL health, live counters.
pub(super) struct StatusPage {
    pub(super) config: ConfigReloader,
    pub(super) started: std::time::Instant,
    pub(super) shared: Arc<Shared>,
    pub(super) limits: Arc<ConnectionLimits>,
    pub(super) handle: metrics_exporter_prometheus::PrometheusHandle,
    pub(super) shutdown: Arc<Shutdown>,
    /// SMTP and milter listeners bound (both fixed at start).
    pub(super) bound: (usize, usize),
    /// Every listener's accept health (SMTP, milter, HTTP).
    pub(super) accepting: Vec<Arc<AcceptHealth>>,
}

/// `2026-11-30 12:00:05 UTC`.
fn when(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_seconds(t)
        .to_string()
        .replacen('T', " ", 1)
        .replace('Z', " UTC")
}

/// `3d 4h`, `2h 5m`, `4m 10s`, `12s`: the two largest units.
fn span(d: Duration) -> String {
    let s = d.as_secs();
    let (days, hours, mins, secs) = (s / 86400, s / 3600 % 24, s / 60 % 60, s % 60);
    match (days, hours, mins) {
        (0, 0, 0) => format!("{secs}s"),
        (0, 0, _) => format!("{mins}m {secs}s"),
        (0, _, _) => format!("{hours}h {mins}m"),
        _ => format!("{days}d {hours}h"),
    }
}

/// `2026-11-30 12:00:05 UTC (4m 10s ago)`.
fn when_ago(t: std::time::SystemTime) -> String {
    let ago = std::time::SystemTime::now()
        .duration_since(t)
        .unwrap_or_default();
    format!("{} ({} ago)", when(t), span(ago))
}

impl crate::telemetry::http::Status for StatusPage {
    fn html(&self) -> String {
        use std::fmt::Write;
        let esc = |s: &str| {
            s.replace('&', "&amp;")
                .replace('<', "&lt;")
                .replace('>', "&gt;")
        };
        let rules = self.shared.rules.current();
        let mut o = String::from(
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Portcullis status</title></head><body>\n",
        );
        let _ = writeln!(o, "<h1>Portcullis {}</h1>", env!("CARGO_PKG_VERSION"));
        let _ = writeln!(
            o,
            "<p>host {} &middot; up {} &middot; {} sessions open</p>",
            esc(&self.shared.snapshot().cfg.hostname),
            span(self.started.elapsed()),
            self.limits.open()
        );
        let _ = writeln!(
            o,
            "<h2>Rules</h2><p>{} rules from {} files, loaded {}; reloads: {} ok, {} failed</p>",
            rules.rules().len(),
            rules.files.len(),
            when_ago(rules.loaded_at),
            self.shared.rules.reloads_ok.load(Ordering::Relaxed),
            self.shared.rules.reloads_failed.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            o,
            "<h2>Config</h2><p>loaded at start, {}; reloads: {} ok, {} failed</p>",
            when_ago(std::time::UNIX_EPOCH + Duration::from_secs(self.config.started_at)),
            self.config.ok.load(Ordering::Relaxed),
            self.config.failed.load(Ordering::Relaxed)
        );
        if let Ok(keys) = self.config.needs_restart.lock()
            && !keys.is_empty()
        {
            let _ = writeln!(
                o,
                "<p>changed in the file, in force after a restart: {}</p>",
                esc(&keys.join(", "))
            );
        }
        let snapshot = self.shared.snapshot();
        // A milter-only gate has no upstream of ours.
        if !snapshot.cfg.listen.is_empty() {
            let up = self.shared.upstream.health();
            let _ = writeln!(
                o,
                "<h2>Upstream</h2><p>{}: {}</p>",
                self.shared.upstream.addr,
                match (up.answering, &up.last_error) {
                    (Some(true), _) => "answers".to_string(),
                    (Some(false), e) => format!(
                        "DOES NOT ANSWER ({})",
                        esc(e.as_deref().unwrap_or("unknown error"))
                    ),
                    (None, _) => "not probed yet".to_string(),
                }
            );
        }
        let _ = writeln!(
            o,
            "<h2>Checks</h2><table><tr><th>check</th><th>mode</th><th></th></tr>"
        );
        for (name, mode) in snapshot.cfg.checks.modes() {
            let _ = writeln!(
                o,
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&name),
                mode.as_str(),
                mode.meaning()
            );
        }
        let _ = writeln!(o, "</table>");
        let store = &self.shared.store;
        let _ = writeln!(
            o,
            "<p>State store: {} {}</p>",
            store.backend(),
            match (store.last_error(), store.entries()) {
                (Some(e), _) => format!("FAILING ({})", esc(&e)),
                (None, Some(n)) => format!("({n} entries)"),
                (None, None) => "(answers, or not asked yet)".into(),
            }
        );
        let _ = writeln!(
            o,
            "<h2>Listeners</h2><table><tr><th>listener</th><th>accepts</th></tr>"
        );
        for h in &self.accepting {
            let state = match (h.trouble(), h.refusing()) {
                (Some(t), _) => format!("FAILING ({})", esc(&t)),
                (None, Some(n)) => format!("at its limit ({n} refused in this episode)"),
                (None, None) => "ok".into(),
            };
            let _ = writeln!(o, "<tr><td>{}</td><td>{state}</td></tr>", esc(&h.name));
        }
        let _ = writeln!(o, "</table>");
        let engine = Arc::clone(&self.shared.snapshot().engine);
        let _ = writeln!(
            o,
            "<h2>Nameservers</h2><table><tr><th>nameserver</th><th>state</th></tr>"
        );
        for (addr, state) in engine.dns.nameservers.states() {
            let state = match state {
                crate::dns::NsState::Answers => "answers".to_string(),
                crate::dns::NsState::Silent(e) => format!("DOES NOT ANSWER ({})", esc(&e)),
                crate::dns::NsState::NotChecked => "not checked yet".to_string(),
            };
            let _ = writeln!(o, "<tr><td>{addr}</td><td>{state}</td></tr>");
        }
        let _ = writeln!(o, "</table>");
        let _ = writeln!(
            o,
            "<h2>DNSBL zones</h2><table><tr><th>zone</th><th>for</th><th>state</th><th>errors</th></tr>"
        );
        let zones = (engine.dnsbl.zones.iter().map(|z| (z, "client")))
            .chain(engine.uribl.zones.iter().map(|z| (z, "links")));
        for (z, what) in zones {
            let _ = writeln!(
                o,
                "<tr><td>{}</td><td>{what}</td><td>{}</td><td>{}</td></tr>",
                esc(&z.conf.zone),
                if z.usable() { "usable" } else { "disabled" },
                z.errors.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(o, "</table>\n<h2>Counters</h2><pre>");
        // Sorted: the exporter's own order changes from scrape to scrape.
        let rendered = self.handle.render();
        let mut lines: Vec<&str> = rendered.lines().filter(|l| !l.starts_with('#')).collect();
        lines.sort_unstable();
        for line in lines {
            let _ = writeln!(o, "{}", esc(line));
        }
        o.push_str("</pre></body></html>\n");
        o
    }

    fn readiness(&self) -> Vec<Probe> {
        let mut probes = Vec::new();
        let (smtp, milter) = self.bound;
        probes.push(match self.shutdown.signal().phase() {
            Phase::Running => Probe {
                name: "listeners",
                ok: true,
                detail: format!("{smtp} SMTP, {milter} milter bound"),
            },
            _ => Probe {
                name: "listeners",
                ok: false,
                detail: "shutting down: draining sessions".into(),
            },
        });
        // A listener whose accepts fail (out of descriptors) loses
        // connections: not ready while it lasts.
        let failing: Vec<String> = self.accepting.iter().filter_map(|h| h.trouble()).collect();
        probes.push(Probe {
            name: "accept",
            ok: failing.is_empty(),
            detail: if failing.is_empty() {
                "every listener accepts".into()
            } else {
                failing.join("; ")
            },
        });
        // Milter-only: there is no upstream of ours to ask.
        if smtp > 0 {
            let up = &self.shared.upstream;
            let h = up.health();
            probes.push(Probe {
                name: "upstream",
                ok: h.answering == Some(true),
                detail: match (h.answering, h.last_error) {
                    (Some(true), _) => format!("{} answers", up.addr),
                    (Some(false), e) => format!(
                        "{} does not answer ({})",
                        up.addr,
                        e.as_deref().unwrap_or("unknown error")
                    ),
                    (None, _) => format!("{} not probed yet", up.addr),
                },
            });
        }
        let engine = Arc::clone(&self.shared.snapshot().engine);
        let states = engine.dns.nameservers.states();
        let answering = states
            .iter()
            .filter(|(_, s)| *s == crate::dns::NsState::Answers)
            .count();
        let silent: Vec<String> = states
            .iter()
            .filter_map(|(a, s)| match s {
                crate::dns::NsState::Silent(e) => Some(format!("{a}: {e}")),
                _ => None,
            })
            .collect();
        // No check asks DNS: its trouble costs no mail.
        let needed = engine.uses_dns();
        probes.push(Probe {
            name: "dns",
            ok: answering > 0 || !needed,
            detail: if !needed {
                "no check uses DNS".into()
            } else if answering > 0 {
                format!("{answering} of {} nameservers answer", states.len())
            } else if silent.is_empty() {
                "nameservers not checked yet".into()
            } else {
                format!("no nameserver answers ({})", silent.join("; "))
            },
        });
        let rules = self.shared.rules.current();
        let failed = self.shared.rules.reloads_failed.load(Ordering::Relaxed);
        // A failed reload keeps the previous set in force: still ready.
        probes.push(Probe {
            name: "rules",
            ok: true,
            detail: format!(
                "{} rules from {} files loaded{}",
                rules.rules().len(),
                rules.files.len(),
                if failed > 0 {
                    format!("; {failed} failed reloads since start, each leaving the set before it in force")
                } else {
                    String::new()
                }
            ),
        });
        probes
    }
}
