//! The embedded backend: a map of expiring entries in this process,
//! bounded by entry count, saved to a file on shutdown and loaded on
//! start (so a restart does not greylist everyone again).

use super::{Clock, StoreError};
use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

struct Entry {
    value: String,
    /// Milliseconds since the epoch, by the store's clock.
    expires: u64,
}

pub struct Embedded {
    map: Mutex<HashMap<String, Entry>>,
    max_entries: usize,
    file: Option<PathBuf>,
    clock: Arc<dyn Clock>,
}

/// One saved entry (a line of the state file).
#[derive(serde::Serialize, serde::Deserialize)]
struct Saved {
    k: String,
    v: String,
    /// Expiry, milliseconds since the epoch.
    e: u64,
}

impl Embedded {
    /// A store holding at most `max_entries`; with a file, what it saved
    /// last time (entries not yet expired).
    pub fn open(max_entries: usize, file: Option<PathBuf>, clock: Arc<dyn Clock>) -> Embedded {
        let store = Embedded {
            map: Mutex::new(HashMap::new()),
            max_entries: max_entries.max(1),
            file,
            clock,
        };
        match store.load() {
            Ok(0) => {}
            Ok(n) => tracing::info!(entries = n, "state loaded"),
            Err(e) => tracing::warn!(error = %e, "state file not loaded; starting empty"),
        }
        store
    }

    fn now(&self) -> u64 {
        self.clock.now_ms()
    }

    fn expiry(&self, ttl: Duration) -> u64 {
        self.now().saturating_add(ttl.as_millis() as u64)
    }

    pub fn get(&self, key: &str) -> Option<String> {
        let now = self.now();
        let map = self.map.lock().ok()?;
        map.get(key)
            .filter(|e| e.expires > now)
            .map(|e| e.value.clone())
    }

    pub fn get_or_set(&self, key: &str, value: &str, ttl: Duration) -> Option<String> {
        let (now, expires) = (self.now(), self.expiry(ttl));
        let mut map = self.map.lock().ok()?;
        if let Some(e) = map.get(key).filter(|e| e.expires > now) {
            return Some(e.value.clone());
        }
        self.insert(&mut map, key, value.to_string(), expires);
        None
    }

    pub fn set(&self, key: &str, value: &str, ttl: Duration) {
        let expires = self.expiry(ttl);
        if let Ok(mut map) = self.map.lock() {
            self.insert(&mut map, key, value.to_string(), expires);
        }
    }

    pub fn incr(&self, key: &str, ttl: Duration) -> i64 {
        let (now, expires) = (self.now(), self.expiry(ttl));
        let Ok(mut map) = self.map.lock() else {
            return 0;
        };
        let n = match map.get_mut(key).filter(|e| e.expires > now) {
            Some(e) => {
                let n = e.value.parse::<i64>().unwrap_or(0).saturating_add(1);
                e.value = n.to_string();
                return n;
            }
            None => 1,
        };
        self.insert(&mut map, key, n.to_string(), expires);
        n
    }

    /// See `Store::gcra`. The value is the theoretical arrival time, and
    /// every figure is in microseconds; returns how far over (0: taken).
    pub fn gcra(&self, key: &str, now: u64, interval: u64, burst: u64, cost: u64) -> u64 {
        let Ok(mut map) = self.map.lock() else {
            return 0;
        };
        let now_ms = now / 1000;
        let tat = map
            .get(key)
            .filter(|e| e.expires > now_ms)
            .and_then(|e| e.value.parse::<u64>().ok())
            .unwrap_or(now)
            .max(now);
        let new = tat.saturating_add(cost.saturating_mul(interval));
        if new - now > burst {
            return new - now - burst;
        }
        self.insert(&mut map, key, new.to_string(), new / 1000 + 1);
        0
    }

    pub fn len(&self) -> usize {
        self.map.lock().map_or(0, |m| m.len())
    }

    /// Inserts, first making room: expired entries go, then (if still
    /// full) the tenth of the entries closest to expiry.
    fn insert(&self, map: &mut HashMap<String, Entry>, key: &str, value: String, expires: u64) {
        if map.len() >= self.max_entries && !map.contains_key(key) {
            let now = self.now();
            map.retain(|_, e| e.expires > now);
            if map.len() >= self.max_entries {
                let mut by_expiry: Vec<(u64, String)> =
                    map.iter().map(|(k, e)| (e.expires, k.clone())).collect();
                by_expiry.sort_unstable();
                let drop = (self.max_entries / 10).max(1);
                for (_, k) in by_expiry.into_iter().take(drop) {
                    map.remove(&k);
                }
            }
        }
        map.insert(key.to_string(), Entry { value, expires });
    }

