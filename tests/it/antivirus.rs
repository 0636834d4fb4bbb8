//! ClamAV at the end of DATA: a scripted clamd for the replies, the
//! deadline and the size limit; Debian's clamd for the real thing.

use crate::common::{self, Client, FakeMta, Gate, Script};
use common::clamd::FakeClamd;
use portcullis::config::{Action, Endpoint, Mode};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const MARKER: &[u8] = b"PORTCULLIS-TEST-VIRUS-7f3a";
const NAME: &str = "Portcullis.Test.Virus";

async fn gate(
    mta: SocketAddr,
    clamd: SocketAddr,
    tune: impl FnOnce(&mut portcullis::config::AntivirusConfig),
) -> Gate {
    let mut cfg = common::config::test_config(mta);
    let av = &mut cfg.checks.antivirus;
    av.mode = Mode::Enforce;
    av.clamd = Endpoint::Tcp(clamd);
    tune(av);
    Gate::start_config(cfg).await
}

fn infected() -> Vec<u8> {
    let mut m = b"Subject: invoice\r\n\r\nsee the attachment\r\n".to_vec();
    m.extend_from_slice(MARKER);
    m.extend_from_slice(b"\r\n");
    m
}

/// A virus gets 554 5.7.0 naming it and never reaches the MTA; a clean
/// message in the same session is scanned and delivered.
#[tokio::test]
async fn a_virus_is_refused_with_its_name_and_a_clean_message_delivered() {
    let mta = FakeMta::start(Script::default()).await;
    let clamd = FakeClamd::start(MARKER, NAME).await;
    let g = gate(mta.addr, clamd.addr, |_| {}).await;
    let mut c = Client::hello(g.addr).await;
    let r = c
        .send_mail("a@sender.test", &["b@example.test"], &infected())
        .await;
    assert!(r.starts_with("554 5.7.0 "), "{r}");
    assert!(r.contains(NAME), "{r}");
    assert_eq!(mta.stored().len(), 0);
    let r = c
        .send_mail(
            "a@sender.test",
            &["b@example.test"],
            b"Subject: fine\r\n\r\nhello\r\n",
        )
        .await;
    assert!(r.starts_with("250"), "{r}");
    assert_eq!(mta.stored().len(), 1);
    assert_eq!(clamd.scanned(), 2);
    c.cmd("QUIT", "221").await;
}

/// Record mode: the virus is found (and logged) but the message goes on.
#[tokio::test]
async fn in_record_mode_a_virus_is_only_logged() {
    let mta = FakeMta::start(Script::default()).await;
    let clamd = FakeClamd::start(MARKER, NAME).await;
    let g = gate(mta.addr, clamd.addr, |av| av.mode = Mode::Record).await;
    let mut c = Client::hello(g.addr).await;
    let r = c
        .send_mail("a@sender.test", &["b@example.test"], &infected())
        .await;
    assert!(r.starts_with("250"), "{r}");
    assert_eq!((mta.stored().len(), clamd.scanned()), (1, 1));
}

/// clamd not there: `on_error`, tempfail by default (451 4.3.0) at once,
/// and nothing delivered; with `on_error: accept` the message goes on.
#[tokio::test]
async fn clamd_down_applies_on_error() {
    let mta = FakeMta::start(Script::default()).await;
    let closed: SocketAddr = format!("127.0.0.1:{}", common::free_port())
        .parse()
        .unwrap();
    let g = gate(mta.addr, closed, |_| {}).await;
    let mut c = Client::hello(g.addr).await;
    let start = Instant::now();
    let r = c
        .send_mail(
            "a@sender.test",
            &["b@example.test"],
            b"Subject: x\r\n\r\nhi\r\n",
        )
        .await;
    assert!(r.starts_with("451 4.3.0"), "{r}");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(mta.stored().len(), 0);
    let g = gate(mta.addr, closed, |av| av.on_error = Action::Accept).await;
    let mut c = Client::hello(g.addr).await;
    let r = c
        .send_mail(
            "a@sender.test",
            &["b@example.test"],
            b"Subject: x\r\n\r\nhi\r\n",
        )
        .await;
    assert!(r.starts_with("250"), "{r}");
    assert_eq!(mta.stored().len(), 1);
}

/// A clamd that reads the message and never answers: the client hears
/// 451 4.3.0 when `timeout` has passed, not later.
#[tokio::test]
async fn a_silent_clamd_is_bounded_by_the_timeout() {
    let mta = FakeMta::start(Script::default()).await;
    let clamd = FakeClamd::silent().await;
    let g = gate(mta.addr, clamd.addr, |av| {
        av.timeout = portcullis::config::Secs(Duration::from_secs(1))
    })
    .await;
    let mut c = Client::hello(g.addr).await;
    let start = Instant::now();
    let r = c
        .send_mail(
            "a@sender.test",
            &["b@example.test"],
            b"Subject: x\r\n\r\nhi\r\n",
        )
        .await;
    let took = start.elapsed();
    assert!(r.starts_with("451 4.3.0"), "{r}");
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(4),
        "{took:?}"
    );
    assert_eq!((mta.stored().len(), clamd.scanned()), (0, 1));
}

