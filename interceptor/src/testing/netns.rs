//! Throwaway network namespaces (`ip netns`), veth links between them, and
//! running code or commands inside one.
//!
//! `ip netns exec` remounts `/sys` for the command it runs, which hides the
//! cgroup2 mount: use it only for commands that need no cgroup (iptables,
//! conntrack, ip). To place a process in a namespace and a cgroup, use
//! [`super::spawn_in`].

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::sched::{CloneFlags, setns};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::{run_checked, sanitize, tool, unique_suffix};

/// Where iproute2 keeps the bind mounts that name namespaces.
const NETNS_RUN_DIR: &str = "/run/netns";

/// A named network namespace with `lo` up. Dropping it kills the processes
/// still inside and deletes it.
#[derive(Debug)]
pub struct Netns {
    name: String,
    path: PathBuf,
}

impl Netns {
    /// Creates `ict-<pid % 10000>-<counter>-<hint>` (hint shortened) and brings
    /// `lo` up.
    pub fn new(name_hint: &str) -> Result<Netns> {
        let mut attempt = 0;
        let name = loop {
            let name = format!("ict-{}-{}", unique_suffix(), sanitize(name_hint, 12));
            match run_checked(Command::new(tool("ip")).args(["netns", "add", &name])) {
                Ok(_) => break name,
                // A namespace leaked by an earlier run with the same pid: take the next counter.
                Err(e) if attempt < 5 && format!("{e:#}").contains("exists") => attempt += 1,
                Err(e) => return Err(e.context(format!("create network namespace {name}"))),
            }
        };
        let netns = Netns { path: Path::new(NETNS_RUN_DIR).join(&name), name };
        netns.run(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    /// The namespace name, as `ip netns list` shows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`: open it for `setns(2)` or pass it to `nsenter --net=`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens the namespace file, for `setns(2)`.
    pub fn open(&self) -> Result<File> {
        File::open(&self.path).with_context(|| format!("open {}", self.path.display()))
    }

    /// Runs `ip -n <name> <args>`; stdout, or an error with stderr.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        run_checked(Command::new(tool("ip")).arg("-n").arg(&self.name).args(args))
    }

    /// Runs a command inside the namespace through `ip netns exec` (which
    /// hides the cgroup mount, see the module docs); stdout, or an error with
    /// stderr.
    pub fn exec(&self, cmd: &[&str]) -> Result<String> {
        run_checked(Command::new(tool("ip")).args(["netns", "exec", &self.name]).args(cmd))
    }

    /// `ip addr add <cidr> dev <dev>` inside the namespace.
    pub fn add_addr(&self, dev: &str, cidr: &str) -> Result<()> {
        self.run(&["addr", "add", cidr, "dev", dev]).map(drop)
    }

    /// Pids of the processes whose network namespace is this one.
    pub fn pids(&self) -> Result<Vec<i32>> {
        let out = run_checked(Command::new(tool("ip")).args(["netns", "pids", &self.name]))?;
        Ok(out.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let me = std::process::id() as i32;
        let deadline = Instant::now() + Duration::from_secs(2);
        // Killed processes leave the namespace as they exit; a few passes also
        // catch children forked in the meantime.
        while let Ok(pids) = self.pids() {
            let others: Vec<i32> = pids.into_iter().filter(|&pid| pid != me).collect();
            if others.is_empty() || Instant::now() >= deadline {
                break;
            }
            for pid in others {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Err(e) = run_checked(Command::new(tool("ip")).args(["netns", "del", &self.name])) {
            eprintln!("warning: network namespace cleanup: {e:#}");
        }
    }
}

/// Runs `f` on a fresh thread that has switched into `netns` (only that thread
/// switches). Sockets created by `f` stay in the namespace and can be used from
/// any thread afterwards, e.g. a listener bound there and handed to tokio.
///
/// A panic in `f` resumes on the calling thread.
pub fn in_netns<T: Send>(netns: &Netns, f: impl FnOnce() -> T + Send) -> Result<T> {
    let file = netns.open()?;
    let joined = std::thread::scope(|scope| {
        scope
            .spawn(move || -> Result<T> {
                setns(&file, CloneFlags::CLONE_NEWNET).with_context(|| format!("setns into {}", netns.name()))?;
                Ok(f())
            })
            .join()
    });
    joined.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// A veth link between two namespaces (or the host and a namespace).
/// Dropping it deletes the link; deleting either namespace deletes it too.
#[derive(Debug)]
pub struct VethPair {
    name_a: String,
    name_b: String,
    /// Namespace of end a, `None` for the host.
    netns_a: Option<String>,
}

impl VethPair {
    /// Interface name of the end in `ns_a` (or the host).
    pub fn name_a(&self) -> &str {
        &self.name_a
    }

    /// Interface name of the end in `ns_b`.
    pub fn name_b(&self) -> &str {
        &self.name_b
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        let mut cmd = Command::new(tool("ip"));
        if let Some(ns) = &self.netns_a {
            cmd.args(["-n", ns]);
        }
        // Fails harmlessly when a namespace drop already took the link away.
        let _ = cmd.args(["link", "del", &self.name_a]).output();
    }
}

/// Joins `ns_a` (the host when `None`) and `ns_b` with a veth pair, gives end a
/// `cidr_a` and end b `cidr_b` (e.g. `10.77.0.1/24` and `10.77.0.2/24`) and
/// brings both up. Interface names are short and unique (`iv<pid>x<n>a|b`,
/// within the 15-byte limit).
pub fn veth_pair(ns_a: Option<&Netns>, ns_b: &Netns, cidr_a: &str, cidr_b: &str) -> Result<VethPair> {
    let base = format!("iv{}", unique_suffix().replace('-', "x"));
    let pair = VethPair {
        name_a: format!("{base}a"),
        name_b: format!("{base}b"),
        netns_a: ns_a.map(|ns| ns.name().to_owned()),
    };
    let ip_a = |args: &[&str]| -> Result<String> {
        let mut cmd = Command::new(tool("ip"));
        if let Some(ns) = ns_a {
            cmd.args(["-n", ns.name()]);
        }
        run_checked(cmd.args(args))
    };
    ip_a(&["link", "add", &pair.name_a, "type", "veth", "peer", "name", &pair.name_b, "netns", ns_b.name()])
        .context("create veth pair")?;
    ip_a(&["addr", "add", cidr_a, "dev", &pair.name_a])?;
    ip_a(&["link", "set", &pair.name_a, "up"])?;
    ns_b.add_addr(&pair.name_b, cidr_b)?;
    ns_b.run(&["link", "set", &pair.name_b, "up"])?;
    Ok(pair)
}

#[cfg(test)]
mod tests {
    use super::super::require_privileges;
    use super::*;

    fn listed(name: &str) -> bool {
        let list = run_checked(Command::new(tool("ip")).args(["netns", "list"])).unwrap_or_default();
        list.lines().any(|l| l.split_whitespace().next() == Some(name))
    }

    #[test]
    fn netns_lifecycle() {
        if !require_privileges("netns_lifecycle") {
            return;
        }
        let ns = Netns::new("lifecycle/test").expect("create netns");
        let name = ns.name().to_owned();
        assert!(name.starts_with("ict-") && name.ends_with("-lifecycle_te"), "{name}");
        assert!(listed(&name));
        assert!(ns.path().exists());

        ns.add_addr("lo", "198.18.0.10/32").expect("add addr");
        let addrs = ns.run(&["-o", "addr", "show", "dev", "lo"]).expect("show addr");
        assert!(addrs.contains("198.18.0.10/32"), "{addrs}");
        assert!(ns.exec(&["ip", "-o", "link"]).expect("exec").contains("lo:"));
        let err = ns.run(&["link", "set", "nope0", "up"]).expect_err("no such device");
        assert!(format!("{err:#}").contains("nope0"), "{err:#}");

        // A process left inside is killed on drop.
        let mut sleeper =
            Command::new(tool("ip")).args(["netns", "exec", &name, "sleep", "100"]).spawn().expect("spawn sleep");
        let started = Instant::now();
        while ns.pids().expect("pids").is_empty() && started.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(ns.pids().expect("pids").len(), 1);
        drop(ns);
        assert!(!listed(&name), "{name} still listed");
        assert!(!sleeper.wait().expect("wait").success());
    }

    #[test]
    fn in_netns_binds_inside_the_namespace() {
        if !require_privileges("in_netns_binds_inside_the_namespace") {
            return;
        }
        let ns = Netns::new("in_netns").expect("create netns");
        ns.add_addr("lo", "198.18.0.10/32").expect("add addr");
        let listener =
            in_netns(&ns, || std::net::TcpListener::bind("198.18.0.10:0")).expect("enter netns").expect("bind inside");
        let addr = listener.local_addr().expect("local addr");
        // The address exists only inside the namespace.
        assert!(std::net::TcpListener::bind("198.18.0.10:0").is_err());
        // The listener keeps working from this (host) thread; connect from inside.
        let client =
            in_netns(&ns, || std::net::TcpStream::connect(addr)).expect("enter netns").expect("connect inside");
        let (_server_side, peer) = listener.accept().expect("accept");
        assert_eq!(peer, client.local_addr().expect("client addr"));
    }

    #[test]
    fn veth_pair_joins_host_and_namespaces() {
        if !require_privileges("veth_pair_joins_host_and_namespaces") {
            return;
        }
        let node = Netns::new("node").expect("create node");
        let pod = Netns::new("pod").expect("create pod");
        let link = veth_pair(Some(&node), &pod, "10.231.0.1/30", "10.231.0.2/30").expect("veth");
        assert!(link.name_a().len() <= 15 && link.name_b().len() <= 15);
        let listener =
            in_netns(&node, || std::net::TcpListener::bind("10.231.0.1:0")).expect("enter node").expect("bind in node");
        let addr = listener.local_addr().expect("local addr");
        let client = in_netns(&pod, || std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)))
            .expect("enter pod")
            .expect("pod reaches node");
        assert_eq!(listener.accept().expect("accept").1, client.local_addr().expect("client addr"));

        let host = veth_pair(None, &node, "10.231.1.1/30", "10.231.1.2/30").expect("veth");
        let listener = std::net::TcpListener::bind("10.231.1.1:0").expect("bind on host");
        let addr = listener.local_addr().expect("local addr");
        in_netns(&node, || std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)))
            .expect("enter node")
            .expect("node reaches host");
        let host_if = host.name_a().to_owned();
        drop(host);
        let links = run_checked(Command::new(tool("ip")).args(["-o", "link"])).expect("links");
        assert!(!links.contains(&format!("{host_if}@")), "{host_if} left on host");
    }
}
