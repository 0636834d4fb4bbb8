//! `portcullis stats` on a fixture log with known figures.

use std::io::Write;
use std::process::Command;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/stats.log");

/// A table of a `--json` report as (name, count) pairs, in its order.
fn table(json: &serde_json::Value, key: &str) -> Vec<(String, u64)> {
    json[key]
        .as_array()
        .unwrap_or_else(|| panic!("no {key} in {json}"))
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().into(),
                c["count"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// The rows of a `--json` array as (the `name` key, the `counts` keys in
/// order), each of which must be there.
fn rows(array: &serde_json::Value, name: &str, counts: &[&str]) -> Vec<(String, Vec<u64>)> {
    array
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {array}"))
        .iter()
        .map(|r| {
            (
                r[name].as_str().unwrap().into(),
                counts.iter().map(|k| r[*k].as_u64().unwrap()).collect(),
            )
        })
        .collect()
}

/// `portcullis stats ARGS`, which must succeed; its standard output.
pub(crate) fn stats(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .arg("stats")
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
fn figures_are_exact_and_json_parses_back() {
    let json: serde_json::Value = serde_json::from_str(&stats(&["--json", FIXTURE])).unwrap();
    assert_eq!(json["transactions"], 7);
    assert_eq!(json["refused_connections"], 1);
    let by = |key: &str| -> Vec<(String, u64, f64)> {
        json[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["name"].as_str().unwrap().to_string(),
                    c["count"].as_u64().unwrap(),
                    (c["rate"].as_f64().unwrap() * 100.0).round() / 100.0,
                )
            })
            .collect()
    };
    assert_eq!(
        by("verdicts"),
        vec![
            ("reject".into(), 3, 42.86),
            ("accept".into(), 2, 28.57),
            ("tag".into(), 1, 14.29),
            ("tempfail".into(), 1, 14.29)
        ]
    );
    assert_eq!(
        by("reject_reasons"),
        vec![
            ("dnsbl:zen.spamhaus.org".into(), 1, 14.29),
            ("rule:EXECUTABLE_ATTACHMENT_NAME".into(), 1, 14.29),
            ("spf:fail".into(), 1, 14.29)
        ]
    );
    assert_eq!(
        by("rules"),
        vec![
            ("EXECUTABLE_ATTACHMENT_NAME".into(), 1, 14.29),
            ("SUBJECT_X".into(), 1, 14.29)
        ]
    );
    assert_eq!(
        by("shadow_rules"),
        vec![
            ("HELO_NOT_FQDN".into(), 1, 14.29),
            ("NO_DATE_HEADER".into(), 1, 14.29)
        ]
    );
    assert_eq!(
        by("codes"),
        vec![
            ("250".into(), 3, 42.86),
            ("550".into(), 2, 28.57),
            ("451".into(), 1, 14.29),
            ("554".into(), 1, 14.29)
        ]
    );
    assert_eq!(
        by("dnsbl_zones"),
        vec![("zen.spamhaus.org".into(), 1, 14.29)]
    );
    assert_eq!(
        by("refused_reasons"),
        vec![("limit:connections_per_ip".into(), 1, 100.0)]
    );
    assert_eq!(
        by("top_networks"),
        vec![
            ("203.0.113.0/24".into(), 2, 28.57),
            ("2001:db8:5::/48".into(), 1, 14.29)
        ]
    );
    assert_eq!(
        by("top_sender_domains"),
        vec![("spam.test".into(), 2, 28.57), ("<>".into(), 1, 14.29)]
    );
    let hours = json["hours"].as_array().unwrap();
    assert_eq!(hours.len(), 2);
    assert_eq!(
        (
            hours[0]["hour"].as_str().unwrap(),
            hours[0]["transactions"].as_u64().unwrap(),
            hours[0]["rejected"].as_u64().unwrap(),
            hours[0]["tempfailed"].as_u64().unwrap()
        ),
        ("2026-11-29T08", 4, 2, 1)
    );
    assert_eq!(
        (
            hours[1]["transactions"].as_u64().unwrap(),
            hours[1]["rejected"].as_u64().unwrap()
        ),
        (3, 1)
    );
}

#[test]
fn window_gzip_stdin_and_text_table() {
    let j: serde_json::Value =
        serde_json::from_str(&stats(&["--json", "--since", "2026-11-29T09", FIXTURE])).unwrap();
    assert_eq!(
        (
            j["transactions"].as_u64(),
            j["refused_connections"].as_u64()
        ),
        (Some(3), Some(1))
    );
    let j: serde_json::Value =
        serde_json::from_str(&stats(&["--json", "--until", "2026-11-29T08:25", FIXTURE])).unwrap();
    assert_eq!(j["transactions"], 2);

    // The same log gzipped gives the same report.
    let gz = std::env::temp_dir().join(format!("portcullis-stats-{}.log.gz", std::process::id()));
    let mut enc = flate2::write::GzEncoder::new(
        std::fs::File::create(&gz).unwrap(),
        flate2::Compression::default(),
    );
    enc.write_all(&std::fs::read(FIXTURE).unwrap()).unwrap();
    enc.finish().unwrap();
    assert_eq!(stats(&[gz.to_str().unwrap()]), stats(&[FIXTURE]));

    // Standard input.
    let mut child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .arg("stats")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&std::fs::read(FIXTURE).unwrap())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text, stats(&[FIXTURE]));
    assert!(
        text.starts_with("transactions: 7   refused connections: 1\n"),
        "{text}"
    );
    assert!(
        text.contains("  reject                                          3   42.86%"),
        "{text}"
    );
    assert!(
        text.contains("  2026-11-29T08                 4         2           1       50.00%"),
        "{text}"
    );
}

