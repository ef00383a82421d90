//! The embedded local engine: a policy of rules, the detectors they use, and
//! scanning texts into findings and one decision. Pure: no I/O, no clock,
//! no logging of text. The pipeline decides what a decision does to the
//! exchange; this module only says what it found and where.
//!
//! # Policy file
//!
//! TOML, unknown fields rejected, every problem reported at once with the
//! id of its entry. The built-in default (`config/policy.toml`, used when no
//! policy file is given) documents every field; in short:
//!
//! ```toml
//! [[detectors]]                 # optional custom detectors
//! name = "ticket_id"            # referred to by rules; lowercase, digits, _
//! regex = '(?-u:\b)TCK-[0-9]{6}(?-u:\b)'  # a named group `value`, if any, is the finding
//! # or: keywords = ["project falcon"], case_sensitive = false, whole_words = true
//!
//! [[rules]]
//! id = "block-credentials"      # unique; shown in decisions and audit events
//! description = "..."           # optional, for people
//! detectors = ["private_key", "ticket_id"]
//! direction = "request"         # request | response | both (default)
//! action = "block"              # block | redact | alert
//! severity = "critical"         # low | medium (default) | high | critical
//! redact_with = "[REDACTED:{detector}]"   # redact rules only; the default shown
//! scope.providers = ["anthropic"]          # Provider names; empty = all
//! scope.hosts = [".openai.com", "*.openai.azure.com"]
//! scope.workloads = ["comm:python*", "/kubepods.slice/*", "label:app=billing"]  # see below
//! scope.kinds = ["content", "tool_result"] # TextKind names; empty = all
//!
//! [[system_prompts]]
//! id = "no-secrets"
//! instruction = "Never output credentials."
//! mode = "prepend"              # prepend (default) | append
//! scope.providers = []          # same scope as rules, without `kinds`
//!
//! [[tools]]                     # MCP tool allow and deny lists
//! id = "no-shell"               # unique among tool lists; the rule of a denial
//! allow = ["search_*", "fetch"] # globs; when non-empty, only these tools
//! deny = ["run_shell", "*exec*"]# globs; a match is denied whatever `allow` says
//! action = "block"              # block | alert
//! scope.hosts = ["mcp.example.com"]        # MCP server hosts; empty = all
//! scope.workloads = ["comm:claude"]        # as for rules
//! ```
//!
//! A tool is denied by a tool list that covers the exchange when a `deny`
//! glob matches its name, or `allow` is non-empty and no `allow` glob
//! matches it (tool names are compared case-sensitively). A blocking list
//! decides over an alerting one; among lists of the same action, the first
//! in the file.
//!
//! Hosts: `api.openai.com` exactly, `.openai.com` the domain and every
//! subdomain, otherwise a glob where `*` is any run of characters;
//! case-insensitive.
//!
//! Workloads: a scope covers a workload when any of its patterns matches.
//! Globs (`*` any run of characters, `?` one) are case-sensitive:
//!
//! | pattern | matches |
//! |---|---|
//! | `comm:<glob>`, or a bare glob | the process name (`claude`, `codex`, `python3`), or the connecting thread's name (so rules written for a thread name keep working) |
//! | `thread:<glob>` | the connecting thread's name only (`tokio-rt-worker`, `HTTP Client`); the process name when the main thread connected |
//! | `exe:<glob>` | the executable: its full path when the glob holds a `/` (`exe:/usr/bin/node`), else its file name (`exe:claude*`) |
//! | `uid:<n>` | the user id the connection was made as |
//! | `cgroup:<glob>`, or anything starting with `/` | the cgroup v2 path (`/kubepods.slice/*`; a container is `cgroup:*<container id>*`) |
//! | `namespace:<glob>`, `pod:<glob>`, `service_account:<glob>` | the Kubernetes pod's namespace, name, service account |
//! | `label:<selector>` | the pod's labels: comma-separated `k=v`, `k!=v` (missing or other), `k` (present), `!k` (missing), all of which must hold |
//!
//! ```toml
//! scope.workloads = ["comm:claude", "exe:/usr/local/bin/codex"]
//! scope.workloads = ["namespace:team-*", "label:app=billing,tier!=dev"]
//! ```
//!
//! A scope naming workloads never covers an exchange whose workload is
//! unknown, a name pattern never matches an unknown name, and the pod
//! patterns never match a workload outside a known pod. Names, executables
//! and arguments are the process's own choice (a process can rename itself
//! or copy a binary): they select which rules apply to cooperating
//! programs; to confine one that is not, scope by uid, cgroup or pod.

