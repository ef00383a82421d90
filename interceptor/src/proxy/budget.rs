//! The global byte budget for bodies buffered for inspection
//! (`guardrails.max_buffered_total`): every request body and collected
//! response body reserves its bytes here as it grows, and gives them back
//! when it is dropped, on every path (forwarded, blocked, failed, or the
//! client gone mid-body). When the budget cannot give more, the exchange is
//! refused with `503` instead of the process growing until the kernel kills
//! it (which, for the redirect, means failing open for every workload).
//!
//! This module owns the accounting, the automatic size and the refusal's
//! metric and log line; it does not know HTTP beyond that.

use std::{
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use prometheus_client::metrics::{counter::Counter, family::Family};

use crate::metrics::BudgetLabels;

/// The automatic budget is this fraction of the memory limit: a body being
/// inspected costs several times its size while it is parsed (JSON tree,
/// extracted texts, findings), and the rest of the process needs room too.
pub const AUTO_FRACTION: u64 = 8;
/// Smallest automatic budget.
pub const AUTO_FLOOR: u64 = 64 << 20;
/// Largest automatic budget.
pub const AUTO_CAP: u64 = 4 << 30;

/// The budget is used up: the bytes wanted would take it past its size.
#[derive(Debug, thiserror::Error)]
#[error("the inspection buffers are full ({in_use} of {max} bytes in use, {wanted} more wanted)")]
pub struct BudgetExhausted {
    pub max: usize,
    pub in_use: usize,
    pub wanted: usize,
}

/// Which body asked for bytes, for the metric and the log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyKind {
    Request,
    Response,
}

impl BodyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Request => "request",
            Self::Response => "response",
        }
    }
}

/// Bytes buffered for inspection by every connection together.
pub struct BodyBudget {
    max: usize,
    in_use: AtomicUsize,
    refused: Family<BudgetLabels, Counter>,
    /// When the last refusal was logged, and how many went unlogged since.
    warned: Mutex<(Option<Instant>, u64)>,
}

impl std::fmt::Debug for BodyBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodyBudget").field("max", &self.max).field("in_use", &self.in_use()).finish()
    }
}

impl BodyBudget {
    /// A budget of `max` bytes; refusals are counted in `refused`.
    pub fn new(max: usize, refused: Family<BudgetLabels, Counter>) -> Arc<Self> {
        Arc::new(Self { max, in_use: AtomicUsize::new(0), refused, warned: Mutex::new((None, 0)) })
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// Bytes reserved right now.
    pub fn in_use(&self) -> usize {
        self.in_use.load(Ordering::Acquire)
    }

    /// An empty reservation, grown with [`Reservation::grow_to`].
    pub fn reservation(self: &Arc<Self>, kind: BodyKind) -> Reservation {
        Reservation { budget: Arc::clone(self), kind, bytes: 0 }
    }

    fn take(&self, wanted: usize) -> Result<(), BudgetExhausted> {
        self.in_use
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_add(wanted).filter(|&t| t <= self.max))
            .map(drop)
            .map_err(|in_use| BudgetExhausted { max: self.max, in_use, wanted })
    }

    fn give_back(&self, bytes: usize) {
        self.in_use.fetch_sub(bytes, Ordering::AcqRel);
    }

    /// Counts a refusal and logs it, at most once a second (with how many
    /// went unlogged in between), so a flood cannot flood the log. Returns
    /// whether it logged.
    pub fn note_refusal(&self, kind: BodyKind, error: &BudgetExhausted) -> bool {
        self.refused.get_or_create(&BudgetLabels { body: kind.as_str() }).inc();
        let mut warned = self.warned.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if warned.0.is_some_and(|at| now.duration_since(at) < Duration::from_secs(1)) {
            warned.1 += 1;
            return false;
        }
        let suppressed = std::mem::take(&mut warned.1);
        warned.0 = Some(now);
        tracing::warn!(
            event = "inspection_budget_exhausted",
            body = kind.as_str(),
            max_buffered_total = self.max,
            in_use = error.in_use,
            wanted = error.wanted,
            suppressed,
            "exchange refused with 503: the bodies buffered for inspection use the whole budget"
        );
        true
    }
}

/// Bytes of the budget held by one body; given back on drop.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<BodyBudget>,
    kind: BodyKind,
    bytes: usize,
}

impl Reservation {
    /// Grows the reservation to `total` bytes. On failure it keeps what it
    /// had (the caller refuses the exchange, and dropping gives it back).
    pub fn grow_to(&mut self, total: usize) -> Result<(), BudgetExhausted> {
        if let Some(more) = total.checked_sub(self.bytes).filter(|&m| m > 0) {
            self.budget.take(more)?;
            self.bytes = total;
        }
        Ok(())
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn kind(&self) -> BodyKind {
        self.kind
    }

    pub fn budget(&self) -> &BodyBudget {
        &self.budget
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.give_back(self.bytes);
    }
}

/// Where the automatic budget's size comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemorySource {
    /// `memory.max` of this cgroup or an ancestor (the tightest one).
    Cgroup(std::path::PathBuf),
    /// `MemTotal` of /proc/meminfo.
    Physical,
    /// Neither could be read.
    Unknown,
}

