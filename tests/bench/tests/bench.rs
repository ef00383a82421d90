//! `cargo xtask bench` runs every row end to end (short runs here) and leaves
//! nothing behind, also when it is interrupted.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use interceptor::testing::{cgroup2_root, require_privileges};

/// Short runs: this checks that the benchmark works, not the figures.
const QUICK: &[&str] = &[
    "--seconds",
    "1",
    "--repeat",
    "1",
    "--idle-connections",
    "100",
    "--connect-iterations",
    "500",
    "--stream-requests",
    "3",
];

/// What a benchmark run with pid `pid` may have left: its namespace, cgroup
/// tree and scratch directories are all named after the pid.
fn leftovers(pid: u32) -> Vec<String> {
    let tag = format!("{}-", pid % 10_000);
    let mut left = Vec::new();
    let netns = Command::new("ip").args(["netns", "list"]).output().expect("ip netns list");
    left.extend(
        String::from_utf8_lossy(&netns.stdout)
            .lines()
            .filter(|l| l.starts_with(&format!("ict-{tag}")) && l.contains("bench"))
            .map(str::to_owned),
    );
    let cgroups = std::fs::read_dir(cgroup2_root().expect("cgroup2")).expect("read cgroup root");
    left.extend(
        cgroups
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("interceptor-test-bench-") && n.contains(&format!("-{tag}"))),
    );
    let tmp = std::fs::read_dir(std::env::temp_dir()).expect("read temp dir");
    left.extend(tmp.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| {
        n == &format!("interceptor-bench-bin-{pid}")
            || n.starts_with(&format!("interceptor-scratch-bench-{pid}-"))
            || n.starts_with(&format!("interceptor-scratch-hosts-{pid}-"))
            || n.starts_with(&format!("interceptor-test-{pid}-"))
    }));
    left
}

#[test]
fn the_benchmark_measures_every_row_and_cleans_up() {
    if !require_privileges("the_benchmark_measures_every_row_and_cleans_up") {
        return;
    }
    let child = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(QUICK)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the benchmark");
    let pid = child.id();
    let out = child.wait_with_output().expect("benchmark output");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    for row in [
        "direct ",
        "interceptor eBPF, guardrails off",
        "interceptor eBPF, allowed",
        "interceptor eBPF, blocked",
        "interceptor eBPF, passthrough",
        "interceptor iptables, allowed",
        "nginx proxy, allowed",
        "mitmproxy, allowed",
        "mitmproxy, blocked",
        "interceptor monitor: SSE paced 20x5ms",
        "interceptor enforce: SSE unpaced",
        "eBPF programs attached: p50",
        "with 100 idle keep-alive TLS connections",
        "== targets ==",
    ] {
        assert!(text.contains(row), "missing {row:?} in:\n{text}");
    }
    // The blocked rows really were blocked by the proxy under test (the run
    // fails otherwise), and the proxy's CPU was measured.
    let allowed = text.lines().find(|l| l.trim_start().starts_with("interceptor eBPF, allowed")).expect("allowed row");
    assert!(allowed.contains("proxy CPU"), "{allowed}");
    assert_eq!(leftovers(pid), Vec::<String>::new(), "left behind by the run");
}

#[test]
fn an_interrupted_benchmark_cleans_up() {
    if !require_privileges("an_interrupted_benchmark_cleans_up") {
        return;
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(QUICK)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the benchmark");
    let pid = child.id();
    // Interrupt once the interceptor is measured: namespace, cgroups, nginx
    // and a wrk load have all existed by then. Keep draining the output so
    // the benchmark never writes to a closed pipe.
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = String::new();
    while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("interceptor eBPF, guardrails off") {
            break;
        }
    }
    assert!(seen.contains("interceptor eBPF, guardrails off"), "the benchmark did not get that far:\n{seen}");
    assert!(!leftovers(pid).is_empty(), "the running benchmark should own a namespace and cgroups");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGINT).expect("SIGINT");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "the benchmark did not exit after SIGINT");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        status.code() == Some(130),
        "the benchmark ended with {status} after SIGINT, not exit code 130; it printed:\n{seen}"
    );
    assert_eq!(leftovers(pid), Vec::<String>::new(), "left behind after SIGINT");
}
