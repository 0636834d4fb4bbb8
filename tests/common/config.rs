//! Test configs as typed values: `test_config(upstream)` is the test
//! default (127.0.0.1:0, XCLIENT to `upstream` with short timeouts, every
//! check off, no rules); tests set fields with Rust types and start a gate
//! with `Gate::start_config`. `write_config` saves one for tests that
//! reload a file or run the binary (as JSON, which YAML reads).

use super::{EMPTY_RULES, NO_CHECKS};
use portcullis::config::{Bytes, Config, IdentityMode, Secs, UpstreamTimeouts, Zone, ZoneType};
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

/// Points the checks' DNS at `dns` (a test server on loopback), with
/// short waits and a TTL floor that makes repeated answers cache hits.
pub fn with_dns(cfg: &mut Config, dns: SocketAddr) {
    cfg.dns.nameservers = vec![dns];
    cfg.dns.timeout = secs(1);
    cfg.dns.attempts = 1;
    cfg.dns.min_ttl = secs(60);
}

/// A DNSBL zone that scores nothing and refuses nothing until told to.
pub fn zone(name: &str) -> Zone {
    Zone {
        zone: name.into(),
        kind: ZoneType::Ip,
        returns: Vec::new(),
        score: 0.0,
        action: None,
        text: None,
    }
}

/// Clients arrive through a PROXY header from a load balancer on loopback.
pub fn behind_proxy(cfg: &mut Config) {
    cfg.listen[0].proxy_protocol = true;
    cfg.listen[0].trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()];
}

/// The test config in front of a real MTA on loopback `port`, with the
/// patience a real one needs.
pub fn in_front_of(port: u16, identity: IdentityMode) -> Config {
    let mut cfg = test_config(SocketAddr::from(([127, 0, 0, 1], port)));
    cfg.upstream.client_identity = identity;
    cfg.upstream.timeouts = UpstreamTimeouts {
        connect: secs(10),
        command: secs(30),
        data: secs(60),
    };
    cfg
}

/// An enforced rate limit of `n` per `per` seconds, bursts of `n`.
pub fn rate_limit(
    name: &str,
    key: portcullis::config::RateKey,
    count: portcullis::config::RateCount,
    n: u64,
    per: u64,
) -> portcullis::config::RateLimit {
    portcullis::config::RateLimit {
        name: name.into(),
        key,
        rate: portcullis::config::Rate {
            count: n,
            per: Duration::from_secs(per),
        },
        burst: None,
        count,
        mode: portcullis::config::Mode::Enforce,
        text: None,
    }
}
