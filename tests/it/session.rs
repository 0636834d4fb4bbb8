//! The session state machine driven over an in-memory stream (no client
//! socket), with the scripted upstream on loopback; plus the log line.

use crate::common;

use common::config::test_config;
use common::{FakeMta, Script};
use portcullis::config::{BareNewline, Config};
use portcullis::gate::{Peer, Shared};
use portcullis::runtime::limits::MemoryBudget;
use portcullis::runtime::shutdown::Shutdown;
use portcullis::session::Session;
use portcullis::upstream::Upstream;
use portcullis::wire::reply::parse_reply;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

fn shared(cfg: Config) -> Arc<Shared> {
    let store = Arc::new(portcullis::state::Store::in_memory(
        100,
        Arc::new(portcullis::state::SystemClock),
    ));
    let snapshot = portcullis::server::build_snapshot(
        Arc::new(cfg.clone()),
        Arc::new(portcullis::rules::RuleSet::empty()),
        &store,
    )
    .unwrap();
    Arc::new(Shared {
        upstream: Arc::new(Upstream::new(&cfg).unwrap()),
        budget: MemoryBudget::new(cfg.limits.memory_budget.as_usize()),
        limits: portcullis::runtime::limits::ConnectionLimits::new(
            portcullis::runtime::limits::ConnectionBounds::of(&cfg),
        ),
        rules: portcullis::rules::RuleWatcher::new(
            common::EMPTY_RULES.into(),
            portcullis::rules::RuleSet::empty(),
            Default::default(),
        ),
        store,
        snapshot: arc_swap::ArcSwap::from_pointee(snapshot),
    })
}

struct Pipe {
    io: DuplexStream,
    buf: Vec<u8>,
}

impl Pipe {
    async fn reply(&mut self) -> String {
        loop {
            if let Ok(Some((r, used))) = parse_reply(&self.buf) {
                self.buf.drain(..used);
                return String::from_utf8(r.raw).unwrap();
            }
            let mut tmp = [0u8; 4096];
            let n =
                tokio::time::timeout(std::time::Duration::from_secs(10), self.io.read(&mut tmp))
                    .await
                    .expect("reply in time")
                    .unwrap();
            assert!(n > 0, "session closed");
            self.buf.extend_from_slice(&tmp[..n]);
        }
    }

    async fn send(&mut self, b: &[u8]) {
        self.io.write_all(b).await.unwrap();
    }
}

fn start(shared: Arc<Shared>, shutdown: &Shutdown) -> (Pipe, tokio::task::JoinHandle<()>) {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let peer = Peer {
        id: portcullis::telemetry::session_id(),
        addr: "192.0.2.10:40000".parse().unwrap(),
        local: "192.0.2.1:25".parse().unwrap(),
    };
    let task = tokio::spawn(
        Box::new(Session::new(
            Box::new(server),
            peer,
            shared,
            shutdown.signal(),
            Vec::new(),
        ))
        .run(),
    );
    (
        Pipe {
            io: client,
            buf: Vec::new(),
        },
        task,
    )
}

#[tokio::test]
async fn in_memory_session_relays_a_transaction() {
    let mta = FakeMta::start(Script::default()).await;
    let shutdown = Shutdown::new();
    let (mut c, task) = start(shared(test_config(mta.addr)), &shutdown);
    assert!(c.reply().await.starts_with("220 gate.test ESMTP"));
    c.send(b"EHLO in.memory\r\n").await;
    let ehlo = c.reply().await;
    assert!(
        ehlo.contains("250-PIPELINING") && ehlo.contains("ENHANCEDSTATUSCODES"),
        "{ehlo}"
    );
    // Pipelined: one write, replies in order.
    c.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
        .await;
    assert!(c.reply().await.starts_with("250"));
    assert!(c.reply().await.starts_with("250"));
    assert!(c.reply().await.starts_with("354"));
    c.send(b"Subject: mem\r\n\r\n..stuffed\r\n.\r\nQUIT\r\n")
        .await;
    assert!(c.reply().await.starts_with("250"));
    assert!(c.reply().await.starts_with("221"));
    task.await.unwrap();
    let s = mta.stored();
    assert_eq!(
        common::split_ours(&s[0].data).1,
        b"Subject: mem\r\n\r\n.stuffed\r\n"
    );
    assert!(s[0].xclient.as_deref().unwrap().contains("ADDR=192.0.2.10"));
}

#[tokio::test]
async fn in_memory_session_rejects_bare_lf_and_nul_in_data() {
    let mta = FakeMta::start(Script::default()).await;
    let shutdown = Shutdown::new();
    let (mut c, _task) = start(shared(test_config(mta.addr)), &shutdown);
    c.reply().await;
    c.send(b"EHLO x.test\r\n").await;
    c.reply().await;
    for (body, want) in [
        (
            &b"Subject: a\r\n\r\nsmuggle\n.\r\nMAIL FROM:<evil@x>\r\n\r\n.\r\n"[..],
            "550 5.5.2",
        ),
        (b"Subject: a\r\n\r\nnul\x00byte\r\n.\r\n", "554 5.6.0"),
    ] {
        c.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
            .await;
        c.reply().await;
        c.reply().await;
        assert!(c.reply().await.starts_with("354"));
        c.send(body).await;
        let r = c.reply().await;
        assert!(r.starts_with(want), "{r}");
    }
    assert!(mta.stored().is_empty());
    assert_eq!(mta.count("DATA"), 0);
    assert_eq!(mta.count("MAIL FROM:<EVIL"), 0);
}

#[tokio::test]
async fn normalize_mode_turns_bare_lf_into_crlf_without_ending_data() {
    let mta = FakeMta::start(Script::default()).await;
    let shutdown = Shutdown::new();
    let (mut c, _task) = start(
        shared({
            let mut cfg = test_config(mta.addr);
            cfg.smtp.bare_newline = BareNewline::Normalize;
            cfg
        }),
        &shutdown,
    );
    c.reply().await;
    c.send(b"EHLO x.test\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
        .await;
    for _ in 0..3 {
        c.reply().await;
    }
    assert!(c.reply().await.starts_with("354"));
    c.send(b"Subject: n\r\n\r\nline\n.\r\nMAIL FROM:<evil@x>\r\n.\r\n")
        .await;
    assert!(c.reply().await.starts_with("250"));
    let s = mta.stored();
    assert_eq!(s.len(), 1, "one message, nothing smuggled");
    // The bare LF became CRLF; the dot line after it is content, not an end.
    assert_eq!(
        common::split_ours(&s[0].data).1,
        b"Subject: n\r\n\r\nline\r\n.\r\nMAIL FROM:<evil@x>\r\n"
    );
    assert_eq!(mta.count("MAIL FROM:<EVIL"), 0);
}
