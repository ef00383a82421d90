//! The proxy in this process, on loopback, for end-to-end tests without
//! privileges: a mock original-destination resolver sends every connection
//! to a fake provider, our CA lives in a temporary directory, and upstream
//! TLS trusts the fake provider's test CA.

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use anyhow::Result;
use interceptor::{
    config::{Backend, Config, GuardrailsConfig},
    dataplane::{self, DataPlaneBuilder},
    net::MockOrigDst,
    policy::DomainsConfig,
    proxy::{Listeners, Proxy, ProxySettings, Snapshot, hook::Hook},
    workload::Workload,
};
use tokio::sync::watch;

pub struct InProcessProxy {
    pub addr: SocketAddr,
    pub ca_pem: String,
    pub ca_path: std::path::PathBuf,
    /// What the data plane counts (and, configured, its guardrails).
    pub metrics: Arc<interceptor::metrics::Metrics>,
    stop: watch::Sender<bool>,
    snapshot: watch::Sender<Arc<Snapshot>>,
    proxy: Option<Proxy>,
    _dir: tempfile::TempDir,
}

impl InProcessProxy {
    /// Starts the proxy; every connection's original destination is `upstream`.
    pub async fn start(
        upstream: SocketAddr,
        upstream_ca: &Path,
        domains: DomainsConfig,
        hook: Option<Arc<dyn Hook>>,
    ) -> Result<Self> {
        let settings = ProxySettings { client_hello_timeout: Duration::from_secs(2), ..ProxySettings::default() };
        Self::start_with(upstream, upstream_ca, domains, hook, settings).await
    }

    /// Like [`InProcessProxy::start`] with explicit data-plane settings.
    pub async fn start_with(
        upstream: SocketAddr,
        upstream_ca: &Path,
        domains: DomainsConfig,
        hook: Option<Arc<dyn Hook>>,
        settings: ProxySettings,
    ) -> Result<Self> {
        Self::start_inner(upstream, upstream_ca, domains, hook, settings, None, None).await
    }

    /// Like [`InProcessProxy::start_with`], every connection attributed to
    /// `workload` (as a redirect that knows the process would).
    pub async fn start_as(
        upstream: SocketAddr,
        upstream_ca: &Path,
        settings: ProxySettings,
        workload: Option<Workload>,
    ) -> Result<Self> {
        Self::start_inner(upstream, upstream_ca, DomainsConfig::default(), None, settings, None, workload).await
    }

    /// Like [`InProcessProxy::start_with`], every connection attributed to
    /// `workload`.
    pub async fn start_hooked_as(
        upstream: SocketAddr,
        upstream_ca: &Path,
        hook: Option<Arc<dyn Hook>>,
        settings: ProxySettings,
        workload: Option<Workload>,
    ) -> Result<Self> {
        Self::start_inner(upstream, upstream_ca, DomainsConfig::default(), hook, settings, None, workload).await
    }

    /// Like [`InProcessProxy::start`], giving up on an upstream that sends
    /// nothing for `upstream_idle` (`proxy.upstream_idle_timeout`).
    pub async fn start_with_upstream_idle(
        upstream: SocketAddr,
        upstream_ca: &Path,
        hook: Option<Arc<dyn Hook>>,
        upstream_idle: Duration,
    ) -> Result<Self> {
        let settings = ProxySettings { client_hello_timeout: Duration::from_secs(2), ..ProxySettings::default() };
        Self::start_inner(upstream, upstream_ca, DomainsConfig::default(), hook, settings, Some(upstream_idle), None)
            .await
    }

    /// The data plane `app` runs for `config` (settings, inspection budget,
    /// guardrails and audit), on loopback: every connection's original
    /// destination is `upstream`, upstream TLS trusts `upstream_ca`, and
    /// upstream sockets are not marked.
    pub async fn from_config(upstream: SocketAddr, upstream_ca: &Path, mut config: Config) -> Result<Self> {
        config.tls.upstream_ca = upstream_ca.to_path_buf();
        config.proxy.mark = 0;
        Self::launch(upstream, config, Launch::Configured).await
    }

    async fn start_inner(
        upstream: SocketAddr,
        upstream_ca: &Path,
        domains: DomainsConfig,
        hook: Option<Arc<dyn Hook>>,
        settings: ProxySettings,
        upstream_idle: Option<Duration>,
        workload: Option<Workload>,
    ) -> Result<Self> {
        let mut config = Config { domains, ..Config::default() };
        config.tls.upstream_ca = upstream_ca.to_path_buf();
        config.proxy.mark = 0;
        // Intercepted connections' upstreams are given 5 s to connect;
        // passthrough keeps `settings.connect_timeout`.
        config.proxy.connect_timeout = Duration::from_secs(5);
        if let Some(idle) = upstream_idle {
            config.proxy.upstream_idle_timeout = idle;
        }
        Self::launch(upstream, config, Launch::Given { hook, settings: Box::new(settings), workload }).await
    }

