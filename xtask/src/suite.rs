//! `cargo xtask test`: the whole test suite, as CI runs it.
//!
//! Steps: setup; unit and in-process tests for the workspace; a dev build of the
//! interceptor binary; the privileged tests (`interceptor-tests`) one at a time, with
//! `INTERCEPTOR_BIN` pointing at that binary; then every fuzz target for a few seconds from
//! its seed corpus (a crash fails the suite). Every step that can run does, so one failure
//! does not hide another; a summary with durations and the disk left after each step
//! closes the run.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::interceptor::{self, Profile};
use crate::{cmd, fuzz, setup, testlog};

/// Package holding the privileged tests.
const PRIVILEGED_TESTS: &str = "interceptor-tests";

enum Outcome {
    Passed,
    Failed(String),
    Skipped(&'static str),
}

struct Step {
    name: &'static str,
    outcome: Outcome,
    duration: Duration,
    /// Bytes free on the target directory's filesystem when the step ended.
    free_after: Option<u64>,
}

/// Disk a clean run needs, with a margin (measured: 2.5 GB for the workspace's builds and
/// 1.6 GB for the fuzz targets').
const DISK_NEEDED: u64 = 6 << 30;

/// Bytes free where the builds go.
fn free_disk() -> Option<u64> {
    cmd::free_bytes(cmd::repo_root())
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1u32 << 30)
}

/// Warns, before anything is built, when the disk is too small for a clean run: builds that
/// run out of space fail with errors that do not say so plainly.
fn check_disk() {
    match free_disk() {
        Some(free) if free < DISK_NEEDED => println!(
            "warning: {:.1} GiB free under {}; a clean run of the suite needs about {:.0} GiB",
            gib(free),
            cmd::repo_root().display(),
            gib(DISK_NEEDED)
        ),
        Some(free) => println!("disk: {:.1} GiB free under {}", gib(free), cmd::repo_root().display()),
        None => println!("warning: cannot read the free disk space (df failed)"),
    }
}

/// Records step outcomes and their durations.
#[derive(Default)]
struct Steps(Vec<Step>);

impl Steps {
    /// Runs one step and records its outcome; returns its value on success.
    fn run<T>(&mut self, name: &'static str, step: impl FnOnce() -> Result<T>) -> Option<T> {
        println!("==> {name}");
        let start = Instant::now();
        let result = step();
        let (outcome, value) = match result {
            Ok(value) => (Outcome::Passed, Some(value)),
            Err(err) => {
                eprintln!("error: {name}: {err:#}");
                (Outcome::Failed(format!("{err:#}")), None)
            }
        };
        self.0.push(Step { name, outcome, duration: start.elapsed(), free_after: free_disk() });
        value
    }

    fn skip(&mut self, name: &'static str, reason: &'static str) {
        self.0.push(Step { name, outcome: Outcome::Skipped(reason), duration: Duration::ZERO, free_after: None });
    }

    fn print_summary(&self) {
        println!("\nsummary:");
        for step in &self.0 {
            let (label, detail) = match &step.outcome {
                Outcome::Passed => ("passed", String::new()),
                Outcome::Failed(err) => ("FAILED", format!("  {err}")),
                Outcome::Skipped(reason) => ("skipped", format!("  {reason}")),
            };
            let disk = step.free_after.map(|free| format!("{:>6.1} GiB free", gib(free))).unwrap_or_default();
            println!("  {label:<8} {:<34} {:>7.1}s {disk:>15}{detail}", step.name, step.duration.as_secs_f64());
        }
    }

    fn failures(&self) -> usize {
        self.0.iter().filter(|step| !matches!(step.outcome, Outcome::Passed)).count()
    }
}

