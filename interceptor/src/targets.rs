//! Target addresses: which destinations the redirector sends to the proxy.
//!
//! The set is the union of the configured CIDR blocks and the addresses the
//! configured domains resolve to through the system resolver (`/etc/hosts`
//! honoured). Providers rotate addresses and clients cache answers, so an
//! address stays a target for a grace period after its domain stopped
//! resolving to it, and a failed lookup keeps the previous addresses.
//!
//! Plain-HTTP MCP servers (`mcp.plain`) are exact (address, port) pairs,
//! kept apart from the AI addresses: their names are resolved with the same
//! lookups, a failed lookup keeps the previous addresses, and no other port
//! of those addresses is a target.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use ipnet::IpNet;
use serde::Serialize;
use tokio::task::JoinSet;

/// An immutable set of target networks.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TargetSet {
    /// Everything the redirector sends to the proxy.
    pub nets: BTreeSet<IpNet>,
    /// Which domain each resolved or learned address came from.
    pub sources: BTreeMap<IpAddr, BTreeSet<String>>,
    /// The configured CIDR blocks (also in `nets`): AI addresses known by
    /// no name.
    #[serde(skip)]
    pub cidrs: BTreeSet<IpNet>,
    /// Plain-HTTP MCP servers: exact (address, port) → the configured host.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub plain: BTreeMap<SocketAddr, String>,
}

/// What the target set knows of a connection's original destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AiAddress<'a> {
    /// Resolved from, or learned for, these AI names.
    Named(&'a BTreeSet<String>),
    /// In a configured CIDR block: an AI address known by no name.
    Configured,
    /// Not known to be an AI provider's (`all-tls` reaches every address).
    Unknown,
}

impl TargetSet {
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.nets.iter().any(|n| n.contains(&ip))
    }

    /// Whether `ip` is known to belong to an AI provider, and by which
    /// names. Addresses that only `all-tls` targets are [`AiAddress::Unknown`].
    pub fn ai_address(&self, ip: IpAddr) -> AiAddress<'_> {
        let ip = canonical_ip(ip);
        match self.sources.get(&ip) {
            Some(names) if !names.is_empty() => AiAddress::Named(names),
            _ if self.cidrs.iter().any(|n| n.contains(&ip)) => AiAddress::Configured,
            _ => AiAddress::Unknown,
        }
    }

    pub fn len(&self) -> usize {
        self.nets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }
}

/// Resolves domains periodically and remembers when each address was last
/// seen.
pub struct TargetResolver {
    domains: Vec<String>,
    cidrs: Vec<IpNet>,
    grace: Duration,
    /// address → (domains it was seen for, last time seen)
    seen: HashMap<IpAddr, (BTreeSet<String>, Instant)>,
    /// Addresses learned from agents' DNS answers → (domains, expiry).
    learned: HashMap<IpAddr, (BTreeSet<String>, Instant)>,
    /// Every address on the redirected ports is a target (`all-tls`).
    all_tls: bool,
    /// Plain-HTTP MCP servers as configured: (host, port).
    plain: Vec<(String, u16)>,
    /// A plain target's host name → the addresses it last resolved to.
    plain_seen: HashMap<String, BTreeSet<IpAddr>>,
    /// Names whose last lookup failed → its error, so a failure is logged
    /// when it starts or changes, not on every round.
    failing: BTreeMap<String, String>,
}

/// Networks that cover every address, for `all-tls` targeting.
pub fn everything() -> [IpNet; 2] {
    [IpNet::V4(ipnet::Ipv4Net::default()), IpNet::V6(ipnet::Ipv6Net::default())]
}

impl TargetResolver {
    pub fn new(domains: Vec<String>, cidrs: Vec<IpNet>, grace: Duration) -> Self {
        Self {
            domains,
            cidrs,
            grace,
            seen: HashMap::new(),
            learned: HashMap::new(),
            all_tls: false,
            plain: Vec::new(),
            plain_seen: HashMap::new(),
            failing: BTreeMap::new(),
        }
    }

