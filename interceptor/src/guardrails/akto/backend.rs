//! Akto as a [`Backend`]: what each check sends (the request's
//! `requestPayload`, the response body, a stream window), how a verdict and
//! its `ModifiedPayload` become the pipeline's [`Verdict`], and the report of
//! a block the local engine made.

use std::sync::Arc;

use serde_json::Value;

use super::{AktoClient, AktoError, CallInfo, McpCall, RemoteVerdict, merge_modified_payload, shield};
use crate::guardrails::{
    backend::{Backend, BackendError, Check, Phase, Refusal, Rewrite, Verdict},
    model::{Provider, Stage},
};

#[async_trait::async_trait]
impl Backend for Arc<AktoClient> {
    fn stage(&self) -> Stage {
        Stage::Akto
    }

    fn reads_headers(&self) -> bool {
        true
    }

    /// Response checks resend the request as forwarded, as the addon does.
    fn resends_request_body(&self) -> bool {
        true
    }

    async fn check(&self, check: &Check<'_>) -> Result<Verdict, BackendError> {
        match check.phase {
            Phase::Request => {
                let call = CallInfo { request_body: check.body(), ..call_info(check) };
                let v = self.check_request(&call, check.doc).await.map_err(failed)?;
                judged(&v)?;
                let mut verdict = verdict(&v, REQUEST_BLOCKED);
                if verdict.block.is_none()
                    && let Some(modified) = v.modified_payload
                {
                    verdict.rewrite = Some(rewrite(check.doc, modified, call.mcp.is_some()));
                }
                Ok(verdict)
            }
            Phase::Response => {
                let (status, headers) = response_head(check);
                let call = call_info(check);
                let payload = match call.mcp {
                    None => String::from_utf8_lossy(check.original).into_owned(),
                    Some(_) => shield::response_payload(check.doc, &check.body()).map_err(failed)?,
                };
                let v = self.check_response(&call, status, &headers, &payload).await.map_err(failed)?;
                judged(&v)?;
                let mut verdict = verdict(&v, RESPONSE_BLOCKED);
                if verdict.block.is_none()
                    && let Some(modified) = v.modified_payload
                {
                    verdict.rewrite = Some(rewrite(check.doc, modified, call.mcp.is_some()));
                }
                Ok(verdict)
            }
            Phase::Stream => {
                let (status, headers) = response_head(check);
                let text = check.texts.iter().map(|t| t.text.as_str()).collect::<String>();
                let call = call_info(check);
                if check.wait {
                    let v = self.check_stream_batch(&call, status, &headers, &text).await.map_err(failed)?;
                    judged(&v)?;
                    // A stream cannot take a modified payload.
                    return Ok(verdict(&v, RESPONSE_BLOCKED));
                }
                // Monitor: never wait on the network in the stream path.
                let akto = Arc::clone(self);
                tokio::spawn(async move {
                    match akto.check_stream_batch(&call, status, &headers, &text).await {
                        Ok(v) if v.block || !v.allowed || v.unjudged() => tracing::warn!(
                            request_id = %call.request_id,
                            decision = v.decision(),
                            reason = v.reason.as_deref().or(v.error.as_deref()).unwrap_or(""),
                            "stream flagged by the remote guardrail (monitor mode: not cut)"
                        ),
                        Ok(_) => {}
                        Err(error) => tracing::debug!(%error, "stream batch check failed"),
                    }
                });
                Ok(Verdict::default())
            }
        }
    }

    /// Local blocks are reported to Akto as security events.
    fn report_block(&self, check: &Check<'_>, by: Stage, rule: &str, reason: &str) {
        if by == Stage::Akto {
            return;
        }
        let (akto, call, doc, rule, reason) = (
            Arc::clone(self),
            CallInfo { request_body: check.body(), ..call_info(check) },
            check.doc.cloned(),
            rule.to_owned(),
            reason.to_owned(),
        );
        tokio::spawn(async move {
            if let Err(error) = akto.report_local_block(&call, doc.as_ref(), &rule, &reason).await {
                tracing::debug!(%error, "could not report a local block to Akto");
            }
        });
    }
}

