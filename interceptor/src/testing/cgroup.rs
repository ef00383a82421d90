//! Throwaway cgroup v2 directories. A test's cgroup lives directly under the
//! cgroup2 mount as `interceptor-test-<name>-<unique>`; dropping it kills every
//! process left in its subtree and removes the directories, deepest first.
//!
//! No controllers are enabled in `cgroup.subtree_control`, so the cgroup v2
//! "no internal processes" rule does not apply: a cgroup and its children can
//! all hold processes.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// How long drop waits for killed processes to leave before giving up.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(2);

/// Mount point of the cgroup2 filesystem, from `/proc/self/mounts`
/// (`/sys/fs/cgroup` on most nodes, `/sys/fs/cgroup/unified` on hybrid hosts).
pub fn cgroup2_root() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts").context("read /proc/self/mounts")?;
    mounts
        .lines()
        .find_map(|line| {
            let mut fields = line.split_whitespace();
            let (_source, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_field(target)))
        })
        .context("no cgroup2 filesystem in /proc/self/mounts")
}

/// `/proc/self/mounts` writes space, tab, newline and backslash as `\ooo` octal.
fn unescape_mount_field(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            let s = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(s, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A cgroup v2 directory owned by a test, removed (with its subtree) on drop.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
    root: PathBuf,
}

impl Cgroup {
    /// Creates `<cgroup2 root>/interceptor-test-<name>-<unique>`.
    pub fn new(name: &str) -> Result<Cgroup> {
        let root = cgroup2_root()?;
        let dir = format!("interceptor-test-{}-{}", super::sanitize(name, 40), super::unique_suffix());
        let path = root.join(dir);
        fs::create_dir(&path).with_context(|| format!("create cgroup {}", path.display()))?;
        Ok(Cgroup { path, root })
    }

    /// Creates a sub-cgroup `<self>/<name>`. It is removed when either handle
    /// drops (the parent removes its whole subtree).
    pub fn child(&self, name: &str) -> Result<Cgroup> {
        let path = self.path.join(super::sanitize(name, 40));
        fs::create_dir(&path).with_context(|| format!("create cgroup {}", path.display()))?;
        Ok(Cgroup { path, root: self.root.clone() })
    }

    /// Creates a sub-cgroup with exactly `name` (one path component, e.g. a
    /// kubelet-style `kubepods-besteffort-pod<uid>.slice`).
    pub fn child_named(&self, name: &str) -> Result<Cgroup> {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            bail!("{name:?} is not a single path component");
        }
        let path = self.path.join(name);
        fs::create_dir(&path).with_context(|| format!("create cgroup {}", path.display()))?;
        Ok(Cgroup { path, root: self.root.clone() })
    }

    /// Absolute path of the cgroup directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Path relative to the cgroup2 root, with a leading `/`: the form
    /// `/proc/<pid>/cgroup` shows on its `0::` line.
    pub fn relative_path(&self) -> String {
        let rel = self.path.strip_prefix(&self.root).unwrap_or(&self.path);
        format!("/{}", rel.display())
    }

    /// The cgroup id (what `bpf_get_current_cgroup_id` returns): the inode
    /// number of the cgroup directory.
    pub fn id(&self) -> Result<u64> {
        let meta = fs::metadata(&self.path).with_context(|| format!("stat cgroup {}", self.path.display()))?;
        Ok(meta.ino())
    }

    /// Pids directly in this cgroup (not its children).
    pub fn procs(&self) -> Result<Vec<u32>> {
        read_procs(&self.path).with_context(|| format!("read {}/cgroup.procs", self.path.display()))
    }

    /// Moves a running process (all its threads) into this cgroup.
    pub fn add_pid(&self, pid: u32) -> Result<()> {
        let procs = self.path.join("cgroup.procs");
        fs::write(&procs, pid.to_string()).with_context(|| format!("move pid {pid} into {}", self.path.display()))
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Err(e) = destroy(&self.path) {
            eprintln!("warning: cgroup cleanup: {e:#}");
        }
    }
}

fn read_procs(dir: &Path) -> io::Result<Vec<u32>> {
    let text = fs::read_to_string(dir.join("cgroup.procs"))?;
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// The directory and all cgroups below it, parents before children.
fn subtree(dir: &Path) -> Vec<PathBuf> {
    let mut all = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < all.len() {
        if let Ok(entries) = fs::read_dir(&all[i]) {
            let children = entries.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path());
            all.extend(children.collect::<Vec<_>>());
        }
        i += 1;
    }
    all
}

