//! `[budgets]`: budgets and rate limits per workload scope (tokens per
//! period, requests per period, concurrent requests), where their counters
//! are kept (a file in the state directory, and Redis to share them across
//! nodes), and what to do when Redis cannot be reached. The counting and the
//! refusals are `guardrails::budgets`; this module holds the settings only
//! and checks each field on its own (the workload patterns are checked when
//! the budgets are compiled).

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// The counters' file name in the state directory, when
/// `budgets.state_file` is empty.
pub const DEFAULT_STATE_FILE: &str = "budgets.json";

/// Longest budget name (it is a metric label and an audit field).
pub const MAX_NAME_LEN: usize = 64;

/// Most budgets (each is a metric series).
pub const MAX_LIMITS: usize = 256;

#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BudgetsConfig {
    /// The file the per-node counters are saved to. Empty: `budgets.json`
    /// in the state directory.
    pub state_file: PathBuf,
    /// How often the counters are saved (they are also saved at shutdown).
    #[serde(with = "humantime_serde")]
    pub save_interval: Duration,
    /// `redis://host:port/db` shared by the nodes of a cluster; empty:
    /// counters are per node. Its credentials are never printed or logged
    /// (serialized without them).
    #[serde(serialize_with = "serialize_redacted")]
    pub redis_url: String,
    /// Longest wait for Redis on a request.
    #[serde(with = "humantime_serde")]
    pub redis_timeout: Duration,
    /// When Redis cannot be reached: count on this node (`local`) or refuse
    /// the requests a token or request budget covers (`closed`).
    pub redis_fail: RedisFail,
    /// The budgets, each `[[budgets.limits]]`.
    pub limits: Vec<LimitConfig>,
}

impl Default for BudgetsConfig {
    fn default() -> Self {
        Self {
            state_file: PathBuf::new(),
            save_interval: Duration::from_secs(10),
            redis_url: String::new(),
            redis_timeout: Duration::from_millis(100),
            redis_fail: RedisFail::Local,
            limits: Vec::new(),
        }
    }
}

/// `redis_url` without its credentials (`redis://user:pass@host` →
/// `redis://<redacted>@host`).
pub fn redacted_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}<redacted>{}", &url[..scheme + 3], &url[at..]),
        _ => url.to_owned(),
    }
}

fn serialize_redacted<S: serde::Serializer>(url: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&redacted_url(url))
}

/// The Redis URL's credentials are left out.
impl std::fmt::Debug for BudgetsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BudgetsConfig")
            .field("state_file", &self.state_file)
            .field("save_interval", &self.save_interval)
            .field("redis_url", &redacted_url(&self.redis_url))
            .field("redis_timeout", &self.redis_timeout)
            .field("redis_fail", &self.redis_fail)
            .field("limits", &self.limits)
            .finish()
    }
}

/// What a request covered by a shared budget gets while Redis is
/// unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisFail {
    /// Counted on this node alone (each node then allows the whole budget).
    Local,
    /// Refused with `429`.
    Closed,
}

/// One budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitConfig {
    /// Names the budget in refusals, audit events and metrics.
    pub name: String,
    /// The workloads it covers, together (one counter for all of them).
    #[serde(default)]
    pub scope: ScopeConfig,
    pub kind: LimitKind,
    /// Tokens or requests per period, or requests at once.
    pub limit: u64,
    /// The window of a `tokens` or `requests` budget (fixed windows, aligned
    /// on the Unix epoch); `requests` defaults to `minute`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period: Option<Period>,
}

/// The workloads a budget covers: the policy rules' workload patterns
/// (`comm:agent`, `namespace:team-a`, `cgroup:/...`); empty: every workload.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScopeConfig {
    pub workloads: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitKind {
    /// Input plus output tokens of the answers, per period.
    Tokens,
    /// Requests per period.
    Requests,
    /// Requests in flight at once (a stream is in flight until it ends).
    Concurrent,
}

impl LimitKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tokens => "tokens",
            Self::Requests => "requests",
            Self::Concurrent => "concurrent",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Minute,
    Hour,
    Day,
}

impl Period {
    pub fn seconds(self) -> u64 {
        match self {
            Self::Minute => 60,
            Self::Hour => 3600,
            Self::Day => 86_400,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Minute => "minute",
            Self::Hour => "hour",
            Self::Day => "day",
        }
    }
}

impl LimitConfig {
    /// The window of a counted budget; `None` for `concurrent`.
    pub fn window(&self) -> Option<Period> {
        match self.kind {
            LimitKind::Concurrent => None,
            LimitKind::Requests => Some(self.period.unwrap_or(Period::Minute)),
            LimitKind::Tokens => self.period,
        }
    }
}

impl BudgetsConfig {
    /// The counters' file: `state_file`, or `budgets.json` in `state_dir`.
    pub fn state_file_in(&self, state_dir: &Path) -> PathBuf {
        if self.state_file.as_os_str().is_empty() {
            state_dir.join(DEFAULT_STATE_FILE)
        } else {
            self.state_file.clone()
        }
    }

