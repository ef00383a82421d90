//! Audit: one structured event per guardrail decision, written to the log
//! (target `audit`) and, when configured, to a JSON-lines file.
//!
//! Events go through a bounded queue to one writer task: a slow disk slows
//! decisions down rather than losing events. Traffic never waits on a broken
//! audit file: when a write fails (disk full, file removed, read-only) the
//! event still reaches the log, is counted in `audit_events_dropped`, and an
//! error names the file and the count: at once for the first loss, then at
//! most every [`REPORT_EVERY`] while the file stays broken, and once more
//! when it is writable again. The writer takes what is queued in one batch
//! (one write to the log, one append to the file); each batch is retried on
//! a fresh open, so the file recovers by itself once space is freed; a file
//! removed or rotated away is noticed at the next batch and opened anew.
//! Prompt text is only included when the operator enables it.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::Serialize;
use tokio::sync::mpsc;

use crate::{
    guardrails::model::{Decision, Direction, Stage},
    metrics::Metrics,
    net::{ClientAddr, OrigDstAddr},
    observe::LiveEvents,
    telemetry::otlp::Otlp,
};

/// Queue length between deciders and the writer.
const QUEUE: usize = 4096;
/// Least time between two error lines about the same audit file outage.
pub const REPORT_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Who made an exchange, as an audit event names it: the connection's
/// workload, shared with the exchange (its paths and pod are reference
/// counted) and written out field by field by the writer
/// ([`WorkloadFields`]), not copied into strings of its own per event.
#[derive(Clone, Debug, Default)]
pub struct WorkloadInfo(Option<crate::workload::Workload>);

impl WorkloadInfo {
    /// What is known of the process behind a connection, with its cgroup
    /// (named once per connection, when the proxy resolved the workload)
    /// and, on Kubernetes nodes, its pod and container.
    pub fn of(workload: Option<&crate::workload::Workload>) -> Self {
        Self(workload.cloned())
    }
}

impl Serialize for WorkloadInfo {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        WorkloadFields::of(self.0.as_ref()).serialize(s)
    }
}

/// The fields of a [`WorkloadInfo`] as an event writes them. Fields that
/// are not known are left out (`pid`, `uid`, `comm` and `cgroup_id` are
/// `null`).
#[derive(Default, Serialize)]
struct WorkloadFields<'a> {
    pid: Option<u32>,
    uid: Option<u32>,
    /// Process name (the thread-group leader's `comm`).
    comm: Option<&'a str>,
    /// Name of the thread that connected, when it differs from `comm`.
    #[serde(skip_serializing_if = "Option::is_none")]
    thread: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exe: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    argv0: Option<&'a str>,
    cgroup_id: Option<u64>,
    /// cgroup path, relative to the cgroup2 mount.
    #[serde(skip_serializing_if = "Option::is_none")]
    cgroup: Option<&'a str>,
    /// Kubernetes pod UID and container ID, from the pod or, failing that,
    /// from the cgroup path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pod_uid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    container_id: Option<String>,
    /// The pod, as the API server describes it, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pod_name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    namespace: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    labels: Option<&'a std::collections::BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    service_account: Option<&'a str>,
    /// The container's name in the pod.
    #[serde(skip_serializing_if = "Option::is_none")]
    container: Option<&'a str>,
}

impl<'a> WorkloadFields<'a> {
    fn of(workload: Option<&'a crate::workload::Workload>) -> Self {
        let Some(w) = workload else { return Self::default() };
        let kube = w.cgroup.as_deref().and_then(crate::workload::kube_identity);
        let pod = w.pod.as_deref();
        let text = |s: &'a str| Some(s).filter(|s| !s.is_empty());
        // Zero and empty are "not found" (iptables mode: the socket was
        // found, its process or cgroup not).
        Self {
            pid: Some(w.pid).filter(|&p| p != 0),
            uid: Some(w.uid),
            comm: text(&w.comm),
            thread: text(&w.thread),
            exe: w.exe.as_deref(),
            argv0: w.argv0.as_deref(),
            cgroup_id: Some(w.cgroup_id).filter(|&id| id != 0),
            cgroup: w.cgroup.as_deref(),
            pod_uid: pod
                .and_then(|p| text(&p.uid))
                .map(str::to_owned)
                .or_else(|| kube.as_ref().map(|k| k.pod_uid.clone())),
            container_id: kube.and_then(|k| k.container_id),
            pod_name: pod.and_then(|p| text(&p.name)),
            namespace: pod.and_then(|p| text(&p.namespace)),
            labels: pod.map(|p| &p.labels),
            service_account: pod.and_then(|p| p.service_account.as_deref()),
            container: pod.and_then(|p| p.container.as_deref()),
        }
    }
}

