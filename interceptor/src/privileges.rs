//! Dropping the privileges the proxy no longer needs once its listeners are
//! bound and its redirect is attached, and `PR_SET_NO_NEW_PRIVS`, so that a
//! compromised data plane holds as little as possible.
//!
//! Capabilities are per thread on Linux: `capset` and `PR_CAPBSET_DROP`
//! change the calling thread only, and the async runtime's threads already
//! exist by then. So the new sets are applied on the calling thread, then on
//! every other thread of the process from a signal handler (the broadcast
//! libpsx and glibc's `setuid` use), until `/proc/self/task` shows every
//! thread with the same sets. Threads created later inherit them.
//!
//! What stays: `CAP_NET_ADMIN` (the `SO_MARK` on upstream sockets, and the
//! iptables rule updates), `CAP_NET_RAW` in iptables mode (the legacy
//! iptables backend's raw socket). eBPF map updates go through map file
//! descriptors opened at install and need no capability since Linux 6.5
//! (`kernel.unprivileged_bpf_disabled` only gates program and map creation);
//! on older kernels `CAP_BPF` and `CAP_SYS_ADMIN` are kept for them.
//! Everything else (`CAP_SYS_ADMIN`, `CAP_BPF`, `CAP_SYS_PTRACE`,
//! `CAP_DAC_OVERRIDE`, `CAP_NET_BIND_SERVICE`, …) is removed from the
//! effective, permitted, inheritable, ambient and bounding sets, so neither
//! this process nor a program it runs can get it back.
//!
//! This module must not be called before every privileged setup step is done.

use std::{
    ffi::c_int,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use caps::{Capability, CapsHashSet};

use crate::config::RedirectMode;

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("cannot install the signal handler that drops capabilities on every thread")]
    Handler(#[source] std::io::Error),
    #[error("cannot list this process's threads")]
    Tasks(#[source] std::io::Error),
    #[error("threads {tids:?} kept their capabilities after {rounds} rounds")]
    Stragglers { tids: Vec<i32>, rounds: u32 },
    #[error("cannot change this thread's capabilities")]
    Apply(#[source] std::io::Error),
}

/// What the process holds after [`drop_privileges`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    /// The capabilities still effective.
    pub kept: Vec<String>,
    /// Whether the bounding set could be reduced (needs `CAP_SETPCAP`).
    pub bounding_reduced: bool,
    /// Threads the sets were applied to.
    pub threads: usize,
}

/// The capabilities the running proxy needs in a redirect mode, on this
/// kernel.
pub fn runtime_capabilities(mode: RedirectMode) -> CapsHashSet {
    let mut keep = CapsHashSet::from([Capability::CAP_NET_ADMIN]);
    match mode {
        RedirectMode::Iptables => {
            keep.insert(Capability::CAP_NET_RAW);
        }
        RedirectMode::Ebpf if !map_updates_are_unprivileged(kernel_release().as_deref()) => {
            keep.extend([Capability::CAP_BPF, Capability::CAP_SYS_ADMIN]);
        }
        RedirectMode::Ebpf | RedirectMode::None => {}
    }
    keep
}

fn kernel_release() -> Option<String> {
    nix::sys::utsname::uname().ok().map(|u| u.release().to_string_lossy().into_owned())
}

/// From Linux 6.5 the `unprivileged_bpf_disabled` check sits in map and
/// program creation only; older kernels checked it at the `bpf()` entry for
/// some commands, so there the capabilities are kept to be safe (the
/// privileged abuse test shows map updates without them on the kernel it
/// runs on).
fn map_updates_are_unprivileged(release: Option<&str>) -> bool {
    let Some(release) = release else { return false };
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    (major, minor) >= (6, 5)
}

/// Mask of the capabilities every thread keeps; read by the signal handler.
static KEEP: AtomicU64 = AtomicU64::new(u64::MAX);
/// One drop at a time (the handler reads `KEEP`).
static BUSY: Mutex<()> = Mutex::new(());

const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The signal the broadcast uses: a real-time signal nothing else here
/// uses, so it is queued per thread and never merged away.
fn broadcast_signal() -> c_int {
    libc::SIGRTMAX() - 2
}

/// Reduces every thread of the process to `keep` (intersected with what it
/// has), clears the ambient set, drops the rest of the bounding set when
/// allowed, and sets `PR_SET_NO_NEW_PRIVS`.
pub fn drop_privileges(keep: &CapsHashSet) -> Result<Dropped, PrivilegeError> {
    let _busy = BUSY.lock().unwrap_or_else(|e| e.into_inner());
    let mask = keep.iter().fold(0u64, |m, c| m | c.bitmask());
    KEEP.store(mask, Ordering::SeqCst);
    install_handler()?;
    let bounding_reduced = apply_to_this_thread().map_err(PrivilegeError::Apply)?;
    let reference = read_sets("self").map_err(PrivilegeError::Tasks)?;
    let pid = std::process::id() as c_int;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut rounds = 0;
    let threads = loop {
        let tasks = list_tasks().map_err(PrivilegeError::Tasks)?;
        let behind: Vec<c_int> = tasks
            .iter()
            .copied()
            // A thread that exited meanwhile has no status left to check.
            .filter(|tid| read_sets(&format!("self/task/{tid}")).is_ok_and(|s| s != reference))
            .collect();
        if behind.is_empty() {
            break tasks.len();
        }
        rounds += 1;
        if Instant::now() > deadline {
            return Err(PrivilegeError::Stragglers { tids: behind, rounds });
        }
        for tid in behind {
            // SAFETY: sends a signal to a thread of this process; the handler
            // is installed above.
            unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, broadcast_signal()) };
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let kept = caps::read(None, caps::CapSet::Effective)
        .map(|set| {
            let mut names: Vec<String> = set.iter().map(|c| c.to_string()).collect();
            names.sort();
            names
        })
        .unwrap_or_default();
    Ok(Dropped { kept, bounding_reduced, threads })
}

/// The capability and no-new-privs lines of `/proc/<which>/status`.
fn read_sets(which: &str) -> std::io::Result<Vec<String>> {
    let status = std::fs::read_to_string(format!("/proc/{which}/status"))?;
    Ok(status.lines().filter(|l| l.starts_with("Cap") || l.starts_with("NoNewPrivs")).map(str::to_owned).collect())
}

fn list_tasks() -> std::io::Result<Vec<c_int>> {
    let mut tids = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task")? {
        if let Some(tid) = entry?.file_name().to_str().and_then(|s| s.parse().ok()) {
            tids.push(tid);
        }
    }
    Ok(tids)
}