/// The addon's texts for a block without a `Reason`.
const REQUEST_BLOCKED: &str = "Blocked by Akto request guardrails";
const RESPONSE_BLOCKED: &str = "Blocked by Akto response guardrails";

/// A verdict Akto's guardrail service did not reach (`failOpen`, or an
/// `error`) is a failure of the backend, not an allow: the fail mode
/// decides. Open: forwarded, audited as `decision: "error"` with the reason,
/// counted as `guardrail_backend_errors{kind="fail_open"}` (or
/// `"service_error"`). Closed: refused with `503`, as when Akto cannot be
/// reached at all, since nothing was checked either way.
fn judged(v: &RemoteVerdict) -> Result<(), BackendError> {
    if !v.unjudged() {
        return Ok(());
    }
    let (kind, what) = if v.fail_open {
        ("fail_open", "its guardrail service failed open")
    } else {
        ("service_error", "its guardrail service reported an error")
    };
    let message = match &v.error {
        Some(error) => format!("{what} ({error})"),
        None => what.to_owned(),
    };
    Err(BackendError { kind, message })
}

/// A `ModifiedPayload` as a change to the body: JSON is merged into the
/// body ([`merge_modified_payload`]; an MCP call's into its JSON-RPC
/// messages, [`shield::merge_modified_payload`]); text that is not JSON
/// becomes a body that is not JSON either, as the addon writes it
/// (forwarding the original instead would let through what Akto redacted);
/// anything that does not fit the body is a failure, and the fail mode
/// decides.
fn rewrite(doc: Option<&Value>, modified: String, mcp: bool) -> Rewrite {
    let Some(doc) = doc else { return Rewrite::Raw(modified) };
    if mcp {
        return match shield::merge_modified_payload(doc, &modified) {
            Ok(merged) => Rewrite::Doc(merged),
            Err(error) => Rewrite::Unusable(error.to_string()),
        };
    }
    if serde_json::from_str::<serde::de::IgnoredAny>(&modified).is_err() {
        return Rewrite::Raw(modified);
    }
    match merge_modified_payload(doc, &modified) {
        Ok(merged) => Rewrite::Doc(merged),
        Err(error) => Rewrite::Unusable(error.to_string()),
    }
}

/// The call as Akto's body describes it.
fn call_info(check: &Check<'_>) -> CallInfo {
    let call = check.call;
    CallInfo {
        request_id: call.request_id.clone(),
        method: call.method.clone(),
        path: call.path.clone(),
        recorded_path: call.recorded_path.clone(),
        host: call.host.clone(),
        request_headers: visible_headers(&call.request_headers),
        request_body: call.request_body.clone(),
        client_ip: Some(call.client.0.ip()),
        dest_ip: Some(call.orig_dst.0.ip()),
        workload: call.workload.clone(),
        mcp: mcp_call(check),
    }
}

/// An MCP exchange goes in the shield's form, described from the client's
/// JSON-RPC request (the checked body in the request phase, the forwarded
/// request afterwards).
fn mcp_call(check: &Check<'_>) -> Option<McpCall> {
    let call = check.call;
    if !is_mcp(check) {
        return None;
    }
    let parsed;
    let request = match check.phase {
        Phase::Request => check.doc,
        Phase::Response | Phase::Stream => {
            parsed = serde_json::from_slice::<Value>(&call.request_body).ok();
            parsed.as_ref()
        }
    };
    Some(McpCall::new(&call.host, call.workload.as_ref(), request))
}

/// An MCP exchange: its request is a JSON-RPC 2.0 message or batch (no
/// provider API sends `"jsonrpc": "2.0"`), which is what Akto itself reads
/// MCP traffic by.
fn is_mcp(check: &Check<'_>) -> bool {
    if check.call.provider == Provider::Mcp {
        return true;
    }
    let parsed;
    let request = match check.phase {
        Phase::Request => check.doc,
        Phase::Response | Phase::Stream => {
            parsed = serde_json::from_slice::<Value>(&check.call.request_body).ok();
            parsed.as_ref()
        }
    };
    let json_rpc = |m: &Value| m.get("jsonrpc").and_then(Value::as_str) == Some("2.0");
    match request {
        Some(Value::Array(batch)) => batch.first().is_some_and(json_rpc),
        Some(message) => json_rpc(message),
        None => false,
    }
}

