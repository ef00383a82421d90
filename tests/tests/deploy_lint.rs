//! The deployment files are linted, since they cannot be run here: the
//! container build by hadolint (no Docker engine on test machines), the systemd
//! unit by `systemd-analyze` (no systemd as PID 1 either).
//!
//! A missing linter skips its test with a printed reason, and fails it when
//! `CI` is set (`cargo xtask setup` installs both).

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use anyhow::{Context as _, Result};
use interceptor::testing::interceptor_bin;

/// Where the unit's commands live on an installed host.
const INSTALLED_BIN: &str = "/usr/local/bin/interceptor";

/// Highest acceptable `systemd-analyze security` exposure (0-100; printed as
/// 0.0-10.0). The unit scores 4.0: root with CAP_SYS_ADMIN, the host network
/// and no system call filter are what the redirect needs.
const MAX_EXPOSURE: u32 = 50;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Whether `tool` runs; otherwise skips (or panics under CI) and returns false.
fn require_tool(test_name: &str, tool: &str) -> bool {
    let found = Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success());
    if found {
        return true;
    }
    let reason = format!("`{tool}` not found on PATH (`cargo xtask setup` installs it)");
    interceptor::testing::skip(test_name, &reason)
}

fn combined(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

#[test]
fn dockerfile_passes_hadolint() -> Result<()> {
    if !require_tool("dockerfile_passes_hadolint", "hadolint") {
        return Ok(());
    }
    let dockerfile = repo_root().join("deploy/container/Dockerfile");
    // Default failure threshold: any finding, even `info`, fails. Accepted
    // findings carry a `# hadolint ignore=` comment with the reason.
    let output = Command::new("hadolint").arg(&dockerfile).output().context("running hadolint")?;
    assert!(output.status.success(), "hadolint findings:\n{}", combined(&output));
    Ok(())
}

#[test]
fn dockerfile_copies_what_exists() -> Result<()> {
    let dockerfile = std::fs::read_to_string(repo_root().join("deploy/container/Dockerfile"))?;
    let config = repo_root().join("interceptor/config/default.toml");
    assert!(dockerfile.contains("COPY interceptor/config/default.toml /etc/interceptor/config.toml"));
    assert!(config.is_file(), "{} is missing", config.display());
    // The build context is the repository root: a local target/ must not be sent.
    let dockerignore = std::fs::read_to_string(repo_root().join(".dockerignore"))?;
    assert!(dockerignore.lines().any(|l| l.trim_end_matches('/') == "target"), "{dockerignore}");
    Ok(())
}

/// A copy of the unit whose commands point at the freshly built binary, since
/// `systemd-analyze verify` checks that every Exec*= program exists.
fn unit_for_this_build(dir: &Path) -> Result<PathBuf> {
    let bin = interceptor_bin();
    let bin = bin
        .canonicalize()
        .with_context(|| format!("{} not found: build it first (`cargo build -p interceptor`)", bin.display()))?;
    let unit = std::fs::read_to_string(repo_root().join("deploy/systemd/interceptor.service"))?;
    assert!(unit.contains(INSTALLED_BIN), "the unit no longer runs {INSTALLED_BIN}");
    let path = dir.join("interceptor.service");
    std::fs::write(&path, unit.replace(INSTALLED_BIN, bin.to_str().context("non-utf-8 binary path")?))?;
    Ok(path)
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify() -> Result<()> {
    if !require_tool("systemd_unit_passes_systemd_analyze_verify", "systemd-analyze") {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let unit = unit_for_this_build(dir.path())?;
    let output =
        Command::new("systemd-analyze").arg("verify").arg(&unit).output().context("running systemd-analyze")?;
    let text = combined(&output);
    assert!(output.status.success(), "systemd-analyze verify failed:\n{text}");
    // Unknown keys and unparsable values are only warnings ("..., ignoring")
    // with exit status 0: any line about our unit is a finding. Lines about
    // other units on this host (dependencies it loads) are not ours to judge.
    let findings: Vec<&str> = text
        .lines()
        .filter(|line| line.contains("interceptor.service") || line.contains(&*unit.to_string_lossy()))
        .collect();
    assert!(findings.is_empty(), "systemd-analyze verify findings:\n{}", findings.join("\n"));
    Ok(())
}

#[test]
fn systemd_unit_is_hardened() -> Result<()> {
    if !require_tool("systemd_unit_is_hardened", "systemd-analyze") {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let unit = unit_for_this_build(dir.path())?;
    let output = Command::new("systemd-analyze")
        .args(["security", "--no-pager", "--offline=true", &format!("--threshold={MAX_EXPOSURE}")])
        .arg(&unit)
        .output()
        .context("running systemd-analyze security")?;
    let text = combined(&output);
    assert!(output.status.success(), "exposure above {MAX_EXPOSURE}/100, or the analysis failed:\n{text}");
    Ok(())
}
