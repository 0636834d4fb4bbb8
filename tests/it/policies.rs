//! Policies per recipient domain through real sessions (proxy and
//! milter): two domains with different thresholds in one transaction
//! (452 4.5.3 for the second, which then comes in its own transaction and
//! is judged by its own policy), a domain's allow list skipping a rule but
//! not the size limit, block lists at RCPT (policy file and the gate's),
//! a policy's own rule files and greylisting switched off, and a policy
//! file changed on disk taking effect without a restart.

use crate::common::{self, Client, FakeMta, Gate, Script};
use common::milter::{Mta, POSTFIX_STEPS};
use portcullis::config::{Config, MilterListen, Mode};
use portcullis::wire::milter::Response;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Scores 6 (gate: reject 15, tag 5), or refuses outright.
const RULES: &str = r#"rules:
  - {id: PRIZE, description: d, stage: data, when: {subject: {regex: prize}}, action: {score: 6}}
  - {id: BAD_HELO, description: d, when: {helo: {exact: [bad.test]}}, action: reject}
"#;
const STRICT_RULES: &str = r#"rules:
  - {id: WORD_FREE, description: d, stage: data, when: {subject: {regex: free}}, action: reject}
"#;

/// A rules directory with the rules above and these policy files.
fn rules_dir(name: &str, policies: &[(&str, &str)]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("portcullis-pol-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    std::fs::create_dir_all(dir.join("lists")).unwrap();
    std::fs::write(dir.join("10-base.yaml"), RULES).unwrap();
    std::fs::write(dir.join("20-strict.yaml"), STRICT_RULES).unwrap();
    for (f, text) in policies {
        std::fs::write(dir.join("policies").join(f), text).unwrap();
    }
    dir
}

fn config(mta: &FakeMta, dir: &Path) -> Config {
    let mut cfg = common::config::test_config(mta.addr);
    cfg.limits.max_connections_per_ip = 100;
    cfg.rules_dir = Some(dir.to_path_buf());
    cfg.milter.listen = vec![MilterListen::Tcp("127.0.0.1:0".parse().unwrap())];
    cfg
}

const STRICT: &str = "domains: [strict.test]\nthresholds: {reject: 5}\n";

fn prize() -> Vec<u8> {
    b"Subject: you won a prize\r\nMessage-ID: <p@sender.test>\r\n\r\nhello\r\n".to_vec()
}

/// Two domains with different thresholds in one transaction: whichever
/// comes first decides the transaction's policy, the other gets 452 4.5.3
/// and nothing of it reaches upstream; in its own transaction each is
/// judged by its own policy (strict refuses the score of 6, the gate tags
/// it). Upstream stores the lenient recipient's message once.
#[tokio::test(flavor = "multi_thread")]
async fn recipients_of_two_policies_are_split_and_each_judged_by_its_own() {
    let dir = rules_dir("split", &[("strict.yaml", STRICT)]);
    let mta = FakeMta::start(Script::default()).await;
    let g = Gate::start_config(config(&mta, &dir)).await;

    // strict first: the lenient recipient is deferred.
    let mut c = Client::hello(g.addr).await;
    c.cmd("MAIL FROM:<a@sender.test>", "250").await;
    c.cmd("RCPT TO:<x@strict.test>", "250").await;
    let r = c.cmd("RCPT TO:<y@lenient.test>", "452").await;
    assert!(r.starts_with("452 4.5.3 "), "{r}");
    c.cmd("RCPT TO:<z@strict.test>", "250").await;
    c.cmd("DATA", "354").await;
    c.send(&prize()).await;
    let r = c.cmd(".", "550").await;
    assert!(r.contains("5.7.1"), "{r}");
    // The deferred recipient, in its own transaction: the gate's policy.
    let r = c
        .send_mail("a@sender.test", &["y@lenient.test"], &prize())
        .await;
    assert!(r.starts_with("250"), "{r}");
    // lenient first: strict is deferred, then refused on its own.
    c.cmd("MAIL FROM:<a@sender.test>", "250").await;
    c.cmd("RCPT TO:<w@lenient.test>", "250").await;
    c.cmd("RCPT TO:<x@strict.test>", "452").await;
    c.cmd("DATA", "354").await;
    c.send(&prize()).await;
    c.cmd(".", "250").await;
    c.cmd("QUIT", "221").await;

    let stored = mta.stored();
    let rcpts: Vec<Vec<String>> = stored.iter().map(|s| s.rcpts.clone()).collect();
    assert_eq!(
        rcpts,
        [
            vec!["<y@lenient.test>".to_string()],
            vec!["<w@lenient.test>".to_string()]
        ],
        "only the lenient recipients, once each"
    );
    for s in &stored {
        let text = String::from_utf8_lossy(&s.data);
        assert!(text.contains("X-Spam-Flag: YES"), "{text}");
    }
    // A deferred recipient reached upstream only in its own transaction
    // (on the session's connection: a probe's may interleave).
    let cmds = mta.connection_with("XCLIENT");
    for deferred in ["RCPT TO:<y@lenient.test>", "RCPT TO:<x@strict.test>"] {
        let at: Vec<usize> = (0..cmds.len()).filter(|i| cmds[*i] == deferred).collect();
        assert_eq!(at.len(), 1, "{deferred} once: {cmds:?}");
        assert!(
            cmds[at[0] - 1].starts_with("MAIL FROM"),
            "{deferred} first of its transaction: {cmds:?}"
        );
    }
}

/// The same through the milter: the deferred recipient gets 452 4.5.3 and
/// the strict one's message is refused at the end of DATA.
#[tokio::test(flavor = "multi_thread")]
async fn the_milter_splits_and_judges_by_policy_too() {
    let dir = rules_dir("split-milter", &[("strict.yaml", STRICT)]);
    let mta = FakeMta::start(Script::default()).await;
    let g = Gate::start_config(config(&mta, &dir)).await;
    let milter = g.milter.expect("milter listener");
    let mut m = Mta::connect(milter, POSTFIX_STEPS).await;
    m.connect_from("192.0.2.9", "sender.test").await;
    m.helo("sender.test").await;
    m.mail("a@sender.test").await;
    assert!(matches!(m.rcpt("x@strict.test").await, Response::Continue));
    match m.rcpt("y@lenient.test").await {
        Response::ReplyCode(t) => {
            let t = String::from_utf8_lossy(&t).into_owned();
            assert!(t.starts_with("452 4.5.3 "), "{t}");
        }
        other => panic!("{other:?}"),
    }
    let prize = String::from_utf8(prize()).unwrap();
    let end = m.message(&prize).await;
    assert!(
        end.iter()
            .any(|r| matches!(r, Response::ReplyCode(t) if t.starts_with(b"550"))),
        "{end:?}"
    );
    // The lenient one alone: accepted (tagged).
    let mut m = Mta::connect(milter, POSTFIX_STEPS).await;
    m.connect_from("192.0.2.9", "sender.test").await;
    m.helo("sender.test").await;
    m.mail("a@sender.test").await;
    assert!(matches!(m.rcpt("y@lenient.test").await, Response::Continue));
    let end = m.message(&prize).await;
    assert!(
        !end.iter().any(|r| matches!(r, Response::ReplyCode(_))),
        "{end:?}"
    );
}

/// A domain's allow list: its sender skips the rules (BAD_HELO would
/// refuse at RCPT) but not the size limit nor the virus scan; another
/// domain's recipient of the same transaction is deferred (its verdict
/// would differ).
#[tokio::test(flavor = "multi_thread")]
async fn an_allow_list_skips_the_checks_but_not_the_limits() {
    let dir = rules_dir(
        "allow",
        &[(
            "partner.yaml",
            "domains: [partner.test]\nallow: {files: [lists/partner-allow.txt]}\n",
        )],
    );
    std::fs::write(
        dir.join("lists/partner-allow.txt"),
        "# our partner's list server\nfriend.test\n",
    )
    .unwrap();
    let mta = FakeMta::start(Script::default()).await;
    let clamd = common::clamd::FakeClamd::start(b"TEST-VIRUS-MARK", "Test.Virus").await;
    let mut cfg = config(&mta, &dir);
    cfg.limits.max_message_size = common::config::kib(4);
    cfg.checks.antivirus.mode = Mode::Enforce;
    cfg.checks.antivirus.clamd = portcullis::config::Endpoint::Tcp(clamd.addr);
    let g = Gate::start_config(cfg).await;
    let mut c = Client::connect(g.addr).await;
    c.reply().await;
    c.cmd("EHLO bad.test", "250").await;
    // Not allow-listed: BAD_HELO refuses.
    c.cmd("MAIL FROM:<a@other.test>", "250").await;
    c.cmd("RCPT TO:<b@partner.test>", "550").await;
    c.cmd("RSET", "250").await;
    // Allow-listed for partner.test only.
    c.cmd("MAIL FROM:<news@lists.friend.test>", "250").await;
    c.cmd("RCPT TO:<b@partner.test>", "250").await;
    c.cmd("RCPT TO:<c@elsewhere.test>", "452").await;
    c.cmd("DATA", "354").await;
    c.send(b"Subject: hi\r\n\r\nhello\r\n").await;
    c.cmd(".", "250").await;
    // The size limit still holds for it.
    c.cmd("MAIL FROM:<news@lists.friend.test> SIZE=999999", "552")
        .await;
    c.cmd("MAIL FROM:<news@lists.friend.test>", "250").await;
    c.cmd("RCPT TO:<b@partner.test>", "250").await;
    c.cmd("DATA", "354").await;
    let big = format!("Subject: big\r\n\r\n{}\r\n", "x".repeat(8 * 1024));
    c.send(big.as_bytes()).await;
    c.cmd(".", "552").await;
    // And the virus scan.
    c.cmd("MAIL FROM:<news@lists.friend.test>", "250").await;
    c.cmd("RCPT TO:<b@partner.test>", "250").await;
    c.cmd("DATA", "354").await;
    c.send(b"Subject: invoice\r\n\r\nTEST-VIRUS-MARK\r\n").await;
    let r = c.cmd(".", "554").await;
    assert!(r.contains("Test.Virus"), "{r}");
    c.cmd("QUIT", "221").await;
    assert_eq!(mta.stored().len(), 1);
    assert_eq!(mta.stored()[0].rcpts, ["<b@partner.test>"]);
    assert_eq!(clamd.scanned(), 2, "the clean and the infected message");
    // The log line names the entry and where it came from.
    let mut cfg = config(&mta, &dir);
    cfg.checks.antivirus.mode = Mode::Off;
    let x = portcullis::cli::explain::run(
        cfg,
        &portcullis::cli::explain::Sample {
            ip: "192.0.2.1".parse().unwrap(),
            helo: "bad.test".into(),
            from: "news@lists.friend.test".into(),
            rcpts: vec!["b@partner.test".into()],
            message: Some(b"Subject: hi\r\n\r\nhi\r\n".to_vec()),
            tls: false,
            no_dns: true,
        },
    )
    .await
    .unwrap();
    assert_eq!(x.log.list, "allow:friend.test(lists/partner-allow.txt:2)");
    assert_eq!(x.log.policy, "partner");
}

/// Block lists refuse at RCPT with 550 5.7.1, for the policy's
/// recipients only (file entries) or every recipient (`checks.block`),
/// and nothing of a blocked recipient reaches upstream.
#[tokio::test(flavor = "multi_thread")]
async fn block_lists_refuse_at_rcpt() {
    let dir = rules_dir(
        "block",
        &[(
            "shop.yaml",
            "domains: [shop.test]\nblock: {senders: [spam.test], clients: [127.0.0.32/27]}\n",
        )],
    );
    let mta = FakeMta::start(Script::default()).await;
    let mut cfg = config(&mta, &dir);
    cfg.checks.block.senders = vec!["bad@evil.test".into()];
    cfg.checks.block.clients = vec!["127.0.0.64/26".parse().unwrap()];
    let g = Gate::start_config(cfg).await;
    let mut c = Client::hello(g.addr).await;
    c.cmd("MAIL FROM:<x@mail.spam.test>", "250").await;
    let r = c.cmd("RCPT TO:<b@shop.test>", "550").await;
    assert!(r.starts_with("550 5.7.1 "), "{r}");
    c.cmd("RCPT TO:<b@other.test>", "250").await;
    c.cmd("RSET", "250").await;
    c.cmd("MAIL FROM:<bad@evil.test>", "250").await;
    c.cmd("RCPT TO:<b@other.test>", "550").await;
    c.cmd("RCPT TO:<b@shop.test>", "550").await;
    c.cmd("QUIT", "221").await;
    // By client network: the policy's, then the gate's.
    for (from, other) in [("127.0.0.33", "250"), ("127.0.0.77", "550")] {
        let mut c = Client::connect_from(g.addr, from).await;
        c.reply().await;
        c.cmd("EHLO sender.test", "250").await;
        c.cmd("MAIL FROM:<a@fine.test>", "250").await;
        c.cmd("RCPT TO:<b@shop.test>", "550").await;
        c.cmd("RCPT TO:<b@other.test>", other).await;
        c.cmd("QUIT", "221").await;
    }
    // MAIL goes up (the lists are per recipient); no blocked RCPT does.
    let cmds = mta.commands();
    let rcpts: Vec<&String> = cmds.iter().filter(|c| c.starts_with("RCPT")).collect();
    assert_eq!(
        rcpts,
        ["RCPT TO:<b@other.test>", "RCPT TO:<b@other.test>"],
        "{cmds:?}"
    );
}

/// A policy's own rule files and check modes: strict.test applies only
/// 20-strict.yaml (so BAD_HELO of 10-base.yaml does not refuse its
/// recipients, and WORD_FREE does), and greylisting is off for it while
/// the gate greylists everyone else.
#[tokio::test(flavor = "multi_thread")]
async fn a_policy_applies_its_own_rules_and_check_modes() {
    let dir = rules_dir(
        "own-rules",
        &[(
            "strict.yaml",
            "domains: [strict.test]\nrules: [20-strict.yaml]\nchecks: {greylist: {mode: off}}\n",
        )],
    );
    let mta = FakeMta::start(Script::default()).await;
    let mut cfg = config(&mta, &dir);
    cfg.checks.greylist.mode = Mode::Enforce;
    let g = Gate::start_config(cfg).await;
    let mut c = Client::connect(g.addr).await;
    c.reply().await;
    c.cmd("EHLO bad.test", "250").await;
    c.cmd("MAIL FROM:<a@sender.test>", "250").await;
    // The gate: BAD_HELO refuses (before greylisting could defer).
    c.cmd("RCPT TO:<b@other.test>", "550").await;
    c.cmd("RCPT TO:<b@strict.test>", "250").await;
    c.cmd("DATA", "354").await;
    c.send(b"Subject: free stuff\r\n\r\nhello\r\n").await;
    c.cmd(".", "550").await;
    c.cmd("MAIL FROM:<a@sender.test>", "250").await;
    c.cmd("RCPT TO:<b@strict.test>", "250").await;
    c.cmd("DATA", "354").await;
    c.send(b"Subject: hello\r\n\r\nhello\r\n").await;
    c.cmd(".", "250").await;
    c.cmd("QUIT", "221").await;
    let mut c = Client::hello(g.addr).await;
    c.cmd("MAIL FROM:<a@sender.test>", "250").await;
    let r = c.cmd("RCPT TO:<b@other.test>", "451").await;
    assert!(r.contains("4.7.1"), "greylisted: {r}");
    c.cmd("QUIT", "221").await;
    assert_eq!(mta.stored().len(), 1);
}

/// A policy file written while the gate runs takes effect without a
/// restart (the rules directory is watched); a broken one is refused and
/// the policies in force stay.
#[tokio::test(flavor = "multi_thread")]
async fn policies_reload_with_the_rules() {
    let dir = rules_dir("reload", &[]);
    let mta = FakeMta::start(Script::default()).await;
    let g = common::start_server_config(config(&mta, &dir)).await;
    assert!(g.rules.watch(Duration::from_millis(200)));
    let verdict = |g: std::net::SocketAddr| async move {
        let mut c = Client::hello(g).await;
        let r = c
            .send_mail("a@sender.test", &["x@strict.test"], &prize())
            .await;
        c.cmd("QUIT", "221").await;
        r[..3].to_string()
    };
    assert_eq!(verdict(g.addr).await, "250");
    std::fs::write(dir.join("policies/strict.yaml"), STRICT).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while verdict(g.addr).await != "550" {
        assert!(std::time::Instant::now() < deadline, "policy not reloaded");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Broken: the one in force stays.
    std::fs::write(
        dir.join("policies/strict.yaml"),
        "domains: [strict.test]\nthresholds: {rejekt: 5}\n",
    )
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(verdict(g.addr).await, "550");
}

/// Writes `list:SCOPE:ENTRY` as a panel would.
type Writer<'a> = Box<dyn Fn(&str, &str) + 'a>;

/// Allow and block entries read from the state store at each recipient:
/// written while the gate runs, they take effect with no reload; the
/// narrowest scope wins (address, then domain, then `*`); a block of the
/// sender's parent domain counts; removing the entry lifts it.
async fn store_lists_scenario(addr: std::net::SocketAddr, set: Writer<'_>, mta: &FakeMta) {
    let mut c = Client::hello(addr).await;
    c.cmd("MAIL FROM:<x@mail.spam.test>", "250").await;
    c.cmd("RCPT TO:<b@example.test>", "250").await;
    c.cmd("RSET", "250").await;
    set("list:*:spam.test", "block");
    set("list:vip@example.test:spam.test", "allow");
    c.cmd("MAIL FROM:<x@mail.spam.test>", "250").await;
    let r = c.cmd("RCPT TO:<b@example.test>", "550").await;
    assert!(r.starts_with("550 5.7.1"), "{r}");
    c.cmd("RCPT TO:<vip@example.test>", "250").await;
    c.cmd("RSET", "250").await;
    // An allow skips the rules (BAD_HELO) for that recipient alone.
    set("list:example.test:friend.test", "allow");
    let mut c = Client::connect(addr).await;
    c.reply().await;
    c.cmd("EHLO bad.test", "250").await;
    c.cmd("MAIL FROM:<a@friend.test>", "250").await;
    c.cmd("RCPT TO:<b@example.test>", "250").await;
    c.cmd("RCPT TO:<b@other.test>", "452").await;
    c.cmd("DATA", "354").await;
    c.send(b"Subject: hi\r\n\r\nhi\r\n").await;
    c.cmd(".", "250").await;
    c.cmd("MAIL FROM:<a@friend.test>", "250").await;
    c.cmd("RCPT TO:<b@other.test>", "550").await;
    c.cmd("QUIT", "221").await;
    // Lifted.
    set("list:*:spam.test", "");
    let mut c = Client::hello(addr).await;
    c.cmd("MAIL FROM:<x@mail.spam.test>", "250").await;
    c.cmd("RCPT TO:<b@example.test>", "250").await;
    c.cmd("QUIT", "221").await;
    assert_eq!(mta.stored().len(), 1);
    assert_eq!(mta.stored()[0].rcpts, ["<b@example.test>"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn lists_in_the_embedded_store_apply_without_a_reload() {
    let dir = rules_dir("store-embedded", &[]);
    let mta = FakeMta::start(Script::default()).await;
    let mut cfg = config(&mta, &dir);
    cfg.checks.allow.store = true;
    let g = common::start_server_config(cfg).await;
    let store = g.engine.lists_store.clone().expect("store lists on");
    let rt = tokio::runtime::Handle::current();
    let set: Writer = Box::new(move |k: &str, v: &str| {
        let (store, k, v) = (std::sync::Arc::clone(&store), k.to_string(), v.to_string());
        tokio::task::block_in_place(|| {
            rt.block_on(async move {
                store.set(&k, &v, Duration::from_secs(3600)).await.unwrap();
            })
        });
    });
    store_lists_scenario(g.addr, set, &mta).await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs redis-server and redis-cli (installed by .ci/run)"]
async fn a_block_entry_written_to_redis_applies_without_a_reload() {
    let redis = common::peers::Redis::start();
    let dir = rules_dir("store-redis", &[]);
    let mta = FakeMta::start(Script::default()).await;
    let mut cfg = config(&mta, &dir);
    cfg.state.backend = portcullis::config::StateBackend::Redis;
    cfg.state.url = redis.url();
    cfg.checks.allow.store = true;
    let g = Gate::start_config(cfg).await;
    let port = redis.url().rsplit(':').next().unwrap().to_string();
    let set: Writer = Box::new(move |k: &str, v: &str| {
        let mut cmd = std::process::Command::new("redis-cli");
        cmd.args(["-p", &port]);
        if v.is_empty() {
            cmd.args(["DEL", k]);
        } else {
            cmd.args(["SET", k, v]);
        }
        let out = cmd.output().expect("redis-cli");
        assert!(out.status.success(), "{out:?}");
    });
    store_lists_scenario(g.addr, set, &mta).await;
}

/// `check` refuses a broken policy with file:line:column errors and exits
/// 1; `explain` says which policy each recipient got and why, and judges
/// the message by it.
#[test]
fn check_locates_policy_errors_and_explain_names_the_policy() {
    let bin = || std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"));
    let dir = rules_dir("cli", &[("strict.yaml", STRICT)]);
    let mut cfg = common::config::test_config("127.0.0.1:25".parse().unwrap());
    cfg.rules_dir = Some(dir.clone());
    let cfg_path = dir.join("portcullis.json");
    common::config::write_config(&cfg_path, &cfg);
    let msg = dir.join("prize.eml");
    std::fs::write(&msg, prize()).unwrap();
    let out = bin()
        .args(["explain", "--config"])
        .arg(&cfg_path)
        .args([
            "--ip",
            "192.0.2.10",
            "--helo",
            "mx.sender.test",
            "--from",
            "a@sender.test",
        ])
        .args([
            "--rcpt",
            "x@strict.test",
            "--rcpt",
            "y@lenient.test",
            "--no-dns",
        ])
        .arg("--message")
        .arg(&msg)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        "RCPT <x@strict.test>: policy strict (",
        "strict.yaml: the recipient's domain is strict.test)",
        "RCPT <y@lenient.test>: the gate's policy (no policy file covers it)",
        "RCPT <y@lenient.test>: 452 4.5.3",
        "reply after DATA: 550 5.7.1",
    ] {
        assert!(text.contains(want), "{want:?} missing in:\n{text}");
    }
    let out = bin()
        .args(["check", "--config"])
        .arg(&cfg_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("policies ok: 1 in"), "{text}");
    // `check` exits 1 on a broken policy; what it said.
    let refused = || {
        let out = bin()
            .args(["check", "--config"])
            .arg(&cfg_path)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
    };

    std::fs::write(
        dir.join("policies/broken.yaml"),
        "domains: [broken.test]\nchecks:\n  spf: {mode: enforce}\n  greylist: {mode: sometimes}\n",
    )
    .unwrap();
    let text = refused();
    assert!(
        text.contains("policies/broken.yaml:4:20: checks.?.mode: checks.greylist.mode: unknown variant `sometimes`"),
        "{text}"
    );
    // A mode for a check the gate has off can change nothing: refused.
    std::fs::write(
        dir.join("policies/broken.yaml"),
        "domains: [broken.test]\nchecks:\n  spf: {mode: enforce}\n",
    )
    .unwrap();
    let text = refused();
    assert!(
        text.contains("policies/broken.yaml:3:3: checks.spf: the gate has spf off"),
        "{text}"
    );
}

/// Real Postfix in front as the sending client (its queue and `smtp`
/// client, relaying to the gate), real Postfix behind as the final MTA:
/// one message to two recipients whose policies differ. The gate defers
/// the second with 452 4.5.3; Postfix's client delivers the first, keeps
/// the second in its queue and sends it again in a transaction of its
/// own, which the gate judges by that recipient's policy. Both arrive,
/// each once, and the sending queue ends empty.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs Postfix and swaks (installed by .ci/run)"]
async fn postfix_in_front_delivers_a_split_transaction_as_two() {
    use common::peers::{Postfix, run};
    let fin = Postfix::start_with(
        "policy-final",
        "virtual_mailbox_domains = example.test, strict.example.test\n",
    );
    let dir = rules_dir(
        "e2e",
        &[(
            "strict.yaml",
            "domains: [strict.example.test]\nthresholds: {tag: 100}\n",
        )],
    );
    let mut cfg = common::config::in_front_of(fin.port, portcullis::config::IdentityMode::Auto);
    cfg.rules_dir = Some(dir.clone());
    cfg.limits.max_connections_per_ip = 100;
    let gate = Gate::start_config(cfg).await;
    // The sender: relays everything to the gate, and retries deferred
    // recipients after a second instead of Postfix's default minutes.
    let send = Postfix::start_with(
        "policy-send",
        &format!(
            "virtual_mailbox_domains =\nrelayhost = [127.0.0.1]:{}\nminimal_backoff_time = 1s\nmaximal_backoff_time = 2s\nqueue_run_delay = 1s\nsmtp_helo_name = mx.sender.test\n",
            gate.addr.port()
        ),
    );
    let port = send.port;
    let out = tokio::task::spawn_blocking(move || {
        run(std::process::Command::new("swaks").args([
            "--server",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--from",
            "alice@sender.test",
            "--to",
            "bob@example.test,carol@strict.example.test",
            "--header",
            "Subject: you won a prize",
            "--body",
            "Two policies, one message.\n",
            "--timeout",
            "20",
        ]))
    })
    .await
    .unwrap();
    assert!(out.contains("250 2.0.0 Ok: queued as"), "{out}");
    let inbox = fin.inbox();
    let mails = tokio::task::spawn_blocking(move || {
        common::peers::mails(&inbox, 2, Duration::from_secs(40))
    })
    .await
    .unwrap();
    // On a miss, both Postfixes' logs say whether the retry was late,
    // refused again, or never made.
    let logs = || {
        let read = |p: &Postfix| std::fs::read_to_string(p.run.join("maillog")).unwrap_or_default();
        format!("sender:\n{}\nfinal:\n{}", read(&send), read(&fin))
    };
    assert_eq!(mails.len(), 2, "{mails:#?}\n{}", logs());
    let to = |m: &str| {
        m.lines()
            .find_map(|l| l.strip_prefix("Delivered-To: "))
            .unwrap_or_default()
            .to_string()
    };
    let mut rcpts: Vec<String> = mails.iter().map(|m| to(m)).collect();
    rcpts.sort();
    assert_eq!(rcpts, ["bob@example.test", "carol@strict.example.test"]);
    // Each judged by its own policy: PRIZE scores 6, over the gate's tag
    // threshold (5) and under this policy's (100).
    for m in &mails {
        assert!(m.contains("X-Spam-Score: 6.0"), "{m}");
        let tagged = m.contains("X-Spam-Flag: YES");
        assert_eq!(tagged, to(m) == "bob@example.test", "{m}");
    }
    // The sender saw the deferral and retried.
    let log = std::fs::read_to_string(send.run.join("maillog")).unwrap_or_default();
    assert!(
        log.contains("452 4.5.3 Recipient has a different policy"),
        "{log}"
    );
    assert_eq!(
        log.matches("status=sent").count(),
        2,
        "each recipient sent once: {log}"
    );
    // swaks straight at the gate: the second recipient is deferred, the
    // first delivered.
    let gate_port = gate.addr.port();
    let out = tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new("swaks")
            .args(["--server", "127.0.0.1", "--port", &gate_port.to_string()])
            .args(["--helo", "mx.sender.test", "--from", "alice@sender.test"])
            .args(["--to", "dave@example.test,erin@strict.example.test"])
            .args(["--timeout", "20"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    })
    .await
    .unwrap();
    assert!(out.contains("<** 452 4.5.3 "), "{out}");
    // Postfix's reply to BDAT, relayed.
    assert!(out.contains(" bytes queued as "), "{out}");
    let inbox = fin.inbox();
    let mails = tokio::task::spawn_blocking(move || {
        common::peers::mails(&inbox, 3, Duration::from_secs(10))
    })
    .await
    .unwrap();
    assert!(
        mails.iter().any(|m| to(m) == "dave@example.test")
            && !mails.iter().any(|m| to(m) == "erin@strict.example.test"),
        "{mails:#?}"
    );
    let until = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let q = run(std::process::Command::new("postqueue")
            .arg("-c")
            .arg(&send.conf)
            .arg("-p"));
        if q.contains("Mail queue is empty") {
            break;
        }
        assert!(std::time::Instant::now() < until, "still queued: {q}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The example policy shipped with the rules loads once renamed, and the
/// shipped rules directory loads with it in place.
#[test]
fn the_shipped_example_policy_loads() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
    let text = std::fs::read_to_string(root.join("policies/example.org.yaml.example")).unwrap();
    let dir = std::env::temp_dir().join(format!("portcullis-pol-example-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    for f in std::fs::read_dir(&root).unwrap() {
        let p = f.unwrap().path();
        if p.extension().is_some_and(|x| x == "yaml") {
            std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
        }
    }
    std::fs::create_dir_all(dir.join("lists")).unwrap();
    for f in std::fs::read_dir(root.join("lists")).unwrap() {
        let p = f.unwrap().path();
        std::fs::copy(&p, dir.join("lists").join(p.file_name().unwrap())).unwrap();
    }
    std::fs::write(dir.join("policies/example.org.yaml"), text).unwrap();
    let set = portcullis::rules::RuleSet::load_dir(&dir).unwrap_or_else(|e| panic!("{e}"));
    let (p, _) = set
        .policies
        .find("a@mail.example.org")
        .expect("example policy");
    assert_eq!(p.name, "example.org");
    assert_eq!(p.thresholds.reject, Some(10.0));
}
