//! Configuration: one TOML file, environment overrides and CLI flags,
//! validated into typed values up front.
//!
//! Precedence: built-in defaults < file < environment < command line. The
//! built-in defaults are documented in `config/default.toml`, which a test
//! keeps identical to [`Config::default`]. This module does no I/O besides
//! reading the file it is given.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use self::akto::AktoConfig;
pub use self::budgets::BudgetsConfig;
pub use self::keys::KeysConfig;
pub use self::kubernetes::{KubeEnabled, KubernetesConfig};
pub use self::mcp::McpConfig;
use crate::{
    policy::{DomainPolicy, DomainsConfig, McpDomains, PolicyError},
    telemetry::{LogFormat, otlp::OtlpConfig},
};

pub mod akto;
pub mod budgets;
pub mod keys;
pub mod kubernetes;
pub mod mcp;

/// Smallest `proxy.max_header_bytes` (the HTTP/1.1 server's minimum buffer).
pub const MIN_HEADER_BYTES: usize = 8192;

/// Largest `proxy.worker_threads`.
pub const MAX_WORKER_THREADS: usize = 1024;

/// The documented default configuration file.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../config/default.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot parse config file {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("invalid configuration:\n  - {}", .errors.join("\n  - "))]
    Invalid { errors: Vec<String> },
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub proxy: ProxyConfig,
    pub redirect: RedirectConfig,
    pub domains: DomainsConfig,
    pub tls: TlsConfig,
    pub guardrails: GuardrailsConfig,
    pub targets: TargetsConfig,
    pub kubernetes: KubernetesConfig,
    pub mcp: McpConfig,
    pub keys: KeysConfig,
    pub budgets: BudgetsConfig,
    pub admin: AdminConfig,
    pub log: LogConfig,
    pub telemetry: TelemetryConfig,
}

/// `[telemetry]`: export to an OpenTelemetry collector.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    pub otlp: OtlpConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    pub port: u16,
    pub address_v4: Ipv4Addr,
    /// `None` (empty string in the file) disables the IPv6 listener.
    #[serde(with = "optional_ipv6")]
    pub address_v6: Option<Ipv6Addr>,
    pub mark: u32,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Longest silence from a provider (no response head, or no body frame
    /// of a response being relayed) before the request is given up: 504
    /// before the head, a cut body after it.
    #[serde(with = "humantime_serde")]
    pub upstream_idle_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Largest request body the guardrails buffer for inspection, in bytes.
    pub max_inspected_body: usize,
    /// Largest request head (HTTP/1.1 read buffer, HTTP/2 header list), in
    /// bytes; larger heads get `431` (HTTP/1.1) or a stream reset (HTTP/2).
    pub max_header_bytes: usize,
    /// How long a client may take to finish the TLS handshake, and to send
    /// a whole request head (also the HTTP/2 ping interval and timeout).
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// An intercepted connection with no request in flight for this long is
    /// closed; a request body being buffered that stalls this long gets 408.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Connections open at once, from every client together; 0: no cap.
    pub max_connections: usize,
    /// Connections open at once from one workload (cgroup, else client
    /// address); 0: no cap.
    pub max_connections_per_workload: usize,
    /// Workers serving connections, each a thread with its own event loop
    /// and listener on the proxy port; 0: one per CPU the process may run
    /// on (its CPU affinity).
    pub worker_threads: usize,
}

/// A guardrail backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// The embedded engine (`policy_file`, or the built-in policy).
    Local,
    /// The Akto guardrail service (`[guardrails.akto]`, `AKTO_URL`).
    Akto,
}

/// What a failure means for the traffic: a guardrail backend failing, or
/// (`redirect.fail_mode`) the proxy itself being down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailMode {
    /// Let the traffic through and record the failure.
    Open,
    /// Refuse it (`503`).
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StreamMode {
    /// Forward every chunk at once; verdicts are recorded, never enforced.
    Monitor,
    /// Hold back at most one window until its verdict; cut on a block.
    Enforce,
}

/// What to do with a body too large to inspect (over `max_inspected_body`,
/// or decompressing past `max_decoded_body` or `max_decompression_ratio`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OversizeAction {
    /// Refuse it: `413` for a request, `502` for a response.
    Block,
    /// Forward it unmodified and record an alert ("not inspected: too large").
    Pass,
}

/// A WebSocket upgrade on an intercepted (AI) host whose protocol the
/// guardrails cannot read. Known protocols (the OpenAI Responses API's
/// WebSocket mode, OpenAI Realtime, Gemini Live) are always inspected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownWebSocket {
    /// Answer `426 Upgrade Required` with a JSON error; the provider is not
    /// called (clients such as the Codex CLI then use HTTPS, which is
    /// inspected).
    Refuse,
    /// Relay it uninspected; audited when it opens and when it closes (with
    /// its byte counts).
    Tunnel,
}

/// What to do with a request body that cannot be decoded for inspection: a
/// `Content-Encoding` we do not know (`x-custom`), a body that fails to
/// decompress, a `charset` we cannot decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UndecodableAction {
    /// Refuse it with `415`, whatever `fail_mode_request` says: the client
    /// chose the encoding, so failing open would let it pick what is seen.
    Block,
    /// Forward it uninspected, with an audit event per request saying so
    /// and why.
    Pass,
}

