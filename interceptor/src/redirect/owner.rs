//! From a socket's inode to the process that holds it, by reading
//! `/proc/<pid>/fd` (a socket descriptor reads as `socket:[<inode>]`).
//!
//! The cost per connection is bounded: processes are tried in the order
//! most likely to hold the socket, and each process scanned on the way has
//! all its socket inodes remembered, so a burst of connections costs one
//! scan:
//! 1. the process an earlier scan saw holding this very inode;
//! 2. the processes that opened the latest attributed connections;
//! 3. the processes of the socket's cgroup (`cgroup.procs`), when the kernel
//!    named it;
//! 4. every process in `/proc`, until the time budget is spent.
//!
//! Reading another user's descriptors needs `CAP_SYS_PTRACE` and
//! `CAP_DAC_READ_SEARCH`, which the proxy drops once it runs; so does
//! reading another process's executable (`/proc/<pid>/exe`). So the lookups
//! run in a small helper process (`interceptor attribution-helper`, started
//! before the drop) that keeps only those two: it reads questions from a
//! pipe (a socket inode and cgroup id in iptables mode, "who holds this
//! socket"; a pid in eBPF mode, "what is this process") and answers with
//! pid, gid, executable, `argv[0]` and process name, and exits when the
//! pipe closes. A compromised data plane can ask it who owns a socket and
//! what a process runs, nothing more.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    io::{BufRead as _, Read as _, Write as _},
    os::{fd::AsFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use crate::process::Procfs;

/// Time one lookup may spend scanning processes.
pub const SCAN_BUDGET: Duration = Duration::from_millis(50);
/// How long the proxy waits for the helper's answer.
const HELPER_TIMEOUT: Duration = Duration::from_millis(250);
/// Unanswered questions in a row after which the helper counts as hung and
/// is stopped (so that questions cannot pile up in its pipe).
const HELPER_MAX_MISSES: u32 = 3;
/// Bound on remembered socket inodes; the map starts over when full.
const MAX_SEEN: usize = 65_536;
/// Processes remembered as recent connection openers.
const MAX_RECENT: usize = 32;
/// Bound on the pids read from one `cgroup.procs`.
const MAX_CGROUP_PROCS: usize = 4096;
/// Bound on descriptors read per process.
const MAX_FDS: usize = 65_536;

#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    #[error("cannot start the attribution helper")]
    Spawn(#[source] std::io::Error),
}

/// The process that holds a socket.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Process {
    /// Thread-group id (what `ps` calls the pid).
    pub pid: u32,
    /// Effective group id (the owner of `/proc/<pid>`).
    pub gid: u32,
    /// `/proc/<pid>/comm`, control characters replaced.
    pub comm: String,
    /// `/proc/<pid>/exe`, when readable.
    pub exe: Option<String>,
    /// The command line's first word.
    pub argv0: Option<String>,
}

/// The scanning index; one lookup at a time (`&mut self`).
pub struct Owners {
    proc: PathBuf,
    cgroup_root: Option<PathBuf>,
    budget: Duration,
    /// Socket inode → pid, as seen by earlier scans.
    seen: HashMap<u32, u32>,
    /// Pids of the latest attributed connections, newest last.
    recent: VecDeque<u32>,
    /// Processes read by the last lookup (for the benchmark and tests).
    pub last_scanned: usize,
}

impl Default for Owners {
    fn default() -> Self {
        Self::new(Path::new("/proc"), crate::cgroup::cgroup2_root().ok(), SCAN_BUDGET)
    }
}

impl Owners {
    pub fn new(proc: &Path, cgroup_root: Option<PathBuf>, budget: Duration) -> Self {
        Self {
            proc: proc.to_path_buf(),
            cgroup_root,
            budget,
            seen: HashMap::new(),
            recent: VecDeque::new(),
            last_scanned: 0,
        }
    }

    /// The process holding socket `inode`, created in cgroup `cgroup_id`
    /// (0: unknown). `None` when no process was found within the budget
    /// (closed meanwhile, another pid namespace, or too many processes).
    pub fn find(&mut self, inode: u32, cgroup_id: u64) -> Option<Process> {
        let deadline = Instant::now() + self.budget;
        let mut visited = HashSet::new();
        self.last_scanned = 0;
        let mut candidates: Vec<u32> = self.seen.get(&inode).copied().into_iter().collect();
        candidates.extend(self.recent.iter().rev());
        if let Some(pid) = self.first_holder(candidates, inode, &mut visited, deadline) {
            return self.found(pid);
        }
        if cgroup_id != 0 {
            let procs = self.cgroup_procs(cgroup_id);
            if let Some(pid) = self.first_holder(procs, inode, &mut visited, deadline) {
                return self.found(pid);
            }
        }
        let all = self.all_pids();
        let pid = self.first_holder(all, inode, &mut visited, deadline)?;
        self.found(pid)
    }

