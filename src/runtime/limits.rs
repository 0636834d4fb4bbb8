//! Connection limits (total and per client address) and the memory budget
//! for buffered message data across all sessions.

use ipnet::IpNet;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Counts open sessions, in total, per client address and per client
/// network (a /24 or /64 by default: one bot herd on rented addresses).
#[derive(Debug)]
pub struct ConnectionLimits {
    max_total: usize,
    max_per_ip: usize,
    max_per_net: usize,
    prefix_v4: u8,
    prefix_v6: u8,
    /// Open sessions from which stress mode is on.
    stress_at: usize,
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    per_net: Mutex<HashMap<IpAddr, usize>>,
    stressed: std::sync::atomic::AtomicBool,
}

/// How many connections may be open, and when the gate is under stress.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionBounds {
    pub max_total: usize,
    pub max_per_ip: usize,
    pub max_per_network: usize,
    pub prefix_v4: u8,
    pub prefix_v6: u8,
    /// Stress mode from this many open sessions on.
    pub stress_at: usize,
}

impl ConnectionBounds {
    /// The limits and the stress threshold of a config.
    pub fn of(cfg: &crate::config::Config) -> ConnectionBounds {
        let l = &cfg.limits;
        ConnectionBounds {
            max_total: l.max_connections,
            max_per_ip: l.max_connections_per_ip,
            max_per_network: l.max_connections_per_network,
            prefix_v4: l.network_prefix_v4,
            prefix_v6: l.network_prefix_v6,
            stress_at: (l.max_connections * usize::from(cfg.stress.at_percent)).div_ceil(100),
        }
    }
}

impl ConnectionBounds {
    /// The milter listeners' limits: total and per address, no network
    /// limit and no stress mode (the MTA, not a client, connects).
    pub fn milter(cfg: &crate::config::Config) -> ConnectionBounds {
        let m = &cfg.milter;
        ConnectionBounds {
            max_total: m.max_connections,
            max_per_ip: m.max_connections_per_ip,
            max_per_network: m.max_connections,
            prefix_v4: 32,
            prefix_v6: 128,
            stress_at: usize::MAX,
        }
    }
}

/// The network of `ip` (its address with the host bits cleared).
pub fn network(ip: IpAddr, prefix_v4: u8, prefix_v6: u8) -> IpAddr {
    let ip = ip.to_canonical();
    let len = if ip.is_ipv4() {
        prefix_v4.min(32)
    } else {
        prefix_v6.min(128)
    };
    IpNet::new(ip, len).map_or(ip, |n| n.trunc().addr())
}

/// Why a connection was refused before the greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Total,
    PerIp,
    PerNetwork,
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::Total => "limit:connections",
            Refusal::PerIp => "limit:connections_per_ip",
            Refusal::PerNetwork => "limit:connections_per_network",
        }
    }
}

impl ConnectionLimits {
    pub fn new(b: ConnectionBounds) -> Arc<ConnectionLimits> {
        Arc::new(ConnectionLimits {
            max_total: b.max_total,
            max_per_ip: b.max_per_ip,
            max_per_net: b.max_per_network,
            prefix_v4: b.prefix_v4,
            prefix_v6: b.prefix_v6,
            stress_at: b.stress_at,
            total: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
            per_net: Mutex::new(HashMap::new()),
            stressed: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Takes a slot for `ip`, released when the guard drops.
    pub fn acquire(self: &Arc<Self>, ip: IpAddr) -> Result<ConnectionGuard, Refusal> {
        let ip = ip.to_canonical();
        let net = network(ip, self.prefix_v4, self.prefix_v6);
        if self.total.fetch_add(1, Ordering::AcqRel) >= self.max_total {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::Total);
        }
        if !take(&self.per_ip, ip, self.max_per_ip) {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::PerIp);
        }
        if !take(&self.per_net, net, self.max_per_net) {
            give_back(&self.per_ip, ip);
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::PerNetwork);
        }
        self.note_stress();
        Ok(ConnectionGuard {
            limits: Arc::clone(self),
            addr: Some((ip, net)),
        })
    }

