//! The connection threads: single-threaded runtimes (`threads`; by
//! default one per two CPUs), each with its own accept loop on every
//! listener (`SO_REUSEPORT`: the kernel spreads new connections over the
//! threads' sockets).
//!
//! A connection's reads, writes and timers stay on the thread that
//! accepted it, with that thread's epoll: no task moves between threads,
//! and no thread is woken to look for work another has. On tokio's
//! work-stealing runtime a wake-up of a session's task also woke an idle
//! worker to steal, which cost more than the session's own code (see
//! README, Performance: "Connection threads").

use std::future::Future;
use std::sync::OnceLock;
use tokio::runtime::Handle;

pub struct Workers {
    handles: Vec<Handle>,
}

thread_local! {
    /// The index of the connection thread this is, if it is one.
    static CURRENT: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// The connection thread running this code, if it is one.
pub fn current() -> Option<usize> {
    CURRENT.with(std::cell::Cell::get)
}

/// Process-wide, made on first use: `threads` of them (0: one per two
/// CPUs, at least one). Only the first call's number counts. None only if
/// no thread could be started (then connections run on the caller's
/// runtime).
///
/// Half the CPUs by default: the gate shares its host with the MTA behind
/// it and with the kernel's networking, which does most of a relay's
/// work. On a 2-core machine one thread took 81 µs of CPU per message
/// where two took 102 (`benches/load.sh`, README "Connection threads").
pub fn workers(threads: usize) -> Option<&'static Workers> {
    static WORKERS: OnceLock<Option<Workers>> = OnceLock::new();
    WORKERS
        .get_or_init(|| {
            let handles: Vec<Handle> = (0..count(threads)).filter_map(start).collect();
            (!handles.is_empty()).then_some(Workers { handles })
        })
        .as_ref()
}

/// How many connection threads the `threads` setting asks for.
pub fn count(threads: usize) -> usize {
    match threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get().div_ceil(2)),
        n => n,
    }
}

/// One thread running a single-threaded runtime until the process ends.
fn start(i: usize) -> Option<Handle> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| tracing::error!(error = %e, "cannot start a connection thread"))
        .ok()?;
    let handle = rt.handle().clone();
    // Sessions log where the thread that started the server logs: the
    // global subscriber in the daemon, a test's own (scoped) one in tests.
    let logs = tracing::dispatcher::get_default(Clone::clone);
    std::thread::Builder::new()
        .name(format!("portcullis-conn-{i}"))
        .spawn(move || {
            let _logs = tracing::dispatcher::set_default(&logs);
            CURRENT.with(|c| c.set(Some(i)));
            rt.block_on(std::future::pending::<()>())
        })
        .map_err(|e| tracing::error!(error = %e, "cannot start a connection thread"))
        .ok()?;
    Some(handle)
}

impl Workers {
    /// How many threads there are.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Never: there is at least one thread.
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Runs a task (an accept loop) on thread `i` (modulo their number).
    pub fn spawn_on<F>(&self, i: usize, fut: F) -> tokio::task::JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.handles[i % self.handles.len()].spawn(fut)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each task runs on the thread it was given, and knows which.
    #[tokio::test]
    async fn tasks_run_on_the_thread_they_were_given() {
        let w = workers(0).expect("threads start");
        assert!(!w.is_empty());
        for i in 0..w.len() {
            let (tx, rx) = tokio::sync::oneshot::channel();
            w.spawn_on(i, async move {
                let _ = tx.send((current(), std::thread::current().id()));
            });
            let (at, _) = rx.await.unwrap();
            assert_eq!(at, Some(i));
        }
        assert_eq!(current(), None, "the test's own thread is not one");
    }
}
