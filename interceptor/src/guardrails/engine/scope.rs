//! Where a rule or system prompt applies: providers, hosts, workloads and
//! kinds of text, each a list where empty means "all". The pattern syntax is
//! documented on the parent module.

use std::fmt;

use crate::guardrails::model::{Provider, TextKind};

use super::WorkloadRef;

pub(super) fn provider_named(name: &str) -> Option<Provider> {
    Provider::ALL.into_iter().find(|p| p.as_str() == name)
}

pub(super) fn provider_names() -> impl Iterator<Item = &'static str> {
    Provider::ALL.into_iter().map(Provider::as_str)
}

const KINDS: [(TextKind, &str); 10] = [
    (TextKind::Content, "content"),
    (TextKind::Instructions, "instructions"),
    (TextKind::ToolCall, "tool_call"),
    (TextKind::ToolResult, "tool_result"),
    (TextKind::Reasoning, "reasoning"),
    (TextKind::Other, "other"),
    (TextKind::Resource, "resource"),
    (TextKind::Prompt, "prompt"),
    (TextKind::ToolDefinition, "tool_definition"),
    (TextKind::Identifier, "identifier"),
];

pub(super) fn kind_named(name: &str) -> Option<TextKind> {
    KINDS.iter().find(|(_, n)| *n == name).map(|(k, _)| *k)
}

pub(super) fn kind_names() -> impl Iterator<Item = &'static str> {
    KINDS.iter().map(|(_, n)| *n)
}

/// One bit per [`TextKind`].
pub(super) fn kind_bit(kind: TextKind) -> u16 {
    match kind {
        TextKind::Content => 1,
        TextKind::Instructions => 2,
        TextKind::ToolCall => 4,
        TextKind::ToolResult => 8,
        TextKind::Reasoning => 16,
        TextKind::Other => 32,
        TextKind::Resource => 64,
        TextKind::Prompt => 128,
        TextKind::ToolDefinition => 256,
        TextKind::Identifier => 512,
    }
}

pub(super) const ALL_KINDS: u16 = 1023;

/// The kinds the LLM provider parsers produce. `resource`, `prompt` and
/// `tool_definition` texts come from MCP messages only, so a rule covering
/// none of these kinds applies to MCP exchanges only (and never to LLM
/// streams).
pub(super) const LLM_KINDS: u16 = 63 | 512;

/// A host pattern: lowercase, without a trailing dot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum HostPattern {
    /// `.example.com`: the domain and every subdomain.
    Domain(String),
    /// `api.example.com`, `*.example.com`, `api-*.example.com`.
    Glob(String),
}

impl HostPattern {
    pub(crate) fn parse(s: &str) -> Result<Self, String> {
        let p = s.trim_end_matches('.').to_ascii_lowercase();
        if p.is_empty() || p == "." {
            return Err("empty host pattern".into());
        }
        if let Some(c) = p.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '*' | '?'))) {
            return Err(format!("host pattern `{s}` holds `{c}`: give a host name, not a URL or address with a port"));
        }
        Ok(match p.strip_prefix('.') {
            Some(domain) if !domain.is_empty() => Self::Domain(domain.to_owned()),
            _ => Self::Glob(p),
        })
    }

    pub(crate) fn matches(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.');
        match self {
            Self::Domain(d) => {
                host.len() >= d.len()
                    && host.is_char_boundary(host.len() - d.len())
                    && host[host.len() - d.len()..].eq_ignore_ascii_case(d)
                    && (host.len() == d.len() || host.as_bytes()[host.len() - d.len() - 1] == b'.')
            }
            Self::Glob(g) => glob(g.as_bytes(), host.as_bytes(), true),
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Domain(d) => write!(f, ".{d}"),
            Self::Glob(g) => f.write_str(g),
        }
    }
}

/// A workload pattern (syntax on the parent module): one fact of the
/// workload, globbed or compared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct WorkloadPattern {
    /// As written, for people (`interceptor check-policy`).
    source: String,
    test: WorkloadTest,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum WorkloadTest {
    /// The process name, or the connecting thread's.
    Comm(String),
    /// The connecting thread's name.
    Thread(String),
    /// The executable: its full path when the glob holds a `/`, else its
    /// file name.
    Exe {
        glob: String,
        full_path: bool,
    },
    Uid(u32),
    Cgroup(String),
    Namespace(String),
    Pod(String),
    ServiceAccount(String),
    Labels(Vec<LabelRequirement>),
}

