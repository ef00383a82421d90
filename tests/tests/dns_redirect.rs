//! Privileged tests of DNS-aware targeting: agents' DNS answers teach the
//! interceptor which addresses to redirect, before the agent can connect.
//! A fake resolver in the namespace hands out addresses the interceptor
//! never resolved itself; clients use the normal system resolver (glibc
//! `getaddrinfo` through /etc/resolv.conf) with no proxy settings.

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
    require_privileges, spawn_in_tokio, tool,
};
use interceptor_tests::stage::{start_interceptor, trust_bundle};
use serde_json::Value;

const TTL: u32 = 2;

/// The fake resolver's zone.
fn answer(query: &[u8]) -> Option<Vec<u8>> {
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
        ("example.test", _) => &mut reply,
        _ => {
            reply.metadata.response_code = ResponseCode::NXDomain;
            &mut reply
        }
    };
    reply.to_vec().ok()
}

/// Serves the zone over UDP at `addr` inside the namespace.
fn start_dns(netns: &Netns, addr: SocketAddr) -> Result<tokio::task::JoinHandle<()>> {
    let socket = in_netns(netns, move || std::net::UdpSocket::bind(addr))??;
    socket.set_nonblocking(true)?;
    let socket = tokio::net::UdpSocket::from_std(socket)?;
    Ok(tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
            if let Some(reply) = answer(&buf[..n]) {
                let _ = socket.send_to(&reply, peer).await;
            }
        }
    }))
}

struct DnsStage {
    netns: Netns,
    _root: Cgroup,
    _proxy_cg: Cgroup,
    client_cg: Cgroup,
    _providers: Vec<FakeProvider>,
    _dns: tokio::task::JoinHandle<()>,
    proxy: Interceptor,
    bundle: PathBuf,
    resolv: PathBuf,
    _dir: tempfile::TempDir,
}

impl DnsStage {
    fn new(name: &str, extra: &str) -> Result<Self> {
        Self::with_redirect(name, extra, "ebpf")
    }

