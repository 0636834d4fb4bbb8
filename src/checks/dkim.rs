//! DKIM (RFC 6376) at the end of DATA. The signatures are verified when
//! DKIM or DMARC is on (DMARC needs them); findings only when DKIM is.

use super::{Check, Facts, Hook, Message};
use crate::config::{Action, ChecksConfig, DkimConfig, Mode};
use crate::dns::Dns;
use crate::verdict::{self, Finding};
use mail_auth::dns::Parameters;
use mail_auth::{DkimOutput, DkimResult};
use std::sync::Arc;

pub struct Dkim {
    cfg: DkimConfig,
    /// DMARC is on: verify even when DKIM itself is off.
    for_dmarc: bool,
    dns: Arc<Dns>,
}

impl Dkim {
    pub fn new(cfg: &ChecksConfig, dns: Arc<Dns>) -> Dkim {
        Dkim {
            cfg: cfg.dkim.clone(),
            for_dmarc: cfg.dmarc.mode != Mode::Off,
            dns,
        }
    }
}

impl Check for Dkim {
    /// DKIM is verified for DMARC even with its own mode off.
    fn off(&self) -> bool {
        self.cfg.mode == Mode::Off && !self.for_dmarc
    }

    fn data<'a, 'm: 'a>(&'m self, f: &'a mut Facts, m: &'a mut Message<'m>) -> Hook<'a> {
        Box::pin(async move {
            if self.off() {
                return;
            }
            let (auth, cache) = self.dns.auth();
            m.dkim = auth
                .verify_dkim(Parameters::new(m.parsed).with_cache(cache))
                .await;
            if self.cfg.mode == Mode::Off {
                return;
            }
            let best = summary(&m.dkim);
            let found = &mut f.txn.found;
            found.log.dkim = best.to_string();
            let d = &self.cfg;
            let domain = &m.from_domain;
            let (action, reply) = match best {
                // mail-auth reports a signature that does not verify (body
                // hash, bad signature) as neutral; for us both are failures.
                "fail" | "neutral" => (d.fail, verdict::dkim_fail(d.text.as_deref(), domain)),
                "temperror" => (d.temperror, verdict::dkim_temperror()),
                "permerror" => (d.permerror, verdict::dkim_fail(d.text.as_deref(), domain)),
                _ => (Action::Accept, verdict::dkim_fail(None, domain)),
            };
            if action != Action::Accept {
                found.findings.push(Finding::under(
                    d.mode,
                    "dkim",
                    action,
                    best.into(),
                    format!("dkim:{best}"),
                    reply,
                ));
            }
        })
    }
}

/// The result word of a DKIM (or ARC) verification.
pub fn word(r: &DkimResult) -> &'static str {
    match r {
        DkimResult::Pass => "pass",
        DkimResult::Neutral(_) => "neutral",
        DkimResult::Fail(_) => "fail",
        DkimResult::PermError(_) => "permerror",
        DkimResult::TempError(_) => "temperror",
        DkimResult::None => "none",
    }
}

/// The best DKIM result over all signatures.
fn summary(dkim: &[DkimOutput]) -> &'static str {
    let words: Vec<&str> = dkim.iter().map(|d| word(d.result())).collect();
    for w in ["pass", "temperror", "fail", "permerror", "neutral"] {
        if words.contains(&w) {
            return w;
        }
    }
    "none"
}
