//! Privileged tests of DNS-aware targeting: agents' DNS answers teach the
//! interceptor which addresses to redirect, before the agent can connect.
//! A fake resolver in the namespace hands out addresses the interceptor
//! never resolved itself; clients use the normal system resolver (glibc
//! `getaddrinfo` through /etc/resolv.conf) with no proxy settings.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use interceptor::testing::{Cgroup, Netns, require_privileges, tool, veth_pair};
use interceptor_tests::{
    dns_stage::{DnsStage, run_in, start_dns, start_relay_in},
    stage::start_interceptor,
};
use serde_json::Value;

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

/// Lines of a relay's log: one per query it got.
fn queries_seen(log: &std::path::Path) -> usize {
    std::fs::read_to_string(log).map(|t| t.lines().count()).unwrap_or(0)
}

async fn getent(stage: &DnsStage, resolv: &std::path::Path, name: &str) -> Result<(bool, String, Duration)> {
    let started = std::time::Instant::now();
    let out = stage.run_with(resolv, &["getent", "ahostsv4", name]).await?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ok((out.status.success(), text, started.elapsed()))
}

/// A host whose resolver is a systemd-resolved-like stub on 127.0.0.53 and
/// a node with a CoreDNS-like forwarder, both inside the covered cgroup,
/// both relaying to their own upstream (the stub to the CoreDNS-like
/// forwarder, that one to the namespace's resolver), and a dnsmasq-like
/// relay (unconnected sockets, replies checked against the upstream's
/// address): every query of theirs is redirected to the interceptor, which
/// sends it on to the server that was asked. Nothing goes round, names
/// resolve, and answers are still learned from.
async fn covered_resolvers_keep_resolving(redirect: &str) -> Result<()> {
    let stage = DnsStage::asking_clients_servers(&format!("dns_stub_{redirect}"), redirect)?;
    stage.netns.add_addr("lo", "198.18.0.54/32")?;
    stage.netns.add_addr("lo", "198.18.0.55/32")?;
    let coredns_log = stage.path("coredns.log");
    let stub_log = stage.path("stub.log");
    let dnsmasq_log = stage.path("dnsmasq.log");
    let _coredns = stage.start_relay("198.18.0.54", "198.18.0.53", true, &coredns_log).await?;
    let _stub = stage.start_relay("127.0.0.53", "198.18.0.54", true, &stub_log).await?;
    let _dnsmasq = stage.start_relay("198.18.0.55", "198.18.0.53", false, &dnsmasq_log).await?;
    let via_stub = stage.path("resolv.stub");
    std::fs::write(&via_stub, "nameserver 127.0.0.53\noptions timeout:2 attempts:2\n")?;
    let via_coredns = stage.path("resolv.coredns");
    std::fs::write(&via_coredns, "nameserver 198.18.0.54\noptions timeout:2 attempts:2\n")?;

    // A name that is not an AI domain, through the stub.
    let (ok, text, took) = getent(&stage, &via_stub, "example.test").await?;
    assert!(ok && text.contains("198.18.0.42"), "through the stub: {text}\n{}", stage.proxy.log_text());
    assert!(took < Duration::from_secs(2), "took {took:?}: a retry or a loop");
    eprintln!("{redirect}: getent through the stub and the CoreDNS-like forwarder took {took:?}");
    // Each query went through the stub once and through the CoreDNS-like
    // forwarder once: nothing went round.
    let (stub_seen, coredns_seen) = (queries_seen(&stub_log), queries_seen(&coredns_log));
    assert!((1..=4).contains(&stub_seen), "the stub saw {stub_seen} queries");
    assert_eq!(coredns_seen, stub_seen, "the CoreDNS-like forwarder saw {coredns_seen} queries");

    // An AI name through the stub: learned before the first connection.
    assert!(!has_net(&stage.targets()?, "198.18.0.40/32"), "not resolved by the interceptor itself");
    let bundle = stage.bundle.to_str().context("utf-8")?;
    first_connection_intercepted(&stage, &via_stub, bundle, "https://api.openai.com/status/204").await?;
    assert!(has_net(&stage.targets()?, "198.18.0.40/32"));

    // Through the CoreDNS-like forwarder alone, an AI name behind a CNAME.
    first_connection_intercepted(&stage, &via_coredns, bundle, "https://api.anthropic.com/status/204").await?;

    // Through the dnsmasq-like relay.
    let via_dnsmasq = stage.path("resolv.dnsmasq");
    std::fs::write(&via_dnsmasq, "nameserver 198.18.0.55\noptions timeout:2 attempts:2\n")?;
    let (ok, text, took) = getent(&stage, &via_dnsmasq, "example.test").await?;
    assert!(ok && text.contains("198.18.0.42"), "through the dnsmasq-like relay: {text}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert!((1..=4).contains(&queries_seen(&dnsmasq_log)), "{}", queries_seen(&dnsmasq_log));

    // A resolver asked over IPv6.
    stage.netns.run(&["addr", "add", "2001:db8::53/128", "dev", "lo", "nodad"])?;
    let _dns6 = start_dns(&stage.netns, "[2001:db8::53]:53".parse()?)?;
    let via_v6 = stage.path("resolv.v6");
    std::fs::write(&via_v6, "nameserver 2001:db8::53\noptions timeout:2 attempts:2\n")?;
    let (ok, text, took) = getent(&stage, &via_v6, "example.test").await?;
    assert!(ok && text.contains("198.18.0.42"), "asking an IPv6 resolver: {text}");
    assert!(took < Duration::from_secs(2), "took {took:?}");

    // A client asking the public-style resolver directly, over UDP and TCP.
    let (ok, text, _) = getent(&stage, &stage.resolv, "example.test").await?;
    assert!(ok && text.contains("198.18.0.42"), "asking the resolver directly: {text}");
    let out = stage
        .run(&[
            "python3",
            "-c",
            interceptor_tests::dns_stage::TCP_QUERY_PY,
            "198.18.0.53",
            "generativelanguage.googleapis.com",
        ])
        .await?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.trim() == "198.18.0.43",
        "dns over tcp: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(has_net(&stage.targets()?, "198.18.0.43/32"), "not learned over tcp");

    // Bounded, whatever was asked.
    let (stub_seen, coredns_seen) = (queries_seen(&stub_log), queries_seen(&coredns_log));
    eprintln!("{redirect}: the stub saw {stub_seen} queries, the CoreDNS-like forwarder {coredns_seen}");
    assert!(stub_seen <= 12, "the stub saw {stub_seen} queries");
    assert!(coredns_seen <= 24, "the CoreDNS-like forwarder saw {coredns_seen} queries");
    assert!(!stage.proxy.log_text().contains("dns loop"), "{}", stage.proxy.log_text());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn covered_stub_and_coredns_like_forwarder_keep_resolving_and_are_learned_from() -> Result<()> {
    if !require_privileges("covered_stub_and_coredns_like_forwarder_keep_resolving_and_are_learned_from") {
        return Ok(());
    }
    covered_resolvers_keep_resolving("ebpf").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn covered_stub_and_coredns_like_forwarder_keep_resolving_in_iptables_mode() -> Result<()> {
    if !require_privileges("covered_stub_and_coredns_like_forwarder_keep_resolving_in_iptables_mode") {
        return Ok(());
    }
    covered_resolvers_keep_resolving("iptables").await
}

/// The configuration that used to take a host's DNS down: the stub on
/// 127.0.0.53 named as the upstream, while the stub's own queries are
/// redirected back to the interceptor. The loop is refused after a few
/// rounds with an error naming it, instead of going round until timeouts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_upstream_whose_queries_come_back_is_refused_as_a_loop() -> Result<()> {
    if !require_privileges("a_configured_upstream_whose_queries_come_back_is_refused_as_a_loop") {
        return Ok(());
    }
    let stage = DnsStage::configured("dns_loop", "ebpf", "[\"127.0.0.53\"]")?;
    let stub_log = stage.path("stub.log");
    let _stub = stage.start_relay("127.0.0.53", "198.18.0.53", true, &stub_log).await?;
    let via_stub = stage.path("resolv.stub");
    std::fs::write(&via_stub, "nameserver 127.0.0.53\noptions timeout:2 attempts:1\n")?;
    let (ok, text, took) = getent(&stage, &via_stub, "example.test").await?;
    assert!(!ok, "resolved through a loop? {text}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    let seen = queries_seen(&stub_log);
    eprintln!("loop refused: getent failed after {took:?}; the stub saw {seen} queries");
    // getent asks once per family at most; each query is cut after
    // LOOP_DEPTH rounds.
    let bound = 2 * (interceptor::dns::LOOP_DEPTH as usize + 1);
    assert!(seen <= bound, "the stub saw {seen} queries (bound {bound})");
    let log = stage.proxy.log_text();
    assert!(log.contains("dns loop") && log.contains("example.test"), "{log}");
    Ok(())
}

/// A node and a pod (its own network namespace behind a veth, its own
/// cgroup under the attach point): a CoreDNS-like forwarder in the pod
/// relays to the node's resolver, and a client in the pod asks it. Both
/// queries reach the interceptor on the node from the pod's address; each
/// goes on to the server that was asked (the pod, then the node's
/// resolver). Names resolve and AI answers are learned from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coredns_like_forwarder_in_a_pod_keeps_resolving_and_is_learned_from() -> Result<()> {
    if !require_privileges("a_coredns_like_forwarder_in_a_pod_keeps_resolving_and_is_learned_from") {
        return Ok(());
    }
    let node = Netns::new("dnspod_node")?;
    let pod = Netns::new("dnspod_pod")?;
    let _veth = veth_pair(Some(&node), &pod, "198.18.1.1/24", "198.18.1.2/24")?;
    pod.run(&["route", "add", "default", "via", "198.18.1.1"])?;
    node.add_addr("lo", "198.18.0.53/32")?;
    let _dns = start_dns(&node, "198.18.0.53:53".parse()?)?;
    let root = Cgroup::new("dnspod_root")?;
    let agent_cg = Cgroup::new("dnspod_agent")?;
    let pod_cg = root.child("pod")?;
    let config = "[proxy]\naddress_v4 = \"198.18.1.1\"\naddress_v6 = \"\"\n[targets]\nmode = \"dns\"\ncidrs = []\n";
    let proxy = start_interceptor(&node, &agent_cg, &root, config, "ebpf")?;

    let dir = tempfile::tempdir()?;
    let coredns_log = dir.path().join("coredns.log");
    let _coredns =
        start_relay_in(&pod, &pod_cg, "198.18.1.2", "198.18.0.53", true, &coredns_log, &dir.path().join("ready"))
            .await?;
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(&resolv, "nameserver 198.18.1.2\noptions timeout:2 attempts:2\n")?;

    let started = std::time::Instant::now();
    let out = run_in(&pod, &pod_cg, &resolv, &["getent", "ahostsv4", "example.test"]).await?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("198.18.0.42"), "{text}\n{}", proxy.log_text());
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    let out = run_in(&pod, &pod_cg, &resolv, &["getent", "ahostsv4", "api.openai.com"]).await?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(has_net(&proxy.status(&node)?["targets"], "198.18.0.40/32"), "not learned through the pod's resolver");
    let seen = queries_seen(&coredns_log);
    assert!((2..=8).contains(&seen), "the CoreDNS-like forwarder saw {seen} queries");
    assert!(!proxy.log_text().contains("dns loop"), "{}", proxy.log_text());
    Ok(())
}

/// curl through the resolver file `resolv`: its very first connection to
/// `url` must meet the interceptor's CA (the answer was learned in time).
async fn first_connection_intercepted(
    stage: &DnsStage,
    resolv: &std::path::Path,
    bundle: &str,
    url: &str,
) -> Result<()> {
    let args = ["curl", "-sS", "-v", "-4", "--max-time", "10", "--cacert", bundle, "-o", "/dev/null", url];
    let out = stage.run_with(resolv, &args).await?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success() && err.contains("interceptor CA"), "first connection to {url} not intercepted: {err}");
    Ok(())
}
