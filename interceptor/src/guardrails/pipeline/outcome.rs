//! What the backends and the pipeline's own checks decided for one check,
//! accumulated in order ([`Outcome`]), and how a decision is recorded: one
//! audit event and the decision metrics. Also the records of what was not
//! inspected at all (bodies over a limit, unclassified connections).

use std::{sync::Arc, time::Instant};

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;

use super::{Guardrails, Pipeline, new_call, new_request_id, recorded_model, trace, workload_key};
use crate::{
    audit::{self, AuditEvent, EventDirection, EventKind, McpInfo, WorkloadInfo},
    config::{FailMode, OversizeAction},
    guardrails::{
        backend::Call,
        budgets::{Counting, Refusal},
        model::{Decision, Direction, Provider, Stage},
        providers,
        usage::Usage,
    },
    metrics::DecisionLabels,
    proxy::hook::{Exchange, Unclassified},
    respond::{self, Problem},
};

/// The `budget_counting` of `call`'s events.
pub(super) fn budget_counting(call: &Call) -> Option<Counting> {
    call.budget.as_ref().and_then(|t| t.counting())
}

/// What the backends decided for one check, accumulated in order.
#[derive(Clone, Default)]
pub(super) struct Outcome {
    pub block: Option<Block>,
    pub modified: bool,
    pub alert: bool,
    pub error: bool,
    pub rules: Vec<String>,
    pub detectors: Vec<String>,
    pub reasons: Vec<String>,
    /// Who took part, in order (the audit event's `backends`).
    pub stages: Vec<Stage>,
}

#[derive(Clone)]
pub(super) struct Block {
    pub status: StatusCode,
    pub reason: String,
    pub stage: Stage,
    pub rule: String,
}

impl Outcome {
    pub fn decision(&self) -> Decision {
        if self.block.is_some() {
            Decision::Block
        } else if self.modified {
            Decision::Modify
        } else if self.error {
            Decision::Error
        } else if self.alert {
            Decision::Alert
        } else {
            Decision::Allow
        }
    }

    pub fn note_rule(&mut self, rule: &str) {
        if !self.rules.iter().any(|r| r == rule) {
            self.rules.push(rule.to_string());
        }
    }

    pub fn note_detector(&mut self, detector: &str) {
        if !self.detectors.iter().any(|d| d == detector) {
            self.detectors.push(detector.to_string());
        }
    }

    /// Adds another check's outcome (of another message of the same body):
    /// its first block wins if there was none, everything else adds up.
    pub fn absorb(&mut self, other: Outcome) {
        if self.block.is_none() {
            self.block = other.block;
        }
        self.modified |= other.modified;
        self.alert |= other.alert;
        self.error |= other.error;
        for rule in &other.rules {
            self.note_rule(rule);
        }
        for detector in &other.detectors {
            self.note_detector(detector);
        }
        self.reasons.extend(other.reasons);
        for stage in other.stages {
            if !self.stages.contains(&stage) {
                self.stages.push(stage);
            }
        }
    }

    /// A backend (or decoding) failed: fail open (record) or closed (refuse).
    pub fn backend_failed(&mut self, stage: Stage, error: &str, mode: FailMode) {
        self.error = true;
        self.reasons.push(format!("{} unavailable: {error}", stage.as_str()));
        if mode == FailMode::Closed {
            self.block = Some(Block {
                status: StatusCode::SERVICE_UNAVAILABLE,
                reason: "guardrail backend unavailable".into(),
                stage,
                rule: "fail_closed".into(),
            });
        }
    }

    /// A body over the inspection limits, per the oversize policy: an alert
    /// when passed, and the response to send when blocked (the error the
    /// data plane sends for a body over `max_inspected_body`).
    pub fn oversize(
        &mut self,
        action: OversizeAction,
        problem: Problem,
        reason: String,
    ) -> Option<http::Response<Full<Bytes>>> {
        self.stages.push(Stage::Decode);
        match action {
            OversizeAction::Pass => {
                self.alert = true;
                self.reasons.push(reason);
                None
            }
            OversizeAction::Block => {
                let response = respond::error(problem, &reason);
                self.block =
                    Some(Block { status: problem.status(), reason, stage: Stage::Decode, rule: "oversize".into() });
                Some(response)
            }
        }
    }

