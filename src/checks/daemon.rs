//! What the checks that ask another daemon about each message (clamd,
//! rspamd, spamd) share: at most `connections` of them at once over every
//! session, and one deadline per message that covers waiting for one.

use std::future::Future;
use std::time::Duration;
use tokio::sync::Semaphore;

pub struct Daemon {
    /// One permit per connection to the daemon.
    slots: Semaphore,
    /// One message's call, waiting for a permit included.
    limit: Duration,
}

impl Daemon {
    pub fn new(connections: usize, limit: Duration) -> Daemon {
        Daemon {
            slots: Semaphore::new(connections.max(1)),
            limit,
        }
    }

    /// `work` on a connection of its own, within the deadline. `Err` names
    /// the deadline (`key`, its value) when it passed first.
    pub async fn ask<T>(&self, key: &str, work: impl Future<Output = T>) -> Result<T, String> {
        let bounded = async {
            // The semaphore is never closed: a permit always comes in time or not.
            let _slot = self.slots.acquire().await.ok();
            work.await
        };
        tokio::time::timeout(self.limit, bounded)
            .await
            .map_err(|_| {
                format!(
                    "no answer within {key} ({})",
                    humantime::format_duration(self.limit)
                )
            })
    }
}
