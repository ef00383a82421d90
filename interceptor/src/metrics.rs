//! Prometheus metrics, served on the admin port at `/metrics`.
//!
//! One [`Metrics`] is created at start and shared; recording is a lock-free
//! counter increment on label sets that already exist.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    sync::Mutex,
};

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::guardrails::model::{Decision, Direction, Stage};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    pub mode: ConnectionMode,
    pub outcome: ConnectionOutcome,
}

/// Declares a label enum whose values are written as the given strings, in
/// the metric labels and the connection log line alike. (The derive of
/// `EncodeLabelValue` writes variant names as they are spelled in Rust.)
macro_rules! label_enum {
    ($(#[$meta:meta])* pub enum $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            pub const ALL: &[Self] = &[$(Self::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text,)+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl EncodeLabelValue for $name {
            fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> fmt::Result {
                fmt::Write::write_str(encoder, self.as_str())
            }
        }
    };
}

label_enum! {
    /// How the proxy handled a connection.
    pub enum ConnectionMode {
        /// Not decided: refused or failed before classification.
        None => "none",
        /// TLS terminated and the HTTP inspected.
        Intercept => "intercept",
        /// TLS terminated as a non-AI sibling of an AI name: requests for AI
        /// names are answered 421, the rest relayed.
        Guard => "guard",
        /// Bytes relayed untouched.
        Passthrough => "passthrough",
        /// A plain-HTTP MCP target: HTTP relayed without TLS and inspected.
        Plain => "plain",
        /// Refused after classification (unclassifiable, AI-bound).
        Refused => "refused",
    }
}

label_enum! {
    /// How a connection ended.
    pub enum ConnectionOutcome {
        /// Closed with nothing else recorded.
        Closed => "closed",
        /// The original destination could not be read (not redirected to us).
        NoOriginalDst => "no_original_dst",
        /// Aimed at the proxy's own address.
        RefusedLoop => "refused_loop",
        /// Over `max_connections` at accept.
        OverMaxConnections => "over_max_connections",
        /// Over `max_connections_per_workload`.
        OverMaxConnectionsPerWorkload => "over_max_connections_per_workload",
        /// Bound for an AI address and not classifiable, refused.
        RefusedUnclassified => "refused_unclassified",
        /// The client closed before sending a ClientHello.
        ClientClosed => "client_closed",
        /// The client's TLS handshake did not finish in time.
        ClientTlsTimeout => "client_tls_timeout",
        /// The client refused our certificate.
        ClientRejectedCertificate => "client_rejected_certificate",
        /// The client's TLS handshake failed otherwise.
        ClientTlsFailed => "client_tls_failed",
        /// The server name cannot name an upstream.
        InvalidSni => "invalid_sni",
        /// A plain-HTTP target's client sent something that is not HTTP/1.1;
        /// answered 400 and closed.
        NotHttp => "not_http",
        /// Intercepted and served (an HTTP error is in the record's `error`).
        Intercepted => "intercepted",
        /// The original destination could not be reached for a relay.
        UpstreamConnectFailed => "upstream_connect_failed",
        /// Relayed to the end.
        Relayed => "relayed",
        /// The relay failed part way.
        RelayError => "relay_error",
    }
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

/// An MCP tool call: its server, tool and what the guardrails decided.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct McpToolCallLabels {
    pub server: String,
    pub tool: String,
    pub decision: Decision,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct McpServerLabels {
    pub server: String,
}

/// At most this many MCP servers get a label value of their own; later ones
/// are counted as "other".
pub const MAX_MCP_SERVER_LABELS: usize = 64;
/// At most this many tools per server get a label value of their own; later
/// ones are counted as "other".
pub const MAX_MCP_TOOL_LABELS: usize = 64;
/// The label value for servers and tools past the caps.
pub const OTHER_LABEL: &str = "other";

/// The server and tool label values given out so far, so that servers and
/// tools (names chosen by remote servers) cannot grow the metrics without
/// bound.
#[derive(Debug, Default)]
struct McpLabels {
    servers: HashMap<String, HashSet<String>>,
}

impl McpLabels {
    fn server(&mut self, server: &str) -> String {
        let server = label_text(server);
        if self.servers.contains_key(&server) {
            return server;
        }
        if self.servers.len() >= MAX_MCP_SERVER_LABELS {
            return OTHER_LABEL.to_owned();
        }
        self.servers.insert(server.clone(), HashSet::new());
        server
    }

    fn tool(&mut self, server: &str, tool: &str) -> (String, String) {
        let server = self.server(server);
        let tool = label_text(tool);
        let tools = self.servers.entry(server.clone()).or_default();
        if tools.contains(&tool) {
            return (server, tool);
        }
        if tools.len() >= MAX_MCP_TOOL_LABELS {
            return (server, OTHER_LABEL.to_owned());
        }
        tools.insert(tool.clone());
        (server, tool)
    }
}

/// A label value from a remote name: at most 64 characters of ASCII
/// letters, digits and `-_./:`, anything else as `_`.
fn label_text(text: &str) -> String {
    let text: String =
        text.chars().take(64).map(|c| if c.is_ascii_alphanumeric() || "-_./:".contains(c) { c } else { '_' }).collect();
    if text.is_empty() { "_".to_owned() } else { text }
}

label_enum! {
    /// Which tokens a count is of.
    pub enum TokenKind {
        Input => "input",
        Output => "output",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub workload: String,
    pub provider: &'static str,
    pub model: String,
    pub kind: TokenKind,
}

/// At most this many workloads get a label value of their own in the token
/// counters; later ones are counted as "other".
pub const MAX_WORKLOAD_LABELS: usize = 256;
/// At most this many models per provider get a label value of their own in
/// the token counters; later ones are counted as "other".
pub const MAX_MODEL_LABELS: usize = 64;

/// The workload and model label values of the token counters given out so
/// far (models are named by clients, workloads by the processes and pods
/// that run).
#[derive(Debug, Default)]
struct TokenLabelValues {
    workloads: HashSet<String>,
    models: HashMap<&'static str, HashSet<String>>,
    /// The input and output counters of label sets whose workload and model
    /// are their own label values, by workload, provider and model: an
    /// answer of a known workload and model counts without allocating.
    /// Bounded like the label values.
    counters: HashMap<String, HashMap<&'static str, HashMap<String, [Counter; 2]>>>,
}

impl TokenLabelValues {
    fn labels(&mut self, workload: &str, provider: &'static str, model: &str) -> (String, String) {
        let workload = bounded(&mut self.workloads, label_text(workload), MAX_WORKLOAD_LABELS);
        let model = bounded(self.models.entry(provider).or_default(), label_text(model), MAX_MODEL_LABELS);
        (workload, model)
    }
}

/// `value` if it already has a label or there is room for it, else "other".
fn bounded(given: &mut HashSet<String>, value: String, max: usize) -> String {
    if given.contains(&value) {
        return value;
    }
    if given.len() >= max {
        return OTHER_LABEL.to_owned();
    }
    given.insert(value.clone());
    value
}

/// Which buffered body found the inspection budget used up.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BudgetLabels {
    pub body: &'static str,
}

/// The budget (`[[budgets.limits]]`) a request was refused by: its name
/// (configured, at most `config::budgets::MAX_LIMITS` of them) and kind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RateLimitLabels {
    pub budget: String,
    pub kind: &'static str,
}

