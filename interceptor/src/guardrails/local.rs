//! The embedded engine as a [`Backend`]: a scan (inline for a stream window,
//! else where `offload` says) turned into a verdict. Redactions and system
//! instructions are handed to the pipeline to apply; nothing here touches
//! the body.

use std::sync::Arc;

use super::{
    backend::{Backend, BackendError, Check, Instruction, Phase, Refusal, Rewrite, Verdict},
    engine::{Decision, Engine, Scan},
    model::Stage,
    offload, providers,
};

#[async_trait::async_trait]
impl Backend for Arc<Engine> {
    fn stage(&self) -> Stage {
        Stage::Local
    }

    async fn check(&self, check: &Check<'_>) -> Result<Verdict, BackendError> {
        let call = check.call;
        let ctx = call.scan_context(check.phase.direction());
        let scan = match check.phase {
            // A window is small, and the stream waits for it.
            Phase::Stream => self.scan(&ctx, check.texts.iter().map(|t| (t.kind, t.text.as_str()))),
            Phase::Request | Phase::Response => offload::scan(self, &ctx, check.texts)
                .await
                .map_err(|error| BackendError { kind: "internal", message: crate::error::chain(&error) })?,
        };
        let mut verdict = Verdict { reasons: unread_findings(&scan, check), ..Verdict::default() };
        for f in &scan.findings {
            verdict.rules.push(f.rule_id.to_string());
            verdict.detectors.push(f.detector.to_string());
        }
        match &scan.decision {
            Decision::Block(b) => {
                verdict.block = Some(Refusal { reason: b.reason.clone(), rule: b.rule_id.to_string() });
                return Ok(verdict);
            }
            Decision::Redact => {
                let texts = check.texts.iter().enumerate();
                let redacted = texts.filter_map(|(i, t)| scan.redacted(i, &t.text).map(|new| (i, new))).collect();
                verdict.rewrite = Some(Rewrite::Texts(redacted));
            }
            Decision::Alert => verdict.alert = true,
            Decision::Allow => {}
        }
        if check.instructions && check.doc.is_some() {
            verdict.instructions = self
                .system_instructions(&ctx)
                .into_iter()
                .map(|i| Instruction { id: Arc::clone(&i.id), text: Arc::clone(&i.text) })
                .collect();
        }
        Ok(verdict)
    }
}

/// Where findings in texts the provider parser did not read
/// (`texts[read_by_parser..]`) were, at most three, for the audit event.
fn unread_findings(scan: &Scan, check: &Check<'_>) -> Vec<String> {
    let (texts, read_by_parser) = (check.texts.as_slice(), check.read_by_parser);
    let mut paths: Vec<String> = Vec::new();
    for f in scan.findings.iter().filter(|f| f.text_index >= read_by_parser) {
        let Some(span) = texts.get(f.text_index) else { continue };
        let mut path = providers::path_string(&span.path);
        if path.len() > 120 {
            let cut = (0..=120).rev().find(|&i| path.is_char_boundary(i)).unwrap_or(0);
            path.truncate(cut);
            path.push('…');
        }
        if !paths.contains(&path) && paths.len() < 3 {
            paths.push(path);
        }
    }
    if paths.is_empty() {
        return Vec::new();
    }
    vec![format!("found in a field the {} parser does not read: {}", check.call.provider.as_str(), paths.join(", "))]
}
