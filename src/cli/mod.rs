//! The offline verbs of the command line: `explain` (what the checks and
//! rules would do with one transaction), `stats` (reports from the log)
//! and `trace` (one session's lines from the log).
//! Nothing here starts a server.

pub mod explain;
pub mod stats;
pub mod trace;
