//! What a reload (SIGHUP) can put in force for new sessions, and what only
//! a restart can: the sockets we listen on, the upstream connection and
//! its probe, the log output, the connection tables and the rules
//! directory's watcher are built once at start.
//!
//! Configs are compared by value, key by key, so the reload can name each
//! key path it applied and each one that waits for a restart.

use super::Config;

/// The outcome of comparing the running config with a freshly loaded one.
#[derive(Debug)]
pub struct ReloadPlan {
    /// The config new sessions will use: the new file, except the
    /// restart-only keys, which keep their running values.
    pub effective: Config,
    /// Key paths whose new values are in force for new sessions.
    pub applied: Vec<String>,
    /// Key paths that changed in the file but keep their running value
    /// until a restart.
    pub needs_restart: Vec<String>,
}

/// Plans the reload of `new` over `running`.
pub fn plan(running: &Config, new: Config) -> ReloadPlan {
    let running = normalized(running.clone());
    let new = normalized(new);
    let effective = keeping_restart_only(new.clone(), &running);
    ReloadPlan {
        applied: changed_keys(&running, &effective),
        needs_restart: changed_keys(&effective, &new),
        effective,
    }
}

/// Values that are derived from others, made explicit so that a change
/// shows up under the key that carries it (`hostname` also names us to
/// upstream unless `upstream.helo_name` is set).
fn normalized(mut c: Config) -> Config {
    if c.upstream.helo_name.is_none() {
        c.upstream.helo_name = Some(c.hostname.clone());
    }
    c
}

/// `new` with every setting that only a restart can change taken from
/// `running`. This is the one list of restart-only keys.
fn keeping_restart_only(mut new: Config, running: &Config) -> Config {
    // Bound sockets and the upstream connection's fixed parameters.
    new.listen = running.listen.clone();
    new.milter.listen = running.milter.listen.clone();
    // The connection threads are started once, with the listeners.
    new.threads = running.threads;
    new.upstream = running.upstream.clone();
    new.metrics = running.metrics.clone();
    // The log subscriber is installed once per process; only its level
    // filter can be swapped.
    new.log = crate::config::Log {
        level: new.log.level.clone(),
        ..running.log.clone()
    };
    // The connection table is sized and keyed once.
    let (n, r) = (&mut new.limits, &running.limits);
    n.max_connections = r.max_connections;
    n.max_connections_per_ip = r.max_connections_per_ip;
    n.max_connections_per_network = r.max_connections_per_network;
    n.network_prefix_v4 = r.network_prefix_v4;
    n.network_prefix_v6 = r.network_prefix_v6;
    n.memory_budget = r.memory_budget;
    new.stress.at_percent = running.stress.at_percent;
    new.milter.max_connections = running.milter.max_connections;
    new.milter.max_connections_per_ip = running.milter.max_connections_per_ip;
    // The rules directory is watched from start; its files reload on change.
    new.rules_dir = running.rules_dir.clone();
    // The state store is opened (and Redis connected) once.
    new.state = running.state.clone();
    new
}

/// Key paths (`listen[0].addr`, `checks.spf.mode`) whose values differ.
pub fn changed_keys(a: &Config, b: &Config) -> Vec<String> {
    let (Ok(a), Ok(b)) = (serde_json::to_value(a), serde_json::to_value(b)) else {
        return vec!["<config>".into()];
    };
    let mut out = Vec::new();
    diff(&a, &b, String::new(), &mut out);
    out
}

/// Every leaf key path of a config, for tests and documentation.
pub fn key_paths(c: &Config) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(v) = serde_json::to_value(c) {
        leaves(&v, String::new(), &mut out);
    }
    out
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

fn diff(a: &serde_json::Value, b: &serde_json::Value, path: String, out: &mut Vec<String>) {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let (va, vb) = (
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                );
                diff(va, vb, join(&path, k), out);
            }
        }
        // Lists of tables (listen, dnsbl zones) by position; lists of
        // values (nameservers, allow lists) as one value.
        (Value::Array(x), Value::Array(y))
            if x.len() == y.len() && x.iter().chain(y).any(Value::is_object) =>
        {
            for (i, (va, vb)) in x.iter().zip(y).enumerate() {
                diff(va, vb, format!("{path}[{i}]"), out);
            }
        }
        _ if a != b => out.push(path),
        _ => {}
    }
}

fn leaves(v: &serde_json::Value, path: String, out: &mut Vec<String>) {
    use serde_json::Value;
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                leaves(v, join(&path, k), out);
            }
        }
        Value::Array(a) if a.iter().any(Value::is_object) => {
            for (i, v) in a.iter().enumerate() {
                leaves(v, format!("{path}[{i}]"), out);
            }
        }
        _ => out.push(path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn cfg(extra: &str) -> Config {
        let text = format!(
            "hostname: a.test\nlisten: [{{addr: 127.0.0.1:2525}}]\nupstream: {{addr: 127.0.0.1:25}}\n{extra}"
        );
        Config::parse(&text, Path::new("t.yaml")).unwrap()
    }

    #[test]
    fn reloadable_keys_apply_and_restart_keys_are_named() {
        let running = cfg("");
        let new =
            cfg("limits: {max_connections: 5, max_recipients: 3}\nchecks: {reject_at: connect}\n");
        let p = plan(&running, new);
        assert_eq!(p.applied, ["checks.reject_at", "limits.max_recipients"]);
        assert_eq!(p.needs_restart, ["limits.max_connections"]);
        assert_eq!(p.effective.limits.max_connections, 1000);
        assert_eq!(p.effective.limits.max_recipients, 3);
    }

    #[test]
    fn hostname_applies_but_upstream_keeps_its_helo_name() {
        let p = plan(&cfg(""), {
            let mut c = cfg("");
            c.hostname = "b.test".into();
            c
        });
        assert_eq!(p.applied, ["hostname"]);
        assert_eq!(p.needs_restart, ["upstream.helo_name"]);
        assert_eq!(p.effective.upstream_helo(), "a.test");
    }

    #[test]
    fn list_entries_are_named_by_position() {
        let p = plan(
            &cfg(""),
            cfg("").tap(|c| c.listen[0].addr = "127.0.0.1:2526".parse().unwrap()),
        );
        assert_eq!(p.needs_restart, ["listen[0].addr"]);
        assert!(p.applied.is_empty());
        let p = plan(&cfg(""), cfg("dns: {nameservers: [127.0.0.1:5353]}\n"));
        assert_eq!(p.applied, ["dns.nameservers"]);
    }

    #[test]
    fn an_unchanged_file_changes_nothing() {
        let p = plan(&cfg(""), cfg(""));
        assert!(p.applied.is_empty() && p.needs_restart.is_empty());
    }

    trait Tap: Sized {
        fn tap(self, f: impl FnOnce(&mut Self)) -> Self;
    }
    impl Tap for Config {
        fn tap(mut self, f: impl FnOnce(&mut Self)) -> Self {
            f(&mut self);
            self
        }
    }
}
