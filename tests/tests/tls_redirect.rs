//! Privileged end-to-end tests of interception with real clients: curl,
//! Python (`ssl`, `http.client`) and Node's built-in `fetch` (which ignores
//! proxy variables) in a test cgroup and namespace, resolving the providers'
//! real names to a fake provider at 198.18.0.10, with no proxy settings. The
//! eBPF redirect sends them to the interceptor, which terminates TLS with its
//! own CA and relays to the fake provider over verified TLS.

use anyhow::Result;
use interceptor::testing::{
    clients::{HttpRequest, HttpVersion, curl, node_fetch, python_https, python_sse, python_ws},
    provider::TEST_CA_NAME,
    require_privileges,
};
use interceptor_tests::stage::Stage;
const CHAT_URL: &str = "https://api.openai.com/v1/chat/completions";

fn chat() -> HttpRequest {
    HttpRequest::post_json(CHAT_URL, &HttpRequest::openai_chat_body("hello", false))
        .header("authorization", "Bearer sk-test-key")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_python_and_node_are_intercepted_with_our_certificate() -> Result<()> {
    if !require_privileges("curl_python_and_node_are_intercepted_with_our_certificate") {
        return Ok(());
    }
    let stage = Stage::new("tls_clients", "ebpf", "")?;
    let env = stage.env();

    for version in [HttpVersion::Http11, HttpVersion::Http2] {
        let r = curl(&env, &chat(), version).await?;
        assert_eq!(r.status, 200, "{}", r.verbose);
        let rec = stage.record(r.local_port)?;
        assert_eq!(rec["mode"], "intercept", "{rec}");
        assert_eq!(r.http_version, if version == HttpVersion::Http2 { "2" } else { "1.1" });
        let issuer = r.issuer.clone().unwrap_or_default();
        assert!(issuer.contains("interceptor CA"), "certificate not from our CA: {issuer}");
        assert!(r.subject.clone().unwrap_or_default().contains("api.openai.com"), "{:?}", r.subject);
        assert_eq!(rec["sni"], "api.openai.com");
        assert_eq!(rec["orig_dst"], "198.18.0.10:443");
        assert_eq!(rec["comm"], "curl");
    }

    let py = python_https(&env, &[chat(), chat(), HttpRequest::get("https://api.openai.com/status/204")]).await?;
    assert_eq!(py.statuses(), vec![200, 200, 204]);
    assert!(py.issuer.contains("interceptor CA"), "{}", py.issuer);
    assert_eq!(stage.records_of("python3")?["mode"], "intercept");

    let node = node_fetch(&env, &chat()).await?;
    assert_eq!(node.status, 200, "{}", node.body);
    assert!(node.body.contains("echo_len"), "{}", node.body);
    let rec = stage.records_of("node")?;
    assert_eq!(rec["mode"], "intercept", "{rec}");
    assert_eq!(rec["sni"], "api.openai.com");

    // Every request reached the provider with the client's SNI and headers.
    let seen = stage.provider.requests();
    let chats: Vec<_> = seen.iter().filter(|r| r.path == "/v1/chat/completions").collect();
    assert_eq!(chats.len(), 5, "{seen:#?}");
    assert!(chats.iter().all(|r| r.sni.as_deref() == Some("api.openai.com")));
    assert!(chats.iter().all(|r| r.header("authorization") == Some("Bearer sk-test-key")));
    // The provider saw the proxy, never the clients directly.
    assert!(stage.provider.handshake_log().len() < 5, "upstream connections are pooled");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_responses_arrive_chunk_by_chunk_through_the_proxy() -> Result<()> {
    if !require_privileges("streamed_responses_arrive_chunk_by_chunk_through_the_proxy") {
        return Ok(());
    }
    let stage = Stage::new("tls_sse", "ebpf", "")?;
    let env = stage.env();
    let sse = HttpRequest::get("https://api.openai.com/sse?n=5&interval_ms=200");
    for (client, result) in [("python", python_sse(&env, &sse).await?), ("node", node_fetch(&env, &sse).await?)] {
        assert_eq!(result.status, 200, "{client}");
        let data: Vec<_> = result.events.iter().filter(|e| e.data != "[DONE]").collect();
        assert_eq!(data.len(), 5, "{client}: {:?}", result.events);
        let (first, last) = (data[0].at_ms, data[4].at_ms);
        assert!(last - first >= 600.0, "{client}: events arrived together ({first} ms .. {last} ms): buffered");
    }
    assert_eq!(stage.records_of("python3")?["mode"], "intercept");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_works_through_the_proxy() -> Result<()> {
    if !require_privileges("websocket_echo_works_through_the_proxy") {
        return Ok(());
    }
    // `/ws` is no protocol the guardrails read: tunnelled only when the
    // operator says so (the default answers 426).
    let stage = Stage::new("tls_ws", "ebpf", "[guardrails]\nunknown_websocket = \"tunnel\"\n")?;
    let ws = python_ws(&stage.env(), "wss://api.openai.com/ws", &["hello", "second message"]).await?;
    assert_eq!(ws.status, 101);
    assert!(ws.accept_ok, "Sec-WebSocket-Accept must survive the proxy");
    let echoed: Vec<&str> = ws.echoes.iter().map(|f| f.text.as_str()).collect();
    assert_eq!(echoed, ["hello", "second message"]);
    assert!(ws.issuer.contains("interceptor CA"), "{}", ws.issuer);
    assert_eq!(stage.record(ws.local_port)?["mode"], "intercept");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_ai_name_on_a_shared_address_passes_through_with_the_providers_certificate() -> Result<()> {
    if !require_privileges("a_non_ai_name_on_a_shared_address_passes_through_with_the_providers_certificate") {
        return Ok(());
    }
    let stage = Stage::new("tls_pass", "ebpf", "")?;
    let r = curl(&stage.env(), &HttpRequest::get("https://passthrough.example/status/204"), HttpVersion::Http2).await?;
    assert_eq!(r.status, 204, "{}", r.verbose);
    let issuer = r.issuer.clone().unwrap_or_default();
    assert!(issuer.contains(TEST_CA_NAME), "passthrough must show the provider's own certificate: {issuer}");
    let rec = stage.record(r.local_port)?;
    assert_eq!(rec["mode"], "passthrough", "{rec}");
    assert_eq!(rec["reason"], "not an AI domain");
    assert_eq!(rec["sni"], "passthrough.example");
    assert_eq!(rec["comm"], "curl", "passthrough connections are attributed too");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interception_works_in_iptables_mode() -> Result<()> {
    if !require_privileges("interception_works_in_iptables_mode") {
        return Ok(());
    }
    let stage = Stage::new("tls_ipt", "iptables", "")?;
    let r = curl(&stage.env(), &chat(), HttpVersion::Http2).await?;
    assert_eq!(r.status, 200, "{}", r.verbose);
    assert!(r.issuer.clone().unwrap_or_default().contains("interceptor CA"));
    let rec = stage.record(r.local_port)?;
    assert_eq!(rec["mode"], "intercept", "{rec}");
    assert_eq!(rec["orig_dst"], "198.18.0.10:443");
    Ok(())
}
