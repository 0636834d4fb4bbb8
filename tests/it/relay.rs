//! The gate end to end on loopback: a real Portcullis server in front of a
//! scripted upstream MTA.

use crate::common;
use common::config::{kib, mib, secs, test_config};
use portcullis::config::{Config, IdentityMode};

use common::{Client, FakeMta, Gate, Script, message};
use std::collections::HashSet;
use std::time::Duration;

#[tokio::test]
async fn byte_exact_delivery_with_dots_8bit_and_long_lines() {
    let mta = FakeMta::start(Script::default()).await;
    let gate = Gate::start(mta.addr).await;
    let mut c = Client::hello(gate.addr).await;
    let long = "x".repeat(998);
    let body = format!(
        "Subject: dots\r\n\r\n.leading dot\r\n..two dots\r\n.\r\nmid . dot\r\n{long}\r\nnaïve café \u{1F600}\r\n\x7f\x01 ctrl\r\nlast"
    );
    let mut content = message("exact1", &body);
    let r = c
        .send_mail(
            "a@sender.test",
            &["b@example.test", "c@example.test"],
            &content,
        )
        .await;
    assert!(r.starts_with("250 2.0.0 Ok: queued as FAKE"), "{r}");
    // write_stuffed adds the final CRLF the message lacked; the stored copy has it.
    content.extend_from_slice(b"\r\n");
    let stored = mta.stored();
    assert_eq!(stored.len(), 1);
    let (ours, theirs) = common::split_ours(&stored[0].data);
    // Only our headers are prepended; the rest arrives byte for byte.
    assert_eq!(
        ours,
        "Authentication-Results: gate.test; none\r\nX-Spam-Flag: NO\r\nX-Spam-Score: 0.0\r\n"
    );
    assert_eq!(theirs, content, "content must arrive byte for byte");
    assert_eq!(
        stored[0].rcpts,
        vec!["<b@example.test>", "<c@example.test>"]
    );
    assert_eq!(stored[0].mail, "<a@sender.test>");
}

#[tokio::test]
async fn several_transactions_reuse_one_upstream_connection() {
    let mta = FakeMta::start(Script::default()).await;
    let gate = Gate::start(mta.addr).await;
    let mut c = Client::hello(gate.addr).await;
    for i in 0..5 {
        let m = message(&format!("multi{i}"), &format!("body {i}\r\n"));
        let r = c.send_mail("a@sender.test", &["b@example.test"], &m).await;
        assert!(r.starts_with("250"), "{r}");
    }
    c.cmd("QUIT", "221").await;
    assert_eq!(mta.stored().len(), 5);
    // One XCLIENT: one upstream connection served all five transactions.
    assert_eq!(mta.count("XCLIENT"), 1);
    assert_eq!(mta.count("MAIL"), 5);
}

#[tokio::test]
async fn twenty_megabyte_message_arrives_intact() {
    let mta = FakeMta::start(Script::default()).await;
    let mut c = test_config(mta.addr);
    c.limits.max_message_size = mib(25);
    let gate = Gate::start_config(c).await;
    let mut c = Client::hello(gate.addr).await;
    let line = format!("{}\r\n", "abcdefghij".repeat(9));
    let mut body = String::with_capacity(20 << 20);
    let mut i = 0u64;
    while body.len() < 20 << 20 {
        if i.is_multiple_of(1000) {
            body.push_str(".dot line needing stuffing\r\n");
        }
        body.push_str(&line);
        i += 1;
    }
    let content = message("big", &body);
    let r = c
        .send_mail("a@sender.test", &["b@example.test"], &content)
        .await;
    assert!(r.starts_with("250"), "{r}");
    let stored = mta.stored();
    assert_eq!(stored.len(), 1);
    assert!(stored[0].data.len() >= 20 << 20);
    assert!(
        common::split_ours(&stored[0].data).1 == content,
        "20 MB message differs"
    );
}