//! # Detectors
//!
//! `email`, `phone` (NANP with separators, E.164), `credit_card` (Luhn),
//! `us_ssn`, `iban` (mod-97), `ipv4`, `ipv6`, `aws_access_key_id`,
//! `aws_secret_access_key` (after a label or a key id), `gcp_service_account_key`,
//! `azure_storage_key`, `private_key` (PEM blocks), `jwt`, `openai_api_key`,
//! `anthropic_api_key`, `google_api_key`, `github_token`, `slack_token`,
//! `stripe_secret_key`, `prompt_injection` (phrases, ASCII case-insensitive,
//! single spaces, word boundaries); for MCP tool poisoning
//! `hidden_instructions`, `invisible_unicode` and `exfiltration_url` (what
//! each matches is listed in `config/policy.toml`). Overlapping number-shaped candidates are
//! resolved iban > credit_card > us_ssn > phone > ipv4.
//!
//! # Decision
//!
//! Any block finding blocks (the most severe one is named); otherwise any
//! redact finding redacts; otherwise alerts let the text through with the
//! findings recorded. Findings hold byte ranges, never the matched text:
//! read it with [`Finding::matched`] from the source text, and keep it out
//! of logs.
//!
//! # Speed
//!
//! One [`regex::RegexSet`] over every regex in use, and an alternation of
//! each phrase or keyword list, tells in one lazy-DFA pass which detectors
//! may match: a text that matches nothing (the common case) costs that one
//! pass. Only the detectors it names run their own regex, then the
//! validators; phrases and keywords are then found by one Aho-Corasick
//! automaton. Everything is compiled once, in [`Engine::new`].
//!
//! On the allowed path ([`Prescan`]) even that pass is mostly skipped: the
//! literals every match of the set's regexes starts with are searched for
//! first, all at once and vectorized, in a case- and digit-folded copy of
//! the text (`literals`); a text holding none of them cannot match.
//!
//! Hostile bodies cost about what plain ones do: every search is linear in
//! the text, validators look only at their candidate and its neighbours,
//! a private key block's end is searched once per text however many
//! headers it repeats (and adjacent blocks are one finding), and block and
//! alert rules keep at most a thousand findings per text and detector.

mod detectors;
mod incremental;
mod literals;
mod policy;
mod redact;
mod scope;
mod validate;

#[cfg(test)]
mod tests;

use std::{
    fmt,
    ops::Range,
    sync::{Arc, OnceLock},
};

use aho_corasick::AhoCorasick;
use regex::{Regex, RegexSet};
use serde::Serialize;

pub use detectors::builtin_names as detector_names;
pub use incremental::{MIN_HOLD, StreamTracker};
pub use policy::{Action, BUILTIN_POLICY, Coverage, EntryKind, InstructionMode, Policy, PolicyProblem, Severity};
pub use redact::redact;
pub(crate) use scope::{HostPattern, WorkloadPattern};

use crate::{
    guardrails::model::{Direction, Provider, TextKind},
    workload::{PodInfo, Workload},
};

use policy::{CustomKind, Directions};
use scope::Scope;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{origin}: not valid TOML")]
    Syntax {
        origin: String,
        #[source]
        source: toml::de::Error,
    },
    #[error("invalid policy {origin}:{}", ProblemList(.problems))]
    Invalid { origin: String, problems: Vec<PolicyProblem> },
    #[error("cannot compile the regex of detector `{detector}`")]
    Regex {
        detector: String,
        #[source]
        source: regex::Error,
    },
    #[error("cannot compile the combined regex set")]
    RegexSet {
        #[source]
        source: regex::Error,
    },
    #[error("cannot build the phrase and keyword matcher")]
    Keywords {
        #[source]
        source: aho_corasick::BuildError,
    },
}

struct ProblemList<'a>(&'a [PolicyProblem]);

impl fmt::Display for ProblemList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in self.0 {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

/// The process behind an exchange, as far as it is known.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkloadRef<'a> {
    /// Process name (the thread-group leader's `comm`, at most 15 bytes on
    /// Linux); empty when only the socket is known.
    pub comm: &'a str,
    /// Name of the thread that connected, when it differs from `comm`.
    pub thread: &'a str,
    /// Executable path.
    pub exe: Option<&'a str>,
    pub uid: u32,
    /// cgroup v2 path relative to the cgroup2 mount (`/kubepods.slice/...`).
    pub cgroup: Option<&'a str>,
    /// The Kubernetes pod, when known.
    pub pod: Option<&'a PodInfo>,
}

impl<'a> WorkloadRef<'a> {
    pub fn of(w: &'a Workload) -> Self {
        Self {
            comm: &w.comm,
            thread: &w.thread,
            exe: w.exe.as_deref(),
            uid: w.uid,
            cgroup: w.cgroup.as_deref(),
            pod: w.pod.as_deref(),
        }
    }

