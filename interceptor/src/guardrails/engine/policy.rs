//! The policy file: parsing, validation and the built-in default.
//!
//! Each rule, detector and system prompt is deserialized on its own, so one
//! bad entry does not hide the problems of the others: every problem is
//! reported at once, each with the id of the entry it belongs to. The
//! schema is documented on the parent module and in `config/policy.toml`.

use std::{collections::HashSet, fmt};

use serde::{Deserialize, Serialize};

use super::{
    EngineError, detectors,
    scope::{self, HostPattern, Scope, WorkloadPattern},
};

/// The built-in default policy, used when no policy file is given.
pub const BUILTIN_POLICY: &str = include_str!("../../../config/policy.toml");

/// What a rule does with a text its detectors match.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Refuse the exchange: the request is not sent, or the response is cut.
    Block,
    /// Replace the matched text with the rule's placeholder.
    Redact,
    /// Let it through and record the finding.
    Alert,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Block => "block",
            Self::Redact => "redact",
            Self::Alert => "alert",
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Low,
    #[default]
    Medium,
    High,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Low => "low",
            Self::Medium => "medium",
            Self::High => "high",
            Self::Critical => "critical",
        }
    }
}

/// Which direction a rule checks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Directions {
    Request,
    Response,
    #[default]
    Both,
}

/// Where an enforced system instruction goes relative to the client's own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstructionMode {
    /// Before the client's system prompt (or as the only one).
    #[default]
    Prepend,
    /// After the client's system prompt.
    Append,
}

/// One thing wrong with a policy, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyProblem {
    /// The entry: ``rule `block-keys` ``, `rules[3]`, ``detector `tickets` ``, `top level`.
    pub location: String,
    pub message: String,
}

impl fmt::Display for PolicyProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location, self.message)
    }
}

/// A validated policy. Build an [`super::Engine`] from it to scan.
#[derive(Clone, Debug)]
pub struct Policy {
    pub(super) origin: String,
    pub(super) detectors: Vec<CustomDetector>,
    pub(super) rules: Vec<Rule>,
    pub(super) system_prompts: Vec<SystemPrompt>,
    pub(super) tool_lists: Vec<ToolList>,
}

/// A `[[tools]]` entry: which MCP tools a scope may call.
#[derive(Clone, Debug)]
pub(super) struct ToolList {
    pub id: String,
    /// Globs; when non-empty, only tools matching one of them are allowed.
    pub allow: Vec<String>,
    /// Globs; a tool matching one is denied, whatever `allow` says.
    pub deny: Vec<String>,
    /// `Block` or `Alert`.
    pub action: Action,
    pub scope: Scope,
}

#[derive(Clone, Debug)]
pub(super) struct CustomDetector {
    pub name: String,
    pub kind: CustomKind,
}

#[derive(Clone, Debug)]
pub(super) enum CustomKind {
    Regex(String),
    Keywords { words: Vec<String>, case_sensitive: bool, whole_words: bool },
}

#[derive(Clone, Debug)]
pub(super) struct Rule {
    pub id: String,
    pub detectors: Vec<String>,
    pub direction: Directions,
    pub action: Action,
    pub severity: Severity,
    pub scope: Scope,
    pub redact_with: String,
}

#[derive(Clone, Debug)]
pub(super) struct SystemPrompt {
    pub id: String,
    pub instruction: String,
    pub mode: InstructionMode,
    pub scope: Scope,
}

