//! Domain policy: from a connection's TLS server name (SNI), decide whether
//! the proxy intercepts it (terminates TLS and applies the guardrails) or
//! passes it through untouched.
//!
//! This module owns the three domain lists of the configuration (AI domains,
//! chatty domains, proxy patterns) and the MCP server names (`mcp.domains`,
//! intercepted like AI domains), their syntax and validation, and the
//! precedence between them. It is pure: no DNS, no sockets, no clock.
//! Resolving names to the addresses the redirector needs is `targets`' job;
//! [`DomainPolicy::resolvable_names`] tells it which names to resolve.
//!
//! # Pattern syntax
//!
//! The same for all three lists. Names are compared case-insensitively and a
//! trailing dot is ignored, in patterns and in server names alike.
//!
//! | Pattern                            | Matches                                   | Does not match                        |
//! |------------------------------------|-------------------------------------------|---------------------------------------|
//! | `api.openai.com`                   | exactly that name                         | `openai.com`, `x.api.openai.com`      |
//! | `.openai.com`                      | `openai.com` and every subdomain, at any depth (`api.openai.com`, `a.b.openai.com`) | `evilopenai.com` |
//! | `*.githubcopilot.com`              | one or more labels in front (`api.githubcopilot.com`, `api.individual.githubcopilot.com`) | `githubcopilot.com` |
//! | `bedrock-runtime.*.amazonaws.com`  | `*` elsewhere: exactly one label (`bedrock-runtime.us-east-1.amazonaws.com`) | `bedrock-runtime.a.b.amazonaws.com` |
//! | `*-aiplatform.googleapis.com`      | `*` starting a label: one label ending in the rest, with at least one character before it (`us-central1-aiplatform.googleapis.com`) | `aiplatform.googleapis.com` |
//!
//! A pattern is rejected when it is empty, has an empty label (`a..com`), has
//! a `*` anywhere but as a whole label or at the start of one (`a*b.com`,
//! `api*.com`), starts with `.*.` (ambiguous), ends in a wildcard label
//! (`example.*`, `*`), holds a character other than ASCII letters, digits,
//! `-` and `_` (a URL, a port, a space; internationalized names go in their
//! `xn--` form), is an IPv4 address, or is longer than DNS allows (63
//! characters per label, 253 in all). Validation reports every bad entry of
//! every list at once.
//!
//! # Precedence
//!
//! The first step that applies decides:
//!
//! 1. No SNI (absent or empty): pass through, reason "no SNI". A server name
//!    that is not a valid DNS name (an empty label, a character other than
//!    ASCII letters, digits, `-` and `_`, a label over 63 or a name over 253
//!    characters) cannot be given a certificate: pass through, reason
//!    "invalid SNI".
//! 2. A chatty domain matches: pass through, reason "chatty domain", whatever
//!    the other lists say.
//! 3. Proxy patterns match: the most specific matching pattern decides,
//!    intercept or pass through by its `intercept`, reason "proxy pattern".
//!    Specificity is compared criterion by criterion:
//!    1. more literal labels (`.api.openai.com` beats `*.openai.com`);
//!    2. more `*suffix` labels (`*-api.example.com` beats `*.example.com`);
//!    3. form: an exact name beats a wildcard, which beats a leading dot
//!       (for `api.openai.com`: `api.openai.com` beats `.api.openai.com`,
//!       and `*.openai.com` beats `.openai.com`);
//!    4. `intercept = false` beats `intercept = true`;
//!    5. the earlier entry in the list.
//!
//!    Criterion 4 only breaks ties between equally specific patterns that
//!    disagree (`a.*.example.com` and `*.b.example.com` on
//!    `a.b.example.com`; the same pattern listed with both modes is a
//!    validation error). Such a tie is a contradiction in the configuration,
//!    so it is resolved towards the state the connection would be in without
//!    the proxy: a connection wrongly passed through only goes unseen, one
//!    wrongly intercepted can break an application that pins certificates.
//!    It does not reach across steps: a pattern with `intercept = true`
//!    still loses to a chatty domain, and one with `intercept = false` still
//!    beats an AI domain.
//! 4. An AI domain (`ai` or `ai_extra`) matches: intercept, reason
//!    "AI domain".
//! 5. An MCP server name (`mcp.domains` or `mcp.domains_extra`, when MCP
//!    inspection is on) matches: intercept, reason "MCP server".
//! 6. Otherwise pass through, reason "not an AI domain".