/// A decision of one workload's exchange.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkloadDecisionLabels {
    pub workload: String,
    pub direction: Direction,
    pub action: Decision,
}

/// The directions and actions of [`WorkloadDecisionLabels`], in the order
/// of a workload's cached counters.
const DIRECTIONS: [Direction; 2] = [Direction::Request, Direction::Response];
const ACTIONS: [Decision; 5] = [Decision::Allow, Decision::Modify, Decision::Block, Decision::Alert, Decision::Error];

/// Which OpenTelemetry signal (`traces`, `logs`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SignalLabels {
    pub signal: &'static str,
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
    /// 1 while the Kubernetes pod directory cannot reach (or is refused by)
    /// the API server.
    pub pod_directory_degraded: Gauge,
    /// Pods the directory knows.
    pub pod_directory_pods: Gauge,
    /// Passthrough connections relayed by copying because no pipes could be
    /// made for splicing them (descriptor limits).
    pub passthrough_copy_fallbacks: Counter,
    /// MCP tool calls by server, tool and decision (through
    /// [`Metrics::mcp_tool_call`], which bounds the label values).
    mcp_tool_calls: Family<McpToolCallLabels, Counter>,
    /// MCP tool definitions that changed since they were pinned, by server.
    mcp_tool_changes: Family<McpServerLabels, Counter>,
    mcp_labels: Mutex<McpLabels>,
    /// Tokens used, by workload, provider, model and kind (through
    /// [`Metrics::tokens_used`], which bounds the label values).
    tokens: Family<TokenLabels, Counter>,
    token_labels: Mutex<TokenLabelValues>,
    /// Requests refused (429) by a budget, by budget and kind.
    pub budget_refusals: Family<RateLimitLabels, Counter>,
    /// Budget counter operations done on this node alone because Redis
    /// (`budgets.redis_url`) could not be reached in time.
    pub budget_redis_fallbacks: Counter,
    /// Decisions by workload, direction and action (through
    /// [`Metrics::workload_decision`], which bounds the workloads like the
    /// token counters).
    workload_decisions: Family<WorkloadDecisionLabels, Counter>,
    /// A workload's counters, by its key: direction × action.
    workload_counters: Mutex<HashMap<String, [[Counter; ACTIONS.len()]; DIRECTIONS.len()]>>,
    /// Spans and log records dropped before OTLP export (queue full).
    pub otlp_dropped: Family<SignalLabels, Counter>,
    /// Spans and log records whose OTLP export failed.
    pub otlp_export_failures: Family<SignalLabels, Counter>,
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
        let pod_directory_degraded = Gauge::default();
        registry.register(
            "pod_directory_degraded",
            "1 while the Kubernetes pod directory cannot list or watch pods (connections are named by pod UID only)",
            pod_directory_degraded.clone(),
        );
        let pod_directory_pods = Gauge::default();
        registry.register(
            "pod_directory_pods",
            "Pods of this node the pod directory knows",
            pod_directory_pods.clone(),
        );
        let passthrough_copy_fallbacks = Counter::default();
        registry.register(
            "passthrough_copy_fallbacks",
            "Passthrough connections relayed by copying, for want of pipes to splice them in the kernel",
            passthrough_copy_fallbacks.clone(),
        );
        let mcp_tool_calls = Family::default();
        registry.register(
            "mcp_tool_calls",
            "MCP tool calls by server, tool and decision (servers and tools past a cap are \"other\")",
            mcp_tool_calls.clone(),
        );
        let mcp_tool_changes = Family::default();
        registry.register(
            "mcp_tool_changes",
            "MCP tool definitions that changed since they were first seen, by server",
            mcp_tool_changes.clone(),
        );
        let tokens = Family::default();
        registry.register(
            "tokens",
            "Tokens used by successful answers, by workload, provider, model and kind (input or output; workloads \
             and models past a cap are \"other\")",
            tokens.clone(),
        );
        let budget_refusals = Family::default();
        registry.register(
            "budget_refusals",
            "Requests refused (429) by a budget or rate limit, by budget name and kind",
            budget_refusals.clone(),
        );
        let budget_redis_fallbacks = Counter::default();
        registry.register(
            "budget_redis_fallbacks",
            "Budget counter operations done on this node alone because Redis could not be reached in time",
            budget_redis_fallbacks.clone(),
        );
        let workload_decisions = Family::default();
        registry.register(
            "workload_decisions",
            "Guardrail decisions by workload, direction and action (workloads past a cap are \"other\")",
            workload_decisions.clone(),
        );
        let otlp_dropped = Family::default();
        registry.register(
            "otlp_dropped",
            "Spans and log records dropped before OpenTelemetry export because its queue was full, by signal",
            otlp_dropped.clone(),
        );
        let otlp_export_failures = Family::default();
        registry.register(
            "otlp_export_failures",
            "Spans and log records whose OpenTelemetry export failed, by signal",
            otlp_export_failures.clone(),
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
            pod_directory_degraded,
            pod_directory_pods,
            passthrough_copy_fallbacks,
            mcp_tool_calls,
            mcp_tool_changes,
            mcp_labels: Mutex::default(),
            tokens,
            token_labels: Mutex::default(),
            budget_refusals,
            budget_redis_fallbacks,
            workload_decisions,
            workload_counters: Mutex::default(),
            otlp_dropped,
            otlp_export_failures,
        }
    }

    /// Counts one MCP tool call.
    pub fn mcp_tool_call(&self, server: &str, tool: &str, decision: Decision) {
        let (server, tool) = self.mcp_labels().tool(server, tool);
        self.mcp_tool_calls.get_or_create(&McpToolCallLabels { server, tool, decision }).inc();
    }

    /// Counts `changed` tool definitions of `server` that changed.
    pub fn mcp_tool_changes(&self, server: &str, changed: u64) {
        let server = self.mcp_labels().server(server);
        self.mcp_tool_changes.get_or_create(&McpServerLabels { server }).inc_by(changed);
    }

    /// Counts the tokens of one answer. `workload` is the workload's stable
    /// key (`k8s:namespace/service-account`, `exe:/path`, `comm:name`).
    pub fn tokens_used(&self, workload: &str, provider: &'static str, model: &str, input: u64, output: u64) {
        let mut values = self.token_labels.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let cached = values.counters.get(workload).and_then(|p| p.get(provider)).and_then(|m| m.get(model));
        if let Some([input_tokens, output_tokens]) = cached {
            input_tokens.inc_by(input);
            output_tokens.inc_by(output);
            return;
        }
        let (workload_label, model_label) = values.labels(workload, provider, model);
        let mut labels = TokenLabels { workload: workload_label, provider, model: model_label, kind: TokenKind::Input };
        let input_tokens = self.tokens.get_or_create(&labels).clone();
        labels.kind = TokenKind::Output;
        let output_tokens = self.tokens.get_or_create(&labels).clone();
        input_tokens.inc_by(input);
        output_tokens.inc_by(output);
        if labels.workload == workload && labels.model == model {
            let TokenLabels { workload, model, .. } = labels;
            let models = values.counters.entry(workload).or_default().entry(provider).or_default();
            models.insert(model, [input_tokens, output_tokens]);
        }
    }

    /// Counts one decision of `workload`'s (its stable key, as for
    /// [`Metrics::tokens_used`]; `unknown` when it is not known).
    pub fn workload_decision(&self, workload: &str, direction: Direction, action: Decision) {
        let (d, a) = (
            DIRECTIONS.iter().position(|x| *x == direction).unwrap_or_default(),
            ACTIONS.iter().position(|x| *x == action).unwrap_or_default(),
        );
        let mut cached = self.workload_counters.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(counters) = cached.get(workload) {
            counters[d][a].inc();
            return;
        }
        let label = {
            let mut values = self.token_labels.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            bounded(&mut values.workloads, label_text(workload), MAX_WORKLOAD_LABELS)
        };
        let counters = DIRECTIONS.map(|direction| {
            ACTIONS.map(|action| {
                let labels = WorkloadDecisionLabels { workload: label.clone(), direction, action };
                self.workload_decisions.get_or_create(&labels).clone()
            })
        });
        counters[d][a].inc();
        // Only workloads with a label of their own are kept by key (bounded).
        if label == workload || label == OTHER_LABEL {
            cached.insert(label, counters);
        }
    }

    fn mcp_labels(&self) -> std::sync::MutexGuard<'_, McpLabels> {
        self.mcp_labels.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
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
        m.connections
            .get_or_create(&ConnectionLabels {
                mode: ConnectionMode::Intercept,
                outcome: ConnectionOutcome::Intercepted,
            })
            .inc();
        m.backend_errors.get_or_create(&BackendLabels { backend: Stage::Akto, kind: "timeout" }).inc();
        let text = m.encode();
        assert!(text.contains("interceptor_guardrail_decisions_total{provider=\"openai_chat\",direction=\"request\",action=\"block\",rule=\"credentials\"} 1"), "{text}");
        assert!(text.contains("interceptor_connections_total{mode=\"intercept\",outcome=\"intercepted\"} 1"), "{text}");
        assert!(
            text.contains("interceptor_guardrail_backend_errors_total{backend=\"akto\",kind=\"timeout\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn token_label_values_are_bounded() {
        let m = Metrics::new();
        m.tokens_used("k8s:team-a/agent", "openai_chat", "gpt-4o", 10, 3);
        m.tokens_used("k8s:team-a/agent", "openai_chat", "gpt-4o", 5, 1);
        for i in 0..MAX_MODEL_LABELS + 2 {
            m.tokens_used("k8s:team-a/agent", "openai_chat", &format!("m{i}"), 1, 1);
        }
        // Another provider has its own models.
        m.tokens_used("k8s:team-a/agent", "anthropic", "m0", 2, 2);
        for i in 0..MAX_WORKLOAD_LABELS + 2 {
            m.tokens_used(&format!("comm:w{i}"), "anthropic", "m0", 1, 0);
        }
        let text = m.encode();
        let line = |prefix: &str| text.lines().find(|l| l.starts_with(prefix)).unwrap_or_default().to_owned();
        let tokens = r#"interceptor_tokens_total{workload="k8s:team-a/agent",provider="openai_chat",model="gpt-4o""#;
        assert!(line(&format!(r#"{tokens},kind="input"}}"#)).ends_with(" 15"), "{text}");
        assert!(line(&format!(r#"{tokens},kind="output"}}"#)).ends_with(" 4"), "{text}");
        // gpt-4o and m0..m62 have their own label; m63, m64, m65 are "other".
        let other = r#"interceptor_tokens_total{workload="k8s:team-a/agent",provider="openai_chat",model="other",kind="input"}"#;
        assert!(line(other).ends_with(" 3"), "{text}");
        let anthropic =
            r#"interceptor_tokens_total{workload="k8s:team-a/agent",provider="anthropic",model="m0",kind="input"}"#;
        assert!(line(anthropic).ends_with(" 2"), "{text}");
        // k8s:team-a/agent and comm:w0..comm:w254 have their own label.
        let other = r#"interceptor_tokens_total{workload="other",provider="anthropic",model="m0",kind="input"}"#;
        assert!(line(other).ends_with(" 3"), "{text}");
    }

    #[test]
    fn workload_decisions_are_counted_per_workload_and_bounded() {
        let m = Metrics::new();
        m.workload_decision("comm:agent", Direction::Request, Decision::Allow);
        m.workload_decision("comm:agent", Direction::Request, Decision::Allow);
        m.workload_decision("comm:agent", Direction::Response, Decision::Block);
        for i in 0..MAX_WORKLOAD_LABELS + 2 {
            m.workload_decision(&format!("exe:/w{i}"), Direction::Request, Decision::Block);
        }
        let text = m.encode();
        let line = |series: &str| text.lines().find(|l| l.starts_with(series)).unwrap_or_default().to_owned();
        let series = |workload: &str, direction: &str, action: &str| {
            format!(
                r#"interceptor_workload_decisions_total{{workload="{workload}",direction="{direction}",action="{action}"}}"#
            )
        };
        assert!(line(&series("comm:agent", "request", "allow")).ends_with(" 2"), "{text}");
        assert!(line(&series("comm:agent", "response", "block")).ends_with(" 1"), "{text}");
        // comm:agent and exe:/w0..exe:/w254 have their own label.
        assert!(line(&series("other", "request", "block")).ends_with(" 3"), "{text}");
    }

    #[test]
    fn mcp_label_values_are_bounded() {
        let m = Metrics::new();
        m.mcp_tool_call("mcp.example.test", "search", Decision::Allow);
        m.mcp_tool_call("mcp.example.test", "search", Decision::Allow);
        m.mcp_tool_call("mcp.example.test", "bad\"name\n", Decision::Block);
        for i in 0..MAX_MCP_TOOL_LABELS + 3 {
            m.mcp_tool_call("mcp.example.test", &format!("t{i}"), Decision::Allow);
        }
        for i in 0..MAX_MCP_SERVER_LABELS + 3 {
            m.mcp_tool_changes(&format!("s{i}.example.test"), 1);
        }
        m.mcp_tool_changes("mcp.example.test", 2);
        let text = m.encode();
        let line =
            |needle: &str| text.lines().find(|l| l.starts_with(needle)).unwrap_or_else(|| panic!("{needle}\n{text}"));
        assert!(
            line(r#"interceptor_mcp_tool_calls_total{server="mcp.example.test",tool="search",decision="allow"}"#)
                .ends_with(" 2")
        );
        line(r#"interceptor_mcp_tool_calls_total{server="mcp.example.test",tool="bad_name_",decision="block"}"#);
        // "search" and "bad_name_" took two of the cap: the last five are other.
        assert!(
            line(r#"interceptor_mcp_tool_calls_total{server="mcp.example.test",tool="other",decision="allow"}"#)
                .ends_with(" 5")
        );
        // mcp.example.test had its label before the cap was reached.
        assert!(line(r#"interceptor_mcp_tool_changes_total{server="mcp.example.test"}"#).ends_with(" 2"));
        assert!(line(r#"interceptor_mcp_tool_changes_total{server="other"}"#).ends_with(" 4"));
        let servers = text.lines().filter(|l| l.starts_with("interceptor_mcp_tool_changes_total{")).count();
        assert_eq!(servers, MAX_MCP_SERVER_LABELS + 1);
    }

    /// Labels are the strings the log line and dashboards use, one each.
    #[test]
    fn connection_labels_are_snake_case_strings() {
        let m = Metrics::new();
        for &mode in ConnectionMode::ALL {
            for &outcome in ConnectionOutcome::ALL {
                m.connections.get_or_create(&ConnectionLabels { mode, outcome }).inc();
            }
        }
        let text = m.encode();
        for &outcome in ConnectionOutcome::ALL {
            let s = outcome.as_str();
            assert!(s.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'), "{s}");
            assert!(text.contains(&format!("interceptor_connections_total{{mode=\"none\",outcome=\"{s}\"}} 1")), "{s}");
        }
        assert_eq!(ConnectionOutcome::RefusedLoop.to_string(), "refused_loop");
        let modes: Vec<&str> = ConnectionMode::ALL.iter().map(|m| m.as_str()).collect();
        assert_eq!(modes, ["none", "intercept", "guard", "passthrough", "plain", "refused"]);
    }
}
