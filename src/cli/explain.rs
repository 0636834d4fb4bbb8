//! `portcullis explain`: one made-up transaction through the same
//! `checks::Screen` that the proxy session drives, printed step by step
//! (like `spamassassin -t`). No network client and no MTA: every
//! recipient the checks let through counts as accepted.

use crate::checks::{CheckLog, DataChecks, Engine, Screen, Screened, pool::SharedMessage};
use crate::config::{Config, Mode};
use crate::dns::Dns;
use crate::state::{Store, SystemClock};
use crate::verdict::{Decision, Outcome};
use crate::wire::reply::Reply;
use std::fmt::Write;
use std::net::IpAddr;
use std::sync::Arc;

pub struct Sample {
    pub ip: IpAddr,
    pub helo: String,
    pub from: String,
    pub rcpts: Vec<String>,
    pub message: Option<Vec<u8>>,
    /// The client used STARTTLS.
    pub tls: bool,
    /// DNS-based checks off; rules still run.
    pub no_dns: bool,
}

/// What the screen said at each stage.
#[derive(Debug, Clone, PartialEq)]
pub struct Explained {
    pub allowed: bool,
    pub mail: Screened,
    /// The results after MAIL.
    pub mail_log: CheckLog,
    /// Each recipient with its refusal, if the checks refused it.
    pub rcpts: Vec<(String, Option<(Reply, String)>)>,
    /// Each recipient's policy and why it applies.
    pub policies: Vec<String>,
    pub data: Option<DataChecks>,
    /// The results of the whole transaction, as its log line has them.
    pub log: CheckLog,
}

/// Runs the transaction through the screen of `cfg`.
pub async fn run(cfg: Config, input: &Sample) -> Result<Explained, String> {
    Judge::new(cfg, input.no_dns)?.judge(input).await
}

/// The checks and rules of one config, loaded once, for judging made-up
/// or replayed transactions one after another.
pub struct Judge {
    engine: Arc<Engine>,
    rules: Arc<crate::rules::RuleSet>,
    names: bool,
}

impl Judge {
    /// `no_dns`: the DNS-based checks off.
    pub fn new(cfg: Config, no_dns: bool) -> Result<Judge, String> {
        Self::with(cfg, no_dns, |_| {})
    }

    /// Like `new`, after `adjust` has changed the checks' config.
    pub fn with(
        mut cfg: Config,
        no_dns: bool,
        adjust: impl FnOnce(&mut crate::config::ChecksConfig),
    ) -> Result<Judge, String> {
        if no_dns {
            let c = &mut cfg.checks;
            for m in [
                &mut c.spf.mode,
                &mut c.dkim.mode,
                &mut c.dmarc.mode,
                &mut c.iprev.mode,
                &mut c.arc.mode,
                &mut c.dnsbl.mode,
                &mut c.uribl.mode,
            ] {
                *m = Mode::Off;
            }
        }
        adjust(&mut cfg.checks);
        let rules = crate::rules::load(&cfg)
            .map_err(|e| e.to_string())?
            .current();
        let dns = Dns::new(&cfg.dns).map_err(|e| e.to_string())?;
        // No memory: to greylisting every triplet is new.
        let store = Arc::new(Store::in_memory(100_000, Arc::new(SystemClock)));
        let engine = Arc::new(Engine::new(&cfg, dns, store));
        Ok(Judge {
            engine,
            rules,
            names: !no_dns,
        })
    }

    /// One transaction through the screen.
    pub async fn judge(&self, input: &Sample) -> Result<Explained, String> {
        judge(
            Arc::clone(&self.engine),
            Arc::clone(&self.rules),
            self.names,
            input,
        )
        .await
    }
}

async fn judge(
    engine: Arc<Engine>,
    rules: Arc<crate::rules::RuleSet>,
    names: bool,
    input: &Sample,
) -> Result<Explained, String> {
    // The client's name as an MTA asking for it (XCLIENT) would see it.
    let mut screen = Screen::new(engine, rules, input.ip, names);
    let admitted = screen.admit().await;
    screen.helo(&input.helo);
    screen.tls(input.tls);
    let mail = match admitted {
        Some((reply, reason)) => Screened::Refused { reply, reason },
        None => screen.mail(&input.from, None).await,
    };
    let mut x = Explained {
        allowed: screen.allowed(),
        mail_log: screen.log(),
        mail,
        rcpts: Vec::new(),
        policies: Vec::new(),
        data: None,
        log: CheckLog::default(),
    };
    if let Screened::Verdict(Outcome {
        decision: Decision::Accept | Decision::Tag,
        ..
    }) = x.mail
    {
        for r in &input.rcpts {
            x.policies.push(match screen.policy_of(r) {
                Some((p, why)) => format!("policy {} ({}: {why})", p.name, p.file.display()),
                None => "the gate's policy (no policy file covers it)".into(),
            });
            let refused = screen.rcpt(r).await;
            if refused.is_none() {
                screen.rcpt_accepted(r);
            }
            x.rcpts.push((r.clone(), refused));
        }
        if let Some(msg) = input.message.clone().filter(|_| !screen.rcpts().is_empty()) {
            let msg: SharedMessage = Arc::new(msg);
            x.data = Some(screen.data(&msg).await);
        }
    }
    x.log = screen.log();
    Ok(x)
}

