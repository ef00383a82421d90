//! Privileged end-to-end tests of transparent redirection: real clients in a
//! test cgroup and network namespace reach a fake provider through the
//! interceptor, with no proxy settings. Each test builds its own namespace
//! and cgroups and removes them; run one at a time (`--test-threads=1`).

use std::time::Duration;

use anyhow::Result;
use interceptor::testing::{Interceptor, require_privileges};
use interceptor_tests::{
    LATER_V4, OTHER_V4, PROVIDER_V4, PROVIDER_V6, World, attached_programs, config, curl, iptables_rules, python,
    python_udp,
};
use serde_json::Value;

const READY: Duration = Duration::from_secs(20);
const STOP: Duration = Duration::from_secs(15);
const LOG_WAIT: Duration = Duration::from_secs(5);

fn targets() -> Vec<&'static str> {
    vec![PROVIDER_V4, PROVIDER_V6, LATER_V4]
}

fn start_ebpf(
    world: &World,
    attach: &std::path::Path,
    in_cgroup: &interceptor::testing::Cgroup,
    cidrs: &[&str],
) -> Result<Interceptor> {
    let attach = attach.to_str().expect("utf-8 path");
    let mut proxy = Interceptor::start(
        &world.netns,
        Some(in_cgroup),
        &config(cidrs, ""),
        &["--redirect", "ebpf", "--cgroup", attach],
    )?;
    proxy.wait_ready(&world.netns, READY)?;
    Ok(proxy)
}

