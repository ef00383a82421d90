//! Spawning processes inside a test cgroup and network namespace.
//!
//! The child joins the cgroup and then the namespace between fork and exec,
//! through descriptors opened before the fork. Unlike `ip netns exec`, this
//! leaves the mount namespace alone, so the child still sees the cgroup2 and
//! bpf filesystems.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::{Cgroup, Netns};

/// How long to wait for the output pipes to close once the child has exited
/// (longer only if a background process inherited them).
const PIPE_GRACE: Duration = Duration::from_secs(1);

/// Spawns `cmd` with the child moved into `cgroup` and then into `netns`
/// before it execs. Each call adds a pre-exec hook to `cmd`: use a fresh
/// `Command` per spawn.
pub fn spawn_in(cmd: &mut Command, netns: Option<&Netns>, cgroup: Option<&Cgroup>) -> io::Result<Child> {
    let placement = Placement::open(netns, cgroup)?;
    // SAFETY: the hook runs between fork and exec; it only makes the
    // async-signal-safe write(2) and setns(2) calls on descriptors opened
    // before the fork, and allocates nothing.
    unsafe { cmd.pre_exec(move || placement.enter()) };
    cmd.spawn()
}

/// [`spawn_in`] for `tokio::process::Command`. Same caveat: one spawn per command.
pub fn spawn_in_tokio(
    cmd: &mut tokio::process::Command,
    netns: Option<&Netns>,
    cgroup: Option<&Cgroup>,
) -> io::Result<tokio::process::Child> {
    let placement = Placement::open(netns, cgroup)?;
    // SAFETY: as in `spawn_in`.
    unsafe { cmd.pre_exec(move || placement.enter()) };
    cmd.spawn()
}

/// Runs `cmd` like [`spawn_in`] with stdin closed and collects its output.
/// A child still running after `timeout` is killed and reported as an error
/// that carries whatever it wrote so far.
pub fn output_in(
    cmd: &mut Command,
    netns: Option<&Netns>,
    cgroup: Option<&Cgroup>,
    timeout: Duration,
) -> Result<Output> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = spawn_in(cmd, netns, cgroup).with_context(|| format!("spawn {cmd:?}"))?;
    let stdout = Drain::start(child.stdout.take());
    let stderr = Drain::start(child.stderr.take());

    let status = wait_bounded(&mut child, timeout)?;
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        let (out, err) = (stdout.finish(PIPE_GRACE).0, stderr.finish(PIPE_GRACE).0);
        bail!(
            "{cmd:?} timed out after {timeout:?}; stdout so far: {:?}; stderr so far: {:?}",
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(&err)
        );
    };
    let (stdout, out_done) = stdout.finish(PIPE_GRACE);
    let (stderr, err_done) = stderr.finish(PIPE_GRACE);
    if !(out_done && err_done) {
        bail!("{cmd:?} exited ({status}) but a background process still holds its output pipes");
    }
    Ok(Output { status, stdout, stderr })
}

/// `Some(status)` once the child exits, `None` if it is still running at the deadline.
fn wait_bounded(child: &mut Child, timeout: Duration) -> Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().context("wait for child")? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Descriptors the child uses to place itself, opened before the fork.
struct Placement {
    cgroup_procs: Option<File>,
    netns: Option<File>,
}

impl Placement {
    fn open(netns: Option<&Netns>, cgroup: Option<&Cgroup>) -> io::Result<Placement> {
        let cgroup_procs =
            cgroup.map(|cg| OpenOptions::new().write(true).open(cg.path().join("cgroup.procs"))).transpose()?;
        let netns = netns.map(|ns| File::open(ns.path())).transpose()?;
        Ok(Placement { cgroup_procs, netns })
    }

