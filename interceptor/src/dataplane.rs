//! Building the data plane from the configuration: the CA and TLS
//! termination, the guardrails with their audit log, the proxy's settings
//! (timeouts, limits, the inspection budget) and metrics, then the proxy
//! serving on the listeners it is given.
//!
//! `app` builds the running interceptor's data plane here; the in-process
//! tests and the benchmark build theirs the same way, with a mock resolver
//! and loopback listeners, so what they exercise is what runs.
//!
//! This module names the data plane's concrete types and nothing of the
//! control plane: it never installs a redirect, resolves targets or watches
//! the config file. The original-destination resolver, the listeners and the
//! snapshot come from the caller; the guardrails it builds are replaced on
//! reload by the control plane through [`GuardrailsHandle`].

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::Context as _;
use tokio::sync::watch;

use crate::{
    audit::AuditLog,
    ca::{CertificateAuthority, LeafIssuer, LeafSettings, NameConstraintsSpec},
    config::{Backend, BufferedTotal, Config, StreamMode},
    error,
    guardrails::{
        akto::AktoClient,
        budgets::{self, Budgets},
        engine::{Engine, Policy},
        keys::{self, Broker},
        pipeline::{Guardrails, Pipeline, mcp::McpState},
    },
    metrics::{Metrics, SignalLabels},
    net::OrigDstResolver,
    observe::LiveEvents,
    proxy::{
        Listeners, Proxy, ProxySettings, Snapshot, budget,
        hook::Hook,
        tls::TlsTermination,
        upstream::{UpstreamPool, client_tls_config},
    },
    telemetry::otlp::{Otlp, OtlpCounters, Signal},
    workload::PodLookup,
};

/// Assembles a data plane from a [`Config`]. Everything not set explicitly
/// comes from the configuration; the guardrails run only once
/// [`DataPlaneBuilder::configured_guardrails`] (or, in tests,
/// [`DataPlaneBuilder::hook`]) says which.
pub struct DataPlaneBuilder<'a> {
    config: &'a Config,
    tls: Option<Arc<TlsTermination>>,
    metrics: Arc<Metrics>,
    settings: Option<ProxySettings>,
    hook: Option<Arc<dyn Hook>>,
    pods: Option<Arc<dyn PodLookup>>,
    state_dir: Option<PathBuf>,
    live: Option<LiveEvents>,
}

/// The running guardrails' settings, which the control plane replaces on
/// reload (the hook reads the latest at each exchange).
pub struct GuardrailsHandle {
    pub current: watch::Sender<Arc<Guardrails>>,
    /// The policy file's text as last loaded, to notice changes.
    pub policy_text: Option<String>,
    /// The brokering file, when `keys.enabled`.
    pub keys_file: Option<PathBuf>,
    /// Its SHA-256 as last loaded (its text holds real keys and is not
    /// kept), to notice changes.
    pub keys_digest: Option<[u8; 32]>,
    /// The budgets and their counters, when `budgets.limits` has any (the
    /// control plane replaces their rules on reload and saves the counters
    /// at shutdown).
    pub budgets: Option<Arc<Budgets>>,
}

impl GuardrailsHandle {
    /// Reloads the brokering file when its content changed. An invalid
    /// file (or one others can read) is rejected with a log line and the
    /// running keys stay; a removed file brokers nothing.
    pub fn reload_keys_if_changed(&mut self, prefix: &str) {
        let Some(path) = self.keys_file.clone() else {
            return;
        };
        let digest = match keys::file_digest(&path) {
            Ok(d) => d,
            Err(error) => {
                if self.keys_digest.take().is_some() {
                    tracing::error!(error = %error::chain(&error), "cannot read the brokering file; keeping the running keys");
                }
                return;
            }
        };
        if digest.is_some() && digest == self.keys_digest {
            return;
        }
        if digest.is_none() && self.keys_digest.is_none() {
            return;
        }
        self.keys_digest = digest;
        let current = self.current.borrow().clone();
        match Broker::load(&path, prefix) {
            Ok(broker) => {
                let placeholders = broker.placeholders().count();
                let _ = self.current.send(Arc::new(Guardrails {
                    engine: current.engine.clone(),
                    akto: current.akto.clone(),
                    cfg: current.cfg.clone(),
                    keys: Some(Arc::new(broker)),
                }));
                tracing::info!(path = %path.display(), placeholders, "brokering file reloaded");
            }
            Err(error) => tracing::error!(
                error = %error::chain(&error),
                "brokering file rejected; keeping the running keys"
            ),
        }
    }
}