    /// The connecting thread's name: the process's when the main thread
    /// connected (or, in iptables mode, when the thread is not known).
    pub fn connecting_thread(&self) -> &'a str {
        if self.thread.is_empty() { self.comm } else { self.thread }
    }
}

/// What an exchange is, for rule selection.
#[derive(Clone, Copy, Debug)]
pub struct ScanContext<'a> {
    pub direction: Direction,
    pub provider: Provider,
    /// The server name the client asked for (SNI).
    pub host: &'a str,
    pub workload: Option<WorkloadRef<'a>>,
}

/// One detector match under one rule. It never holds the matched text, so
/// it can be logged; [`Finding::matched`] reads the text back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Position of the text in the sequence given to [`Engine::scan`].
    pub text_index: usize,
    /// Byte range in that text, on character boundaries.
    pub start: usize,
    pub end: usize,
    #[serde(serialize_with = "arc_str")]
    pub detector: Arc<str>,
    #[serde(serialize_with = "arc_str")]
    pub rule_id: Arc<str>,
    pub action: Action,
    pub severity: Severity,
    /// What redaction puts in place of the range.
    #[serde(skip)]
    pub placeholder: Arc<str>,
}

fn arc_str<S: serde::Serializer>(s: &Arc<str>, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_str(s)
}

impl Finding {
    pub fn range(&self) -> Range<usize> {
        self.start..self.end
    }

    /// The matched text, from the text this finding was made on.
    pub fn matched<'t>(&self, text: &'t str) -> Option<&'t str> {
        text.get(self.range())
    }
}

/// A block, with what caused it. `reason` names the rule and detector,
/// never the matched text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blocked {
    pub rule_id: Arc<str>,
    pub detector: Arc<str>,
    pub severity: Severity,
    pub reason: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Decision {
    /// Nothing found.
    #[default]
    Allow,
    /// Only alert findings: let it through, record them.
    Alert,
    /// Redact findings (and maybe alerts): rewrite the texts, then forward.
    Redact,
    Block(Blocked),
}

/// The result of scanning a set of texts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scan {
    /// By text, then by start. Block and alert rules keep at most the first
    /// thousand per text and detector; redact rules keep all.
    pub findings: Vec<Finding>,
    pub decision: Decision,
}

impl Scan {
    /// The redact findings of one text.
    pub fn redactions(&self, text_index: usize) -> impl Iterator<Item = &Finding> {
        self.findings.iter().filter(move |f| f.text_index == text_index && f.action == Action::Redact)
    }

    /// Text `text_index` with its redact findings rewritten, or `None` when
    /// it has none.
    pub fn redacted(&self, text_index: usize, text: &str) -> Option<String> {
        let mut r = self.redactions(text_index).peekable();
        r.peek()?;
        Some(redact(text, r))
    }

    pub fn alerts(&self) -> impl Iterator<Item = &Finding> {
        self.findings.iter().filter(|f| f.action == Action::Alert)
    }
}

/// The engine's quick answer for the allowed path: whether a text has no
/// candidate of any detector a rule for this exchange uses. A scan finds
/// nothing where every text is clear: findings are made of candidates, and
/// a detector's candidates in a text do not depend on which other
/// detectors run. Texts that are not clear need the full [`Engine::scan`].
pub struct Prescan<'e> {
    engine: &'e Engine,
    prefilter: Option<&'e literals::Prefilter>,
    /// By detector, whether an applying rule uses it (on the stack for up
    /// to 64 detectors: one prescan per exchange, no allocation).
    active: smallvec::SmallVec<[bool; 64]>,
    any: bool,
    /// A keyword detector outside the combined set is in use.
    unfiltered: bool,
    candidates: Vec<Candidate>,
}

