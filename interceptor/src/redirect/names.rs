//! The process behind an eBPF record. At `connect()` the kernel records the
//! task: pid, tid, uid, cgroup, and the name of the *thread* that
//! connected, which for agents is a runtime's worker (`tokio-rt-worker`,
//! `HTTP Client`), not the program. This names the process from `/proc`:
//! the thread-group leader's `comm`, the executable and `argv[0]`, with the
//! thread's name kept apart when it differs.
//!
//! Per connection: one read of `/proc/<pid>/stat` (name and start time)
//! and, when another thread than the main one connected, one of that
//! thread's `comm`; the record must agree with them (the main thread's name,
//! or the thread's), so that a pid reused since, or a `/proc` of another
//! pid namespace (a proxy in a container without the host's pids), never
//! lends a stranger's names. Executable and `argv[0]` are cached per
//! process (pid and start time) in a bounded cache. On a miss they are read
//! on the blocking pool (reading `cmdline` takes the target's memory-map
//! lock), the executable through the attribution helper, since the proxy
//! may no longer read other processes' `exe`; a connection waits
//! [`NAMING_DEADLINE`] at most. A process that is gone, or a `/proc` that
//! disagrees, leaves the record as the kernel made it: `comm` is then the
//! connecting thread's name.
//!
//! The eBPF programs do not read the leader's name themselves: that means
//! following `task->group_leader`, whose offsets only CO-RE relocations
//! (which aya's Rust programs cannot emit) keep right across kernels.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use super::owner::OwnerSource;
use crate::{net::WorkloadLookup, process::Procfs, workload::Workload};

/// Processes whose executable and `argv[0]` are remembered; the cache
/// starts over when full.
const CACHE: usize = 4096;
/// The longest a connection waits for its process's executable and
/// `argv[0]`; it goes on with the names read so far after that.
pub const NAMING_DEADLINE: Duration = Duration::from_millis(500);

/// Names processes of kernel records, with its cache.
pub struct ProcessNamer {
    procfs: Procfs,
    /// (pid, start time) → names.
    cache: Mutex<HashMap<(u32, u64), Cached>>,
    /// Reads executables the proxy may not (the attribution helper);
    /// `None`: read them here.
    reader: Option<Mutex<OwnerSource>>,
}

#[derive(Clone, Debug)]
struct Cached {
    /// The process name when cached: a process that `exec`s keeps its pid
    /// and start time, but changes its name.
    comm: String,
    exe: Option<Arc<str>>,
    argv0: Option<Arc<str>>,
}

impl ProcessNamer {
    pub fn new(procfs: Procfs, reader: Option<OwnerSource>) -> Self {
        Self { procfs, cache: Mutex::new(HashMap::new()), reader: reader.map(Mutex::new) }
    }

    /// The process of a kernel record, named: at once from the cache, or
    /// after reading `/proc` on the blocking pool.
    pub fn name(self: &Arc<Self>, mut workload: Workload) -> WorkloadLookup {
        let Some(start) = self.quick(&mut workload) else {
            return Box::pin(std::future::ready(Some(workload)));
        };
        let this = Arc::clone(self);
        Box::pin(async move {
            let so_far = workload.clone();
            let slow = tokio::task::spawn_blocking(move || {
                this.complete(&mut workload, start);
                workload
            });
            match tokio::time::timeout(NAMING_DEADLINE, slow).await {
                Ok(Ok(named)) => Some(named),
                Ok(Err(_)) | Err(_) => Some(so_far),
            }
        })
    }

    /// Names the process and thread from `stat`, and the executable and
    /// `argv[0]` from the cache. Returns the process's start time when
    /// those must still be read.
    fn quick(&self, w: &mut Workload) -> Option<u64> {
        if w.pid == 0 {
            return None;
        }
        let stat = self.procfs.stat(w.pid)?;
        let main_thread = w.tid == w.pid || w.tid == 0;
        let agrees = if main_thread {
            stat.comm == w.comm
        } else {
            self.procfs.thread_comm(w.pid, w.tid).is_some_and(|name| name == w.comm)
        };
        if !agrees {
            tracing::debug!(
                pid = w.pid,
                tid = w.tid,
                recorded = w.comm.as_str(),
                "/proc does not show the recorded task (gone, renamed, or another pid namespace); keeping the record"
            );
            return None;
        }
        if stat.comm != w.comm {
            w.thread = std::mem::replace(&mut w.comm, stat.comm);
        }
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        match cache.get(&(w.pid, stat.start)).filter(|c| c.comm == w.comm) {
            Some(c) => {
                w.exe = c.exe.clone();
                w.argv0 = c.argv0.clone();
                None
            }
            None => Some(stat.start),
        }
    }

