//! End to end in milter mode: a real Postfix with `smtpd_milters` pointing
//! at Portcullis, swaks (and a plain SMTP client) talking to Postfix. Our
//! refusals reach the client through Postfix with our code and text, our
//! Authentication-Results arrive in the Maildir and a forged one does
//! not, several messages per connection are each checked, and with
//! Portcullis stopped Postfix applies `milter_default_action`.

use crate::common;
use common::config::{secs, test_config, zone};
use common::dns::{FakeDns, a, txt};
use common::peers::Postfix;
use portcullis::config::{Action, MilterListen, Mode, RateCount, RateKey, Zone};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// swaks to Postfix from `ip`; its whole transcript, whatever the outcome.
fn swaks(port: u16, ip: &str, from: &str, data: Option<&Path>, extra: &[&str]) -> String {
    let mut cmd = Command::new("swaks");
    cmd.args(["--server", "127.0.0.1", "--port", &port.to_string()])
        .args(["--local-interface", ip, "--helo", "client.sender.test"])
        .args([
            "--from",
            from,
            "--to",
            "bob@example.test",
            "--timeout",
            "20",
        ]);
    if let Some(f) = data {
        cmd.arg("--data").arg(format!("@{}", f.display()));
    }
    cmd.args(extra);
    let out = cmd.output().expect("swaks (Debian package swaks)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every message in the Maildir once `n` have arrived (10 s at most).
fn mails(dir: &Path, n: usize) -> Vec<String> {
    common::peers::mails(dir, n, Duration::from_secs(10))
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs Postfix and swaks (installed by .ci/run)"]
async fn inside_postfix_as_a_milter() {
    use base64::Engine;
    use mail_auth::headers::HeaderWriter;
    let der = mail_auth::crypto::Ed25519Key::generate_pkcs8().unwrap();
    let key = mail_auth::crypto::Ed25519Key::from_pkcs8_der(&der).unwrap();
    let p = base64::engine::general_purpose::STANDARD.encode(key.public_key());
    let dns = FakeDns::start(
        &["test."],
        vec![
            a("2.0.0.127.bl.test.", "127.0.0.2"),
            txt("2.0.0.127.bl.test.", "Listed for testing"),
            txt("pass.test.", "v=spf1 ip4:127.0.0.0/8 -all"),
            txt("_dmarc.signed.test.", "v=DMARC1; p=reject"),
            txt(
                "ed._domainkey.signed.test.",
                &format!("v=DKIM1; k=ed25519; p={p}"),
            ),
        ],
    )
    .await;
    let rules = std::env::temp_dir().join(format!(
        "portcullis-e2e-milter-rules-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&rules).unwrap();
    std::fs::write(
        rules.join("r.yaml"),
        "rules:\n  - id: FORBIDDEN\n    description: a phrase we refuse\n    when: {body: {regex: 'forbidden phrase'}}\n    action: {reject: {code: 550, enhanced: 5.7.1, text: \"Forbidden phrase\"}}\n  - id: TRYOUT\n    description: tried out in shadow\n    when: {subject: {regex: 'tryout'}}\n    action: reject\n    mode: shadow\n  - id: LOTTERY\n    description: scored as spam\n    when: {subject: {regex: 'lottery'}}\n    action: {score: 10}\n",
    )
    .unwrap();
    // Milter only: no SMTP listener of our own.
    let mut cfg = test_config("127.0.0.1:9".parse().unwrap());
    cfg.listen.clear();
    cfg.milter.listen = vec![MilterListen::Tcp("127.0.0.1:0".parse().unwrap())];
    cfg.rules_dir = Some(rules);
    cfg.checks.thresholds.tag = Some(5.0);
    cfg.milter.quarantine_tagged = true;
    (cfg.dns.nameservers, cfg.dns.timeout) = (vec![dns.addr], secs(2));
    let c = &mut cfg.checks;
    c.spf.mode = Mode::Enforce;
    c.spf.helo = false;
    c.dkim.mode = Mode::Enforce;
    c.dmarc.mode = Mode::Enforce;
    c.dnsbl.mode = Mode::Enforce;
    c.dnsbl.zones = vec![Zone {
        action: Some(Action::Reject),
        ..zone("bl.test")
    }];
    // Four connections a minute per address: only 127.0.0.9 goes past.
    c.rate_limits = vec![common::config::rate_limit(
        "conn",
        RateKey::ClientAddress,
        RateCount::Connections,
        4,
        60,
    )];
    // The real binary, logging to a file that `stats` then reads.
    let dir = std::env::temp_dir().join(format!("portcullis-e2e-milter-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log_file = dir.join("portcullis.log");
    let _ = std::fs::remove_file(&log_file);
    let milter = std::net::SocketAddr::from(([127, 0, 0, 1], common::free_port()));
    cfg.milter.listen = vec![MilterListen::Tcp(milter)];
    cfg.log.file = Some(log_file.clone());
    let conf = dir.join("portcullis.yaml");
    common::config::write_config(&conf, &cfg);
    let mut gate = common::Killed(
        Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(["run", "--config"])
            .arg(&conf)
            .spawn()
            .unwrap(),
    );
    let until = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(milter).is_err() {
        assert!(Instant::now() < until, "the milter listener never came up");
        std::thread::sleep(Duration::from_millis(50));
    }
    let pf = Postfix::start_with(
        "milter",
        &format!(
            "smtpd_milters = inet:127.0.0.1:{}\nmilter_protocol = 6\nmilter_default_action = tempfail\nmilter_connect_timeout = 5s\nmilter_command_timeout = 10s\nmilter_content_timeout = 20s\n",
            milter.port()
        ),
    );
    let port = pf.port;

    // A listed client: our code and text at RCPT, as the client sees it.
    let out =
        tokio::task::spawn_blocking(move || swaks(port, "127.0.0.2", "spam@pass.test", None, &[]))
            .await
            .unwrap();
    assert!(
        out.contains("<** 550 5.7.1 Service unavailable; client [127.0.0.2] blocked using bl.test; Listed for testing"),
        "{out}"
    );

    // A signed message with a forged Authentication-Results claiming our
    // name: delivered with ours, without the forged one.
    let msg = "From: alice@signed.test\r\nTo: bob@example.test\r\nSubject: signed inside postfix\r\n\r\nHello.\r\n";
    let sig = mail_auth::dkim::DkimSigner::from_key(key)
        .domain("signed.test")
        .selector("ed")
        .headers(["From", "To", "Subject"])
        .sign(msg.as_bytes())
        .unwrap();
    let forged = "Authentication-Results: gate.test; spf=pass smtp.mailfrom=ceo@bank.test\r\n";
    let file = pf.run.join("signed.eml");
    std::fs::write(
        &file,
        format!("{forged}{}{msg}", sig.to_header()).replace("\r\n", "\n"),
    )
    .unwrap();
    let f = file.clone();
    let out = tokio::task::spawn_blocking(move || {
        swaks(port, "127.0.0.7", "alice@pass.test", Some(&f), &[])
    })
    .await
    .unwrap();
    assert!(out.contains("250 2.0.0 Ok: queued as"), "{out}");
    let signed_id: String = out
        .split("queued as ")
        .nth(1)
        .unwrap()
        .chars()
        .take_while(char::is_ascii_alphanumeric)
        .collect();
    let mail = mails(&pf.inbox(), 1).remove(0);
    assert!(
        mail.contains("Authentication-Results: gate.test;"),
        "{mail}"
    );
    assert!(
        mail.contains("dkim=pass header.d=signed.test header.s=ed"),
        "{mail}"
    );
    assert!(mail.contains("spf=pass"), "{mail}");
    assert!(
        mail.contains("dmarc=pass header.from=signed.test"),
        "{mail}"
    );
    assert!(
        !mail.contains("ceo@bank.test"),
        "the forged one is gone: {mail}"
    );
    assert_eq!(
        mail.matches("Authentication-Results: gate.test").count(),
        1,
        "{mail}"
    );

    // A DATA-stage rule: refused at the end of the message with our reply.
    let body = pf.run.join("forbidden.eml");
    std::fs::write(
        &body,
        "From: alice@pass.test\nSubject: hi\n\nthis has the forbidden phrase\n",
    )
    .unwrap();
    let out = tokio::task::spawn_blocking(move || {
        swaks(port, "127.0.0.7", "alice@pass.test", Some(&body), &[])
    })
    .await
    .unwrap();
    assert!(out.contains("<** 550 5.7.1 Forbidden phrase"), "{out}");

    // A shadow rule only logs: delivered.
    let out = tokio::task::spawn_blocking(move || {
        swaks(
            port,
            "127.0.0.7",
            "alice@pass.test",
            None,
            &["--header", "Subject: a tryout"],
        )
    })
    .await
    .unwrap();
    assert!(out.contains("250 2.0.0 Ok: queued as"), "{out}");

    // Tagged as spam: accepted, and held in Postfix's hold queue.
    let out = tokio::task::spawn_blocking(move || {
        swaks(
            port,
            "127.0.0.7",
            "alice@pass.test",
            None,
            &["--header", "Subject: you won the lottery"],
        )
    })
    .await
    .unwrap();
    assert!(out.contains("250 2.0.0 Ok: queued as"), "{out}");
    let queue = Command::new("postqueue")
        .arg("-c")
        .arg(&pf.conf)
        .arg("-p")
        .output()
        .unwrap();
    let queue = String::from_utf8_lossy(&queue.stdout).into_owned();
    // A held message's queue id carries a '!'.
    assert!(
        queue.contains("!") && queue.contains("alice@pass.test"),
        "{queue}"
    );

    // Several messages on one connection, each checked: the second is
    // refused by the DATA rule, the first and third delivered.
    let mut c = common::Client::connect_from(
        std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        "127.0.0.8",
    )
    .await;
    assert!(c.reply().await.starts_with("220"));
    c.cmd("EHLO multi.sender.test", "250").await;
    for (i, text, want) in [
        (1, "first", "250"),
        (2, "the forbidden phrase", "550 5.7.1"),
        (3, "third", "250"),
    ] {
        let msg = format!("From: alice@pass.test\r\nSubject: multi {i}\r\n\r\n{text}\r\n");
        let r = c
            .send_mail("alice@pass.test", &["bob@example.test"], msg.as_bytes())
            .await;
        assert!(r.starts_with(want), "message {i}: {r}");
    }
    c.cmd("QUIT", "221").await;

    // Past its connection rate: refused at connect, and Postfix waits for
    // our answer neither at CONNECT nor at MAIL, so the client is greeted,
    // its EHLO and MAIL answered, and our 421 comes at RCPT, then the
    // hang-up: Postfix's own smtpd_delay_reject, three round trips fewer
    // for every client.
    let smtp = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    for _ in 0..4 {
        let mut c = common::Client::connect_from(smtp, "127.0.0.9").await;
        assert!(c.reply().await.starts_with("220"));
        c.cmd("QUIT", "221").await;
    }
    let mut c = common::Client::connect_from(smtp, "127.0.0.9").await;
    assert!(c.reply().await.starts_with("220"));
    c.cmd("EHLO over.sender.test", "250").await;
    c.cmd("MAIL FROM:<alice@pass.test>", "250").await;
    c.cmd(
        "RCPT TO:<bob@example.test>",
        "421 4.7.0 Rate limit conn reached",
    )
    .await;
    assert!(c.closed().await, "421 closes the session");
    let all = mails(&pf.inbox(), 4);
    assert_eq!(all.len(), 4, "signed, tryout, multi 1 and 3");
    assert!(all.iter().any(|m| m.contains("Subject: multi 3")));
    assert!(!all.iter().any(|m| m.contains("Subject: multi 2")));

    // The same log line and stats as in proxy mode, with the mode named.
    let stats = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["stats", "--json"])
        .arg(&log_file)
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    let names = |k: &str| -> Vec<(String, u64)> {
        json[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["name"].as_str().unwrap().into(),
                    c["count"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    // Listed (1), signed, forbidden, tryout, lottery, multi 1 to 3: 8.
    assert_eq!(names("modes"), [("milter".into(), 8)], "{json}");
    assert!(names("verdicts").contains(&("tag".into(), 1)), "{json}");
    let reasons = names("reject_reasons");
    assert!(
        reasons.contains(&("dnsbl:bl.test".into(), 1)),
        "{reasons:?}"
    );
    assert!(
        reasons.contains(&("rule:FORBIDDEN".into(), 2)),
        "{reasons:?}"
    );
    assert!(
        names("shadow_rules").contains(&("TRYOUT".into(), 1)),
        "{json}"
    );
    let log = std::fs::read_to_string(&log_file).unwrap();
    assert!(
        log.contains(r#""event":"transaction","mode":"milter""#),
        "{log}"
    );
    // Postfix's queue id (its `i` macro) is on our line: one grep finds both.
    assert!(
        log.contains(&format!(r#""queue_id":"{signed_id}""#)),
        "{signed_id}: {log}"
    );
    assert!(
        log.contains("greeting test (greeting.delay) does not apply"),
        "{log}"
    );

    // Portcullis stopped: Postfix applies milter_default_action (tempfail).
    let _ = gate.0.kill();
    let _ = gate.0.wait();
    let out =
        tokio::task::spawn_blocking(move || swaks(port, "127.0.0.7", "alice@pass.test", None, &[]))
            .await
            .unwrap();
    assert!(out.contains("<** 451 4.7.1"), "{out}");
    // Postfix's own log names the milter's refusals, at RCPT and at the end.
    let log = std::fs::read_to_string(pf.run.join("maillog")).unwrap_or_default();
    for want in [
        "milter-reject: RCPT from unknown[127.0.0.2]: 550 5.7.1 Service unavailable; client [127.0.0.2] blocked using bl.test",
        "milter-reject: END-OF-MESSAGE from unknown[127.0.0.7]: 5.7.1 Forbidden phrase",
        "milter-reject: RCPT from unknown[127.0.0.9]: 421 4.7.0 Rate limit conn reached",
        &format!(
            "connect to Milter service inet:127.0.0.1:{}: Connection refused",
            milter.port()
        ),
        "milter-reject: MAIL from unknown[127.0.0.7]: 451 4.7.1 Service unavailable - try again later",
    ] {
        assert!(log.contains(want), "{want} not in {log}");
    }
}