/// The automatic budget for a memory limit of `limit` bytes: an
/// [`AUTO_FRACTION`] of it, between [`AUTO_FLOOR`] and [`AUTO_CAP`], and
/// never less than one body of `max_body` (so that one body of the largest
/// inspected size can always be buffered). An unknown limit gets the floor.
pub fn auto_size(limit: Option<u64>, max_body: usize) -> usize {
    let bytes = limit.map_or(AUTO_FLOOR, |l| (l / AUTO_FRACTION).clamp(AUTO_FLOOR, AUTO_CAP));
    usize::try_from(bytes).unwrap_or(usize::MAX).max(max_body)
}

/// The memory this process may use: the tightest `memory.max` from its own
/// cgroup up to the cgroup2 root, else physical memory.
pub fn memory_limit() -> (Option<u64>, MemorySource) {
    let cgroup = crate::cgroup::cgroup2_root().ok().and_then(|root| {
        let own = crate::cgroup::own_cgroup(&root).ok()?;
        cgroup_limit(&root, &own)
    });
    if let Some((limit, dir)) = cgroup {
        return (Some(limit), MemorySource::Cgroup(dir));
    }
    match std::fs::read_to_string("/proc/meminfo").ok().as_deref().and_then(parse_mem_total) {
        Some(total) => (Some(total), MemorySource::Physical),
        None => (None, MemorySource::Unknown),
    }
}

/// The smallest numeric `memory.max` from `own` up to `root` (`max` means
/// no limit at that level), with the directory that sets it.
fn cgroup_limit(root: &Path, own: &Path) -> Option<(u64, std::path::PathBuf)> {
    let mut best: Option<(u64, std::path::PathBuf)> = None;
    for dir in own.ancestors().take_while(|d| d.starts_with(root)) {
        let Ok(text) = std::fs::read_to_string(dir.join("memory.max")) else { continue };
        if let Ok(limit) = text.trim().parse::<u64>()
            && best.as_ref().is_none_or(|(b, _)| limit < *b)
        {
            best = Some((limit, dir.to_path_buf()));
        }
    }
    best
}

/// `MemTotal` (kB) of /proc/meminfo, in bytes.
fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(max: usize) -> Arc<BodyBudget> {
        BodyBudget::new(max, Family::default())
    }

    #[test]
    fn reservations_grow_within_the_budget_and_give_back_on_drop() {
        let b = budget(100);
        let mut a = b.reservation(BodyKind::Request);
        a.grow_to(60).unwrap();
        let mut c = b.reservation(BodyKind::Response);
        let error = c.grow_to(41).unwrap_err();
        assert_eq!((error.in_use, error.wanted), (60, 41));
        c.grow_to(40).unwrap();
        assert_eq!(b.in_use(), 100);
        a.grow_to(10).unwrap();
        assert_eq!(a.bytes(), 60, "a reservation never shrinks while held");
        assert!(a.grow_to(61).is_err());
        assert_eq!(a.bytes(), 60, "a failed growth keeps what was held");
        drop(a);
        assert_eq!(b.in_use(), 40);
        drop(c);
        assert_eq!(b.in_use(), 0);
    }

    #[test]
    fn refusals_are_counted_and_logged_at_most_once_a_second() {
        let b = budget(1);
        let error = BudgetExhausted { max: 1, in_use: 1, wanted: 1 };
        assert!(b.note_refusal(BodyKind::Request, &error));
        for _ in 0..100 {
            assert!(!b.note_refusal(BodyKind::Request, &error));
        }
        assert_eq!(b.warned.lock().unwrap().1, 100);
        assert_eq!(b.refused.get_or_create(&BudgetLabels { body: "request" }).get(), 101);
    }

    #[test]
    fn automatic_size_is_a_fraction_of_the_limit_within_bounds() {
        assert_eq!(auto_size(Some(512 << 20), 16 << 20), 64 << 20, "a 512 MiB pod");
        assert_eq!(auto_size(Some(4 << 30), 16 << 20), 512 << 20);
        assert_eq!(auto_size(Some(64 << 30), 16 << 20), 4 << 30, "capped");
        assert_eq!(auto_size(Some(128 << 20), 16 << 20), 64 << 20, "floor");
        assert_eq!(auto_size(None, 16 << 20), 64 << 20);
        assert_eq!(auto_size(Some(512 << 20), 100 << 20), 100 << 20, "one largest body always fits");
    }

    #[test]
    fn cgroup_limit_is_the_tightest_ancestor() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let own = root.join("kubepods.slice/pod/ctr");
        std::fs::create_dir_all(&own).unwrap();
        assert_eq!(cgroup_limit(root, &own), None);
        std::fs::write(own.join("memory.max"), "max\n").unwrap();
        std::fs::write(root.join("kubepods.slice/pod/memory.max"), "536870912\n").unwrap();
        std::fs::write(root.join("kubepods.slice/memory.max"), "1073741824\n").unwrap();
        assert_eq!(cgroup_limit(root, &own), Some((512 << 20, root.join("kubepods.slice/pod"))));
        assert_eq!(parse_mem_total("MemTotal:       24557800 kB\nMemFree: 1 kB\n"), Some(24557800 * 1024));
    }
}
