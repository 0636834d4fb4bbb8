//! The sd_notify protocol, with a Unix datagram socket standing in for
//! systemd (NOTIFY_SOCKET) and the real binary: READY=1 once the listener
//! takes connections, WATCHDOG=1 at half of WATCHDOG_USEC, RELOADING=1 then
//! READY=1 around a SIGHUP, STOPPING=1 on SIGTERM.

use crate::common;
use common::{FakeMta, Script};
use std::process::Command;
use std::time::{Duration, Instant};
use tokio::net::UnixDatagram;

/// The next message systemd would get (panics after `within`).
async fn next(sock: &UnixDatagram, within: Duration) -> String {
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(within, sock.recv(&mut buf))
        .await
        .expect("a notification in time")
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// The next message that is not a watchdog ping.
async fn next_state(sock: &UnixDatagram) -> String {
    loop {
        let m = next(sock, Duration::from_secs(10)).await;
        if m != "WATCHDOG=1\n" {
            return m;
        }
    }
}

#[tokio::test]
async fn ready_watchdog_reloading_and_stopping_reach_systemd() {
    let mta = FakeMta::start(Script::default()).await;
    let dir = std::env::temp_dir().join(format!("portcullis-notify-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("rules")).unwrap();
    let sock_path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let port = common::free_port();
    let conf = dir.join("portcullis.yaml");
    std::fs::write(
        &conf,
        format!(
            "hostname: gate.test\nlisten: [{{addr: \"127.0.0.1:{port}\"}}]\nupstream: {{addr: \"{}\", client_identity: xclient}}\nlog: {{file: \"{}\"}}\nrules_dir: {}\n",
            mta.addr,
            dir.join("log").display(),
            dir.join("rules").display()
        ),
    )
    .unwrap();
    let mut child = common::Killed(
        Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(["run", "--config"])
            .arg(&conf)
            .env("NOTIFY_SOCKET", &sock_path)
            .env("WATCHDOG_USEC", "200000")
            .spawn()
            .unwrap(),
    );
    let pid = child.0.id().to_string();

    let m = next_state(&sock).await;
    assert!(m.starts_with("READY=1\n"), "{m:?}");
    // Ready means serving: the listener answers at once.
    let mut c = common::Client::connect(std::net::SocketAddr::from(([127, 0, 0, 1], port))).await;
    assert!(c.reply().await.starts_with("220"));

    // Watchdog pings every 100 ms (half of 200 ms), from the event loop.
    let started = Instant::now();
    let mut pings = 0;
    while started.elapsed() < Duration::from_secs(1) {
        if next(&sock, Duration::from_secs(1)).await == "WATCHDOG=1\n" {
            pings += 1;
        }
    }
    assert!((7..=14).contains(&pings), "{pings} pings in 1 s");

    Command::new("kill").args(["-HUP", &pid]).status().unwrap();
    let m = next_state(&sock).await;
    assert!(m.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{m:?}");
    let m = next_state(&sock).await;
    assert!(m.starts_with("READY=1\n"), "{m:?}");

    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let m = next_state(&sock).await;
    assert!(m.starts_with("STOPPING=1\n"), "{m:?}");
    drop(c);
    let until = Instant::now() + Duration::from_secs(20);
    while child.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < until, "did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The shipped unit file passes `systemd-analyze verify` (with the built
/// binary in place of /usr/bin/portcullis) and its hardening scores as
/// systemd's own `security` check calls OK (exposure under 3).
#[test]
#[ignore = "needs systemd-analyze (Debian package systemd, installed by .ci/run)"]
fn the_unit_file_verifies() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/contrib/portcullis.service"
    ))
    .unwrap();
    for want in [
        "Type=notify",
        "WatchdogSec=",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "ProtectSystem=strict",
        "SystemCallFilter=@system-service",
    ] {
        assert!(unit.contains(want), "{want}");
    }
    let dir = std::env::temp_dir().join(format!("portcullis-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("portcullis.service");
    std::fs::write(
        &path,
        unit.replace("/usr/bin/portcullis", env!("CARGO_BIN_EXE_portcullis")),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .expect("systemd-analyze");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && text.trim().is_empty(), "{text}");
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let score: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for portcullis.service: ")
                .nth(1)
        })
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no score in {text}"));
    assert!(score < 3.0, "exposure {score}: {text}");
}

/// Under systemd, stdout is the journal (JOURNAL_STREAM names its device
/// and inode) and journald stamps every line: ours then carry no timestamp
/// of their own, and `stats` takes the time from the journal's prefix.
#[tokio::test]
async fn journal_lines_have_one_timestamp_and_stats_reads_it() {
    use std::os::unix::fs::MetadataExt;
    let mta = FakeMta::start(Script::default()).await;
    let dns = common::dns::FakeDns::start(&["test."], vec![]).await;
    let dir = std::env::temp_dir().join(format!("portcullis-journal-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("rules")).unwrap();
    // One run with stdout as "the journal", one with a JOURNAL_STREAM that
    // names another file (stdout redirected elsewhere): stamped as usual.
    let mut logs = Vec::new();
    for journal in [true, false] {
        let port = common::free_port();
        let conf = dir.join(format!("p{port}.yaml"));
        std::fs::write(
            &conf,
            format!(
                "hostname: gate.test\nlisten: [{{addr: \"127.0.0.1:{port}\"}}]\nupstream: {{addr: \"{}\", client_identity: xclient}}\ndns: {{nameservers: [\"{}\"]}}\nrules_dir: {}\n",
                mta.addr,
                dns.addr,
                dir.join("rules").display()
            ),
        )
        .unwrap();
        let out_path = dir.join(format!("stdout-{journal}"));
        let out = std::fs::File::create(&out_path).unwrap();
        let m = if journal {
            out.metadata().unwrap()
        } else {
            std::fs::metadata(&conf).unwrap()
        };
        let child = common::Killed(
            Command::new(env!("CARGO_BIN_EXE_portcullis"))
                .args(["run", "--config"])
                .arg(&conf)
                .env("JOURNAL_STREAM", format!("{}:{}", m.dev(), m.ino()))
                .stdout(out)
                .spawn()
                .unwrap(),
        );
        let gate = common::listening(port).await;
        let mut c = common::Client::hello(gate).await;
        let r = c
            .send_mail(
                "a@sender.test",
                &["b@example.test"],
                b"Subject: j\r\n\r\nhi\r\n",
            )
            .await;
        assert!(r.starts_with("250"), "{r}");
        c.cmd("QUIT", "221").await;
        drop(child);
        logs.push(std::fs::read_to_string(&out_path).unwrap());
    }
    // Journal lines start with their syslog priority, which journald takes
    // off (and files the line under): info <6>, warnings <4>.
    let journal_lines: Vec<&str> = logs[0].lines().filter(|l| !l.is_empty()).collect();
    assert!(
        journal_lines
            .iter()
            .all(|l| ["<3>{", "<4>{", "<6>{", "<7>{"]
                .iter()
                .any(|p| l.starts_with(p))),
        "{}",
        logs[0]
    );
    assert!(
        journal_lines
            .iter()
            .any(|l| l.starts_with("<6>{") && l.contains("\"transaction\""))
    );
    assert!(logs[1].lines().all(|l| l.starts_with('{')), "{}", logs[1]);
    let stored: Vec<&str> = journal_lines.iter().map(|l| &l[3..]).collect();
    let txn = |log: &str| -> serde_json::Value {
        log.lines()
            .filter_map(|l| {
                serde_json::from_str::<serde_json::Value>(
                    l.get(3..).filter(|_| l.starts_with('<')).unwrap_or(l),
                )
                .ok()
            })
            .find(|v| v["event"] == "transaction")
            .unwrap_or_else(|| panic!("no transaction line in {log}"))
    };
    let (journal, plain) = (txn(&logs[0]), txn(&logs[1]));
    assert!(journal.get("timestamp").is_none(), "{journal}");
    assert!(
        logs[0].lines().all(|l| !l.contains("\"timestamp\"")),
        "{}",
        logs[0]
    );
    assert!(
        plain["timestamp"]
            .as_str()
            .is_some_and(|t| t.starts_with("20")),
        "{plain}"
    );

    // What `journalctl -u portcullis -o short-iso` shows of the journal run,
    // read by stats: the hour comes from the prefix.
    let shown: String = stored
        .iter()
        .map(|l| format!("2026-11-30T10:15:00+0100 mx portcullis[812]: {l}\n"))
        .collect();
    let file = dir.join("journal.txt");
    std::fs::write(&file, shown).unwrap();
    let report: serde_json::Value = serde_json::from_str(&crate::stats::stats(&[
        "--json",
        "--since",
        "2026-11-30T09",
        "--until",
        "2026-11-30T10",
        file.to_str().unwrap(),
    ]))
    .unwrap();
    assert_eq!(report["transactions"], 1, "{report}");
    assert_eq!(report["hours"][0]["hour"], "2026-11-30T09", "{report}");
}

/// `log.level` changes on a reload: a gate at `warn` writes no transaction
/// line; after the config says `info` and SIGHUP, it does, without a
/// restart (the same process id).
#[tokio::test]
async fn log_level_changes_on_reload() {
    let mta = FakeMta::start(Script::default()).await;
    let dns = common::dns::FakeDns::start(&["test."], vec![]).await;
    let dir = std::env::temp_dir().join(format!("portcullis-level-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("rules")).unwrap();
    let port = common::free_port();
    let log = dir.join("gate.log");
    let conf = dir.join("p.yaml");
    let write = |level: &str| {
        std::fs::write(
            &conf,
            format!(
                "hostname: gate.test\nlisten: [{{addr: \"127.0.0.1:{port}\"}}]\nupstream: {{addr: \"{}\", client_identity: xclient}}\ndns: {{nameservers: [\"{}\"]}}\nlog: {{level: {level}, file: \"{}\"}}\nrules_dir: {}\n",
                mta.addr,
                dns.addr,
                log.display(),
                dir.join("rules").display()
            ),
        )
        .unwrap()
    };
    write("warn");
    let child = common::Killed(
        Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(["run", "--config"])
            .arg(&conf)
            .spawn()
            .unwrap(),
    );
    let pid = child.0.id().to_string();
    let gate = common::listening(port).await;
    let send = |from: &'static str| async move {
        let mut c = common::Client::hello(gate).await;
        let r = c
            .send_mail(from, &["b@example.test"], b"Subject: l\r\n\r\nhi\r\n")
            .await;
        assert!(r.starts_with("250"), "{r}");
        c.cmd("QUIT", "221").await;
    };
    send("quiet@sender.test").await;
    write("info");
    Command::new("kill").args(["-HUP", &pid]).status().unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    // The reload's own line: the start-up warning about `warn` names
    // log.level too.
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("config reloaded")
    {
        assert!(Instant::now() < until, "no reload logged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    send("loud@sender.test").await;
    // The line is written after the reply; on a loaded machine, later.
    let until = Instant::now() + Duration::from_secs(10);
    let mut text = std::fs::read_to_string(&log).unwrap();
    while !text.contains("loud@sender.test") {
        assert!(Instant::now() < until, "{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        text = std::fs::read_to_string(&log).unwrap();
    }
    assert!(!text.contains("quiet@sender.test"), "{text}");
}
