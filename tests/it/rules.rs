//! Rules through real sessions: every condition kind, matcher, combinator
//! and action at its stage; shadow mode; validation errors with
//! file:line:column; reload; the shipped rule set.

use crate::common;

use common::config::test_config;
use common::{Client, FakeMta, Gate, Script, split_ours};
use portcullis::config::Config;
use portcullis::rules::RuleSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A fresh rules directory with the given files.
fn rules_dir(name: &str, files: &[(&str, &str)]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("portcullis-rules-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("lists")).unwrap();
    for (f, text) in files {
        std::fs::write(dir.join(f), text).unwrap();
    }
    dir
}

/// The test config with the rules of `dir`.
fn with_rules(mta: &FakeMta, dir: &Path) -> Config {
    let mut cfg = test_config(mta.addr);
    cfg.limits.max_connections_per_ip = 100;
    cfg.rules_dir = Some(dir.to_path_buf());
    cfg
}

async fn gate_with(mta: &FakeMta, dir: &Path) -> Gate {
    Gate::start_config(with_rules(mta, dir)).await
}

#[test]
fn the_shipped_rules_load() {
    let set = RuleSet::load_dir(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/rules")))
        .unwrap_or_else(|e| panic!("shipped rules do not load:\n{e}"));
    assert!(set.rules().len() >= 10, "{}", set.summary());
    assert!(set.rules().iter().all(|r| !r.description.is_empty()));
}

const ENVELOPE_RULES: &str = r#"
rules:
  - id: BLOCK_NET
    description: a client network
    when: {client_ip: {cidr: [127.0.0.66/32]}}
    action: {reject: {code: 554, enhanced: 5.7.1, text: "Your network is blocked"}}
  - id: HELO_BOT
    description: helo regex
    when: {helo: {regex: '^bot\d+\.'}}
    action: tempfail
  - id: SENDER_DOMAIN
    description: sender domain with subdomains
    when: {mail_from: {domain: spam.test}}
    action: reject
  - id: SENDER_LIST
    description: sender from a list file
    when: {mail_from: {list: lists/senders.txt}}
    action: reject
  - id: RCPT_TRAP
    description: a spam trap recipient, exact
    when: {rcpt: {exact: trap@example.test}}
    action: {reject: {code: 550, enhanced: 5.1.1, text: "No such user"}}
  - id: RCPT_LOCAL_ADMIN
    description: local part plus a negated domain
    when:
      all:
        - rcpt_local: {exact: [admin, root]}
        - not: {rcpt_domain: {domain: example.test}}
    action: reject
  - id: ANY_TAG
    description: any-combinator scoring
    when:
      any:
        - helo: {exact: scored.test}
        - mail_from: {regex: '^scored@'}
    action: {score: 3}
"#;

#[tokio::test]
async fn envelope_conditions_matchers_and_combinators() {
    let dir = rules_dir(
        "env",
        &[
            ("50-env.yaml", ENVELOPE_RULES),
            ("lists/senders.txt", "# senders\nlisted@list.test\n"),
        ],
    );
    let mta = FakeMta::start(Script::default()).await;
    let gate = gate_with(&mta, &dir).await;

    // client_ip at connect, delivered at RCPT.
    let mut c = Client::connect_from(gate.addr, "127.0.0.66").await;
    c.reply().await;
    c.cmd("EHLO x.test", "250").await;
    c.cmd("MAIL FROM:<a@ok.test>", "250").await;
    c.cmd(
        "RCPT TO:<b@example.test>",
        "554 5.7.1 Your network is blocked",
    )
    .await;

    let mut c = Client::connect_from(gate.addr, "127.0.0.2").await;
    c.reply().await;
    c.cmd("EHLO bot42.example", "250").await;
    c.cmd("MAIL FROM:<a@ok.test>", "250").await;
    c.cmd(
        "RCPT TO:<b@example.test>",
        "451 4.7.1 Message refused by policy (HELO_BOT)",
    )
    .await;

    for (sender, want) in [
        (
            "x@sub.spam.test",
            "550 5.7.1 Message refused by policy (SENDER_DOMAIN)",
        ),
        ("x@notspam.test", "250"),
        (
            "listed@list.test",
            "550 5.7.1 Message refused by policy (SENDER_LIST)",
        ),
    ] {
        let mut c = Client::hello(gate.addr).await;
        c.cmd(&format!("MAIL FROM:<{sender}>"), "250").await;
        c.cmd("RCPT TO:<b@example.test>", want).await;
    }

    // RCPT stage: only that recipient is refused; the others go through.
    let mut c = Client::hello(gate.addr).await;
    c.cmd("MAIL FROM:<a@ok.test>", "250").await;
    c.cmd("RCPT TO:<trap@example.test>", "550 5.1.1 No such user")
        .await;
    c.cmd("RCPT TO:<admin@elsewhere.test>", "550 5.7.1").await;
    c.cmd("RCPT TO:<admin@example.test>", "250").await;
    c.cmd("RCPT TO:<b@example.test>", "250").await;
    c.cmd("DATA", "354").await;
    c.send(b"Subject: r\r\n\r\nx\r\n.\r\n").await;
    assert!(c.reply().await.starts_with("250"));
    let stored = mta.stored();
    assert_eq!(
        stored.last().unwrap().rcpts,
        vec!["<admin@example.test>", "<b@example.test>"]
    );
    assert_eq!(
        mta.count("RCPT TO:<TRAP"),
        0,
        "a refused recipient never reaches upstream"
    );

    // Score (any): added to the X-Spam-Score.
    let mut c = Client::connect(gate.addr).await;
    c.reply().await;
    c.cmd("EHLO scored.test", "250").await;
    let r = c
        .send_mail("a@ok.test", &["b@example.test"], b"Subject: s\r\n\r\nx\r\n")
        .await;
    assert!(r.starts_with("250"), "{r}");
    let (ours, _) = split_ours(&mta.stored().last().unwrap().data);
    assert!(ours.contains("X-Spam-Score: 3.0"), "{ours}");
}

const MESSAGE_RULES: &str = r#"
rules:
  - id: HEADER_MAILER
    description: header by name, any occurrence, decoded
    when: {header: {name: X-Mailer, regex: 'MassMailer'}}
    action: {score: 2}
  - id: SUBJECT_WORD
    description: MIME-encoded subject, decoded
    when: {subject: {regex: 'café offer'}}
    action: {score: 4}
  - id: BODY_BASE64_TEXT
    description: text in a base64 text part
    when: {body: {regex: 'hidden phrase'}}
    action: reject
  - id: ZIP_NAME
    description: attachment name
    when: {attachment_name: {regex: '\.zip$'}}
    action: {add_header: {name: X-Has-Zip, value: "yes"}}
  - id: PDF_TYPE
    description: attachment type
    when: {attachment_type: {exact: application/pdf}}
    action: log
  - id: BIG
    description: size and recipient count
    when:
      all:
        - size: {gt: 2KiB}
        - rcpt_count: {ge: 2}
    action: {tempfail: {code: 452, enhanced: 4.3.1, text: "Too big for many recipients"}}
  - id: PLAIN_TEXT_SESSION
    description: tls false
    when: {tls: false}
    action: {add_header: {name: X-Plain, value: "1"}}
  - id: ACCEPT_PARTNER
    description: allow-list by sender; skips the rest
    when: {mail_from: {exact: partner@ok.test}}
    action: accept
"#;

fn mime(subject: &str, body_b64: &str, attachment: Option<(&str, &str)>) -> String {
    let mut m = format!(
        "From: a@ok.test\r\nTo: b@example.test\r\nSubject: {subject}\r\nX-Mailer: Other\r\nX-Mailer: MassMailer 2.0\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"B\"\r\n\r\n--B\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n{body_b64}\r\n"
    );
    if let Some((name, ctype)) = attachment {
        m.push_str(&format!(
            "--B\r\nContent-Type: {ctype}; name=\"{name}\"\r\nContent-Disposition: attachment; filename=\"{name}\"\r\nContent-Transfer-Encoding: base64\r\n\r\nAAAA\r\n"
        ));
    }
    m.push_str("--B--\r\n");
    m
}

#[tokio::test]
async fn message_conditions_and_actions_at_data() {
    use base64::Engine;
    // Base64 wrapped at 76 characters, as MIME writers do.
    let b64 = |s: &str| {
        let e = base64::engine::general_purpose::STANDARD.encode(s);
        e.as_bytes()
            .chunks(76)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect::<Vec<_>>()
            .join("\r\n")
    };
    let dir = rules_dir("msg", &[("50-msg.yaml", MESSAGE_RULES)]);
    let mta = FakeMta::start(Script::default()).await;
    let gate = gate_with(&mta, &dir).await;

    // Header (second occurrence) + encoded subject = 6, zip header, log for pdf.
    let m = mime(
        "=?utf-8?q?caf=C3=A9_offer?=",
        &b64("nothing here"),
        Some(("files.zip", "application/zip")),
    );
    let mut c = Client::hello(gate.addr).await;
    let r = c
        .send_mail("a@ok.test", &["b@example.test"], m.as_bytes())
        .await;
    assert!(r.starts_with("250"), "{r}");
    let (ours, _) = split_ours(&mta.stored().last().unwrap().data);
    assert!(ours.contains("X-Spam-Score: 6.0"), "{ours}");
    let stored = String::from_utf8_lossy(&mta.stored().last().unwrap().data).into_owned();
    assert!(
        stored.contains("X-Has-Zip: yes\r\n") && stored.contains("X-Plain: 1\r\n"),
        "{stored}"
    );

    // Body text decoded from base64: the raw base64 does not contain it.
    let m = mime(
        "hi",
        &b64("a hidden phrase inside"),
        Some(("doc.pdf", "application/pdf")),
    );
    assert!(!m.contains("hidden phrase"));
    let r = c
        .send_mail("a@ok.test", &["b@example.test"], m.as_bytes())
        .await;
    assert!(
        r.starts_with("550 5.7.1 Message refused by policy (BODY_BASE64_TEXT)"),
        "{r}"
    );

    // Size and recipient count.
    let big = mime("hi", &b64(&"x".repeat(3000)), None);
    let r = c
        .send_mail(
            "a@ok.test",
            &["b@example.test", "c@example.test"],
            big.as_bytes(),
        )
        .await;
    assert!(r.starts_with("452 4.3.1 Too big"), "{r}");
    let r = c
        .send_mail("a@ok.test", &["b@example.test"], big.as_bytes())
        .await;
    assert!(r.starts_with("250"), "{r}");

    // accept: the allow-listed sender skips the remaining rules.
    let m = mime("hi", &b64("a hidden phrase inside"), None);
    let r = c
        .send_mail("partner@ok.test", &["b@example.test"], m.as_bytes())
        .await;
    assert!(r.starts_with("250"), "{r}");
}

#[tokio::test]
async fn shadow_rules_change_nothing_but_log_and_counters() {
    let shadow = ENVELOPE_RULES.replace(
        "action: {reject: {code: 550, enhanced: 5.1.1, text: \"No such user\"}}",
        "action: {reject: {code: 550, enhanced: 5.1.1, text: \"No such user\"}}\n    mode: shadow",
    );
    let dir = rules_dir(
        "shadow",
        &[("50-env.yaml", &shadow), ("lists/senders.txt", "")],
    );
    let mta = FakeMta::start(Script::default()).await;
    let running = common::start_server_config(with_rules(&mta, &dir)).await;
    let (rules, addr) = (running.rules, running.addr);
    let mut c = Client::hello(addr).await;
    c.cmd("MAIL FROM:<a@ok.test>", "250").await;
    // The shadow rule matches, but the recipient still reaches upstream.
    c.cmd("RCPT TO:<trap@example.test>", "250").await;
    assert_eq!(mta.count("RCPT TO:<TRAP"), 1);
    let set = rules.current();
    let trap = set.rules().iter().find(|r| r.id == "RCPT_TRAP").unwrap();
    assert_eq!(trap.mode, portcullis::rules::RuleMode::Shadow);
    assert_eq!(
        trap.hits.load(std::sync::atomic::Ordering::Relaxed),
        1,
        "counted"
    );
}

/// Loads one broken file and returns the error text.
fn error_for(name: &str, text: &str, lists: &[(&str, &str)]) -> String {
    let mut files = vec![(name, text)];
    files.extend_from_slice(lists);
    let dir = rules_dir(&format!("err-{}", name.replace('.', "-")), &files);
    match RuleSet::load_dir(&dir) {
        Ok(_) => panic!("{name} should not load"),
        Err(e) => e.to_string().replace(&format!("{}/", dir.display()), ""),
    }
}

#[test]
fn validation_errors_name_file_line_column_and_rule() {
    let ok_head = "rules:\n  - id: GOOD_RULE\n    description: fine\n    when: {helo: {exact: a.test}}\n    action: log\n";
    // Unknown key.
    let e = error_for(
        "a.yaml",
        &format!(
            "{ok_head}  - id: SECOND\n    description: x\n    when: {{helo: {{exact: a.test}}}}\n    action: log\n    severity: high\n"
        ),
        &[],
    );
    assert!(
        e.starts_with("a.yaml:10:5: rules[1].severity: unknown field `severity`"),
        "{e}"
    );
    // Unknown condition.
    let e = error_for(
        "b.yaml",
        "rules:\n  - id: X\n    description: x\n    when: {heloo: {exact: a}}\n    action: log\n",
        &[],
    );
    assert!(
        e.starts_with("b.yaml:4:") && e.contains("unknown field `heloo`"),
        "{e}"
    );
    // Bad regex, located at the pattern.
    let e = error_for(
        "c.yaml",
        "rules:\n  - id: BAD_REGEX\n    description: x\n    when:\n      body: {regex: 'a(b'}\n    action: log\n",
        &[],
    );
    assert!(
        e.starts_with("c.yaml:5:22: BAD_REGEX: bad regex \"a(b\""),
        "{e}"
    );
    // Missing list file.
    let e = error_for(
        "d.yaml",
        "rules:\n  - id: NO_LIST\n    description: x\n    when:\n      helo: {list: lists/missing.txt}\n    action: log\n",
        &[],
    );
    assert!(
        e.starts_with("d.yaml:5:20: NO_LIST: list file") && e.contains("missing.txt"),
        "{e}"
    );
    // Duplicate ids (across the file).
    let e = error_for(
        "e.yaml",
        &format!("{ok_head}{}", ok_head.trim_start_matches("rules:\n")),
        &[],
    );
    assert!(
        e.starts_with("e.yaml:") && e.contains("GOOD_RULE: duplicate rule id"),
        "{e}"
    );
    // A body condition can never match at rcpt.
    let e = error_for(
        "f.yaml",
        "rules:\n  - id: WRONG_STAGE\n    description: x\n    stage: rcpt\n    when: {body: {regex: x}}\n    action: log\n",
        &[],
    );
    assert!(
        e.starts_with("f.yaml:4:5: WRONG_STAGE: a condition here is only known at data"),
        "{e}"
    );
    // Id not UPPER_SNAKE.
    let e = error_for(
        "g.yaml",
        "rules:\n  - id: lower_case\n    description: x\n    when: {helo: {exact: a}}\n    action: log\n",
        &[],
    );
    assert!(
        e.starts_with("g.yaml:2:5: rules[0].id: rule id \"lower_case\" must be UPPER_SNAKE"),
        "{e}"
    );
    // Reply class mismatch.
    let e = error_for(
        "h.yaml",
        "rules:\n  - id: MISMATCH\n    description: x\n    when: {helo: {exact: a}}\n    action: {reject: {code: 550, enhanced: 4.7.1}}\n",
        &[],
    );
    assert!(
        e.starts_with("h.yaml:5:5: MISMATCH: enhanced code 4.7.1 does not match reply code 550"),
        "{e}"
    );
    // Two matchers in one.
    let e = error_for(
        "i.yaml",
        "rules:\n  - id: TWO\n    description: x\n    when: {helo: {exact: a, regex: b}}\n    action: log\n",
        &[],
    );
    assert!(
        e.contains("TWO: helo: give exactly one of exact, domain, regex, list"),
        "{e}"
    );
    // Every error is reported, not only the first.
    let dir = rules_dir(
        "multi",
        &[
            (
                "1.yaml",
                "rules:\n  - id: A\n    description: x\n    when: {body: {regex: '('}}\n    action: log\n",
            ),
            (
                "2.yaml",
                "rules:\n  - id: B\n    description: x\n    when: {body: {regex: ')'}}\n    action: log\n",
            ),
        ],
    );
    let e = RuleSet::load_dir(&dir).err().unwrap();
    assert_eq!(e.0.len(), 2, "{e}");
}

#[tokio::test]
async fn reload_takes_effect_for_new_sessions_and_a_broken_set_keeps_the_old() {
    let v1 = "rules:\n  - id: BLOCK_ONE\n    description: x\n    when: {mail_from: {exact: one@x.test}}\n    action: reject\n";
    let v2 = "rules:\n  - id: BLOCK_TWO\n    description: x\n    when: {mail_from: {exact: two@x.test}}\n    action: reject\n";
    let dir = rules_dir("reload", &[("50.yaml", v1)]);
    let mta = FakeMta::start(Script::default()).await;
    let running = common::start_server_config(with_rules(&mta, &dir)).await;
    let (rules, addr) = (running.rules, running.addr);
    let _watch = rules.watch(Duration::from_millis(200));

    // A session that starts now keeps the old set for its whole life.
    let mut old = Client::hello(addr).await;
    std::fs::write(dir.join("50.yaml"), v2).unwrap();
    // The file watcher picks it up (debounced).
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while rules.reloads_ok.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        assert!(
            std::time::Instant::now() < until,
            "no reload on file change"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    old.cmd("MAIL FROM:<one@x.test>", "250").await;
    old.cmd("RCPT TO:<b@example.test>", "550").await;
    let mut new = Client::hello(addr).await;
    new.cmd("MAIL FROM:<one@x.test>", "250").await;
    new.cmd("RCPT TO:<b@example.test>", "250").await;
    let mut new = Client::hello(addr).await;
    new.cmd("MAIL FROM:<two@x.test>", "250").await;
    new.cmd("RCPT TO:<b@example.test>", "550").await;

    // A broken set: refused, counted, the old one stays, the gate serves on.
    std::fs::write(dir.join("50.yaml"), "rules:\n  - id: BROKEN\n    when: {").unwrap();
    assert!(rules.reload().is_err());
    assert!(
        rules
            .reloads_failed
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    let mut c = Client::hello(addr).await;
    c.cmd("MAIL FROM:<two@x.test>", "250").await;
    c.cmd("RCPT TO:<b@example.test>", "550").await;
}

#[tokio::test]
async fn editing_a_list_file_reloads_the_rules_like_a_rule_file() {
    // One list under the rules directory (lists/), one kept elsewhere.
    let elsewhere = std::env::temp_dir().join(format!("portcullis-lists-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&elsewhere);
    std::fs::create_dir_all(&elsewhere).unwrap();
    let outside = elsewhere.join("senders.txt");
    std::fs::write(&outside, "one@x.test\n").unwrap();
    let rules = format!(
        "rules:\n  - id: BY_HELO\n    description: x\n    when: {{helo: {{list: lists/helos.txt}}}}\n    action: reject\n\
         \x20 - id: BY_SENDER\n    description: x\n    when: {{mail_from: {{list: {}}}}}\n    action: reject\n",
        outside.display()
    );
    let dir = rules_dir("lists-reload", &[("50.yaml", &rules)]);
    std::fs::write(dir.join("lists/helos.txt"), "bad.test\n").unwrap();
    let mta = FakeMta::start(Script::default()).await;
    let running = common::start_server_config(with_rules(&mta, &dir)).await;
    let (rules, addr) = (running.rules, running.addr);
    assert!(rules.watch(Duration::from_millis(200)));
    let reloads = || rules.reloads_ok.load(std::sync::atomic::Ordering::Relaxed);
    let wait_for = |n: u64| {
        let rules = std::sync::Arc::clone(&rules);
        async move {
            let until = std::time::Instant::now() + Duration::from_secs(10);
            while rules.reloads_ok.load(std::sync::atomic::Ordering::Relaxed) < n {
                assert!(std::time::Instant::now() < until, "no reload");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let refused = |helo: &'static str, from: &'static str| async move {
        let mut c = Client::connect(addr).await;
        c.reply().await;
        c.cmd(&format!("EHLO {helo}"), "250").await;
        c.cmd(&format!("MAIL FROM:<{from}>"), "250").await;
        c.line("RCPT TO:<b@example.test>").await;
        c.reply().await.starts_with("550")
    };
    assert!(refused("bad.test", "ok@x.test").await);
    assert!(!refused("worse.test", "ok@x.test").await);

    // The list in the rules directory's subdirectory, edited in place.
    std::fs::write(dir.join("lists/helos.txt"), "bad.test\nworse.test\n").unwrap();
    wait_for(reloads() + 1).await;
    assert!(refused("worse.test", "ok@x.test").await);

    // The list elsewhere, replaced by rename as editors and deploy tools do.
    assert!(!refused("good.test", "two@x.test").await);
    let before = reloads();
    let tmp = elsewhere.join(".senders.txt.new");
    std::fs::write(&tmp, "one@x.test\ntwo@x.test\n").unwrap();
    std::fs::rename(&tmp, &outside).unwrap();
    wait_for(before + 1).await;
    assert!(refused("good.test", "two@x.test").await);
    let _ = std::fs::remove_dir_all(&elsewhere);
}

/// `checks.report_header` adds X-Spam-Report to delivered mail: the score
/// and every finding with its effect, folded under 78 octets a line; off
/// by default.
#[tokio::test]
async fn report_header_lists_what_fired_when_asked() {
    let mut rules = String::from("rules:\n");
    for i in 0..8 {
        rules.push_str(&format!(
            "  - id: A_RATHER_LONG_RULE_NAME_{i}\n    description: x\n    when: {{subject: {{regex: report}}}}\n    action: {{score: 0.5}}\n"
        ));
    }
    let dir = rules_dir("report", &[("r.yaml", &rules)]);
    let mta = FakeMta::start(Script::default()).await;
    let msg = b"Subject: report me\r\n\r\nbody\r\n";

    let off = gate_with(&mta, &dir).await;
    let mut c = Client::hello(off.addr).await;
    assert!(
        c.send_mail("a@x.test", &["b@y.test"], msg)
            .await
            .starts_with("250")
    );
    let (ours, _) = split_ours(&mta.stored().last().unwrap().data);
    assert!(!ours.contains("X-Spam-Report"), "off by default: {ours}");

    let mut cfg = with_rules(&mta, &dir);
    cfg.checks.report_header = true;
    let on = Gate::start_config(cfg).await;
    let mut c = Client::hello(on.addr).await;
    assert!(
        c.send_mail("a@x.test", &["b@y.test"], msg)
            .await
            .starts_with("250")
    );
    let (ours, _) = split_ours(&mta.stored().last().unwrap().data);
    let rest = ours
        .split("X-Spam-Report:")
        .nth(1)
        .unwrap_or_else(|| panic!("no X-Spam-Report in {ours}"));
    let mut lines = rest.split("\r\n");
    let first = lines.next().unwrap_or_default();
    let field: String = std::iter::once(first)
        .chain(lines.take_while(|l| l.starts_with('\t')))
        .collect::<Vec<_>>()
        .join("\r\n");
    let whole = format!("X-Spam-Report:{field}");
    assert!(whole.starts_with("X-Spam-Report: score=4.0; "), "{whole}");
    for i in 0..8 {
        assert!(
            whole.contains(&format!("rule:A_RATHER_LONG_RULE_NAME_{i}=0.5")),
            "{whole}"
        );
    }
    assert!(whole.contains("\r\n\t"), "folded: {whole}");
    for line in whole.split("\r\n") {
        assert!(line.len() <= 78, "{} octets: {line:?}", line.len());
    }
}