/// An allow-listed client skips the checks, not the virus scan: an allowed
/// partner's compromised account still sends viruses.
#[tokio::test]
async fn an_allow_listed_client_is_scanned_too() {
    let mta = FakeMta::start(Script::default()).await;
    let clamd = FakeClamd::start(MARKER, NAME).await;
    let mut cfg = common::config::test_config(mta.addr);
    cfg.checks.allow.clients = vec!["127.0.0.0/8".parse().unwrap()];
    let av = &mut cfg.checks.antivirus;
    av.mode = Mode::Enforce;
    av.clamd = Endpoint::Tcp(clamd.addr);
    let g = Gate::start_config(cfg).await;
    let mut c = Client::hello(g.addr).await;
    let r = c
        .send_mail("a@sender.test", &["b@example.test"], &infected())
        .await;
    assert!(r.starts_with("554 5.7.0") && r.contains(NAME), "{r}");
    let r = c
        .send_mail(
            "a@sender.test",
            &["b@example.test"],
            b"Subject: fine\r\n\r\nhello\r\n",
        )
        .await;
    assert!(r.starts_with("250"), "{r}");
    assert_eq!((mta.stored().len(), clamd.scanned()), (1, 2));
}

/// Over `max_size`: not sent to clamd at all, and delivered.
#[tokio::test]
async fn a_message_over_max_size_is_not_scanned() {
    let mta = FakeMta::start(Script::default()).await;
    let clamd = FakeClamd::start(MARKER, NAME).await;
    let g = gate(mta.addr, clamd.addr, |av| {
        av.max_size = common::config::kib(1)
    })
    .await;
    let mut c = Client::hello(g.addr).await;
    let mut big = infected();
    for _ in 0..64 {
        big.extend_from_slice(&[b'a'; 64]);
        big.extend_from_slice(b"\r\n");
    }
    let r = c
        .send_mail("a@sender.test", &["b@example.test"], &big)
        .await;
    assert!(r.starts_with("250"), "{r}");
    assert_eq!((mta.stored().len(), clamd.scanned()), (1, 0));
}

/// Debian's clamd, started here with a signature database written here (an
/// MD5 signature of the test attachment; nothing downloaded): the infected
/// attachment is refused naming the signature, a clean message delivered;
/// clamd stopped gives `on_error` within the deadline.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs clamd (Debian package clamav-daemon, installed by .ci/run)"]
async fn real_clamd_finds_a_signature_of_its_own_database() {
    let dir = std::env::temp_dir().join(format!("portcullis-clamd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("db")).unwrap();
    let attachment = b"Portcullis test payload, flagged by its own signature 7f3a\n".repeat(20);
    let md5 = {
        let f = dir.join("payload");
        std::fs::write(&f, &attachment).unwrap();
        let out = std::process::Command::new("md5sum")
            .arg(&f)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    std::fs::write(
        dir.join("db/portcullis.hdb"),
        format!("{md5}:{}:Portcullis.Test.UNOFFICIAL\n", attachment.len()),
    )
    .unwrap();
    let port = common::free_port();
    std::fs::write(
        dir.join("clamd.conf"),
        format!(
            "Foreground yes\nTCPSocket {port}\nTCPAddr 127.0.0.1\nDatabaseDirectory {}\nLogFile {}\nScanMail yes\n",
            dir.join("db").display(),
            dir.join("clamd.log").display()
        ),
    )
    .unwrap();
    // Readable by the clamav user clamd may switch to.
    let _ = std::process::Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(&dir)
        .status();
    let clamd_bin = ["/usr/sbin/clamd", "/usr/bin/clamd"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("clamd installed");
    let mut clamd = common::Killed(
        std::process::Command::new(clamd_bin)
            .arg("-c")
            .arg(dir.join("clamd.conf"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let clamd_addr = common::listening(port).await;
    // What `check` asks clamd.
    let pong = portcullis::checks::antivirus::ping(&Endpoint::Tcp(clamd_addr))
        .await
        .unwrap();
    assert!(pong.starts_with(b"PONG"), "{pong:?}");

    let mta = FakeMta::start(Script::default()).await;
    let g = gate(mta.addr, clamd_addr, |av| {
        av.timeout = portcullis::config::Secs(Duration::from_secs(5))
    })
    .await;
    let message = common::with_attachment("invoice.bin", "application/octet-stream", &attachment);
    let mut c = Client::hello(g.addr).await;
    let r = c
        .send_mail("a@sender.test", &["b@example.test"], message.as_bytes())
        .await;
    assert!(
        r.starts_with("554 5.7.0") && r.contains("Portcullis.Test.UNOFFICIAL"),
        "{r}"
    );
    let r = c
        .send_mail(
            "a@sender.test",
            &["b@example.test"],
            b"Subject: fine\r\n\r\nhello\r\n",
        )
        .await;
    assert!(r.starts_with("250"), "{r}");
    assert_eq!(mta.stored().len(), 1);

    // clamd stopped: tempfail, well within the 5 s deadline.
    let _ = clamd.0.kill();
    let _ = clamd.0.wait();
    let start = Instant::now();
    let r = c
        .send_mail(
            "a@sender.test",
            &["b@example.test"],
            b"Subject: again\r\n\r\nhello\r\n",
        )
        .await;
    assert!(r.starts_with("451 4.3.0"), "{r}");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(mta.stored().len(), 1);
    let _ = std::fs::remove_dir_all(&dir);
}
