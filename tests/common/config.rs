//! Test configs as typed values: `test_config(upstream)` is the test
//! default (127.0.0.1:0, XCLIENT to `upstream` with short timeouts, every
//! check off, no rules); tests set fields with Rust types and start a gate
//! with `Gate::start_config`. `write_config` saves one for tests that
//! reload a file or run the binary (as JSON, which YAML reads).

use super::{EMPTY_RULES, NO_CHECKS};
use portcullis::config::{Bytes, Config, Secs};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

pub fn test_config(upstream: SocketAddr) -> Config {
    let yaml = format!(
        "hostname: gate.test\nlisten: [{{addr: 127.0.0.1:0}}]\nupstream: {{addr: {upstream}, client_identity: xclient, timeouts: {{connect: 5s, command: 10s, data: 5s}}}}\nrules_dir: {EMPTY_RULES}\n{NO_CHECKS}"
    );
    Config::parse(&yaml, Path::new("test.yaml")).expect("the test default config is valid")
}

/// Saves `cfg` where `Config::load` reads it.
pub fn write_config(path: &Path, cfg: &Config) {
    std::fs::write(path, serde_json::to_string_pretty(cfg).unwrap()).unwrap();
}

pub fn secs(s: u64) -> Secs {
    Secs(Duration::from_secs(s))
}

pub fn kib(n: u64) -> Bytes {
    Bytes(n << 10)
}

pub fn mib(n: u64) -> Bytes {
    Bytes(n << 20)
}
