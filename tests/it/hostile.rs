//! Hostile input is normal input: SMTP smuggling, bare newlines, NULs,
//! overlong lines, early talkers, timeouts, TLS reload and upstream TLS.

use crate::common;
use common::config::{secs, test_config};
use portcullis::config::BareNewline;

use common::{Client, FakeMta, Gate, Script};
use std::time::Duration;

/// End-of-data look-alikes from the public smuggling tools.
const SEQUENCES: &[&[u8]] = &[
    b"\n.\n",
    b"\n.\r",
    b"\r.\n",
    b"\r.\r",
    b"\n.\r\n",
    b"\r.\r\n",
    b"\r\n.\r",
    b"\r\n\x00.\r\n",
    b"\r\n.\r\r\n",
    b"\r\r\n.\r\r\n",
    b"\r\n.\n",
    b"\n..\n",
];

/// A message that smuggles a second transaction after `seq`. Its real end
/// (CRLF.CRLF) is the smuggled message's end, as in the published attacks.
fn smuggling_body(seq: &[u8]) -> Vec<u8> {
    let mut m = b"From: a@sender.test\r\nSubject: first\r\n\r\nhello".to_vec();
    m.extend_from_slice(seq);
    m.extend_from_slice(
        b"MAIL FROM:<ceo@bank.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\nFrom: ceo@bank.test\r\nSubject: smuggled\r\n\r\npay now\r\n.\r\n",
    );
    m
}

async fn send_raw_message(c: &mut Client, raw: &[u8]) -> String {
    c.cmd("MAIL FROM:<a@sender.test>", "250").await;
    c.cmd("RCPT TO:<b@example.test>", "250").await;
    c.cmd("DATA", "354").await;
    c.send(raw).await;
    c.reply().await
}

fn fooled_upstream() -> Script {
    Script {
        lenient: true,
        ..Script::default()
    }
}

#[tokio::test]
async fn fooled_upstream_really_is_fooled_without_us() {
    // The test upstream must be vulnerable, or the tests below prove nothing.
    let mta = FakeMta::start(fooled_upstream()).await;
    let mut c = Client::connect(mta.addr).await;
    c.reply().await;
    c.cmd("EHLO direct.test", "250").await;
    let r = send_raw_message(&mut c, &smuggling_body(b"\n.\r\n")).await;
    assert!(r.starts_with("250"), "{r}");
    // The smuggled transaction's replies follow.
    for _ in 0..4 {
        c.reply().await;
    }
    assert_eq!(
        mta.stored().len(),
        2,
        "the lenient upstream should take 2 messages"
    );
}

#[tokio::test]
async fn smuggling_sequences_in_reject_mode_are_refused_and_never_leak() {
    let mta = FakeMta::start(fooled_upstream()).await;
    let mut c = test_config(mta.addr);
    c.smtp.bare_newline = BareNewline::Reject;
    let gate = Gate::start_config(c).await;
    for seq in SEQUENCES {
        let mut c = Client::hello(gate.addr).await;
        let r = send_raw_message(&mut c, &smuggling_body(seq)).await;
        let want = if seq.contains(&0) {
            "554 5.6.0"
        } else {
            "550 5.5.2"
        };
        assert!(r.starts_with(want), "{seq:?}: {r}");
        // Nothing after the real end was taken as a command; the session is in sync.
        c.cmd("NOOP", "250").await;
        c.cmd("QUIT", "221").await;
    }
    assert!(
        mta.stored().is_empty(),
        "nothing may be delivered in reject mode"
    );
    assert_eq!(mta.count("MAIL FROM:<CEO"), 0);
    assert_eq!(mta.count("DATA"), 0);
}

#[tokio::test]
async fn smuggling_sequences_in_normalize_mode_deliver_exactly_one_message() {
    let mta = FakeMta::start(fooled_upstream()).await;
    let mut c = test_config(mta.addr);
    c.smtp.bare_newline = BareNewline::Normalize;
    let gate = Gate::start_config(c).await;
    let mut delivered = 0;
    for seq in SEQUENCES {
        let mut c = Client::hello(gate.addr).await;
        let r = send_raw_message(&mut c, &smuggling_body(seq)).await;
        if seq.contains(&0) {
            assert!(r.starts_with("554 5.6.0"), "{seq:?}: {r}");
        } else {
            assert!(r.starts_with("250"), "{seq:?}: {r}");
            delivered += 1;
        }
        c.cmd("NOOP", "250").await;
        c.cmd("QUIT", "221").await;
        // Exactly one message per accepted one: the smuggled one stays content.
        assert_eq!(mta.stored().len(), delivered, "{seq:?} leaked");
    }
    assert_eq!(mta.count("MAIL FROM:<CEO"), 0);
    for s in mta.stored() {
        let text = String::from_utf8_lossy(&s.data);
        assert!(
            text.contains("Subject: first") && text.contains("pay now"),
            "{text}"
        );
        assert!(text.ends_with("pay now\r\n"), "{text:?}");
    }
}

#[tokio::test]
async fn bare_newlines_in_commands() {
    let mta = FakeMta::start(Script::default()).await;
    let gate = Gate::start(mta.addr).await;
    let mut c = Client::hello(gate.addr).await;
    c.send(b"NOOP\n").await;
    assert!(c.reply().await.starts_with("500 5.5.2"));
    c.send(b"MAIL FROM:<a@sender.test>\rRCPT TO:<x@y>\r\n")
        .await;
    assert!(c.reply().await.starts_with("500 5.5.2"));
    c.send(b"NO\x00OP\r\n").await;
    assert!(c.reply().await.starts_with("500 5.5.2"));
    c.cmd("NOOP", "250").await;
    assert_eq!(mta.count("MAIL"), 0);

    let mut c = test_config(mta.addr);
    c.smtp.bare_newline = BareNewline::Normalize;
    let gate = Gate::start_config(c).await;
    let mut c = Client::hello(gate.addr).await;
    c.send(b"NOOP\n").await;
    assert!(c.reply().await.starts_with("250"));
    // A CR inside a command is refused in either mode.
    c.send(b"NOOP\rNOOP\r\n").await;
    assert!(c.reply().await.starts_with("500 5.5.2"));
}