fn response_head(check: &Check<'_>) -> (u16, Vec<(String, String)>) {
    match check.response {
        Some((status, headers)) => (status.as_u16(), visible_headers(headers)),
        None => (200, Vec::new()),
    }
}

/// Headers the Akto call may see; the wire format drops credentials again.
fn visible_headers(headers: &http::HeaderMap) -> Vec<(String, String)> {
    headers.iter().filter_map(|(k, v)| v.to_str().ok().map(|v| (k.as_str().to_string(), v.to_string()))).collect()
}

/// Folds Akto's verdict: its rule and policy noted, its reason recorded; a
/// block (with `default_reason` when Akto gives none), or an alert when it
/// disallows without blocking.
fn verdict(v: &RemoteVerdict, default_reason: &str) -> Verdict {
    let mut verdict = Verdict {
        rules: v.rule.iter().chain(v.policy.iter()).cloned().collect(),
        reasons: v.reason.iter().cloned().collect(),
        ..Verdict::default()
    };
    if v.block {
        verdict.block = Some(Refusal {
            reason: v.reason.clone().unwrap_or_else(|| default_reason.to_string()),
            rule: v.rule.clone().or_else(|| v.policy.clone()).unwrap_or_default(),
        });
    } else if !v.allowed {
        verdict.alert = true;
    }
    verdict
}