    fn with_redirect(name: &str, extra: &str, redirect: &str) -> Result<Self> {
        let netns = Netns::new(name)?;
        for ip in ["198.18.0.40", "198.18.0.41", "198.18.0.42", "198.18.0.53"] {
            netns.add_addr("lo", &format!("{ip}/32"))?;
        }
        netns.run(&["addr", "add", "2001:db8::40/128", "dev", "lo", "nodad"])?;
        let root = Cgroup::new(name)?;
        let proxy_cg = root.child("proxy")?;
        let client_cg = root.child("client")?;
        let pki = TestPki::new(&["api.openai.com", "api.anthropic.com", "example.test"], &[])?;
        let mut providers = Vec::new();
        for addr in ["198.18.0.40:443", "198.18.0.41:443", "198.18.0.42:443", "[2001:db8::40]:443"] {
            providers.push(FakeProvider::start_in(&netns, addr.parse()?, &pki)?);
        }
        let dns = start_dns(&netns, "198.18.0.53:53".parse()?)?;
        let dir = tempfile::tempdir()?;
        let upstream_ca = pki.write_ca(dir.path())?;
        let config = format!(
            "[targets]\nmode = \"dns\"\ncidrs = []\ndns_upstreams = [\"198.18.0.53\"]\nlearned_ttl_floor = \"1s\"\n\
             learned_grace = \"1s\"\nresolve_interval = \"1s\"\n[tls]\nupstream_ca = \"{}\"\n{extra}\n",
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
            _providers: providers,
            _dns: dns,
            proxy,
            bundle,
            resolv,
            _dir: dir,
        })
    }

    /// Runs a command in the client cgroup and namespace with the fake
    /// resolver as its system resolver.
    async fn run(&self, cmd: &[&str]) -> Result<std::process::Output> {
        let mut c = tokio::process::Command::new(tool("unshare"));
        c.args(["--mount", "--propagation", "private", "--"])
            .arg(tool("sh"))
            .args(["-c", r#"mount --bind "$1" /etc/resolv.conf && shift && exec "$@""#, "sh"])
            .arg(&self.resolv)
            .args(cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let child = spawn_in_tokio(&mut c, Some(&self.netns), Some(&self.client_cg))?;
        Ok(tokio::time::timeout(Duration::from_secs(30), child.wait_with_output()).await??)
    }

    /// curl to `url`; returns the certificate issuer it saw.
    async fn curl_issuer(&self, url: &str, extra: &[&str]) -> Result<String> {
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

    fn targets(&self) -> Result<Value> {
        Ok(self.proxy.status(&self.netns)?["targets"].clone())
    }
}

fn has_net(targets: &Value, net: &str) -> bool {
    targets["nets"].as_array().is_some_and(|n| n.iter().any(|x| x == net))
}

const PY_GETADDRINFO: &str = r#"
import http.client, json, ssl, sys
ctx = ssl.create_default_context(cafile=sys.argv[1])
c = http.client.HTTPSConnection("api.openai.com", 443, context=ctx, timeout=10)
c.request("GET", "/status/204")
r = c.getresponse()
issuer = dict(x[0] for x in c.sock.getpeercert()["issuer"])
print(json.dumps({"status": r.status, "issuer": issuer.get("commonName", "")}))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addresses_from_agents_dns_answers_are_intercepted_on_the_first_connection() -> Result<()> {
    if !require_privileges("addresses_from_agents_dns_answers_are_intercepted_on_the_first_connection") {
        return Ok(());
    }
    let stage = DnsStage::new("dns_learn", "")?;
    assert!(!has_net(&stage.targets()?, "198.18.0.40/32"), "not resolved by the interceptor itself");

    // curl through glibc's resolver: the very first connection is intercepted.
    let issuer = stage.curl_issuer("https://api.openai.com/status/204", &["-4"]).await?;
    assert!(issuer.contains("interceptor CA"), "first connection not intercepted: {issuer}");
    // Python's getaddrinfo too.
    let out = stage.run(&["python3", "-c", PY_GETADDRINFO, stage.bundle.to_str().context("utf-8")?]).await?;
    let v: Value =
        serde_json::from_slice(&out.stdout).with_context(|| String::from_utf8_lossy(&out.stderr).to_string())?;
    assert_eq!(v["status"], 204);
    assert!(v["issuer"].as_str().is_some_and(|i| i.contains("interceptor CA")), "{v}");

    // `interceptor status` shows what was learned, per domain.
    let out = std::process::Command::new(tool("ip"))
        .args(["netns", "exec", stage.netns.name()])
        .arg(interceptor::testing::interceptor_bin())
        .arg("status")
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("redirect:  ebpf") && text.contains("api.openai.com"), "{text}");
    assert!(text.contains("dns_redirected"), "{text}");

    // The AAAA answer was learned too, and a CNAME chain from an AI domain.
    let targets = stage.targets()?;
    assert!(has_net(&targets, "2001:db8::40/128"), "AAAA not learned: {targets}");
    let issuer = stage.curl_issuer("https://api.anthropic.com/status/204", &["-4"]).await?;
    assert!(issuer.contains("interceptor CA"), "CNAME chain not learned: {issuer}");
    assert!(has_net(&stage.targets()?, "198.18.0.41/32"));

    // A name that is not an AI domain is not added.
    let issuer = stage.curl_issuer("https://example.test/status/204", &["-4"]).await?;
    assert!(!issuer.contains("interceptor CA"), "non-AI name intercepted: {issuer}");
    assert!(!has_net(&stage.targets()?, "198.18.0.42/32"));

    // After TTL (2s) + grace (1s) the address leaves the target set, and a
    // connection that skips DNS is no longer redirected.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while has_net(&stage.targets()?, "198.18.0.40/32") {
        assert!(std::time::Instant::now() < deadline, "learned address never expired");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let issuer = stage
        .curl_issuer("https://api.openai.com/status/204", &["--resolve", "api.openai.com:443:198.18.0.40"])
        .await?;
    assert!(!issuer.contains("interceptor CA"), "expired address still redirected: {issuer}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_ai_domain_in_the_config_is_learned_without_restart_and_a_broken_change_is_rejected() -> Result<()> {
    if !require_privileges("a_new_ai_domain_in_the_config_is_learned_without_restart_and_a_broken_change_is_rejected") {
        return Ok(());
    }
    let stage = DnsStage::new("dns_reload", "")?;
    let issuer = stage.curl_issuer("https://example.test/status/204", &["-4"]).await?;
    assert!(!issuer.contains("interceptor CA"), "{issuer}");

    let config = std::fs::read_to_string(stage.proxy.config_path())?;
    std::fs::write(stage.proxy.config_path(), format!("{config}\n[domains]\nai_extra = [\"example.test\"]\n"))?;
    stage.proxy.signal(nix::sys::signal::Signal::SIGHUP)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !stage.proxy.log_text().contains("configuration reloaded") {
        assert!(std::time::Instant::now() < deadline, "reload not applied:\n{}", stage.proxy.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let issuer = stage.curl_issuer("https://example.test/status/204", &["-4"]).await?;
    assert!(issuer.contains("interceptor CA"), "new AI domain not intercepted: {issuer}");

    // A broken change is rejected; the running policy keeps working.
    std::fs::write(stage.proxy.config_path(), format!("{config}\n[domains]\nai_extra = [\"a*b.test\"]\n"))?;
    stage.proxy.signal(nix::sys::signal::Signal::SIGHUP)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !stage.proxy.log_text().contains("config reload rejected") {
        assert!(std::time::Instant::now() < deadline, "broken config not reported:\n{}", stage.proxy.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let issuer = stage.curl_issuer("https://example.test/status/204", &["-4"]).await?;
    assert!(issuer.contains("interceptor CA"), "old policy lost: {issuer}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_tls_mode_intercepts_an_ai_name_on_an_unknown_address_and_passes_others() -> Result<()> {
    if !require_privileges("all_tls_mode_intercepts_an_ai_name_on_an_unknown_address_and_passes_others") {
        return Ok(());
    }
    // Switched to all-tls by a live configuration change.
    let stage = DnsStage::new("dns_alltls", "")?;
    let config = std::fs::read_to_string(stage.proxy.config_path())?.replace("mode = \"dns\"", "mode = \"all-tls\"");
    std::fs::write(stage.proxy.config_path(), config)?;
    stage.proxy.signal(nix::sys::signal::Signal::SIGHUP)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !has_net(&stage.targets()?, "0.0.0.0/0") {
        assert!(std::time::Instant::now() < deadline, "all-tls not applied:\n{}", stage.proxy.log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // An AI name on an address nobody learned (no DNS involved).
    let issuer = stage
        .curl_issuer("https://api.openai.com/status/204", &["--resolve", "api.openai.com:443:198.18.0.42"])
        .await?;
    assert!(issuer.contains("interceptor CA"), "AI SNI on an unknown address not intercepted: {issuer}");
    let issuer =
        stage.curl_issuer("https://example.test/status/204", &["--resolve", "example.test:443:198.18.0.42"]).await?;
    assert!(!issuer.contains("interceptor CA"), "non-AI SNI intercepted in all-tls mode: {issuer}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_learning_works_in_iptables_mode() -> Result<()> {
    if !require_privileges("dns_learning_works_in_iptables_mode") {
        return Ok(());
    }
    let stage = DnsStage::with_redirect("dns_ipt", "", "iptables")?;
    let issuer = stage.curl_issuer("https://api.openai.com/status/204", &["-4"]).await?;
    assert!(issuer.contains("interceptor CA"), "first connection not intercepted: {issuer}");
    assert!(has_net(&stage.targets()?, "198.18.0.40/32"));
    let issuer = stage.curl_issuer("https://example.test/status/204", &["-4"]).await?;
    assert!(!issuer.contains("interceptor CA"), "{issuer}");
    Ok(())
}
