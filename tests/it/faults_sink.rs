//! Fault injection against a real smtp-sink (Postfix) started with its
//! reject / drop / delay flags. For every message the client sends we record
//! the final reply, then compare with what the sink dumped: no message the
//! client saw accepted is missing, none is stored twice, and the client never
//! hears 250 for a message the sink refused.

use crate::common;

use common::config::{in_front_of, secs};
use common::{Client, Gate, message};
use portcullis::config::IdentityMode;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

struct Sink {
    child: Child,
    port: u16,
    dump: PathBuf,
}

impl Sink {
    fn start(name: &str, flags: &[&str]) -> Sink {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dump =
            std::env::temp_dir().join(format!("portcullis-sink-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dump);
        std::fs::create_dir_all(&dump).unwrap();
        // smtp-sink drops privileges to nobody, which must be able to write here.
        Command::new("chmod")
            .arg("777")
            .arg(&dump)
            .status()
            .unwrap();
        let child = Command::new("smtp-sink")
            .args(["-u", "nobody", "-d"])
            .arg(format!("{}/%M.", dump.display()))
            .args(flags)
            .arg(format!("127.0.0.1:{port}"))
            .arg("100")
            .spawn()
            .expect("smtp-sink (Debian package postfix)");
        let until = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < until, "smtp-sink did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Sink { child, port, dump }
    }

    /// Message-IDs found in the dumped messages, with how often each appears.
    fn stored(&self) -> HashMap<String, usize> {
        let mut ids = HashMap::new();
        for e in std::fs::read_dir(&self.dump).unwrap().flatten() {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            for line in text.lines() {
                if let Some(id) = line.strip_prefix("Message-ID: ") {
                    *ids.entry(id.trim().to_string()).or_insert(0) += 1;
                }
            }
        }
        ids
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dump);
    }
}

/// Sends `n` messages, one session each; returns (Message-ID, final reply).
async fn send_all(gate: std::net::SocketAddr, case: &str, n: usize) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for i in 0..n {
        let id = format!("<{case}-{i}@sender.test>");
        let mut c = Client::hello(gate).await;
        c.line("MAIL FROM:<a@sender.test>").await;
        let mut r = c.reply().await;
        if r.starts_with('2') {
            c.line("RCPT TO:<b@example.test>").await;
            r = c.reply().await;
        }
        if r.starts_with('2') {
            c.line("DATA").await;
            r = c.reply().await;
        }
        if r.starts_with("354") {
            let m = message(&id[1..id.find('@').unwrap()], "fault injection\r\n");
            let mut wire = Vec::new();
            portcullis::wire::data::write_stuffed(&m, |s| wire.extend_from_slice(s));
            c.send(&wire).await;
            r = c.reply().await;
        }
        out.push((id, r));
    }
    out
}

async fn run_case(name: &str, flags: &[&str], expect: &str) {
    let sink = Sink::start(name, flags);
    let mut cfg = in_front_of(sink.port, IdentityMode::None);
    let t = &mut cfg.upstream.timeouts;
    (t.connect, t.command, t.data) = (secs(2), secs(2), secs(2));
    let gate = Gate::start_config(cfg).await;
    let results = send_all(gate.addr, name, 10).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stored = sink.stored();
    for (id, reply) in &results {
        assert!(
            reply.starts_with(expect),
            "{name}: {id} got {reply:?}, expected {expect}"
        );
        if reply.starts_with("250") {
            assert_eq!(stored.get(id), Some(&1), "{name}: accepted {id} lost");
        }
    }
    for (id, n) in &stored {
        assert_eq!(*n, 1, "{name}: {id} stored {n} times");
    }
    let accepted = results.iter().filter(|(_, r)| r.starts_with("250")).count();
    eprintln!(
        "{name}: client accepted {accepted}, sink stored {}",
        stored.len()
    );
}

fn have_sink() -> bool {
    Path::new("/usr/sbin/smtp-sink").exists()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs smtp-sink (Debian package postfix, installed by .ci/run)"]
async fn faults_against_smtp_sink() {
    assert!(have_sink(), "smtp-sink not installed");
    run_case("clean", &[], "250").await;
    run_case("hard-mail", &["-f", "MAIL"], "5").await;
    run_case("soft-rcpt", &["-r", "RCPT"], "4").await;
    run_case("hard-dot", &["-f", "."], "5").await;
    run_case("soft-dot", &["-r", "."], "4").await;
    run_case("drop-data", &["-q", "DATA"], "451 4.4.2").await;
    run_case("drop-dot", &["-q", "."], "451 4.4.2").await;
    run_case("421-rcpt", &["-Q", "RCPT"], "451").await;
    run_case("421-dot", &["-Q", "."], "451").await;
    run_case("stall-dot", &["-W", ".:4"], "451 4.4.2").await;
    run_case("stall-mail", &["-W", "MAIL:4"], "451 4.4.2").await;
    run_case("abort-after-data", &["-A", "0"], "5").await;
    run_case("refuse-connect", &["-f", "CONNECT"], "451 4.4.1").await;
}