/// Runs the suite; `extra` is `[cargo test args] [-- harness args]`.
pub fn test(extra: &[String]) -> Result<()> {
    let (cargo_args, harness_args) = split_extra(extra);
    let mut steps = Steps::default();
    check_disk();

    if steps.run("setup", setup::setup).is_some() {
        steps.run("unit and in-process tests", || testlog::run(&mut unit_tests(cargo_args, harness_args)));
        let bin = steps.run("build interceptor (dev)", || interceptor::build(Profile::Dev));
        match bin {
            Some(bin) => {
                steps.run("privileged tests", || {
                    privileged_note();
                    testlog::run(&mut privileged_tests(&bin, cargo_args, harness_args))
                });
            }
            None => steps.skip("privileged tests", "needs the interceptor build"),
        }
        steps.run("fuzz targets (8s each)", || fuzz::run(&[], fuzz::SUITE_TIME));
    }

    steps.print_summary();
    match steps.failures() {
        0 => Ok(()),
        n => bail!("{n} of {} test steps did not pass", steps.0.len()),
    }
}

/// Splits `[cargo args] [-- harness args]`.
fn split_extra(extra: &[String]) -> (&[String], &[String]) {
    match extra.iter().position(|arg| arg == "--") {
        Some(i) => (&extra[..i], &extra[i + 1..]),
        None => (extra, &[]),
    }
}

/// Step A: everything except the eBPF crate (not a host target) and the privileged tests.
fn unit_tests(cargo_args: &[String], harness_args: &[String]) -> Command {
    let mut cargo = cmd::cargo();
    cargo
        .args(["test", "--workspace", "--exclude", "interceptor-ebpf"])
        .args(["--exclude", PRIVILEGED_TESTS])
        .args(no_fail_fast(cargo_args))
        .args(cargo_args);
    if !harness_args.is_empty() {
        cargo.arg("--").args(harness_args);
    }
    cargo
}

/// Step B: privileged tests one at a time; they create namespaces, cgroups and nat rules.
/// The interceptor's own test helpers (behind its `testing` feature) are privileged too.
fn privileged_tests(bin: &Path, cargo_args: &[String], harness_args: &[String]) -> Command {
    let mut cargo = cmd::cargo();
    cargo
        .args(["test", "--package", PRIVILEGED_TESTS])
        .args(["--package", "interceptor", "--features", "interceptor/testing"])
        .args(no_fail_fast(cargo_args))
        .args(cargo_args)
        .arg("--");
    if !harness_args.iter().any(|arg| arg.starts_with("--test-threads")) {
        cargo.arg("--test-threads=1");
    }
    cargo.args(harness_args).env("INTERCEPTOR_BIN", bin);
    cargo
}

/// Every test binary runs even after one fails, so one failure hides no other.
fn no_fail_fast(cargo_args: &[String]) -> Option<&'static str> {
    (!cargo_args.iter().any(|arg| arg == "--no-fail-fast")).then_some("--no-fail-fast")
}

fn privileged_note() {
    if !cmd::is_root().unwrap_or(false) {
        println!("note: not root: privileged tests skip themselves (and fail when CI is set)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|arg| arg.to_string()).collect()
    }

    #[test]
    fn split_extra_at_first_separator() {
        let extra = strings(&["--no-fail-fast", "--", "--nocapture", "--", "x"]);
        let (cargo_args, harness_args) = split_extra(&extra);
        assert_eq!(cargo_args, &strings(&["--no-fail-fast"])[..]);
        assert_eq!(harness_args, &strings(&["--nocapture", "--", "x"])[..]);

        let extra = strings(&["--no-fail-fast"]);
        let (cargo_args, harness_args) = split_extra(&extra);
        assert_eq!(cargo_args.len(), 1);
        assert!(harness_args.is_empty());
    }

    #[test]
    fn privileged_tests_run_one_at_a_time() {
        let cargo = privileged_tests(Path::new("/t/interceptor"), &[], &strings(&["--nocapture"]));
        let line = cmd::display(&cargo);
        assert!(line.ends_with(
            "test --package interceptor-tests --package interceptor --features interceptor/testing \
             --no-fail-fast -- --test-threads=1 --nocapture"
        ));

        let cargo = privileged_tests(Path::new("/t/interceptor"), &[], &strings(&["--test-threads=2"]));
        assert!(!cmd::display(&cargo).contains("--test-threads=1"));
    }
}