/// SIGKILLs every process in the subtree (never this process) and removes the
/// directories deepest first, retrying while killed processes are still exiting.
fn destroy(path: &Path) -> Result<()> {
    let me = std::process::id();
    let deadline = Instant::now() + CLEANUP_TIMEOUT;
    loop {
        if !path.exists() {
            return Ok(());
        }
        let dirs = subtree(path);
        for dir in &dirs {
            for pid in read_procs(dir).unwrap_or_default() {
                if pid != me {
                    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                }
            }
        }
        // Breadth-first order lists parents before children: reversed, children go first.
        let mut last_err = None;
        for dir in dirs.iter().rev() {
            // Redirect maps an interceptor killed by the test left pinned for
            // this cgroup (keyed by its inode, which a later cgroup may reuse).
            if let Ok(pins) = crate::redirect::liveness::pin_dir(dir) {
                let _ = crate::redirect::liveness::remove_pins(&pins);
            }
            match fs::remove_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => last_err = Some((dir.clone(), e)),
            }
        }
        let Some((dir, err)) = last_err else {
            return Ok(());
        };
        if Instant::now() >= deadline {
            let left = read_procs(&dir).unwrap_or_default();
            bail!("remove {} after {CLEANUP_TIMEOUT:?}: {err} (pids left: {left:?})", dir.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::super::{require_privileges, spawn_in};
    use super::*;
    use std::process::Command;

    #[test]
    fn unescapes_mount_fields() {
        assert_eq!(unescape_mount_field(r"/sys/fs/cgroup"), "/sys/fs/cgroup");
        assert_eq!(unescape_mount_field(r"/mnt/a\040b\134c"), r"/mnt/a b\c");
        assert_eq!(unescape_mount_field(r"/odd\04"), r"/odd\04");
    }

    #[test]
    fn cgroup_lifecycle_with_processes_in_parent_and_child() {
        if !require_privileges("cgroup_lifecycle_with_processes_in_parent_and_child") {
            return;
        }
        let parent = Cgroup::new("lifecycle").expect("create cgroup");
        let child = parent.child("leaf").expect("create child");
        let grandchild = child.child("deeper").expect("create grandchild");
        assert!(parent.relative_path().starts_with("/interceptor-test-lifecycle-"));
        assert!(grandchild.relative_path().ends_with("/leaf/deeper"));
        assert_ne!(parent.id().expect("id"), child.id().expect("id"));

        let mut in_parent = spawn_in(Command::new("sleep").arg("100"), None, Some(&parent)).expect("spawn in parent");
        // A shell with background children: all of them must go.
        let mut in_child =
            spawn_in(Command::new("sh").args(["-c", "sleep 100 & sleep 100 & wait"]), None, Some(&child))
                .expect("spawn in child");
        let mut in_grandchild =
            spawn_in(Command::new("sleep").arg("100"), None, Some(&grandchild)).expect("spawn in grandchild");
        assert_eq!(parent.procs().expect("procs"), vec![in_parent.id()]);
        let started = Instant::now();
        while child.procs().expect("procs").len() < 3 && started.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let child_procs = child.procs().expect("procs");
        assert!(child_procs.len() == 3 && child_procs.contains(&in_child.id()), "{child_procs:?}");
        assert_eq!(grandchild.procs().expect("procs"), vec![in_grandchild.id()]);

        // Dropping the parent first removes the whole subtree; the child
        // handles then find nothing left to do.
        let paths = [parent.path().to_owned(), child.path().to_owned()];
        drop(parent);
        for path in &paths {
            assert!(!path.exists(), "{} still exists", path.display());
        }
        for process in [&mut in_parent, &mut in_child, &mut in_grandchild] {
            let status = process.wait().expect("wait");
            assert!(!status.success(), "sleep should have been killed: {status}");
        }
        drop(grandchild);
        drop(child);
    }

    #[test]
    fn add_pid_moves_a_running_process() {
        if !require_privileges("add_pid_moves_a_running_process") {
            return;
        }
        let cgroup = Cgroup::new("add_pid").expect("create cgroup");
        let mut sleeper = Command::new("sleep").arg("100").spawn().expect("spawn");
        cgroup.add_pid(sleeper.id()).expect("add pid");
        assert_eq!(cgroup.procs().expect("procs"), vec![sleeper.id()]);
        let path = cgroup.path().to_owned();
        drop(cgroup);
        assert!(!path.exists());
        assert!(!sleeper.wait().expect("wait").success());
    }
}