/// One requirement of a label selector (Kubernetes' equality-based ones).
#[derive(Clone, Debug, PartialEq, Eq)]
enum LabelRequirement {
    /// `k=v` (or `k==v`).
    Equals(String, String),
    /// `k!=v`: the label is missing or has another value.
    NotEquals(String, String),
    /// `k`.
    Exists(String),
    /// `!k`.
    Missing(String),
}

/// Pattern kinds, as written before the `:`.
const WORKLOAD_KINDS: [&str; 9] =
    ["comm", "thread", "exe", "uid", "cgroup", "namespace", "pod", "service_account", "label"];

impl WorkloadPattern {
    pub(crate) fn parse(s: &str) -> Result<Self, String> {
        let test = match s.split_once(':') {
            _ if s.starts_with('/') => WorkloadTest::Cgroup(glob_of(s, s)?),
            Some((kind, rest)) if WORKLOAD_KINDS.contains(&kind) => match kind {
                "comm" => WorkloadTest::Comm(glob_of(s, rest)?),
                "thread" => WorkloadTest::Thread(glob_of(s, rest)?),
                "exe" => WorkloadTest::Exe { glob: glob_of(s, rest)?, full_path: rest.contains('/') },
                "uid" => WorkloadTest::Uid(
                    rest.parse().map_err(|_| format!("workload pattern `{s}`: give a numeric uid after `uid:`"))?,
                ),
                "cgroup" => WorkloadTest::Cgroup(glob_of(s, rest)?),
                "namespace" => WorkloadTest::Namespace(glob_of(s, rest)?),
                "pod" => WorkloadTest::Pod(glob_of(s, rest)?),
                "service_account" => WorkloadTest::ServiceAccount(glob_of(s, rest)?),
                _ => WorkloadTest::Labels(parse_selector(rest).map_err(|e| format!("workload pattern `{s}`: {e}"))?),
            },
            // A word and a colon is meant as a kind: say so rather than
            // glob process names for it.
            Some((kind, _)) if !kind.is_empty() && kind.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') => {
                return Err(format!(
                    "workload pattern `{s}`: unknown kind `{kind}:` (known: {}; a process name holding `:` is \
                     written `comm:{s}`)",
                    WORKLOAD_KINDS.map(|k| format!("{k}:")).join(", ")
                ));
            }
            _ => WorkloadTest::Comm(glob_of(s, s)?),
        };
        Ok(Self { source: s.to_owned(), test })
    }

    pub(crate) fn matches(&self, w: &WorkloadRef<'_>) -> bool {
        let named = |g: &str, name: &str| !name.is_empty() && glob(g.as_bytes(), name.as_bytes(), false);
        let pod = w.pod;
        match &self.test {
            WorkloadTest::Comm(g) => named(g, w.comm) || named(g, w.thread),
            WorkloadTest::Thread(g) => named(g, w.connecting_thread()),
            WorkloadTest::Exe { glob: g, full_path } => w.exe.is_some_and(|exe| {
                let exe = if *full_path { exe } else { exe.rsplit('/').next().unwrap_or(exe) };
                named(g, exe)
            }),
            WorkloadTest::Uid(uid) => w.uid == *uid,
            WorkloadTest::Cgroup(g) => w.cgroup.is_some_and(|c| named(g, c)),
            WorkloadTest::Namespace(g) => pod.is_some_and(|p| named(g, &p.namespace)),
            WorkloadTest::Pod(g) => pod.is_some_and(|p| named(g, &p.name)),
            WorkloadTest::ServiceAccount(g) => {
                pod.is_some_and(|p| p.service_account.as_deref().is_some_and(|a| named(g, a)))
            }
            WorkloadTest::Labels(requirements) => pod.is_some_and(|p| {
                requirements.iter().all(|r| match r {
                    LabelRequirement::Equals(k, v) => p.labels.get(k) == Some(v),
                    LabelRequirement::NotEquals(k, v) => p.labels.get(k) != Some(v),
                    LabelRequirement::Exists(k) => p.labels.contains_key(k),
                    LabelRequirement::Missing(k) => !p.labels.contains_key(k),
                })
            }),
        }
    }
}

