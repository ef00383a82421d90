//! `cargo xtask test`: the whole test suite, as CI runs it.
//!
//! Steps: setup; `cargo fmt --check` and clippy with warnings denied; unit and in-process
//! tests for the workspace; a dev build of the
//! interceptor binary; the privileged tests (`interceptor-tests`, and `interceptor-bench`
//! whose tests run the benchmark and the demo) one at a time, with `INTERCEPTOR_BIN`
//! pointing at that binary; then every fuzz target for a few seconds from
//! its seed corpus (a crash fails the suite). Every step that can run does, so one failure
//! does not hide another; a summary with durations and the disk left after each step
//! closes the run. Tests that skipped themselves (not root, a tool missing; never when `CI`
//! is set, where they fail instead) are counted and listed per step, and a step in which
//! every test skipped is shown as skipped, not passed.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::interceptor::{self, Profile};
use crate::{cmd, fuzz, setup, testlog};

/// Package holding the privileged tests.
const PRIVILEGED_TESTS: &str = "interceptor-tests";
/// The benchmark and the demo: their tests run them, as root.
const BENCH: &str = crate::BENCH_PACKAGE;

enum Outcome {
    /// Passed; tests that skipped themselves are listed (none for a step that is not a
    /// test run).
    Passed {
        skipped: Vec<testlog::Skip>,
    },
    /// Every test of the step skipped itself: nothing was checked.
    AllSkipped {
        skipped: Vec<testlog::Skip>,
    },
    Failed {
        error: String,
        skipped: Vec<testlog::Skip>,
    },
    /// Not run because a step it needs failed; counts as a failure.
    NotRun(&'static str),
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
            Ok(value) => (Outcome::Passed { skipped: Vec::new() }, Some(value)),
            Err(err) => {
                eprintln!("error: {name}: {err:#}");
                (Outcome::Failed { error: format!("{err:#}"), skipped: Vec::new() }, None)
            }
        };
        self.0.push(Step { name, outcome, duration: start.elapsed(), free_after: free_disk() });
        value
    }

    /// Runs a `cargo test` step and records its outcome with the tests that skipped.
    fn run_tests(&mut self, name: &'static str, step: impl FnOnce() -> Result<testlog::Tally>) {
        println!("==> {name}");
        let start = Instant::now();
        let outcome = match step() {
            Ok(tally) => tests_outcome(tally),
            Err(err) => Outcome::Failed { error: format!("{err:#}"), skipped: Vec::new() },
        };
        if let Outcome::Failed { error, .. } = &outcome {
            eprintln!("error: {name}: {error}");
        }
        self.0.push(Step { name, outcome, duration: start.elapsed(), free_after: free_disk() });
    }

    fn not_run(&mut self, name: &'static str, reason: &'static str) {
        self.0.push(Step { name, outcome: Outcome::NotRun(reason), duration: Duration::ZERO, free_after: None });
    }

    fn summary(&self) -> String {
        let mut out = String::from("\nsummary:\n");
        for step in &self.0 {
            let (label, detail, skipped) = match &step.outcome {
                Outcome::Passed { skipped } if skipped.is_empty() => ("passed", String::new(), skipped.as_slice()),
                Outcome::Passed { skipped } => ("passed", format!("  {} test(s) skipped", skipped.len()), &skipped[..]),
                Outcome::AllSkipped { skipped } => {
                    ("SKIPPED", format!("  all {} test(s) skipped: nothing ran", skipped.len()), &skipped[..])
                }
                Outcome::Failed { error, skipped } => ("FAILED", format!("  {error}"), &skipped[..]),
                Outcome::NotRun(reason) => ("not run", format!("  {reason}"), &[][..]),
            };
            let disk = step.free_after.map(|free| format!("{:>6.1} GiB free", gib(free))).unwrap_or_default();
            out.push_str(&format!(
                "  {label:<8} {:<34} {:>7.1}s {disk:>15}{detail}\n",
                step.name,
                step.duration.as_secs_f64()
            ));
            for (reason, tests) in testlog::group_skips(skipped) {
                out.push_str(&format!("           skipped ({}): {reason}\n", tests.len()));
                out.push_str(&format!("             {}\n", tests.join(", ")));
            }
        }
        out
    }

    /// Steps that failed or could not run.
    fn failures(&self) -> usize {
        self.0.iter().filter(|step| matches!(step.outcome, Outcome::Failed { .. } | Outcome::NotRun(_))).count()
    }

    /// Tests that skipped themselves, over all steps.
    fn skipped_tests(&self) -> usize {
        self.0
            .iter()
            .map(|step| match &step.outcome {
                Outcome::Passed { skipped } | Outcome::AllSkipped { skipped } | Outcome::Failed { skipped, .. } => {
                    skipped.len()
                }
                Outcome::NotRun(_) => 0,
            })
            .sum()
    }
}

