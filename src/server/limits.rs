//! Connection limits (total and per client address) and the memory budget
//! for buffered message data across all sessions.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Counts open sessions, in total and per client address.
#[derive(Debug)]
pub struct ConnectionLimits {
    max_total: usize,
    max_per_ip: usize,
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// Why a connection was refused before the greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Total,
    PerIp,
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::Total => "limit:connections",
            Refusal::PerIp => "limit:connections_per_ip",
        }
    }
}

impl ConnectionLimits {
    pub fn new(max_total: usize, max_per_ip: usize) -> Arc<ConnectionLimits> {
        Arc::new(ConnectionLimits {
            max_total,
            max_per_ip,
            total: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
        })
    }

    /// Takes a slot for `ip`, released when the guard drops.
    pub fn acquire(self: &Arc<Self>, ip: IpAddr) -> Result<ConnectionGuard, Refusal> {
        let ip = ip.to_canonical();
        if self.total.fetch_add(1, Ordering::AcqRel) >= self.max_total {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::Total);
        }
        let mut map = match self.per_ip.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        let n = map.entry(ip).or_insert(0);
        if *n >= self.max_per_ip {
            drop(map);
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::PerIp);
        }
        *n += 1;
        Ok(ConnectionGuard {
            limits: Arc::clone(self),
            ip,
        })
    }

    pub fn open(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }
}

#[derive(Debug)]
pub struct ConnectionGuard {
    limits: Arc<ConnectionLimits>,
    ip: IpAddr,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let mut map = match self.limits.per_ip.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
        drop(map);
        self.limits.total.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A global cap on bytes of message data held in memory.
#[derive(Debug)]
pub struct MemoryBudget {
    cap: usize,
    used: AtomicUsize,
}

impl MemoryBudget {
    pub fn new(cap: usize) -> Arc<MemoryBudget> {
        Arc::new(MemoryBudget {
            cap,
            used: AtomicUsize::new(0),
        })
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// An empty reservation that can grow.
    pub fn reservation(self: &Arc<Self>) -> Reservation {
        Reservation {
            budget: Arc::clone(self),
            held: 0,
        }
    }

    fn try_take(&self, n: usize) -> bool {
        let mut cur = self.used.load(Ordering::Acquire);
        loop {
            let Some(next) = cur.checked_add(n).filter(|&v| v <= self.cap) else {
                return false;
            };
            match self
                .used
                .compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    metrics::gauge!("portcullis_memory_budget_bytes").set(next as f64);
                    return true;
                }
                Err(actual) => cur = actual,
            }
        }
    }
}

/// Bytes held from the budget by one session; given back on drop.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<MemoryBudget>,
    held: usize,
}

/// Growth step, so the shared counter is not touched on every read.
const STEP: usize = 64 * 1024;

impl Reservation {
    /// Makes sure at least `need` bytes are held; false when the budget is spent.
    pub fn ensure(&mut self, need: usize) -> bool {
        if need <= self.held {
            return true;
        }
        let want = need.div_ceil(STEP) * STEP;
        let extra = want - self.held;
        if self.budget.try_take(extra) {
            self.held = want;
            true
        } else {
            false
        }
    }

    pub fn release(&mut self) {
        if self.held > 0 {
            let left = self.budget.used.fetch_sub(self.held, Ordering::AcqRel) - self.held;
            metrics::gauge!("portcullis_memory_budget_bytes").set(left as f64);
        }
        self.held = 0;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_ip_and_total() {
        let l = ConnectionLimits::new(3, 2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let g1 = l.acquire(a).unwrap();
        let _g2 = l.acquire(a).unwrap();
        assert_eq!(l.acquire(a).unwrap_err(), Refusal::PerIp);
        let _g3 = l.acquire(b).unwrap();
        assert_eq!(l.acquire(b).unwrap_err(), Refusal::Total);
        drop(g1);
        let _g4 = l.acquire(a).unwrap();
        assert_eq!(l.open(), 3);
    }

    #[test]
    fn budget_is_shared_and_returned() {
        let b = MemoryBudget::new(128 * 1024);
        let mut r1 = b.reservation();
        let mut r2 = b.reservation();
        assert!(r1.ensure(100_000));
        assert!(!r2.ensure(100_000));
        drop(r1);
        assert!(r2.ensure(100_000));
        r2.release();
        assert_eq!(b.used(), 0);
    }
}
