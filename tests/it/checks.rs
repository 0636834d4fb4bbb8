//! The checks against a real authoritative DNS server serving test zones
//! on loopback (hickory-server, in-process): DNSBL, SPF, DKIM, DMARC,
//! iprev, Authentication-Results, caching. Never the system resolver.

use crate::common;

use base64::Engine;
use common::config::{behind_proxy, test_config, with_dns, write_config, zone};
use common::dns::{FakeDns, Rec, a, aaaa, ptr, silent_dns, txt};
use common::{Client, FakeMta, Gate, Script, split_ours};
use mail_auth::crypto::{Ed25519Key, RsaKey, Sha256};
use mail_auth::dkim::DkimSigner;
use mail_auth::headers::HeaderWriter;
use portcullis::config::{
    Action, ChecksConfig, Config, Mode, RejectAt, ReturnFilter, Zone, ZoneType,
};
use rustls_pki_types::pem::PemObject;
use std::net::SocketAddr;
use std::time::Duration;

const ORIGINS: &[&str] = &["test.", "in-addr.arpa.", "ip6.arpa."];

/// The ed25519 test key, generated per run, and its DNS record.
fn ed25519() -> (Ed25519Key, Rec) {
    let der = Ed25519Key::generate_pkcs8().unwrap();
    let key = Ed25519Key::from_pkcs8_der(&der).unwrap();
    let p = base64::engine::general_purpose::STANDARD.encode(key.public_key());
    let rec = txt(
        "ed._domainkey.signed.test.",
        &format!("v=DKIM1; k=ed25519; p={p}"),
    );
    (key, rec)
}

/// The RSA test key (test-only, from tests/dns) and its DNS record.
fn rsa() -> (RsaKey<Sha256>, Rec) {
    let pem = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/dns/dkim-rsa.key"
    ))
    .unwrap();
    let der = rustls_pki_types::PrivateKeyDer::from_pem_slice(&pem).unwrap();
    let key = RsaKey::<Sha256>::from_key_der(der).unwrap();
    let txt_value = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/dns/dkim-rsa.txt"
    ))
    .unwrap();
    (key, txt("rsa._domainkey.signed.test.", txt_value.trim()))
}

/// The test zones: DNSBLs, SPF/DMARC policies, reverse names.
fn zones(extra: Vec<Rec>) -> Vec<Rec> {
    let mut r = vec![
        // bl.test: RFC 5782 entries, and clients 127.0.0.2-5 with various answers.
        a("2.0.0.127.bl.test.", "127.0.0.2"),
        txt("2.0.0.127.bl.test.", "Listed for testing: 127.0.0.2"),
        a("3.0.0.127.bl.test.", "127.0.0.3"),
        a("4.0.0.127.bl.test.", "127.0.0.4"),
        a("5.0.0.127.bl.test.", "127.255.255.254"),
        a(
            "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.bl.test.",
            "127.0.0.2",
        ),
        // err.test: a Spamhaus-style "public resolver" answer for everything tested.
        a("2.0.0.127.err.test.", "127.255.255.254"),
        a("6.0.0.127.err.test.", "127.255.255.254"),
        // broken.test: lacks the 127.0.0.2 test entry, lists 127.0.0.6.
        a("6.0.0.127.broken.test.", "127.0.0.2"),
        // dbl.test: a domain list.
        a("test.dbl.test.", "127.0.1.2"),
        a("spammer.test.dbl.test.", "127.0.1.2"),
        // SPF for sender domains.
        txt("pass.test.", "v=spf1 ip4:127.0.0.0/8 -all"),
        txt("fail.test.", "v=spf1 ip4:192.0.2.0/24 -all"),
        txt("softfail.test.", "v=spf1 ip4:192.0.2.0/24 ~all"),
        txt("neutral.test.", "v=spf1 ?all"),
        a("none.test.", "192.0.2.1"),
        txt("permerror.test.", "v=spf1 ip4:not-an-address -all"),
        // DMARC.
        txt("reject.test.", "v=spf1 ip4:127.0.0.0/8 -all"),
        txt("_dmarc.reject.test.", "v=DMARC1; p=reject"),
        txt("quarantine.test.", "v=spf1 ip4:127.0.0.0/8 -all"),
        txt("_dmarc.quarantine.test.", "v=DMARC1; p=quarantine"),
        txt("pnone.test.", "v=spf1 ip4:127.0.0.0/8 -all"),
        txt("_dmarc.pnone.test.", "v=DMARC1; p=none"),
        txt("signed.test.", "v=spf1 ip4:192.0.2.0/24 -all"),
        txt("_dmarc.signed.test.", "v=DMARC1; p=reject"),
        // iprev: 203.0.113.9 <-> good.test; 203.0.113.8 -> liar.test, which
        // does not map back. (The resolver answers 127/8 reverse names itself,
        // so these clients arrive through a PROXY header.)
        ptr("9.113.0.203.in-addr.arpa.", "good.test."),
        a("good.test.", "203.0.113.9"),
        ptr("8.113.0.203.in-addr.arpa.", "liar.test."),
        a("liar.test.", "192.0.2.99"),
        txt("proxied.test.", "v=spf1 ip4:203.0.113.0/24 -all"),
        txt("_dmarc.proxied.test.", "v=DMARC1; p=reject"),
        ptr(
            "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.ip6.arpa.",
            "six.test.",
        ),
        aaaa("six.test.", "::1"),
    ];
    r.extend(extra);
    r
}

/// The test config (every check off) with its DNS at `dns`, listening on
/// `listen`, and the checks that `set` turns on.
fn config(
    mta: SocketAddr,
    dns: SocketAddr,
    listen: &str,
    set: impl FnOnce(&mut ChecksConfig),
) -> Config {
    let mut cfg = test_config(mta);
    cfg.listen[0].addr = listen.parse().unwrap();
    cfg.limits.max_connections_per_ip = 100;
    with_dns(&mut cfg, dns);
    set(&mut cfg.checks);
    cfg
}

