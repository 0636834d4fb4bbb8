//! SPF (RFC 7208) at MAIL: the MAIL FROM identity, and the HELO identity
//! when `spf.helo` is on and the HELO name is a domain.

use super::{Check, Facts, Hook};
use crate::config::{Action, Mode, SpfConfig};
use crate::dns::Dns;
use crate::verdict::{self, Finding};
use ipnet::IpNet;
use mail_auth::SpfResult;
use mail_auth::dns::Parameters;
use mail_auth::spf::verify::SpfParameters;
use std::net::IpAddr;
use std::sync::Arc;

pub struct Spf {
    cfg: SpfConfig,
    hostname: String,
    dns: Arc<Dns>,
    /// `allow.forwarders`: their SPF results are recorded, never held
    /// against them (SPF names the first sender, not the forwarder).
    forwarders: Vec<IpNet>,
    /// The reply of a result that has none of its own, made once.
    no_reply: crate::wire::reply::Reply,
}

impl Spf {
    pub fn new(cfg: &SpfConfig, hostname: &str, forwarders: &[IpNet], dns: Arc<Dns>) -> Spf {
        Spf {
            cfg: cfg.clone(),
            hostname: hostname.to_string(),
            dns,
            forwarders: forwarders.to_vec(),
            no_reply: verdict::spam_score(0.0),
        }
    }

    /// What a result leads to for this client: nothing from a forwarder.
    fn action(&self, f: &Facts, action: Action) -> Action {
        if self.forwarders.iter().any(|n| n.contains(&f.client.ip)) {
            Action::Accept
        } else {
            action
        }
    }

    async fn helo_identity(&self, f: &mut Facts) {
        let helo = &f.client.helo;
        if !self.cfg.helo || !helo.contains('.') || helo.parse::<IpAddr>().is_ok() {
            return;
        }
        let (auth, cache) = self.dns.auth();
        let ip = f.client.ip;
        let out = auth
            .check_host(
                Parameters::new(SpfParameters::helo(ip, helo, &self.hostname)).with_cache(cache),
            )
            .await;
        if out.result() == SpfResult::Fail {
            let action = self.action(f, self.cfg.fail);
            f.txn.found.findings.push(Finding::under(
                self.cfg.mode,
                "spf",
                action,
                "fail".into(),
                "spf:helo_fail".into(),
                verdict::spf_fail(self.cfg.text.as_deref(), helo, &ip.to_string()),
            ));
        }
        f.txn.spf_helo = Some(out);
    }

    async fn mail_identity(&self, f: &mut Facts) {
        let (auth, cache) = self.dns.auth();
        let ip = f.client.ip;
        let out = auth
            .check_host(
                Parameters::new(SpfParameters::mail_from(
                    ip,
                    &f.client.helo,
                    &self.hostname,
                    &f.txn.sender,
                ))
                .with_cache(cache),
            )
            .await;
        // Only the results with a reply of their own format anything.
        let domain = out.domain();
        let s = &self.cfg;
        let (word, reason, action, reply) = match out.result() {
            SpfResult::Pass => ("pass", "spf:pass", s.pass, None),
            SpfResult::Fail => (
                "fail",
                "spf:fail",
                s.fail,
                Some(verdict::spf_fail(
                    s.text.as_deref(),
                    domain,
                    &ip.to_string(),
                )),
            ),
            SpfResult::SoftFail => ("softfail", "spf:softfail", s.softfail, None),
            SpfResult::Neutral => ("neutral", "spf:neutral", s.neutral, None),
            SpfResult::None => ("none", "spf:none", s.none, None),
            SpfResult::TempError => (
                "temperror",
                "spf:temperror",
                s.temperror,
                Some(verdict::spf_temperror(domain)),
            ),
            SpfResult::PermError => (
                "permerror",
                "spf:permerror",
                s.permerror,
                Some(verdict::spf_permerror(domain)),
            ),
        };
        let action = self.action(f, action);
        let found = &mut f.txn.found;
        found.log.spf = word.to_string();
        found.findings.push(Finding::under(
            s.mode,
            "spf",
            action,
            word.into(),
            reason.into(),
            reply.unwrap_or_else(|| self.no_reply.clone()),
        ));
        f.txn.spf_mail = Some(out);
    }
}

impl Check for Spf {
    fn off(&self) -> bool {
        self.cfg.mode == Mode::Off
    }

    fn mail<'a>(&'a self, f: &'a mut Facts) -> Hook<'a> {
        Box::pin(async move {
            if self.off() {
                return;
            }
            self.helo_identity(f).await;
            self.mail_identity(f).await;
        })
    }
}
