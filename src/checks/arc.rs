//! ARC (RFC 8617) at the end of DATA: recorded in Authentication-Results
//! and the log, never acted on.

use super::{Check, Facts, Hook, Message};
use crate::config::{ArcConfig, Mode};
use crate::dns::Dns;
use mail_auth::dns::Parameters;
use std::sync::Arc;

pub struct ArcCheck {
    cfg: ArcConfig,
    dns: Arc<Dns>,
}

impl ArcCheck {
    pub fn new(cfg: &ArcConfig, dns: Arc<Dns>) -> ArcCheck {
        ArcCheck {
            cfg: cfg.clone(),
            dns,
        }
    }
}

impl Check for ArcCheck {
    fn data<'a, 'm: 'a>(&'m self, f: &'a mut Facts, m: &'a mut Message<'m>) -> Hook<'a> {
        Box::pin(async move {
            if self.cfg.mode == Mode::Off || m.parsed.arc_seals().is_empty() {
                return;
            }
            let (auth, cache) = self.dns.auth();
            let arc = auth
                .verify_arc(Parameters::new(m.parsed).with_cache(cache))
                .await;
            f.txn.found.log.arc = super::dkim::word(arc.result()).to_string();
            m.arc = Some(arc);
        })
    }
}
