//! Wiring: the only place that names concrete types. Starts the data plane
//! (listeners, proxy), the control plane (redirector, target resolution,
//! config reload) and the admin API, and tears everything down in order on
//! SIGINT/SIGTERM: redirect removed first (new connections go direct), then
//! in-flight connections drained.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use tokio::{
    net::{TcpListener, UdpSocket},
    signal::unix::{SignalKind, signal},
    sync::watch,
};

use crate::{
    admin::{self, Status},
    audit::AuditLog,
    ca::{CertificateAuthority, LeafIssuer, LeafSettings, NameConstraintsSpec},
    config::Backend,
    config::{Config, Overrides, RedirectMode, TargetMode},
    dns::{self, AskedServer, DnsForwarder, DnsObserver, ForwarderConfig, Learned, Upstreams},
    error,
    guardrails::{
        akto::AktoClient,
        engine::{Engine, Policy},
        pipeline::{Guardrails, Pipeline},
    },
    metrics::Metrics,
    net::ClientAddr,
    net::OrigDstResolver,
    policy::DomainPolicy,
    proxy::hook::Hook,
    proxy::{
        DataPlane, Listeners, Proxy, ProxySettings, Snapshot,
        tls::TlsTermination,
        upstream::{UpstreamPool, client_tls_config},
    },
    redirect::{NoRedirect, Redirector, ebpf::EbpfRedirector, iptables::IptablesRedirector},
    targets::{TargetResolver, TargetSet},
};

/// How often the config file is checked for changes (SIGHUP reloads at once).
const CONFIG_POLL: Duration = Duration::from_secs(2);
/// How often kernel counters are refreshed for the status endpoint.
const STATUS_REFRESH: Duration = Duration::from_secs(5);
/// Upper bound on one round of target resolution, so signals are not held up.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(15);

pub struct RunOptions {
    pub config: Config,
    pub config_path: Option<PathBuf>,
    pub overrides: Overrides,
    pub state_dir: PathBuf,
}

pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    let RunOptions { config, config_path, overrides, state_dir } = opts;
    tracing::info!(config = %serde_json::to_string(&config).unwrap_or_default(), "starting interceptor");
    prepare_state_dir(&state_dir)?;
    // What can fail at start fails before anything is redirected: a proxy
    // that exits after installing the redirect would leave traffic to its
    // fail mode.
    let policy = DomainPolicy::compile(&config.domains).context("compiling the domain policy")?;
    let names = resolve_names(&policy, &config);
    let (snapshot_tx, snapshot_rx) = watch::channel(Arc::new(Snapshot::new(policy)));
    let snapshot_tx = Arc::new(snapshot_tx);
    let tls = if config.tls.intercept { Some(Arc::new(tls_termination(&config, &state_dir)?)) } else { None };

    let listeners =
        Listeners::bind(config.proxy.address_v4, config.proxy.address_v6, config.proxy.port, config.proxy.mark)
            .await
            .context("starting the proxy listener")?;
    let addrs = listeners.addrs;
    let admin_listener = admin::bind(config.admin.address)
        .await
        .with_context(|| format!("starting the admin API on {}", config.admin.address))?;

    // Without a resolver to forward to, redirecting DNS would black-hole it:
    // learn nothing rather than break name resolution, and say so. (By
    // default each query goes to the server its client asked, so this only
    // happens when every configured upstream is one of our own addresses.)
    let dns_upstreams = match config.targets.mode {
        TargetMode::Dns => match dns_upstreams(&config) {
            Ok(u) => Some(u),
            Err(error) => {
                tracing::error!(
                    error = format!("{error:#}"),
                    "DNS-aware targeting disabled: falling back to resolve mode"
                );
                None
            }
        },
        _ => None,
    };
    let dns_port = dns_upstreams.as_ref().map(|_| config.targets.dns_port);
    // The forwarder must listen before DNS is redirected to it.
    let dns_sockets = match dns_port {
        Some(port) => Some(bind_dns(&config, port).await?),
        None => None,
    };
    let redirector: Box<dyn Redirector> = match config.redirect.mode {
        RedirectMode::Ebpf => Box::new(
            EbpfRedirector::install(
                &config.redirect.cgroup,
                addrs,
                &config.redirect.ports,
                dns_port,
                config.redirect.fail_safe(),
            )
            .context("installing the eBPF redirect (run `interceptor doctor` to see what this host supports)")?,
        ),
        RedirectMode::Iptables => Box::new(
            IptablesRedirector::install(
                addrs,
                &config.redirect.ports,
                dns_port,
                config.redirect.fail_mode == crate::config::FailMode::Open,
            )
            .context("installing the iptables redirect (run `interceptor doctor`)")?,
        ),
        RedirectMode::None => Box::new(NoRedirect),
    };
    // Its own thread: a busy runtime must not miss a beat. Stopped (and
    // joined) when dropped, after the redirect is removed below, or on any
    // early return.
    let heartbeat = match redirector.liveness() {
        Some(liveness) => {
            Some(crate::redirect::liveness::BeatThread::start(liveness).context("starting the heartbeat thread")?)
        }
        None => None,
    };
    tracing::info!(
        mode = redirector.mode(),
        attach = %redirector.attach_point(),
        proxy_v4 = %addrs.v4,
        proxy_v6 = addrs.v6.map(|a| a.to_string()),
        "redirect installed"
    );
    // Listeners bound, redirect attached: keep only what running needs.
    match crate::privileges::drop_privileges(&crate::privileges::runtime_capabilities(config.redirect.mode)) {
        Ok(d) => {
            tracing::info!(kept = ?d.kept, bounding_reduced = d.bounding_reduced, threads = d.threads, "privileges dropped")
        }
        Err(error) => tracing::error!(error = %error::chain(&error), "cannot drop privileges; running with them"),
    }

    let (status_tx, status_rx) = watch::channel(Arc::new(Status {
        ready: false,
        redirect_mode: redirector.mode().into(),
        attach_point: redirector.attach_point(),
        proxy: Some(addrs),
        ..Default::default()
    }));
    let status_tx = Arc::new(status_tx);
    let metrics = Arc::new(Metrics::new());
    tokio::spawn(admin::serve(admin_listener, status_rx, Arc::clone(&metrics)));

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (shutdown_dns_tx, shutdown_rx_dns) = watch::channel(false);
    let settings = ProxySettings::from_config(&config, max_buffered_total(&config));
    let (policy_text, guardrails) = build_guardrails(&config).context("preparing the guardrails")?;
    let (guardrails_tx, guardrails_rx) = watch::channel(Arc::new(guardrails));
    let hook: Option<Arc<dyn Hook>> = if config.guardrails.enabled {
        let audit_file = Some(config.guardrails.audit_file.clone()).filter(|p| !p.as_os_str().is_empty());
        let audit = AuditLog::start(audit_file, Arc::clone(&metrics));
        Some(Arc::new(Pipeline::new(guardrails_rx, audit, Arc::clone(&metrics))))
    } else {
        None
    };
    let records = RedirectRecords(redirector.resolver());
    let plane = DataPlane {
        resolver: redirector.resolver(),
        settings,
        snapshot: snapshot_rx,
        tls,
        hook,
        metrics: Arc::clone(&metrics),
    };
    let proxy = Proxy::serve(listeners, plane, shutdown_rx);

    let drain_timeout = config.proxy.drain_timeout;
    let resolver = {
        let mut r = TargetResolver::new(names, config.cidrs(), config.targets.address_grace);
        r.set_all_tls(config.targets.mode == TargetMode::AllTls);
        r
    };
    let targeting = Arc::new(Mutex::new(Targeting {
        redirector,
        resolver,
        targets: TargetSet::default(),
        snapshot: Arc::clone(&snapshot_tx),
    }));
    let mut forwarders = Vec::new();
    if let (Some(sockets), Some(upstreams)) = (dns_sockets, dns_upstreams) {
        let learner = Arc::new(Learner {
            targeting: Arc::clone(&targeting),
            snapshot: snapshot_tx.subscribe(),
            status: Arc::clone(&status_tx),
            floor: config.targets.learned_ttl_floor,
            grace: config.targets.learned_grace,
        });
        tracing::info!(upstreams = ?upstreams, port = dns_port, "DNS forwarder listening");
        let cfg = ForwarderConfig { upstreams, mark: config.proxy.mark, ..ForwarderConfig::default() };
        let records: Arc<dyn AskedServer> = Arc::new(records);
        for (udp, tcp) in sockets {
            forwarders.push(DnsForwarder::serve(
                udp,
                tcp,
                cfg.clone(),
                learner.clone(),
                Arc::clone(&records),
                shutdown_rx_dns.clone(),
            ));
        }
    }
    let mut control = Control {
        targeting: Arc::clone(&targeting),
        snapshot: snapshot_tx,
        guardrails: guardrails_tx,
        policy_text,
        config,
        config_path,
        overrides,
        status: status_tx,
    };
    let result = control.run().await;

    // Redirect off first: from now on new connections go direct.
    {
        let mut t = targeting.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(error) = t.redirector.uninstall() {
            tracing::error!(error = %error::chain(&error), "cannot remove the redirect");
        }
    }
    drop(heartbeat);
    let _ = shutdown_tx.send(true);
    let _ = shutdown_dns_tx.send(true);
    for forwarder in forwarders {
        forwarder.abort();
    }
    if proxy.drain(drain_timeout).await {
        tracing::info!("all connections finished; stopped");
    } else {
        tracing::warn!(timeout = ?drain_timeout, "connections still open at the drain deadline; closing them");
    }
    result
}