    /// Replaces the plain-HTTP MCP servers, `(host, port)`: an address is
    /// taken as it is, a name is resolved with the domains.
    pub fn set_plain(&mut self, plain: Vec<(String, u16)>) {
        self.plain_seen.retain(|name, _| plain.iter().any(|(host, _)| host == name));
        self.plain = plain;
    }

    /// The plain targets' host names that need resolving.
    fn plain_names(&self) -> impl Iterator<Item = &String> {
        self.plain.iter().map(|(host, _)| host).filter(|host| host.parse::<IpAddr>().is_err())
    }

    /// `all-tls`: every address is a target; the proxy's SNI check decides.
    pub fn set_all_tls(&mut self, all: bool) {
        self.all_tls = all;
    }

    /// Records an address an agent's DNS answer gave for an AI domain. It
    /// stays a target for its TTL (at least `floor`) plus `grace`, for
    /// clients that keep using a cached answer. Returns whether the address
    /// was not a target yet.
    pub fn learn(&mut self, domain: &str, ip: IpAddr, ttl: Duration, floor: Duration, grace: Duration) -> bool {
        let ip = canonical_ip(ip);
        let expires = Instant::now() + ttl.max(floor) + grace;
        let is_new = !self.learned.contains_key(&ip) && !self.seen.contains_key(&ip);
        let entry = self.learned.entry(ip).or_insert_with(|| (BTreeSet::new(), expires));
        entry.0.insert(domain.to_string());
        entry.1 = entry.1.max(expires);
        is_new
    }

    /// The current set, without resolving anything.
    pub fn current(&mut self) -> TargetSet {
        self.snapshot(Instant::now())
    }

    /// Replaces the domain and CIDR lists (config reload). Addresses already
    /// learned for domains that are no longer configured are dropped.
    pub fn reconfigure(&mut self, domains: Vec<String>, cidrs: Vec<IpNet>, grace: Duration) {
        self.seen.retain(|_, (names, _)| {
            names.retain(|n| domains.contains(n));
            !names.is_empty()
        });
        self.domains = domains;
        self.cidrs = cidrs;
        self.grace = grace;
    }

    /// Resolves every domain concurrently and returns the current set.
    pub async fn resolve(&mut self) -> TargetSet {
        let results = lookup(self.domains.clone()).await;
        self.apply(results)
    }

