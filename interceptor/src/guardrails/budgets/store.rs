//! The per-node counters: tokens and requests per budget and window, the
//! requests in flight per budget, and their file in the state directory.
//!
//! The file is JSON, written whole to a temporary file beside it and renamed
//! over it (so a crash leaves the old file or the new one, never half of
//! one), by the saver task and at shutdown, never on a request. A file that
//! cannot be read or parsed is reported once and the counters start from
//! zero: a lost budget window is better than a node that does not start.

use std::{
    collections::HashMap,
    io::Write as _,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
};

use serde::{Deserialize, Serialize};

use crate::config::budgets::{LimitKind, Period};

/// The file's format version.
const VERSION: u32 = 1;

/// One counter: a budget's tokens or requests in one window (fixed windows
/// aligned on the Unix epoch: `window` is the Unix time divided by the
/// period's seconds).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CounterKey {
    pub budget: String,
    pub kind: LimitKind,
    pub period: Period,
    pub window: u64,
}

impl CounterKey {
    pub fn new(budget: &str, kind: LimitKind, period: Period, now: u64) -> Self {
        Self { budget: budget.to_owned(), kind, period, window: now / period.seconds() }
    }

    /// The Unix time the window ends.
    pub fn ends(&self) -> u64 {
        self.window.saturating_add(1).saturating_mul(self.period.seconds())
    }

    /// The key of the same counter in Redis.
    pub fn redis_key(&self) -> String {
        format!("interceptor:budget:{}:{}:{}:{}", self.budget, self.kind.as_str(), self.period.as_str(), self.window)
    }
}

#[derive(Serialize, Deserialize)]
struct File {
    version: u32,
    counters: Vec<Entry>,
}

#[derive(Serialize, Deserialize)]
struct Entry {
    #[serde(flatten)]
    key: CounterKey,
    used: u64,
}

/// Why the counters' file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot read the budget counters file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the budget counters file {path} is not valid")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot write the budget counters file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Default)]
pub struct LocalCounters {
    counts: Mutex<HashMap<CounterKey, u64>>,
    inflight: Mutex<HashMap<String, u64>>,
    /// Changed since the last save.
    dirty: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl LocalCounters {
    /// The counters saved in `path` whose windows have not ended; none when
    /// there is no file. A file that cannot be read is an error (the caller
    /// warns and starts from zero).
    pub fn load(path: &Path, now: u64) -> Result<Self, StoreError> {
        let text = match std::fs::read(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => return Err(StoreError::Read { path: path.to_owned(), source }),
        };
        let file: File =
            serde_json::from_slice(&text).map_err(|source| StoreError::Parse { path: path.to_owned(), source })?;
        if file.version != VERSION {
            let source = serde::de::Error::custom(format!("unknown version {}", file.version));
            return Err(StoreError::Parse { path: path.to_owned(), source });
        }
        let counts = file.counters.into_iter().filter(|e| e.key.ends() > now).map(|e| (e.key, e.used)).collect();
        Ok(Self { counts: Mutex::new(counts), ..Self::default() })
    }

    pub fn get(&self, key: &CounterKey) -> u64 {
        lock(&self.counts).get(key).copied().unwrap_or(0)
    }

    /// Adds `n` to a counter; returns its new value.
    pub fn add(&self, key: &CounterKey, n: u64) -> u64 {
        self.dirty.store(true, Ordering::Relaxed);
        let mut counts = lock(&self.counts);
        let used = counts.entry(key.clone()).or_insert(0);
        *used = used.saturating_add(n);
        *used
    }

    /// A slot of a `concurrent` budget, if fewer than `limit` are taken.
    pub fn acquire(self: &Arc<Self>, budget: &str, limit: u64) -> Option<Slot> {
        let mut inflight = lock(&self.inflight);
        let n = inflight.entry(budget.to_owned()).or_insert(0);
        if *n >= limit {
            return None;
        }
        *n += 1;
        Some(Slot { counters: Arc::clone(self), budget: budget.to_owned() })
    }

    /// Writes the counters whose windows have not ended to `path`, if they
    /// changed since the last save (temporary file and rename).
    pub fn save(&self, path: &Path, now: u64) -> Result<(), StoreError> {
        if !self.dirty.swap(false, Ordering::Relaxed) {
            return Ok(());
        }
        let counters: Vec<Entry> = {
            let mut counts = lock(&self.counts);
            counts.retain(|key, _| key.ends() > now);
            counts.iter().map(|(key, used)| Entry { key: key.clone(), used: *used }).collect()
        };
        let text = serde_json::to_vec(&File { version: VERSION, counters }).unwrap_or_default();
        let write = |path: &Path| -> std::io::Result<()> {
            let mut tmp = path.as_os_str().to_owned();
            tmp.push(format!(".tmp.{}", std::process::id()));
            let tmp = PathBuf::from(tmp);
            let written = std::fs::File::create(&tmp).and_then(|mut f| {
                f.write_all(&text)?;
                f.sync_all()
            });
            match written.and_then(|()| std::fs::rename(&tmp, path)) {
                Ok(()) => Ok(()),
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    Err(e)
                }
            }
        };
        write(path).map_err(|source| {
            // Try again at the next save.
            self.dirty.store(true, Ordering::Relaxed);
            StoreError::Write { path: path.to_owned(), source }
        })
    }
}

/// A request in flight under a `concurrent` budget; given back on drop.
#[derive(Debug)]
pub struct Slot {
    counters: Arc<LocalCounters>,
    budget: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(n) = lock(&self.counters.inflight).get_mut(&self.budget) {
            *n = n.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_survive_a_save_and_a_load_within_their_window() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("budgets.json");
        let now = 1_000_000;
        let counters = LocalCounters::default();
        let day = CounterKey::new("team", LimitKind::Tokens, Period::Day, now);
        let minute = CounterKey::new("team", LimitKind::Requests, Period::Minute, now);
        counters.add(&day, 70);
        assert_eq!(counters.add(&day, 30), 100);
        counters.add(&minute, 3);
        counters.save(&path, now).unwrap();
        // A minute later the minute's window is over; the day's is not.
        let loaded = LocalCounters::load(&path, now + 60).unwrap();
        assert_eq!(loaded.get(&day), 100);
        assert_eq!(loaded.get(&minute), 0);
        assert!(LocalCounters::load(&dir.path().join("none.json"), now).unwrap().get(&day) == 0);
    }

    #[test]
    fn a_corrupt_file_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("budgets.json");
        for bad in [&b"{not json"[..], b"{\"version\": 9, \"counters\": []}", b"\xff\xfe"] {
            std::fs::write(&path, bad).unwrap();
            let error = LocalCounters::load(&path, 0).unwrap_err();
            assert!(matches!(error, StoreError::Parse { .. }), "{error:?}");
        }
    }

    #[test]
    fn slots_are_given_back_on_drop() {
        let counters = Arc::new(LocalCounters::default());
        let a = counters.acquire("s", 2).unwrap();
        let _b = counters.acquire("s", 2).unwrap();
        assert!(counters.acquire("s", 2).is_none());
        drop(a);
        assert!(counters.acquire("s", 2).is_some());
    }
}