/// `guardrails.max_buffered_total` in bytes, sized from the memory limit
/// when `auto`.
fn max_buffered_total(config: &Config) -> usize {
    use crate::{config::BufferedTotal, proxy::budget};
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
    let policy = DomainPolicy::compile(&config.domains).context("compiling the domain policy")?;
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

/// The CA, the leaf issuer and the upstream pool.
fn tls_termination(config: &Config, state_dir: &Path) -> anyhow::Result<TlsTermination> {
    let ca = certificate_authority(config, state_dir)?;
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
fn build_guardrails(config: &Config) -> anyhow::Result<(Option<String>, Guardrails)> {
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
        Some(Arc::new(Engine::new(&policy)?))
    } else {
        None
    };
    let akto = if g.backends.contains(&Backend::Akto) {
        Some(Arc::new(AktoClient::new(g.akto.clone()).context("preparing the Akto backend")?))
    } else {
        None
    };
    Ok((policy_text, Guardrails { engine, akto, cfg: g.clone() }))
}

/// Binds the DNS forwarder's UDP and TCP sockets on the proxy addresses.
async fn bind_dns(config: &Config, port: u16) -> anyhow::Result<Vec<(UdpSocket, TcpListener)>> {
    let mut addrs = vec![SocketAddr::from((config.proxy.address_v4, port))];
    if let Some(v6) = config.proxy.address_v6 {
        addrs.push(SocketAddr::from((v6, port)));
    }
    let mut out = Vec::new();
    for addr in addrs {
        // Shared with a second instance during an upgrade, like the proxy port.
        let udp = crate::net::shared_udp(addr).with_context(|| format!("starting the DNS forwarder on udp {addr}"))?;
        let tcp =
            crate::net::shared_listener(addr).with_context(|| format!("starting the DNS forwarder on tcp {addr}"))?;
        out.push((udp, tcp));
    }
    Ok(out)
}

/// Where the forwarder sends queries: the configured resolvers, else the
/// server each client asked, with /etc/resolv.conf's resolvers for queries
/// whose server cannot be told.
fn dns_upstreams(config: &Config) -> anyhow::Result<Upstreams> {
    let own: [Option<std::net::IpAddr>; 2] =
        [Some(config.proxy.address_v4.into()), config.proxy.address_v6.map(std::net::IpAddr::from)];
    // Never forward to ourselves.
    let not_own = |u: &SocketAddr| !(u.port() == config.targets.dns_port && own.contains(&Some(u.ip())));
    let configured: Vec<SocketAddr> =
        config.targets.dns_upstreams.iter().filter_map(|u| crate::config::parse_dns_upstream(u)).collect();
    if !configured.is_empty() {
        let upstreams: Vec<SocketAddr> = configured.into_iter().filter(not_own).collect();
        if upstreams.is_empty() {
            anyhow::bail!(
                "targets.dns_upstreams names only the interceptor's own DNS port: set other resolvers, or leave it \
                 empty to ask the server each client asked"
            );
        }
        return Ok(Upstreams::Configured(upstreams));
    }
    let fallback = match std::fs::read_to_string("/etc/resolv.conf") {
        Ok(text) => dns::system_upstreams(&text).into_iter().filter(not_own).collect(),
        Err(error) => {
            tracing::warn!(%error, "cannot read /etc/resolv.conf: DNS queries whose server cannot be told will fail");
            Vec::new()
        }
    };
    Ok(Upstreams::Asked { fallback })
}

/// The redirect's records, as the DNS forwarder asks for them.
struct RedirectRecords(Arc<dyn OrigDstResolver>);

impl AskedServer for RedirectRecords {
    fn udp(&self, client: SocketAddr, local: SocketAddr) -> Option<SocketAddr> {
        self.0.dns_original_dst(ClientAddr(client), local).map(|a| a.0)
    }

    fn tcp(&self, stream: &tokio::net::TcpStream, client: SocketAddr) -> Option<SocketAddr> {
        let client = ClientAddr(client);
        let asked = self.0.original_dst(stream, client).ok();
        // Consumes the connection's record (eBPF mode keeps one until read,
        // and reads it when asked; the lookup itself is not needed).
        if let Some(asked) = asked {
            drop(self.0.workload(client, asked));
        }
        asked.map(|a| a.0)
    }
}

/// The redirector and the target set, shared by the control loop and the
/// DNS forwarder's learner. Held only for map or rule updates, never across
/// an await.
struct Targeting {
    redirector: Box<dyn Redirector>,
    resolver: TargetResolver,
    targets: TargetSet,
    /// The data plane learns the new set here, before a DNS answer that
    /// added to it is released.
    snapshot: Arc<watch::Sender<Arc<Snapshot>>>,
}

impl Targeting {
    fn apply(&mut self) -> Result<(), crate::redirect::RedirectError> {
        let set = self.resolver.current();
        self.redirector.set_targets(&set)?;
        if set != self.targets {
            let published = Arc::new(set.clone());
            self.snapshot.send_modify(|s| Arc::make_mut(s).targets = published);
        }
        self.targets = set;
        Ok(())
    }
}

/// Learns AI providers' addresses from the answers agents get, and makes
/// them targets before the answer is released.
struct Learner {
    targeting: Arc<Mutex<Targeting>>,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    status: Arc<watch::Sender<Arc<Status>>>,
    floor: Duration,
    grace: Duration,
}

#[async_trait::async_trait]
impl DnsObserver for Learner {
    fn is_ai_domain(&self, name: &str) -> bool {
        self.snapshot.borrow().policy.classify(Some(name)).intercept
    }

    async fn learned(&self, learned: Vec<Learned>) {
        let mut t = self.targeting.lock().unwrap_or_else(|e| e.into_inner());
        let mut new = 0;
        for l in &learned {
            if t.resolver.learn(&l.name, l.addr, l.ttl, self.floor, self.grace) {
                new += 1;
            }
        }
        let applied = t.apply();
        let targets = t.targets.clone();
        drop(t);
        self.status.send_modify(|s| Arc::make_mut(s).targets = targets);
        match applied {
            Ok(()) if new > 0 => tracing::info!(new, "learned AI provider addresses from DNS"),
            Ok(()) => {}
            Err(error) => tracing::error!(error = %error::chain(&error), "cannot redirect learned addresses"),
        }
    }
}

/// Names resolved for redirect targets: the exact AI names of the policy
/// plus any extra names configured.
fn resolve_names(policy: &DomainPolicy, config: &Config) -> Vec<String> {
    let mut names: Vec<String> = policy.resolvable_names().to_vec();
    for extra in &config.targets.domains {
        if !names.contains(extra) {
            names.push(extra.clone());
        }
    }
    names
}

fn prepare_state_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating the state directory {}", dir.display()))
}

