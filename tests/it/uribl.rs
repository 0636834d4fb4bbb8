//! URL blocklists at the end of DATA, against an authoritative DNS server
//! on loopback serving test DBL- and SURBL-style zones: a listed link
//! refused through the proxy and the milter, a bit-mask answer, error
//! answers that never list, a slow zone held within the budget, the
//! domain cap and what is never looked up, and the rules' url_domain and
//! uribl conditions.

use crate::common::{self, Client, FakeMta, Gate, Script};
use common::dns::{FakeDns, a, txt};
use common::milter::{Mta, POSTFIX_STEPS};
use portcullis::config::{Action, Config, MilterListen, Mode, ReturnFilter, Secs, Zone, ZoneType};
use portcullis::wire::milter::Response;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// dbl.test (DBL-style: 127.0.1.x) and multi.test (SURBL-style bit
/// masks), each with its RFC 5782 self-test entries.
fn zones_records() -> Vec<common::dns::Rec> {
    vec![
        a("test.dbl.test.", "127.0.1.2"),
        a("test.multi.test.", "127.0.0.8"),
        a("spammy.com.dbl.test.", "127.0.1.2"),
        txt("spammy.com.dbl.test.", "https://dbl.test/lookup/spammy.com"),
        a("phish.co.uk.dbl.test.", "127.0.1.4"),
        // Bits 8 and 16: listed on the part the filter asks for.
        a("masked.com.multi.test.", "127.0.0.24"),
        // Bit 64 only: not a listing for a filter of &0.0.0.8.
        a("othermask.com.multi.test.", "127.0.0.64"),
        // Error answers: a public resolver, and URIBL's "refused".
        a("errored.com.dbl.test.", "127.255.255.254"),
        a("refused.com.multi.test.", "127.0.0.1"),
        a("slowlink.com.dbl.test.", "127.0.1.2"),
    ]
}

fn dbl() -> Zone {
    Zone {
        zone: "dbl.test".into(),
        kind: ZoneType::Domain,
        returns: vec![ReturnFilter::parse("127.0.1.[2..99]").unwrap()],
        score: 0.0,
        action: Some(Action::Reject),
        text: None,
    }
}

fn multi() -> Zone {
    Zone {
        zone: "multi.test".into(),
        returns: vec![ReturnFilter::parse("&0.0.0.8").unwrap()],
        ..dbl()
    }
}

fn config(mta: SocketAddr, dns: SocketAddr) -> Config {
    let mut cfg = common::config::test_config(mta);
    common::config::with_dns(&mut cfg, dns);
    let u = &mut cfg.checks.uribl;
    u.mode = Mode::Enforce;
    u.zones = vec![dbl(), multi()];
    cfg
}

fn html(links: &[&str]) -> String {
    let body: String = links
        .iter()
        .map(|l| format!("<p><a href=\"{l}\">Click here</a></p>\r\n"))
        .collect();
    format!(
        "Subject: offer\r\nMIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<html><body>{body}</body></html>\r\n"
    )
}

async fn send(gate: SocketAddr, rcpt: &str, msg: &str) -> (String, Duration) {
    let mut c = Client::hello(gate).await;
    let start = Instant::now();
    let r = c.send_mail("a@sender.test", &[rcpt], msg.as_bytes()).await;
    let took = start.elapsed();
    c.cmd("QUIT", "221").await;
    (r, took)
}

/// The milter's reply to the MTA at the end of the message (None: accepted).
async fn milter_reply(milter: SocketAddr, msg: &str) -> Option<String> {
    let mut m = Mta::connect(milter, POSTFIX_STEPS).await;
    m.connect_from("192.0.2.9", "sender.test").await;
    m.helo("sender.test").await;
    m.mail("a@sender.test").await;
    m.rcpt("b@example.test").await;
    m.message(msg).await.iter().find_map(|r| match r {
        Response::ReplyCode(t) => Some(String::from_utf8_lossy(t).into_owned()),
        _ => None,
    })
}