/// `guardrails.max_buffered_total`: `"auto"` or a number of bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BufferedTotal {
    /// Sized from the memory limit at start
    /// ([`crate::proxy::budget::auto_size`]).
    #[default]
    Auto,
    Bytes(usize),
}

impl Serialize for BufferedTotal {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Auto => s.serialize_str("auto"),
            Self::Bytes(n) => s.serialize_u64(*n as u64),
        }
    }
}

impl<'de> Deserialize<'de> for BufferedTotal {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(n) => usize::try_from(n).map(Self::Bytes).map_err(serde::de::Error::custom),
            Raw::Text(t) if t == "auto" => Ok(Self::Auto),
            Raw::Text(t) => Err(serde::de::Error::custom(format!("expected \"auto\" or a number of bytes, got {t:?}"))),
        }
    }
}

/// What to do when a guardrail would modify a body signed with AWS SigV4
/// (one key brokering does not sign again).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SigV4Action {
    Block,
    /// Forward the original unmodified and record it.
    Alert,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GuardrailsConfig {
    /// Run guardrails on intercepted traffic. Off: intercepted traffic is
    /// only relayed (and audited per connection).
    pub enabled: bool,
    /// Backends in order; a block by one skips the rest.
    pub backends: Vec<Backend>,
    /// Local engine policy (TOML). Empty: the built-in policy.
    pub policy_file: PathBuf,
    pub fail_mode_request: FailMode,
    pub fail_mode_response: FailMode,
    pub stream_mode: StreamMode,
    /// Characters of streamed text per check where streams use windows;
    /// enforcing with the local engine only, the bytes a partial match is
    /// held back at most (at least `engine::MIN_HOLD`).
    pub stream_window: usize,
    /// Characters of each window checked again with the next one.
    pub stream_overlap: usize,
    /// Largest decompressed body inspected, in bytes.
    pub max_decoded_body: usize,
    /// Largest ratio of decompressed to compressed size (zip bombs).
    pub max_decompression_ratio: usize,
    /// A body over the inspection limits.
    pub oversize: OversizeAction,
    /// A request body that cannot be decoded (unknown content coding,
    /// corrupt compressed data, unknown charset).
    pub undecodable: UndecodableAction,
    /// Bytes of bodies buffered for inspection by all connections together
    /// (request bodies, and response bodies read whole); an exchange that
    /// would go past it gets `503` with `retry-after`. Default `"auto"`: an
    /// eighth of the memory limit (the tightest `memory.max` of this
    /// process's cgroup and its ancestors, else physical memory), at least
    /// 64 MiB and at most 4 GiB, and never less than
    /// `proxy.max_inspected_body`. A number must be at least
    /// `proxy.max_inspected_body`.
    pub max_buffered_total: BufferedTotal,
    pub sigv4: SigV4Action,
    /// A WebSocket whose protocol cannot be inspected (default `refuse`).
    pub unknown_websocket: UnknownWebSocket,
    /// JSON-lines audit file. Empty: the log only.
    pub audit_file: PathBuf,
    /// Include prompt text in audit events.
    pub audit_prompts: bool,
    pub akto: AktoConfig,
}

impl Default for GuardrailsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            backends: vec![Backend::Local],
            policy_file: PathBuf::new(),
            fail_mode_request: FailMode::Open,
            fail_mode_response: FailMode::Open,
            stream_mode: StreamMode::Monitor,
            stream_window: 600,
            stream_overlap: 100,
            max_decoded_body: 16 << 20,
            max_decompression_ratio: 1000,
            oversize: OversizeAction::Block,
            undecodable: UndecodableAction::Block,
            max_buffered_total: BufferedTotal::Auto,
            sigv4: SigV4Action::Block,
            unknown_websocket: UnknownWebSocket::Refuse,
            audit_file: PathBuf::new(),
            audit_prompts: false,
            akto: AktoConfig::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// Terminate TLS for AI domains. Off: every connection passes through.
    pub intercept: bool,
    /// Extra CA certificates (PEM) trusted for upstream connections, on top
    /// of the platform roots. Empty: none.
    pub upstream_ca: PathBuf,
    #[serde(with = "humantime_serde")]
    pub leaf_validity: Duration,
    #[serde(with = "humantime_serde")]
    pub client_hello_timeout: Duration,
    pub passthrough_on_reject: bool,
    /// Directory holding the cluster CA (`ca.crt`, `ca.key`), typically a
    /// Kubernetes Secret mounted read-only; loaded as it is, never created.
    /// Empty: the per-node CA in the state directory, created on first
    /// start.
    pub ca_dir: PathBuf,
    /// When this instance creates its per-node CA (first start, `ca_dir`
    /// empty), give it X.509 name constraints limited to the AI domains. An
    /// existing CA is never changed. Default `false`.
    pub node_ca_name_constraints: bool,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            intercept: true,
            upstream_ca: PathBuf::new(),
            leaf_validity: Duration::from_secs(24 * 3600),
            client_hello_timeout: Duration::from_secs(5),
            passthrough_on_reject: false,
            ca_dir: PathBuf::new(),
            node_ca_name_constraints: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum RedirectMode {
    Ebpf,
    Iptables,
    None,
}