#[test]
fn html_report_is_self_contained_with_its_chart() {
    let path = std::env::temp_dir().join(format!("portcullis-report-{}.html", std::process::id()));
    stats(&["--html", path.to_str().unwrap(), FIXTURE]);
    let html = std::fs::read_to_string(&path).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>") && html.trim_end().ends_with("</html>"));
    assert!(!html.contains("<script") && !html.contains("http://") && !html.contains("https://"));
    assert!(html.contains("<svg") && html.contains("</svg>"));
    // One stacked segment per (hour, reason) with rejections: 2 at 08, 1 at 09.
    assert_eq!(html.matches("<rect ").count(), 3, "{html}");
    assert!(html.contains("<title>2026-11-29T08 dnsbl:zen.spamhaus.org: 1</title>"));
    // Well formed enough: every opened table is closed.
    assert_eq!(
        html.matches("<table>").count(),
        html.matches("</table>").count()
    );
}

/// Greylisting and rate limits from the log: outcomes, the share of
/// greylisted (network, sender) pairs that came back and passed, and
/// rate-limit hits by name (transactions and refused connections).
#[test]
fn greylisting_and_rate_limits_are_reported() {
    let line = |t: &str, ip: &str, from: &str, verdict: &str, gl: &str, rl: &str| {
        format!(
            r#"{{"timestamp":"2026-11-30T10:{t}Z","event":"transaction","client_ip":"{ip}","mail_from":"{from}","verdict":"{verdict}","code":451,"reason":"","greylist":"{gl}","rate_limit":"{rl}","rules":"","dnsbl":""}}"#
        )
    };
    let log = [
        line("00:00", "192.0.2.1", "a@s.test", "tempfail", "new", ""),
        line("01:00", "192.0.2.9", "a@s.test", "tempfail", "early", ""),
        line("06:00", "192.0.2.7", "a@s.test", "accept", "passed", ""),
        line("00:00", "198.51.100.1", "b@t.test", "tempfail", "new", ""),
        line("07:00", "203.0.113.1", "c@u.test", "accept", "allowed", "per_sender"),
        line("08:00", "203.0.113.1", "c@u.test", "tempfail", "", "per_sender"),
        r#"{"timestamp":"2026-11-30T10:09:00Z","event":"refused","client_ip":"203.0.113.2","code":421,"reason":"rate_limit:per_client"}"#.to_string(),
    ]
    .join("\n");
    let path = std::env::temp_dir().join(format!("portcullis-stats-gl-{}.log", std::process::id()));
    std::fs::write(&path, log + "\n").unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&stats(&["--json", path.to_str().unwrap()])).unwrap();
    let g = &json["greylisting"];
    let outcomes = table(g, "outcomes");
    assert_eq!(
        outcomes,
        [
            ("new".into(), 2),
            ("allowed".into(), 1),
            ("early".into(), 1),
            ("passed".into(), 1)
        ]
    );
    // Two pairs greylisted (192.0.2.0/24 + a@s.test, 198.51.100.0/24 +
    // b@t.test); the first came back and passed.
    assert_eq!(
        (g["greylisted"].as_u64(), g["came_back"].as_u64()),
        (Some(2), Some(1))
    );
    assert_eq!(g["never_retried"], 1);
    assert_eq!(g["came_back_rate"], 50.0);
    let limits = table(&json, "rate_limits");
    assert_eq!(limits, [("per_sender".into(), 2), ("per_client".into(), 1)]);
    let text = stats(&[path.to_str().unwrap()]);
    assert!(
        text.contains(
            "greylisted client/sender pairs: 2, came back and passed: 1 (50.0%), never retried: 1"
        ),
        "{text}"
    );
    let _ = std::fs::remove_file(&path);
}

