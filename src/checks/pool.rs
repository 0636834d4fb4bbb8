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

/// The rules of a message up to this size run on the session's thread
/// when they are expected to take at most `INLINE_RULES_TIME` (from what
/// this rule set took lately; see `rules::cost`); others, and every
/// message until the rule set was timed once, on the pool.
const INLINE_RULES_BYTES: usize = 16 * 1024;
const INLINE_RULES_TIME: Duration = Duration::from_micros(200);

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
        let len = (*message).as_ref().len();
        if len <= INLINE_RULES_BYTES
            && rules
                .data_cost
                .predict(len)
                .is_some_and(|t| t <= INLINE_RULES_TIME.min(self.budget))
        {
            return Ok(evaluate_now(&rules, &facts, &message, links));
        }
        let run = async {
            let slot = Arc::clone(&self.slots)
                .acquire_owned()
                .await
                .map_err(|_| overran)?;
            tokio::task::spawn_blocking(move || {
                let _slot = slot;
                evaluate_now(&rules, &facts, &message, links)
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

/// Parses the message and evaluates the DATA-stage rules here and now,
/// timing it for the rule set's cost estimate.
fn evaluate_now(
    rules: &RuleSet,
    facts: &OwnedInput,
    message: &SharedMessage,
    links: Option<Arc<Links>>,
) -> Vec<Hit> {
    let started = std::time::Instant::now();
    let links = match links {
        Some(l) => LinkFacts::Found(l),
        None if rules.uses_links() => LinkFacts::Find,
        None => LinkFacts::NotWanted,
    };
    let raw = (**message).as_ref();
    let parsed = MessageFacts::parse_with(raw, links, &|h| rules.reads_header(h));
    let hits = rules.evaluate(Stage::Data, &facts.view(Some(&parsed)));
    rules.data_cost.record(raw.len(), started.elapsed());
    hits
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secs;
    use std::path::{Path, PathBuf};

    const RULES: &str = "rules:\n  - id: WALLET\n    description: wallet\n    when: {body: {regex: 'wallet'}}\n    action: {score: 4}\n";

    fn rules() -> Arc<RuleSet> {
        Arc::new(
            RuleSet::load_texts(Path::new("."), &[(PathBuf::from("r.yaml"), RULES)])
                .unwrap_or_else(|e| panic!("{e}")),
        )
    }

    fn message(body_bytes: usize) -> SharedMessage {
        let mut m = b"From: a@example.test\r\nSubject: hi\r\n\r\nsend to my wallet\r\n".to_vec();
        m.resize(m.len() + body_bytes, b'x');
        Arc::new(m)
    }

    /// A pool whose one thread is busy (its slot taken): whatever goes to
    /// it overruns the budget; what runs inline does not.
    fn busy_pool() -> (RulePool, tokio::sync::OwnedSemaphorePermit) {
        let pool = RulePool::new(&MessageRules {
            workers: 1,
            budget: Secs(Duration::from_millis(200)),
            on_overrun: Overrun::Tempfail,
        });
        let slot = Arc::clone(&pool.slots)
            .try_acquire_owned()
            .unwrap_or_else(|e| panic!("{e}"));
        (pool, slot)
    }

    async fn evaluate(pool: &RulePool, rules: &Arc<RuleSet>, m: SharedMessage) -> bool {
        pool.evaluate(Arc::clone(rules), OwnedInput::default(), m, None)
            .await
            .map(|hits| assert_eq!(hits.len(), 1))
            .is_ok()
    }

    #[tokio::test]
    async fn a_small_message_runs_its_rules_inline_once_the_rule_set_is_known_to_be_quick() {
        let rules = rules();
        let (pool, _busy) = busy_pool();
        // Not timed yet: to the pool (busy: overrun).
        assert!(!evaluate(&pool, &rules, message(100)).await);
        // The pool times what it evaluates.
        let free = RulePool::new(&MessageRules::default());
        assert!(evaluate(&free, &rules, message(100)).await);
        assert!(rules.data_cost.predict(2000).is_some());
        // Known to be quick (a debug build's own timing may not be):
        // small messages run inline, past the busy pool.
        let quick = self::rules();
        quick.data_cost.record(1000, Duration::from_micros(5));
        assert!(evaluate(&pool, &quick, message(100)).await);
        // A message past INLINE_RULES_BYTES goes to the pool however quick.
        quick.data_cost.record(1000, Duration::from_micros(5));
        assert!(!evaluate(&pool, &quick, message(INLINE_RULES_BYTES + 1)).await);
    }

    /// The message is parsed with only the headers the rules read (any
    /// case); rules on those headers still see every occurrence.
    #[test]
    fn only_the_headers_the_rules_read_are_kept() {
        let text = "rules:\n  - id: LIST\n    description: x\n    when: {header: {name: X-Mailer, regex: 'bulk'}}\n    action: {score: 1}\n";
        let rules = RuleSet::load_texts(Path::new("."), &[(PathBuf::from("r.yaml"), text)])
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(rules.reads_header("x-mailer") && rules.reads_header("X-MAILER"));
        assert!(!rules.reads_header("subject"));
        let raw = b"From: a@example.test\r\nx-mailer: quiet\r\nSubject: hi\r\nX-MAILER: bulk 1.0\r\n\r\nbody\r\n";
        let parsed =
            MessageFacts::parse_with(raw, LinkFacts::NotWanted, &|h| rules.reads_header(h));
        let names: Vec<&str> = parsed.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["x-mailer", "x-mailer"]);
        assert_eq!(parsed.subject.as_deref(), Some("hi"));
        assert_eq!(MessageFacts::parse(raw).headers.len(), 4);
        let message: SharedMessage = Arc::new(raw.to_vec());
        let hits = evaluate_now(&rules, &OwnedInput::default(), &message, None);
        assert_eq!(hits.len(), 1, "{hits:?}");
    }

    #[tokio::test]
    async fn a_rule_set_that_was_slow_goes_to_the_pool() {
        let rules = rules();
        let (pool, _busy) = busy_pool();
        rules.data_cost.record(1000, Duration::from_millis(3));
        assert!(!evaluate(&pool, &rules, message(100)).await);
    }
}
