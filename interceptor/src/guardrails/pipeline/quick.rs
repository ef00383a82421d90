//! The allowed path without a parse tree. When the local engine is the only
//! backend and no detector it runs has a candidate in any string of a JSON
//! body, the body is allowed as the full path would allow it: the decision,
//! the audit event and the metrics are the same, but no
//! [`serde_json::Value`], no text spans and no paths are built. The strings
//! are read in one borrowed pass ([`strings::each_string`]); whatever that
//! pass cannot prove clean (a candidate, a body that is not JSON, a backend
//! that reads the document, system instructions to add, prompts to audit,
//! a body the engine would scan off the runtime) takes the full path. The
//! same pass reads what a traced answer says of itself.
//!
//! The walk gathers the strings into one text, and one literal search over
//! it ([`Prescan::clear_pieces`](crate::guardrails::engine::Prescan::clear_pieces))
//! clears nearly every body at once; a string it finds something in is
//! prescanned on its own.

use std::borrow::Cow;

use crate::guardrails::{
    backend::Call,
    genai::ResponseFacts,
    model::{Direction, Provider, Stage},
    offload::INLINE_SCAN_MAX,
    providers::strings,
    usage::{self, Usage},
};

use super::{Guardrails, outcome::Outcome};

/// What a clean body leaves for the full path's bookkeeping.
pub(super) struct Clean<'a> {
    /// The decision: allowed, with the local engine named once per time it
    /// is configured, as the loop over the backends names it.
    pub outcome: Outcome,
    /// A request's top-level `model`, when it is a string.
    pub model: Option<String>,
    /// A response's usage fields, read in the same pass.
    pub usage: Option<Usage>,
    /// What a traced response says of itself, read in the same pass and
    /// borrowed from the body.
    pub facts: Option<ResponseFacts<'a>>,
}

/// The body `json` (decoded, UTF-8) is clean for `call` in `direction`, or
/// `None`: the full path decides.
pub(super) fn clean<'a>(g: &Guardrails, call: &Call, direction: Direction, json: &'a [u8]) -> Option<Clean<'a>> {
    let engine = g.engine.as_ref()?;
    if g.cfg.audit_prompts || json.len() > INLINE_SCAN_MAX {
        return None;
    }
    // Only the local engine judges: it reads the texts and nothing else.
    let mut stages = Vec::new();
    for configured in &g.cfg.backends {
        if let Some(backend) = g.backend(*configured) {
            if backend.stage() != Stage::Local {
                return None;
            }
            stages.push(Stage::Local);
        }
    }
    let ctx = call.scan_context(direction);
    if direction == Direction::Request {
        // An unknown body may name its provider; a request may take system
        // instructions: both need the document.
        if call.provider == Provider::Generic || !engine.system_instructions(&ctx).is_empty() {
            return None;
        }
    }
    let mut prescan = engine.prescan(&ctx);
    // All the strings in one text, each followed by a `"`, for one literal
    // search that clears almost every body at once.
    let mut all = String::with_capacity(json.len());
    let mut ends = smallvec::SmallVec::<[usize; 64]>::new();
    let walked = strings::each_string(json, &mut |s| {
        all.push_str(s);
        ends.push(all.len());
        all.push('"');
        true
    })
    .ok()?;
    if !prescan.clear_pieces(&all, &ends) {
        return None;
    }
    let (model, usage, facts) = match direction {
        Direction::Request => (walked.model.map(Cow::into_owned), None, None),
        Direction::Response => {
            let usage = usage::from_fields(call.provider, &walked.usage, &walked.usage_metadata);
            (None, usage, call.span.is_some().then(|| ResponseFacts::of_walked(walked)))
        }
    };
    Some(Clean { outcome: Outcome { stages, ..Outcome::default() }, model, usage, facts })
}
