//! MCP (Model Context Protocol) peers built on the official Python SDK
//! (`mcp`, installed by `cargo xtask setup`), run as separate processes: a
//! fake MCP server over streamable HTTP that records every request body it
//! receives, and a client that runs a scripted conversation and reports each
//! result.
//!
//! The fake server offers four tools: `echo(text)`, `lookup_card()` (a text
//! holding the card number it was given), `weather(city)` (whose description
//! hides instructions to the model, as a poisoned tool does) and `save_note`
//! (whose definition changes when [`FakeMcpServer::set_revision`] moves it to
//! 2, as a rug pull does). It answers POSTs as SSE streams, or as JSON with
//! [`McpServerOptions::json_response`].
//!
//! The scripts are `clients/mcp_server.py` and `clients/mcp_client.py`.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;

use super::clients::{ClientEnv, PARAMS_VAR, ScratchDir, run};
use super::{Netns, spawn_in_tokio, tool};

/// A policy rule redacting card numbers in tool results (the built-in
/// policy redacts them in requests only); tests append it to the built-in
/// policy.
pub const REDACT_CARDS_IN_TOOL_RESULTS: &str = r#"
[[rules]]
id = "redact-cards-in-tool-results"
description = "Card numbers a tool returns are replaced before the agent reads them."
detectors = ["credit_card"]
direction = "response"
action = "redact"
severity = "high"
scope.kinds = ["tool_result"]
"#;

/// An RSA private key block (not a real key), built at run time so no
/// secret-shaped literal sits in the sources.
pub fn private_key() -> String {
    let label = ["RSA", "PRIVATE", "KEY"].join(" ");
    let body = format!("MIIB{}", "Zm9vYmFy".repeat(8));
    format!("-----BEGIN {label}-----\n{body}\n-----END {label}-----")
}

/// Longest wait for the server to listen (importing the SDK takes a while on
/// a busy machine).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// How the fake server runs.
#[derive(Debug, Clone)]
pub struct McpServerOptions {
    /// Where to listen; port 0 picks one ([`FakeMcpServer::addr`] says which).
    pub bind: SocketAddr,
    /// Certificate chain and key (PEM files): HTTPS. `None`: plain HTTP.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Answer POSTs with `application/json` instead of an SSE stream.
    pub json_response: bool,
    /// `Host` values accepted (the SDK's DNS rebinding protection, `name:*`
    /// for any port). Empty: any.
    pub allowed_hosts: Vec<String>,
    /// The card number `lookup_card` returns.
    pub card: String,
}

impl McpServerOptions {
    /// HTTPS on a loopback port, SSE answers, accepting only `name` as `Host`.
    pub fn tls(name: &str, cert: PathBuf, key: PathBuf, card: &str) -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            tls: Some((cert, key)),
            json_response: false,
            allowed_hosts: vec![name.to_owned(), format!("{name}:*")],
            card: card.to_owned(),
        }
    }
}

/// One HTTP request the fake server received.
#[derive(Debug, Clone, Deserialize)]
pub struct ReceivedRequest {
    pub method: String,
    pub path: String,
    pub host: Option<String>,
    /// Its `Mcp-Session-Id`.
    pub session: Option<String>,
    /// The whole body (invalid UTF-8 replaced).
    pub body: String,
}

/// The head of one answer the fake server sent.
#[derive(Debug, Clone, Deserialize)]
pub struct SentResponse {
    pub method: String,
    pub status: u16,
    pub content_type: Option<String>,
    /// The body of the request it answers.
    pub body: String,
}

/// The fake MCP server, killed on drop.
#[derive(Debug)]
pub struct FakeMcpServer {
    addr: SocketAddr,
    dir: ScratchDir,
    _child: tokio::process::Child,
}

impl FakeMcpServer {
    /// Starts the server in `netns` (the caller's namespace when `None`) and
    /// waits until it listens.
    pub async fn start(options: &McpServerOptions, netns: Option<&Netns>) -> Result<Self> {
        let dir = ScratchDir::new("mcp-server")?;
        let params = json!({
            "host": options.bind.ip().to_string(),
            "port": options.bind.port(),
            "certfile": options.tls.as_ref().map(|(cert, _)| cert),
            "keyfile": options.tls.as_ref().map(|(_, key)| key),
            "json_response": options.json_response,
            "allowed_hosts": options.allowed_hosts,
            "request_log": dir.path().join("requests.jsonl"),
            "response_log": dir.path().join("responses.jsonl"),
            "revision_file": dir.path().join("revision"),
            "card": options.card,
        });
        let stderr_path = dir.path().join("stderr.log");
        let stderr =
            std::fs::File::create(&stderr_path).with_context(|| format!("create {}", stderr_path.display()))?;
        let mut cmd = tokio::process::Command::new(tool("python3"));
        cmd.args(["-c", SERVER])
            .env(PARAMS_VAR, params.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true);
        let mut child = spawn_in_tokio(&mut cmd, netns, None).context("spawn the MCP server")?;
        let stdout = child.stdout.take().context("MCP server stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let first = tokio::time::timeout(START_TIMEOUT, lines.next_line()).await;
        let log = || std::fs::read_to_string(&stderr_path).unwrap_or_default();
        let line = match first {
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None)) => bail!("the MCP server exited before listening: {}", log()),
            Ok(Err(e)) => bail!("read the MCP server's port: {e}; {}", log()),
            Err(_) => bail!("the MCP server did not listen within {START_TIMEOUT:?}: {}", log()),
        };
        let port: Port = serde_json::from_str(&line).with_context(|| format!("MCP server said {line:?}"))?;
        Ok(Self { addr: SocketAddr::new(options.bind.ip(), port.port), dir, _child: child })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Result<Vec<ReceivedRequest>> {
        self.request_log()
            .lines()
            .map(|line| serde_json::from_str(line).with_context(|| format!("request log line {line:?}")))
            .collect()
    }