mod pattern;
#[cfg(test)]
mod tests;

use std::{
    borrow::Cow,
    collections::{BTreeSet, HashMap},
    fmt,
    sync::Arc,
};

use serde::{Deserialize, Serialize};

use self::pattern::{MAX_LABEL_LEN, MAX_NAME_LEN, Pattern};

/// The built-in AI domains: `ai`'s default. `interceptor check-config`
/// shows, for each, which request formats are read there
/// (`guardrails::providers::KNOWN_HOSTS`; a test keeps the two lists whole).
///
/// Only exact names among them are resolved to addresses (see
/// [`DomainPolicy::resolvable_names`]); a wildcard entry such as
/// `bedrock-runtime.*.amazonaws.com` classifies every region but is
/// redirected only through addresses it shares with a resolved name, or
/// (`targets.mode = "dns"`) through the addresses a workload's own DNS
/// answers give for a matching name. Add the regional names in use
/// (`bedrock-runtime.eu-west-1.amazonaws.com`) and your Azure resources
/// (`myres.openai.azure.com`) to `ai_extra`.
pub const DEFAULT_AI_DOMAINS: &[&str] = &[
    // OpenAI API and the ChatGPT apps.
    "api.openai.com",
    "chatgpt.com",
    // Anthropic API and Claude apps.
    "api.anthropic.com",
    "claude.ai",
    // Amazon Bedrock runtime (model invocation), regional and FIPS.
    "bedrock-runtime.amazonaws.com",
    "bedrock-runtime.*.amazonaws.com",
    "bedrock-runtime-fips.*.amazonaws.com",
    // Google Gemini API and Vertex AI (global and regional endpoints).
    "generativelanguage.googleapis.com",
    "aiplatform.googleapis.com",
    "*-aiplatform.googleapis.com",
    // GitHub Copilot; the per-plan API names are listed so they get resolved.
    "api.githubcopilot.com",
    "api.individual.githubcopilot.com",
    "api.business.githubcopilot.com",
    "api.enterprise.githubcopilot.com",
    "*.githubcopilot.com",
    "copilot-proxy.githubusercontent.com",
    // Amazon Bedrock agent runtime (InvokeAgent, RetrieveAndGenerate);
    // regional and FIPS only, there is no global endpoint.
    "bedrock-agent-runtime.*.amazonaws.com",
    "bedrock-agent-runtime-fips.*.amazonaws.com",
    // Azure OpenAI and AI Foundry resources: one name per customer resource.
    "*.openai.azure.com",
    "*.cognitiveservices.azure.com",
    "*.services.ai.azure.com",
    // OpenAI-compatible providers agents use.
    "api.mistral.ai",
    "api.groq.com",
    "api.deepseek.com",
    "api.x.ai",
    "openrouter.ai",
    "api.together.xyz",
    "api.together.ai",
    "api.fireworks.ai",
    "api.perplexity.ai",
    // Cohere (its own chat format, and an OpenAI-compatible endpoint).
    "api.cohere.com",
    "api.cohere.ai",
];

/// The built-in chatty domains: `chatty`'s default. Only names that an AI
/// domain would otherwise cover need to be here.
pub const DEFAULT_CHATTY_DOMAINS: &[&str] = &[
    // Copilot telemetry, under `*.githubcopilot.com`.
    "telemetry.*.githubcopilot.com",
];

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("invalid domain rules:\n  - {}", .errors.join("\n  - "))]
    Invalid { errors: Vec<String> },
}

/// A proxy pattern: a name pattern and whether matching connections are
/// intercepted (`true`) or passed through (`false`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyPattern {
    pub pattern: String,
    pub intercept: bool,
}

/// The domain lists as configured (the `[domains]` table).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DomainsConfig {
    /// AI domains, intercepted. Default: [`DEFAULT_AI_DOMAINS`]. Setting it
    /// replaces the built-in list.
    pub ai: Vec<String>,
    /// More AI domains, added to `ai`, to extend the built-in list without
    /// copying it. Default: empty.
    pub ai_extra: Vec<String>,
    /// Chatty domains, never intercepted. Default: [`DEFAULT_CHATTY_DOMAINS`].
    pub chatty: Vec<String>,
    /// Proxy patterns; they override the AI list both ways. Default: empty.
    pub patterns: Vec<ProxyPattern>,
}

