//! A namespace with a fake DNS resolver and fake providers at addresses the
//! interceptor never resolved itself, the interceptor in DNS-aware targeting
//! mode, and clients that use the namespace's resolver through glibc: the
//! stage for privileged tests of what agents' DNS answers teach the
//! interceptor.

use std::{net::SocketAddr, path::PathBuf, process::Stdio, str::FromStr, time::Duration};

use anyhow::{Context, Result, bail};
use hickory_proto::{
    op::{Message, ResponseCode},
    rr::{
        Name, RData, Record, RecordType,
        rdata::{A, AAAA, CNAME},
    },
};
use interceptor::testing::{
    Cgroup, Interceptor, Netns, in_netns,
    provider::{FakeProvider, TestPki},
    spawn_in_tokio, tool,
};
use serde_json::Value;

use crate::stage::{start_interceptor, trust_bundle};

pub const TTL: u32 = 2;

/// The fake resolver's zone: api.openai.com at 198.18.0.40 (and
/// 2001:db8::40), api.anthropic.com through a CNAME to 198.18.0.41,
/// example.test at 198.18.0.42, and two names of one parent at 198.18.0.43
/// (generativelanguage.googleapis.com and www.googleapis.com).
pub fn answer(query: &[u8]) -> Option<Vec<u8>> {
    let query = Message::from_vec(query).ok()?;
    let q = query.queries.first()?.clone();
    let mut reply = Message::response(query.metadata.id, query.metadata.op_code);
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.add_query(q.clone());
    let name = |n: &str| Name::from_str(n).ok();
    let a = |owner: &str, ip: &str| Some(Record::from_rdata(name(owner)?, TTL, RData::A(A(ip.parse().ok()?))));
    let qname = q.name().to_ascii().trim_end_matches('.').to_lowercase();
    match (qname.as_str(), q.query_type()) {
        ("api.openai.com", RecordType::A) => reply.add_answer(a("api.openai.com.", "198.18.0.40")?),
        ("api.openai.com", RecordType::AAAA) => reply.add_answer(Record::from_rdata(
            name("api.openai.com.")?,
            TTL,
            RData::AAAA(AAAA("2001:db8::40".parse().ok()?)),
        )),
        ("api.anthropic.com", t) => {
            reply.add_answer(Record::from_rdata(
                name("api.anthropic.com.")?,
                TTL,
                RData::CNAME(CNAME(name("edge.cdn.test.")?)),
            ));
            if t == RecordType::A {
                reply.add_answer(a("edge.cdn.test.", "198.18.0.41")?);
            }
            &mut reply
        }
        ("example.test", RecordType::A) => reply.add_answer(a("example.test.", "198.18.0.42")?),
        ("generativelanguage.googleapis.com", RecordType::A) => {
            reply.add_answer(a("generativelanguage.googleapis.com.", "198.18.0.43")?)
        }
        ("www.googleapis.com", RecordType::A) => reply.add_answer(a("www.googleapis.com.", "198.18.0.43")?),
        ("example.test", _) => &mut reply,
        _ => {
            reply.metadata.response_code = ResponseCode::NXDomain;
            &mut reply
        }
    };
    reply.to_vec().ok()
}

/// Serves the zone over UDP and TCP at `addr` inside the namespace.
pub fn start_dns(netns: &Netns, addr: SocketAddr) -> Result<tokio::task::JoinHandle<()>> {
    let (socket, listener) = in_netns(netns, move || {
        Ok::<_, std::io::Error>((std::net::UdpSocket::bind(addr)?, std::net::TcpListener::bind(addr)?))
    })??;
    socket.set_nonblocking(true)?;
    listener.set_nonblocking(true)?;
    let socket = tokio::net::UdpSocket::from_std(socket)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    Ok(tokio::spawn(async move {
        let tcp = async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    while let Ok(len) = stream.read_u16().await {
                        let mut query = vec![0u8; usize::from(len)];
                        if stream.read_exact(&mut query).await.is_err() {
                            return;
                        }
                        let Some(reply) = answer(&query) else { return };
                        let Ok(len) = u16::try_from(reply.len()) else { return };
                        let mut frame = len.to_be_bytes().to_vec();
                        frame.extend_from_slice(&reply);
                        if stream.write_all(&frame).await.is_err() {
                            return;
                        }
                    }
                });
            }
        };
        let udp = async move {
            let mut buf = vec![0u8; 4096];
            while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
                if let Some(reply) = answer(&buf[..n]) {
                    let _ = socket.send_to(&reply, peer).await;
                }
            }
        };
        tokio::join!(tcp, udp);
    }))
}

