//! The gate's own limits through the proxy: message size, memory budget
//! (the message and its parse), recipients, connections, protocol errors,
//! overlong lines and idle clients.

use crate::common;
use common::config::{kib, mib, secs, test_config};

use common::{Client, FakeMta, Gate, Script, message};

use std::time::Duration;

#[tokio::test]
async fn declared_size_over_limit_refused_at_mail() {
    let mta = FakeMta::start(Script::default()).await;
    let mut c = test_config(mta.addr);
    c.limits.max_message_size = mib(1);
    let gate = Gate::start_config(c).await;
    let mut c = Client::hello(gate.addr).await;
    let r = c.cmd("MAIL FROM:<a@sender.test> SIZE=2000000", "552").await;
    assert!(r.starts_with("552 5.3.4"), "{r}");
    assert_eq!(mta.count("MAIL"), 0);
    c.cmd("MAIL FROM:<a@sender.test> SIZE=1000", "250").await;
}

#[tokio::test]
async fn message_over_limit_refused_after_reading_to_end() {
    let mta = FakeMta::start(Script::default()).await;
    let mut cfg = test_config(mta.addr);
    (cfg.limits.max_message_size, cfg.limits.memory_budget) = (kib(1), mib(1));
    let gate = Gate::start_config(cfg).await;
    let mut c = Client::hello(gate.addr).await;
    let body = "y".repeat(100) + "\r\n";
    let r = c
        .send_mail(
            "a@sender.test",
            &["b@example.test"],
            body.repeat(50).as_bytes(),
        )
        .await;
    assert!(r.starts_with("552 5.3.4"), "{r}");
    // In sync: the next command works, and upstream got RSET, no DATA.
    c.cmd("NOOP", "250").await;
    assert_eq!(mta.count("DATA"), 0);
    assert!(mta.stored().is_empty());
}

