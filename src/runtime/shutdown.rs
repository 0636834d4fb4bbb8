//! Graceful shutdown: stop accepting, let transactions finish, then abort.

use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Running,
    /// Stop accepting; sessions close between transactions with 421 4.3.2.
    Draining,
    /// Drain deadline passed: every session answers 421 4.3.2 now.
    Abort,
}

#[derive(Debug)]
pub struct Shutdown {
    tx: watch::Sender<Phase>,
}

/// A session's view of the shutdown phase.
#[derive(Debug, Clone)]
pub struct ShutdownSignal {
    rx: watch::Receiver<Phase>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    pub fn new() -> Shutdown {
        let (tx, _) = watch::channel(Phase::Running);
        Shutdown { tx }
    }

    pub fn signal(&self) -> ShutdownSignal {
        ShutdownSignal {
            rx: self.tx.subscribe(),
        }
    }

    pub fn set(&self, phase: Phase) {
        self.tx.send_if_modified(|p| {
            if phase > *p {
                *p = phase;
                true
            } else {
                false
            }
        });
    }
}

impl ShutdownSignal {
    pub fn phase(&self) -> Phase {
        *self.rx.borrow()
    }

    /// Resolves once the phase reaches `at_least`.
    pub async fn reached(&mut self, at_least: Phase) {
        // An error means the sender is gone: treat as final.
        let _ = self.rx.wait_for(|p| *p >= at_least).await;
    }
}
