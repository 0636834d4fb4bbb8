//! The `portcullis` command: run the gate, or check a config.

use anyhow::Context;
use clap::{Parser, Subcommand};
use portcullis::config::Config;
use portcullis::server::Server;
use portcullis::upstream::ProbeError;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "portcullis", version, about = "Anti-spam filtering SMTP proxy")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the proxy (with the embedded default config unless --config is given).
    Run {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate the config and the rules; print a summary of the rules.
    Check {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Run the checks and rules for one made-up transaction and print every
    /// result, the score and the reply the client would get.
    Explain {
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(long)]
        ip: std::net::IpAddr,
        #[arg(long)]
        helo: String,
        #[arg(long)]
        from: String,
        #[arg(long)]
        rcpt: Vec<String>,
        /// A message file to run the DATA stage on.
        #[arg(long)]
        message: Option<PathBuf>,
        /// No DNS: DNS-based checks are off, rules still run.
        #[arg(long)]
        no_dns: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Check { config } => match Config::load(config.as_deref()) {
            Ok(c) => match portcullis::server::load_rules(&c) {
                Ok(rules) => {
                    println!(
                        "config ok: {} listener(s), upstream {}",
                        c.listen.len(),
                        c.upstream.addr
                    );
                    print!("rules ok: {}", rules.current().summary());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            },
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Cmd::Explain {
            config,
            ip,
            helo,
            from,
            rcpt,
            message,
            no_dns,
        } => {
            let run = || -> anyhow::Result<String> {
                let cfg = Config::load(config.as_deref())?;
                let msg = match &message {
                    Some(p) => {
                        Some(std::fs::read(p).with_context(|| format!("reading {}", p.display()))?)
                    }
                    None => None,
                };
                let rt = tokio::runtime::Runtime::new()?;
                rt.block_on(portcullis::explain::explain(
                    cfg,
                    portcullis::explain::Input {
                        ip,
                        helo,
                        from,
                        rcpts: rcpt,
                        message: msg,
                        no_dns,
                    },
                ))
                .map_err(anyhow::Error::msg)
            };
            match run() {
                Ok(out) => {
                    print!("{out}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("portcullis: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Run { config } => match run(config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("portcullis: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn run(config: Option<PathBuf>) -> anyhow::Result<()> {
    let cfg = Config::load(config.as_deref())?;
    let config = config.clone();
    portcullis::telemetry::init(&cfg.log).map_err(anyhow::Error::msg)?;
    let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
    rt.block_on(async move {
        let server = Server::bind(cfg).await?;
        let upstream = server.upstream();
        match upstream.probe().await {
            Ok(id) => {
                tracing::info!(upstream = %upstream.addr, identity = id.as_str(), "upstream ready")
            }
            // Refuse to run when the client address cannot be passed on.
            Err(e @ ProbeError::NoIdentity(_)) => return Err(anyhow::anyhow!(e)),
            Err(e) => tracing::warn!(
                upstream = %upstream.addr,
                error = %e,
                "upstream not reachable yet: answering 4xx until it is"
            ),
        }
        let reloader = server.tls_reloader();
        let config_reloader = server.config_reloader();
        let config_path = config.clone();
        let rules = server.rules();
        // Rules also reload on file changes, debounced.
        let _watcher = rules.watch(std::time::Duration::from_millis(500));
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let Ok(mut hup) = signal(SignalKind::hangup()) else {
                return;
            };
            while hup.recv().await.is_some() {
                match reloader.reload() {
                    Ok(()) => tracing::info!("SIGHUP: TLS certificate reloaded"),
                    Err(e) => tracing::error!(error = %e, "SIGHUP: TLS reload failed; keeping the old certificate"),
                }
                let _ = rules.reload();
                if let Some(p) = &config_path {
                    let _ = config_reloader.reload(p);
                }
            }
        });
        for a in server.local_addrs() {
            tracing::info!(listen = %a, version = env!("CARGO_PKG_VERSION"), "listening");
        }
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