struct Control {
    config: Config,
    config_path: Option<PathBuf>,
    overrides: Overrides,
    targeting: Arc<Mutex<Targeting>>,
    snapshot: Arc<watch::Sender<Arc<Snapshot>>>,
    guardrails: watch::Sender<Arc<Guardrails>>,
    /// The policy file's text as last loaded, to notice changes.
    policy_text: Option<String>,
    status: Arc<watch::Sender<Arc<Status>>>,
}

impl Control {
    fn targeting(&self) -> std::sync::MutexGuard<'_, Targeting> {
        self.targeting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs until SIGINT or SIGTERM.
    async fn run(&mut self) -> anyhow::Result<()> {
        let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        let mut sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
        let mut last_text = self.config_path.as_deref().and_then(|p| std::fs::read_to_string(p).ok());
        let mut resolve_tick = tokio::time::interval(self.config.targets.resolve_interval);
        let mut poll_tick = tokio::time::interval(CONFIG_POLL);
        let mut status_tick = tokio::time::interval(STATUS_REFRESH);
        loop {
            tokio::select! {
                _ = sigterm.recv() => { tracing::info!("SIGTERM received; shutting down"); return Ok(()) }
                _ = sigint.recv() => { tracing::info!("SIGINT received; shutting down"); return Ok(()) }
                _ = resolve_tick.tick() => self.refresh_targets().await,
                _ = status_tick.tick() => self.publish(),
                _ = sighup.recv() => {
                    tracing::info!("SIGHUP received; reloading the configuration");
                    if self.reload(&mut last_text, true) {
                        resolve_tick = tokio::time::interval(self.config.targets.resolve_interval);
                    }
                }
                _ = poll_tick.tick() => {
                    if self.config_path.is_some() && self.reload(&mut last_text, false) {
                        resolve_tick = tokio::time::interval(self.config.targets.resolve_interval);
                    }
                    self.reload_policy_if_changed();
                }
            }
        }
    }

