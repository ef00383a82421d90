//! Developer and CI orchestration for the interceptor workspace, run as `cargo xtask <task>`.
//!
//! It installs prerequisites, builds and runs the interceptor locally, and runs the test
//! suite including the privileged tests. It does not build the eBPF object itself: the
//! interceptor's build script does that.

mod cmd;
mod fuzz;
mod interceptor;
mod setup;
mod suite;
mod testlog;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::interceptor::{Profile, RunArgs};

/// Package holding the end-to-end benchmark and the demo.
const BENCH_PACKAGE: &str = "interceptor-bench";

#[derive(Parser)]
#[command(name = "xtask", bin_name = "cargo xtask", about = "Build, run and test the interceptor")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install missing prerequisites (apt packages, nightly rust-src, bpf-linker).
    Setup,
    /// Set up, then build the interceptor binary.
    Build {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Set up, build, then replace this process with `interceptor run`.
    Run(RunArgs),
    /// Set up, build the release interceptor, then measure it against a direct connection,
    /// an nginx reverse proxy and mitmproxy in a throwaway network namespace (needs root).
    Bench {
        /// Run the in-process loopback benchmark instead (no root needed).
        #[arg(long)]
        inprocess: bool,
        /// Extra arguments for the benchmark, e.g. `-- --seconds 3 --perf /tmp/perf.data`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Set up, then run the micro-benchmarks (guardrail engine, provider parsers, stream
    /// framing, leaf certificates, iptables attribution): `cargo bench -p interceptor --bench '*'`.
    Microbench {
        /// Extra `cargo bench` arguments, e.g. a benchmark name filter after `--`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Set up, then run the fuzz targets (cargo-fuzz, nightly) one after another.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        time: u64,
        /// Targets to run (default: all).
        targets: Vec<String>,
    },
    /// Set up, then show interception and guardrails end to end in a throwaway
    /// network namespace (no internet or API key needed; needs root).
    Demo,
    /// Set up, then run the unit, in-process and privileged tests.
    Test {
        /// Extra `cargo test` arguments for every step; arguments after a second `--` go
        /// to the test harness, e.g. `cargo xtask test -- --no-fail-fast -- --nocapture`.
        #[arg(last = true)]
        args: Vec<String>,
    },
}

/// Prints a failure as one `error:` line with its causes, without a backtrace, so the
/// suite's summary stays the last thing a log shows.
fn main() -> std::process::ExitCode {
    match run(Cli::parse().task) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(task: Task) -> Result<()> {
    match task {
        Task::Setup => setup::setup(),
        Task::Build { release } => {
            setup::setup()?;
            let profile = if release { Profile::Release } else { Profile::Dev };
            let bin = interceptor::build(profile)?;
            println!("built {}", bin.display());
            Ok(())
        }
        Task::Run(args) => interceptor::run(args),
        Task::Test { args } => suite::test(&args),
        Task::Demo => {
            setup::setup()?;
            let bin = interceptor::build(Profile::Dev)?;
            cmd::run(
                cmd::cargo()
                    .args(["run", "--quiet", "--package", BENCH_PACKAGE, "--bin", "demo"])
                    .env("INTERCEPTOR_BIN", bin),
            )
        }
        Task::Microbench { args } => {
            setup::setup()?;
            cmd::run(
                cmd::cargo()
                    .args(["bench", "--package", "interceptor", "--features", "testing", "--bench", "*"])
                    .args(args),
            )
        }
        Task::Fuzz { time, targets } => {
            setup::setup()?;
            fuzz::run(&targets, std::time::Duration::from_secs(time))
        }
        Task::Bench { inprocess, args } => {
            setup::setup()?;
            let bin = interceptor::build(Profile::Release)?;
            let mut bench = cmd::cargo();
            bench.args(["run", "--quiet", "--release", "--package", BENCH_PACKAGE, "--bin", "bench", "--"]);
            if inprocess {
                bench.arg("--inprocess");
            }
            cmd::run(bench.args(&args).env("INTERCEPTOR_BIN", bin))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Task {
        match Cli::try_parse_from(std::iter::once("xtask").chain(args.iter().copied())) {
            Ok(cli) => cli.task,
            Err(err) => panic!("{err}"),
        }
    }

    #[test]
    fn test_keeps_a_second_separator_for_the_harness() {
        let Task::Test { args } = parse(&["test", "--", "--no-fail-fast", "--", "--nocapture"]) else {
            panic!("not the test task");
        };
        assert_eq!(args, ["--no-fail-fast", "--", "--nocapture"]);
    }

    #[test]
    fn bench_passes_arguments_through() {
        let Task::Bench { inprocess, args } = parse(&["bench", "--", "--seconds", "2"]) else {
            panic!("not the bench task");
        };
        assert!(!inprocess);
        assert_eq!(args, ["--seconds", "2"]);
        assert!(matches!(parse(&["bench", "--inprocess"]), Task::Bench { inprocess: true, .. }));
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
