//! WebSocket: the Responses API's WebSocket mode and OpenAI Realtime text
//! (plain, and with `permessage-deflate` offered) carrying a private key,
//! from a real client in a redirected cgroup.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use interceptor::testing::{
    clients::{WsConversation, python_websockets},
    require_privileges,
};
use interceptor_tests::stage::Stage;
use serde_json::{Value, json};

fn key() -> String {
    format!("-----BEGIN RSA PRIVATE KEY-----\n{}\n-----END RSA PRIVATE KEY-----", "MIIBOgIBAAJBAK".repeat(4))
}

/// The interceptor's audit events (from its log).
fn audit_events(stage: &Stage) -> Vec<Value> {
    stage.proxy.audit_events()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_text_with_a_private_key_never_reaches_the_provider() -> Result<()> {
    if !require_privileges("websocket_text_with_a_private_key_never_reaches_the_provider") {
        return Ok(());
    }
    let stage = Stage::new("bp_ws", "ebpf", "")?;
    let env = stage.env();
    let responses = json!({"type": "response.create", "model": "gpt-5",
        "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": key()}]}]});
    let realtime = json!({"type": "conversation.item.create",
        "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": key()}]}});
    let cases = [
        ("wss://api.openai.com/v1/responses", &responses, false),
        ("wss://api.openai.com/v1/responses", &responses, true),
        ("wss://api.openai.com/v1/realtime?model=gpt-realtime", &realtime, false),
        ("wss://api.openai.com/v1/realtime?model=gpt-realtime", &realtime, true),
    ];
    for (url, message, deflate) in cases {
        let c = WsConversation {
            url: url.into(),
            connect_to: None,
            deflate,
            headers: Vec::new(),
            send: vec![message.to_string()],
            until: None,
        };
        let r = python_websockets(&env, &c).await?;
        assert_eq!(r.extensions, None, "{url} deflate {deflate}: an extension was negotiated");
        assert_eq!(r.close_code, Some(1008), "{url} deflate {deflate}: {r:?}");
        let error = r
            .received
            .iter()
            .filter_map(|m| serde_json::from_str::<Value>(m).ok())
            .find(|e| e["type"] == "error")
            .with_context(|| format!("{url}: no error event in {r:?}"))?;
        assert_eq!(error["error"]["code"], "guardrail_blocked", "{url}: {error}");
    }
    let leaked: Vec<_> = stage.provider.ws_messages().into_iter().filter(|m| m.text.contains("PRIVATE KEY")).collect();
    assert!(leaked.is_empty(), "the provider received the key: {leaked:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let blocks: Vec<Value> = audit_events(&stage)
            .into_iter()
            .filter(|e| e["decision"] == "block" && e["direction"] == "request")
            .filter(|e| {
                e["rules"].to_string().contains("private_key") || e["detectors"].to_string().contains("private_key")
            })
            .collect();
        if blocks.len() >= 4 {
            assert!(blocks.iter().all(|e| e["reasons"].as_array().is_some_and(|r| !r.is_empty())), "{blocks:?}");
            break;
        }
        if Instant::now() > deadline {
            bail!("expected four audited blocks naming the private key; log:\n{}", stage.proxy.log_text());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The connection records carry the WebSocket's bytes, written at its close.
    let records: Vec<Value> = stage.proxy.connections().into_iter().filter(|c| c["mode"] == "intercept").collect();
    assert!(records.iter().any(|c| c["bytes_up"].as_u64() > Some(100)), "{records:?}");
    Ok(())
}
