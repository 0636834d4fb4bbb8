//! Checks run at each stage of the dialogue. A check returns an `Outcome`;
//! only the session writes replies and only `upstream` talks to the MTA.

pub mod auth;
mod client_name;
pub mod dnsbl;
mod limits;
pub mod pool;

pub use auth::{CheckLog, Checker, ConnChecks, DataChecks, TxnChecks};
pub use limits::Limits;

use crate::wire::reply::Reply;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;

pub use crate::wire::stage::Stage;

/// What a check decided. Haraka's vocabulary: continue, deny, deny-soft.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Continue,
    /// Refuse with a 5xx (or 4xx for limits that the sender can retry).
    Refuse {
        reply: Reply,
        reason: &'static str,
    },
}

/// What checks can see. Fields fill in as the dialogue goes on.
#[derive(Debug, Clone, Copy)]
pub struct Envelope<'a> {
    pub client: SocketAddr,
    pub helo: Option<&'a str>,
    pub mail_from: Option<&'a str>,
    pub declared_size: Option<u64>,
    /// Recipients accepted so far (before the one being checked at RCPT).
    pub rcpts: usize,
    pub message: Option<&'a [u8]>,
}

pub type CheckFuture<'a> = Pin<Box<dyn Future<Output = Outcome> + Send + 'a>>;

pub trait Check: Send + Sync {
    fn name(&self) -> &'static str;
    fn check<'a>(&'a self, stage: Stage, env: &'a Envelope<'a>) -> CheckFuture<'a>;
}

/// The checks in the order they run; the first refusal wins.
#[derive(Default)]
pub struct Pipeline {
    checks: Vec<Box<dyn Check>>,
}

impl Pipeline {
    pub fn new(checks: Vec<Box<dyn Check>>) -> Pipeline {
        Pipeline { checks }
    }

    pub async fn run(&self, stage: Stage, env: &Envelope<'_>) -> Outcome {
        for c in &self.checks {
            let outcome = c.check(stage, env).await;
            if outcome != Outcome::Continue {
                return outcome;
            }
        }
        Outcome::Continue
    }
}