#[tokio::test]
async fn pipelined_commands_get_replies_in_order() {
    let mta = FakeMta::start(Script::default()).await;
    let gate = Gate::start(mta.addr).await;
    let mut c = Client::hello(gate.addr).await;
    c.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<b@example.test>\r\nRCPT TO:<unknown@example.test>\r\nRCPT TO:<c@example.test>\r\nDATA\r\n")
        .await;
    assert!(c.reply().await.starts_with("250 2.1.0"));
    assert!(c.reply().await.starts_with("250 2.1.5"));
    assert!(c.reply().await.starts_with("550 5.1.1"));
    assert!(c.reply().await.starts_with("250 2.1.5"));
    assert!(c.reply().await.starts_with("354"));
    c.send(b"Subject: p\r\n\r\nhi\r\n.\r\nQUIT\r\n").await;
    assert!(c.reply().await.starts_with("250 2.0.0"));
    assert!(c.reply().await.starts_with("221"));
    let s = mta.stored();
    assert_eq!(s[0].rcpts.len(), 2);
}

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
async fn xclient_sequence_as_upstream_sees_it() {
    let mta = FakeMta::start(Script::default()).await;
    let gate = Gate::start(mta.addr).await;
    let mut c = Client::connect_from(gate.addr, "127.0.0.9").await;
    c.reply().await;
    c.cmd("EHLO mail.client.test", "250").await;
    let r = c
        .send_mail(
            "a@sender.test",
            &["b@example.test"],
            b"Subject: x\r\n\r\nx\r\n",
        )
        .await;
    assert!(r.starts_with("250"));
    let cmds = mta.connection_with("XCLIENT");
    let x = cmds
        .iter()
        .position(|l| l.starts_with("XCLIENT"))
        .expect("XCLIENT sent");
    let xc = &cmds[x];
    assert!(xc.contains("ADDR=127.0.0.9"), "{xc}");
    assert!(xc.contains("HELO=mail.client.test"), "{xc}");
    assert!(xc.contains("NAME=[UNAVAILABLE]"), "{xc}");
    assert!(xc.contains("PROTO=ESMTP"), "{xc}");
    // Before XCLIENT our own EHLO; after it, EHLO again with the client's name, then MAIL.
    assert_eq!(cmds[x - 1], "EHLO gate.test");
    assert_eq!(cmds[x + 1], "EHLO mail.client.test");
    assert!(cmds[x + 2].starts_with("MAIL FROM:<a@sender.test>"));
    assert_eq!(mta.stored()[0].helo, "mail.client.test");
}

#[tokio::test]
async fn proxy_v1_and_v2_sequences_as_upstream_sees_them() {
    for (mode, v2) in [
        (IdentityMode::ProxyV1, false),
        (IdentityMode::ProxyV2, true),
    ] {
        let mut script = Script::default().without_xclient();
        script.expect_proxy = true;
        let mta = FakeMta::start(script).await;
        let mut cfg = test_config(mta.addr);
        cfg.upstream.client_identity = mode;
        let gate = Gate::start_config(cfg).await;
        let mut c = Client::connect_from(gate.addr, "127.0.0.7").await;
        c.reply().await;
        c.cmd("EHLO pc.test", "250").await;
        let r = c
            .send_mail(
                "a@sender.test",
                &["b@example.test"],
                b"Subject: x\r\n\r\nx\r\n",
            )
            .await;
        assert!(r.starts_with("250"), "{r}");
        let s = &mta.stored()[0];
        let header = s.proxy.clone().expect("PROXY header");
        let port = c.sock.local_addr().unwrap().port();
        if v2 {
            let h = ppp::v2::Header::try_from(header.as_slice()).unwrap();
            assert_eq!(
                h.addresses,
                ppp::v2::Addresses::from((
                    format!("127.0.0.7:{port}")
                        .parse::<std::net::SocketAddr>()
                        .unwrap(),
                    gate.addr
                ))
            );
        } else {
            assert_eq!(
                String::from_utf8(header).unwrap(),
                format!(
                    "PROXY TCP4 127.0.0.7 127.0.0.1 {port} {}\r\n",
                    gate.addr.port()
                )
            );
        }
        assert!(s.xclient.is_none());
        // The client's HELO name travels in our EHLO.
        assert_eq!(s.helo, "pc.test");
    }
}

/// The test config with `client_identity: auto`.
fn auto(mta: std::net::SocketAddr) -> Config {
    let mut cfg = test_config(mta);
    cfg.upstream.client_identity = IdentityMode::Auto;
    cfg
}

