//! Prometheus metrics, served on the admin port at `/metrics`.
//!
//! One [`Metrics`] is created at start and shared; recording is a lock-free
//! counter increment on label sets that already exist.

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

use crate::guardrails::model::{Decision, Direction, Stage};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    pub mode: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub provider: &'static str,
    pub direction: Direction,
    pub action: Decision,
    pub rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub backend: Stage,
    pub kind: &'static str,
}

// Label values are the names audit events use (`as_str`). Written by hand:
// the derive would write the variant's Rust name (`Block`, not `block`).
macro_rules! label_value_as_str {
    ($($t:ty),*) => {$(
        impl EncodeLabelValue for $t {
            fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
                EncodeLabelValue::encode(&self.as_str(), encoder)
            }
        }
    )*};
}
label_value_as_str!(Direction, Decision, Stage);

/// Which buffered body found the inspection budget used up.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BudgetLabels {
    pub body: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub connections: Family<ConnectionLabels, Counter>,
    pub decisions: Family<DecisionLabels, Counter>,
    pub backend_errors: Family<BackendLabels, Counter>,
    pub guardrail_seconds: Histogram,
    pub audit_write_errors: Counter,
    pub audit_events_dropped: Counter,
    /// Exchanges refused with 503 because the bodies buffered for
    /// inspection used the whole `guardrails.max_buffered_total`.
    pub inspection_budget_refusals: Family<BudgetLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("interceptor");
        let connections = Family::default();
        registry.register("connections", "Connections handled, by mode and outcome", connections.clone());
        let decisions = Family::default();
        registry.register(
            "guardrail_decisions",
            "Guardrail decisions by provider, direction, action and rule",
            decisions.clone(),
        );
        let backend_errors = Family::default();
        registry.register("guardrail_backend_errors", "Failed guardrail backend calls", backend_errors.clone());
        let guardrail_seconds = Histogram::new([0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]);
        registry.register(
            "guardrail_duration_seconds",
            "Time spent deciding one request or response",
            guardrail_seconds.clone(),
        );
        let audit_write_errors = Counter::default();
        registry.register(
            "audit_write_errors",
            "Audit events that could not be written to the audit file",
            audit_write_errors.clone(),
        );
        let audit_events_dropped = Counter::default();
        registry.register(
            "audit_events_dropped",
            "Audit events missing from the audit file (they are still in the log)",
            audit_events_dropped.clone(),
        );
        let inspection_budget_refusals = Family::default();
        registry.register(
            "inspection_budget_refusals",
            "Exchanges refused (503) because buffered bodies used the whole inspection budget, by body",
            inspection_budget_refusals.clone(),
        );
        Self {
            registry,
            connections,
            decisions,
            backend_errors,
            guardrail_seconds,
            audit_write_errors,
            audit_events_dropped,
            inspection_budget_refusals,
        }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_appear_in_the_exposition() {
        let m = Metrics::new();
        m.decisions
            .get_or_create(&DecisionLabels {
                provider: "openai_chat",
                direction: Direction::Request,
                action: Decision::Block,
                rule: "credentials".into(),
            })
            .inc();
        m.connections.get_or_create(&ConnectionLabels { mode: "intercept", outcome: "intercepted" }).inc();
        m.backend_errors.get_or_create(&BackendLabels { backend: Stage::Akto, kind: "timeout" }).inc();
        let text = m.encode();
        assert!(text.contains("interceptor_guardrail_decisions_total{provider=\"openai_chat\",direction=\"request\",action=\"block\",rule=\"credentials\"} 1"), "{text}");
        assert!(text.contains("interceptor_connections_total{mode=\"intercept\",outcome=\"intercepted\"} 1"), "{text}");
        assert!(
            text.contains("interceptor_guardrail_backend_errors_total{backend=\"akto\",kind=\"timeout\"} 1"),
            "{text}"
        );
    }
}
