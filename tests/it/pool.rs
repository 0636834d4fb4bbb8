//! Upstream connections reused across client sessions: nothing of one
//! client reaches the next, a connection that went bad while idle costs
//! the client nothing, the pool keeps to its limits, and every message is
//! delivered exactly once when upstream fails on a reused connection.

use crate::common;

use common::config::{secs, test_config};
use common::{Client, FakeMta, Gate, Script, message, verbs};
use portcullis::config::IdentityMode;

use std::collections::BTreeSet;
use std::time::Duration;

/// The connections on which upstream received `verb` (probes send no
/// XCLIENT and no MAIL, so those count client sessions' connections).
fn conns_with(mta: &FakeMta, verb: &str) -> BTreeSet<usize> {
    mta.rec
        .lock()
        .unwrap()
        .commands
        .iter()
        .filter(|(_, c)| c.starts_with(verb))
        .map(|(n, _)| *n)
        .collect()
}

/// Waits (up to 5 s) until upstream has received `n` QUITs on session
/// connections (those that carried `verb`).
async fn quits_on(mta: &FakeMta, verb: &str, n: usize) -> usize {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let got = conns_with(mta, verb)
            .into_iter()
            .filter(|&c| mta.commands_on(c).last().is_some_and(|l| l == "QUIT"))
            .count();
        if got >= n || tokio::time::Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One client session from `ip` saying `helo`: one message, QUIT, and
/// the close seen.
async fn session(gate: std::net::SocketAddr, ip: &str, helo: &str, from: &str) -> String {
    let mut c = Client::connect_from(gate, ip).await;
    let g = c.reply().await;
    assert!(g.starts_with("220"), "{g}");
    c.cmd(&format!("EHLO {helo}"), "250").await;
    let r = c
        .send_mail(from, &["rcpt@example.test"], &message(from, "hello\r\n"))
        .await;
    c.cmd("QUIT", "221").await;
    assert!(c.closed().await);
    r
}

/// A client from 127.0.0.2 (HELO first.example, sender a@one.test), then
/// one from 127.0.0.3 (second.example, b@two.test), each delivering.
async fn two_clients(gate: std::net::SocketAddr) {
    for (ip, helo, from) in [
        ("127.0.0.2", "first.example", "a@one.test"),
        ("127.0.0.3", "second.example", "b@two.test"),
    ] {
        let r = session(gate, ip, helo, from).await;
        assert!(r.starts_with("250"), "{ip}: {r}");
    }
}

#[tokio::test]
async fn a_pooled_connection_carries_no_client_identity_or_helo_to_the_next_client() {
    let mta = FakeMta::start(Script::default()).await;
    let gate = Gate::start(mta.addr).await;
    two_clients(gate.addr).await;

    let stored = mta.stored();
    assert_eq!(stored.len(), 2);
    assert_eq!(
        stored[0].conn, stored[1].conn,
        "the second session reused the first one's upstream connection"
    );
    // Each transaction under its own client's address and HELO name.
    let first = stored[0].xclient.as_deref().unwrap();
    assert!(first.contains("ADDR=127.0.0.2") && first.contains("HELO=first.example"));
    let second = stored[1].xclient.as_deref().unwrap();
    assert!(
        second.contains("ADDR=127.0.0.3") && second.contains("HELO=second.example"),
        "{second}"
    );
    assert!(!second.contains("127.0.0.2") && !second.contains("first.example"));
    assert_eq!(stored[0].helo, "first.example");
    assert_eq!(stored[1].helo, "second.example");
    assert_eq!(stored[1].mail, "<b@two.test>");
    // On the wire: the new XCLIENT and EHLO came between the transactions,
    // and the connection was not closed in between.
    assert_eq!(
        verbs(&mta.commands_on(stored[0].conn)),
        [
            "EHLO", "XCLIENT", "EHLO", "MAIL", "RCPT", "DATA", "XCLIENT", "EHLO", "MAIL", "RCPT",
            "DATA"
        ]
    );
}

#[tokio::test]
async fn an_aborted_transaction_is_never_handed_to_the_next_client() {
    let mta = FakeMta::start(Script::default()).await;
    let gate = Gate::start(mta.addr).await;
    // The first client opens a transaction upstream and vanishes.
    let mut c = Client::connect_from(gate.addr, "127.0.0.2").await;
    c.reply().await;
    c.cmd("EHLO first.example", "250").await;
    c.cmd("MAIL FROM:<a@one.test>", "250").await;
    c.cmd("RCPT TO:<first-rcpt@example.test>", "250").await;
    drop(c);
    // Its upstream connection is closed, not kept with MAIL and RCPT open.
    assert_eq!(quits_on(&mta, "XCLIENT", 1).await, 1);

    let r = session(gate.addr, "127.0.0.3", "second.example", "b@two.test").await;
    assert!(r.starts_with("250"), "{r}");
    let stored = mta.stored();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].mail, "<b@two.test>");
    assert_eq!(stored[0].rcpts, ["<rcpt@example.test>"]);
    assert_eq!(conns_with(&mta, "XCLIENT").len(), 2);
    let first = *conns_with(&mta, "XCLIENT").first().unwrap();
    assert_ne!(first, stored[0].conn);
    assert_eq!(
        verbs(&mta.commands_on(first)),
        ["EHLO", "XCLIENT", "EHLO", "MAIL", "RCPT", "QUIT"]
    );
}

