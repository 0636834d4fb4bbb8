//! `portcullis replay` over a Maildir and an mbox the test writes: each
//! message judged by today's rules, malformed ones reported one by one
//! while the run goes on, the summary, `--json`, and `--log` marking the
//! verdicts that changed.

use crate::common;
use std::path::{Path, PathBuf};
use std::process::Command;

const RULES: &str = r#"rules:
  - {id: PRIZE, description: d, stage: data, when: {subject: {regex: prize}}, action: {score: 6}}
  - {id: BAD_HELO, description: d, when: {helo: {exact: [bad.test]}}, action: reject}
  - {id: EXE, description: d, stage: data, when: {subject: {regex: invoice}}, action: {reject: {code: 554, enhanced: 5.7.1, text: "no"}}}
"#;

fn message(helo: &str, ip: &str, queue_id: &str, subject: &str) -> String {
    format!(
        "Return-Path: <a@sender.test>\r\nDelivered-To: b@example.test\r\nReceived: from {helo} ({helo} [{ip}])\r\n\tby mx.example.test (Postfix) with ESMTP id {queue_id}\r\n\tfor <b@example.test>; Sat, 5 Dec 2026 06:00:00 +0000\r\nMessage-ID: <{queue_id}@sender.test>\r\nFrom: a@sender.test\r\nSubject: {subject}\r\n\r\nhello\r\n"
    )
}

fn setup(name: &str) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("portcullis-replay-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("rules")).unwrap();
    std::fs::write(dir.join("rules/10.yaml"), RULES).unwrap();
    let mut cfg = common::config::test_config("127.0.0.1:25".parse().unwrap());
    cfg.rules_dir = Some(dir.join("rules"));
    cfg.limits.max_message_size = common::config::kib(64);
    let cfg_path = dir.join("portcullis.json");
    common::config::write_config(&cfg_path, &cfg);
    (dir, cfg_path)
}

fn replay(cfg: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["replay", "--config"])
        .arg(cfg)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn a_maildir_and_an_mbox_are_judged_message_by_message() {
    let (dir, cfg) = setup("mixed");
    let md = dir.join("Maildir");
    for sub in ["cur", "new", "tmp"] {
        std::fs::create_dir_all(md.join(sub)).unwrap();
    }
    std::fs::write(
        md.join("cur/1.host:2,S"),
        message("mx.sender.test", "192.0.2.7", "Q1", "hello"),
    )
    .unwrap();
    std::fs::write(
        md.join("cur/2.host:2,S"),
        message("mx.sender.test", "192.0.2.7", "Q2", "you won a prize"),
    )
    .unwrap();
    std::fs::write(
        md.join("new/3.host"),
        message("bad.test", "192.0.2.8", "Q3", "hello"),
    )
    .unwrap();
    // Malformed: no header at all; and no Received to say who sent it.
    std::fs::write(md.join("new/4.host"), "\r\n\r\njust a body").unwrap();
    std::fs::write(md.join("new/5.host"), "Subject: orphan\r\n\r\nhi\r\n").unwrap();

    let mbox = dir.join("archive.mbox");
    let big = "y".repeat(1000);
    let mut text = String::new();
    for (i, subject) in ["invoice attached", "hello", "HUGE"].iter().enumerate() {
        let mut m =
            message("mx.sender.test", "192.0.2.9", &format!("M{i}"), subject).replace("\r\n", "\n");
        if *subject == "HUGE" {
            for _ in 0..100 {
                m.push_str(&big);
                m.push('\n');
            }
        }
        // A body line that an mbox quotes.
        m.push_str(">From the desk of\n");
        text.push_str(&format!(
            "From a@sender.test Sat Dec  5 06:00:00 2026\n{m}\n"
        ));
    }
    std::fs::write(&mbox, text).unwrap();

    let out = replay(
        &cfg,
        &["--no-dns", md.to_str().unwrap(), mbox.to_str().unwrap()],
    );
    let line = |suffix: &str| -> String {
        out.lines()
            .find(|l| l.split(':').next().is_some_and(|p| p.ends_with(suffix)))
            .unwrap_or_else(|| panic!("no line for {suffix} in:\n{out}"))
            .to_string()
    };
    assert!(line("1.host").ends_with(": accept 250 -"), "{out}");
    assert!(line("2.host").contains(": tag 250 rule:PRIZE"), "{out}");
    assert!(
        line("3.host").contains(": reject 550 rule:BAD_HELO"),
        "{out}"
    );
    assert!(line("4.host").contains(": error: not a message"), "{out}");
    assert!(
        line("5.host").contains(": error: no client address in a Received field; give --ip"),
        "{out}"
    );
    assert!(
        line("archive.mbox#1").contains(": reject 554 rule:EXE"),
        "{out}"
    );
    assert!(line("archive.mbox#2").ends_with(": accept 250 -"), "{out}");
    assert!(
        line("archive.mbox#3").contains("error: larger than limits.max_message_size"),
        "{out}"
    );
    for want in [
        "8 messages: 3 could not be judged",
        "  accept    2",
        "  tag       1",
        "  reject    2",
        "rule:BAD_HELO",
    ] {
        assert!(out.contains(want), "{want:?} in:\n{out}");
    }

    // --ip gives the orphan a client; --json for scripts.
    let out = replay(
        &cfg,
        &[
            "--no-dns",
            "--json",
            "--ip",
            "192.0.2.1",
            md.join("new/5.host").to_str().unwrap(),
        ],
    );
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["verdict"], "accept");
    assert_eq!(lines[1]["summary"]["messages"], 1);

    // The log says Q3 and M0 were accepted then: both changed.
    let log = dir.join("portcullis.log");
    std::fs::write(
        &log,
        [
            r#"{"timestamp":"2026-12-05T06:00:00Z","event":"transaction","verdict":"accept","queue_id":"Q3","message_id":"Q3@sender.test"}"#,
            r#"{"timestamp":"2026-12-05T06:00:00Z","event":"transaction","verdict":"accept","queue_id":"","message_id":"M0@sender.test"}"#,
            r#"{"timestamp":"2026-12-05T06:00:00Z","event":"transaction","verdict":"accept","queue_id":"Q1","message_id":""}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    let out = replay(
        &cfg,
        &[
            "--no-dns",
            "--log",
            log.to_str().unwrap(),
            md.to_str().unwrap(),
            mbox.to_str().unwrap(),
        ],
    );
    assert!(
        line_of(&out, "3.host").ends_with("(changed: was accept)"),
        "{out}"
    );
    assert!(
        line_of(&out, "archive.mbox#1").ends_with("(changed: was accept)"),
        "{out}"
    );
    assert!(!line_of(&out, "1.host").contains("changed"), "{out}");
    assert!(
        out.contains("compared with the log: 3 found, 2 changed"),
        "{out}"
    );
}

fn line_of(out: &str, suffix: &str) -> String {
    out.lines()
        .find(|l| l.split(':').next().is_some_and(|p| p.ends_with(suffix)))
        .unwrap_or_else(|| panic!("no line for {suffix} in:\n{out}"))
        .to_string()
}
