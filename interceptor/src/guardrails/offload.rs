//! Where a local-engine scan runs. Small texts (the common case, a few KB)
//! are scanned inline on the async worker: moving them to another thread
//! would cost more than the scan. Texts over [`INLINE_SCAN_MAX`] bytes
//! together are scanned on tokio's blocking pool, at most one per CPU at a
//! time (the others wait without holding a worker), so that large bodies
//! cannot occupy the runtime's workers and starve every other connection.
//!
//! This module decides only where the scan runs, never what it finds: the
//! result is the same [`Scan`] either way. A scan task that fails (a panic
//! in the engine, or the runtime shutting down) is a [`ScanError`], which
//! the pipeline handles with its fail mode.

use std::sync::{Arc, OnceLock};

use tokio::sync::Semaphore;

use super::{
    engine::{Engine, Scan, ScanContext, WorkloadRef},
    model::{Direction, Provider, TextKind},
};
use crate::workload::Workload;

/// Texts larger than this (in bytes, all texts of a scan together) are
/// scanned on the blocking pool.
pub const INLINE_SCAN_MAX: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("the scan task failed")]
    Task(#[source] tokio::task::JoinError),
    #[error("no scan slot")]
    Closed(#[source] tokio::sync::AcquireError),
}

/// Texts the engine can scan, owned so that they can move to another
/// thread.
pub trait ScanTexts: Send + Sync + 'static {
    fn each(&self) -> impl Iterator<Item = (TextKind, &str)>;
}

impl ScanTexts for Vec<super::model::TextSpan> {
    fn each(&self) -> impl Iterator<Item = (TextKind, &str)> {
        self.iter().map(|t| (t.kind, t.text.as_str()))
    }
}

/// Scans `texts` under `ctx`, inline or on the blocking pool by their size.
pub async fn scan<T: ScanTexts>(
    engine: &Arc<Engine>,
    ctx: &ScanContext<'_>,
    texts: &Arc<T>,
) -> Result<Scan, ScanError> {
    let size: usize = texts.each().map(|(_, t)| t.len()).sum();
    if size <= INLINE_SCAN_MAX {
        #[cfg(test)]
        tests::scanned_on(Arc::as_ptr(texts).addr());
        return Ok(engine.scan(ctx, texts.each()));
    }
    let permit = slots().clone().acquire_owned().await.map_err(ScanError::Closed)?;
    let (engine, texts, ctx) = (Arc::clone(engine), Arc::clone(texts), OwnedContext::of(ctx));
    #[cfg(test)]
    let key = Arc::as_ptr(&texts).addr();
    tokio::task::spawn_blocking(move || {
        // Held until the scan is done, even if the exchange is gone.
        let _permit = permit;
        #[cfg(test)]
        tests::scanned_on(key);
        engine.scan(&ctx.borrow(), texts.each())
    })
    .await
    .map_err(ScanError::Task)
}

/// Large scans running at once: one per CPU.
fn slots() -> &'static Arc<Semaphore> {
    static SLOTS: OnceLock<Arc<Semaphore>> = OnceLock::new();
    SLOTS.get_or_init(|| {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Arc::new(Semaphore::new(cpus))
    })
}

/// A [`ScanContext`] that owns its strings.
struct OwnedContext {
    direction: Direction,
    provider: Provider,
    host: String,
    workload: Option<Workload>,
}

impl OwnedContext {
    fn of(ctx: &ScanContext<'_>) -> Self {
        Self {
            direction: ctx.direction,
            provider: ctx.provider,
            host: ctx.host.to_owned(),
            // Only what scopes read.
            workload: ctx.workload.map(|w| Workload {
                comm: w.comm.to_owned(),
                thread: w.thread.to_owned(),
                exe: w.exe.map(Arc::from),
                uid: w.uid,
                cgroup: w.cgroup.map(Arc::from),
                pod: w.pod.map(|p| Arc::new(p.clone())),
                ..Workload::default()
            }),
        }
    }

    fn borrow(&self) -> ScanContext<'_> {
        ScanContext {
            direction: self.direction,
            provider: self.provider,
            host: &self.host,
            workload: self.workload.as_ref().map(WorkloadRef::of),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guardrails::model::{Role, TextSpan};

    fn span(text: String) -> TextSpan {
        TextSpan { path: Vec::new(), role: Role::User, kind: TextKind::Content, text }
    }

    fn ctx() -> ScanContext<'static> {
        ScanContext {
            direction: Direction::Request,
            provider: Provider::OpenAiChat,
            host: "api.openai.com",
            workload: Some(WorkloadRef { comm: "python3", ..Default::default() }),
        }
    }

    fn key() -> String {
        format!("-----BEGIN RSA PRIVATE KEY-----\n{}\n-----END RSA PRIVATE KEY-----", "MIIEowIBAAKCAQEA".repeat(4))
    }

    #[tokio::test(flavor = "current_thread")]
    async fn large_texts_are_scanned_off_the_worker_with_the_same_result() {
        let engine = Arc::new(Engine::builtin().unwrap());
        let large = Arc::new(vec![span(format!("{}{}", "plain words ".repeat(INLINE_SCAN_MAX / 10), key()))]);
        let small = Arc::new(vec![span(key())]);
        for texts in [&large, &small] {
            let here = engine.scan(&ctx(), texts.each());
            let there = scan(&engine, &ctx(), texts).await.unwrap();
            assert_eq!(here, there);
            assert!(matches!(there.decision, crate::guardrails::engine::Decision::Block(_)));
        }
        // The thread each scan ran on: the runtime's only thread for the
        // small text, another one for the large text.
        let here = std::thread::current().id();
        assert_eq!(scanner_of(&small), Some(here), "a small scan stays inline");
        assert!(scanner_of(&large).is_some_and(|t| t != here), "the large scan ran on the runtime's thread");
    }

    /// Which thread scanned which texts (by the address of their `Arc`).
    static SCANNED: std::sync::Mutex<Vec<(usize, std::thread::ThreadId)>> = std::sync::Mutex::new(Vec::new());

    pub(super) fn scanned_on(texts: usize) {
        SCANNED.lock().unwrap_or_else(|e| e.into_inner()).push((texts, std::thread::current().id()));
    }

    fn scanner_of<T>(texts: &Arc<T>) -> Option<std::thread::ThreadId> {
        let key = Arc::as_ptr(texts).addr();
        SCANNED.lock().unwrap_or_else(|e| e.into_inner()).iter().rev().find(|(k, _)| *k == key).map(|(_, t)| *t)
    }

    #[test]
    fn owned_context_round_trips() {
        let pod = crate::workload::PodInfo {
            name: "p".into(),
            namespace: "team-a".into(),
            labels: [("app".to_owned(), "x".to_owned())].into(),
            ..Default::default()
        };
        let workload = WorkloadRef {
            comm: "claude",
            thread: "HTTP Client",
            exe: Some("/usr/bin/node"),
            uid: 1000,
            cgroup: Some("/kubepods.slice/x"),
            pod: Some(&pod),
        };
        for c in [ctx(), ScanContext { workload: Some(workload), ..ctx() }] {
            let owned = OwnedContext::of(&c);
            let back = owned.borrow();
            assert_eq!((back.direction, back.provider, back.host), (c.direction, c.provider, c.host));
            assert_eq!(back.workload, c.workload);
        }
    }
}
