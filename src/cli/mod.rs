//! The offline verbs of the command line: `check` (the config and rules
//! as `run` would load them), `explain` (what the checks and rules would
//! do with one transaction), `stats` (reports from the log) and `trace`
//! (one session's lines from the log); `logs` reads the log for the last
//! two. Nothing here starts a server.

pub mod check;
pub mod explain;
pub mod logs;
pub mod man;
pub mod replay;
pub mod stats;
pub mod trace;