    /// The names resolved periodically: the domains and the plain targets'
    /// names.
    pub fn domains(&self) -> Vec<String> {
        let mut names = self.domains.clone();
        for name in self.plain_names() {
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
        names
    }

    /// Folds in the results of [`lookup`] and returns the current set.
    pub fn apply(&mut self, results: Vec<(String, std::io::Result<Vec<IpAddr>>)>) -> TargetSet {
        let now = Instant::now();
        let mut changes = LookupChanges::default();
        for (domain, result) in results {
            changes.note(&mut self.failing, &domain, result.as_ref().err());
            let plain = self.plain_names().any(|n| *n == domain);
            if plain && let Ok(addrs) = &result {
                self.plain_seen.insert(domain.clone(), addrs.iter().map(|ip| canonical_ip(*ip)).collect());
            }
            if plain && !self.domains.contains(&domain) {
                continue;
            }
            match result {
                Ok(addrs) => {
                    tracing::debug!(%domain, count = addrs.len(), "resolved target domain");
                    for ip in addrs {
                        self.observe(&domain, ip, now);
                    }
                }
                Err(_) => self.refresh_domain(&domain, now),
            }
        }
        changes.log();
        self.snapshot(now)
    }

    fn observe(&mut self, domain: &str, ip: IpAddr, now: Instant) {
        let ip = canonical_ip(ip);
        let entry = self.seen.entry(ip).or_insert_with(|| (BTreeSet::new(), now));
        entry.0.insert(domain.to_string());
        entry.1 = now;
    }

    /// A failed lookup must not age out a domain's addresses.
    fn refresh_domain(&mut self, domain: &str, now: Instant) {
        for (names, last) in self.seen.values_mut() {
            if names.contains(domain) {
                *last = now;
            }
        }
    }

    fn snapshot(&mut self, now: Instant) -> TargetSet {
        let grace = self.grace;
        self.seen.retain(|_, (_, last)| now.duration_since(*last) <= grace);
        self.learned.retain(|_, (_, expires)| *expires > now);
        let mut set = TargetSet::default();
        set.nets.extend(self.cidrs.iter().copied());
        set.cidrs.extend(self.cidrs.iter().copied());
        if self.all_tls {
            set.nets.extend(everything());
        }
        for (ip, (names, _)) in self.seen.iter().chain(self.learned.iter()) {
            set.nets.insert(IpNet::from(*ip));
            set.sources.entry(*ip).or_default().extend(names.iter().cloned());
        }
        for (host, port) in &self.plain {
            match host.parse::<IpAddr>() {
                Ok(ip) => {
                    set.plain.entry(SocketAddr::new(canonical_ip(ip), *port)).or_insert_with(|| host.clone());
                }
                Err(_) => {
                    for ip in self.plain_seen.get(host).into_iter().flatten() {
                        set.plain.entry(SocketAddr::new(*ip, *port)).or_insert_with(|| host.clone());
                    }
                }
            }
        }
        set
    }
}

/// Resolves `domains` concurrently through the system resolver.
pub async fn lookup(domains: Vec<String>) -> Vec<(String, std::io::Result<Vec<IpAddr>>)> {
    let mut lookups = JoinSet::new();
    for domain in domains {
        lookups.spawn(async move {
            let result =
                tokio::net::lookup_host((domain.as_str(), 443)).await.map(|addrs| addrs.map(|a| a.ip()).collect());
            (domain, result)
        });
    }
    let mut out = Vec::new();
    while let Some(joined) = lookups.join_next().await {
        if let Ok(item) = joined {
            out.push(item);
        }
    }
    out
}

fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// What one round of lookups changed: names that started failing (or fail
/// differently), and names that resolve again. Logged as one line each, so
/// an offline machine logs its failures once, not every round.
#[derive(Default)]
struct LookupChanges {
    failing: Vec<(String, String)>,
    recovered: Vec<String>,
}

impl LookupChanges {
    fn note(&mut self, state: &mut BTreeMap<String, String>, domain: &str, error: Option<&std::io::Error>) {
        match error {
            Some(error) => {
                let error = error.to_string();
                if state.get(domain) != Some(&error) {
                    state.insert(domain.to_owned(), error.clone());
                    self.failing.push((domain.to_owned(), error));
                }
            }
            None => {
                if state.remove(domain).is_some() {
                    self.recovered.push(domain.to_owned());
                }
            }
        }
    }