    /// Reads the executable and `argv[0]` (blocking), and remembers them
    /// while the process is still the one started at `start`.
    fn complete(&self, w: &mut Workload, start: u64) {
        let (exe, argv0) = match &self.reader {
            Some(reader) => match reader.lock().unwrap_or_else(|e| e.into_inner()).describe(w.pid) {
                Some(p) if p.comm == w.comm => (p.exe, p.argv0),
                _ => return,
            },
            None => (self.procfs.exe(w.pid).ok(), self.procfs.argv0(w.pid)),
        };
        // It may have exited, and its pid been taken, meanwhile.
        if self.procfs.stat(w.pid).map(|s| s.start) != Some(start) {
            return;
        }
        let cached = Cached { comm: w.comm.clone(), exe: exe.map(Arc::from), argv0: argv0.map(Arc::from) };
        w.exe = cached.exe.clone();
        w.argv0 = cached.argv0.clone();
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHE {
            cache.clear();
        }
        cache.insert((w.pid, start), cached);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redirect::owner::Owners;

    /// A record as connect4 makes it, for this process and the calling
    /// thread.
    fn record_of_this_thread() -> Workload {
        let own = std::fs::read("/proc/thread-self/comm").unwrap();
        Workload {
            pid: std::process::id(),
            tid: nix::unistd::gettid().as_raw() as u32,
            comm: crate::process::clean(own.strip_suffix(b"\n").unwrap_or(&own)),
            cgroup_id: 9,
            ..Default::default()
        }
    }

    fn main_name() -> String {
        std::fs::read_to_string("/proc/self/comm").unwrap().trim_end().to_owned()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_worker_thread_record_names_the_process_and_keeps_the_thread() {
        let namer = Arc::new(ProcessNamer::new(Procfs::default(), None));
        // A thread of ours under a name of its own, as runtimes name theirs.
        let record = std::thread::Builder::new()
            .name("HTTP Client".into())
            .spawn(record_of_this_thread)
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(record.comm, "HTTP Client");
        // The thread is gone by now: a record /proc can no longer confirm
        // is kept as the kernel made it.
        let kept = namer.name(record.clone()).await.unwrap();
        assert_eq!(kept, record);

        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let worker = std::thread::Builder::new()
            .name("tokio-rt-worker".into())
            .spawn(move || {
                tx.send(record_of_this_thread()).unwrap();
                // Alive while it is looked up.
                let _ = done_rx.recv();
            })
            .unwrap();
        let record = rx.recv().unwrap();
        let named = namer.name(record.clone()).await.unwrap();
        assert_eq!(named.comm, main_name(), "the process, not the thread");
        assert_eq!(named.thread, "tokio-rt-worker");
        let exe = std::env::current_exe().unwrap();
        assert_eq!(named.exe.as_deref(), exe.to_str());
        assert_eq!(named.argv0.as_deref(), std::env::args().next().as_deref());
        assert_eq!((named.pid, named.tid, named.cgroup_id), (record.pid, record.tid, 9), "the kernel's facts stay");
        // The second connection of the process is named from the cache.
        let start = namer.procfs.stat(record.pid).unwrap().start;
        assert!(namer.cache.lock().unwrap().contains_key(&(record.pid, start)));
        let mut again = record.clone();
        assert_eq!(namer.quick(&mut again), None, "cached: nothing left to read");
        assert_eq!(again, named);
        done_tx.send(()).unwrap();
        worker.join().unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_main_thread_has_no_separate_thread_name() {
        let namer = Arc::new(ProcessNamer::new(Procfs::default(), Some(OwnerSource::Local(Owners::default()))));
        let pid = std::process::id();
        let record = Workload { pid, tid: pid, comm: main_name(), ..Default::default() };
        let named = namer.name(record).await.unwrap();
        assert_eq!((named.comm, named.thread.as_str()), (main_name(), ""));
        assert!(named.exe.is_some(), "read through the reader");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn records_proc_disagrees_with_are_kept_as_recorded() {
        let namer = Arc::new(ProcessNamer::new(Procfs::default(), None));
        let pid = std::process::id();
        // Another name than /proc shows for the main thread: a pid reused,
        // or another pid namespace's process under this number.
        let stranger = Workload { pid, tid: pid, comm: "not-us".into(), uid: 1000, ..Default::default() };
        assert_eq!(namer.name(stranger.clone()).await.unwrap(), stranger);
        // A process that exited.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let gone = Workload { pid: child.id(), tid: child.id(), comm: "true".into(), ..Default::default() };
        child.wait().unwrap();
        assert_eq!(namer.name(gone.clone()).await.unwrap(), gone);
        // A socket without a process (pid 0).
        let socket_only = Workload { uid: 1000, cgroup_id: 5, ..Default::default() };
        assert_eq!(namer.name(socket_only.clone()).await.unwrap(), socket_only);
    }

    #[test]
    fn the_cache_is_bounded_and_follows_exec() {
        let namer = ProcessNamer::new(Procfs::default(), None);
        let pid = std::process::id();
        let mut w = Workload { pid, tid: pid, comm: main_name(), ..Default::default() };
        let start = namer.quick(&mut w).expect("not cached yet");
        namer.complete(&mut w, start);
        assert_eq!(namer.cache.lock().unwrap().len(), 1);
        // Same pid and start time, another name: it exec'd another program.
        namer.cache.lock().unwrap().get_mut(&(pid, start)).unwrap().comm = "before-exec".into();
        let mut again = Workload { pid, tid: pid, comm: main_name(), ..Default::default() };
        assert_eq!(namer.quick(&mut again), Some(start), "a stale entry is not used");
        {
            let mut cache = namer.cache.lock().unwrap();
            cache.clear();
            for i in 0..CACHE as u32 {
                cache.insert((i + 1_000_000, 0), Cached { comm: String::new(), exe: None, argv0: None });
            }
        }
        namer.complete(&mut again, start);
        assert_eq!(namer.cache.lock().unwrap().len(), 1, "started over when full");
    }
}
