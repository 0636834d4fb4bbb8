//! ARC (RFC 8617) at the end of DATA: recorded in Authentication-Results
//! and the log. A valid chain whose first set was sealed by a trusted
//! forwarder (`allow.arc_sealers`: mailing lists, forwarding services),
//! and whose first ARC-Authentication-Results says DMARC passed there,
//! lifts a DMARC failure here: the list changed the message, not a forger.

use super::{Check, Facts, Hook, Message};
use crate::config::{ArcConfig, Mode};
use crate::dns::Dns;
use mail_auth::dns::Parameters;
use mail_auth::{DkimResult, DmarcResult};
use std::sync::Arc;

pub struct ArcCheck {
    cfg: ArcConfig,
    /// Sealing domains trusted to vouch for what they forward, lower case.
    sealers: Vec<String>,
    dns: Arc<Dns>,
}

impl ArcCheck {
    pub fn new(cfg: &ArcConfig, sealers: &[String], dns: Arc<Dns>) -> ArcCheck {
        ArcCheck {
            cfg: cfg.clone(),
            sealers: sealers
                .iter()
                .map(|s| s.trim_end_matches('.').to_ascii_lowercase())
                .collect(),
            dns,
        }
    }

    /// The trusted sealer that vouches for a DMARC pass before it
    /// forwarded the message, if the chain is valid and it is one.
    fn vouching_sealer(&self, m: &Message<'_>) -> Option<String> {
        let arc = m.arc.as_ref()?;
        if *arc.result() != DkimResult::Pass {
            return None;
        }
        let first = arc.chain().first()?;
        let sealer = first
            .seal
            .header
            .d
            .trim_end_matches('.')
            .to_ascii_lowercase();
        let trusted = self
            .sealers
            .iter()
            .any(|s| sealer == *s || sealer.ends_with(&format!(".{s}")));
        (trusted && says_dmarc_pass(first.results.value)).then_some(sealer)
    }
}

/// Whether an ARC-Authentication-Results value records `dmarc=pass`.
fn says_dmarc_pass(value: &[u8]) -> bool {
    String::from_utf8_lossy(value)
        .split(';')
        .skip(1)
        .filter_map(|r| r.split_whitespace().next())
        .any(|r| r.eq_ignore_ascii_case("dmarc=pass"))
}

impl Check for ArcCheck {
    fn off(&self) -> bool {
        self.cfg.mode == Mode::Off
    }

    fn data<'a, 'm: 'a>(&'m self, f: &'a mut Facts, m: &'a mut Message<'m>) -> Hook<'a> {
        Box::pin(async move {
            if self.off() || m.parsed.arc_seals().is_empty() {
                return;
            }
            let (auth, cache) = self.dns.auth();
            let arc = auth
                .verify_arc(Parameters::new(m.parsed).with_cache(cache))
                .await;
            f.txn.found.log.arc = super::dkim::word(arc.result()).to_string();
            m.arc = Some(arc);
            let failed = m
                .dmarc
                .as_ref()
                .is_some_and(|d| matches!(d.result(), DmarcResult::Fail(_)));
            if !failed || self.sealers.is_empty() {
                return;
            }
            if let Some(sealer) = self.vouching_sealer(m) {
                let found = &mut f.txn.found;
                found
                    .findings
                    .retain(|x| !(x.check == "dmarc" && x.result == "fail"));
                found.log.dmarc = format!("fail (arc override by {sealer})");
            }
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_a_recorded_dmarc_pass_counts() {
        use super::says_dmarc_pass as p;
        assert!(p(b" i=1; lists.example.org; spf=pass smtp.mailfrom=a.test;\r\n\tdkim=pass header.d=a.test; dmarc=pass header.from=a.test\r\n"));
        assert!(!p(
            b" i=1; lists.example.org; spf=pass; dmarc=fail header.from=a.test"
        ));
        assert!(!p(
            b" i=1; lists.example.org; dkim=pass (dmarc=pass in a comment)"
        ));
        assert!(!p(b" i=1; dmarc=pass.example.org; spf=none"));
    }
}
