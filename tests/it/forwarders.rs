//! Forwarders and mailing lists. A list (lists.example.test) receives a
//! message from origin.test (DKIM-signed, DMARC p=reject), checks it
//! (dmarc=pass, recorded in its ARC-Authentication-Results), adds a
//! subject tag and a footer (which breaks the origin's signature), seals
//! it with ARC and sends it on. Here DMARC fails: with the list among
//! `allow.arc_sealers` the valid chain lifts the failure (logged as
//! `dmarc=fail (arc override by lists.example.test)`); an untrusted
//! sealer, a chain broken after sealing, or a first ARC-Authentication-
//! Results without dmarc=pass do not. Keys are generated per run, and
//! every record is served by an authoritative DNS server on loopback.
//! Also `allow.forwarders`: SPF is not held against a forwarder that
//! does not seal.

use crate::common::{self, Client, FakeMta, Gate, Script};
use base64::Engine as _;
use common::config::{test_config, with_dns};
use common::dns::{FakeDns, Rec, txt};
use mail_auth::arc::ArcSealer;
use mail_auth::crypto::Ed25519Key;
use mail_auth::dkim::DkimSigner;
use mail_auth::dmarc::verify::DmarcParameters;
use mail_auth::dns::Parameters;
use mail_auth::headers::HeaderWriter;
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{AuthenticatedMessage, AuthenticationResults};
use portcullis::cli::explain::{self, Sample};
use portcullis::config::{Action, Config, DnsConfig, Mode};
use std::net::SocketAddr;

/// A key (as PKCS#8, to make a signer of it each time) and its record.
fn key(selector: &str, domain: &str) -> (Vec<u8>, Rec) {
    let der = Ed25519Key::generate_pkcs8().unwrap();
    let key = Ed25519Key::from_pkcs8_der(&der).unwrap();
    let p = base64::engine::general_purpose::STANDARD.encode(key.public_key());
    let rec = txt(
        &format!("{selector}._domainkey.{domain}."),
        &format!("v=DKIM1; k=ed25519; p={p}"),
    );
    (der, rec)
}

/// What the list did before sealing: its results for the original.
enum Recorded {
    /// DKIM, SPF and DMARC as it verified them (dmarc=pass).
    Verified,
    /// DKIM only: no dmarc=pass to rely on.
    DkimOnly,
}

struct World {
    dns: FakeDns,
    origin: Vec<u8>,
    list: Vec<u8>,
}

async fn world() -> World {
    let (origin, origin_rec) = key("o", "origin.test");
    let (list, list_rec) = key("arc", "lists.example.test");
    let dns = FakeDns::start(
        &["test."],
        vec![
            origin_rec,
            list_rec,
            txt("origin.test.", "v=spf1 ip4:192.0.2.0/24 -all"),
            txt("_dmarc.origin.test.", "v=DMARC1; p=reject"),
            txt("lists.example.test.", "v=spf1 ip4:127.0.0.0/8 -all"),
        ],
    )
    .await;
    World { dns, origin, list }
}

/// The origin's signed message, as the list passes it on.
async fn forwarded(w: &World, recorded: Recorded, tamper: bool) -> String {
    let original = "From: Alice <a@origin.test>\r\nTo: list@lists.example.test\r\nSubject: meeting\r\nMessage-ID: <m1@origin.test>\r\n\r\nSee you at ten.\r\n";
    let sig = DkimSigner::from_key(Ed25519Key::from_pkcs8_der(&w.origin).unwrap())
        .domain("origin.test")
        .selector("o")
        .headers(["From", "To", "Subject", "Message-ID"])
        .sign(original.as_bytes())
        .unwrap();
    let signed = format!("{}{original}", sig.to_header());
    // The list checks what it received from the origin's server.
    let dcfg = DnsConfig {
        nameservers: vec![w.dns.addr],
        ..DnsConfig::default()
    };
    let dns = portcullis::dns::Dns::new(&dcfg).unwrap();
    let (auth, cache) = dns.auth();
    let msg = AuthenticatedMessage::parse(signed.as_bytes()).unwrap();
    let dkim = auth
        .verify_dkim(Parameters::new(&msg).with_cache(cache))
        .await;
    let ip = "192.0.2.1".parse().unwrap();
    let spf_params = SpfParameters::mail_from(
        ip,
        "mail.origin.test",
        "lists.example.test",
        "a@origin.test",
    );
    let spf = auth
        .check_host(Parameters::new(spf_params).with_cache(cache))
        .await;
    let dmarc = auth
        .verify_dmarc(
            Parameters::new(DmarcParameters::new(&msg, &dkim, "origin.test", &spf))
                .with_cache(cache),
        )
        .await;
    let results = match recorded {
        Recorded::Verified => AuthenticationResults::new("lists.example.test")
            .with_dkim_results(&dkim, "origin.test")
            .with_spf_result(&spf, &spf_params)
            .with_dmarc_result(&dmarc),
        Recorded::DkimOnly => {
            AuthenticationResults::new("lists.example.test").with_dkim_results(&dkim, "origin.test")
        }
    };
    // The list tags the subject and adds its footer, then seals.
    let changed = signed
        .replace("Subject: meeting", "Subject: [team] meeting")
        .replace(
            "See you at ten.\r\n",
            "See you at ten.\r\n--\r\nteam mailing list\r\n",
        );
    let changed_msg = AuthenticatedMessage::parse(changed.as_bytes()).unwrap();
    let arc_in = auth
        .verify_arc(Parameters::new(&changed_msg).with_cache(cache))
        .await;
    let set = ArcSealer::from_key(Ed25519Key::from_pkcs8_der(&w.list).unwrap())
        .domain("lists.example.test")
        .selector("arc")
        .headers(["From", "To", "Subject", "DKIM-Signature"])
        .seal(&changed_msg, &results, &arc_in)
        .unwrap();
    let out = format!("{}{changed}", set.to_header());
    if tamper {
        out.replace("See you at ten.", "See you at eleven.")
    } else {
        out
    }
}

