//! Portcullis: an anti-spam filtering SMTP proxy.
//!
//! It listens where the MX points, speaks SMTP to the sending client, runs
//! checks at each stage of the dialogue, and relays each accepted transaction
//! live to the MTA behind it (Postfix, Exim), or refuses it with the right
//! reply code. A client hears `250` for a message only after upstream did.
//!
//! # Layout
//! Top down; nothing imports from a module above it or beside it (the
//! test `layers_point_down` below keeps it so).
//! - `cli`: the offline verbs `check`, `explain`, `stats` and `trace`
//!   (`check` asks `server` what start-up would refuse; nothing here
//!   starts one).
//! - `server`: wiring, listeners, incoming PROXY, SIGHUP and reload,
//!   status page, TLS.
//! - `session` and `milter`, the two front doors, side by side (neither
//!   imports the other): the proxy's client session, one file per SMTP
//!   stage, relaying through `upstream`; and the milter for Postfix or
//!   Sendmail, a named state machine split by stage the same way. Both
//!   drive a `checks::Screen` and record through `gate::ledger`.
//! - `gate`: what both doors stand on: the snapshot a reload swaps (`Snapshot`),
//!   the shared handles, the peer, and `gate::ledger`, one transaction's
//!   record and its one log line.
//! - `checks`: the one check engine (a `Check` per file: limits, rate
//!   limits, greylisting, reputation, DNSBL, iprev, SPF, DKIM, DMARC, ARC,
//!   rules, our headers), the sans-IO `Screen` every front door drives, and
//!   `Hold`, a message held within the size limit and memory budget;
//!   `upstream`: the SMTP client to the MTA (capability probe, relay).
//! - `rules`: the administrators' YAML rules, compiled and reloadable;
//!   `verdict`: findings -> accept / tag / tempfail / reject, and replies.
//! - `dns`: the resolver (configured nameservers only), caches, health;
//!   `state`: the store (embedded, or Redis/Valkey) behind greylisting,
//!   rate limits and reputation.
//! - `runtime`: shutdown phases, connection limits, memory budget, streams,
//!   descriptors and each listener's accept health.
//! - `telemetry`: log set-up, every log event with its metrics, HTTP.
//! - `config`: serde structs; load -> parse -> validate (`file:line:column`).
//! - `wire`: sans-IO SMTP on the wire: commands and paths, replies, the
//!   DATA reader and dot-stuffing, PROXY in, XCLIENT and PROXY out, the
//!   milter packets;
//!   `yaml`: the one module that calls the YAML library.

pub mod checks;
pub mod cli;
pub mod config;
pub mod dns;
pub mod gate;
pub mod milter;
pub mod rules;
pub mod runtime;
pub mod server;
pub mod session;
pub mod state;
pub mod telemetry;
pub mod upstream;
pub mod verdict;
pub mod wire;
pub mod yaml;

#[cfg(test)]
mod tests {
    /// The layers, bottom first; a module may import only from layers
    /// below its own.
    const LAYERS: &[&[&str]] = &[
        &["wire", "yaml"],
        &["config"],
        &["telemetry"],
        &["runtime"],
        &["dns", "state"],
        &["rules", "verdict"],
        &["checks", "upstream"],
        &["gate"],
        &["session", "milter"],
        &["server"],
        &["cli"],
    ];

    fn layer(module: &str) -> Option<usize> {
        LAYERS.iter().position(|l| l.contains(&module))
    }

    fn sources(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                sources(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }

    /// The two front doors share only what lies below them (`gate` and
    /// down): neither names the other.
    #[test]
    fn the_doors_do_not_import_each_other() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        for (door, other) in [("session", "milter"), ("milter", "session")] {
            let mut imports = 0;
            let mut files = Vec::new();
            sources(&src.join(door), &mut files);
            assert!(!files.is_empty(), "no sources under src/{door}");
            for f in files {
                let text = std::fs::read_to_string(&f).unwrap();
                for (i, line) in text.lines().enumerate() {
                    imports += line.matches("crate::").count();
                    assert!(
                        !line.contains(&format!("crate::{other}")),
                        "{}:{}: the {door} door imports the {other} door",
                        f.display(),
                        i + 1
                    );
                }
            }
            println!("src/{door}: {imports} crate:: imports, none of crate::{other}");
        }
    }

    #[test]
    fn layers_point_down() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        sources(&src, &mut files);
        let mut wrong = Vec::new();
        let mut seen = 0;
        let checked = files.len();
        for f in files {
            let rel = f.strip_prefix(&src).unwrap();
            let top = rel.iter().next().unwrap().to_string_lossy();
            let Some(own) = layer(top.trim_end_matches(".rs")) else {
                continue; // lib.rs, main.rs
            };
            let text = std::fs::read_to_string(&f).unwrap();
            for (i, line) in text.lines().enumerate() {
                for (at, _) in line.match_indices("crate::") {
                    let dep: String = line[at + 7..]
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    seen += 1;
                    match layer(&dep) {
                        Some(l) if l < own || dep == top.trim_end_matches(".rs") => {}
                        _ => wrong.push(format!("{}:{}: {dep}", rel.display(), i + 1)),
                    }
                }
            }
        }
        assert!(seen > 100, "only {seen} imports found");
        assert!(
            wrong.is_empty(),
            "imports that do not point down: {wrong:#?}"
        );
        // Shown with --nocapture: what was checked.
        println!(
            "{seen} crate:: imports in {checked} files point down through these layers (bottom first):"
        );
        for (i, l) in LAYERS.iter().enumerate() {
            println!("  {i}: {}", l.join(", "));
        }
    }
}
