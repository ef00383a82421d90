//! Building the interceptor binary and running it locally (`cargo xtask build` / `run`).
//!
//! `run` ends by exec'ing the interceptor, so it replaces xtask (cargo execs xtask the same
//! way): SIGINT and SIGTERM reach the interceptor directly and its exit code is ours.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Result, bail};
use clap::{ArgAction, Args, ValueEnum};

use crate::{cmd, setup};

/// Cargo build profile of the interceptor binary.
#[derive(Clone, Copy, Debug)]
pub enum Profile {
    Dev,
    Release,
}

impl Profile {
    /// The directory under `target/` that holds this profile's output.
    fn dir(self) -> &'static str {
        match self {
            Profile::Dev => "debug",
            Profile::Release => "release",
        }
    }
}

/// Builds `interceptor` (its build script builds the eBPF object) and returns the absolute
/// path of the binary.
pub fn build(profile: Profile) -> Result<PathBuf> {
    let mut cargo = cmd::cargo();
    cargo.args(["build", "--package", "interceptor"]);
    if let Profile::Release = profile {
        cargo.arg("--release");
    }
    cmd::run(&mut cargo)?;
    let bin = cmd::target_dir().join(profile.dir()).join("interceptor");
    if !bin.is_file() {
        bail!("build succeeded but {} does not exist", bin.display());
    }
    Ok(bin)
}

/// How connections reach the proxy, passed through as `--redirect`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Redirect {
    /// eBPF cgroup/connect programs (needs root).
    Ebpf,
    /// iptables nat REDIRECT rules (needs root).
    Iptables,
    /// No redirection (no privileges needed).
    None,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Build and run the release binary; `--release=false` uses the dev profile.
    #[arg(
        long,
        action = ArgAction::Set,
        default_value_t = true,
        num_args = 0..=1,
        default_missing_value = "true",
        require_equals = true
    )]
    release: bool,

    /// cgroup (v2) whose processes are intercepted.
    #[arg(long, value_name = "PATH")]
    cgroup: Option<PathBuf>,

    /// Redirect mode; the interceptor's own default when omitted.
    #[arg(long, value_enum)]
    redirect: Option<Redirect>,

    /// State directory (CA, pinned state); kept inside the workspace so a dev run does not
    /// touch /var/lib. Defaults to `target/interceptor-state`.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,

    /// Extra arguments for `interceptor run`.
    #[arg(last = true)]
    extra: Vec<String>,
}

/// Checks privileges, sets up, builds, then execs `interceptor run`.
pub fn run(args: RunArgs) -> Result<()> {
    require_privileges(args.redirect)?;
    setup::setup()?;
    let profile = if args.release { Profile::Release } else { Profile::Dev };
    let bin = build(profile)?;

    let state_dir = args.state_dir.unwrap_or_else(|| cmd::target_dir().join("interceptor-state"));
    let mut interceptor = Command::new(&bin);
    interceptor.arg("run").arg("--state-dir").arg(&state_dir);
    if let Some(cgroup) = &args.cgroup {
        interceptor.arg("--cgroup").arg(cgroup);
    }
    if let Some(redirect) = args.redirect {
        interceptor.arg("--redirect").arg(redirect_name(redirect));
    }
    interceptor.args(&args.extra);

    println!("+ {}", cmd::display(&interceptor));
    // exec only returns on failure.
    let err = interceptor.exec();
    bail!("cannot exec {}: {err}", bin.display())
}

fn redirect_name(redirect: Redirect) -> &'static str {
    match redirect {
        Redirect::Ebpf => "ebpf",
        Redirect::Iptables => "iptables",
        Redirect::None => "none",
    }
}

/// Fails early, before a long build, when the chosen redirect mode cannot work.
fn require_privileges(redirect: Option<Redirect>) -> Result<()> {
    if cmd::is_root()? {
        return Ok(());
    }
    match redirect {
        Some(Redirect::None) => Ok(()),
        Some(Redirect::Ebpf) => {
            bail!(
                "--redirect ebpf needs root (it attaches eBPF programs to a cgroup): run as root, or use --redirect none"
            )
        }
        Some(Redirect::Iptables) => {
            bail!("--redirect iptables needs root (it changes iptables nat rules): run as root, or use --redirect none")
        }
        None => bail!("the interceptor's default redirect mode needs root: run as root, or use --redirect none"),
    }
}
