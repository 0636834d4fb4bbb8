//! The transaction log line as emitted by a real session. Alone in its test
//! binary: tracing caches callsite interest process-wide, so a thread-local
//! subscriber only sees events reliably when no other test runs beside it.

mod common;

use common::config::{behind_proxy, test_config, with_dns, write_config, zone};
use common::{Client, FakeMta, Gate, Script};
use portcullis::config::{Mode, Zone};
use std::sync::{Arc, Mutex};

/// A writer that collects log output for inspection.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn one_log_line_per_transaction_with_the_contract_keys() {
    let logs = Captured::default();
    let sink = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_writer(move || sink.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    tls_transaction(&logs).await;
    milter_transactions(&logs).await;
    explain_sees_what_the_session_saw(&logs).await;
    checks_transaction(&logs).await;
    contract_transactions(&logs).await;
    would_transactions(&logs).await;
    rate_limited_mail_through_both_doors(&logs).await;
    the_same_transactions_log_the_same_through_both_doors(&logs).await;

    let mta = FakeMta::start(Script::default().reply("rcpt", "550 5.1.1 no such user")).await;
    let mut cfg = test_config(mta.addr);
    cfg.limits.max_connections_per_ip = 1;
    let gate = Gate::start_config(cfg).await;
    let mut c = Client::connect_from(gate.addr, "127.0.0.10").await;
    c.reply().await;
    c.send(b"EHLO log.test\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<b@example.test>\r\nQUIT\r\n")
        .await;
    for _ in 0..4 {
        c.reply().await;
    }
    assert!(c.closed().await);
    // A connection refused by the per-IP limit gets its own line.
    let mut first = Client::connect_from(gate.addr, "127.0.0.11").await;
    first.reply().await;
    let mut second = Client::connect_from(gate.addr, "127.0.0.11").await;
    assert!(second.reply().await.starts_with("421 4.7.0"));
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| l.contains("\"transaction\"") && l.contains("a@sender.test"))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{text}");
    let l = &lines[0];
    assert!(l["session"].as_str().is_some_and(|s| s.len() == 14), "{l}");
    assert_eq!(l["client_ip"], "127.0.0.10");
    assert_eq!(l["mode"], "proxy");
    assert_eq!(l["helo"], "log.test");
    assert_eq!(l["mail_from"], "a@sender.test");
    assert_eq!(l["rcpt_count"], 0);
    assert_eq!(l["size"], 0);
    assert_eq!(l["verdict"], "reject");
    assert_eq!(l["code"], 550);
    assert_eq!(l["enhanced"], "5.1.1");
    assert_eq!(l["stage"], "rcpt");
    assert_eq!(l["reason"], "upstream");
    assert_eq!(l["upstream_reply"], "5.1.1 no such user");
    assert!(l["duration_ms"].is_number());
    let refused: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| l.contains("\"refused\""))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(refused.len(), 1, "{text}");
    let r = &refused[0];
    assert_eq!(r["client_ip"], "127.0.0.11");
    assert_eq!(r["verdict"], "reject");
    assert_eq!(r["stage"], "connect");
    assert_eq!(r["code"], 421);
    assert_eq!(r["enhanced"], "4.7.0");
    assert_eq!(r["reason"], "limit:connections_per_ip");
    assert!(r["session"].is_string() && r["code"].is_u64() && r["timestamp"].is_string());
    assert_contract(l);
    assert_eq!(l["tls"], false);
    assert_eq!(l["tls_version"], "");
}

