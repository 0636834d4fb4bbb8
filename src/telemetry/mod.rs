//! Logging: set-up, and the one line per transaction or refused connection.

pub mod events;
pub mod http;
pub mod metrics;
mod txlog;

pub use txlog::{CheckLog, RefusedConnection, TxnRecord, Verdict, event_name, key, queue_id_in};

use crate::config::{Log, LogFormat};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Where log lines go: stdout, or a file that can be reopened (logrotate
/// moves it away, then SIGHUP makes us open a fresh one at the same path).
#[derive(Clone)]
pub struct LogTarget {
    file: Option<(PathBuf, Arc<Mutex<File>>)>,
    /// stdout is the journal: each line starts with its syslog priority
    /// (`<6>`), which journald takes off and files the line under.
    journal: bool,
}

impl LogTarget {
    pub fn open(path: Option<&Path>) -> Result<LogTarget, String> {
        match path {
            None => Ok(LogTarget {
                file: None,
                journal: false,
            }),
            Some(p) => {
                let f = open_append(p)?;
                Ok(LogTarget {
                    file: Some((p.to_path_buf(), Arc::new(Mutex::new(f)))),
                    journal: false,
                })
            }
        }
    }

    /// Reopens the file at its path; keeps the old one on error.
    pub fn reopen(&self) -> Result<(), String> {
        if let Some((path, slot)) = &self.file {
            let f = open_append(path)?;
            if let Ok(mut g) = slot.lock() {
                *g = f;
            }
        }
        Ok(())
    }
}

fn open_append(p: &Path) -> Result<File, String> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(p)
        .map_err(|e| format!("{}: {e}", p.display()))
}

/// One writer per event: the current file, or stdout (with the event's
/// syslog priority first when stdout is the journal).
pub enum LogWriter {
    Stdout(std::io::Stdout),
    Journal(std::io::Stdout, Option<&'static [u8]>),
    File(Arc<Mutex<File>>),
}

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            LogWriter::Stdout(s) => s.write(buf),
            LogWriter::Journal(s, priority) => {
                if let Some(p) = priority.take() {
                    s.write_all(p)?;
                }
                s.write(buf)
            }
            LogWriter::File(f) => match f.lock() {
                Ok(mut f) => f.write(buf),
                Err(_) => Ok(buf.len()),
            },
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            LogWriter::Stdout(s) | LogWriter::Journal(s, _) => s.flush(),
            LogWriter::File(f) => match f.lock() {
                Ok(mut f) => f.flush(),
                Err(_) => Ok(()),
            },
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogTarget {
    type Writer = LogWriter;
    fn make_writer(&'a self) -> LogWriter {
        match &self.file {
            Some((_, f)) => LogWriter::File(Arc::clone(f)),
            None => LogWriter::Stdout(std::io::stdout()),
        }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> LogWriter {
        if !self.journal {
            return self.make_writer();
        }
        // sd-daemon(3) priorities.
        let priority: &'static [u8] = match *meta.level() {
            tracing::Level::ERROR => b"<3>",
            tracing::Level::WARN => b"<4>",
            tracing::Level::INFO => b"<6>",
            _ => b"<7>",
        };
        LogWriter::Journal(std::io::stdout(), Some(priority))
    }
}

/// Whether stdout is the journal (systemd sets JOURNAL_STREAM to its
/// device and inode), and not, say, a pipe the service's stdout was
/// redirected to.
pub fn stdout_is_journal(journal_stream: Option<&str>) -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let Some((dev, ino)) = journal_stream.and_then(|v| v.split_once(':')) else {
        return false;
    };
    let Ok(fd) = std::io::stdout().as_fd().try_clone_to_owned() else {
        return false;
    };
    match File::from(fd).metadata() {
        Ok(m) => dev.parse() == Ok(m.dev()) && ino.parse() == Ok(m.ino()),
        Err(_) => false,
    }
}

