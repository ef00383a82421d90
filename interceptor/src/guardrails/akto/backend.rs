//! Akto as a [`Backend`]: what each check sends (the request's
//! `requestPayload`, the response body, a stream window), how a verdict and
//! its `ModifiedPayload` become the pipeline's [`Verdict`], and the report of
//! a block the local engine made.

use std::sync::Arc;

use serde_json::Value;

use super::{AktoClient, AktoError, CallInfo, RemoteVerdict, merge_modified_payload};
use crate::guardrails::{
    backend::{Backend, BackendError, Check, Phase, Refusal, Rewrite, Verdict},
    model::Stage,
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
                let body = check.body();
                let payload = akto_payload(check.doc, &body);
                let call = CallInfo { request_body: body, ..call_info(check) };
                let v = self.check_request(&call, &payload).await.map_err(failed)?;
                let mut verdict = verdict(&v, "blocked by guardrail policy");
                if verdict.block.is_none()
                    && let Some(modified) = v.modified_payload
                {
                    verdict.rewrite = Some(match check.doc.map(|d| merge_modified_payload(d, &modified)) {
                        Some(Ok(merged)) => Rewrite::Doc(merged),
                        Some(Err(error)) => Rewrite::Unusable(error.to_string()),
                        None => Rewrite::Raw(modified),
                    });
                }
                Ok(verdict)
            }
            Phase::Response => {
                let (status, headers) = response_head(check);
                let payload = String::from_utf8_lossy(check.original);
                let v = self.check_response(&call_info(check), status, &headers, &payload).await.map_err(failed)?;
                let mut verdict = verdict(&v, "response blocked by guardrail policy");
                if verdict.block.is_none()
                    && let Some(modified) = v.modified_payload
                {
                    verdict.rewrite = Some(match check.doc.map(|d| merge_modified_payload(d, &modified)) {
                        Some(Ok(merged)) => Rewrite::Doc(merged),
                        _ => Rewrite::Unusable("unusable modified payload".into()),
                    });
                }
                Ok(verdict)
            }
            Phase::Stream => {
                let (status, headers) = response_head(check);
                let text = check.texts.iter().map(|t| t.text.as_str()).collect::<String>();
                let call = call_info(check);
                if check.wait {
                    let v = self.check_stream_batch(&call, status, &headers, &text).await.map_err(failed)?;
                    // A stream cannot take a modified payload.
                    return Ok(verdict(&v, "response blocked by guardrail policy"));
                }
                // Monitor: never wait on the network in the stream path.
                let akto = Arc::clone(self);
                tokio::spawn(async move {
                    match akto.check_stream_batch(&call, status, &headers, &text).await {
                        Ok(v) if v.block || !v.allowed => tracing::warn!(
                            request_id = %call.request_id,
                            reason = v.reason.as_deref().unwrap_or(""),
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
        let (akto, call, payload, rule, reason) = (
            Arc::clone(self),
            call_info(check),
            akto_payload(check.doc, check.original),
            rule.to_owned(),
            reason.to_owned(),
        );
        tokio::spawn(async move {
            if let Err(error) = akto.report_local_block(&call, &payload, &rule, &reason).await {
                tracing::debug!(%error, "could not report a local block to Akto");
            }
        });
    }
}

/// The call as Akto's body describes it.
fn call_info(check: &Check<'_>) -> CallInfo {
    let call = check.call;
    CallInfo {
        request_id: call.request_id.clone(),
        method: call.method.clone(),
        path: call.path.clone(),
        host: call.host.clone(),
        request_headers: visible_headers(&call.request_headers),
        request_body: call.request_body.clone(),
        client_ip: Some(call.client.0.ip()),
        dest_ip: Some(call.orig_dst.0.ip()),
        workload: call.workload.clone(),
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

/// What Akto's `requestPayload` holds for a request check: `{"messages":
/// [...]}` when the body has messages, else `{"raw": <body>}`.
fn akto_payload(doc: Option<&Value>, raw: &[u8]) -> String {
    match doc.and_then(|d| d.get("messages")) {
        Some(messages) => serde_json::json!({ "messages": messages }).to_string(),
        None => serde_json::json!({ "raw": String::from_utf8_lossy(raw) }).to_string(),
    }
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

    #[test]
    fn akto_payload_prefers_messages() {
        let doc = serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        assert_eq!(akto_payload(Some(&doc), b""), r#"{"messages":[{"role":"user","content":"hi"}]}"#);
        assert_eq!(akto_payload(None, b"plain"), r#"{"raw":"plain"}"#);
    }
}
