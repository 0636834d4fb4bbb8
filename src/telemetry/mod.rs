//! Logging: set-up, and the one line per transaction or refused connection.

mod txlog;

pub use txlog::{RefusedConnection, TxnRecord, Verdict};

use crate::config::{Log, LogFormat};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Installs the global subscriber (json or logfmt on stdout).
pub fn init(log: &Log) -> Result<(), String> {
    let filter = EnvFilter::try_new(&log.level).map_err(|e| e.to_string())?;
    let registry = tracing_subscriber::registry().with(filter);
    match log.format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(false)
                    .with_writer(std::io::stdout),
            )
            .try_init(),
        LogFormat::Logfmt => registry
            .with(
                tracing_logfmt::builder()
                    .layer()
                    .with_writer(std::io::stdout),
            )
            .try_init(),
    }
    .map_err(|e| e.to_string())
}
