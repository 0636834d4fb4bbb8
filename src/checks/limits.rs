//! Per-transaction limits: the declared SIZE at MAIL and the recipient
//! count at RCPT. They refuse at once (not through the verdict) and hold
//! for allow-listed clients too.

use super::{Check, Facts, Hook, TxnFacts, done};
use crate::config::LimitsConfig;
use crate::wire::reply;

pub struct Limits {
    max_message_size: u64,
    max_recipients: usize,
}

impl Limits {
    pub fn new(cfg: &LimitsConfig) -> Limits {
        Limits {
            max_message_size: cfg.max_message_size.0,
            max_recipients: cfg.max_recipients,
        }
    }

    fn at_mail(&self, t: &mut TxnFacts) {
        if t.declared_size.is_some_and(|s| s > self.max_message_size) {
            t.found.refuse_now = Some((reply::SIZE_EXCEEDED, "limit:size".into()));
        }
    }

    fn at_rcpt(&self, t: &mut TxnFacts) {
        if t.rcpts.len() >= self.max_recipients {
            t.found.refuse_now = Some((reply::TOO_MANY_RCPTS, "limit:recipients".into()));
        }
    }
}

impl Check for Limits {
    fn always(&self) -> bool {
        true
    }

    fn mail<'a>(&'a self, f: &'a mut Facts) -> Hook<'a> {
        self.at_mail(&mut f.txn);
        done()
    }

    fn rcpt<'a>(&'a self, f: &'a mut Facts) -> Hook<'a> {
        self.at_rcpt(&mut f.txn);
        done()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_message_size: 100,
            max_recipients: 2,
        }
    }

    fn refusal(t: &TxnFacts) -> Option<(u16, String, &str)> {
        t.found
            .refuse_now
            .as_ref()
            .map(|(r, why)| (r.code, r.enhanced_code().unwrap_or_default(), why.as_str()))
    }

    #[test]
    fn declared_size_over_the_limit_is_refused_at_mail() {
        let mut t = TxnFacts {
            declared_size: Some(100),
            ..TxnFacts::default()
        };
        limits().at_mail(&mut t);
        assert_eq!(refusal(&t), None);
        t.declared_size = Some(101);
        limits().at_mail(&mut t);
        assert_eq!(refusal(&t), Some((552, "5.3.4".into(), "limit:size")));
    }

    #[test]
    fn recipients_past_the_limit_are_refused_at_rcpt() {
        let mut t = TxnFacts {
            rcpts: vec!["a@x".into()],
            ..TxnFacts::default()
        };
        limits().at_rcpt(&mut t);
        assert_eq!(refusal(&t), None);
        t.rcpts.push("b@x".into());
        limits().at_rcpt(&mut t);
        assert_eq!(refusal(&t), Some((452, "4.5.3".into(), "limit:recipients")));
    }
}