/// Lines from both front doors are read alike and counted by mode; a line
/// without `mode` (written before it was logged) counts as proxy.
#[test]
fn transactions_are_counted_by_front_door() {
    let line = |mode: &str, verdict: &str| {
        let mode = if mode.is_empty() {
            String::new()
        } else {
            format!(r#""mode":"{mode}","#)
        };
        format!(
            r#"{{"timestamp":"2026-11-30T10:00:00Z","event":"transaction",{mode}"client_ip":"192.0.2.1","mail_from":"a@s.test","verdict":"{verdict}","code":550,"reason":"rule:X","rules":"X","dnsbl":""}}"#
        )
    };
    let log = [
        line("milter", "reject"),
        line("milter", "accept"),
        line("milter", "accept"),
        line("proxy", "reject"),
        line("", "accept"),
    ]
    .join("\n");
    let path =
        std::env::temp_dir().join(format!("portcullis-stats-mode-{}.log", std::process::id()));
    std::fs::write(&path, log + "\n").unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&stats(&["--json", path.to_str().unwrap()])).unwrap();
    assert_eq!(
        table(&json, "modes"),
        [("milter".into(), 3), ("proxy".into(), 2)]
    );
    let text = stats(&[path.to_str().unwrap()]);
    assert!(text.contains("front doors (mode)"), "{text}");
    assert!(text.contains("rule:X"), "{text}");
}

