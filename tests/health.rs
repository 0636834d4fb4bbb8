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
