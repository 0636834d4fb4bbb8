//! Upstream trouble at every stage: refusals relayed with their codes,
//! outages and stalls as 4xx, never a 250 for what upstream did not take,
//! and exactly one delivery after a retry.

use crate::common;

use common::{Client, FakeMta, Gate, Script, message};

use std::time::Duration;

#[tokio::test]
async fn upstream_refusals_are_relayed_with_their_codes() {
    for (stage, line, at) in [
        ("mail", "451 4.3.0 mail: try later", "mail"),
        ("mail", "553 5.7.1 mail: sender refused", "mail"),
        ("rcpt", "452 4.2.2 rcpt: over quota", "rcpt"),
        ("rcpt", "550 5.1.1 rcpt: no such user", "rcpt"),
        ("data", "451 4.3.0 data: not now", "data"),
        ("data", "554 5.5.1 data: no valid recipients", "data"),
        ("dot", "451 4.3.0 dot: queue file write error", "dot"),
        ("dot", "554 5.7.1 dot: content refused", "dot"),
    ] {
        let mta = FakeMta::start(Script::default().reply(stage, line)).await;
        let gate = Gate::start(mta.addr).await;
        let mut c = Client::hello(gate.addr).await;
        let r = match at {
            "mail" => c.cmd("MAIL FROM:<a@sender.test>", "").await,
            "rcpt" => {
                c.cmd("MAIL FROM:<a@sender.test>", "250").await;
                c.cmd("RCPT TO:<b@example.test>", "").await
            }
            "data" => {
                c.cmd("MAIL FROM:<a@sender.test>", "250").await;
                c.cmd("RCPT TO:<b@example.test>", "250").await;
                // Our 354 comes first; upstream's refusal of DATA is the final reply.
                c.cmd("DATA", "354").await;
                c.send(b"Subject: x\r\n\r\nbody\r\n.\r\n").await;
                c.reply().await
            }
            _ => {
                c.send_mail(
                    "a@sender.test",
                    &["b@example.test"],
                    b"Subject: x\r\n\r\nb\r\n",
                )
                .await
            }
        };
        assert_eq!(r, format!("{line}\r\n"), "stage {stage}");
        assert!(mta.stored().is_empty());
        // The session goes on: a later NOOP works.
        c.cmd("NOOP", "250").await;
    }
}

#[tokio::test]
async fn multi_line_upstream_reply_is_relayed_as_is() {
    let mta = FakeMta::start(Script::default().reply(
        "rcpt",
        "550-5.1.1 first line\r\n550-5.1.1 second line\r\n550 5.1.1 last",
    ))
    .await;
    let gate = Gate::start(mta.addr).await;
    let mut c = Client::hello(gate.addr).await;
    c.cmd("MAIL FROM:<a@sender.test>", "250").await;
    let r = c.cmd("RCPT TO:<b@example.test>", "550").await;
    assert_eq!(
        r,
        "550-5.1.1 first line\r\n550-5.1.1 second line\r\n550 5.1.1 last\r\n"
    );
}

#[tokio::test]
async fn upstream_down_gives_4xx() {
    // A port with nothing listening.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = l.local_addr().unwrap();
    drop(l);
    let gate = Gate::start(dead).await;
    let mut c = Client::hello(gate.addr).await;
    let r = c.cmd("MAIL FROM:<a@sender.test>", "451").await;
    assert!(r.starts_with("451 4.4.1"), "{r}");
    // The session stays usable.
    c.cmd("NOOP", "250").await;
}

#[tokio::test]
async fn upstream_faults_at_each_stage_never_give_250() {
    for stage in ["greeting", "mail", "rcpt", "data", "body", "dot"] {
        let mta = FakeMta::start(Script::default().drop_at(stage)).await;
        let gate = Gate::start(mta.addr).await;
        let mut c = Client::hello(gate.addr).await;
        c.line("MAIL FROM:<a@sender.test>").await;
        let r = c.reply().await;
        if stage == "greeting" || stage == "mail" {
            assert!(r.starts_with("451 4.4."), "{stage}: {r}");
            continue;
        }
        assert!(r.starts_with("250"), "{stage}: {r}");
        c.line("RCPT TO:<b@example.test>").await;
        let r = c.reply().await;
        if stage == "rcpt" {
            assert!(r.starts_with("451 4.4.2"), "{stage}: {r}");
            // DATA after a broken transaction is refused with 4xx too.
            c.cmd("DATA", "451 4.4.2").await;
            continue;
        }
        assert!(r.starts_with("250"), "{stage}: {r}");
        c.cmd("DATA", "354").await;
        c.send(b"Subject: x\r\n\r\nbody\r\n.\r\n").await;
        let r = c.reply().await;
        assert!(r.starts_with("451 4.4.2"), "{stage}: {r}");
        assert!(mta.stored().is_empty(), "{stage}");
    }
}

