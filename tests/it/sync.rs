//! The client's transaction and upstream's never drift apart: every way a
//! transaction ends on the client side ends it upstream too, before the next
//! command is relayed. The scripted MTA is as strict as Postfix (nested MAIL
//! is 503), so drift shows as a refused MAIL.

use crate::common;
use common::config::{kib, test_config};

use common::{Client, FakeMta, Gate, Script, message};

/// One full transaction that must be delivered.
async fn deliver(c: &mut Client, id: &str) {
    let r = c
        .send_mail(
            "a@sender.test",
            &["b@example.test"],
            &message(id, "body\r\n"),
        )
        .await;
    assert!(r.starts_with("250"), "{id}: {r}");
}

#[tokio::test]
async fn ehlo_or_helo_mid_transaction_aborts_it_upstream_too() {
    for verb in ["EHLO", "HELO"] {
        for with_rcpt in [false, true] {
            let mta = FakeMta::start(Script::default()).await;
            let gate = Gate::start(mta.addr).await;
            let mut c = Client::hello(gate.addr).await;
            c.cmd("MAIL FROM:<a@sender.test>", "250").await;
            if with_rcpt {
                c.cmd("RCPT TO:<b@example.test>", "250").await;
            }
            // Same name as before: the upstream connection is kept, so only
            // a reset there keeps the next MAIL from being "nested".
            c.cmd(&format!("{verb} client.test"), "250").await;
            c.cmd("RCPT TO:<b@example.test>", "503").await;
            c.cmd("DATA", "503").await;
            deliver(&mut c, &format!("{verb}{with_rcpt}")).await;
            c.cmd("QUIT", "221").await;
            let stored = mta.stored();
            assert_eq!(stored.len(), 1, "{verb} rcpt={with_rcpt}");
            assert_eq!(stored[0].rcpts, vec!["<b@example.test>"]);
            let cmds = mta.commands();
            assert!(
                !cmds.iter().any(|l| l.starts_with("503")),
                "{verb}: {cmds:?}"
            );
            assert_eq!(mta.count("RSET"), 1, "{verb} rcpt={with_rcpt}: {cmds:?}");
        }
    }
}

#[tokio::test]
async fn ehlo_with_a_new_name_mid_transaction_reconnects() {
    let mta = FakeMta::start(Script::default()).await;
    let gate = Gate::start(mta.addr).await;
    let mut c = Client::hello(gate.addr).await;
    c.cmd("MAIL FROM:<a@sender.test>", "250").await;
    c.cmd("RCPT TO:<b@example.test>", "250").await;
    c.cmd("EHLO other.test", "250").await;
    deliver(&mut c, "renamed").await;
    let stored = mta.stored();
    assert_eq!(stored.len(), 1);
    assert!(
        stored[0].helo.contains("other.test"),
        "{:?}",
        stored[0].helo
    );
    assert_eq!(mta.count("XCLIENT"), 2, "{:?}", mta.commands());
}

#[tokio::test]
async fn rset_is_forwarded_whenever_upstream_is_connected() {
    let mta = FakeMta::start(Script::default()).await;
    let gate = Gate::start(mta.addr).await;
    let mut c = Client::hello(gate.addr).await;
    // No upstream connection yet: RSET is ours alone and opens nothing.
    c.cmd("RSET", "250").await;
    assert_eq!(mta.count("RSET"), 0);
    assert_eq!(mta.count("XCLIENT"), 0);
    deliver(&mut c, "first").await;
    // Between transactions, with the connection open: forwarded.
    c.cmd("RSET", "250").await;
    c.cmd("NOOP", "250").await;
    assert_eq!(mta.count("RSET"), 1, "{:?}", mta.commands());
    // Mid-transaction: forwarded, and the next MAIL is not nested.
    c.cmd("MAIL FROM:<a@sender.test>", "250").await;
    c.cmd("RSET", "250").await;
    assert_eq!(mta.count("RSET"), 2);
    deliver(&mut c, "second").await;
    assert_eq!(mta.stored().len(), 2);
}

