//! Who the client is, as upstream sees it: XCLIENT, PROXY v1 and v2 (and
//! `client_identity: auto` choosing), and incoming PROXY headers only from
//! trusted proxies.

use crate::common;
use common::config::test_config;
use portcullis::config::{Config, IdentityMode};

use common::{Client, FakeMta, Gate, Script};
use std::time::Duration;

#[tokio::test]
async fn xclient_sequence_as_upstream_sees_it() {
    let mta = FakeMta::start(Script::default()).await;
    let gate = Gate::start(mta.addr).await;
    let mut c = Client::connect_from(gate.addr, "127.0.0.9").await;
    c.reply().await;
    c.cmd("EHLO mail.client.test", "250").await;
    let r = c
        .send_mail(
            "a@sender.test",
            &["b@example.test"],
            b"Subject: x\r\n\r\nx\r\n",
        )
        .await;
    assert!(r.starts_with("250"));
    let cmds = mta.connection_with("XCLIENT");
    let x = cmds
        .iter()
        .position(|l| l.starts_with("XCLIENT"))
        .expect("XCLIENT sent");
    let xc = &cmds[x];
    assert!(xc.contains("ADDR=127.0.0.9"), "{xc}");
    assert!(xc.contains("HELO=mail.client.test"), "{xc}");
    assert!(xc.contains("NAME=[UNAVAILABLE]"), "{xc}");
    assert!(xc.contains("PROTO=ESMTP"), "{xc}");
    // Before XCLIENT our own EHLO; after it, EHLO again with the client's name, then MAIL.
    assert_eq!(cmds[x - 1], "EHLO gate.test");
    assert_eq!(cmds[x + 1], "EHLO mail.client.test");
    assert!(cmds[x + 2].starts_with("MAIL FROM:<a@sender.test>"));
    assert_eq!(mta.stored()[0].helo, "mail.client.test");
}

#[tokio::test]
async fn proxy_v1_and_v2_sequences_as_upstream_sees_them() {
    for (mode, v2) in [
        (IdentityMode::ProxyV1, false),
        (IdentityMode::ProxyV2, true),
    ] {
        let mut script = Script::default().without_xclient();
        script.expect_proxy = true;
        let mta = FakeMta::start(script).await;
        let mut cfg = test_config(mta.addr);
        cfg.upstream.client_identity = mode;
        let gate = Gate::start_config(cfg).await;
        let mut c = Client::connect_from(gate.addr, "127.0.0.7").await;
        c.reply().await;
        c.cmd("EHLO pc.test", "250").await;
        let r = c
            .send_mail(
                "a@sender.test",
                &["b@example.test"],
                b"Subject: x\r\n\r\nx\r\n",
            )
            .await;
        assert!(r.starts_with("250"), "{r}");
        let s = &mta.stored()[0];
        let header = s.proxy.clone().expect("PROXY header");
        let port = c.sock.local_addr().unwrap().port();
        if v2 {
            let h = ppp::v2::Header::try_from(header.as_slice()).unwrap();
            assert_eq!(
                h.addresses,
                ppp::v2::Addresses::from((
                    format!("127.0.0.7:{port}")
                        .parse::<std::net::SocketAddr>()
                        .unwrap(),
                    gate.addr
                ))
            );
        } else {
            assert_eq!(
                String::from_utf8(header).unwrap(),
                format!(
                    "PROXY TCP4 127.0.0.7 127.0.0.1 {port} {}\r\n",
                    gate.addr.port()
                )
            );
        }
        assert!(s.xclient.is_none());
        // The client's HELO name travels in our EHLO.
        assert_eq!(s.helo, "pc.test");
    }
}

/// The test config with `client_identity: auto`.
fn auto(mta: std::net::SocketAddr) -> Config {
    let mut cfg = test_config(mta);
    cfg.upstream.client_identity = IdentityMode::Auto;
    cfg
}

