//! Privileged abuse tests with the real binary in a test namespace: the
//! proxy serves only connections that arrive redirected, once its redirect
//! is attached the process keeps only the capabilities it needs, in every
//! thread, while target updates keep working, and the per-workload
//! connection cap counts a cgroup. Run one at a time (`--test-threads=1`).

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt as _,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use interceptor::testing::{Interceptor, require_privileges, spawn_in, tool};
use interceptor_tests::{LATER_V4, PROVIDER_V4, World, config, python};
use serde_json::Value;

const READY: Duration = Duration::from_secs(20);
const LOG_WAIT: Duration = Duration::from_secs(5);
/// The proxy's port in the test namespace (the default).
const PROXY_PORT: u16 = 15443;

const CAP_DAC_OVERRIDE: u32 = 1;
const CAP_SETUID: u32 = 7;
const CAP_SETPCAP: u32 = 8;
const CAP_NET_BIND_SERVICE: u32 = 10;
const CAP_NET_ADMIN: u32 = 12;
const CAP_NET_RAW: u32 = 13;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

fn start(world: &World, redirect: &str, cidrs: &[&str]) -> Result<Interceptor> {
    let attach = world.client_cg.path().to_str().context("utf-8 path")?.to_string();
    let mut args = vec!["--redirect", redirect];
    if redirect == "ebpf" {
        args.extend(["--cgroup", attach.as_str()]);
    }
    let mut proxy = Interceptor::start(&world.netns, Some(&world.proxy_cg), &config(cidrs, ""), &args)?;
    proxy.wait_ready(&world.netns, READY)?;
    Ok(proxy)
}

/// The capability lines and NoNewPrivs of every thread of `pid`.
fn thread_sets(pid: u32) -> Result<Vec<(String, HashMap<String, String>)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let entry = entry?;
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else { continue };
        let sets = status
            .lines()
            .filter_map(|l| l.split_once(':'))
            .filter(|(k, _)| k.starts_with("Cap") || *k == "NoNewPrivs")
            .map(|(k, v)| (k.to_string(), v.trim().to_string()))
            .collect();
        out.push((entry.file_name().to_string_lossy().into_owned(), sets));
    }
    Ok(out)
}

fn mask(caps: &[u32]) -> u64 {
    caps.iter().fold(0, |m, c| m | 1 << c)
}

/// Every thread holds exactly `kept` (effective, permitted, bounding), no
/// inheritable or ambient capability, and no-new-privs.
fn assert_only(pid: u32, kept: &[u32], log: impl Fn() -> String) -> Result<()> {
    let want = mask(kept);
    let threads = thread_sets(pid)?;
    assert!(threads.len() > 1, "expected a multi-threaded process: {threads:?}");
    for (tid, sets) in &threads {
        let get = |k: &str| -> Result<u64> {
            let v = sets.get(k).with_context(|| format!("{k} missing for thread {tid}"))?;
            Ok(u64::from_str_radix(v, 16)?)
        };
        for set in ["CapEff", "CapPrm", "CapBnd"] {
            assert_eq!(get(set)?, want, "thread {tid} {set}: {sets:?}\n{}", log());
        }
        assert_eq!(get("CapInh")? & !want, 0, "thread {tid}: {sets:?}");
        assert_eq!(get("CapAmb")?, 0, "thread {tid}: {sets:?}");
        assert_eq!(sets.get("NoNewPrivs").map(String::as_str), Some("1"), "thread {tid}: {sets:?}");
        for gone in
            [CAP_SYS_PTRACE, CAP_DAC_OVERRIDE, CAP_SYS_ADMIN, CAP_BPF, CAP_NET_BIND_SERVICE, CAP_SETUID, CAP_SETPCAP]
        {
            assert_eq!(get("CapEff")? & (1 << gone), 0, "thread {tid} kept capability {gone}");
        }
    }
    Ok(())
}

