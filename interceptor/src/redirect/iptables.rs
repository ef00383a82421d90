//! iptables redirect: our own `INTERCEPTOR` chains, in the nat table (REDIRECT
//! of TCP to a target) and in the filter table (refusal of UDP to a target,
//! i.e. QUIC, and a guard that resets any TCP connection to a target that
//! escaped NAT), for IPv4 and IPv6.
//!
//! The guard matters because NAT is decided once per conntrack entry: a stale
//! entry left by the proxy's own upstream connection (same addresses and
//! ports) would let a later client connection through to the provider
//! untouched. Every unmarked packet still aimed at a target when it reaches the
//! filter table was not redirected, so it is refused instead of bypassing the
//! guardrails.
//!
//! Chains are replaced atomically with `iptables-restore --noflush`. Stale
//! chains from a crashed run are removed at start and by `interceptor cleanup`.
//!
//! Fail mode: rules are kernel state that cannot see whether the proxy is
//! alive, so after a crash they stay (fail closed) unless `fail_mode` is
//! `open`: then a small watchdog process (`interceptor watchdog`, holding a
//! pipe from the proxy) removes the chains as soon as the proxy process is
//! gone, however it went. A hung but living proxy is not detected in this
//! mode, and a new instance replaces the old one's rules (no handover).
//!
//! Attribution: NAT keeps no record of the process, so [`IptablesResolver`]
//! finds the client's socket with `sock_diag` (uid, inode, cgroup id) and
//! its process from the inode (see [`super::owner`]), giving audit events
//! and connection records the same fields as eBPF mode. A client the proxy
//! cannot see (another network namespace, closed meanwhile) is not
//! attributed; its connection goes on all the same.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
};

use ipnet::IpNet;
use tokio::net::TcpStream;

use super::{
    RedirectError, Redirector, SockoptResolver,
    owner::{Helper, OwnerSource},
    sockdiag,
};
use crate::{
    net::{ClientAddr, NoOriginalDst, OrigDstAddr, OrigDstResolver, ProxyAddrs, WorkloadLookup},
    targets::TargetSet,
    workload::Workload,
};

pub const CHAIN: &str = "INTERCEPTOR";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn iptables(self) -> &'static str {
        match self {
            Self::V4 => "iptables",
            Self::V6 => "ip6tables",
        }
    }

    fn restore(self) -> &'static str {
        match self {
            Self::V4 => "iptables-restore",
            Self::V6 => "ip6tables-restore",
        }
    }

    fn matches(self, net: &IpNet) -> bool {
        matches!((self, net), (Self::V4, IpNet::V4(_)) | (Self::V6, IpNet::V6(_)))
    }
}

pub struct IptablesRedirector {
    proxy: ProxyAddrs,
    ports: Vec<u16>,
    dns_port: Option<u16>,
    installed: bool,
    current: BTreeSet<IpNet>,
    /// Plain MCP targets: exact (address, port) pairs.
    current_plain: BTreeSet<SocketAddr>,
    /// Fail open: the process that removes the rules when we die.
    watchdog: Option<Child>,
    /// Finds the process behind a socket; `None` if it could not start.
    owners: Option<Arc<Mutex<OwnerSource>>>,
}

impl IptablesRedirector {
    /// Removes stale rules, then creates the chains and the jumps to them.
    /// `fail_open`: start the watchdog that removes them if this process dies.
    pub fn install(
        proxy: ProxyAddrs,
        ports: &[u16],
        dns_port: Option<u16>,
        fail_open: bool,
    ) -> Result<Self, RedirectError> {
        cleanup()?;
        // The watchdog first: from the first rule on, a crash removes them.
        let watchdog = if fail_open { Some(spawn_watchdog()?) } else { None };
        // Started now, while this process still has the privileges the
        // helper keeps.
        let owners = match Helper::spawn() {
            Ok(helper) => Some(Arc::new(Mutex::new(OwnerSource::Helper(helper)))),
            Err(error) => {
                tracing::warn!(
                    error = %crate::error::chain(&error),
                    "connections will carry no process (pid, comm): the attribution helper cannot start"
                );
                None
            }
        };
        let this = Self {
            proxy,
            ports: ports.to_vec(),
            dns_port,
            installed: true,
            current: BTreeSet::new(),
            current_plain: BTreeSet::new(),
            watchdog,
            owners,
        };
        for family in [Family::V4, Family::V6] {
            restore(family, &this.rules(family))?;
            run(family.iptables(), &["-w", "-t", "nat", "-I", "OUTPUT", "1", "-j", CHAIN])?;
            run(family.iptables(), &["-w", "-t", "filter", "-I", "OUTPUT", "1", "-j", CHAIN])?;
        }
        tracing::info!("iptables redirect installed");
        Ok(this)
    }

