//! The `portcullis` command: run the gate, or check a config.

use anyhow::Context;
use clap::{Parser, Subcommand};
use portcullis::config::Config;
use portcullis::server::{Server, notify};
use portcullis::upstream::ProbeError;
use std::path::PathBuf;
use std::process::ExitCode;

#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Writes to standard output. A reader that went away (`portcullis check
/// | head`) ends the process quietly, as Unix tools do, instead of the
/// panic `println!` gives on a broken pipe.
fn write_out(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    if let Err(e) = o.write_fmt(args).and_then(|()| o.flush())
        && e.kind() == std::io::ErrorKind::BrokenPipe
    {
        std::process::exit(0);
    }
}

macro_rules! out {
    ($($t:tt)*) => { write_out(format_args!($($t)*)) };
}

macro_rules! outln {
    ($($t:tt)*) => { write_out(format_args!("{}\n", format_args!($($t)*))) };
}

#[derive(Parser)]
#[command(
    name = "portcullis",
    version,
    about = "Anti-spam filtering SMTP proxy",
    long_about = "Anti-spam filtering SMTP proxy. Portcullis listens on port 25 in front of \
Postfix or Exim (or inside Postfix as a milter), checks SPF, DKIM, DMARC, DNS \
blocklists, greylisting, rate limits and the administrator's YAML rules during \
the SMTP dialogue, and relays each accepted transaction live to the MTA behind \
it, or refuses it with the right reply code. It keeps no queue: what it accepts \
upstream has accepted. Each transaction is one log line, which portcullis stats \
and portcullis trace read."
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the gate in the foreground
    ///
    /// Runs the gate in the foreground, as systemd does (Type=notify).
    /// Without --config: /etc/portcullis/portcullis.yaml when it exists,
    /// else the embedded default config.
    Run {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Validate the config and the rules, beside a running gate
    ///
    /// Safe beside the running gate: it binds nothing unless --bind is
    /// given. Prints which file it read, every error of the config and
    /// the rules in one run (file:line:column: key: message), each check's
    /// mode (record: actions are logged as would=..., not applied), the
    /// rules and which are shadow (try-out) rules, and warnings: upstream,
    /// a nameserver or Redis that does not answer, a log filter that writes
    /// no transaction lines, a host name that is not public. Exit status 1
    /// when anything must be fixed.
    Check {
        #[command(flatten)]
        config: ConfigArg,
        /// Also bind the listen addresses: one held by a process other than
        /// Portcullis is an error.
        #[arg(long)]
        bind: bool,
        /// Do not ask upstream, the nameservers or the state store.
        #[arg(long)]
        no_probe: bool,
    },
    /// Rejection rates from Portcullis log files (json or logfmt; .gz too),
    /// or from standard input.
    Stats {
        /// Log files, plain or gzip; standard input when none
        /// (`journalctl -u portcullis -o short-iso | portcullis stats`).
        files: Vec<PathBuf>,
        /// Only lines at or after this time: an RFC 3339 prefix in UTC
        /// (2026-11-29T08), a span back from now (24h, 7d), today or yesterday.
        #[arg(long)]
        since: Option<String>,
        /// Only lines before this time (same forms as --since).
        #[arg(long)]
        until: Option<String>,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
        /// Also write a self-contained HTML report with charts.
        #[arg(long)]
        html: Option<PathBuf>,
    },
    /// Run the checks and rules for one made-up transaction and print every
    /// result, the score and the reply the client would get.
    Explain {
        #[command(flatten)]
        config: ConfigArg,
        /// The client's address.
        #[arg(long)]
        ip: std::net::IpAddr,
        /// The name the client greets with (HELO/EHLO).
        #[arg(long)]
        helo: String,
        /// The envelope sender (MAIL FROM); empty for a bounce.
        #[arg(long)]
        from: String,
        /// An envelope recipient (RCPT TO); repeat for several.
        #[arg(long)]
        rcpt: Vec<String>,
        /// A message file to run the DATA stage on.
        #[arg(long)]
        message: Option<PathBuf>,
        /// The client used STARTTLS (what `tls: true` rules see).
        #[arg(long)]
        tls: bool,
        /// No DNS: DNS-based checks are off, rules still run.
        #[arg(long)]
        no_dns: bool,
    },
    /// Replay stored mail through today's config and rules: what each
    /// message would get now, and a summary.
    ///
    /// Reads Maildirs (cur and new), mbox files (streamed, so any size)
    /// and .eml files. The envelope comes from Return-Path and
    /// Delivered-To / X-Original-To, the client's address and HELO name
    /// from the topmost Received field (or --ip / --helo). Greylisting,
    /// rate limits and reputation are not replayed. With --log, messages
    /// whose verdict changed since they were logged (matched by queue id
    /// or Message-ID) are marked.
    Replay {
        #[command(flatten)]
        config: ConfigArg,
        /// Maildirs, mbox files, .eml files or directories of them.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// The client's address when no Received field gives it.
        #[arg(long)]
        ip: Option<std::net::IpAddr>,
        /// The client's HELO name when no Received field gives it.
        #[arg(long)]
        helo: Option<String>,
        /// No DNS: DNS-based checks are off, rules still run.
        #[arg(long)]
        no_dns: bool,
        /// One JSON object per message, then a summary object.
        #[arg(long)]
        json: bool,
        /// Our log (plain or gzip), to mark the verdicts that changed.
        #[arg(long)]
        log: Vec<PathBuf>,
    },
    /// Every log line of one session, with what fired and its score.
    ///
    /// Prints the session's lines in time order: each transaction with its
    /// verdict and reply, the checks, the rules that matched, every finding
    /// with its effect, what record-mode checks and shadow rules would have
    /// done, and the score.
    Trace {
        /// A session id (the log's `session`), or the MTA's queue id of a
        /// message it relayed (Postfix's "queued as").
        id: String,
        /// Log files, plain or gzip; standard input when none
        /// (`journalctl -u portcullis -o short-iso | portcullis trace ID`).
        files: Vec<PathBuf>,
    },
    /// Man pages and shell completions, from this command line's own
    /// definition (for packaging).
    #[command(hide = true)]
    Generate {
        #[command(subcommand)]
        what: Generate,
    },
}

