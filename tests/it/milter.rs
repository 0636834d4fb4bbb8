//! The milter front door, driven by a scripted MTA: negotiation, every
//! callback and reply (connect, HELO, MAIL, RCPT, DATA, header, end of
//! header, body, end of message, abort, unknown, quit and quit with a new
//! connection), verdicts as reply codes, our header fields inserted and
//! forged ones deleted, several messages per connection, and hostile
//! packets.

use crate::common;
use common::config::{test_config, with_dns, zone};
use common::dns::FakeDns;
use common::milter::{Mta, POSTFIX_STEPS, code_text};
use common::{FakeMta, Gate, Script};
use portcullis::config::{Action, Config, MilterListen, Mode, RateCount, RateKey, RejectAt, Zone};
use portcullis::wire::milter::{Command, Family, Response, action, step};

fn milter_config(mta: &FakeMta) -> Config {
    let mut cfg = test_config(mta.addr);
    cfg.milter.listen = vec![MilterListen::Tcp("127.0.0.1:0".parse().unwrap())];
    cfg.limits.max_connections_per_ip = 100;
    cfg
}

fn with_checks(cfg: &mut Config, dns: &FakeDns) {
    with_dns(cfg, dns.addr);
    cfg.checks.spf.mode = Mode::Record;
    cfg.checks.dnsbl.mode = Mode::Enforce;
    cfg.checks.dnsbl.zones = vec![Zone {
        action: Some(Action::Reject),
        ..zone("bl.test")
    }];
}

async fn gate(cfg: Config) -> (Gate, std::net::SocketAddr) {
    let gate = Gate::start_config(cfg).await;
    let milter = gate.milter.expect("a milter listener");
    (gate, milter)
}

