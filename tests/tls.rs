//! STARTTLS with a generated certificate: offered when configured, the
//! session resets after the handshake, and clear-text bytes pipelined after
//! STARTTLS are discarded unanswered.

mod common;

use common::{FakeMta, Gate, Script};
use portcullis::smtp::reply::parse_reply;
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
    let gate = Gate::start(
        mta.addr,
        &format!(
            "tls: {{cert: {}, key: {}}}\n",
            dir.join("cert.pem").display(),
            dir.join("key.pem").display()
        ),
    )
    .await;
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
