//! Budgets and rate limits per workload scope (`[[budgets.limits]]`):
//! tokens per period, requests per period, requests in flight at once.
//!
//! The request phase asks [`Budgets::admit`] before anything else is done
//! with a request (after key brokering has judged it): a request over one
//! of its workload's budgets gets a [`Refusal`], which the pipeline answers
//! with `429` in the provider's own error shape and audits; the provider is
//! never called. An admitted request holds a [`Ticket`] in its exchange
//! until the response is done: its slots of `concurrent` budgets (given
//! back when the ticket is dropped), and the token budgets the answer's
//! usage is added to ([`Budgets::charge`]).
//!
//! * Tokens: refused once the window's tokens already reach the limit; an
//!   answer's input and output tokens are added when it completes. A
//!   request in flight is not counted before its answer, so requests
//!   admitted together can overshoot the limit by their own size.
//! * Requests: each admitted request adds one; refused past the limit.
//! * Concurrent: counted on this node only, even with Redis.
//!
//! A request without a request phase (a WebSocket upgrade, a body over the
//! inspection limit) is admitted the same way, but holds nothing after it:
//! it counts as a request, is refused over a spent budget, and is neither
//! charged tokens nor holds a `concurrent` slot.
//!
//! Windows are fixed and aligned on the Unix epoch (a `day` budget restarts
//! at 00:00 UTC); `retry-after` says when the window ends.
//!
//! Counters are this node's ([`store`], saved to a file in the state
//! directory so that they survive a restart) and, with `budgets.redis_url`,
//! shared through Redis ([`shared`]). Local counters are kept either way; when
//! Redis cannot be reached in time the request is judged by them
//! (`redis_fail = "local"`: each node then allows up to the whole budget;
//! the audit event says `budget_counting: "local_fallback"`, the
//! `interceptor_budget_redis_fallbacks_total` counter counts it, and the
//! change is logged once), or refused (`redis_fail = "closed"`).
//!
//! This module decides and counts; it does not build responses or audit
//! events (the pipeline does, through `respond`).

pub mod shared;
pub mod store;

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use serde::Serialize;

use self::{
    shared::{Shared, SharedError},
    store::{CounterKey, LocalCounters, Slot},
};
use super::{
    engine::{WorkloadPattern, WorkloadRef},
    model::Provider,
};
use crate::{
    config::budgets::{BudgetsConfig, LimitKind, Period, RedisFail},
    metrics::{Metrics, RateLimitLabels},
    respond::ErrorShape,
    workload::Workload,
};

/// The audit rule of every refusal.
pub const RULE: &str = "budget";

/// The budgets in force, compiled from the configuration; replaced whole on
/// reload (the counters stay).
#[derive(Debug, Default)]
pub struct Rules {
    limits: Vec<Rule>,
}

#[derive(Debug)]
struct Rule {
    name: String,
    scope: Vec<String>,
    patterns: Vec<WorkloadPattern>,
    kind: LimitKind,
    limit: u64,
    period: Option<Period>,
}

impl Rules {
    /// The budgets of `cfg`, or every problem with their scopes (the other
    /// fields are checked by `BudgetsConfig::validate`).
    pub fn compile(cfg: &BudgetsConfig) -> Result<Rules, Vec<String>> {
        let mut errors = Vec::new();
        let mut limits = Vec::new();
        for (i, l) in cfg.limits.iter().enumerate() {
            let patterns = l
                .scope
                .workloads
                .iter()
                .filter_map(|p| {
                    WorkloadPattern::parse(p)
                        .map_err(|e| errors.push(format!("budgets.limits[{i}] ({:?}): scope.workloads: {e}", l.name)))
                        .ok()
                })
                .collect();
            limits.push(Rule {
                name: l.name.clone(),
                scope: l.scope.workloads.clone(),
                patterns,
                kind: l.kind,
                limit: l.limit,
                period: l.window(),
            });
        }
        if errors.is_empty() { Ok(Rules { limits }) } else { Err(errors) }
    }

    pub fn is_empty(&self) -> bool {
        self.limits.is_empty()
    }
}