#[tokio::test]
async fn memory_budget_exhausted_gives_452() {
    let mta = FakeMta::start(Script::default()).await;
    let mut cfg = test_config(mta.addr);
    (cfg.limits.max_message_size, cfg.limits.memory_budget) = (mib(1), mib(1));
    let gate = Gate::start_config(cfg).await;
    let chunk = ("z".repeat(998) + "\r\n").repeat(700);
    // One session holds ~700 KB of a message it has not finished...
    let mut hog = Client::hello(gate.addr).await;
    hog.cmd("MAIL FROM:<a@sender.test>", "250").await;
    hog.cmd("RCPT TO:<b@example.test>", "250").await;
    hog.cmd("DATA", "354").await;
    hog.send(chunk.as_bytes()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // ...so another session's 700 KB does not fit in the shared budget.
    let mut c = Client::hello(gate.addr).await;
    let r = c
        .send_mail("a@sender.test", &["b@example.test"], chunk.as_bytes())
        .await;
    assert!(r.starts_with("452 4.3.1"), "{r}");
    assert!(mta.stored().is_empty());
    // Once the first finishes and releases its share, both get through.
    hog.send(b".\r\n").await;
    assert!(hog.reply().await.starts_with("250"));
    let r = c
        .send_mail("a@sender.test", &["b@example.test"], chunk.as_bytes())
        .await;
    assert!(r.starts_with("250"), "{r}");
    assert_eq!(mta.stored().len(), 2);
}

/// With rules on the message, its whole parse is held from the memory
/// budget too: a message that fits the budget only once is refused 452
/// 4.3.1 (retry later) instead of being parsed outside the bound.
#[tokio::test]
async fn message_parse_for_rules_is_counted_against_the_budget() {
    let dir = std::env::temp_dir().join(format!("portcullis-parse-budget-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("body.yaml"),
        "rules:\n  - id: BODY_WORD\n    description: a body word\n    when: {body: {regex: 'viagra'}}\n    action: {score: 1}\n",
    )
    .unwrap();
    let mta = FakeMta::start(Script::default()).await;
    let body = format!("{}\r\n", "y".repeat(76)).repeat(22000); // about 1.7 MB
    for (rules, want) in [
        (std::path::PathBuf::from(common::EMPTY_RULES), "250"),
        (dir.clone(), "452 4.3.1"),
    ] {
        let mut cfg = test_config(mta.addr);
        (cfg.limits.memory_budget, cfg.limits.max_message_size) = (mib(3), mib(3));
        cfg.rules_dir = Some(rules.clone());
        let gate = Gate::start_config(cfg).await;
        let mut c = Client::hello(gate.addr).await;
        let r = c
            .send_mail(
                "a@sender.test",
                &["b@example.test"],
                &message("parse", &body),
            )
            .await;
        assert!(r.starts_with(want), "rules {}: {r}", rules.display());
    }
    assert_eq!(mta.stored().len(), 1);
}

#[tokio::test]
async fn too_many_recipients() {
    let mta = FakeMta::start(Script::default()).await;
    let mut c = test_config(mta.addr);
    c.limits.max_recipients = 2;
    let gate = Gate::start_config(c).await;
    let mut c = Client::hello(gate.addr).await;
    c.cmd("MAIL FROM:<a@sender.test>", "250").await;
    c.cmd("RCPT TO:<r1@example.test>", "250").await;
    c.cmd("RCPT TO:<r2@example.test>", "250").await;
    let r = c.cmd("RCPT TO:<r3@example.test>", "452").await;
    assert!(r.starts_with("452 4.5.3"), "{r}");
    assert_eq!(mta.count("RCPT"), 2);
}

#[tokio::test]
async fn connection_limits_refuse_before_greeting() {
    let mta = FakeMta::start(Script::default()).await;
    let mut cfg = test_config(mta.addr);
    (
        cfg.limits.max_connections,
        cfg.limits.max_connections_per_ip,
    ) = (3, 2);
    let gate = Gate::start_config(cfg).await;
    let mut a = Client::connect_from(gate.addr, "127.0.0.2").await;
    assert!(a.reply().await.starts_with("220"));
    let mut b = Client::connect_from(gate.addr, "127.0.0.2").await;
    assert!(b.reply().await.starts_with("220"));
    let mut c = Client::connect_from(gate.addr, "127.0.0.2").await;
    let r = c.reply().await;
    assert!(r.starts_with("421 4.7.0"), "{r}");
    assert!(c.closed().await);
    let mut d = Client::connect_from(gate.addr, "127.0.0.3").await;
    assert!(d.reply().await.starts_with("220"));
    let mut e = Client::connect_from(gate.addr, "127.0.0.4").await;
    assert!(e.reply().await.starts_with("421 4.7.0"));
    drop(a);
    // The slot comes back once the session ends.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut f = Client::connect_from(gate.addr, "127.0.0.2").await;
    assert!(f.reply().await.starts_with("220"));
}

#[tokio::test]
async fn protocol_errors_and_sequence() {
    let mta = FakeMta::start(Script::default()).await;
    let mut c = test_config(mta.addr);
    c.limits.max_errors = 6;
    let gate = Gate::start_config(c).await;
    let mut c = Client::connect(gate.addr).await;
    c.reply().await;
    c.cmd("MAIL FROM:<a@sender.test>", "503 5.5.1").await;
    c.cmd("EHLO client.test", "250").await;
    c.cmd("RCPT TO:<b@example.test>", "503 5.5.1").await;
    c.cmd("FROB", "500 5.5.2").await;
    c.cmd("XCLIENT ADDR=10.0.0.1", "502 5.5.1").await;
    c.cmd("VRFY root", "252").await;
    c.cmd("HELP", "214").await;
    c.cmd("MAIL FROM:<a@sender.test> BODY=BINARYMIME", "555 5.5.4")
        .await;
    // The sixth error closes the session.
    c.cmd("BDAT 10 LAST", "421 4.7.0").await;
    assert!(c.closed().await);
    assert_eq!(mta.count("MAIL"), 0);
}

#[tokio::test]
async fn overlong_command_line_keeps_sync() {
    let mta = FakeMta::start(Script::default()).await;
    let gate = Gate::start(mta.addr).await;
    let mut c = Client::hello(gate.addr).await;
    let long = format!("NOOP {}\r\nNOOP\r\n", "a".repeat(2000));
    c.send(long.as_bytes()).await;
    assert!(c.reply().await.starts_with("500 5.5.2"));
    assert!(c.reply().await.starts_with("250"));
}

#[tokio::test]
async fn idle_client_times_out_with_421() {
    let mta = FakeMta::start(Script::default()).await;
    let mut c = test_config(mta.addr);
    c.timeouts.command = secs(1);
    let gate = Gate::start_config(c).await;
    let mut c = Client::hello(gate.addr).await;
    let r = c
        .try_reply(Duration::from_secs(5))
        .await
        .expect("421 on idle");
    assert!(r.starts_with("421 4.4.2"), "{r}");
    assert!(c.closed().await);
}
