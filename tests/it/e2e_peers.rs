//! End to end with real peers: swaks -> Portcullis -> Postfix (XCLIENT and
//! PROXY) and -> Exim (PROXY). Ignored by default because they need the
//! programs; `.ci/run` installs them and runs these with `--include-ignored`.
//! Each test starts its own peer on free loopback ports under a temp dir.

use crate::common;

use common::Gate;
use common::config::{behind_proxy, in_front_of, secs, zone};
use common::peers::{Postfix, one_mail, peer_port, render, run, wait_port};
use portcullis::config::{Action, IdentityMode, Mode, Zone};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn swaks(gate: std::net::SocketAddr, from_ip: &str, extra: &[&str]) -> String {
    let mut cmd = Command::new("swaks");
    cmd.args([
        "--server",
        "127.0.0.1",
        "--port",
        &gate.port().to_string(),
        "--local-interface",
        from_ip,
        "--helo",
        "client.sender.test",
        "--from",
        "alice@sender.test",
        "--to",
        "bob@example.test",
        "--header",
        "Subject: through the gate",
        "--body",
        "Hello from swaks.\n.leading dot line\n",
        "--timeout",
        "20",
    ]);
    cmd.args(extra);
    run(&mut cmd)
}

async fn gate_for(port: u16, identity: IdentityMode) -> Gate {
    Gate::start_config(in_front_of(port, identity)).await
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs Postfix and swaks (installed by .ci/run)"]
async fn swaks_through_portcullis_into_postfix_with_xclient() {
    let pf = Postfix::start("xclient");
    let gate = gate_for(pf.port, IdentityMode::Auto).await;
    let addr = gate.addr;
    let out = tokio::task::spawn_blocking(move || swaks(addr, "127.0.0.9", &[]))
        .await
        .unwrap();
    // Postfix's reply to BDAT names the size: the message went to it as
    // one chunk (Postfix offers CHUNKING).
    assert!(out.contains(" bytes queued as "), "{out}");
    let mail = one_mail(&pf.inbox());
    // Postfix saw the client, not Portcullis (127.0.0.1), through XCLIENT.
    assert!(
        mail.contains("from client.sender.test (unknown [127.0.0.9])"),
        "{mail}"
    );
    assert!(mail.contains("Subject: through the gate"));
    assert!(mail.contains("\n.leading dot line"), "{mail}");
    let log = std::fs::read_to_string(pf.run.join("maillog")).unwrap_or_default();
    assert!(log.contains("client=unknown[127.0.0.9]"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs Postfix and swaks (installed by .ci/run)"]
async fn swaks_through_portcullis_into_postfix_with_proxy_protocol() {
    let pf = Postfix::start("proxy");
    for (i, mode) in [IdentityMode::ProxyV1, IdentityMode::ProxyV2]
        .into_iter()
        .enumerate()
    {
        let gate = gate_for(pf.proxy_port, mode).await;
        let addr = gate.addr;
        let ip = format!("127.0.0.{}", 20 + i);
        let ip2 = ip.clone();
        let out = tokio::task::spawn_blocking(move || swaks(addr, &ip2, &[]))
            .await
            .unwrap();
        assert!(out.contains(" bytes queued as "), "{mode:?}: {out}");
        let until = Instant::now() + Duration::from_secs(30);
        let needle = format!("from client.sender.test (unknown [{ip}])");
        let mut found = false;
        while Instant::now() < until && !found {
            found = std::fs::read_dir(pf.inbox())
                .map(|rd| {
                    rd.filter_map(|e| e.ok()).any(|e| {
                        std::fs::read_to_string(e.path()).is_ok_and(|m| m.contains(&needle))
                    })
                })
                .unwrap_or(false);
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(found, "{mode:?}: no message from {ip}");
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a refused transaction to stay out of Postfix (Postfix installed by .ci/run)"]
async fn refused_size_never_reaches_postfix() {
    let pf = Postfix::start("refused");
    let gate = gate_for(pf.port, IdentityMode::Xclient).await;
    let mut c = common::Client::hello(gate.addr).await;
    c.cmd("MAIL FROM:<a@sender.test> SIZE=999999999", "552 5.3.4")
        .await;
    c.cmd("QUIT", "221").await;
    std::thread::sleep(Duration::from_millis(500));
    let log = std::fs::read_to_string(pf.run.join("maillog")).unwrap_or_default();
    // Refused before MAIL reached upstream: Postfix never even got a connection
    // carrying this client (only the capability probe, as 127.0.0.1).
    assert!(!log.contains("a@sender.test"), "{log}");
}

struct Exim {
    run: PathBuf,
    port: u16,
    proxy_port: u16,
}

const EXIM: &str = "/opt/exim4/usr/sbin/exim4";

impl Exim {
    fn start(name: &str) -> Exim {
        let exim = std::env::var("EXIM").unwrap_or_else(|_| EXIM.to_string());
        let base =
            std::env::temp_dir().join(format!("portcullis-e2e-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let run_dir = base.join("run");
        for d in ["spool", "log", "mail"] {
            std::fs::create_dir_all(run_dir.join(d)).unwrap();
        }
        let (port, proxy_port) = (peer_port(), peer_port());
        let t = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/exim/exim.conf"),
        )
        .unwrap();
        let conf = base.join("exim.conf");
        std::fs::write(&conf, render(&t, &run_dir, port, proxy_port)).unwrap();
        run(Command::new("chown").args([
            "-R",
            "Debian-exim:Debian-exim",
            run_dir.to_str().unwrap(),
        ]));
        let version = run(Command::new(&exim)
            .arg("-C")
            .arg(&conf)
            .arg(format!("-DEXIM_PATH={exim}"))
            .arg("-bV"));
        assert!(
            version.contains("PROXY"),
            "this Exim has no PROXY support: {version}"
        );
        run(Command::new(&exim)
            .arg("-C")
            .arg(&conf)
            .arg(format!("-DEXIM_PATH={exim}"))
            .arg("-DPROXY=1")
            .args(["-bd", "-q1m"]));
        wait_port(port);
        wait_port(proxy_port);
        Exim {
            run: run_dir,
            port,
            proxy_port,
        }
    }
}

impl Drop for Exim {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self.run.join("exim.pid")) {
            let _ = Command::new("kill").arg(pid.trim()).output();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs Exim (heavy build, unpacked by .ci/run) and swaks"]
async fn swaks_through_portcullis_into_exim_with_proxy_v2() {
    let ex = Exim::start("exim");
    let _ = ex.port;
    let gate = gate_for(ex.proxy_port, IdentityMode::Auto).await;
    let addr = gate.addr;
    let out = tokio::task::spawn_blocking(move || swaks(addr, "127.0.0.11", &[]))
        .await
        .unwrap();
    assert!(out.contains("250 OK id="), "{out}");
    let mail = one_mail(&ex.run.join("mail/inbox/new"));
    // Exim saw the client address from the PROXY header, not Portcullis's.
    assert!(
        mail.contains("from [127.0.0.11] (helo=client.sender.test)"),
        "{mail}"
    );
    assert!(mail.contains("Subject: through the gate"));
}

/// Checks end to end: DNS from an authoritative server on loopback
/// (hickory-server in-process), Postfix behind Portcullis, swaks as client.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs Postfix and swaks (installed by .ci/run)"]
async fn checks_end_to_end_into_postfix() {
    use base64::Engine;
    use common::dns::{FakeDns, a, txt};
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
    let pf = Postfix::start("checks");
    let mut cfg = in_front_of(pf.port, IdentityMode::Xclient);
    (cfg.dns.nameservers, cfg.dns.timeout) = (vec![dns.addr], secs(2));
    let c = &mut cfg.checks;
    c.spf.mode = Mode::Enforce;
    c.spf.helo = false;
    c.dkim.mode = Mode::Enforce;
    c.dmarc.mode = Mode::Enforce;
    c.arc.mode = Mode::Record;
    c.dnsbl.mode = Mode::Enforce;
    c.dnsbl.zones = vec![Zone {
        action: Some(Action::Reject),
        ..zone("bl.test")
    }];
    let gate = Gate::start_config(cfg).await;

    // A listed client: refused at RCPT naming the zone; Postfix never sees it.
    let addr = gate.addr;
    let out = tokio::task::spawn_blocking(move || {
        let out = Command::new("swaks")
            .args(["--server", "127.0.0.1", "--port", &addr.port().to_string()])
            .args(["--local-interface", "127.0.0.2", "--helo", "listed.test"])
            .args([
                "--from",
                "spam@pass.test",
                "--to",
                "bob@example.test",
                "--timeout",
                "20",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    })
    .await
    .unwrap();
    assert!(
        out.contains("<** 550 5.7.1 Service unavailable; client [127.0.0.2] blocked using bl.test; Listed for testing"),
        "{out}"
    );

    // A signed message from a clean client arrives with our results.
    let msg = "From: alice@signed.test\r\nTo: bob@example.test\r\nSubject: signed through the gate\r\n\r\nHello.\r\n";
    let sig = mail_auth::dkim::DkimSigner::from_key(key)
        .domain("signed.test")
        .selector("ed")
        .headers(["From", "To", "Subject"])
        .sign(msg.as_bytes())
        .unwrap();
    let file = pf.run.join("signed.eml");
    // swaks sends the file's lines with CRLF itself: store it with LF.
    std::fs::write(
        &file,
        format!("{}{msg}", sig.to_header()).replace("\r\n", "\n"),
    )
    .unwrap();
    let out = tokio::task::spawn_blocking(move || {
        run(Command::new("swaks")
            .args(["--server", "127.0.0.1", "--port", &addr.port().to_string()])
            .args(["--local-interface", "127.0.0.7", "--helo", "clean.test"])
            .args([
                "--from",
                "alice@pass.test",
                "--to",
                "bob@example.test",
                "--timeout",
                "20",
            ])
            .arg("--data")
            .arg(format!("@{}", file.display())))
    })
    .await
    .unwrap();
    assert!(out.contains(" bytes queued as "), "{out}");
    let mail = one_mail(&pf.inbox());
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
    let log = std::fs::read_to_string(pf.run.join("maillog")).unwrap_or_default();
    assert!(
        !log.contains("spam@pass.test") && !log.contains("127.0.0.2"),
        "{log}"
    );
}

/// The client reaches Postfix as Postfix would have seen it: the name from
/// PTR plus forward confirmation goes in XCLIENT with iprev off, and
/// `reject_unknown_client_hostname` answers through the gate exactly as it
/// answers a session that carries what Postfix's own lookup would find
/// (Postfix cannot resolve here: its resolver points off this machine, so
/// that session tells it the name with XCLIENT).
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs Postfix (installed by .ci/run)"]
async fn client_name_reaches_postfix_as_its_own_lookup_would() {
    use common::Client;
    use common::dns::{FakeDns, ResponseCode, a, ptr};
    let dns = FakeDns::start_failing(
        &["test.", "in-addr.arpa."],
        vec![
            ptr("9.113.0.203.in-addr.arpa.", "good.test."),
            a("good.test.", "203.0.113.9"),
            ptr("8.113.0.203.in-addr.arpa.", "liar.test."),
            a("liar.test.", "192.0.2.99"),
        ],
        &[("6.113.0.203.in-addr.arpa.", ResponseCode::ServFail)],
    )
    .await;
    let pf = Postfix::start_with(
        "names",
        "smtpd_client_restrictions = reject_unknown_client_hostname\nunknown_client_reject_code = 550\n",
    );
    let mut cfg = in_front_of(pf.port, IdentityMode::Xclient);
    behind_proxy(&mut cfg);
    (cfg.dns.nameservers, cfg.dns.timeout, cfg.dns.attempts) = (vec![dns.addr], secs(1), 1);
    let gate = Gate::start_config(cfg).await;
    let direct: std::net::SocketAddr = format!("127.0.0.1:{}", pf.port).parse().unwrap();
    // (client, what Postfix's own lookup finds, RCPT code, enhanced code)
    for (ip, name, code) in [
        ("203.0.113.9", "good.test", "250"),
        ("203.0.113.8", "[UNAVAILABLE]", "550 5.7.25"),
        ("203.0.113.7", "[UNAVAILABLE]", "550 5.7.25"),
        ("203.0.113.6", "[TEMPUNAVAIL]", "450 4.7.25"),
    ] {
        let mut through = Client::connect(gate.addr).await;
        through
            .send(format!("PROXY TCP4 {ip} 127.0.0.1 40000 25\r\n").as_bytes())
            .await;
        through.reply().await;
        through.cmd("EHLO client.test", "250").await;
        through.cmd("MAIL FROM:<a@sender.test>", "250").await;
        let via_gate = through.cmd("RCPT TO:<b@example.test>", code).await;

        let mut own = Client::connect_from(direct, "127.0.0.40").await;
        own.reply().await;
        own.cmd("EHLO client.test", "250").await;
        own.cmd(&format!("XCLIENT ADDR={ip} NAME={name}"), "220")
            .await;
        own.cmd("EHLO client.test", "250").await;
        own.cmd("MAIL FROM:<a@sender.test>", "250").await;
        let baseline = own.cmd("RCPT TO:<b@example.test>", code).await;
        assert_eq!(via_gate, baseline, "{ip}");
        if code == "250" {
            through.cmd("DATA", "354").await;
            through.send(b"Subject: named\r\n\r\nx\r\n.\r\n").await;
            assert!(through.reply().await.starts_with("250"));
        }
        through.cmd("QUIT", "221").await;
    }
    let until = Instant::now() + Duration::from_secs(20);
    let mut log = String::new();
    while Instant::now() < until && !log.contains("client=good.test[203.0.113.9]") {
        tokio::time::sleep(Duration::from_millis(200)).await;
        log = std::fs::read_to_string(pf.run.join("maillog")).unwrap_or_default();
    }
    assert!(log.contains("client=good.test[203.0.113.9]"), "{log}");
}

/// Scale-out in front of a real Postfix: HAProxy (PROXY v2) over two
/// instances sharing one Redis, both relaying to Postfix. The first
/// attempt is greylisted, the retry (through the other instance, round
/// robin: each greets with its own name) passes, Postfix stores the
/// message once and saw the real client address through HAProxy and
/// XCLIENT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Postfix, haproxy and redis-server (installed by .ci/run)"]
async fn greylisted_through_haproxy_and_two_instances_into_postfix() {
    use common::peers::{Haproxy, Redis};
    use portcullis::state::{Clock, TestClock};
    use std::sync::Arc;
    let pf = Postfix::start("scaleout");
    let redis = Redis::start();
    let clock = Arc::new(TestClock::new());
    let mut cfg = in_front_of(pf.port, IdentityMode::Xclient);
    behind_proxy(&mut cfg);
    cfg.checks.greylist.mode = Mode::Enforce;
    // 40 transactions a minute per sender domain, across both instances.
    cfg.checks.rate_limits = vec![common::config::rate_limit(
        "per_domain",
        portcullis::config::RateKey::SenderDomain,
        portcullis::config::RateCount::Transactions,
        40,
        60,
    )];
    cfg.limits.max_connections_per_ip = 500;
    cfg.limits.max_connections_per_network = 500;
    cfg.state.backend = portcullis::config::StateBackend::Redis;
    cfg.state.url = redis.url();
    cfg.state.timeout = secs(2);
    // Each instance names itself in its greeting, so the client sees
    // which one served it.
    cfg.hostname = "gate-a.test".into();
    let a = Gate::start_clocked(cfg.clone(), Arc::clone(&clock) as Arc<dyn Clock>).await;
    cfg.hostname = "gate-b.test".into();
    let b = Gate::start_clocked(cfg, Arc::clone(&clock) as Arc<dyn Clock>).await;
    let lb = Haproxy::start(&[a.addr, b.addr]);
    let mut c = common::Client::connect_from(lb.addr(), "127.0.0.57").await;
    let first = c.reply().await;
    assert!(first.starts_with("220 gate-"), "{first}");
    c.cmd("EHLO client.sender.test", "250").await;
    c.cmd("MAIL FROM:<a@sender.test>", "250").await;
    c.cmd("RCPT TO:<user@example.test>", "451 4.7.1").await;
    c.cmd("QUIT", "221").await;
    clock.advance(Duration::from_secs(301));
    let mut c = common::Client::connect_from(lb.addr(), "127.0.0.57").await;
    let retry = c.reply().await;
    assert!(retry.starts_with("220 gate-"), "{retry}");
    // Round robin: the retry was served by the other instance.
    assert_ne!(first[..15], retry[..15], "{first} / {retry}");
    println!(
        "greylisted by {}, passed by {}",
        &first[4..15],
        &retry[4..15]
    );
    c.cmd("EHLO client.sender.test", "250").await;
    let r = c
        .send_mail(
            "a@sender.test",
            &["user@example.test"],
            b"Subject: scaled out\r\n\r\nthrough two instances\r\n",
        )
        .await;
    assert!(r.starts_with("250"), "{r}");
    let mail = one_mail(&pf.inbox());
    assert!(mail.contains("Subject: scaled out"), "{mail}");
    assert!(
        mail.contains("from client.sender.test (unknown [127.0.0.57])"),
        "{mail}"
    );

    // The rate limit under load: 100 transactions from one busy domain,
    // 20 clients at once through HAProxy; 40 reach Postfix.
    clock.advance(Duration::from_secs(120));
    let mut workers = Vec::new();
    for w in 0..20 {
        let addr = lb.addr();
        workers.push(tokio::spawn(async move {
            let mut taken = 0;
            for i in 0..5 {
                let mut c = common::Client::connect_from(addr, "127.0.0.57").await;
                assert!(c.reply().await.starts_with("220"));
                c.cmd("EHLO client.sender.test", "250").await;
                // Allowed for greylisting (it passed above): the limit decides.
                let r = c.cmd("MAIL FROM:<a@sender.test>", "").await;
                if r.starts_with("250") {
                    c.cmd("RCPT TO:<user@example.test>", "250").await;
                    c.cmd("DATA", "354").await;
                    c.send(format!("Subject: load {w}-{i}\r\n\r\nx\r\n.\r\n").as_bytes())
                        .await;
                    assert!(c.reply().await.starts_with("250"));
                    taken += 1;
                } else {
                    assert!(r.starts_with("451 4.7.1"), "{r}");
                }
                c.cmd("QUIT", "221").await;
            }
            taken
        }));
    }
    let mut taken = 0;
    for w in workers {
        taken += w.await.unwrap();
    }
    let count = || std::fs::read_dir(pf.inbox()).map_or(0, |d| d.count());
    let until = Instant::now() + Duration::from_secs(30);
    while count() < 1 + taken && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "rate limit 40/min through HAProxy and two instances: {taken} of 100 taken, {} in Postfix's Maildir",
        count() - 1
    );
    assert!((38..=42).contains(&taken), "{taken}");
    assert_eq!(
        count(),
        1 + taken,
        "every accepted message stored by Postfix, once"
    );
}

/// Two clients one after the other through one reused upstream connection
/// into a real Postfix: the second XCLIENT, outside any transaction, makes
/// Postfix start over as for a new client, so each message carries its own
/// client's address and HELO name, and Postfix counted both XCLIENTs on
/// one connection.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs Postfix and swaks (installed by .ci/run)"]
async fn a_reused_connection_into_postfix_keeps_each_client_apart() {
    let pf = Postfix::start("pool");
    let gate = gate_for(pf.port, IdentityMode::Xclient).await;
    let addr = gate.addr;
    for (ip, helo) in [
        ("127.0.0.9", "first.sender.test"),
        ("127.0.0.10", "second.sender.test"),
    ] {
        let out = tokio::task::spawn_blocking(move || swaks(addr, ip, &["--helo", helo]))
            .await
            .unwrap();
        assert!(out.contains(" bytes queued as "), "{out}");
    }
    let mails = common::peers::mails(&pf.inbox(), 2, Duration::from_secs(20));
    assert_eq!(mails.len(), 2);
    for (ip, helo) in [
        ("127.0.0.9", "first.sender.test"),
        ("127.0.0.10", "second.sender.test"),
    ] {
        let own = format!("from {helo} (unknown [{ip}])");
        let mine: Vec<&String> = mails.iter().filter(|m| m.contains(&own)).collect();
        assert_eq!(mine.len(), 1, "{own}: {mails:?}");
        let other = if ip == "127.0.0.9" {
            "second.sender.test"
        } else {
            "first.sender.test"
        };
        assert!(!mine[0].contains(other), "{}", mine[0]);
    }
    let until = Instant::now() + Duration::from_secs(20);
    let mut log = String::new();
    while Instant::now() < until && !log.contains("client=unknown[127.0.0.10]") {
        tokio::time::sleep(Duration::from_millis(200)).await;
        log = std::fs::read_to_string(pf.run.join("maillog")).unwrap_or_default();
    }
    assert!(log.contains("client=unknown[127.0.0.9]"), "{log}");
    assert!(log.contains("client=unknown[127.0.0.10]"), "{log}");
    // One smtpd took both, with no disconnect in between: one connection.
    let lines: Vec<&str> = log.lines().collect();
    let at = |ip: &str| {
        let needle = format!("client=unknown[{ip}]");
        let i = lines.iter().position(|l| l.contains(&needle)).unwrap();
        let pid = lines[i]
            .split("smtpd[")
            .nth(1)
            .unwrap()
            .split(']')
            .next()
            .unwrap();
        (i, pid.to_string())
    };
    let ((first, pid), (second, pid2)) = (at("127.0.0.9"), at("127.0.0.10"));
    assert_eq!(pid, pid2, "{log}");
    let between = &lines[first..second];
    let gone = format!("smtpd[{pid}]: disconnect");
    assert!(!between.iter().any(|l| l.contains(&gone)), "{log}");
}
