//! Greylisting on every backend: the same scenarios (time driven by a test
//! clock) against the embedded store, a real `redis-server`, and a
//! three-node Redis Cluster (and one with replicas losing a master); the
//! store failing (on_error, no hang); and
//! through the gate: 451 4.7.1 at RCPT, nothing of it upstream, the retry
//! delivered once, and the state kept across a restart.

use crate::common;
use common::config::{secs, test_config};
use common::peers::{Redis, RedisCluster, redis_store};
use common::{Client, FakeMta, Gate, Script};
use portcullis::checks::greylist::{Greylist, Outcome};
use portcullis::config::{
    Action, GreylistConfig, GreylistWhen, Mode, RateCount, RateKey, StateBackend, Thresholds,
};
use portcullis::state::{Clock, Store, TestClock};
use std::sync::Arc;
use std::time::{Duration, Instant};

const IP: &str = "192.0.2.10";
const MIN: Duration = Duration::from_secs(60);

fn greylist(store: &Arc<Store>) -> Greylist {
    let cfg = GreylistConfig {
        mode: Mode::Enforce,
        auto_allow_after: 2,
        ..GreylistConfig::default()
    };
    Greylist::new(&cfg, &Thresholds::default(), Arc::clone(store))
}

async fn decide(g: &Greylist, ip: &str, from: &str, to: &str) -> Outcome {
    g.decide(ip.parse().unwrap(), from, to).await.unwrap()
}

/// Every outcome, on one store, with the clock moved by the test.
async fn scenarios(store: Arc<Store>, clock: &TestClock) {
    let g = greylist(&store);
    // New, early, then passed after the delay; remembered; per network.
    assert_eq!(
        decide(&g, IP, "a@s1.test", "b@r1.test").await,
        Outcome::New(300)
    );
    clock.advance(Duration::from_secs(100));
    assert_eq!(
        decide(&g, IP, "a@s1.test", "b@r1.test").await,
        Outcome::Early(200)
    );
    clock.advance(Duration::from_secs(200));
    assert_eq!(
        decide(&g, "192.0.2.99", "A@S1.test", "b@r1.test").await,
        Outcome::Passed
    );
    assert_eq!(
        decide(&g, IP, "a@s1.test", "b@r1.test").await,
        Outcome::Passed
    );
    assert_eq!(
        decide(&g, "198.51.100.1", "a@s1.test", "b@r1.test").await,
        Outcome::New(300)
    );

    // A retry after the window starts again.
    assert_eq!(
        decide(&g, IP, "a@s2.test", "b@r2.test").await,
        Outcome::New(300)
    );
    clock.advance(Duration::from_secs(300 + 24 * 3600 + 1));
    assert_eq!(
        decide(&g, IP, "a@s2.test", "b@r2.test").await,
        Outcome::New(300)
    );
    clock.advance(Duration::from_secs(299));
    assert_eq!(
        decide(&g, IP, "a@s2.test", "b@r2.test").await,
        Outcome::Early(1)
    );

    // Auto-allow after two passes from the network and sender domain.
    for to in ["1@r3.test", "2@r3.test"] {
        assert_eq!(decide(&g, IP, "a@s3.test", to).await, Outcome::New(300));
    }
    clock.advance(5 * MIN + Duration::from_secs(1));
    for to in ["1@r3.test", "2@r3.test"] {
        assert_eq!(decide(&g, IP, "a@s3.test", to).await, Outcome::Passed);
    }
    assert_eq!(
        decide(&g, IP, "z@s3.test", "3@r3.test").await,
        Outcome::Allowed
    );
    assert_eq!(
        decide(&g, IP, "z@other3.test", "3@r3.test").await,
        Outcome::New(300)
    );

    // A bounce to a recipient that passed before is not delayed.
    assert_eq!(
        decide(&g, "203.0.113.5", "", "b@r4.test").await,
        Outcome::New(300)
    );
    assert_eq!(
        decide(&g, IP, "a@s4.test", "b@r4.test").await,
        Outcome::New(300)
    );
    clock.advance(5 * MIN + Duration::from_secs(1));
    assert_eq!(
        decide(&g, IP, "a@s4.test", "b@r4.test").await,
        Outcome::Passed
    );
    assert_eq!(
        decide(&g, "203.0.113.5", "", "b@r4.test").await,
        Outcome::Allowed
    );
    assert_eq!(
        decide(&g, "203.0.113.5", "", "c@r4.test").await,
        Outcome::New(300)
    );
}

