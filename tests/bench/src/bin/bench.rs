//! `cargo xtask bench`: the interceptor measured against a direct
//! connection, an nginx reverse proxy and mitmproxy, in a throwaway network
//! namespace (needs root). See the library (`tests/bench/src/lib.rs`) for
//! what runs.
//!
//! ```text
//! bench [--seconds N] [--connections N] [--idle-connections N]
//!       [--connect-iterations N] [--stream-requests N] [--repeat N] [--perf FILE]
//!       [--only SCENARIO[,SCENARIO...]]
//!                            scenarios: guardrails-off, allowed, connect, idle,
//!                            two-workers, enforce, iptables, nginx, mitmproxy
//!                            (the direct rows always run)
//! bench --inprocess          the loopback benchmark in one process
//! bench probe <kind> <json>  (internal) a measurement run in the client cgroup
//! ```

use interceptor_bench as bench;

use anyhow::{Context, Result, bail};

fn parse(args: &[String]) -> Result<Option<bench::Options>> {
    let mut opts = bench::Options {
        seconds: 6,
        connections: 16,
        idle_connections: 10_000,
        connect_iterations: 20_000,
        stream_requests: 40,
        repeat: 2,
        perf: None,
        only: Vec::new(),
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--inprocess" => return Ok(None),
            "--seconds" => opts.seconds = value()?.parse()?,
            "--connections" => opts.connections = value()?.parse()?,
            "--idle-connections" => opts.idle_connections = value()?.parse()?,
            "--connect-iterations" => opts.connect_iterations = value()?.parse()?,
            "--stream-requests" => opts.stream_requests = value()?.parse()?,
            "--repeat" => opts.repeat = value()?.parse()?,
            "--perf" => opts.perf = Some(value()?.into()),
            "--only" => opts.only.extend(bench::Scenario::parse_list(value()?)?),
            other => bail!("unknown argument {other}"),
        }
    }
    if opts.seconds == 0 || opts.connections == 0 || opts.stream_requests == 0 {
        bail!("--seconds, --connections and --stream-requests must be positive");
    }
    Ok(Some(opts))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [probe, kind, params] = args.as_slice()
        && probe == "probe"
    {
        return bench::probe::main(kind, params);
    }
    match parse(&args)? {
        None => tokio::runtime::Runtime::new()?.block_on(bench::inprocess::run()),
        Some(opts) => {
            let copy = private_binary()?;
            bench::cleanup::on_signals()?;
            bench::cleanup::dir(&copy);
            let result = bench::cleanup::unless_interrupted(bench::run(&opts));
            let _ = std::fs::remove_dir_all(&copy);
            result
        }
    }
}

/// Copies the interceptor binary to a directory of ours and points the
/// harness at the copy, so a rebuild during the run neither changes what is
/// measured nor leaves `perf` with a deleted binary to symbolize. Runs before
/// any other thread exists (it sets an environment variable).
fn private_binary() -> Result<std::path::PathBuf> {
    let source = interceptor::testing::interceptor_bin();
    let dir = std::env::temp_dir().join(format!("interceptor-bench-bin-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let copy = dir.join("interceptor");
    std::fs::copy(&source, &copy).with_context(|| format!("copy {} (build it first)", source.display()))?;
    println!("interceptor: {} (run from a private copy)", source.display());
    // SAFETY: no other thread exists yet, so nothing reads the environment concurrently.
    unsafe { std::env::set_var("INTERCEPTOR_BIN", &copy) };
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn defaults_and_flags() {
        let opts = parse(&[]).expect("parse").expect("namespace bench");
        assert_eq!((opts.seconds, opts.connections, opts.idle_connections), (6, 16, 10_000));
        let opts = parse(&args(&["--seconds", "2", "--perf", "/tmp/p.data"])).expect("parse").expect("bench");
        assert_eq!(opts.seconds, 2);
        assert_eq!(opts.perf.as_deref(), Some(std::path::Path::new("/tmp/p.data")));
        assert!(parse(&args(&["--inprocess"])).expect("parse").is_none());
        assert!(parse(&args(&["--seconds"])).is_err());
        assert!(parse(&args(&["--bogus"])).is_err());
        assert!(opts.only.is_empty() && opts.runs(bench::Scenario::Mitmproxy));
    }

    #[test]
    fn only_selects_scenarios() {
        let opts = parse(&args(&["--only", "two-workers,enforce", "--only", "idle"])).expect("parse").expect("bench");
        use bench::Scenario::*;
        assert_eq!(opts.only, [TwoWorkers, Enforce, Idle]);
        assert!(opts.runs(TwoWorkers) && opts.runs(Idle) && !opts.runs(Allowed) && !opts.runs(Mitmproxy));
        let error = parse(&args(&["--only", "allowed,fast"])).expect_err("unknown scenario");
        assert!(error.to_string().contains("unknown scenario \"fast\""), "{error}");
    }
}
