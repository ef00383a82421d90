//! Fail-safe redirect for eBPF mode: the programs redirect only while the
//! proxy's heartbeat is fresh, and the maps live pinned in bpffs so that
//! several interceptor processes (an old and a new one during an upgrade)
//! share one redirect.
//!
//! - **Heartbeat.** Every live instance writes `CLOCK_MONOTONIC` (the clock
//!   of `bpf_ktime_get_ns`) into the `HEARTBEAT` map several times per timeout,
//!   from its own OS thread ([`BeatThread`]), not from the async runtime: a
//!   runtime kept busy (large bodies being inspected, a flood of requests)
//!   must not turn the redirect off for every workload. A stopped process
//!   stops that thread too, so `SIGSTOP` still makes the redirect fail.
//!   When it is older than the timeout, the connect programs apply the fail
//!   mode: `open` lets the connection go direct, `closed` refuses it. DNS
//!   always goes direct then, so a dead forwarder cannot break resolution.
//! - **Crash.** Links are process descriptors: when the process dies they go
//!   with it and traffic is direct at once (fail open). In fail-closed mode
//!   the links are also pinned, so the programs outlive the process and
//!   refuse target connections until an instance starts again or
//!   `interceptor cleanup` runs.
//! - **Handover.** Maps are pinned per target cgroup. A second instance
//!   reuses them, registers in `INSTANCES`, attaches its own links and
//!   listens on the same port (`SO_REUSEPORT`); the old one can then stop:
//!   it leaves the shared state alone while another instance is alive, and
//!   removes everything when it is the last.

use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{
        Arc,
        mpsc::{self, RecvTimeoutError},
    },
    thread::JoinHandle,
    time::Duration,
};

use aya::maps::{Array, HashMap, MapData};

use crate::config::FailSafe;

/// Where bpffs is mounted (mounted there by us if it is not).
pub const BPFFS: &str = "/sys/fs/bpf";
/// Our directory in bpffs: one subdirectory per target cgroup.
pub const PIN_ROOT: &str = "/sys/fs/bpf/interceptor";

/// `CLOCK_MONOTONIC` in nanoseconds, the clock `bpf_ktime_get_ns` reads.
pub fn monotonic_ns() -> u64 {
    let ts =
        nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC is always available");
    (ts.tv_sec() as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec() as u64)
}

/// Makes sure bpffs is mounted at [`BPFFS`]. Returns an error describing why
/// pinning is impossible otherwise.
pub fn ensure_bpffs() -> Result<(), String> {
    use nix::sys::statfs::{BPF_FS_MAGIC, statfs};
    let is_bpffs = |p: &str| statfs(p).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC);
    if is_bpffs(BPFFS) {
        return Ok(());
    }
    std::fs::create_dir_all(BPFFS).map_err(|e| format!("cannot create {BPFFS}: {e}"))?;
    nix::mount::mount(Some("bpf"), BPFFS, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
        .map_err(|e| format!("cannot mount bpffs on {BPFFS}: {e}"))?;
    if is_bpffs(BPFFS) { Ok(()) } else { Err(format!("{BPFFS} is not a bpffs after mounting")) }
}

/// The pin directory of the redirect covering `cgroup`: keyed by the
/// cgroup's inode, so independent deployments never share maps.
pub fn pin_dir(cgroup: &Path) -> std::io::Result<PathBuf> {
    let ino = std::fs::metadata(cgroup)?.ino();
    Ok(Path::new(PIN_ROOT).join(format!("cgroup-{ino}")))
}

/// The directory holding one instance's pinned links.
pub fn links_dir(dir: &Path, instance: u64) -> PathBuf {
    dir.join("links").join(format!("{instance:016x}"))
}

/// A new instance id: unique among the processes sharing a pin directory,
/// even across PID namespaces.
pub fn new_instance_id() -> u64 {
    loop {
        let id = rand::random::<u64>();
        if id != 0 {
            return id;
        }
    }
}

/// Removes a pin directory tree: unlinking a pinned link detaches its
/// program once no process holds it; unlinking a map pin frees the map once
/// no program uses it.
pub fn remove_tree(dir: &Path) -> std::io::Result<usize> {
    let mut removed = 0;
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            removed += remove_tree(&entry.path())?;
        } else {
            std::fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    std::fs::remove_dir(dir)?;
    Ok(removed)
}

/// Removes the pin directory of one redirect, then the pin root if no other redirect
/// uses it.
pub fn remove_pins(dir: &Path) -> std::io::Result<usize> {
    let removed = remove_tree(dir)?;
    let _ = std::fs::remove_dir(PIN_ROOT);
    Ok(removed)
}