    /// Takes a slot for a connection without an address (a Unix socket):
    /// only the total counts.
    pub fn acquire_local(self: &Arc<Self>) -> Result<ConnectionGuard, Refusal> {
        if self.total.fetch_add(1, Ordering::AcqRel) >= self.max_total {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::Total);
        }
        self.note_stress();
        Ok(ConnectionGuard {
            limits: Arc::clone(self),
            addr: None,
        })
    }

    pub fn open(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }

    /// Most slots are taken: sessions get shorter deadlines (Postfix's
    /// `${stress?...}`).
    pub fn stressed(&self) -> bool {
        self.open() >= self.stress_at
    }

    /// Logs and counts the moments stress mode begins and ends.
    fn note_stress(&self) {
        let now = self.stressed();
        if self.stressed.swap(now, Ordering::AcqRel) != now {
            crate::telemetry::events::StressChanged {
                on: now,
                open: self.open(),
                at: self.stress_at,
            }
            .emit();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// One more for `key` unless it already has `max`.
fn take(map: &Mutex<HashMap<IpAddr, usize>>, key: IpAddr, max: usize) -> bool {
    let mut map = lock(map);
    let n = map.entry(key).or_insert(0);
    if *n >= max {
        if *n == 0 {
            map.remove(&key);
        }
        return false;
    }
    *n += 1;
    true
}

fn give_back(map: &Mutex<HashMap<IpAddr, usize>>, key: IpAddr) {
    let mut map = lock(map);
    if let Some(n) = map.get_mut(&key) {
        *n -= 1;
        if *n == 0 {
            map.remove(&key);
        }
    }
}

#[derive(Debug)]
pub struct ConnectionGuard {
    limits: Arc<ConnectionLimits>,
    /// The client's address and network, when it has one.
    addr: Option<(IpAddr, IpAddr)>,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if let Some((ip, net)) = self.addr {
            give_back(&self.limits.per_ip, ip);
            give_back(&self.limits.per_net, net);
        }
        self.limits.total.fetch_sub(1, Ordering::AcqRel);
        self.limits.note_stress();
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
                    crate::telemetry::events::MemoryHeld(next).emit();
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

    /// Moves what is held into a new reservation (this one then holds
    /// nothing).
    pub fn take(&mut self) -> Reservation {
        let held = std::mem::take(&mut self.held);
        Reservation {
            budget: Arc::clone(&self.budget),
            held,
        }
    }

    pub fn release(&mut self) {
        if self.held > 0 {
            let left = self.budget.used.fetch_sub(self.held, Ordering::AcqRel) - self.held;
            crate::telemetry::events::MemoryHeld(left).emit();
        }
        self.held = 0;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.release();
    }
}

/// A received message and its share of the memory budget, given back when
/// the last holder (the session, or a rule evaluation past its budget)
/// lets it go.
pub struct Held {
    pub bytes: Vec<u8>,
    _reservation: Reservation,
}

impl Held {
    pub fn new(bytes: Vec<u8>, reservation: Reservation) -> Held {
        Held {
            bytes,
            _reservation: reservation,
        }
    }
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds(max_total: usize, max_per_ip: usize, max_per_network: usize) -> ConnectionBounds {
        ConnectionBounds {
            max_total,
            max_per_ip,
            max_per_network,
            prefix_v4: 24,
            prefix_v6: 64,
            stress_at: max_total,
        }
    }

    #[test]
    fn connections_without_an_address_count_in_the_total_only() {
        let l = ConnectionLimits::new(bounds(3, 1, 1));
        let a = l.acquire_local().unwrap();
        let _b = l.acquire_local().unwrap();
        let _c = l.acquire("192.0.2.1".parse().unwrap()).unwrap();
        assert_eq!(l.acquire_local().unwrap_err(), Refusal::Total);
        drop(a);
        let _d = l.acquire_local().unwrap();
        assert_eq!(l.open(), 3);
    }

    #[test]
    fn per_network() {
        let l = ConnectionLimits::new(bounds(100, 2, 3));
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let _a = l.acquire(ip("192.0.2.1")).unwrap();
        let _b = l.acquire(ip("192.0.2.2")).unwrap();
        let c = l.acquire(ip("192.0.2.3")).unwrap();
        assert_eq!(l.acquire(ip("192.0.2.4")).unwrap_err(), Refusal::PerNetwork);
        // Refused by the network: the address's count was given back.
        drop(c);
        let _d = l.acquire(ip("192.0.2.4")).unwrap();
        let _e = l.acquire(ip("192.0.3.1")).unwrap();
        let _v6a = l.acquire(ip("2001:db8:0:1::1")).unwrap();
        let _v6b = l.acquire(ip("2001:db8:0:1:ffff::2")).unwrap();
        let _v6c = l.acquire(ip("2001:db8:0:1::3")).unwrap();
        assert_eq!(
            l.acquire(ip("2001:db8:0:1::4")).unwrap_err(),
            Refusal::PerNetwork
        );
        assert!(l.acquire(ip("2001:db8:0:2::1")).is_ok());
        assert_eq!(network(ip("::ffff:192.0.2.77"), 24, 64), ip("192.0.2.0"));
        assert_eq!(network(ip("10.1.2.3"), 0, 64), ip("0.0.0.0"));
    }

    #[test]
    fn per_ip_and_total() {
        let l = ConnectionLimits::new(bounds(3, 2, 100));
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