    /// The audit event's reasons: the block's first.
    fn audit_reasons(&self) -> Vec<String> {
        self.block.iter().map(|b| b.reason.clone()).chain(self.reasons.iter().cloned()).collect()
    }
}

impl Pipeline {
    pub(super) fn record_metrics(
        &self,
        workload_key: &str,
        provider: Provider,
        direction: Direction,
        outcome: &Outcome,
        started: Instant,
    ) {
        self.metrics.guardrail_seconds.observe(started.elapsed().as_secs_f64());
        let action = outcome.decision();
        let workload = if workload_key == "*" { "unknown" } else { workload_key };
        self.metrics.workload_decision(workload, direction, action);
        let count = |rule: String| {
            self.metrics
                .decisions
                .get_or_create(&DecisionLabels { provider: provider.as_str(), direction, action, rule })
                .inc();
        };
        if outcome.rules.is_empty() {
            // The empty rule label allocates nothing.
            count(String::new());
        }
        for rule in &outcome.rules {
            count(rule.clone());
        }
    }

    /// Records a decision: its metrics and its audit event.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn audit(
        &self,
        g: &Guardrails,
        call: &Call,
        direction: Direction,
        outcome: &Outcome,
        started: Instant,
        prompt: Option<String>,
    ) {
        self.audit_as(g, call, EventKind::GuardrailDecision, direction, outcome, started, prompt, None).await;
    }

    /// Records a response's decision with the tokens the answer used: its
    /// audit event's `usage` and the token counters.
    pub(super) async fn audit_response(
        &self,
        g: &Guardrails,
        call: &Call,
        outcome: &Outcome,
        started: Instant,
        usage: Option<Usage>,
    ) {
        self.record_metrics(&call.workload_key, call.provider, Direction::Response, outcome, started);
        let workload = WorkloadInfo::of(call.workload.as_ref());
        let mut event = self.event(g, call, Direction::Response, outcome, started, None, workload);
        event.usage = self.count_usage(call, usage).await;
        event.budget_counting = budget_counting(call);
        self.audit.record(event).await;
    }

    /// Records a request refused by a budget, with the budget.
    pub(super) async fn audit_budget_refusal(
        &self,
        g: &Guardrails,
        call: &Call,
        outcome: &Outcome,
        started: Instant,
        refusal: Refusal,
    ) {
        self.record_metrics(&call.workload_key, call.provider, Direction::Request, outcome, started);
        let workload = WorkloadInfo::of(call.workload.as_ref());
        let mut event = self.event(g, call, Direction::Request, outcome, started, None, workload);
        event.budget_counting = refusal.counting;
        event.budget = Some(refusal);
        self.audit.record(event).await;
    }

    /// Counts the tokens of an answer, per workload, provider and model;
    /// returns them for the audit event.
    /// The answer's tokens are charged to the budgets the request was
    /// admitted under.
    pub(super) async fn count_usage(&self, call: &Call, usage: Option<Usage>) -> Option<Usage> {
        let usage = usage?;
        if let (Some(budgets), Some(ticket)) = (&self.budgets, &call.budget) {
            budgets.charge(ticket, usage.input_tokens.saturating_add(usage.output_tokens)).await;
        }
        trace::usage(call, &usage);
        let workload = if call.workload_key == "*" { "unknown" } else { call.workload_key.as_str() };
        let model = call.model.as_deref().unwrap_or("unknown");
        self.metrics.tokens_used(workload, call.provider.as_str(), model, usage.input_tokens, usage.output_tokens);
        Some(usage)
    }

    /// Records an event of `kind`: a decision (with its metrics) or an MCP
    /// tool call, with the exchange's `mcp` object when it is MCP.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn audit_as(
        &self,
        g: &Guardrails,
        call: &Call,
        kind: EventKind,
        direction: Direction,
        outcome: &Outcome,
        started: Instant,
        prompt: Option<String>,
        mcp: Option<McpInfo>,
    ) {
        if kind == EventKind::GuardrailDecision {
            self.record_metrics(&call.workload_key, call.provider, direction, outcome, started);
        }
        let workload = WorkloadInfo::of(call.workload.as_ref());
        let mut event = self.event(g, call, direction, outcome, started, prompt, workload);
        event.event = kind;
        event.mcp = mcp;
        self.audit.record(event).await;
    }

    /// The audit event of a decision.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn event(
        &self,
        g: &Guardrails,
        call: &Call,
        direction: Direction,
        outcome: &Outcome,
        started: Instant,
        prompt: Option<String>,
        workload: WorkloadInfo,
    ) -> AuditEvent {
        let latency_ms = started.elapsed().as_secs_f64() * 1e3;
        let prompt = if g.cfg.audit_prompts { prompt } else { None };
        trace::decision(call, direction, outcome, latency_ms, prompt.as_deref());
        AuditEvent {
            time: audit::Timestamp::now(),
            event: EventKind::GuardrailDecision,
            request_id: call.request_id.clone(),
            direction: direction.into(),
            decision: outcome.decision(),
            provider: call.provider.as_str(),
            host: call.host.clone(),
            path: call.recorded_path.clone(),
            method: call.method.clone(),
            model: call.model.clone(),
            rules: outcome.rules.clone(),
            detectors: outcome.detectors.clone(),
            reasons: outcome.audit_reasons(),
            backends: outcome.stages.clone(),
            latency_ms,
            client: call.client,
            orig_dst: call.orig_dst,
            workload,
            prompt,
            websocket: None,
            mcp: None,
            usage: None,
            budget: None,
            budget_counting: budget_counting(call),
        }
    }

    /// A body forwarded uninspected (over an inspection limit, oversize
    /// policy `pass`): an alert. `call` is the request phase's, when it ran.
    pub(super) async fn not_inspected(
        &self,
        ex: &Exchange,
        call: Option<Arc<Call>>,
        request: &http::request::Parts,
        response: bool,
        reason: &str,
    ) {
        let g = self.snapshot();
        let started = Instant::now();
        let call = call.unwrap_or_else(|| {
            // The request itself was not inspected: only its head is known.
            let mut call = new_call(self, &g, ex, request, Bytes::new());
            call.model = recorded_model(&g, &call, providers::model_from_path(&call.path));
            Arc::new(call)
        });
        let mut outcome = Outcome { alert: true, ..Outcome::default() };
        outcome.reasons.push(format!("not inspected: too large ({reason})"));
        let direction = if response { Direction::Response } else { Direction::Request };
        self.audit(&g, &call, direction, &outcome, started, None).await;
    }

    /// A connection to an AI address refused, or relayed uninspected, before
    /// any request.
    pub(super) async fn unclassified(&self, conn: &Unclassified<'_>) {
        let outcome = if conn.refused {
            let block = Block {
                status: StatusCode::FORBIDDEN,
                reason: format!("unclassified connection refused: {}", conn.reason),
                stage: Stage::Proxy,
                rule: "unclassified".into(),
            };
            Outcome { block: Some(block), rules: vec!["unclassified".into()], ..Outcome::default() }
        } else {
            Outcome { alert: true, reasons: vec![format!("not inspected: {}", conn.reason)], ..Outcome::default() }
        };
        self.record_metrics(
            &workload_key(conn.workload),
            Provider::Generic,
            Direction::Request,
            &outcome,
            Instant::now(),
        );
        self.audit
            .record(AuditEvent {
                time: audit::Timestamp::now(),
                event: EventKind::UnclassifiedConnection,
                request_id: new_request_id(),
                direction: EventDirection::Request,
                decision: outcome.decision(),
                provider: Provider::Generic.as_str(),
                host: conn.sni.unwrap_or_default().to_string(),
                path: String::new(),
                method: String::new(),
                model: None,
                rules: Vec::new(),
                detectors: Vec::new(),
                reasons: outcome.audit_reasons(),
                backends: Vec::new(),
                latency_ms: 0.0,
                client: conn.client,
                orig_dst: conn.orig_dst,
                workload: WorkloadInfo::of(conn.workload),
                prompt: None,
                websocket: None,
                mcp: None,
                usage: None,
                budget: None,
                budget_counting: None,
            })
            .await;
    }
}
