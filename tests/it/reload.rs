//! Config reload (SIGHUP): what it says is in force, is. Keys a session
//! reads are in force for new sessions; keys only a restart can change are
//! named by key path and keep their running values.

use crate::common;

use common::dns::{FakeDns, a};
use common::{Client, FakeMta, Script};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

const ORIGINS: &[&str] = &["test.", "in-addr.arpa."];

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("portcullis-reload-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A config file with a DNSBL in enforce mode (127.0.0.2 is listed) and
/// the other checks off; `extra` is appended.
fn config(mta: SocketAddr, dns: SocketAddr, extra: &str) -> String {
    format!(
        "listen: [{{addr: 127.0.0.1:0}}]\n\
         upstream: {{addr: {mta}, client_identity: xclient, timeouts: {{connect: 2s, command: 5s}}}}\n\
         dns: {{nameservers: [{dns}], timeout: 1s, attempts: 1}}\n\
         rules_dir: {}\n{extra}",
        common::EMPTY_RULES
    )
}

const CHECKS: &str = "  spf: {mode: off}\n  dkim: {mode: off}\n  dmarc: {mode: off}\n  arc: {mode: off}\n  iprev: {mode: off}\n  dnsbl: {mode: enforce, zones: [{zone: bl.test, action: reject}]}\n";

async fn start(file: &Path) -> (SocketAddr, portcullis::server::ConfigReloader) {
    let cfg = portcullis::config::Config::load(Some(file)).unwrap();
    let server = portcullis::server::Server::bind(cfg).await.unwrap();
    let _ = server.upstream().probe().await;
    let addr = server.local_addrs()[0];
    let reloader = server.config_reloader();
    tokio::spawn(server.run(std::future::pending()));
    (addr, reloader)
}

async fn greeted(addr: SocketAddr, ip: &str) -> (Client, String) {
    let mut c = Client::connect_from(addr, ip).await;
    let g = c.reply().await;
    (c, g)
}

#[tokio::test]
async fn reload_puts_what_sessions_read_in_force_for_new_sessions() {
    let dns = FakeDns::start(ORIGINS, vec![a("2.0.0.127.bl.test.", "127.0.0.2")]).await;
    let mta = FakeMta::start(Script::default()).await;
    let dir = tmp("apply");
    let ck = rcgen::generate_simple_self_signed(vec!["gate.test".into()]).unwrap();
    std::fs::write(dir.join("cert.pem"), ck.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), ck.signing_key.serialize_pem()).unwrap();
    let file = dir.join("gate.yaml");
    std::fs::write(
        &file,
        config(
            mta.addr,
            dns.addr,
            &format!("hostname: one.test\nchecks:\n  reject_at: rcpt\n{CHECKS}"),
        ),
    )
    .unwrap();
    let (addr, reloader) = start(&file).await;

    // Before: refused at RCPT, no STARTTLS, the default SIZE.
    let (mut c, g) = greeted(addr, "127.0.0.2").await;
    assert!(g.starts_with("220 one.test"), "{g}");
    let ehlo = c.cmd("EHLO c.test", "250").await;
    assert!(
        !ehlo.contains("STARTTLS") && ehlo.contains("SIZE 26214400"),
        "{ehlo}"
    );
    c.cmd("MAIL FROM:<a@s.test>", "250").await;
    c.cmd("RCPT TO:<b@r.test>", "550 5.7.1").await;
    let (mut before, _) = greeted(addr, "127.0.0.3").await;
    before.cmd("EHLO c.test", "250").await;

    std::fs::write(
        &file,
        config(
            mta.addr,
            dns.addr,
            "hostname: two.test\n\
             tls: {cert: cert.pem, key: key.pem}\n\
             limits: {max_recipients: 2, max_message_size: 1MiB}\n\
             smtp: {max_command_line: 1000}\n\
             timeouts: {command: 2s}\n\
             checks:\n  reject_at: connect\n",
        ) + CHECKS,
    )
    .unwrap();
    let r = reloader.reload(&file).await.unwrap();
    assert_eq!(
        r.applied,
        [
            "checks.reject_at",
            "hostname",
            "limits.max_message_size",
            "limits.max_recipients",
            "smtp.max_command_line",
            "timeouts.command",
            "tls",
        ]
    );
    // Our name towards upstream is fixed at start.
    assert_eq!(r.needs_restart, ["upstream.helo_name"]);

    // reject_at: connect, for the listed client.
    let (_, g) = greeted(addr, "127.0.0.2").await;
    assert!(g.starts_with("554 5.7.1"), "{g}");
    // The rest, for a clean client.
    let (mut c, g) = greeted(addr, "127.0.0.3").await;
    assert!(g.starts_with("220 two.test"), "{g}");
    let ehlo = c.cmd("EHLO c.test", "250").await;
    assert!(
        ehlo.contains("STARTTLS") && ehlo.contains("SIZE 1048576"),
        "{ehlo}"
    );
    c.cmd(&format!("NOOP {}", "x".repeat(700)), "250").await;
    c.cmd("MAIL FROM:<a@s.test>", "250").await;
    c.cmd("RCPT TO:<b1@r.test>", "250").await;
    c.cmd("RCPT TO:<b2@r.test>", "250").await;
    c.cmd("RCPT TO:<b3@r.test>", "452 4.5.3").await;
    let started = std::time::Instant::now();
    let r = c
        .try_reply(Duration::from_secs(10))
        .await
        .unwrap_or_default();
    assert!(
        r.starts_with("421 4.4.2"),
        "idle past the new command timeout: {r:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));

    // The session that began before the reload keeps what it started with.
    before
        .cmd(&format!("NOOP {}", "x".repeat(700)), "500 5.5.2")
        .await;
    before.cmd("MAIL FROM:<a@s.test>", "250").await;
    for i in 0..3 {
        before.cmd(&format!("RCPT TO:<b{i}@r.test>"), "250").await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn reload_names_restart_only_keys_and_keeps_their_running_values() {
    let dns = FakeDns::start(ORIGINS, vec![]).await;
    let mta = FakeMta::start(Script::default()).await;
    let other = FakeMta::start(Script::default()).await;
    let dir = tmp("restart");
    let file = dir.join("gate.yaml");
    let v1 = config(mta.addr, dns.addr, "hostname: gate.test\n");
    std::fs::write(&file, &v1).unwrap();
    let (addr, reloader) = start(&file).await;

    let port = common::free_port();
    let v2 = v1
        .replace(&mta.addr.to_string(), &other.addr.to_string())
        .replace("127.0.0.1:0", &format!("127.0.0.1:{port}"))
        .replace(common::EMPTY_RULES, &dir.display().to_string())
        + "limits: {max_connections: 5, memory_budget: 64MiB}\n\
           stress: {at_percent: 50}\n\
           log: {format: logfmt, level: debug}\n\
           metrics: {listen: 127.0.0.1:9}\n";
    std::fs::write(&file, v2).unwrap();
    let r = reloader.reload(&file).await.unwrap();
    // The level filter is swapped (no subscriber in this test process).
    assert_eq!(r.applied, ["log.level"]);
    assert_eq!(
        r.needs_restart,
        [
            "limits.max_connections",
            "limits.memory_budget",
            "listen[0].addr",
            "log.format",
            "metrics.listen",
            "rules_dir",
            "stress.at_percent",
            "upstream.addr",
        ]
    );
    assert_eq!(*reloader.needs_restart.lock().unwrap(), r.needs_restart);
    // Still the old listener and the old upstream.
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
    );
    let mut c = Client::hello(addr).await;
    let r = c
        .send_mail("a@s.test", &["b@r.test"], b"Subject: x\r\n\r\nhi\r\n")
        .await;
    assert!(r.starts_with("250"), "{r}");
    assert_eq!(mta.stored().len(), 1);
    assert_eq!(other.stored().len(), 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_reload_to_a_certificate_that_does_not_load_changes_nothing() {
    let dns = FakeDns::start(ORIGINS, vec![]).await;
    let mta = FakeMta::start(Script::default()).await;
    let dir = tmp("badcert");
    let file = dir.join("gate.yaml");
    std::fs::write(&file, config(mta.addr, dns.addr, "hostname: one.test\n")).unwrap();
    let (addr, reloader) = start(&file).await;
    std::fs::write(dir.join("cert.pem"), "not a certificate").unwrap();
    std::fs::write(
        &file,
        config(
            mta.addr,
            dns.addr,
            "hostname: two.test\ntls: {cert: cert.pem, key: cert.pem}\n",
        ),
    )
    .unwrap();
    let e = reloader.reload(&file).await.unwrap_err();
    assert!(e.contains("cert.pem"), "{e}");
    let (_, g) = greeted(addr, "127.0.0.3").await;
    assert!(g.starts_with("220 one.test"), "{g}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Rules and config reload into one snapshot: a config reload after a
/// rules reload keeps the new rules, and a rules reload after a config
/// reload keeps the new config.
#[tokio::test]
async fn rules_and_config_reloads_do_not_undo_each_other() {
    let dns = FakeDns::start(ORIGINS, vec![]).await;
    let mta = FakeMta::start(Script::default()).await;
    let dir = tmp("both");
    let rule = |who: &str| {
        format!(
            "rules:\n  - id: BLOCK\n    description: x\n    when: {{mail_from: {{exact: {who}@x.test}}}}\n    action: reject\n"
        )
    };
    std::fs::create_dir_all(dir.join("rules")).unwrap();
    std::fs::write(dir.join("rules/r.yaml"), rule("one")).unwrap();
    let file = dir.join("gate.yaml");
    let base =
        config(mta.addr, dns.addr, "hostname: one.test\n").replace(common::EMPTY_RULES, "rules");
    std::fs::write(&file, &base).unwrap();
    let cfg = portcullis::config::Config::load(Some(&file)).unwrap();
    let server = portcullis::server::Server::bind(cfg).await.unwrap();
    let _ = server.upstream().probe().await;
    let (addr, reloader, rules) = (
        server.local_addrs()[0],
        server.config_reloader(),
        server.rules(),
    );
    tokio::spawn(server.run(std::future::pending()));
    let refused = |from: &'static str| async move {
        let mut c = Client::connect(addr).await;
        let g = c.reply().await;
        c.cmd("EHLO c.test", "250").await;
        c.cmd(&format!("MAIL FROM:<{from}>"), "250").await;
        c.line("RCPT TO:<b@r.test>").await;
        (g, c.reply().await.starts_with("550"))
    };
    std::fs::write(dir.join("rules/r.yaml"), rule("two")).unwrap();
    rules.reload().unwrap();
    std::fs::write(&file, base.replace("one.test", "two.test")).unwrap();
    reloader.reload(&file).await.unwrap();
    let (g, r) = refused("two@x.test").await;
    assert!(g.starts_with("220 two.test") && r, "{g} {r}");
    assert!(!refused("one@x.test").await.1);
    // And the other way round.
    std::fs::write(dir.join("rules/r.yaml"), rule("three")).unwrap();
    rules.reload().unwrap();
    let (g, r) = refused("three@x.test").await;
    assert!(g.starts_with("220 two.test") && r, "{g} {r}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A rule set naming a DNSBL zone the checks do not query is refused on
/// reload as it is at start (it would otherwise run until the next restart
/// and then stop the gate from starting); a config reload that adds the
/// zone lets it in.
#[tokio::test]
async fn rules_naming_an_unconfigured_zone_are_refused_on_reload_too() {
    let dns = FakeDns::start(ORIGINS, vec![]).await;
    let mta = FakeMta::start(Script::default()).await;
    let dir = tmp("zones");
    let rule = |zone: &str| {
        format!(
            "rules:\n  - id: LISTED\n    description: x\n    when: {{dnsbl: [{zone}]}}\n    action: {{score: 1}}\n"
        )
    };
    std::fs::create_dir_all(dir.join("rules")).unwrap();
    std::fs::write(dir.join("rules/r.yaml"), rule("bl.test")).unwrap();
    let file = dir.join("gate.yaml");
    let base = config(
        mta.addr,
        dns.addr,
        &format!("hostname: gate.test\nchecks:\n{CHECKS}"),
    )
    .replace(common::EMPTY_RULES, "rules");
    std::fs::write(&file, &base).unwrap();
    let cfg = portcullis::config::Config::load(Some(&file)).unwrap();
    let server = portcullis::server::Server::bind(cfg).await.unwrap();
    let (reloader, rules) = (server.config_reloader(), server.rules());
    tokio::spawn(server.run(std::future::pending()));

    std::fs::write(dir.join("rules/r.yaml"), rule("other.test")).unwrap();
    let e = rules.reload().unwrap_err().to_string();
    assert!(
        e.contains("\"other.test\" is not in checks.dnsbl.zones (bl.test)"),
        "{e}"
    );
    assert_eq!(
        rules.current().dnsbl_zones().collect::<Vec<_>>(),
        ["bl.test"]
    );
    // A config that drops the zone the running rules name is refused too.
    let without = base.replace("zones: [{zone: bl.test, action: reject}]", "zones: []");
    std::fs::write(&file, &without).unwrap();
    let e = reloader.reload(&file).await.unwrap_err();
    assert!(
        e.contains("\"bl.test\" is not in checks.dnsbl.zones"),
        "{e}"
    );
    // The config that queries other.test too: then the rules are taken.
    let both = base.replace(
        "zones: [{zone: bl.test, action: reject}]",
        "zones: [{zone: bl.test, action: reject}, {zone: other.test}]",
    );
    std::fs::write(&file, &both).unwrap();
    reloader.reload(&file).await.unwrap();
    rules.reload().unwrap();
    assert_eq!(
        rules.current().dnsbl_zones().collect::<Vec<_>>(),
        ["other.test"]
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A typed test config written with `write_config` loads back unchanged,
/// key for key (so tests may write configs without YAML strings).
#[test]
fn a_written_test_config_loads_back_unchanged() {
    let mut cfg = common::config::test_config("127.0.0.1:2525".parse().unwrap());
    cfg.hostname = "typed.test".into();
    cfg.limits.max_message_size = common::config::mib(3);
    cfg.greeting.delay = Some(common::config::secs(2));
    cfg.checks.spf.mode = portcullis::config::Mode::Enforce;
    let dir = tmp("typed");
    let file = dir.join("gate.json");
    common::config::write_config(&file, &cfg);
    let back = portcullis::config::Config::load(Some(&file)).unwrap();
    let changed = portcullis::config::reload::changed_keys(&cfg, &back);
    assert!(changed.is_empty(), "{changed:?}");
    assert!(portcullis::config::reload::key_paths(&cfg).len() > 50);
    let _ = std::fs::remove_dir_all(&dir);
}
