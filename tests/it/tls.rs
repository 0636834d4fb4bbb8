//! STARTTLS with a generated certificate: offered when configured, the
//! session resets after the handshake, and clear-text bytes pipelined after
//! STARTTLS are discarded unanswered.

use crate::common;

use common::config::test_config;
use common::{FakeMta, Gate, Script};
use portcullis::config::{Tls, UpstreamTls};
use portcullis::wire::reply::parse_reply;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::{ClientConfig, RootCertStore, pki_types::ServerName};

async fn reply<S: AsyncRead + Unpin>(io: &mut S, buf: &mut Vec<u8>) -> String {
    loop {
        if let Ok(Some((r, used))) = parse_reply(buf) {
            buf.drain(..used);
            return String::from_utf8(r.raw).unwrap();
        }
        let mut tmp = [0u8; 4096];
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), io.read(&mut tmp))
            .await
            .expect("reply in time")
            .unwrap();
        assert!(n > 0, "closed");
        buf.extend_from_slice(&tmp[..n]);
    }
}

async fn cmd<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    buf: &mut Vec<u8>,
    line: &str,
) -> String {
    io.write_all(format!("{line}\r\n").as_bytes())
        .await
        .unwrap();
    reply(io, buf).await
}

#[tokio::test]
async fn starttls_then_relay_and_pipelined_plaintext_is_discarded() {
    let dir = std::env::temp_dir().join(format!("portcullis-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(dir.join("cert.pem"), ck.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), ck.signing_key.serialize_pem()).unwrap();

    let mta = FakeMta::start(Script::default()).await;
    let mut cfg = test_config(mta.addr);
    cfg.tls = Some(Tls {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    });
    let gate = Gate::start_config(cfg).await;
    let mut tcp = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
    let mut buf = Vec::new();
    assert!(reply(&mut tcp, &mut buf).await.starts_with("220"));
    let e = cmd(&mut tcp, &mut buf, "EHLO tls.test").await;
    assert!(e.contains("250-STARTTLS"), "{e}");
    // STARTTLS with a command pipelined behind it in the same packet.
    tcp.write_all(b"STARTTLS\r\nMAIL FROM:<injected@evil.test>\r\n")
        .await
        .unwrap();
    assert!(reply(&mut tcp, &mut buf).await.starts_with("220"));
    assert!(buf.is_empty());

    let mut roots = RootCertStore::empty();
    roots.add(ck.cert.der().clone()).unwrap();
    let config = ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = TlsConnector::from(Arc::new(config));
    let mut tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("handshake");
    let mut buf = Vec::new();
    // The injected MAIL was never answered and the state is reset: EHLO first.
    let r = cmd(&mut tls, &mut buf, "MAIL FROM:<a@sender.test>").await;
    assert!(r.starts_with("503 5.5.1"), "{r}");
    let e = cmd(&mut tls, &mut buf, "EHLO tls.test").await;
    assert!(!e.contains("STARTTLS"), "{e}");
    assert!(
        cmd(&mut tls, &mut buf, "MAIL FROM:<a@sender.test>")
            .await
            .starts_with("250")
    );
    assert!(
        cmd(&mut tls, &mut buf, "RCPT TO:<b@example.test>")
            .await
            .starts_with("250")
    );
    assert!(cmd(&mut tls, &mut buf, "DATA").await.starts_with("354"));
    let r = cmd(&mut tls, &mut buf, "Subject: tls\r\n\r\nsecret\r\n.").await;
    assert!(r.starts_with("250"), "{r}");
    assert_eq!(mta.stored().len(), 1);
    assert_eq!(mta.count("MAIL FROM:<INJECTED"), 0);
    let _ = std::fs::remove_dir_all(&dir);
}

fn write_cert(dir: &std::path::Path, name: &str) -> rcgen::CertifiedKey<rcgen::KeyPair> {
    let ck = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
    std::fs::write(dir.join("cert.pem"), ck.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), ck.signing_key.serialize_pem()).unwrap();
    ck
}

#[tokio::test]
async fn certificate_reload_takes_effect_and_a_bad_one_keeps_the_old() {
    let dir = std::env::temp_dir().join(format!("portcullis-tls-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let first = write_cert(&dir, "first.test");
    let cfg = format!(
        "hostname: gate.test\nlisten: [{{addr: 127.0.0.1:0}}]\nupstream: {{addr: 127.0.0.1:9, client_identity: none}}\ntls: {{cert: {}, key: {}}}\n",
        dir.join("cert.pem").display(),
        dir.join("key.pem").display()
    );
    let server = portcullis::server::Server::bind(
        portcullis::config::Config::parse(&cfg, std::path::Path::new("t.yaml")).unwrap(),
    )
    .await
    .unwrap();
    let addr = server.local_addrs()[0];
    let reloader = server.tls_reloader();
    tokio::spawn(server.run(std::future::pending()));
    assert_eq!(common::server_cert(addr).await, first.cert.der().to_vec());

    let second = write_cert(&dir, "second.test");
    reloader.reload().unwrap();
    assert_eq!(common::server_cert(addr).await, second.cert.der().to_vec());

    std::fs::write(dir.join("key.pem"), "not a key").unwrap();
    assert!(reloader.reload().is_err());
    assert_eq!(common::server_cert(addr).await, second.cert.der().to_vec());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn starttls_to_upstream() {
    let dir = std::env::temp_dir().join(format!("portcullis-tls-up-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ck = write_cert(&dir, "mx.internal.test");
    let acceptor =
        portcullis::server::tls::acceptor(&dir.join("cert.pem"), &dir.join("key.pem")).unwrap();
    let mta = FakeMta::start(Script {
        tls: Some(acceptor),
        ..Script::default()
    })
    .await;
    std::fs::write(dir.join("ca.pem"), ck.cert.pem()).unwrap();
    // Verified against the CA file and name, and also encrypt-only.
    let starttls = |ca: Option<&str>, name: Option<&str>| {
        let mut cfg = test_config(mta.addr);
        cfg.upstream.tls = UpstreamTls::Starttls;
        cfg.upstream.tls_ca = ca.map(|f| dir.join(f));
        cfg.upstream.tls_name = name.map(str::to_string);
        cfg
    };
    for cfg in [
        starttls(Some("ca.pem"), Some("mx.internal.test")),
        starttls(None, None),
    ] {
        let gate = Gate::start_config(cfg).await;
        let mut c = common::Client::hello(gate.addr).await;
        let r = c
            .send_mail(
                "a@sender.test",
                &["b@example.test"],
                b"Subject: t\r\n\r\nx\r\n",
            )
            .await;
        assert!(r.starts_with("250"), "{r}");
    }
    let stored = mta.stored();
    assert_eq!(stored.len(), 2);
    assert!(stored.iter().all(|s| s.tls), "not over TLS");
    // A wrong name fails verification: the client gets 4xx, nothing stored.
    let gate = Gate::start_config(starttls(Some("ca.pem"), Some("wrong.test"))).await;
    let mut c = common::Client::hello(gate.addr).await;
    c.cmd("MAIL FROM:<a@sender.test>", "451 4.4.1").await;
    assert_eq!(mta.stored().len(), 2);
    let _ = std::fs::remove_dir_all(&dir);
}