fn install_handler() -> Result<(), PrivilegeError> {
    // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value;
    // the handler only makes async-signal-safe system calls.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_signal as extern "C" fn(c_int) as libc::sighandler_t;
        // Restart interrupted system calls where the kernel can.
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(broadcast_signal(), &action, std::ptr::null_mut()) != 0 {
            return Err(PrivilegeError::Handler(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

extern "C" fn on_signal(_: c_int) {
    // SAFETY: errno is thread-local; the interrupted code must find it as
    // it left it.
    let errno = unsafe { *libc::__errno_location() };
    let _ = apply_to_this_thread();
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

/// Applies `KEEP` to the calling thread: bounding set, ambient set,
/// effective/permitted/inheritable, no-new-privs. Only raw system calls:
/// this runs in a signal handler. Returns whether the bounding set was
/// reduced.
fn apply_to_this_thread() -> std::io::Result<bool> {
    let keep = KEEP.load(Ordering::SeqCst);
    let mut bounding_reduced = true;
    // First, while CAP_SETPCAP is still effective.
    for cap in 0..64u64 {
        if keep & (1 << cap) != 0 {
            continue;
        }
        // SAFETY: prctl with integer arguments.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        // EINVAL: a capability this kernel does not have.
        if r != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
            bounding_reduced = false;
        }
    }
    // SAFETY: prctl with integer arguments. Fails only on kernels without
    // ambient capabilities (< 4.3), where there is nothing to clear.
    unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) };
    let mut header = CapHeader { version: CAPABILITY_VERSION_3, pid: 0 };
    let mut data = [CapData::default(); 2];
    // SAFETY: version 3 takes a header and two data structs, as given.
    if unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    for (i, d) in data.iter_mut().enumerate() {
        let m = (keep >> (32 * i)) as u32;
        d.effective &= m;
        d.permitted &= m;
        d.inheritable &= m;
    }
    // SAFETY: as for capget; only ever lowers the sets.
    if unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(bounding_reduced)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_updates_need_no_capability_from_6_5() {
        assert!(map_updates_are_unprivileged(Some("6.18.0-1-amd64")));
        assert!(map_updates_are_unprivileged(Some("6.5.0")));
        assert!(map_updates_are_unprivileged(Some("7.0.1")));
        assert!(!map_updates_are_unprivileged(Some("6.4.16")));
        assert!(!map_updates_are_unprivileged(Some("5.15.0-91-generic")));
        assert!(!map_updates_are_unprivileged(None));
    }

    #[test]
    fn runtime_needs_net_admin_and_nothing_dangerous() {
        for mode in [RedirectMode::Ebpf, RedirectMode::Iptables, RedirectMode::None] {
            let keep = runtime_capabilities(mode);
            assert!(keep.contains(&Capability::CAP_NET_ADMIN), "{mode:?}");
            for gone in [Capability::CAP_SYS_PTRACE, Capability::CAP_DAC_OVERRIDE, Capability::CAP_NET_BIND_SERVICE] {
                assert!(!keep.contains(&gone), "{mode:?} keeps {gone}");
            }
        }
        assert!(runtime_capabilities(RedirectMode::Iptables).contains(&Capability::CAP_NET_RAW));
        assert!(!runtime_capabilities(RedirectMode::Ebpf).contains(&Capability::CAP_NET_RAW));
    }

    #[test]
    fn status_lines_are_the_capability_sets() {
        let sets = read_sets("self").unwrap();
        for name in ["CapInh", "CapPrm", "CapEff", "CapBnd", "NoNewPrivs"] {
            assert!(sets.iter().any(|l| l.starts_with(name)), "{name} missing from {sets:?}");
        }
    }
}
