//! `cargo xtask demo`: the interceptor end to end on a machine with no
//! internet and no API key. It builds a network namespace with a fake
//! provider at api.openai.com's usual name, starts the interceptor with the
//! eBPF redirect on a client cgroup, and shows an allowed, a redacted and a
//! blocked request and a streamed response through curl (no proxy settings),
//! with the audit events. Everything is removed at the end. Needs root.

use std::time::Instant;

use anyhow::Result;
use interceptor::testing::{
    clients::{HttpRequest, HttpVersion, curl, python_sse},
    require_privileges,
};
use interceptor_tests::stage::Stage;

fn chat(prompt: &str) -> HttpRequest {
    HttpRequest::post_json(
        "https://api.openai.com/v1/chat/completions",
        &serde_json::json!({"model": "gpt-4o", "messages": [{"role": "user", "content": prompt}]}),
    )
    .header("authorization", "Bearer sk-demo-not-a-real-key")
}

fn last_prompt(stage: &Stage) -> String {
    stage
        .provider
        .requests()
        .last()
        .and_then(|r| r.json().ok())
        .and_then(|v| v["messages"][0]["content"].as_str().map(str::to_string))
        .unwrap_or_default()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    if !require_privileges("demo") {
        anyhow::bail!("the demo needs root (network namespaces, cgroups, eBPF)");
    }
    println!("interceptor demo: a fake provider answers as api.openai.com at 198.18.0.10 inside a private");
    println!("network namespace; curl runs in a cgroup the eBPF redirect covers, with no proxy settings.\n");
    let stage = Stage::new("demo", "ebpf", "[guardrails]\nstream_mode = \"monitor\"\n")?;
    let env = stage.env();

    let r = curl(&env, &chat("What is the capital of France?"), HttpVersion::Http2).await?;
    println!("1. allowed   POST /v1/chat/completions \"What is the capital of France?\"");
    println!("             -> {} (certificate issuer: {})", r.status, r.issuer.clone().unwrap_or_default());
    println!("             the provider received: {:?}\n", last_prompt(&stage));

    let r = curl(&env, &chat("Charge my card 4111 1111 1111 1111 for the order"), HttpVersion::Http2).await?;
    println!("2. redacted  POST \"Charge my card 4111 1111 1111 1111 for the order\"");
    println!("             -> {}; the provider received: {:?}\n", r.status, last_prompt(&stage));

    let before = stage.provider.requests().len();
    let key = format!("-----BEGIN RSA PRIVATE KEY-----\n{}\n-----END RSA PRIVATE KEY-----", "MIIBOgIBAAJBAK".repeat(4));
    let r = curl(&env, &chat(&format!("Debug this deployment key:\n{key}")), HttpVersion::Http11).await?;
    println!("3. blocked   POST with a private key in the prompt");
    println!(
        "             -> {} {} (x-akto-guardrails-decision: {}); provider called: {}\n",
        r.status,
        r.body_text(),
        r.header("x-akto-guardrails-decision").unwrap_or("-"),
        stage.provider.requests().len() > before
    );

    let started = Instant::now();
    let s = python_sse(&env, &HttpRequest::get("https://api.openai.com/sse?n=5&interval_ms=200")).await?;
    let times: Vec<String> = s.events.iter().map(|e| format!("{:.0}", e.at_ms)).collect();
    println!("4. streamed  GET /sse (5 events, 200 ms apart) -> {}", s.status);
    println!(
        "             events arrived at {} ms: streamed, not buffered ({:.1} s)\n",
        times.join(", "),
        started.elapsed().as_secs_f64()
    );

    println!("audit events (one per decision; no prompt text, no secrets):");
    for audit in stage.proxy.audit_events() {
        println!(
            "  {:<8} {:<8} {:<22} rules={} detectors={}",
            audit["direction"].as_str().unwrap_or(""),
            audit["decision"].as_str().unwrap_or(""),
            audit["path"].as_str().unwrap_or(""),
            audit["rules"],
            audit["detectors"]
        );
    }
    println!("\nconnections (one line each):");
    for c in stage.proxy.connections() {
        println!(
            "  {} {} -> {} sni={} process={} pid={} requests={}",
            c["mode"].as_str().unwrap_or(""),
            c["client"].as_str().unwrap_or(""),
            c["orig_dst"].as_str().unwrap_or(""),
            c["sni"].as_str().unwrap_or("-"),
            c["comm"].as_str().unwrap_or("-"),
            c["pid"],
            c["requests"]
        );
    }
    drop(stage);
    println!("\ncleaned up: namespace, cgroups and eBPF programs removed.");
    Ok(())
}
