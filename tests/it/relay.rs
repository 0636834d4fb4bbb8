//! Relaying end to end on loopback: a real Portcullis server in front of a
//! scripted upstream MTA delivers byte for byte, reuses its upstream
//! connection, keeps pipelined replies in order, and offers only what
//! upstream supports.

use crate::common;
use common::config::{mib, test_config};

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
