//! Privileged tests of the fail-safe redirect: what happens to connections
//! to a provider when the proxy is killed, hangs, or is replaced by a new
//! instance. Each test builds its own namespace and cgroups.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use interceptor::testing::{Cgroup, Interceptor, Netns, require_privileges, spawn_in, tool};
use interceptor_tests::{ClientResult, PROVIDER_V4, PY_TCP, World, attached_programs, config, iptables_rules, python};
use nix::sys::signal::Signal;

const READY: Duration = Duration::from_secs(20);
const STOP: Duration = Duration::from_secs(20);

fn start(world: &World, extra: &str, args: &[&str]) -> Result<Interceptor> {
    let mut proxy = Interceptor::start(&world.netns, Some(&world.proxy_cg), &config(&[PROVIDER_V4], extra), args)?;
    proxy.wait_ready(&world.netns, READY)?;
    Ok(proxy)
}

fn ebpf_args(world: &World) -> Vec<String> {
    vec!["--redirect".into(), "ebpf".into(), "--cgroup".into(), world.client_cg.path().display().to_string()]
}

fn start_ebpf(world: &World, fail_mode: &str) -> Result<Interceptor> {
    let extra = format!("[redirect]\nfail_mode = \"{fail_mode}\"\nheartbeat_timeout = \"500ms\"\n");
    let args = ebpf_args(world);
    start(world, &extra, &args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn client(world: &World) -> Result<ClientResult> {
    python(&world.netns, &world.client_cg, PROVIDER_V4, 443, "4")
}

/// Retries `client` until it reaches the provider directly, at most `within`.
fn direct_within(world: &World, within: Duration) -> Result<Duration> {
    let started = Instant::now();
    loop {
        match client(world) {
            Ok(c) if !c.intercepted() => return Ok(started.elapsed()),
            Ok(c) => {
                if started.elapsed() > within {
                    bail!("still intercepted after {within:?}: {c:?}");
                }
            }
            Err(error) => {
                if started.elapsed() > within {
                    bail!("no direct connection within {within:?}: {error:#}");
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_event(proxy: &Interceptor, event: &str, within: Duration) -> Result<serde_json::Value> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(e) = proxy.events().into_iter().find(|e| e["event"] == event) {
            return Ok(e);
        }
        if Instant::now() > deadline {
            bail!("no {event} event within {within:?}; log:\n{}", proxy.log_text());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The bpffs directory holding the shared maps of the redirect on `cgroup`.
/// The pin root is gone unless another redirect on this machine still uses it.
fn assert_no_empty_pin_root() {
    let root = std::path::Path::new(interceptor::redirect::liveness::PIN_ROOT);
    if let Ok(mut entries) = std::fs::read_dir(root) {
        assert!(entries.next().is_some(), "{} left behind, empty", root.display());
    }
}

fn pin_dir(cgroup: &Cgroup) -> Result<std::path::PathBuf> {
    interceptor::redirect::liveness::pin_dir(cgroup.path()).context("stat cgroup")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_kill_sends_traffic_direct_and_restart_resumes_redirect() -> Result<()> {
    if !require_privileges("fail_open_kill_sends_traffic_direct_and_restart_resumes_redirect") {
        return Ok(());
    }
    let world = World::new("fs_open")?;
    let mut proxy = start_ebpf(&world, "open")?;
    assert!(client(&world)?.intercepted(), "not intercepted while the proxy runs");

    proxy.kill()?;
    let took = direct_within(&world, Duration::from_secs(2))?;
    eprintln!("direct {took:?} after SIGKILL");
    assert!(attached_programs(world.client_cg.path())?.trim().is_empty(), "fail open leaves no program attached");

    // Past the heartbeat timeout, the dead instance counts as crashed (a
    // faster restart counts it as live until it is pruned a beat later).
    std::thread::sleep(Duration::from_millis(700));
    let proxy = start_ebpf(&world, "open")?;
    let c = client(&world)?;
    assert!(c.intercepted(), "redirect did not resume after restart: {c:?}");
    let recovered = wait_event(&proxy, "redirect_recovered", Duration::from_secs(2))?;
    assert_eq!(recovered["previous_instances"], 1, "{recovered}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_closed_kill_refuses_connections_until_restart_and_stop_removes_everything() -> Result<()> {
    if !require_privileges("fail_closed_kill_refuses_connections_until_restart_and_stop_removes_everything") {
        return Ok(());
    }
    let world = World::new("fs_closed")?;
    let mut proxy = start_ebpf(&world, "closed")?;
    assert!(client(&world)?.intercepted(), "not intercepted while the proxy runs");

    proxy.kill()?;
    let before = world.provider.peers().len();
    // Past the heartbeat timeout the programs refuse; before it the connect
    // goes to the dead port. Either way nothing reaches the provider.
    std::thread::sleep(Duration::from_millis(800));
    for _ in 0..3 {
        let err = client(&world).expect_err("a target connection must be refused while the proxy is dead");
        let text = format!("{err:#}");
        assert!(text.contains("Operation not permitted") || text.contains("PermissionError"), "{text}");
    }
    assert_eq!(world.provider.peers().len(), before, "a connection bypassed the dead proxy");
    assert!(!attached_programs(world.client_cg.path())?.trim().is_empty(), "fail closed must keep the programs");

    let mut proxy = start_ebpf(&world, "closed")?;
    let c = client(&world)?;
    assert!(c.intercepted(), "redirect did not resume after restart: {c:?}");
    let links = std::fs::read_dir(pin_dir(&world.client_cg)?.join("links"))?.count();
    assert_eq!(links, 1, "the dead instance's pinned links must be gone, only ours remain");

    assert!(proxy.terminate(STOP)?.success(), "log:\n{}", proxy.log_text());
    assert!(attached_programs(world.client_cg.path())?.trim().is_empty(), "programs left after an orderly stop");
    assert!(!pin_dir(&world.client_cg)?.exists(), "pinned maps left after an orderly stop");
    assert_no_empty_pin_root();
    assert!(!client(&world)?.intercepted(), "still redirected after an orderly stop");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_removes_what_a_fail_closed_crash_left() -> Result<()> {
    if !require_privileges("cleanup_removes_what_a_fail_closed_crash_left") {
        return Ok(());
    }
    let world = World::new("fs_cleanup")?;
    let mut proxy = start_ebpf(&world, "closed")?;
    proxy.kill()?;
    assert!(pin_dir(&world.client_cg)?.exists());
    let out = Command::new(interceptor::testing::interceptor_bin()).arg("cleanup").output()?;
    assert!(out.status.success(), "cleanup failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(!pin_dir(&world.client_cg)?.exists(), "pins left after cleanup");
    assert_no_empty_pin_root();
    assert!(attached_programs(world.client_cg.path())?.trim().is_empty(), "programs left after cleanup");
    assert!(!client(&world)?.intercepted());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_proxy_fails_open_after_the_heartbeat_timeout_and_resumes() -> Result<()> {
    if !require_privileges("hung_proxy_fails_open_after_the_heartbeat_timeout_and_resumes") {
        return Ok(());
    }
    let world = World::new("fs_hang")?;
    let proxy = start_ebpf(&world, "open")?;
    assert!(client(&world)?.intercepted());

    proxy.signal(Signal::SIGSTOP)?;
    // Connections made before the timeout wait in the stopped proxy's
    // backlog (served when it resumes); after it, they go direct.
    std::thread::sleep(Duration::from_millis(700));
    let result = direct_within(&world, Duration::from_secs(2));
    proxy.signal(Signal::SIGCONT)?;
    let took = result?;
    eprintln!("direct {took:?} after SIGSTOP");
    let resumed = wait_event(&proxy, "redirect_resumed", Duration::from_secs(3))?;
    assert!(resumed["went_direct"].as_u64() >= Some(1), "{resumed}");
    assert!(resumed["down_ms"].as_u64() >= Some(500), "{resumed}");
    let c = client(&world)?;
    assert!(c.intercepted(), "redirect did not resume after SIGCONT: {c:?}");
    Ok(())
}

fn spawn_slow_client(netns: &Netns, cgroup: &Cgroup, delay: Duration) -> Result<std::process::Child> {
    let mut cmd = Command::new(tool("python3"));
    cmd.args(["-c", PY_TCP, PROVIDER_V4, "443", "4", &format!("{}", delay.as_secs_f64())])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = spawn_in(&mut cmd, Some(netns), Some(cgroup))?;
    // Wait for "connected", so the connection exists before what follows.
    let stdout = child.stdout.as_mut().context("stdout")?;
    let mut first = [0u8; 10];
    std::io::Read::read_exact(stdout, &mut first).context("slow client did not connect")?;
    assert_eq!(&first, b"connected\n");
    Ok(child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_instance_takes_over_without_refusing_and_the_old_one_drains() -> Result<()> {
    if !require_privileges("a_new_instance_takes_over_without_refusing_and_the_old_one_drains") {
        return Ok(());
    }
    let world = World::new("fs_handover")?;
    let mut old = start_ebpf(&world, "open")?;
    // A connection in flight on the old instance, finishing in 3 s.
    let slow = spawn_slow_client(&world.netns, &world.client_cg, Duration::from_secs(3))?;

    let extra = "[redirect]\nfail_mode = \"open\"\nheartbeat_timeout = \"500ms\"\n";
    let args = ebpf_args(&world);
    let new = Interceptor::start(
        &world.netns,
        Some(&world.proxy_cg),
        &config(&[PROVIDER_V4], extra),
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    )?;
    wait_event(&new, "redirect_handover", READY)?;
    wait_event(&new, "ready", READY)?;

    old.signal(Signal::SIGTERM)?;
    // While the old instance drains and exits, every new connection is
    // still intercepted (by either instance), none refused.
    let deadline = Instant::now() + Duration::from_secs(4);
    let mut n = 0;
    while Instant::now() < deadline {
        let c = client(&world).with_context(|| format!("connection {n} during the handover failed"))?;
        assert!(c.intercepted(), "connection {n} during the handover went direct: {c:?}");
        n += 1;
    }
    assert!(n >= 5, "too few connections tried during the handover: {n}");
    let status = old.terminate(STOP)?;
    assert!(status.success(), "old instance exit {status}; log:\n{}", old.log_text());

    let out = slow.wait_with_output()?;
    assert!(out.status.success(), "in-flight connection cut: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(text.trim()).context("slow client output")?;
    assert!(v["reply"].as_str().is_some_and(|r| r.contains("line=slow")), "{v}");
    assert!(old.log_text().contains("left to the other running instance"), "old instance removed the redirect");

    // The new instance alone keeps redirecting.
    let c = client(&world)?;
    assert!(c.intercepted(), "not intercepted after the old instance left: {c:?}");
    assert!(!attached_programs(world.client_cg.path())?.trim().is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iptables_fail_open_removes_rules_when_the_proxy_is_killed() -> Result<()> {
    if !require_privileges("iptables_fail_open_removes_rules_when_the_proxy_is_killed") {
        return Ok(());
    }
    let world = World::new("fs_ipt")?;
    let mut proxy = start(
        &world,
        "[redirect]\nfail_mode = \"open\"\nheartbeat_timeout = \"500ms\"\n",
        &["--redirect", "iptables"],
    )?;
    assert!(client(&world)?.intercepted(), "not intercepted in iptables mode");
    proxy.kill()?;
    let deadline = Instant::now() + Duration::from_secs(2);
    while !iptables_rules(&world)?.is_empty() {
        assert!(Instant::now() < deadline, "rules still present 2 s after SIGKILL:\n{}", iptables_rules(&world)?);
        std::thread::sleep(Duration::from_millis(50));
    }
    world.flush_conntrack()?;
    direct_within(&world, Duration::from_secs(2))?;

    // Fail closed (the iptables default): rules stay, traffic is refused.
    let mut proxy = start(&world, "[redirect]\nfail_mode = \"closed\"\n", &["--redirect", "iptables"])?;
    assert!(client(&world)?.intercepted());
    proxy.kill()?;
    std::thread::sleep(Duration::from_millis(500));
    assert!(!iptables_rules(&world)?.is_empty(), "fail closed must keep the rules");
    world.flush_conntrack()?;
    assert!(client(&world).is_err(), "traffic must not bypass a dead proxy in fail-closed mode");
    Ok(())
}