/// What an audit event records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A guardrail decision on a request, a response or a stream.
    GuardrailDecision,
    /// A connection to an AI address refused, or relayed uninspected,
    /// before any request.
    UnclassifiedConnection,
    /// The summary of a WebSocket connection.
    WebsocketClosed,
    /// One MCP tool call: its server, tool, decision and latency (the time
    /// from the call to its result), with its `mcp` fields.
    McpToolCall,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::GuardrailDecision => "guardrail_decision",
            Self::UnclassifiedConnection => "unclassified_connection",
            Self::WebsocketClosed => "websocket_closed",
            Self::McpToolCall => "mcp_tool_call",
        }
    }
}

/// Which way an audit event is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventDirection {
    Request,
    Response,
    /// Both ways (a WebSocket connection's summary).
    Both,
}

impl From<Direction> for EventDirection {
    fn from(direction: Direction) -> Self {
        match direction {
            Direction::Request => Self::Request,
            Direction::Response => Self::Response,
        }
    }
}

/// One guardrail decision.
#[derive(Clone, Debug, Serialize)]
pub struct AuditEvent {
    pub time: Timestamp,
    pub event: EventKind,
    pub request_id: String,
    pub direction: EventDirection,
    pub decision: Decision,
    pub provider: &'static str,
    pub host: String,
    /// Path with secret query parameters removed.
    pub path: String,
    pub method: String,
    pub model: Option<String>,
    pub rules: Vec<String>,
    pub detectors: Vec<String>,
    pub reasons: Vec<String>,
    pub backends: Vec<Stage>,
    pub latency_ms: f64,
    pub client: ClientAddr,
    pub orig_dst: OrigDstAddr,
    pub workload: WorkloadInfo,
    /// Only with `guardrails.audit_prompts = true`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// The summary of a WebSocket connection (event `websocket_closed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub websocket: Option<WebSocketStats>,
    /// The MCP exchange (MCP traffic and event `mcp_tool_call`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mcp: Option<McpInfo>,
    /// The tokens a successful answer used (response events), from the
    /// provider's usage fields or, for a stream without them, estimated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageInfo>,
    /// The budget that refused the request (`429`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget: Option<BudgetInfo>,
    /// `local_fallback`: the exchange's budgets were counted on this node
    /// alone, because Redis (`budgets.redis_url`) could not be reached.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget_counting: Option<BudgetCounting>,
}

/// What an audit event says of the budget that refused a request.
pub use crate::guardrails::budgets::{Counting as BudgetCounting, Refusal as BudgetInfo};

/// What an audit event says of the tokens an exchange used.
pub use crate::guardrails::usage::Usage as UsageInfo;

/// What an audit event says of an MCP exchange.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct McpInfo {
    /// The MCP server's host.
    pub server: String,
    /// `Mcp-Session-Id` (or the old transport's `sessionId`), when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// The JSON-RPC method (`tools/call`, `tools/list`, …); for a batch, the
    /// first request's.
    pub method: String,
    /// The tool of a `tools/call`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    /// The tool call's arguments as JSON; only with
    /// `guardrails.audit_prompts = true`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arguments: Option<String>,
}

