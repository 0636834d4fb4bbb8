//! Reloads on SIGHUP: the config file (a new snapshot for new
//! sessions, restart-only keys named) and the certificate.

use super::*;

/// Reloads the config file (SIGHUP). What changed is in force for new
/// sessions, certificate and DNS included, except the keys only a restart
/// can change (`config::reload`), which are logged by key path. A file
/// that does not load changes nothing.
#[derive(Clone)]
pub struct ConfigReloader {
    pub(super) shared: Arc<Shared>,
    pub started_at: u64,
    pub ok: Arc<AtomicU64>,
    pub failed: Arc<AtomicU64>,
    /// Keys changed in the file that wait for a restart (status page).
    pub needs_restart: Arc<std::sync::Mutex<Vec<String>>>,
}

/// What a successful reload did, by key path.
#[derive(Debug)]
pub struct Reloaded {
    pub applied: Vec<String>,
    pub needs_restart: Vec<String>,
}

impl ConfigReloader {
    pub async fn reload(&self, path: &std::path::Path) -> Result<Reloaded, String> {
        let result = self.swap(path);
        match &result {
            Ok(r) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut keys) = self.needs_restart.lock() {
                    keys.clone_from(&r.needs_restart);
                }
                ConfigReload::Done {
                    config: path,
                    applied: &r.applied,
                    needs_restart: &r.needs_restart,
                }
                .emit();
            }
            Err(e) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                ConfigReload::Failed { error: e }.emit();
            }
        }
        if result.is_ok() {
            // Tell the admin now, not at the next message, when what the
            // new config points at does not answer.
            self.shared.check_nameservers().await;
            // A failure is logged (naming upstream) and counted by the
            // probe. A milter-only gate has no upstream.
            if !self.shared.snapshot().cfg.listen.is_empty() {
                let _ = self.shared.upstream.probe().await;
            }
            announce(&self.shared).await;
        }
        result
    }

    fn swap(&self, path: &std::path::Path) -> Result<Reloaded, String> {
        let new = Config::load(Some(path)).map_err(|e| e.to_string())?;
        let running = self.shared.snapshot();
        let plan = crate::config::reload::plan(&running.cfg, new);
        let cfg = Arc::new(plan.effective);
        let zones = crate::rules::configured_zones(&cfg);
        let unknown = self.shared.rules.unknown_zones(&zones);
        if !unknown.is_empty() {
            return Err(crate::rules::RuleErrors(unknown).to_string());
        }
        let level_changed = cfg.log.level != running.cfg.log.level;
        let built = build_snapshot(cfg, Arc::clone(&running.rules), &self.shared.store)
            .map_err(|e| e.to_string())?;
        if level_changed {
            // Validated at load, so this fails only without a subscriber.
            crate::telemetry::set_level(&built.cfg.log.level)
                .map_err(|e| format!("log.level: {e}"))?;
        }
        self.shared.rules.set_zones(zones);
        // The rules stay whatever is current (a rules reload may have
        // swapped them meanwhile).
        self.shared.snapshot.rcu(|rt| Snapshot {
            rules: Arc::clone(&rt.rules),
            ..built.clone()
        });
        Ok(Reloaded {
            applied: plan.applied,
            needs_restart: plan.needs_restart,
        })
    }
}

/// Reloads the certificate and key from the configured files (SIGHUP
/// without a config file to reload).
#[derive(Clone)]
pub struct TlsReloader(pub(super) Arc<Shared>);

impl TlsReloader {
    pub fn reload(&self) -> Result<(), tls::TlsError> {
        let rt = self.0.snapshot();
        let Some(t) = &rt.cfg.tls else {
            return Ok(());
        };
        let acceptor = tls::acceptor(&t.cert, &t.key)?;
        self.0.snapshot.rcu(|rt| Snapshot {
            tls: Some(acceptor.clone()),
            ..Snapshot::clone(rt)
        });
        Ok(())
    }
}

/// What SIGHUP reloads, in order: the log file reopened, the rules, then
/// the config file (which rebuilds the certificate too) or, without one,
/// the certificate alone; systemd is told RELOADING=1 and READY=1 around it.
pub struct OnHangup {
    pub log: crate::telemetry::LogTarget,
    pub rules: Arc<RuleWatcher>,
    pub config: ConfigReloader,
    pub tls: TlsReloader,
    /// The config file, when the gate was started with one.
    pub config_path: Option<std::path::PathBuf>,
}

impl OnHangup {
    pub async fn reload(&self) {
        notify::reloading();
        if let Err(e) = self.log.reopen() {
            tracing::error!(error = %e, "SIGHUP: cannot reopen the log file");
        }
        // A failed rules reload keeps the old rules and logs why.
        let _ = self.rules.reload();
        match &self.config_path {
            // Logged, applied or not, by the reloader itself.
            Some(p) => {
                let _ = self.config.reload(p).await;
            }
            None => match self.tls.reload() {
                Ok(()) => tracing::info!("SIGHUP: TLS certificate reloaded"),
                Err(e) => {
                    tracing::error!(error = %e, "SIGHUP: TLS reload failed; keeping the old certificate")
                }
            },
        }
        notify::ready();
    }
}