impl RedirectMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ebpf => "ebpf",
            Self::Iptables => "iptables",
            Self::None => "none",
        }
    }
}

impl FromStr for RedirectMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ebpf" => Ok(Self::Ebpf),
            "iptables" => Ok(Self::Iptables),
            "none" => Ok(Self::None),
            other => Err(format!("unknown redirect mode {other:?} (expected ebpf, iptables or none)")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedirectConfig {
    pub mode: RedirectMode,
    /// Empty: the cgroup2 root.
    pub cgroup: PathBuf,
    pub ports: Vec<u16>,
    /// What happens to target connections while the proxy is down.
    pub fail_mode: FailMode,
    /// The proxy counts as down when its heartbeat is older than this.
    #[serde(with = "humantime_serde")]
    pub heartbeat_timeout: Duration,
}

impl RedirectConfig {
    pub fn fail_safe(&self) -> FailSafe {
        FailSafe { closed: self.fail_mode == FailMode::Closed, timeout: self.heartbeat_timeout }
    }
}

/// What the redirect does while the proxy is down (crashed or hung): the
/// typed form of `redirect.fail_mode` and `redirect.heartbeat_timeout`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FailSafe {
    /// Refuse connections to targets instead of letting them go direct.
    pub closed: bool,
    /// A heartbeat older than this means the proxy is down.
    pub timeout: Duration,
}

impl Default for FailSafe {
    /// The documented `[redirect]` defaults.
    fn default() -> Self {
        RedirectConfig::default().fail_safe()
    }
}

impl FailSafe {
    /// How often a live instance writes its heartbeat.
    pub fn interval(&self) -> Duration {
        (self.timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1))
    }

    pub fn timeout_ms(&self) -> u32 {
        u32::try_from(self.timeout.as_millis()).unwrap_or(u32::MAX).max(1)
    }
}

/// How the set of redirected addresses is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum TargetMode {
    /// Periodic resolution of the AI domains, configured CIDRs, and the
    /// addresses agents' own DNS answers give for AI domains.
    Dns,
    /// Periodic resolution and configured CIDRs only.
    Resolve,
    /// Every address on the redirected ports: the SNI decides.
    AllTls,
}

/// What the proxy does with a connection to an AI address that it cannot
/// classify (see `targets.unclassified`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unclassified {
    /// Close it, with an audit event saying why: nothing reaches the
    /// provider unseen.
    Refuse,
    /// Relay its bytes untouched, with an audit event saying it was not
    /// inspected.
    Pass,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TargetsConfig {
    pub mode: TargetMode,
    /// A connection to an AI address that cannot be classified: no
    /// ClientHello in time, not TLS, a ClientHello that cannot be parsed or
    /// is too large, or no server name and no AI name known for the address.
    /// Default `refuse`.
    pub unclassified: Unclassified,
    /// Port of the DNS forwarder (on the proxy addresses), `dns` mode.
    pub dns_port: u16,
    /// Resolvers the forwarder asks (`ip` or `ip:port`), whatever the client
    /// asked. Empty (default): each query goes to the server its client
    /// asked (its original destination), and only a query whose server
    /// cannot be told (sent to the forwarder's port directly) or cannot be
    /// reached from here (a loopback resolver in another network namespace)
    /// goes to the `nameserver` lines of /etc/resolv.conf. The forwarder's
    /// own address is never asked. A resolver named here whose own queries
    /// are redirected back (a covered stub such as 127.0.0.53) makes a loop,
    /// which is refused with SERVFAIL after a few rounds.
    pub dns_upstreams: Vec<String>,
    /// Shortest time a learned address stays a target, whatever its TTL.
    #[serde(with = "humantime_serde")]
    pub learned_ttl_floor: Duration,
    /// Added to a learned address's TTL, for clients reusing a cached answer.
    #[serde(with = "humantime_serde")]
    pub learned_grace: Duration,
    pub domains: Vec<String>,
    /// Kept as text so that every bad entry is reported at once.
    pub cidrs: Vec<String>,
    #[serde(with = "humantime_serde")]
    pub resolve_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub address_grace: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    pub address: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            port: 15443,
            address_v4: Ipv4Addr::LOCALHOST,
            address_v6: Some(Ipv6Addr::LOCALHOST),
            mark: 0x1e7,
            connect_timeout: Duration::from_secs(10),
            // The providers' SDKs' own default timeout, so the interceptor
            // never gives up before the client would.
            upstream_idle_timeout: Duration::from_secs(600),
            drain_timeout: Duration::from_secs(10),
            max_inspected_body: 16 << 20,
            max_header_bytes: 64 << 10,
            header_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(120),
            max_connections: 8192,
            max_connections_per_workload: 1024,
            worker_threads: 0,
        }
    }
}

