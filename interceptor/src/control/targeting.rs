//! The redirect targets: the redirector (kernel state) and the target
//! resolver (which addresses are AI providers), kept in step, with every
//! change of the set published to the data plane's snapshot.
//!
//! Shared by the control loop (periodic resolution, reload, status) and the
//! DNS learner. The lock is held only for a map or rule update, never
//! across an await. This module must not resolve names itself (the control
//! loop does, off the lock) nor read the configuration file.

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

use crate::{
    config::{Config, TargetMode},
    policy::DomainPolicy,
    proxy::{Snapshot, plain::PlainTargets},
    redirect::{RedirectError, Redirector},
    targets::{TargetResolver, TargetSet},
};

/// The redirector and the target set.
pub struct Targeting {
    pub(super) redirector: Box<dyn Redirector>,
    pub(super) resolver: TargetResolver,
    pub(super) targets: TargetSet,
    /// The data plane learns the new set here, before a DNS answer that
    /// added to it is released.
    snapshot: Arc<watch::Sender<Arc<Snapshot>>>,
}

impl Targeting {
    /// Targets `names` (see [`resolve_names`]) and the configured CIDRs
    /// through `redirector`; nothing is redirected until the first
    /// [`Targeting::apply`].
    pub fn new(
        redirector: Box<dyn Redirector>,
        names: Vec<String>,
        config: &Config,
        snapshot: Arc<watch::Sender<Arc<Snapshot>>>,
    ) -> Self {
        let mut resolver = TargetResolver::new(names, config.cidrs(), config.targets.address_grace);
        resolver.set_all_tls(config.targets.mode == TargetMode::AllTls);
        resolver.set_plain(plain_targets(config));
        Self { redirector, resolver, targets: TargetSet::default(), snapshot }
    }

    /// Hands the resolver's current set to the redirector, and to the data
    /// plane when it changed.
    pub fn apply(&mut self) -> Result<(), RedirectError> {
        let set = self.resolver.current();
        self.redirector.set_targets(&set)?;
        if set != self.targets {
            let published = Arc::new(set.clone());
            let plain = (set.plain != self.targets.plain)
                .then(|| Arc::new(PlainTargets::new(set.plain.iter().map(|(a, h)| (*a, h.clone())))));
            self.snapshot.send_modify(|s| {
                let s = Arc::make_mut(s);
                s.targets = published;
                if let Some(plain) = plain {
                    s.plain = plain;
                }
            });
        }
        self.targets = set;
        Ok(())
    }

    /// Removes the redirect from the kernel: new connections go direct.
    pub fn uninstall(&mut self) -> Result<(), RedirectError> {
        self.redirector.uninstall()
    }
}

/// The plain-HTTP MCP servers `config` names, as (host, port); none when
/// MCP inspection is off.
pub fn plain_targets(config: &Config) -> Vec<(String, u16)> {
    if !config.mcp.enabled {
        return Vec::new();
    }
    config.mcp.plain_targets().into_iter().map(|t| (t.host, t.port)).collect()
}

/// [`Targeting`] shared between the control loop and the DNS learner.
#[derive(Clone)]
pub struct SharedTargeting(Arc<Mutex<Targeting>>);

impl SharedTargeting {
    pub fn new(targeting: Targeting) -> Self {
        Self(Arc::new(Mutex::new(targeting)))
    }

    /// The targeting (also after a holder panicked).
    pub fn lock(&self) -> MutexGuard<'_, Targeting> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Names resolved for redirect targets: the exact AI names of the policy
/// plus any extra names configured.
pub fn resolve_names(policy: &DomainPolicy, config: &Config) -> Vec<String> {
    let mut names: Vec<String> = policy.resolvable_names().to_vec();
    for extra in &config.targets.domains {
        if !names.contains(extra) {
            names.push(extra.clone());
        }
    }
    names
}