impl Rule {
    fn covers(&self, workload: Option<&WorkloadRef<'_>>) -> bool {
        self.patterns.is_empty() || workload.is_some_and(|w| self.patterns.iter().any(|p| p.matches(w)))
    }

    fn key(&self, now: u64) -> Option<CounterKey> {
        self.period.map(|p| CounterKey::new(&self.name, self.kind, p, now))
    }

    /// The refusal by this budget: `redis_unreachable` when Redis could
    /// not be reached and `redis_fail` is `closed`, `counting` when it was
    /// judged by this node's counters because Redis could not be reached.
    fn refusal(&self, used: u64, now: u64, redis_unreachable: bool, counting: Option<Counting>) -> Refusal {
        let retry_after_secs = match self.key(now) {
            Some(key) => key.ends().saturating_sub(now).max(1),
            None => 1,
        };
        Refusal {
            name: self.name.clone(),
            scope: self.scope.clone(),
            kind: self.kind,
            limit: self.limit,
            used,
            period: self.period,
            retry_after_secs,
            redis_unreachable,
            counting,
        }
    }
}

/// A request refused by a budget: which one, and how far it is used. Also
/// the audit event's `budget` object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Refusal {
    /// The budget's name.
    pub name: String,
    /// Its workload patterns (empty: every workload).
    pub scope: Vec<String>,
    pub kind: LimitKind,
    pub limit: u64,
    /// Tokens or requests counted in the window (with this one, for
    /// requests), or requests in flight.
    pub used: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub period: Option<Period>,
    /// When the window ends (1 for `concurrent`).
    pub retry_after_secs: u64,
    /// Refused because Redis could not be reached (`redis_fail = "closed"`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub redis_unreachable: bool,
    /// How it was counted, when not as configured (the audit event's
    /// `budget_counting`).
    #[serde(skip)]
    pub counting: Option<Counting>,
}

/// How an exchange's budgets were counted, when not as configured: the
/// audit events' `budget_counting`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Counting {
    /// On this node alone, because Redis could not be reached.
    LocalFallback,
}

impl Refusal {
    /// The message of the `429` and of the audit reason.
    pub fn message(&self) -> String {
        if self.redis_unreachable {
            return format!(
                "budget {:?} cannot be checked: its shared counters are unreachable (budgets.redis_fail = closed)",
                self.name
            );
        }
        let unit = match self.kind {
            LimitKind::Tokens => "tokens",
            LimitKind::Requests => "requests",
            LimitKind::Concurrent => "requests in flight",
        };
        let per = self.period.map(|p| format!(" per {}", p.as_str())).unwrap_or_default();
        format!("budget {:?} exceeded: {} of {} {unit}{per} used", self.name, self.used, self.limit)
    }

    /// The error shape `provider`'s clients read.
    pub fn shape(provider: Provider) -> ErrorShape {
        match provider {
            Provider::Anthropic => ErrorShape::Anthropic,
            Provider::BedrockConverse | Provider::BedrockInvoke | Provider::BedrockAgent => ErrorShape::Bedrock,
            Provider::Gemini => ErrorShape::Gemini,
            Provider::OpenAiChat | Provider::OpenAiResponses | Provider::Cohere | Provider::Generic | Provider::Mcp => {
                ErrorShape::OpenAi
            }
        }
    }
}

/// What an admitted request holds until its exchange is done.
#[derive(Debug, Default)]
pub struct Ticket {
    /// The token budgets its answer's usage is added to.
    tokens: Vec<(String, Period)>,
    /// Its slots of `concurrent` budgets, given back on drop.
    slots: Vec<Slot>,
    /// Some counter was judged on this node alone: Redis could not be
    /// reached.
    fallback: AtomicBool,
}

impl Ticket {
    /// Whether a budget was counted on this node alone because Redis could
    /// not be reached.
    pub fn fell_back(&self) -> bool {
        self.fallback.load(Ordering::Relaxed)
    }

    /// How its budgets were counted, when not as configured.
    pub fn counting(&self) -> Option<Counting> {
        self.fell_back().then_some(Counting::LocalFallback)
    }

    /// Whether no budget covers the request (and nothing fell back).
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty() && self.slots.is_empty() && !self.fell_back()
    }
}