/// What a WebSocket connection carried, written when it closes.
#[derive(Clone, Debug, Default, Serialize)]
pub struct WebSocketStats {
    /// `openai_responses_websocket`, `openai_realtime`, `gemini_live`, or
    /// `unknown` (tunnelled uninspected).
    pub protocol: &'static str,
    /// Messages were inspected (false: the bytes were tunnelled).
    pub inspected: bool,
    pub client_messages: u64,
    pub server_messages: u64,
    /// Messages whose text was checked.
    pub messages_inspected: u64,
    /// Messages carrying audio or video, forwarded without inspecting it.
    pub audio_not_inspected: u64,
    /// Messages over the inspection limit forwarded uninspected (oversize
    /// policy `pass`).
    pub oversize_not_inspected: u64,
    pub blocked: u64,
    pub modified: u64,
    /// Bytes from and to the client (frames and all).
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Who closed it, or why it was closed.
    pub ended_by: String,
}

#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<AuditEvent>,
    /// Where the writer sends each event as an OTLP log record too, once
    /// [`AuditLog::with_otlp`] set it.
    otlp: Arc<std::sync::OnceLock<Arc<Otlp>>>,
}

impl AuditLog {
    /// Starts the writer. `file` empty: events go to the log only.
    pub fn start(file: Option<PathBuf>, metrics: Arc<Metrics>) -> Self {
        Self::start_live(file, metrics, None)
    }

    /// [`AuditLog::start`], also offering every event to `live`'s watchers.
    pub fn start_live(file: Option<PathBuf>, metrics: Arc<Metrics>, live: Option<LiveEvents>) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let otlp = Arc::new(std::sync::OnceLock::new());
        tokio::spawn(writer(rx, file, metrics, live, Arc::clone(&otlp)));
        Self { tx, otlp }
    }

    /// Also sends every event as an OTLP log record (its body the same JSON
    /// as the file's line, so the same redaction), when `otlp` exports logs.
    pub fn with_otlp(self, otlp: Option<Arc<Otlp>>) -> Self {
        if let Some(otlp) = otlp.filter(|o| o.logs()) {
            let _ = self.otlp.set(otlp);
        }
        self
    }

    /// Records an event; waits if the writer is behind (never drops).
    pub async fn record(&self, event: AuditEvent) {
        if let Err(mpsc::error::SendError(event)) = self.tx.send(event).await {
            // The writer is gone (shutdown): still leave a trace.
            let mut batch = Batch::default();
            batch.encode(std::slice::from_ref(&event));
            batch.log(std::slice::from_ref(&event));
        }
    }
}

/// Events taken from the queue at once, as JSON lines. The writer keeps
/// one and reuses its buffers from batch to batch: each event is serialized
/// once, into memory that is already there.
#[derive(Default)]
struct Batch {
    /// Every event's JSON, each followed by a newline.
    lines: Vec<u8>,
    /// Where each event's JSON is in `lines` (without its newline).
    spans: Vec<std::ops::Range<usize>>,
    /// The JSON log's lines for the batch.
    log_lines: Vec<u8>,
}

impl Batch {
    /// Replaces the batch's lines with `events`'.
    fn encode(&mut self, events: &[AuditEvent]) {
        self.lines.clear();
        self.spans.clear();
        for event in events {
            let start = self.lines.len();
            // Serializing plain structs into memory cannot fail; were it to,
            // no half-written event would stand in a line.
            if serde_json::to_writer(&mut self.lines, event).is_err() {
                self.lines.truncate(start);
                self.lines.extend_from_slice(b"null");
            }
            self.spans.push(start..self.lines.len());
            self.lines.push(b'\n');
        }
    }

    /// Event `i`'s JSON (serde_json writes UTF-8).
    fn json(&self, i: usize) -> &str {
        std::str::from_utf8(&self.lines[self.spans[i].clone()]).unwrap_or("null")
    }

    /// Writes `events` (those this batch encodes) to the log, target
    /// `audit`. In the product's JSON log the lines are built here, in the
    /// JSON formatter's shape with the event as the object `audit` (the
    /// formatter could only write it as a string, escaped once more), and
    /// written with one `write(2)` for the batch.
    fn log(&mut self, events: &[AuditEvent]) {
        if !tracing::enabled!(target: "audit", tracing::Level::INFO) {
            return;
        }
        if !crate::telemetry::json_on_stderr() {
            for (i, event) in events.iter().enumerate() {
                let json = self.json(i);
                tracing::info!(target: "audit", event = event.event.as_str(), decision = event.decision.as_str(), audit = %json, "guardrail decision");
            }
            return;
        }
        let mut out = std::mem::take(&mut self.log_lines);
        self.json_log_lines(events, Timestamp::now().text().as_str(), &mut out);
        let _ = std::io::stderr().lock().write_all(&out);
        self.log_lines = out;
    }

