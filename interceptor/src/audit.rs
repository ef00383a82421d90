//! Audit: one structured event per guardrail decision, written to the log
//! (target `audit`) and, when configured, to a JSON-lines file.
//!
//! Events go through a bounded queue to one writer task: a slow disk slows
//! decisions down rather than losing events. A failed write (disk full, file
//! removed) is logged and counted, and the event still reaches the log.
//! Prompt text is only included when the operator enables it.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::Serialize;
use tokio::sync::mpsc;

use crate::metrics::Metrics;

/// Queue length between deciders and the writer.
const QUEUE: usize = 4096;

#[derive(Clone, Debug, Default, Serialize)]
pub struct WorkloadInfo {
    pub pid: Option<u32>,
    pub uid: Option<u32>,
    pub comm: Option<String>,
    pub cgroup_id: Option<u64>,
    /// cgroup path, relative to the cgroup2 mount.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    /// Kubernetes pod UID and container ID, when the cgroup path shows them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
}

impl WorkloadInfo {
    /// What is known of the process behind a connection, with its cgroup
    /// named and, on Kubernetes nodes, its pod and container.
    pub fn of(workload: Option<&crate::redirect::Workload>) -> Self {
        let Some(w) = workload else { return Self::default() };
        let cgroup = crate::workload::cgroup_path(w.cgroup_id);
        let kube = cgroup.as_deref().and_then(crate::workload::kube_identity);
        Self {
            pid: Some(w.pid),
            uid: Some(w.uid),
            comm: Some(w.comm.clone()),
            cgroup_id: Some(w.cgroup_id),
            cgroup: cgroup.map(|c| c.to_string()),
            pod_uid: kube.as_ref().map(|k| k.pod_uid.clone()),
            container_id: kube.and_then(|k| k.container_id),
        }
    }
}

/// One guardrail decision.
#[derive(Clone, Debug, Serialize)]
pub struct AuditEvent {
    pub time: String,
    pub event: &'static str,
    pub request_id: String,
    pub direction: &'static str,
    /// allow | modify | block | alert | error
    pub decision: &'static str,
    pub provider: &'static str,
    pub host: String,
    /// Path with secret query parameters removed.
    pub path: String,
    pub method: String,
    pub model: Option<String>,
    pub rules: Vec<String>,
    pub detectors: Vec<String>,
    pub reasons: Vec<String>,
    pub backends: Vec<&'static str>,
    pub latency_ms: f64,
    pub client: String,
    pub orig_dst: String,
    pub workload: WorkloadInfo,
    /// Only with `guardrails.audit_prompts = true`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
}

#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<AuditEvent>,
}

impl AuditLog {
    /// Starts the writer. `file` empty: events go to the log only.
    pub fn start(file: Option<PathBuf>, metrics: Arc<Metrics>) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(writer(rx, file, metrics));
        Self { tx }
    }

    /// Records an event; waits if the writer is behind (never drops).
    pub async fn record(&self, event: AuditEvent) {
        if let Err(mpsc::error::SendError(event)) = self.tx.send(event).await {
            // The writer is gone (shutdown): still leave a trace.
            emit_log(&event);
        }
    }
}

fn emit_log(event: &AuditEvent) {
    if !tracing::enabled!(target: "audit", tracing::Level::INFO) {
        return;
    }
    let json = serde_json::to_string(event).unwrap_or_default();
    tracing::info!(target: "audit", event = "guardrail_decision", decision = event.decision, audit = %json, "guardrail decision");
}

async fn writer(mut rx: mpsc::Receiver<AuditEvent>, file: Option<PathBuf>, metrics: Arc<Metrics>) {
    let mut out = file.as_deref().and_then(|p| open(p).map_err(|e| report(p, &e, &metrics)).ok());
    while let Some(event) = rx.recv().await {
        emit_log(&event);
        let Some(path) = file.as_deref() else { continue };
        if out.is_none() {
            // Reopen after a failure (file removed, disk freed).
            out = open(path).map_err(|e| report(path, &e, &metrics)).ok();
        }
        if let Some(f) = out.as_mut() {
            let mut line = serde_json::to_vec(&event).unwrap_or_default();
            line.push(b'\n');
            if let Err(e) = f.write_all(&line).and_then(|()| f.flush()) {
                report(path, &e, &metrics);
                out = None;
            }
        }
    }
}

fn open(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(path)
}

fn report(path: &Path, error: &std::io::Error, metrics: &Metrics) {
    metrics.audit_write_errors.inc();
    tracing::error!(path = %path.display(), %error, "cannot write the audit file; the event is in the log only");
}

/// Current time, RFC 3339 UTC.
pub fn now() -> String {
    time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(decision: &'static str) -> AuditEvent {
        AuditEvent {
            time: now(),
            event: "guardrail_decision",
            request_id: "r1".into(),
            direction: "request",
            decision,
            provider: "openai_chat",
            host: "api.openai.com".into(),
            path: "/v1/chat/completions".into(),
            method: "POST".into(),
            model: Some("gpt-4o".into()),
            rules: vec!["credentials".into()],
            detectors: vec!["private_key".into()],
            reasons: vec![],
            backends: vec!["local"],
            latency_ms: 0.1,
            client: "127.0.0.1:1".into(),
            orig_dst: "198.18.0.10:443".into(),
            workload: WorkloadInfo::default(),
            prompt: None,
        }
    }

    #[tokio::test]
    async fn events_are_appended_as_json_lines_with_private_permissions() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::start(Some(path.clone()), Arc::new(Metrics::new()));
        log.record(event("block")).await;
        log.record(event("allow")).await;
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
        log.record(event("allow")).await;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while metrics.audit_write_errors.get() < 1 {
            assert!(std::time::Instant::now() < deadline);
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}