#[tokio::test]
async fn overlong_text_line_is_refused_and_limit_is_configurable() {
    let mta = FakeMta::start(Script::default()).await;
    let gate = Gate::start(mta.addr).await;
    let mut c = Client::hello(gate.addr).await;
    let body = format!("Subject: long\r\n\r\n{}\r\n", "a".repeat(999));
    let r = c
        .send_mail("a@sender.test", &["b@example.test"], body.as_bytes())
        .await;
    assert!(r.starts_with("554 5.6.0"), "{r}");
    assert!(mta.stored().is_empty());

    let mut c = test_config(mta.addr);
    c.smtp.max_line_length = 2000;
    let gate = Gate::start_config(c).await;
    let mut c = Client::hello(gate.addr).await;
    let r = c
        .send_mail("a@sender.test", &["b@example.test"], body.as_bytes())
        .await;
    assert!(r.starts_with("250"), "{r}");
}

#[tokio::test]
async fn early_talker_is_refused_and_a_patient_client_continues() {
    let mta = FakeMta::start(Script::default()).await;
    let mut c = test_config(mta.addr);
    c.greeting.delay = Some(secs(1));
    let gate = Gate::start_config(c).await;
    let mut bot = Client::connect(gate.addr).await;
    bot.line("EHLO bot.test").await;
    let r = bot.reply().await;
    assert!(r.starts_with("554 5.5.1"), "{r}");
    assert!(bot.closed().await);

    let mut good = Client::connect(gate.addr).await;
    let start = std::time::Instant::now();
    let g = good.reply().await;
    assert!(g.starts_with("220 "), "{g}");
    assert!(start.elapsed() >= Duration::from_millis(900));
    // Same session, no reconnect.
    good.cmd("EHLO good.test", "250").await;
    let r = good
        .send_mail(
            "a@sender.test",
            &["b@example.test"],
            b"Subject: p\r\n\r\nx\r\n",
        )
        .await;
    assert!(r.starts_with("250"), "{r}");
}

#[tokio::test]
async fn data_timeout_and_session_lifetime_give_421() {
    let mta = FakeMta::start(Script::default()).await;
    let mut c = test_config(mta.addr);
    c.timeouts.data = secs(1);
    let gate = Gate::start_config(c).await;
    let mut c = Client::hello(gate.addr).await;
    c.cmd("MAIL FROM:<a@sender.test>", "250").await;
    c.cmd("RCPT TO:<b@example.test>", "250").await;
    c.cmd("DATA", "354").await;
    c.send(b"Subject: stalled\r\n\r\npart").await;
    let r = c.try_reply(Duration::from_secs(5)).await.expect("421");
    assert!(r.starts_with("421 4.4.2"), "{r}");
    assert!(c.closed().await);
    assert!(mta.stored().is_empty());
    assert_eq!(mta.count("DATA"), 0);

    // A client that keeps talking still meets the total session limit.
    let mut c = test_config(mta.addr);
    c.timeouts.session = secs(2);
    let gate = Gate::start_config(c).await;
    let mut c = Client::hello(gate.addr).await;
    let start = std::time::Instant::now();
    loop {
        c.line("NOOP").await;
        let r = c.try_reply(Duration::from_secs(5)).await.expect("reply");
        if r.starts_with("421") {
            assert!(r.starts_with("421 4.4.2"), "{r}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "session limit not applied"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(start.elapsed() >= Duration::from_millis(1500));
}

#[tokio::test]
async fn trickling_client_does_not_stall_others() {
    let mta = FakeMta::start(Script::default()).await;
    let mut cfg = test_config(mta.addr);
    (
        cfg.limits.max_connections_per_ip,
        cfg.limits.max_connections_per_network,
    ) = (500, 500);
    let gate = Gate::start_config(cfg).await;
    // The same 20 messages, first with no load, then beside the tricklers.
    let send20 = |addr| async move {
        let start = std::time::Instant::now();
        let mut c = Client::hello(addr).await;
        for i in 0..20 {
            let body = format!("Subject: {i}\r\n\r\nx\r\n");
            let r = c
                .send_mail("fast@sender.test", &["b@example.test"], body.as_bytes())
                .await;
            assert!(r.starts_with("250"), "{r}");
        }
        start.elapsed()
    };
    let unloaded = send20(gate.addr).await;
    // 200 clients that open a transaction and then send one byte every 100 ms.
    let mut slow = Vec::new();
    for _ in 0..200 {
        let mut c = Client::hello(gate.addr).await;
        c.cmd("MAIL FROM:<slow@sender.test>", "250").await;
        c.cmd("RCPT TO:<b@example.test>", "250").await;
        c.cmd("DATA", "354").await;
        slow.push(c);
    }
    let trickle = tokio::spawn(async move {
        for _ in 0..20 {
            for c in slow.iter_mut() {
                c.send(b"x").await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        slow
    });
    let loaded = send20(gate.addr).await;
    // Relative, so a busy CI machine does not fail it: a stall would cost
    // seconds (timeouts), not a few milliseconds per message.
    assert!(
        loaded < unloaded * 4 + Duration::from_millis(500),
        "normal client slowed: {loaded:?} against {unloaded:?} unloaded"
    );
    let _ = trickle.await;
}
