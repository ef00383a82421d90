//! The Akto-compatible remote guardrail backend: the client for Akto's
//! `/api/http-proxy` endpoint that the mitmproxy egress addon used.
//!
//! This module owns the wire format (the flat JSON body where every value is
//! a string or null, the query flags, the tolerant reading of the verdict),
//! the merge of a `ModifiedPayload` back into the provider body, and a
//! circuit breaker that fails fast while Akto is down. It does not decide
//! what a failure means (fail open or closed is the pipeline's call), never
//! retries, and never logs bodies or the token.
//!
//! Reporting: Akto records the traffic it checks when the check carries
//! `ingest_data=true`, and its guardrail service raises the security event
//! for its own verdicts, so a call Akto blocks needs nothing more. Every body
//! also carries the workload (`process_id`, and process name, uid, cgroup and
//! upstream host as extra keys of the `metadata` JSON string; `tag` stays
//! exactly as the addon sent it). For a call the *local* engine blocked,
//! [`AktoClient::report_local_block`] sends the same endpoint with
//! `ingest_data=true` and no guardrail flag: the exchange (prompt and the 403
//! we answered, rule in `metadata`) is ingested without asking for a verdict.
//! No other endpoint is used.
//!
//! * `config` — the settings and their validation;
//! * `client` — [`AktoClient`]: one pooled HTTP client, the calls, timeouts;
//! * `wire` — the body Akto reads, the verdict it answers, the merge of a
//!   `ModifiedPayload`;
//! * `shield` — an MCP call in the form of Akto's MCP endpoint shield (the
//!   JSON-RPC messages as payloads, its path, host and tag), and the merge
//!   of a `ModifiedPayload` into the JSON-RPC body;
//! * `breaker` — the circuit breaker;
//! * `backend` — Akto behind the pipeline's `Backend` trait: what each check
//!   sends, and how the verdict comes back.

use std::fmt;
use std::time::Duration;

use serde::Serialize;

use super::model::Direction;

mod backend;
mod breaker;
mod client;
mod config;
mod shield;
mod wire;

pub use breaker::CircuitState;
pub use client::AktoClient;
pub use config::{
    API_PATH, AddonEnv, AktoConfig, ENV_APP_NAME, ENV_GUARDRAILS_MODE, ENV_LOG_PAYLOADS, ENV_TEXT_THRESHOLD, ENV_TOKEN,
    ENV_URL,
};
pub use shield::McpCall;
pub use wire::{CallInfo, RemoteVerdict, merge_modified_payload, normalize_app_name, parse_verdict, redact_path};

#[derive(Debug, thiserror::Error)]
pub enum AktoError {
    #[error("invalid akto configuration:\n  - {}", .errors.join("\n  - "))]
    InvalidConfig { errors: Vec<String> },
    #[error("cannot build the http client for akto")]
    Client(#[source] reqwest::Error),
    #[error("akto did not answer the {check} check within {timeout:?}")]
    Timeout { check: CheckKind, timeout: Duration },
    #[error("akto is unreachable at {endpoint}")]
    Unreachable {
        endpoint: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("the {check} call to akto failed")]
    Transport {
        check: CheckKind,
        #[source]
        source: reqwest::Error,
    },
    #[error("akto answered the {check} check with http {status}")]
    Status { check: CheckKind, status: u16, body: String },
    #[error("akto rejected the {check} check: {}", .messages.join("; "))]
    Rejected { check: CheckKind, messages: Vec<String> },
    #[error("cannot understand akto's reply to the {check} check: {reason}")]
    Malformed {
        check: CheckKind,
        reason: &'static str,
        #[source]
        source: Option<serde_json::Error>,
    },
    #[error("akto circuit is open after repeated failures, next attempt in {retry_after:?}")]
    CircuitOpen { retry_after: Duration },
    #[error("cannot encode the akto request")]
    Encode(#[source] serde_json::Error),
    #[error("cannot merge the modified payload: {reason}")]
    ModifiedPayload {
        reason: &'static str,
        #[source]
        source: Option<serde_json::Error>,
    },
}

impl AktoError {
    /// Short label for metrics and audit events.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::InvalidConfig { .. } | Self::Client(_) => "config",
            Self::Timeout { .. } => "timeout",
            Self::Unreachable { .. } => "unreachable",
            Self::Transport { .. } => "transport",
            Self::Status { .. } => "status",
            Self::Rejected { .. } => "rejected",
            Self::Malformed { .. } => "malformed",
            Self::CircuitOpen { .. } => "circuit_open",
            Self::Encode(_) => "encode",
            Self::ModifiedPayload { .. } => "modified_payload",
        }
    }

    /// Whether the error says something about Akto's health (and so counts
    /// towards opening the circuit). A 422 is about one request's content.
    fn trips_breaker(&self) -> bool {
        matches!(
            self,
            Self::Timeout { .. }
                | Self::Unreachable { .. }
                | Self::Transport { .. }
                | Self::Status { .. }
                | Self::Malformed { .. }
        )
    }
}

/// Which call to Akto this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckKind {
    Request,
    Response,
    StreamBatch,
    /// Ingest only, no verdict asked (local-engine block reports).
    Ingest,
}

impl CheckKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Request => "request",
            Self::Response => "response",
            Self::StreamBatch => "stream batch",
            Self::Ingest => "ingest",
        }
    }

    fn direction(self) -> Direction {
        match self {
            Self::Request | Self::Ingest => Direction::Request,
            Self::Response | Self::StreamBatch => Direction::Response,
        }
    }
}

impl fmt::Display for CheckKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
