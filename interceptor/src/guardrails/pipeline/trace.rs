//! The exchange's OpenTelemetry span, as the pipeline fills it: opened with
//! the exchange's [`Call`], then told each phase's news (the request's
//! model, each guardrail decision as an event, the response head, the first
//! streamed text, the answer's model, usage and finish reasons). The span
//! is exported when the exchange's last `Call` is dropped
//! ([`ExchangeSpan`]'s drop guard).
//!
//! Attribute names follow the OpenTelemetry GenAI semantic conventions
//! (`gen_ai.*`) and, for what they do not cover, ours (`interceptor.*`).
//! What is never an attribute: a header value, a query string, a key of
//! any kind (the path is recorded without its query); prompt and
//! completion text only with `guardrails.audit_prompts`.

use std::sync::Arc;

use opentelemetry::{Array, StringValue, Value};

use super::outcome::Outcome;
use crate::{
    guardrails::{
        backend::Call,
        genai::{self, ResponseFacts},
        model::{Decision, Direction, Provider},
        usage::Usage,
    },
    proxy::hook::Exchange,
    telemetry::otlp::{Attr, ExchangeSpan, Otlp},
};

const DECISION: &str = "interceptor.guardrail.decision";
const RULES: &str = "interceptor.guardrail.rules";
const GUARDRAIL_MS: &str = "interceptor.guardrail.latency_ms";

/// Opens the span of an exchange whose request head is `head`, continuing
/// the client's `traceparent`. Nothing when export is off or the trace is
/// not sampled.
pub(super) fn open(
    otlp: Option<&Arc<Otlp>>,
    ex: &Exchange,
    head: &http::request::Parts,
    provider: Provider,
    path: &str,
    recorded_path: &str,
    workload_key: &str,
) -> Option<Arc<ExchangeSpan>> {
    let otlp = otlp?;
    let header = |name: &str| head.headers.get(name).and_then(|v| v.to_str().ok());
    let operation = genai::operation(provider, path);
    let span = otlp.exchange_span(operation, header("traceparent"), header("tracestate"), |a| {
        a.set("gen_ai.operation.name", Attr::Str(operation));
        a.set("gen_ai.provider.name", Attr::Str(&genai::provider_name(provider, &ex.sni)));
        a.set("server.address", Attr::Str(&ex.sni));
        a.set("server.port", Attr::I64(i64::from(ex.orig_dst.0.port())));
        a.set("http.request.method", Attr::Str(head.method.as_str()));
        a.set("url.path", Attr::Str(recorded_path.split('?').next().unwrap_or_default()));
        a.set("client.address", Attr::Display(&ex.client.0.ip()));
        let Some(w) = &ex.workload else { return };
        if workload_key != "*" {
            a.set("interceptor.workload", Attr::Str(workload_key));
        }
        if w.pid != 0 {
            a.set("process.pid", Attr::I64(i64::from(w.pid)));
        }
        if !w.comm.is_empty() {
            a.set("process.executable.name", Attr::Str(&w.comm));
        }
        if let Some(exe) = &w.exe {
            a.set("process.executable.path", Attr::Str(exe));
        }
        if let Some(pod) = &w.pod {
            for (key, value) in [
                ("k8s.pod.name", Some(&pod.name)),
                ("k8s.namespace.name", Some(&pod.namespace)),
                ("k8s.pod.uid", Some(&pod.uid)),
                ("k8s.container.name", pod.container.as_ref()),
            ] {
                if let Some(value) = value.filter(|v| !v.is_empty()) {
                    a.set(key, Attr::Str(value));
                }
            }
        }
    })?;
    Some(Arc::new(span))
}

