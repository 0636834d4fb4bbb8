//! Portcullis: an anti-spam filtering SMTP proxy.
//!
//! It listens where the MX points, speaks SMTP to the sending client, runs
//! checks at each stage of the dialogue, and relays each accepted transaction
//! live to the MTA behind it (Postfix, Exim), or refuses it with the right
//! reply code. A client hears `250` for a message only after upstream did.
//!
//! # Layout
//! - `config`: serde structs; load -> parse -> validate (`file:line:column`).
//! - `yaml`: the one module that calls the YAML library.
//! - `server`: listeners, connection limits, memory budget, PROXY in, shutdown, TLS.
//! - `smtp`: command parser, replies, the strict DATA reader, EHLO, the session.
//! - `upstream`: the SMTP client to the MTA (XCLIENT / PROXY out, capability probe).
//! - `checks`: limits, DNSBL, SPF/DKIM/DMARC/ARC/iprev (via mail-auth): findings.
//! - `dns`: the resolver (configured nameservers only) and moka caches.
//! - `verdict`: findings -> accept / tag / tempfail / reject, and the reply table.
//! - `telemetry`: log set-up and the one line per transaction.

pub mod checks;
pub mod config;
pub mod dns;
pub mod explain;
pub mod rules;
pub mod server;
pub mod smtp;
pub mod stats;
pub mod telemetry;
pub mod upstream;
pub mod verdict;
pub mod yaml;