#[tokio::test]
async fn upstream_dropping_mid_data_then_retry_delivers_exactly_once() {
    let mut script = Script::default().drop_at("dot");
    script.faults = Some(1);
    let mta = FakeMta::start(script).await;
    let gate = Gate::start(mta.addr).await;
    let mut c = Client::hello(gate.addr).await;
    let m = message("once", "hello\r\n");
    let r = c.send_mail("a@sender.test", &["b@example.test"], &m).await;
    assert!(r.starts_with("451"), "{r}");
    // The sender retries (same session): a fresh upstream connection takes it.
    let r = c.send_mail("a@sender.test", &["b@example.test"], &m).await;
    assert!(r.starts_with("250"), "{r}");
    assert_eq!(mta.stored().len(), 1);
}

#[tokio::test]
async fn upstream_stalling_past_timeout_gives_4xx() {
    let script = Script {
        delay: Some(("dot", Duration::from_secs(8))),
        ..Script::default()
    };
    let mta = FakeMta::start(script).await;
    let gate = Gate::start(mta.addr).await;
    let mut c = Client::hello(gate.addr).await;
    let r = c
        .send_mail(
            "a@sender.test",
            &["b@example.test"],
            b"Subject: s\r\n\r\nx\r\n",
        )
        .await;
    assert!(r.starts_with("451 4.4.2"), "{r}");
}

#[tokio::test]
async fn client_dropping_mid_data_delivers_nothing() {
    let mta = FakeMta::start(Script::default()).await;
    let gate = Gate::start(mta.addr).await;
    let mut c = Client::hello(gate.addr).await;
    c.cmd("MAIL FROM:<a@sender.test>", "250").await;
    c.cmd("RCPT TO:<b@example.test>", "250").await;
    c.cmd("DATA", "354").await;
    c.send(b"Subject: half\r\n\r\nsome of the body\r\n").await;
    drop(c);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(mta.stored().is_empty());
    // Upstream never even saw DATA: nothing was sent before the client's dot.
    assert_eq!(mta.count("DATA"), 0);
}

#[tokio::test]
async fn upstream_refusing_greeting_or_xclient_gives_4xx() {
    for (stage, line) in [
        ("greeting", "554 5.3.2 fake.test not accepting connections"),
        ("xclient", "550 5.7.0 Error: insufficient authorization"),
        ("ehlo", "502 5.5.2 Error: command not recognized"),
    ] {
        let mta = FakeMta::start(Script::default().reply(stage, line)).await;
        let gate = Gate::start(mta.addr).await;
        let mut c = Client::hello(gate.addr).await;
        let r = c.cmd("MAIL FROM:<a@sender.test>", "451").await;
        assert!(r.starts_with("451 4.4.1"), "{stage}: {r}");
        assert_eq!(mta.count("MAIL"), 0, "{stage}");
        c.cmd("NOOP", "250").await;
    }
}

/// Upstream refusing the client's HELO name is the client's problem: its
/// refusal is relayed at MAIL (not 451, not an upstream outage), and a
/// better name then works.
#[tokio::test]
async fn upstream_refusing_the_client_helo_is_relayed_not_an_outage() {
    let mta = FakeMta::start(Script {
        refuse_helo: Some("bad-name"),
        ..Script::default()
    })
    .await;
    let gate = Gate::start(mta.addr).await;
    let mut c = Client::connect(gate.addr).await;
    c.reply().await;
    c.cmd("EHLO bad-name.test", "250").await;
    let r = c.cmd("MAIL FROM:<a@sender.test>", "501 5.5.2").await;
    assert!(r.contains("Helo command rejected"), "{r}");
    c.cmd("EHLO good-name.test", "250").await;
    let r = c
        .send_mail(
            "a@sender.test",
            &["b@example.test"],
            b"Subject: x\r\n\r\nx\r\n",
        )
        .await;
    assert!(r.starts_with("250"), "{r}");
    // A HELO name that is not UTF-8 is refused by us, as Postfix would.
    c.send(b"EHLO caf\xe9.test\r\n").await;
    assert!(c.reply().await.starts_with("501 5.5.2"));
}
