//! DMARC (RFC 7489) at the end of DATA, from the SPF result of MAIL and
//! the DKIM results of the message; the action follows the domain's policy.

use super::{Check, Facts, Hook, Message};
use crate::config::{Action, DmarcConfig, Mode};
use crate::dns::Dns;
use crate::verdict::{self, Finding};
use mail_auth::DmarcResult;
use mail_auth::dmarc::Policy;
use mail_auth::dmarc::verify::DmarcParameters;
use mail_auth::dns::Parameters;
use std::sync::Arc;

pub struct Dmarc {
    cfg: DmarcConfig,
    dns: Arc<Dns>,
}

impl Dmarc {
    pub fn new(cfg: &DmarcConfig, dns: Arc<Dns>) -> Dmarc {
        Dmarc {
            cfg: cfg.clone(),
            dns,
        }
    }
}

impl Check for Dmarc {
    fn off(&self) -> bool {
        self.cfg.mode == Mode::Off
    }

    fn data<'a, 'm: 'a>(&'m self, f: &'a mut Facts, m: &'a mut Message<'m>) -> Hook<'a> {
        Box::pin(async move {
            let Some(spf) = f.txn.spf_mail.as_ref().filter(|_| !self.off()) else {
                return;
            };
            let (auth, cache) = self.dns.auth();
            for from in m.parsed.from_addresses() {
                if let Some((_, domain)) = from.rsplit_once('@') {
                    cache.shield_public_suffixes(domain);
                }
            }
            let dmarc = auth
                .verify_dmarc(
                    Parameters::new(DmarcParameters::new(m.parsed, &m.dkim, spf.domain(), spf))
                        .with_cache(cache),
                )
                .await;
            let c = &self.cfg;
            let policy = dmarc.policy();
            let (word, action, reply) = match dmarc.result() {
                DmarcResult::Pass => ("pass", Action::Accept, None),
                DmarcResult::None => ("none", Action::Accept, None),
                DmarcResult::PermError(_) => ("permerror", Action::Accept, None),
                DmarcResult::TempError(_) => (
                    "temperror",
                    c.temperror,
                    Some(verdict::dmarc_temperror(dmarc.domain())),
                ),
                DmarcResult::Fail(_) => {
                    let action = match policy {
                        Policy::Reject => c.reject,
                        Policy::Quarantine => c.quarantine,
                        Policy::None | Policy::Unspecified => c.none,
                    };
                    (
                        "fail",
                        action,
                        Some(verdict::dmarc_reject(c.text.as_deref(), dmarc.domain())),
                    )
                }
            };
            let policy_word = match policy {
                Policy::Reject => "reject",
                Policy::Quarantine => "quarantine",
                Policy::None => "none",
                Policy::Unspecified => "",
            };
            let found = &mut f.txn.found;
            found.log.dmarc = if policy_word.is_empty() || word == "pass" {
                word.to_string()
            } else {
                format!("{word}:{policy_word}")
            };
            if action != Action::Accept {
                found.findings.push(Finding::under(
                    c.mode,
                    "dmarc",
                    action,
                    word.into(),
                    if policy_word.is_empty() {
                        format!("dmarc:{word}")
                    } else {
                        format!("dmarc:{policy_word}")
                    },
                    reply.unwrap_or_else(|| verdict::spam_score(0.0)),
                ));
            }
            m.dmarc = Some(dmarc);
        })
    }
}
