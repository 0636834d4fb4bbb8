//! Prometheus metrics: the `metrics` facade with the Prometheus recorder,
//! installed once per process. Labels are of low cardinality only: verdicts,
//! reason classes, rule ids, zones, stages; never addresses.

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the recorder (first call wins) and returns the handle that renders
/// the exposition text.
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ])
                .ok()?
                // A state store answers in tens to hundreds of microseconds.
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Full("portcullis_state_seconds".into()),
                    &[
                        0.000025, 0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.02, 0.1,
                    ],
                )
                .ok()?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            describe();
            // Gauges that change only on an event start at their resting
            // value, so a dashboard shows 0 rather than "no data".
            metrics::gauge!("portcullis_stress").set(0.0);
            Some(handle)
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "portcullis_connections_total",
        "Client connections accepted"
    );
    describe_gauge!("portcullis_connections_open", "Client sessions open now");
    describe_counter!(
        "portcullis_connections_refused_total",
        "Connections refused before or at the greeting, by reason"
    );
    describe_counter!(
        "portcullis_transactions_total",
        "Transactions by verdict and reason class"
    );
    describe_counter!(
        "portcullis_rule_hits_total",
        "Rule matches by rule id (shadow marked)"
    );
    describe_counter!(
        "portcullis_dns_queries_total",
        "DNSBL queries sent (cache misses)"
    );
    describe_counter!(
        "portcullis_dns_cache_hits_total",
        "DNSBL lookups answered from the cache"
    );
    describe_counter!(
        "portcullis_dns_failures_total",
        "DNSBL lookups that failed (timeouts, SERVFAIL)"
    );
    describe_histogram!("portcullis_dns_query_seconds", "DNSBL query latency");
    describe_gauge!(
        "portcullis_dnsbl_zone_usable",
        "1 when the DNSBL zone passes its self-test"
    );
    describe_counter!(
        "portcullis_upstream_errors_total",
        "Upstream connect and reply errors by stage"
    );
    describe_counter!(
        "portcullis_reloads_total",
        "Reloads of rules and config by result"
    );
    describe_counter!(
        "portcullis_data_bytes_total",
        "Message bytes received in DATA"
    );
    describe_gauge!(
        "portcullis_memory_budget_bytes",
        "Message bytes held in memory now"
    );
    describe_gauge!(
        "portcullis_dns_nameserver_up",
        "1 when the nameserver answered its latest check"
    );
    describe_gauge!(
        "portcullis_dns_up",
        "1 when any configured nameserver answers"
    );
    describe_counter!(
        "portcullis_upstream_connections_total",
        "Upstream connections for client sessions: opened, reused from the pool, went_bad there"
    );
    describe_gauge!(
        "portcullis_upstream_pool_idle",
        "Upstream connections idle in the pool"
    );
    describe_gauge!(
        "portcullis_upstream_up",
        "1 when upstream answered its latest probe or connection"
    );
}

/// The class of a reason for a label: `dnsbl:zen.spamhaus.org` stays,
/// `score:a,b,c` becomes `score`, and several reasons keep the first.
pub fn reason_label(reason: &str) -> &str {
    if reason.is_empty() {
        return "none";
    }
    if reason.starts_with("score:") {
        return "score";
    }
    reason.split(',').next().unwrap_or(reason)
}

/// Whether the recorder is installed (handles made before it go nowhere).
fn installed() -> bool {
    matches!(HANDLE.get(), Some(Some(_)))
}

/// Reason classes whose transaction counters a thread keeps (rule ids and
/// zones are few; past this many, the registry is asked each time).
const KEPT_REASONS: usize = 256;

/// Counts a transaction in `portcullis_transactions_total{verdict, reason}`.
/// Each message moves it, so the handles are kept per thread by reason
/// class and verdict: the macro's registry lookup builds the key and
/// hashes it each time.
pub fn count_transaction(verdict: &'static str, reason: &str) {
    type Kept = std::collections::HashMap<Box<str>, Vec<(&'static str, metrics::Counter)>>;
    thread_local! {
        static KEPT: std::cell::RefCell<Kept> = std::cell::RefCell::default();
    }
    let label = reason_label(reason);
    let make = || {
        metrics::counter!(
            "portcullis_transactions_total",
            "verdict" => verdict,
            "reason" => label.to_string()
        )
    };
    if !installed() {
        return make().increment(1);
    }
    KEPT.with_borrow_mut(|kept| {
        if let Some(by_verdict) = kept.get_mut(label) {
            if let Some((_, c)) = by_verdict.iter().find(|(v, _)| *v == verdict) {
                return c.increment(1);
            }
            let c = make();
            c.increment(1);
            return by_verdict.push((verdict, c));
        }
        let c = make();
        c.increment(1);
        if kept.len() < KEPT_REASONS {
            kept.insert(label.into(), vec![(verdict, c)]);
        }
    });
}

/// A metric handle looked up once and kept, for the metrics every
/// connection or message moves (the `metrics!` macros look the name up in
/// the registry at each call: a hash and a lock, 1.5% of the proxy's CPU).
/// It is kept only once the recorder is installed: a handle made before
/// would go nowhere for good.
pub struct Cached<T>(OnceLock<T>);

impl<T> Cached<T> {
    pub const fn new() -> Cached<T> {
        Cached(OnceLock::new())
    }

    /// Runs `f` on the kept handle, making it with `make` the first time.
    pub fn with(&self, make: impl FnOnce() -> T, f: impl FnOnce(&T)) {
        if let Some(h) = self.0.get() {
            return f(h);
        }
        let h = make();
        if installed() {
            f(self.0.get_or_init(|| h));
        } else {
            f(&h);
        }
    }
}

impl<T> std::fmt::Debug for Cached<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "Cached(kept)"
        } else {
            "Cached"
        })
    }
}

impl<T> Default for Cached<T> {
    fn default() -> Cached<T> {
        Cached::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Once the recorder is installed the handle is made once and kept,
    /// and what is done through it reaches the exposition.
    #[test]
    fn a_cached_handle_is_made_once_and_counts() {
        let handle = install().expect("recorder");
        static C: Cached<metrics::Counter> = Cached::new();
        let mut made = 0;
        for _ in 0..3 {
            C.with(
                || {
                    made += 1;
                    metrics::counter!("test_cached_total")
                },
                |c| c.increment(2),
            );
        }
        assert_eq!(made, 1);
        let text = handle.render();
        assert!(text.contains("test_cached_total 6"), "{text}");
    }

    /// Kept transaction counters count by verdict and reason class, as the
    /// registry's own would.
    #[test]
    fn kept_transaction_counters_count_by_verdict_and_reason() {
        let handle = install().expect("recorder");
        for _ in 0..3 {
            count_transaction("reject", "test_kept:a,rule:b");
        }
        count_transaction("tag", "test_kept:a");
        count_transaction("reject", "test_kept:c");
        let text = handle.render();
        for line in [
            r#"portcullis_transactions_total{verdict="reject",reason="test_kept:a"} 3"#,
            r#"portcullis_transactions_total{verdict="tag",reason="test_kept:a"} 1"#,
            r#"portcullis_transactions_total{verdict="reject",reason="test_kept:c"} 1"#,
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
    }
}