impl Default for RedirectConfig {
    fn default() -> Self {
        Self {
            mode: RedirectMode::Ebpf,
            cgroup: PathBuf::new(),
            ports: vec![443],
            fail_mode: FailMode::Open,
            heartbeat_timeout: Duration::from_secs(2),
        }
    }
}

impl Default for TargetsConfig {
    fn default() -> Self {
        Self {
            mode: TargetMode::Dns,
            unclassified: Unclassified::Refuse,
            dns_port: 15053,
            dns_upstreams: Vec::new(),
            learned_ttl_floor: Duration::from_secs(30),
            learned_grace: Duration::from_secs(300),
            domains: Vec::new(),
            cidrs: Vec::new(),
            resolve_interval: Duration::from_secs(60),
            address_grace: Duration::from_secs(600),
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self { address: SocketAddr::from((Ipv4Addr::LOCALHOST, 15000)) }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { format: LogFormat::Auto }
    }
}

/// Overrides from the environment and the command line, applied on top of the
/// file. `None` leaves the file's value.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub redirect: Option<RedirectMode>,
    pub cgroup: Option<PathBuf>,
    pub port: Option<u16>,
    /// `proxy.worker_threads`.
    pub worker_threads: Option<usize>,
    pub upstream_ca: Option<PathBuf>,
    /// `AKTO_URL`: enables the Akto backend (appended after the local one).
    pub akto_url: Option<String>,
    /// `APP_NAME`: a literal app name (braces are not placeholders).
    pub app_name: Option<String>,
    /// `AKTO_API_TOKEN`.
    pub akto_token: Option<String>,
    /// The Akto addon's other variables (`AKTO_GUARDRAILS_MODE`,
    /// `AKTO_TEXT_THRESHOLD`, `AKTO_LOG_PAYLOADS`), checked by [`Config::load`].
    pub akto_addon: akto::AddonEnv,
    pub admin: Option<SocketAddr>,
    pub log_format: Option<LogFormat>,
    /// `NODE_NAME`: `kubernetes.node_name`.
    pub node_name: Option<String>,
}

