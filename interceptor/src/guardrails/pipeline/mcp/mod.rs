//! MCP (Model Context Protocol) exchanges: the state the pipeline keeps
//! across them, for as long as the data plane runs (a reload of the
//! guardrails keeps it).
//!
//! * `sessions` — the requests of each session still waiting for their
//!   answer, so results on any stream are matched to their method and tool;
//! * `pins` — the rug-pull pins: tool definitions seen per server and
//!   workload, persisted;
//! * `request`, `response` — the MCP phases of an exchange: JSON-RPC
//!   messages checked one by one, refusals answered as JSON-RPC errors in
//!   the same session, tool lists, pins and the tool-call audit events.
//!
//! Which exchanges are MCP is decided once, by the request head
//! ([`McpSettings::classify`]): the server's name (`mcp.domains`, a plain
//! target), else, with `mcp.detect_by_content`, the request itself.

pub mod pins;
mod request;
mod response;

pub(super) use response::on_response;
pub mod sessions;

use self::{
    pins::{PinsError, ToolPins},
    sessions::Sessions,
};
use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Instant,
};

use http::{HeaderMap, StatusCode};
use serde_json::Value;

use super::{Guardrails, Pipeline, backends::Subject, outcome::Outcome};
use crate::{
    audit::{EventKind, McpInfo},
    config::{McpConfig, mcp::ToolChangeAction},
    guardrails::{
        backend::{Call, Phase},
        mcp::{self, Id, Message},
        model::{Decision, Direction, PathSeg, TextSpan},
        providers,
    },
    policy::{McpDomains, McpServers, PolicyError},
};

/// The pins file's name in the state directory, when `mcp.pins_file` is
/// empty.
pub const PINS_FILE_NAME: &str = "mcp-tool-pins.json";

/// The `[mcp]` settings the phases read, compiled.
#[derive(Debug, Clone)]
pub struct McpSettings {
    pub enabled: bool,
    pub detect_by_content: bool,
    pub tool_changes: ToolChangeAction,
    servers: McpServers,
    /// The hosts of `mcp.plain`, lowercase.
    plain_hosts: Vec<String>,
}

impl McpSettings {
    pub fn new(cfg: &McpConfig) -> Result<Self, PolicyError> {
        let servers = if cfg.enabled {
            McpServers::compile(McpDomains { domains: &cfg.domains, domains_extra: &cfg.domains_extra })?
        } else {
            McpServers::default()
        };
        Ok(Self {
            enabled: cfg.enabled,
            detect_by_content: cfg.detect_by_content,
            tool_changes: cfg.tool_changes,
            servers,
            plain_hosts: cfg.plain_targets().into_iter().map(|t| t.host.to_ascii_lowercase()).collect(),
        })
    }

    /// Whether an exchange is MCP: its server's name is an MCP server's,
    /// or (`detect_by_content`) the request looks like MCP. Names first:
    /// they cost a lookup, the content a scan of the body.
    pub fn classify(&self, host: &str, head: &http::request::Parts, body: &[u8]) -> bool {
        self.enabled
            && (self.servers.matches(host)
                || self.plain_hosts.iter().any(|h| h.eq_ignore_ascii_case(host))
                || (self.detect_by_content && mcp::recognize(&head.method, &head.headers, body)))
    }
}

impl Default for McpSettings {
    fn default() -> Self {
        Self::new(&McpConfig::default()).expect("the default MCP server names compile")
    }
}

/// What MCP inspection remembers across exchanges, and its settings.
#[derive(Debug)]
pub struct McpState {
    pub settings: McpSettings,
    pub sessions: Sessions,
    pub pins: ToolPins,
}

