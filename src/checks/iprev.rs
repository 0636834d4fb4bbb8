//! iprev (RFC 8601 section 3): the client's PTR name must resolve back to
//! its address. The lookup starts at connect; its result is a finding of
//! the connection.

use super::{Check, Client, Facts, Hook, Pending, done};
use crate::config::{Action, IprevConfig, Mode};
use crate::dns::Dns;
use crate::verdict::{self, Finding};
use mail_auth::IprevResult;
use std::sync::Arc;

pub struct Iprev {
    cfg: IprevConfig,
    dns: Arc<Dns>,
}

impl Iprev {
    pub fn new(cfg: &IprevConfig, dns: Arc<Dns>) -> Iprev {
        Iprev {
            cfg: cfg.clone(),
            dns,
        }
    }
}

/// Starts the PTR-plus-forward lookup for a client: for the iprev check,
/// and for upstream's XCLIENT NAME whatever iprev's mode.
pub fn start_lookup(dns: &Arc<Dns>, client: &Client, pending: &mut Pending) {
    if pending.iprev.is_some() {
        return;
    }
    let (dns, ip) = (Arc::clone(dns), client.ip);
    pending.iprev = Some(super::Lookup::spawn(async move {
        let (auth, cache) = dns.auth();
        auth.verify_iprev(mail_auth::dns::Parameters::new(ip).with_cache(cache))
            .await
    }));
}

impl Check for Iprev {
    fn start(&self, client: &Client, pending: &mut Pending) {
        if self.cfg.mode != Mode::Off {
            pending.iprev_is_check = true;
            start_lookup(&self.dns, client, pending);
        }
    }

    fn connect<'a>(&'a self, f: &'a mut Facts) -> Hook<'a> {
        let Some(r) = &f.client.iprev else {
            return done();
        };
        let i = &self.cfg;
        let (word, action) = match r.result() {
            IprevResult::Pass => ("pass", Action::Accept),
            IprevResult::Fail(_) => ("fail", i.fail),
            IprevResult::TempError(_) => ("temperror", i.temperror),
            IprevResult::PermError(_) => ("permerror", i.permerror),
            IprevResult::None => ("none", Action::Accept),
        };
        let found = &mut f.txn.found;
        found.log.iprev = word.to_string();
        if action != Action::Accept {
            let reply = if action == Action::Tempfail {
                verdict::dns_tempfail()
            } else {
                verdict::iprev_fail(i.text.as_deref(), &f.client.ip.to_string())
            };
            found.findings.push(Finding::under(
                i.mode,
                "iprev",
                action,
                word.into(),
                format!("iprev:{word}"),
                reply,
            ));
        }
        done()
    }
}