impl fmt::Display for WorkloadPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

fn glob_of(pattern: &str, glob: &str) -> Result<String, String> {
    if glob.is_empty() {
        return Err(format!("empty workload pattern `{pattern}`"));
    }
    Ok(glob.to_owned())
}

/// A label selector: comma-separated `k=v`, `k==v`, `k!=v`, `k`, `!k`, all
/// of which must hold. Set-based requirements (`in`, `notin`) are not
/// supported.
fn parse_selector(text: &str) -> Result<Vec<LabelRequirement>, String> {
    if text.trim().is_empty() {
        return Err("empty label selector".into());
    }
    let mut out = Vec::new();
    for term in text.split(',').map(str::trim) {
        if term.is_empty() {
            return Err(format!("empty requirement in label selector `{text}`"));
        }
        if term.contains('(') || term.split_whitespace().any(|w| w == "in" || w == "notin") {
            return Err(format!(
                "`{term}`: set-based requirements (in, notin) are not supported; use k=v, k!=v, k or !k"
            ));
        }
        let requirement = if let Some(key) = term.strip_prefix('!') {
            LabelRequirement::Missing(label_key(key.trim())?)
        } else if let Some((k, v)) = term.split_once("!=") {
            LabelRequirement::NotEquals(label_key(k.trim())?, label_value(v.trim())?)
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            LabelRequirement::Equals(label_key(k.trim())?, label_value(v.trim())?)
        } else {
            LabelRequirement::Exists(label_key(term)?)
        };
        out.push(requirement);
    }
    Ok(out)
}

/// A Kubernetes label name: 63 characters at most, alphanumerics and
/// `-`, `_`, `.`, starting and ending alphanumeric.
fn label_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

/// `[prefix/]name`, the prefix a DNS subdomain.
fn label_key(key: &str) -> Result<String, String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|part| {
                !part.is_empty()
                    && part.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
                    && !part.starts_with('-')
                    && !part.ends_with('-')
            })
    });
    if !prefix_ok || !label_name(name) {
        return Err(format!(
            "`{key}` is not a label key (a name of at most 63 alphanumerics, `-`, `_`, `.`, optionally after a \
             DNS prefix and `/`)"
        ));
    }
    Ok(key.to_owned())
}

fn label_value(value: &str) -> Result<String, String> {
    if value.is_empty() || label_name(value) {
        Ok(value.to_owned())
    } else {
        Err(format!("`{value}` is not a label value (at most 63 alphanumerics, `-`, `_`, `.`)"))
    }
}

/// A compiled scope. Empty lists mean "all".
#[derive(Clone, Debug, Default)]
pub(super) struct Scope {
    pub providers: Vec<Provider>,
    pub hosts: Vec<HostPattern>,
    pub workloads: Vec<WorkloadPattern>,
    /// Bit set of [`kind_bit`]s.
    pub kinds: u16,
}

impl Scope {
    /// Whether the scope covers this exchange. A scope naming workloads does
    /// not cover an exchange whose workload is unknown.
    pub(super) fn covers(&self, provider: Provider, host: &str, workload: Option<&WorkloadRef<'_>>) -> bool {
        self.covers_provider(provider) && self.covers_host(host) && self.covers_workload(workload)
    }

    pub(super) fn covers_provider(&self, provider: Provider) -> bool {
        self.providers.is_empty() || self.providers.contains(&provider)
    }

    pub(super) fn covers_host(&self, host: &str) -> bool {
        self.hosts.is_empty() || self.hosts.iter().any(|h| h.matches(host))
    }

    pub(super) fn covers_workload(&self, workload: Option<&WorkloadRef<'_>>) -> bool {
        self.workloads.is_empty() || workload.is_some_and(|w| self.workloads.iter().any(|p| p.matches(w)))
    }