impl Config {
    /// Parses TOML text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse { path: origin.to_path_buf(), source: Box::new(e) })
    }

    /// Reads and parses a file (not yet validated).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Self::from_toml(&text, path)
    }

    /// Loads the file (or the built-in defaults), applies overrides, validates.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        let mut config = match path {
            Some(path) => Self::from_file(path)?,
            None => Self::default(),
        };
        config.apply(overrides);
        let mut errors = overrides.akto_addon.errors();
        match config.validate() {
            Ok(()) => {}
            Err(ConfigError::Invalid { errors: more }) => errors.extend(more),
            Err(other) => return Err(other),
        }
        if errors.is_empty() { Ok(config) } else { Err(ConfigError::Invalid { errors }) }
    }

    pub fn apply(&mut self, o: &Overrides) {
        if let Some(mode) = o.redirect {
            self.redirect.mode = mode;
        }
        if let Some(cgroup) = &o.cgroup {
            self.redirect.cgroup = cgroup.clone();
        }
        if let Some(port) = o.port {
            self.proxy.port = port;
        }
        if let Some(threads) = o.worker_threads {
            self.proxy.worker_threads = threads;
        }
        if let Some(ca) = &o.upstream_ca {
            self.tls.upstream_ca = ca.clone();
        }
        if let Some(url) = o.akto_url.as_ref().filter(|u| !u.is_empty()) {
            self.guardrails.akto.url = url.clone();
            if !self.guardrails.backends.contains(&Backend::Akto) {
                self.guardrails.backends.push(Backend::Akto);
            }
        }
        if let Some(name) = &o.app_name {
            // A literal: its braces are not placeholders.
            self.guardrails.akto.app_name = crate::app_name::escape(name);
        }
        if let Some(token) = o.akto_token.as_ref().filter(|t| !t.is_empty()) {
            self.guardrails.akto.token = Some(token.clone());
        }
        self.apply_akto_addon(&o.akto_addon);
        if let Some(admin) = o.admin {
            self.admin.address = admin;
        }
        if let Some(format) = o.log_format {
            self.log.format = format;
        }
        if let Some(node) = o.node_name.as_ref().filter(|n| !n.is_empty()) {
            self.kubernetes.node_name = node.clone();
        }
    }

    /// The Akto addon's variables that are valid (the invalid ones are
    /// [`Config::load`]'s errors). A stream window from
    /// `AKTO_TEXT_THRESHOLD` that the overlap would not fit in takes a
    /// sixth of it as overlap (the defaults' ratio, 100 of 600).
    fn apply_akto_addon(&mut self, env: &akto::AddonEnv) {
        let g = &mut self.guardrails;
        if let Ok(Some(mode)) = env.guardrails_mode() {
            g.stream_mode = match mode {
                akto::GuardrailsMode::Async => StreamMode::Monitor,
                akto::GuardrailsMode::Sync => StreamMode::Enforce,
            };
        }
        if let Ok(Some(window)) = env.text_threshold() {
            g.stream_window = window;
            if g.stream_overlap >= window {
                g.stream_overlap = window / 6;
            }
        }
        if let Ok(Some(log)) = env.log_payloads() {
            g.akto.log_payloads = log;
        }
    }

    /// Checks every field and reports every problem at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut errors = Vec::new();
        if self.redirect.ports.is_empty() {
            errors.push("redirect.ports: at least one port is required".to_string());
        }
        if self.redirect.ports.len() > interceptor_common::MAX_PORTS {
            errors.push(format!(
                "redirect.ports: at most {} ports are supported, got {}",
                interceptor_common::MAX_PORTS,
                self.redirect.ports.len()
            ));
        }
        if self.redirect.heartbeat_timeout < Duration::from_millis(100) {
            errors.push("redirect.heartbeat_timeout: must be at least 100ms".to_string());
        }
        if self.redirect.ports.contains(&0) {
            errors.push("redirect.ports: port 0 is not a valid destination port".to_string());
        }
        if self.proxy.mark == 0 && self.redirect.mode != RedirectMode::None {
            errors.push(
                "proxy.mark: must be non-zero, or the proxy's own connections would be redirected back to it"
                    .to_string(),
            );
        }
        if self.proxy.address_v4.is_unspecified() {
            errors.push(
                "proxy.address_v4: must be a concrete address connections can be rewritten to, not 0.0.0.0".to_string(),
            );
        }
        if self.proxy.address_v6.is_some_and(|a| a.is_unspecified()) {
            errors.push("proxy.address_v6: must be a concrete address, not ::; use \"\" to disable".to_string());
        }
        if self.proxy.connect_timeout.is_zero() {
            errors.push("proxy.connect_timeout: must be greater than zero".to_string());
        }
        if self.proxy.upstream_idle_timeout.is_zero() {
            errors.push("proxy.upstream_idle_timeout: must be greater than zero".to_string());
        }
        if !self.redirect.cgroup.as_os_str().is_empty() && !self.redirect.cgroup.is_absolute() {
            errors.push(format!(
                "redirect.cgroup: {:?} must be an absolute path to a cgroup v2 directory",
                self.redirect.cgroup
            ));
        }
        errors.extend(self.domains.validate());
        if !self.tls.upstream_ca.as_os_str().is_empty() && !self.tls.upstream_ca.is_file() {
            errors.push(format!("tls.upstream_ca: {} is not a readable file", self.tls.upstream_ca.display()));
        }
        if !self.tls.ca_dir.as_os_str().is_empty() && !self.tls.ca_dir.is_absolute() {
            errors.push(format!("tls.ca_dir: {} must be an absolute path", self.tls.ca_dir.display()));
        }
        if self.tls.leaf_validity < Duration::from_secs(3600) {
            errors.push("tls.leaf_validity: must be at least 1h".to_string());
        }
        let g = &self.guardrails;
        if g.backends.contains(&Backend::Akto) {
            errors.extend(g.akto.validate().into_iter().map(|e| format!("guardrails.akto: {e}")));
        }
        if !g.policy_file.as_os_str().is_empty() && !g.policy_file.is_file() {
            errors.push(format!("guardrails.policy_file: {} is not a readable file", g.policy_file.display()));
        }
        if g.stream_window == 0 {
            errors.push("guardrails.stream_window: must be greater than zero".to_string());
        }
        if g.stream_overlap >= g.stream_window {
            errors.push("guardrails.stream_overlap: must be smaller than stream_window".to_string());
        }
        if g.max_decoded_body == 0 {
            errors.push("guardrails.max_decoded_body: must be greater than zero".to_string());
        }
        if self.proxy.max_inspected_body == 0 {
            errors.push("proxy.max_inspected_body: must be greater than zero".to_string());
        }
        if let BufferedTotal::Bytes(n) = g.max_buffered_total
            && n < self.proxy.max_inspected_body
        {
            errors.push(format!(
                "guardrails.max_buffered_total: {n} bytes is less than proxy.max_inspected_body ({}): such a body could never be inspected",
                self.proxy.max_inspected_body
            ));
        }
        if g.max_decompression_ratio == 0 {
            errors.push("guardrails.max_decompression_ratio: must be greater than zero".to_string());
        }
        if !(MIN_HEADER_BYTES..=u32::MAX as usize).contains(&self.proxy.max_header_bytes) {
            errors.push(format!("proxy.max_header_bytes: must be between {MIN_HEADER_BYTES} and {} bytes", u32::MAX));
        }
        if self.proxy.header_read_timeout.is_zero() {
            errors.push("proxy.header_read_timeout: must be greater than zero".to_string());
        }
        if self.proxy.idle_timeout.is_zero() {
            errors.push("proxy.idle_timeout: must be greater than zero".to_string());
        }
        if self.proxy.worker_threads > MAX_WORKER_THREADS {
            errors.push(format!("proxy.worker_threads: at most {MAX_WORKER_THREADS} (0: one per CPU)"));
        }
        for domain in &self.targets.domains {
            if let Err(why) = check_domain(domain) {
                errors.push(format!("targets.domains: {domain:?}: {why}"));
            }
        }
        for upstream in &self.targets.dns_upstreams {
            if parse_dns_upstream(upstream).is_none() {
                errors.push(format!("targets.dns_upstreams: {upstream:?} is not an address or address:port"));
            }
        }
        if self.targets.mode == TargetMode::Dns && self.targets.dns_port == 0 {
            errors.push("targets.dns_port: must be non-zero in dns mode".to_string());
        }
        for cidr in &self.targets.cidrs {
            if let Err(why) = parse_cidr(cidr) {
                errors.push(format!("targets.cidrs: {cidr:?}: {why}"));
            }
        }
        if self.targets.resolve_interval < Duration::from_secs(1) {
            errors.push("targets.resolve_interval: must be at least 1s".to_string());
        }
        errors.extend(self.kubernetes.validate());
        errors.extend(self.mcp.validate());
        errors.extend(self.keys.validate(self.guardrails.enabled));
        errors.extend(self.budgets.validate(self.guardrails.enabled));
        let mcp_domains = McpDomains { domains: &self.mcp.domains, domains_extra: &self.mcp.domains_extra };
        errors.extend(mcp_domains.validate());
        if !self.admin.address.ip().is_loopback() {
            errors.push(format!(
                "admin.address: {} is not a loopback address; the admin API must not be reachable from the network",
                self.admin.address
            ));
        }
        errors.extend(self.telemetry.otlp.errors());
        if errors.is_empty() { Ok(()) } else { Err(ConfigError::Invalid { errors }) }
    }

    /// The MCP server names intercepted like AI domains: `mcp.domains` and
    /// `mcp.domains_extra`, or none when `mcp.enabled` is off.
    pub fn mcp_domains(&self) -> McpDomains<'_> {
        if self.mcp.enabled {
            McpDomains { domains: &self.mcp.domains, domains_extra: &self.mcp.domains_extra }
        } else {
            McpDomains::default()
        }
    }

    /// The domain policy in force: the `[domains]` lists and the MCP server
    /// names ([`Config::mcp_domains`]).
    pub fn domain_policy(&self) -> Result<DomainPolicy, PolicyError> {
        DomainPolicy::compile_with_mcp(&self.domains, self.mcp_domains())
    }

    /// The literal targets, parsed. Only valid after [`Config::validate`].
    pub fn cidrs(&self) -> Vec<IpNet> {
        self.targets.cidrs.iter().filter_map(|c| parse_cidr(c).ok()).collect()
    }
}