/// The iptables-mode attribution helper (a child of the proxy) may read
/// other processes' descriptors and nothing else: `CAP_SYS_PTRACE` and
/// `CAP_DAC_READ_SEARCH` in every set it has, no-new-privs on.
fn assert_helper_keeps_only_what_attribution_needs(proxy: u32) -> Result<()> {
    const CAP_DAC_READ_SEARCH: u32 = 2;
    let want = mask(&[CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH]);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut helpers = Vec::new();
        for entry in std::fs::read_dir("/proc")?.flatten() {
            let dir = entry.path();
            let cmdline = std::fs::read(dir.join("cmdline")).unwrap_or_default();
            let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
            let ppid = status.lines().find_map(|l| l.strip_prefix("PPid:")).map(str::trim);
            if ppid == Some(proxy.to_string().as_str())
                && cmdline.split(|&b| b == 0).any(|a| a == b"attribution-helper")
            {
                helpers.push(status);
            }
        }
        let settled =
            helpers.len() == 1 && helpers[0].lines().any(|l| l.starts_with("NoNewPrivs:") && l.ends_with('1'));
        if settled || Instant::now() > deadline {
            assert_eq!(helpers.len(), 1, "one attribution helper under the proxy");
            let status = &helpers[0];
            let get = |k: &str| -> Result<u64> {
                let v = status.lines().find_map(|l| l.strip_prefix(k)).with_context(|| format!("{k} missing"))?;
                Ok(u64::from_str_radix(v.trim(), 16)?)
            };
            for set in ["CapEff:", "CapPrm:", "CapBnd:"] {
                assert_eq!(get(set)?, want, "helper {set}\n{status}");
            }
            assert_eq!(get("CapAmb:")?, 0, "{status}");
            assert_eq!(get("CapInh:")? & !want, 0, "{status}");
            assert!(status.lines().any(|l| l.starts_with("NoNewPrivs:") && l.ends_with('1')), "{status}");
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Adds `LATER_V4` as a target at runtime and waits until a client's
/// connection to it is intercepted.
fn add_target_at_runtime(world: &World, proxy: &Interceptor) -> Result<()> {
    let before = python(&world.netns, &world.client_cg, LATER_V4, 443, "4")?;
    assert!(!before.intercepted(), "not yet a target: {before:?}");
    std::fs::write(proxy.config_path(), config(&[PROVIDER_V4, LATER_V4], ""))?;
    proxy.signal(nix::sys::signal::Signal::SIGHUP)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let after = python(&world.netns, &world.client_cg, LATER_V4, 443, "4")?;
        if after.intercepted() {
            let record = proxy.wait_connection(LOG_WAIT, |e| {
                e["client"].as_str().is_some_and(|c| c.ends_with(&format!(":{}", after.local.port())))
            })?;
            assert_eq!(record["orig_dst"], "198.18.0.20:443");
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("new target never redirected after the privilege drop; log:\n{}", proxy.log_text());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

const PY_DIRECT: &str = r#"
import json, socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
port = s.getsockname()[1]
s.sendall(b"GET / HTTP/1.1\r\nhost: api.openai.com\r\n\r\n")
got = b""
try:
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        got += chunk
except OSError:
    pass
print(json.dumps({"port": port, "got": len(got)}))
"#;

/// Connects from the client cgroup straight to the proxy's own address;
/// returns the client's port and how many bytes came back.
fn connect_directly(world: &World) -> Result<(u16, u64)> {
    let mut cmd = Command::new(tool("python3"));
    cmd.args(["-c", PY_DIRECT, &PROXY_PORT.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = spawn_in(&mut cmd, Some(&world.netns), Some(&world.client_cg))?.wait_with_output()?;
    if !out.status.success() {
        bail!("direct client failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: Value = serde_json::from_slice(&out.stdout)?;
    Ok((v["port"].as_u64().context("port")? as u16, v["got"].as_u64().context("got")?))
}

/// A connection that was not redirected is closed without a byte relayed.
fn assert_direct_connection_refused(world: &World, proxy: &Interceptor, outcomes: &[&str]) -> Result<()> {
    let (port, got) = connect_directly(world)?;
    assert_eq!(got, 0, "the proxy answered a connection that was not redirected");
    let record =
        proxy.wait_connection(LOG_WAIT, |e| e["client"].as_str().is_some_and(|c| c.ends_with(&format!(":{port}"))))?;
    let outcome = record["outcome"].as_str().unwrap_or_default();
    assert!(outcomes.contains(&outcome), "outcome {outcome:?}: {record}");
    assert_eq!(record["bytes_up"], 0, "{record}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_proxy_keeps_only_net_admin_refuses_unredirected_connections_and_still_updates_targets() -> Result<()> {
    if !require_privileges("ebpf_proxy_keeps_only_net_admin_refuses_unredirected_connections_and_still_updates_targets")
    {
        return Ok(());
    }
    let world = World::new("abuse_ebpf")?;
    let proxy = start(&world, "ebpf", &[PROVIDER_V4])?;
    let pid = proxy.pid().context("running")?;
    assert!(proxy.log_text().contains("privileges dropped"), "{}", proxy.log_text());
    assert_only(pid, &[CAP_NET_ADMIN], || proxy.log_text())?;

    // Redirected connections still work: the original destination is read
    // from the eBPF map without CAP_BPF.
    let c = python(&world.netns, &world.client_cg, PROVIDER_V4, 443, "4")?;
    assert!(c.intercepted(), "{c:?}");
    // No record of a redirection: refused.
    assert_direct_connection_refused(&world, &proxy, &["no_original_dst"])?;
    // Map updates without CAP_BPF or CAP_SYS_ADMIN.
    add_target_at_runtime(&world, &proxy)?;
    assert_only(pid, &[CAP_NET_ADMIN], || proxy.log_text())?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iptables_proxy_keeps_only_net_admin_and_raw_refuses_unredirected_connections_and_still_updates_targets()
-> Result<()> {
    if !require_privileges(
        "iptables_proxy_keeps_only_net_admin_and_raw_refuses_unredirected_connections_and_still_updates_targets",
    ) {
        return Ok(());
    }
    let world = World::new("abuse_ipt")?;
    let proxy = start(&world, "iptables", &[PROVIDER_V4])?;
    let pid = proxy.pid().context("running")?;
    assert_only(pid, &[CAP_NET_ADMIN, CAP_NET_RAW], || proxy.log_text())?;
    assert_helper_keeps_only_what_attribution_needs(pid)?;
    let c = python(&world.netns, &world.client_cg, PROVIDER_V4, 443, "4")?;
    assert!(c.intercepted(), "{c:?}");
    // Not NATed: its original destination is the proxy itself.
    assert_direct_connection_refused(&world, &proxy, &["refused_loop", "no_original_dst"])?;
    // iptables-restore runs with the reduced sets and still updates rules.
    add_target_at_runtime(&world, &proxy)?;
    Ok(())
}

const PY_CAP: &str = r#"
import json, socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
def conn(src):
    s = socket.socket()
    s.bind((src, 0))
    s.settimeout(3)
    s.connect((host, port))
    return s
def closed(s, wait):
    s.settimeout(wait)
    try:
        return s.recv(1) == b""
    except socket.timeout:
        return False
    except ConnectionError:
        return True
a = conn("127.0.0.1")
b = conn("127.0.0.1")
# Let the proxy admit the first two before the third arrives.
time.sleep(0.3)
# Another source address, the same cgroup.
c = conn("198.18.0.11")
r = {"third_closed": closed(c, 2.0), "first_open": not closed(a, 0.3), "second_open": not closed(b, 0.3)}
a.close()
time.sleep(0.3)
d = conn("198.18.0.11")
r["after_release_open"] = not closed(d, 0.5)
print(json.dumps(r))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_workload_cap_counts_a_cgroup_whatever_its_source_address() -> Result<()> {
    if !require_privileges("the_per_workload_cap_counts_a_cgroup_whatever_its_source_address") {
        return Ok(());
    }
    per_workload_cap("abuse_cap", "ebpf")
}

/// iptables mode has no record of the cgroup: the interceptor reads it from
/// the client's socket, so the cap counts the cgroup there too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_workload_cap_counts_a_cgroup_in_iptables_mode_too() -> Result<()> {
    if !require_privileges("the_per_workload_cap_counts_a_cgroup_in_iptables_mode_too") {
        return Ok(());
    }
    per_workload_cap("abuse_cap_ipt", "iptables")
}

fn per_workload_cap(name: &str, redirect: &str) -> Result<()> {
    let world = World::new(name)?;
    let attach = world.client_cg.path().to_str().context("utf-8 path")?.to_string();
    let extra = "[proxy]\nmax_connections_per_workload = 2\n";
    let mut args = vec!["--redirect", redirect];
    if redirect == "ebpf" {
        args.extend(["--cgroup", &attach]);
    }
    let mut proxy = Interceptor::start(&world.netns, Some(&world.proxy_cg), &config(&[PROVIDER_V4], extra), &args)?;
    proxy.wait_ready(&world.netns, READY)?;
    let mut cmd = Command::new(tool("python3"));
    cmd.args(["-c", PY_CAP, PROVIDER_V4, "443"]).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let out = spawn_in(&mut cmd, Some(&world.netns), Some(&world.client_cg))?.wait_with_output()?;
    if !out.status.success() {
        bail!("client failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let r: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(r["third_closed"], true, "{r}\n{}", proxy.log_text());
    assert_eq!(r["first_open"], true, "{r}");
    assert_eq!(r["second_open"], true, "{r}");
    assert_eq!(r["after_release_open"], true, "a closed connection frees its slot: {r}");
    let refused = proxy
        .events()
        .into_iter()
        .find(|e| e["event"] == "connection_refused")
        .with_context(|| format!("no refusal logged:\n{}", proxy.log_text()))?;
    assert_eq!(refused["limit"], "max_connections_per_workload", "{refused}");
    let cgroup_id = std::fs::metadata(world.client_cg.path())?.ino();
    assert_eq!(refused["cgroup_id"], cgroup_id, "keyed by the client's cgroup: {refused}");
    Ok(())
}
