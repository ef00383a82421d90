//! What `/proc` says about one process: its name (the thread-group
//! leader's `comm`, which is what `ps` shows), when it started, its
//! executable and `argv[0]`, and the name of one of its threads.
//!
//! Reads only, and every read tolerates the process being gone (`None`).
//! `stat`, `comm` and `cmdline` are readable by anyone (unless `/proc` is
//! mounted with `hidepid`); `exe` needs ptrace access to the process, which
//! a proxy that dropped its capabilities has only to its own kind. Reading
//! `cmdline` takes the target's memory-map lock: callers on an async
//! runtime do it off the runtime's threads.
//!
//! Names are made printable here ([`clean`]): a process chooses its own
//! name and may put a newline or an escape sequence in it.

use std::{
    io::Read as _,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

/// Bound on the bytes of `cmdline` read for `argv[0]`.
const MAX_ARGV0: usize = 4096;

/// A process as `/proc/<pid>/stat` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stat {
    /// The thread-group leader's `comm` (at most 15 bytes), made printable.
    pub comm: String,
    /// Start time in clock ticks after boot: with the pid, it names one
    /// process (pids are reused, start times of one pid are not).
    pub start: u64,
}

/// A process's names, for a [`crate::workload::Workload`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Names {
    pub comm: String,
    pub exe: Option<String>,
    pub argv0: Option<String>,
}

/// Where `/proc` is (tests point it elsewhere).
#[derive(Clone, Debug)]
pub struct Procfs {
    root: PathBuf,
}

impl Default for Procfs {
    fn default() -> Self {
        Self { root: PathBuf::from("/proc") }
    }
}

impl Procfs {
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    fn dir(&self, pid: u32) -> PathBuf {
        self.root.join(pid.to_string())
    }

    /// Process name and start time, from one read of `/proc/<pid>/stat`.
    pub fn stat(&self, pid: u32) -> Option<Stat> {
        parse_stat(&read_small(&self.dir(pid).join("stat"), 4096)?)
    }

    /// The name of thread `tid` of process `pid` (`/proc/<pid>/task/<tid>/comm`).
    pub fn thread_comm(&self, pid: u32, tid: u32) -> Option<String> {
        let raw = read_small(&self.dir(pid).join("task").join(tid.to_string()).join("comm"), 64)?;
        Some(clean(raw.strip_suffix(b"\n").unwrap_or(&raw)))
    }

    /// The executable (`/proc/<pid>/exe`), without the ` (deleted)` the
    /// kernel appends when the file was replaced since (a package upgrade
    /// under a running agent). An error when it cannot be read, so callers
    /// can tell a permission problem from a process that is gone.
    pub fn exe(&self, pid: u32) -> std::io::Result<String> {
        let target = std::fs::read_link(self.dir(pid).join("exe"))?;
        let bytes = target.as_os_str().as_bytes();
        Ok(clean(bytes.strip_suffix(b" (deleted)").unwrap_or(bytes)))
    }

    /// The command line's first word (`/proc/<pid>/cmdline` up to the first
    /// NUL); `None` for kernel threads and zombies, whose command line is
    /// empty.
    pub fn argv0(&self, pid: u32) -> Option<String> {
        let raw = read_small(&self.dir(pid).join("cmdline"), MAX_ARGV0)?;
        let first = raw.split(|&b| b == 0).next().unwrap_or_default();
        (!first.is_empty()).then(|| clean(first))
    }

    /// The real uid (`/proc/<pid>/status`, `Uid:`), as the kernel records it
    /// at `connect()`.
    pub fn uid(&self, pid: u32) -> Option<u32> {
        let text = std::fs::read_to_string(self.dir(pid).join("status")).ok()?;
        text.lines().find_map(|l| l.strip_prefix("Uid:"))?.split_whitespace().next()?.parse().ok()
    }

    /// The cgroup v2 path (`/proc/<pid>/cgroup`, the `0::` line), relative
    /// to the cgroup2 mount as this process's cgroup namespace sees it.
    pub fn cgroup(&self, pid: u32) -> Option<String> {
        let text = std::fs::read_to_string(self.dir(pid).join("cgroup")).ok()?;
        text.lines().find_map(|l| l.strip_prefix("0::")).map(str::to_owned)
    }