/// The outcome of a test step: failed if the run failed, skipped if every test that
/// passed had skipped itself, passed otherwise (with its skipped tests listed).
fn tests_outcome(tally: testlog::Tally) -> Outcome {
    match tally.error {
        Some(err) => Outcome::Failed { error: format!("{err:#}"), skipped: tally.skipped },
        None if !tally.skipped.is_empty() && tally.ran() == 0 => Outcome::AllSkipped { skipped: tally.skipped },
        None => Outcome::Passed { skipped: tally.skipped },
    }
}

/// Runs the suite; `extra` is `[cargo test args] [-- harness args]`.
pub fn test(extra: &[String]) -> Result<()> {
    let (cargo_args, harness_args) = split_extra(extra);
    let mut steps = Steps::default();
    check_disk();

    if steps.run("setup", setup::setup).is_some() {
        steps.run("format (cargo fmt --check)", || cmd::run(&mut fmt_check()));
        steps.run("lints (clippy -D warnings)", || cmd::run(&mut clippy()));
        steps.run_tests("unit and in-process tests", || Ok(testlog::run(&mut unit_tests(cargo_args, harness_args))));
        if cmd::in_ci() {
            drop_test_executables(&cmd::target_dir().join("debug").join("deps"));
        }
        let bin = steps.run("build interceptor (dev)", || interceptor::build(Profile::Dev));
        match bin {
            Some(bin) => {
                steps.run_tests("privileged tests", || {
                    privileged_note();
                    Ok(testlog::run(&mut privileged_tests(&bin, cargo_args, harness_args)))
                });
            }
            None => steps.not_run("privileged tests", "needs the interceptor build"),
        }
        if cmd::in_ci() {
            drop_test_executables(&cmd::target_dir().join("debug").join("deps"));
        }
        steps.run("fuzz targets (8s each)", || fuzz::run(&[], fuzz::SUITE_TIME));
    }

    print!("{}", steps.summary());
    let skipped = steps.skipped_tests();
    if skipped > 0 {
        println!("{skipped} test(s) skipped themselves and did not run (listed above); with CI set they fail instead");
    }
    match steps.failures() {
        0 => Ok(()),
        n => bail!("{n} of {} test steps did not pass", steps.0.len()),
    }
}

/// Removes the test executables a step built once it has run them: the next step builds
/// its own (the privileged tests with the `testing` feature, the fuzz targets in a target
/// directory of their own), and the privileged step's alone weigh about 2 GB. CI only: a
/// clean clone there never runs them again, while a local run keeps them for the next one.
fn drop_test_executables(deps: &Path) {
    let Ok(entries) = std::fs::read_dir(deps) else { return };
    let mut freed = 0u64;
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = entry.metadata() else { continue };
        let executable = meta.is_file() && meta.permissions().mode() & 0o111 != 0;
        if executable && path.extension().is_none() && std::fs::remove_file(&path).is_ok() {
            freed += meta.len();
        }
    }
    println!("freed {:.1} GiB of test executables", gib(freed));
}

/// Splits `[cargo args] [-- harness args]`.
fn split_extra(extra: &[String]) -> (&[String], &[String]) {
    match extra.iter().position(|arg| arg == "--") {
        Some(i) => (&extra[..i], &extra[i + 1..]),
        None => (extra, &[]),
    }
}

/// Formatting of every workspace crate, checked, not changed.
fn fmt_check() -> Command {
    let mut cargo = cmd::cargo();
    cargo.args(["fmt", "--all", "--check"]);
    cargo
}

/// Clippy on every target of the workspace but the eBPF crate (it builds for
/// `bpfel-unknown-none` only, through the interceptor's build script), test helpers
/// included, any warning an error.
fn clippy() -> Command {
    let mut cargo = cmd::cargo();
    cargo.args(["clippy", "--workspace", "--exclude", "interceptor-ebpf", "--all-targets"]).args([
        "--features",
        "interceptor/testing",
        "--",
        "-D",
        "warnings",
    ]);
    cargo
}

/// Step A: everything except the eBPF crate (not a host target) and the privileged tests.
fn unit_tests(cargo_args: &[String], harness_args: &[String]) -> Command {
    let mut cargo = cmd::cargo();
    cargo
        .args(["test", "--workspace", "--exclude", "interceptor-ebpf"])
        .args(["--exclude", PRIVILEGED_TESTS, "--exclude", BENCH])
        .args(no_fail_fast(cargo_args))
        .args(cargo_args);
    if !harness_args.is_empty() {
        cargo.arg("--").args(harness_args);
    }
    cargo
}