    /// Fills `out` with the JSON log's lines of `events`.
    fn json_log_lines(&self, events: &[AuditEvent], timestamp: &str, out: &mut Vec<u8>) {
        out.clear();
        for (i, event) in events.iter().enumerate() {
            out.extend_from_slice(b"{\"timestamp\":\"");
            out.extend_from_slice(timestamp.as_bytes());
            out.extend_from_slice(b"\",\"level\":\"INFO\",\"message\":\"guardrail decision\",\"event\":\"");
            out.extend_from_slice(event.event.as_str().as_bytes());
            out.extend_from_slice(b"\",\"decision\":\"");
            out.extend_from_slice(event.decision.as_str().as_bytes());
            out.extend_from_slice(b"\",\"audit\":");
            out.extend_from_slice(self.json(i).as_bytes());
            out.extend_from_slice(b",\"target\":\"audit\"}\n");
        }
    }
}

/// Most events taken from the queue per wake-up.
const BATCH: usize = 256;

async fn writer(
    mut rx: mpsc::Receiver<AuditEvent>,
    file: Option<PathBuf>,
    metrics: Arc<Metrics>,
    live: Option<LiveEvents>,
    otlp: Arc<std::sync::OnceLock<Arc<Otlp>>>,
) {
    let mut file = file.map(|path| AuditFile::new(path, metrics));
    let mut events = Vec::with_capacity(BATCH);
    let mut batch = Batch::default();
    while rx.recv_many(&mut events, BATCH).await > 0 {
        batch.encode(&events);
        batch.log(&events);
        if let Some(live) = &live {
            for i in 0..events.len() {
                live.publish(batch.json(i).as_bytes());
            }
        }
        if let Some(otlp) = otlp.get() {
            for (i, event) in events.iter().enumerate() {
                let attributes = [
                    ("interceptor.audit.event", event.event.as_str()),
                    ("interceptor.guardrail.decision", event.decision.as_str()),
                    ("interceptor.request_id", event.request_id.as_str()),
                    ("interceptor.provider", event.provider),
                ];
                otlp.log("interceptor.audit", batch.json(i), &attributes);
            }
        }
        if let Some(file) = file.as_mut() {
            file.append(&batch.lines, events.len() as u64);
        }
        events.clear();
    }
}

/// The JSON-lines file and the state of an outage.
struct AuditFile {
    path: PathBuf,
    metrics: Arc<Metrics>,
    out: Option<std::fs::File>,
    /// Events lost since the outage began; `None` while writes succeed.
    outage: Option<Outage>,
}

struct Outage {
    lost: u64,
    lost_since_report: u64,
    last_report: std::time::Instant,
}

impl AuditFile {
    fn new(path: PathBuf, metrics: Arc<Metrics>) -> Self {
        Self { path, metrics, out: None, outage: None }
    }

    /// Appends `count` events' JSON lines with one write.
    fn append(&mut self, lines: &[u8], count: u64) {
        match self.write(lines) {
            Ok(()) => {
                if let Some(outage) = self.outage.take() {
                    tracing::warn!(
                        path = %self.path.display(),
                        lost = outage.lost,
                        "the audit file is writable again; the events it lost are in the log only"
                    );
                }
            }
            Err(error) => {
                // Reopen for the next event (file removed, disk freed).
                self.out = None;
                self.metrics.audit_write_errors.inc();
                self.metrics.audit_events_dropped.inc_by(count);
                self.lost(&error, count);
            }
        }
    }