/// A resolver that answers nothing itself: it asks `upstream` (port 53)
/// from a fresh UDP socket with an ID of its own and relays the answer.
/// `connected`: the socket is connected to the upstream, as
/// systemd-resolved's stub and CoreDNS's `forward` (Go) do; `unconnected`:
/// `sendto`/`recvfrom`, keeping only replies whose source is the upstream,
/// as dnsmasq does. It appends the address of each client to its log file
/// and creates `ready` once it listens.
pub const RELAY_PY: &str = r#"
import random, socket, struct, sys, threading
listen, upstream, log, ready, mode = sys.argv[1:6]
srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
srv.bind((listen, 53))
lock = threading.Lock()
def handle(query, peer):
    with lock, open(log, "a") as f:
        f.write(peer[0] + "\n")
    up = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    up.settimeout(5)
    try:
        qid = struct.pack("!H", random.randrange(65536))
        if mode == "connected":
            up.connect((upstream, 53))
            up.send(qid + query[2:])
        else:
            up.sendto(qid + query[2:], (upstream, 53))
        while True:
            reply, source = up.recvfrom(65535)
            if reply[:2] == qid and source == (upstream, 53):
                break
        srv.sendto(query[:2] + reply[2:], peer)
    except OSError:
        pass
    finally:
        up.close()
open(ready, "w").close()
while True:
    query, peer = srv.recvfrom(65535)
    if len(query) >= 12:
        threading.Thread(target=handle, args=(query, peer), daemon=True).start()
"#;