/// Step B: privileged tests one at a time; they create namespaces, cgroups and nat rules
/// (the benchmark's and the demo's tests too).
/// The interceptor's own test helpers (behind its `testing` feature) are privileged too.
fn privileged_tests(bin: &Path, cargo_args: &[String], harness_args: &[String]) -> Command {
    let mut cargo = cmd::cargo();
    cargo
        .args(["test", "--package", PRIVILEGED_TESTS, "--package", BENCH])
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
    fn only_test_executables_are_dropped() {
        let deps = tempfile::tempdir().expect("tempdir");
        let write = |name: &str, mode: u32| {
            let path = deps.path().join(name);
            std::fs::write(&path, b"x").expect("write");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        };
        write("observe-67ebc5719023f69b", 0o755);
        write("libinterceptor-c1bc1619832aa677.rlib", 0o644);
        write("libserde_derive-fc7abc14d5eff1b5.so", 0o755);
        write("observe-67ebc5719023f69b.d", 0o644);
        drop_test_executables(deps.path());
        let mut left: Vec<_> = std::fs::read_dir(deps.path())
            .expect("read")
            .map(|entry| entry.expect("entry").file_name().into_string().expect("utf-8"))
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "libinterceptor-c1bc1619832aa677.rlib",
                "libserde_derive-fc7abc14d5eff1b5.so",
                "observe-67ebc5719023f69b.d"
            ]
        );
    }

    #[test]
    fn lint_steps_check_without_changing() {
        assert!(cmd::display(&fmt_check()).ends_with("fmt --all --check"));
        assert!(cmd::display(&clippy()).ends_with(
            "clippy --workspace --exclude interceptor-ebpf --all-targets --features interceptor/testing -- -D warnings"
        ));
    }

    #[test]
    fn privileged_tests_run_one_at_a_time() {
        let cargo = privileged_tests(Path::new("/t/interceptor"), &[], &strings(&["--nocapture"]));
        let line = cmd::display(&cargo);
        assert!(line.ends_with(
            "test --package interceptor-tests --package interceptor-bench --package interceptor \
             --features interceptor/testing \
             --no-fail-fast -- --test-threads=1 --nocapture"
        ));

        let cargo = privileged_tests(Path::new("/t/interceptor"), &[], &strings(&["--test-threads=2"]));
        assert!(!cmd::display(&cargo).contains("--test-threads=1"));
    }

    fn skip(test: &str, reason: &str) -> testlog::Skip {
        testlog::Skip { test: test.into(), reason: reason.into() }
    }

    fn step(name: &'static str, outcome: Outcome) -> Step {
        Step { name, outcome, duration: Duration::from_secs(1), free_after: None }
    }

    #[test]
    fn skipped_tests_are_never_shown_as_passed() {
        let root = "privileged test cannot run: not running as root";
        let all_skipped = testlog::Tally {
            passed: 2,
            skipped: vec![skip("redirect_tcp", root), skip("dns_loop", root)],
            error: None,
        };
        assert!(matches!(tests_outcome(all_skipped), Outcome::AllSkipped { ref skipped } if skipped.len() == 2));
        let some_skipped = testlog::Tally { passed: 3, skipped: vec![skip("redirect_tcp", root)], error: None };
        assert!(matches!(tests_outcome(some_skipped), Outcome::Passed { ref skipped } if skipped.len() == 1));
        let none = testlog::Tally { passed: 3, skipped: vec![], error: None };
        assert!(matches!(tests_outcome(none), Outcome::Passed { ref skipped } if skipped.is_empty()));
        let failed = testlog::Tally { passed: 0, skipped: vec![skip("a", root)], error: Some(anyhow::anyhow!("boom")) };
        assert!(matches!(tests_outcome(failed), Outcome::Failed { .. }));

        let steps = Steps(vec![
            step("setup", Outcome::Passed { skipped: vec![] }),
            step("unit and in-process tests", Outcome::Passed { skipped: vec![skip("lint", "not installed: x")] }),
            step(
                "privileged tests",
                Outcome::AllSkipped { skipped: vec![skip("redirect_tcp", root), skip("dns_loop", root)] },
            ),
            step("fuzz", Outcome::NotRun("needs the build")),
        ]);
        let summary = steps.summary();
        let lines: Vec<&str> = summary.lines().collect();
        assert!(
            lines.iter().any(|l| l.contains("passed")
                && l.contains("unit and in-process tests")
                && l.ends_with("1 test(s) skipped")),
            "{summary}"
        );
        let privileged = lines.iter().find(|l| l.contains("privileged tests")).unwrap();
        assert!(privileged.trim_start().starts_with("SKIPPED") && !privileged.contains("passed"), "{summary}");
        assert!(summary.contains(&format!("skipped (2): {root}\n             redirect_tcp, dns_loop\n")), "{summary}");
        assert!(summary.contains("skipped (1): not installed: x\n             lint\n"), "{summary}");
        assert_eq!(steps.skipped_tests(), 3);
        // A skipped test is not a failure when CI is unset (with CI set it panics instead);
        // a step that could not run is.
        assert_eq!(steps.failures(), 1);
    }
}