fn inserted(rs: &[Response]) -> Vec<(u32, String, String)> {
    rs.iter()
        .filter_map(|r| match r {
            Response::InsertHeader { index, name, value } => Some((
                *index,
                String::from_utf8_lossy(name).into_owned(),
                String::from_utf8_lossy(value).into_owned(),
            )),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn negotiation_then_a_clean_message_gets_our_header_fields() {
    let (dns, mta) = (
        common::dns::bl_test().await,
        FakeMta::start(Script::default()).await,
    );
    let mut cfg = milter_config(&mta);
    with_checks(&mut cfg, &dns);
    let (_gate, addr) = gate(cfg).await;
    let mut m = Mta::connect(addr, POSTFIX_STEPS).await;
    // The actions we use (and the list of macros we read), and every
    // reply we need not give.
    assert_eq!(
        m.actions,
        action::ADD_HEADERS | action::CHANGE_HEADERS | action::QUARANTINE | action::SET_MACROS
    );
    for s in [
        step::NO_REPLY_CONNECT,
        step::NO_REPLY_HELO,
        step::NO_REPLY_HEADER,
        step::NO_REPLY_EOH,
        step::NO_REPLY_BODY,
        step::NO_REPLY_DATA,
        step::NO_REPLY_UNKNOWN,
        step::HEADER_LEADING_SPACE,
    ] {
        assert_ne!(m.steps & s, 0, "step {s:#x}");
    }
    assert_eq!(
        m.steps & (step::NO_CONNECT | step::NO_MAIL | step::NO_RCPT | step::NO_REPLY_RCPT),
        0
    );
    // CONNECT, HELO and MAIL are not waited for: nothing written.
    assert_ne!(m.steps & step::NO_REPLY_MAIL, 0);
    assert_eq!(m.connect_from("192.0.2.10", "client.example").await, None);
    assert_eq!(m.helo("client.example").await, None);
    assert_eq!(m.mail("a@sender.test").await, None);
    assert_eq!(m.rcpt("b@example.test").await, Response::Continue);
    let end = m
        .message("From: a@sender.test\r\nSubject: hello\r\n\r\nbody\r\n")
        .await;
    assert_eq!(end.last(), Some(&Response::Continue), "{end:?}");
    let fields = inserted(&end);
    // Ours, at the top, in order, with the space after the colon (agreed).
    let (i, name, value) = &fields[0];
    assert_eq!((*i, name.as_str()), (0, "Authentication-Results"));
    assert!(
        value.starts_with(" gate.test;") && value.contains("spf=none"),
        "{value}"
    );
    assert!(
        fields.iter().enumerate().all(|(n, f)| f.0 as usize == n),
        "{fields:?}"
    );
    // Nothing of it went to the proxy's upstream.
    assert!(mta.stored().is_empty());
}

#[tokio::test]
async fn forged_results_are_deleted_by_occurrence_from_the_last() {
    let (dns, mta) = (
        common::dns::bl_test().await,
        FakeMta::start(Script::default()).await,
    );
    let mut cfg = milter_config(&mta);
    with_checks(&mut cfg, &dns);
    let (_gate, addr) = gate(cfg).await;
    let mut m = Mta::connect(addr, POSTFIX_STEPS).await;
    m.connect_from("192.0.2.10", "client.example").await;
    m.helo("client.example").await;
    m.mail("a@sender.test").await;
    m.rcpt("b@example.test").await;
    let end = m
        .message(
            "Authentication-Results: gate.test; spf=pass smtp.mailfrom=ceo@bank.test\r\n\
Received: from x\r\n\
Authentication-Results: (trust me)\r\n\tGATE.TEST; dmarc=pass\r\n\
Authentication-Results: upstream.example; spf=fail\r\n\
From: a@sender.test\r\nSubject: forged\r\n\r\nbody\r\n",
        )
        .await;
    let changes: Vec<&Response> = end
        .iter()
        .filter(|r| matches!(r, Response::ChangeHeader { .. }))
        .collect();
    let delete = |index| Response::ChangeHeader {
        index,
        name: b"Authentication-Results".to_vec(),
        value: Vec::new(),
    };
    assert_eq!(changes, [&delete(2), &delete(1)], "{end:?}");
    assert_eq!(end.last(), Some(&Response::Continue));
}

#[tokio::test]
async fn a_listed_client_is_refused_at_each_rcpt_with_our_reply() {
    let (dns, mta) = (
        common::dns::bl_test().await,
        FakeMta::start(Script::default()).await,
    );
    let mut cfg = milter_config(&mta);
    with_checks(&mut cfg, &dns);
    let (_gate, addr) = gate(cfg).await;
    let mut m = Mta::connect(addr, POSTFIX_STEPS).await;
    assert_eq!(m.connect_from("127.0.0.3", "listed.example").await, None);
    m.helo("listed.example").await;
    // Delayed to RCPT, as in proxy mode.
    assert_eq!(m.mail("a@sender.test").await, None);
    for rcpt in ["b@example.test", "c@example.test"] {
        let r = code_text(&m.rcpt(rcpt).await);
        assert!(r.starts_with("550 5.7.1 ") && r.contains("bl.test"), "{r}");
    }
    m.send(Command::Abort).await;
    // The next client on this connection is not refused.
    m.send(Command::QuitNewConnection).await;
    assert_eq!(m.connect_from("127.0.0.9", "clean.example").await, None);
    m.helo("clean.example").await;
    m.mail("a@sender.test").await;
    assert_eq!(m.rcpt("b@example.test").await, Response::Continue);
}

/// A client address may connect once a minute.
fn one_connection_a_minute() -> Vec<portcullis::config::RateLimit> {
    vec![common::config::rate_limit(
        "conn",
        RateKey::ClientAddress,
        RateCount::Connections,
        1,
        60,
    )]
}

#[tokio::test]
async fn refused_at_connect_and_by_a_connection_rate_limit() {
    let (dns, mta) = (
        common::dns::bl_test().await,
        FakeMta::start(Script::default()).await,
    );
    let mut cfg = milter_config(&mta);
    with_checks(&mut cfg, &dns);
    cfg.checks.reject_at = RejectAt::Connect;
    cfg.checks.rate_limits = one_connection_a_minute();
    let (_gate, addr) = gate(cfg).await;
    let mut m = Mta::connect(addr, POSTFIX_STEPS).await;
    // Refusing before the greeting was asked for: CONNECT is waited for.
    assert_eq!(m.steps & step::NO_REPLY_CONNECT, 0);
    let r = code_text(&m.connect_from("127.0.0.3", "listed.example").await.unwrap());
    assert!(r.starts_with("554 5.7.1 "), "{r}");
    // Settled: the rest of this client's commands are not checked again;
    // a RCPT (Postfix sends none after a refused CONNECT) gets it again.
    assert_eq!(m.helo("listed.example").await, None);
    assert_eq!(m.mail("a@sender.test").await, None);
    let r = code_text(&m.rcpt("b@example.test").await);
    assert!(r.starts_with("554 5.7.1 "), "{r}");
    m.send(Command::QuitNewConnection).await;
    assert_eq!(
        m.connect_from("127.0.0.9", "a.example").await,
        Some(Response::Continue)
    );
    m.send(Command::QuitNewConnection).await;
    let r = code_text(&m.connect_from("127.0.0.9", "a.example").await.unwrap());
    assert!(r.starts_with("421 4.7.0 Rate limit conn reached"), "{r}");
}

/// The default, delayed reject: CONNECT and MAIL are not waited for, so a
/// client over its connection rate hears the 421 at RCPT (as Postfix's
/// `smtpd_delay_reject` would give it), at each RCPT of that session.
#[tokio::test]
async fn a_connect_refusal_not_waited_for_is_given_at_rcpt() {
    let mta = FakeMta::start(Script::default()).await;
    let mut cfg = milter_config(&mta);
    cfg.checks.rate_limits = one_connection_a_minute();
    let (_gate, addr) = gate(cfg).await;
    let mut m = Mta::connect(addr, POSTFIX_STEPS).await;
    assert_ne!(m.steps & step::NO_REPLY_CONNECT, 0);
    assert_eq!(m.connect_from("127.0.0.9", "a.example").await, None);
    assert_eq!(m.helo("a.example").await, None);
    assert_eq!(m.mail("a@sender.test").await, None);
    assert_eq!(m.rcpt("b@example.test").await, Response::Continue);
    m.send(Command::Abort).await;
    m.send(Command::QuitNewConnection).await;
    assert_eq!(m.connect_from("127.0.0.9", "a.example").await, None);
    assert_eq!(m.helo("a.example").await, None);
    for _ in 0..2 {
        assert_eq!(m.mail("a@sender.test").await, None);
        for to in ["b@example.test", "c@example.test"] {
            let r = code_text(&m.rcpt(to).await);
            assert!(r.starts_with("421 4.7.0 Rate limit conn reached"), "{r}");
        }
        m.send(Command::Abort).await;
    }
    // The next session is not refused for the last one.
    m.send(Command::QuitNewConnection).await;
    assert_eq!(m.connect_from("127.0.0.10", "b.example").await, None);
    assert_eq!(m.mail("a@sender.test").await, None);
}

fn rules(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "portcullis-milter-rules-{}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("r.yaml"), text).unwrap();
    dir
}

#[tokio::test]
async fn a_data_rule_refuses_at_the_end_and_a_shadow_rule_only_logs() {
    let mta = FakeMta::start(Script::default()).await;
    let mut cfg = milter_config(&mta);
    cfg.rules_dir = Some(rules(
        "data",
        "rules:\n  - id: BODY_WORD\n    description: a word in the body\n    when: {body: {regex: 'forbidden'}}\n    action: reject\n  - id: SHADOWED\n    description: tried out\n    when: {body: {regex: 'tryout'}}\n    action: reject\n    mode: shadow\n",
    ));
    let (_gate, addr) = gate(cfg).await;
    let mut m = Mta::connect(addr, POSTFIX_STEPS).await;
    m.connect_from("192.0.2.10", "client.example").await;
    m.helo("client.example").await;
    m.mail("a@sender.test").await;
    m.rcpt("b@example.test").await;
    let end = m
        .message("Subject: s\r\n\r\nthis is forbidden here\r\n")
        .await;
    let r = code_text(end.last().unwrap());
    assert!(r.starts_with("550 5.7.1 "), "{r}");
    assert!(inserted(&end).is_empty(), "no edits on a refusal: {end:?}");
    // The next message on the same connection, with only the shadow rule.
    m.mail("a@sender.test").await;
    m.rcpt("b@example.test").await;
    let end = m.message("Subject: s\r\n\r\na tryout\r\n").await;
    assert_eq!(end.last(), Some(&Response::Continue), "{end:?}");
}

#[tokio::test]
async fn steps_the_mta_does_not_offer_are_answered_and_unknown_commands_continue() {
    let mta = FakeMta::start(Script::default()).await;
    let (_gate, addr) = gate(milter_config(&mta)).await;
    let mut m = Mta::connect(addr, 0).await;
    assert_eq!(m.steps, 0);
    m.connect_from("192.0.2.10", "client.example").await;
    m.helo("client.example").await;
    assert_eq!(
        m.ask(Command::Unknown(b"XYZZY".to_vec())).await,
        Response::Continue
    );
    m.mail("a@sender.test").await;
    m.rcpt("b@example.test").await;
    // Data, every header and body chunk answered (checked inside `message`).
    let end = m.message("Subject: s\r\n\r\nbody\r\n").await;
    assert_eq!(end.last(), Some(&Response::Continue));
    m.send(Command::Quit).await;
    assert!(m.closed().await);
}

#[tokio::test]
async fn local_submissions_and_authenticated_clients_are_not_checked() {
    let (dns, mta) = (
        common::dns::bl_test().await,
        FakeMta::start(Script::default()).await,
    );
    let mut cfg = milter_config(&mta);
    with_checks(&mut cfg, &dns);
    let (_gate, addr) = gate(cfg).await;
    // Told at once where CONNECT is waited for; else at MAIL.
    let mut m = Mta::connect(addr, 0).await;
    let r = m
        .ask(Command::Connect {
            hostname: b"localhost".to_vec(),
            family: Family::Unknown,
        })
        .await;
    assert_eq!(r, Response::Accept);
    let mut m = Mta::connect(addr, POSTFIX_STEPS).await;
    m.send(Command::Connect {
        hostname: b"localhost".to_vec(),
        family: Family::Unknown,
    })
    .await;
    assert_eq!(m.mail("root@localhost").await, None);
    assert_eq!(m.rcpt("root@example.test").await, Response::Accept);
    m.send(Command::QuitNewConnection).await;
    // A listed address, but the MTA says it authenticated.
    m.connect_from("127.0.0.3", "listed.example").await;
    m.helo("listed.example").await;
    let r = m
        .with_macros(
            b'M',
            &[("{auth_authen}", "alice")],
            Command::Mail(vec![b"<alice@sender.test>".to_vec()]),
            step::NO_REPLY_MAIL,
        )
        .await;
    assert_eq!(r, None);
    assert_eq!(m.rcpt("b@example.test").await, Response::Continue);
}

#[tokio::test]
async fn hostile_packets_close_that_connection_only() {
    let mta = FakeMta::start(Script::default()).await;
    let mut cfg = milter_config(&mta);
    cfg.milter.max_packet = portcullis::config::Bytes(70_000);
    cfg.limits.max_message_size = portcullis::config::Bytes(1000);
    let (_gate, addr) = gate(cfg).await;
    // A length past the limit: closed before the packet is read.
    let mut m = Mta::connect(addr, POSTFIX_STEPS).await;
    m.send_raw(&[0x7f, 0xff, 0xff, 0xff, b'B']).await;
    assert!(m.closed().await);
    // An unknown packet code.
    let mut m = Mta::connect(addr, POSTFIX_STEPS).await;
    m.send_raw(b"\0\0\0\x01z").await;
    assert!(m.closed().await);
    // A message past the size limit: 552 at its end, after it was read.
    let mut m = Mta::connect(addr, POSTFIX_STEPS).await;
    m.connect_from("192.0.2.10", "client.example").await;
    m.helo("client.example").await;
    m.mail("a@sender.test").await;
    m.rcpt("b@example.test").await;
    let big = format!("Subject: big\r\n\r\n{}", "x".repeat(5000));
    let r = code_text(m.message(&big).await.last().unwrap());
    assert!(r.starts_with("552 5.3.4"), "{r}");
    // And the connection goes on.
    m.mail("a@sender.test").await;
    m.rcpt("b@example.test").await;
    let end = m.message("Subject: small\r\n\r\nx\r\n").await;
    assert_eq!(end.last(), Some(&Response::Continue));
}

#[tokio::test]
async fn a_milter_only_config_needs_no_smtp_listener() {
    let mta = FakeMta::start(Script::default()).await;
    let yaml = format!(
        "hostname: gate.test\nlisten: []\nmilter: {{listen: [\"127.0.0.1:0\"]}}\nupstream: {{addr: \"{}\"}}\n",
        mta.addr
    );
    let cfg = Config::parse(&yaml, std::path::Path::new("milter-only.yaml")).unwrap();
    assert!(cfg.listen.is_empty());
    // Neither listener: refused, naming both.
    let none = yaml.replace("milter: {listen: [\"127.0.0.1:0\"]}\n", "");
    let e = Config::parse(&none, std::path::Path::new("none.yaml")).unwrap_err();
    assert!(e.to_string().contains("milter.listen"), "{e}");
    let (_gate, addr) = gate(cfg).await;
    let mut m = Mta::connect(addr, POSTFIX_STEPS).await;
    assert_eq!(m.connect_from("192.0.2.10", "c.example").await, None);
    assert_eq!(m.mail("a@sender.test").await, None);
}

/// A Unix socket listener: mode 0660 (the MTA's group), negotiation and a
/// connect over it, and the socket removed at shutdown.
#[tokio::test]
async fn a_unix_socket_listener_serves_and_is_removed_at_shutdown() {
    use std::os::unix::fs::PermissionsExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mta = FakeMta::start(Script::default()).await;
    let path = std::env::temp_dir().join(format!("portcullis-milter-{}.sock", std::process::id()));
    let mut cfg = milter_config(&mta);
    cfg.milter.listen = vec![MilterListen::Unix(path.clone())];
    let mut gate = Gate::start_config(cfg).await;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o660);
    let mut sock = tokio::net::UnixStream::connect(&path).await.unwrap();
    let mut out = Vec::new();
    Command::Negotiate {
        version: 6,
        actions: 0x1ff,
        steps: POSTFIX_STEPS,
    }
    .encode(&mut out);
    Command::Connect {
        hostname: b"c.example".to_vec(),
        family: Family::Inet {
            port: 25,
            address: b"192.0.2.10".to_vec(),
        },
    }
    .encode(&mut out);
    // CONNECT and MAIL are not waited for: RCPT is what gets the second
    // answer.
    Command::Mail(vec![b"<a@sender.test>".to_vec()]).encode(&mut out);
    Command::Rcpt(vec![b"<b@example.test>".to_vec()]).encode(&mut out);
    sock.write_all(&out).await.unwrap();
    let mut d = portcullis::wire::milter::Decoder::new(1 << 16);
    let mut got = Vec::new();
    while got.len() < 2 {
        let mut buf = [0u8; 512];
        let n = sock.read(&mut buf).await.unwrap();
        assert!(n > 0);
        d.feed(&buf[..n]);
        while let Some(r) = d.response().unwrap() {
            got.push(r);
        }
    }
    assert!(matches!(got[0], Response::Negotiate { version: 6, .. }));
    assert_eq!(got[1], Response::Continue);
    drop(sock);
    gate.stop();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), &mut gate.done).await;
    assert!(!path.exists(), "the socket is removed at shutdown");
}