const DEFAULT_PLACEHOLDER: &str = "[REDACTED:{detector}]";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    id: String,
    #[serde(default)]
    #[allow(dead_code, reason = "documentation for people reading the policy")]
    description: String,
    detectors: Vec<String>,
    #[serde(default)]
    direction: Directions,
    action: Action,
    #[serde(default)]
    severity: Severity,
    #[serde(default)]
    scope: ScopeSpec,
    redact_with: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScopeSpec {
    #[serde(default)]
    providers: Vec<String>,
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    workloads: Vec<String>,
    #[serde(default)]
    kinds: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DetectorSpec {
    name: String,
    #[serde(default)]
    #[allow(dead_code, reason = "documentation for people reading the policy")]
    description: String,
    regex: Option<String>,
    keywords: Option<Vec<String>>,
    case_sensitive: Option<bool>,
    whole_words: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SystemPromptSpec {
    id: String,
    #[serde(default)]
    #[allow(dead_code, reason = "documentation for people reading the policy")]
    description: String,
    instruction: String,
    #[serde(default)]
    mode: InstructionMode,
    #[serde(default)]
    scope: ScopeSpec,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ToolListSpec {
    id: String,
    #[serde(default)]
    #[allow(dead_code, reason = "documentation for people reading the policy")]
    description: String,
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    deny: Vec<String>,
    action: Action,
    #[serde(default)]
    scope: ScopeSpec,
}

/// Largest compiled size of one custom regex.
const CUSTOM_REGEX_SIZE_LIMIT: usize = 1 << 20;

pub(super) fn custom_regex(pattern: &str) -> Result<regex::Regex, regex::Error> {
    regex::RegexBuilder::new(pattern).size_limit(CUSTOM_REGEX_SIZE_LIMIT).build()
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Collects problems while a policy is checked.
struct Problems(Vec<PolicyProblem>);

impl Problems {
    fn push(&mut self, location: &str, message: impl Into<String>) {
        self.0.push(PolicyProblem { location: location.to_owned(), message: message.into() });
    }
}

/// Where an array entry is, by its id (or name) when it has one.
fn locate(table: &str, what: &str, key: &str, i: usize, value: &toml::Value) -> String {
    match value.get(key).and_then(toml::Value::as_str) {
        Some(id) => format!("{what} `{id}`"),
        None => format!("{table}[{i}]"),
    }
}

/// Entries of a top-level array of tables, each deserialized on its own.
fn entries<T: serde::de::DeserializeOwned>(
    root: &mut toml::Table,
    table: &str,
    what: &str,
    key: &str,
    problems: &mut Problems,
) -> Vec<(String, T)> {
    let Some(value) = root.remove(table) else { return Vec::new() };
    let toml::Value::Array(items) = value else {
        problems.push("top level", format!("`{table}` must be an array of tables ([[{table}]])"));
        return Vec::new();
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let location = locate(table, what, key, i, &item);
        match item.try_into::<T>() {
            Ok(spec) => out.push((location, spec)),
            Err(e) => problems.push(&location, e.message().trim().to_owned()),
        }
    }
    out
}

fn compile_scope(spec: ScopeSpec, location: &str, problems: &mut Problems) -> Scope {
    let mut scope = Scope { kinds: scope::ALL_KINDS, ..Scope::default() };
    for p in spec.providers {
        match scope::provider_named(&p) {
            Some(provider) => scope.providers.push(provider),
            None => problems.push(
                location,
                format!("unknown provider `{p}` (known: {})", scope::provider_names().collect::<Vec<_>>().join(", ")),
            ),
        }
    }
    for h in spec.hosts {
        match HostPattern::parse(&h) {
            Ok(p) => scope.hosts.push(p),
            Err(e) => problems.push(location, e),
        }
    }
    for w in spec.workloads {
        match WorkloadPattern::parse(&w) {
            Ok(p) => scope.workloads.push(p),
            Err(e) => problems.push(location, e),
        }
    }
    if !spec.kinds.is_empty() {
        scope.kinds = 0;
        for k in spec.kinds {
            match scope::kind_named(&k) {
                Some(kind) => scope.kinds |= scope::kind_bit(kind),
                None => problems.push(
                    location,
                    format!("unknown text kind `{k}` (known: {})", scope::kind_names().collect::<Vec<_>>().join(", ")),
                ),
            }
        }
    }
    scope
}

/// What kind of policy entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    Rule,
    SystemPrompt,
}

/// Whether a policy entry applies to a workload, and why (for `interceptor
/// check-policy`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Coverage {
    pub kind: EntryKind,
    pub id: String,
    /// A rule's action.
    pub action: Option<Action>,
    /// Whether the entry applies: its workloads cover the workload, and its
    /// providers and hosts the provider and host, when those are given.
    pub applies: bool,
    /// The scope's workload patterns (empty: every workload).
    pub workloads: Vec<String>,
    /// Those of them that match the workload.
    pub matched: Vec<String>,
    /// The scope's other conditions (`providers: …`, `hosts: …`, `kinds: …`,
    /// `direction: …`), checked only for what was given.
    pub conditions: Vec<String>,
}

impl Policy {
    /// How every rule and system prompt (in policy order) sees `workload`
    /// (`None`: unknown), on `provider` and `host` when given.
    pub fn coverage(
        &self,
        workload: Option<&super::WorkloadRef<'_>>,
        provider: Option<super::Provider>,
        host: Option<&str>,
    ) -> Vec<Coverage> {
        let entry = |kind, id: &str, action, scope: &Scope, direction: Option<Directions>| {
            let mut conditions = scope.conditions();
            match direction {
                Some(Directions::Request) => conditions.push("direction: request".into()),
                Some(Directions::Response) => conditions.push("direction: response".into()),
                Some(Directions::Both) | None => {}
            }
            Coverage {
                kind,
                id: id.to_owned(),
                action,
                applies: scope.covers_workload(workload)
                    && provider.is_none_or(|p| scope.covers_provider(p))
                    && host.is_none_or(|h| scope.covers_host(h)),
                workloads: scope.workloads.iter().map(ToString::to_string).collect(),
                matched: workload
                    .map(|w| scope.workloads.iter().filter(|p| p.matches(w)).map(ToString::to_string).collect())
                    .unwrap_or_default(),
                conditions,
            }
        };
        let rules =
            self.rules.iter().map(|r| entry(EntryKind::Rule, &r.id, Some(r.action), &r.scope, Some(r.direction)));
        let prompts = self.system_prompts.iter().map(|p| entry(EntryKind::SystemPrompt, &p.id, None, &p.scope, None));
        rules.chain(prompts).collect()
    }

    /// Parses and validates a policy. `origin` names it in errors (a path,
    /// or "built-in policy").
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, EngineError> {
        let mut root: toml::Table =
            toml::from_str(text).map_err(|source| EngineError::Syntax { origin: origin.to_owned(), source })?;
        let mut problems = Problems(Vec::new());
        let detector_specs: Vec<(String, DetectorSpec)> =
            entries(&mut root, "detectors", "detector", "name", &mut problems);
        let rule_specs: Vec<(String, RuleSpec)> = entries(&mut root, "rules", "rule", "id", &mut problems);
        let prompt_specs: Vec<(String, SystemPromptSpec)> =
            entries(&mut root, "system_prompts", "system prompt", "id", &mut problems);
        let tool_specs: Vec<(String, ToolListSpec)> = entries(&mut root, "tools", "tool list", "id", &mut problems);
        for key in root.keys() {
            problems.push(
                "top level",
                format!("unknown key `{key}` (expected `detectors`, `rules`, `system_prompts`, `tools`)"),
            );
        }

        let mut detectors = Vec::new();
        let mut names = HashSet::new();
        for (loc, spec) in detector_specs {
            if let Some(d) = check_detector(&loc, spec, &mut names, &mut problems) {
                detectors.push(d);
            }
        }

        let mut rules = Vec::new();
        let mut ids = HashSet::new();
        for (loc, spec) in rule_specs {
            if !valid_id(&spec.id) {
                problems.push(&loc, "`id` must be non-empty ASCII letters, digits, `-`, `_` or `.`");
            } else if !ids.insert(spec.id.clone()) {
                problems.push(&loc, "duplicate rule id");
            }
            if spec.detectors.is_empty() {
                problems.push(&loc, "`detectors` is empty");
            }
            let mut used = Vec::new();
            for d in spec.detectors {
                if detectors::builtin(&d).is_none() && !names.contains(&d) {
                    let known = detectors::builtin_names().collect::<Vec<_>>().join(", ");
                    problems.push(
                        &loc,
                        format!("unknown detector `{d}` (built-in: {known}; or define it in [[detectors]])"),
                    );
                } else if !used.contains(&d) {
                    used.push(d);
                }
            }
            if spec.redact_with.is_some() && spec.action != Action::Redact {
                problems.push(&loc, "`redact_with` only applies to action = \"redact\"");
            }
            let scope = compile_scope(spec.scope, &loc, &mut problems);
            rules.push(Rule {
                id: spec.id,
                detectors: used,
                direction: spec.direction,
                action: spec.action,
                severity: spec.severity,
                scope,
                redact_with: spec.redact_with.unwrap_or_else(|| DEFAULT_PLACEHOLDER.to_owned()),
            });
        }

        let mut system_prompts = Vec::new();
        let mut prompt_ids = HashSet::new();
        for (loc, spec) in prompt_specs {
            if !valid_id(&spec.id) {
                problems.push(&loc, "`id` must be non-empty ASCII letters, digits, `-`, `_` or `.`");
            } else if !prompt_ids.insert(spec.id.clone()) {
                problems.push(&loc, "duplicate system prompt id");
            }
            if spec.instruction.trim().is_empty() {
                problems.push(&loc, "`instruction` is empty");
            }
            if !spec.scope.kinds.is_empty() {
                problems.push(&loc, "`scope.kinds` does not apply to system prompts");
            }
            let scope = compile_scope(spec.scope, &loc, &mut problems);
            system_prompts.push(SystemPrompt { id: spec.id, instruction: spec.instruction, mode: spec.mode, scope });
        }

        let mut tool_lists = Vec::new();
        let mut tool_ids = HashSet::new();
        for (loc, spec) in tool_specs {
            if let Some(list) = check_tool_list(&loc, spec, &mut tool_ids, &mut problems) {
                tool_lists.push(list);
            }
        }

        if problems.0.is_empty() {
            Ok(Self { origin: origin.to_owned(), detectors, rules, system_prompts, tool_lists })
        } else {
            Err(EngineError::Invalid { origin: origin.to_owned(), problems: problems.0 })
        }
    }

    /// The built-in default policy ([`BUILTIN_POLICY`]).
    pub fn builtin() -> Result<Self, EngineError> {
        Self::from_toml(BUILTIN_POLICY, "built-in policy")
    }

    /// Where the policy came from, as given to [`Policy::from_toml`].
    pub fn origin(&self) -> &str {
        &self.origin
    }

    pub fn rule_ids(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|r| r.id.as_str())
    }

    pub fn system_prompt_ids(&self) -> impl Iterator<Item = &str> {
        self.system_prompts.iter().map(|p| p.id.as_str())
    }
}

fn check_tool_list(
    loc: &str,
    spec: ToolListSpec,
    ids: &mut HashSet<String>,
    problems: &mut Problems,
) -> Option<ToolList> {
    let before = problems.0.len();
    if !valid_id(&spec.id) {
        problems.push(loc, "`id` must be non-empty ASCII letters, digits, `-`, `_` or `.`");
    } else if !ids.insert(spec.id.clone()) {
        problems.push(loc, "duplicate tool list id");
    }
    if spec.allow.is_empty() && spec.deny.is_empty() {
        problems.push(loc, "give `allow`, `deny` or both");
    }
    for (field, globs) in [("allow", &spec.allow), ("deny", &spec.deny)] {
        if globs.iter().any(|g| g.trim().is_empty()) {
            problems.push(loc, format!("`{field}` holds an empty tool name"));
        }
    }
    if spec.action == Action::Redact {
        problems.push(loc, "`action` must be \"block\" or \"alert\" (a tool call cannot be redacted)");
    }
    if !spec.scope.kinds.is_empty() {
        problems.push(loc, "`scope.kinds` does not apply to tool lists");
    }
    if !spec.scope.providers.is_empty() {
        problems.push(loc, "`scope.providers` does not apply to tool lists (they apply to MCP only)");
    }
    let scope = compile_scope(spec.scope, loc, problems);
    (problems.0.len() == before).then_some(ToolList {
        id: spec.id,
        allow: spec.allow,
        deny: spec.deny,
        action: spec.action,
        scope,
    })
}

fn check_detector(
    loc: &str,
    spec: DetectorSpec,
    names: &mut HashSet<String>,
    problems: &mut Problems,
) -> Option<CustomDetector> {
    let before = problems.0.len();
    let name_ok =
        !spec.name.is_empty() && spec.name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !name_ok {
        problems.push(loc, "`name` must be non-empty lowercase ASCII letters, digits or `_`");
    } else if detectors::builtin(&spec.name).is_some() {
        problems.push(loc, "`name` is taken by a built-in detector");
    } else if !names.insert(spec.name.clone()) {
        problems.push(loc, "duplicate detector name");
    }
    let kind = match (spec.regex, spec.keywords) {
        (Some(regex), None) => {
            if spec.case_sensitive.is_some() || spec.whole_words.is_some() {
                problems.push(
                    loc,
                    "`case_sensitive` and `whole_words` apply to `keywords`; use (?i) and (?-u:\\b) in a regex",
                );
            }
            if let Err(e) = custom_regex(&regex) {
                // regex errors span several lines (pattern, caret, cause):
                // keep the cause, so each problem stays on one line.
                let text = e.to_string();
                let cause = text.lines().rev().find_map(|l| l.trim().strip_prefix("error:")).unwrap_or(&text);
                problems.push(loc, format!("invalid regex: {}", cause.trim()));
            } else if regex::Regex::new(&regex).is_ok_and(|r| r.is_match("")) {
                problems.push(loc, "the regex matches the empty string");
            }
            CustomKind::Regex(regex)
        }
        (None, Some(words)) => {
            if words.is_empty() {
                problems.push(loc, "`keywords` is empty");
            }
            if words.iter().any(|w| w.trim().is_empty()) {
                problems.push(loc, "`keywords` holds an empty keyword");
            }
            CustomKind::Keywords {
                words,
                case_sensitive: spec.case_sensitive.unwrap_or(false),
                whole_words: spec.whole_words.unwrap_or(true),
            }
        }
        _ => {
            problems.push(loc, "give exactly one of `regex` or `keywords`");
            return None;
        }
    };
    (problems.0.len() == before).then_some(CustomDetector { name: spec.name, kind })
}