#[tokio::test]
async fn a_mail_refused_by_upstream_for_its_size_leaves_nothing_for_the_next_client() {
    let mut script = Script::default().reply(
        "mail",
        "552 5.3.4 Message size exceeds fixed maximum message size",
    );
    script.faults = Some(1);
    let mta = FakeMta::start(script).await;
    let gate = Gate::start(mta.addr).await;
    let mut c = Client::connect_from(gate.addr, "127.0.0.2").await;
    c.reply().await;
    c.cmd("EHLO first.example", "250").await;
    c.cmd("MAIL FROM:<a@one.test> SIZE=20000000", "552 5.3.4")
        .await;
    c.cmd("QUIT", "221").await;
    assert!(c.closed().await);

    let r = session(gate.addr, "127.0.0.3", "second.example", "b@two.test").await;
    assert!(r.starts_with("250"), "{r}");
    let stored = mta.stored();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].mail, "<b@two.test>", "no SIZE carried over");
    let on = mta.commands_on(stored[0].conn);
    assert_eq!(
        verbs(&on),
        [
            "EHLO", "XCLIENT", "EHLO", "MAIL", "XCLIENT", "EHLO", "MAIL", "RCPT", "DATA"
        ],
        "the refused MAIL's connection was reused: {on:?}"
    );
}

#[tokio::test]
async fn a_pooled_connection_upstream_closed_while_idle_costs_the_client_nothing() {
    // Upstream hangs up idle connections after 300 ms (as Postfix does at
    // its smtpd_timeout), well before the pool's own idle limit.
    for identity in [IdentityMode::Xclient, IdentityMode::None] {
        let script = Script {
            idle_close: Some(Duration::from_millis(300)),
            ..Script::default()
        };
        let mta = FakeMta::start(script).await;
        let mut cfg = test_config(mta.addr);
        cfg.upstream.client_identity = identity;
        let gate = Gate::start_config(cfg).await;
        let r = session(gate.addr, "127.0.0.2", "first.example", "a@one.test").await;
        assert!(r.starts_with("250"), "{r}");
        tokio::time::sleep(Duration::from_millis(800)).await;
        // The pooled connection fails its XCLIENT, or the RSET sent in one
        // write with MAIL (421, then closed); the session takes a fresh
        // one and the client sees only success.
        let r = session(gate.addr, "127.0.0.3", "second.example", "b@two.test").await;
        assert!(r.starts_with("250"), "{identity:?}: {r}");
        let stored = mta.stored();
        assert_eq!(stored.len(), 2);
        assert_ne!(stored[0].conn, stored[1].conn);
        assert_eq!(stored[1].mail, "<b@two.test>");
        if identity == IdentityMode::Xclient {
            let x = stored[1].xclient.as_deref().unwrap();
            assert!(x.contains("ADDR=127.0.0.3"), "{x}");
        }
    }
}

