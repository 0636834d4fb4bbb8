//! Real peers for the end-to-end tests: Postfix started on free loopback
//! ports under a temp dir, and small process helpers.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A port for a peer (Postfix, Exim) outside the kernel's ephemeral range.
/// Peers bind their port a second or so after we pick it; an ephemeral port
/// could meanwhile be taken by a test's own `127.0.0.1:0` listener.
pub fn peer_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 20000 + (std::process::id() % 400) as u16 * 20;
    loop {
        let port = base + NEXT.fetch_add(1, Ordering::Relaxed) % 2000;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

pub fn render(template: &str, run: &Path, port: u16, proxy_port: u16) -> String {
    template
        .replace("@RUN@", &run.display().to_string())
        .replace("@PORT@", &port.to_string())
        .replace("@PROXY_PORT@", &proxy_port.to_string())
}

pub fn wait_port(port: u16) {
    let until = Instant::now() + Duration::from_secs(20);
    while Instant::now() < until {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("nothing listening on {port}");
}

pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed: {text}");
    text
}

/// Waits for exactly one file in a Maildir's `new/` and returns it.
pub fn one_mail(dir: &Path) -> String {
    let until = Instant::now() + Duration::from_secs(30);
    while Instant::now() < until {
        if let Ok(rd) = std::fs::read_dir(dir) {
            let files: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
            if let Some(f) = files.first() {
                assert_eq!(files.len(), 1, "more than one message in {}", dir.display());
                return std::fs::read_to_string(f).unwrap();
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("no mail arrived in {}", dir.display());
}

/// Every message in a Maildir's directory once `n` have arrived, or
/// whatever is there when `within` has passed; sorted.
pub fn mails(dir: &Path, n: usize, within: Duration) -> Vec<String> {
    let until = Instant::now() + within;
    loop {
        let files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        if files.len() >= n || Instant::now() > until {
            let mut all: Vec<String> = files
                .iter()
                .map(|f| std::fs::read_to_string(f).unwrap())
                .collect();
            all.sort();
            return all;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub struct Postfix {
    pub conf: PathBuf,
    pub run: PathBuf,
    pub port: u16,
    pub proxy_port: u16,
}

impl Postfix {
    pub fn start(name: &str) -> Postfix {
        Self::start_with(name, "")
    }

    /// Starts with `extra` lines appended to main.cf.
    pub fn start_with(name: &str, extra: &str) -> Postfix {
        let base =
            std::env::temp_dir().join(format!("portcullis-e2e-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let (conf, run_dir) = (base.join("conf"), base.join("run"));
        for d in ["queue", "data", "mail"] {
            std::fs::create_dir_all(run_dir.join(d)).unwrap();
        }
        std::fs::create_dir_all(&conf).unwrap();
        let (port, proxy_port) = (peer_port(), peer_port());
        let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/postfix");
        for f in ["main.cf", "master.cf"] {
            let t = std::fs::read_to_string(here.join(f)).unwrap();
            let mut text = render(&t, &run_dir, port, proxy_port);
            if f == "main.cf" {
                text = with_overrides(&text, extra);
            }
            std::fs::write(conf.join(f), text).unwrap();
        }
        // No warnings: every Postfix process repeats a main.cf warning at
        // start, postlogd too before it logs to the file, and past 10
        // queued datagrams (net.unix.max_dgram_qlen) postlogd blocks on
        // its own socket for good (seen in CI: `postfix stop` then hung).
        let warned = run(Command::new("postconf").arg("-c").arg(&conf).arg("-n"));
        assert!(!warned.contains("warning"), "{warned}");
        run(Command::new("chown").args(["postfix", run_dir.join("data").to_str().unwrap()]));
        run(Command::new("chown").args(["nobody:nogroup", run_dir.join("mail").to_str().unwrap()]));
        run(Command::new("postfix").arg("-c").arg(&conf).arg("check"));
        run(Command::new("postfix").arg("-c").arg(&conf).arg("start"));
        wait_port(port);
        wait_port(proxy_port);
        Postfix {
            conf,
            run: run_dir,
            port,
            proxy_port,
        }
    }

    pub fn inbox(&self) -> PathBuf {
        self.run.join("mail/inbox/new")
    }
}

/// `main.cf` with `extra`'s parameters in place of the template's
/// (appended twice, Postfix warns in every process; see `start_with`).
fn with_overrides(template: &str, extra: &str) -> String {
    let name = |l: &str| {
        l.split_once('=')
            .filter(|_| !l.starts_with([' ', '\t', '#']))
            .map(|(n, _)| n.trim().to_string())
    };
    let set: std::collections::HashSet<String> = extra.lines().filter_map(name).collect();
    let mut out = String::new();
    let mut skipping = false;
    for line in template.lines() {
        if line.starts_with([' ', '\t']) && !line.trim().is_empty() {
            // A continuation of the line before.
        } else {
            skipping = name(line).is_some_and(|n| set.contains(&n));
        }
        if !skipping {
            out.push_str(line);
            out.push('\n');
        }
    }
    out.push_str(extra);
    out
}

impl Drop for Postfix {
    /// `postfix stop`, within 20 s; past that (a wedged instance), its
    /// master's process group is killed, so that no test run hangs here.
    fn drop(&mut self) {
        let stop = Command::new("postfix")
            .arg("-c")
            .arg(&self.conf)
            .arg("stop")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        let Ok(mut stop) = stop else {
            return;
        };
        let until = Instant::now() + Duration::from_secs(20);
        while Instant::now() < until {
            if let Ok(Some(_)) = stop.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = stop.kill();
        let _ = stop.wait();
        let pid =
            std::fs::read_to_string(self.run.join("queue/pid/master.pid")).unwrap_or_default();
        if let Ok(pid) = pid.trim().parse::<u32>() {
            eprintln!("postfix stop hung; killing master {pid} and its children");
            // The master starts its own session: its group is its pid.
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}"), &pid.to_string()])
                .status();
        }
    }
}

/// A `redis-server` on a free loopback port, in a temp dir, with no
/// persistence; killed when dropped.
pub struct Redis {
    pub port: u16,
    child: std::process::Child,
    dir: PathBuf,
    extra: Vec<String>,
}

impl Redis {
    pub fn start() -> Redis {
        Self::start_node(&[])
    }

    /// One that keeps every write on disk (so it survives `restart`).
    pub fn durable() -> Redis {
        Self::start_node(&["--appendonly", "yes", "--appendfsync", "always"])
    }

    /// A cluster node also listens on its port + 10000 (the cluster bus),
    /// which lies among the ephemeral ports other tests are handed: a node
    /// whose bus port was taken exits at once, and is started again on
    /// another port.
    fn start_node(extra: &[&str]) -> Redis {
        let cluster = extra.contains(&"--cluster-enabled");
        for _ in 0..5 {
            let port = loop {
                let p = peer_port();
                if !cluster || std::net::TcpListener::bind(("127.0.0.1", p + 10000)).is_ok() {
                    break p;
                }
            };
            let dir = std::env::temp_dir()
                .join(format!("portcullis-redis-{}-{port}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let mut child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no", "--dir"])
                .arg(&dir)
                .args(extra)
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("redis-server (Debian package redis-server; .ci/run installs it)");
            let until = Instant::now() + Duration::from_secs(20);
            while Instant::now() < until {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    let extra = extra.iter().map(|s| s.to_string()).collect();
                    return Redis {
                        port,
                        child,
                        dir,
                        extra,
                    };
                }
                if child.try_wait().ok().flatten().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("redis-server did not start in 5 tries");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Stops the server (as a crash would), keeping its port.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same port (with what a durable one kept).
    pub fn restart(&mut self) {
        self.stop();
        self.child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(&self.dir)
            .args(&self.extra)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server");
        wait_port(self.port);
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Redis nodes on loopback joined into one cluster: three masters, and
/// with `with_replicas` a replica for each (failover after 1 s).
pub struct RedisCluster {
    pub nodes: Vec<Redis>,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        Self::create(0)
    }

    /// Three masters and three replicas; a master silent for 1 s is
    /// replaced by its replica.
    pub fn with_replicas() -> RedisCluster {
        Self::create(1)
    }

    fn create(replicas: usize) -> RedisCluster {
        // Replicas sync at once (Redis waits 5 s for more replicas by
        // default, and a replica that never synced cannot take over).
        let nodes: Vec<Redis> = (0..3 * (1 + replicas))
            .map(|_| {
                Redis::start_node(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-node-timeout",
                    "1000",
                    "--repl-diskless-sync-delay",
                    "0",
                ])
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        run(Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"]));
        let cluster = RedisCluster { nodes };
        for n in &cluster.nodes {
            cluster.wait_ok(n.port, Duration::from_secs(20));
        }
        if replicas > 0 {
            cluster.wait_replicas_synced(Duration::from_secs(20));
        }
        cluster
    }

    /// Waits until every replica has its master's data.
    fn wait_replicas_synced(&self, within: Duration) {
        let until = Instant::now() + within;
        for n in &self.nodes {
            loop {
                let info = run(Command::new("redis-cli").args([
                    "-p",
                    &n.port.to_string(),
                    "info",
                    "replication",
                ]));
                if info.contains("role:master") || info.contains("master_link_status:up") {
                    break;
                }
                assert!(Instant::now() < until, "replica not in sync: {info}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// Waits until the node on `port` says the cluster is whole.
    pub fn wait_ok(&self, port: u16, within: Duration) {
        let until = Instant::now() + within;
        loop {
            let info =
                run(Command::new("redis-cli").args(["-p", &port.to_string(), "cluster", "info"]));
            if info.contains("cluster_state:ok") {
                return;
            }
            assert!(Instant::now() < until, "cluster not ok: {info}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The port of the master serving `key` now, as node 0 sees it.
    pub fn master_of(&self, key: &str) -> u16 {
        let port = self.nodes[0].port.to_string();
        let slot: u16 =
            run(Command::new("redis-cli").args(["-p", &port, "cluster", "keyslot", key]))
                .trim()
                .parse()
                .unwrap();
        let nodes = run(Command::new("redis-cli").args(["-p", &port, "cluster", "nodes"]));
        for line in nodes.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if !f.get(2).is_some_and(|flags| flags.contains("master")) {
                continue;
            }
            let serves = f.iter().skip(8).any(|range| {
                let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                matches!((lo.parse::<u16>(), hi.parse::<u16>()), (Ok(lo), Ok(hi)) if (lo..=hi).contains(&slot))
            });
            if serves {
                let addr = f[1].split('@').next().unwrap();
                return addr.rsplit(':').next().unwrap().parse().unwrap();
            }
        }
        panic!("no master for slot {slot}: {nodes}");
    }

    /// Every node, comma separated, as `state.url` takes them.
    pub fn url(&self) -> String {
        let urls: Vec<String> = self.nodes.iter().map(Redis::url).collect();
        urls.join(",")
    }
}

/// HAProxy in TCP mode on a free loopback port, balancing round robin
/// over `servers` with PROXY v2 (health checks send it too); killed when
/// dropped.
pub struct Haproxy {
    pub port: u16,
    child: std::process::Child,
    dir: PathBuf,
}

impl Haproxy {
    pub fn start(servers: &[std::net::SocketAddr]) -> Haproxy {
        let port = peer_port();
        let dir =
            std::env::temp_dir().join(format!("portcullis-haproxy-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("admin.sock");
        let mut cfg = format!(
            "global\n    maxconn 2000\n    stats socket {}\ndefaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\nfrontend smtp\n    bind 127.0.0.1:{port}\n    default_backend gates\nbackend gates\n    balance roundrobin\n",
            sock.display()
        );
        for (i, s) in servers.iter().enumerate() {
            cfg.push_str(&format!(
                "    server g{i} {s} send-proxy-v2 check check-send-proxy inter 2s\n"
            ));
        }
        let file = dir.join("haproxy.cfg");
        std::fs::write(&file, cfg).unwrap();
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&file)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("haproxy (Debian package haproxy; .ci/run installs it)");
        wait_port(port);
        let lb = Haproxy { port, child, dir };
        lb.wait_all_up(servers.len());
        lb
    }

    /// Waits until the health checks have every server UP, so that round
    /// robin alternates between them.
    fn wait_all_up(&self, n: usize) {
        use std::io::{Read, Write};
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            let mut stat = String::new();
            if let Ok(mut s) = std::os::unix::net::UnixStream::connect(self.dir.join("admin.sock"))
            {
                let _ = s.write_all(b"show stat\n");
                let _ = s.read_to_string(&mut stat);
            }
            let up = stat
                .lines()
                .filter(|l| l.starts_with("gates,g") && l.split(',').nth(17) == Some("UP"))
                .count();
            if up == n {
                return;
            }
            assert!(Instant::now() < until, "servers not UP: {stat}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis-backed state store at `url` (a cluster's nodes when `cluster`),
/// deciding by `clock`, with a deadline generous enough for a busy test
/// machine.
pub fn redis_store(
    url: String,
    cluster: bool,
    clock: &std::sync::Arc<portcullis::state::TestClock>,
) -> portcullis::state::Store {
    use portcullis::config::{StateBackend, StateConfig};
    let cfg = StateConfig {
        backend: StateBackend::Redis,
        url,
        cluster,
        timeout: portcullis::config::Secs(Duration::from_secs(2)),
        ..StateConfig::default()
    };
    let clock = std::sync::Arc::clone(clock) as std::sync::Arc<dyn portcullis::state::Clock>;
    portcullis::state::Store::open(&cfg, clock).unwrap()
}

/// Debian's rspamd with its stock rules, only its normal worker, on a
/// free loopback port; DNS pointed at the test's server (no query leaves
/// the machine), no Redis (no Bayes), state under a temp dir.
pub struct Rspamd {
    pub addr: std::net::SocketAddr,
    run: PathBuf,
}

impl Rspamd {
    pub fn start(name: &str, nameserver: std::net::SocketAddr) -> Rspamd {
        let port = peer_port();
        let base =
            std::env::temp_dir().join(format!("portcullis-rspamd-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let (local, run_dir) = (base.join("local"), base.join("run"));
        std::fs::create_dir_all(local.join("override.d")).unwrap();
        std::fs::create_dir_all(&run_dir).unwrap();
        let o = local.join("override.d");
        let write = |f: &str, s: String| std::fs::write(o.join(f), s).unwrap();
        write(
            "worker-normal.inc",
            format!("bind_socket = \"127.0.0.1:{port}\";\ncount = 1;\n"),
        );
        for w in ["controller", "proxy", "fuzzy"] {
            write(&format!("worker-{w}.inc"), "enabled = false;\n".into());
        }
        write(
            "options.inc",
            format!(
                "pidfile = \"{}/rspamd.pid\";\ndns {{\n  nameserver = [\"{nameserver}\"];\n  timeout = 0.5s;\n  retransmits = 1;\n}}\n",
                run_dir.display()
            ),
        );
        write(
            "logging.inc",
            format!(
                "type = \"file\";\nfilename = \"{}/rspamd.log\";\nlevel = \"notice\";\n",
                run_dir.display()
            ),
        );
        run(Command::new("chown").args(["-R", "_rspamd", run_dir.to_str().unwrap()]));
        let var = |k: &str, v: &Path| format!("--var={k}={}", v.display());
        // It daemonizes with our stdout still open: reading its output
        // would wait for the daemon's end.
        let status = Command::new("rspamd")
            .args([
                "-u",
                "_rspamd",
                "-g",
                "_rspamd",
                "-c",
                "/etc/rspamd/rspamd.conf",
            ])
            .arg(var("LOCAL_CONFDIR", &local))
            .arg(var("DBDIR", &run_dir))
            .arg(var("RUNDIR", &run_dir))
            .arg(var("LOGDIR", &run_dir))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("start rspamd");
        assert!(status.success(), "rspamd: {status}");
        wait_port(port);
        Rspamd {
            addr: ([127, 0, 0, 1], port).into(),
            run: run_dir,
        }
    }
}

impl Rspamd {
    /// Stops it and waits until its port is closed.
    pub fn stop(&self) {
        if let Ok(pid) = std::fs::read_to_string(self.run.join("rspamd.pid")) {
            let _ = Command::new("kill").arg(pid.trim()).output();
        }
        let until = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(self.addr).is_ok() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Rspamd {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self.run.join("rspamd.pid")) {
            let _ = Command::new("kill").arg(pid.trim()).output();
        }
    }
}

/// Debian's spamd (SpamAssassin) on a free loopback port, local tests only
/// (`-L`: no DNS or network rules), one child.
pub struct Spamd {
    pub addr: std::net::SocketAddr,
    run: PathBuf,
}

impl Spamd {
    pub fn start(name: &str) -> Spamd {
        let port = peer_port();
        let run_dir =
            std::env::temp_dir().join(format!("portcullis-spamd-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&run_dir);
        std::fs::create_dir_all(&run_dir).unwrap();
        run(Command::new("chown").args(["-R", "debian-spamd", run_dir.to_str().unwrap()]));
        let d = run_dir.display();
        run(Command::new("spamd").args([
            &format!("--listen=127.0.0.1:{port}"),
            "-u",
            "debian-spamd",
            &format!("--pidfile={d}/spamd.pid"),
            "-s",
            &format!("{d}/spamd.log"),
            "-L",
            "--max-children=1",
            &format!("--helper-home-dir={d}"),
            "-d",
        ]));
        wait_port(port);
        Spamd {
            addr: ([127, 0, 0, 1], port).into(),
            run: run_dir,
        }
    }
}

impl Drop for Spamd {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self.run.join("spamd.pid")) {
            let _ = Command::new("kill").arg(pid.trim()).output();
        }
    }
}
