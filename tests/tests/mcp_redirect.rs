//! Privileged tests of MCP traffic with the redirect active, from unmodified
//! clients with no proxy settings: an MCP server over TLS (a fake
//! `mcp.example.test` at 198.18.0.10), and a plain-HTTP MCP server on a
//! configured loopback port (`mcp.plain`), in eBPF and iptables modes; and
//! the official MCP SDK's client and server, unmodified. A redirected
//! request is relayed to the server, inspected (an audit event), and a
//! `tools/call` carrying a private key never reaches the server.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Result, bail};
use interceptor::testing::{
    Cgroup, Interceptor, Netns,
    clients::{ClientEnv, HostsFile, HttpRequest, HttpVersion, ScratchDir, curl},
    in_netns,
    mcp::{FakeMcpServer, McpServerOptions, McpStep, mcp_client, private_key},
    provider::{FakeProvider, PROVIDER_IP, TestPki},
    require_privileges,
};
use interceptor_tests::{
    plain_http::{self, Answer},
    stage::{start_interceptor, trust_bundle},
};
use serde_json::{Value, json};

const MCP_HOST: &str = "mcp.example.test";
const PLAIN: &str = "127.0.0.1:8931";
const KEY: &str = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA0Z3VS5JJcds3xfn/ygWyF8PbnGy0AHB7MhgHcTz6sE2I2yPB\n-----END RSA PRIVATE KEY-----";

/// What the plain server received: (peer, body).
type Seen = Arc<Mutex<Vec<(SocketAddr, String)>>>;

/// A plain-HTTP JSON-RPC server bound in `netns`, answering each POST with
/// a tool result for its id.
fn plain_server(netns: &Netns, addr: SocketAddr) -> Result<Seen> {
    let listener = in_netns(netns, || std::net::TcpListener::bind(addr))??;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let seen: Seen = Arc::default();
    let record = Arc::clone(&seen);
    plain_http::serve(listener, move |peer, _, body| {
        let text = String::from_utf8_lossy(body).into_owned();
        let id = serde_json::from_str::<Value>(&text).ok().map(|v| v["id"].clone()).unwrap_or(Value::Null);
        record.lock().unwrap_or_else(|e| e.into_inner()).push((peer, text));
        Answer::json(&json!({"jsonrpc": "2.0", "id": id, "result": {"content": [{"type": "text", "text": "done"}]}}))
    });
    Ok(seen)
}

fn tools_call(id: u64, text: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": "save_note", "arguments": {"text": text}}})
}

fn mcp_request(url: &str, body: &Value) -> HttpRequest {
    HttpRequest::post_json(url, body).header("accept", "application/json, text/event-stream")
}

/// A namespace with the fake MCP server over TLS and a plain one on
/// loopback, and the interceptor redirecting the client cgroup.
struct Setup {
    netns: Netns,
    _root: Cgroup,
    _proxy_cg: Cgroup,
    client_cg: Cgroup,
    tls_server: FakeProvider,
    plain: Seen,
    proxy: Interceptor,
    hosts: HostsFile,
    bundle: std::path::PathBuf,
    _scratch: ScratchDir,
}

impl Setup {
    fn new(name: &str, redirect: &str) -> Result<Self> {
        let netns = Netns::new(name)?;
        netns.add_addr("lo", "198.18.0.10/32")?;
        let root = Cgroup::new(name)?;
        let proxy_cg = root.child("proxy")?;
        let client_cg = root.child("client")?;
        let pki = TestPki::new(&[MCP_HOST], &[PROVIDER_IP])?;
        let scratch = ScratchDir::new(name)?;
        let upstream_ca = pki.write_ca(scratch.path())?;
        let tls_server = FakeProvider::start_in(&netns, "198.18.0.10:443".parse()?, &pki)?;
        let plain = plain_server(&netns, PLAIN.parse()?)?;
        // The MCP server's name is an MCP domain; AI domains make it
        // intercepted by the domain policy of every release.
        let config = format!(
            "[targets]\ncidrs = [\"198.18.0.10\"]\nresolve_interval = \"1s\"\n\
             [domains]\nai_extra = [\"{MCP_HOST}\"]\n\
             [mcp]\ndomains_extra = [\"{MCP_HOST}\"]\nplain = [\"{PLAIN}\"]\n\
             [tls]\nupstream_ca = \"{}\"\n",
            upstream_ca.display()
        );
        let proxy = start_interceptor(&netns, &proxy_cg, &client_cg, &config, redirect)?;
        let bundle = trust_bundle(&proxy, &pki, scratch.path())?;
        let hosts = HostsFile::new(&[(PROVIDER_IP, MCP_HOST)])?;
        Ok(Self {
            netns,
            _root: root,
            _proxy_cg: proxy_cg,
            client_cg,
            tls_server,
            plain,
            proxy,
            hosts,
            bundle,
            _scratch: scratch,
        })
    }