    fn rules(&self, family: Family) -> String {
        rules(family, &self.current, &self.current_plain, &self.proxy, &self.ports, self.dns_port)
    }
}

/// The iptables-restore input for one family. Declaring a chain flushes it,
/// so applying this replaces the chain's rules atomically.
pub fn rules(
    family: Family,
    targets: &BTreeSet<IpNet>,
    plain: &BTreeSet<SocketAddr>,
    proxy: &ProxyAddrs,
    ports: &[u16],
    dns_port: Option<u16>,
) -> String {
    let ports = ports.iter().map(u16::to_string).collect::<Vec<_>>().join(",");
    let nets: Vec<&IpNet> = targets.iter().filter(|n| family.matches(n)).collect();
    // Plain MCP targets: only their exact (address, port).
    let plain: Vec<(IpNet, u16)> =
        plain.iter().map(|a| (IpNet::from(a.ip()), a.port())).filter(|(n, _)| family.matches(n)).collect();
    let mark = format!("-A {CHAIN} -m mark --mark {:#x} -j RETURN\n", proxy.mark);
    // REDIRECT sends to the loopback address (127.0.0.1 or ::1) for locally
    // generated traffic; any other proxy address needs DNAT.
    let to_port = |port: u16| match family {
        Family::V4 if proxy.v4.ip().is_loopback() => Some(format!("REDIRECT --to-ports {port}")),
        Family::V4 => Some(format!("DNAT --to-destination {}:{port}", proxy.v4.ip())),
        Family::V6 => proxy.v6.map(|v6| {
            if v6.ip().is_loopback() {
                format!("REDIRECT --to-ports {port}")
            } else {
                format!("DNAT --to-destination [{}]:{port}", v6.ip())
            }
        }),
    };
    let to = to_port(proxy.v4.port());
    let mut out = String::new();
    out.push_str("*nat\n");
    let _ = writeln!(out, ":{CHAIN} - [0:0]");
    out.push_str(&mark);
    // DNS from every process to the forwarder (replies are un-NATed by
    // conntrack); the forwarder's own queries carry the mark.
    if let Some(to) = dns_port.and_then(to_port) {
        for proto in ["udp", "tcp"] {
            let _ = writeln!(out, "-A {CHAIN} -p {proto} --dport 53 -j {to}");
        }
    }
    if let Some(to) = &to {
        for net in &nets {
            let _ = writeln!(out, "-A {CHAIN} -d {net} -p tcp -m multiport --dports {ports} -j {to}");
        }
        for (net, port) in &plain {
            let _ = writeln!(out, "-A {CHAIN} -d {net} -p tcp --dport {port} -j {to}");
        }
    }
    out.push_str("COMMIT\n*filter\n");
    let _ = writeln!(out, ":{CHAIN} - [0:0]");
    out.push_str(&mark);
    let unreachable = match family {
        Family::V4 => "icmp-port-unreachable",
        Family::V6 => "icmp6-port-unreachable",
    };
    for net in &nets {
        let _ = writeln!(
            out,
            "-A {CHAIN} -d {net} -p udp -m multiport --dports {ports} -j REJECT --reject-with {unreachable}"
        );
        let _ =
            writeln!(out, "-A {CHAIN} -d {net} -p tcp -m multiport --dports {ports} -j REJECT --reject-with tcp-reset");
    }
    // What NAT did not send to the proxy (a stale conntrack entry, no IPv6
    // listener) must not reach a plain target uninspected either.
    for (net, port) in &plain {
        let _ = writeln!(out, "-A {CHAIN} -d {net} -p tcp --dport {port} -j REJECT --reject-with tcp-reset");
    }
    out.push_str("COMMIT\n");
    out
}

fn restore(family: Family, input: &str) -> Result<(), RedirectError> {
    let command = format!("{} --noflush -w", family.restore());
    let mut child = Command::new(family.restore())
        .args(["--noflush", "-w"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|source| RedirectError::Spawn { command: command.clone(), source })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(|source| RedirectError::Spawn { command: command.clone(), source })?;
    }
    let out = child.wait_with_output().map_err(|source| RedirectError::Spawn { command: command.clone(), source })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(RedirectError::Command { command, stderr: String::from_utf8_lossy(&out.stderr).trim().to_string() })
    }
}