#[tokio::test]
async fn auto_picks_xclient_or_proxy_v2() {
    // XCLIENT offered: auto uses it.
    let mta = FakeMta::start(Script::default()).await;
    let gate = Gate::start_config(auto(mta.addr)).await;
    let mut c = Client::hello(gate.addr).await;
    assert!(
        c.send_mail("a@s.test", &["b@example.test"], b"S: x\r\n\r\nx\r\n")
            .await
            .starts_with("250")
    );
    assert!(mta.stored()[0].xclient.is_some());

    // A silent listener that waits for a PROXY header: auto uses PROXY v2.
    let mut script = Script::default().without_xclient();
    script.expect_proxy = true;
    let mta = FakeMta::start(script).await;
    let server = portcullis::server::Server::bind(auto(mta.addr))
        .await
        .unwrap();
    let id = server.upstream().probe().await.unwrap();
    assert_eq!(id, portcullis::upstream::Identity::ProxyV2);

    // One that greets when its own PROXY header wait runs out before ours
    // (Exim's proxy_protocol_timeout is 3 s, as is our greeting wait) and
    // then refuses every command: still PROXY v2, not "no identity".
    let mut script = Script::default().without_xclient();
    script.expect_proxy = true;
    script.proxy_timeout = Some(Duration::from_millis(300));
    let mta = FakeMta::start(script).await;
    let server = portcullis::server::Server::bind(auto(mta.addr))
        .await
        .unwrap();
    let id = server.upstream().probe().await.unwrap();
    assert_eq!(id, portcullis::upstream::Identity::ProxyV2);

    // Answers, but neither XCLIENT nor PROXY: auto refuses.
    let mta = FakeMta::start(Script::default().without_xclient()).await;
    let server = portcullis::server::Server::bind(auto(mta.addr))
        .await
        .unwrap();
    let e = server.upstream().probe().await.unwrap_err();
    assert!(
        matches!(e, portcullis::upstream::ProbeError::NoIdentity(_)),
        "{e}"
    );
}

/// An 8-bit HELO name long enough that its xtext passes Postfix's 255-octet
/// XCLIENT attribute limit: XCLIENT says HELO=[UNAVAILABLE] and the name
/// still reaches upstream in the EHLO after it. The message is delivered.
#[tokio::test]
async fn long_8bit_helo_never_breaks_xclient() {
    let mta = FakeMta::start(Script::default()).await;
    let gate = Gate::start(mta.addr).await;
    let helo = "é".repeat(43); // 86 octets, 258 in xtext
    let mut c = Client::connect(gate.addr).await;
    c.reply().await;
    c.cmd(&format!("EHLO {helo}"), "250").await;
    let r = c
        .send_mail(
            "a@sender.test",
            &["b@example.test"],
            b"Subject: x\r\n\r\nx\r\n",
        )
        .await;
    assert!(r.starts_with("250"), "{r}");
    let stored = mta.stored();
    assert!(
        stored[0]
            .xclient
            .as_deref()
            .unwrap()
            .contains("HELO=[UNAVAILABLE]"),
        "{:?}",
        stored[0].xclient
    );
    assert_eq!(stored[0].helo, helo);
}

#[tokio::test]
async fn incoming_proxy_header_only_from_trusted_proxies() {
    let mta = FakeMta::start(Script::default()).await;
    let mut cfg = test_config(mta.addr);
    cfg.listen[0].proxy_protocol = true;
    cfg.listen[0].trusted_proxies = vec!["127.0.0.5/32".parse().unwrap()];
    let gate = Gate::start_config(cfg).await;
    // Trusted: the announced client reaches upstream via XCLIENT.
    let mut c = Client::connect_from(gate.addr, "127.0.0.5").await;
    c.send(b"PROXY TCP4 198.51.100.7 192.0.2.1 40000 25\r\n")
        .await;
    c.reply().await;
    c.cmd("EHLO far.test", "250").await;
    assert!(
        c.send_mail("a@s.test", &["b@example.test"], b"S: x\r\n\r\nx\r\n")
            .await
            .starts_with("250")
    );
    assert!(
        mta.stored()[0]
            .xclient
            .as_deref()
            .unwrap()
            .contains("ADDR=198.51.100.7")
    );
    // Untrusted peer: refused before any greeting.
    let mut u = Client::connect_from(gate.addr, "127.0.0.6").await;
    u.send(b"PROXY TCP4 198.51.100.8 192.0.2.1 40000 25\r\n")
        .await;
    let r = u.reply().await;
    assert!(r.starts_with("421 4.7.0"), "{r}");
    // A PROXY line on a plain listener is just an unknown command.
    let mta2 = FakeMta::start(Script::default()).await;
    let plain = Gate::start(mta2.addr).await;
    let mut p = Client::connect(plain.addr).await;
    p.reply().await;
    p.cmd("PROXY TCP4 198.51.100.9 192.0.2.1 40000 25", "500")
        .await;
}