/// A link whose target is listed is refused with 554 5.7.1 naming the
/// domain and the zone, through both doors, whatever the link text says;
/// a bit-mask answer lists when its bit is asked for and not otherwise;
/// a clean message is delivered.
#[tokio::test(flavor = "multi_thread")]
async fn listed_links_are_refused_through_both_doors() {
    let dns = FakeDns::start(&["test."], zones_records()).await;
    let mta = FakeMta::start(Script::default()).await;
    let mut cfg = config(mta.addr, dns.addr);
    cfg.milter.listen = vec![MilterListen::Tcp("127.0.0.1:0".parse().unwrap())];
    let g = Gate::start_config(cfg).await;
    let cases: Vec<(&str, String, Option<&str>)> = vec![
        (
            "listed href behind innocent text",
            html(&["https://www.spammy.com/deal?id=1"]),
            Some("links to spammy.com, listed on dbl.test"),
        ),
        (
            "listed registrable domain under a public suffix",
            "Subject: x\r\n\r\nLog in at http://secure.login.phish.co.uk/account\r\n".into(),
            Some("links to phish.co.uk, listed on dbl.test"),
        ),
        (
            "bit mask asked for",
            "Subject: x\r\n\r\nhttp://masked.com/\r\n".into(),
            Some("links to masked.com, listed on multi.test"),
        ),
        (
            "bit mask not asked for",
            "Subject: x\r\n\r\nhttp://othermask.com/\r\n".into(),
            None,
        ),
        (
            "defanged link",
            "Subject: x\r\n\r\nhxxp://www.spammy.com/ was reported\r\n".into(),
            None,
        ),
        (
            "clean links",
            html(&["https://www.clean.org/", "http://fine.net/x"]),
            None,
        ),
    ];
    let mut delivered = 0;
    for (what, msg, refused) in &cases {
        let (r, _) = send(g.addr, "b@example.test", msg).await;
        let milter = milter_reply(g.milter.unwrap(), msg).await;
        match refused {
            Some(text) => {
                assert!(
                    r.starts_with("554 5.7.1") && r.contains(text),
                    "{what}: {r}"
                );
                let m = milter.unwrap_or_else(|| panic!("{what}: milter accepted"));
                assert!(
                    m.starts_with("554 5.7.1") && m.contains(text),
                    "{what}: {m}"
                );
            }
            None => {
                assert!(r.starts_with("250"), "{what}: {r}");
                assert_eq!(milter, None, "{what}");
                delivered += 1;
            }
        }
        assert_eq!(mta.stored().len(), delivered, "{what}");
    }
    // The defanged link was never looked up.
    assert_eq!(dns.count("spammy.com.dbl.test."), 2, "{:?}", dns.queries());
}

/// Error answers never list, and take the zone out of use (fail open):
/// a public-resolver answer from a DBL-style zone, 127.0.0.1 from a
/// URIBL-style one.
#[tokio::test]
async fn error_answers_are_never_listings() {
    let dns = FakeDns::start(&["test."], zones_records()).await;
    let mta = FakeMta::start(Script::default()).await;
    let running = common::gate::start_server_config(config(mta.addr, dns.addr)).await;
    for (link, zone) in [("http://errored.com/", 0), ("http://refused.com/", 1)] {
        let msg = format!("Subject: x\r\n\r\n{link}\r\n");
        let (r, _) = send(running.addr, "b@example.test", &msg).await;
        assert!(r.starts_with("250"), "{link}: {r}");
        let z = &running.engine.uribl.zones[zone];
        assert!(!z.usable(), "{link}: {} still in use", z.conf.zone);
    }
    assert_eq!(mta.stored().len(), 2);
}

/// A zone that answers after the budget: the client hears the verdict when
/// `timeout` has passed (on_error accept: delivered; tempfail: 451), and
/// what the other zone answered in time still counts.
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_zone_is_held_within_the_budget() {
    let slow = Duration::from_secs(4);
    let dns = FakeDns::start_slow(
        &["test."],
        zones_records(),
        &[("slowlink.com.dbl.test.", slow)],
    )
    .await;
    let mta = FakeMta::start(Script::default()).await;
    let budget = Duration::from_secs(1);
    let tuned = |on_error| {
        let mut cfg = config(mta.addr, dns.addr);
        cfg.dns.timeout = Secs(Duration::from_secs(10));
        cfg.checks.uribl.timeout = Secs(budget);
        cfg.checks.uribl.on_error = on_error;
        cfg
    };
    let g = Gate::start_config(tuned(Action::Accept)).await;
    let (r, took) = send(g.addr, "b@example.test", &html(&["http://slowlink.com/"])).await;
    assert!(r.starts_with("250"), "{r}");
    assert!(
        took >= budget && took < budget + Duration::from_millis(1500),
        "{took:?}"
    );
    // The fast zone's listing is used though the slow one is late.
    let msg = html(&["http://slowlink.com/", "http://masked.com/"]);
    let (r, took) = send(g.addr, "b@example.test", &msg).await;
    assert!(
        r.starts_with("554 5.7.1") && r.contains("masked.com"),
        "{r}"
    );
    assert!(took < budget + Duration::from_millis(1500), "{took:?}");

    let g = Gate::start_config(tuned(Action::Tempfail)).await;
    let (r, took) = send(g.addr, "b@example.test", &html(&["http://slowlink.com/x"])).await;
    assert!(r.starts_with("451 4.4.3"), "{r}");
    assert!(took < budget + Duration::from_millis(1500), "{took:?}");
    assert_eq!(mta.stored().len(), 1);
}