fn run(program: &str, args: &[&str]) -> Result<(), RedirectError> {
    let command = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| RedirectError::Spawn { command: command.clone(), source })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(RedirectError::Command { command, stderr: String::from_utf8_lossy(&out.stderr).trim().to_string() })
    }
}

/// Removes our jumps and chains for both families. Missing rules and chains
/// are fine; a missing iptables binary is only an error if rules might exist.
pub fn cleanup() -> Result<(), RedirectError> {
    let mut removed = 0;
    for family in [Family::V4, Family::V6] {
        let ipt = family.iptables();
        if which(ipt).is_none() {
            continue;
        }
        // The nat jump had `-p tcp` in earlier versions: remove both forms.
        for (table, jump) in
            [("nat", &["-j", CHAIN][..]), ("nat", &["-p", "tcp", "-j", CHAIN][..]), ("filter", &["-j", CHAIN][..])]
        {
            // Remove every copy of the jump (a crashed run may have left several).
            for _ in 0..64 {
                let mut args = vec!["-w", "-t", table, "-D", "OUTPUT"];
                args.extend_from_slice(jump);
                if run(ipt, &args).is_err() {
                    break;
                }
                removed += 1;
            }
            if run(ipt, &["-w", "-t", table, "-F", CHAIN]).is_ok() {
                run(ipt, &["-w", "-t", table, "-X", CHAIN])?;
                removed += 1;
            }
        }
    }
    if removed > 0 {
        tracing::info!(removed, "removed iptables rules and chains");
    }
    Ok(())
}

/// Starts `interceptor watchdog` with a pipe from this process on its stdin.
fn spawn_watchdog() -> Result<Child, RedirectError> {
    let exe = std::env::current_exe()
        .map_err(|source| RedirectError::Spawn { command: "interceptor watchdog".into(), source })?;
    Command::new(exe)
        .arg("watchdog")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|source| RedirectError::Spawn { command: "interceptor watchdog".into(), source })
}

/// The watchdog process: waits until the proxy's pipe closes (the proxy
/// exited, was killed or crashed), then removes the rules. Ignores SIGINT
/// and SIGTERM, which a terminal or a service manager send to the whole
/// group: the proxy handles those itself, and the pipe tells us when it is
/// gone.
pub fn watchdog() -> Result<(), RedirectError> {
    use nix::sys::signal::{SigHandler, Signal, signal};
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: installing SIG_IGN runs no handler code.
        let _ = unsafe { signal(sig, SigHandler::SigIgn) };
    }
    let mut stdin = std::io::stdin().lock();
    let mut buf = [0u8; 64];
    loop {
        match stdin.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    let installed = rules_present();
    cleanup()?;
    if installed {
        tracing::warn!(
            event = "redirect_removed_by_watchdog",
            "the interceptor exited without removing its iptables redirect (crash or kill); removed it (fail_mode = open): \
             traffic now goes direct"
        );
    }
    Ok(())
}

/// Whether our nat chain exists (IPv4).
fn rules_present() -> bool {
    which("iptables").is_some() && run("iptables", &["-w", "-t", "nat", "-S", CHAIN]).is_ok()
}

fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|dir| std::path::Path::new(dir).join(program))
        .find(|p| p.is_file())
}

/// Whether the iptables tools are installed (for `doctor`).
pub fn available(family: Family) -> bool {
    which(family.iptables()).is_some() && which(family.restore()).is_some()
}

impl Redirector for IptablesRedirector {
    fn mode(&self) -> &'static str {
        "iptables"
    }

    fn attach_point(&self) -> String {
        format!("nat/filter OUTPUT -> {CHAIN}")
    }

    fn set_targets(&mut self, targets: &TargetSet) -> Result<(), RedirectError> {
        let plain: BTreeSet<SocketAddr> = targets.plain.keys().copied().collect();
        if targets.nets == self.current && plain == self.current_plain {
            return Ok(());
        }
        let previous = std::mem::replace(&mut self.current, targets.nets.clone());
        let previous_plain = std::mem::replace(&mut self.current_plain, plain);
        for family in [Family::V4, Family::V6] {
            if let Err(e) = restore(family, &self.rules(family)) {
                self.current = previous;
                self.current_plain = previous_plain;
                return Err(e);
            }
        }
        tracing::info!(total = self.current.len(), "redirect targets updated");
        Ok(())
    }

    fn uninstall(&mut self) -> Result<(), RedirectError> {
        if !self.installed {
            return Ok(());
        }
        self.installed = false;
        let result = cleanup();
        if let Some(mut child) = self.watchdog.take() {
            // Closing its pipe lets it exit (after a no-op cleanup).
            drop(child.stdin.take());
            let _ = child.wait();
        }
        result
    }

    fn resolver(&self) -> Arc<dyn OrigDstResolver> {
        Arc::new(IptablesResolver { owners: self.owners.clone() })
    }
}