/// Like `config`, but clients arrive through a trusted PROXY header.
fn proxied_config(mta: SocketAddr, dns: SocketAddr, set: impl FnOnce(&mut ChecksConfig)) -> Config {
    let mut cfg = config(mta, dns, "127.0.0.1:0", set);
    behind_proxy(&mut cfg);
    cfg
}

fn refusing(name: &str) -> Zone {
    Zone {
        action: Some(Action::Reject),
        ..zone(name)
    }
}

/// DNSBL zones in enforce mode, everything else off.
fn bl(c: &mut ChecksConfig) {
    c.dnsbl.mode = Mode::Enforce;
    let returns = ["127.0.0.2", "&0.0.0.4"].map(|r| ReturnFilter::parse(r).unwrap());
    c.dnsbl.zones = vec![
        Zone {
            returns: returns.to_vec(),
            ..refusing("bl.test")
        },
        refusing("err.test"),
        refusing("broken.test"),
    ];
}

/// SPF enforced (MAIL FROM only) with a scored softfail.
fn spf(c: &mut ChecksConfig) {
    c.thresholds.reject = Some(15.0);
    c.thresholds.tag = Some(5.0);
    c.spf.mode = Mode::Enforce;
    c.spf.helo = false;
    c.spf.softfail = Action::Score(6.0);
}

/// SPF (MAIL FROM only), DKIM and DMARC enforced.
fn auth(c: &mut ChecksConfig) {
    c.spf.mode = Mode::Enforce;
    c.spf.helo = false;
    c.dkim.mode = Mode::Enforce;
    c.dmarc.mode = Mode::Enforce;
}

/// A client that a load balancer announces as `ip`.
async fn proxied(gate: SocketAddr, ip: &str, helo: &str) -> Client {
    let mut c = Client::connect(gate).await;
    c.send(format!("PROXY TCP4 {ip} 127.0.0.1 40000 25\r\n").as_bytes())
        .await;
    assert!(c.reply().await.starts_with("220"));
    c.cmd(&format!("EHLO {helo}"), "250").await;
    c
}

async fn session(gate: SocketAddr, from_ip: &str) -> Client {
    let mut c = Client::connect_from(gate, from_ip).await;
    assert!(c.reply().await.starts_with("220"));
    c.cmd("EHLO client.test", "250").await;
    c
}

#[tokio::test]
async fn dnsbl_listed_client_refused_at_rcpt_naming_zone_and_reason() {
    let dns = FakeDns::start(ORIGINS, zones(vec![])).await;
    let mta = FakeMta::start(Script::default()).await;
    let gate = Gate::start_config(config(mta.addr, dns.addr, "127.0.0.1:0", bl)).await;
    let mut c = session(gate.addr, "127.0.0.2").await;
    c.cmd("MAIL FROM:<a@pass.test>", "250").await;
    let r = c.cmd("RCPT TO:<b@example.test>", "550").await;
    assert_eq!(
        r,
        "550 5.7.1 Service unavailable; client [127.0.0.2] blocked using bl.test; Listed for testing: 127.0.0.2\r\n"
    );
    c.cmd("DATA", "554").await;
    c.cmd("QUIT", "221").await;
    // Upstream never saw the refused transaction, not even a connection for it.
    assert_eq!(mta.count("MAIL"), 0);
    assert_eq!(mta.count("XCLIENT"), 0);

    // Not listed: relayed.
    let mut c = session(gate.addr, "127.0.0.7").await;
    let r = c
        .send_mail(
            "a@pass.test",
            &["b@example.test"],
            b"Subject: ok\r\n\r\nx\r\n",
        )
        .await;
    assert!(r.starts_with("250"), "{r}");
}

#[tokio::test]
async fn dnsbl_return_code_filters_and_ipv6() {
    let dns = FakeDns::start(ORIGINS, zones(vec![])).await;
    let mta = FakeMta::start(Script::default()).await;
    let gate = Gate::start_config(config(mta.addr, dns.addr, "127.0.0.1:0", bl)).await;
    // 127.0.0.3 answers 127.0.0.3: not in [127.0.0.2, &0.0.0.4].
    let mut c = session(gate.addr, "127.0.0.3").await;
    c.cmd("MAIL FROM:<a@pass.test>", "250").await;
    c.cmd("RCPT TO:<b@example.test>", "250").await;
    // 127.0.0.4 answers 127.0.0.4: matches the bit mask.
    let mut c = session(gate.addr, "127.0.0.4").await;
    c.cmd("MAIL FROM:<a@pass.test>", "250").await;
    c.cmd("RCPT TO:<b@example.test>", "550 5.7.1").await;

    // IPv6 client ::1, listed by nibbles.
    let gate6 = Gate::start_config(config(mta.addr, dns.addr, "[::1]:0", bl)).await;
    let mut c = Client::connect(gate6.addr).await;
    c.reply().await;
    c.cmd("EHLO six.test", "250").await;
    c.cmd("MAIL FROM:<a@pass.test>", "250").await;
    let r = c.cmd("RCPT TO:<b@example.test>", "550 5.7.1").await;
    assert!(r.contains("client [::1] blocked using bl.test"), "{r}");
}

