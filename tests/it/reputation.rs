//! Client reputation, as postscreen's cache: a client that passed the
//! greeting test or the DNSBL lookups is spared them while the pass
//! lasts; one refused at connect is refused again (421) for `fail_ttl`;
//! with Redis, another instance knows it too.

use crate::common;
use common::config::{test_config, with_dns, zone};
use common::dns::FakeDns;
use common::peers::Redis;
use common::{Client, FakeMta, Gate, Script};
use portcullis::config::{Action, Config, Mode, RejectAt, StateBackend, Zone};
use portcullis::state::{Clock, TestClock};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn remembering(mta: &FakeMta) -> Config {
    let mut cfg = test_config(mta.addr);
    cfg.limits.max_connections_per_ip = 100;
    cfg.checks.reputation.enabled = true;
    cfg
}

/// Time to the greeting (or the first reply) from `ip`.
async fn greeted(gate: std::net::SocketAddr, ip: &str) -> (String, Duration) {
    let started = Instant::now();
    let mut c = Client::connect_from(gate, ip).await;
    let r = c.reply().await;
    (r, started.elapsed())
}

#[tokio::test]
async fn a_client_that_waited_for_the_greeting_is_not_made_to_wait_again() {
    let mta = FakeMta::start(Script::default()).await;
    let mut cfg = remembering(&mta);
    cfg.greeting.delay = Some(common::config::secs(1));
    let gate = Gate::start_config(cfg).await;
    let (r, first) = greeted(gate.addr, "127.0.0.30").await;
    assert!(
        r.starts_with("220") && first >= Duration::from_millis(950),
        "{r} {first:?}"
    );
    let (r, again) = greeted(gate.addr, "127.0.0.30").await;
    assert!(
        r.starts_with("220") && again < Duration::from_millis(500),
        "{r} {again:?}"
    );
    let (_, other) = greeted(gate.addr, "127.0.0.31").await;
    assert!(other >= Duration::from_millis(950), "{other:?}");
}

#[tokio::test]
async fn a_client_that_talked_first_is_refused_again_until_fail_ttl() {
    let mta = FakeMta::start(Script::default()).await;
    let clock = Arc::new(TestClock::new());
    let mut cfg = remembering(&mta);
    cfg.greeting.delay = Some(common::config::secs(1));
    let gate = Gate::start_clocked(cfg, Arc::clone(&clock) as Arc<dyn Clock>).await;
    let mut c = Client::connect_from(gate.addr, "127.0.0.32").await;
    c.send(b"EHLO eager.test\r\n").await;
    assert!(c.reply().await.starts_with("554"));
    let (r, took) = greeted(gate.addr, "127.0.0.32").await;
    assert!(
        r.starts_with(
            "421 4.7.0 Service unavailable; client [127.0.0.32] was refused lately (pregreet)"
        ),
        "{r}"
    );
    assert!(
        took < Duration::from_millis(500),
        "refused without the test: {took:?}"
    );
    clock.advance(Duration::from_secs(3601));
    let (r, took) = greeted(gate.addr, "127.0.0.32").await;
    assert!(
        r.starts_with("220") && took >= Duration::from_millis(950),
        "{r} {took:?}"
    );
}

/// A DNS without a cache, so that every lookup the gate makes is seen.
async fn uncached(mta: &FakeMta, dns: &FakeDns) -> Config {
    let mut cfg = remembering(mta);
    with_dns(&mut cfg, dns.addr);
    cfg.dns.cache_size = 0;
    cfg.checks.dnsbl.mode = Mode::Enforce;
    cfg.checks.dnsbl.zones = vec![Zone {
        action: Some(Action::Reject),
        ..zone("bl.test")
    }];
    cfg
}

async fn transaction(gate: std::net::SocketAddr, ip: &str, want: &str) {
    let mut c = Client::connect_from(gate, ip).await;
    assert!(c.reply().await.starts_with("220"));
    c.cmd("EHLO client.test", "250").await;
    c.cmd("MAIL FROM:<a@sender.test>", "250").await;
    c.cmd("RCPT TO:<b@example.test>", want).await;
    c.cmd("QUIT", "221").await;
}

#[tokio::test]
async fn a_client_no_dnsbl_listed_is_not_looked_up_again() {
    let dns = common::dns::bl_test().await;
    let mta = FakeMta::start(Script::default()).await;
    let gate = Gate::start_config(uncached(&mta, &dns).await).await;
    transaction(gate.addr, "127.0.0.7", "250").await;
    assert_eq!(dns.count("7.0.0.127.bl.test."), 1);
    transaction(gate.addr, "127.0.0.7", "250").await;
    transaction(gate.addr, "127.0.0.7", "250").await;
    assert_eq!(dns.count("7.0.0.127.bl.test."), 1, "{:?}", dns.queries());
    // A listed client is looked up every time (no pass to remember); each
    // lookup is an A and, for the listing's text, a TXT query.
    transaction(gate.addr, "127.0.0.3", "550 5.7.1").await;
    let once = dns.count("3.0.0.127.bl.test.");
    assert!(once >= 1);
    transaction(gate.addr, "127.0.0.3", "550 5.7.1").await;
    assert_eq!(dns.count("3.0.0.127.bl.test."), 2 * once);
}

#[tokio::test]
async fn a_client_refused_at_connect_is_refused_again_without_lookups() {
    let dns = common::dns::bl_test().await;
    let mta = FakeMta::start(Script::default()).await;
    let mut cfg = uncached(&mta, &dns).await;
    cfg.checks.reject_at = RejectAt::Connect;
    let gate = Gate::start_config(cfg).await;
    let (r, _) = greeted(gate.addr, "127.0.0.3").await;
    assert!(r.starts_with("554 5.7.1"), "{r}");
    // The lookups of that connection may still be landing (the TXT query
    // for the listing's text runs beside the reply).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let once = dns.count("3.0.0.127.bl.test.");
    assert!(once >= 1);
    let (r, _) = greeted(gate.addr, "127.0.0.3").await;
    assert!(
        r.starts_with("421 4.7.0") && r.contains("(dnsbl:bl.test)"),
        "{r}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        dns.count("3.0.0.127.bl.test."),
        once,
        "no lookup the second time"
    );
}

/// Two instances sharing Redis: a pass found by one spares the other the
/// lookup.
#[tokio::test]
#[ignore = "needs redis-server (installed by .ci/run)"]
async fn another_instance_sharing_redis_knows_the_client() {
    let redis = Redis::start();
    let dns = common::dns::bl_test().await;
    let mta = FakeMta::start(Script::default()).await;
    let mut cfg = uncached(&mta, &dns).await;
    cfg.state.backend = StateBackend::Redis;
    cfg.state.url = redis.url();
    let a = Gate::start_config(cfg.clone()).await;
    let b = Gate::start_config(cfg).await;
    transaction(a.addr, "127.0.0.7", "250").await;
    transaction(b.addr, "127.0.0.7", "250").await;
    assert_eq!(dns.count("7.0.0.127.bl.test."), 1, "{:?}", dns.queries());
}