/// The longest a connection waits for its workload.
const LOOKUP_DEADLINE: std::time::Duration = std::time::Duration::from_secs(1);

/// Original destination from conntrack, workload from the client's socket.
pub struct IptablesResolver {
    owners: Option<Arc<Mutex<OwnerSource>>>,
}

impl IptablesResolver {
    /// A resolver that finds processes with `owners` (`None`: uid and
    /// cgroup only).
    pub fn new(owners: Option<OwnerSource>) -> Self {
        Self { owners: owners.map(|o| Arc::new(Mutex::new(o))) }
    }

    /// The blocking lookup: `sock_diag` for the client's socket, then its
    /// process. `None` when the socket is not found (another network
    /// namespace, or closed meanwhile).
    pub fn attribute(&self, client: ClientAddr, orig_dst: OrigDstAddr) -> Option<Workload> {
        attribute(self.owners.as_deref(), client, orig_dst)
    }
}

fn attribute(owners: Option<&Mutex<OwnerSource>>, client: ClientAddr, orig_dst: OrigDstAddr) -> Option<Workload> {
    let socket = match sockdiag::find(client.0, orig_dst.0) {
        Ok(Some(socket)) => socket,
        Ok(None) => {
            tracing::debug!(client = %client, orig_dst = %orig_dst, "client socket not found (another network namespace?)");
            return None;
        }
        Err(error) => {
            tracing::debug!(error = %crate::error::chain(&error), "sock_diag lookup failed");
            return None;
        }
    };
    let cgroup_id = socket.cgroup_id.unwrap_or(0);
    // One lookup at a time: a burst waits for the first scan, then finds
    // its processes remembered.
    let process = owners.and_then(|o| o.lock().unwrap_or_else(|e| e.into_inner()).find(socket.inode, cgroup_id));
    Some(match process {
        // NAT does not say which thread connected: the process stands for it.
        Some(p) => Workload {
            pid: p.pid,
            tid: p.pid,
            uid: socket.uid,
            gid: p.gid,
            comm: p.comm,
            exe: p.exe.map(Arc::from),
            argv0: p.argv0.map(Arc::from),
            cgroup_id,
            ..Default::default()
        },
        None => {
            Workload { pid: 0, tid: 0, uid: socket.uid, gid: 0, comm: String::new(), cgroup_id, ..Default::default() }
        }
    })
}

impl OrigDstResolver for IptablesResolver {
    fn original_dst(&self, sock: &TcpStream, client: ClientAddr) -> Result<OrigDstAddr, NoOriginalDst> {
        SockoptResolver::new(None).original_dst(sock, client)
    }

    fn dns_original_dst(&self, client: ClientAddr, local: std::net::SocketAddr) -> Option<OrigDstAddr> {
        super::conntrack::udp_original_dst(local, client.0).map(OrigDstAddr)
    }

    fn workload(&self, client: ClientAddr, orig_dst: OrigDstAddr) -> WorkloadLookup {
        let owners = self.owners.clone();
        Box::pin(async move {
            let lookup = tokio::task::spawn_blocking(move || attribute(owners.as_deref(), client, orig_dst));
            // Lookups queue behind one another; a connection waits this long
            // at most, then goes on unattributed.
            match tokio::time::timeout(LOOKUP_DEADLINE, lookup).await {
                Ok(Ok(found)) => found,
                Ok(Err(_)) | Err(_) => None,
            }
        })
    }
}

