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

/// A cargo command (the same cargo that runs xtask) in the workspace root. In CI builds are
/// not incremental and carry no line tables: a clean clone never rebuilds, and both would
/// cost disk (the line tables a third of every test executable; a panic still names its
/// file and line).
pub fn cargo() -> Command {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = command(cargo);
    cmd.current_dir(repo_root());
    if in_ci() {
        cmd.env("CARGO_INCREMENTAL", "0").env("CARGO_PROFILE_DEV_DEBUG", "false");
    }
    cmd
}

/// Whether `CI` is set (to anything but the empty string).
pub fn in_ci() -> bool {
    env::var_os("CI").is_some_and(|value| !value.is_empty())
}

/// Bytes free for us on the filesystem holding `path`, from `df`; `None` if `df` fails.
pub fn free_bytes(path: &Path) -> Option<u64> {
    let out = stdout(Command::new("df").args(["--output=avail", "-B1"]).arg(path)).ok()?;
    parse_df_avail(&out)
}

/// The number in `df --output=avail -B1` output (a header line, then the figure).
fn parse_df_avail(out: &str) -> Option<u64> {
    out.lines().nth(1)?.trim().parse().ok()
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
    fn reads_free_bytes_from_df() {
        assert_eq!(parse_df_avail("    Avail\n9958281216\n"), Some(9_958_281_216));
        assert_eq!(parse_df_avail("Avail\n"), None);
        let free = free_bytes(Path::new("/")).expect("df / works");
        assert!(free > 0);
    }

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