impl Default for DomainsConfig {
    fn default() -> Self {
        Self {
            ai: DEFAULT_AI_DOMAINS.iter().map(|d| d.to_string()).collect(),
            ai_extra: Vec::new(),
            chatty: DEFAULT_CHATTY_DOMAINS.iter().map(|d| d.to_string()).collect(),
            patterns: Vec::new(),
        }
    }
}

impl DomainsConfig {
    /// Every problem with the lists, each naming its list and entry
    /// (`domains.ai: "a*b.com": ...`); empty when the lists are valid.
    pub fn validate(&self) -> Vec<String> {
        DomainPolicy::build(self, McpDomains::default()).1
    }
}

/// The MCP server names in force (`mcp.domains` and `mcp.domains_extra`),
/// intercepted like AI domains. Empty when MCP inspection is off.
#[derive(Clone, Copy, Debug, Default)]
pub struct McpDomains<'a> {
    pub domains: &'a [String],
    pub domains_extra: &'a [String],
}

impl McpDomains<'_> {
    /// Every problem with the two lists, each naming its list and entry
    /// (`mcp.domains: "a*b.com": ...`).
    pub fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        RuleSet::default().extend_mcp(*self, &mut errors);
        errors
    }
}

/// The MCP server names alone, compiled: tells an MCP server's exchanges
/// apart from an AI provider's on the same data plane.
#[derive(Clone, Debug, Default)]
pub struct McpServers(RuleSet);

impl McpServers {
    /// The names of `mcp`; an invalid entry is an error naming it.
    pub fn compile(mcp: McpDomains<'_>) -> Result<Self, PolicyError> {
        let mut errors = Vec::new();
        let mut rules = RuleSet::default();
        rules.extend_mcp(mcp, &mut errors);
        if errors.is_empty() { Ok(Self(rules)) } else { Err(PolicyError::Invalid { errors }) }
    }

    /// Whether `name` is one of them.
    pub fn matches(&self, name: &str) -> bool {
        if self.0.exact.is_empty() && self.0.wild.is_empty() {
            return false;
        }
        normalize_sni(name).is_some_and(|name| self.0.any_match(&name).is_some())
    }
}

/// Why a connection was intercepted or passed through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    NoSni,
    InvalidSni,
    ChattyDomain,
    ProxyPattern,
    AiDomain,
    McpServer,
    NotAiDomain,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoSni => "no SNI",
            Self::InvalidSni => "invalid SNI",
            Self::ChattyDomain => "chatty domain",
            Self::ProxyPattern => "proxy pattern",
            Self::AiDomain => "AI domain",
            Self::McpServer => "MCP server",
            Self::NotAiDomain => "not an AI domain",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The outcome of [`DomainPolicy::classify`].
#[must_use]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub intercept: bool,
    pub reason: Reason,
    /// The entry that decided, as written in the configuration; `None` for
    /// "no SNI", "invalid SNI" and "not an AI domain".
    pub rule: Option<Arc<str>>,
}

impl Decision {
    fn new(intercept: bool, reason: Reason, rule: Option<&Rule>) -> Self {
        Self { intercept, reason, rule: rule.map(|r| Arc::clone(&r.text)) }
    }
}

/// The domain lists compiled for classification. Immutable; build a new one
/// on reload.
#[derive(Clone, Debug)]
pub struct DomainPolicy {
    chatty: RuleSet,
    patterns: RuleSet,
    ai: RuleSet,
    mcp: RuleSet,
    resolvable: Vec<String>,
}

impl DomainPolicy {
    /// The domain lists alone, without MCP server names.
    pub fn compile(cfg: &DomainsConfig) -> Result<Self, PolicyError> {
        Self::compile_with_mcp(cfg, McpDomains::default())
    }

    /// The domain lists and the MCP server names in force.
    pub fn compile_with_mcp(cfg: &DomainsConfig, mcp: McpDomains<'_>) -> Result<Self, PolicyError> {
        let (policy, errors) = Self::build(cfg, mcp);
        if errors.is_empty() { Ok(policy) } else { Err(PolicyError::Invalid { errors }) }
    }