    /// Reloads the policy file when its content changed. An invalid policy
    /// is rejected with a log line and the running one stays.
    fn reload_policy_if_changed(&mut self) {
        let path = &self.config.guardrails.policy_file;
        if path.as_os_str().is_empty() || !self.config.guardrails.backends.contains(&Backend::Local) {
            return;
        }
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(error) => {
                if self.policy_text.take().is_some() {
                    tracing::error!(path = %path.display(), %error, "cannot read the policy file; keeping the running policy");
                }
                return;
            }
        };
        if self.policy_text.as_deref() == Some(text.as_str()) {
            return;
        }
        self.policy_text = Some(text.clone());
        let engine = Policy::from_toml(&text, &path.display().to_string()).and_then(|p| Engine::new(&p));
        match engine {
            Ok(engine) => {
                let current = self.guardrails.borrow().clone();
                let _ = self.guardrails.send(Arc::new(Guardrails {
                    engine: Some(Arc::new(engine)),
                    akto: current.akto.clone(),
                    cfg: current.cfg.clone(),
                }));
                tracing::info!(path = %path.display(), "guardrail policy reloaded");
            }
            Err(error) => tracing::error!(
                path = %path.display(),
                error = %error::chain(&error),
                "guardrail policy rejected; keeping the running policy"
            ),
        }
    }

    async fn refresh_targets(&mut self) {
        let domains = self.targeting().resolver.domains();
        let Ok(results) = tokio::time::timeout(RESOLVE_TIMEOUT, crate::targets::lookup(domains)).await else {
            tracing::warn!(timeout = ?RESOLVE_TIMEOUT, "target resolution timed out; keeping the current targets");
            return;
        };
        let applied = {
            let mut t = self.targeting();
            t.resolver.apply(results);
            t.apply()
        };
        match applied {
            Ok(()) => self.publish_ready(),
            Err(error) => {
                tracing::error!(error = %error::chain(&error), "cannot update redirect targets; keeping the previous ones")
            }
        }
    }

    fn publish_ready(&self) {
        if !self.status.borrow().ready {
            tracing::info!(event = "ready", "interceptor ready: redirect targets in place");
        }
        self.status.send_modify(|s| Arc::make_mut(s).ready = true);
        self.publish();
    }

    fn publish(&self) {
        let (counters, targets) = {
            let mut t = self.targeting();
            // Expired learned addresses leave the kernel maps here too.
            if let Err(error) = t.apply() {
                tracing::error!(error = %error::chain(&error), "cannot update redirect targets");
            }
            (t.redirector.counters(), t.targets.clone())
        };
        self.status.send_modify(|s| {
            let s = Arc::make_mut(s);
            s.counters = counters;
            s.targets = targets;
        });
    }

    /// Reloads the config file if it changed (or `force`). Returns true when
    /// a new configuration was applied; an invalid one is rejected and the
    /// running one kept.
    fn reload(&mut self, last_text: &mut Option<String>, force: bool) -> bool {
        let Some(path) = self.config_path.clone() else {
            return false;
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(error) => {
                if force || last_text.is_some() {
                    tracing::error!(path = %path.display(), %error, "cannot read the config file; keeping the running configuration");
                }
                *last_text = None;
                return false;
            }
        };
        if !force && last_text.as_deref() == Some(text.as_str()) {
            return false;
        }
        *last_text = Some(text.clone());
        let mut new = match Config::from_toml(&text, &path) {
            Ok(c) => c,
            Err(error) => {
                tracing::error!(error = %error::chain(&error), "config reload rejected; keeping the running configuration");
                return false;
            }
        };
        new.apply(&self.overrides);
        if let Err(error) = new.validate() {
            tracing::error!(error = %error::chain(&error), "config reload rejected; keeping the running configuration");
            return false;
        }
        let policy = match DomainPolicy::compile(&new.domains) {
            Ok(p) => p,
            Err(error) => {
                tracing::error!(error = %error::chain(&error), "config reload rejected; keeping the running configuration");
                return false;
            }
        };
        for (section, changed) in [
            ("proxy", new.proxy != self.config.proxy),
            ("redirect", new.redirect != self.config.redirect),
            ("tls", new.tls != self.config.tls),
            ("admin", new.admin != self.config.admin),
            ("log", new.log != self.config.log),
        ] {
            if changed {
                tracing::warn!(section, "this section changed but only takes effect after a restart");
            }
        }
        if new.guardrails != self.config.guardrails {
            match build_guardrails(&new) {
                Ok((text, guardrails)) => {
                    self.policy_text = text;
                    let _ = self.guardrails.send(Arc::new(guardrails));
                    self.config.guardrails = new.guardrails.clone();
                    tracing::info!("guardrail settings reloaded");
                }
                Err(error) => {
                    tracing::error!(
                        error = format!("{error:#}"),
                        "guardrail settings rejected; keeping the running ones"
                    );
                }
            }
        }
        {
            let mut t = self.targeting();
            t.resolver.reconfigure(resolve_names(&policy, &new), new.cidrs(), new.targets.address_grace);
            t.resolver.set_all_tls(new.targets.mode == TargetMode::AllTls);
        }
        let policy = Arc::new(policy);
        self.snapshot.send_modify(|s| Arc::make_mut(s).policy = policy);
        self.config.targets = new.targets;
        self.config.domains = new.domains;
        tracing::info!("configuration reloaded");
        true
    }
}
