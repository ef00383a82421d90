//! The one loop over the configured backends, for every phase: each
//! backend in order gets a [`Check`] of the body as the ones before it left
//! it, and its [`Verdict`] is folded into the [`Outcome`] and applied to the
//! body (a block stops the loop). What a verdict can change depends on the
//! phase: a request takes redactions, a new body and system instructions; a
//! whole response takes redactions and a new JSON body; a stream window
//! cannot be rewritten, so a redaction there is an alert.

use std::sync::Arc;

use http::{HeaderMap, StatusCode};
use serde_json::Value;

use super::{
    Guardrails, Pipeline,
    outcome::{Block, Outcome},
};
use crate::{
    config::FailMode,
    guardrails::{
        backend::{Call, Check, Phase, Rewrite, Verdict},
        model::{Stage, TextSpan},
        providers,
    },
    metrics::BackendLabels,
};

/// What one phase checks, as the backends so far left it.
pub(super) struct Subject<'a> {
    /// Shared with the scan, which may run on another thread.
    pub texts: &'a Arc<Vec<TextSpan>>,
    /// `texts[read_by_parser..]` are strings the provider parser did not
    /// read (named in the audit event when something is found there).
    pub read_by_parser: usize,
    /// The body as it arrived, decoded.
    pub original: &'a [u8],
    /// The body parsed, with the changes so far.
    pub doc: Option<Value>,
    /// The rewritten text of a body that is not JSON.
    pub raw_text: Option<String>,
    /// A body that is not JSON can be replaced by its redacted text; false
    /// when it was decoded from another charset.
    pub raw_rewritable: bool,
    /// Add the policy's system instructions to `doc`.
    pub instructions: bool,
    /// The provider's status and headers (response phases).
    pub response: Option<(StatusCode, &'a HeaderMap)>,
    /// `false`: a stream in monitor mode, which backends must not hold up.
    pub wait: bool,
    /// A backend that resends the request body with its response checks
    /// took part: the request phase keeps the body the provider gets in the
    /// exchange's [`Call`].
    pub resends_request: bool,
}

impl<'a> Subject<'a> {
    /// A subject without a body of its own: a stream window's text.
    pub fn text(texts: &'a Arc<Vec<TextSpan>>, response: (StatusCode, &'a HeaderMap), wait: bool) -> Self {
        Self {
            texts,
            read_by_parser: texts.len(),
            original: &[],
            doc: None,
            raw_text: None,
            raw_rewritable: false,
            instructions: false,
            response: Some(response),
            wait,
            resends_request: false,
        }
    }

    pub fn check<'c>(&'c self, phase: Phase, call: &'c Call, modified: bool) -> Check<'c> {
        Check {
            phase,
            call,
            texts: self.texts,
            read_by_parser: self.read_by_parser,
            doc: self.doc.as_ref(),
            original: self.original,
            raw_text: self.raw_text.as_deref(),
            modified,
            response: self.response,
            instructions: self.instructions,
            wait: self.wait,
        }
    }
}

impl Pipeline {
    /// Runs the configured backends in order over `subject` and applies
    /// their verdicts: the one loop of every phase.
    pub(super) async fn run_backends(
        &self,
        g: &Guardrails,
        phase: Phase,
        call: &Call,
        subject: &mut Subject<'_>,
        outcome: &mut Outcome,
    ) {
        let fail_mode = match phase {
            Phase::Request => g.cfg.fail_mode_request,
            Phase::Response | Phase::Stream => g.cfg.fail_mode_response,
        };
        for configured in &g.cfg.backends {
            if outcome.block.is_some() {
                break;
            }
            let Some(backend) = g.backend(*configured) else { continue };
            let stage = backend.stage();
            // A stream names each backend once, whatever its number of windows.
            if phase != Phase::Stream || !outcome.stages.contains(&stage) {
                outcome.stages.push(stage);
            }
            let check = subject.check(phase, call, outcome.modified);
            let result = backend.check(&check).await;
            subject.resends_request |= backend.resends_request_body();
            match result {
                Ok(verdict) => apply(phase, stage, verdict, subject, call, outcome, fail_mode),
                Err(error) => {
                    self.metrics
                        .backend_errors
                        .get_or_create(&BackendLabels { backend: stage, kind: error.kind })
                        .inc();
                    outcome.backend_failed(stage, &error.message, fail_mode);
                }
            }
        }
    }
}