/// Why the MCP state could not be made.
#[derive(Debug, thiserror::Error)]
pub enum McpStateError {
    #[error(transparent)]
    Pins(#[from] PinsError),
    #[error("mcp.domains: {0}")]
    Domains(#[from] PolicyError),
}

impl McpState {
    /// Default settings; sessions and pins kept in memory only.
    pub fn in_memory() -> Self {
        Self { settings: McpSettings::default(), sessions: Sessions::default(), pins: ToolPins::in_memory() }
    }

    /// The settings of `cfg` and the pins of [`pins_path`] (in memory when
    /// there is none), loaded now.
    pub fn open(cfg: &McpConfig, state_dir: Option<&Path>) -> Result<Self, McpStateError> {
        let settings = McpSettings::new(cfg)?;
        let pins = match pins_path(cfg, state_dir) {
            Some(path) => ToolPins::load(&path)?,
            None => ToolPins::in_memory(),
        };
        Ok(Self { settings, sessions: Sessions::default(), pins })
    }
}

/// Where the pins are persisted: `mcp.pins_file`, else
/// [`PINS_FILE_NAME`] in the state directory; `None` without either, or
/// when MCP inspection is off.
pub fn pins_path(cfg: &McpConfig, state_dir: Option<&Path>) -> Option<PathBuf> {
    if !cfg.enabled {
        return None;
    }
    if !cfg.pins_file.as_os_str().is_empty() {
        return Some(cfg.pins_file.clone());
    }
    state_dir.map(|dir| dir.join(PINS_FILE_NAME))
}

/// The `Mcp-Session-Id` of a request, else the old transport's
/// `sessionId` query parameter.
pub(super) fn session_of(head: &http::request::Parts) -> Option<String> {
    if let Some(id) = head.headers.get(mcp::SESSION_HEADER).and_then(|v| v.to_str().ok()) {
        return Some(id.to_owned());
    }
    session_in_query(head.uri.query()?)
}

/// The old HTTP+SSE transport's `sessionId` in a query string.
pub(super) fn session_in_query(query: &str) -> Option<String> {
    query.split('&').find_map(|pair| pair.strip_prefix("sessionId=")).filter(|id| !id.is_empty()).map(str::to_owned)
}

/// The audit event's `mcp` object for an exchange, named by its first
/// request (or message).
pub(super) fn info(call: &Call, messages: &[(Vec<PathSeg>, Message)], arguments: Option<String>) -> McpInfo {
    let first = messages.iter().find(|(_, m)| matches!(m, Message::Request { .. })).or(messages.first());
    McpInfo {
        server: call.host.clone(),
        session: call.mcp_session.clone(),
        method: first.and_then(|(_, m)| m.method()).unwrap_or_default().to_owned(),
        tool: first.and_then(|(_, m)| mcp::tool_name(m)).map(str::to_owned),
        arguments,
    }
}

/// The JSON-RPC error a refused request is answered with.
pub(super) fn refusal(id: &Id, reason: &str, rule: &str) -> Value {
    let data = serde_json::json!({ "decision": "block", "rule": rule });
    mcp::error_message(id, mcp::BLOCKED_CODE, &format!("Blocked by guardrails: {reason}"), data)
}

/// A message's texts: what the MCP parser reads (`read`), then every other
/// string of the message at its own path (a field the parser does not know,
/// `_meta`, a method it does not know), so nothing in a message goes by
/// unscanned.
pub(super) fn with_unread(doc: Option<&Value>, prefix: &[PathSeg], mut read: Vec<TextSpan>) -> Vec<TextSpan> {
    if let Some(doc) = doc {
        let unread = providers::unread_texts(doc, &read);
        read.extend(unread.into_iter().filter(|t| t.path.starts_with(prefix)));
    }
    read
}

/// The decision of a tool call from both of its checks: the stronger one.
pub(super) fn stronger(a: Decision, b: Decision) -> Decision {
    let rank = |d: Decision| match d {
        Decision::Allow => 0,
        Decision::Alert => 1,
        Decision::Error => 2,
        Decision::Modify => 3,
        Decision::Block => 4,
    };
    if rank(b) > rank(a) { b } else { a }
}

impl Pipeline {
    /// Checks `texts` (at their paths in `doc`, the whole body) with the
    /// backends, as any body of `phase`; `doc` keeps what they rewrote.
    pub(super) async fn check_texts(
        &self,
        g: &Guardrails,
        phase: Phase,
        call: &Call,
        doc: &mut Option<Value>,
        texts: Vec<TextSpan>,
        response: Option<(StatusCode, &HeaderMap)>,
    ) -> Outcome {
        let mut outcome = Outcome::default();
        if texts.is_empty() {
            return outcome;
        }
        let texts = Arc::new(texts);
        let mut subject = Subject {
            texts: &texts,
            read_by_parser: texts.len(),
            original: &[],
            doc: doc.take(),
            raw_text: None,
            raw_rewritable: false,
            instructions: false,
            response,
            wait: true,
            resends_request: false,
        };
        self.run_backends(g, phase, call, &mut subject, &mut outcome).await;
        *doc = subject.doc.take();
        outcome
    }

    /// One tool call done (answered, refused or failed): its audit event
    /// and its counter. `started` is when it was sent.
    pub(super) async fn tool_call_done(
        &self,
        g: &Guardrails,
        call: &Call,
        direction: Direction,
        outcome: &Outcome,
        started: Instant,
        info: McpInfo,
    ) {
        let tool = info.tool.clone().unwrap_or_default();
        self.metrics.mcp_tool_call(&call.host, &tool, outcome.decision());
        self.audit_as(g, call, EventKind::McpToolCall, direction, outcome, started, None, Some(info)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::Workload;

    #[test]
    fn pins_go_to_the_configured_file_or_the_state_directory() {
        let dir = Path::new("/var/lib/interceptor");
        let default = McpConfig::default();
        assert_eq!(pins_path(&default, Some(dir)), Some(dir.join("mcp-tool-pins.json")));
        assert_eq!(pins_path(&default, None), None);
        let named = McpConfig { pins_file: "/etc/pins.json".into(), ..McpConfig::default() };
        assert_eq!(pins_path(&named, Some(dir)), Some(PathBuf::from("/etc/pins.json")));
        let off = McpConfig { enabled: false, ..McpConfig::default() };
        assert_eq!(pins_path(&off, Some(dir)), None);
    }

    fn head(method: &str, uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut b = http::Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn mcp_is_told_by_name_first_then_by_content() {
        let cfg = McpConfig {
            domains_extra: vec!["*.tools.example".into()],
            plain: vec!["10.0.0.5:8080".into(), "Tools.Svc:9000".into()],
            ..McpConfig::default()
        };
        let settings = McpSettings::new(&cfg).unwrap();
        let get = head("GET", "/sse", &[]);
        // By name: whatever the request.
        assert!(settings.classify("mcp.notion.com", &get, b""), "the built-in list");
        assert!(settings.classify("a.tools.example", &get, b""));
        assert!(settings.classify("tools.svc", &get, b""), "a plain target's host, any case");
        assert!(!settings.classify("api.openai.com", &get, b""));
        // By content.
        let call = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x"}}"#;
        let post = head("POST", "/v1/x", &[]);
        assert!(settings.classify("api.openai.com", &post, call));
        assert!(!settings.classify("api.openai.com", &post, br#"{"model":"gpt-4o","messages":[]}"#));
        let session = head("GET", "/mcp", &[("mcp-session-id", "s")]);
        assert!(settings.classify("api.openai.com", &session, b""));
        // Off, or content detection off.
        let no_content = McpSettings::new(&McpConfig { detect_by_content: false, ..cfg.clone() }).unwrap();
        assert!(!no_content.classify("api.openai.com", &post, call));
        assert!(no_content.classify("a.tools.example", &post, call));
        let off = McpSettings::new(&McpConfig { enabled: false, ..cfg }).unwrap();
        assert!(!off.classify("a.tools.example", &post, call));
    }

    #[test]
    fn an_invalid_server_name_is_an_error_naming_it() {
        let cfg = McpConfig { domains_extra: vec!["a*b.example".into()], ..McpConfig::default() };
        let error = McpSettings::new(&cfg).unwrap_err().to_string();
        assert!(error.contains("a*b.example"), "{error}");
    }

    #[test]
    fn sessions_come_from_the_header_or_the_old_transports_query() {
        assert_eq!(session_of(&head("POST", "/mcp", &[("mcp-session-id", "abc")])), Some("abc".into()));
        assert_eq!(session_of(&head("POST", "/messages?x=1&sessionId=old-7", &[])), Some("old-7".into()));
        assert_eq!(session_of(&head("POST", "/messages?sessionId=", &[])), None);
        assert_eq!(session_of(&head("POST", "/mcp", &[])), None);
    }

    #[test]
    fn pins_are_kept_per_service_account_or_executable() {
        use crate::guardrails::pipeline::workload_key;
        assert_eq!(workload_key(None), "*");
        let pod = Workload {
            comm: "node".into(),
            pod: Some(Arc::new(crate::workload::PodInfo {
                name: "agent-7f9c".into(),
                namespace: "agents".into(),
                service_account: Some("coder".into()),
                ..Default::default()
            })),
            ..Default::default()
        };
        assert_eq!(workload_key(Some(&pod)), "k8s:agents/coder");
        let process = Workload { comm: "node".into(), exe: Some("/usr/bin/node".into()), ..Default::default() };
        assert_eq!(workload_key(Some(&process)), "exe:/usr/bin/node");
        assert_eq!(workload_key(Some(&Workload { comm: "claude".into(), ..Default::default() })), "comm:claude");
    }

    #[test]
    fn a_tool_call_takes_the_stronger_decision_of_its_two_checks() {
        assert_eq!(stronger(Decision::Allow, Decision::Modify), Decision::Modify);
        assert_eq!(stronger(Decision::Block, Decision::Alert), Decision::Block);
        assert_eq!(stronger(Decision::Alert, Decision::Allow), Decision::Alert);
        assert_eq!(stronger(Decision::Error, Decision::Alert), Decision::Error);
    }

    #[test]
    fn opening_loads_the_pins_saved_before() {
        let dir = tempfile::tempdir().unwrap();
        let state = McpState::open(&McpConfig::default(), Some(dir.path())).unwrap();
        state.pins.check("mcp.example.test", "w", &[("t", [1; 32])], false);
        state.pins.save().unwrap();
        let again = McpState::open(&McpConfig::default(), Some(dir.path())).unwrap();
        assert_eq!(again.pins.check("mcp.example.test", "w", &[("t", [2; 32])], false).changed, vec!["t".to_string()]);
    }
}