/// A decision of one direction: an event on the span, and the exchange's
/// decision so far (the gravest), rules and guardrail time. A block marks
/// the span failed; a request let through goes upstream now.
pub(super) fn decision(call: &Call, direction: Direction, outcome: &Outcome, latency_ms: f64, prompt: Option<&str>) {
    let Some(span) = &call.span else { return };
    let decision = outcome.decision();
    let prompt = prompt.map(|p| messages("user", p));
    span.update(|span| {
        if !span.has("interceptor.request_id") {
            // The first decision: the request's body may have said better
            // what it is (an MCP message) than its head did when the span
            // opened.
            span.set("interceptor.request_id", Attr::Str(&call.request_id));
            let operation = genai::operation(call.provider, &call.path);
            span.set("gen_ai.operation.name", Attr::Str(operation));
            span.rename(operation);
            span.set("gen_ai.provider.name", Attr::Str(&genai::provider_name(call.provider, &call.host)));
        }
        if let Some(model) = &call.model
            && !span.has("gen_ai.request.model")
        {
            span.set("gen_ai.request.model", Attr::Str(model));
            span.rename(format!("{} {model}", genai::operation(call.provider, &call.path)));
        }
        let attributes = [
            Some(("direction", Attr::Str(direction.as_str()))),
            Some(("decision", Attr::Str(decision.as_str()))),
            Some(("latency_ms", Attr::F64(latency_ms))),
            listed("rules", &outcome.rules),
            listed("detectors", &outcome.detectors),
            (!outcome.stages.is_empty()).then_some(("backends", Attr::List(&outcome.stages))),
            outcome.block.as_ref().map(|block| ("reason", Attr::Str(&block.reason))),
        ];
        span.event("interceptor.guardrail.decision", attributes.into_iter().flatten());

        let graver = |current: &str| rank(decision) > rank_of(current);
        span.with_attribute(DECISION, |old| match old {
            Some(Value::String(s)) if !graver(s.as_str()) => None,
            _ => Some(Value::from(decision.as_str())),
        });
        if !outcome.rules.is_empty() {
            span.with_attribute(RULES, |old| {
                let mut rules: Vec<StringValue> = match old {
                    Some(Value::Array(Array::String(rules))) => rules.clone(),
                    _ => Vec::new(),
                };
                for rule in &outcome.rules {
                    if !rules.iter().any(|r| r.as_str() == rule) {
                        rules.push(rule.clone().into());
                    }
                }
                Some(Value::Array(Array::String(rules)))
            });
        }
        span.with_attribute(GUARDRAIL_MS, |old| match old {
            Some(Value::F64(total)) => Some(Value::F64(total + latency_ms)),
            _ => Some(Value::F64(latency_ms)),
        });
        if let Some(prompt) = &prompt {
            span.set("gen_ai.input.messages", Attr::Str(prompt));
        }
        match &outcome.block {
            Some(block) => {
                span.set("error.type", Attr::Str("guardrail_blocked"));
                span.error(format!("blocked by guardrail {}: {}", block.rule, block.reason));
            }
            None if direction == Direction::Request => span.forwarded(),
            None => {}
        }
    });
}

/// The provider's response head arrived.
pub(super) fn response_head(call: &Call, status: http::StatusCode) {
    let Some(span) = &call.span else { return };
    span.update(|span| {
        span.set("http.response.status_code", Attr::I64(i64::from(status.as_u16())));
        if let Some(upstream) = span.since_forwarded() {
            span.set("interceptor.upstream.latency_ms", Attr::F64(upstream.as_secs_f64() * 1e3));
        }
        if status.is_server_error() || status.is_client_error() {
            span.set_default("error.type", Attr::Display(&status.as_u16()));
            if status.is_server_error() {
                span.error(format!("the provider answered {status}"));
            }
        }
    });
}

/// The first text of a streamed answer went by.
pub(super) fn first_token(call: &Call) {
    let Some(span) = &call.span else { return };
    span.update(|span| {
        if !span.has("gen_ai.response.time_to_first_chunk") {
            let since = span.since_forwarded().unwrap_or_else(|| span.elapsed());
            span.set("gen_ai.response.time_to_first_chunk", Attr::F64(since.as_secs_f64()));
            span.set("gen_ai.request.stream", Attr::Bool(true));
        }
    });
}

/// What the answer said of itself.
pub(super) fn response(call: &Call, facts: &ResponseFacts<'_>) {
    let Some(span) = &call.span else { return };
    let completion = facts.completion.as_deref().filter(|t| !t.is_empty()).map(|t| messages("assistant", t));
    span.update(|span| {
        if let Some(model) = &facts.model {
            span.set("gen_ai.response.model", Attr::Str(model));
        }
        if let Some(id) = &facts.id {
            span.set("gen_ai.response.id", Attr::Str(id));
        }
        if !facts.finish_reasons.is_empty() {
            span.set("gen_ai.response.finish_reasons", Attr::List(&facts.finish_reasons));
        }
        if let Some(completion) = &completion {
            span.set("gen_ai.output.messages", Attr::Str(completion));
        }
    });
}

/// The tokens the answer used.
pub(super) fn usage(call: &Call, usage: &Usage) {
    let Some(span) = &call.span else { return };
    span.update(|span| {
        span.set("gen_ai.usage.input_tokens", Attr::I64(usage.input_tokens as i64));
        span.set("gen_ai.usage.output_tokens", Attr::I64(usage.output_tokens as i64));
        if usage.estimated {
            span.set("interceptor.usage.estimated", Attr::Bool(true));
        }
    });
}

/// One message in the conventions' JSON shape (`gen_ai.input.messages`).
fn messages(role: &str, text: &str) -> String {
    serde_json::json!([{"role": role, "parts": [{"type": "text", "content": text}]}]).to_string()
}

/// An array attribute, unless it is empty.
fn listed<'a>(key: &'static str, list: &'a Vec<String>) -> Option<(&'static str, Attr<'a>)> {
    (!list.is_empty()).then_some((key, Attr::List(list)))
}

fn rank(decision: Decision) -> u8 {
    match decision {
        Decision::Allow => 0,
        Decision::Alert => 1,
        Decision::Error => 2,
        Decision::Modify => 3,
        Decision::Block => 4,
    }
}

fn rank_of(decision: &str) -> u8 {
    [Decision::Allow, Decision::Alert, Decision::Error, Decision::Modify, Decision::Block]
        .into_iter()
        .find(|d| d.as_str() == decision)
        .map_or(0, rank)
}