#[tokio::test]
async fn auto_picks_xclient_or_proxy_v2() {
    // XCLIENT offered: auto uses it.
    let mta = FakeMta::start(Script::default()).await;
    let gate = Gate::start_config(auto(mta.addr)).await;
    let mut c = Client::hello(gate.addr).await;
    assert!(
        c.send_mail("a@s.test", &["b@example.test"], b"S: x\r\n\r\nx\r\n")
            .await
            .starts_with("250")
    );
    assert!(mta.stored()[0].xclient.is_some());

    // A silent listener that waits for a PROXY header: auto uses PROXY v2.
    let mut script = Script::default().without_xclient();
    script.expect_proxy = true;
    let mta = FakeMta::start(script).await;
    let server = portcullis::server::Server::bind(auto(mta.addr))
        .await
        .unwrap();
    let id = server.upstream().probe().await.unwrap();
    assert_eq!(id, portcullis::upstream::Identity::ProxyV2);

    // Answers, but neither XCLIENT nor PROXY: auto refuses.
    let mta = FakeMta::start(Script::default().without_xclient()).await;
    let server = portcullis::server::Server::bind(auto(mta.addr))
        .await
        .unwrap();
    let e = server.upstream().probe().await.unwrap_err();
    assert!(
        matches!(e, portcullis::upstream::ProbeError::NoIdentity(_)),
        "{e}"
    );
}

