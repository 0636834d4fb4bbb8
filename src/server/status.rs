//! The status page at `/`: uptime, version, rules, config reloads and
//! keys waiting for a restart, upstream and nameserver health, DNSBL zones,
//! live counters.

use super::*;

/// The status page: uptime, version, rules, DNSBL health, live counters.
pub(super) struct StatusPage {
    pub(super) config: ConfigReloader,
    pub(super) started: std::time::Instant,
    pub(super) shared: Arc<Shared>,
    pub(super) limits: Arc<ConnectionLimits>,
    pub(super) handle: metrics_exporter_prometheus::PrometheusHandle,
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
        let loaded = rules
            .loaded_at
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut o = String::from(
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Portcullis status</title></head><body>\n",
        );
        let _ = writeln!(o, "<h1>Portcullis {}</h1>", env!("CARGO_PKG_VERSION"));
        let _ = writeln!(
            o,
            "<p>host {} &middot; up {} s &middot; {} sessions open</p>",
            esc(&self.shared.runtime().cfg.hostname),
            self.started.elapsed().as_secs(),
            self.limits.open()
        );
        let _ = writeln!(
            o,
            "<h2>Rules</h2><p>{} rules from {} files, loaded {} (unix time); reloads: {} ok, {} failed</p>",
            rules.rules().len(),
            rules.files.len(),
            loaded,
            self.shared.rules.reloads_ok.load(Ordering::Relaxed),
            self.shared.rules.reloads_failed.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            o,
            "<h2>Config</h2><p>loaded at start (unix time {}); reloads: {} ok, {} failed</p>",
            self.config.started_at,
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
        let engine = Arc::clone(&self.shared.runtime().engine);
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
            "<h2>DNSBL zones</h2><table><tr><th>zone</th><th>state</th><th>errors</th></tr>"
        );
        for z in &engine.dnsbl.zones {
            let _ = writeln!(
                o,
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&z.conf.zone),
                if z.usable() { "usable" } else { "disabled" },
                z.errors.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(o, "</table>\n<h2>Counters</h2><pre>");
        for line in self.handle.render().lines().filter(|l| !l.starts_with('#')) {
            let _ = writeln!(o, "{}", esc(line));
        }
        o.push_str("</pre></body></html>\n");
        o
    }
}