/// Installs the global subscriber (json or logfmt, to stdout or `log.file`).
/// Lines going to the journal carry no timestamp of their own (journald
/// stamps each line, and `stats` reads its prefix) and start with their
/// syslog priority, so `journalctl -p warning` works.
pub fn init(log: &Log) -> Result<LogTarget, String> {
    let filter = EnvFilter::try_new(&log.level).map_err(|e| e.to_string())?;
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let mut target = LogTarget::open(log.file.as_deref())?;
    let journal =
        log.file.is_none() && stdout_is_journal(std::env::var("JOURNAL_STREAM").ok().as_deref());
    target.journal = journal;
    let registry = tracing_subscriber::registry().with(filter);
    let json = || {
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(target.clone())
    };
    match (log.format, journal) {
        (LogFormat::Json, false) => registry.with(json()).try_init(),
        (LogFormat::Json, true) => registry.with(json().without_time()).try_init(),
        (LogFormat::Logfmt, journal) => registry
            .with(
                tracing_logfmt::builder()
                    .with_timestamp(!journal)
                    .layer()
                    .with_writer(target.clone()),
            )
            .try_init(),
    }
    .map_err(|e| e.to_string())?;
    let _ = LEVEL.set(Box::new(move |level: &str| {
        let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
        handle.reload(filter).map_err(|e| e.to_string())
    }));
    Ok(target)
}

/// Puts a new `log.level` filter in force (a config reload).
type SetLevel = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;
static LEVEL: std::sync::OnceLock<SetLevel> = std::sync::OnceLock::new();

/// Changes the level filter of the subscriber `init` installed; Ok and no
/// effect when there is none (tests, `explain`).
pub fn set_level(level: &str) -> Result<(), String> {
    match LEVEL.get() {
        Some(set) => set(level),
        None => Ok(()),
    }
}

/// A new session id: 14 hex digits, the process's start second and a
/// counter, unique per process run (proxy sessions and milter
/// conversations alike).
pub fn session_id() -> SessionId {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static EPOCH: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    });
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    SessionId::new(epoch as u32, n)
}

/// A session id, kept inline: every idle session holds one (and the
/// connection task a copy), and as `String`s they were two allocations
/// per connection.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SessionId {
    len: u8,
    /// 8 hex digits of the epoch and 6 to 16 of the counter.
    digits: [u8; 24],
}

impl SessionId {
    /// `{epoch:08x}{n:06x}`, without the formatting machinery (one per
    /// connection, at every door).
    fn new(epoch: u32, n: u64) -> SessionId {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut digits = [0u8; 24];
        let width = (n.max(1).ilog2() / 4 + 1).max(6) as usize;
        let all = (u128::from(epoch) << (4 * width)) | u128::from(n);
        let len = 8 + width;
        for (i, d) in digits[..len].iter_mut().rev().enumerate() {
            *d = HEX[((all >> (4 * i)) & 0xf) as usize];
        }
        SessionId {
            len: len as u8,
            digits,
        }
    }
}

impl std::ops::Deref for SessionId {
    type Target = str;
    fn deref(&self) -> &str {
        std::str::from_utf8(&self.digits[..usize::from(self.len)]).unwrap_or_default()
    }
}

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self)
    }
}

impl std::fmt::Debug for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&**self, f)
    }
}

#[cfg(test)]
mod session_id_tests {
    use super::SessionId;

    #[test]
    fn a_session_id_is_its_hex_digits() {
        assert_eq!(&*SessionId::new(0x6751_2c00, 1), "67512c00000001");
        assert_eq!(
            SessionId::new(0xffff_ffff, u64::MAX).to_string(),
            "ffffffffffffffffffffffff"
        );
        assert_eq!(
            format!("{:?}", SessionId::new(1, 0x1234567)),
            "\"000000011234567\""
        );
        // The same digits as the formatting machinery writes.
        for (epoch, n) in [(0, 0), (7, 0xfffff), (7, 0x100000), (0x8000_0000, 1 << 63)] {
            assert_eq!(&*SessionId::new(epoch, n), format!("{epoch:08x}{n:06x}"));
        }
    }
}
