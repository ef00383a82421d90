//! Process helpers shared by the tasks: where the workspace lives, how child commands are
//! built and run, and whether we are root.

use std::env;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// The workspace root (the parent of this crate's directory).
pub fn repo_root() -> &'static Path {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir)
}

/// Cargo's target directory, honouring `CARGO_TARGET_DIR` (relative to the workspace root,
/// where every cargo child runs).
pub fn target_dir() -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => repo_root().join(dir),
        None => repo_root().join("target"),
    }
}

/// `$CARGO_HOME/bin`, where `cargo install` puts binaries such as bpf-linker.
pub fn cargo_bin_dir() -> Option<PathBuf> {
    let home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")))?;
    Some(home.join("bin"))
}

/// `PATH` for children: ours, with `$CARGO_HOME/bin` appended when it is missing, so the
/// eBPF build finds a freshly installed bpf-linker.
fn child_path() -> OsString {
    let current = env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = env::split_paths(&current).collect();
    if let Some(bin) = cargo_bin_dir()
        && !dirs.contains(&bin)
    {
        dirs.push(bin);
    }
    env::join_paths(dirs).unwrap_or(current)
}

/// A command for `program` with the child `PATH`.
pub fn command(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    cmd.env("PATH", child_path());
    cmd
}

/// A cargo command (the same cargo that runs xtask) in the workspace root.
pub fn cargo() -> Command {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = command(cargo);
    cmd.current_dir(repo_root());
    cmd
}

/// Finds an executable on the child `PATH`.
pub fn find_executable(name: &str) -> Option<PathBuf> {
    env::split_paths(&child_path()).map(|dir| dir.join(name)).find(|path| is_executable(path))
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// Renders a command the way a shell user would type it, for logs and errors.
pub fn display(cmd: &Command) -> String {
    let mut line = Path::new(cmd.get_program()).file_name().unwrap_or(cmd.get_program()).to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

/// Runs a command with inherited stdio after echoing it; fails unless it exits with 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let line = display(cmd);
    println!("+ {line}");
    let status = cmd.status().with_context(|| format!("cannot start `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Runs a command quietly and returns its stdout; fails unless it exits with 0.
pub fn stdout(cmd: &mut Command) -> Result<String> {
    let line = display(cmd);
    let output = cmd.stdin(Stdio::null()).output().with_context(|| format!("cannot start `{line}`"))?;
    if !output.status.success() {
        bail!("`{line}` failed ({}): {}", output.status, String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Whether this process runs with effective uid 0.
pub fn is_root() -> Result<bool> {
    let status = fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let euid = effective_uid(&status).context("no Uid line in /proc/self/status")?;
    Ok(euid == 0)
}

/// The effective uid from a `/proc/<pid>/status` text (`Uid: real effective saved fs`).
fn effective_uid(status: &str) -> Option<u32> {
    let line = status.lines().find_map(|line| line.strip_prefix("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_uid_is_the_second_field() {
        let status = "Name:\txtask\nUid:\t1000\t0\t0\t0\nGid:\t1000\t1000\t1000\t1000\n";
        assert_eq!(effective_uid(status), Some(0));
        assert_eq!(effective_uid("Name:\txtask\n"), None);
    }

    #[test]
    fn display_shows_program_name_and_args() {
        let mut cmd = Command::new("/usr/bin/cargo");
        cmd.args(["build", "-p", "interceptor"]);
        assert_eq!(display(&cmd), "cargo build -p interceptor");
    }
}
