//! The control plane: which addresses are redirected (targeting), what
//! agents' DNS answers teach (learning), live reload, and the status the
//! admin API serves. It runs one loop ([`Control::run`]) until SIGINT or
//! SIGTERM, waking for SIGHUP, periodic target resolution, config polling
//! and status refresh.
//!
//! It talks to the data plane only through what it publishes: the
//! [`Snapshot`] (domain policy, targets) and the guardrails' settings
//! ([`GuardrailsHandle`]). It must not accept connections, touch a
//! connection's bytes, or name a concrete redirect mode (the [`Redirector`]
//! it is given does that); `app` builds it and tears it down.
//!
//! - [`targeting`]: the redirector and the target set, kept in step.
//! - [`learner`]: the DNS forwarder's ports (learned addresses, asked
//!   servers).
//! - [`reload`]: the config and policy files.
//!
//! [`Redirector`]: crate::redirect::Redirector

mod learner;
mod reload;
mod targeting;

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};

pub use self::{
    learner::{Learner, RedirectRecords, dns_upstreams},
    targeting::{SharedTargeting, Targeting, resolve_names},
};
use crate::{
    admin::Status,
    config::{Config, Overrides},
    dataplane::GuardrailsHandle,
    error,
    proxy::Snapshot,
};

/// How often the config file is checked for changes (SIGHUP reloads at once).
const CONFIG_POLL: Duration = Duration::from_secs(2);
/// How often kernel counters are refreshed for the status endpoint.
const STATUS_REFRESH: Duration = Duration::from_secs(5);
/// Upper bound on one round of target resolution, so signals are not held up.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(15);

/// The control loop's state: the running configuration and everything a
/// change of it is handed to.
pub struct Control {
    config: Config,
    config_path: Option<PathBuf>,
    overrides: Overrides,
    targeting: SharedTargeting,
    snapshot: Arc<watch::Sender<Arc<Snapshot>>>,
    guardrails: GuardrailsHandle,
    status: Arc<watch::Sender<Arc<Status>>>,
}

/// What [`Control`] starts from.
pub struct ControlParts {
    /// The running configuration, as loaded (overrides applied).
    pub config: Config,
    /// The file reloads read; `None`: the built-in defaults, never reloaded.
    pub config_path: Option<PathBuf>,
    /// Environment and command-line overrides, applied to each reload.
    pub overrides: Overrides,
    pub targeting: SharedTargeting,
    pub snapshot: Arc<watch::Sender<Arc<Snapshot>>>,
    pub guardrails: GuardrailsHandle,
    pub status: Arc<watch::Sender<Arc<Status>>>,
}

impl Control {
    pub fn new(parts: ControlParts) -> Self {
        let ControlParts { config, config_path, overrides, targeting, snapshot, guardrails, status } = parts;
        Self { config, config_path, overrides, targeting, snapshot, guardrails, status }
    }

    /// Runs until SIGINT or SIGTERM.
    pub async fn run(&mut self) -> anyhow::Result<()> {
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
                    self.guardrails.reload_keys_if_changed(&self.config.keys.placeholder_prefix);
                }
            }
        }
    }

    async fn refresh_targets(&mut self) {
        let domains = self.targeting.lock().resolver.domains();
        let Ok(results) = tokio::time::timeout(RESOLVE_TIMEOUT, crate::targets::lookup(domains)).await else {
            tracing::warn!(timeout = ?RESOLVE_TIMEOUT, "target resolution timed out; keeping the current targets");
            return;
        };
        let applied = {
            let mut t = self.targeting.lock();
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

    /// Publishes the kernel counters and the target set to the status.
    fn publish(&self) {
        let (counters, targets) = {
            let mut t = self.targeting.lock();
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
}
