//! `portcullis explain`: the whole pipeline for one made-up transaction,
//! without a network client, printed step by step (like `spamassassin -t`).

use crate::checks::{CheckLog, Checker};
use crate::config::{Config, Mode};
use crate::dns::Dns;
use crate::rules::Facts;
use crate::verdict::{Decision, Outcome};
use std::fmt::Write;
use std::net::IpAddr;
use std::sync::Arc;

pub struct Input {
    pub ip: IpAddr,
    pub helo: String,
    pub from: String,
    pub rcpts: Vec<String>,
    pub message: Option<Vec<u8>>,
    /// DNS-based checks off; rules still run.
    pub no_dns: bool,
}

fn reply_line(o: &Outcome) -> String {
    match &o.decision {
        Decision::Reject(r) | Decision::Tempfail(r) => {
            let mut s = Vec::new();
            r.write_to(&mut s);
            String::from_utf8_lossy(&s).trim_end().to_string()
        }
        Decision::Accept => "accept".into(),
        Decision::Tag => "accept, tagged as spam".into(),
    }
}

fn results(out: &mut String, log: &CheckLog) {
    let show = |v: &str| {
        if v.is_empty() {
            "-".to_string()
        } else {
            v.to_string()
        }
    };
    let _ = writeln!(
        out,
        "  spf={} dkim={} dmarc={} iprev={} arc={}",
        show(&log.spf),
        show(&log.dkim),
        show(&log.dmarc),
        show(&log.iprev),
        show(&log.arc)
    );
    let _ = writeln!(
        out,
        "  dnsbl: {}",
        if log.dnsbl.is_empty() {
            "no listing".into()
        } else {
            log.dnsbl.join(" ")
        }
    );
    let _ = writeln!(
        out,
        "  rules: {}",
        if log.rules.is_empty() {
            "none matched".into()
        } else {
            log.rules.join(" ")
        }
    );
}

pub async fn explain(mut cfg: Config, input: Input) -> Result<String, String> {
    if input.no_dns {
        let c = &mut cfg.checks;
        for m in [
            &mut c.spf.mode,
            &mut c.dkim.mode,
            &mut c.dmarc.mode,
            &mut c.iprev.mode,
            &mut c.arc.mode,
            &mut c.dnsbl.mode,
        ] {
            *m = Mode::Off;
        }
    }
    let rules = crate::rules::load(&cfg)
        .map_err(|e| e.to_string())?
        .current();
    let dns = Dns::new(&cfg.dns).map_err(|e| e.to_string())?;
    let checker = Arc::new(Checker::new(&cfg.checks, &cfg.hostname, dns));
    let mut out = String::new();
    let _ = writeln!(
        out,
        "client [{}] helo {} from <{}> to {}",
        input.ip,
        input.helo,
        input.from,
        input
            .rcpts
            .iter()
            .map(|r| format!("<{r}>"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mut conn = checker.connect(input.ip, false);
    if conn.allowed {
        let _ = writeln!(out, "client is allow-listed: no checks");
    }
    let (mut t, outcome) = checker
        .at_mail(&mut conn, &rules, false, &input.helo, &input.from)
        .await;
    let _ = writeln!(out, "MAIL stage (connect, helo, mail checks and rules):");
    results(&mut out, &t.log);
    let _ = writeln!(
        out,
        "  score {:.1}: {}",
        outcome.score,
        reply_line(&outcome)
    );
    if let Decision::Reject(_) | Decision::Tempfail(_) = outcome.decision {
        let _ = writeln!(
            out,
            "reply at RCPT: {} ({})",
            reply_line(&outcome),
            outcome.reason
        );
        return Ok(out);
    }
    let mut accepted = Vec::new();
    for r in &input.rcpts {
        let facts = Facts {
            ip: Some(input.ip),
            helo: Some(&input.helo),
            mail_from: Some(&input.from),
            rcpts: vec![r.as_str()],
            rcpt_count: accepted.len(),
            ..Facts::default()
        };
        match checker.at_rcpt(&rules, &mut t, &facts) {
            Some(o) => {
                let _ = writeln!(out, "RCPT <{r}>: {} ({})", reply_line(&o), o.reason);
            }
            None => {
                let _ = writeln!(out, "RCPT <{r}>: accepted by the checks (upstream decides)");
                accepted.push(r.as_str());
            }
        }
    }
    let Some(msg) = input.message else {
        let _ = writeln!(out, "no message given: DATA stage not run");
        return Ok(out);
    };
    if accepted.is_empty() {
        let _ = writeln!(out, "no recipient accepted: DATA would get 554 5.5.1");
        return Ok(out);
    }
    let facts = Facts {
        ip: Some(input.ip),
        helo: Some(&input.helo),
        mail_from: Some(&input.from),
        rcpts: accepted.clone(),
        rcpt_count: accepted.len(),
        size: Some(msg.len() as u64),
        ..Facts::default()
    };
    let msg: crate::checks::pool::SharedMessage = std::sync::Arc::new(msg);
    let data = checker.at_data(&conn, &mut t, &rules, facts, &msg).await;
    let _ = writeln!(out, "DATA stage (DKIM, DMARC, ARC, message rules):");
    results(&mut out, &t.log);
    let o = &data.outcome;
    let _ = writeln!(
        out,
        "  score {:.1}{}",
        o.score,
        if o.reason.is_empty() {
            String::new()
        } else {
            format!(" ({})", o.reason)
        }
    );
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