/// Rejection rates per policy and per recipient domain (a transaction
/// counts for each of its recipients' domains), in the text, HTML and JSON
/// reports.
#[test]
fn rejection_rates_by_policy_and_recipient_domain() {
    let line = |policy: &str, domains: &str, verdict: &str| {
        format!(
            r#"{{"timestamp":"2026-11-30T10:00:00Z","event":"transaction","client_ip":"192.0.2.1","mail_from":"a@s.test","verdict":"{verdict}","code":250,"reason":"","policy":"{policy}","rcpt_domains":"{domains}"}}"#
        )
    };
    let log = [
        line("strict", "strict.test", "reject"),
        line("strict", "strict.test", "accept"),
        line("strict", "strict.test", "tempfail"),
        line("", "a.test b.test", "reject"),
        line("", "a.test", "accept"),
    ]
    .join("\n");
    let path = std::env::temp_dir().join(format!(
        "portcullis-stats-policy-{}.log",
        std::process::id()
    ));
    std::fs::write(&path, log + "\n").unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&stats(&["--json", path.to_str().unwrap()])).unwrap();
    let cols = ["transactions", "rejected", "tempfailed"];
    assert_eq!(
        rows(&json["policies"], "name", &cols),
        [
            ("strict".to_string(), vec![3, 1, 1]),
            ("(gate)".to_string(), vec![2, 1, 0])
        ]
    );
    assert_eq!(
        rows(&json["rcpt_domains"], "name", &cols),
        [
            ("strict.test".to_string(), vec![3, 1, 1]),
            ("a.test".to_string(), vec![2, 1, 0]),
            ("b.test".to_string(), vec![1, 1, 0])
        ]
    );
    let text = stats(&[path.to_str().unwrap()]);
    assert!(text.contains("by policy"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.trim_start().starts_with("strict.test") && l.trim_end().ends_with("33.33%")),
        "{text}"
    );
    let page = path.with_extension("html");
    stats(&["--html", page.to_str().unwrap(), path.to_str().unwrap()]);
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(html.contains("<h2>By recipient domain</h2>"), "{html}");
}

/// The fixture as `journalctl -u portcullis -o short` prints it (a syslog
/// prefix on every line, and journald's own lines between): the same
/// figures as the plain file.
#[test]
fn journald_prefixed_lines_give_the_same_figures() {
    let plain: serde_json::Value = serde_json::from_str(&stats(&["--json", FIXTURE])).unwrap();
    let text = std::fs::read_to_string(FIXTURE).unwrap();
    let mut journal = String::from("-- Journal begins at Mon 2026-11-30 00:00:01 UTC. --\n");
    for (i, l) in text.lines().enumerate() {
        journal.push_str(&format!(
            "Nov 30 10:{:02}:00 mx portcullis[812]: {l}\n",
            i % 60
        ));
    }
    journal.push_str("Nov 30 11:00:00 mx systemd[1]: Stopping portcullis.service...\n");
    let path = std::env::temp_dir().join(format!(
        "portcullis-stats-journal-{}.log",
        std::process::id()
    ));
    std::fs::write(&path, journal).unwrap();
    let prefixed: serde_json::Value =
        serde_json::from_str(&stats(&["--json", path.to_str().unwrap()])).unwrap();
    assert_eq!(prefixed, plain);
    assert_eq!(plain["transactions"], 7);
}

/// `--since 24h` counts what is younger than a day, from now.
#[test]
fn since_a_relative_time() {
    let at = |ago: u64| {
        humantime::format_rfc3339_seconds(
            std::time::SystemTime::now() - std::time::Duration::from_secs(ago),
        )
        .to_string()
    };
    let line = |t: String| {
        format!(
            r#"{{"timestamp":"{t}","event":"transaction","client_ip":"192.0.2.1","mail_from":"a@s.test","verdict":"reject","code":550,"reason":"rule:X","rules":"X","dnsbl":""}}"#
        )
    };
    let log = [line(at(3600)), line(at(7200)), line(at(3 * 86_400))].join("\n");
    let path =
        std::env::temp_dir().join(format!("portcullis-stats-since-{}.log", std::process::id()));
    std::fs::write(&path, log + "\n").unwrap();
    let json: serde_json::Value = serde_json::from_str(&stats(&[
        "--json",
        "--since",
        "24h",
        path.to_str().unwrap(),
    ]))
    .unwrap();
    assert_eq!(json["transactions"], 2);
    assert_eq!(json["lines"], 3);
    let json: serde_json::Value = serde_json::from_str(&stats(&[
        "--json",
        "--until",
        "yesterday",
        path.to_str().unwrap(),
    ]))
    .unwrap();
    assert_eq!(json["transactions"], 1);
}

