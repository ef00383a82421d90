//! Helpers for privileged tests: throwaway network namespaces and cgroups,
//! spawning processes into them, and small fake servers that report what they
//! saw from their own side.
//!
//! Compiled only with the `testing` feature, so none of it ships. Every resource
//! is removed when its handle drops. A privileged test starts with
//! `if !require_privileges("test_name") { return; }`; a skipped test prints
//! a `SKIPPED:` line ([`skip`]) that the suite's summary counts.
//!
//! These helpers shell out to iproute2 (`ip`) and make raw namespace syscalls;
//! they favour clear failures over speed and must not be used outside tests.

pub mod akto;
mod cgroup;
pub mod clients;
mod fake;
mod harness;
pub mod kube;
pub mod mcp;
pub mod mitm;
mod netns;
mod process;
pub mod provider;
pub mod sigv4;

pub use cgroup::{Cgroup, cgroup2_root};
pub use fake::{EchoReply, PeerEchoServer, Peers, UdpEcho, echo_client};
pub use harness::{ADMIN, Interceptor, http_get, interceptor_bin};
pub use netns::{Netns, VethPair, in_netns, veth_pair};
pub use process::{output_in, spawn_in, spawn_in_tokio};

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail};

/// Whether this process can run privileged tests: root, a cgroup2 mount,
/// iproute2, and the ability to create a network namespace and a cgroup.
///
/// When something is missing this reports the test as skipped ([`skip`]) and
/// returns false, unless the `CI` environment variable is set (non-empty): a
/// CI run must not skip silently, so it panics with the reason instead.
pub fn require_privileges(test_name: &str) -> bool {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    match PROBE.get_or_init(probe_privileges) {
        Ok(()) => true,
        Err(reason) => skip(test_name, &format!("privileged test cannot run: {reason}")),
    }
}

/// Whether every program named is installed (on `PATH` or in the system
/// directories); otherwise reports the test as skipped ([`skip`]).
pub fn require_tools(test_name: &str, programs: &[&str]) -> bool {
    let missing: Vec<&str> = programs.iter().copied().filter(|p| !tool(p).is_absolute()).collect();
    if missing.is_empty() {
        return true;
    }
    skip(test_name, &format!("not installed: {} (`cargo xtask setup` installs them)", missing.join(", ")))
}

/// The line a skipped test prints, which `cargo xtask test` counts and lists
/// in its summary: `SKIPPED: <test>: <reason>`.
pub const SKIP_MARKER: &str = "SKIPPED: ";

/// Reports that `test_name` cannot run here and returns false, so a test
/// reads `if !skip_unless(...) { return; }`; libtest still counts it as
/// passed, so the marker line is what tells the two apart.
///
/// When the `CI` environment variable is set (non-empty) this panics with
/// the reason instead: a CI run must not skip silently.
pub fn skip(test_name: &str, reason: &str) -> bool {
    if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
        panic!("{test_name}: cannot run (CI is set, so not skipping): {reason}");
    }
    // One write straight to stderr: `eprintln!` is captured by the test
    // harness, and a line written in pieces could interleave with another
    // test's.
    let line = format!("{SKIP_MARKER}{test_name}: {}\n", reason.replace('\n', " "));
    let _ = std::io::stderr().write_all(line.as_bytes());
    false
}

fn probe_privileges() -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("not running as root (euid is not 0)".into());
    }
    cgroup2_root().map_err(|e| format!("{e:#}"))?;
    run_checked(Command::new(tool("ip")).arg("-V")).map_err(|e| format!("iproute2 `ip` is not usable: {e:#}"))?;
    Netns::new("probe").map_err(|e| format!("cannot create a network namespace: {e:#}"))?;
    Cgroup::new("probe").map_err(|e| format!("cannot create a cgroup: {e:#}"))?;
    Ok(())
}

/// Path of a system tool: found on `PATH`, else in the sbin/bin directories
/// (a non-root `PATH` often lacks sbin), else the bare name.
pub fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// `<pid % 10000>-<counter>`: unique within this process, short enough for
/// names with length limits, and recognisable per test run.
fn unique_suffix() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{}-{n}", std::process::id() % 10_000)
}

/// Keeps `[A-Za-z0-9_]` of a test name (others become `_`), at most `max` chars.
fn sanitize(name: &str, max: usize) -> String {
    name.chars().take(max).map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect()
}

/// Runs a command to completion; its stdout on success, an error carrying the
/// command line, exit status and stderr otherwise.
fn run_checked(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_keeps_names_short_and_plain() {
        assert_eq!(sanitize("redirect::tcp-443", 12), "redirect__tc");
        assert_eq!(sanitize("ok_name", 40), "ok_name");
    }

    #[test]
    fn tool_finds_sh() {
        assert!(tool("sh").is_absolute());
    }

    #[test]
    fn run_checked_reports_stderr() {
        let err = run_checked(Command::new("sh").args(["-c", "echo boom >&2; exit 3"])).expect_err("must fail");
        assert!(format!("{err:#}").contains("boom"), "{err:#}");
    }
}