impl Prescan<'_> {
    /// Whether `text` has no candidate. The literal prefilter, or else the
    /// combined set, answers alone for almost every text.
    pub fn clear(&mut self, text: &str) -> bool {
        if !self.any || text.is_empty() {
            return true;
        }
        let set_may_match = match self.prefilter {
            Some(prefilter) => prefilter.may_match(text),
            None => self.engine.set.as_ref().is_some_and(|s| s.is_match(text)),
        };
        if !set_may_match && !self.unfiltered {
            return true;
        }
        self.candidates.clear();
        self.engine.find_candidates(text, &self.active, &mut self.candidates);
        self.candidates.is_empty()
    }

    /// Whether every piece of `all` is [`Prescan::clear`]: piece `i` ends
    /// at `ends[i]`, where a non-word character (`"`, as the allowed path
    /// gathers a body's strings) stands before the next one starts. One
    /// literal search over `all` answers for nearly every piece at once;
    /// only a piece it finds something in is looked at on its own.
    pub fn clear_pieces(&mut self, all: &str, ends: &[usize]) -> bool {
        if !self.any {
            return true;
        }
        let piece = |i: usize| &all[if i == 0 { 0 } else { ends[i - 1] + 1 }..ends[i]];
        let Some(prefilter) = self.prefilter.filter(|p| !self.unfiltered && p.searches_within(all)) else {
            return (0..ends.len()).all(|i| self.clear(piece(i)));
        };
        let mut from = 0;
        while let Some(hit) = prefilter.find_in(all, from) {
            // The piece the literal starts in (or the one before the
            // separator it starts at): a literal within a piece is found in
            // it, or is part of a longer one found first.
            let i = ends.partition_point(|&end| end < hit);
            if i == ends.len() {
                return true;
            }
            if !self.clear(piece(i)) {
                return false;
            }
            from = ends[i] + 1;
        }
        true
    }
}

/// A system instruction a policy enforces, for the provider parser to put
/// into the request in the provider's own format.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SystemInstruction {
    pub id: Arc<str>,
    pub text: Arc<str>,
    pub mode: InstructionMode,
}

struct DetectorInfo {
    name: Arc<str>,
    rank: Option<u8>,
}

struct CompiledPattern {
    detector: usize,
    regex: Regex,
    /// Capture group that is the finding, when not the whole match.
    group: Option<usize>,
    validate: Option<detectors::Validator>,
    extend: Option<detectors::Extender>,
    find: Option<detectors::Finder>,
}

struct KeywordInfo {
    detector: usize,
    /// Compared exactly when case-sensitive (the automaton folds ASCII case).
    keyword: Box<str>,
    case_sensitive: bool,
    /// Word boundary required before / after (only where the keyword starts
    /// / ends with a word character).
    bound_start: bool,
    bound_end: bool,
}

struct CompiledRule {
    id: Arc<str>,
    direction: Directions,
    action: Action,
    severity: Severity,
    scope: Scope,
    /// Detector index and the placeholder for it.
    detectors: Vec<(usize, Arc<str>)>,
}

impl CompiledRule {
    fn applies(&self, ctx: &ScanContext<'_>) -> bool {
        let dir = match (self.direction, ctx.direction) {
            (Directions::Both, _) => true,
            (Directions::Request, d) => d == Direction::Request,
            (Directions::Response, d) => d == Direction::Response,
        };
        dir && self.scope.covers(ctx.provider, ctx.host, ctx.workload.as_ref()) && self.reads(ctx.provider)
    }

    /// Whether texts of `provider` can be of a kind the rule covers: a rule
    /// for MCP kinds only never applies to LLM traffic.
    fn reads(&self, provider: Provider) -> bool {
        provider == Provider::Mcp || self.scope.kinds & scope::LLM_KINDS != 0
    }
}

/// A candidate match of one detector, before rules are applied.
#[derive(Clone, Copy, Debug)]
struct Candidate {
    detector: usize,
    start: usize,
    end: usize,
}

/// What a member of the combined regex set stands for.
#[derive(Clone, Copy, Debug)]
enum SetEntry {
    /// `patterns[i]`: run it when the set matches.
    Pattern(usize),
    /// An alternation of a keyword detector's keywords: run the automaton.
    Keywords { detector: usize },
}

impl SetEntry {
    /// The detector this entry finds for.
    fn detector(&self, patterns: &[CompiledPattern]) -> usize {
        match *self {
            SetEntry::Pattern(p) => patterns[p].detector,
            SetEntry::Keywords { detector } => detector,
        }
    }
}

/// A keyword detector with more keywords than this (or longer) skips the
/// combined set and always runs the automaton when active.
const MAX_PREFILTER_KEYWORDS: usize = 256;
const MAX_PREFILTER_BYTES: usize = 8 * 1024;

/// Why a tool list denies a tool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolDenialReason {
    /// A `deny` glob matches it.
    Denied,
    /// The list has `allow` globs and none matches it.
    NotAllowed,
}

/// A tool list's verdict on a tool ([`Engine::tool_denial`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ToolDenial<'a> {
    /// The list's id: the rule of the decision.
    pub list: &'a str,
    /// `Block` or `Alert`.
    pub action: Action,
    pub reason: ToolDenialReason,
}

