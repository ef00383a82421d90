//! The request phase of an MCP exchange: every JSON-RPC message the client
//! sends (one, or a batch) is checked on its own, a `tools/call` first
//! against the policy's tool lists. A refused request never reaches the
//! server: the client gets a JSON-RPC error for it in the same session
//! (`200`, the decision header); a batch holding a refused request is
//! refused whole, each request in it answered with an error. A refused
//! message that cannot be answered (a notification, or the client's answer
//! to a server request) gets the `403` block contract. The requests let
//! through wait in the session table for their answers.

use std::time::Instant;

use http::{StatusCode, header};
use serde_json::Value;

use super::{info, refusal, sessions::Pending, sessions::SessionKey, with_unread};
use crate::{
    audit::EventKind,
    guardrails::{
        backend::{Call, Phase},
        engine::{Action, ToolDenialReason, WorkloadRef},
        mcp::{self, Message},
        model::{Direction, PathSeg, Stage},
        pipeline::{
            Guardrails, Pipeline,
            outcome::{Block, Outcome},
        },
    },
    proxy::hook::RequestAction,
    respond,
};

impl Pipeline {
    /// Checks an MCP request body (decoded, UTF-8); `None` when it holds no
    /// JSON-RPC message, to be checked as any other body.
    pub(in crate::guardrails::pipeline) async fn mcp_request(
        &self,
        g: &Guardrails,
        call: &mut Call,
        head: &mut http::request::Parts,
        text: &[u8],
        started: Instant,
    ) -> Option<RequestAction> {
        let key = SessionKey { server: call.host.clone(), session: call.mcp_session.clone().unwrap_or_default() };
        if head.method == http::Method::DELETE && call.mcp_session.is_some() {
            self.mcp.sessions.end(&key);
        }
        let doc: Value = serde_json::from_slice(text).ok()?;
        let messages = mcp::parse_messages(&doc).ok()?;
        let mut doc = Some(doc);
        let mut overall = Outcome::default();
        // Per message: whether it was refused, and what its check decided.
        let mut checked: Vec<Outcome> = Vec::with_capacity(messages.len());
        for (prefix, msg) in &messages {
            let mut outcome = self.tool_lists(g, call, msg);
            if outcome.block.is_none() {
                let texts = with_unread(doc.as_ref(), prefix, mcp::request_texts(msg, prefix));
                outcome.absorb(self.check_texts(g, Phase::Request, call, &mut doc, texts, None).await);
            }
            checked.push(outcome);
        }
        for outcome in &checked {
            overall.absorb(outcome.clone());
        }
        let arguments = |msg: &Message| match msg {
            Message::Request { params: Some(p), .. } if g.cfg.audit_prompts => p.get("arguments").map(Value::to_string),
            _ => None,
        };
        let prompt = g.cfg.audit_prompts.then(|| {
            let texts = messages.iter().flat_map(|(prefix, m)| mcp::request_texts(m, prefix));
            texts.map(|t| t.text).collect::<Vec<_>>().join("\n")
        });
        let first_arguments = messages.iter().find_map(|(_, m)| arguments(m));
        let event_info = info(call, &messages, first_arguments);
        self.audit_as(
            g,
            call,
            EventKind::GuardrailDecision,
            Direction::Request,
            &overall,
            started,
            prompt,
            Some(event_info),
        )
        .await;

        if let Some(block) = &overall.block {
            // Every tool call of a refused body is refused with it.
            for ((_, msg), outcome) in messages.iter().zip(&checked) {
                if mcp::tool_name(msg).is_some() {
                    let mut refused = outcome.clone();
                    refused.block = Some(outcome.block.clone().unwrap_or_else(|| block.clone()));
                    let one = info(call, std::slice::from_ref(&(Vec::new(), msg.clone())), arguments(msg));
                    self.tool_call_done(g, call, Direction::Request, &refused, started, one).await;
                }
            }
            return Some(RequestAction::Respond(refuse(&doc_or_null(doc), &messages, &checked, block)));
        }

        for ((_, msg), outcome) in messages.iter().zip(&checked) {
            if let Message::Request { id, method, .. } = msg {
                let pending = Pending {
                    method: method.clone(),
                    tool: mcp::tool_name(msg).map(str::to_owned),
                    started,
                    decision: outcome.decision(),
                    rules: outcome.rules.clone(),
                    arguments: arguments(msg),
                };
                self.mcp.sessions.request(&key, id.to_string(), pending);
            }
        }
        if overall.modified
            && let Some(doc) = doc
        {
            head.headers.remove(header::CONTENT_ENCODING);
            let body: bytes::Bytes = doc.to_string().into();
            // Response checks that resend the request send what the server got.
            call.request_body = body.clone();
            return Some(RequestAction::ReplaceBody(body));
        }
        Some(RequestAction::Forward)
    }

    /// The policy's tool lists on a `tools/call`: refused or alerted when a
    /// list denies the tool to this workload on this server.
    fn tool_lists(&self, g: &Guardrails, call: &Call, msg: &Message) -> Outcome {
        let mut outcome = Outcome::default();
        let (Some(tool), Some(engine)) = (mcp::tool_name(msg), g.engine.as_ref()) else { return outcome };
        if !engine.has_tool_lists() {
            return outcome;
        }
        let workload = call.workload.as_ref().map(WorkloadRef::of);
        let Some(denial) = engine.tool_denial(&call.host, workload.as_ref(), tool) else { return outcome };
        outcome.stages.push(Stage::Local);
        outcome.note_rule(denial.list);
        let why = match denial.reason {
            ToolDenialReason::Denied => "is denied",
            ToolDenialReason::NotAllowed => "is not in the allowed tools",
        };
        let reason = format!("tool {tool:?} {why} by tool list {}", denial.list);
        if denial.action == Action::Block {
            outcome.block = Some(Block {
                status: StatusCode::FORBIDDEN,
                reason,
                stage: Stage::Local,
                rule: denial.list.to_owned(),
            });
        } else {
            outcome.alert = true;
            outcome.reasons.push(reason);
        }
        outcome
    }
}

fn doc_or_null(doc: Option<Value>) -> Value {
    doc.unwrap_or(Value::Null)
}

/// What a refused body is answered with: the JSON-RPC error of each of its
/// requests (an array for a batch), or the `403` contract when a refused
/// message is not a request, or the body holds no request to answer.
fn refuse(
    doc: &Value,
    messages: &[(Vec<PathSeg>, Message)],
    checked: &[Outcome],
    block: &Block,
) -> http::Response<http_body_util::Full<bytes::Bytes>> {
    let unanswerable =
        messages.iter().zip(checked).any(|((_, m), o)| o.block.is_some() && !matches!(m, Message::Request { .. }));
    let requests = messages.iter().filter(|(_, m)| matches!(m, Message::Request { .. })).count();
    if unanswerable || requests == 0 {
        return respond::blocked(block.status, &block.reason);
    }
    let errors: Vec<Value> = messages
        .iter()
        .zip(checked)
        .filter_map(|((_, m), o)| {
            let Message::Request { id, .. } = m else { return None };
            Some(match &o.block {
                Some(own) => refusal(id, &own.reason, &own.rule),
                None => refusal(id, &format!("refused with its batch: {}", block.reason), &block.rule),
            })
        })
        .collect();
    let body = if doc.is_array() { Value::Array(errors) } else { errors.into_iter().next().unwrap_or(Value::Null) };
    respond::blocked_json_rpc(body.to_string())
}