#[tokio::test]
async fn a_pooled_connection_failing_at_mail_is_retried_on_a_fresh_one() {
    // Upstream drops the connection at the second MAIL: the first session
    // passes, the second session's MAIL arrives on the reused connection.
    let mut script = Script::default().drop_at("mail");
    script.faults = Some(1);
    script.spare = 1;
    let mta = FakeMta::start(script).await;
    let gate = Gate::start(mta.addr).await;
    two_clients(gate.addr).await;
    let stored = mta.stored();
    assert_eq!(stored.len(), 2);
    assert_ne!(stored[0].conn, stored[1].conn);
}

/// Upstream hung up on every pooled connection (smtp-sink -A does after
/// each message; Postfix at its idle timeout): after the first one fails
/// its RSET at MAIL the session goes to a fresh connection, not to the
/// next dead one in the pool (seen in CI: 451 to the client).
#[tokio::test]
async fn a_session_whose_pooled_connection_failed_does_not_take_another_pooled_one() {
    let script = Script {
        idle_close: Some(Duration::from_millis(300)),
        ..Script::default()
    };
    let mta = FakeMta::start(script).await;
    let mut cfg = test_config(mta.addr);
    cfg.upstream.client_identity = IdentityMode::None;
    let gate = Gate::start_config(cfg).await;
    // Two sessions at once: two upstream connections, both pooled after.
    let mut a = Client::hello(gate.addr).await;
    let mut b = Client::hello(gate.addr).await;
    for (c, from) in [(&mut a, "a@one.test"), (&mut b, "b@two.test")] {
        let r = c
            .send_mail(from, &["rcpt@example.test"], &message(from, "hi\r\n"))
            .await;
        assert!(r.starts_with("250"), "{r}");
    }
    for c in [&mut a, &mut b] {
        c.cmd("QUIT", "221").await;
        assert!(c.closed().await);
    }
    let stored = mta.stored();
    assert_ne!(stored[0].conn, stored[1].conn);
    // Both go dead in the pool.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let r = session(gate.addr, "127.0.0.4", "third.example", "c@three.test").await;
    assert!(r.starts_with("250"), "{r}");
    let stored = mta.stored();
    assert_eq!(stored.len(), 3);
    assert!(stored[2].conn != stored[0].conn && stored[2].conn != stored[1].conn);
}

#[tokio::test]
async fn upstream_failing_on_a_reused_connection_still_delivers_exactly_once() {
    for stage in ["rcpt", "data", "body", "dot"] {
        let mut script = Script::default().drop_at(stage);
        script.faults = Some(1);
        script.spare = 1;
        let mta = FakeMta::start(script).await;
        let gate = Gate::start(mta.addr).await;
        let r = session(gate.addr, "127.0.0.2", "first.example", "a@one.test").await;
        assert!(r.starts_with("250"), "{stage}: {r}");

        let mut c = Client::connect_from(gate.addr, "127.0.0.3").await;
        c.reply().await;
        c.cmd("EHLO second.example", "250").await;
        let m = message("once", "hello\r\n");
        c.cmd("MAIL FROM:<b@two.test>", "250").await;
        let r = c.cmd("RCPT TO:<rcpt@example.test>", "").await;
        let r = if r.starts_with("250") {
            c.cmd("DATA", "354").await;
            let mut wire = Vec::new();
            portcullis::wire::data::write_stuffed(&m, |s| wire.extend_from_slice(s));
            c.send(&wire).await;
            c.reply().await
        } else {
            r
        };
        assert!(
            r.starts_with("4"),
            "{stage}: never 250 for what upstream lost: {r}"
        );
        // A 4xx at RCPT leaves the client's transaction open; RSET ends it.
        c.cmd("RSET", "250").await;
        // The sender retries in the same session; a fresh connection takes it.
        let r = c.send_mail("b@two.test", &["rcpt@example.test"], &m).await;
        assert!(r.starts_with("250"), "{stage}: {r}");
        let stored = mta.stored();
        assert_eq!(stored.len(), 2, "{stage}");
        let ours = stored.iter().filter(|s| s.mail == "<b@two.test>").count();
        assert_eq!(ours, 1, "{stage}: exactly once");
    }
}