/// `ip` (port 53) or `ip:port` / `[ipv6]:port`.
pub fn parse_dns_upstream(text: &str) -> Option<SocketAddr> {
    text.parse::<SocketAddr>().ok().or_else(|| text.parse::<std::net::IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53)))
}

/// Accepts `a.b.c.d`, `a.b.c.d/n` and the IPv6 equivalents.
pub fn parse_cidr(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    if let Ok(net) = IpNet::from_str(text) {
        return Ok(net.trunc());
    }
    std::net::IpAddr::from_str(text).map(IpNet::from).map_err(|_| "not an IP address or CIDR block".to_string())
}

fn check_domain(domain: &str) -> Result<(), &'static str> {
    if domain.is_empty() || domain.len() > 253 {
        return Err("a domain name must have 1 to 253 characters");
    }
    let ok = domain.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    });
    if ok { Ok(()) } else { Err("not a valid domain name (wildcards are not resolvable)") }
}

mod optional_ipv6 {
    use std::net::Ipv6Addr;

    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    pub fn serialize<S: Serializer>(v: &Option<Ipv6Addr>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(a) => s.collect_str(a),
            None => s.serialize_str(""),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Ipv6Addr>, D::Error> {
        let text = String::deserialize(d)?;
        if text.is_empty() {
            return Ok(None);
        }
        text.parse().map(Some).map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_defaults_match_built_in_defaults() {
        let parsed = Config::from_toml(DEFAULT_CONFIG_TOML, Path::new("default.toml")).unwrap();
        assert_eq!(parsed, Config::default());
        parsed.validate().unwrap();
    }

    #[test]
    fn mcp_servers_are_in_the_domain_policy_unless_mcp_is_off() {
        let on = Config::from_toml("[mcp]\ndomains_extra = [\"tools.example.com\"]\n", Path::new("x")).unwrap();
        on.validate().unwrap();
        let policy = on.domain_policy().unwrap();
        for name in ["mcp.notion.com", "tools.example.com"] {
            assert_eq!(policy.classify(Some(name)).reason, crate::policy::Reason::McpServer, "{name}");
        }
        assert!(policy.resolvable_names().iter().any(|n| n == "tools.example.com"));
        assert!(policy.name_constraint_bases().iter().any(|n| n == "mcp.notion.com"));

        let off =
            Config::from_toml("[mcp]\nenabled = false\ndomains_extra = [\"tools.example.com\"]\n", Path::new("x"))
                .unwrap();
        let policy = off.domain_policy().unwrap();
        for name in ["mcp.notion.com", "tools.example.com"] {
            assert!(!policy.classify(Some(name)).intercept, "{name}");
        }
        assert!(!policy.resolvable_names().iter().any(|n| n == "tools.example.com"));
        assert!(!policy.name_constraint_bases().iter().any(|n| n == "mcp.notion.com"));

        let mut bad = Config::default();
        bad.mcp.domains_extra = vec!["a*b.com".into()];
        let ConfigError::Invalid { errors } = bad.validate().unwrap_err() else { panic!() };
        assert!(errors.iter().any(|e| e.starts_with("mcp.domains_extra: \"a*b.com\"")), "{errors:?}");
    }

    #[test]
    fn partial_file_keeps_other_defaults() {
        let c = Config::from_toml("[proxy]\nport = 1234\n", Path::new("x")).unwrap();
        assert_eq!(c.proxy.port, 1234);
        assert_eq!(c.redirect, RedirectConfig::default());
    }

    #[test]
    fn unknown_fields_are_rejected_with_their_name() {
        let err = Config::from_toml("[proxy]\nprot = 1\n", Path::new("x")).unwrap_err();
        let chain = format!("{:?}", anyhow::Error::from(err));
        assert!(chain.contains("prot"), "{chain}");
    }

    #[test]
    fn every_invalid_field_is_reported_at_once() {
        let mut c = Config::default();
        c.redirect.ports = vec![0];
        c.targets.cidrs = vec!["10.0.0.0/33".into(), "nope".into()];
        c.targets.domains.push("*.openai.com".into());
        c.admin.address = "0.0.0.0:15000".parse().unwrap();
        c.proxy.mark = 0;
        let ConfigError::Invalid { errors } = c.validate().unwrap_err() else { panic!() };
        assert_eq!(errors.len(), 6, "{errors:#?}");
    }

    #[test]
    fn otlp_export_is_checked_with_the_rest() {
        let text = "[telemetry.otlp]\nendpoint = \"collector:4318\"\nprotocol = \"grpc\"\nsample_ratio = 1.5\n\
                    [telemetry.otlp.headers]\nauthorization = \"Bearer otlp-secret\"\n";
        let c = Config::from_toml(text, Path::new("x")).unwrap();
        let ConfigError::Invalid { errors } = c.validate().unwrap_err() else { panic!() };
        assert_eq!(errors.len(), 2, "{errors:#?}");
        assert!(errors.iter().any(|e| e.starts_with("telemetry.otlp.endpoint")), "{errors:#?}");
        assert!(errors.iter().any(|e| e.starts_with("telemetry.otlp.sample_ratio")), "{errors:#?}");
        // The effective config, as logged at start, names the header but not its value.
        let logged = serde_json::to_string(&c).unwrap();
        assert!(logged.contains("authorization") && !logged.contains("otlp-secret"), "{logged}");
        let bad = Config::from_toml("[telemetry.otlp]\nprotocol = \"udp\"\n", Path::new("x"));
        assert!(bad.is_err());
        let on = "[telemetry.otlp]\nendpoint = \"https://collector.example:4317\"\nprotocol = \"grpc\"\nlogs = true\n";
        let c = Config::from_toml(on, Path::new("x")).unwrap();
        c.validate().unwrap();
        assert!(c.telemetry.otlp.enabled());
    }

    #[test]
    fn the_admin_api_must_listen_on_loopback() {
        for ok in ["127.0.0.1:15000", "[::1]:15000", "127.0.0.9:9"] {
            let mut c = Config::default();
            c.admin.address = ok.parse().unwrap();
            c.validate().unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in ["0.0.0.0:15000", "[::]:15000", "10.0.0.5:15000", "[2001:db8::1]:15000"] {
            let mut c = Config::default();
            c.admin.address = bad.parse().unwrap();
            let ConfigError::Invalid { errors } = c.validate().unwrap_err() else { panic!() };
            assert_eq!(errors.len(), 1, "{errors:?}");
            assert!(
                errors[0].starts_with("admin.address:") && errors[0].contains("not a loopback address"),
                "{errors:?}"
            );
        }
    }

    #[test]
    fn limits_are_validated() {
        let mut c = Config::default();
        c.proxy.max_header_bytes = 4096;
        c.proxy.header_read_timeout = Duration::ZERO;
        c.proxy.idle_timeout = Duration::ZERO;
        c.guardrails.max_decompression_ratio = 0;
        let ConfigError::Invalid { errors } = c.validate().unwrap_err() else { panic!() };
        assert_eq!(errors.len(), 4, "{errors:#?}");
        let c = Config::from_toml("[guardrails]\noversize = \"pass\"\n", Path::new("x")).unwrap();
        assert_eq!(c.guardrails.oversize, OversizeAction::Pass);
        assert!(Config::from_toml("[guardrails]\noversize = \"maybe\"\n", Path::new("x")).is_err());
    }

    #[test]
    fn cidrs_accept_plain_addresses() {
        assert_eq!(parse_cidr("198.18.0.10").unwrap().to_string(), "198.18.0.10/32");
        assert_eq!(parse_cidr("2001:db8::1").unwrap().to_string(), "2001:db8::1/128");
        assert_eq!(parse_cidr("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
    }

    #[test]
    fn empty_ipv6_address_disables_it() {
        let c = Config::from_toml("[proxy]\naddress_v6 = \"\"\n", Path::new("x")).unwrap();
        assert_eq!(c.proxy.address_v6, None);
    }

    #[test]
    fn app_name_templates_are_checked_and_app_name_from_the_environment_is_literal() {
        let file = "[guardrails]\nbackends = [\"akto\"]\n[guardrails.akto]\nurl = \"http://akto:9090\"\n";
        let c =
            Config::from_toml(&format!("{file}app_name = \"{{namespace|host}}/{{pod_label:app}}\"\n"), Path::new("x"))
                .unwrap();
        c.validate().unwrap();
        let c = Config::from_toml(&format!("{file}app_name = \"{{team}}-{{namespace\"\n"), Path::new("x")).unwrap();
        let ConfigError::Invalid { errors } = c.validate().unwrap_err() else { panic!() };
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].starts_with("guardrails.akto:") && errors[0].contains("unknown placeholder `{team}`"),
            "{errors:?}"
        );
        // APP_NAME: the same text is a literal name.
        let mut c = c;
        c.apply(&Overrides { app_name: Some("{team}-{namespace".into()), ..Default::default() });
        c.validate().unwrap();
        let name = crate::app_name::AppName::parse(&c.guardrails.akto.app_name).unwrap();
        assert!(name.is_literal());
        assert_eq!(name.render(None), "{team}-{namespace");
    }

    #[test]
    fn node_name_comes_from_the_environment() {
        let mut c = Config::from_toml("[kubernetes]\nenabled = \"on\"\n", Path::new("x")).unwrap();
        let ConfigError::Invalid { errors } = c.validate().unwrap_err() else { panic!() };
        assert!(errors[0].starts_with("kubernetes.node_name:"), "{errors:?}");
        c.apply(&Overrides { node_name: Some("node-a".into()), ..Default::default() });
        c.validate().unwrap();
        assert_eq!(c.kubernetes.node_name, "node-a");
    }

    #[test]
    fn worker_threads_are_bounded_and_overridable() {
        let mut c = Config::from_toml("[proxy]\nworker_threads = 2\n", Path::new("x")).unwrap();
        assert_eq!(c.proxy.worker_threads, 2);
        c.apply(&Overrides { worker_threads: Some(1), ..Default::default() });
        assert_eq!(c.proxy.worker_threads, 1);
        c.validate().unwrap();
        c.proxy.worker_threads = MAX_WORKER_THREADS + 1;
        let ConfigError::Invalid { errors } = c.validate().unwrap_err() else { panic!() };
        assert!(errors.iter().any(|e| e.starts_with("proxy.worker_threads:")), "{errors:?}");
    }

    #[test]
    fn overrides_win_over_file() {
        let mut c = Config::default();
        c.apply(&Overrides { redirect: Some(RedirectMode::Iptables), port: Some(9), ..Default::default() });
        assert_eq!(c.redirect.mode, RedirectMode::Iptables);
        assert_eq!(c.proxy.port, 9);
    }

    fn addon_env(mode: &str, threshold: &str, log: &str) -> Overrides {
        let some = |v: &str| Some(v.to_owned());
        let akto_addon =
            akto::AddonEnv { guardrails_mode: some(mode), text_threshold: some(threshold), log_payloads: some(log) };
        Overrides { akto_addon, ..Default::default() }
    }

    #[test]
    fn the_akto_addons_variables_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[guardrails]\nstream_mode = \"monitor\"\nstream_window = 900\nstream_overlap = 50\n")
            .unwrap();
        let c = Config::load(Some(&path), &addon_env("sync", "1200", "TRUE")).unwrap();
        assert_eq!(c.guardrails.stream_mode, StreamMode::Enforce);
        assert_eq!((c.guardrails.stream_window, c.guardrails.stream_overlap), (1200, 50));
        assert!(c.guardrails.akto.log_payloads);
        let c = Config::load(Some(&path), &addon_env("async", "", "false")).unwrap();
        assert_eq!(c.guardrails.stream_mode, StreamMode::Monitor);
        assert_eq!(c.guardrails.stream_window, 900);
        assert!(!c.guardrails.akto.log_payloads);
        // A threshold the default overlap does not fit in.
        let c = Config::load(None, &addon_env("", "60", "")).unwrap();
        assert_eq!((c.guardrails.stream_window, c.guardrails.stream_overlap), (60, 10));
    }

    #[test]
    fn invalid_akto_addon_variables_are_reported_with_the_files_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[redirect]\nports = [0]\n").unwrap();
        let ConfigError::Invalid { errors } = Config::load(Some(&path), &addon_env("blocking", "x", "1")).unwrap_err()
        else {
            panic!("must be invalid")
        };
        for needle in ["AKTO_GUARDRAILS_MODE", "AKTO_TEXT_THRESHOLD", "AKTO_LOG_PAYLOADS", "redirect.ports"] {
            assert!(errors.iter().any(|e| e.contains(needle)), "{needle} missing: {errors:#?}");
        }
        assert!(Config::load(None, &addon_env("sync", "0", "")).is_err());
    }
}