fn reply_text(r: &Reply) -> String {
    let mut s = Vec::new();
    r.write_to(&mut s);
    String::from_utf8_lossy(&s).trim_end().to_string()
}

fn reply_line(o: &Outcome) -> String {
    match &o.decision {
        Decision::Reject(r) | Decision::Tempfail(r) => reply_text(r),
        Decision::Accept => "accept".into(),
        Decision::Tag => "accept, tagged as spam".into(),
    }
}

fn results(out: &mut String, log: &CheckLog) {
    let show = |v: &str| if v.is_empty() { "-" } else { v }.to_string();
    let _ = writeln!(
        out,
        "  spf={} dkim={} dmarc={} iprev={} arc={} antivirus={}",
        show(&log.spf),
        show(&log.dkim),
        show(&log.dmarc),
        show(&log.iprev),
        show(&log.arc),
        show(&log.antivirus)
    );
    let list = |v: &[String], none: &str| {
        if v.is_empty() {
            none.to_string()
        } else {
            v.join(" ")
        }
    };
    let _ = writeln!(out, "  dnsbl: {}", list(&log.dnsbl, "no listing"));
    let _ = writeln!(out, "  uribl: {}", list(&log.uribl, "no listed link"));
    if !log.scanner.is_empty() {
        let _ = writeln!(
            out,
            "  scanner: {} {}",
            log.scanner,
            log.scanner_symbols.join(" ")
        );
    }
    let _ = writeln!(out, "  rules: {}", list(&log.rules, "none matched"));
    if !log.list.is_empty() {
        let _ = writeln!(out, "  list: {}", log.list);
    }
    // What the log's `would` key says, in words: a record-mode check or a
    // shadow rule that found something and was not acted on.
    for w in &log.would {
        let Some((reason, verdict)) = w.rsplit_once('=') else {
            continue;
        };
        let mode = if reason.starts_with("rule:") {
            "shadow rule"
        } else {
            "record mode"
        };
        let _ = writeln!(
            out,
            "  {mode}: would {verdict} ({reason}); logged as would={verdict}, not applied"
        );
    }
}

/// The transaction, printed.
pub async fn explain(cfg: Config, input: Sample) -> Result<String, String> {
    let x = run(cfg, &input).await?;
    let mut out = String::new();
    let to: Vec<String> = input.rcpts.iter().map(|r| format!("<{r}>")).collect();
    let _ = writeln!(
        out,
        "client [{}] helo {} from <{}> to {}",
        input.ip,
        input.helo,
        input.from,
        to.join(" ")
    );
    if x.allowed {
        let _ = writeln!(out, "client is allow-listed: no checks");
    }
    let outcome = match &x.mail {
        Screened::Refused { reply, reason } => {
            let _ = writeln!(out, "reply at MAIL: {} ({reason})", reply_text(reply));
            return Ok(out);
        }
        Screened::Verdict(o) => o,
    };
    let _ = writeln!(out, "MAIL stage (connect, helo, mail checks and rules):");
    results(&mut out, &x.mail_log);
    let _ = writeln!(out, "  score {:.1}: {}", outcome.score, reply_line(outcome));
    if let Decision::Reject(_) | Decision::Tempfail(_) = outcome.decision {
        let _ = writeln!(
            out,
            "reply at RCPT: {} ({})",
            reply_line(outcome),
            outcome.reason
        );
        return Ok(out);
    }
    for ((r, refused), policy) in x.rcpts.iter().zip(&x.policies) {
        let _ = writeln!(out, "RCPT <{r}>: {policy}");
        let _ = match refused {
            Some((reply, reason)) => {
                writeln!(out, "RCPT <{r}>: {} ({reason})", reply_text(reply))
            }
            None => writeln!(out, "RCPT <{r}>: accepted by the checks (upstream decides)"),
        };
    }
    let Some(data) = &x.data else {
        let _ = if input.message.is_none() {
            writeln!(out, "no message given: DATA stage not run")
        } else {
            writeln!(out, "no recipient accepted: DATA would get 554 5.5.1")
        };
        return Ok(out);
    };
    let _ = writeln!(out, "DATA stage (DKIM, DMARC, ARC, message rules):");
    results(&mut out, &x.log);
    let o = &data.outcome;
    let why = if o.reason.is_empty() {
        String::new()
    } else {
        format!(" ({})", o.reason)
    };
    let _ = writeln!(out, "  score {:.1}{why}", o.score);
    let _ = writeln!(out, "headers added:");
    for l in data.headers.lines() {
        let _ = writeln!(out, "  {l}");
    }
    let verdict = match &o.decision {
        Decision::Accept | Decision::Tag => {
            "relayed upstream; the client gets upstream's reply".to_string()
        }
        _ => reply_line(o),
    };
    let _ = writeln!(out, "reply after DATA: {verdict}");
    Ok(out)
}