/// Accepted over STARTTLS: the line carries the TLS version and cipher.
async fn tls_transaction(logs: &Captured) {
    let dir = std::env::temp_dir().join(format!("portcullis-log-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(dir.join("c.pem"), ck.cert.pem()).unwrap();
    std::fs::write(dir.join("k.pem"), ck.signing_key.serialize_pem()).unwrap();
    let mta = FakeMta::start(Script::default()).await;
    let mut cfg = test_config(mta.addr);
    cfg.tls = Some(portcullis::config::Tls {
        cert: dir.join("c.pem"),
        key: dir.join("k.pem"),
    });
    let gate = Gate::start_config(cfg).await;
    let mut c = Client::hello(gate.addr).await;
    c.cmd("STARTTLS", "220").await;
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    roots.add(ck.cert.der().clone()).unwrap();
    let config = tokio_rustls::rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = std::mem::replace(
        &mut c.sock,
        tokio::net::TcpStream::connect(gate.addr).await.unwrap(),
    );
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(
            tokio_rustls::rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tls.write_all(
        b"EHLO t.test\r\nMAIL FROM:<t@sender.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n",
    )
    .await
    .unwrap();
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("354") {
        let mut b = [0u8; 1024];
        let n = tls.read(&mut b).await.unwrap();
        seen.extend_from_slice(&b[..n]);
    }
    tls.write_all(b"Subject: t\r\n\r\nx\r\n.\r\n")
        .await
        .unwrap();
    let mut b = [0u8; 1024];
    let n = tls.read(&mut b).await.unwrap();
    assert!(b[..n].starts_with(b"250"));
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let line: serde_json::Value = text
        .lines()
        .filter(|l| l.contains("t@sender.test"))
        .map(|l| serde_json::from_str(l).unwrap())
        .next()
        .unwrap_or_else(|| panic!("no TLS transaction line in {text}"));
    assert_eq!(line["verdict"], "accept");
    assert_eq!(line["tls"], true);
    assert_eq!(line["tls_version"], "TLSv1_3");
    assert!(
        line["tls_cipher"]
            .as_str()
            .is_some_and(|c| c.starts_with("TLS13_")),
        "{line}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Refused by a DNSBL at RCPT: the line carries the check results.
async fn checks_transaction(logs: &Captured) {
    use common::dns::{FakeDns, a, txt};
    let dns = FakeDns::start(
        &["test."],
        vec![
            a("2.0.0.127.bl.test.", "127.0.0.2"),
            txt("pass.test.", "v=spf1 ip4:127.0.0.0/8 -all"),
        ],
    )
    .await;
    let mta = FakeMta::start(Script::default()).await;
    let mut cfg = test_config(mta.addr);
    cfg.dns.nameservers = vec![dns.addr];
    let c = &mut cfg.checks;
    (c.spf.mode, c.spf.helo) = (Mode::Enforce, false);
    (c.dkim.mode, c.dmarc.mode, c.arc.mode) = (Mode::Record, Mode::Record, Mode::Record);
    c.dnsbl.mode = Mode::Enforce;
    c.dnsbl.zones = vec![Zone {
        score: 20.0,
        ..zone("bl.test")
    }];
    let gate = Gate::start_config(cfg).await;
    let mut c = Client::connect_from(gate.addr, "127.0.0.2").await;
    c.reply().await;
    c.cmd("EHLO listed.test", "250").await;
    c.cmd("MAIL FROM:<bl@pass.test>", "250").await;
    c.cmd("RCPT TO:<b@example.test>", "550 5.7.1").await;
    c.cmd("RSET", "250").await;
    // Refused by a limit before any check ran: its line must not carry the
    // previous transaction's score.
    c.cmd("MAIL FROM:<big@pass.test> SIZE=999999999999", "552 5.3.4")
        .await;
    c.cmd("QUIT", "221").await;
    assert!(c.closed().await);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let big: serde_json::Value = text
        .lines()
        .filter(|l| l.contains("big@pass.test"))
        .map(|l| serde_json::from_str(l).unwrap())
        .next()
        .unwrap_or_else(|| panic!("no line in {text}"));
    assert_eq!(big["reason"], "limit:size");
    assert_eq!(big["score"], 0.0, "{big}");
    let line: serde_json::Value = text
        .lines()
        .filter(|l| l.contains("bl@pass.test"))
        .map(|l| serde_json::from_str(l).unwrap())
        .next()
        .unwrap_or_else(|| panic!("no line in {text}"));
    assert_eq!(line["verdict"], "reject");
    assert_eq!(line["stage"], "rcpt");
    assert_eq!(line["code"], 550);
    assert_eq!(line["enhanced"], "5.7.1");
    assert_eq!(line["reason"], "score:dnsbl:bl.test");
    assert_eq!(line["dnsbl"], "bl.test=127.0.0.2");
    assert_eq!(line["spf"], "pass");
    assert_eq!(line["score"], 20.0);
    assert_eq!(line["hits"], "dnsbl:bl.test=20");
}

/// Every key of the contract is present with the right type.
/// The milter front door writes the same line, with `mode=milter`: one
/// accepted message, and one refused at RCPT by a rule on the sender
/// (its line written when the MTA aborts the transaction).
async fn milter_transactions(logs: &Captured) {
    use common::milter::{Mta, POSTFIX_STEPS};
    use portcullis::wire::milter::{Command, Response};
    let dir = std::env::temp_dir().join(format!("portcullis-log-milter-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("r.yaml"),
        "rules:\n  - id: NO_SPAMMER\n    description: a sender we refuse\n    when: {mail_from: {exact: spammer@milter.test}}\n    action: reject\n",
    )
    .unwrap();
    let mta = FakeMta::start(Script::default()).await;
    let mut cfg = test_config(mta.addr);
    cfg.rules_dir = Some(dir);
    cfg.milter.listen = vec![portcullis::config::MilterListen::Tcp(
        "127.0.0.1:0".parse().unwrap(),
    )];
    let gate = Gate::start_config(cfg).await;
    let mut m = Mta::connect(gate.milter.unwrap(), POSTFIX_STEPS).await;
    m.connect_from("192.0.2.44", "client.example").await;
    m.helo("milter.example").await;
    m.mail("z@milter.test").await;
    m.rcpt("b@example.test").await;
    // Postfix's queue id, sent with the DATA and end-of-message macros.
    m.send(Command::Macros {
        stage: b'T',
        pairs: vec![(b"i".to_vec(), b"4ABC123DEF".to_vec())],
    })
    .await;
    let end = m.message("Subject: m\r\n\r\nbody\r\n").await;
    assert_eq!(end.last(), Some(&Response::Continue));
    m.mail("spammer@milter.test").await;
    assert!(matches!(
        m.rcpt("b@example.test").await,
        Response::ReplyCode(_)
    ));
    m.send(Command::Abort).await;
    m.send(Command::Quit).await;
    assert!(m.closed().await);
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let line = |from: &str| -> serde_json::Value {
        let found: Vec<serde_json::Value> = text
            .lines()
            .filter(|l| l.contains("\"transaction\"") && l.contains(from))
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(found.len(), 1, "{from}: {text}");
        found[0].clone()
    };
    let ok = line("\"z@milter.test\"");
    assert_contract(&ok);
    assert_eq!(ok["mode"], "milter");
    assert_eq!(ok["client_ip"], "192.0.2.44");
    assert_eq!(ok["helo"], "milter.example");
    assert_eq!(ok["verdict"], "accept");
    assert_eq!(ok["stage"], "data");
    assert_eq!(ok["rcpt_count"], 1);
    assert_eq!(ok["queue_id"], "4ABC123DEF");
    assert_eq!(ok["size"], "Subject: m\r\n\r\nbody\r\n".len());
    let refused = line("spammer@milter.test");
    assert_contract(&refused);
    assert_eq!(refused["mode"], "milter");
    assert_eq!(refused["verdict"], "reject");
    assert_eq!(refused["stage"], "rcpt");
    assert_eq!(refused["code"], 550);
    assert_eq!(refused["reason"], "rule:NO_SPAMMER");
    // The same keys as a proxy session's line.
    let proxy = text
        .lines()
        .filter(|l| l.contains("\"transaction\"") && l.contains("\"mode\":\"proxy\""))
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .next()
        .expect("a proxy line before this one");
    let keys = |v: &serde_json::Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(keys(&ok), keys(&proxy));
    // A proxied message accepted upstream names upstream's queue id.
    let accepted = text
        .lines()
        .filter(|l| l.contains("\"mode\":\"proxy\"") && l.contains("\"verdict\":\"accept\""))
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .next()
        .expect("an accepted proxy line before this one");
    assert_eq!(accepted["queue_id"], "FAKE", "{accepted}");
}

fn assert_contract(l: &serde_json::Value) {
    for k in [
        "timestamp",
        "mode",
        "session",
        "client_ip",
        "reverse",
        "helo",
        "tls_version",
        "tls_cipher",
        "mail_from",
        "verdict",
        "stage",
        "enhanced",
        "reason",
        "upstream_reply",
        "queue_id",
        "spf",
        "dkim",
        "dmarc",
        "arc",
        "iprev",
        "antivirus",
        "scanner",
        "scanner_symbols",
        "uribl",
        "dnsbl",
        "rules",
        "hits",
        "would",
    ] {
        assert!(l[k].is_string(), "{k} is not a string in {l}");
    }
    for k in ["rcpt_count", "size", "code"] {
        assert!(l[k].is_u64(), "{k} is not an integer in {l}");
    }
    for k in ["duration_ms", "score"] {
        assert!(l[k].is_number(), "{k} is not a number in {l}");
    }
    assert!(l["tls"].is_boolean(), "tls in {l}");
    assert!(
        ["accept", "tag", "reject", "tempfail", "abandoned"]
            .contains(&l["verdict"].as_str().unwrap())
    );
}

/// Accepted, rejected at DATA, and tempfailed transactions.
async fn contract_transactions(logs: &Captured) {
    let mta = FakeMta::start(Script::default().reply("rcpt", "451 4.2.0 try later")).await;
    let gate = Gate::start(mta.addr).await;
    let mut c = Client::connect_from(gate.addr, "127.0.0.12").await;
    c.reply().await;
    c.cmd("EHLO contract.test", "250").await;
    // Tempfailed at RCPT by upstream (then QUIT).
    c.cmd("MAIL FROM:<temp@contract.test>", "250").await;
    c.cmd("RCPT TO:<b@example.test>", "451").await;
    c.cmd("RSET", "250").await;
    c.cmd("QUIT", "221").await;
    let mta = FakeMta::start(Script::default()).await;
    let gate = Gate::start(mta.addr).await;
    let mut c = Client::connect_from(gate.addr, "127.0.0.12").await;
    c.reply().await;
    c.cmd("EHLO contract.test", "250").await;
    // Rejected at DATA (bare LF), then accepted.
    c.cmd("MAIL FROM:<data@contract.test>", "250").await;
    c.cmd("RCPT TO:<b@example.test>", "250").await;
    c.cmd("DATA", "354").await;
    c.send(b"Subject: x\r\n\r\nbare\nline\r\n.\r\n").await;
    assert!(c.reply().await.starts_with("550 5.5.2"));
    let r = c
        .send_mail(
            "ok@contract.test",
            &["b@example.test"],
            b"Subject: y\r\n\r\nfine\r\n",
        )
        .await;
    assert!(r.starts_with("250"));
    c.cmd("QUIT", "221").await;
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let find = |from: &str| -> serde_json::Value {
        text.lines()
            .filter(|l| l.contains("\"transaction\"") && l.contains(from))
            .map(|l| serde_json::from_str(l).unwrap())
            .next()
            .unwrap_or_else(|| panic!("no line for {from} in {text}"))
    };
    let t = find("temp@contract.test");
    assert_contract(&t);
    assert_eq!(
        (
            t["verdict"].as_str(),
            t["code"].as_u64(),
            t["stage"].as_str()
        ),
        (Some("tempfail"), Some(451), Some("rcpt"))
    );
    let d = find("data@contract.test");
    assert_contract(&d);
    assert_eq!(
        (
            d["verdict"].as_str(),
            d["code"].as_u64(),
            d["stage"].as_str()
        ),
        (Some("reject"), Some(550), Some("data"))
    );
    assert_eq!(d["reason"], "protocol:bare_newline");
    let a = find("ok@contract.test");
    assert_contract(&a);
    assert_eq!(
        (
            a["verdict"].as_str(),
            a["code"].as_u64(),
            a["rcpt_count"].as_u64()
        ),
        (Some("accept"), Some(250), Some(1))
    );
}

/// One transaction through the proxy and through `portcullis explain`,
/// from the same config: every check result, every rule hit (at connect,
/// HELO, MAIL, RCPT and DATA, including the client's verified name and
/// `tls: false`), the score, the verdict and the header block agree,
/// because both drive the same `checks::Screen`.
async fn explain_sees_what_the_session_saw(logs: &Captured) {
    use base64::Engine;
    use common::dns::{FakeDns, a, ptr, txt};
    use mail_auth::crypto::Ed25519Key;
    use mail_auth::dkim::DkimSigner;
    use mail_auth::headers::HeaderWriter;
    use portcullis::cli::explain;
    let der = Ed25519Key::generate_pkcs8().unwrap();
    let key = Ed25519Key::from_pkcs8_der(&der).unwrap();
    let p = base64::engine::general_purpose::STANDARD.encode(key.public_key());
    let dns = FakeDns::start(
        &["test.", "in-addr.arpa."],
        vec![
            a("2.0.0.127.bl.test.", "127.0.0.2"),
            a("9.113.0.203.bl.test.", "127.0.0.2"),
            ptr("9.113.0.203.in-addr.arpa.", "good.test."),
            a("good.test.", "203.0.113.9"),
            txt("signed.test.", "v=spf1 ip4:203.0.113.0/24 -all"),
            txt("_dmarc.signed.test.", "v=DMARC1; p=reject"),
            txt(
                "ed._domainkey.signed.test.",
                &format!("v=DKIM1; k=ed25519; p={p}"),
            ),
        ],
    )
    .await;
    let dir = std::env::temp_dir().join(format!("portcullis-explain-same-{}", std::process::id()));
    let rules = dir.join("rules");
    std::fs::create_dir_all(&rules).unwrap();
    std::fs::write(
        rules.join("50-every-stage.yaml"),
        r#"rules:
  - {id: GOOD_NAME, description: good_name, when: {reverse: {domain: [good.test]}}, action: {score: 0.5}}
  - {id: HELO_SEEN, description: helo_seen, when: {helo: {exact: [mx.good.test]}}, action: {score: 0.25}}
  - {id: CLEAR_TEXT, description: clear_text, when: {tls: false}, action: {score: 0.125}}
  - {id: SPF_PASS, description: spf_pass, when: {spf: [pass]}, action: {score: -0.5}}
  - {id: LISTED, description: listed, when: {dnsbl: [bl.test]}, action: {score: 1}}
  - {id: IPREV_PASS, description: iprev_pass, when: {iprev: [pass]}, action: log}
  - {id: RCPT_HERE, description: rcpt_here, when: {rcpt_domain: {domain: [example.test]}}, action: {add_header: {name: X-Here, value: "yes"}}}
  - {id: DKIM_PASS, description: dkim_pass, when: {dkim: [pass]}, action: {score: 2}}
  - {id: NAMED_LOTTERY, description: named_lottery, when: {all: [{reverse: {domain: [good.test]}}, {subject: {regex: lottery}}]}, action: {score: 0.0625}}
  - {id: LOTTERY, description: lottery, when: {body: {regex: lottery}}, action: {score: 3}, mode: shadow}
"#,
    )
    .unwrap();
    let mta = FakeMta::start(Script::default()).await;
    let mut cfg = test_config(mta.addr);
    behind_proxy(&mut cfg);
    with_dns(&mut cfg, dns.addr);
    cfg.rules_dir = Some(rules.clone());
    let c = &mut cfg.checks;
    c.thresholds.tag = Some(3.0);
    for m in [
        &mut c.spf.mode,
        &mut c.dkim.mode,
        &mut c.dmarc.mode,
        &mut c.iprev.mode,
    ] {
        *m = Mode::Enforce;
    }
    c.arc.mode = Mode::Record;
    c.dnsbl.mode = Mode::Enforce;
    c.dnsbl.zones = vec![Zone {
        score: 1.0,
        ..zone("bl.test")
    }];
    // explain reads the config as an admin's file; the gate gets the same.
    let path = dir.join("portcullis.yaml");
    write_config(&path, &cfg);
    let msg = "From: a@signed.test\r\nTo: b@example.test\r\nSubject: lottery\r\n\r\nYou won the lottery.\r\n";
    let sig = DkimSigner::from_key(key)
        .domain("signed.test")
        .selector("ed")
        .headers(["From", "To", "Subject"])
        .sign(msg.as_bytes())
        .unwrap();
    let msg = format!("{}{msg}", sig.to_header());

    let gate = Gate::start_config(cfg).await;
    let mut c = Client::connect(gate.addr).await;
    c.send(b"PROXY TCP4 203.0.113.9 127.0.0.1 40000 25\r\n")
        .await;
    assert!(c.reply().await.starts_with("220"));
    c.cmd("EHLO mx.good.test", "250").await;
    let r = c
        .send_mail("a@signed.test", &["b@example.test"], msg.as_bytes())
        .await;
    assert!(r.starts_with("250"), "{r}");
    c.cmd("QUIT", "221").await;
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let line: serde_json::Value = text
        .lines()
        .filter(|l| l.contains("\"transaction\"") && l.contains("203.0.113.9"))
        .map(|l| serde_json::from_str(l).unwrap())
        .next()
        .unwrap_or_else(|| panic!("no line in {text}"));

    let cfg = portcullis::config::Config::load(Some(&path)).unwrap();
    let x = explain::run(
        cfg,
        &explain::Sample {
            ip: "203.0.113.9".parse().unwrap(),
            helo: "mx.good.test".into(),
            from: "a@signed.test".into(),
            rcpts: vec!["b@example.test".into()],
            message: Some(msg.into_bytes()),
            tls: false,
            no_dns: false,
        },
    )
    .await
    .unwrap();
    let data = x.data.as_ref().expect("the DATA stage ran");
    let seen = serde_json::json!({
        "spf": x.log.spf, "dkim": x.log.dkim, "dmarc": x.log.dmarc,
        "iprev": x.log.iprev, "arc": x.log.arc, "dnsbl": x.log.dnsbl.join(" "),
        "rules": x.log.rules.join(" "), "hits": x.log.hits.join(" "),
        "score": data.outcome.score,
        "verdict": match data.outcome.decision {
            portcullis::verdict::Decision::Tag => "tag",
            portcullis::verdict::Decision::Accept => "accept",
            _ => "refused",
        },
    });
    let keys = [
        "spf", "dkim", "dmarc", "iprev", "arc", "dnsbl", "rules", "hits", "score", "verdict",
    ];
    let logged: serde_json::Map<String, serde_json::Value> = keys
        .iter()
        .map(|k| (k.to_string(), line[*k].clone()))
        .collect();
    assert_eq!(
        serde_json::Value::Object(logged),
        seen,
        "session vs explain"
    );
    // Not vacuous: each stage contributed, and the rules saw the client's
    // verified name and the clear-text session at every stage (before the
    // one screen, explain's RCPT and DATA rules saw no name: NAMED_LOTTERY).
    assert_eq!(line["spf"], "pass");
    assert_eq!(line["dkim"], "pass");
    assert_eq!(line["dmarc"], "pass");
    assert_eq!(line["iprev"], "pass");
    assert_eq!(line["dnsbl"], "bl.test=127.0.0.2");
    assert_eq!(
        line["rules"],
        "GOOD_NAME CLEAR_TEXT LISTED IPREV_PASS HELO_SEEN SPF_PASS RCPT_HERE DKIM_PASS NAMED_LOTTERY LOTTERY(shadow)"
    );
    assert_eq!(line["verdict"], "tag");
    // The same header block reached upstream as explain shows.
    let stored = mta.stored();
    assert_eq!(stored.len(), 1);
    let data_text = String::from_utf8_lossy(&stored[0].data);
    assert!(
        data_text.starts_with(&data.headers),
        "upstream got:\n{data_text}\nexplain:\n{}",
        data.headers
    );
    assert!(data.headers.contains("X-Here: yes"), "{}", data.headers);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Record-mode checks and shadow rules log what enforcing each alone would
/// have done (`would`), and `stats` turns real lines into the what-if table.
async fn would_transactions(logs: &Captured) {
    use common::dns::{FakeDns, a};
    use portcullis::config::Action;
    let dns = FakeDns::start(&["test."], vec![a("2.0.0.127.bl.test.", "127.0.0.2")]).await;
    let dir = std::env::temp_dir().join(format!("portcullis-log-would-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("r.yaml"),
        "rules:
  - id: OFFER
    description: enforced, scores 10
    when: {subject: {regex: offer}}
    action: {score: 10}
  - id: SHADOW_BUY
    description: shadow, would reject
    when: {subject: {regex: buy now}}
    action: reject
    mode: shadow
  - id: SHADOW_SIX
    description: shadow, would add 6 (16 with OFFER, over reject 15)
    when: {subject: {regex: offer}}
    action: {score: 6}
    mode: shadow
  - id: SHADOW_LOG
    description: shadow, only logs
    when: {subject: {regex: buy now}}
    action: log
    mode: shadow
",
    )
    .unwrap();
    let mta = FakeMta::start(Script::default()).await;
    let mut cfg = test_config(mta.addr);
    cfg.dns.nameservers = vec![dns.addr];
    cfg.rules_dir = Some(dir);
    cfg.checks.dnsbl.mode = Mode::Record;
    cfg.checks.dnsbl.zones = vec![Zone {
        action: Some(Action::Reject),
        ..zone("bl.test")
    }];
    let gate = Gate::start_config(cfg).await;
    for (ip, from, subject) in [
        ("127.0.0.2", "w1@would.test", "buy now"),
        ("127.0.0.7", "w2@would.test", "special offer"),
        ("127.0.0.7", "w3@other.test", "hello"),
    ] {
        let mut c = Client::connect_from(gate.addr, ip).await;
        c.reply().await;
        c.cmd("EHLO would.test", "250").await;
        let r = c
            .send_mail(
                from,
                &["b@example.test"],
                format!("Subject: {subject}\r\n\r\nhi\r\n").as_bytes(),
            )
            .await;
        assert!(r.starts_with("250"), "{subject}: {r}");
        c.cmd("QUIT", "221").await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let ours: Vec<String> = text
        .lines()
        .filter(|l| l.contains("\"transaction\"") && l.contains("would.test"))
        .map(String::from)
        .collect();
    let line = |from: &str| -> serde_json::Value {
        ours.iter()
            .find(|l| l.contains(from))
            .map(|l| serde_json::from_str(l).unwrap())
            .unwrap_or_else(|| panic!("no line for {from} in {text}"))
    };
    let (w1, w2, w3) = (line("w1@"), line("w2@"), line("w3@"));
    assert_eq!(w1["verdict"], "accept");
    assert_eq!(
        w1["would"], "dnsbl:bl.test=reject rule:SHADOW_BUY=reject",
        "{w1}"
    );
    assert_eq!(w1["rules"], "SHADOW_BUY(shadow) SHADOW_LOG(shadow)");
    assert_eq!(w2["verdict"], "tag");
    assert_eq!(w2["would"], "rule:SHADOW_SIX=reject", "{w2}");
    assert_eq!(
        w2["hits"], "rule:OFFER=10",
        "a shadow rule adds nothing: {w2}"
    );
    assert_eq!(w3["would"], "", "{w3}");

    let report = portcullis::cli::stats::compute(
        ours.into_iter(),
        &portcullis::cli::stats::Window::default(),
    );
    let rows: Vec<(String, u64, u64, u64, u64)> = report
        .what_if
        .iter()
        .map(|w| {
            (
                w.name.clone(),
                w.fired,
                w.would_reject,
                w.would_tempfail,
                w.otherwise_accepted,
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("dnsbl:bl.test".into(), 1, 1, 0, 1),
            ("rule:SHADOW_BUY".into(), 1, 1, 0, 1),
            ("rule:SHADOW_SIX".into(), 1, 1, 0, 1),
        ]
    );
    let hit = &report.what_if[0];
    assert_eq!(hit.top_sender_domains[0].name, "would.test");
    assert_eq!(hit.top_networks[0].name, "127.0.0.0/24");
}

/// A MAIL refused by a rate limit names the limit in its log line through
/// either door (the proxy logged no check keys for it before).
async fn rate_limited_mail_through_both_doors(logs: &Captured) {
    use common::milter::{Mta, POSTFIX_STEPS};
    use portcullis::config::{MilterListen, RateCount, RateKey};
    use portcullis::wire::milter::Response;
    let mta = FakeMta::start(Script::default()).await;
    let mut cfg = test_config(mta.addr);
    cfg.checks.rate_limits = vec![common::config::rate_limit(
        "one_per_sender",
        RateKey::Sender,
        RateCount::Transactions,
        1,
        3600,
    )];
    cfg.milter.listen = vec![MilterListen::Tcp("127.0.0.1:0".parse().unwrap())];
    let gate = Gate::start_config(cfg).await;
    let mut c = Client::connect_from(gate.addr, "127.0.0.31").await;
    c.reply().await;
    c.cmd("EHLO doors.test", "250").await;
    c.cmd("MAIL FROM:<limited@proxy.test>", "250").await;
    c.cmd("RSET", "250").await;
    c.cmd("MAIL FROM:<limited@proxy.test>", "451 4.7.1").await;
    c.cmd("QUIT", "221").await;
    let mut m = Mta::connect(gate.milter.unwrap(), POSTFIX_STEPS).await;
    m.connect_from("127.0.0.31", "doors.test").await;
    m.helo("doors.test").await;
    m.mail("limited@milter.test").await;
    m.send(portcullis::wire::milter::Command::Abort).await;
    // Postfix does not wait at MAIL: the refusal comes at RCPT, logged as
    // reached at MAIL, as in proxy mode.
    assert_eq!(m.mail("limited@milter.test").await, None);
    assert!(matches!(
        m.rcpt("b@example.test").await,
        Response::ReplyCode(_)
    ));
    m.send(portcullis::wire::milter::Command::Quit).await;
    assert!(m.closed().await);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let refused = |from: &str| -> serde_json::Value {
        let found: Vec<serde_json::Value> = text
            .lines()
            .filter(|l| l.contains("\"transaction\"") && l.contains(from))
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|l| l["verdict"] == "tempfail")
            .collect();
        assert_eq!(found.len(), 1, "{from}: {text}");
        found[0].clone()
    };
    let (proxy, milter) = (
        refused("limited@proxy.test"),
        refused("limited@milter.test"),
    );
    for l in [&proxy, &milter] {
        assert_contract(l);
        assert_eq!(l["stage"], "mail", "{l}");
        assert_eq!(l["rate_limit"], "one_per_sender", "{l}");
    }
    assert_eq!(proxy["reason"], milter["reason"]);
    assert_eq!(proxy["code"], milter["code"]);
    assert_eq!(proxy["enhanced"], milter["enhanced"]);
}

/// The same transactions through the proxy and through the milter (each
/// door on its own gate with the same config, so each starts with the
/// same state): rate-limited MAIL, refused RCPT, accepted and tagged,
/// abandoned, oversized, over the memory budget, a virus (clamd). Their log lines are equal
/// key for key but for the door (`mode`), the MTA's queue id and reply
/// (the milter has no upstream of its own), the session and the times.
async fn the_same_transactions_log_the_same_through_both_doors(logs: &Captured) {
    use common::milter::{Mta, POSTFIX_STEPS};
    use portcullis::config::{MilterListen, RateCount, RateKey};
    use portcullis::wire::milter::Command;
    let dir = std::env::temp_dir().join(format!("portcullis-two-doors-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("r.yaml"),
        "rules:\n  - id: NO_NOBODY\n    description: a recipient we refuse\n    when: {rcpt: {exact: nobody@example.test}}\n    action: reject\n  - id: TAG_ME\n    description: tagged\n    when: {subject: {regex: tagme}}\n    action: {score: 6}\n",
    )
    .unwrap();
    let mta = FakeMta::start(Script::default()).await;
    let mut cfg = test_config(mta.addr);
    cfg.rules_dir = Some(dir);
    cfg.checks.rate_limits = vec![common::config::rate_limit(
        "one_per_sender",
        RateKey::Sender,
        RateCount::Transactions,
        1,
        3600,
    )];
    cfg.limits.max_message_size = common::config::kib(100);
    cfg.limits.memory_budget = common::config::kib(128);
    cfg.milter.listen = vec![MilterListen::Tcp("127.0.0.1:0".parse().unwrap())];
    let clamd = common::clamd::FakeClamd::start(b"VIRUS-MARKER-2d9", "Doors.Test.Virus").await;
    cfg.checks.antivirus.mode = portcullis::config::Mode::Enforce;
    cfg.checks.antivirus.clamd = MilterListen::Tcp(clamd.addr);
    // A URL blocklist on a DNS server on loopback, and a scripted rspamd.
    let dns = common::dns::FakeDns::start(
        &["test."],
        vec![
            common::dns::a("test.dbl.test.", "127.0.1.2"),
            common::dns::a("spammy.com.dbl.test.", "127.0.1.2"),
        ],
    )
    .await;
    common::config::with_dns(&mut cfg, dns.addr);
    cfg.checks.uribl.mode = portcullis::config::Mode::Enforce;
    cfg.checks.uribl.zones = vec![portcullis::config::Zone {
        kind: portcullis::config::ZoneType::Domain,
        action: Some(portcullis::config::Action::Reject),
        ..common::config::zone("dbl.test")
    }];
    let rspamd = common::scanner::FakeRspamd::start(vec![(
        "CHEAP-PILLS",
        common::scanner::answer(
            9.0,
            "add header",
            &[("BAYES_SPAM", 5.1), ("FUZZY_DENIED", 3.9)],
        ),
    )])
    .await;
    cfg.checks.scanner.mode = portcullis::config::Mode::Enforce;
    cfg.checks.scanner.address = rspamd.addr;
    let proxy_gate = Gate::start_config(cfg.clone()).await;
    let milter_gate = Gate::start_config(cfg).await;
    let tagged = "Subject: tagme\r\n\r\nhello\r\n".to_string();
    let line = "y".repeat(70) + "\r\n";
    let oversized = format!("Subject: big\r\n\r\n{}", line.repeat(1700)); // ~120 KB
    let over_budget = format!("Subject: parse\r\n\r\n{}", line.repeat(1000)); // ~72 KB
    let virus = "Subject: invoice\r\n\r\nVIRUS-MARKER-2d9\r\n".to_string();
    let link = "Subject: deal\r\nContent-Type: text/html\r\n\r\n<a href=\"https://www.spammy.com/\">your bank</a>\r\n".to_string();
    let pills = "Subject: health\r\n\r\nCHEAP-PILLS\r\n".to_string();

    // Through the proxy.
    let mut c = Client::connect_from(proxy_gate.addr, "127.0.0.41").await;
    c.reply().await;
    c.cmd("EHLO doors.test", "250").await;
    let r = c
        .send_mail(
            "limited@doors.test",
            &["ok@example.test"],
            tagged.as_bytes(),
        )
        .await;
    assert!(r.starts_with("250"), "{r}");
    c.cmd("MAIL FROM:<limited@doors.test>", "451").await;
    c.cmd("MAIL FROM:<refused@doors.test>", "250").await;
    c.cmd("RCPT TO:<nobody@example.test>", "550").await;
    c.cmd("RSET", "250").await;
    c.cmd("MAIL FROM:<abandoned@doors.test>", "250").await;
    c.cmd("RCPT TO:<ok@example.test>", "250").await;
    c.cmd("RSET", "250").await;
    for (from, msg, want) in [
        ("big@doors.test", &oversized, "552"),
        ("parse@doors.test", &over_budget, "452"),
        ("virus@doors.test", &virus, "554"),
        ("link@doors.test", &link, "554"),
        ("pills@doors.test", &pills, "250"),
    ] {
        c.cmd(&format!("MAIL FROM:<{from}>"), "250").await;
        c.cmd("RCPT TO:<ok@example.test>", "250").await;
        c.cmd("DATA", "354").await;
        let mut wire = Vec::new();
        portcullis::wire::data::write_stuffed(msg.as_bytes(), |s| wire.extend_from_slice(s));
        c.send(&wire).await;
        let r = c.reply().await;
        assert!(r.starts_with(want), "{from}: {r}");
    }
    c.cmd("QUIT", "221").await;

    // Through the milter.
    let mut m = Mta::connect(milter_gate.milter.unwrap(), POSTFIX_STEPS).await;
    m.connect_from("127.0.0.41", "doors.test").await;
    m.helo("doors.test").await;
    m.mail("limited@doors.test").await;
    m.rcpt("ok@example.test").await;
    m.message(&tagged).await;
    m.mail("limited@doors.test").await;
    m.mail("refused@doors.test").await;
    m.rcpt("nobody@example.test").await;
    m.send(Command::Abort).await;
    m.mail("abandoned@doors.test").await;
    m.rcpt("ok@example.test").await;
    m.send(Command::Abort).await;
    for (from, msg) in [
        ("big@doors.test", &oversized),
        ("parse@doors.test", &over_budget),
        ("virus@doors.test", &virus),
        ("link@doors.test", &link),
        ("pills@doors.test", &pills),
    ] {
        m.mail(from).await;
        m.rcpt("ok@example.test").await;
        m.message(msg).await;
    }
    m.send(Command::Quit).await;
    assert!(m.closed().await);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;

    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let lines = |mode: &str| -> Vec<serde_json::Value> {
        text.lines()
            .filter(|l| l.contains("\"transaction\"") && l.contains("@doors.test"))
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|l| l["mode"] == mode && l["client_ip"] == "127.0.0.41")
            .collect()
    };
    let (proxy, milter) = (lines("proxy"), lines("milter"));
    let wanted = [
        ("limited@doors.test", "tag"),
        ("limited@doors.test", "tempfail"),
        ("refused@doors.test", "reject"),
        ("abandoned@doors.test", "abandoned"),
        ("big@doors.test", "reject"),
        ("parse@doors.test", "tempfail"),
        ("virus@doors.test", "reject"),
        ("link@doors.test", "reject"),
        ("pills@doors.test", "tag"),
    ];
    assert_eq!(proxy.len(), wanted.len(), "{proxy:#?}");
    assert_eq!(milter.len(), wanted.len(), "{milter:#?}");
    let differ = [
        "mode",
        "queue_id",
        "upstream_reply",
        "session",
        "timestamp",
        "duration_ms",
    ];
    for ((p, m), (from, verdict)) in proxy.iter().zip(&milter).zip(wanted) {
        assert_eq!(p["mail_from"], from, "{p}");
        assert_eq!(p["verdict"], verdict, "{p}");
        let (p, m) = (p.as_object().unwrap(), m.as_object().unwrap());
        let keys = |o: &serde_json::Map<String, serde_json::Value>| -> Vec<String> {
            o.keys()
                .filter(|k| !differ.contains(&k.as_str()))
                .cloned()
                .collect()
        };
        assert_eq!(keys(p), keys(m), "the same keys");
        if from == "virus@doors.test" {
            assert_eq!(p["antivirus"], "virus:Doors.Test.Virus", "{p:?}");
            assert_eq!(p["reason"], "antivirus:Doors.Test.Virus", "{p:?}");
            assert_eq!(
                (&p["code"], &p["enhanced"]),
                (&serde_json::json!(554), &serde_json::json!("5.7.0")),
                "{p:?}"
            );
        }
        if from == "link@doors.test" {
            assert_eq!(p["uribl"], "dbl.test:spammy.com=127.0.1.2", "{p:?}");
            assert_eq!(p["reason"], "uribl:dbl.test", "{p:?}");
        }
        if from == "pills@doors.test" {
            assert_eq!(p["scanner"], "rspamd:9.00:add_header", "{p:?}");
            assert_eq!(
                p["scanner_symbols"], "BAYES_SPAM=5.10 FUZZY_DENIED=3.90",
                "{p:?}"
            );
        }
        for k in keys(p) {
            assert_eq!(
                p[&k], m[&k],
                "{from} {verdict}: key {k}\nproxy:  {p:?}\nmilter: {m:?}"
            );
        }
    }
}
