//! Live reload: the config file (on change, or SIGHUP) and the guardrail
//! policy file (on change). A new configuration is validated whole before
//! anything is applied; an invalid one is rejected with a log line and the
//! running one stays. Sections that need a restart are reported, not
//! applied.
//!
//! This module decides what changed and hands each change to its owner (the
//! targeting, the data plane's snapshot, the guardrails' handle); it must
//! not touch kernel state or listeners itself.

use std::sync::Arc;

use super::{Control, targeting::resolve_names};
use crate::{
    config::{Backend, Config, StreamMode, TargetMode},
    dataplane::{budget_rules, build_guardrails},
    error,
    guardrails::{
        engine::{Engine, Policy},
        pipeline::Guardrails,
    },
};

/// Whether a `[budgets]` setting other than the limits changed (where the
/// counters live: they take effect after a restart).
fn budget_settings_changed(new: &Config, old: &Config) -> bool {
    let settings = |c: &Config| crate::config::BudgetsConfig { limits: Vec::new(), ..c.budgets.clone() };
    settings(new) != settings(old)
}

impl Control {
    /// Puts new budget limits in force; the counters stay. Budgets added to
    /// a configuration that had none need a restart.
    fn reload_budgets(&mut self, new: &Config) {
        let Some(budgets) = &self.guardrails.budgets else {
            tracing::warn!(section = "budgets", "budgets were added but only take effect after a restart");
            return;
        };
        match budget_rules(new) {
            Ok(rules) => {
                budgets.set_rules(rules);
                self.config.budgets.limits = new.budgets.limits.clone();
                tracing::info!(limits = new.budgets.limits.len(), "budgets reloaded");
            }
            Err(error) => {
                tracing::error!(error = format!("{error:#}"), "budgets rejected; keeping the running ones");
            }
        }
    }

    /// Reloads the policy file when its content changed. An invalid policy
    /// is rejected with a log line and the running one stays.
    pub(super) fn reload_policy_if_changed(&mut self) {
        let path = &self.config.guardrails.policy_file;
        if path.as_os_str().is_empty() || !self.config.guardrails.backends.contains(&Backend::Local) {
            return;
        }
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(error) => {
                if self.guardrails.policy_text.take().is_some() {
                    tracing::error!(path = %path.display(), %error, "cannot read the policy file; keeping the running policy");
                }
                return;
            }
        };
        if self.guardrails.policy_text.as_deref() == Some(text.as_str()) {
            return;
        }
        self.guardrails.policy_text = Some(text.clone());
        let engine = Policy::from_toml(&text, &path.display().to_string()).and_then(|p| Engine::new(&p));
        match engine {
            Ok(engine) => {
                let current = self.guardrails.current.borrow().clone();
                if current.cfg.stream_mode == StreamMode::Enforce {
                    engine.prepare_streams();
                }
                let _ = self.guardrails.current.send(Arc::new(Guardrails {
                    engine: Some(Arc::new(engine)),
                    akto: current.akto.clone(),
                    cfg: current.cfg.clone(),
                    keys: current.keys.clone(),
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

    /// Reloads the config file if it changed (or `force`). Returns true when
    /// a new configuration was applied; an invalid one is rejected and the
    /// running one kept.
    pub(super) fn reload(&mut self, last_text: &mut Option<String>, force: bool) -> bool {
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
        let policy = match new.domain_policy() {
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
            ("keys", new.keys != self.config.keys),
            ("budgets (all but limits)", budget_settings_changed(&new, &self.config)),
        ] {
            if changed {
                tracing::warn!(section, "this section changed but only takes effect after a restart");
            }
        }
        if new.guardrails != self.config.guardrails {
            match build_guardrails(&new) {
                Ok((text, mut guardrails)) => {
                    // The brokering file is reloaded on its own.
                    guardrails.keys = self.guardrails.current.borrow().keys.clone();
                    self.guardrails.policy_text = text;
                    let _ = self.guardrails.current.send(Arc::new(guardrails));
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
        if new.budgets.limits != self.config.budgets.limits {
            self.reload_budgets(&new);
        }
        {
            let mut t = self.targeting.lock();
            t.resolver.reconfigure(resolve_names(&policy, &new), new.cidrs(), new.targets.address_grace);
            t.resolver.set_all_tls(new.targets.mode == TargetMode::AllTls);
            t.resolver.set_plain(super::targeting::plain_targets(&new));
        }
        let policy = Arc::new(policy);
        self.snapshot.send_modify(|s| Arc::make_mut(s).policy = policy);
        self.config.targets = new.targets;
        self.config.domains = new.domains;
        self.config.mcp = new.mcp;
        tracing::info!("configuration reloaded");
        true
    }
}
