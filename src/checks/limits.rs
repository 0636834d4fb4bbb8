//! Per-transaction limits as a check: declared SIZE and recipient count.

use super::{Check, CheckFuture, Envelope, Outcome, Stage};
use crate::wire::reply;

pub struct Limits {
    pub max_message_size: u64,
    pub max_recipients: usize,
}

impl Limits {
    fn decide(&self, stage: Stage, env: &Envelope<'_>) -> Outcome {
        match stage {
            Stage::Mail if env.declared_size.is_some_and(|s| s > self.max_message_size) => {
                Outcome::Refuse {
                    reply: reply::SIZE_EXCEEDED,
                    reason: "limit:size",
                }
            }
            Stage::Rcpt if env.rcpts >= self.max_recipients => Outcome::Refuse {
                reply: reply::TOO_MANY_RCPTS,
                reason: "limit:recipients",
            },
            _ => Outcome::Continue,
        }
    }
}

impl Check for Limits {
    fn name(&self) -> &'static str {
        "limits"
    }

    fn check<'a>(&'a self, stage: Stage, env: &'a Envelope<'a>) -> CheckFuture<'a> {
        let outcome = self.decide(stage, env);
        Box::pin(std::future::ready(outcome))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(size: Option<u64>, rcpts: usize) -> Envelope<'static> {
        Envelope {
            client: "192.0.2.1:1".parse().unwrap(),
            helo: Some("h"),
            mail_from: Some("a@b"),
            declared_size: size,
            rcpts,
            message: None,
        }
    }

    #[test]
    fn size_and_recipients() {
        let l = Limits {
            max_message_size: 100,
            max_recipients: 2,
        };
        assert_eq!(l.decide(Stage::Mail, &env(Some(100), 0)), Outcome::Continue);
        let Outcome::Refuse { reply, .. } = l.decide(Stage::Mail, &env(Some(101), 0)) else {
            panic!("not refused")
        };
        assert_eq!(
            (reply.code, reply.enhanced_code().unwrap().as_str()),
            (552, "5.3.4")
        );
        assert_eq!(l.decide(Stage::Rcpt, &env(None, 1)), Outcome::Continue);
        let Outcome::Refuse { reply, .. } = l.decide(Stage::Rcpt, &env(None, 2)) else {
            panic!("not refused")
        };
        assert_eq!(
            (reply.code, reply.enhanced_code().unwrap().as_str()),
            (452, "4.5.3")
        );
    }
}