impl Drop for IptablesRedirector {
    fn drop(&mut self) {
        if let Err(error) = self.uninstall() {
            tracing::error!(error = %crate::error::chain(&error), "cannot remove iptables rules");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxy(v6: bool) -> ProxyAddrs {
        ProxyAddrs {
            v4: "127.0.0.1:15443".parse().unwrap(),
            v6: v6.then(|| "[::1]:15443".parse().unwrap()),
            mark: 0x1e7,
        }
    }

    fn targets() -> BTreeSet<IpNet> {
        ["198.18.0.10/32", "2001:db8::10/128"].iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn v4_rules_redirect_tcp_refuse_udp_and_guard() {
        let r = rules(Family::V4, &targets(), &BTreeSet::new(), &proxy(true), &[443], None);
        assert_eq!(
            r,
            "*nat\n:INTERCEPTOR - [0:0]\n\
             -A INTERCEPTOR -m mark --mark 0x1e7 -j RETURN\n\
             -A INTERCEPTOR -d 198.18.0.10/32 -p tcp -m multiport --dports 443 -j REDIRECT --to-ports 15443\n\
             COMMIT\n*filter\n:INTERCEPTOR - [0:0]\n\
             -A INTERCEPTOR -m mark --mark 0x1e7 -j RETURN\n\
             -A INTERCEPTOR -d 198.18.0.10/32 -p udp -m multiport --dports 443 -j REJECT --reject-with icmp-port-unreachable\n\
             -A INTERCEPTOR -d 198.18.0.10/32 -p tcp -m multiport --dports 443 -j REJECT --reject-with tcp-reset\n\
             COMMIT\n"
        );
    }

    #[test]
    fn plain_targets_redirect_only_their_exact_port() {
        let plain: BTreeSet<SocketAddr> =
            ["127.0.0.1:8931", "[2001:db8::20]:8080"].iter().map(|s| s.parse().unwrap()).collect();
        let r = rules(Family::V4, &BTreeSet::new(), &plain, &proxy(true), &[443], None);
        assert!(r.contains("-A INTERCEPTOR -d 127.0.0.1/32 -p tcp --dport 8931 -j REDIRECT --to-ports 15443\n"), "{r}");
        assert!(r.contains("-A INTERCEPTOR -d 127.0.0.1/32 -p tcp --dport 8931 -j REJECT --reject-with tcp-reset\n"));
        assert!(!r.contains("2001:db8::20"), "{r}");
        // The mark comes first: the proxy's own upstream connections return.
        assert!(r.find("--mark").unwrap() < r.find("--dport 8931").unwrap());
        let r = rules(Family::V6, &BTreeSet::new(), &plain, &proxy(true), &[443], None);
        assert!(
            r.contains("-A INTERCEPTOR -d 2001:db8::20/128 -p tcp --dport 8080 -j REDIRECT --to-ports 15443\n"),
            "{r}"
        );
        assert!(!r.contains("127.0.0.1"), "{r}");
    }

    #[test]
    fn v6_without_listener_has_no_redirect_but_keeps_the_guard() {
        let r = rules(Family::V6, &targets(), &BTreeSet::new(), &proxy(false), &[443, 8443], None);
        assert!(!r.contains("REDIRECT"), "{r}");
        assert!(
            r.contains("-d 2001:db8::10/128 -p tcp -m multiport --dports 443,8443 -j REJECT --reject-with tcp-reset")
        );
        assert!(!r.contains("198.18.0.10"));
    }

    /// The client's socket, found by its tuple, names this process.
    #[test]
    fn a_connection_is_attributed_to_the_process_holding_the_client_socket() {
        use super::super::owner::Owners;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_server, _) = listener.accept().unwrap();
        let resolver = IptablesResolver::new(Some(OwnerSource::Local(Owners::default())));
        let (from, to) = (ClientAddr(client.local_addr().unwrap()), OrigDstAddr(client.peer_addr().unwrap()));
        let w = resolver.attribute(from, to).expect("attributed");
        assert_eq!((w.pid, w.tid), (std::process::id(), std::process::id()));
        assert_eq!(w.comm, std::fs::read_to_string("/proc/self/comm").unwrap().trim_end());
        assert_eq!(w.uid, nix::unistd::geteuid().as_raw());
        assert!(w.has_process());
        // Without a process finder: the socket's uid and cgroup only.
        let w = IptablesResolver::new(None).attribute(from, to).expect("socket found");
        assert_eq!((w.pid, w.comm.as_str()), (0, ""));
        assert!(!w.has_process());
        // No such socket (another namespace, or closed): not attributed.
        let nobody = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        assert_eq!(resolver.attribute(from, OrigDstAddr(nobody)), None);
    }

    #[test]
    fn non_loopback_proxy_address_uses_dnat() {
        let mut p = proxy(false);
        p.v4 = "10.0.0.5:15443".parse().unwrap();
        let r = rules(Family::V4, &targets(), &BTreeSet::new(), &p, &[443], Some(15053));
        assert!(r.contains("-A INTERCEPTOR -p udp --dport 53 -j DNAT --to-destination 10.0.0.5:15053"), "{r}");
        assert!(r.contains("-j DNAT --to-destination 10.0.0.5:15443"), "{r}");
    }
}