    /// Whether `name` is an MCP server name of this policy (whatever the
    /// other lists say). One hash lookup, then the wildcard entries.
    pub fn is_mcp_server(&self, name: &str) -> bool {
        if self.mcp.exact.is_empty() && self.mcp.wild.is_empty() {
            return false;
        }
        normalize_sni(name).is_some_and(|name| self.mcp.any_match(&name).is_some())
    }

    /// Decides for one connection; see the module documentation for the
    /// precedence. Allocates only to lowercase a name that has capitals.
    pub fn classify(&self, sni: Option<&str>) -> Decision {
        let Some(sni) = sni.filter(|s| !s.is_empty()) else {
            return Decision::new(false, Reason::NoSni, None);
        };
        let Some(name) = normalize_sni(sni) else {
            return Decision::new(false, Reason::InvalidSni, None);
        };
        if let Some(rule) = self.chatty.any_match(&name) {
            return Decision::new(false, Reason::ChattyDomain, Some(rule));
        }
        if let Some(rule) = self.patterns.best_match(&name) {
            return Decision::new(rule.intercept, Reason::ProxyPattern, Some(rule));
        }
        if let Some(rule) = self.ai.any_match(&name) {
            return Decision::new(true, Reason::AiDomain, Some(rule));
        }
        if let Some(rule) = self.mcp.any_match(&name) {
            return Decision::new(true, Reason::McpServer, Some(rule));
        }
        Decision::new(false, Reason::NotAiDomain, None)
    }

    /// The names whose addresses should be redirected to the proxy: the
    /// exact names (no wildcard, no leading dot) of `ai`, `ai_extra`, the
    /// MCP server names and the `intercept = true` patterns, lowercase, sorted, without duplicates,
    /// and without the names that classify as passthrough (a chatty domain,
    /// an overriding pattern).
    pub fn resolvable_names(&self) -> &[String] {
        &self.resolvable
    }

    /// The DNS subtrees a name-constrained CA must permit so that every
    /// name this policy may intercept gets a certificate clients accept:
    /// one per AI domain, MCP server name and `intercept = true` pattern, its literal labels
    /// from the right up to the first wildcard (see
    /// [`crate::ca::NameConstraintsSpec`]). A wildcard in the middle makes
    /// the subtree wider than the pattern (`bedrock-runtime.*.amazonaws.com`
    /// permits all of `amazonaws.com`): X.509 has no way to say less.
    /// Sorted, deduplicated; nested subtrees are left for the caller.
    pub fn name_constraint_bases(&self) -> Vec<String> {
        let rules = self.ai.exact.values().chain(&self.ai.wild).chain(self.mcp.exact.values()).chain(&self.mcp.wild);
        let patterns = self.patterns.exact.values().chain(&self.patterns.wild).filter(|r| r.intercept);
        let bases: BTreeSet<String> = rules.chain(patterns).map(|r| r.pattern.literal_suffix()).collect();
        bases.into_iter().collect()
    }

    /// Compiles what is valid and collects every error.
    fn build(cfg: &DomainsConfig, mcp_domains: McpDomains<'_>) -> (Self, Vec<String>) {
        let mut errors = Vec::new();
        let mut chatty = RuleSet::default();
        chatty.extend("domains.chatty", &cfg.chatty, false, &mut errors);
        let mut ai = RuleSet::default();
        ai.extend("domains.ai", &cfg.ai, true, &mut errors);
        ai.extend("domains.ai_extra", &cfg.ai_extra, true, &mut errors);
        let mut mcp = RuleSet::default();
        mcp.extend_mcp(mcp_domains, &mut errors);

        let mut patterns = RuleSet::default();
        // normalized pattern → (first mode seen, conflict already reported)
        let mut modes: HashMap<String, (bool, bool)> = HashMap::new();
        for entry in &cfg.patterns {
            let Some(rule) = Rule::parse("domains.patterns", &entry.pattern, entry.intercept, &mut errors) else {
                continue;
            };
            let key = rule.pattern.normalized().to_string();
            match modes.get_mut(&key) {
                None => {
                    modes.insert(key, (entry.intercept, false));
                }
                Some((first, reported)) => {
                    if *first != entry.intercept && !*reported {
                        *reported = true;
                        errors.push(format!(
                            "domains.patterns: {:?}: listed with both intercept = true and intercept = false",
                            entry.pattern
                        ));
                    }
                }
            }
            patterns.push(rule);
        }

        let mut policy = Self { chatty, patterns, ai, mcp, resolvable: Vec::new() };
        let candidates: BTreeSet<&str> = policy
            .ai
            .exact
            .keys()
            .chain(policy.mcp.exact.keys())
            .chain(policy.patterns.exact.iter().filter(|(_, r)| r.intercept).map(|(name, _)| name))
            .map(|name| &**name)
            .collect();
        let resolvable =
            candidates.into_iter().filter(|name| policy.classify(Some(name)).intercept).map(str::to_string).collect();
        policy.resolvable = resolvable;
        (policy, errors)
    }
}