/// Input without a single Portcullis line is an error naming the input,
/// not a report of zeros.
#[test]
fn no_portcullis_lines_is_an_error() {
    let path =
        std::env::temp_dir().join(format!("portcullis-stats-none-{}.log", std::process::id()));
    std::fs::write(
        &path,
        "Nov 30 10:00:00 mx postfix/smtpd[1]: connect from x\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["stats"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no Portcullis log lines in") && err.contains(path.to_str().unwrap()),
        "{err}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["stats", "--since", "last week"])
        .arg(FIXTURE)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a time"));
}

/// Tempfails broken down by reason, and the SPF, DKIM and DMARC outcome
/// tables over the transactions where each ran.
#[test]
fn tempfail_reasons_and_authentication_tables() {
    let line = |verdict: &str, reason: &str, spf: &str, dkim: &str, dmarc: &str| {
        format!(
            r#"{{"timestamp":"2026-11-30T10:00:00Z","event":"transaction","client_ip":"192.0.2.1","mail_from":"a@s.test","verdict":"{verdict}","code":451,"reason":"{reason}","spf":"{spf}","dkim":"{dkim}","dmarc":"{dmarc}","rules":"","dnsbl":""}}"#
        )
    };
    let log = [
        line("tempfail", "greylist:new", "pass", "", ""),
        line("tempfail", "greylist:new", "pass", "", ""),
        line("tempfail", "spf:temperror", "temperror", "", ""),
        line("tempfail", "upstream:unavailable", "", "", ""),
        line("accept", "", "pass", "pass", "pass"),
        line("reject", "dmarc:reject", "fail", "fail", "fail:reject"),
    ]
    .join("\n");
    let path =
        std::env::temp_dir().join(format!("portcullis-stats-auth-{}.log", std::process::id()));
    std::fs::write(&path, log + "\n").unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&stats(&["--json", path.to_str().unwrap()])).unwrap();
    assert_eq!(
        table(&json, "tempfail_reasons"),
        [
            ("greylist:new".into(), 2),
            ("spf:temperror".into(), 1),
            ("upstream:unavailable".into(), 1)
        ]
    );
    assert_eq!(
        table(&json, "spf"),
        [
            ("pass".into(), 3),
            ("fail".into(), 1),
            ("temperror".into(), 1)
        ]
    );
    assert_eq!(
        table(&json, "dkim"),
        [("fail".into(), 1), ("pass".into(), 1)]
    );
    assert_eq!(
        table(&json, "dmarc"),
        [("fail:reject".into(), 1), ("pass".into(), 1)]
    );
    let text = stats(&[path.to_str().unwrap()]);
    for want in [
        "tempfails by reason",
        "SPF results",
        "DKIM results",
        "DMARC results",
    ] {
        assert!(text.contains(want), "{want}: {text}");
    }
}

const WHAT_IF: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/whatif.log");

/// The what-if table: per record-mode check and shadow rule (the log's
/// `would` key), what enforcing it alone would have refused, how much of
/// that was in fact accepted, and whom it would have hit.
#[test]
fn what_if_table_has_exact_figures() {
    let json: serde_json::Value = serde_json::from_str(&stats(&["--json", WHAT_IF])).unwrap();
    let what_if = rows(
        &json["what_if"],
        "name",
        &[
            "fired",
            "would_reject",
            "would_tempfail",
            "otherwise_accepted",
        ],
    );
    assert_eq!(
        what_if,
        [
            ("rule:TRYOUT".into(), vec![3, 3, 0, 2]),
            ("dnsbl:bl.example".into(), vec![2, 1, 1, 1]),
            ("spf:softfail".into(), vec![1, 0, 0, 0]),
        ]
    );
    assert_eq!(
        table(&json["what_if"][0], "top_sender_domains"),
        [("news.test".into(), 2), ("spam.test".into(), 1)]
    );
    assert_eq!(
        table(&json["what_if"][0], "top_networks"),
        [("198.51.100.0/24".into(), 2), ("203.0.113.0/24".into(), 1)]
    );
    let days = rows(
        &json["days"],
        "day",
        &["transactions", "rejected", "tempfailed"],
    );
    assert_eq!(
        days,
        [
            ("2026-11-28".into(), vec![2, 1, 0]),
            ("2026-11-29".into(), vec![4, 0, 1])
        ]
    );

    let text = stats(&[WHAT_IF]);
    for want in [
        "  rule:TRYOUT                                     3        3         0                  2\n",
        "      would hit: news.test 2, spam.test 1; networks 198.51.100.0/24 2, 203.0.113.0/24 1\n",
        "  dnsbl:bl.example                                2        1         1                  1\n",
        "  2026-11-28                    2         1           0       50.00%\n",
    ] {
        assert!(text.contains(want), "{want:?} not in\n{text}");
    }
}

