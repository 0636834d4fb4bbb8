//! Integration tests, one binary: Portcullis started on 127.0.0.1:0 with
//! a scripted upstream and in-process DNS, and real peers (Postfix, Exim,
//! swaks; `#[ignore]`d, run by `.ci/run`). One module per area. Four keep
//! binaries of their own: `tests/metrics.rs` and `tests/health.rs` (the
//! metrics recorder is process-wide and they assert exact values),
//! `tests/log_line.rs` (tracing's callsite cache and a thread-local
//! subscriber) and `tests/bounds.rs` (floods, heavy rules and slow clients
//! measured in time: they must not share the process with other tests).

#[path = "../common/mod.rs"]
mod common;

mod antivirus;
mod attachments;
mod checks;
mod chunking;
mod cli;
mod dashboard;
mod differential;
mod dnswl;
mod e2e_milter;
mod e2e_peers;
mod faults_sink;
mod forwarders;
mod greylist;
mod hostile;
mod identity;
mod limits;
mod milter;
mod milter_props;
mod package;
mod paths;
mod policies;
mod pool;
mod props;
mod rate_limits;
mod relay;
mod reload;
mod replay;
mod reputation;
mod rules;
mod scanner;
mod session;
mod shutdown;
mod stats;
mod sync;
mod systemd;
mod tls;
mod upstream_faults;
mod uribl;
