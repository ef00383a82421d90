//! Wiring: the only place that names the concrete redirect and builds the
//! running interceptor. Starts the data plane (listeners, proxy, built by
//! [`DataPlaneBuilder`]), the control plane ([`Control`]: targeting,
//! learning, reload, status), the DNS forwarder and the admin API, waits for
//! the control loop to end (SIGINT/SIGTERM), and tears everything down in
//! order: redirect removed first (new connections go direct), then in-flight
//! connections drained.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::Context as _;
use tokio::{
    net::{TcpListener, UdpSocket},
    sync::watch,
};

use crate::{
    admin::{self, Status},
    config::{Config, FailMode, Overrides, RedirectMode, TargetMode},
    control::{self, Control, ControlParts, Learner, RedirectRecords, SharedTargeting, Targeting},
    dataplane::{self, DataPlaneBuilder},
    dns::{AskedServer, DnsForwarder, ForwarderConfig},
    error,
    kubernetes::PodDirectory,
    metrics::Metrics,
    observe::LiveEvents,
    proxy::{Listeners, Snapshot},
    redirect::{NoRedirect, Redirector, ebpf::EbpfRedirector, iptables::IptablesRedirector, liveness::BeatThread},
};

/// The async runtime `run` runs on: single-threaded, on the main thread. It
/// holds the control plane and the first proxy worker; each further worker
/// runs on a thread and runtime of its own (see [`crate::proxy::Proxy::serve`]).
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()
}

/// How many proxy workers serve connections: `proxy.worker_threads`, or
/// with 0 one per CPU the process may run on (its CPU affinity, as
/// `taskset` or a container's cpuset limit it).
pub fn workers(config: &Config) -> usize {
    match config.proxy.worker_threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

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
    let policy = config.domain_policy().context("compiling the domain policy")?;
    let names = control::resolve_names(&policy, &config);
    let (snapshot_tx, snapshot_rx) = watch::channel(Arc::new(Snapshot::new(policy)));
    let snapshot_tx = Arc::new(snapshot_tx);
    let tls = if config.tls.intercept {
        let ca = dataplane::certificate_authority(&config, &state_dir)?;
        Some(Arc::new(dataplane::tls_termination(&config, ca)?))
    } else {
        None
    };

    let workers = workers(&config);
    let listeners = Listeners::bind_workers(
        config.proxy.address_v4,
        config.proxy.address_v6,
        config.proxy.port,
        config.proxy.mark,
        workers,
    )
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
        TargetMode::Dns => match control::dns_upstreams(&config) {
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
                config.redirect.fail_mode == FailMode::Open,
            )
            .context("installing the iptables redirect (run `interceptor doctor`)")?,
        ),
        RedirectMode::None => Box::new(NoRedirect),
    };
    // Its own thread: a busy runtime must not miss a beat. Stopped (and
    // joined) when dropped, after the redirect is removed below, or on any
    // early return.
    let heartbeat = match redirector.liveness() {
        Some(liveness) => Some(BeatThread::start(liveness).context("starting the heartbeat thread")?),
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
    let live = LiveEvents::default();
    tokio::spawn(admin::serve(admin_listener, status_rx, Arc::clone(&metrics), live.clone()));

    // Pods are named as soon as the directory has listed them; connections
    // never wait for it.
    let pods = PodDirectory::start(&config.kubernetes, Arc::clone(&metrics));
    if let Some(pods) = &pods {
        tokio::spawn(publish_pod_directory(pods.status(), Arc::clone(&status_tx)));
    }

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (shutdown_dns_tx, shutdown_rx_dns) = watch::channel(false);
    let mut plane = DataPlaneBuilder::new(&config)
        .state_dir(&state_dir)
        .tls(tls)
        .metrics(metrics)
        .live(live)
        .pods(pods.map(|p| Arc::new(p) as Arc<dyn crate::workload::PodLookup>));
    let guardrails = plane.configured_guardrails().context("preparing the guardrails")?;
    let records = RedirectRecords(redirector.resolver());
    let proxy = plane
        .serve(listeners, redirector.resolver(), snapshot_rx, shutdown_rx)
        .context("starting the proxy workers")?;
    tracing::info!(workers, "proxy workers serving");

    let drain_timeout = config.proxy.drain_timeout;
    let targeting = SharedTargeting::new(Targeting::new(redirector, names, &config, Arc::clone(&snapshot_tx)));
    let mut forwarders = Vec::new();
    if let (Some(sockets), Some(upstreams)) = (dns_sockets, dns_upstreams) {
        let learner =
            Arc::new(Learner::new(targeting.clone(), snapshot_tx.subscribe(), Arc::clone(&status_tx), &config.targets));
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
    let budgets = guardrails.budgets.clone();
    let mut control = Control::new(ControlParts {
        config,
        config_path,
        overrides,
        targeting: targeting.clone(),
        snapshot: snapshot_tx,
        guardrails,
        status: status_tx,
    });
    let result = control.run().await;

    // Redirect off first: from now on new connections go direct.
    if let Err(error) = targeting.lock().uninstall() {
        tracing::error!(error = %error::chain(&error), "cannot remove the redirect");
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
    if let Some(budgets) = budgets {
        budgets.save();
    }
    result
}

/// Copies the pod directory's state into the status the admin API serves,
/// until the directory stops.
async fn publish_pod_directory(
    mut directory: watch::Receiver<crate::kubernetes::DirectoryStatus>,
    status: Arc<watch::Sender<Arc<Status>>>,
) {
    loop {
        let current = directory.borrow_and_update().clone();
        status.send_modify(|s| Arc::make_mut(s).pod_directory = Some(current));
        if directory.changed().await.is_err() {
            return;
        }
    }
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

fn prepare_state_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating the state directory {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_as_configured_or_one_per_cpu() {
        let mut config = Config::default();
        config.proxy.worker_threads = 3;
        assert_eq!(workers(&config), 3);
        // 0: one per CPU this process may run on.
        config.proxy.worker_threads = 0;
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(workers(&config), cpus);
    }
}
