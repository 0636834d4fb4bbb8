//! Test helpers, by what they fake or drive: `mta` (a scripted upstream
//! MTA), `gate` (Portcullis on 127.0.0.1:0), `client` (a small SMTP
//! client and message helpers), `web` (HTTP and a STARTTLS peek),
//! `process` (ports, waiting, child processes); `clamd` (a scripted
//! clamd); `config`, `dns`
//! (in-process DNS), `milter` (a scripted milter MTA) and `peers` (real
//! Postfix, Exim, Knot). Everything stays on loopback. Each test binary
//! uses part of them.
#![allow(dead_code, unused_imports)]

pub mod clamd;
pub mod client;
pub mod config;
pub mod dns;
pub mod gate;
pub mod milter;
pub mod mta;
pub mod peers;
pub mod process;
pub mod scanner;
pub mod web;

pub use client::*;
pub use gate::*;
pub use mta::*;
pub use process::*;
pub use web::*;