/// The brokering file in force: `None` when `keys.enabled` is off.
fn keys_file(config: &Config, state_dir: Option<&Path>) -> anyhow::Result<Option<PathBuf>> {
    if !config.keys.enabled {
        return Ok(None);
    }
    match state_dir {
        Some(dir) => Ok(Some(config.keys.file_in(dir))),
        None if !config.keys.file.as_os_str().is_empty() => Ok(Some(config.keys.file.clone())),
        None => anyhow::bail!("keys.file: give the brokering file (there is no state directory here)"),
    }
}

impl<'a> DataPlaneBuilder<'a> {
    /// No TLS termination (every connection passes through), no guardrails,
    /// fresh metrics, settings from `config`.
    pub fn new(config: &'a Config) -> Self {
        Self {
            config,
            tls: None,
            metrics: Arc::new(Metrics::new()),
            settings: None,
            hook: None,
            pods: None,
            state_dir: None,
            live: None,
        }
    }

    /// Offers every audit event to `live`'s watchers (the admin API's
    /// `/events`).
    pub fn live(mut self, live: LiveEvents) -> Self {
        self.live = Some(live);
        self
    }

    /// The state directory, where MCP tool pins are kept (unless
    /// `mcp.pins_file` says otherwise); without it they live in memory.
    pub fn state_dir(mut self, dir: &Path) -> Self {
        self.state_dir = Some(dir.to_owned());
        self
    }

    /// TLS termination for AI domains, as [`tls_termination`] builds it;
    /// `None` passes every connection through.
    pub fn tls(mut self, tls: Option<Arc<TlsTermination>>) -> Self {
        self.tls = tls;
        self
    }

    /// The metrics the data plane counts into (shared with the admin API).
    pub fn metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Settings other than those the configuration gives (tests).
    pub fn settings(mut self, settings: ProxySettings) -> Self {
        self.settings = Some(settings);
        self
    }

    /// Runs `hook` on intercepted exchanges instead of the configured
    /// guardrails (tests).
    pub fn hook(mut self, hook: Option<Arc<dyn Hook>>) -> Self {
        self.hook = hook;
        self
    }

    /// Names each connection's pod from its cgroup path with `pods` (the
    /// Kubernetes pod directory); `None`: no pod names.
    pub fn pods(mut self, pods: Option<Arc<dyn PodLookup>>) -> Self {
        self.pods = pods;
        self
    }

    /// Runs the guardrails the configuration describes (see [`guardrails`]).
    /// Returns the handle reloads replace them through.
    pub fn configured_guardrails(&mut self) -> anyhow::Result<GuardrailsHandle> {
        let state_dir = self.state_dir.as_deref();
        let (hook, handle) = guardrails_with_state(self.config, &self.metrics, state_dir, self.live.clone())?;
        self.hook = hook;
        Ok(handle)
    }

    /// Starts accepting on `listeners` until `shutdown` turns true, with a
    /// worker per listener set (see [`Proxy::serve`]). Each connection's
    /// original destination and workload come from `resolver`, the domain
    /// policy and targets from `snapshot`. Fails when a worker's thread or
    /// runtime cannot start.
    pub fn serve(
        self,
        listeners: Listeners,
        resolver: Arc<dyn OrigDstResolver>,
        snapshot: watch::Receiver<Arc<Snapshot>>,
        shutdown: watch::Receiver<bool>,
    ) -> std::io::Result<Proxy> {
        let settings = match self.settings {
            Some(settings) => settings,
            None => ProxySettings::from_config(self.config, max_buffered_total(self.config)),
        };
        let plane = crate::proxy::DataPlane {
            resolver,
            settings,
            snapshot,
            tls: self.tls,
            hook: self.hook,
            metrics: self.metrics,
            pods: self.pods,
            live: self.live,
        };
        Proxy::serve(listeners, plane, shutdown)
    }
}