    async fn launch(upstream: SocketAddr, config: Config, launch: Launch) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let ca = dataplane::certificate_authority(&config, dir.path())?;
        let ca_pem = ca.cert_pem().to_string();
        let ca_path = ca.cert_path().to_path_buf();
        let tls = if config.tls.intercept { Some(Arc::new(dataplane::tls_termination(&config, ca)?)) } else { None };
        let (snap_tx, snapshot) = watch::channel(Arc::new(Snapshot::new(config.domain_policy()?)));
        let metrics = Arc::new(interceptor::metrics::Metrics::new());
        let mut builder = DataPlaneBuilder::new(&config).tls(tls).metrics(Arc::clone(&metrics));
        let workload = match launch {
            Launch::Configured => {
                // The receiver keeps the last value after the handle is gone:
                // nothing reloads these guardrails.
                builder.configured_guardrails()?;
                None
            }
            Launch::Given { hook, settings, workload } => {
                builder = builder.hook(hook).settings(*settings);
                workload
            }
        };
        let resolver = Arc::new(MockOrigDst { dst: Default::default(), default: Some(upstream), workload });
        let listeners = Listeners::bind(std::net::Ipv4Addr::LOCALHOST, None, 0, 0).await?;
        let addr = SocketAddr::V4(listeners.addrs.v4);
        let (stop, shutdown) = watch::channel(false);
        let proxy = builder.serve(listeners, resolver, snapshot, shutdown)?;
        Ok(Self { addr, ca_pem, ca_path, metrics, stop, snapshot: snap_tx, proxy: Some(proxy), _dir: dir })
    }

    /// Makes the data plane see `ip` as an AI address, known by `names`
    /// (learned or resolved) or, with none, as a configured CIDR target.
    pub fn set_ai_address(&self, ip: std::net::IpAddr, names: &[&str]) {
        let mut targets = interceptor::targets::TargetSet::default();
        targets.nets.insert(ip.into());
        if names.is_empty() {
            targets.cidrs.insert(ip.into());
        } else {
            targets.sources.insert(ip, names.iter().map(|n| n.to_string()).collect());
        }
        let targets = Arc::new(targets);
        self.snapshot.send_modify(|s| Arc::make_mut(s).targets = targets);
    }

    /// Makes the data plane see `addr` as a plain-HTTP MCP target named
    /// `name` (as the control plane does for `mcp.plain`).
    pub fn set_plain_target(&self, addr: SocketAddr, name: &str) {
        let plain = Arc::new(interceptor::proxy::plain::PlainTargets::new([(addr, name.to_string())]));
        self.snapshot.send_modify(|s| Arc::make_mut(s).plain = plain);
    }

    /// Stops accepting and waits for connections to finish.
    pub async fn shutdown(mut self, deadline: Duration) -> bool {
        self.drain(deadline).await
    }

    /// Stops accepting; true when every connection finished within `deadline`.
    pub async fn drain(&mut self, deadline: Duration) -> bool {
        let _ = self.stop.send(true);
        match self.proxy.take() {
            Some(p) => p.drain(deadline).await,
            None => true,
        }
    }
}

/// A reqwest client that reaches `host` at `addr` (SNI and Host stay
/// `host`), trusting only the given PEM certificates.
pub fn client_for(host: &str, addr: SocketAddr, trusted_pem: &[&str], http2_only: bool) -> Result<reqwest::Client> {
    let mut certs = Vec::new();
    for pem in trusted_pem {
        certs.extend(reqwest::Certificate::from_pem_bundle(pem.as_bytes())?);
    }
    let mut builder = reqwest::Client::builder()
        .tls_certs_only(certs)
        .resolve(host, addr)
        .no_proxy()
        .timeout(Duration::from_secs(20));
    if http2_only {
        builder = builder.http2_prior_knowledge();
    } else {
        builder = builder.http1_only();
    }
    Ok(builder.build()?)
}

/// A guardrail pipeline with the built-in local policy and `cfg`'s other
/// settings, auditing to `audit` (the log only when `None`).
pub fn local_pipeline(cfg: GuardrailsConfig, audit: Option<std::path::PathBuf>) -> Result<Arc<dyn Hook>> {
    let guardrails = GuardrailsConfig {
        enabled: true,
        backends: vec![Backend::Local],
        policy_file: Default::default(),
        audit_file: audit.unwrap_or_default(),
        ..cfg
    };
    let config = Config { guardrails, ..Config::default() };
    let metrics = Arc::new(interceptor::metrics::Metrics::new());
    // The pipeline keeps the last settings after the handle is gone.
    let (hook, _handle) = dataplane::guardrails(&config, &metrics)?;
    hook.ok_or_else(|| anyhow::anyhow!("guardrails enabled but no hook"))
}

/// How [`InProcessProxy::launch`] gets its guardrails and settings.
enum Launch {
    /// From the configuration, as `app` does.
    Configured,
    /// As the test gives them.
    Given { hook: Option<Arc<dyn Hook>>, settings: Box<ProxySettings>, workload: Option<Workload> },
}

/// A fake provider behind an in-process proxy running the local guardrails,
/// which write their audit events to `audit`.
pub struct GuardedProxy {
    pub provider: interceptor::testing::provider::FakeProvider,
    pub proxy: InProcessProxy,
    pub audit: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl GuardedProxy {
    pub async fn start(cfg: GuardrailsConfig, settings: ProxySettings) -> Result<Self> {
        let pki = interceptor::testing::provider::TestPki::with_defaults()?;
        let provider =
            interceptor::testing::provider::FakeProvider::start(std::net::TcpListener::bind("127.0.0.1:0")?, &pki)?;
        let dir = tempfile::tempdir()?;
        let upstream_ca = pki.write_ca(dir.path())?;
        let audit = dir.path().join("audit.jsonl");
        let hook = local_pipeline(cfg, Some(audit.clone()))?;
        let proxy = InProcessProxy::start_with(
            provider.local_addr(),
            &upstream_ca,
            DomainsConfig::default(),
            Some(hook),
            settings,
        )
        .await?;
        Ok(Self { provider, proxy, audit, _dir: dir })
    }
}