/// The connection record for a client's connection, found by its source port.
fn record_for(proxy: &Interceptor, local_port: u16) -> Result<Value> {
    proxy.wait_connection(LOG_WAIT, |e| e["client"].as_str().is_some_and(|c| c.ends_with(&format!(":{local_port}"))))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_redirects_curl_and_python_with_original_destination_and_process() -> Result<()> {
    if !require_privileges("ebpf_redirects_curl_and_python_with_original_destination_and_process") {
        return Ok(());
    }
    let world = World::new("ebpf_basic")?;
    // The interceptor runs outside the attached cgroup, as an operator covering
    // only some workloads with --cgroup would run it.
    let proxy = start_ebpf(&world, world.client_cg.path(), &world.proxy_cg, &[PROVIDER_V4])?;
    let client_cgroup_id = world.client_cg.id()?;

    let c = curl(&world.netns, &world.client_cg, PROVIDER_V4, 443)?;
    assert!(c.intercepted(), "curl was not intercepted: {c:?}");
    let rec = record_for(&proxy, c.local.port())?;
    assert_eq!(rec["outcome"], "relayed", "{rec}");
    assert_eq!(rec["orig_dst"], "198.18.0.10:443", "{rec}");
    assert_eq!(rec["pid"], c.pid, "{rec}");
    assert_eq!(rec["comm"], "curl", "{rec}");
    assert_eq!(rec["cgroup_id"], client_cgroup_id, "{rec}");
    // The provider saw the proxy's socket, and the client got its answer.
    assert_eq!(c.reply.peer.port(), world.provider.peers().last().expect("provider saw a peer").port());

    let p = python(&world.netns, &world.client_cg, PROVIDER_V4, 443, "4")?;
    assert!(p.intercepted(), "python was not intercepted: {p:?}");
    let rec = record_for(&proxy, p.local.port())?;
    assert_eq!(rec["orig_dst"], "198.18.0.10:443", "{rec}");
    assert_eq!(rec["pid"], p.pid, "{rec}");
    assert_eq!(rec["comm"], "python3", "{rec}");
    assert_eq!(p.reply.line, "python");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_leaves_other_processes_destinations_and_its_own_upstream_alone() -> Result<()> {
    if !require_privileges("ebpf_leaves_other_processes_destinations_and_its_own_upstream_alone") {
        return Ok(());
    }
    let world = World::new("ebpf_scope")?;
    // Attached at the test's root cgroup, which also holds the interceptor:
    // its own upstream sockets are then subject to the programs and must be
    // skipped by their mark, or every connection would loop.
    let proxy = start_ebpf(&world, world.root.path(), &world.proxy_cg, &[PROVIDER_V4])?;

    let c = python(&world.netns, &world.client_cg, PROVIDER_V4, 443, "4")?;
    assert!(c.intercepted(), "client in the attached cgroup must be intercepted: {c:?}");
    assert_eq!(record_for(&proxy, c.local.port())?["outcome"], "relayed");
    // The relay succeeding already shows the upstream socket was not sent
    // back to the proxy; the kernel counter shows it was the mark that did it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = proxy.status(&world.netns)?;
        let skipped = status["counters"]
            .as_array()
            .and_then(|c| c.iter().find(|kv| kv[0] == "skipped_own_mark"))
            .and_then(|kv| kv[1].as_u64())
            .unwrap_or(0);
        if skipped >= 1 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "own-mark skip never counted: {status}");
        std::thread::sleep(Duration::from_millis(250));
    }

    // Not a target: untouched.
    let o = python(&world.netns, &world.client_cg, OTHER_V4, 443, "4")?;
    assert!(!o.intercepted(), "non-target destination was redirected: {o:?}");
    // Target port but different port number: untouched.
    let u = python_udp(&world.netns, &world.client_cg, PROVIDER_V4, 8443)?;
    assert!(u.starts_with("reply"), "UDP to another port must work: {u}");

    // A process outside the attached cgroup: untouched.
    let outside = interceptor::testing::Cgroup::new("ebpf_scope_outside")?;
    let x = python(&world.netns, &outside, PROVIDER_V4, 443, "4")?;
    assert!(!x.intercepted(), "process outside the cgroup was redirected: {x:?}");
    let n_before = proxy.connections().len();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(proxy.connections().len(), n_before, "the proxy saw a connection it should not have");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_redirects_dual_stack_and_ipv6_and_refuses_quic() -> Result<()> {
    if !require_privileges("ebpf_redirects_dual_stack_and_ipv6_and_refuses_quic") {
        return Ok(());
    }
    let world = World::new("ebpf_v6")?;
    let proxy = start_ebpf(&world, world.client_cg.path(), &world.proxy_cg, &targets())?;

    // AF_INET6 socket to ::ffff:198.18.0.10 only passes through connect6.
    let m = python(&world.netns, &world.client_cg, "::ffff:198.18.0.10", 443, "6")?;
    assert!(m.intercepted(), "v4-mapped connect was not intercepted: {m:?}");
    assert_eq!(record_for(&proxy, m.local.port())?["orig_dst"], "198.18.0.10:443");

    let n = python(&world.netns, &world.client_cg, PROVIDER_V6, 443, "6")?;
    assert!(n.intercepted(), "native IPv6 connect was not intercepted: {n:?}");
    let rec = record_for(&proxy, n.local.port())?;
    assert_eq!(rec["orig_dst"], "[2001:db8::10]:443", "{rec}");
    assert_eq!(rec["comm"], "python3");

    let c6 = curl(&world.netns, &world.client_cg, PROVIDER_V6, 443)?;
    assert!(c6.intercepted(), "curl over IPv6 was not intercepted: {c6:?}");

    // QUIC to a target is refused with EPERM, so clients fall back to TCP.
    let q = python_udp(&world.netns, &world.client_cg, PROVIDER_V4, 443)?;
    assert_eq!(q, "refused 1", "UDP 443 to an IPv4 target");
    let q6 = python_udp(&world.netns, &world.client_cg, PROVIDER_V6, 443)?;
    assert_eq!(q6, "refused 1", "UDP 443 to an IPv6 target");
    assert!(world.udp_provider.peers().is_empty() && world.udp_provider_v6.peers().is_empty());
    // UDP elsewhere works.
    let ok = python_udp(&world.netns, &world.client_cg, OTHER_V4, 443)?;
    assert!(ok.starts_with("reply"), "UDP 443 to a non-target must work: {ok}");
    let ok = python_udp(&world.netns, &world.client_cg, PROVIDER_V4, 8443)?;
    assert!(ok.starts_with("reply"), "UDP to a target on another port must work: {ok}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_redirects_a_client_in_another_network_namespace_to_a_node_address() -> Result<()> {
    if !require_privileges("ebpf_redirects_a_client_in_another_network_namespace_to_a_node_address") {
        return Ok(());
    }
    // The test namespace plays a node; a second namespace joined by a veth
    // pair plays a pod. The pod's connection is rewritten to the node's veth
    // address, so the proxy sees the pod's address as the peer.
    let world = World::new("ebpf_pod")?;
    let pod = interceptor::testing::Netns::new("ebpf_pod_p")?;
    let _veth = interceptor::testing::veth_pair(Some(&world.netns), &pod, "198.18.1.1/24", "198.18.1.2/24")?;
    pod.run(&["route", "add", "default", "via", "198.18.1.1"])?;
    let direct = python(&pod, &world.client_cg, PROVIDER_V4, 443, "4")?;
    assert!(!direct.intercepted(), "baseline: the pod reaches the provider directly");

    let extra = "[proxy]\naddress_v4 = \"198.18.1.1\"\naddress_v6 = \"\"\n";
    let attach = world.client_cg.path().to_str().expect("utf-8");
    let mut proxy = Interceptor::start(
        &world.netns,
        Some(&world.proxy_cg),
        &config(&[PROVIDER_V4], extra),
        &["--redirect", "ebpf", "--cgroup", attach],
    )?;
    proxy.wait_ready(&world.netns, READY)?;
    let p = python(&pod, &world.client_cg, PROVIDER_V4, 443, "4")?;
    assert!(p.intercepted(), "pod connection not intercepted: {p:?}");
    assert_eq!(p.local.ip().to_string(), "198.18.1.2");
    let rec = record_for(&proxy, p.local.port())?;
    assert_eq!(rec["client"], format!("198.18.1.2:{}", p.local.port()), "{rec}");
    assert_eq!(rec["orig_dst"], "198.18.0.10:443", "{rec}");
    assert_eq!(rec["pid"], p.pid, "{rec}");
    assert_eq!(rec["comm"], "python3", "{rec}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_adds_targets_at_runtime_without_restart() -> Result<()> {
    if !require_privileges("ebpf_adds_targets_at_runtime_without_restart") {
        return Ok(());
    }
    let world = World::new("ebpf_live")?;
    let proxy = start_ebpf(&world, world.client_cg.path(), &world.proxy_cg, &[PROVIDER_V4])?;
    let before = python(&world.netns, &world.client_cg, LATER_V4, 443, "4")?;
    assert!(!before.intercepted(), "not yet a target: {before:?}");

    std::fs::write(proxy.config_path(), config(&[PROVIDER_V4, LATER_V4], ""))?;
    proxy.signal(nix::sys::signal::Signal::SIGHUP)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let after = python(&world.netns, &world.client_cg, LATER_V4, 443, "4")?;
        if after.intercepted() {
            assert_eq!(record_for(&proxy, after.local.port())?["orig_dst"], "198.18.0.20:443");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "new target never redirected; log:\n{}", proxy.log_text());
        std::thread::sleep(Duration::from_millis(200));
    }
    // And removing it stops the redirect again.
    std::fs::write(proxy.config_path(), config(&[PROVIDER_V4], ""))?;
    proxy.signal(nix::sys::signal::Signal::SIGHUP)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while python(&world.netns, &world.client_cg, LATER_V4, 443, "4")?.intercepted() {
        assert!(std::time::Instant::now() < deadline, "removed target still redirected");
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_leaves_nothing_behind_after_sigterm_or_sigkill() -> Result<()> {
    if !require_privileges("ebpf_leaves_nothing_behind_after_sigterm_or_sigkill") {
        return Ok(());
    }
    let world = World::new("ebpf_exit")?;
    for kill in [false, true] {
        let mut proxy = start_ebpf(&world, world.client_cg.path(), &world.proxy_cg, &[PROVIDER_V4])?;
        assert!(!attached_programs(world.client_cg.path())?.trim().is_empty(), "programs not attached");
        assert!(python(&world.netns, &world.client_cg, PROVIDER_V4, 443, "4")?.intercepted());
        let status = if kill { proxy.kill()? } else { proxy.terminate(STOP)? };
        if !kill {
            assert!(status.success(), "SIGTERM exit status {status}; log:\n{}", proxy.log_text());
        }
        // Links are descriptors of the process: gone with it.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let left = attached_programs(world.client_cg.path())? + &attached_programs(world.proxy_cg.path())?;
            if left.trim().is_empty() {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "programs left after exit (kill={kill}):\n{left}");
            std::thread::sleep(Duration::from_millis(100));
        }
        let direct = python(&world.netns, &world.client_cg, PROVIDER_V4, 443, "4")?;
        assert!(!direct.intercepted(), "still redirected after exit (kill={kill})");
        assert_eq!(direct.reply.line, "python", "the provider must be reachable directly");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iptables_redirects_clients_and_cleans_up_after_sigterm_and_sigkill() -> Result<()> {
    if !require_privileges("iptables_redirects_clients_and_cleans_up_after_sigterm_and_sigkill") {
        return Ok(());
    }
    let world = World::new("ipt")?;
    let start = |world: &World| -> Result<Interceptor> {
        let mut p = Interceptor::start(
            &world.netns,
            Some(&world.proxy_cg),
            // Fail closed: the rules outlive a killed proxy (fail open is
            // tested with the watchdog in failsafe.rs).
            &config(&targets(), "[redirect]\nfail_mode = \"closed\"\n"),
            &["--redirect", "iptables"],
        )?;
        p.wait_ready(&world.netns, READY)?;
        Ok(p)
    };
    let mut proxy = start(&world)?;
    let rules = iptables_rules(&world)?;
    assert!(rules.contains("REDIRECT"), "no REDIRECT rule installed:\n{rules}");

    let c = curl(&world.netns, &world.client_cg, PROVIDER_V4, 443)?;
    assert!(c.intercepted(), "curl not intercepted in iptables mode: {c:?}");
    assert_eq!(record_for(&proxy, c.local.port())?["orig_dst"], "198.18.0.10:443");
    let p = python(&world.netns, &world.client_cg, PROVIDER_V4, 443, "4")?;
    assert!(p.intercepted(), "python not intercepted in iptables mode: {p:?}");
    assert_eq!(record_for(&proxy, p.local.port())?["orig_dst"], "198.18.0.10:443");
    let v6 = python(&world.netns, &world.client_cg, PROVIDER_V6, 443, "6")?;
    assert!(v6.intercepted(), "IPv6 not intercepted in iptables mode: {v6:?}");
    assert_eq!(record_for(&proxy, v6.local.port())?["orig_dst"], "[2001:db8::10]:443");
    // The REJECT of a local datagram surfaces as EPERM or ECONNREFUSED.
    let q = python_udp(&world.netns, &world.client_cg, PROVIDER_V4, 443)?;
    assert!(q.starts_with("refused") || q.starts_with("error"), "QUIC must be refused: {q}");
    assert!(world.udp_provider.peers().is_empty(), "a QUIC datagram reached the provider");
    let o = python(&world.netns, &world.client_cg, OTHER_V4, 443, "4")?;
    assert!(!o.intercepted(), "non-target redirected in iptables mode");

    // SIGTERM: rules gone, provider reachable directly.
    assert!(proxy.terminate(STOP)?.success(), "log:\n{}", proxy.log_text());
    assert_eq!(iptables_rules(&world)?, "", "rules left after SIGTERM");
    world.flush_conntrack()?;
    let direct = python(&world.netns, &world.client_cg, PROVIDER_V4, 443, "4")?;
    assert!(!direct.intercepted(), "still redirected after SIGTERM");

    // SIGKILL leaves rules (nothing can run), and connections to the dead
    // port fail loudly rather than bypassing; a restart cleans up and works.
    let mut proxy = start(&world)?;
    proxy.kill()?;
    assert!(!iptables_rules(&world)?.is_empty(), "SIGKILL cannot remove rules");
    world.flush_conntrack()?;
    assert!(
        python(&world.netns, &world.client_cg, PROVIDER_V4, 443, "4").is_err(),
        "traffic must not bypass a dead proxy"
    );
    let mut proxy = start(&world)?;
    let rules = iptables_rules(&world)?;
    assert_eq!(rules.matches("-A OUTPUT").count(), 4, "stale jumps not cleaned (2 tables x 2 families):\n{rules}");
    world.flush_conntrack()?;
    let again = python(&world.netns, &world.client_cg, PROVIDER_V4, 443, "4")?;
    assert!(again.intercepted(), "restart after SIGKILL does not redirect");
    assert_eq!(record_for(&proxy, again.local.port())?["orig_dst"], "198.18.0.10:443");
    proxy.kill()?;

    // `interceptor cleanup` removes what a crash left.
    let out = std::process::Command::new(interceptor::testing::tool("ip"))
        .args(["netns", "exec", world.netns.name()])
        .arg(interceptor::testing::interceptor_bin())
        .arg("cleanup")
        .output()?;
    assert!(out.status.success(), "cleanup failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(iptables_rules(&world)?, "", "rules left after `interceptor cleanup`");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iptables_guard_refuses_connections_that_escape_nat() -> Result<()> {
    if !require_privileges("iptables_guard_refuses_connections_that_escape_nat") {
        return Ok(());
    }
    let world = World::new("ipt_guard")?;
    let mut proxy = Interceptor::start(
        &world.netns,
        Some(&world.proxy_cg),
        &config(&[PROVIDER_V4], ""),
        &["--redirect", "iptables"],
    )?;
    proxy.wait_ready(&world.netns, READY)?;
    // Simulate a stale conntrack entry: a connection whose NAT decision was
    // taken before the rules existed keeps going straight to the provider.
    // The guard in the filter table must reset it rather than let it bypass.
    let out = std::process::Command::new(interceptor::testing::tool("ip"))
        .args([
            "netns",
            "exec",
            world.netns.name(),
            "iptables",
            "-w",
            "-t",
            "nat",
            "-I",
            "INTERCEPTOR",
            "1",
            "-p",
            "tcp",
            "-d",
            PROVIDER_V4,
            "-j",
            "RETURN",
        ])
        .output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r = python(&world.netns, &world.client_cg, PROVIDER_V4, 443, "4");
    assert!(r.is_err(), "a connection that escaped NAT reached the provider: {r:?}");
    assert!(world.provider.peers().is_empty(), "provider was reached directly");
    proxy.terminate(STOP)?;
    Ok(())
}

#[test]
fn doctor_reports_available_modes() {
    if !require_privileges("doctor_reports_available_modes") {
        return;
    }
    let out =
        std::process::Command::new(interceptor::testing::interceptor_bin()).arg("doctor").output().expect("run doctor");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("ebpf      available"), "{text}");
    assert!(text.contains("iptables  available"), "{text}");
    assert!(text.contains("eBPF programs load and pass the verifier"), "{text}");
    assert!(text.contains("[ ok ] bpffs at /sys/fs/bpf"), "{text}");
}
