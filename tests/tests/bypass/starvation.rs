//! Denial of inspection: clients send large bodies made of repeated
//! private-key headers (once about two thousand times the work of plain
//! text per byte, inline on the async workers) while other clients keep
//! using the provider. The hostile requests are blocked and never reach the
//! provider, the others are served, and the redirect's heartbeat never
//! lapses: nothing goes direct.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use interceptor::testing::{
    clients::{HttpRequest, HttpVersion, curl},
    require_privileges,
};
use interceptor_tests::stage::Stage;
use serde_json::{Value, json};

const CHAT: &str = "https://api.openai.com/v1/chat/completions";
const HEADER: &str = "-----BEGIN RSA PRIVATE KEY-----\n";

/// A chat request whose only message is `content`.
fn chat(content: &str) -> HttpRequest {
    HttpRequest::post_json(CHAT, &json!({"model": "gpt-4o", "messages": [{"role": "user", "content": content}]}))
}

/// The hostile body: about `bytes` of repeated key headers.
fn hostile(bytes: usize) -> HttpRequest {
    chat(&HEADER.repeat(bytes / HEADER.len()))
}

/// The named kernel counter from `/status`.
fn counter(status: &Value, name: &str) -> Option<u64> {
    status["counters"].as_array()?.iter().find(|c| c[0] == name).and_then(|c| c[1].as_u64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn repeated_key_headers_are_blocked_while_others_are_served_and_the_heartbeat_holds() -> Result<()> {
    if !require_privileges("repeated_key_headers_are_blocked_while_others_are_served_and_the_heartbeat_holds") {
        return Ok(());
    }
    // A short heartbeat timeout: a runtime held for a third of a second
    // would let new connections go direct.
    let stage = Stage::new("bp_starve", "ebpf", "[redirect]\nheartbeat_timeout = \"300ms\"\n")?;
    let env = stage.env().with_timeout(Duration::from_secs(120));
    let quick = stage.env().with_timeout(Duration::from_secs(20));

    // Three clients send hostile bodies of 4 MiB, one after the other, for
    // as long as the other clients run (at most 30 each).
    let others_done = AtomicBool::new(false);
    let hostile_clients = (0..3).map(|_| async {
        let mut results = Vec::new();
        while results.len() < 30 && !others_done.load(Ordering::SeqCst) {
            let started = Instant::now();
            let r = curl(&env, &hostile(4 << 20), HttpVersion::Http11).await?;
            results.push((r, started.elapsed()));
        }
        anyhow::Ok(results)
    });
    let hostile = futures_util::future::join_all(hostile_clients);
    // Meanwhile, other clients: each new connection is one more chance for
    // the redirect to have failed open.
    let others = async {
        let mut served = Vec::new();
        for i in 0..10 {
            let started = Instant::now();
            let r = curl(&quick, &chat(&format!("hello {i}")), HttpVersion::Http11).await;
            let failed = r.is_err();
            served.push((r, started.elapsed()));
            if failed {
                break;
            }
        }
        others_done.store(true, Ordering::SeqCst);
        served
    };
    let started = Instant::now();
    let (hostile, served) = tokio::join!(hostile, others);
    let took = started.elapsed();

    let mut hostile_count = 0;
    for results in hostile {
        let results = results?;
        assert!(!results.is_empty(), "a hostile client sent nothing");
        for (r, took) in results {
            eprintln!("hostile request: {} after {took:?}", r.status);
            assert_eq!(r.status, 403, "{}", r.body_text());
            assert!(r.body_text().contains("private_key"), "{}", r.body_text());
            hostile_count += 1;
        }
    }
    let mut ports = Vec::new();
    for (r, took) in served {
        let r = r?;
        assert_eq!(r.status, 200, "{}", r.verbose);
        eprintln!("other request: {} after {took:?}", r.status);
        ports.push((r.local_port, took));
    }
    eprintln!("{} other requests and {hostile_count} hostile ones in {took:?}", ports.len());
    for (port, took) in &ports {
        assert!(*took < Duration::from_secs(10), "a request took {took:?}");
        let rec = stage.record(*port)?;
        assert_eq!(rec["mode"], "intercept", "went direct: {rec}");
    }
    assert!(
        stage.provider.requests().iter().all(|r| !String::from_utf8_lossy(&r.body).contains("PRIVATE KEY")),
        "a hostile body reached the provider"
    );
    // Audit events are written in batches: wait (bounded) for all of them.
    let blocks = || {
        stage
            .proxy
            .audit_events()
            .into_iter()
            .filter(|a| a["event"] == "guardrail_decision" && a["decision"] == "block")
            .filter(|a| a["direction"] == "request")
            .filter(|a| a["detectors"].as_array().is_some_and(|d| d.iter().any(|d| d == "private_key")))
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while blocks() < hostile_count && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(blocks(), hostile_count, "an audit event names private_key for each hostile request");

    // The heartbeat never lapsed: a lapse is logged when it resumes.
    let log = stage.proxy.log_text();
    if let Some(e) = stage.proxy.events().into_iter().find(|e| e["event"] == "redirect_resumed") {
        bail!("the heartbeat lapsed: {e}\n{log}");
    }
    let status = stage.proxy.status(&stage.netns)?;
    let direct = counter(&status, "fail_open_direct").context("no fail_open_direct counter")?;
    assert_eq!(direct, 0, "connections went direct: {status}");
    Ok(())
}