    fn env(&self) -> ClientEnv<'_> {
        ClientEnv::new(&self.bundle).in_netns(&self.netns).in_cgroup(&self.client_cg).with_hosts(&self.hosts)
    }

    fn record(&self, local_port: u16) -> Result<Value> {
        self.proxy.wait_connection(Duration::from_secs(5), |e| {
            e["client"].as_str().is_some_and(|c| c.ends_with(&format!(":{local_port}")))
        })
    }

    /// The audit event of the request from client port `port`.
    async fn audit_event_from(&self, port: u16) -> Result<Value> {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let suffix = format!(":{port}");
        loop {
            let found =
                self.proxy.audit_events().into_iter().find(|e| {
                    e["direction"] == "request" && e["client"].as_str().is_some_and(|c| c.ends_with(&suffix))
                });
            if let Some(e) = found {
                return Ok(e);
            }
            if std::time::Instant::now() > deadline {
                bail!("no audit event from port {port}:\n{}", self.proxy.log_text());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A plain target is redirected, relayed as HTTP and inspected; a key in
    /// a tool call never reaches the server.
    async fn check_plain(&self, mode: &str) -> Result<()> {
        // The admin API shows the plain target beside the AI targets.
        let status = self.proxy.status(&self.netns)?;
        assert_eq!(status["targets"]["plain"][PLAIN], "127.0.0.1", "{mode}: {status:#}");
        let url = format!("http://{PLAIN}/mcp");
        let r = curl(&self.env(), &mcp_request(&url, &tools_call(1, "buy milk")), HttpVersion::Http11).await?;
        assert_eq!(r.status, 200, "{mode}: {}", String::from_utf8_lossy(&r.body));
        let answer: Value = serde_json::from_slice(&r.body)?;
        assert_eq!(answer["result"]["content"][0]["text"], "done", "{mode}: {answer}");
        let rec = self.record(r.local_port)?;
        assert_eq!(rec["mode"], "plain", "{mode}: {rec}");
        assert_eq!(rec["orig_dst"], PLAIN, "{mode}: {rec}");
        assert_eq!(rec["sni"], "127.0.0.1", "{mode}: {rec}");
        {
            // The server saw the proxy's upstream connection, not the client's.
            let seen = self.plain.lock().unwrap_or_else(|e| e.into_inner());
            assert_eq!(seen.len(), 1, "{mode}: {seen:?}");
            assert_ne!(seen[0].0.port(), r.local_port, "{mode}: reached the server directly");
            assert!(seen[0].1.contains("buy milk"), "{mode}");
        }
        let event = self.audit_event_from(r.local_port).await?;
        assert_eq!(event["host"], "127.0.0.1", "{mode}: {event}");

        let r =
            curl(&self.env(), &mcp_request(&url, &tools_call(2, &format!("keep this: {KEY}"))), HttpVersion::Http11)
                .await?;
        let body = String::from_utf8_lossy(&r.body).to_string();
        assert!(!body.contains("\"done\""), "{mode}: the server answered: {} {body}", r.status);
        // Refused in the session: a JSON-RPC error for the call, not a broken exchange.
        assert_eq!(r.status, 200, "{mode}: {body}");
        let answer: Value = serde_json::from_str(&body)?;
        assert_eq!(answer["id"], 2, "{mode}: {answer}");
        assert_eq!(answer["error"]["code"], -32001, "{mode}: {answer}");
        for (_, body) in self.plain.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            assert!(!body.contains("PRIVATE KEY"), "{mode}: the server received the key: {body}");
        }
        let event = self.audit_event_from(r.local_port).await?;
        assert_eq!(event["decision"], "block", "{mode}: {event}");
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mcp_client_over_tls_is_redirected_and_inspected() -> Result<()> {
    if !require_privileges("an_mcp_client_over_tls_is_redirected_and_inspected") {
        return Ok(());
    }
    let s = Setup::new("mcp_tls", "ebpf")?;
    let url = format!("https://{MCP_HOST}/mcp");
    let r = curl(&s.env(), &mcp_request(&url, &tools_call(1, "buy milk")), HttpVersion::Default).await?;
    let rec = s.record(r.local_port)?;
    assert_eq!(rec["mode"], "intercept", "{rec}");
    assert_eq!(rec["sni"], MCP_HOST, "{rec}");
    assert!(r.issuer.clone().unwrap_or_default().contains("interceptor CA"), "{:?}", r.issuer);
    let seen = s.tls_server.requests();
    assert!(
        seen.iter().any(|q| q.path == "/mcp" && String::from_utf8_lossy(&q.body).contains("buy milk")),
        "relayed: {seen:#?}"
    );
    let event = s.audit_event_from(r.local_port).await?;
    assert_eq!(event["host"], MCP_HOST, "{event}");

    let r =
        curl(&s.env(), &mcp_request(&url, &tools_call(2, &format!("keep this: {KEY}"))), HttpVersion::Default).await?;
    for q in s.tls_server.requests() {
        assert!(!String::from_utf8_lossy(&q.body).contains("PRIVATE KEY"), "the server received the key");
    }
    let event = s.audit_event_from(r.local_port).await?;
    assert_eq!(event["decision"], "block", "{event}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_mcp_server_on_a_configured_port_is_redirected_and_inspected_ebpf() -> Result<()> {
    if !require_privileges("a_plain_mcp_server_on_a_configured_port_is_redirected_and_inspected_ebpf") {
        return Ok(());
    }
    let s = Setup::new("mcp_plain", "ebpf")?;
    s.check_plain("ebpf").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_mcp_server_on_a_configured_port_is_redirected_and_inspected_iptables() -> Result<()> {
    if !require_privileges("a_plain_mcp_server_on_a_configured_port_is_redirected_and_inspected_iptables") {
        return Ok(());
    }
    let s = Setup::new("mcp_plain_ipt", "iptables")?;
    s.check_plain("iptables").await
}

/// The official MCP SDK's client, unmodified (no proxy setting, no MCP
/// configuration change, only the system's trust of the interceptor's CA),
/// in a covered cgroup, against the SDK's server over TLS on an address of
/// its own: named only in `mcp.domains_extra`, its tool calls are inspected
/// through the eBPF redirect. A harmless call goes through, a call carrying
/// a private key is answered with the JSON-RPC refusal and never reaches
/// the server, and each call is one `mcp_tool_call` event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unmodified_sdk_client_is_guarded_through_the_ebpf_redirect() -> Result<()> {
    if !require_privileges("an_unmodified_sdk_client_is_guarded_through_the_ebpf_redirect") {
        return Ok(());
    }
    let name = "mcp_sdk";
    let server_addr: SocketAddr = "198.18.0.11:443".parse()?;
    let netns = Netns::new(name)?;
    netns.add_addr("lo", "198.18.0.11/32")?;
    let root = Cgroup::new(name)?;
    let proxy_cg = root.child("proxy")?;
    let client_cg = root.child("client")?;
    let pki = TestPki::new(&[MCP_HOST], &[server_addr.ip()])?;
    let scratch = ScratchDir::new(name)?;
    let upstream_ca = pki.write_ca(scratch.path())?;
    let (cert, key) = pki.write_server_files(scratch.path())?;
    let options =
        McpServerOptions { bind: server_addr, ..McpServerOptions::tls(MCP_HOST, cert, key, "4111 1111 1111 1111") };
    let server = FakeMcpServer::start(&options, Some(&netns)).await?;
    let config = format!(
        "[targets]\ncidrs = [\"{}\"]\n[mcp]\ndomains_extra = [\"{MCP_HOST}\"]\n[tls]\nupstream_ca = \"{}\"\n",
        server_addr.ip(),
        upstream_ca.display()
    );
    let proxy = start_interceptor(&netns, &proxy_cg, &client_cg, &config, "ebpf")?;
    let bundle = trust_bundle(&proxy, &pki, scratch.path())?;
    let env = ClientEnv::new(&bundle).in_netns(&netns).in_cgroup(&client_cg).with_timeout(Duration::from_secs(60));

    let key = private_key();
    let steps = vec![
        McpStep::call("echo", json!({"text": "hello"})),
        McpStep::call("weather", json!({"city": "Paris", "notes": key})),
    ];
    let run = mcp_client(&env, &format!("https://{MCP_HOST}/mcp"), Some(server_addr), &[steps]).await?;
    assert_eq!(run.step(0, 0)?["content"][0]["text"], "hello", "{:#?}", run.session(0));
    let refused = run.step(0, 1)?;
    assert_eq!(refused["error"]["code"], -32001, "{refused:#}");
    assert!(!server.request_log().contains("PRIVATE KEY"), "the server received the key");
    assert!(server.requests()?.iter().all(|r| r.host.as_deref() == Some(MCP_HOST)));

    // Inspected by the interceptor, not reached around it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let calls: Vec<Value> = proxy.audit_events().into_iter().filter(|e| e["event"] == "mcp_tool_call").collect();
        let decision = |tool: &str| calls.iter().find(|e| e["mcp"]["tool"] == tool).map(|e| e["decision"].clone());
        if decision("echo").is_some() && decision("weather").is_some() {
            assert_eq!(decision("echo"), Some(json!("allow")), "{calls:#?}");
            assert_eq!(decision("weather"), Some(json!("block")), "{calls:#?}");
            assert!(calls.iter().all(|e| e["mcp"]["server"] == MCP_HOST), "{calls:#?}");
            break;
        }
        if std::time::Instant::now() > deadline {
            bail!("no tool call events: {calls:#?}\n{}", proxy.log_text());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
