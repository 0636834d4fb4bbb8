//! The `portcullis` binary: --version, check, and run with SIGTERM.

use crate::common;

use std::process::Command;
use std::time::{Duration, Instant};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_portcullis"))
}

#[test]
fn version() {
    let out = bin().arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("portcullis {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn check_accepts_the_reference_config_and_the_embedded_default() {
    let out = bin()
        .args(["check", "--config", "portcullis.yaml"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = bin().arg("check").output().unwrap();
    assert!(out.status.success());
}

#[test]
fn check_reports_file_line_column_and_key_path() {
    let dir = std::env::temp_dir().join(format!("portcullis-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("bad.yaml");
    std::fs::write(
        &f,
        "hostname: mx.test\nlisten: [{addr: 127.0.0.1:1}]\nupstream:\n  addr: 127.0.0.1:2\n  client_identity: xclient\nlimits:\n  max_recipents: 5\n",
    )
    .unwrap();
    let out = bin().args(["check", "--config"]).arg(&f).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with(&format!(
            "{}:7:3: limits.max_recipents: unknown field `max_recipents`",
            f.display()
        )),
        "{err}"
    );
    let out = bin()
        .args(["check", "--config", "/nonexistent.yaml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn run_serves_and_stops_on_sigterm() {
    let port = common::free_port();
    let dead = common::free_port();
    let dir = std::env::temp_dir().join(format!("portcullis-run-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("run.yaml");
    std::fs::write(
        &f,
        format!("hostname: gate.test\nlisten: [{{addr: 127.0.0.1:{port}}}]\nupstream: {{addr: 127.0.0.1:{dead}, client_identity: xclient, timeouts: {{connect: 1s}}}}\ntimeouts: {{shutdown: 2s}}\nlog: {{format: logfmt}}\nrules_dir: {}\n{}", common::EMPTY_RULES, common::NO_CHECKS),
    )
    .unwrap();
    let mut child = bin()
        .args(["run", "--config"])
        .arg(&f)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    let mut greeting = String::new();
    while Instant::now() < until {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            use std::io::{Read, Write};
            let mut b = [0u8; 256];
            let n = s.read(&mut b).unwrap_or(0);
            greeting = String::from_utf8_lossy(&b[..n]).into_owned();
            // A transaction while upstream is down: 451, and a logfmt line.
            s.write_all(b"EHLO c.test\r\n").unwrap();
            let _ = s.read(&mut b).unwrap();
            s.write_all(b"MAIL FROM:<a@s.test>\r\n").unwrap();
            let n = s.read(&mut b).unwrap();
            let r = String::from_utf8_lossy(&b[..n]).into_owned();
            assert!(r.starts_with("451 4.4.1"), "{r}");
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Upstream is down, yet it starts and greets (start-up order must not matter).
    assert!(greeting.starts_with("220 gate.test"), "{greeting:?}");
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(Instant::now() < until, "did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut out = String::new();
    use std::io::Read;
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let line = out
        .lines()
        .find(|l| l.contains("event=transaction"))
        .unwrap_or_else(|| panic!("no transaction line in {out}"));
    for kv in [
        "verdict=tempfail",
        "code=451",
        "enhanced=4.4.1",
        "reason=upstream:unavailable",
        "mail_from=a@s.test",
        "helo=c.test",
        "stage=mail",
    ] {
        assert!(line.contains(kv), "{kv} missing in {line}");
    }
}

#[tokio::test]
async fn sighup_reloads_the_certificate() {
    let dir = std::env::temp_dir().join(format!("portcullis-hup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str| {
        let ck = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        std::fs::write(dir.join("cert.pem"), ck.cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), ck.signing_key.serialize_pem()).unwrap();
        ck.cert.der().to_vec()
    };
    let first = write("first.test");
    let port = common::free_port();
    let f = dir.join("hup.yaml");
    std::fs::write(
        &f,
        format!(
            "hostname: gate.test\nlisten: [{{addr: 127.0.0.1:{port}}}]\nupstream: {{addr: 127.0.0.1:9, client_identity: none, timeouts: {{connect: 1s}}}}\ntls: {{cert: {}, key: {}}}\n{}",
            dir.join("cert.pem").display(),
            dir.join("key.pem").display(),
            common::NO_CHECKS
        ),
    )
    .unwrap();
    let mut child = bin()
        .args(["run", "--config"])
        .arg(&f)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let addr = common::listening(port).await;
    assert_eq!(common::server_cert(addr).await, first);
    let second = write("second.test");
    Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    while common::server_cert(addr).await != second {
        assert!(Instant::now() < until, "certificate not reloaded on SIGHUP");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn check_prints_a_rules_summary() {
    let out = bin()
        .args(["check", "--config", "portcullis.yaml"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("rules ok:") && text.contains("shadow: HELO_OUR_NAME"),
        "{text}"
    );
    assert!(text.contains("data     reject"), "{text}");
}

#[test]
fn explain_prints_every_result_and_the_reply() {
    let out = bin()
        .args([
            "explain",
            "--config",
            "portcullis.yaml",
            "--ip",
            "192.0.2.10",
            "--helo",
            "localhost",
        ])
        .args([
            "--from",
            "a@sender.test",
            "--rcpt",
            "b@example.test",
            "--no-dns",
        ])
        .args(["--message", "tests/messages/exe-attachment.eml"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        "client [192.0.2.10] helo localhost from <a@sender.test> to <b@example.test>",
        "rules: HELO_LOCALHOST_FROM_OUTSIDE HELO_NOT_FQDN(shadow)",
        "score 5.0: accept, tagged as spam",
        "RCPT <b@example.test>: accepted by the checks",
        "EXECUTABLE_ATTACHMENT_NAME",
        "Authentication-Results: localhost; none",
        "reply after DATA: 554 5.7.1 Executable attachments are not accepted",
    ] {
        assert!(text.contains(want), "{want:?} missing in:\n{text}");
    }
    // A clean client and message: relayed.
    let dir = std::env::temp_dir().join(format!("portcullis-explain-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let m = dir.join("ok.eml");
    std::fs::write(&m, "From: a@sender.test\r\nDate: Sun, 29 Nov 2026 00:00:00 +0000\r\nSubject: hello\r\n\r\nhi\r\n").unwrap();
    let out = bin()
        .args([
            "explain",
            "--config",
            "portcullis.yaml",
            "--ip",
            "192.0.2.10",
            "--helo",
            "mx.sender.test",
        ])
        .args([
            "--from",
            "a@sender.test",
            "--rcpt",
            "b@example.test",
            "--no-dns",
            "--message",
        ])
        .arg(&m)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("reply after DATA: relayed upstream"),
        "{text}"
    );
    assert!(text.contains("rules: none matched"), "{text}");
}

#[test]
fn log_file_is_reopened_on_sighup_for_logrotate() {
    use std::io::{Read, Write};
    let dir = std::env::temp_dir().join(format!("portcullis-logrotate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("gate.log");
    let port = common::free_port();
    let dead = common::free_port();
    let f = dir.join("gate.yaml");
    std::fs::write(
        &f,
        format!(
            "hostname: gate.test\nlisten: [{{addr: 127.0.0.1:{port}}}]\nupstream: {{addr: 127.0.0.1:{dead}, client_identity: xclient, timeouts: {{connect: 1s}}}}\nlog: {{format: json, file: {}}}\nrules_dir: {}\n{}",
            log.display(),
            common::EMPTY_RULES,
            common::NO_CHECKS
        ),
    )
    .unwrap();
    let mut child = bin().args(["run", "--config"]).arg(&f).spawn().unwrap();
    let transaction = |from: &str| {
        let until = Instant::now() + Duration::from_secs(10);
        let mut s = loop {
            if let Ok(s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                break s;
            }
            assert!(Instant::now() < until, "not listening");
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut b = [0u8; 512];
        let _ = s.read(&mut b).unwrap();
        s.write_all(b"EHLO c.test\r\n").unwrap();
        let _ = s.read(&mut b).unwrap();
        s.write_all(format!("MAIL FROM:<{from}>\r\n").as_bytes())
            .unwrap();
        let _ = s.read(&mut b).unwrap();
        s.write_all(b"QUIT\r\n").unwrap();
        let _ = s.read(&mut b);
    };
    let wait_for = |path: &std::path::Path, needle: &str| {
        let until = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(path)
            .unwrap_or_default()
            .contains(needle)
        {
            assert!(Instant::now() < until, "{needle} not in {}", path.display());
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    transaction("first@x.test");
    wait_for(&log, "first@x.test");
    // logrotate: move the file away, then SIGHUP.
    let rotated = dir.join("gate.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    while !log.exists() {
        assert!(Instant::now() < until, "log file not reopened");
        std::thread::sleep(Duration::from_millis(50));
    }
    transaction("second@x.test");
    wait_for(&log, "second@x.test");
    assert!(
        !std::fs::read_to_string(&log)
            .unwrap()
            .contains("first@x.test")
    );
    assert!(
        !std::fs::read_to_string(&rotated)
            .unwrap()
            .contains("second@x.test")
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// The config fixtures under tests/configs/SUB, with their text, in name
/// order; at least `min` of them.
fn fixtures(sub: &str, min: usize) -> Vec<(std::path::PathBuf, String)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/configs")
        .join(sub);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= min, "{} fixtures in {sub}", files.len());
    files
        .into_iter()
        .map(|f| {
            let text = std::fs::read_to_string(&f).unwrap();
            (f, text)
        })
        .collect()
}

/// A fixture's expectations: its comment lines that start with `mark`.
fn marked<'a>(text: &'a str, mark: &str) -> Vec<&'a str> {
    text.lines().filter_map(|l| l.strip_prefix(mark)).collect()
}

/// `portcullis check` over the shipped broken configurations: each fails
/// with the error its `# expect:` lines name (every one of them, so a file
/// with several problems reports them all in one run).
#[test]
fn check_finds_every_broken_configuration() {
    for (f, text) in fixtures("broken", 15) {
        let expect = marked(&text, "# expect: ");
        assert!(!expect.is_empty(), "{}: no # expect: line", f.display());
        let out = bin()
            .args(["check", "--no-probe", "--config"])
            .arg(&f)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{} passed check", f.display());
        for e in expect {
            assert!(err.contains(e), "{}: {e:?} not in {err}", f.display());
        }
    }
    // Not a file at all.
    let out = bin()
        .args(["check", "--no-probe", "--config", "/dev/zero"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a regular file"));
}

/// `portcullis check` over the configurations that are valid but probably
/// not what was meant (tests/configs/warn): each passes (exit 0) and prints
/// the warnings its `# warn:` lines name, and the report lines its
/// `# report:` lines name. Their upstream, nameserver and Redis are closed
/// ports on loopback, so the probes are part of it.
#[test]
fn check_warns_about_every_questionable_configuration() {
    for (f, text) in fixtures("warn", 5) {
        let warn = marked(&text, "# warn: ");
        assert!(!warn.is_empty(), "{}: no # warn: line", f.display());
        let out = bin()
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["check", "--config"])
            .arg(f.strip_prefix(env!("CARGO_MANIFEST_DIR")).unwrap())
            .output()
            .unwrap();
        let report = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}: {report}{}",
            f.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        for w in warn {
            assert!(
                report
                    .lines()
                    .any(|l| l.starts_with("warning: ") && l.contains(w)),
                "{}: {w:?} not in {report}",
                f.display()
            );
        }
        for r in marked(&text, "# report: ") {
            assert!(report.contains(r), "{}: {r:?} not in {report}", f.display());
        }
    }
}

/// Relative paths are relative to the config file, wherever the gate is
/// started; `check` says which rules directory it loaded.
#[test]
fn relative_paths_are_beside_the_config_file() {
    let dir = std::env::temp_dir().join(format!("portcullis-rel-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("myrules")).unwrap();
    std::fs::write(
        dir.join("myrules/a.yaml"),
        "rules:\n  - id: ONE\n    description: one\n    when: {helo: {exact: [x.test]}}\n    action: {score: 1}\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("gate.yaml"),
        "hostname: gate.test\nlisten: [{addr: \"127.0.0.1:0\"}]\nupstream: {addr: \"127.0.0.1:2\", client_identity: xclient}\nrules_dir: myrules\n",
    )
    .unwrap();
    let text = succeeded(
        bin()
            .current_dir("/")
            .args(["check", "--config"])
            .arg(dir.join("gate.yaml")),
    );
    assert!(
        text.contains(&format!(
            "rules directory: {}",
            dir.join("myrules").display()
        )),
        "{text}"
    );
    assert!(text.contains("1 rule"), "{text}");
    // No rules: a warning, not silence.
    std::fs::write(
        dir.join("empty.yaml"),
        "hostname: gate.test\nlisten: [{addr: \"127.0.0.1:0\"}]\nupstream: {addr: \"127.0.0.1:2\", client_identity: xclient}\nrules_dir: nothing-here\n",
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("nothing-here")).unwrap();
    let out = bin()
        .args(["check", "--config"])
        .arg(dir.join("empty.yaml"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("warning: no rules loaded"));
}

/// `check` times the message rules on a sample message and warns when they
/// are too slow for their budget.
#[test]
fn check_warns_about_slow_message_rules() {
    let dir = std::env::temp_dir().join(format!("portcullis-slow-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("rules")).unwrap();
    // 300 such regexes overflow the regex engine's lazy DFA on prose: an
    // order of magnitude slower than 200 (12 ms against seconds here).
    let mut y = String::from("rules:\n");
    for i in 0..300 {
        y.push_str(&format!(
            "  - id: HEAVY_{i}\n    description: heavy\n    when: {{body: {{regex: '[a-z]{{3}}\\d{{2}}[a-z]+{i}q'}}}}\n    action: {{score: 0.1}}\n"
        ));
    }
    std::fs::write(dir.join("rules/h.yaml"), y).unwrap();
    std::fs::write(
        dir.join("gate.yaml"),
        "hostname: gate.test\nlisten: [{addr: \"127.0.0.1:0\"}]\nupstream: {addr: \"127.0.0.1:2\", client_identity: xclient}\nchecks: {message_rules: {budget: 1s}}\n",
    )
    .unwrap();
    let out = bin()
        .args(["check", "--config"])
        .arg(dir.join("gate.yaml"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("rules: a 100 KB sample message takes"),
        "{text}"
    );
    assert!(
        text.contains("warning: the message rules are slow"),
        "{text}"
    );
}

#[tokio::test]
async fn sighup_logs_by_key_path_what_it_applied_and_what_needs_a_restart() {
    let dir = std::env::temp_dir().join(format!("portcullis-hup-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (port, other) = (common::free_port(), common::free_port());
    let f = dir.join("gate.yaml");
    let log = dir.join("gate.log");
    let v1 = format!(
        "hostname: one.test\nlisten: [{{addr: 127.0.0.1:{port}}}]\nupstream: {{addr: 127.0.0.1:9, client_identity: none, timeouts: {{connect: 1s}}}}\nlog: {{file: gate.log}}\nrules_dir: {}\n{}",
        common::EMPTY_RULES,
        common::NO_CHECKS
    );
    std::fs::write(&f, &v1).unwrap();
    let mut child = bin()
        .args(["run", "--config"])
        .arg(&f)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let addr = common::listening(port).await;
    let v2 = v1
        .replace("one.test", "two.test")
        .replace(&port.to_string(), &other.to_string());
    std::fs::write(&f, v2).unwrap();
    Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    let (applied, restart) = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let find = |what: &str| text.lines().find(|l| l.contains(what)).map(str::to_string);
        if let (Some(a), Some(r)) = (
            find("config reloaded"),
            find("keep their running values until a restart"),
        ) {
            break (a, r);
        }
        assert!(Instant::now() < until, "no reload lines in {text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(applied.contains(r#"\"hostname\""#), "{applied}");
    assert!(
        restart.contains("listen[0].addr") && restart.contains("upstream.helo_name"),
        "{restart}"
    );
    // In force: the new name on the old (still bound) address.
    let mut c = common::Client::connect(addr).await;
    let g = c.reply().await;
    assert!(g.starts_with("220 two.test"), "{g}");
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

/// `portcullis check | head`: a reader that went away ends the process
/// quietly (exit 0, no panic), as Unix tools do.
#[test]
fn a_closed_pipe_on_stdout_is_not_a_panic() {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = bin()
        .args(["check", "--config", "portcullis.yaml"])
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(out.status.code(), Some(0), "{err}");
}

/// Man pages from the command line's own definition: portcullis(8) and one
/// per visible subcommand, each naming itself and its options; the
/// packaging verb itself is not among them.
#[test]
fn man_pages_for_every_subcommand() {
    let dir = fresh_dir("portcullis-man");
    let out = bin().args(["generate", "man"]).arg(&dir).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    // The daemon in section 8, the offline verbs in section 1.
    assert_eq!(
        names,
        [
            "portcullis-check.1",
            "portcullis-explain.1",
            "portcullis-replay.1",
            "portcullis-run.8",
            "portcullis-stats.1",
            "portcullis-trace.1",
            "portcullis.8"
        ]
    );
    let run = std::fs::read_to_string(dir.join("portcullis-run.8")).unwrap();
    assert!(run.contains(".TH portcullis-run 8"), "{run}");
    assert!(run.contains("portcullis\\-run \\- Run the gate"), "{run}");
    assert!(run.contains("\\-\\-config"), "{run}");
    let top = std::fs::read_to_string(dir.join("portcullis.8")).unwrap();
    for (sub, section) in [
        ("run", 8),
        ("check", 1),
        ("stats", 1),
        ("explain", 1),
        ("trace", 1),
    ] {
        assert!(
            top.contains(&format!("portcullis\\-{sub}\\fR({section})")),
            "{sub}: {top}"
        );
    }
    assert!(!top.contains("generate"), "{top}");
    // What an administrator looks up, in the pages that answer it.
    for (page, sections) in [
        (
            "portcullis.8",
            &[
                "FILES",
                "SIGNALS",
                "\"EXIT STATUS\"",
                "ENVIRONMENT",
                "EXAMPLES",
                "\"SEE ALSO\"",
            ][..],
        ),
        (
            "portcullis-run.8",
            &[
                "FILES",
                "SIGNALS",
                "\"EXIT STATUS\"",
                "ENVIRONMENT",
                "EXAMPLES",
                "\"SEE ALSO\"",
            ][..],
        ),
        (
            "portcullis-check.1",
            &[
                "FILES",
                "\"EXIT STATUS\"",
                "ENVIRONMENT",
                "EXAMPLES",
                "\"SEE ALSO\"",
            ][..],
        ),
        (
            "portcullis-stats.1",
            &["\"EXIT STATUS\"", "EXAMPLES", "\"SEE ALSO\""][..],
        ),
        (
            "portcullis-trace.1",
            &["\"EXIT STATUS\"", "EXAMPLES", "\"SEE ALSO\""][..],
        ),
        (
            "portcullis-explain.1",
            &["\"EXIT STATUS\"", "EXAMPLES", "\"SEE ALSO\""][..],
        ),
    ] {
        let text = std::fs::read_to_string(dir.join(page)).unwrap();
        for s in sections {
            assert!(text.contains(&format!("\n.SH {s}\n")), "{page}: no {s}");
        }
        for named in [
            "/usr/share/doc/portcullis/README.md",
            "/usr/share/doc/portcullis/rules.md",
        ] {
            assert!(text.contains(named), "{page} does not name {named}");
        }
    }
    let top = std::fs::read_to_string(dir.join("portcullis.8")).unwrap();
    for named in [
        "/etc/portcullis/portcullis.yaml",
        "/etc/portcullis/rules/",
        "/var/lib/portcullis/state.jsonl",
        "SIGHUP",
        "SIGTERM",
        "PORTCULLIS_CONFIG",
    ] {
        assert!(top.contains(named), "portcullis.8 does not name {named}");
    }
    // Every option has help text: none is listed bare in OPTIONS.
    for page in &names {
        let text = std::fs::read_to_string(dir.join(page)).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for (i, l) in lines.iter().enumerate() {
            if *l == ".TP" && lines.get(i + 1).is_some_and(|o| o.contains("\\-\\-")) {
                let help = lines.get(i + 2).copied().unwrap_or("");
                assert!(
                    !help.is_empty() && !help.starts_with('.'),
                    "{page}: {} has no help text",
                    lines[i + 1]
                );
            }
        }
    }
}

/// Completion scripts for bash, zsh and fish name every subcommand and
/// option; the bash one parses.
#[test]
fn shell_completions() {
    for (shell, marker) in [
        ("bash", "_portcullis()"),
        ("zsh", "#compdef portcullis"),
        ("fish", "complete -c portcullis"),
    ] {
        let out = bin()
            .args(["generate", "completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(text.contains(marker), "{shell}: {text}");
        for word in ["run", "check", "stats", "explain", "--config", "--since"] {
            // fish writes long options as `-l NAME`.
            let word = match (shell, word.strip_prefix("--")) {
                ("fish", Some(long)) => format!("-l {long}"),
                _ => word.to_string(),
            };
            assert!(text.contains(&word), "{shell} lacks {word}");
        }
        if shell == "bash" {
            let path = std::env::temp_dir().join(format!("portcullis-{}.bash", std::process::id()));
            std::fs::write(&path, &text).unwrap();
            let st = Command::new("bash").arg("-n").arg(&path).status().unwrap();
            assert!(st.success(), "bash -n");
        }
    }
}

/// `check` binds nothing unless asked: beside a process holding the
/// listen address it passes; with `--bind` it names that process, which
/// is not Portcullis.
#[test]
fn check_finds_an_address_in_use_only_when_asked() {
    let dir = std::env::temp_dir().join(format!("portcullis-inuse-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let busy = dir.join(format!("p{port}.yaml"));
    std::fs::write(
        &busy,
        format!("hostname: gate.test\nlisten: [{{addr: \"127.0.0.1:{port}\"}}]\nupstream: {{addr: \"127.0.0.1:25\"}}\n"),
    )
    .unwrap();
    let out = bin()
        .args(["check", "--no-probe", "--config"])
        .arg(&busy)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let out = bin()
        .args(["check", "--no-probe", "--bind", "--config"])
        .arg(&busy)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let me = std::fs::read_to_string("/proc/self/comm").unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "listen[0].addr: 127.0.0.1:{port} is in use by {}, not Portcullis",
            me.trim()
        )),
        "{err}"
    );
}

/// The README's `portcullis check && systemctl reload portcullis`: `check`
/// of the running gate's own config passes while the gate holds every
/// address it names (SMTP, milter, metrics), with and without `--bind`.
#[tokio::test(flavor = "multi_thread")]
async fn check_passes_beside_the_running_gate() {
    let mta = common::FakeMta::start(common::Script::default()).await;
    let dir = std::env::temp_dir().join(format!("portcullis-beside-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (port, milter, metrics) = (
        common::free_port(),
        common::free_port(),
        common::free_port(),
    );
    let f = dir.join("gate.yaml");
    std::fs::write(
        &f,
        format!("hostname: gate.test\nlisten: [{{addr: \"127.0.0.1:{port}\"}}]\nupstream: {{addr: \"{}\", client_identity: xclient}}\nmilter: {{listen: [\"127.0.0.1:{milter}\"]}}\nmetrics: {{listen: \"127.0.0.1:{metrics}\"}}\nrules_dir: {}\n{}", mta.addr, common::EMPTY_RULES, common::NO_CHECKS),
    )
    .unwrap();
    let _gate = common::Killed(
        bin()
            .args(["run", "--config"])
            .arg(&f)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    common::listening(port).await;
    common::listening(milter).await;
    common::listening(metrics).await;
    for extra in [&[][..], &["--bind"][..]] {
        let out = bin()
            .arg("check")
            .args(extra)
            .arg("--config")
            .arg(&f)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{extra:?}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("config ok: 1 listener(s)"), "{text}");
        assert!(
            text.contains(&format!("upstream {} answers", mta.addr)),
            "{text}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `check` warns when the configured limits cannot fit in the descriptors
/// the process may open (here a hard limit of 1,024 against the defaults'
/// 1,000 SMTP sessions at two each), names what to change, and still
/// passes; with room, no warning.
#[test]
fn check_warns_when_the_limits_cannot_fit_in_the_descriptors() {
    let check = |nofile: &str| {
        let out = Command::new("prlimit")
            .arg(format!("--nofile={nofile}"))
            .arg("--")
            .arg(env!("CARGO_BIN_EXE_portcullis"))
            .args(["check", "--config", "portcullis.yaml"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let low = check("1024");
    // And each connection thread (one per two CPUs) its runtime's two
    // descriptors and a socket on the one listener.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().div_ceil(2));
    let total = 2067 + 3 * threads;
    assert!(
        low.contains(&format!("warning: descriptors (hard limit of this shell): the configured limits can hold {total} descriptors")),
        "{low}"
    );
    assert!(
        low.contains("SMTP 2000") && low.contains("LimitNOFILE"),
        "{low}"
    );
    let roomy = check("4096");
    assert!(!roomy.contains("descriptors"), "{roomy}");
}

/// A `dnsbl` section without `mode` whose zone says `action: reject` is in
/// record mode, and every place an administrator looks says so: `check`
/// (the mode, and a warning naming the zone), the start-up log (a
/// `check mode` line), and `explain` for a listed client ("record mode:
/// would reject"), while the client's reply is not a refusal.
#[tokio::test(flavor = "multi_thread")]
async fn a_dnsbl_without_mode_is_shown_as_record_mode_everywhere() {
    let dns = common::dns::bl_test().await;
    let mta = common::FakeMta::start(common::Script::default()).await;
    let dir = std::env::temp_dir().join(format!("portcullis-recmode-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("rules")).unwrap();
    let port = common::free_port();
    let log = dir.join("gate.log");
    let f = dir.join("gate.yaml");
    std::fs::write(
        &f,
        format!(
            "hostname: gate.test\nlisten: [{{addr: \"127.0.0.1:{port}\"}}]\nupstream: {{addr: \"{}\", client_identity: xclient}}\ndns: {{nameservers: [\"{}\"]}}\nlog: {{file: \"{}\"}}\nchecks:\n  spf: {{mode: off}}\n  dkim: {{mode: off}}\n  dmarc: {{mode: off}}\n  arc: {{mode: off}}\n  iprev: {{mode: off}}\n  dnsbl:\n    zones:\n      - zone: bl.test\n        action: reject\n",
            mta.addr,
            dns.addr,
            log.display()
        ),
    )
    .unwrap();
    let out = bin().args(["check", "--config"]).arg(&f).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(
            "dnsbl                  record   actions are logged (would=...), not applied"
        ),
        "{text}"
    );
    assert!(
        text.contains("warning: checks.dnsbl: record mode (the default when mode is not set): bl.test's action reject is logged as would=reject, not applied"),
        "{text}"
    );

    let gate_proc = common::Killed(bin().args(["run", "--config"]).arg(&f).spawn().unwrap());
    let gate = common::listening(port).await;
    let mut c = common::Client::connect_from(gate, "127.0.0.3").await;
    c.reply().await;
    c.cmd("EHLO listed.test", "250").await;
    c.cmd("MAIL FROM:<a@sender.test>", "250").await;
    c.cmd("RCPT TO:<b@example.test>", "250").await;
    c.cmd("QUIT", "221").await;
    let until = Instant::now() + Duration::from_secs(10);
    let mut lines = String::new();
    while !lines.contains("would=\"dnsbl:bl.test=reject\"")
        && !lines.contains("would=dnsbl:bl.test=reject")
        && !lines.contains("\"would\":\"dnsbl:bl.test=reject\"")
    {
        assert!(Instant::now() < until, "{lines}");
        std::thread::sleep(Duration::from_millis(50));
        lines = std::fs::read_to_string(&log).unwrap_or_default();
    }
    let mode_line = lines
        .lines()
        .find(|l| l.contains("check mode") && l.contains("\"check\":\"dnsbl\""))
        .unwrap_or_else(|| panic!("no check mode line for dnsbl: {lines}"));
    assert!(mode_line.contains("\"mode\":\"record\""), "{mode_line}");
    assert!(mode_line.contains("not applied"), "{mode_line}");
    drop(gate_proc);

    let text = succeeded(bin().args(["explain", "--config"]).arg(&f).args([
        "--ip",
        "127.0.0.3",
        "--helo",
        "listed.test",
        "--from",
        "a@sender.test",
        "--rcpt",
        "b@example.test",
    ]));
    assert!(
        text.contains(
            "record mode: would reject (dnsbl:bl.test); logged as would=reject, not applied"
        ),
        "{text}"
    );
    assert!(text.contains("accepted by the checks"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A milter-only gate has no upstream anywhere: no error line about one,
/// no `portcullis_upstream_up` series, no Upstream on the status page, no
/// upstream readiness probe.
#[tokio::test(flavor = "multi_thread")]
async fn a_milter_only_gate_reports_no_upstream() {
    let dir = fresh_dir("portcullis-milteronly");
    let (milter, metrics) = (common::free_port(), common::free_port());
    let log = dir.join("gate.log");
    let f = dir.join("gate.yaml");
    std::fs::write(
        &f,
        format!(
            "hostname: gate.test\nlisten: []\nmilter: {{listen: [\"127.0.0.1:{milter}\"]}}\nmetrics: {{listen: \"127.0.0.1:{metrics}\"}}\nlog: {{file: \"{}\"}}\nrules_dir: {}\n{}",
            log.display(),
            common::EMPTY_RULES,
            common::NO_CHECKS
        ),
    )
    .unwrap();
    let _gate = common::Killed(bin().args(["run", "--config"]).arg(&f).spawn().unwrap());
    common::listening(milter).await;
    let m = common::listening(metrics).await;
    // The start-up is logged through to the end (the last line is
    // `listening`), so an upstream error would be there by now.
    let until = Instant::now() + Duration::from_secs(10);
    let mut lines = String::new();
    while !lines.contains("check mode") {
        assert!(Instant::now() < until, "{lines}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        lines = std::fs::read_to_string(&log).unwrap_or_default();
    }
    let scrape = common::http_get(m, "/metrics").await;
    let status = common::http_get(m, "/").await;
    let ready = common::http_get(m, "/readyz").await;
    // Long enough for a background probe to have run and failed.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let lines = std::fs::read_to_string(&log).unwrap();
    assert!(!lines.to_lowercase().contains("upstream"), "{lines}");
    assert!(!lines.contains("\"level\":\"ERROR\""), "{lines}");
    assert!(scrape.contains("portcullis_"), "{scrape}");
    assert!(!scrape.contains("portcullis_upstream_up"), "{scrape}");
    assert!(
        !status.contains("Upstream") && status.contains("<h2>Checks</h2>"),
        "{status}"
    );
    assert!(
        ready.contains("ready\n") && !ready.contains("upstream"),
        "{ready}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// What `check` refuses, `run` refuses too, before binding anything: a log
/// filter that would write nothing of ours (`verbose`, a target of another
/// crate), and a bytes rate limit whose burst no large message can pass.
#[test]
fn run_refuses_silent_log_filters_and_impossible_bursts() {
    let dir = std::env::temp_dir().join(format!("portcullis-runrefuse-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = common::free_port();
    for (extra, want) in [
        (
            "log: {level: verbose}\n",
            "log.level: \"verbose\" enables nothing Portcullis logs",
        ),
        (
            "log: {level: tokio=trace}\n",
            "log.level: \"tokio=trace\" enables nothing Portcullis logs",
        ),
        (
            "checks:\n  rate_limits:\n    - {name: volume, key: sender, rate: 1/1h, count: bytes}\n",
            "checks.rate_limits[0].rate: a burst of 1 bytes",
        ),
    ] {
        let f = dir.join("gate.yaml");
        std::fs::write(
            &f,
            format!("hostname: gate.test\nlisten: [{{addr: \"127.0.0.1:{port}\"}}]\nupstream: {{addr: \"127.0.0.1:1\", client_identity: xclient}}\n{extra}"),
        )
        .unwrap();
        let out = bin().args(["run", "--config"]).arg(&f).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{extra}: {err}");
        assert!(err.contains(want), "{extra}: {err}");
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A Redis state store that does not answer (a closed port) is an error at
/// start, not a warning per greylisted message later: an ERROR line and
/// `portcullis_state_up{backend="redis"} 0`, while the gate runs.
#[tokio::test(flavor = "multi_thread")]
async fn a_silent_state_store_is_an_error_at_start() {
    let dir = fresh_dir("portcullis-statedown");
    let mta = common::FakeMta::start(common::Script::default()).await;
    let (port, metrics, closed) = (
        common::free_port(),
        common::free_port(),
        common::free_port(),
    );
    let log = dir.join("gate.log");
    let f = dir.join("gate.yaml");
    std::fs::write(
        &f,
        format!(
            "hostname: gate.test\nlisten: [{{addr: \"127.0.0.1:{port}\"}}]\nupstream: {{addr: \"{}\", client_identity: xclient}}\nstate: {{backend: redis, url: \"redis://127.0.0.1:{closed}\"}}\nmetrics: {{listen: \"127.0.0.1:{metrics}\"}}\nlog: {{file: \"{}\"}}\nrules_dir: {}\n{}",
            mta.addr,
            log.display(),
            common::EMPTY_RULES,
            common::NO_CHECKS
        ),
    )
    .unwrap();
    let _gate = common::Killed(bin().args(["run", "--config"]).arg(&f).spawn().unwrap());
    let m = common::listening(metrics).await;
    let until = Instant::now() + Duration::from_secs(15);
    let mut lines = String::new();
    while !lines.contains("state store does not answer") {
        assert!(Instant::now() < until, "{lines}");
        tokio::time::sleep(Duration::from_millis(100)).await;
        lines = std::fs::read_to_string(&log).unwrap_or_default();
    }
    let line = lines
        .lines()
        .find(|l| l.contains("state store does not answer"))
        .unwrap();
    assert!(line.contains("\"level\":\"ERROR\""), "{line}");
    let scrape = common::http_get(m, "/metrics").await;
    assert!(
        scrape.contains("portcullis_state_up{backend=\"redis\"} 0"),
        "{scrape}"
    );
    // It still serves.
    common::listening(port).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// `upstream.tls: starttls` towards an MTA that does not offer STARTTLS:
/// `check` warns (every MAIL would get 451 4.4.1), and still passes.
#[tokio::test(flavor = "multi_thread")]
async fn check_warns_when_upstream_does_not_offer_starttls() {
    let mta = common::FakeMta::start(common::Script::default()).await;
    let dir = std::env::temp_dir().join(format!("portcullis-nostarttls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("gate.yaml");
    std::fs::write(
        &f,
        format!(
            "hostname: gate.test\nlisten: [{{addr: \"127.0.0.1:0\"}}]\nupstream: {{addr: \"{}\", client_identity: xclient, tls: starttls}}\ndns: {{nameservers: [\"127.0.0.1:1\"], timeout: 1s}}\nrules_dir: {}\n",
            mta.addr,
            common::EMPTY_RULES
        ),
    )
    .unwrap();
    let out = bin().args(["check", "--config"]).arg(&f).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let warning = text
        .lines()
        .find(|l| {
            l.starts_with(&format!(
                "warning: upstream.tls: starttls, but upstream {} does not take STARTTLS",
                mta.addr
            ))
        })
        .unwrap_or_else(|| panic!("{text}"));
    assert!(warning.contains("451 4.4.1"), "{warning}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The README's log-line table names every key the transaction line can
/// carry (`telemetry::key`), and its metrics table every metric the code
/// emits: a new key or metric without its row fails here.
#[test]
fn the_readme_documents_every_log_key_and_metric() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let section = |from: &str, to: &str| {
        let a = readme.find(from).unwrap_or_else(|| panic!("no {from}"));
        let b = a + readme[a..].find(to).unwrap_or_else(|| panic!("no {to}"));
        readme[a..b].to_string()
    };
    let log_table = section("## The log line", "## Greylisting");
    let txlog = std::fs::read_to_string(root.join("src/telemetry/txlog.rs")).unwrap();
    let keys = &txlog[txlog.find("pub mod key").unwrap()..];
    let keys = &keys[..keys.find("\n}").unwrap()];
    let mut n = 0;
    for l in keys.lines() {
        if let Some(name) = l.split('"').nth(1) {
            n += 1;
            assert!(
                log_table.contains(&format!("`{name}`")),
                "log key {name} not in the README's table"
            );
        }
    }
    assert!(n >= 30, "{n} keys");
    let metrics_table = section("| metric | labels | meaning |", "\n\n");
    let mut seen = std::collections::BTreeSet::new();
    for f in walk(&root.join("src")) {
        let text = std::fs::read_to_string(&f).unwrap();
        for (at, _) in text.match_indices("\"portcullis_") {
            let name: String = text[at + 1..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            seen.insert(name);
        }
    }
    assert!(seen.len() >= 25, "{seen:?}");
    for m in &seen {
        assert!(
            metrics_table.contains(&format!("`{m}`")),
            "metric {m} not in the README's table"
        );
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out
}

/// An empty directory of its own for one test.
fn fresh_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs a command that must succeed; its standard output.
fn succeeded(c: &mut Command) -> String {
    let out = c.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}
