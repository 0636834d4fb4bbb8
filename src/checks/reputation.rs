//! Client reputation, as postscreen's cache: what a client's earlier
//! connections showed, kept in the state store for every instance. A pass
//! of the greeting test, or of the DNSBL lookups of its address, is
//! remembered for its TTL and spares the next connections that test; a
//! client refused at connect is refused again for `fail_ttl`. A failing
//! store is as if nothing were known (every test runs).

use crate::config::ReputationConfig;
use crate::state::Store;
use std::net::IpAddr;
use std::sync::Arc;

pub struct Reputation {
    cfg: ReputationConfig,
    store: Arc<Store>,
}

/// What the store knows of a client.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Known {
    pub greeting_passed: bool,
    pub dnsbl_passed: bool,
    /// Refused at connect lately, and why.
    pub failed: Option<Box<str>>,
}

impl Reputation {
    /// None when reputation is off.
    pub fn new(cfg: &ReputationConfig, store: Arc<Store>) -> Option<Reputation> {
        cfg.enabled.then(|| Reputation {
            cfg: cfg.clone(),
            store,
        })
    }

    pub async fn known(&self, ip: IpAddr) -> Known {
        let failed = self.get("f", ip).await;
        if failed.is_some() {
            return Known {
                failed: failed.map(String::into_boxed_str),
                ..Known::default()
            };
        }
        Known {
            greeting_passed: self.get("g", ip).await.is_some(),
            dnsbl_passed: self.get("d", ip).await.is_some(),
            failed: None,
        }
    }

    async fn get(&self, kind: &str, ip: IpAddr) -> Option<String> {
        self.store
            .get(&format!("rep:{kind}:{ip}"))
            .await
            .ok()
            .flatten()
    }

    pub async fn greeting_passed(&self, ip: IpAddr) {
        let ttl = self.cfg.greeting_pass_ttl.0;
        let _ = self.store.set(&format!("rep:g:{ip}"), "1", ttl).await;
    }

    pub async fn dnsbl_passed(&self, ip: IpAddr) {
        let ttl = self.cfg.dnsbl_pass_ttl.0;
        let _ = self.store.set(&format!("rep:d:{ip}"), "1", ttl).await;
    }

    pub async fn failed(&self, ip: IpAddr, why: &str) {
        let ttl = self.cfg.fail_ttl.0;
        let _ = self.store.set(&format!("rep:f:{ip}"), why, ttl).await;
    }
}