    fn log(self) {
        if !self.failing.is_empty() {
            let domains: Vec<&str> = self.failing.iter().map(|(d, _)| d.as_str()).collect();
            let errors: BTreeSet<&str> = self.failing.iter().map(|(_, e)| e.as_str()).collect();
            tracing::warn!(
                domains = %domains.join(", "),
                count = domains.len(),
                errors = %errors.into_iter().collect::<Vec<_>>().join("; "),
                "cannot resolve target domains; keeping their previous addresses (logged again when this changes)"
            );
        }
        if !self.recovered.is_empty() {
            tracing::info!(domains = %self.recovered.join(", "), "target domains resolve again");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct LogBuf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for LogBuf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// An offline machine: every round fails the same way. One warning
    /// names every failing domain when that starts, nothing more until it
    /// changes; a recovery is one line.
    #[test]
    fn lookup_failures_are_logged_when_they_change_not_every_round() {
        let logs = LogBuf::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt().with_writer(move || writer.clone()).with_ansi(false).finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let offline = || std::io::Error::other("no network");
        let mut r = TargetResolver::new(vec!["a.example".into(), "b.example".into()], vec![], Duration::from_secs(60));
        for _ in 0..5 {
            let _ = r.apply(vec![("a.example".into(), Err(offline())), ("b.example".into(), Err(offline()))]);
        }
        let text = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
        assert_eq!(text.matches("cannot resolve target domains").count(), 1, "{text}");
        assert!(text.contains("a.example, b.example") && text.contains("no network"), "{text}");

        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let _ = r.apply(vec![("a.example".into(), Ok(vec![ip])), ("b.example".into(), Err(offline()))]);
        let _ = r.apply(vec![("a.example".into(), Err(offline())), ("b.example".into(), Err(offline()))]);
        let text = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
        assert_eq!(text.matches("target domains resolve again").count(), 1, "{text}");
        assert_eq!(text.matches("cannot resolve target domains").count(), 2, "a new failure is logged: {text}");
    }

    #[tokio::test]
    async fn literal_addresses_and_localhost_resolve_into_the_set() {
        let cidrs = vec!["198.18.0.0/24".parse().unwrap()];
        let mut r = TargetResolver::new(vec!["localhost".into()], cidrs, Duration::from_secs(60));
        let set = r.resolve().await;
        assert!(set.contains("198.18.0.10".parse().unwrap()));
        assert!(set.contains("127.0.0.1".parse().unwrap()), "{set:?}");
        assert!(set.sources[&"127.0.0.1".parse::<IpAddr>().unwrap()].contains("localhost"));
    }

    #[test]
    fn plain_targets_are_shown_in_the_status_json() {
        let mut set = TargetSet::default();
        set.plain.insert("127.0.0.1:8931".parse().unwrap(), "tools.svc".into());
        let json = serde_json::to_value(&set).unwrap();
        assert_eq!(json["plain"], serde_json::json!({"127.0.0.1:8931": "tools.svc"}), "{json}");
        let empty = serde_json::to_value(TargetSet::default()).unwrap();
        assert!(empty.get("plain").is_none(), "{empty}");
    }

    #[test]
    fn plain_targets_are_exact_pairs_kept_apart_from_ai_addresses() {
        let mut r = TargetResolver::new(vec!["ai.example".into()], vec![], Duration::from_secs(10));
        r.set_plain(vec![("127.0.0.1".into(), 8931), ("tools.svc".into(), 8080)]);
        assert_eq!(r.domains(), vec!["ai.example".to_string(), "tools.svc".to_string()], "names are resolved");
        let set = r.apply(vec![
            ("ai.example".into(), Ok(vec!["192.0.2.1".parse().unwrap()])),
            ("tools.svc".into(), Ok(vec!["10.1.2.3".parse().unwrap(), "::ffff:10.1.2.4".parse().unwrap()])),
        ]);
        let pairs: Vec<(SocketAddr, &str)> = set.plain.iter().map(|(a, h)| (*a, h.as_str())).collect();
        assert_eq!(
            pairs,
            vec![
                ("10.1.2.3:8080".parse().unwrap(), "tools.svc"),
                ("10.1.2.4:8080".parse().unwrap(), "tools.svc"),
                ("127.0.0.1:8931".parse().unwrap(), "127.0.0.1"),
            ]
        );
        assert!(!set.contains("10.1.2.3".parse().unwrap()), "not an AI address on every port");
        assert!(set.contains("192.0.2.1".parse().unwrap()));
        // A failed lookup keeps the previous addresses; a new answer replaces them.
        let set = r.apply(vec![("tools.svc".into(), Err(std::io::Error::other("timeout")))]);
        assert!(set.plain.contains_key(&"10.1.2.3:8080".parse().unwrap()));
        let set = r.apply(vec![("tools.svc".into(), Ok(vec!["10.9.9.9".parse().unwrap()]))]);
        assert!(!set.plain.contains_key(&"10.1.2.3:8080".parse().unwrap()));
        assert!(set.plain.contains_key(&"10.9.9.9:8080".parse().unwrap()));
        r.set_plain(vec![]);
        assert!(r.current().plain.is_empty());
    }

    #[test]
    fn addresses_age_out_after_the_grace_period() {
        let mut r = TargetResolver::new(vec!["a.example".into()], vec![], Duration::from_secs(10));
        let t0 = Instant::now();
        r.observe("a.example", "192.0.2.1".parse().unwrap(), t0);
        assert!(r.snapshot(t0 + Duration::from_secs(5)).contains("192.0.2.1".parse().unwrap()));
        assert!(r.snapshot(t0 + Duration::from_secs(11)).is_empty());
    }

    #[test]
    fn failed_lookup_keeps_previous_addresses() {
        let mut r = TargetResolver::new(vec!["a.example".into()], vec![], Duration::from_secs(10));
        let t0 = Instant::now();
        r.observe("a.example", "192.0.2.1".parse().unwrap(), t0);
        r.refresh_domain("a.example", t0 + Duration::from_secs(9));
        assert!(!r.snapshot(t0 + Duration::from_secs(15)).is_empty());
    }

    #[test]
    fn reconfigure_drops_addresses_of_removed_domains() {
        let mut r = TargetResolver::new(vec!["a.example".into()], vec![], Duration::from_secs(10));
        let t0 = Instant::now();
        r.observe("a.example", "192.0.2.1".parse().unwrap(), t0);
        r.reconfigure(vec!["b.example".into()], vec![], Duration::from_secs(10));
        assert!(r.snapshot(t0).is_empty());
    }

    #[test]
    fn learned_addresses_expire_after_ttl_floor_and_grace() {
        let mut r = TargetResolver::new(vec![], vec![], Duration::from_secs(10));
        let ip: IpAddr = "198.18.0.30".parse().unwrap();
        assert!(r.learn("api.openai.com", ip, Duration::from_secs(1), Duration::from_secs(5), Duration::from_secs(2)));
        assert!(!r.learn("api.openai.com", ip, Duration::from_secs(1), Duration::from_secs(5), Duration::from_secs(2)));
        let now = Instant::now();
        let set = r.snapshot(now);
        assert!(set.contains(ip));
        assert!(set.sources[&ip].contains("api.openai.com"));
        // TTL 1s raised to the 5s floor, plus 2s grace.
        assert!(r.snapshot(now + Duration::from_secs(6)).contains(ip));
        assert!(!r.snapshot(now + Duration::from_secs(8)).contains(ip));
    }

    #[test]
    fn all_tls_targets_every_address() {
        let mut r = TargetResolver::new(vec![], vec![], Duration::from_secs(10));
        r.set_all_tls(true);
        let set = r.current();
        assert!(set.contains("203.0.113.7".parse().unwrap()) && set.contains("2001:db8::7".parse().unwrap()));
    }

    #[test]
    fn ai_addresses_are_named_configured_or_unknown() {
        let mut r = TargetResolver::new(vec![], vec!["198.18.0.0/24".parse().unwrap()], Duration::from_secs(10));
        r.set_all_tls(true);
        let learned: IpAddr = "203.0.113.9".parse().unwrap();
        let day = Duration::from_secs(86_400);
        r.learn("api.openai.com", learned, day, day, day);
        let set = r.current();
        let AiAddress::Named(names) = set.ai_address(learned) else { panic!("{set:?}") };
        assert!(names.contains("api.openai.com"));
        // The v4-mapped form of a learned address is the same address.
        assert!(matches!(set.ai_address("::ffff:203.0.113.9".parse().unwrap()), AiAddress::Named(_)));
        assert_eq!(set.ai_address("198.18.0.77".parse().unwrap()), AiAddress::Configured);
        // all-tls redirects it, but nothing says it is an AI provider's.
        assert!(set.contains("192.0.2.1".parse().unwrap()));
        assert_eq!(set.ai_address("192.0.2.1".parse().unwrap()), AiAddress::Unknown);
    }

    #[test]
    fn v4_mapped_answers_are_stored_as_ipv4() {
        let mut r = TargetResolver::new(vec!["a.example".into()], vec![], Duration::from_secs(10));
        let t0 = Instant::now();
        r.observe("a.example", "::ffff:192.0.2.1".parse().unwrap(), t0);
        assert!(r.snapshot(t0).nets.contains(&"192.0.2.1/32".parse().unwrap()));
    }
}
