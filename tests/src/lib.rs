//! Shared set-up for the privileged end-to-end tests: a namespace holding a
//! fake provider, a cgroup tree (`proxy`, `client`, `outside`), and real
//! clients (curl, Python) started inside them.
//!
//! Interception is judged from the server side: a redirected connection
//! reaches the provider from the proxy's own socket, so the source port the
//! provider sees differs from the client's local port.

pub mod budgets;
pub mod captured;
pub mod dns_stage;
pub mod inprocess;
pub mod plain_http;
pub mod stage;

use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use interceptor::testing::{Cgroup, EchoReply, Netns, PeerEchoServer, UdpEcho, spawn_in, tool};

/// The fake provider's address inside every test namespace.
pub const PROVIDER_V4: &str = "198.18.0.10";
/// An address in the namespace that is not a target.
pub const OTHER_V4: &str = "198.18.0.11";
/// A second provider address, made a target only at runtime.
pub const LATER_V4: &str = "198.18.0.20";
pub const PROVIDER_V6: &str = "2001:db8::10";

pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// A namespace with fake providers on 443, a cgroup tree, and nothing else.
pub struct World {
    pub netns: Netns,
    pub root: Cgroup,
    pub proxy_cg: Cgroup,
    pub client_cg: Cgroup,
    pub outside_cg: Cgroup,
    pub provider: PeerEchoServer,
    pub other: PeerEchoServer,
    pub later: PeerEchoServer,
    pub provider_v6: PeerEchoServer,
    /// UDP echo on the provider's 443, so a datagram that is not refused
    /// gets an answer.
    pub udp_provider: UdpEcho,
    pub udp_provider_v6: UdpEcho,
    pub udp_other_port: UdpEcho,
    pub udp_non_target: UdpEcho,
}

impl World {
    /// Must be called inside a multi-threaded tokio runtime (the fake servers
    /// run on it while tests block on client processes).
    pub fn new(name: &str) -> Result<Self> {
        let netns = Netns::new(name)?;
        for addr in [PROVIDER_V4, OTHER_V4, LATER_V4] {
            netns.add_addr("lo", &format!("{addr}/32"))?;
        }
        // nodad: usable at once, no duplicate address detection delay.
        netns.run(&["addr", "add", &format!("{PROVIDER_V6}/128"), "dev", "lo", "nodad"])?;
        let root = Cgroup::new(name)?;
        let proxy_cg = root.child("proxy")?;
        let client_cg = root.child("client")?;
        let outside_cg = root.child("outside")?;
        let at = |ip: &str, port: u16| -> SocketAddr { SocketAddr::new(ip.parse().expect("ip"), port) };
        Ok(Self {
            provider: PeerEchoServer::bind_in(&netns, at(PROVIDER_V4, 443))?,
            other: PeerEchoServer::bind_in(&netns, at(OTHER_V4, 443))?,
            later: PeerEchoServer::bind_in(&netns, at(LATER_V4, 443))?,
            provider_v6: PeerEchoServer::bind_in(&netns, at(PROVIDER_V6, 443))?,
            udp_provider: UdpEcho::bind_in(&netns, at(PROVIDER_V4, 443))?,
            udp_provider_v6: UdpEcho::bind_in(&netns, at(PROVIDER_V6, 443))?,
            udp_other_port: UdpEcho::bind_in(&netns, at(PROVIDER_V4, 8443))?,
            udp_non_target: UdpEcho::bind_in(&netns, at(OTHER_V4, 443))?,
            netns,
            root,
            proxy_cg,
            client_cg,
            outside_cg,
        })
    }

    /// Flushes conntrack in the namespace, so that entries of an earlier
    /// phase cannot decide NAT for a later one.
    pub fn flush_conntrack(&self) -> Result<()> {
        let out = Command::new(tool("ip")).args(["netns", "exec", self.netns.name(), "conntrack", "-F"]).output()?;
        // conntrack -F exits non-zero when the table is already empty on
        // some versions; only a missing binary is an error.
        if !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("not found") {
            bail!("conntrack is not installed");
        }
        Ok(())
    }
}

/// Config for an interceptor in a test namespace, with `cidrs` as targets and
/// no domains (tests never resolve real names).
pub fn config(cidrs: &[&str], extra: &str) -> String {
    let cidrs = cidrs.iter().map(|c| format!("\"{c}\"")).collect::<Vec<_>>().join(", ");
    // The echo servers speak plain TCP, which an AI address refuses by
    // default: these tests are about where connections go, not what they carry.
    format!(
        "[targets]\ndomains = []\ncidrs = [{cidrs}]\nresolve_interval = \"1s\"\nunclassified = \"pass\"\n\n{extra}\n"
    )
}

/// What a client saw.
#[derive(Debug)]
pub struct ClientResult {
    pub pid: u32,
    /// The client's own local address.
    pub local: SocketAddr,
    pub reply: EchoReply,
}