/// The auto-allowance runs out after `allow_ttl` (embedded only: Redis
/// expires keys by its own clock, which a test cannot move).
#[tokio::test]
async fn the_auto_allowance_runs_out() {
    let clock = Arc::new(TestClock::new());
    let store = Arc::new(Store::in_memory(1000, Arc::clone(&clock) as Arc<dyn Clock>));
    let g = greylist(&store);
    for to in ["1@r.test", "2@r.test"] {
        decide(&g, IP, "a@s.test", to).await;
    }
    clock.advance(5 * MIN + Duration::from_secs(1));
    for to in ["1@r.test", "2@r.test"] {
        decide(&g, IP, "a@s.test", to).await;
    }
    assert_eq!(
        decide(&g, IP, "y@s.test", "3@r.test").await,
        Outcome::Allowed
    );
    clock.advance(Duration::from_secs(35 * 24 * 3600 + 1));
    assert_eq!(
        decide(&g, IP, "y@s.test", "3@r.test").await,
        Outcome::New(300)
    );
}

#[tokio::test]
async fn every_outcome_on_the_embedded_store() {
    let clock = Arc::new(TestClock::new());
    let store = Store::in_memory(1000, Arc::clone(&clock) as Arc<dyn Clock>);
    scenarios(Arc::new(store), &clock).await;
}

#[tokio::test]
#[ignore = "needs redis-server (installed by .ci/run)"]
async fn every_outcome_on_redis() {
    let redis = Redis::start();
    let clock = Arc::new(TestClock::new());
    scenarios(Arc::new(redis_store(redis.url(), false, &clock)), &clock).await;
}

#[tokio::test]
#[ignore = "needs redis-server and redis-cli (installed by .ci/run)"]
async fn every_outcome_on_a_redis_cluster() {
    let cluster = RedisCluster::start();
    let clock = Arc::new(TestClock::new());
    scenarios(Arc::new(redis_store(cluster.url(), true, &clock)), &clock).await;
}

/// A store that is down (refused) or silent (accepts, never answers):
/// each call fails within the deadline, and the gate applies `on_error`.
#[tokio::test]
async fn a_failing_store_applies_on_error_without_hanging() {
    let refused = common::free_port();
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let _keep = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let mta = FakeMta::start(Script::default()).await;
    for (port, on_error, want) in [
        (refused, Action::Accept, "250"),
        (silent_port, Action::Accept, "250"),
        (silent_port, Action::Tempfail, "451 4.3.0"),
    ] {
        let mut cfg = test_config(mta.addr);
        cfg.state.backend = StateBackend::Redis;
        cfg.state.url = format!("redis://127.0.0.1:{port}");
        cfg.checks.greylist.mode = Mode::Enforce;
        cfg.checks.greylist.on_error = on_error;
        let gate = Gate::start_config(cfg).await;
        let mut c = Client::hello(gate.addr).await;
        c.cmd("MAIL FROM:<a@s.test>", "250").await;
        let started = Instant::now();
        let r = c.cmd("RCPT TO:<b@r.test>", want).await;
        // The store's deadline is 100 ms; a few calls at most.
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{r} after {:?}",
            started.elapsed()
        );
    }
}

fn greylisting(mta: &FakeMta) -> portcullis::config::Config {
    let mut cfg = test_config(mta.addr);
    cfg.checks.greylist.mode = Mode::Enforce;
    cfg
}