    /// Runs in the forked child: only async-signal-safe calls, no allocation.
    fn enter(&self) -> io::Result<()> {
        if let Some(procs) = &self.cgroup_procs {
            // Writing "0" to cgroup.procs moves the writing process itself.
            // SAFETY: a valid open descriptor and a 1-byte buffer that outlives the call.
            let written = unsafe { libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) };
            match written {
                1 => {}
                0 => return Err(io::ErrorKind::WriteZero.into()),
                _ => return Err(io::Error::last_os_error()),
            }
        }
        if let Some(netns) = &self.netns {
            // SAFETY: a valid open descriptor of a network namespace file.
            if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

/// Reads a pipe to its end on a helper thread, keeping what arrived so far.
struct Drain {
    buf: Arc<Mutex<Vec<u8>>>,
    done: Receiver<()>,
}

impl Drain {
    fn start<R: Read + Send + 'static>(pipe: Option<R>) -> Drain {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let (tx, done) = mpsc::channel();
        let sink = Arc::clone(&buf);
        std::thread::spawn(move || {
            if let Some(mut pipe) = pipe {
                let mut chunk = [0u8; 8192];
                while let Ok(n @ 1..) = pipe.read(&mut chunk) {
                    sink.lock().unwrap_or_else(PoisonError::into_inner).extend_from_slice(&chunk[..n]);
                }
            }
            let _ = tx.send(());
        });
        Drain { buf, done }
    }

    /// The bytes read, and whether the pipe reached its end within `wait`.
    fn finish(self, wait: Duration) -> (Vec<u8>, bool) {
        let complete = self.done.recv_timeout(wait).is_ok();
        let bytes = std::mem::take(&mut *self.buf.lock().unwrap_or_else(PoisonError::into_inner));
        (bytes, complete)
    }
}

#[cfg(test)]
mod tests {
    use super::super::require_privileges;
    use super::*;

    #[test]
    fn spawned_process_lands_in_cgroup_and_netns() {
        if !require_privileges("spawned_process_lands_in_cgroup_and_netns") {
            return;
        }
        let ns = Netns::new("spawn").expect("create netns");
        ns.add_addr("lo", "198.18.0.10/32").expect("add addr");
        let cgroup = Cgroup::new("spawn").expect("create cgroup");
        let out = output_in(
            Command::new("sh").args(["-c", "cat /proc/self/cgroup; ip -o addr"]),
            Some(&ns),
            Some(&cgroup),
            Duration::from_secs(10),
        )
        .expect("run");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{out:?}");
        let unified = text.lines().find_map(|l| l.strip_prefix("0::")).expect("cgroup2 line");
        assert_eq!(unified, cgroup.relative_path(), "{text}");
        assert!(text.contains("198.18.0.10/32"), "{text}");
        // Only the namespace's own interface: lo.
        let addr_lines = text.lines().filter(|l| l.contains(" inet"));
        assert!(addr_lines.clone().count() > 0 && addr_lines.clone().all(|l| l.starts_with("1: lo ")), "{text}");
    }

    #[test]
    fn spawn_without_placement_stays_put() {
        let out = output_in(Command::new("true").arg("x"), None, None, Duration::from_secs(10)).expect("run");
        assert!(out.status.success());
    }

    #[test]
    fn output_in_kills_on_timeout() {
        let started = Instant::now();
        let err = output_in(
            Command::new("sh").args(["-c", "echo started; exec sleep 100"]),
            None,
            None,
            Duration::from_millis(300),
        )
        .expect_err("must time out");
        let msg = format!("{err:#}");
        assert!(msg.contains("timed out") && msg.contains("started"), "{msg}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn tokio_spawn_lands_in_cgroup() {
        if !require_privileges("tokio_spawn_lands_in_cgroup") {
            return;
        }
        let ns = Netns::new("spawn_tokio").expect("create netns");
        let cgroup = Cgroup::new("spawn_tokio").expect("create cgroup");
        let mut cmd = tokio::process::Command::new("cat");
        cmd.arg("/proc/self/cgroup").stdout(Stdio::piped()).kill_on_drop(true);
        let child = spawn_in_tokio(&mut cmd, Some(&ns), Some(&cgroup)).expect("spawn");
        let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
            .await
            .expect("in time")
            .expect("output");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.lines().any(|l| l.strip_prefix("0::") == Some(&*cgroup.relative_path())), "{text}");
    }
}