    /// Name, executable and `argv[0]` in one go (the executable only when
    /// readable).
    pub fn names(&self, pid: u32) -> Option<Names> {
        let stat = self.stat(pid)?;
        Some(Names { comm: stat.comm, exe: self.exe(pid).ok(), argv0: self.argv0(pid) })
    }
}

/// Reads at most `limit` bytes of a file.
fn read_small(path: &Path, limit: usize) -> Option<Vec<u8>> {
    let file = std::fs::File::open(path).ok()?;
    let mut buf = Vec::with_capacity(limit.min(1024));
    file.take(limit as u64).read_to_end(&mut buf).ok()?;
    Some(buf)
}

/// `pid (comm) state ppid ... starttime ...`: the name is between the
/// first `(` and the *last* `)` (it may hold either), the start time is
/// the 22nd field.
fn parse_stat(raw: &[u8]) -> Option<Stat> {
    let open = raw.iter().position(|&b| b == b'(')?;
    let close = raw.iter().rposition(|&b| b == b')')?;
    let comm = clean(raw.get(open + 1..close)?);
    let rest = std::str::from_utf8(raw.get(close + 1..)?).ok()?;
    // After the name: field 3 (state) is the first; start time is field 22.
    let start = rest.split_ascii_whitespace().nth(22 - 3)?.parse().ok()?;
    Some(Stat { comm, start })
}

/// Bytes a process chose (a name, a path) as one printable line: invalid
/// UTF-8 replaced, control characters shown as `?`.
pub fn clean(raw: &[u8]) -> String {
    String::from_utf8_lossy(raw).chars().map(|c| if c.is_control() { '?' } else { c }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_give_the_name_and_start_time_whatever_the_name_holds() {
        let line = b"4242 (a) b (c) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 3 0 987654 1000 10 18446744073709551615\n";
        assert_eq!(parse_stat(line), Some(Stat { comm: "a) b (c".into(), start: 987654 }));
        assert_eq!(
            parse_stat(b"1 (x\ny) S 0 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 55 0").map(|s| (s.comm, s.start)),
            Some(("x?y".into(), 55))
        );
        assert_eq!(parse_stat(b"1 (x) S 0 1"), None, "too short");
        assert_eq!(parse_stat(b"garbage"), None);
    }

    #[test]
    fn this_process_reads_as_itself() {
        let proc = Procfs::default();
        let pid = std::process::id();
        let stat = proc.stat(pid).expect("own stat");
        let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
        assert_eq!(stat.comm, comm.trim_end());
        assert_eq!(proc.stat(pid).unwrap().start, stat.start, "stable");
        let exe = std::env::current_exe().unwrap();
        assert_eq!(proc.exe(pid).unwrap(), exe.to_string_lossy());
        let argv0 = std::env::args().next().unwrap();
        assert_eq!(proc.argv0(pid).as_deref(), Some(argv0.as_str()));
        assert_eq!(proc.uid(pid), Some(nix::unistd::getuid().as_raw()));
        assert!(proc.cgroup(pid).is_some_and(|c| c.starts_with('/')));
        // This thread (the test's) is one of ours, under its own name.
        let tid = nix::unistd::gettid().as_raw() as u32;
        let own = std::fs::read_to_string("/proc/thread-self/comm").unwrap();
        assert_eq!(proc.thread_comm(pid, tid).as_deref(), Some(own.trim_end()));
    }

    #[test]
    fn a_process_that_is_gone_has_no_names() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let proc = Procfs::default();
        assert_eq!(proc.stat(pid), None);
        assert_eq!(proc.names(pid), None);
        assert!(proc.exe(pid).is_err());
        assert_eq!(proc.thread_comm(pid, pid), None);
    }

    #[test]
    fn replaced_executables_and_odd_bytes_read_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let pid_dir = dir.path().join("7");
        std::fs::create_dir(&pid_dir).unwrap();
        std::os::unix::fs::symlink("/usr/bin/node (deleted)", pid_dir.join("exe")).unwrap();
        std::fs::write(pid_dir.join("cmdline"), b"/opt/agent\x1b[31m\0--flag\0").unwrap();
        let proc = Procfs::at(dir.path());
        assert_eq!(proc.exe(7).unwrap(), "/usr/bin/node");
        assert_eq!(proc.argv0(7).as_deref(), Some("/opt/agent?[31m"));
        std::fs::write(pid_dir.join("cmdline"), b"").unwrap();
        assert_eq!(proc.argv0(7), None, "a kernel thread has no command line");
    }
}