fn config(mta: SocketAddr, dns: SocketAddr, sealers: &[&str]) -> Config {
    let mut cfg = test_config(mta);
    with_dns(&mut cfg, dns);
    cfg.limits.max_connections_per_ip = 100;
    let c = &mut cfg.checks;
    c.spf.mode = Mode::Enforce;
    c.dkim.mode = Mode::Enforce;
    c.dmarc.mode = Mode::Enforce;
    c.dmarc.reject = Action::Reject;
    c.arc.mode = Mode::Record;
    c.allow.arc_sealers = sealers.iter().map(|s| s.to_string()).collect();
    cfg
}

async fn deliver(gate: SocketAddr, msg: &str) -> String {
    let mut c = Client::connect_from(gate, "127.0.0.9").await;
    c.reply().await;
    c.cmd("EHLO mail.lists.example.test", "250").await;
    c.cmd("MAIL FROM:<bounces@lists.example.test>", "250").await;
    c.cmd("RCPT TO:<b@example.test>", "250").await;
    c.cmd("DATA", "354").await;
    let mut wire = Vec::new();
    portcullis::wire::data::write_stuffed(msg.as_bytes(), |s| wire.extend_from_slice(s));
    c.send(&wire).await;
    let r = c.reply().await;
    c.cmd("QUIT", "221").await;
    r
}

/// The log line's dmarc value for this message, through `explain` (the
/// same screen as the sessions).
async fn logged_dmarc(cfg: &Config, msg: &str) -> String {
    let x = explain::run(
        cfg.clone(),
        &Sample {
            ip: "127.0.0.9".parse().unwrap(),
            helo: "mail.lists.example.test".into(),
            from: "bounces@lists.example.test".into(),
            rcpts: vec!["b@example.test".into()],
            message: Some(msg.as_bytes().to_vec()),
            tls: false,
            no_dns: false,
        },
    )
    .await
    .unwrap();
    x.log.dmarc
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trusted_sealers_valid_chain_overrides_a_dmarc_failure() {
    let w = world().await;
    let mta = FakeMta::start(Script::default()).await;
    let trusted = config(mta.addr, w.dns.addr, &["example.test"]);
    let g = Gate::start_config(trusted.clone()).await;
    let msg = forwarded(&w, Recorded::Verified, false).await;
    let r = deliver(g.addr, &msg).await;
    assert!(r.starts_with("250"), "{r}");
    let (ours, _) = common::split_ours(&mta.stored().last().unwrap().data);
    assert!(ours.contains("dmarc=fail"), "our own result stays: {ours}");
    assert!(ours.contains("arc=pass"), "{ours}");
    assert_eq!(
        logged_dmarc(&trusted, &msg).await,
        "fail (arc override by lists.example.test)"
    );

    // Not a trusted sealer: p=reject holds.
    let untrusted = config(mta.addr, w.dns.addr, &["other.test"]);
    let g2 = Gate::start_config(untrusted.clone()).await;
    let r = deliver(g2.addr, &msg).await;
    assert!(r.starts_with("550 5.7.1"), "{r}");
    assert_eq!(logged_dmarc(&untrusted, &msg).await, "fail:reject");

    // Changed after sealing: the chain fails, nothing is lifted.
    let tampered = forwarded(&w, Recorded::Verified, true).await;
    let r = deliver(g.addr, &tampered).await;
    assert!(r.starts_with("550 5.7.1"), "{r}");

    // The list recorded no dmarc=pass: nothing to rely on.
    let dkim_only = forwarded(&w, Recorded::DkimOnly, false).await;
    let r = deliver(g.addr, &dkim_only).await;
    assert!(r.starts_with("550 5.7.1"), "{r}");
    assert_eq!(mta.stored().len(), 1);
}

/// A forwarder that does not seal, by client network: its SPF fail is
/// recorded and not held against it; from elsewhere it refuses.
#[tokio::test(flavor = "multi_thread")]
async fn spf_is_not_held_against_a_listed_forwarder() {
    let w = world().await;
    let mta = FakeMta::start(Script::default()).await;
    let mut cfg = config(mta.addr, w.dns.addr, &[]);
    cfg.checks.dmarc.mode = Mode::Off;
    cfg.checks.dkim.mode = Mode::Off;
    cfg.checks.spf.fail = Action::Reject;
    cfg.checks.allow.forwarders = vec!["127.0.0.8/29".parse().unwrap()];
    let g = Gate::start_config(cfg).await;
    for (ip, want) in [("127.0.0.9", "250"), ("127.0.0.20", "550")] {
        let mut c = Client::connect_from(g.addr, ip).await;
        c.reply().await;
        c.cmd("EHLO fwd.test", "250").await;
        c.cmd("MAIL FROM:<a@origin.test>", "250").await;
        let r = c.cmd("RCPT TO:<b@example.test>", want).await;
        if want == "550" {
            assert!(r.starts_with("550 5.7.23"), "{r}");
        }
        c.cmd("QUIT", "221").await;
    }
}