    fn first_holder(
        &mut self,
        pids: impl IntoIterator<Item = u32>,
        inode: u32,
        visited: &mut HashSet<u32>,
        deadline: Instant,
    ) -> Option<u32> {
        for pid in pids {
            if !visited.insert(pid) {
                continue;
            }
            if Instant::now() > deadline {
                return None;
            }
            if self.scan(pid, inode) {
                return Some(pid);
            }
        }
        None
    }

    /// Reads one process's descriptors, remembering every socket; true when
    /// it holds `inode`.
    fn scan(&mut self, pid: u32, inode: u32) -> bool {
        self.last_scanned += 1;
        let Ok(entries) = std::fs::read_dir(self.proc.join(pid.to_string()).join("fd")) else { return false };
        let mut holds = false;
        for entry in entries.flatten().take(MAX_FDS) {
            let Ok(target) = std::fs::read_link(entry.path()) else { continue };
            let Some(found) = socket_inode(target.as_os_str().as_encoded_bytes()) else { continue };
            if self.seen.len() >= MAX_SEEN {
                self.seen.clear();
            }
            self.seen.insert(found, pid);
            holds |= found == inode;
        }
        holds
    }

    fn found(&mut self, pid: u32) -> Option<Process> {
        self.recent.retain(|&p| p != pid);
        if self.recent.len() >= MAX_RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back(pid);
        self.describe(pid)
    }

    /// What process `pid` is: name, group, executable, `argv[0]`.
    pub fn describe(&self, pid: u32) -> Option<Process> {
        let dir = self.proc.join(pid.to_string());
        let comm = std::fs::read(dir.join("comm")).ok()?;
        // `/proc/<pid>` belongs to the process's effective ids: one stat,
        // where `status` (real ids) costs the kernel a page of text.
        let gid = std::fs::metadata(&dir).map(|m| m.gid()).unwrap_or(0);
        let procfs = Procfs::at(&self.proc);
        Some(Process { pid, gid, comm: clean_comm(&comm), exe: procfs.exe(pid).ok(), argv0: procfs.argv0(pid) })
    }

    fn cgroup_procs(&self, cgroup_id: u64) -> Vec<u32> {
        let (Some(root), Some(path)) = (&self.cgroup_root, crate::workload::cgroup_path(cgroup_id)) else {
            return Vec::new();
        };
        let file = root.join(path.trim_start_matches('/')).join("cgroup.procs");
        let Ok(text) = std::fs::read_to_string(file) else { return Vec::new() };
        text.lines().filter_map(|l| l.trim().parse().ok()).take(MAX_CGROUP_PROCS).collect()
    }

    /// Every process, newest first (a connection just opened more likely
    /// comes from a young process than from init).
    fn all_pids(&self) -> Vec<u32> {
        let Ok(entries) = std::fs::read_dir(&self.proc) else { return Vec::new() };
        let mut pids: Vec<u32> = entries.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect();
        pids.sort_unstable_by(|a, b| b.cmp(a));
        pids
    }
}