#[tokio::test]
async fn error_answers_never_reject_and_disable_the_zone() {
    let dns = FakeDns::start(ORIGINS, zones(vec![])).await;
    let mta = FakeMta::start(Script::default()).await;
    let running = common::start_server_config(config(mta.addr, dns.addr, "127.0.0.1:0", bl)).await;
    let (engine, addr) = (running.engine, running.addr);
    let state = |z: &str| {
        engine
            .dnsbl
            .zones
            .iter()
            .find(|s| s.conf.zone == z)
            .unwrap()
            .usable()
    };
    // The gate's own self-test at start tests the zones in order and would
    // enable bl.test again behind the sessions (which run on the gate's
    // connection threads, beside this test): wait until it has disabled
    // err.test, which comes after bl.test.
    let started = std::time::Instant::now();
    while state("err.test") {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no self-test at start"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(state("bl.test"), "bl.test passed its self-test");
    // 127.0.0.5 gets 127.255.255.254 from bl.test, 127.0.0.6 from err.test.
    for ip in ["127.0.0.5", "127.0.0.6"] {
        let mut c = session(addr, ip).await;
        c.cmd("MAIL FROM:<a@pass.test>", "250").await;
        c.cmd("RCPT TO:<b@example.test>", "250").await;
    }
    assert!(
        !state("bl.test"),
        "bl.test should be disabled after an error answer"
    );
    assert!(!state("err.test"));
    // Disabled: even a real listing is skipped (fail open) until a self-test passes.
    let mut c = session(addr, "127.0.0.2").await;
    c.cmd("MAIL FROM:<a@pass.test>", "250").await;
    c.cmd("RCPT TO:<b@example.test>", "250").await;
    engine.dnsbl.self_test().await;
    assert!(state("bl.test"), "bl.test passes RFC 5782 tests again");
    assert!(
        !state("err.test"),
        "err.test answers error codes to its test entry too"
    );
}

#[tokio::test]
async fn self_test_disables_a_broken_zone() {
    let dns = FakeDns::start(ORIGINS, zones(vec![])).await;
    let mta = FakeMta::start(Script::default()).await;
    let running = common::start_server_config(config(mta.addr, dns.addr, "127.0.0.1:0", bl)).await;
    let (engine, addr) = (running.engine, running.addr);
    engine.dnsbl.self_test().await;
    let state = |z: &str| {
        engine
            .dnsbl
            .zones
            .iter()
            .find(|s| s.conf.zone == z)
            .unwrap()
            .usable()
    };
    assert!(state("bl.test"));
    assert!(!state("broken.test"), "no 127.0.0.2 entry: disabled");
    // 127.0.0.6 is listed by broken.test, which is disabled: accepted.
    let mut c = session(addr, "127.0.0.6").await;
    c.cmd("MAIL FROM:<a@pass.test>", "250").await;
    c.cmd("RCPT TO:<b@example.test>", "250").await;
}

#[tokio::test]
async fn dns_timeouts_give_the_configured_temporary_behaviour() {
    let (dead, _keep) = silent_dns().await;
    let mta = FakeMta::start(Script::default()).await;
    // DNSBL on_error: tempfail -> 451 4.4.3.
    let gate = Gate::start_config(config(mta.addr, dead, "127.0.0.1:0", |c| {
        c.dnsbl.mode = Mode::Enforce;
        c.dnsbl.on_error = Action::Tempfail;
        c.dnsbl.zones = vec![refusing("bl.test")];
    }))
    .await;
    let mut c = session(gate.addr, "127.0.0.2").await;
    c.cmd("MAIL FROM:<a@pass.test>", "250").await;
    c.cmd("RCPT TO:<b@example.test>", "451 4.4.3").await;
    // on_error: accept (the default) -> fail open.
    let gate = Gate::start_config(config(mta.addr, dead, "127.0.0.1:0", |c| {
        c.dnsbl.mode = Mode::Enforce;
        c.dnsbl.zones = vec![refusing("bl.test")];
    }))
    .await;
    let mut c = session(gate.addr, "127.0.0.2").await;
    c.cmd("MAIL FROM:<a@pass.test>", "250").await;
    c.cmd("RCPT TO:<b@example.test>", "250").await;
    // SPF temperror -> 451 4.7.24 by default.
    let gate = Gate::start_config(config(mta.addr, dead, "127.0.0.1:0", |c| {
        c.spf.mode = Mode::Enforce;
    }))
    .await;
    let mut c = session(gate.addr, "127.0.0.7").await;
    c.cmd("MAIL FROM:<a@pass.test>", "250").await;
    let r = c.cmd("RCPT TO:<b@example.test>", "451 4.7.24").await;
    assert!(r.contains("pass.test"), "{r}");
    // Only the fail-open gate's transaction reached upstream.
    assert_eq!(mta.count("MAIL"), 1);
}

#[tokio::test]
async fn spf_results_and_their_actions() {
    let dns = FakeDns::start(ORIGINS, zones(vec![])).await;
    let mta = FakeMta::start(Script::default()).await;
    let gate = Gate::start_config(config(mta.addr, dns.addr, "127.0.0.1:0", spf)).await;
    for (domain, want_rcpt, ar) in [
        ("pass.test", "250", "spf=pass"),
        ("fail.test", "550 5.7.23", ""),
        ("softfail.test", "250", "spf=softfail"),
        ("neutral.test", "250", "spf=neutral"),
        ("none.test", "250", "spf=none"),
        ("permerror.test", "250", "spf=permerror"),
    ] {
        let mut c = session(gate.addr, "127.0.0.7").await;
        c.cmd(&format!("MAIL FROM:<a@{domain}>"), "250").await;
        let r = c.cmd("RCPT TO:<b@example.test>", want_rcpt).await;
        if domain == "fail.test" {
            assert!(r.contains("fail.test does not designate 127.0.0.7"), "{r}");
            continue;
        }
        c.cmd("DATA", "354").await;
        c.send(format!("From: a@{domain}\r\nSubject: spf\r\n\r\nx\r\n.\r\n").as_bytes())
            .await;
        assert!(c.reply().await.starts_with("250"));
        let stored = mta.stored();
        let (ours, _) = split_ours(&stored.last().unwrap().data);
        assert!(ours.contains(ar), "{domain}: {ours}");
        assert!(
            ours.contains(&format!("smtp.mailfrom=a@{domain}")),
            "{ours}"
        );
        let flag = if domain == "softfail.test" {
            "X-Spam-Flag: YES"
        } else {
            "X-Spam-Flag: NO"
        };
        assert!(ours.contains(flag), "{domain}: {ours}");
    }
    // The refused (fail) transaction never reached upstream.
    assert_eq!(mta.count("MAIL FROM:<A@FAIL"), 0);
}

/// Signs `body` (with headers) for signed.test with the given key.
fn sign<K: mail_auth::crypto::SigningKey>(key: K, selector: &str, msg: &str) -> String {
    let sig = DkimSigner::from_key(key)
        .domain("signed.test")
        .selector(selector)
        .headers(["From", "To", "Subject"])
        .sign(msg.as_bytes())
        .unwrap();
    format!("{}{msg}", sig.to_header())
}

async fn deliver(gate: SocketAddr, from_ip: &str, sender: &str, msg: &str) -> String {
    let mut c = session(gate, from_ip).await;
    c.cmd(&format!("MAIL FROM:<{sender}>"), "250").await;
    let r = c.cmd("RCPT TO:<b@example.test>", "").await;
    if !r.starts_with("250") {
        return r;
    }
    c.cmd("DATA", "354").await;
    let mut wire = Vec::new();
    portcullis::wire::data::write_stuffed(msg.as_bytes(), |s| wire.extend_from_slice(s));
    c.send(&wire).await;
    c.reply().await
}

#[tokio::test]
async fn dkim_pass_fail_missing_key_and_ed25519() {
    let (ed, ed_rec) = ed25519();
    let (rsa, rsa_rec) = rsa();
    let dns = FakeDns::start(ORIGINS, zones(vec![ed_rec, rsa_rec])).await;
    let mta = FakeMta::start(Script::default()).await;
    let gate = Gate::start_config(config(mta.addr, dns.addr, "127.0.0.1:0", auth)).await;
    let msg = "From: a@signed.test\r\nTo: b@example.test\r\nSubject: dkim\r\n\r\nsigned body\r\n";

    // RSA and ed25519 pass; DMARC passes through DKIM alignment although SPF
    // fails for this client (signed.test only allows 192.0.2.0/24)... so the
    // sender used is pass.test (SPF pass, unaligned).
    let signed = sign(rsa, "rsa", msg);
    let r = deliver(gate.addr, "127.0.0.7", "x@pass.test", &signed).await;
    assert!(r.starts_with("250"), "{r}");
    let (ours, _) = split_ours(&mta.stored().last().unwrap().data);
    assert!(
        ours.contains("dkim=pass header.d=signed.test header.s=rsa"),
        "{ours}"
    );
    assert!(ours.contains("dmarc=pass"), "{ours}");

    let signed_ed = sign(ed, "ed", msg);
    let r = deliver(gate.addr, "127.0.0.7", "x@pass.test", &signed_ed).await;
    assert!(r.starts_with("250"), "{r}");
    let (ours, _) = split_ours(&mta.stored().last().unwrap().data);
    assert!(
        ours.contains("dkim=pass header.d=signed.test header.s=ed"),
        "{ours}"
    );

    // Body changed after signing: body hash mismatch -> DKIM fail -> DMARC
    // fails -> p=reject -> 550 5.7.1 naming the domain.
    let tampered = signed_ed.replace("signed body", "other body");
    let r = deliver(gate.addr, "127.0.0.7", "x@pass.test", &tampered).await;
    assert!(
        r.starts_with("550 5.7.1 DMARC policy of signed.test"),
        "{r}"
    );

    // A signed header changed: bad signature, likewise refused.
    let forged = signed_ed.replace("Subject: dkim", "Subject: DKIM");
    let r = deliver(gate.addr, "127.0.0.7", "x@pass.test", &forged).await;
    assert!(r.starts_with("550 5.7.1"), "{r}");

    // Key missing from DNS.
    let (ed2, _) = ed25519();
    let nokey = sign(ed2, "gone", msg);
    let r = deliver(gate.addr, "127.0.0.7", "x@pass.test", &nokey).await;
    assert!(r.starts_with("550 5.7.1"), "{r}");

    // In record mode the same failures are only written down.
    let gate = Gate::start_config(config(mta.addr, dns.addr, "127.0.0.1:0", |c| {
        auth(c);
        for m in [&mut c.spf.mode, &mut c.dkim.mode, &mut c.dmarc.mode] {
            *m = Mode::Record;
        }
    }))
    .await;
    let r = deliver(gate.addr, "127.0.0.7", "x@pass.test", &tampered).await;
    assert!(r.starts_with("250"), "{r}");
    let (ours, _) = split_ours(&mta.stored().last().unwrap().data);
    assert!(
        ours.contains("dkim=neutral (body hash did not verify)"),
        "{ours}"
    );
    assert!(ours.contains("dmarc=fail"), "{ours}");
    let r = deliver(gate.addr, "127.0.0.7", "x@pass.test", &nokey).await;
    assert!(r.starts_with("250"), "{r}");
    let (ours, _) = split_ours(&mta.stored().last().unwrap().data);
    assert!(
        ours.contains("dkim=permerror")
            || ours.contains("dkim=neutral")
            || ours.contains("dkim=temperror")
            || ours.contains("dkim=fail"),
        "{ours}"
    );
}

/// A p=reject policy that was found is enforced even when the registry's
/// name server fails the parent lookup (`_dmarc.test.`) that DMARC's tree
/// walk would ask: the organizational domain comes from the Public Suffix
/// List (RFC 7489), so that lookup is never needed.
#[tokio::test]
async fn dmarc_policy_found_is_not_voided_by_a_failing_parent_lookup() {
    use common::dns::ResponseCode;
    for code in [ResponseCode::ServFail, ResponseCode::Refused] {
        let dns = FakeDns::start_failing(ORIGINS, zones(vec![]), &[("_dmarc.test.", code)]).await;
        let mta = FakeMta::start(Script::default()).await;
        let gate = Gate::start_config(config(mta.addr, dns.addr, "127.0.0.1:0", auth)).await;
        let spoof =
            "From: ceo@reject.test\r\nTo: b@example.test\r\nSubject: pay\r\n\r\nwire it\r\n";
        let r = deliver(gate.addr, "127.0.0.7", "x@pass.test", spoof).await;
        assert_eq!(
            r, "550 5.7.1 DMARC policy of reject.test rejects this message\r\n",
            "{code:?}"
        );
        // A subdomain without its own record: the organization's policy
        // (sp defaults to p) applies, found without asking above it.
        let sub = "From: ceo@mail.reject.test\r\nTo: b@example.test\r\nSubject: pay\r\n\r\nx\r\n";
        let r = deliver(gate.addr, "127.0.0.7", "x@pass.test", sub).await;
        assert!(r.starts_with("550 5.7.1"), "{code:?}: {r}");
        assert_eq!(dns.count("_dmarc.test."), 0, "{:?}", dns.queries());
        // Aligned mail from the same domain still passes.
        let ok = "From: ceo@reject.test\r\nTo: b@example.test\r\nSubject: ok\r\n\r\nx\r\n";
        let r = deliver(gate.addr, "127.0.0.7", "x@reject.test", ok).await;
        assert!(r.starts_with("250"), "{code:?}: {r}");
        assert!(mta.stored().len() == 1);
    }
}

#[tokio::test]
async fn dmarc_reject_quarantine_none_aligned_and_unaligned() {
    let dns = FakeDns::start(ORIGINS, zones(vec![])).await;
    let mta = FakeMta::start(Script::default()).await;
    let gate = Gate::start_config(config(mta.addr, dns.addr, "127.0.0.1:0", auth)).await;
    let msg = |from: &str| {
        format!("From: x@{from}\r\nTo: b@example.test\r\nSubject: dmarc\r\n\r\nbody\r\n")
    };

    // Aligned: SPF passes for the From domain.
    let r = deliver(gate.addr, "127.0.0.7", "x@reject.test", &msg("reject.test")).await;
    assert!(r.starts_with("250"), "{r}");
    let (ours, _) = split_ours(&mta.stored().last().unwrap().data);
    assert!(
        ours.contains("dmarc=pass header.from=reject.test"),
        "{ours}"
    );

    // Unaligned: SPF passes for pass.test, From is reject.test, no DKIM.
    let r = deliver(gate.addr, "127.0.0.7", "x@pass.test", &msg("reject.test")).await;
    assert_eq!(
        r,
        "550 5.7.1 DMARC policy of reject.test rejects this message\r\n"
    );

    // p=quarantine: scored 5 -> tagged, delivered.
    let r = deliver(
        gate.addr,
        "127.0.0.7",
        "x@pass.test",
        &msg("quarantine.test"),
    )
    .await;
    assert!(r.starts_with("250"), "{r}");
    let (ours, _) = split_ours(&mta.stored().last().unwrap().data);
    assert!(
        ours.contains("dmarc=fail")
            && ours.contains("X-Spam-Flag: YES")
            && ours.contains("X-Spam-Score: 5.0"),
        "{ours}"
    );

    // p=none: delivered, untagged.
    let r = deliver(gate.addr, "127.0.0.7", "x@pass.test", &msg("pnone.test")).await;
    assert!(r.starts_with("250"), "{r}");
    let (ours, _) = split_ours(&mta.stored().last().unwrap().data);
    assert!(
        ours.contains("dmarc=fail") && ours.contains("X-Spam-Flag: NO"),
        "{ours}"
    );

    // Configured to only tag p=reject failures.
    let gate = Gate::start_config(config(mta.addr, dns.addr, "127.0.0.1:0", |c| {
        auth(c);
        c.dmarc.reject = Action::Tag;
    }))
    .await;
    let r = deliver(gate.addr, "127.0.0.7", "x@pass.test", &msg("reject.test")).await;
    assert!(r.starts_with("250"), "{r}");
    let (ours, _) = split_ours(&mta.stored().last().unwrap().data);
    assert!(ours.contains("X-Spam-Flag: YES"), "{ours}");
}

#[tokio::test]
async fn authentication_results_content_and_forged_header_removed() {
    let dns = FakeDns::start(ORIGINS, zones(vec![])).await;
    let mta = FakeMta::start(Script::default()).await;
    let gate = Gate::start_config(proxied_config(mta.addr, dns.addr, |c| {
        auth(c);
        c.spf.helo = true;
        c.iprev.mode = Mode::Enforce;
        c.arc.mode = Mode::Record;
    }))
    .await;
    let msg = "Authentication-Results: gate.test; spf=pass smtp.mailfrom=ceo@bank.test; dkim=pass\r\n\
Authentication-Results: (trust me)\r\n\tGATE.TEST; dmarc=pass\r\n\
Authentication-Results: upstream.example; spf=fail\r\n\
From: x@proxied.test\r\nTo: b@example.test\r\nSubject: forged\r\n\r\nbody\r\n";
    let mut c = proxied(gate.addr, "203.0.113.9", "good.test").await;
    let r = c
        .send_mail("x@proxied.test", &["b@example.test"], msg.as_bytes())
        .await;
    assert!(r.starts_with("250"), "{r}");
    let stored = mta.stored();
    let (ours, _) = split_ours(&stored[0].data);
    let rest = String::from_utf8(stored[0].data.clone()).unwrap();
    // Ours: one header, first, with our authserv-id and every result.
    assert!(
        ours.starts_with("Authentication-Results: gate.test;"),
        "{ours}"
    );
    for want in [
        "spf=pass",
        "smtp.mailfrom=x@proxied.test",
        "smtp.helo=good.test",
        "dmarc=pass header.from=proxied.test",
        "iprev=pass policy.iprev=203.0.113.9",
    ] {
        assert!(ours.contains(want), "{want} missing: {ours}");
    }
    // The forged ones claiming gate.test are gone; the foreign one stays.
    assert!(
        !rest.contains("ceo@bank.test") && !rest.contains("GATE.TEST"),
        "{rest}"
    );
    assert_eq!(
        rest.matches("Authentication-Results: gate.test").count(),
        1,
        "{rest}"
    );
    assert!(rest.contains("X-Spam-Score: 0.0\r\nAuthentication-Results: upstream.example; spf=fail\r\nFrom: x@proxied.test"), "{rest}");
    // XCLIENT carried the verified reverse name.
    assert!(
        stored[0]
            .xclient
            .as_deref()
            .unwrap()
            .contains("NAME=good.test"),
        "{:?}",
        stored[0].xclient
    );
}

#[tokio::test]
async fn iprev_fail_scored_and_enforceable() {
    let dns = FakeDns::start(ORIGINS, zones(vec![])).await;
    let mta = FakeMta::start(Script::default()).await;
    let gate = Gate::start_config(proxied_config(mta.addr, dns.addr, |c| {
        c.iprev.mode = Mode::Enforce;
        c.iprev.fail = Action::Reject;
    }))
    .await;
    let mut c = proxied(gate.addr, "203.0.113.8", "liar.test").await;
    c.cmd("MAIL FROM:<a@pass.test>", "250").await;
    let r = c.cmd("RCPT TO:<b@example.test>", "550 5.7.25").await;
    assert!(r.contains("203.0.113.8"), "{r}");
    let mut c = proxied(gate.addr, "203.0.113.9", "good.test").await;
    c.cmd("MAIL FROM:<a@pass.test>", "250").await;
    c.cmd("RCPT TO:<b@example.test>", "250").await;
}

#[tokio::test]
async fn domain_lists_check_helo_and_sender_domain() {
    let dns = FakeDns::start(ORIGINS, zones(vec![])).await;
    let mta = FakeMta::start(Script::default()).await;
    let gate = Gate::start_config(config(mta.addr, dns.addr, "127.0.0.1:0", |c| {
        c.dnsbl.mode = Mode::Enforce;
        c.dnsbl.zones = vec![Zone {
            kind: ZoneType::Domain,
            ..refusing("dbl.test")
        }];
    }))
    .await;
    let mut c = session(gate.addr, "127.0.0.7").await;
    c.cmd("MAIL FROM:<a@spammer.test>", "250").await;
    let r = c.cmd("RCPT TO:<b@example.test>", "550 5.7.1").await;
    assert!(r.contains("dbl.test"), "{r}");
    let mut c = Client::connect_from(gate.addr, "127.0.0.7").await;
    c.reply().await;
    c.cmd("EHLO spammer.test", "250").await;
    c.cmd("MAIL FROM:<a@pass.test>", "250").await;
    c.cmd("RCPT TO:<b@example.test>", "550 5.7.1").await;
    let mut c = session(gate.addr, "127.0.0.7").await;
    c.cmd("MAIL FROM:<a@pass.test>", "250").await;
    c.cmd("RCPT TO:<b@example.test>", "250").await;
}

#[tokio::test]
async fn cache_hits_send_no_packet_and_concurrent_lookups_coalesce() {
    let dns = FakeDns::start(ORIGINS, zones(vec![])).await;
    let mta = FakeMta::start(Script::default()).await;
    let gate = Gate::start_config(config(mta.addr, dns.addr, "127.0.0.1:0", |c| {
        c.spf.mode = Mode::Enforce;
        c.spf.helo = false;
        c.dnsbl.mode = Mode::Enforce;
        c.dnsbl.zones = vec![refusing("bl.test")];
    }))
    .await;
    // 20 sessions at once from one client: one DNSBL query.
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let addr = gate.addr;
        tasks.push(tokio::spawn(async move {
            let mut c = session(addr, "127.0.0.7").await;
            c.cmd("MAIL FROM:<a@pass.test>", "250").await;
            c.cmd("RCPT TO:<b@example.test>", "250").await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(dns.count("7.0.0.127.bl.test."), 1, "{:?}", dns.queries());
    let spf_queries = dns.count("pass.test.");
    assert!(spf_queries >= 1);
    let before = dns.queries().len();
    // Again, sequentially: everything from the cache, no packet at all.
    for _ in 0..5 {
        let mut c = session(gate.addr, "127.0.0.7").await;
        c.cmd("MAIL FROM:<a@pass.test>", "250").await;
        c.cmd("RCPT TO:<b@example.test>", "250").await;
    }
    assert_eq!(
        dns.queries().len(),
        before,
        "cache hits must not query: {:?}",
        dns.queries()
    );
    // That was a negative answer (NXDOMAIN): cached too.
    assert_eq!(dns.count("7.0.0.127.bl.test."), 1);
}

/// A client whose zones are all cached is answered at connect without a
/// query, a future or a task (`check_ip_cached`): nothing before the first
/// lookup, then the same outcomes as the lookup, listed and clean, with no
/// packet; a zone whose entry is missing sends it back to the lookup.
#[tokio::test]
async fn cached_zone_answers_are_read_without_a_lookup() {
    use portcullis::checks::dnsbl::{Dnsbl, ZoneOutcome};
    let dns = FakeDns::start(ORIGINS, zones(vec![])).await;
    let resolver = portcullis::dns::Dns::new(&portcullis::config::DnsConfig {
        nameservers: vec![dns.addr],
        ..Default::default()
    })
    .unwrap();
    let bl = Dnsbl::new(&[zone("bl.test"), zone("dbl.test")], resolver);
    let (listed, clean) = ("127.0.0.2".parse().unwrap(), "127.0.0.9".parse().unwrap());
    assert_eq!(bl.check_ip_cached(listed), None, "nothing cached yet");
    let asked = bl.check_ip(listed).await;
    assert!(matches!(asked[0], ZoneOutcome::Listed(_)), "{asked:?}");
    let before = dns.queries().len();
    let hits = bl
        .dns()
        .stats
        .cache_hits
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(bl.check_ip_cached(listed), Some(asked));
    assert_eq!(dns.queries().len(), before, "read from the cache");
    assert_eq!(
        bl.dns()
            .stats
            .cache_hits
            .load(std::sync::atomic::Ordering::Relaxed),
        hits + 2,
        "a hit per zone"
    );
    // Clean in both: cached as NXDOMAIN.
    assert_eq!(bl.check_ip_cached(clean), None);
    let asked = bl.check_ip(clean).await;
    assert_eq!(asked, vec![ZoneOutcome::Clean, ZoneOutcome::Clean]);
    assert_eq!(bl.check_ip_cached(clean), Some(asked));
}

#[tokio::test]
async fn allow_lists_skip_the_checks() {
    let dns = FakeDns::start(ORIGINS, zones(vec![])).await;
    let mta = FakeMta::start(Script::default()).await;
    let gate = Gate::start_config(config(mta.addr, dns.addr, "127.0.0.1:0", |c| {
        bl(c);
        c.allow.clients = vec!["127.0.0.2/32".parse().unwrap()];
        c.allow.senders = vec!["pass.test".into()];
    }))
    .await;
    let mut c = session(gate.addr, "127.0.0.2").await;
    let r = c
        .send_mail(
            "a@anything.test",
            &["b@example.test"],
            b"Subject: x\r\n\r\nx\r\n",
        )
        .await;
    assert!(r.starts_with("250"), "{r}");
    // Listed client 127.0.0.4, but an allowed sender domain (and subdomain).
    let mut c = session(gate.addr, "127.0.0.4").await;
    c.cmd("MAIL FROM:<a@sub.pass.test>", "250").await;
    c.cmd("RCPT TO:<b@example.test>", "250").await;
    // Without the allow-list it would be refused.
    let mut c = session(gate.addr, "127.0.0.4").await;
    c.cmd("MAIL FROM:<a@other.test>", "250").await;
    c.cmd("RCPT TO:<b@example.test>", "550 5.7.1").await;
    let _ = Duration::ZERO;
}

#[tokio::test]
async fn reject_at_connect_answers_554_instead_of_the_greeting() {
    let dns = FakeDns::start(ORIGINS, zones(vec![])).await;
    let mta = FakeMta::start(Script::default()).await;
    let gate = Gate::start_config(config(mta.addr, dns.addr, "127.0.0.1:0", |c| {
        bl(c);
        c.reject_at = RejectAt::Connect;
    }))
    .await;
    let mut c = Client::connect_from(gate.addr, "127.0.0.2").await;
    let r = c.reply().await;
    assert!(
        r.starts_with("554 5.7.1 Service unavailable; client [127.0.0.2] blocked using bl.test"),
        "{r}"
    );
    assert!(c.closed().await);
    let mut c = Client::connect_from(gate.addr, "127.0.0.7").await;
    assert!(c.reply().await.starts_with("220"));
}

#[tokio::test]
async fn config_reload_swaps_the_checks_for_new_sessions_and_refuses_a_bad_file() {
    let dns = FakeDns::start(ORIGINS, zones(vec![])).await;
    let mta = FakeMta::start(Script::default()).await;
    let dir = std::env::temp_dir().join(format!("portcullis-cfg-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("gate.yaml");
    write_config(&file, &config(mta.addr, dns.addr, "127.0.0.1:0", |_| {}));
    let cfg = portcullis::config::Config::load(Some(&file)).unwrap();
    let server = portcullis::server::Server::bind(cfg).await.unwrap();
    let addr = server.local_addrs()[0];
    let reloader = server.config_reloader();
    tokio::spawn(server.run(std::future::pending()));

    let mut before = session(addr, "127.0.0.2").await;
    // Same listener (port 0 is rebound only on restart), now with a DNSBL.
    write_config(&file, &config(mta.addr, dns.addr, "127.0.0.1:0", bl));
    reloader.reload(&file).await.unwrap();
    let mut after = session(addr, "127.0.0.2").await;
    after.cmd("MAIL FROM:<a@pass.test>", "250").await;
    after.cmd("RCPT TO:<b@example.test>", "550 5.7.1").await;
    // The session that started before keeps its checks.
    before.cmd("MAIL FROM:<a@pass.test>", "250").await;
    before.cmd("RCPT TO:<b@example.test>", "250").await;

    // A broken file: refused, counted, the running checks stay.
    std::fs::write(&file, "hostname: gate.test\nlisten: [}\n").unwrap();
    let e = reloader.reload(&file).await.unwrap_err();
    assert!(e.contains("gate.yaml:2:"), "{e}");
    assert_eq!(
        reloader.failed.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    let mut c = session(addr, "127.0.0.2").await;
    c.cmd("MAIL FROM:<a@pass.test>", "250").await;
    c.cmd("RCPT TO:<b@example.test>", "550 5.7.1").await;
}

#[tokio::test]
async fn rules_on_check_results_and_reverse_name() {
    let dns = FakeDns::start(ORIGINS, zones(vec![])).await;
    let mta = FakeMta::start(Script::default()).await;
    let dir = std::env::temp_dir().join(format!("portcullis-check-rules-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("50.yaml"),
        r#"
rules:
  - id: REVERSE_GOOD
    description: verified reverse name
    when: {reverse: {domain: good.test}}
    action: {add_header: {name: X-Reverse, value: good}}
  - id: IPREV_FAIL
    description: iprev result
    when:
      all:
        - iprev: [fail]
        - not: {client_ip: {cidr: [127.0.0.0/8]}}
    action: {reject: {code: 550, enhanced: 5.7.25, text: "iprev rule"}}
  - id: SPF_PASS_DNSBL
    description: spf and dnsbl results together
    when:
      all:
        - spf: [pass]
        - dnsbl: [bl.test]
    action: {tempfail: {text: "listed and passing"}}
  - id: DMARC_FAIL_REJECT_POLICY
    description: dmarc result with policy
    when: {dmarc: ["fail:reject"]}
    action: {reject: {text: "dmarc rule"}}
  - id: DKIM_NONE
    description: dkim result
    when: {dkim: [none]}
    action: {add_header: {name: X-Dkim, value: none}}
  - id: POSTMASTER_NEEDS_SPF
    description: a RCPT-stage rule that also uses a MAIL-stage check result
    when:
      all:
        - rcpt_local: {exact: postmaster}
        - not: {spf: [pass]}
    action: {reject: {text: "postmaster wants SPF"}}
"#,
    )
    .unwrap();
    let mut cfg = proxied_config(mta.addr, dns.addr, |c| {
        auth(c);
        for m in [&mut c.spf.mode, &mut c.dkim.mode, &mut c.dmarc.mode] {
            *m = Mode::Record;
        }
        c.iprev.mode = Mode::Record;
        c.arc.mode = Mode::Record;
        c.dnsbl.mode = Mode::Record;
        c.dnsbl.zones = vec![zone("bl.test")];
    });
    cfg.rules_dir = Some(dir.clone());
    let gate = Gate::start_config(cfg).await;

    // reverse + dkim: headers added; dmarc fail with p=reject: refused by the rule.
    let mut c = proxied(gate.addr, "203.0.113.9", "good.test").await;
    let r = c
        .send_mail(
            "x@proxied.test",
            &["b@example.test"],
            b"From: x@proxied.test\r\nSubject: r\r\n\r\nx\r\n",
        )
        .await;
    assert!(r.starts_with("250"), "{r}");
    let all = String::from_utf8_lossy(&mta.stored().last().unwrap().data).into_owned();
    assert!(
        all.contains("X-Reverse: good\r\n") && all.contains("X-Dkim: none\r\n"),
        "{all}"
    );
    let r = c
        .send_mail(
            "x@proxied.test",
            &["b@example.test"],
            b"From: x@reject.test\r\nSubject: r\r\n\r\nx\r\n",
        )
        .await;
    assert!(r.starts_with("550 5.7.1 dmarc rule"), "{r}");

    // A RCPT-stage rule sees the SPF result of MAIL: pass goes through,
    // anything else is refused for that recipient only.
    c.cmd("MAIL FROM:<x@proxied.test>", "250").await;
    c.cmd("RCPT TO:<postmaster@example.test>", "250").await;
    c.cmd("RSET", "250").await;
    c.cmd("MAIL FROM:<x@neutral.test>", "250").await;
    c.cmd(
        "RCPT TO:<postmaster@example.test>",
        "550 5.7.1 postmaster wants SPF",
    )
    .await;
    c.cmd("RCPT TO:<b@example.test>", "250").await;
    c.cmd("RSET", "250").await;

    // iprev fail.
    let mut c = proxied(gate.addr, "203.0.113.8", "liar.test").await;
    c.cmd("MAIL FROM:<x@proxied.test>", "250").await;
    c.cmd("RCPT TO:<b@example.test>", "550 5.7.25 iprev rule")
        .await;

    // spf pass and listed (127.0.0.2 through the proxy header).
    let mut c = proxied(gate.addr, "127.0.0.2", "x.test").await;
    c.cmd("MAIL FROM:<x@pass.test>", "250").await;
    c.cmd("RCPT TO:<b@example.test>", "451 4.7.1 listed and passing")
        .await;
}

/// Upstream is told the client's name as Postfix would have found it,
/// whatever iprev's mode: the forward-confirmed name (NAME), the PTR name
/// (REVERSE_NAME), `[UNAVAILABLE]` when there is none, `[TEMPUNAVAIL]` when
/// DNS failed temporarily.
#[tokio::test]
async fn xclient_carries_the_client_names_with_iprev_off() {
    use common::dns::ResponseCode;
    let dns = FakeDns::start_failing(
        ORIGINS,
        zones(vec![]),
        &[("6.113.0.203.in-addr.arpa.", ResponseCode::ServFail)],
    )
    .await;
    let mut script = Script::default();
    script.ehlo_keywords = script
        .ehlo_keywords
        .into_iter()
        .map(|k| {
            if k.starts_with("XCLIENT") {
                "XCLIENT NAME ADDR PROTO HELO REVERSE_NAME PORT".into()
            } else {
                k
            }
        })
        .collect();
    let mta = FakeMta::start(script).await;
    let gate = Gate::start_config(proxied_config(mta.addr, dns.addr, |_| {})).await;
    for (ip, name, reverse) in [
        ("203.0.113.9", "good.test", "good.test"),
        ("203.0.113.8", "[UNAVAILABLE]", "liar.test"),
        ("203.0.113.7", "[UNAVAILABLE]", "[UNAVAILABLE]"),
        ("203.0.113.6", "[TEMPUNAVAIL]", "[TEMPUNAVAIL]"),
    ] {
        let mut c = proxied(gate.addr, ip, "client.test").await;
        let r = c
            .send_mail(
                "a@sender.test",
                &["b@example.test"],
                b"Subject: n\r\n\r\nx\r\n",
            )
            .await;
        assert!(r.starts_with("250"), "{ip}: {r}");
        let stored = mta.stored();
        let xc = stored.last().unwrap().xclient.clone().unwrap();
        assert!(xc.contains(&format!("ADDR={ip}")), "{xc}");
        assert!(xc.contains(&format!(" NAME={name} ")), "{ip}: {xc}");
        assert!(
            xc.contains(&format!(" REVERSE_NAME={reverse} ")),
            "{ip}: {xc}"
        );
    }
    assert_eq!(mta.stored().len(), 4);
}
