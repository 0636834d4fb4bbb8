//! Portcullis: an anti-spam filtering SMTP proxy.
//!
//! It listens where the MX points, speaks SMTP to the sending client, runs
//! checks at each stage of the dialogue, and relays each accepted transaction
//! live to the MTA behind it (Postfix, Exim), or refuses it with the right
//! reply code. A client hears `250` for a message only after upstream did.
//!
//! # Layout
//! Top down; nothing imports from a module above it.
//! - `server`: wiring, listeners, incoming PROXY, reload, status page, TLS.
//! - `smtp`: the client session (state machine) and the EHLO offer.
//! - `checks`: limits, DNSBL, SPF/DKIM/DMARC/ARC/iprev (via mail-auth), the
//!   rule pool and the check threads: findings.
//! - `rules`: the administrators' YAML rules, compiled and reloadable.
//! - `upstream`: the SMTP client to the MTA (capability probe, relay).
//! - `dns`: the resolver (configured nameservers only), caches, health.
//! - `verdict`: findings -> accept / tag / tempfail / reject, and the reply table.
//! - `telemetry`: log set-up, the one line per transaction, metrics, HTTP.
//! - `config`: serde structs; load -> parse -> validate (`file:line:column`);
//!   `yaml`: the one module that calls the YAML library.
//! - `runtime`: shutdown phases, connection limits, memory budget, streams.
//! - `wire`: sans-IO SMTP on the wire: commands and paths, replies, the
//!   DATA reader and dot-stuffing, PROXY in, XCLIENT and PROXY out.
//! - `cli`: the offline verbs `explain` and `stats` (no server).

pub mod checks;
pub mod cli;
pub mod config;
pub mod dns;
pub mod rules;
pub mod runtime;
pub mod server;
pub mod session;
pub mod telemetry;
pub mod upstream;
pub mod verdict;
pub mod wire;
pub mod yaml;
