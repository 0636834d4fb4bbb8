//! Holding a message while it arrives, the same for both doors: within
//! the size limit and the memory budget, for the bytes and for the checks'
//! whole-message parse. What is not held is still counted (the log line
//! gives the message's size), and refused with our reply at its end.

use crate::runtime::limits::{MemoryBudget, Reservation};
use crate::wire::reply::{self, Reply};
use std::sync::Arc;

/// One message being received.
pub struct Hold {
    max_size: u64,
    reservation: Reservation,
    size: u64,
    oversized: bool,
    over_budget: bool,
}

impl Hold {
    pub fn new(max_size: u64, budget: &Arc<MemoryBudget>) -> Hold {
        Hold {
            max_size,
            reservation: budget.reservation(),
            size: 0,
            oversized: false,
            over_budget: false,
        }
    }

    /// Whether what arrives is still kept.
    pub fn keeping(&self) -> bool {
        !self.oversized && !self.over_budget
    }

    /// The message has reached `size` octets; what is kept fills a buffer
    /// of `capacity`. False once it is not kept (past the size limit or
    /// the budget): the caller drops the buffer, and its share of the
    /// budget is given back.
    pub fn grew(&mut self, size: u64, capacity: usize) -> bool {
        self.size = size;
        if !self.keeping() {
            return false;
        }
        if size > self.max_size {
            self.oversized = true;
        } else if !self.reservation.ensure(capacity) {
            self.over_budget = true;
        }
        if !self.keeping() {
            self.reservation.release();
        }
        self.keeping()
    }

    /// The message is whole; `parse`: checks will parse it (decoded parts,
    /// headers), which takes up to its size again, held from the budget
    /// like the message itself.
    pub fn before_checks(&mut self, parse: bool, capacity: usize, len: usize) {
        if parse && self.keeping() && !self.reservation.ensure(capacity + len) {
            self.over_budget = true;
            self.reservation.release();
        }
    }

    /// Octets received, kept or not.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Our reply to a message that was not held, and the log's reason.
    pub fn refusal(&self) -> Option<(Reply, &'static str)> {
        if self.oversized {
            Some((reply::SIZE_EXCEEDED, "limit:size"))
        } else if self.over_budget {
            Some((reply::OUT_OF_MEMORY, "limit:memory_budget"))
        } else {
            None
        }
    }

    /// The budget held for the message, to travel with it to the checks
    /// (and be given back when the last holder lets it go).
    pub fn take_reservation(&mut self) -> Reservation {
        self.reservation.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn past_the_size_limit_it_is_counted_not_kept() {
        let budget = MemoryBudget::new(1 << 20);
        let mut h = Hold::new(100, &budget);
        assert!(h.grew(60, 64));
        assert!(!h.grew(120, 128));
        assert!(!h.grew(500, 0));
        assert_eq!(h.size(), 500);
        assert_eq!(h.refusal().unwrap().1, "limit:size");
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn the_budget_covers_the_bytes_and_the_parse() {
        let budget = MemoryBudget::new(256 << 10);
        let mut a = Hold::new(1 << 20, &budget);
        assert!(a.grew(100 << 10, 128 << 10));
        a.before_checks(false, 128 << 10, 100 << 10);
        assert!(a.refusal().is_none());
        let mut b = Hold::new(1 << 20, &budget);
        assert!(b.grew(100 << 10, 128 << 10));
        // b's parse does not fit beside a.
        b.before_checks(true, 128 << 10, 100 << 10);
        assert_eq!(b.refusal().unwrap().1, "limit:memory_budget");
        drop(a);
        let mut c = Hold::new(1 << 20, &budget);
        assert!(c.grew(100 << 10, 128 << 10));
        c.before_checks(true, 128 << 10, 100 << 10);
        assert!(c.refusal().is_none());
    }
}
