//! DNS allow lists, as postscreen's `dnsbl_allowlist_threshold`: a zone
//! with a score below zero (list.dnswl.org style), and a client whose
//! summed score is at or below `checks.dnsbl.allow_threshold` skips the
//! greeting test (greeted as soon as the answer is in) and greylisting;
//! a client no allow list vouches for waits the whole test and is
//! greylisted.

use crate::common;
use common::config::{secs, test_config, with_dns, zone};
use common::dns::{FakeDns, a};
use common::{Client, FakeMta, Gate, Script};
use portcullis::config::{Mode, ReturnFilter};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread")]
async fn a_negative_dnswl_score_lifts_a_client_over_the_greeting_test_and_greylisting() {
    let dns = FakeDns::start(
        &["test."],
        vec![
            // RFC 5782 test entry, for the zone's self-test.
            a("2.0.0.127.wl.test.", "127.0.10.2"),
            // dnswl.org's return codes: 127.0.CATEGORY.TRUST.
            a("40.0.0.127.wl.test.", "127.0.10.3"),
        ],
    )
    .await;
    let mta = FakeMta::start(Script::default()).await;
    let mut cfg = test_config(mta.addr);
    with_dns(&mut cfg, dns.addr);
    cfg.limits.max_connections_per_ip = 100;
    cfg.greeting.delay = Some(secs(3));
    cfg.checks.dnsbl.mode = Mode::Enforce;
    cfg.checks.dnsbl.allow_threshold = Some(-1.0);
    let mut wl = zone("wl.test");
    wl.returns = vec![ReturnFilter::parse("127.0.[0..255].[2..3]").unwrap()];
    wl.score = -5.0;
    cfg.checks.dnsbl.zones = vec![wl];
    cfg.checks.greylist.mode = Mode::Enforce;
    let g = Gate::start_config(cfg).await;

    // Vouched for: greeted once the answer is in, and not greylisted.
    let started = Instant::now();
    let mut c = Client::connect_from(g.addr, "127.0.0.40").await;
    let r = c.reply().await;
    let took = started.elapsed();
    assert!(r.starts_with("220"), "{r}");
    assert!(took < Duration::from_millis(1500), "greeted after {took:?}");
    c.cmd("EHLO mx.sender.test", "250").await;
    let r = c
        .send_mail(
            "a@sender.test",
            &["b@example.test"],
            b"Subject: hi\r\n\r\nhi\r\n",
        )
        .await;
    assert!(r.starts_with("250"), "{r}");
    c.cmd("QUIT", "221").await;
    assert_eq!(mta.stored().len(), 1);

    // Not listed: the whole greeting test, then greylisted.
    let started = Instant::now();
    let mut c = Client::connect_from(g.addr, "127.0.0.41").await;
    let r = c.reply().await;
    assert!(r.starts_with("220"), "{r}");
    assert!(started.elapsed() >= Duration::from_millis(2900));
    c.cmd("EHLO mx.sender.test", "250").await;
    c.cmd("MAIL FROM:<a@sender.test>", "250").await;
    let r = c.cmd("RCPT TO:<b@example.test>", "451").await;
    assert!(r.contains("4.7.1"), "{r}");
    c.cmd("QUIT", "221").await;
    assert_eq!(mta.stored().len(), 1);
}