#[tokio::test]
async fn upstream_connection_is_lazy() {
    let mta = FakeMta::start(Script::default()).await;
    let gate = Gate::start(mta.addr).await;
    for _ in 0..3 {
        let mut c = Client::hello(gate.addr).await;
        c.cmd("NOOP", "250").await;
        c.cmd("QUIT", "221").await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Probes say EHLO, but no session opened an identified connection.
    assert_eq!(mta.count("XCLIENT"), 0);
    assert_eq!(mta.count("MAIL"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sessions_lose_and_duplicate_nothing() {
    const N: usize = 500;
    let mta = FakeMta::start(Script::default()).await;
    let mut cfg = test_config(mta.addr);
    let l = &mut cfg.limits;
    (
        l.max_connections,
        l.max_connections_per_ip,
        l.max_connections_per_network,
    ) = (1000, 1000, 1000);
    let gate = Gate::start_config(cfg).await;
    let mut tasks = Vec::new();
    for i in 0..N {
        let addr = gate.addr;
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(addr).await;
            let g = c.try_reply(Duration::from_secs(10)).await;
            assert!(
                g.as_deref().is_some_and(|g| g.starts_with("220")),
                "greeting {i}: {g:?}"
            );
            c.cmd("EHLO client.test", "250").await;
            let m = message(&format!("conc{i}"), &format!("message number {i}\r\n"));
            let r = c.send_mail("a@sender.test", &["b@example.test"], &m).await;
            c.cmd("QUIT", "221").await;
            (i, r.starts_with("250"))
        }));
    }
    let mut accepted = HashSet::new();
    for t in tasks {
        let (i, ok) = t.await.unwrap();
        assert!(ok, "message {i} not accepted");
        accepted.insert(format!("<conc{i}@sender.test>"));
    }
    let stored = mta.stored();
    let mut ids = Vec::new();
    for s in &stored {
        let text = String::from_utf8_lossy(&s.data);
        let id = text
            .lines()
            .find_map(|l| l.strip_prefix("Message-ID: "))
            .unwrap()
            .to_string();
        ids.push(id);
    }
    let unique: HashSet<_> = ids.iter().cloned().collect();
    assert_eq!(ids.len(), N, "stored count");
    assert_eq!(unique.len(), N, "duplicates");
    assert_eq!(unique, accepted);
}

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

#[tokio::test]
async fn incoming_proxy_header_only_from_trusted_proxies() {
    let mta = FakeMta::start(Script::default()).await;
    let mut cfg = test_config(mta.addr);
    cfg.listen[0].proxy_protocol = true;
    cfg.listen[0].trusted_proxies = vec!["127.0.0.5/32".parse().unwrap()];
    let gate = Gate::start_config(cfg).await;
    // Trusted: the announced client reaches upstream via XCLIENT.
    let mut c = Client::connect_from(gate.addr, "127.0.0.5").await;
    c.send(b"PROXY TCP4 198.51.100.7 192.0.2.1 40000 25\r\n")
        .await;
    c.reply().await;
    c.cmd("EHLO far.test", "250").await;
    assert!(
        c.send_mail("a@s.test", &["b@example.test"], b"S: x\r\n\r\nx\r\n")
            .await
            .starts_with("250")
    );
    assert!(
        mta.stored()[0]
            .xclient
            .as_deref()
            .unwrap()
            .contains("ADDR=198.51.100.7")
    );
    // Untrusted peer: refused before any greeting.
    let mut u = Client::connect_from(gate.addr, "127.0.0.6").await;
    u.send(b"PROXY TCP4 198.51.100.8 192.0.2.1 40000 25\r\n")
        .await;
    let r = u.reply().await;
    assert!(r.starts_with("421 4.7.0"), "{r}");
    // A PROXY line on a plain listener is just an unknown command.
    let mta2 = FakeMta::start(Script::default()).await;
    let plain = Gate::start(mta2.addr).await;
    let mut p = Client::connect(plain.addr).await;
    p.reply().await;
    p.cmd("PROXY TCP4 198.51.100.9 192.0.2.1 40000 25", "500")
        .await;
}

#[tokio::test]
async fn graceful_shutdown_finishes_transactions_and_closes_idle_sessions() {
    let mta = FakeMta::start(Script::default()).await;
    let mut c = test_config(mta.addr);
    c.timeouts.shutdown = secs(5);
    let mut gate = Gate::start_config(c).await;
    let mut idle = Client::hello(gate.addr).await;
    let mut busy = Client::hello(gate.addr).await;
    busy.cmd("MAIL FROM:<a@sender.test>", "250").await;
    busy.cmd("RCPT TO:<b@example.test>", "250").await;
    gate.stop();
    let r = idle.reply().await;
    assert!(r.starts_with("421 4.3.2"), "{r}");
    // The transaction in flight still completes...
    busy.cmd("DATA", "354").await;
    busy.send(b"Subject: late\r\n\r\nx\r\n.\r\n").await;
    assert!(busy.reply().await.starts_with("250"));
    // ...and then the session is closed.
    let r = busy.reply().await;
    assert!(r.starts_with("421 4.3.2"), "{r}");
    assert_eq!(mta.stored().len(), 1);
    // New connections are no longer accepted.
    tokio::time::timeout(Duration::from_secs(5), gate.done)
        .await
        .unwrap()
        .unwrap();
    assert!(tokio::net::TcpStream::connect(gate.addr).await.is_err());
}

#[tokio::test]
async fn shutdown_deadline_aborts_stuck_transactions_with_421() {
    let mta = FakeMta::start(Script::default()).await;
    let mut c = test_config(mta.addr);
    c.timeouts.shutdown = secs(1);
    let mut gate = Gate::start_config(c).await;
    let mut busy = Client::hello(gate.addr).await;
    busy.cmd("MAIL FROM:<a@sender.test>", "250").await;
    busy.cmd("RCPT TO:<b@example.test>", "250").await;
    busy.cmd("DATA", "354").await;
    busy.send(b"Subject: slow\r\n\r\npart").await;
    gate.stop();
    let r = busy.try_reply(Duration::from_secs(5)).await.expect("421");
    assert!(r.starts_with("421 4.3.2"), "{r}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(mta.stored().is_empty());
    assert_eq!(mta.count("DATA"), 0);
}

#[tokio::test]
async fn ehlo_offers_only_what_upstream_supports() {
    let mta = FakeMta::start(Script::default()).await;
    let mut c = test_config(mta.addr);
    c.limits.max_message_size = mib(10);
    let gate = Gate::start_config(c).await;
    let mut c = Client::connect(gate.addr).await;
    c.reply().await;
    let e = c.cmd("EHLO c.test", "250").await;
    for k in [
        "PIPELINING",
        "SIZE 10485760",
        "8BITMIME",
        "DSN",
        "ENHANCEDSTATUSCODES",
    ] {
        assert!(e.contains(k), "{k} missing: {e}");
    }
    assert!(
        !e.contains("SMTPUTF8") && !e.contains("STARTTLS") && !e.contains("CHUNKING"),
        "{e}"
    );
    c.cmd(
        "MAIL FROM:<a@s.test> BODY=8BITMIME RET=HDRS ENVID=x1",
        "250",
    )
    .await;
    c.cmd(
        "RCPT TO:<b@example.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@example.test",
        "250",
    )
    .await;
    // The parameters reach upstream as the client wrote them.
    let cmds = mta.commands();
    assert!(cmds.contains(&"MAIL FROM:<a@s.test> BODY=8BITMIME RET=HDRS ENVID=x1".to_string()));
    assert!(cmds.contains(
        &"RCPT TO:<b@example.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@example.test".to_string()
    ));

    // Upstream without 8BITMIME and DSN: we offer neither, and refuse them.
    let plain = Script {
        ehlo_keywords: vec![
            "PIPELINING".into(),
            "SIZE 1000000".into(),
            "XCLIENT ADDR HELO".into(),
        ],
        ..Script::default()
    };
    let mta = FakeMta::start(plain).await;
    let gate = Gate::start(mta.addr).await;
    let mut c = Client::connect(gate.addr).await;
    c.reply().await;
    let e = c.cmd("EHLO c.test", "250").await;
    assert!(!e.contains("8BITMIME") && !e.contains("DSN"), "{e}");
    // Upstream's smaller SIZE wins.
    assert!(e.contains("SIZE 1000000"), "{e}");
    c.cmd("MAIL FROM:<a@s.test> BODY=8BITMIME", "555 5.5.4")
        .await;
    c.cmd("MAIL FROM:<a@s.test> RET=FULL", "555 5.5.4").await;
    c.cmd("MAIL FROM:<a@s.test>", "250").await;
    c.cmd("RCPT TO:<b@example.test> NOTIFY=NEVER", "555 5.5.4")
        .await;
    assert_eq!(mta.count("MAIL"), 1);
}

#[tokio::test]
async fn helo_client_and_rset_between_transactions() {
    let mta = FakeMta::start(Script::default()).await;
    let gate = Gate::start(mta.addr).await;
    let mut c = Client::connect(gate.addr).await;
    c.reply().await;
    c.cmd("HELO old.style", "250 gate.test").await;
    c.cmd("MAIL FROM:<a@s.test>", "250").await;
    c.cmd("RCPT TO:<b@example.test>", "250").await;
    c.cmd("RSET", "250").await;
    // RSET reached upstream too, so a new MAIL is not nested there.
    c.cmd("MAIL FROM:<c@s.test>", "250").await;
    c.cmd("RCPT TO:<d@example.test>", "250").await;
    c.cmd("DATA", "354").await;
    c.send(b"Subject: h\r\n\r\nx\r\n.\r\n").await;
    assert!(c.reply().await.starts_with("250"));
    assert_eq!(mta.count("RSET"), 1);
    let s = mta.stored();
    assert_eq!((s.len(), s[0].mail.as_str()), (1, "<c@s.test>"));
    assert!(s[0].xclient.as_deref().unwrap().contains("PROTO=SMTP"));
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

/// An 8-bit HELO name long enough that its xtext passes Postfix's 255-octet
/// XCLIENT attribute limit: XCLIENT says HELO=[UNAVAILABLE] and the name
/// still reaches upstream in the EHLO after it. The message is delivered.
#[tokio::test]
async fn long_8bit_helo_never_breaks_xclient() {
    let mta = FakeMta::start(Script::default()).await;
    let gate = Gate::start(mta.addr).await;
    let helo = "é".repeat(43); // 86 octets, 258 in xtext
    let mut c = Client::connect(gate.addr).await;
    c.reply().await;
    c.cmd(&format!("EHLO {helo}"), "250").await;
    let r = c
        .send_mail(
            "a@sender.test",
            &["b@example.test"],
            b"Subject: x\r\n\r\nx\r\n",
        )
        .await;
    assert!(r.starts_with("250"), "{r}");
    let stored = mta.stored();
    assert!(
        stored[0]
            .xclient
            .as_deref()
            .unwrap()
            .contains("HELO=[UNAVAILABLE]"),
        "{:?}",
        stored[0].xclient
    );
    assert_eq!(stored[0].helo, helo);
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