    /// Every problem with these settings, each prefixed with its field.
    pub fn validate(&self, guardrails_enabled: bool) -> Vec<String> {
        let mut errors = Vec::new();
        if !self.state_file.as_os_str().is_empty() && !self.state_file.is_absolute() {
            errors.push(format!("budgets.state_file: {} must be an absolute path", self.state_file.display()));
        }
        if self.save_interval < Duration::from_secs(1) {
            errors.push("budgets.save_interval: must be at least 1s".into());
        }
        if self.redis_timeout.is_zero() || self.redis_timeout > Duration::from_secs(5) {
            errors.push("budgets.redis_timeout: must be more than 0 and at most 5s".into());
        }
        if !self.redis_url.is_empty() && !["redis://", "rediss://"].iter().any(|s| self.redis_url.starts_with(s)) {
            // Not echoed: the URL may hold a password.
            errors.push("budgets.redis_url: must start with redis:// or rediss://".into());
        }
        if self.limits.len() > MAX_LIMITS {
            errors.push(format!("budgets.limits: at most {MAX_LIMITS} budgets"));
        }
        if !self.limits.is_empty() && !guardrails_enabled {
            errors.push("budgets.limits: budgets are enforced by the guardrails: set guardrails.enabled too".into());
        }
        for (i, limit) in self.limits.iter().enumerate() {
            let what = format!("budgets.limits[{i}] ({:?})", limit.name);
            let n = &limit.name;
            if n.is_empty()
                || n.len() > MAX_NAME_LEN
                || !n.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            {
                errors.push(format!(
                    "{what}: name must be 1 to {MAX_NAME_LEN} characters of letters, digits, `-`, `_` and `.`"
                ));
            }
            if self.limits[..i].iter().any(|other| other.name == *n) {
                errors.push(format!("{what}: name is used by another budget"));
            }
            if limit.limit == 0 {
                errors.push(format!("{what}: limit must be at least 1"));
            }
            match (limit.kind, limit.period) {
                (LimitKind::Tokens, None) => {
                    errors.push(format!("{what}: a tokens budget needs a period (minute, hour or day)"))
                }
                (LimitKind::Concurrent, Some(_)) => errors.push(format!("{what}: a concurrent budget has no period")),
                _ => {}
            }
        }
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(name: &str, kind: LimitKind, limit: u64, period: Option<Period>) -> LimitConfig {
        LimitConfig { name: name.into(), scope: ScopeConfig::default(), kind, limit, period }
    }

    #[test]
    fn validation_names_each_budget_and_field() {
        let cfg = BudgetsConfig {
            redis_url: "http://x".into(),
            limits: vec![
                limit("a b", LimitKind::Tokens, 10, None),
                limit("ok", LimitKind::Concurrent, 0, Some(Period::Minute)),
                limit("ok", LimitKind::Requests, 5, None),
            ],
            ..BudgetsConfig::default()
        };
        let errors = cfg.validate(true);
        let text = errors.join("\n");
        assert_eq!(errors.len(), 6, "{text}");
        assert!(text.contains("budgets.redis_url"), "{text}");
        assert!(text.contains("budgets.limits[0] (\"a b\"): name must"), "{text}");
        assert!(text.contains("budgets.limits[0] (\"a b\"): a tokens budget needs a period"), "{text}");
        assert!(text.contains("budgets.limits[1] (\"ok\"): limit must be at least 1"), "{text}");
        assert!(text.contains("budgets.limits[1] (\"ok\"): a concurrent budget has no period"), "{text}");
        assert!(text.contains("budgets.limits[2] (\"ok\"): name is used by another budget"), "{text}");
        assert!(BudgetsConfig::default().validate(false).is_empty());
        let needs_guardrails = BudgetsConfig { limits: vec![limit("x", LimitKind::Concurrent, 1, None)], ..cfg };
        assert!(needs_guardrails.validate(false).iter().any(|e| e.contains("guardrails.enabled")));
    }

    #[test]
    fn the_redis_password_is_not_shown() {
        let cfg = BudgetsConfig { redis_url: "redis://user:s3cret@redis:6379/0".into(), ..BudgetsConfig::default() };
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("s3cret") && shown.contains("redis://<redacted>@redis:6379/0"), "{shown}");
        assert_eq!(redacted_url("redis://redis:6379"), "redis://redis:6379");
        assert!(!serde_json::to_string(&cfg).unwrap().contains("s3cret"));
    }

    #[test]
    fn requests_default_to_a_minute() {
        assert_eq!(limit("r", LimitKind::Requests, 1, None).window(), Some(Period::Minute));
        assert_eq!(limit("c", LimitKind::Concurrent, 1, None).window(), None);
        assert_eq!(limit("t", LimitKind::Tokens, 1, Some(Period::Day)).window(), Some(Period::Day));
    }
}
