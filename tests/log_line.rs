//! The transaction log line as emitted by a real session. Alone in its test
//! binary: tracing caches callsite interest process-wide, so a thread-local
//! subscriber only sees events reliably when no other test runs beside it.

mod common;

use common::{Client, FakeMta, Gate, Script};
use std::sync::{Arc, Mutex};

/// A writer that collects log output for inspection.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn one_log_line_per_transaction_with_the_contract_keys() {
    let logs = Captured::default();
    let sink = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_writer(move || sink.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let mta = FakeMta::start(Script::default().reply("rcpt", "550 5.1.1 no such user")).await;
    let gate = Gate::start(mta.addr, "limits: {max_connections_per_ip: 1}\n").await;
    let mut c = Client::connect_from(gate.addr, "127.0.0.10").await;
    c.reply().await;
    c.send(b"EHLO log.test\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<b@example.test>\r\nQUIT\r\n")
        .await;
    for _ in 0..4 {
        c.reply().await;
    }
    assert!(c.closed().await);
    // A connection refused by the per-IP limit gets its own line.
    let mut first = Client::connect_from(gate.addr, "127.0.0.11").await;
    first.reply().await;
    let mut second = Client::connect_from(gate.addr, "127.0.0.11").await;
    assert!(second.reply().await.starts_with("421 4.7.0"));
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| l.contains("\"transaction\""))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{text}");
    let l = &lines[0];
    assert!(l["session"].as_str().is_some_and(|s| s.len() == 14), "{l}");
    assert_eq!(l["client_ip"], "127.0.0.10");
    assert_eq!(l["helo"], "log.test");
    assert_eq!(l["mail_from"], "a@sender.test");
    assert_eq!(l["rcpt_count"], 0);
    assert_eq!(l["size"], 0);
    assert_eq!(l["verdict"], "reject");
    assert_eq!(l["code"], 550);
    assert_eq!(l["enhanced"], "5.1.1");
    assert_eq!(l["stage"], "rcpt");
    assert_eq!(l["reason"], "upstream");
    assert_eq!(l["upstream_reply"], "5.1.1 no such user");
    assert!(l["duration_ms"].is_number());
    let refused: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| l.contains("\"refused\""))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(refused.len(), 1, "{text}");
    let r = &refused[0];
    assert_eq!(r["client_ip"], "127.0.0.11");
    assert_eq!(r["verdict"], "reject");
    assert_eq!(r["stage"], "connect");
    assert_eq!(r["code"], 421);
    assert_eq!(r["enhanced"], "4.7.0");
    assert_eq!(r["reason"], "limit:connections_per_ip");
}