#[tokio::test]
async fn data_without_valid_recipients_keeps_both_sides_in_the_transaction() {
    let mta = FakeMta::start(Script::default()).await;
    let gate = Gate::start(mta.addr).await;
    let mut c = Client::hello(gate.addr).await;
    c.cmd("MAIL FROM:<a@sender.test>", "250").await;
    c.cmd("RCPT TO:<unknown@example.test>", "550").await;
    c.cmd("DATA", "554 5.5.1").await;
    // Still in the transaction, as with Postfix: a nested MAIL is refused...
    c.cmd("MAIL FROM:<a@sender.test>", "503").await;
    // ... and a recipient can still be added and the message sent.
    c.cmd("RCPT TO:<b@example.test>", "250").await;
    c.cmd("DATA", "354").await;
    c.send(&message("late-rcpt", "x\r\n")).await;
    c.cmd(".", "250").await;
    // DATA refused, then RSET: the next transaction starts clean.
    c.cmd("MAIL FROM:<a@sender.test>", "250").await;
    c.cmd("DATA", "554").await;
    c.cmd("RSET", "250").await;
    deliver(&mut c, "after-rset").await;
    assert_eq!(mta.stored().len(), 2);
    assert!(!mta.commands().iter().any(|l| l.starts_with("503")));
}

#[tokio::test]
async fn upstream_refusing_data_resets_it_before_the_next_mail() {
    let mut script = Script::default().reply("data", "554 5.7.1 DATA refused by policy");
    script.faults = Some(1);
    let mta = FakeMta::start(script).await;
    let gate = Gate::start(mta.addr).await;
    let mut c = Client::hello(gate.addr).await;
    let r = c
        .send_mail("a@sender.test", &["b@example.test"], &message("r", "x\r\n"))
        .await;
    assert!(r.starts_with("554 5.7.1 DATA refused"), "{r}");
    deliver(&mut c, "after-refused-data").await;
    assert_eq!(mta.stored().len(), 1);
    let cmds = mta.commands();
    let data = cmds.iter().position(|l| l == "DATA").unwrap();
    let second_mail = cmds.iter().rposition(|l| l.starts_with("MAIL")).unwrap();
    assert!(
        cmds[data..second_mail].iter().any(|l| l == "RSET"),
        "{cmds:?}"
    );
}

#[tokio::test]
async fn local_refusal_after_the_dot_resets_upstream() {
    let mta = FakeMta::start(Script::default()).await;
    let mut c = test_config(mta.addr);
    c.limits.max_message_size = kib(1);
    let gate = Gate::start_config(c).await;
    let mut c = Client::hello(gate.addr).await;
    let big = message("big", &"y".repeat(4000));
    let r = c
        .send_mail("a@sender.test", &["b@example.test"], &big)
        .await;
    assert!(r.starts_with("552 5.3.4"), "{r}");
    deliver(&mut c, "small").await;
    assert_eq!(mta.stored().len(), 1);
    assert_eq!(mta.count("RSET"), 1, "{:?}", mta.commands());
    assert_eq!(
        mta.count("DATA"),
        1,
        "the refused message never reached DATA"
    );
}

/// A port with nothing listening on it (yet).
async fn closed_port() -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

#[tokio::test]
async fn gate_started_before_its_mta_offers_what_the_mta_can_do_at_once() {
    let addr = closed_port().await;
    let gate = Gate::start(addr).await;
    // Upstream down: the offer needs nothing from it (no 8BITMIME).
    let mut c = Client::connect(gate.addr).await;
    c.reply().await;
    let ehlo = c.cmd("EHLO early.test", "250").await;
    assert!(!ehlo.contains("8BITMIME"), "{ehlo}");
    let mta = FakeMta::start_at(addr, Script::default()).await;
    // The first client after the MTA is up sees the full offer, without
    // waiting for the periodic probe (60 s by default).
    let mut c = Client::connect(gate.addr).await;
    c.reply().await;
    let ehlo = c.cmd("EHLO first.test", "250").await;
    assert!(ehlo.contains("8BITMIME"), "{ehlo}");
    assert!(ehlo.contains("DSN"), "{ehlo}");
    deliver(&mut c, "after-start").await;
    assert_eq!(mta.stored().len(), 1);
}

#[tokio::test]
async fn failed_probes_are_retried_with_backoff() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    // Accepts and hangs up at once: every probe fails at the greeting.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepts = Arc::new(AtomicUsize::new(0));
    let n = Arc::clone(&accepts);
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            n.fetch_add(1, Ordering::SeqCst);
            drop(s);
        }
    });
    let start = std::time::Instant::now();
    let _gate = Gate::start(addr).await; // probe_interval: 60 s
    tokio::time::sleep(std::time::Duration::from_millis(3600).saturating_sub(start.elapsed()))
        .await;
    // The gate's own probe, then the refresher at 0 s, 1 s and 3 s (next at
    // 7 s): quick retries while down, yet no hammering.
    let seen = accepts.load(Ordering::SeqCst);
    assert!((4..=5).contains(&seen), "{seen} probes in 3.6 s");
}
