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
                let call = CallInfo { request_body: check.body(), ..call_info(check) };
                let v = self.check_request(&call, check.doc).await.map_err(failed)?;
                judged(&v)?;
                let mut verdict = verdict(&v, REQUEST_BLOCKED);
                if verdict.block.is_none()
                    && let Some(modified) = v.modified_payload
                {
                    verdict.rewrite = Some(rewrite(check.doc, modified));
                }
                Ok(verdict)
            }
            Phase::Response => {
                let (status, headers) = response_head(check);
                let payload = String::from_utf8_lossy(check.original);
                let v = self.check_response(&call_info(check), status, &headers, &payload).await.map_err(failed)?;
                judged(&v)?;
                let mut verdict = verdict(&v, RESPONSE_BLOCKED);
                if verdict.block.is_none()
                    && let Some(modified) = v.modified_payload
                {
                    verdict.rewrite = Some(rewrite(check.doc, modified));
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
/// body ([`merge_modified_payload`]); text that is not JSON becomes the
/// body, as the addon writes it (forwarding the original instead would let
/// through what Akto redacted); JSON that does not fit the body is a
/// failure, and the fail mode decides.
fn rewrite(doc: Option<&Value>, modified: String) -> Rewrite {
    let Some(doc) = doc else { return Rewrite::Raw(modified) };
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
        match rewrite(Some(&body), echoed) {
            Rewrite::Doc(doc) => assert_eq!(doc, serde_json::json!({"model": "gpt-4.1", "input": "card [X]"})),
            other => panic!("{other:?}"),
        }
        assert!(matches!(rewrite(Some(&body), "card [X]".into()), Rewrite::Raw(t) if t == "card [X]"));
        assert!(matches!(rewrite(None, "card [X]".into()), Rewrite::Raw(_)));
        let messages = serde_json::json!({"messages": []}).to_string();
        assert!(matches!(rewrite(Some(&body), messages), Rewrite::Unusable(_)));
    }
}
