//! The work on a whole message runs here, never on the threads that serve
//! every session: the end-of-message checks (MIME parsing, body hashes,
//! signature verification for DKIM, DMARC, ARC) on the check threads, one
//! per CPU; the rules (parsing and thousands of regexes) on a bounded pool
//! of blocking threads, with a time budget per message.

use crate::config::{MessageRules, Overrun};
use crate::rules::LinkFacts;
use crate::rules::links::Links;
use crate::rules::{Hit, MessageFacts, OwnedInput, RuleSet, Stage};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// Messages up to this size are checked on the session's thread: bounded
/// work (well under a millisecond), cheaper than a hop between threads.
pub const INLINE_CHECK_BYTES: usize = 64 * 1024;

/// The check threads: a runtime of their own, one thread per CPU, made
/// once per process. None only if its threads cannot be started (then the
/// checks run on the session's thread, as a fallback).
pub fn check_threads() -> Option<&'static tokio::runtime::Handle> {
    static THREADS: std::sync::OnceLock<Option<tokio::runtime::Runtime>> =
        std::sync::OnceLock::new();
    THREADS
        .get_or_init(|| {
            let n = std::thread::available_parallelism().map_or(2, |n| n.get());
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(n)
                .thread_name("portcullis-checks")
                .enable_all()
                .build()
                .map_err(|e| tracing::error!(error = %e, "cannot start the check threads"))
                .ok()
        })
        .as_ref()
        .map(tokio::runtime::Runtime::handle)
}

/// A message's bytes, shared with the pool; whatever keeps them counted
/// against the memory budget lives as long as they do.
pub type SharedMessage = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// An evaluation that gave no hits: it passed its budget, and `then`
/// says what the message gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overran {
    pub then: Overrun,
}

pub struct RulePool {
    slots: Arc<Semaphore>,
    budget: Duration,
    on_overrun: Overrun,
}

impl RulePool {
    pub fn new(cfg: &MessageRules) -> RulePool {
        let workers = match cfg.workers {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        };
        RulePool {
            slots: Arc::new(Semaphore::new(workers)),
            budget: cfg.budget.0,
            on_overrun: cfg.on_overrun,
        }
    }

    /// Parses the message and evaluates the DATA-stage rules on a pool
    /// thread, within the budget. Past it the session goes on without the
    /// result; the thread finishes its work (a regex cannot be stopped) and
    /// only then frees its slot, so the pool stays bounded.
    pub async fn evaluate(
        &self,
        rules: Arc<RuleSet>,
        facts: OwnedInput,
        message: SharedMessage,
        links: Option<Arc<Links>>,
    ) -> Result<Vec<Hit>, Overran> {
        let overran = Overran {
            then: self.on_overrun,
        };
        let run = async {
            let slot = Arc::clone(&self.slots)
                .acquire_owned()
                .await
                .map_err(|_| overran)?;
            tokio::task::spawn_blocking(move || {
                let _slot = slot;
                let links = match links {
                    Some(l) => LinkFacts::Found(l),
                    None if rules.uses_links() => LinkFacts::Find,
                    None => LinkFacts::NotWanted,
                };
                let parsed = MessageFacts::parse_with((*message).as_ref(), links);
                rules.evaluate(Stage::Data, &facts.view(Some(&parsed)))
            })
            .await
            .map_err(|_| overran)
        };
        match tokio::time::timeout(self.budget, run).await {
            Ok(r) => r,
            Err(_) => {
                crate::telemetry::events::RulesOverrun {
                    budget: self.budget,
                    then: &self.on_overrun,
                }
                .emit();
                Err(overran)
            }
        }
    }
}