    fn write(&mut self, line: &[u8]) -> std::io::Result<()> {
        // Removed or rotated away: writing on would reach no one.
        if self.out.as_ref().is_some_and(|f| !same_file(f, &self.path)) {
            self.out = None;
        }
        let f = match self.out.as_mut() {
            Some(f) => f,
            None => {
                let mut f = open(&self.path)?;
                // A write cut short by a full disk leaves half a line: start
                // on a fresh one.
                if self.outage.is_some() && ends_mid_line(&self.path) {
                    f.write_all(b"\n")?;
                }
                self.out.insert(f)
            }
        };
        f.write_all(line)?;
        f.flush()
    }

    fn lost(&mut self, error: &std::io::Error, count: u64) {
        let now = std::time::Instant::now();
        let path = self.path.display();
        match self.outage.as_mut() {
            None => {
                self.outage = Some(Outage { lost: count, lost_since_report: 0, last_report: now });
                tracing::error!(
                    path = %path,
                    %error,
                    dropped = count,
                    "cannot write the audit file; audit events go to the log only until it is writable again"
                );
            }
            Some(outage) => {
                outage.lost += count;
                outage.lost_since_report += count;
                if now.duration_since(outage.last_report) >= REPORT_EVERY {
                    tracing::error!(
                        path = %path,
                        %error,
                        dropped = outage.lost_since_report,
                        dropped_in_outage = outage.lost,
                        "the audit file is still not writable; these audit events are in the log only"
                    );
                    outage.lost_since_report = 0;
                    outage.last_report = now;
                }
            }
        }
    }
}

fn open(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(path)
}