    /// The request log as written: one JSON object per request.
    pub fn request_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("requests.jsonl")).unwrap_or_default()
    }

    /// The head of every answer so far, in order, each with the body of the
    /// request it answers.
    pub fn responses(&self) -> Result<Vec<SentResponse>> {
        let text = std::fs::read_to_string(self.dir.path().join("responses.jsonl")).unwrap_or_default();
        text.lines()
            .map(|line| serde_json::from_str(line).with_context(|| format!("response log line {line:?}")))
            .collect()
    }

    /// The JSON-RPC messages of every request body so far (batches flattened).
    pub fn messages(&self) -> Result<Vec<Value>> {
        let mut messages = Vec::new();
        for request in self.requests()? {
            if request.body.is_empty() {
                continue;
            }
            match serde_json::from_str(&request.body) {
                Ok(Value::Array(batch)) => messages.extend(batch),
                Ok(message) => messages.push(message),
                Err(e) => bail!("request body is not JSON ({e}): {:?}", request.body),
            }
        }
        Ok(messages)
    }

    /// The definitions `tools/list` gives from now on: 1 (the start) or 2
    /// (`save_note` reworded and given a parameter).
    pub fn set_revision(&self, revision: u32) -> Result<()> {
        let path = self.dir.path().join("revision");
        std::fs::write(&path, revision.to_string()).with_context(|| format!("write {}", path.display()))
    }
}

#[derive(Deserialize)]
struct Port {
    port: u16,
}

/// One step of a client session, after `initialize`.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum McpStep {
    ListTools,
    CallTool { name: String, arguments: Value },
}

impl McpStep {
    pub fn call(name: &str, arguments: Value) -> Self {
        Self::CallTool { name: name.to_owned(), arguments }
    }
}

/// What the client printed: per session, `initialize` then one line per
/// step; and the head of every HTTP answer.
#[derive(Debug, Clone)]
pub struct McpTranscript {
    pub lines: Vec<Value>,
}

impl McpTranscript {
    /// The lines of session `session` (0-based), `initialize` first.
    pub fn session(&self, session: usize) -> Vec<&Value> {
        self.lines.iter().filter(|line| line["session"] == session).collect()
    }

    /// The HTTP answers the client received, in order: `session`, `method`,
    /// `rpc` (the JSON-RPC method of the request body), `status`,
    /// `content_type`, `decision` (`X-Akto-Guardrails-Decision`).
    pub fn http(&self) -> Vec<&Value> {
        self.lines.iter().filter_map(|line| line.get("http")).collect()
    }

    /// The result of step `step` (0-based, after `initialize`) of `session`.
    pub fn step(&self, session: usize, step: usize) -> Result<&Value> {
        self.session(session)
            .get(step + 1)
            .copied()
            .with_context(|| format!("no step {step} in session {session}: {:#?}", self.lines))
    }
}

/// Runs one client session per entry of `sessions` against `url`, one after
/// the other, each with its own connection and `Mcp-Session-Id`, trusting
/// only `env.ca_file`. With `connect_to`, the URL's host name resolves to
/// that address (the TLS name and `Host` stay the URL's).
///
/// A JSON-RPC error answering a step is a result (`"error"`); a client that
/// cannot finish (transport failure, timeout) is an error carrying what it
/// printed.
pub async fn mcp_client(
    env: &ClientEnv<'_>,
    url: &str,
    connect_to: Option<SocketAddr>,
    sessions: &[Vec<McpStep>],
) -> Result<McpTranscript> {
    let params = json!({
        "url": url,
        "ca_file": env.ca_file,
        "connect_to": connect_to.map(|a| a.to_string()),
        "timeout": env.timeout.as_secs_f64(),
        "sessions": sessions,
    });
    let vars: [(&str, OsString); 1] = [(PARAMS_VAR, params.to_string().into())];
    let out = run(env, &tool("python3"), &["-c".into(), CLIENT.into()], &vars).await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<Value> = stdout
        .lines()
        .map(|line| serde_json::from_str(line).with_context(|| format!("MCP client printed {line:?}")))
        .collect::<Result<_>>()?;
    if !out.status.success() {
        bail!("MCP client exited {}; printed {lines:#?}; stderr: {}", out.status, stderr.trim());
    }
    Ok(McpTranscript { lines })
}

/// [`FakeMcpServer`]'s script.
const SERVER: &str = include_str!("clients/mcp_server.py");
/// [`mcp_client`]'s script.
const CLIENT: &str = include_str!("clients/mcp_client.py");
