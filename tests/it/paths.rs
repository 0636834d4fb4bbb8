//! Reverse and forward paths through the gate: valid ones reach upstream as
//! written, broken ones are refused with 501 5.1.7 (sender) or 501 5.1.3
//! (recipient) and never reach upstream.

use crate::common;
use common::config::test_config;

use common::{Client, FakeMta, Gate, Script, message};

#[tokio::test]
async fn valid_paths_reach_upstream_as_written() {
    let mta = FakeMta::start(Script::default()).await;
    let gate = Gate::start(mta.addr).await;
    let mut c = Client::hello(gate.addr).await;
    let rcpts = [
        "RCPT TO:<b@[127.0.0.1]>",
        "RCPT TO:<postmaster@[IPv6:2001:db8::1]>",
        "RCPT TO:<\"quoted local\"@example.test>",
        "RCPT TO:<@relay.test,@hop.test:routed@example.test>",
        "RCPT TO:<Postmaster>",
        "RCPT TO:<a..b@example.test>",
        &format!("RCPT TO:<{}@example.test>", "l".repeat(64)),
    ];
    c.cmd("MAIL FROM:<a@[192.0.2.1]>", "250").await;
    for r in rcpts {
        c.cmd(r, "250").await;
    }
    c.cmd("DATA", "354").await;
    c.send(&message("paths", "x\r\n")).await;
    c.cmd(".", "250").await;
    let cmds = mta.commands();
    for r in rcpts {
        assert!(cmds.iter().any(|l| l == r), "{r} not relayed: {cmds:?}");
    }
    assert_eq!(mta.stored()[0].rcpts.len(), rcpts.len());
}

#[tokio::test]
async fn broken_paths_are_refused_before_upstream() {
    let mta = FakeMta::start(Script::default()).await;
    let mut c = test_config(mta.addr);
    c.limits.max_errors = 100;
    let gate = Gate::start_config(c).await;
    let mut c = Client::hello(gate.addr).await;
    let long_local = format!("<{}@example.test>", "l".repeat(300));
    let long_domain = format!("<b@{}.test>", vec!["d".repeat(60); 5].join("."));
    let broken = [
        "<nodomain@>",
        "<b@example.test>x",
        "<b@example.test",
        "<@example.test>",
        "<b>",
        "<a b@example.test>",
        "<b@-bad.test>",
        "<b@1.2.3.4>",
        "<b@[300.1.1.1]>",
        "<b@[foo]>",
        long_local.as_str(),
        long_domain.as_str(),
    ];
    for p in broken {
        c.cmd(&format!("MAIL FROM:{p}"), "501 5.1.7").await;
    }
    c.cmd("MAIL FROM:<a@sender.test>", "250").await;
    for p in broken.iter().chain(&["<>"]) {
        c.cmd(&format!("RCPT TO:{p}"), "501 5.1.3").await;
    }
    // A Latin-1 byte is not UTF-8.
    c.send(b"RCPT TO:<b\xe9@example.test>\r\n").await;
    assert!(c.reply().await.starts_with("501 5.1.3"));
    c.cmd("RCPT TO:<b@example.test>", "250").await;
    c.cmd("QUIT", "221").await;
    let cmds = mta.commands();
    let relayed: Vec<&String> = cmds
        .iter()
        .filter(|l| l.starts_with("MAIL") || l.starts_with("RCPT"))
        .collect();
    assert_eq!(
        relayed,
        ["MAIL FROM:<a@sender.test>", "RCPT TO:<b@example.test>"],
        "only the valid paths reach upstream"
    );
}