fn failed(error: AktoError) -> BackendError {
    BackendError { kind: error.kind(), message: error.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote(tweak: impl FnOnce(&mut RemoteVerdict)) -> RemoteVerdict {
        let mut v = RemoteVerdict { allowed: true, ..RemoteVerdict::default() };
        tweak(&mut v);
        v
    }

    #[test]
    fn a_block_without_reason_says_what_the_addon_says() {
        let v = remote(|v| {
            v.allowed = false;
            v.block = true;
        });
        assert_eq!(verdict(&v, REQUEST_BLOCKED).block.unwrap().reason, "Blocked by Akto request guardrails");
        assert_eq!(verdict(&v, RESPONSE_BLOCKED).block.unwrap().reason, "Blocked by Akto response guardrails");
        let v = remote(|v| {
            v.block = true;
            v.reason = Some("card".into());
        });
        assert_eq!(verdict(&v, REQUEST_BLOCKED).block.unwrap().reason, "card");
    }

    #[test]
    fn an_unjudged_verdict_is_a_failure() {
        assert!(judged(&remote(|_| {})).is_ok());
        let e = judged(&remote(|v| {
            v.fail_open = true;
            v.error = Some("guardrails service timeout".into());
        }))
        .unwrap_err();
        assert_eq!(e.kind, "fail_open");
        assert_eq!(e.message, "its guardrail service failed open (guardrails service timeout)");
        let e = judged(&remote(|v| v.error = Some("scanner crashed".into()))).unwrap_err();
        assert_eq!(e.kind, "service_error");
        // A block stands, whatever else the verdict says.
        assert!(
            judged(&remote(|v| {
                v.block = true;
                v.fail_open = true;
            }))
            .is_ok()
        );
    }

    #[test]
    fn modified_payloads_become_rewrites() {
        let body = serde_json::json!({"model": "gpt-4.1", "input": "card 4111"});
        let echoed = serde_json::json!({"raw": {"model": "gpt-4.1", "input": "card [X]"}}).to_string();
        match rewrite(Some(&body), echoed, false) {
            Rewrite::Doc(doc) => assert_eq!(doc, serde_json::json!({"model": "gpt-4.1", "input": "card [X]"})),
            other => panic!("{other:?}"),
        }
        assert!(matches!(rewrite(Some(&body), "card [X]".into(), false), Rewrite::Raw(t) if t == "card [X]"));
        assert!(matches!(rewrite(None, "card [X]".into(), false), Rewrite::Raw(_)));
        let messages = serde_json::json!({"messages": []}).to_string();
        assert!(matches!(rewrite(Some(&body), messages, false), Rewrite::Unusable(_)));
    }

    /// Against a fake Akto service (the `testing` feature).
    #[cfg(feature = "testing")]
    mod fake_akto {
        use std::collections::BTreeMap;

        use super::super::*;
        use crate::{
            config::AktoConfig,
            guardrails::{backend::Call, model::Provider},
            net::{ClientAddr, OrigDstAddr},
            testing::akto::{FakeAkto, Reply},
            workload::Workload,
        };

        fn mcp_exchange(body: &serde_json::Value) -> Call {
            let mut headers = http::HeaderMap::new();
            headers.insert("authorization", http::HeaderValue::from_static("Bearer LEAKED"));
            headers.insert("mcp-session-id", http::HeaderValue::from_static("sess-1"));
            Call {
                request_id: "req-mcp".into(),
                provider: Provider::Generic,
                model: None,
                method: "POST".into(),
                path: "/mcp".into(),
                recorded_path: "/mcp".into(),
                host: "mcp.example.test".into(),
                client: ClientAddr("10.0.0.7:40000".parse().unwrap()),
                orig_dst: OrigDstAddr("192.0.2.10:443".parse().unwrap()),
                workload: Some(Workload { pid: 42, comm: "claude".into(), ..Default::default() }),
                workload_key: "comm:claude".into(),
                request_headers: headers,
                request_body: bytes::Bytes::from(serde_json::to_vec(body).unwrap()),
                mcp_session: Some("sess-1".into()),
                budget: None,
                span: None,
            }
        }

        fn check<'a>(
            phase: Phase,
            call: &'a Call,
            texts: &'a Arc<Vec<crate::guardrails::model::TextSpan>>,
            doc: &'a Value,
            original: &'a [u8],
        ) -> Check<'a> {
            Check {
                phase,
                call,
                texts,
                read_by_parser: 0,
                doc: Some(doc),
                original,
                raw_text: None,
                modified: false,
                response: None,
                instructions: false,
                wait: true,
            }
        }

        fn field(body: &Value, name: &str) -> Value {
            serde_json::from_str(body[name].as_str().unwrap()).unwrap()
        }

        #[tokio::test]
        async fn an_mcp_tool_call_reaches_akto_in_the_shields_form_and_its_block_blocks() {
            let fake = FakeAkto::start().unwrap();
            fake.set_request_reply(Reply::blocked("private key in tool arguments"));
            let akto = Arc::new(
                AktoClient::new(AktoConfig { url: fake.url(), app_name: "agents".into(), ..AktoConfig::default() })
                    .unwrap(),
            );
            let body = serde_json::json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
                "params": {"name": "write_file", "arguments": {"text": "-----BEGIN OPENSSH PRIVATE KEY-----"}}});
            let call = mcp_exchange(&body);
            let texts = Arc::new(Vec::new());
            let raw = serde_json::to_vec(&body).unwrap();
            let verdict = akto.check(&check(Phase::Request, &call, &texts, &body, &raw)).await.unwrap();
            let refusal = verdict.block.expect("akto's block blocks the tool call");
            assert_eq!(refusal.reason, "private key in tool arguments");

            let calls = fake.calls();
            assert_eq!(calls.len(), 1);
            let c = &calls[0];
            assert_eq!(c.path, "/api/http-proxy");
            assert_eq!(c.query, "guardrails=true&ingest_data=true");
            let sent = &c.body;
            assert_eq!(sent["path"], "/mcp");
            assert_eq!(sent["method"], "POST");
            assert_eq!(sent["type"], "HTTP/1.1");
            assert_eq!(sent["source"], "MIRRORING");
            assert_eq!(sent["statusCode"], "200");
            assert_eq!(sent["contextSource"], "ENDPOINT");
            assert_eq!(sent["responsePayload"], "{}");
            assert_eq!(field(sent, "requestPayload"), body, "the JSON-RPC tools/call itself");
            assert_eq!(
                field(sent, "tag"),
                serde_json::json!({"mcp-server": "MCP Server", "mcp-client": "claude", "source": "ENDPOINT"})
            );
            let headers: BTreeMap<String, String> =
                serde_json::from_str(sent["requestHeaders"].as_str().unwrap()).unwrap();
            assert_eq!(headers["host"], "agents.claude.mcp.example.test");
            assert_eq!(headers["x-mcp-server"], "mcp.example.test");
            assert_eq!(headers["mcp-session-id"], "sess-1");
            assert!(!headers.contains_key("authorization"));
            let metadata = field(sent, "metadata");
            assert_eq!(metadata["mcp-server"], "MCP Server");
            assert_eq!(metadata["mcp_tool"], "write_file");
            assert_eq!(metadata["mcp_method"], "tools/call");
            assert!(!sent.to_string().contains("LEAKED"));
        }

        #[tokio::test]
        async fn akto_redactions_go_back_into_the_json_rpc_body() {
            let fake = FakeAkto::start().unwrap();
            let akto = Arc::new(AktoClient::new(AktoConfig { url: fake.url(), ..AktoConfig::default() }).unwrap());
            let body = serde_json::json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
                "params": {"name": "pay", "arguments": {"card": "4111 1111 1111 1111"}}});
            let mut redacted = body.clone();
            redacted["params"]["arguments"]["card"] = serde_json::json!("[CARD]");
            fake.set_request_reply(Reply::modified(&redacted.to_string()));
            let call = mcp_exchange(&body);
            let texts = Arc::new(Vec::new());
            let raw = serde_json::to_vec(&body).unwrap();
            let verdict = akto.check(&check(Phase::Request, &call, &texts, &body, &raw)).await.unwrap();
            match verdict.rewrite {
                Some(Rewrite::Doc(doc)) => assert_eq!(doc, redacted),
                other => panic!("{other:?}"),
            }

            // The tool's result: the response check sends the request it
            // answers and the JSON-RPC result; a block blocks it too.
            fake.set_response_reply(Reply::blocked("card number in tool result"));
            let answer = serde_json::json!({"jsonrpc": "2.0", "id": 3,
                "result": {"content": [{"type": "text", "text": "charged 4111 1111 1111 1111"}]}});
            let raw = serde_json::to_vec(&answer).unwrap();
            let status_headers = http::HeaderMap::new();
            let mut response_check = check(Phase::Response, &call, &texts, &answer, &raw);
            response_check.response = Some((http::StatusCode::OK, &status_headers));
            let verdict = akto.check(&response_check).await.unwrap();
            assert_eq!(verdict.block.unwrap().reason, "card number in tool result");
            let c = fake.calls().pop().unwrap();
            assert_eq!(c.query, "response_guardrails=true&ingest_data=true");
            assert_eq!(field(&c.body, "requestPayload"), body);
            assert_eq!(field(&c.body, "responsePayload"), answer);
            assert_eq!(c.body["path"], "/mcp");
        }

        #[tokio::test]
        async fn llm_traffic_keeps_the_addons_form() {
            let fake = FakeAkto::start().unwrap();
            let akto = Arc::new(AktoClient::new(AktoConfig { url: fake.url(), ..AktoConfig::default() }).unwrap());
            let body = serde_json::json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]});
            let mut call = mcp_exchange(&body);
            call.path = "/v1/chat/completions".into();
            let texts = Arc::new(Vec::new());
            let raw = serde_json::to_vec(&body).unwrap();
            akto.check(&check(Phase::Request, &call, &texts, &body, &raw)).await.unwrap();
            let c = fake.calls().pop().unwrap();
            assert_eq!(c.body["path"], "/v1/chat/completions");
            assert_eq!(c.body["contextSource"], "AGENTIC");
            assert!(c.body["type"].is_null());
        }
    }
}