/// The HTML report holds every table of the text report, the per-day
/// rates, and dates on the chart's time axis.
#[test]
fn html_report_has_every_text_table_and_dates() {
    let path = std::env::temp_dir().join(format!("portcullis-whatif-{}.html", std::process::id()));
    for fixture in [FIXTURE, WHAT_IF] {
        stats(&["--html", path.to_str().unwrap(), fixture]);
        let html = std::fs::read_to_string(&path).unwrap().to_lowercase();
        let text = stats(&[fixture]);
        // Every section title of the text report ("verdicts", "per day
        // (UTC)" ...) is a heading of the HTML one.
        for title in text.split("\n\n").skip(1).filter_map(|s| s.lines().next()) {
            let title = title.split(" (").next().unwrap().trim().to_lowercase();
            assert!(
                html.contains(&format!("<h2>{title}")),
                "{title:?} missing from the HTML report of {fixture}"
            );
        }
    }
    let html = std::fs::read_to_string(&path).unwrap();
    // The date under the first bar of each day, then the per-day table.
    assert!(html.contains("font-size=\"8\">2026-11-28</text>"), "{html}");
    assert!(html.contains("font-size=\"8\">2026-11-29</text>"), "{html}");
    assert!(
        html.contains("<tr><td>2026-11-28</td><td>2</td><td>1</td><td>0</td><td>50.00</td></tr>"),
        "{html}"
    );
    assert!(html.contains("<td>rule:TRYOUT</td><td>3</td><td>3</td><td>0</td><td>2</td>"));
}