impl ClientResult {
    /// Whether the connection went through the proxy: the provider saw a
    /// source port other than the client's.
    pub fn intercepted(&self) -> bool {
        self.reply.peer.port() != self.local.port()
    }
}

/// curl to `http://addr:port/` (the fake provider answers one line; HTTP/0.9
/// allowed) from `cgroup` in the namespace.
pub fn curl(netns: &Netns, cgroup: &Cgroup, host: &str, port: u16) -> Result<ClientResult> {
    let url_host = if host.contains(':') { format!("[{host}]") } else { host.to_string() };
    let mut cmd = Command::new(tool("curl"));
    cmd.args(["-sS", "--http0.9", "--max-time", "8", "-w", "\nlocal=%{local_ip} %{local_port}\n"])
        .arg(format!("http://{url_host}:{port}/"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = spawn_in(&mut cmd, Some(netns), Some(cgroup))?;
    let pid = child.id();
    let out = wait_output(child)?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("curl failed ({}): {}{}", out.status, text, String::from_utf8_lossy(&out.stderr));
    }
    let reply_line = text.lines().find(|l| l.starts_with("peer=")).context("no reply from the provider")?;
    let local_line = text.lines().find_map(|l| l.strip_prefix("local=")).context("no local address")?;
    let (ip, port) = local_line.split_once(' ').context("malformed local address")?;
    let ip: std::net::IpAddr = ip.parse()?;
    Ok(ClientResult { pid, local: SocketAddr::new(ip, port.parse()?), reply: EchoReply::parse(reply_line)? })
}

/// The socket client of [`python`] (and of slow clients that hold a
/// connection open: a fourth argument, the delay before sending).
pub const PY_TCP: &str = include_str!("scripts/tcp_client.py");

/// A Python socket client. `family` "4" or "6" (an AF_INET6 socket may
/// connect to a v4-mapped address).
pub fn python(netns: &Netns, cgroup: &Cgroup, host: &str, port: u16, family: &str) -> Result<ClientResult> {
    let mut cmd = Command::new(tool("python3"));
    cmd.args(["-c", PY_TCP, host, &port.to_string(), family])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = spawn_in(&mut cmd, Some(netns), Some(cgroup))?;
    let out = wait_output(child)?;
    if !out.status.success() {
        bail!("python client failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let ip: std::net::IpAddr = v["local"][0].as_str().context("local ip")?.parse()?;
    let local = interceptor::net::canonical(SocketAddr::new(ip, v["local"][1].as_u64().context("port")? as u16));
    Ok(ClientResult {
        pid: v["pid"].as_u64().context("pid")? as u32,
        local,
        reply: EchoReply::parse(v["reply"].as_str().context("reply")?)?,
    })
}

/// A client whose requests leave from a named worker thread, not the main
/// one (see the script's header).
pub const PY_WORKER_THREAD: &str = include_str!("scripts/worker_thread_client.py");

const PY_UDP: &str = r#"
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
try:
    s.sendto(b"quic?", (host, port))
    data, _ = s.recvfrom(100)
    print("reply", data.decode())
except PermissionError as e:
    print("refused", e.errno)
except OSError as e:
    print("error", e)
"#;

/// Sends one UDP datagram and reports "reply …", "refused <errno>" or "error …".
pub fn python_udp(netns: &Netns, cgroup: &Cgroup, host: &str, port: u16) -> Result<String> {
    let mut cmd = Command::new(tool("python3"));
    cmd.args(["-c", PY_UDP, host, &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = spawn_in(&mut cmd, Some(netns), Some(cgroup))?;
    let out = wait_output(child)?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Waits for a child with a bound, killing it when the bound passes.
fn wait_output(mut child: std::process::Child) -> Result<std::process::Output> {
    let deadline = std::time::Instant::now() + CLIENT_TIMEOUT;
    loop {
        if child.try_wait()?.is_some() {
            return Ok(child.wait_with_output()?);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output()?;
            bail!(
                "client timed out after {CLIENT_TIMEOUT:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Programs currently attached to a cgroup directory, as bpftool lists them.
pub fn attached_programs(cgroup: &std::path::Path) -> Result<String> {
    let out = Command::new(tool("bpftool")).args(["cgroup", "show"]).arg(cgroup).output()?;
    if !out.status.success() {
        bail!("bpftool cgroup show failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Our iptables chains and jumps in the namespace, for both families.
pub fn iptables_rules(world: &World) -> Result<String> {
    let mut all = String::new();
    for ipt in ["iptables", "ip6tables"] {
        for table in ["nat", "filter"] {
            let out = Command::new(tool("ip"))
                .args(["netns", "exec", world.netns.name(), ipt, "-w", "-t", table, "-S"])
                .output()?;
            all.push_str(&String::from_utf8_lossy(&out.stdout));
        }
    }
    Ok(all.lines().filter(|l| l.contains("INTERCEPTOR")).collect::<Vec<_>>().join("\n"))
}