    /// The conditions besides workloads, for people: `providers: anthropic`,
    /// `hosts: .openai.com`, `kinds: content`.
    pub(super) fn conditions(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.providers.is_empty() {
            let names: Vec<&str> = self.providers.iter().map(|p| p.as_str()).collect();
            out.push(format!("providers: {}", names.join(", ")));
        }
        if !self.hosts.is_empty() {
            let hosts: Vec<String> = self.hosts.iter().map(ToString::to_string).collect();
            out.push(format!("hosts: {}", hosts.join(", ")));
        }
        if self.kinds != ALL_KINDS {
            let kinds: Vec<&str> =
                KINDS.iter().filter(|(k, _)| self.kinds & kind_bit(*k) != 0).map(|(_, n)| *n).collect();
            out.push(format!("kinds: {}", kinds.join(", ")));
        }
        out
    }
}

/// Glob match: `*` is any run of bytes (`/` and `.` included), `?` any one
/// byte, everything else itself (ASCII case folded when `fold`).
pub(super) fn glob(pattern: &[u8], text: &[u8], fold: bool) -> bool {
    let eq = |a: u8, b: u8| if fold { a.eq_ignore_ascii_case(&b) } else { a == b };
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == b'?' || eq(c, text[t]) => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p.min(pattern.len())..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob(b"*", b"", false));
        assert!(glob(b"py*", b"python3", false));
        assert!(glob(b"*docker-*.scope", b"/system.slice/docker-abc.scope", false));
        assert!(glob(b"a?c", b"abc", false));
        assert!(!glob(b"a?c", b"ac", false));
        assert!(!glob(b"Python", b"python", false));
        assert!(glob(b"API.*.com", b"api.openai.com", true));
        assert!(glob(b"*a*b*c", b"xxaxxbxxbxc", false));
        assert!(!glob(b"*a*b*c", b"xxaxxbxxbx", false));
    }

    #[test]
    fn hosts() {
        let d = HostPattern::parse(".openai.com").unwrap();
        assert!(d.matches("openai.com") && d.matches("api.openai.com") && d.matches("API.OpenAI.com."));
        assert!(!d.matches("evilopenai.com"));
        let g = HostPattern::parse("*.openai.azure.com").unwrap();
        assert!(g.matches("x.openai.azure.com") && !g.matches("openai.azure.com"));
        assert!(HostPattern::parse("https://api.openai.com").is_err());
        assert!(HostPattern::parse("api.openai.com:443").is_err());
        assert!(HostPattern::parse("").is_err());
    }

    #[test]
    fn workloads() {
        let w = WorkloadRef { comm: "node", cgroup: Some("/kubepods/pod1/abc"), ..Default::default() };
        assert!(WorkloadPattern::parse("node").unwrap().matches(&w));
        assert!(WorkloadPattern::parse("comm:no*").unwrap().matches(&w));
        assert!(WorkloadPattern::parse("/kubepods/*").unwrap().matches(&w));
        assert!(WorkloadPattern::parse("cgroup:*abc").unwrap().matches(&w));
        assert!(!WorkloadPattern::parse("python*").unwrap().matches(&w));
        let none = WorkloadRef { comm: "x", ..Default::default() };
        assert!(!WorkloadPattern::parse("/system.slice/*").unwrap().matches(&none));
        assert!(WorkloadPattern::parse("comm:").is_err());
    }

    fn matches(pattern: &str, w: &WorkloadRef<'_>) -> bool {
        WorkloadPattern::parse(pattern).unwrap_or_else(|e| panic!("{pattern}: {e}")).matches(w)
    }

    #[test]
    fn process_thread_executable_and_uid() {
        // Claude Code: the process renamed itself `claude`, runs node, and
        // connects from a thread named `HTTP Client`.
        let claude = WorkloadRef {
            comm: "claude",
            thread: "HTTP Client",
            exe: Some("/usr/bin/node"),
            uid: 1000,
            ..Default::default()
        };
        assert!(matches("comm:claude", &claude));
        assert!(matches("claude", &claude));
        assert!(matches("comm:HTTP*", &claude), "rules naming the thread keep working");
        assert!(matches("thread:HTTP Client", &claude));
        assert!(!matches("thread:claude", &claude), "another thread connected");
        assert!(matches("exe:node", &claude), "the file name");
        assert!(matches("exe:/usr/bin/node", &claude), "the full path");
        assert!(matches("exe:/usr/*/node", &claude));
        assert!(!matches("exe:/usr/bin/no", &claude), "a glob with `/` matches the whole path");
        assert!(!matches("exe:claude", &claude), "the process name is not the executable");
        assert!(!matches("exe:*HTTP*", &claude), "nor is the thread's");
        assert!(matches("uid:1000", &claude));
        assert!(!matches("uid:0", &claude));
        // The main thread connected: its name is the process's.
        let curl = WorkloadRef { comm: "curl", exe: None, ..Default::default() };
        assert!(matches("thread:curl", &curl));
        assert!(!matches("exe:*", &curl), "unknown executable");
        // Only the socket is known (iptables mode, process not found).
        let socket_only = WorkloadRef { uid: 1000, cgroup: Some("/user.slice"), ..Default::default() };
        assert!(!matches("comm:*", &socket_only) && !matches("thread:*", &socket_only));
        assert!(matches("uid:1000", &socket_only) && matches("/user.slice", &socket_only));
        assert!(!matches("namespace:*", &socket_only) && !matches("label:!app", &socket_only), "no pod");
    }

    #[test]
    fn pods_and_label_selectors() {
        let pod = crate::workload::PodInfo {
            name: "billing-7d9f".into(),
            namespace: "team-a".into(),
            labels: [("app", "billing"), ("tier", "web"), ("example.com/owner", "pay")]
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .into(),
            service_account: Some("billing-sa".into()),
            ..Default::default()
        };
        let w = WorkloadRef { comm: "python3", pod: Some(&pod), ..Default::default() };
        assert!(matches("namespace:team-*", &w));
        assert!(!matches("namespace:team-b", &w));
        assert!(matches("pod:billing-*", &w));
        assert!(matches("service_account:billing-sa", &w));
        assert!(matches("label:app=billing", &w));
        assert!(matches("label:app==billing", &w));
        assert!(matches("label: app = billing , tier ", &w), "spaces around terms");
        assert!(matches("label:app=billing,tier!=dev,!canary,example.com/owner", &w));
        assert!(!matches("label:app=billing,tier=dev", &w), "all must hold");
        assert!(matches("label:env!=prod", &w), "a missing label is not equal");
        assert!(!matches("label:app!=billing", &w));
        assert!(!matches("label:!app", &w));
        assert!(!matches("label:env", &w));
        assert!(matches("label:example.com/owner=pay", &w));
        let no_sa = crate::workload::PodInfo { service_account: None, ..pod.clone() };
        assert!(!matches("service_account:*", &WorkloadRef { pod: Some(&no_sa), ..w }));
    }

    #[test]
    fn bad_workload_patterns_say_what_is_wrong() {
        let error = |p: &str| WorkloadPattern::parse(p).expect_err(p);
        assert!(error("uid:root").contains("numeric uid"), "{}", error("uid:root"));
        assert!(error("uid:-1").contains("numeric uid"));
        assert!(error("exec:node").contains("unknown kind `exec:`"), "{}", error("exec:node"));
        assert!(error("exec:node").contains("comm:exec:node"));
        for empty in ["thread:", "exe:", "namespace:", "pod:", "service_account:", "cgroup:"] {
            assert!(error(empty).contains("empty"), "{empty}: {}", error(empty));
        }
        assert!(error("label:").contains("empty label selector"));
        assert!(error("label:app=a,,b").contains("empty requirement"));
        assert!(error("label:env in (prod,dev)").contains("set-based"), "{}", error("label:env in (prod,dev)"));
        assert!(error("label:-app=x").contains("not a label key"));
        assert!(error("label:app=bad value").contains("not a label value"));
        assert!(error("label:Example.com/app=x").contains("not a label key"), "a prefix is lowercase");
        assert!(error("label:app=a=b").contains("not a label value"));
        // Process names may hold `:` or `/` when they cannot be mistaken for a kind.
        let w = WorkloadRef { comm: "kworker/u8:1", ..Default::default() };
        assert!(matches("kworker/u8:1", &w));
        assert!(matches("comm:exec:node", &WorkloadRef { comm: "exec:node", ..Default::default() }));
        assert_eq!(WorkloadPattern::parse("label:app=x").unwrap().to_string(), "label:app=x");
    }

    #[test]
    fn provider_names_round_trip() {
        for name in provider_names() {
            assert_eq!(provider_named(name).map(Provider::as_str), Some(name));
        }
        assert!(provider_named("openai").is_none());
    }
}