/// The config file, as every verb that reads one takes it.
#[derive(clap::Args)]
struct ConfigArg {
    /// The config file [default: /etc/portcullis/portcullis.yaml when it
    /// exists, else the embedded default].
    #[arg(long, short, env = "PORTCULLIS_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
}

impl ConfigArg {
    /// The file named, or the installed one; None: the embedded default.
    fn path(self) -> Option<PathBuf> {
        self.config.or_else(portcullis::config::installed_path)
    }
}

#[derive(Subcommand)]
enum Generate {
    /// portcullis(8) and one page per subcommand, written to DIR.
    Man { dir: PathBuf },
    /// A completion script for SHELL, on standard output.
    Completions { shell: clap_complete::Shell },
}

/// Writes portcullis.8, portcullis-run.8 and portcullis-VERB.1 (the visible
/// subcommands) to `dir`: the command line's own definition, then the
/// sections `cli::man` adds (FILES, SIGNALS, EXIT STATUS, ...).
fn man_pages(dir: &std::path::Path) -> std::io::Result<Vec<PathBuf>> {
    use clap::CommandFactory;
    use portcullis::cli::man;
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    let page = |cmd: clap::Command, sub: &str, commands: Option<String>| {
        let section = man::section(sub);
        let m = clap_mangen::Man::new(cmd).section(section);
        let mut roff = Vec::new();
        m.render_title(&mut roff)?;
        m.render_name_section(&mut roff)?;
        m.render_synopsis_section(&mut roff)?;
        m.render_description_section(&mut roff)?;
        m.render_options_section(&mut roff)?;
        if let Some(c) = commands {
            roff.extend_from_slice(c.as_bytes());
        }
        roff.extend_from_slice(man::extra(sub).as_bytes());
        let path = dir.join(m.get_filename());
        std::fs::write(&path, roff)?;
        Ok::<_, std::io::Error>(path)
    };
    let mut written = Vec::new();
    let mut commands = String::from(".SH COMMANDS\n");
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let verb = sub.get_name().to_string();
        commands.push_str(&format!(
            ".TP\n\\fBportcullis\\-{verb}\\fR({})\n{}\n",
            man::section(&verb),
            sub.get_about().map(|a| a.to_string()).unwrap_or_default()
        ));
        written.push(page(sub.clone(), &verb, None)?);
    }
    written.push(page(cmd, "", Some(commands))?);
    Ok(written)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Generate {
            what: Generate::Man { dir },
        } => match man_pages(&dir) {
            Ok(pages) => {
                for p in pages {
                    outln!("{}", p.display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: {e}", dir.display());
                ExitCode::FAILURE
            }
        },
        Cmd::Generate {
            what: Generate::Completions { shell },
        } => {
            use clap::CommandFactory;
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "portcullis", &mut out);
            out!("{}", String::from_utf8_lossy(&out));
            ExitCode::SUCCESS
        }
        Cmd::Check {
            config,
            bind,
            no_probe,
        } => {
            let found = portcullis::cli::check::check(&portcullis::cli::check::Options {
                config: config.config.as_deref(),
                bind,
                probe: !no_probe,
            });
            out!("{}", found.report);
            for p in &found.errors {
                eprintln!("{p}");
            }
            if found.errors.is_empty() {
                ExitCode::SUCCESS
            } else {
                eprintln!(
                    "portcullis: {} problem(s) to fix; nothing was changed",
                    found.errors.len()
                );
                ExitCode::FAILURE
            }
        }
        Cmd::Trace { id, files } => match trace(&id, &files) {
            Ok(text) => {
                out!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("portcullis: {e:#}");
                ExitCode::FAILURE
            }
        },
        Cmd::Stats {
            files,
            since,
            until,
            json,
            html,
        } => match stats(files, since, until, json, html) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("portcullis: {e:#}");
                ExitCode::FAILURE
            }
        },
        Cmd::Replay {
            config,
            paths,
            ip,
            helo,
            no_dns,
            json,
            log,
        } => {
            let run = || -> anyhow::Result<()> {
                let cfg = Config::load(config.path().as_deref())?;
                let rt = tokio::runtime::Runtime::new()?;
                let opts = portcullis::cli::replay::Options {
                    paths,
                    ip,
                    helo,
                    no_dns,
                    json,
                    logs: log,
                };
                let stdout = std::io::stdout();
                let mut out = std::io::BufWriter::new(stdout.lock());
                rt.block_on(portcullis::cli::replay::run(cfg, &opts, &mut out))
                    .map_err(anyhow::Error::msg)?;
                Ok(())
            };
            match run() {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("portcullis: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Explain {
            config,
            ip,
            helo,
            from,
            rcpt,
            message,
            tls,
            no_dns,
        } => {
            let run = || -> anyhow::Result<String> {
                let cfg = Config::load(config.path().as_deref())?;
                let msg = match &message {
                    Some(p) => {
                        Some(std::fs::read(p).with_context(|| format!("reading {}", p.display()))?)
                    }
                    None => None,
                };
                let rt = tokio::runtime::Runtime::new()?;
                rt.block_on(portcullis::cli::explain::explain(
                    cfg,
                    portcullis::cli::explain::Sample {
                        ip,
                        helo,
                        from,
                        rcpts: rcpt,
                        message: msg,
                        tls,
                        no_dns,
                    },
                ))
                .map_err(anyhow::Error::msg)
            };
            match run() {
                Ok(out) => {
                    out!("{out}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("portcullis: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Run { config } => match run(config.path()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("portcullis: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Two passes over the files (a queue id is logged at the end of its
/// session); standard input is read once and held.
fn trace(id: &str, files: &[PathBuf]) -> anyhow::Result<String> {
    use portcullis::cli::{logs::PrefixClock, trace};
    let clock = PrefixClock::system();
    let lines = if files.is_empty() {
        let all: Vec<String> = portcullis::cli::logs::log_lines(files)?.collect();
        let sessions = trace::sessions_of(id, all.iter().cloned(), &clock);
        trace::lines_of(&sessions, all.into_iter(), &clock)
    } else {
        let sessions = trace::sessions_of(id, portcullis::cli::logs::log_lines(files)?, &clock);
        trace::lines_of(&sessions, portcullis::cli::logs::log_lines(files)?, &clock)
    };
    if lines.is_empty() {
        anyhow::bail!("no session or queue id {id:?} in the log");
    }
    Ok(trace::render(&lines))
}

fn stats(
    files: Vec<PathBuf>,
    since: Option<String>,
    until: Option<String>,
    json: bool,
    html: Option<PathBuf>,
) -> anyhow::Result<()> {
    let lines = portcullis::cli::logs::log_lines(&files)?;
    let now = std::time::SystemTime::now();
    let when = |t: Option<String>| -> anyhow::Result<Option<String>> {
        t.map(|t| portcullis::cli::stats::resolve_time(&t, now).map_err(anyhow::Error::msg))
            .transpose()
    };
    let window = portcullis::cli::stats::Window {
        since: when(since)?,
        until: when(until)?,
    };
    let windowed = window.since.is_some() || window.until.is_some();
    let report = portcullis::cli::stats::compute(lines, &window);
    if report.untimed > 0 {
        // Written to the journal, our lines carry no time; `-o cat` drops
        // the journal's.
        eprintln!(
            "portcullis: {} lines carry no time{}; read the journal with `journalctl -u portcullis -o short-iso`",
            report.untimed,
            if windowed {
                " and were left out of --since/--until"
            } else {
                " (counted, under \"(no time)\" per hour)"
            }
        );
    }
    if report.lines == 0 {
        // A silent zero would read as "nothing was refused".
        let input = portcullis::cli::logs::input_name(&files);
        anyhow::bail!(
            "no Portcullis log lines in {input} (transaction or refused events; from journald use `journalctl -u portcullis -o short-iso`)"
        );
    }
    if let Some(path) = html {
        std::fs::write(&path, report.to_html())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if json {
        outln!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        out!("{}", report.to_text());
    }
    Ok(())
}

fn run(config: Option<PathBuf>) -> anyhow::Result<()> {
    let cfg = Config::load(config.as_deref())?;
    // What `check` finds missing on this host (a directory for the state
    // file, a certificate) would fail later, or lose state at shutdown.
    let problems = portcullis::server::preflight(&cfg);
    if !problems.is_empty() {
        anyhow::bail!("{}", problems.join("\n"));
    }
    let log_target = portcullis::telemetry::init(&cfg.log).map_err(anyhow::Error::msg)?;
    portcullis::server::raise_descriptors(&cfg);
    let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
    rt.block_on(async move {
        // Before anything is bound: a SIGHUP during start-up must not
        // kill the process (its default action).
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
        let server = Server::bind(cfg).await?;
        // A milter-only gate has no upstream: nothing to probe or report.
        if !server.local_addrs().is_empty() {
            let upstream = server.upstream();
            match upstream.probe().await {
                Ok(id) => {
                    tracing::info!(upstream = %upstream.addr, identity = id.as_str(), "upstream ready")
                }
                // Refuse to run when the client address cannot be passed on.
                Err(e @ ProbeError::NoIdentity(_)) => return Err(anyhow::anyhow!(e)),
                // Logged as an error, naming upstream, by the probe itself.
                Err(_) => {}
            }
        }
        server.announce().await;
        // Rules also reload on file changes, debounced.
        server.rules().watch(std::time::Duration::from_millis(500));
        let hangup = server.on_hangup(log_target, config);
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                hangup.reload().await;
            }
        });
        for a in server.local_addrs() {
            tracing::info!(listen = %a, version = env!("CARGO_PKG_VERSION"), "listening");
        }
        // Every listener is bound and upstream was probed.
        notify::ready();
        server.run(shutdown_signal()).await;
        Ok(())
    })
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