    /// Writes the live entries to the file (atomically: a temporary file
    /// renamed over it). Returns how many.
    pub fn save(&self) -> Result<usize, StoreError> {
        let Some(file) = &self.file else {
            return Ok(0);
        };
        let now = self.now();
        let lines: Vec<String> = {
            let map = self
                .map
                .lock()
                .map_err(|_| StoreError::Backend("state map poisoned".into()))?;
            map.iter()
                .filter(|(_, e)| e.expires > now)
                .filter_map(|(k, e)| {
                    serde_json::to_string(&Saved {
                        k: k.clone(),
                        v: e.value.clone(),
                        e: e.expires,
                    })
                    .ok()
                })
                .collect()
        };
        let tmp = file.with_extension("tmp");
        let write = || -> std::io::Result<()> {
            let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
            for l in &lines {
                out.write_all(l.as_bytes())?;
                out.write_all(b"\n")?;
            }
            out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            std::fs::rename(&tmp, file)
        };
        write().map_err(|e| StoreError::Backend(format!("saving {}: {e}", file.display())))?;
        Ok(lines.len())
    }

    fn load(&self) -> Result<usize, StoreError> {
        let Some(file) = &self.file else {
            return Ok(0);
        };
        let f = match std::fs::File::open(file) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(StoreError::Backend(format!("{}: {e}", file.display()))),
        };
        let now = self.now();
        let mut map = self
            .map
            .lock()
            .map_err(|_| StoreError::Backend("state map poisoned".into()))?;
        for line in std::io::BufReader::new(f).lines().map_while(Result::ok) {
            // A damaged line is skipped: the state is a cache, not a record.
            if let Ok(s) = serde_json::from_str::<Saved>(&line)
                && s.e > now
            {
                self.insert(&mut map, &s.k, s.v, s.e);
            }
        }
        Ok(map.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::TestClock;

    fn store(max: usize, file: Option<PathBuf>, clock: &Arc<TestClock>) -> Embedded {
        Embedded::open(max, file, Arc::clone(clock) as Arc<dyn Clock>)
    }

    #[test]
    fn entries_expire_by_the_clock() {
        let clock = Arc::new(TestClock::new());
        let s = store(10, None, &clock);
        assert_eq!(s.get_or_set("k", "1", Duration::from_secs(60)), None);
        assert_eq!(
            s.get_or_set("k", "2", Duration::from_secs(60)),
            Some("1".into())
        );
        assert_eq!(s.incr("n", Duration::from_secs(60)), 1);
        assert_eq!(s.incr("n", Duration::from_secs(60)), 2);
        clock.advance(Duration::from_secs(61));
        assert_eq!(s.get("k"), None);
        assert_eq!(s.incr("n", Duration::from_secs(60)), 1);
    }

    #[test]
    fn the_entry_bound_holds() {
        let clock = Arc::new(TestClock::new());
        let s = store(100, None, &clock);
        for i in 0..10_000 {
            s.set(&format!("k{i}"), "v", Duration::from_secs(60 + i));
            assert!(s.len() <= 100, "{} entries", s.len());
        }
        // The newest (furthest from expiry) are kept.
        assert_eq!(s.get("k9999"), Some("v".into()));
    }

    #[test]
    fn saved_entries_come_back_and_expired_ones_do_not() {
        let clock = Arc::new(TestClock::new());
        let file =
            std::env::temp_dir().join(format!("portcullis-state-{}.jsonl", std::process::id()));
        let s = store(10, Some(file.clone()), &clock);
        s.set("long", "a", Duration::from_secs(3600));
        s.set("short", "b", Duration::from_secs(10));
        assert_eq!(s.save().unwrap(), 2);
        clock.advance(Duration::from_secs(20));
        let again = store(10, Some(file.clone()), &clock);
        assert_eq!(again.get("long"), Some("a".into()));
        assert_eq!(again.get("short"), None);
        assert_eq!(again.len(), 1);
        let _ = std::fs::remove_file(&file);
    }
}