/// `socket:[12345]` → 12345.
fn socket_inode(link: &[u8]) -> Option<u32> {
    let digits = link.strip_prefix(b"socket:[")?.strip_suffix(b"]")?;
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// A process name as one printable line: it may hold any byte but NUL.
fn clean_comm(raw: &[u8]) -> String {
    crate::process::clean(raw.strip_suffix(b"\n").unwrap_or(raw))
}

/// Where lookups run: the helper process, or this one (tests, benchmarks,
/// or a process that keeps its privileges).
pub enum OwnerSource {
    Helper(Helper),
    Local(Owners),
}

impl OwnerSource {
    pub fn find(&mut self, inode: u32, cgroup_id: u64) -> Option<Process> {
        match self {
            Self::Helper(h) => h.find(inode, cgroup_id),
            Self::Local(o) => o.find(inode, cgroup_id),
        }
    }

    /// What process `pid` is (no search).
    pub fn describe(&mut self, pid: u32) -> Option<Process> {
        match self {
            Self::Helper(h) => h.describe(pid),
            Self::Local(o) => o.describe(pid),
        }
    }
}

/// The proxy's end of the helper: one question at a time.
pub struct Helper {
    child: Child,
    stdin: ChildStdin,
    stdout: ChildStdout,
    pending: Vec<u8>,
    seq: u64,
    misses: u32,
    dead: bool,
}

impl Helper {
    /// Starts `interceptor attribution-helper` (this executable). Call
    /// before privileges are dropped: the helper keeps what it needs.
    pub fn spawn() -> Result<Self, OwnerError> {
        let exe = std::env::current_exe().map_err(OwnerError::Spawn)?;
        let mut command = Command::new(exe);
        command.arg("attribution-helper");
        Self::spawn_command(command)
    }

    fn spawn_command(mut command: Command) -> Result<Self, OwnerError> {
        let mut child = command.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().map_err(OwnerError::Spawn)?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(OwnerError::Spawn(std::io::ErrorKind::BrokenPipe.into()));
        };
        Ok(Self { child, stdin, stdout, pending: Vec::new(), seq: 0, misses: 0, dead: false })
    }

    /// Asks who holds socket `inode`; `None` on no answer in time.
    pub fn find(&mut self, inode: u32, cgroup_id: u64) -> Option<Process> {
        self.ask(Question::Socket { inode, cgroup_id })
    }

    /// Asks what process `pid` is; `None` on no answer in time.
    pub fn describe(&mut self, pid: u32) -> Option<Process> {
        self.ask(Question::Pid(pid))
    }

    fn ask(&mut self, question: Question) -> Option<Process> {
        if self.dead {
            return None;
        }
        self.seq += 1;
        let written = match question {
            Question::Socket { inode, cgroup_id } => writeln!(self.stdin, "{} {inode} {cgroup_id}", self.seq),
            Question::Pid(pid) => writeln!(self.stdin, "{} pid {pid}", self.seq),
        };
        if let Err(error) = written {
            self.died(&error);
            return None;
        }
        let deadline = Instant::now() + HELPER_TIMEOUT;
        loop {
            while let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                // A late answer to an earlier question is dropped.
                if let Some((seq, answer)) = parse_answer(&line)
                    && seq == self.seq
                {
                    self.misses = 0;
                    return answer;
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let timeout = nix::poll::PollTimeout::try_from(left).unwrap_or(nix::poll::PollTimeout::ZERO);
            let mut fds = [nix::poll::PollFd::new(self.stdout.as_fd(), nix::poll::PollFlags::POLLIN)];
            match nix::poll::poll(&mut fds, timeout) {
                Ok(0) => {
                    self.misses += 1;
                    tracing::debug!(?question, misses = self.misses, "attribution helper did not answer in time");
                    if self.misses >= HELPER_MAX_MISSES {
                        let _ = self.child.kill();
                        self.died(&std::io::ErrorKind::TimedOut.into());
                    }
                    return None;
                }
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    self.died(&e.into());
                    return None;
                }
            }
            let mut buf = [0u8; 4096];
            match self.stdout.read(&mut buf) {
                Ok(0) => {
                    self.died(&std::io::ErrorKind::UnexpectedEof.into());
                    return None;
                }
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.died(&e);
                    return None;
                }
            }
        }
    }

    fn died(&mut self, error: &std::io::Error) {
        self.dead = true;
        tracing::warn!(%error, "the attribution helper is gone: connections are no longer attributed to processes");
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        // Its stdin closes with us, and it exits; reap it.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A question to the helper.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Question {
    /// `<seq> <inode> <cgroup id>`: who holds this socket?
    Socket { inode: u32, cgroup_id: u64 },
    /// `<seq> pid <pid>`: what is this process?
    Pid(u32),
}

/// `<seq> <pid> <gid> <exe> <argv0> <comm>` (exe and argv0 [`escape`]d,
/// `-` when unknown; comm last, as it may hold spaces) or `<seq> -`.
fn parse_answer(line: &[u8]) -> Option<(u64, Option<Process>)> {
    let line = std::str::from_utf8(line).ok()?.strip_suffix('\n')?;
    let (seq, rest) = line.split_once(' ')?;
    let seq = seq.parse().ok()?;
    if rest == "-" {
        return Some((seq, None));
    }
    let mut parts = rest.splitn(5, ' ');
    let pid = parts.next()?.parse().ok()?;
    let gid = parts.next()?.parse().ok()?;
    let exe = unescape(parts.next()?)?;
    let argv0 = unescape(parts.next()?)?;
    let comm = parts.next()?.to_string();
    Some((seq, Some(Process { pid, gid, comm, exe, argv0 })))
}

