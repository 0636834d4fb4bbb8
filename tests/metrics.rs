//! The Prometheus scrape and the status page after a known sequence of
//! sessions. Alone in its binary: the metrics recorder is process-wide.

mod common;

use common::config::{test_config, zone};
use common::dns::{FakeDns, a, txt};
use common::http_get as get;
use common::{Client, FakeMta, Script};
use portcullis::config::{Action, Mode, Zone};

/// The value of one sample, by metric name and labels as written.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

#[tokio::test]
async fn scrape_counts_a_known_session_sequence_and_status_page_shows_health() {
    let dns = FakeDns::start(
        &["test."],
        vec![
            a("2.0.0.127.bl.test.", "127.0.0.2"),
            a("3.0.0.127.bl.test.", "127.0.0.2"),
            a("test.dbl.test.", "127.0.1.2"),
            txt("pass.test.", "v=spf1 ip4:127.0.0.0/8 -all"),
        ],
    )
    .await;
    let mta = FakeMta::start(Script::default()).await;
    let dir = std::env::temp_dir().join(format!("portcullis-metrics-rules-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("r.yaml"),
        "rules:\n  - id: WATCH_HELO\n    description: x\n    when: {helo: {exact: watched.test}}\n    action: {score: 1}\n    mode: shadow\n",
    )
    .unwrap();
    let mut cfg = test_config(mta.addr);
    cfg.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.limits.max_connections_per_ip = 1;
    cfg.dns.nameservers = vec![dns.addr];
    cfg.rules_dir = Some(dir.clone());
    let c = &mut cfg.checks;
    (c.spf.mode, c.spf.helo) = (Mode::Enforce, false);
    (c.dkim.mode, c.dmarc.mode, c.arc.mode) = (Mode::Record, Mode::Record, Mode::Record);
    c.dnsbl.mode = Mode::Enforce;
    c.dnsbl.zones = vec![Zone {
        action: Some(Action::Reject),
        ..zone("bl.test")
    }];
    c.uribl.zones = vec![zone("dbl.test")];
    let running = common::start_server_config(cfg).await;
    let (addr, maddr) = (running.addr, running.metrics.expect("metrics listener"));

    // 1: accepted, with the shadow rule matching.
    let mut c = Client::connect_from(addr, "127.0.0.7").await;
    c.reply().await;
    c.cmd("EHLO watched.test", "250").await;
    let r = c
        .send_mail(
            "a@pass.test",
            &["b@example.test"],
            b"Subject: m\r\n\r\nbody\r\n",
        )
        .await;
    assert!(r.starts_with("250"), "{r}");
    // 2: refused by the per-IP limit while session 1 is open.
    let mut second = Client::connect_from(addr, "127.0.0.7").await;
    assert!(second.reply().await.starts_with("421 4.7.0"));
    c.cmd("QUIT", "221").await;
    // 3: rejected at RCPT by the DNSBL.
    let mut c = Client::connect_from(addr, "127.0.0.2").await;
    c.reply().await;
    c.cmd("EHLO x.test", "250").await;
    c.cmd("MAIL FROM:<a@pass.test>", "250").await;
    c.cmd("RCPT TO:<b@example.test>", "550 5.7.1").await;
    c.cmd("QUIT", "221").await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;

    let m = get(maddr, "/metrics").await;
    assert!(
        m.starts_with("HTTP/1.1 200 OK\r\n")
            && m.contains("\r\ncontent-type: text/plain; version=0.0.4"),
        "{m}"
    );
    let body = m.split("\r\n\r\n").nth(1).unwrap();
    let v = |s: &str| sample(body, s).unwrap_or_else(|| panic!("{s} missing in\n{body}"));
    assert_eq!(
        v(r#"portcullis_transactions_total{verdict="accept",reason="none"}"#),
        1.0
    );
    assert_eq!(
        v(r#"portcullis_transactions_total{verdict="reject",reason="dnsbl:bl.test"}"#),
        1.0
    );
    assert_eq!(
        v(r#"portcullis_connections_refused_total{reason="limit:connections_per_ip"}"#),
        1.0
    );
    assert_eq!(v("portcullis_connections_total"), 2.0);
    assert_eq!(v("portcullis_connections_open"), 0.0);
    assert_eq!(
        v(r#"portcullis_rule_hits_total{rule="WATCH_HELO",shadow="true"}"#),
        1.0
    );
    assert_eq!(v(r#"portcullis_dnsbl_zone_usable{zone="bl.test"}"#), 1.0);
    assert!(v("portcullis_dns_queries_total") >= 2.0);
    assert!(v("portcullis_data_bytes_total") > 0.0);
    assert!(v(r#"portcullis_upstream_connections_total{kind="opened"}"#) >= 1.0);
    assert_eq!(v("portcullis_memory_budget_bytes"), 0.0);
    assert!(
        body.contains("portcullis_dns_query_seconds_bucket"),
        "{body}"
    );
    // Labels of low cardinality only: never a client's or sender's
    // address (the configured nameservers are named).
    let clients: Vec<&str> = body
        .lines()
        .filter(|l| !l.starts_with("portcullis_dns_nameserver_up{"))
        .filter(|l| l.contains("127.0.0.") || l.contains('@'))
        .collect();
    assert!(clients.is_empty(), "{clients:?}");
    assert_eq!(
        v(&format!(
            "portcullis_dns_nameserver_up{{nameserver=\"{}\"}}",
            dns.addr
        )),
        1.0
    );
    assert_eq!(v("portcullis_upstream_up"), 1.0);

    let page = get(maddr, "/").await;
    assert!(
        page.starts_with("HTTP/1.1 200 OK\r\n")
            && page.contains("\r\ncontent-type: text/html; charset=utf-8"),
        "{page}"
    );
    for want in [
        "<h1>Portcullis ",
        "1 rules from 1 files",
        "<td>bl.test</td><td>client</td><td>usable</td>",
        "<td>dbl.test</td><td>links</td><td>usable</td>",
        "<h2>Upstream</h2>",
        "<p>State store: embedded (0 entries)</p>",
        "answers</p>",
        &format!("<td>{}</td><td>answers</td>", dns.addr),
        "portcullis_transactions_total",
        "</html>",
    ] {
        assert!(page.contains(want), "{want} missing in {page}");
    }
    assert!(get(maddr, "/nope").await.starts_with("HTTP/1.1 404"));

    // The rest of what the dashboard shows, provoked for real: reloads (one
    // good rules reload, one config reload of a missing file), greylisting
    // and a rate limit on the embedded store, and a gate whose MTA and
    // Redis are both gone (upstream and state errors).
    running.rules.reload().expect("rules reload");
    assert!(
        running
            .config
            .reload(&dir.join("missing.yaml"))
            .await
            .is_err()
    );
    let mut cfg = common::config::test_config(mta.addr);
    cfg.dns.nameservers = vec![dns.addr];
    cfg.checks.greylist.mode = Mode::Enforce;
    cfg.checks.rate_limits = vec![common::config::rate_limit(
        "per_sender",
        portcullis::config::RateKey::Sender,
        portcullis::config::RateCount::Transactions,
        1,
        60,
    )];
    let grey = common::Gate::start_config(cfg).await;
    let mut c = Client::connect_from(grey.addr, "127.0.0.9").await;
    c.reply().await;
    c.cmd("EHLO grey.test", "250").await;
    c.cmd("MAIL FROM:<g@pass.test>", "250").await;
    c.cmd("RCPT TO:<b@example.test>", "451 4.7.1").await;
    c.cmd("RSET", "250").await;
    c.cmd("MAIL FROM:<g@pass.test>", "4").await;
    c.cmd("QUIT", "221").await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = closed.local_addr().unwrap();
    drop(closed);
    let mut cfg = common::config::test_config(dead);
    cfg.dns.nameservers = vec![dns.addr];
    cfg.checks.greylist.mode = Mode::Enforce;
    cfg.state.backend = portcullis::config::StateBackend::Redis;
    cfg.state.url = format!("redis://{dead}");
    // Counted at MAIL, before the MTA is asked: a store call that fails.
    cfg.checks.rate_limits = vec![common::config::rate_limit(
        "per_sender",
        portcullis::config::RateKey::Sender,
        portcullis::config::RateCount::Transactions,
        1,
        60,
    )];
    let broken = common::Gate::start_config(cfg).await;
    let mut c = Client::connect_from(broken.addr, "127.0.0.8").await;
    c.reply().await;
    c.cmd("EHLO broken.test", "250").await;
    c.cmd("MAIL FROM:<x@pass.test>", "4").await;
    c.cmd("QUIT", "221").await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let scrape = get(maddr, "/metrics").await;
    dashboard_uses_only_scraped_metrics(&scrape);
}

/// Every metric the Grafana dashboard queries is in a real scrape, and
/// every label it groups by is on one of the series its query reads.
fn dashboard_uses_only_scraped_metrics(scrape: &str) {
    let dash: serde_json::Value =
        serde_json::from_str(include_str!("../contrib/grafana/portcullis.json"))
            .expect("dashboard JSON");
    let series: Vec<&str> = scrape
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or("")
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .collect();
    let name_of = |l: &str| l.split(['{', ' ']).next().unwrap_or("").to_string();
    let mut exprs = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            exprs.push(t["expr"].as_str().unwrap().to_string());
        }
    }
    assert!(exprs.len() >= 15, "{exprs:?}");
    let mut checked = 0;
    for e in &exprs {
        let names: Vec<String> = e
            .match_indices("portcullis_")
            .map(|(i, _)| {
                e[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect()
            })
            .collect();
        assert!(!names.is_empty(), "no metric in {e}");
        for n in &names {
            assert!(
                series.iter().any(|l| name_of(l) == *n),
                "the dashboard reads {n}, which no scrape has:\n{scrape}"
            );
            checked += 1;
        }
        // `by (a, b)`: each label is on a series of this query's metrics.
        for (i, _) in e.match_indices("by (") {
            let labels = &e[i + 4..i + 4 + e[i + 4..].find(')').unwrap()];
            for label in labels.split(',').map(str::trim).filter(|l| *l != "le") {
                assert!(
                    series
                        .iter()
                        .any(|l| names.contains(&name_of(l)) && l.contains(&format!("{label}=\""))),
                    "{e}: no series of {names:?} has label {label}"
                );
            }
        }
    }
    assert!(checked >= 19, "{checked}");
}