/// Through the gate: the first attempt gets 451 4.7.1 at RCPT and
/// upstream never hears of the recipient; the retry after the delay is
/// delivered, once.
#[tokio::test]
async fn the_gate_greylists_and_delivers_the_retry_once() {
    let mta = FakeMta::start(Script::default()).await;
    let clock = Arc::new(TestClock::new());
    // Rules see the outcome.
    let dir = std::env::temp_dir().join(format!("portcullis-gl-rules-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("r.yaml"),
        "rules:\n  - {id: GL_PASSED, description: x, when: {greylist: [passed]}, action: {add_header: {name: X-Greylist, value: passed}}}\n",
    )
    .unwrap();
    let mut cfg = greylisting(&mta);
    cfg.rules_dir = Some(dir.clone());
    let gate = Gate::start_clocked(cfg, Arc::clone(&clock) as Arc<dyn Clock>).await;
    let mut c = Client::hello(gate.addr).await;
    c.cmd("MAIL FROM:<a@sender.test>", "250").await;
    let r = c.cmd("RCPT TO:<b@example.test>", "451 4.7.1").await;
    assert!(r.contains("try again in 300 seconds"), "{r}");
    c.cmd("QUIT", "221").await;
    assert_eq!(mta.count("RCPT"), 0);
    clock.advance(Duration::from_secs(120));
    let mut c = Client::hello(gate.addr).await;
    c.cmd("MAIL FROM:<a@sender.test>", "250").await;
    let r = c.cmd("RCPT TO:<b@example.test>", "451 4.7.1").await;
    assert!(r.contains("try again in 180 seconds"), "{r}");
    clock.advance(Duration::from_secs(181));
    let mut c = Client::hello(gate.addr).await;
    let r = c
        .send_mail(
            "a@sender.test",
            &["b@example.test"],
            &common::message("gl", "hi\r\n"),
        )
        .await;
    assert!(r.starts_with("250"), "{r}");
    let stored = mta.stored();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].rcpts, ["<b@example.test>"]);
    let data = String::from_utf8_lossy(&stored[0].data);
    assert!(data.contains("X-Greylist: passed\r\n"), "{data}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `when: score`: only transactions whose score so far reaches
/// `thresholds.greylist` are greylisted.
#[tokio::test]
async fn when_score_greylists_only_suspect_transactions() {
    let dir = std::env::temp_dir().join(format!("portcullis-gl-score-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("r.yaml"),
        "rules:\n  - {id: ODD_HELO, description: x, when: {helo: {exact: [odd.test]}}, action: {score: 3}}\n",
    )
    .unwrap();
    let mta = FakeMta::start(Script::default()).await;
    let mut cfg = greylisting(&mta);
    cfg.rules_dir = Some(dir.clone());
    cfg.checks.greylist.when = GreylistWhen::Score;
    cfg.checks.thresholds.greylist = Some(2.0);
    let gate = Gate::start_config(cfg).await;
    let mut c = Client::hello(gate.addr).await;
    c.cmd("MAIL FROM:<a@sender.test>", "250").await;
    c.cmd("RCPT TO:<b@example.test>", "250").await;
    let mut c = Client::connect(gate.addr).await;
    c.reply().await;
    c.cmd("EHLO odd.test", "250").await;
    c.cmd("MAIL FROM:<a@sender.test>", "250").await;
    c.cmd("RCPT TO:<b@example.test>", "451 4.7.1").await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// The embedded state is saved on shutdown and loaded on start: a
/// restart does not greylist a triplet again.
#[tokio::test]
async fn the_embedded_state_survives_a_restart() {
    let dir = std::env::temp_dir().join(format!("portcullis-gl-restart-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mta = FakeMta::start(Script::default()).await;
    let clock = Arc::new(TestClock::new());
    let mut cfg = greylisting(&mta);
    cfg.state.file = Some(dir.join("state.jsonl"));
    let mut gate = Gate::start_clocked(cfg.clone(), Arc::clone(&clock) as Arc<dyn Clock>).await;
    let mut c = Client::hello(gate.addr).await;
    c.cmd("MAIL FROM:<a@sender.test>", "250").await;
    c.cmd("RCPT TO:<b@example.test>", "451 4.7.1").await;
    c.cmd("QUIT", "221").await;
    gate.stop();
    let _ = (&mut gate.done).await;
    assert!(dir.join("state.jsonl").exists());
    clock.advance(Duration::from_secs(301));
    let gate = Gate::start_clocked(cfg, Arc::clone(&clock) as Arc<dyn Clock>).await;
    let mut c = Client::hello(gate.addr).await;
    c.cmd("MAIL FROM:<a@sender.test>", "250").await;
    c.cmd("RCPT TO:<b@example.test>", "250").await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Scale-out: HAProxy (round robin, PROXY v2) in front of two instances
/// sharing one Redis, each relaying to its own MTA. A triplet greylisted
/// through one instance passes when retried through the other after the
/// delay, and the real client address reaches the MTA through HAProxy
/// and Portcullis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs haproxy and redis-server (installed by .ci/run)"]
async fn a_triplet_greylisted_through_one_instance_passes_through_the_other() {
    use common::peers::Haproxy;
    let redis = Redis::start();
    let clock = Arc::new(TestClock::new());
    let (mta_a, mta_b) = (
        FakeMta::start(Script::default()).await,
        FakeMta::start(Script::default()).await,
    );
    let gate = |mta: &FakeMta, name: &str| {
        let mut cfg = greylisting(mta);
        // Named apart, so that a client knows from the greeting which
        // instance HAProxy gave it.
        cfg.hostname = name.to_string();
        common::config::behind_proxy(&mut cfg);
        cfg.limits.max_connections_per_ip = 500;
        cfg.checks.rate_limits = vec![common::config::rate_limit(
            "per_domain",
            RateKey::SenderDomain,
            RateCount::Transactions,
            40,
            60,
        )];
        cfg.state.backend = StateBackend::Redis;
        cfg.state.url = redis.url();
        cfg.state.timeout = secs(2);
        cfg
    };
    let a = Gate::start_clocked(
        gate(&mta_a, "a.gate.test"),
        Arc::clone(&clock) as Arc<dyn Clock>,
    )
    .await;
    let b = Gate::start_clocked(
        gate(&mta_b, "b.gate.test"),
        Arc::clone(&clock) as Arc<dyn Clock>,
    )
    .await;
    let lb = Haproxy::start(&[a.addr, b.addr]);
    // Round robin: consecutive connections alternate; whichever instance
    // the first lands on, the second lands on the other.
    let attempt = |want: &'static str| {
        let addr = lb.addr();
        async move {
            let mut c = Client::connect_from(addr, "127.0.0.55").await;
            assert!(c.reply().await.starts_with("220"));
            c.cmd("EHLO client.test", "250").await;
            c.cmd("MAIL FROM:<a@sender.test>", "250").await;
            let r = c.cmd("RCPT TO:<b@example.test>", want).await;
            if want == "250" {
                c.cmd("DATA", "354").await;
                c.send(b"Subject: lb\r\n\r\nthrough the balancer\r\n.\r\n")
                    .await;
                assert!(c.reply().await.starts_with("250"));
            }
            c.cmd("QUIT", "221").await;
            r
        }
    };
    let r = attempt("451 4.7.1").await;
    assert!(r.contains("try again in 300 seconds"), "{r}");
    clock.advance(Duration::from_secs(301));
    attempt("250").await;
    let (sa, sb) = (mta_a.stored(), mta_b.stored());
    assert_eq!(sa.len() + sb.len(), 1, "delivered once");
    // The retry went through the other instance than the first attempt:
    // the instance that delivered never saw the first attempt's RCPT.
    let (delivered, other) = if sa.len() == 1 {
        (&mta_a, &mta_b)
    } else {
        (&mta_b, &mta_a)
    };
    assert_eq!(delivered.count("RCPT"), 1);
    assert_eq!(other.count("RCPT"), 0);
    assert!(
        other
            .commands()
            .iter()
            .any(|c| c.starts_with("MAIL FROM:<a@sender.test>")),
        "first attempt went elsewhere: {:?} / {:?}",
        mta_a.commands(),
        mta_b.commands()
    );
    // The real client address, through HAProxy (PROXY v2) and XCLIENT.
    let xclient = delivered
        .connection_with("XCLIENT")
        .into_iter()
        .find(|l| l.starts_with("XCLIENT"))
        .expect("XCLIENT sent");
    assert!(xclient.contains("ADDR=127.0.0.55"), "{xclient}");

    // A rate limit of 40 a minute per sender domain, 100 transactions at
    // once through the balancer, so over both instances: 40 taken in all,
    // not 40 by each. Which instance's sessions win the 40 is a race
    // (one instance may take them all); that both served sessions is
    // HAProxy's round robin, told by the greeting.
    let mut tasks = Vec::new();
    for i in 0..100u8 {
        let addr = lb.addr();
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect_from(addr, &format!("127.0.1.{i}")).await;
            let greeting = c.reply().await;
            assert!(greeting.starts_with("220"), "{greeting}");
            c.cmd("EHLO load.test", "250").await;
            let took = c
                .cmd("MAIL FROM:<x@load.test>", "")
                .await
                .starts_with("250");
            (greeting.contains("a.gate.test"), took)
        }));
    }
    let (mut taken, mut served_by_a) = (0, 0);
    for t in tasks {
        let (by_a, took) = t.await.unwrap();
        taken += usize::from(took);
        served_by_a += usize::from(by_a);
    }
    let won = (
        mta_a.count("MAIL FROM:<X@LOAD.TEST>"),
        mta_b.count("MAIL FROM:<X@LOAD.TEST>"),
    );
    println!(
        "through HAProxy: {taken} of 100 taken; sessions served by a: {served_by_a}, by b: {}; taken by instance {won:?}",
        100 - served_by_a
    );
    assert!(
        (30..=70).contains(&served_by_a),
        "{served_by_a} of 100 served by a"
    );
    assert!((38..=42).contains(&taken), "{taken}");
    assert_eq!(won.0 + won.1, taken, "every one taken reached its MTA");
}

/// Redis killed in the middle of a load of concurrent transactions, then
/// started again (with its append-only file): no session waits past the
/// store's deadline, `on_error: accept` lets every transaction through,
/// every accepted message is delivered once, and the store answers again
/// by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server (installed by .ci/run)"]
async fn redis_stopped_mid_run_then_back() {
    let mut redis = Redis::durable();
    let mta = FakeMta::start(Script::default()).await;
    let clock = Arc::new(TestClock::new());
    let mut cfg = greylisting(&mta);
    cfg.state.backend = StateBackend::Redis;
    cfg.state.url = redis.url();
    // Every triplet of this run is already known: the client network and
    // sender domain are auto-allowed after one pass.
    cfg.checks.greylist.auto_allow_after = 1;
    // A rate limit that never bites: every transaction asks the store
    // (greylisting's allowance is cached locally once seen; a burst under
    // 200 is counted without leases, and 199 outlasts this run's 161
    // transactions on a clock that does not move).
    cfg.checks.rate_limits = vec![portcullis::config::RateLimit {
        burst: Some(199),
        ..common::config::rate_limit(
            "roomy",
            RateKey::ClientAddress,
            RateCount::Transactions,
            1_000_000,
            60,
        )
    }];
    let gate = Gate::start_clocked(cfg, Arc::clone(&clock) as Arc<dyn Clock>).await;
    let mut c = Client::hello(gate.addr).await;
    c.cmd("MAIL FROM:<a@sender.test>", "250").await;
    c.cmd("RCPT TO:<first@example.test>", "451 4.7.1").await;
    c.cmd("QUIT", "221").await;
    clock.advance(Duration::from_secs(301));
    // 8 clients at once, 20 transactions each; Redis is killed after the
    // 40th transaction and started again after the 100th.
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for w in 0..8 {
        let (addr, done) = (gate.addr, Arc::clone(&done));
        workers.push(tokio::spawn(async move {
            let mut slowest = Duration::ZERO;
            for i in 0..20 {
                let mut c = Client::hello(addr).await;
                let started = Instant::now();
                let msg = common::message(&format!("run-{w}-{i}"), "x\r\n");
                let r = c
                    .send_mail("a@sender.test", &["first@example.test"], &msg)
                    .await;
                slowest = slowest.max(started.elapsed());
                assert!(r.starts_with("250"), "client {w}, transaction {i}: {r}");
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            slowest
        }));
    }
    let reached = |n: usize| {
        let done = Arc::clone(&done);
        async move {
            while done.load(std::sync::atomic::Ordering::SeqCst) < n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    reached(40).await;
    redis.stop();
    reached(100).await;
    redis.restart();
    let mut slowest = Duration::ZERO;
    for w in workers {
        slowest = slowest.max(w.await.unwrap());
    }
    let accepted = done.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(accepted, 160);
    println!("slowest of 160 transactions (8 at once) with Redis killed and back: {slowest:?}");
    assert!(slowest < Duration::from_secs(2), "{slowest:?}");
    let stored = mta.stored();
    assert_eq!(stored.len(), accepted, "every accepted message, once");
    let mut ids: Vec<String> = stored
        .iter()
        .filter_map(|s| {
            let d = String::from_utf8_lossy(&s.data).into_owned();
            d.lines()
                .find(|l| l.starts_with("Message-ID:"))
                .map(str::to_string)
        })
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), accepted, "no duplicates");
    // Back by itself: a new triplet is greylisted again once the client
    // has reconnected (the first call after the restart may still meet
    // the dead connection and fail open).
    let mut back = None;
    for attempt in 0..10 {
        let mut c = Client::hello(gate.addr).await;
        c.cmd("MAIL FROM:<z@elsewhere.test>", "250").await;
        let r = c.cmd("RCPT TO:<first@example.test>", "").await;
        if r.starts_with("451 4.7.1") {
            back = Some(attempt);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("greylisting again after {back:?} failed attempts");
    assert!(back.is_some_and(|n| n <= 2), "{back:?}");
}

/// A Redis Cluster master killed (three masters, a replica each): calls on
/// its slots fail within the store's deadline while the cluster elects
/// the replica, then the store answers again by itself, and what was
/// written before the kill (60 triplets that passed) is still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and redis-cli (installed by .ci/run)"]
async fn a_cluster_master_killed_fails_over_to_its_replica() {
    let mut cluster = RedisCluster::with_replicas();
    let clock = Arc::new(TestClock::new());
    let deadline = Duration::from_millis(200);
    let cfg = portcullis::config::StateConfig {
        backend: StateBackend::Redis,
        url: cluster.url(),
        cluster: true,
        timeout: portcullis::config::Secs(deadline),
        ..Default::default()
    };
    let store = Arc::new(Store::open(&cfg, Arc::clone(&clock) as Arc<dyn Clock>).unwrap());
    let cfg = GreylistConfig {
        mode: Mode::Enforce,
        auto_allow_after: 1000,
        ..GreylistConfig::default()
    };
    let g = Greylist::new(&cfg, &Thresholds::default(), Arc::clone(&store));
    let sender = |i: usize| format!("s{i}@fail.test");
    for i in 0..60 {
        assert_eq!(
            decide(&g, IP, &sender(i), "r@example.test").await,
            Outcome::New(300)
        );
    }
    clock.advance(Duration::from_secs(301));
    for i in 0..60 {
        assert_eq!(
            decide(&g, IP, &sender(i), "r@example.test").await,
            Outcome::Passed
        );
    }
    // Replication is asynchronous: let the replicas catch up first.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let victim = cluster.master_of("anything");
    let node = cluster.nodes.iter_mut().find(|n| n.port == victim).unwrap();
    node.stop();
    let killed = Instant::now();
    let (mut errors, mut slowest) = (0, Duration::ZERO);
    let recovered = loop {
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "no failover within 30 s ({errors} errors)"
        );
        let mut all_passed = true;
        for i in 0..60 {
            let started = Instant::now();
            let r = g
                .decide(IP.parse().unwrap(), &sender(i), "r@example.test")
                .await;
            slowest = slowest.max(started.elapsed());
            match r {
                Ok(o) => assert_eq!(o, Outcome::Passed, "triplet {i} after the kill"),
                Err(_) => {
                    errors += 1;
                    all_passed = false;
                }
            }
        }
        if all_passed && errors > 0 {
            break killed.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!(
        "cluster master killed: {errors} calls failed, slowest {slowest:?}, every triplet known again after {recovered:?}"
    );
    assert!(
        slowest < deadline + Duration::from_millis(300),
        "{slowest:?}"
    );
    // Writes land too: a new triplet, then its early retry.
    assert_eq!(
        decide(&g, IP, "new@fail.test", "r@example.test").await,
        Outcome::New(300)
    );
    assert!(matches!(
        decide(&g, IP, "new@fail.test", "r@example.test").await,
        Outcome::Early(_)
    ));
}