/// Greylisting through the milter: the first attempt gets our 451 at RCPT
/// (a tempfail as a reply code), the retry after the delay passes.
#[tokio::test]
async fn greylisting_tempfails_with_our_reply_then_passes() {
    use portcullis::state::{Clock, TestClock};
    use std::sync::Arc;
    let mta = FakeMta::start(Script::default()).await;
    let mut cfg = milter_config(&mta);
    cfg.checks.greylist.mode = Mode::Enforce;
    let clock = Arc::new(TestClock::new());
    let gate = Gate::start_clocked(cfg, Arc::clone(&clock) as Arc<dyn Clock>).await;
    let mut m = Mta::connect(gate.milter.unwrap(), POSTFIX_STEPS).await;
    m.connect_from("192.0.2.10", "client.example").await;
    m.helo("client.example").await;
    m.mail("a@sender.test").await;
    let r = code_text(&m.rcpt("b@example.test").await);
    assert!(
        r.starts_with("451 4.7.1 ") && r.contains("300 seconds"),
        "{r}"
    );
    m.send(Command::Abort).await;
    clock.advance(std::time::Duration::from_secs(301));
    m.mail("a@sender.test").await;
    assert_eq!(m.rcpt("b@example.test").await, Response::Continue);
}

/// A message tagged as spam (score over thresholds.tag): our X-Spam-Flag
/// YES, and with `quarantine_tagged` the MTA is told to hold it.
#[tokio::test]
async fn tagged_spam_is_marked_and_held_when_asked() {
    let mta = FakeMta::start(Script::default()).await;
    let mut cfg = milter_config(&mta);
    cfg.rules_dir = Some(rules(
        "tag",
        "rules:\n  - id: LOTTERY\n    description: scored\n    when: {subject: {regex: 'lottery'}}\n    action: {score: 10}\n",
    ));
    cfg.checks.thresholds.tag = Some(5.0);
    for quarantine in [false, true] {
        cfg.milter.quarantine_tagged = quarantine;
        let gate = Gate::start_config(cfg.clone()).await;
        let mut m = Mta::connect(gate.milter.unwrap(), POSTFIX_STEPS).await;
        m.connect_from("192.0.2.10", "client.example").await;
        m.helo("client.example").await;
        m.mail("a@sender.test").await;
        m.rcpt("b@example.test").await;
        let end = m.message("Subject: you won the lottery\r\n\r\nx\r\n").await;
        assert_eq!(end.last(), Some(&Response::Continue));
        assert!(
            inserted(&end)
                .iter()
                .any(|(_, n, v)| n == "X-Spam-Flag" && v.trim() == "YES"),
            "{end:?}"
        );
        let held = end.iter().any(|r| {
            matches!(r, Response::Quarantine(why) if String::from_utf8_lossy(why).contains("rule:LOTTERY") || String::from_utf8_lossy(why).contains("score"))
        });
        assert_eq!(held, quarantine, "{end:?}");
    }
}