/// A policy compiled for scanning. Immutable; share it behind an `Arc`.
pub struct Engine {
    detectors: Vec<DetectorInfo>,
    patterns: Vec<CompiledPattern>,
    /// Every pattern, and the keyword lists small enough, in one set: one
    /// pass over a text that matches nothing.
    set: Option<RegexSet>,
    /// What the set's regexes must start with, for the allowed path's
    /// prescan.
    prefilters: literals::Prefilters,
    set_entries: Vec<SetEntry>,
    keywords: Option<AhoCorasick>,
    keyword_info: Vec<KeywordInfo>,
    /// Keyword detectors not in the set.
    unfiltered_keywords: Vec<usize>,
    /// Number of distinct ranks in use (ranks index `0..ranks`).
    ranks: usize,
    rules: Vec<CompiledRule>,
    system_prompts: Vec<(SystemInstruction, Scope)>,
    tool_lists: Vec<policy::ToolList>,
    /// The response detectors as one automaton for streams, built on first
    /// use (`None`: they cannot be, streams use windows).
    stream: OnceLock<Option<Arc<incremental::Automaton>>>,
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("rules", &self.rules.iter().map(|r| &*r.id).collect::<Vec<_>>())
            .field("detectors", &self.detectors.iter().map(|d| &*d.name).collect::<Vec<_>>())
            .field("system_prompts", &self.system_prompts.len())
            .finish()
    }
}

/// Limits for the combined set: generous, since custom regexes join it.
const SET_SIZE_LIMIT: usize = 64 << 20;
const SET_DFA_SIZE_LIMIT: usize = 16 << 20;

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

impl Engine {
    /// Compiles the detectors the policy's rules use (and only those).
    pub fn new(policy: &Policy) -> Result<Self, EngineError> {
        let mut detectors: Vec<DetectorInfo> = Vec::new();
        let mut patterns = Vec::new();
        let mut keyword_info = Vec::new();
        let mut rules = Vec::with_capacity(policy.rules.len());
        for rule in &policy.rules {
            let mut used = Vec::with_capacity(rule.detectors.len());
            for name in &rule.detectors {
                let index = match detectors.iter().position(|d| *d.name == **name) {
                    Some(i) => i,
                    None => {
                        let i = detectors.len();
                        let rank = compile_detector(policy, name, i, &mut patterns, &mut keyword_info)?;
                        detectors.push(DetectorInfo { name: name.as_str().into(), rank });
                        i
                    }
                };
                let placeholder: Arc<str> = rule.redact_with.replace("{detector}", name).into();
                used.push((index, placeholder));
            }
            rules.push(CompiledRule {
                id: rule.id.as_str().into(),
                direction: rule.direction,
                action: rule.action,
                severity: rule.severity,
                scope: rule.scope.clone(),
                detectors: used,
            });
        }
        let mut set_entries: Vec<SetEntry> = (0..patterns.len()).map(SetEntry::Pattern).collect();
        let mut set_regexes: Vec<String> = patterns.iter().map(|p| p.regex.as_str().to_owned()).collect();
        let mut unfiltered_keywords = Vec::new();
        for detector in 0..detectors.len() {
            let words: Vec<&KeywordInfo> = keyword_info.iter().filter(|k| k.detector == detector).collect();
            let Some(first) = words.first() else { continue };
            let bytes: usize = words.iter().map(|k| k.keyword.len()).sum();
            if words.len() > MAX_PREFILTER_KEYWORDS || bytes > MAX_PREFILTER_BYTES {
                unfiltered_keywords.push(detector);
                continue;
            }
            let alternation = words.iter().map(|k| regex::escape(&k.keyword)).collect::<Vec<_>>().join("|");
            let flags = if first.case_sensitive { "" } else { "i" };
            set_regexes.push(format!("(?{flags}:{alternation})"));
            set_entries.push(SetEntry::Keywords { detector });
        }
        let set_detectors = set_entries.iter().map(|e| e.detector(&patterns)).collect();
        let prefilters = literals::Prefilters::new(set_regexes.clone(), set_detectors, rules.len());
        let set = if set_regexes.is_empty() {
            None
        } else {
            let set = regex::RegexSetBuilder::new(&set_regexes)
                .size_limit(SET_SIZE_LIMIT)
                .dfa_size_limit(SET_DFA_SIZE_LIMIT)
                .build()
                .map_err(|source| EngineError::RegexSet { source })?;
            Some(set)
        };
        let keywords = if keyword_info.is_empty() {
            None
        } else {
            let ac = AhoCorasick::builder()
                .ascii_case_insensitive(true)
                .build(keyword_info.iter().map(|k: &KeywordInfo| k.keyword.as_bytes()))
                .map_err(|source| EngineError::Keywords { source })?;
            Some(ac)
        };
        let ranks = detectors.iter().filter_map(|d| d.rank).map(|r| usize::from(r) + 1).max().unwrap_or(0);
        let system_prompts = policy
            .system_prompts
            .iter()
            .map(|p| {
                let instruction =
                    SystemInstruction { id: p.id.as_str().into(), text: p.instruction.as_str().into(), mode: p.mode };
                (instruction, p.scope.clone())
            })
            .collect();
        Ok(Self {
            detectors,
            patterns,
            set,
            prefilters,
            set_entries,
            keywords,
            keyword_info,
            unfiltered_keywords,
            ranks,
            rules,
            system_prompts,
            tool_lists: policy.tool_lists.clone(),
            stream: OnceLock::new(),
        })
    }

