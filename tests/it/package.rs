//! The Debian package as an administrator gets it: `dpkg -i`, the system
//! user, conffiles, unit, man pages and completions in place, the installed
//! config validated as shipped and run as the `portcullis` user against a
//! scripted upstream, then `dpkg --purge` removing what install created.
//! The package is built by `packaging/build-deb.sh` (`.ci/run` does).

use crate::common;
use common::{Client, FakeMta, Script};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// Runs a command (as root: through sudo when we are not), asserting it
/// succeeded; its output.
fn root(args: &[&str]) -> Output {
    let out = as_root(args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn as_root(args: &[&str]) -> Command {
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false);
    let mut c = Command::new(if is_root { args[0] } else { "sudo" });
    c.args(if is_root { &args[1..] } else { args });
    c
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The newest package packaging/build-deb.sh made.
fn built_package() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/debian");
    std::fs::read_dir(&dir)
        .ok()
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
        .unwrap_or_else(|| panic!("no .deb in {}: run packaging/build-deb.sh", dir.display()))
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "installs a Debian package (root, dpkg); the package is built by packaging/build-deb.sh, which .ci/run runs"]
async fn the_package_installs_validates_runs_and_purges() {
    let deb = built_package();
    let _ = as_root(&["dpkg", "--purge", "portcullis"]).output();
    root(&["dpkg", "-i", deb.to_str().unwrap()]);

    // The system user, with no login and the state directory as home.
    let user = text(&root(&["getent", "passwd", "portcullis"]));
    assert!(user.contains(":/var/lib/portcullis:"), "{user}");
    assert!(
        user.trim_end().ends_with("nologin") || user.trim_end().ends_with("/bin/false"),
        "{user}"
    );

    // Conffiles: the config and every rule file and list, so an upgrade
    // keeps the administrator's edits.
    let conffiles = text(&root(&[
        "dpkg-query",
        "-W",
        "-f=${Conffiles}",
        "portcullis",
    ]));
    let mut want = vec!["/etc/portcullis/portcullis.yaml".to_string()];
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
    for (dir, ext, under) in [
        (rules.clone(), "yaml", ""),
        (rules.join("lists"), "txt", "lists/"),
    ] {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == ext) {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                want.push(format!("/etc/portcullis/rules/{under}{name}"));
            }
        }
    }
    for f in &want {
        assert!(
            conffiles.contains(&format!(" {f} ")),
            "{f} not a conffile: {conffiles}"
        );
    }

    // The config is readable by the service, not by every local user.
    let mode = text(&root(&[
        "stat",
        "-c",
        "%U:%G %a",
        "/etc/portcullis/portcullis.yaml",
    ]));
    assert_eq!(mode.trim(), "root:portcullis 640");

    // Unit, man pages (compressed, one per subcommand), completions.
    let files = text(&root(&["dpkg", "-L", "portcullis"]));
    for f in [
        "/usr/bin/portcullis",
        "/portcullis.service",
        "/usr/share/man/man8/portcullis.8.gz",
        "/usr/share/man/man8/portcullis-run.8.gz",
        "/usr/share/man/man1/portcullis-check.1.gz",
        "/usr/share/man/man1/portcullis-stats.1.gz",
        "/usr/share/man/man1/portcullis-explain.1.gz",
        "/usr/share/man/man1/portcullis-replay.1.gz",
        "/usr/share/man/man1/portcullis-trace.1.gz",
        "/usr/share/bash-completion/completions/portcullis",
        "/usr/share/zsh/vendor-completions/_portcullis",
        "/usr/share/fish/vendor_completions.d/portcullis.fish",
    ] {
        assert!(
            files.lines().any(|l| l.ends_with(f)),
            "{f} not installed: {files}"
        );
    }
    let man = text(&root(&["zcat", "/usr/share/man/man8/portcullis.8.gz"]));
    assert!(man.contains(".TH portcullis 8"), "{man}");
    // `man portcullis`, as the unit's Documentation= sends an admin there.
    let page = text(&root(&[
        "env",
        "MANPAGER=cat",
        "MANWIDTH=100",
        "man",
        "portcullis",
    ]));
    for want in [
        "FILES",
        "/etc/portcullis/portcullis.yaml",
        "SIGNALS",
        "SIGHUP",
        "EXIT STATUS",
        "SEE ALSO",
        "/usr/share/doc/portcullis/README.md",
    ] {
        assert!(page.contains(want), "man portcullis lacks {want}: {page}");
    }
    let page = text(&root(&[
        "env",
        "MANPAGER=cat",
        "man",
        "1",
        "portcullis-check",
    ]));
    assert!(page.contains("--bind"), "{page}");

    // The installed README's links lead to installed files.
    let doc = Path::new("/usr/share/doc/portcullis");
    let readme = std::fs::read_to_string(doc.join("README.md")).unwrap();
    let mut links = 0;
    for (at, _) in readme.match_indices("](") {
        let target = readme[at + 2..].split(')').next().unwrap();
        if target.starts_with("http") || target.starts_with('#') {
            continue;
        }
        links += 1;
        let path = doc.join(target.split('#').next().unwrap());
        assert!(
            path.exists(),
            "README links to {target}: {} not installed",
            path.display()
        );
    }
    assert!(links >= 4, "{links} links checked");

    // The installed config validates as shipped, read as the service reads it.
    let check = text(&root(&[
        "runuser",
        "-u",
        "portcullis",
        "--",
        "/usr/bin/portcullis",
        "check",
        "--config",
        "/etc/portcullis/portcullis.yaml",
    ]));
    assert!(check.contains("rules"), "{check}");

    // A short run of the installed config, as the portcullis user, with only
    // its two addresses moved onto test ports.
    let mta = FakeMta::start(Script::default()).await;
    let port = common::free_port();
    let shipped = std::fs::read_to_string("/etc/portcullis/portcullis.yaml").unwrap();
    assert!(
        shipped.contains("  - addr: 127.0.0.1:2525\n")
            && shipped.contains("  addr: 127.0.0.1:25\n")
    );
    assert!(
        shipped.contains("\n  file: /var/lib/portcullis/state.jsonl\n"),
        "state file off"
    );
    let run_conf = std::env::temp_dir().join(format!("portcullis-pkg-{}.yaml", std::process::id()));
    std::fs::write(
        &run_conf,
        shipped
            .replace(
                "  - addr: 127.0.0.1:2525\n",
                &format!("  - addr: 127.0.0.1:{port}\n"),
            )
            .replace("  addr: 127.0.0.1:25\n", &format!("  addr: {}\n", mta.addr))
            + "rules_dir: /etc/portcullis/rules\n",
    )
    .unwrap();
    root(&["chmod", "644", run_conf.to_str().unwrap()]);
    let child = common::Killed(
        as_root(&[
            "runuser",
            "-u",
            "portcullis",
            "--",
            "/usr/bin/portcullis",
            "run",
            "--config",
            run_conf.to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap(),
    );
    let gate = common::listening(port).await;
    let mut c = Client::hello(gate).await;
    let r = c
        .send_mail(
            "a@sender.test",
            &["b@example.test"],
            b"Subject: pkg\r\n\r\nhello\r\n",
        )
        .await;
    assert!(r.starts_with("250"), "{r}");
    c.cmd("QUIT", "221").await;
    assert_eq!(mta.stored().len(), 1);
    // `check` beside the running gate, on the addresses it holds, as the
    // README's `portcullis check && systemctl reload portcullis` runs it;
    // and without --config it reads the installed config and says so.
    let check = text(&root(&[
        "runuser",
        "-u",
        "portcullis",
        "--",
        "/usr/bin/portcullis",
        "check",
        "--bind",
        "--config",
        run_conf.to_str().unwrap(),
    ]));
    assert!(check.contains("config ok: 1 listener(s)"), "{check}");
    assert!(
        check.contains(&format!("upstream {} answers", mta.addr)),
        "{check}"
    );
    let check = text(&root(&["/usr/bin/portcullis", "check", "--no-probe"]));
    assert!(
        check.starts_with("config: /etc/portcullis/portcullis.yaml\n"),
        "{check}"
    );
    // SIGTERM: drains, saves the state as the portcullis user, exits 0.
    root(&["pkill", "-TERM", "-u", "portcullis", "-x", "portcullis"]);
    let mut child = child;
    let until = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < until, "did not stop");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status}");
    let state = text(&root(&[
        "stat",
        "-c",
        "%U",
        "/var/lib/portcullis/state.jsonl",
    ]));
    assert_eq!(state.trim(), "portcullis");
    let _ = std::fs::remove_file(&run_conf);

    // Purge: nothing install created is left.
    root(&["dpkg", "--purge", "portcullis"]);
    for gone in [
        "/usr/bin/portcullis",
        "/etc/portcullis",
        "/var/lib/portcullis",
        "/var/log/portcullis",
    ] {
        assert!(!Path::new(gone).exists(), "{gone} left after purge");
    }
    assert!(
        !as_root(&["getent", "passwd", "portcullis"])
            .output()
            .unwrap()
            .status
            .success()
    );
    assert!(
        !as_root(&["getent", "group", "portcullis"])
            .output()
            .unwrap()
            .status
            .success()
    );
}
