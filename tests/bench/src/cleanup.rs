//! Removal of everything the benchmark creates, also when it is interrupted.
//!
//! The normal path is the owners' `Drop` (namespace, cgroups, processes,
//! directories). SIGINT, SIGTERM and SIGHUP skip those drops, so every
//! resource is also registered here, and a signal thread removes what is
//! registered before exiting. Removing something twice is harmless.
//! Processes all live in the benchmark's namespace and cgroups; iptables
//! rules and conntrack entries live in the namespace, so they go with it.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
};

use interceptor::testing::tool;

#[derive(Default)]
struct Registry {
    netns: Vec<String>,
    cgroups: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
}

/// Set by the signal thread before it starts removing things.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

static REGISTRY: Mutex<Registry> = Mutex::new(Registry { netns: Vec::new(), cgroups: Vec::new(), dirs: Vec::new() });

fn with<T>(f: impl FnOnce(&mut Registry) -> T) -> T {
    f(&mut REGISTRY.lock().unwrap_or_else(PoisonError::into_inner))
}

pub fn netns(name: &str) {
    with(|r| r.netns.push(name.to_owned()));
}

pub fn cgroup(path: &Path) {
    with(|r| r.cgroups.push(path.to_owned()));
}

pub fn dir(path: &Path) {
    with(|r| r.dirs.push(path.to_owned()));
}

/// Starts the thread that cleans up and exits on SIGINT, SIGTERM or SIGHUP.
pub fn on_signals() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    // Registered here, before anything is created, so no signal is missed.
    let mut streams = runtime.block_on(async {
        anyhow::Ok([signal(SignalKind::interrupt())?, signal(SignalKind::terminate())?, signal(SignalKind::hangup())?])
    })?;
    std::thread::spawn(move || {
        runtime.block_on(async {
            let [int, term, hup] = &mut streams;
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
                _ = hup.recv() => {}
            }
        });
        INTERRUPTED.store(true, Ordering::SeqCst);
        eprintln!("\ninterrupted: removing the benchmark's namespace, cgroups and files");
        remove_all();
        std::process::exit(130);
    });
    Ok(())
}

/// Called when the benchmark returns. After a signal the run usually fails
/// because the cleanup killed its processes; that failure is not the outcome:
/// the signal thread finishes the cleanup and exits with 130, so wait for it.
pub fn unless_interrupted<T>(result: T) -> T {
    if INTERRUPTED.load(Ordering::SeqCst) {
        loop {
            std::thread::park();
        }
    }
    result
}

/// Kills every process in the registered namespaces and cgroups, then
/// deletes them and the registered directories.
fn remove_all() {
    let reg = std::mem::take(&mut *REGISTRY.lock().unwrap_or_else(PoisonError::into_inner));
    let me = std::process::id().to_string();
    for name in &reg.netns {
        for _ in 0..3 {
            let pids = Command::new(tool("ip")).args(["netns", "pids", name]).output();
            let Ok(out) = pids else { break };
            let pids: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .filter(|p| *p != me)
                .map(str::to_owned)
                .collect();
            if pids.is_empty() {
                break;
            }
            let _ = Command::new("kill").arg("-KILL").args(&pids).output();
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
    // Children first: registered parents come before their children.
    for cg in reg.cgroups.iter().rev() {
        kill_cgroup_tree(cg);
    }
    for name in &reg.netns {
        let _ = Command::new(tool("ip")).args(["netns", "del", name]).output();
    }
    for dir in &reg.dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
}

fn kill_cgroup_tree(path: &Path) {
    for _ in 0..20 {
        if !path.exists() {
            return;
        }
        let mut dirs = vec![path.to_owned()];
        let mut i = 0;
        while i < dirs.len() {
            if let Ok(entries) = std::fs::read_dir(&dirs[i]) {
                dirs.extend(entries.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()));
            }
            i += 1;
        }
        for dir in &dirs {
            let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
                if pid as u32 != std::process::id() {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
                }
            }
        }
        for dir in dirs.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