/// A DNS query over TCP to `server` port 53 for an A record; prints the
/// IPv4 addresses of the answer, one per line.
pub const TCP_QUERY_PY: &str = r#"
import socket, struct, sys
server, name = sys.argv[1], sys.argv[2]
q = struct.pack("!HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0)
q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack("!HH", 1, 1)
s = socket.create_connection((server, 53), timeout=10)
s.sendall(struct.pack("!H", len(q)) + q)
def read(n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise SystemExit("connection closed")
        b += c
    return b
r = read(struct.unpack("!H", read(2))[0])
ancount = struct.unpack("!H", r[6:8])[0]
i = len(q)  # the question comes back as it was asked
def skip_name(i):
    while r[i] != 0:
        if r[i] & 0xC0 == 0xC0:
            return i + 2
        i += 1 + r[i]
    return i + 1
for _ in range(ancount):
    i = skip_name(i)
    rtype, _, _, rdlen = struct.unpack("!HHIH", r[i:i + 10])
    i += 10
    if rtype == 1:
        print(".".join(str(x) for x in r[i:i + 4]))
    i += rdlen
"#;

/// Runs a command in `netns` and `cgroup` with `resolv` bind-mounted on
/// /etc/resolv.conf.
pub async fn run_in(
    netns: &Netns,
    cgroup: &Cgroup,
    resolv: &std::path::Path,
    cmd: &[&str],
) -> Result<std::process::Output> {
    let mut c = tokio::process::Command::new(tool("unshare"));
    c.args(["--mount", "--propagation", "private", "--"])
        .arg(tool("sh"))
        .args(["-c", r#"mount --bind "$1" /etc/resolv.conf && shift && exec "$@""#, "sh"])
        .arg(resolv)
        .args(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = spawn_in_tokio(&mut c, Some(netns), Some(cgroup))?;
    Ok(tokio::time::timeout(Duration::from_secs(30), child.wait_with_output()).await??)
}

/// Starts [`RELAY_PY`] on `listen`:53 in `netns` and `cgroup`, asking
/// `upstream` from `connected` or unconnected sockets. Returns once it
/// listens (it creates `ready`); its log is `log`.
pub async fn start_relay_in(
    netns: &Netns,
    cgroup: &Cgroup,
    listen: &str,
    upstream: &str,
    connected: bool,
    log: &std::path::Path,
    ready: &std::path::Path,
) -> Result<tokio::process::Child> {
    let mut c = tokio::process::Command::new("python3");
    c.args(["-c", RELAY_PY, listen, upstream])
        .arg(log)
        .arg(ready)
        .arg(if connected { "connected" } else { "unconnected" })
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = spawn_in_tokio(&mut c, Some(netns), Some(cgroup))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !ready.exists() {
        if let Some(status) = child.try_wait()? {
            let mut err = String::new();
            if let Some(mut stderr) = child.stderr.take() {
                use tokio::io::AsyncReadExt;
                let _ = stderr.read_to_string(&mut err).await;
            }
            bail!("relay on {listen} exited: {status}: {err}");
        }
        if std::time::Instant::now() > deadline {
            bail!("relay on {listen} not ready");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(child)
}

pub struct DnsStage {
    pub netns: Netns,
    _root: Cgroup,
    _proxy_cg: Cgroup,
    pub client_cg: Cgroup,
    pub providers: Vec<FakeProvider>,
    _dns: tokio::task::JoinHandle<()>,
    pub proxy: Interceptor,
    pub bundle: PathBuf,
    pub resolv: PathBuf,
    _dir: tempfile::TempDir,
}

impl DnsStage {
    pub fn new(name: &str, extra: &str) -> Result<Self> {
        Self::with_redirect(name, extra, "ebpf")
    }

    pub fn with_redirect(name: &str, extra: &str, redirect: &str) -> Result<Self> {
        Self::with_grace(name, extra, redirect, "1s")
    }

    /// With `learned_grace` for learned addresses (the other constructors
    /// use one second, so that tests can watch addresses expire).
    pub fn with_grace(name: &str, extra: &str, redirect: &str, learned_grace: &str) -> Result<Self> {
        Self::build(name, extra, redirect, learned_grace, "dns_upstreams = [\"198.18.0.53\"]")
    }

    /// Without configured DNS upstreams: the forwarder asks the server each
    /// client asked.
    pub fn asking_clients_servers(name: &str, redirect: &str) -> Result<Self> {
        Self::build(name, "", redirect, "1s", "")
    }

    /// With `upstreams` (a TOML list) as `targets.dns_upstreams`.
    pub fn configured(name: &str, redirect: &str, upstreams: &str) -> Result<Self> {
        Self::build(name, "", redirect, "1s", &format!("dns_upstreams = {upstreams}"))
    }

    fn build(name: &str, extra: &str, redirect: &str, learned_grace: &str, upstreams: &str) -> Result<Self> {
        let netns = Netns::new(name)?;
        for ip in ["198.18.0.40", "198.18.0.41", "198.18.0.42", "198.18.0.43", "198.18.0.53"] {
            netns.add_addr("lo", &format!("{ip}/32"))?;
        }
        netns.run(&["addr", "add", "2001:db8::40/128", "dev", "lo", "nodad"])?;
        let root = Cgroup::new(name)?;
        let proxy_cg = root.child("proxy")?;
        let client_cg = root.child("client")?;
        let pki = TestPki::new(
            &[
                "api.openai.com",
                "api.anthropic.com",
                "example.test",
                "generativelanguage.googleapis.com",
                "www.googleapis.com",
            ],
            &[],
        )?;
        let mut providers = Vec::new();
        for addr in ["198.18.0.40:443", "198.18.0.41:443", "198.18.0.42:443", "[2001:db8::40]:443", "198.18.0.43:443"] {
            providers.push(FakeProvider::start_in(&netns, addr.parse()?, &pki)?);
        }
        let dns = start_dns(&netns, "198.18.0.53:53".parse()?)?;
        let dir = tempfile::tempdir()?;
        let upstream_ca = pki.write_ca(dir.path())?;
        let config = format!(
            "[targets]\nmode = \"dns\"\ncidrs = []\n{upstreams}\nlearned_ttl_floor = \"1s\"\n\
             learned_grace = \"{learned_grace}\"\nresolve_interval = \"1s\"\n[tls]\nupstream_ca = \"{}\"\n{extra}\n",
            upstream_ca.display()
        );
        let proxy = start_interceptor(&netns, &proxy_cg, &client_cg, &config, redirect)?;
        let bundle = trust_bundle(&proxy, &pki, dir.path())?;
        let resolv = dir.path().join("resolv.conf");
        std::fs::write(&resolv, "nameserver 198.18.0.53\noptions timeout:2 attempts:2\n")?;
        Ok(Self {
            netns,
            _root: root,
            _proxy_cg: proxy_cg,
            client_cg,
            providers,
            _dns: dns,
            proxy,
            bundle,
            resolv,
            _dir: dir,
        })
    }

    /// Runs a command in the client cgroup and namespace with the fake
    /// resolver as its system resolver.
    pub async fn run(&self, cmd: &[&str]) -> Result<std::process::Output> {
        self.run_with(&self.resolv, cmd).await
    }

    /// Runs a command in the client cgroup and namespace with `resolv` as
    /// its /etc/resolv.conf.
    pub async fn run_with(&self, resolv: &std::path::Path, cmd: &[&str]) -> Result<std::process::Output> {
        run_in(&self.netns, &self.client_cg, resolv, cmd).await
    }

    /// curl to `url`; returns the certificate issuer it saw.
    pub async fn curl_issuer(&self, url: &str, extra: &[&str]) -> Result<String> {
        let bundle = self.bundle.to_str().context("utf-8")?;
        let mut args = vec!["curl", "-sS", "-v", "--max-time", "10", "--cacert", bundle, "-o", "/dev/null"];
        args.extend_from_slice(extra);
        args.push(url);
        let out = self.run(&args).await?;
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        if !out.status.success() {
            bail!("curl {url} failed: {err}");
        }
        err.lines()
            .find_map(|l| l.trim_start_matches(['*', ' ']).strip_prefix("issuer:"))
            .map(str::to_string)
            .context(err)
    }

    /// A scratch path for the test's own files.
    pub fn path(&self, file: &str) -> PathBuf {
        self._dir.path().join(file)
    }

    /// Starts [`RELAY_PY`] on `listen`:53 in the client cgroup (covered by
    /// the redirect, like every resolver on a host the interceptor covers at
    /// the cgroup root), asking `upstream` from `connected` or unconnected
    /// sockets. Returns once it listens; its log is `log`.
    pub async fn start_relay(
        &self,
        listen: &str,
        upstream: &str,
        connected: bool,
        log: &std::path::Path,
    ) -> Result<tokio::process::Child> {
        let ready = self.path(&format!("{listen}.ready"));
        start_relay_in(&self.netns, &self.client_cg, listen, upstream, connected, log, &ready).await
    }

    pub fn targets(&self) -> Result<Value> {
        Ok(self.proxy.status(&self.netns)?["targets"].clone())
    }
}