#[tokio::test]
async fn the_pool_keeps_to_its_idle_limit_idle_timeout_age_and_transaction_count() {
    // max_idle: three sessions end together; one connection is kept.
    let mta = FakeMta::start(Script::default()).await;
    let mut cfg = test_config(mta.addr);
    cfg.upstream.pool.max_idle = 1;
    cfg.upstream.pool.idle_timeout = secs(1);
    let gate = Gate::start_config(cfg).await;
    let mut clients = Vec::new();
    for ip in ["127.0.0.2", "127.0.0.3", "127.0.0.4"] {
        let mut c = Client::connect_from(gate.addr, ip).await;
        c.reply().await;
        c.cmd("EHLO client.example", "250").await;
        c.cmd("MAIL FROM:<a@one.test>", "250").await;
        c.cmd("RSET", "250").await;
        clients.push(c);
    }
    for mut c in clients {
        c.cmd("QUIT", "221").await;
        assert!(c.closed().await);
    }
    assert_eq!(conns_with(&mta, "XCLIENT").len(), 3);
    assert_eq!(
        quits_on(&mta, "XCLIENT", 2).await,
        2,
        "two closed, one kept"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(quits_on(&mta, "XCLIENT", 2).await, 2);
    // idle_timeout (1 s): the kept one is closed by the pool, with QUIT.
    assert_eq!(quits_on(&mta, "XCLIENT", 3).await, 3);

    // max_transactions: 2 messages per connection, so 3 sessions need 2.
    let mta = FakeMta::start(Script::default()).await;
    let mut cfg = test_config(mta.addr);
    cfg.upstream.pool.max_transactions = 2;
    let gate = Gate::start_config(cfg).await;
    for ip in ["127.0.0.2", "127.0.0.3", "127.0.0.4"] {
        let r = session(gate.addr, ip, "client.example", "a@one.test").await;
        assert!(r.starts_with("250"), "{r}");
    }
    let stored = mta.stored();
    assert_eq!(stored.len(), 3);
    assert_eq!(stored[0].conn, stored[1].conn);
    assert_ne!(stored[1].conn, stored[2].conn);
    assert_eq!(
        quits_on(&mta, "XCLIENT", 1).await,
        1,
        "the worn one got QUIT"
    );

    // max_age: a connection older than 1 s is not reused.
    let mta = FakeMta::start(Script::default()).await;
    let mut cfg = test_config(mta.addr);
    cfg.upstream.pool.max_age = secs(1);
    cfg.upstream.pool.idle_timeout = secs(60);
    let gate = Gate::start_config(cfg).await;
    session(gate.addr, "127.0.0.2", "client.example", "a@one.test").await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    session(gate.addr, "127.0.0.3", "client.example", "b@two.test").await;
    let stored = mta.stored();
    assert_eq!(stored.len(), 2);
    assert_ne!(stored[0].conn, stored[1].conn);

    // max_idle 0: no reuse at all.
    let mta = FakeMta::start(Script::default()).await;
    let mut cfg = test_config(mta.addr);
    cfg.upstream.pool.max_idle = 0;
    let gate = Gate::start_config(cfg).await;
    session(gate.addr, "127.0.0.2", "client.example", "a@one.test").await;
    session(gate.addr, "127.0.0.3", "client.example", "b@two.test").await;
    let stored = mta.stored();
    assert_ne!(stored[0].conn, stored[1].conn);
}

#[tokio::test]
async fn without_client_identity_a_reused_connection_is_reset_first() {
    let mta = FakeMta::start(Script::default().without_xclient()).await;
    let mut cfg = test_config(mta.addr);
    cfg.upstream.client_identity = IdentityMode::None;
    let gate = Gate::start_config(cfg).await;
    two_clients(gate.addr).await;
    let stored = mta.stored();
    assert_eq!(stored.len(), 2);
    assert_eq!(stored[0].conn, stored[1].conn);
    assert_eq!(
        verbs(&mta.commands_on(stored[0].conn)),
        [
            "EHLO", "MAIL", "RCPT", "DATA", "RSET", "MAIL", "RCPT", "DATA"
        ]
    );
}

#[tokio::test]
async fn with_a_proxy_header_no_connection_is_reused() {
    let script = Script {
        expect_proxy: true,
        ..Script::default().without_xclient()
    };
    let mta = FakeMta::start(script).await;
    let mut cfg = test_config(mta.addr);
    cfg.upstream.client_identity = IdentityMode::ProxyV2;
    let gate = Gate::start_config(cfg).await;
    two_clients(gate.addr).await;
    let stored = mta.stored();
    assert_eq!(stored.len(), 2);
    assert_ne!(stored[0].conn, stored[1].conn);
    // Each under its own header, naming its own client.
    let header = |s: &common::Stored| s.proxy.clone().unwrap();
    assert_ne!(header(&stored[0]), header(&stored[1]));
}

#[tokio::test]
async fn shutdown_says_quit_on_every_pooled_connection() {
    let mta = FakeMta::start(Script::default()).await;
    let mut gate = Gate::start(mta.addr).await;
    session(gate.addr, "127.0.0.2", "first.example", "a@one.test").await;
    assert_eq!(quits_on(&mta, "XCLIENT", 0).await, 0);
    gate.stop();
    tokio::time::timeout(Duration::from_secs(10), &mut gate.done)
        .await
        .expect("stops")
        .unwrap();
    assert_eq!(quits_on(&mta, "XCLIENT", 1).await, 1);
}

/// Postfix counts error replies per connection, whoever the client, and
/// past its soft limit (10) sleeps before every reply: a connection that
/// gave 5 is not handed to the next client; one that gave fewer is.
#[tokio::test]
async fn a_connection_with_many_error_replies_is_not_handed_on() {
    let mta = FakeMta::start(Script::default()).await;
    let gate = Gate::start(mta.addr).await;
    for unknown in [4, 5] {
        let mut c = Client::connect_from(gate.addr, "127.0.0.2").await;
        c.reply().await;
        c.cmd("EHLO first.example", "250").await;
        c.cmd("MAIL FROM:<a@one.test>", "250").await;
        for i in 0..unknown {
            c.cmd(&format!("RCPT TO:<unknown{i}@example.test>"), "550")
                .await;
        }
        c.cmd("RSET", "250").await;
        c.cmd("QUIT", "221").await;
        assert!(c.closed().await);
    }
    let r = session(gate.addr, "127.0.0.3", "second.example", "b@two.test").await;
    assert!(r.starts_with("250"), "{r}");
    // The first connection (4 errors) served the second client; the
    // second client's connection (4 + 5 errors) was closed, and the
    // third client got a fresh one.
    let conns = conns_with(&mta, "XCLIENT");
    assert_eq!(conns.len(), 2, "{conns:?}");
    let first = *conns.first().unwrap();
    assert_eq!(mta.commands_on(first).last().unwrap(), "QUIT");
    assert_eq!(mta.stored()[0].conn, *conns.last().unwrap());
    assert_eq!(
        mta.commands_on(first)
            .iter()
            .filter(|c| c.starts_with("XCLIENT"))
            .count(),
        2
    );
}