/// Whether `path` still names the open file `f`.
fn same_file(f: &std::fs::File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    match (f.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Whether a regular file's last byte is not a newline.
fn ends_mid_line(path: &Path) -> bool {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else { return false };
    if !f.metadata().is_ok_and(|m| m.is_file() && m.len() > 0) {
        return false;
    }
    let mut last = [0u8; 1];
    f.seek(SeekFrom::End(-1)).and_then(|_| f.read_exact(&mut last)).is_ok_and(|()| last[0] != b'\n')
}

/// A moment, written as RFC 3339 in UTC with microseconds
/// (`2026-12-07T19:10:00.123456Z`) where it goes: taking one costs no
/// formatting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timestamp(time::OffsetDateTime);

impl Timestamp {
    pub fn now() -> Self {
        Self(time::OffsetDateTime::now_utc())
    }

    /// The moment's text, its digits put in place one by one: every event
    /// writes one, and the formatting machinery costs more than the rest of
    /// the event's fields together. A year outside 0..=9999 (no clock this
    /// runs on) is written as its last four digits.
    fn text(self) -> TimestampText {
        let t = self.0;
        let (year, month, day) = t.to_calendar_date();
        let (hour, minute, second, micro) = t.to_hms_micro();
        let mut text = *b"0000-00-00T00:00:00.000000Z";
        let fields = [
            (0..4, year.unsigned_abs()),
            (5..7, u32::from(u8::from(month))),
            (8..10, u32::from(day)),
            (11..13, u32::from(hour)),
            (14..16, u32::from(minute)),
            (17..19, u32::from(second)),
            (20..26, micro),
        ];
        for (range, mut value) in fields {
            for digit in text[range].iter_mut().rev() {
                // A digit: `value % 10` < 10.
                *digit = b'0' + (value % 10) as u8;
                value /= 10;
            }
        }
        TimestampText(text)
    }
}

/// A [`Timestamp`]'s text.
struct TimestampText([u8; 27]);

impl TimestampText {
    fn as_str(&self) -> &str {
        // ASCII digits and separators only.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl std::fmt::Display for Timestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.text().as_str())
    }
}

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.text().as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workloads_are_named_by_process_thread_executable_and_pod() {
        use crate::workload::{PodInfo, Workload};
        let systemd = "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1f2e3d4c_5b6a_7980_a1b2_c3d4e5f60718.slice/cri-containerd-0123456789abcdef0123456789abcdef.scope";
        let mut w = Workload {
            pid: 7,
            tid: 9,
            uid: 1000,
            comm: "claude".into(),
            thread: "HTTP Client".into(),
            exe: Some("/usr/bin/node".into()),
            argv0: Some("claude".into()),
            cgroup_id: 42,
            cgroup: Some(systemd.into()),
            ..Default::default()
        };
        let json = serde_json::to_value(WorkloadInfo::of(Some(&w))).unwrap();
        assert_eq!(json["comm"], "claude", "the process, not the thread");
        assert_eq!(json["thread"], "HTTP Client");
        assert_eq!(json["exe"], "/usr/bin/node");
        assert_eq!(json["argv0"], "claude");
        assert_eq!(json["cgroup"], systemd, "the path the connection was named with");
        assert_eq!(json["pod_uid"], "1f2e3d4c-5b6a-7980-a1b2-c3d4e5f60718");
        assert_eq!(json["container_id"], "0123456789abcdef0123456789abcdef");
        assert!(json.get("namespace").is_none() && json.get("labels").is_none(), "no pod known: {json}");

        w.pod = Some(std::sync::Arc::new(PodInfo {
            uid: "1f2e3d4c-5b6a-7980-a1b2-c3d4e5f60718".into(),
            name: "billing-7d9f".into(),
            namespace: "team-a".into(),
            labels: [("app".to_owned(), "billing".to_owned())].into(),
            service_account: Some("billing-sa".into()),
            container: Some("agent".into()),
        }));
        let json = serde_json::to_value(WorkloadInfo::of(Some(&w))).unwrap();
        assert_eq!(json["pod_name"], "billing-7d9f");
        assert_eq!(json["namespace"], "team-a");
        assert_eq!(json["labels"], serde_json::json!({"app": "billing"}));
        assert_eq!(json["service_account"], "billing-sa");
        assert_eq!(json["container"], "agent");

        // The main thread connected; iptables mode found only the socket.
        let plain = Workload { pid: 3, tid: 3, comm: "curl".into(), ..Default::default() };
        let json = serde_json::to_value(WorkloadInfo::of(Some(&plain))).unwrap();
        for absent in ["thread", "exe", "argv0", "cgroup", "pod_uid", "pod_name"] {
            assert!(json.get(absent).is_none(), "{absent} in {json}");
        }
        let socket_only = Workload { uid: 1000, cgroup_id: 5, ..Default::default() };
        let json = serde_json::to_value(WorkloadInfo::of(Some(&socket_only))).unwrap();
        assert_eq!(
            (&json["pid"], &json["comm"], &json["uid"]),
            (&serde_json::Value::Null, &serde_json::Value::Null, &1000.into())
        );
    }

    #[test]
    fn enum_fields_are_written_as_their_names() {
        fn names<T: Serialize>(value: &T) -> String {
            serde_json::to_string(value).unwrap_or_default()
        }
        for d in [Decision::Allow, Decision::Modify, Decision::Block, Decision::Alert, Decision::Error] {
            assert_eq!(names(&d), format!("\"{}\"", d.as_str()));
        }
        for s in [Stage::Local, Stage::Akto, Stage::Decode, Stage::Framing, Stage::WebSocket, Stage::Proxy, Stage::Keys]
        {
            assert_eq!(names(&s), format!("\"{}\"", s.as_str()));
        }
        for k in [EventKind::GuardrailDecision, EventKind::UnclassifiedConnection, EventKind::WebsocketClosed] {
            assert_eq!(names(&k), format!("\"{}\"", k.as_str()));
        }
        assert_eq!(names(&EventDirection::Both), "\"both\"");
        assert_eq!(names(&EventDirection::from(Direction::Response)), "\"response\"");
    }

    fn event(decision: Decision) -> AuditEvent {
        AuditEvent {
            time: Timestamp::now(),
            event: EventKind::GuardrailDecision,
            request_id: "r1".into(),
            direction: EventDirection::Request,
            decision,
            provider: "openai_chat",
            host: "api.openai.com".into(),
            path: "/v1/chat/completions".into(),
            method: "POST".into(),
            model: Some("gpt-4o".into()),
            rules: vec!["credentials".into()],
            detectors: vec!["private_key".into()],
            reasons: vec![],
            backends: vec![Stage::Local],
            latency_ms: 0.1,
            client: ClientAddr("127.0.0.1:1".parse().unwrap()),
            orig_dst: OrigDstAddr("198.18.0.10:443".parse().unwrap()),
            workload: WorkloadInfo::default(),
            prompt: None,
            websocket: None,
            mcp: None,
            usage: None,
            budget: None,
            budget_counting: None,
        }
    }

    #[test]
    fn times_and_addresses_are_written_as_text() {
        let mut e = event(Decision::Allow);
        e.orig_dst = OrigDstAddr("[2001:db8::10]:443".parse().unwrap());
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["client"], "127.0.0.1:1");
        assert_eq!(json["orig_dst"], "[2001:db8::10]:443");
        let time = json["time"].as_str().unwrap();
        let parsed = time::OffsetDateTime::parse(time, &time::format_description::well_known::Rfc3339).unwrap();
        assert_eq!(parsed.offset(), time::UtcOffset::UTC);
        assert!((time::OffsetDateTime::now_utc() - parsed).abs() < time::Duration::minutes(1), "{time}");
        assert!(time.ends_with('Z') && time.len() == "2026-12-07T19:10:00.123456Z".len(), "{time}");
    }

    /// A timestamp is written as the formatting machinery writes it.
    fn assert_written_as_formatted(t: time::OffsetDateTime) {
        let written = format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.microsecond()
        );
        assert_eq!(Timestamp(t).to_string(), written);
        assert_eq!(serde_json::to_value(Timestamp(t)).unwrap(), serde_json::Value::String(written));
    }

    #[test]
    fn timestamps_read_as_the_formatting_machinery_writes_them() {
        let at = |year, month, day, (h, m, s, nano)| {
            time::Date::from_calendar_date(year, month, day).unwrap().with_hms_nano(h, m, s, nano).unwrap().assume_utc()
        };
        for t in [
            time::OffsetDateTime::UNIX_EPOCH,
            at(2026, time::Month::December, 31, (23, 59, 59, 999_999_000)),
            at(2028, time::Month::February, 29, (0, 0, 0, 1_000)),
            at(9999, time::Month::December, 31, (23, 59, 59, 999_999_999)),
            time::OffsetDateTime::now_utc(),
        ] {
            assert_written_as_formatted(t);
        }
    }

    proptest::proptest! {
        /// Any moment from 1970 to 9999.
        #[test]
        fn any_moment_is_written_as_the_formatting_machinery_writes_it(nanos in 0i128..253_402_300_800_000_000_000) {
            assert_written_as_formatted(time::OffsetDateTime::from_unix_timestamp_nanos(nanos).unwrap());
        }
    }

    #[test]
    fn mcp_tool_call_events_carry_their_mcp_fields() {
        let mut e = event(Decision::Block);
        e.event = EventKind::McpToolCall;
        e.mcp = Some(McpInfo {
            server: "mcp.example.test".into(),
            session: Some("s-1".into()),
            method: "tools/call".into(),
            tool: Some("run_shell".into()),
            arguments: None,
        });
        let json: serde_json::Value = serde_json::to_value(&e).unwrap();
        assert_eq!(json["event"], "mcp_tool_call");
        assert_eq!(
            json["mcp"],
            serde_json::json!({"server": "mcp.example.test", "session": "s-1", "method": "tools/call", "tool": "run_shell"})
        );
        let plain = serde_json::to_value(event(Decision::Allow)).unwrap();
        assert!(plain.get("mcp").is_none(), "{plain}");
    }

    #[test]
    fn direct_log_lines_have_the_json_formatters_fields() {
        #[derive(Clone, Default)]
        struct Buf(Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let events = [event(Decision::Block), event(Decision::Allow)];
        let mut batch = Batch::default();
        batch.encode(&events);
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_writer(move || writer.clone())
            .finish();
        // Without our subscriber on stderr, events go through tracing.
        tracing::subscriber::with_default(subscriber, || batch.log(&events));
        let parse = |text: &[u8]| -> Vec<serde_json::Value> {
            String::from_utf8_lossy(text)
                .lines()
                .map(|l| {
                    let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                    let time = v.as_object_mut().unwrap().remove("timestamp").unwrap();
                    assert!(time.as_str().unwrap().ends_with('Z'), "{time}");
                    v
                })
                .collect()
        };
        let mut via_tracing = parse(&buf.0.lock().unwrap());
        // The formatter can only write the event as a string; ours is the
        // object itself.
        for line in &mut via_tracing {
            line["audit"] = serde_json::from_str(line["audit"].as_str().unwrap()).unwrap();
        }
        let mut direct = vec![b'x'];
        batch.json_log_lines(&events, &Timestamp::now().to_string(), &mut direct);
        let direct = parse(&direct);
        assert_eq!(direct, via_tracing);
        assert_eq!(direct.len(), 2);
        assert_eq!(direct[0]["audit"]["decision"], "block");
        assert_eq!(direct[0]["audit"], serde_json::to_value(&events[0]).unwrap());
        let stamp = Timestamp::now().to_string();
        assert!(time::OffsetDateTime::parse(&stamp, &time::format_description::well_known::Rfc3339).is_ok(), "{stamp}");
    }

    #[tokio::test]
    async fn events_are_appended_as_json_lines_with_private_permissions() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::start(Some(path.clone()), Arc::new(Metrics::new()));
        log.record(event(Decision::Block)).await;
        log.record(event(Decision::Allow)).await;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if text.lines().count() == 2 {
                let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
                assert_eq!(first["decision"], "block");
                assert!(first.get("prompt").is_none(), "no prompt unless enabled");
                break;
            }
            assert!(std::time::Instant::now() < deadline, "events not written: {text:?}");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[tokio::test]
    async fn an_unwritable_audit_file_is_counted_not_fatal() {
        let metrics = Arc::new(Metrics::new());
        let log = AuditLog::start(Some(PathBuf::from("/nonexistent-dir/audit.jsonl")), Arc::clone(&metrics));
        log.record(event(Decision::Allow)).await;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while metrics.audit_write_errors.get() < 1 {
            assert!(std::time::Instant::now() < deadline);
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(metrics.audit_events_dropped.get(), 1);
    }

    async fn wait_for(what: &str, cond: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !cond() {
            assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_full_disk_counts_every_lost_event() {
        let metrics = Arc::new(Metrics::new());
        let log = AuditLog::start(Some(PathBuf::from("/dev/full")), Arc::clone(&metrics));
        for _ in 0..5 {
            log.record(event(Decision::Allow)).await;
        }
        wait_for("5 dropped events", || metrics.audit_events_dropped.get() == 5).await;
        assert!(metrics.encode().contains("interceptor_audit_events_dropped_total 5"), "{}", metrics.encode());
    }

    #[tokio::test]
    async fn the_file_recovers_after_an_outage_on_a_fresh_line() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("audit");
        std::fs::create_dir(&sub).unwrap();
        let path = sub.join("audit.jsonl");
        let metrics = Arc::new(Metrics::new());
        let log = AuditLog::start(Some(path.clone()), Arc::clone(&metrics));
        log.record(event(Decision::Allow)).await;
        wait_for("the first event", || std::fs::read_to_string(&path).is_ok_and(|t| t.lines().count() == 1)).await;
        // The file and its directory go away (disk replaced, say); a half
        // line is left behind when it comes back.
        std::fs::remove_dir_all(&sub).unwrap();
        log.record(event(Decision::Block)).await;
        log.record(event(Decision::Block)).await;
        wait_for("2 dropped events", || metrics.audit_events_dropped.get() == 2).await;
        std::fs::create_dir(&sub).unwrap();
        std::fs::write(&path, "{\"cut\":").unwrap();
        log.record(event(Decision::Modify)).await;
        wait_for("the event after the outage", || {
            std::fs::read_to_string(&path).is_ok_and(|t| t.contains("\"decision\":\"modify\""))
        })
        .await;
        let text = std::fs::read_to_string(&path).unwrap();
        let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        assert_eq!(last["decision"], "modify", "{text}");
        assert_eq!(metrics.audit_events_dropped.get(), 2);
    }
}