/// The guardrails `[guardrails]` describes (local engine, Akto client) and,
/// when `guardrails.enabled`, the hook that runs them with their audit log.
/// They are built even when disabled, so that a bad policy fails the start
/// either way.
pub fn guardrails(
    config: &Config,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<(Option<Arc<dyn Hook>>, GuardrailsHandle)> {
    guardrails_with_state(config, metrics, None, None)
}

/// [`guardrails`], with the MCP tool pins persisted under `state_dir` (or
/// in `mcp.pins_file`).
pub fn guardrails_with_state(
    config: &Config,
    metrics: &Arc<Metrics>,
    state_dir: Option<&Path>,
    live: Option<LiveEvents>,
) -> anyhow::Result<(Option<Arc<dyn Hook>>, GuardrailsHandle)> {
    let (policy_text, mut guardrails) = build_guardrails(config)?;
    let keys = keys_file(config, state_dir)?;
    if let Some(path) = &keys {
        let broker = Broker::load(path, &config.keys.placeholder_prefix)
            .with_context(|| format!("loading the brokering file {}", path.display()))?;
        tracing::info!(
            path = %path.display(),
            placeholders = broker.placeholders().count(),
            real_keys = broker.real_scopes().count(),
            "key brokering on"
        );
        guardrails.keys = Some(Arc::new(broker));
    }
    let keys_digest = match &keys {
        Some(path) => keys::file_digest(path)?,
        None => None,
    };
    let budgets = budgets(config, metrics, state_dir)?;
    let (current, rx) = watch::channel(Arc::new(guardrails));
    let g = &config.guardrails;
    let hook: Option<Arc<dyn Hook>> = if g.enabled {
        let audit_file = Some(g.audit_file.clone()).filter(|p| !p.as_os_str().is_empty());
        let otlp = otlp(config, metrics)?;
        let audit_otlp = otlp.clone().filter(|o| o.logs());
        let audit = AuditLog::start_live(audit_file, Arc::clone(metrics), live).with_otlp(audit_otlp);
        let mcp = McpState::open(&config.mcp, state_dir).context("loading the MCP tool pins")?;
        let pipeline =
            Pipeline::new(rx, audit, Arc::clone(metrics)).with_mcp(Arc::new(mcp)).with_budgets(budgets.clone());
        Some(Arc::new(pipeline.with_otlp(otlp.filter(|o| o.traces()))))
    } else {
        None
    };
    Ok((hook, GuardrailsHandle { current, policy_text, keys_file: keys, keys_digest, budgets }))
}

/// The budgets `[budgets]` describes, their counters restored from the
/// state file and saved to it every `budgets.save_interval`; `None` when
/// there are none. The counters are not saved without a state directory
/// (nor `budgets.state_file`).
fn budgets(config: &Config, metrics: &Arc<Metrics>, state_dir: Option<&Path>) -> anyhow::Result<Option<Arc<Budgets>>> {
    let cfg = &config.budgets;
    if cfg.limits.is_empty() {
        return Ok(None);
    }
    let rules = budget_rules(config)?;
    let state_file = match state_dir {
        Some(dir) => Some(cfg.state_file_in(dir)),
        None => Some(cfg.state_file.clone()).filter(|p| !p.as_os_str().is_empty()),
    };
    let budgets = Budgets::new(cfg, rules, state_file, Arc::clone(metrics))
        .map_err(|e| anyhow::anyhow!("budgets.redis_url: {}", error::chain(&e)))?;
    let budgets = Arc::new(budgets);
    budgets.start_saver(cfg.save_interval);
    tracing::info!(
        limits = cfg.limits.len(),
        state_file = ?budgets.state_file(),
        shared = !cfg.redis_url.is_empty(),
        redis_fail = ?cfg.redis_fail,
        "budgets on"
    );
    Ok(Some(budgets))
}

/// The budgets of `config` compiled, or every problem with their scopes.
pub fn budget_rules(config: &Config) -> anyhow::Result<budgets::Rules> {
    budgets::Rules::compile(&config.budgets)
        .map_err(|errors| anyhow::anyhow!("invalid budgets:\n  - {}", errors.join("\n  - ")))
}

/// The OpenTelemetry export `[telemetry.otlp]` asks for, counting what it
/// drops in the metrics; `None` when it is off. Spans and audit log
/// records are made by the guardrail pipeline.
fn otlp(config: &Config, metrics: &Metrics) -> anyhow::Result<Option<Arc<Otlp>>> {
    type Counters =
        prometheus_client::metrics::family::Family<SignalLabels, prometheus_client::metrics::counter::Counter>;
    let signal =
        |family: &Counters, signal: Signal| family.get_or_create(&SignalLabels { signal: signal.as_str() }).clone();
    let counters = OtlpCounters {
        spans_dropped: signal(&metrics.otlp_dropped, Signal::Traces),
        logs_dropped: signal(&metrics.otlp_dropped, Signal::Logs),
        span_export_failures: signal(&metrics.otlp_export_failures, Signal::Traces),
        log_export_failures: signal(&metrics.otlp_export_failures, Signal::Logs),
    };
    Ok(Otlp::start(&config.telemetry.otlp, counters)?)
}

/// `guardrails.max_buffered_total` in bytes, sized from the memory limit
/// when `auto`.
fn max_buffered_total(config: &Config) -> usize {
    match config.guardrails.max_buffered_total {
        BufferedTotal::Bytes(n) => n,
        BufferedTotal::Auto => {
            let (limit, source) = budget::memory_limit();
            let size = budget::auto_size(limit, config.proxy.max_inspected_body);
            tracing::info!(
                max_buffered_total = size,
                memory_limit = limit,
                source = ?source,
                "inspection budget sized from the memory limit"
            );
            size
        }
    }
}

/// The CA the configuration names: the cluster CA in `tls.ca_dir` (loaded,
/// never created), else the per-node CA in `state_dir` (created on first
/// start, with name constraints when `tls.node_ca_name_constraints` is set).
/// Warns about AI domains the CA's name constraints leave out: their
/// connections cannot be intercepted until the CA is rolled over.
pub fn certificate_authority(config: &Config, state_dir: &Path) -> anyhow::Result<CertificateAuthority> {
    let policy = config.domain_policy().context("compiling the domain policy")?;
    let bases = policy.name_constraint_bases();
    let ca = if config.tls.ca_dir.as_os_str().is_empty() {
        let spec = if config.tls.node_ca_name_constraints {
            Some(NameConstraintsSpec::new(bases.clone()).map_err(|reason| {
                anyhow::anyhow!("tls.node_ca_name_constraints: cannot derive name constraints: {reason}")
            })?)
        } else {
            None
        };
        CertificateAuthority::load_or_create_with(state_dir, spec.as_ref()).with_context(|| {
            format!(
                "loading the certificate authority in the state directory {} (it must be writable on first start)",
                state_dir.display()
            )
        })?
    } else {
        CertificateAuthority::load_dir(&config.tls.ca_dir).with_context(|| {
            format!("loading the cluster certificate authority (tls.ca_dir = {})", config.tls.ca_dir.display())
        })?
    };
    let constraints = ca.constraints();
    let uncovered: Vec<&String> = bases.iter().filter(|b| !constraints.permits_dns(b)).collect();
    if !uncovered.is_empty() {
        tracing::warn!(
            domains = ?uncovered,
            permitted = ?constraints.permitted_dns(),
            "the certificate authority's name constraints leave out these AI domains: their connections fail at the \
             TLS handshake until the CA is rolled over to one that permits them (see README, rolling the CA)"
        );
    }
    Ok(ca)
}

/// TLS termination with `ca`: the leaf issuer (`tls.leaf_validity`) and the
/// upstream pool (`tls.upstream_ca`, `proxy.mark`, `proxy.connect_timeout`,
/// `proxy.upstream_idle_timeout`).
pub fn tls_termination(config: &Config, ca: CertificateAuthority) -> anyhow::Result<TlsTermination> {
    tracing::info!(
        cert = %ca.cert_path().display(),
        subject = %ca.subject(),
        name_constraints = ?ca.constraints().permitted_dns(),
        "certificate authority ready"
    );
    let issuer =
        LeafIssuer::new(Arc::new(ca), LeafSettings { validity: config.tls.leaf_validity, ..LeafSettings::default() })
            .context("preparing certificate issuance")?;
    let upstream_ca = Some(config.tls.upstream_ca.as_path()).filter(|p| !p.as_os_str().is_empty());
    let client_tls = client_tls_config(upstream_ca).context("preparing upstream TLS")?;
    let pool = UpstreamPool::new(
        client_tls,
        config.proxy.mark,
        config.proxy.connect_timeout,
        config.proxy.upstream_idle_timeout,
    );
    Ok(TlsTermination::new(Arc::new(issuer), pool))
}

/// The local engine (policy file or built-in policy) and the Akto client,
/// per the configuration. Returns the policy file's text for change
/// detection.
pub fn build_guardrails(config: &Config) -> anyhow::Result<(Option<String>, Guardrails)> {
    let g = &config.guardrails;
    let mut policy_text = None;
    let engine = if g.backends.contains(&Backend::Local) {
        let policy = if g.policy_file.as_os_str().is_empty() {
            Policy::builtin()?
        } else {
            let text = std::fs::read_to_string(&g.policy_file)
                .with_context(|| format!("reading the policy file {}", g.policy_file.display()))?;
            let policy = Policy::from_toml(&text, &g.policy_file.display().to_string())?;
            policy_text = Some(text);
            policy
        };
        let engine = Engine::new(&policy)?;
        if g.stream_mode == StreamMode::Enforce {
            // Here rather than on the first stream, which would wait for it.
            engine.prepare_streams();
        }
        Some(Arc::new(engine))
    } else {
        None
    };
    let akto = if g.backends.contains(&Backend::Akto) {
        let akto = AktoClient::new(g.akto.clone()).context("preparing the Akto backend")?;
        akto.log_settings(g);
        Some(Arc::new(akto))
    } else {
        None
    };
    Ok((policy_text, Guardrails { engine, akto, cfg: g.clone(), keys: None }))
}
