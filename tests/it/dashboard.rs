//! The Grafana dashboard's queries, evaluated by a real Prometheus (Debian's
//! `prometheus`) that scrapes the real binary: every query runs without an
//! error, and the rejection and verdict panels have data. (`tests/metrics.rs`
//! checks the metric and label names against a scrape; this checks the
//! PromQL itself.)

use crate::common::{self, Client, FakeMta, Killed, Script};
use std::process::Command;
use std::time::{Duration, Instant};

/// `query` as a URL query-string value.
fn encoded(query: &str) -> String {
    query
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The JSON body of one instant query; None while Prometheus starts (503).
async fn try_query(prometheus: std::net::SocketAddr, q: &str) -> Option<serde_json::Value> {
    let r = common::http_get(prometheus, &format!("/api/v1/query?query={}", encoded(q))).await;
    serde_json::from_str(r.split("\r\n\r\n").nth(1)?).ok()
}

async fn query(prometheus: std::net::SocketAddr, q: &str) -> serde_json::Value {
    try_query(prometheus, q)
        .await
        .unwrap_or_else(|| panic!("no answer to {q}"))
}

#[tokio::test]
#[ignore = "needs Prometheus (Debian package prometheus, installed by .ci/run)"]
async fn dashboard_queries_evaluate_in_prometheus() {
    let dash: serde_json::Value =
        serde_json::from_str(include_str!("../../contrib/grafana/portcullis.json")).unwrap();
    let mta = FakeMta::start(Script::default()).await;
    let dns = common::dns::bl_test().await;
    let dir = std::env::temp_dir().join(format!("portcullis-dash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("rules")).unwrap();
    let (port, mport, pport) = (
        common::free_port(),
        common::free_port(),
        common::free_port(),
    );
    let conf = dir.join("gate.yaml");
    std::fs::write(
        &conf,
        format!(
            "hostname: gate.test\nlisten: [{{addr: \"127.0.0.1:{port}\"}}]\nupstream: {{addr: \"{}\", client_identity: xclient}}\ndns: {{nameservers: [\"{}\"]}}\nmetrics: {{listen: \"127.0.0.1:{mport}\"}}\nlog: {{file: \"{}\"}}\nrules_dir: {}\nchecks:\n  dnsbl:\n    mode: enforce\n    zones: [{{zone: bl.test, action: reject}}]\n",
            mta.addr,
            dns.addr,
            dir.join("gate.log").display(),
            dir.join("rules").display()
        ),
    )
    .unwrap();
    let _gate = Killed(
        Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(["run", "--config"])
            .arg(&conf)
            .spawn()
            .unwrap(),
    );
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nscrape_configs:\n  - job_name: portcullis\n    static_configs: [{{targets: [\"127.0.0.1:{mport}\"]}}]\n"
        ),
    )
    .unwrap();
    let _prometheus = Killed(
        Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{pport}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("prometheus"),
    );
    let gate = common::listening(port).await;
    let prom = common::listening(pport).await;

    // Traffic, accepted and refused by the DNSBL, until Prometheus has
    // scraped enough of it for a rate (two samples of the reject series).
    let seen = "count_over_time(portcullis_transactions_total{verdict=\"reject\"}[1m]) >= 2 and on() count_over_time(portcullis_transactions_total{verdict=\"accept\"}[1m]) >= 2";
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let r = try_query(prom, seen).await;
        if r.as_ref()
            .and_then(|r| r["data"]["result"].as_array())
            .is_some_and(|a| !a.is_empty())
        {
            break;
        }
        assert!(
            Instant::now() < until,
            "Prometheus never had two scrapes: {r:?}"
        );
        for ip in ["127.0.0.7", "127.0.0.3"] {
            let mut c = Client::connect_from(gate, ip).await;
            c.reply().await;
            c.cmd("EHLO dash.test", "250").await;
            c.cmd("MAIL FROM:<a@sender.test>", "250").await;
            let ok = ip == "127.0.0.7";
            c.cmd("RCPT TO:<b@example.test>", if ok { "250" } else { "550" })
                .await;
            if ok {
                c.cmd("DATA", "354").await;
                c.cmd("Subject: d\r\n\r\nx\r\n.", "250").await;
            }
            c.cmd("QUIT", "221").await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let mut evaluated = 0;
    let mut with_data = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            let q = t["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "1m");
            let r = query(prom, &q).await;
            assert_eq!(r["status"], "success", "{q}: {r}");
            evaluated += 1;
            if !r["data"]["result"].as_array().unwrap().is_empty() {
                with_data.push((
                    p["title"].as_str().unwrap().to_string(),
                    r["data"]["result"].clone(),
                ));
            }
        }
    }
    assert!(evaluated >= 20, "{evaluated}");
    let panel = |title: &str| {
        with_data
            .iter()
            .find(|(t, _)| t == title)
            .map(|(_, r)| r.to_string())
            .unwrap_or_else(|| panic!("{title} has no data; have {with_data:?}"))
    };
    assert!(panel("Rejection rate by reason").contains("\"reason\":\"dnsbl:bl.test\""));
    let verdicts = panel("Verdicts per minute");
    assert!(
        verdicts.contains("\"verdict\":\"accept\"") && verdicts.contains("\"verdict\":\"reject\"")
    );
    assert!(panel("DNSBL zone health").contains("\"zone\":\"bl.test\""));
    panel("DNS latency");
    panel("Upstream MTA");
}