/// `portcullis trace` on a log the real binary wrote: found by the MTA's
/// queue id, it prints that session's transactions in order (a refusal by
/// a rule, then the relayed message) and nothing of another session.
#[tokio::test]
async fn trace_finds_a_session_by_queue_id_and_prints_it_in_order() {
    use crate::common::{self, Client, FakeMta, Script};
    let mta =
        FakeMta::start(Script::default().reply("dot", "250 2.0.0 Ok: queued as 4TRACE42")).await;
    let dns = common::dns::FakeDns::start(&["test."], vec![]).await;
    let dir = std::env::temp_dir().join(format!("portcullis-trace-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("rules")).unwrap();
    std::fs::write(
        dir.join("rules/r.yaml"),
        "rules:\n  - id: NO_FORBIDDEN\n    description: x\n    when: {subject: {regex: forbidden}}\n    action: reject\n  - id: SCORE_HELLO\n    description: x\n    when: {subject: {regex: hello}}\n    action: {score: 2}\n",
    )
    .unwrap();
    let port = common::free_port();
    let log = dir.join("gate.log");
    let conf = dir.join("p.yaml");
    std::fs::write(
        &conf,
        format!(
            "hostname: gate.test\nlisten: [{{addr: \"127.0.0.1:{port}\"}}]\nupstream: {{addr: \"{}\", client_identity: xclient}}\nlog: {{file: \"{}\"}}\ndns: {{nameservers: [\"{}\"]}}\nrules_dir: {}\n",
            mta.addr,
            log.display(),
            dns.addr,
            dir.join("rules").display()
        ),
    )
    .unwrap();
    let child = common::Killed(
        Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(["run", "--config"])
            .arg(&conf)
            .spawn()
            .unwrap(),
    );
    let gate = common::listening(port).await;
    let mut traced = Client::hello(gate).await;
    let r = traced
        .send_mail(
            "t@one.test",
            &["b@example.test"],
            b"Subject: forbidden\r\n\r\nx\r\n",
        )
        .await;
    assert!(r.starts_with("550"), "{r}");
    // Another session in between (refused: the scripted MTA gives every
    // message the same queue id).
    let mut other = Client::hello(gate).await;
    let r = other
        .send_mail(
            "o@other.test",
            &["b@example.test"],
            b"Subject: forbidden too\r\n\r\nx\r\n",
        )
        .await;
    assert!(r.starts_with("550"), "{r}");
    let r = traced
        .send_mail(
            "t@one.test",
            &["b@example.test"],
            b"Subject: hello\r\n\r\nx\r\n",
        )
        .await;
    assert!(r.starts_with("250 2.0.0 Ok: queued as 4TRACE42"), "{r}");
    traced.cmd("QUIT", "221").await;
    other.cmd("QUIT", "221").await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    drop(child);

    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["trace", "4TRACE42"])
        .arg(&log)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(!text.contains("other.test"), "{text}");
    assert_eq!(text.matches("session ").count(), 1, "{text}");
    let refused = text
        .find("transaction reject at data: 550 5.7.1 (rule:NO_FORBIDDEN)")
        .expect(&text);
    let relayed = text
        .find("transaction accept at data: 250 2.0.0")
        .expect(&text);
    assert!(refused < relayed, "{text}");
    for want in [
        "client 127.0.0.1 (proxy)",
        "    rules matched: NO_FORBIDDEN\n",
        "    fired (effect): rule:NO_FORBIDDEN=reject\n",
        "    fired (effect): rule:SCORE_HELLO=2\n",
        "    score: 2.0\n",
        "    queue id: 4TRACE42\n",
    ] {
        assert!(text.contains(want), "{want:?} not in\n{text}");
    }
    // The same session by its own id gives the same text.
    let session = text
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("session "))
        .and_then(|l| l.split(':').next())
        .unwrap()
        .to_string();
    let by_id = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["trace", &session])
        .arg(&log)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8(by_id.stdout).unwrap(), text);
    // An id the log does not hold is an error, not an empty answer.
    let none = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["trace", "NOSUCHID"])
        .arg(&log)
        .output()
        .unwrap();
    assert!(!none.status.success());
    assert!(String::from_utf8_lossy(&none.stderr).contains("no session or queue id"));
}

/// Our lines as the journal keeps them (no timestamp of ours) read back
/// with `journalctl -o cat`: counted, but they have no time, so a window
/// leaves them out, and stats says so on stderr instead of a silent zero.
#[test]
fn journal_lines_without_a_time_are_counted_and_named() {
    let path = std::env::temp_dir().join(format!("portcullis-cat-{}.log", std::process::id()));
    std::fs::write(
        &path,
        "{\"level\":\"INFO\",\"event\":\"transaction\",\"verdict\":\"reject\",\"reason\":\"spf:fail\",\"mail_from\":\"a@b.test\",\"client_ip\":\"192.0.2.1\"}\n\
         {\"level\":\"INFO\",\"event\":\"transaction\",\"verdict\":\"accept\",\"mail_from\":\"c@d.test\",\"client_ip\":\"192.0.2.2\"}\n",
    )
    .unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .arg("stats")
            .args(args)
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success());
        (
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    };
    let (text, err) = run(&[]);
    assert!(text.starts_with("transactions: 2 "), "{text}");
    assert!(
        text.contains("  (no time)                     2         1"),
        "{text}"
    );
    assert!(err.contains("2 lines carry no time"), "{err}");
    let (text, err) = run(&["--since", "24h"]);
    assert!(text.starts_with("transactions: 0 "), "{text}");
    assert!(err.contains("left out of --since/--until"), "{err}");
}