/// Folds one verdict into the outcome and applies what it changes.
fn apply(
    phase: Phase,
    stage: Stage,
    verdict: Verdict,
    subject: &mut Subject<'_>,
    call: &Call,
    outcome: &mut Outcome,
    fail_mode: FailMode,
) {
    for rule in &verdict.rules {
        outcome.note_rule(rule);
    }
    for detector in &verdict.detectors {
        outcome.note_detector(detector);
    }
    outcome.reasons.extend(verdict.reasons);
    if let Some(refusal) = verdict.block {
        outcome.block =
            Some(Block { status: StatusCode::FORBIDDEN, reason: refusal.reason, stage, rule: refusal.rule });
        return;
    }
    if verdict.alert {
        outcome.alert = true;
    }
    match (phase, verdict.rewrite) {
        (_, None) => {}
        (Phase::Request, Some(Rewrite::Texts(texts))) => redact_request(stage, texts, subject, outcome),
        (Phase::Response, Some(Rewrite::Texts(texts))) => {
            for (i, new) in texts {
                let Some(t) = subject.texts.get(i) else { continue };
                if let Some(d) = subject.doc.as_mut()
                    && !t.path.is_empty()
                    && providers::set_text(d, &t.path, &new).is_ok()
                {
                    outcome.modified = true;
                }
            }
        }
        // A stream cannot be rewritten in place: record it.
        (Phase::Stream, Some(Rewrite::Texts(_))) => outcome.alert = true,
        (Phase::Stream, Some(_)) => {}
        (Phase::Request | Phase::Response, Some(Rewrite::Doc(doc))) => {
            subject.doc = Some(doc);
            outcome.modified = true;
        }
        (Phase::Request | Phase::Response, Some(Rewrite::Raw(text))) => {
            subject.raw_text = Some(text);
            outcome.modified = true;
        }
        (Phase::Request | Phase::Response, Some(Rewrite::Unusable(why))) => {
            outcome.backend_failed(stage, &why, fail_mode);
        }
    }
    if phase == Phase::Request
        && subject.instructions
        && outcome.block.is_none()
        && let Some(d) = subject.doc.as_mut()
    {
        for instruction in verdict.instructions {
            match providers::insert_instruction(call.provider, d, &instruction.text) {
                Ok(()) => {
                    outcome.modified = true;
                    outcome.note_rule(&instruction.id);
                }
                Err(error) => {
                    outcome.reasons.push(format!("system instruction {} not applied: {error}", instruction.id))
                }
            }
        }
    }
}

/// Writes a request's redacted texts back: into the JSON at their paths, or
/// as the new text of a body that is not JSON.
fn redact_request(stage: Stage, texts: Vec<(usize, String)>, subject: &mut Subject<'_>, outcome: &mut Outcome) {
    for (i, new) in texts {
        let Some(t) = subject.texts.get(i) else { continue };
        match subject.doc.as_mut() {
            Some(d) if !t.path.is_empty() => {
                if providers::set_text(d, &t.path, &new).is_ok() {
                    outcome.modified = true;
                }
            }
            // A body that is not JSON but was decoded from another charset
            // cannot be rewritten in place: what must be redacted is refused
            // instead.
            None if !subject.raw_rewritable => {
                outcome.block = Some(Block {
                    status: StatusCode::FORBIDDEN,
                    reason: "request must be redacted but its text cannot be rewritten in place; blocked instead"
                        .into(),
                    stage,
                    rule: "unredactable".into(),
                });
                break;
            }
            _ => {
                subject.raw_text = Some(new);
                outcome.modified = true;
            }
        }
    }
}