    /// The engine of the built-in default policy.
    pub fn builtin() -> Result<Self, EngineError> {
        Self::new(&Policy::builtin()?)
    }

    /// Scans `texts` (each with its kind) under the rules that apply to
    /// `ctx`. Finding indexes count the texts in the order given.
    pub fn scan<'t>(&self, ctx: &ScanContext<'_>, texts: impl IntoIterator<Item = (TextKind, &'t str)>) -> Scan {
        let rules: Vec<&CompiledRule> = self.rules.iter().filter(|r| r.applies(ctx)).collect();
        if rules.is_empty() {
            return Scan::default();
        }
        let mut findings = Vec::new();
        let mut active = vec![false; self.detectors.len()];
        let mut candidates = Vec::new();
        // Findings so far in this text, by rule and detector.
        let mut kept: Vec<(usize, usize, usize)> = Vec::new();
        for (text_index, (kind, text)) in texts.into_iter().enumerate() {
            if text.is_empty() {
                continue;
            }
            let bit = scope::kind_bit(kind);
            active.fill(false);
            let mut any = false;
            for r in rules.iter().filter(|r| r.scope.kinds & bit != 0) {
                for &(d, _) in &r.detectors {
                    active[d] = true;
                    any = true;
                }
            }
            if !any {
                continue;
            }
            candidates.clear();
            self.find_candidates(text, &active, &mut candidates);
            self.resolve(&mut candidates);
            kept.clear();
            for c in &candidates {
                for (ri, r) in rules.iter().enumerate().filter(|(_, r)| r.scope.kinds & bit != 0) {
                    if let Some((_, placeholder)) = r.detectors.iter().find(|(d, _)| *d == c.detector) {
                        if r.action != Action::Redact && !keep(&mut kept, ri, c.detector) {
                            continue;
                        }
                        findings.push(Finding {
                            text_index,
                            start: c.start,
                            end: c.end,
                            detector: self.detectors[c.detector].name.clone(),
                            rule_id: r.id.clone(),
                            action: r.action,
                            severity: r.severity,
                            placeholder: placeholder.clone(),
                        });
                    }
                }
            }
        }
        let decision = decide(&findings, ctx.direction);
        Scan { findings, decision }
    }

