//! `cargo xtask fuzz` and the suite's fuzz step: the cargo-fuzz (libFuzzer) targets of
//! `interceptor/fuzz`, built once and run one after another, each for a bounded time from its
//! committed seed corpus.
//!
//! The targets are built with `-O --debug-assertions` (arithmetic overflow is a crash) and
//! without a sanitizer: the code under test is safe Rust, and a sanitizer would double the
//! build and halve the executions. New inputs go to a scratch corpus under the fuzz crate's
//! `target/`, never into the committed seeds; crashes land in `interceptor/fuzz/artifacts/`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::cmd;

/// Every fuzz target (a `[[bin]]` of `interceptor/fuzz/Cargo.toml`).
pub const TARGETS: &[&str] = &[
    "providers",
    "sse",
    "eventstream",
    "json_array",
    "pipeline",
    "client_hello",
    "dns_answer",
    "decode",
    "config",
    "policy",
    "mcp_stream",
    "mcp_messages",
];

/// How long the suite runs each target.
pub const SUITE_TIME: Duration = Duration::from_secs(8);

/// The fuzz crate (its own workspace, outside the main one).
pub fn fuzz_dir() -> PathBuf {
    cmd::repo_root().join("interceptor").join("fuzz")
}

/// `cargo +nightly fuzz <args>` in the fuzz crate, free of the variables the outer (stable)
/// cargo set for xtask, which would pin the toolchain or the target directory.
fn cargo_fuzz() -> Command {
    let mut cargo = cmd::command("cargo");
    cargo.args(["+nightly", "fuzz"]).current_dir(fuzz_dir());
    for var in ["CARGO", "RUSTC", "RUSTDOC", "RUSTUP_TOOLCHAIN", "RUSTC_WRAPPER", "RUSTFLAGS", "CARGO_TARGET_DIR"] {
        cargo.env_remove(var);
    }
    cargo
}

/// Build flags shared by `build` and `run`, so `run` finds the build up to date.
const BUILD_FLAGS: &[&str] = &["-O", "--debug-assertions", "--sanitizer", "none"];

/// Builds every target once.
pub fn build() -> Result<()> {
    cmd::run(cargo_fuzz().arg("build").args(BUILD_FLAGS))
}

/// Runs `targets` (all when empty) for `time` each, one after another; fails if any crashed.
pub fn run(targets: &[String], time: Duration) -> Result<()> {
    let targets: Vec<&str> = if targets.is_empty() {
        TARGETS.to_vec()
    } else {
        for t in targets {
            if !TARGETS.contains(&t.as_str()) {
                bail!("unknown fuzz target {t:?}; targets: {}", TARGETS.join(", "));
            }
        }
        targets.iter().map(String::as_str).collect()
    };
    build()?;
    let mut crashed = Vec::new();
    for target in targets {
        println!("==> fuzz {target} for {}s", time.as_secs());
        if let Err(err) = cmd::run(&mut run_command(target, time)?) {
            eprintln!("error: fuzz target {target}: {err:#}");
            crashed.push(target);
        }
    }
    if !crashed.is_empty() {
        bail!(
            "fuzz targets failed: {} (reproducers in {})",
            crashed.join(", "),
            fuzz_dir().join("artifacts").display()
        );
    }
    Ok(())
}

/// One bounded run: new inputs go to a scratch corpus, the committed seeds are read only.
fn run_command(target: &str, time: Duration) -> Result<Command> {
    let scratch = fuzz_dir().join("target").join("corpus").join(target);
    std::fs::create_dir_all(&scratch).with_context(|| format!("create {}", scratch.display()))?;
    let seeds = seed_dir(target);
    let mut cargo = cargo_fuzz();
    cargo.args(["run"]).args(BUILD_FLAGS).arg(target).arg(&scratch);
    if seeds.is_dir() {
        cargo.arg(&seeds);
    }
    cargo.arg("--").args([
        format!("-max_total_time={}", time.as_secs().max(1)),
        // A single input taking this long is a hang, reported as a crash.
        "-timeout=10".to_string(),
        "-rss_limit_mb=2048".to_string(),
        "-print_final_stats=1".to_string(),
    ]);
    Ok(cargo)
}

/// The committed seed corpus of a target.
pub fn seed_dir(target: &str) -> PathBuf {
    Path::new(&fuzz_dir()).join("corpus").join(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_target_is_a_bin_of_the_fuzz_crate_with_seeds() {
        let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).expect("fuzz manifest");
        for target in TARGETS {
            assert!(manifest.contains(&format!("name = \"{target}\"")), "{target} is not in the fuzz crate");
            let seeds = std::fs::read_dir(seed_dir(target)).map(|d| d.count()).unwrap_or(0);
            assert!(seeds > 0, "{target} has no committed seed corpus");
        }
        let bins = manifest.matches("[[bin]]").count();
        assert_eq!(bins, TARGETS.len(), "a fuzz target is missing from TARGETS");
    }

    #[test]
    fn runs_are_bounded_and_keep_the_seeds_read_only() {
        let line = cmd::display(&run_command("sse", Duration::from_secs(8)).expect("command"));
        assert!(line.contains("+nightly fuzz run -O --debug-assertions --sanitizer none sse"), "{line}");
        assert!(line.contains("-max_total_time=8"), "{line}");
        let scratch = fuzz_dir().join("target").join("corpus").join("sse");
        let scratch = line.find(&*scratch.to_string_lossy()).expect("scratch corpus");
        let seeds = line.find(&*seed_dir("sse").to_string_lossy()).expect("seed corpus");
        assert!(scratch < seeds, "libFuzzer writes new inputs to the first corpus: {line}");
    }
}