/// At most max_domains domains are looked up, link targets first; the
/// allow list and the recipients' own domain are never looked up.
#[tokio::test]
async fn the_domain_cap_and_what_is_never_looked_up() {
    let dns = FakeDns::start(&["test."], zones_records()).await;
    let mta = FakeMta::start(Script::default()).await;
    let mut cfg = config(mta.addr, dns.addr);
    cfg.checks.uribl.zones = vec![dbl()];
    cfg.checks.uribl.max_domains = 5;
    cfg.checks.uribl.allow = vec!["trusted.com".into()];
    let g = Gate::start_config(cfg).await;
    let mut text = String::new();
    for i in 0..30 {
        text.push_str(&format!("http://text{i}.com/ "));
    }
    let msg = format!(
        "Subject: x\r\nContent-Type: multipart/alternative; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\n{text}\r\n--b\r\nContent-Type: text/html\r\n\r\n<a href=\"https://cdn.trusted.com/x\">a</a><a href=\"https://www.ourcorp.com/\">b</a><a href=\"https://target.org/\">c</a>\r\n--b--\r\n"
    );
    let (r, _) = send(g.addr, "bob@ourcorp.com", &msg).await;
    assert!(r.starts_with("250"), "{r}");
    let asked: Vec<String> = dns
        .queries()
        .into_iter()
        .filter(|q| {
            q.ends_with(".dbl.test. A") && !q.starts_with("test.") && !q.starts_with("invalid.")
        })
        .collect();
    assert_eq!(
        asked,
        [
            "target.org.dbl.test. A",
            "text0.com.dbl.test. A",
            "text1.com.dbl.test. A",
            "text2.com.dbl.test. A",
            "text3.com.dbl.test. A"
        ],
        "{asked:?}"
    );
}

/// The rules see the links and the listings: url_domain refuses a
/// shortener no list has; a uribl rule refuses what a zone in record
/// mode listed.
#[tokio::test]
async fn rules_see_url_domains_and_uribl_listings() {
    let dns = FakeDns::start(&["test."], zones_records()).await;
    let mta = FakeMta::start(Script::default()).await;
    let dir = std::env::temp_dir().join(format!("portcullis-uribl-rules-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("links.yaml"),
        r#"rules:
  - id: SHORTENER
    description: links through a shortener we do not take
    when: {url_domain: {domain: [bit.example.org]}}
    action: {reject: {code: 550, enhanced: 5.7.1, text: "No shortened links"}}
  - id: LISTED_LINK
    description: a link listed on the DBL
    when: {uribl: [dbl.test]}
    action: {reject: {code: 550, enhanced: 5.7.1, text: "Listed link (rule)"}}
"#,
    )
    .unwrap();
    let mut cfg = config(mta.addr, dns.addr);
    cfg.rules_dir = Some(dir);
    // The URL blocklists off: the rules find the links themselves.
    cfg.checks.uribl.mode = Mode::Off;
    let g = Gate::start_config(cfg.clone()).await;
    let (r, _) = send(
        g.addr,
        "b@example.test",
        &html(&["https://x.bit.example.org/abc"]),
    )
    .await;
    assert!(r.starts_with("550 5.7.1 No shortened links"), "{r}");
    cfg.checks.uribl.mode = Mode::Record;
    let g = Gate::start_config(cfg).await;
    let (r, _) = send(
        g.addr,
        "b@example.test",
        &html(&["https://x.bit.example.org/abc"]),
    )
    .await;
    assert!(r.starts_with("550 5.7.1 No shortened links"), "{r}");
    let (r, _) = send(g.addr, "b@example.test", &html(&["https://spammy.com/"])).await;
    assert!(r.starts_with("550 5.7.1 Listed link (rule)"), "{r}");
    let (r, _) = send(g.addr, "b@example.test", &html(&["https://fine.org/"])).await;
    assert!(r.starts_with("250"), "{r}");
    assert_eq!(mta.stored().len(), 1);
}
