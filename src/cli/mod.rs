//! The offline verbs of the command line: `explain` (what the checks and
//! rules would do with one transaction) and `stats` (reports from the log).
//! Nothing here starts a server.

pub mod explain;
pub mod stats;