/// An MTA that goes silent mid-transaction is dropped after
/// `milter.timeout`, and other connections are served meanwhile.
#[tokio::test]
async fn a_silent_mta_is_dropped_after_the_timeout() {
    let mta = FakeMta::start(Script::default()).await;
    let mut cfg = milter_config(&mta);
    cfg.milter.timeout = common::config::secs(1);
    let (_gate, addr) = gate(cfg).await;
    let mut silent = Mta::connect(addr, POSTFIX_STEPS).await;
    silent.connect_from("192.0.2.10", "client.example").await;
    silent.mail("a@sender.test").await;
    let started = std::time::Instant::now();
    let mut other = Mta::connect(addr, POSTFIX_STEPS).await;
    assert_eq!(other.connect_from("192.0.2.11", "b.example").await, None);
    assert_eq!(other.mail("a@sender.test").await, None);
    assert!(silent.closed().await);
    let took = started.elapsed();
    assert!(
        took >= std::time::Duration::from_millis(900) && took < std::time::Duration::from_secs(3),
        "{took:?}"
    );
}

/// The whole-message parse the rules need is held within
/// `limits.memory_budget` as in proxy mode: with a budget smaller than two
/// messages and their parse, the first to end while the other is still in
/// flight is refused 452 4.3.1; the other, alone, passes.
#[tokio::test]
async fn the_checks_parse_is_held_within_the_memory_budget() {
    let dir = std::env::temp_dir().join(format!("portcullis-milter-budget-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("body.yaml"),
        "rules:\n  - id: BODY_WORD\n    description: a body rule, so the message is parsed\n    when: {body: {regex: never-in-this-message}}\n    action: {score: 1}\n",
    )
    .unwrap();
    let mta = FakeMta::start(Script::default()).await;
    let mut cfg = milter_config(&mta);
    cfg.rules_dir = Some(dir);
    cfg.limits.max_message_size = common::config::kib(200);
    // Two bodies in flight take 384 KiB of it (held in 64 KiB steps); the
    // first one's parse beside the second would take 448 KiB.
    cfg.limits.memory_budget = common::config::kib(420);
    let (_gate, milter) = gate(cfg).await;
    let body = "x".repeat(76) + "\r\n";
    let msg = format!("Subject: big\r\n\r\n{}", body.repeat(1300)); // ~100 KB
    // Body chunks answered, so that each body is held before we go on.
    let steps = POSTFIX_STEPS & !step::NO_REPLY_BODY;
    let mut first = Mta::connect(milter, steps).await;
    let mut second = Mta::connect(milter, steps).await;
    for (m, from) in [(&mut first, "a@one.test"), (&mut second, "b@two.test")] {
        m.connect_from("192.0.2.60", "client.example").await;
        m.helo("client.example").await;
        m.mail(from).await;
        m.rcpt("r@example.test").await;
        m.message_sent(&msg).await;
    }
    // Both bodies are held; the first one's parse does not fit beside them.
    let a = first.end_of_message().await;
    assert!(
        code_text(a.last().unwrap()).starts_with("452 4.3.1"),
        "{a:?}"
    );
    // The second, alone now, is checked and accepted.
    let b = second.end_of_message().await;
    assert_eq!(b.last(), Some(&Response::Continue), "{b:?}");
}

/// Postfix writes a macro packet, then its command, without TCP_NODELAY:
/// under Nagle's algorithm the command waits until the macro packet is
/// acknowledged. The filter acknowledges at once what it does not answer
/// (a delayed ACK held each such command 40 ms), and what it answers its
/// answer acknowledges.
#[tokio::test]
async fn a_command_after_its_macros_is_not_held_by_a_delayed_ack() {
    let mta = FakeMta::start(Script::default()).await;
    let (_gate, addr) = gate(milter_config(&mta)).await;
    let mut m = Mta::connect(addr, POSTFIX_STEPS).await;
    assert_eq!(
        m.connect_from("192.0.2.1", "client.example.test").await,
        None
    );
    m.helo("client.example.test").await;
    m.mail("a@sender.test").await;
    let started = std::time::Instant::now();
    for _ in 0..20 {
        let r = m
            .with_macros(
                b'R',
                &[("{rcpt_addr}", "b@example.test")],
                Command::Rcpt(vec![b"<b@example.test>".to_vec()]),
                step::NO_REPLY_RCPT,
            )
            .await;
        assert_eq!(r, Some(Response::Continue));
    }
    let took = started.elapsed();
    println!("20 RCPTs after their macros: {took:?}");
    // Held by delayed ACKs they take 20 x 40 ms.
    assert!(took < std::time::Duration::from_millis(400), "{took:?}");
}