/// Removes every pinned map and link we ever left (after a fail-closed
/// crash). Used by `interceptor cleanup`.
pub fn cleanup() -> std::io::Result<usize> {
    remove_tree(Path::new(PIN_ROOT))
}

/// The heartbeat maps and this instance's place in them.
pub struct Heartbeat {
    pub id: u64,
    pub fail_safe: FailSafe,
    beat: Array<MapData, u64>,
    instances: HashMap<MapData, u64, u64>,
    /// The last beat this instance wrote.
    last: u64,
}

/// What the heartbeat maps said when this instance joined.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Joined {
    /// Other live instances (a handover in progress).
    pub live: Vec<u64>,
    /// Instances that stopped beating without removing themselves (crashed).
    pub stale: Vec<u64>,
    /// Age of the last heartbeat anyone wrote, if any was ever written.
    pub last_beat_age: Option<Duration>,
}

impl Heartbeat {
    pub fn new(fail_safe: FailSafe, beat: Array<MapData, u64>, instances: HashMap<MapData, u64, u64>) -> Self {
        Self { id: new_instance_id(), fail_safe, beat, instances, last: 0 }
    }

    fn timeout_ns(&self) -> u64 {
        self.fail_safe.timeout.as_nanos() as u64
    }

    /// Looks at who else is registered, forgets crashed instances, and
    /// writes this instance's first beat.
    pub fn join(&mut self) -> Joined {
        let now = monotonic_ns();
        let mut joined = Joined::default();
        let last = self.beat.get(&0, 0).unwrap_or(0);
        if last != 0 {
            joined.last_beat_age = Some(Duration::from_nanos(now.saturating_sub(last)));
        }
        let entries: Vec<(u64, u64)> = self.instances.iter().filter_map(Result::ok).collect();
        for (id, beat) in entries {
            if id == self.id {
                continue;
            }
            if now.saturating_sub(beat) <= self.timeout_ns() {
                joined.live.push(id);
            } else {
                joined.stale.push(id);
                let _ = self.instances.remove(&id);
            }
        }
        self.beat_at(now);
        joined
    }

    /// Writes a beat. Returns how long the redirect had been without one
    /// when that exceeded the timeout (the process was stopped or starved),
    /// so the caller can report that the redirect resumes.
    pub fn beat(&mut self) -> Option<Duration> {
        let now = monotonic_ns();
        let previous = self.beat.get(&0, 0).unwrap_or(0).max(self.last);
        self.beat_at(now);
        let gap = now.saturating_sub(previous);
        (previous != 0 && gap > self.timeout_ns()).then(|| Duration::from_nanos(gap))
    }

    fn beat_at(&mut self, now: u64) {
        self.last = now;
        let _ = self.beat.set(0, now, 0);
        let _ = self.instances.insert(self.id, now, 0);
    }

    /// Forgets instances whose heartbeat is older than the timeout (they
    /// crashed while another instance was running, e.g. during a restart
    /// faster than the timeout) and returns their ids.
    pub fn prune(&mut self) -> Vec<u64> {
        let now = monotonic_ns();
        let stale: Vec<u64> = self
            .instances
            .iter()
            .filter_map(Result::ok)
            .filter(|&(id, beat)| id != self.id && now.saturating_sub(beat) > self.timeout_ns())
            .map(|(id, _)| id)
            .collect();
        for id in &stale {
            let _ = self.instances.remove(id);
        }
        stale
    }

    /// Removes this instance. Returns whether another live instance remains.
    pub fn leave(&mut self) -> bool {
        let _ = self.instances.remove(&self.id);
        let now = monotonic_ns();
        let others: Vec<(u64, u64)> = self.instances.iter().filter_map(Result::ok).collect();
        others.iter().any(|&(id, beat)| id != self.id && now.saturating_sub(beat) <= self.timeout_ns())
    }

    /// Instance ids registered as live right now (this one included).
    pub fn live_ids(&self) -> Vec<u64> {
        let now = monotonic_ns();
        self.instances
            .iter()
            .filter_map(Result::ok)
            .filter(|&(_, beat)| now.saturating_sub(beat) <= self.timeout_ns())
            .map(|(id, _)| id)
            .collect()
    }
}

