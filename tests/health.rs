//! Start-up health: a config with only the README's sections runs as
//! written; nameservers and upstream that do not answer are named on the
//! status page and in metrics, and do not hold every message for the DNS
//! timeout. Alone in its binary: the metrics recorder is process-wide.

mod common;

use common::dns::silent_dns;
use common::http_get as get;
use common::{Client, FakeMta, Script};
use std::time::{Duration, Instant};

#[tokio::test]
async fn the_readme_config_with_a_silent_nameserver_relays_at_once_and_says_why() {
    let (ns, _silent) = silent_dns().await;
    let mta = FakeMta::start(Script::default()).await;
    // The README's "put it in front of Postfix" config, on test addresses,
    // plus the (silent) nameserver and a status page: no checks section.
    let snippet = readme_yaml(0);
    assert!(!snippet.contains("checks:") && !snippet.contains("dns:"));
    let yaml = snippet
        .replace("0.0.0.0:25", "127.0.0.1:0")
        .replace("127.0.0.1:10025", &mta.addr.to_string())
        + &format!("dns: {{nameservers: [{ns}]}}\nmetrics: {{listen: 127.0.0.1:0}}\n");
    let cfg = portcullis::config::Config::parse(&yaml, std::path::Path::new("t.yaml")).unwrap();
    let server = portcullis::server::Server::bind(cfg).await.unwrap();
    let _ = server.upstream().probe().await;
    let (addr, metrics) = (server.local_addrs()[0], server.metrics_addr().unwrap());
    tokio::spawn(server.run(std::future::pending()));

    // The check at start finds it silent within the DNS timeout (3 s).
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let page = get(metrics, "/").await;
        if page.contains(&format!("<td>{ns}</td><td>DOES NOT ANSWER")) {
            break;
        }
        assert!(Instant::now() < until, "nameserver not reported: {page}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let scrape = get(metrics, "/metrics").await;
    assert!(scrape.contains("portcullis_dns_up 0"), "{scrape}");
    assert!(
        scrape.contains(&format!(
            "portcullis_dns_nameserver_up{{nameserver=\"{ns}\"}} 0"
        )),
        "{scrape}"
    );
    assert!(scrape.contains("portcullis_upstream_up 1"), "{scrape}");

    // A transaction is not held for the DNS timeout (it took about 9 s and
    // ended in 451 before): the checks record temperror and let it through.
    let started = Instant::now();
    let mut c = Client::hello(addr).await;
    let r = c
        .send_mail(
            "a@sender.test",
            &["b@example.net"],
            b"From: a@sender.test\r\nSubject: hi\r\n\r\nhello\r\n",
        )
        .await;
    let took = started.elapsed();
    assert!(r.starts_with("250"), "{r}");
    assert!(took < Duration::from_secs(2), "held {took:?}");
    let stored = mta.stored();
    assert_eq!(stored.len(), 1);
    let (ours, _) = common::split_ours(&stored[0].data);
    assert!(ours.contains("spf=temperror"), "{ours}");
}

/// The `n`th YAML block of the README's "Put it in front of Postfix".
fn readme_yaml(n: usize) -> String {
    let readme = include_str!("../README.md");
    let section = readme
        .split("## Put it in front of Postfix")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("README section");
    section
        .split("```yaml\n")
        .skip(1)
        .nth(n)
        .and_then(|b| b.split("```").next())
        .expect("YAML block")
        .to_string()
}

#[tokio::test]
async fn a_config_without_a_checks_section_records_and_never_refuses() {
    let base = readme_yaml(0);
    let cfg = portcullis::config::Config::parse(&base, std::path::Path::new("t.yaml")).unwrap();
    use portcullis::config::Mode;
    let c = &cfg.checks;
    for (name, mode) in [
        ("dnsbl", c.dnsbl.mode),
        ("spf", c.spf.mode),
        ("dkim", c.dkim.mode),
        ("dmarc", c.dmarc.mode),
        ("arc", c.arc.mode),
        ("iprev", c.iprev.mode),
    ] {
        assert_eq!(mode, Mode::Record, "{name}");
    }
}

#[test]
fn the_readme_enforce_snippet_completes_that_config() {
    let cfg = portcullis::config::Config::parse(
        &(readme_yaml(0) + &readme_yaml(1)),
        std::path::Path::new("t.yaml"),
    )
    .unwrap();
    use portcullis::config::Mode;
    assert_eq!(cfg.checks.spf.mode, Mode::Enforce);
    assert_eq!(cfg.checks.dnsbl.zones.len(), 1);
    // The others stay in record mode.
    assert_eq!(cfg.checks.iprev.mode, Mode::Record);
}

/// The status listener as HTTP says: HEAD, query strings, absolute-form
/// targets, keep-alive, methods it does not serve, unknown paths.
#[tokio::test]
async fn the_http_listener_speaks_http() {
    let (_mta, _dns, cfg) = monitored().await;
    let running = common::start_server_config(cfg).await;
    let m = running.metrics.expect("metrics listener");

    // The first probe of the upstream sets its gauge.
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let r = get(m, "/metrics?name[]=portcullis_upstream_up").await;
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.contains("content-type: text/plain; version=0.0.4"), "{r}");
        if r.contains("portcullis_upstream_up") {
            break;
        }
        assert!(Instant::now() < until, "no upstream gauge: {r}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // HEAD: GET's status and length, no body.
    let head = common::http_raw(
        m,
        "HEAD /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(head.contains("content-length: 3\r\n"), "{head}");
    assert!(head.ends_with("\r\n\r\n"), "a body after HEAD: {head:?}");

    // Absolute-form (what a client talking to a proxy sends).
    let abs = common::http_raw(
        m,
        &format!(
            "GET http://{m}/healthz?probe=1 HTTP/1.1\r\nHost: {m}\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    assert!(
        abs.starts_with("HTTP/1.1 200 OK\r\n") && abs.ends_with("\r\nok\n"),
        "{abs}"
    );

    // Two requests on one connection (keep-alive), answered in order.
    let two = common::http_raw(
        m,
        "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /nothing-here HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    let first = two.find("200 OK").expect("first answer");
    let second = two.find("404 Not Found").expect("second answer");
    assert!(first < second, "{two}");

    let post = common::http_raw(
        m,
        "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(post.starts_with("HTTP/1.1 405"), "{post}");
    assert!(post.contains("allow: GET, HEAD\r\n"), "{post}");

    // Not HTTP at all: a 400, and the listener goes on.
    let junk = common::http_raw(m, "EHLO mail.example\r\n\r\n").await;
    assert!(junk.starts_with("HTTP/1.1 400"), "{junk}");
    assert!(get(m, "/healthz").await.starts_with("HTTP/1.1 200"));

    // The status page: times for people, counters in one stable order.
    let page = get(m, "/").await;
    assert!(page.contains(" UTC ("), "{page}");
    assert!(!page.contains("unix time"), "{page}");
    let counters = |p: &str| {
        p.split("<h2>Counters</h2><pre>\n")
            .nth(1)
            .and_then(|c| c.split("</pre>").next())
            .unwrap_or_default()
            .lines()
            .map(|l| l.split(' ').next().unwrap_or_default().to_string())
            .collect::<Vec<_>>()
    };
    let names = counters(&page);
    assert!(names.len() > 5, "{page}");
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);
    assert_eq!(counters(&get(m, "/").await), names);
}

/// `/readyz` is what a load balancer asks: 503 with the reason while the
/// MTA behind is down, 200 when it is back, 503 again while draining.
#[tokio::test]
async fn readyz_follows_the_upstream_and_the_drain() {
    let (mta, _dns, mut cfg) = monitored().await;
    cfg.upstream.probe_interval = portcullis::config::Secs(Duration::from_secs(1));
    let server = portcullis::server::Server::bind(cfg).await.unwrap();
    let (m, smtp) = (server.metrics_addr().unwrap(), server.local_addrs()[0]);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));

    let wait_for = |want: &'static str| async move {
        let until = Instant::now() + Duration::from_secs(15);
        loop {
            let r = get(m, "/readyz").await;
            if r.starts_with(want) {
                return r;
            }
            assert!(Instant::now() < until, "never {want}: {r}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let ready = wait_for("HTTP/1.1 200").await;
    assert!(
        ready.contains(&format!("ok upstream: {} answers", mta.addr)),
        "{ready}"
    );
    assert!(ready.contains("ok dns: "), "{ready}");
    assert!(
        ready.contains("ok listeners: 1 SMTP, 0 milter bound"),
        "{ready}"
    );
    assert!(ready.contains("ok rules: "), "{ready}");

    mta.stop_listening();
    let down = wait_for("HTTP/1.1 503").await;
    assert!(
        down.contains(&format!("FAIL upstream: {} does not answer", mta.addr)),
        "{down}"
    );
    assert!(down.contains("ok dns:"), "only the upstream fails: {down}");
    // The liveness answer does not follow readiness.
    assert!(get(m, "/healthz").await.starts_with("HTTP/1.1 200"));

    let _back = FakeMta::start_at(mta.addr, Script::default()).await;
    wait_for("HTTP/1.1 200").await;

    // Draining: still answering HTTP, no longer ready. A transaction in
    // its DATA keeps the drain going while we ask, then completes.
    let mut c = Client::hello(smtp).await;
    c.cmd("MAIL FROM:<a@sender.test>", "250").await;
    c.cmd("RCPT TO:<b@example.test>", "250").await;
    c.cmd("DATA", "354").await;
    let _ = stop.send(());
    let draining = wait_for("HTTP/1.1 503").await;
    assert!(
        draining.contains("FAIL listeners: shutting down"),
        "{draining}"
    );
    c.cmd("Subject: x\r\n\r\nbody\r\n.", "250").await;
    let _ = tokio::time::timeout(Duration::from_secs(10), run).await;
}

/// Clients that connect and never send a request are closed after the
/// request head deadline (3 s), and meanwhile do not keep anyone else out
/// (the 1,000-connection attack is in tests/defaults.rs).
#[tokio::test]
async fn silent_http_clients_are_closed_and_do_not_starve_the_listener() {
    use tokio::io::AsyncReadExt;
    let (_mta, _dns, cfg) = monitored().await;
    let running = common::start_server_config(cfg).await;
    let m = running.metrics.expect("metrics listener");
    let started = Instant::now();
    // More than the 32 connections served at once before.
    let mut silent = Vec::new();
    for _ in 0..40 {
        silent.push(tokio::net::TcpStream::connect(m).await.unwrap());
    }
    // Served at once, beside them.
    let r = tokio::time::timeout(Duration::from_secs(1), get(m, "/healthz"))
        .await
        .expect("served within 1 s");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    // Every silent client was closed by the server, within the bound.
    for mut s in silent {
        let mut b = [0u8; 64];
        // Whatever hyper says first (a 408 or nothing), then the close.
        while tokio::time::timeout(Duration::from_secs(12), s.read(&mut b))
            .await
            .expect("closed within 12 s")
            .unwrap_or(0)
            > 0
        {}
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(6), "{took:?}");
    assert!(
        took >= Duration::from_millis(2500),
        "closed before the timeout: {took:?}"
    );
}

/// A scripted MTA, an answering in-process nameserver, and the test
/// config using both with the monitoring listener on.
async fn monitored() -> (FakeMta, common::dns::FakeDns, portcullis::config::Config) {
    let dns = common::dns::FakeDns::start(&["test."], vec![]).await;
    let mta = FakeMta::start(Script::default()).await;
    let mut cfg = common::config::test_config(mta.addr);
    cfg.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.dns.nameservers = vec![dns.addr];
    (mta, dns, cfg)
}

/// A nameserver that does not answer makes the instance unready only when
/// a check needs DNS.
#[tokio::test]
async fn readyz_minds_dns_only_when_a_check_asks_it() {
    use portcullis::config::Mode;
    let (ns, _silent) = silent_dns().await;
    let mta = FakeMta::start(Script::default()).await;
    let ready_with = |dns_checks: bool| {
        let mut cfg = common::config::test_config(mta.addr);
        cfg.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
        cfg.dns.nameservers = vec![ns];
        let c = &mut cfg.checks;
        for m in [
            &mut c.spf.mode,
            &mut c.dkim.mode,
            &mut c.dmarc.mode,
            &mut c.arc.mode,
            &mut c.iprev.mode,
            &mut c.dnsbl.mode,
        ] {
            *m = Mode::Off;
        }
        if dns_checks {
            c.spf.mode = Mode::Record;
        }
        cfg
    };
    let off = common::start_server_config(ready_with(false)).await;
    let on = common::start_server_config(ready_with(true)).await;
    let (off, on) = (off.metrics.unwrap(), on.metrics.unwrap());
    // The nameserver check gives up after the DNS timeout (3 s).
    let until = Instant::now() + Duration::from_secs(15);
    let unready = loop {
        let r = get(on, "/readyz").await;
        if r.contains("FAIL dns: no nameserver answers") {
            break r;
        }
        assert!(
            Instant::now() < until,
            "never found the nameserver silent: {r}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(unready.starts_with("HTTP/1.1 503"), "{unready}");
    assert!(
        unready.contains(&format!("FAIL dns: no nameserver answers ({ns}")),
        "{unready}"
    );
    // The same silent nameserver, but no check asks it: ready once the MTA
    // answered its probe.
    let ready = loop {
        let r = get(off, "/readyz").await;
        if r.starts_with("HTTP/1.1 200") {
            break r;
        }
        assert!(Instant::now() < until, "never ready: {r}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(ready.contains("ok dns: no check uses DNS"), "{ready}");
}
