//! Graceful shutdown: transactions in flight finish, idle sessions close,
//! and the deadline aborts what is stuck with 421.

use crate::common;
use common::config::{secs, test_config};

use common::{Client, FakeMta, Gate, Script};

use std::time::Duration;

#[tokio::test]
async fn graceful_shutdown_finishes_transactions_and_closes_idle_sessions() {
    let mta = FakeMta::start(Script::default()).await;
    let mut c = test_config(mta.addr);
    c.timeouts.shutdown = secs(5);
    let mut gate = Gate::start_config(c).await;
    let mut idle = Client::hello(gate.addr).await;
    let mut busy = Client::hello(gate.addr).await;
    busy.cmd("MAIL FROM:<a@sender.test>", "250").await;
    busy.cmd("RCPT TO:<b@example.test>", "250").await;
    gate.stop();
    let r = idle.reply().await;
    assert!(r.starts_with("421 4.3.2"), "{r}");
    // The transaction in flight still completes...
    busy.cmd("DATA", "354").await;
    busy.send(b"Subject: late\r\n\r\nx\r\n.\r\n").await;
    assert!(busy.reply().await.starts_with("250"));
    // ...and then the session is closed.
    let r = busy.reply().await;
    assert!(r.starts_with("421 4.3.2"), "{r}");
    assert_eq!(mta.stored().len(), 1);
    // New connections are no longer accepted.
    tokio::time::timeout(Duration::from_secs(5), gate.done)
        .await
        .unwrap()
        .unwrap();
    assert!(tokio::net::TcpStream::connect(gate.addr).await.is_err());
}

#[tokio::test]
async fn shutdown_deadline_aborts_stuck_transactions_with_421() {
    let mta = FakeMta::start(Script::default()).await;
    let mut c = test_config(mta.addr);
    c.timeouts.shutdown = secs(1);
    let mut gate = Gate::start_config(c).await;
    let mut busy = Client::hello(gate.addr).await;
    busy.cmd("MAIL FROM:<a@sender.test>", "250").await;
    busy.cmd("RCPT TO:<b@example.test>", "250").await;
    busy.cmd("DATA", "354").await;
    busy.send(b"Subject: slow\r\n\r\npart").await;
    gate.stop();
    let r = busy.try_reply(Duration::from_secs(5)).await.expect("421");
    assert!(r.starts_with("421 4.3.2"), "{r}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(mta.stored().is_empty());
    assert_eq!(mta.count("DATA"), 0);
}