/// Beats a [`super::Liveness`] every [`super::Liveness::interval`] from a
/// thread of its own, from [`BeatThread::start`] until it is dropped; the
/// drop stops the thread and waits for it.
pub struct BeatThread {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl BeatThread {
    /// Beats once at once, then every interval.
    pub fn start(liveness: Arc<dyn super::Liveness>) -> std::io::Result<Self> {
        let (stop, stopped) = mpsc::channel::<()>();
        let interval = liveness.interval();
        let thread = std::thread::Builder::new().name("heartbeat".into()).spawn(move || {
            loop {
                liveness.beat();
                match stopped.recv_timeout(interval) {
                    Err(RecvTimeoutError::Timeout) => {}
                    Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
                }
            }
        })?;
        Ok(Self { stop: Some(stop), thread: Some(thread) })
    }
}

impl Drop for BeatThread {
    fn drop(&mut self) {
        // Disconnecting wakes the thread at once.
        drop(self.stop.take());
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the heartbeat thread panicked");
        }
    }
}

/// Removes the pinned links of instances that are no longer alive (a
/// fail-closed crash left them). Returns how many directories were removed.
pub fn remove_dead_links(dir: &Path, live: &[u64]) -> usize {
    let Ok(entries) = std::fs::read_dir(dir.join("links")) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let alive = u64::from_str_radix(&name.to_string_lossy(), 16).is_ok_and(|id| live.contains(&id));
        if !alive && remove_tree(&entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_interval_is_a_fraction_of_the_timeout_within_bounds() {
        let f = |ms| FailSafe { closed: false, timeout: Duration::from_millis(ms) };
        assert_eq!(f(2000).interval(), Duration::from_millis(500));
        assert_eq!(f(100).interval(), Duration::from_millis(50));
        assert_eq!(f(60_000).interval(), Duration::from_secs(1));
        assert_eq!(f(2000).timeout_ms(), 2000);
    }

    /// Records when it was beaten.
    struct Recorder {
        interval: Duration,
        beats: std::sync::Mutex<Vec<std::time::Instant>>,
    }

    impl crate::redirect::Liveness for Recorder {
        fn interval(&self) -> Duration {
            self.interval
        }
        fn beat(&self) {
            self.beats.lock().unwrap().push(std::time::Instant::now());
        }
    }

    #[test]
    fn heartbeat_keeps_beating_while_every_runtime_worker_is_blocked() {
        let timeout = Duration::from_millis(400);
        let fail_safe = FailSafe { closed: false, timeout };
        let recorder = Arc::new(Recorder { interval: fail_safe.interval(), beats: Default::default() });
        let workers = 2;
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(workers).enable_all().build().unwrap();
        let stall = timeout * 4;
        let (started, ended) = runtime.block_on(async {
            // Started the way the app starts it, from inside the runtime.
            let beat = BeatThread::start(recorder.clone()).unwrap();
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let barrier = Arc::new(std::sync::Barrier::new(workers));
            // Every worker blocked (the barrier proves both tasks run at
            // once, one per worker) for four heartbeat timeouts.
            let tasks: Vec<_> = (0..workers)
                .map(|_| {
                    let (barrier, ready) = (barrier.clone(), ready_tx.clone());
                    tokio::spawn(async move {
                        barrier.wait();
                        let _ = ready.send(std::time::Instant::now());
                        std::thread::sleep(stall);
                    })
                })
                .collect();
            let started = ready_rx.recv_timeout(Duration::from_secs(10)).unwrap();
            for t in tasks {
                t.await.unwrap();
            }
            let ended = std::time::Instant::now();
            drop(beat);
            (started, ended)
        });
        let beats = recorder.beats.lock().unwrap().clone();
        let during = beats.iter().filter(|b| **b > started && **b < ended).count();
        assert!(during >= 4, "only {during} beats while the runtime was blocked for {stall:?}");
        let longest = beats.windows(2).map(|w| w[1] - w[0]).max().unwrap();
        assert!(longest < timeout, "a gap of {longest:?} between beats: the redirect would have failed open");
        let stopped = beats.len();
        std::thread::sleep(fail_safe.interval() * 3);
        assert_eq!(recorder.beats.lock().unwrap().len(), stopped, "the thread stops on drop");
    }

    #[test]
    fn monotonic_clock_advances() {
        let a = monotonic_ns();
        std::thread::sleep(Duration::from_millis(2));
        assert!(monotonic_ns() > a);
    }

    #[test]
    fn dead_instances_links_are_removed_and_live_ones_kept() {
        let dir = std::env::temp_dir().join(format!("interceptor-links-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for id in [1u64, 2, 3] {
            let d = links_dir(&dir, id);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("intercept_connect4"), b"").unwrap();
        }
        assert_eq!(remove_dead_links(&dir, &[2]), 2);
        assert!(links_dir(&dir, 2).exists());
        assert!(!links_dir(&dir, 1).exists() && !links_dir(&dir, 3).exists());
        assert_eq!(remove_tree(&dir).unwrap(), 1);
        assert!(!dir.exists());
        assert_eq!(remove_tree(&dir).unwrap(), 0, "a missing tree is not an error");
    }
}