/// The budgets and their counters (kept across reloads).
pub struct Budgets {
    rules: RwLock<Arc<Rules>>,
    local: Arc<LocalCounters>,
    shared: Option<Shared>,
    redis_fail: RedisFail,
    /// Redis answered the last call (for logging changes only).
    redis_up: AtomicBool,
    state_file: Option<PathBuf>,
    metrics: Arc<Metrics>,
}

/// Seconds since the Unix epoch.
fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Budgets {
    /// The budgets of `cfg`, with the counters saved in `state_file` (a
    /// file that cannot be read is reported and the counters start from
    /// zero) and, with `budgets.redis_url`, shared through Redis (not
    /// connected yet: the first request connects).
    pub fn new(
        cfg: &BudgetsConfig,
        rules: Rules,
        state_file: Option<PathBuf>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, redis::RedisError> {
        let local = match &state_file {
            Some(path) => LocalCounters::load(path, unix_now()).unwrap_or_else(|error| {
                tracing::warn!(
                    error = %crate::error::chain(&error),
                    "budget counters cannot be restored; starting from zero (the file is replaced at the next save)"
                );
                LocalCounters::default()
            }),
            None => LocalCounters::default(),
        };
        let shared = match cfg.redis_url.as_str() {
            "" => None,
            url => Some(Shared::new(url, cfg.redis_timeout)?),
        };
        Ok(Self {
            rules: RwLock::new(Arc::new(rules)),
            local: Arc::new(local),
            shared,
            redis_fail: cfg.redis_fail,
            redis_up: AtomicBool::new(true),
            state_file,
            metrics,
        })
    }

    /// Puts `rules` in force (a reload); the counters stay.
    pub fn set_rules(&self, rules: Rules) {
        *self.rules.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(rules);
    }

    fn rules(&self) -> Arc<Rules> {
        Arc::clone(&self.rules.read().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Admits a request of `workload`, or says which budget refuses it (and
    /// counts the refusal).
    pub async fn admit(&self, workload: Option<&Workload>) -> Result<Ticket, Refusal> {
        let rules = self.rules();
        let w = workload.map(WorkloadRef::of);
        let covering: Vec<&Rule> = rules.limits.iter().filter(|r| r.covers(w.as_ref())).collect();
        let mut ticket = Ticket::default();
        if covering.is_empty() {
            return Ok(ticket);
        }
        let now = unix_now();
        let refused = |rule: &Rule, refusal: Refusal| {
            let labels = RateLimitLabels { budget: rule.name.clone(), kind: rule.kind.as_str() };
            self.metrics.budget_refusals.get_or_create(&labels).inc();
            refusal
        };
        // Tokens first (read only), then slots, then requests (counted).
        for rule in covering.iter().filter(|r| r.kind == LimitKind::Tokens) {
            let Some(key) = rule.key(now) else { continue };
            let used = match self.read(&key, &ticket).await {
                Ok(used) => used,
                Err(()) => return Err(refused(rule, rule.refusal(0, now, true, None))),
            };
            if used >= rule.limit {
                return Err(refused(rule, rule.refusal(used, now, false, ticket.counting())));
            }
            ticket.tokens.push((rule.name.clone(), key.period));
        }
        for rule in covering.iter().filter(|r| r.kind == LimitKind::Concurrent) {
            match self.local.acquire(&rule.name, rule.limit) {
                Some(slot) => ticket.slots.push(slot),
                None => return Err(refused(rule, rule.refusal(rule.limit, now, false, ticket.counting()))),
            }
        }
        for rule in covering.iter().filter(|r| r.kind == LimitKind::Requests) {
            let Some(key) = rule.key(now) else { continue };
            let used = match self.add(&key, 1, now, &ticket).await {
                Ok(used) => used,
                Err(()) => return Err(refused(rule, rule.refusal(0, now, true, None))),
            };
            if used > rule.limit {
                return Err(refused(rule, rule.refusal(used, now, false, ticket.counting())));
            }
        }
        Ok(ticket)
    }

    /// Adds an answer's tokens to the token budgets `ticket` was admitted
    /// under. Waits for Redis at most `budgets.redis_timeout` per budget.
    pub async fn charge(&self, ticket: &Ticket, tokens: u64) {
        if tokens == 0 {
            return;
        }
        let now = unix_now();
        for (name, period) in &ticket.tokens {
            let key = CounterKey::new(name, LimitKind::Tokens, *period, now);
            // Counted locally whatever `redis_fail` says: the tokens are spent.
            let _ = self.add(&key, tokens, now, ticket).await;
        }
    }

    /// A counter's value: Redis', or this node's when Redis is not used or
    /// cannot be reached (`Err` then with `redis_fail = "closed"`).
    async fn read(&self, key: &CounterKey, ticket: &Ticket) -> Result<u64, ()> {
        let Some(shared) = &self.shared else { return Ok(self.local.get(key)) };
        match shared.get(key).await {
            Ok(used) => {
                self.redis_answered();
                Ok(used)
            }
            Err(error) => self.fall_back(&error, ticket).map(|()| self.local.get(key)),
        }
    }

    /// Adds `n` to a counter, here and in Redis; the value to judge by:
    /// Redis', or this node's when Redis is not used or cannot be reached
    /// (`Err` then with `redis_fail = "closed"`).
    async fn add(&self, key: &CounterKey, n: u64, now: u64, ticket: &Ticket) -> Result<u64, ()> {
        let local = self.local.add(key, n);
        let Some(shared) = &self.shared else { return Ok(local) };
        match shared.add(key, n, now).await {
            Ok(used) => {
                self.redis_answered();
                Ok(used)
            }
            Err(error) => self.fall_back(&error, ticket).map(|()| local),
        }
    }

    fn redis_answered(&self) {
        if !self.redis_up.swap(true, Ordering::Relaxed) {
            tracing::info!("budget counters: redis reachable again; counting in redis");
        }
    }

    /// Redis failed: counted, logged on the change, and the ticket marked.
    fn fall_back(&self, error: &SharedError, ticket: &Ticket) -> Result<(), ()> {
        self.metrics.budget_redis_fallbacks.inc();
        ticket.fallback.store(true, Ordering::Relaxed);
        if self.redis_up.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                error = %crate::error::chain(error),
                redis_fail = ?self.redis_fail,
                "budget counters: redis unreachable; counting on this node alone"
            );
        }
        match self.redis_fail {
            RedisFail::Local => Ok(()),
            RedisFail::Closed => Err(()),
        }
    }

    /// Saves this node's counters to the state file, if they changed.
    pub fn save(&self) {
        let Some(path) = &self.state_file else { return };
        if let Err(error) = self.local.save(path, unix_now()) {
            tracing::warn!(error = %crate::error::chain(&error), "budget counters not saved");
        }
    }

    /// Saves the counters every `interval`, off the request path, until the
    /// budgets are dropped.
    pub fn start_saver(self: &Arc<Self>, interval: std::time::Duration) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let budgets = Arc::downgrade(self);
        runtime.spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(budgets) = budgets.upgrade() else { return };
                let _ = tokio::task::spawn_blocking(move || budgets.save()).await;
            }
        });
    }

    /// The state file, if the counters are saved.
    pub fn state_file(&self) -> Option<&Path> {
        self.state_file.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::budgets::{LimitConfig, ScopeConfig};

    fn cfg(limits: Vec<LimitConfig>) -> BudgetsConfig {
        BudgetsConfig { limits, ..BudgetsConfig::default() }
    }

    fn limit(name: &str, scope: &[&str], kind: LimitKind, limit: u64, period: Option<Period>) -> LimitConfig {
        LimitConfig {
            name: name.into(),
            scope: ScopeConfig { workloads: scope.iter().map(|s| s.to_string()).collect() },
            kind,
            limit,
            period,
        }
    }

    fn budgets(limits: Vec<LimitConfig>) -> Budgets {
        let cfg = cfg(limits);
        let rules = Rules::compile(&cfg).unwrap();
        Budgets::new(&cfg, rules, None, Arc::new(Metrics::new())).unwrap()
    }

    fn agent(comm: &str) -> Workload {
        Workload { comm: comm.into(), ..Workload::default() }
    }

    #[test]
    fn bad_scopes_are_reported_with_their_budget() {
        let errors = Rules::compile(&cfg(vec![limit("t", &["nope:x"], LimitKind::Concurrent, 1, None)])).unwrap_err();
        assert!(errors[0].starts_with("budgets.limits[0] (\"t\"): scope.workloads:"), "{errors:?}");
    }

    #[tokio::test]
    async fn tokens_are_refused_once_the_window_has_used_them() {
        let b = budgets(vec![limit("team", &["comm:agent"], LimitKind::Tokens, 100, Some(Period::Day))]);
        let w = agent("agent");
        let ticket = b.admit(Some(&w)).await.unwrap();
        // Another workload is not covered.
        assert!(b.admit(Some(&agent("other"))).await.unwrap().is_empty());
        b.charge(&ticket, 60).await;
        let second = b.admit(Some(&w)).await.unwrap();
        b.charge(&second, 60).await;
        let refusal = b.admit(Some(&w)).await.unwrap_err();
        assert_eq!((refusal.name.as_str(), refusal.used, refusal.limit), ("team", 120, 100));
        assert!(refusal.retry_after_secs >= 1 && refusal.retry_after_secs <= 86_400);
        assert_eq!(refusal.message(), "budget \"team\" exceeded: 120 of 100 tokens per day used");
        let labels = RateLimitLabels { budget: "team".into(), kind: "tokens" };
        assert_eq!(b.metrics.budget_refusals.get_or_create(&labels).get(), 1);
    }

    #[tokio::test]
    async fn requests_andslots_are_counted() {
        let b = budgets(vec![
            limit("rpm", &[], LimitKind::Requests, 2, None),
            limit("streams", &[], LimitKind::Concurrent, 1, None),
        ]);
        let first = b.admit(None).await.unwrap();
        // The slot is taken: refused by `streams` before `rpm` counts it.
        assert_eq!(b.admit(None).await.unwrap_err().name, "streams");
        drop(first);
        drop(b.admit(None).await.unwrap());
        let refusal = b.admit(None).await.unwrap_err();
        assert_eq!((refusal.name.as_str(), refusal.used, refusal.limit), ("rpm", 3, 2));
        assert_eq!(refusal.message(), "budget \"rpm\" exceeded: 3 of 2 requests per minute used");
    }

    #[tokio::test]
    async fn reloaded_rules_keep_the_counters() {
        let day = |n| vec![limit("team", &[], LimitKind::Tokens, n, Some(Period::Day))];
        let b = budgets(day(10));
        let t = b.admit(None).await.unwrap();
        b.charge(&t, 10).await;
        assert!(b.admit(None).await.is_err());
        b.set_rules(Rules::compile(&cfg(day(20))).unwrap());
        assert!(b.admit(None).await.is_ok());
    }

    #[tokio::test]
    async fn unreachable_redis_counts_locally_or_refuses() {
        // A port nothing listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        for (fail, admitted) in [(RedisFail::Local, true), (RedisFail::Closed, false)] {
            let cfg = BudgetsConfig {
                redis_url: format!("redis://127.0.0.1:{port}/"),
                redis_fail: fail,
                ..cfg(vec![limit("rpm", &[], LimitKind::Requests, 5, None)])
            };
            let b = Budgets::new(&cfg, Rules::compile(&cfg).unwrap(), None, Arc::new(Metrics::new())).unwrap();
            match b.admit(None).await {
                Ok(ticket) => {
                    assert!(admitted);
                    assert!(ticket.fell_back());
                }
                Err(refusal) => {
                    assert!(!admitted);
                    assert!(refusal.redis_unreachable, "{refusal:?}");
                }
            }
            assert_eq!(b.metrics.budget_redis_fallbacks.get(), 1);
            if admitted {
                // Judged by this node's counters: refused past the limit,
                // not for want of Redis.
                for _ in 1..5 {
                    b.admit(None).await.unwrap();
                }
                let refusal = b.admit(None).await.unwrap_err();
                assert!(!refusal.redis_unreachable, "{refusal:?}");
                assert_eq!((refusal.used, refusal.counting), (6, Some(Counting::LocalFallback)));
            }
        }
    }
}