/// One entry of a list, compiled.
#[derive(Clone, Debug)]
struct Rule {
    /// As written in the configuration, for decisions and logs.
    text: Arc<str>,
    pattern: Pattern,
    /// For proxy patterns; `true` for AI domains, `false` for chatty ones
    /// (where it is not read).
    intercept: bool,
}

impl Rule {
    fn parse(list: &str, text: &str, intercept: bool, errors: &mut Vec<String>) -> Option<Self> {
        match Pattern::parse(text) {
            Ok(pattern) => Some(Self { text: text.into(), pattern, intercept }),
            Err(why) => {
                errors.push(format!("{list}: {text:?}: {why}"));
                None
            }
        }
    }

    /// Whether `self` decides over `other`, both matching: more specific,
    /// then passthrough over intercept. Strict, so the earlier of two equal
    /// rules keeps winning.
    fn beats(&self, other: &Self) -> bool {
        (self.pattern.specificity(), !self.intercept) > (other.pattern.specificity(), !other.intercept)
    }
}

/// One list, split so that exact names cost one hash lookup.
#[derive(Clone, Debug, Default)]
struct RuleSet {
    /// Exact names; the first entry for a name is kept.
    exact: HashMap<Box<str>, Rule>,
    /// Every other entry, in list order.
    wild: Vec<Rule>,
}

impl RuleSet {
    fn extend(&mut self, list: &str, entries: &[String], intercept: bool, errors: &mut Vec<String>) {
        for text in entries {
            if let Some(rule) = Rule::parse(list, text, intercept, errors) {
                self.push(rule);
            }
        }
    }

    fn extend_mcp(&mut self, mcp: McpDomains<'_>, errors: &mut Vec<String>) {
        self.extend("mcp.domains", mcp.domains, true, errors);
        self.extend("mcp.domains_extra", mcp.domains_extra, true, errors);
    }

    fn push(&mut self, rule: Rule) {
        match rule.pattern.exact_name() {
            Some(name) => {
                self.exact.entry(name.into()).or_insert(rule);
            }
            None => self.wild.push(rule),
        }
    }

    /// Some matching entry (an exact one if any).
    fn any_match(&self, name: &str) -> Option<&Rule> {
        self.exact.get(name).or_else(|| self.wild.iter().find(|r| r.pattern.matches(name)))
    }

    /// The matching entry that decides, by the precedence of step 3.
    fn best_match(&self, name: &str) -> Option<&Rule> {
        // No other pattern is as specific as an exact name that matches: it
        // has as many literal labels as the name and the highest form.
        if let Some(rule) = self.exact.get(name) {
            return Some(rule);
        }
        let mut best: Option<&Rule> = None;
        for rule in self.wild.iter().filter(|r| r.pattern.matches(name)) {
            if best.is_none_or(|b| rule.beats(b)) {
                best = Some(rule);
            }
        }
        best
    }
}

/// Lowercases and drops a trailing dot, borrowing when the name is already
/// lowercase; `None` for a name that is not a valid DNS name.
fn normalize_sni(sni: &str) -> Option<Cow<'_, str>> {
    let name = sni.strip_suffix('.').unwrap_or(sni);
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return None;
    }
    let mut upper = false;
    let mut label_len = 0;
    for b in name.bytes() {
        match b {
            b'.' => {
                if label_len == 0 {
                    return None;
                }
                label_len = 0;
                continue;
            }
            b'A'..=b'Z' => upper = true,
            b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' => {}
            _ => return None,
        }
        label_len += 1;
        if label_len > MAX_LABEL_LEN {
            return None;
        }
    }
    if label_len == 0 {
        return None;
    }
    Some(if upper { Cow::Owned(name.to_ascii_lowercase()) } else { Cow::Borrowed(name) })
}