    /// A check that finds nothing in texts [`Engine::scan`] would find
    /// nothing in either, under the rules that apply to `ctx` whatever the
    /// texts' kinds (see [`Prescan::clear`]).
    pub fn prescan(&self, ctx: &ScanContext<'_>) -> Prescan<'_> {
        let mut active = smallvec::smallvec![false; self.detectors.len()];
        let mut applying = 0u64;
        for (i, r) in self.rules.iter().enumerate().filter(|(_, r)| r.applies(ctx)) {
            applying |= 1u64.checked_shl(i as u32).unwrap_or(0);
            for &(d, _) in &r.detectors {
                active[d] = true;
            }
        }
        let any = active.iter().any(|&a| a);
        let unfiltered = self.unfiltered_keywords.iter().any(|&d| active[d]);
        let prefilter = if any { self.prefilters.get(applying, &active) } else { None };
        Prescan { engine: self, prefilter, active, any, unfiltered, candidates: Vec::new() }
    }

    /// Whether the policy's tool lists deny MCP tool `tool` of server `host`
    /// to `workload` (see the module documentation): the deciding list, or
    /// `None` when the tool is allowed. Cheap: no list, no work.
    pub fn tool_denial(&self, host: &str, workload: Option<&WorkloadRef<'_>>, tool: &str) -> Option<ToolDenial<'_>> {
        let mut alert = None;
        for list in &self.tool_lists {
            if !(list.scope.covers_host(host) && list.scope.covers_workload(workload)) {
                continue;
            }
            let matches = |globs: &[String]| globs.iter().any(|g| scope::glob(g.as_bytes(), tool.as_bytes(), false));
            let reason = if matches(&list.deny) {
                ToolDenialReason::Denied
            } else if !list.allow.is_empty() && !matches(&list.allow) {
                ToolDenialReason::NotAllowed
            } else {
                continue;
            };
            let denial = ToolDenial { list: &list.id, action: list.action, reason };
            if list.action == Action::Block {
                return Some(denial);
            }
            alert.get_or_insert(denial);
        }
        alert
    }

    /// Whether the policy has any tool list (when not, no tool is denied).
    pub fn has_tool_lists(&self) -> bool {
        !self.tool_lists.is_empty()
    }

    /// The system instructions the policy enforces on this exchange, in
    /// policy order. Empty for responses.
    pub fn system_instructions(&self, ctx: &ScanContext<'_>) -> Vec<&SystemInstruction> {
        if ctx.direction != Direction::Request {
            return Vec::new();
        }
        self.system_prompts
            .iter()
            .filter(|(_, scope)| scope.covers(ctx.provider, ctx.host, ctx.workload.as_ref()))
            .map(|(i, _)| i)
            .collect()
    }

    fn find_candidates(&self, text: &str, active: &[bool], out: &mut Vec<Candidate>) {
        let mut run_keywords = self.unfiltered_keywords.iter().any(|&d| active[d]);
        if let Some(set) = &self.set {
            for i in set.matches(text).iter() {
                match self.set_entries[i] {
                    SetEntry::Pattern(p) => {
                        let p = &self.patterns[p];
                        if active[p.detector] {
                            p.find(text, out);
                        }
                    }
                    SetEntry::Keywords { detector } => run_keywords |= active[detector],
                }
            }
        }
        if run_keywords && let Some(ac) = &self.keywords {
            for m in ac.find_overlapping_iter(text) {
                let k = &self.keyword_info[m.pattern().as_usize()];
                let (start, end) = (m.start(), m.end());
                if !active[k.detector] || !text.is_char_boundary(start) || !text.is_char_boundary(end) {
                    continue;
                }
                if k.case_sensitive && text[start..end] != *k.keyword {
                    continue;
                }
                if k.bound_start && text[..start].chars().next_back().is_some_and(is_word_char) {
                    continue;
                }
                if k.bound_end && text[end..].chars().next().is_some_and(is_word_char) {
                    continue;
                }
                out.push(Candidate { detector: k.detector, start, end });
            }
        }
    }

    /// Sorts candidates and drops overlaps: of one detector, the leftmost
    /// longest stays; of ranked detectors, the lowest rank stays.
    fn resolve(&self, candidates: &mut Vec<Candidate>) {
        candidates.sort_by_key(|c| (c.start, std::cmp::Reverse(c.end), c.detector));
        let mut last_end = vec![0usize; self.detectors.len()];
        let mut seen = vec![false; self.detectors.len()];
        candidates.retain(|c| {
            let keep = !seen[c.detector] || c.start >= last_end[c.detector];
            if keep {
                seen[c.detector] = true;
                last_end[c.detector] = c.end;
            }
            keep
        });
        if self.ranks < 2 {
            return;
        }
        // Per rank, the (disjoint, sorted) ranges of that rank's candidates.
        let mut by_rank: Vec<Vec<(usize, usize)>> = vec![Vec::new(); self.ranks];
        for c in candidates.iter() {
            if let Some(r) = self.detectors[c.detector].rank {
                by_rank[usize::from(r)].push((c.start, c.end));
            }
        }
        candidates.retain(|c| {
            let Some(rank) = self.detectors[c.detector].rank else { return true };
            !by_rank[..usize::from(rank)].iter().any(|ranges| {
                // The last range starting before our end is the only one
                // that can reach back over our start.
                let i = ranges.partition_point(|&(s, _)| s < c.end);
                i > 0 && ranges[i - 1].1 > c.start
            })
        });
    }
}

impl CompiledPattern {
    fn find(&self, text: &str, out: &mut Vec<Candidate>) {
        let mut blocks = validate::KeyBlocks::default();
        // Returns the candidate's end when it is one.
        let mut push = |r: Range<usize>| {
            if self.validate.is_none_or(|v| v(text, r.clone())) {
                let end = self.extend.map_or(r.end, |e| e(text, r.end, &mut blocks));
                out.push(Candidate { detector: self.detector, start: r.start, end });
                return Some(end);
            }
            None
        };
        match self.group {
            Some(g) => {
                for caps in self.regex.captures_iter(text) {
                    if let Some(m) = caps.get(g) {
                        push(m.range());
                    }
                }
            }
            None if self.extend.is_some() || self.find.is_some() => {
                // Search on from the end of each extended candidate: a match
                // starting inside it would be dropped by `resolve` anyway,
                // and a body of nothing but key headers is then one search,
                // not one per header.
                let mut at = 0;
                let next = |at| match self.find {
                    Some(find) => find(text, at),
                    None => self.regex.find_at(text, at).map(|m| m.range()),
                };
                while let Some(r) = next(at) {
                    let extended = push(r.clone()).unwrap_or(r.end);
                    match extended.max(r.end) {
                        next if next > r.start => at = next,
                        // An empty match: on to the next character.
                        _ => match text[r.end..].chars().next() {
                            Some(c) => at = r.end + c.len_utf8(),
                            None => break,
                        },
                    }
                }
            }
            None => {
                for m in self.regex.find_iter(text) {
                    push(m.range());
                }
            }
        }
    }
}

/// Compiles detector `name` as index `index`; returns its rank.
fn compile_detector(
    policy: &Policy,
    name: &str,
    index: usize,
    patterns: &mut Vec<CompiledPattern>,
    keyword_info: &mut Vec<KeywordInfo>,
) -> Result<Option<u8>, EngineError> {
    let regex_error = |source| EngineError::Regex { detector: name.to_owned(), source };
    if let Some(b) = detectors::builtin(name) {
        match b.kind {
            detectors::Kind::Regexes(ps) => {
                for p in ps {
                    let regex = Regex::new(p.regex).map_err(regex_error)?;
                    let group = (regex.captures_len() > 1).then_some(1);
                    patterns.push(CompiledPattern {
                        detector: index,
                        regex,
                        group,
                        validate: p.validate,
                        extend: p.extend,
                        find: p.find,
                    });
                }
            }
            detectors::Kind::Phrases(phrases) => {
                for phrase in phrases {
                    keyword_info.push(keyword(index, phrase, false, true));
                }
            }
        }
        return Ok(b.rank);
    }
    // Policy validation guarantees every name is built-in or custom.
    if let Some(d) = policy.detectors.iter().find(|d| d.name == name) {
        match &d.kind {
            CustomKind::Regex(pattern) => {
                let regex = policy::custom_regex(pattern).map_err(regex_error)?;
                let group = regex.capture_names().position(|n| n == Some("value"));
                patterns.push(CompiledPattern {
                    detector: index,
                    regex,
                    group,
                    validate: None,
                    extend: None,
                    find: None,
                });
            }
            CustomKind::Keywords { words, case_sensitive, whole_words } => {
                for w in words {
                    keyword_info.push(keyword(index, w, *case_sensitive, *whole_words));
                }
            }
        }
    }
    Ok(None)
}

fn keyword(detector: usize, keyword: &str, case_sensitive: bool, whole_words: bool) -> KeywordInfo {
    KeywordInfo {
        detector,
        keyword: keyword.into(),
        case_sensitive,
        bound_start: whole_words && keyword.chars().next().is_some_and(is_word_char),
        bound_end: whole_words && keyword.chars().next_back().is_some_and(is_word_char),
    }
}

/// Findings a block or alert rule keeps per text and detector. One is
/// enough to decide (severity is per rule); a body made of thousands of
/// matches must not cost thousands of findings. Redact rules keep every
/// finding: each match must be rewritten.
const MAX_FINDINGS_PER_RULE: usize = 1000;

/// Counts a finding of `rule` and `detector` in `kept`; whether it is under
/// [`MAX_FINDINGS_PER_RULE`].
fn keep(kept: &mut Vec<(usize, usize, usize)>, rule: usize, detector: usize) -> bool {
    match kept.iter_mut().find(|(r, d, _)| *r == rule && *d == detector) {
        Some((_, _, n)) if *n >= MAX_FINDINGS_PER_RULE => false,
        Some((_, _, n)) => {
            *n += 1;
            true
        }
        None => {
            kept.push((rule, detector, 1));
            true
        }
    }
}

/// Block beats redact beats alert; among blocks the most severe (then the
/// first) is named.
fn decide(findings: &[Finding], direction: Direction) -> Decision {
    let mut block: Option<&Finding> = None;
    for f in findings.iter().filter(|f| f.action == Action::Block) {
        if block.is_none_or(|b| f.severity > b.severity) {
            block = Some(f);
        }
    }
    if let Some(f) = block {
        let dir = match direction {
            Direction::Request => "request",
            Direction::Response => "response",
        };
        return Decision::Block(Blocked {
            rule_id: f.rule_id.clone(),
            detector: f.detector.clone(),
            severity: f.severity,
            reason: format!("{} found in the {dir} (rule {})", f.detector, f.rule_id),
        });
    }
    if findings.iter().any(|f| f.action == Action::Redact) {
        Decision::Redact
    } else if findings.is_empty() {
        Decision::Allow
    } else {
        Decision::Alert
    }
}