fn parse_question(line: &str) -> Option<(u64, Question)> {
    let mut parts = line.split_whitespace();
    let seq = parts.next()?.parse().ok()?;
    let question = match (parts.next()?, parts.next()?) {
        ("pid", pid) => Question::Pid(pid.parse().ok()?),
        (inode, cgroup_id) => Question::Socket { inode: inode.parse().ok()?, cgroup_id: cgroup_id.parse().ok()? },
    };
    parts.next().is_none().then_some((seq, question))
}

/// A path or argument as one space-free word: `%` and bytes up to space
/// as `%XX`; a lone `-` (unknown) as `%2D`.
fn escape(value: Option<&str>) -> String {
    let Some(value) = value else { return "-".into() };
    if value == "-" {
        return "%2D".into();
    }
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if c == '%' || c <= ' ' || c == '\u{7f}' {
            out.push_str(&format!("%{:02X}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// The inverse of [`escape`]; `None` when malformed.
fn unescape(word: &str) -> Option<Option<String>> {
    if word == "-" {
        return Some(None);
    }
    let mut out = Vec::with_capacity(word.len());
    let mut bytes = word.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hex = [bytes.next()?, bytes.next()?];
            out.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).ok().map(Some)
}

fn answer(out: &mut impl std::io::Write, seq: u64, found: Option<&Process>) -> std::io::Result<()> {
    match found {
        Some(p) => writeln!(
            out,
            "{seq} {} {} {} {} {}",
            p.pid,
            p.gid,
            escape(p.exe.as_deref()),
            escape(p.argv0.as_deref()),
            p.comm
        )?,
        None => writeln!(out, "{seq} -")?,
    }
    out.flush()
}

/// The helper process: keeps only what reading other processes'
/// descriptors needs, answers questions from stdin until it closes. Ignores
/// the terminal's and the service manager's stop signals, like the
/// watchdog: the proxy's pipe says when to go.
pub fn serve_helper() -> std::io::Result<()> {
    use caps::Capability;
    use nix::sys::signal::{SigHandler, Signal, signal};
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: installing SIG_IGN runs no handler code.
        let _ = unsafe { signal(sig, SigHandler::SigIgn) };
    }
    let keep = caps::CapsHashSet::from([Capability::CAP_SYS_PTRACE, Capability::CAP_DAC_READ_SEARCH]);
    if let Err(error) = crate::privileges::drop_privileges(&keep) {
        tracing::warn!(error = %crate::error::chain(&error), "attribution helper cannot drop its other privileges");
    }
    let mut owners = Owners::default();
    let stdin = std::io::stdin().lock();
    let mut stdout = std::io::stdout().lock();
    for line in stdin.lines() {
        let line = line?;
        let Some((seq, question)) = parse_question(&line) else { continue };
        let found = match question {
            Question::Socket { inode, cgroup_id } => owners.find(inode, cgroup_id),
            Question::Pid(pid) => owners.describe(pid),
        };
        answer(&mut stdout, seq, found.as_ref())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::{fd::AsRawFd as _, unix::fs::MetadataExt as _};

    use super::*;

    fn inode_of(fd: &impl std::os::fd::AsRawFd) -> u32 {
        std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap().ino() as u32
    }

    #[test]
    fn finds_this_process_by_the_inode_of_its_own_socket() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let inode = inode_of(&client);
        let mut owners = Owners::new(Path::new("/proc"), None, Duration::from_secs(5));
        let found = owners.find(inode, 0).expect("found");
        assert_eq!(found.pid, std::process::id());
        let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
        assert_eq!(found.comm, comm.trim_end());
        assert_eq!(found.exe.as_deref(), std::env::current_exe().ok().as_deref().and_then(|p| p.to_str()));
        assert_eq!(found.argv0, std::env::args().next());
        assert_eq!(found.gid, nix::unistd::getegid().as_raw());
        // Every socket of a scanned process is remembered, and the process
        // is tried first next time: a second socket costs one scan.
        let other = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        assert!(owners.seen.contains_key(&inode_of(&listener)));
        assert_eq!(owners.find(inode_of(&other), 0).map(|p| p.pid), Some(std::process::id()));
        assert_eq!(owners.last_scanned, 1, "found in the recent process");
        // A socket nobody holds.
        let gone = inode_of(&other);
        drop(other);
        assert_eq!(owners.find(gone, 0), None);
        let _ = client.as_raw_fd();
    }

    #[test]
    fn the_cgroup_is_searched_before_all_processes() {
        let Ok(root) = crate::cgroup::cgroup2_root() else { return };
        let Ok(own) = crate::cgroup::own_cgroup(&root) else { return };
        let id = std::fs::metadata(&own).unwrap().ino();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut owners = Owners::new(Path::new("/proc"), Some(root), Duration::from_secs(5));
        assert_eq!(owners.find(inode_of(&listener), id).map(|p| p.pid), Some(std::process::id()));
        let procs = std::fs::read_to_string(own.join("cgroup.procs")).unwrap().lines().count();
        assert!(owners.last_scanned <= procs, "{} scanned, {procs} in the cgroup", owners.last_scanned);
    }

    #[test]
    fn the_budget_bounds_a_fruitless_search() {
        let mut owners = Owners::new(Path::new("/proc"), None, Duration::ZERO);
        let started = Instant::now();
        assert_eq!(owners.find(u32::MAX, 0), None);
        assert!(owners.last_scanned <= 1);
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    fn fake_helper(script: &str) -> Helper {
        let mut command = Command::new("sh");
        command.args(["-c", script]);
        Helper::spawn_command(command).unwrap()
    }

    #[test]
    fn the_helper_is_asked_in_turn_and_late_answers_are_dropped() {
        // Answers every question, the first one twice (a late duplicate).
        let mut helper = fake_helper(
            r#"first=1; while read seq inode cg; do
                 if [ "$first" = 1 ]; then first=0; echo "$seq -"; fi
                 if [ "$inode" = pid ]; then echo "$seq $cg 7 /usr/bin/x%20y - comm of pid"; continue; fi
                 echo "$seq $inode 7 - - comm of $cg"; done"#,
        );
        assert_eq!(helper.find(11, 5), None, "the first line answers the first question");
        let p = helper.find(12, 6).expect("answered");
        assert_eq!(
            p,
            Process { pid: 12, gid: 7, comm: "comm of 6".into(), ..Default::default() },
            "the stale answer is skipped"
        );
        assert_eq!(helper.find(13, 0).map(|p| p.pid), Some(13));
        let p = helper.describe(99).expect("described");
        assert_eq!(
            (p.pid, p.exe.as_deref(), p.argv0, p.comm.as_str()),
            (99, Some("/usr/bin/x y"), None, "comm of pid")
        );
    }

    #[test]
    fn a_hung_helper_is_given_up_after_a_few_misses() {
        let mut helper = fake_helper("sleep 60");
        for _ in 0..HELPER_MAX_MISSES {
            let started = Instant::now();
            assert_eq!(helper.find(1, 0), None);
            assert!(started.elapsed() < HELPER_TIMEOUT * 4);
        }
        assert!(helper.dead);
        let started = Instant::now();
        assert_eq!(helper.find(1, 0), None);
        assert!(started.elapsed() < HELPER_TIMEOUT, "no more waiting once given up");
    }

    #[test]
    fn links_names_and_answers_are_read_strictly() {
        assert_eq!(socket_inode(b"socket:[12345]"), Some(12345));
        for bad in [&b"pipe:[12345]"[..], b"socket:[]", b"socket:[12a]", b"/dev/null", b"socket:[99999999999]"] {
            assert_eq!(socket_inode(bad), None);
        }
        assert_eq!(clean_comm(b"evil\nname\n"), "evil?name");
        assert_eq!(clean_comm(b"python3\n"), "python3");
        assert_eq!(parse_question("7 123 0"), Some((7, Question::Socket { inode: 123, cgroup_id: 0 })));
        assert_eq!(parse_question("8 pid 4242"), Some((8, Question::Pid(4242))));
        assert_eq!(parse_question("7 123"), None);
        assert_eq!(parse_question("7 123 0 9"), None);
        assert_eq!(parse_question("7 pid x"), None);
        let mut out = Vec::new();
        let p = Process { pid: 42, gid: 7, comm: "my tool".into(), exe: None, argv0: None };
        // Paths and arguments hold any character; `-` alone is a name too.
        let odd = Process {
            pid: 43,
            gid: 0,
            comm: "agent".into(),
            exe: Some("/opt/my agent/100% real\tbin".into()),
            argv0: Some("-".into()),
        };
        answer(&mut out, 3, Some(&p)).unwrap();
        answer(&mut out, 4, None).unwrap();
        answer(&mut out, 5, Some(&odd)).unwrap();
        let mut lines = out.split_inclusive(|&b| b == b'\n');
        assert_eq!(parse_answer(lines.next().unwrap()), Some((3, Some(p))));
        assert_eq!(parse_answer(lines.next().unwrap()), Some((4, None)));
        assert_eq!(parse_answer(lines.next().unwrap()), Some((5, Some(odd))));
        assert_eq!(parse_answer(b"x y\n"), None);
        assert_eq!(parse_answer(b"1 2 3 %zz - c\n"), None, "bad escape");
    }
}
