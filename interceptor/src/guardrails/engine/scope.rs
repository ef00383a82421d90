//! Where a rule or system prompt applies: providers, hosts, workloads and
//! kinds of text, each a list where empty means "all". The pattern syntax is
//! documented on the parent module.

use crate::guardrails::model::{Provider, TextKind};

use super::WorkloadRef;

pub(super) fn provider_named(name: &str) -> Option<Provider> {
    Provider::ALL.into_iter().find(|p| p.as_str() == name)
}

pub(super) fn provider_names() -> impl Iterator<Item = &'static str> {
    Provider::ALL.into_iter().map(Provider::as_str)
}

const KINDS: [(TextKind, &str); 6] = [
    (TextKind::Content, "content"),
    (TextKind::Instructions, "instructions"),
    (TextKind::ToolCall, "tool_call"),
    (TextKind::ToolResult, "tool_result"),
    (TextKind::Reasoning, "reasoning"),
    (TextKind::Other, "other"),
];

pub(super) fn kind_named(name: &str) -> Option<TextKind> {
    KINDS.iter().find(|(_, n)| *n == name).map(|(k, _)| *k)
}

pub(super) fn kind_names() -> impl Iterator<Item = &'static str> {
    KINDS.iter().map(|(_, n)| *n)
}

/// One bit per [`TextKind`].
pub(super) fn kind_bit(kind: TextKind) -> u8 {
    match kind {
        TextKind::Content => 1,
        TextKind::Instructions => 2,
        TextKind::ToolCall => 4,
        TextKind::ToolResult => 8,
        TextKind::Reasoning => 16,
        TextKind::Other => 32,
    }
}

pub(super) const ALL_KINDS: u8 = 63;

/// A host pattern: lowercase, without a trailing dot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum HostPattern {
    /// `.example.com`: the domain and every subdomain.
    Domain(String),
    /// `api.example.com`, `*.example.com`, `api-*.example.com`.
    Glob(String),
}

impl HostPattern {
    pub(super) fn parse(s: &str) -> Result<Self, String> {
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

    fn matches(&self, host: &str) -> bool {
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

/// A workload pattern, matched against the process name or its cgroup path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum WorkloadPattern {
    Comm(String),
    Cgroup(String),
}

impl WorkloadPattern {
    pub(super) fn parse(s: &str) -> Result<Self, String> {
        let p = if let Some(c) = s.strip_prefix("comm:") {
            Self::Comm(c.to_owned())
        } else if let Some(c) = s.strip_prefix("cgroup:") {
            Self::Cgroup(c.to_owned())
        } else if s.starts_with('/') {
            Self::Cgroup(s.to_owned())
        } else {
            Self::Comm(s.to_owned())
        };
        match &p {
            Self::Comm(g) | Self::Cgroup(g) if g.is_empty() => Err(format!("empty workload pattern `{s}`")),
            _ => Ok(p),
        }
    }

    fn matches(&self, w: &WorkloadRef<'_>) -> bool {
        match self {
            Self::Comm(g) => glob(g.as_bytes(), w.comm.as_bytes(), false),
            Self::Cgroup(g) => w.cgroup.is_some_and(|c| glob(g.as_bytes(), c.as_bytes(), false)),
        }
    }
}

/// A compiled scope. Empty lists mean "all".
#[derive(Clone, Debug, Default)]
pub(super) struct Scope {
    pub providers: Vec<Provider>,
    pub hosts: Vec<HostPattern>,
    pub workloads: Vec<WorkloadPattern>,
    /// Bit set of [`kind_bit`]s.
    pub kinds: u8,
}

impl Scope {
    /// Whether the scope covers this exchange. A scope naming workloads does
    /// not cover an exchange whose workload is unknown.
    pub(super) fn covers(&self, provider: Provider, host: &str, workload: Option<&WorkloadRef<'_>>) -> bool {
        (self.providers.is_empty() || self.providers.contains(&provider))
            && (self.hosts.is_empty() || self.hosts.iter().any(|h| h.matches(host)))
            && (self.workloads.is_empty() || workload.is_some_and(|w| self.workloads.iter().any(|p| p.matches(w))))
    }
}

/// Glob match: `*` is any run of bytes (`/` and `.` included), `?` any one
/// byte, everything else itself (ASCII case folded when `fold`).
fn glob(pattern: &[u8], text: &[u8], fold: bool) -> bool {
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
        let w = WorkloadRef { comm: "node", cgroup: Some("/kubepods/pod1/abc") };
        assert!(WorkloadPattern::parse("node").unwrap().matches(&w));
        assert!(WorkloadPattern::parse("comm:no*").unwrap().matches(&w));
        assert!(WorkloadPattern::parse("/kubepods/*").unwrap().matches(&w));
        assert!(WorkloadPattern::parse("cgroup:*abc").unwrap().matches(&w));
        assert!(!WorkloadPattern::parse("python*").unwrap().matches(&w));
        assert!(!WorkloadPattern::parse("/system.slice/*").unwrap().matches(&WorkloadRef { comm: "x", cgroup: None }));
        assert!(WorkloadPattern::parse("comm:").is_err());
    }

    #[test]
    fn provider_names_round_trip() {
        for name in provider_names() {
            assert_eq!(provider_named(name).map(Provider::as_str), Some(name));
        }
        assert!(provider_named("openai").is_none());
    }
}
