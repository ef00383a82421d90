//! Settings of the Kubernetes pod directory (`[kubernetes]`): typed values,
//! their documented defaults and their validation. The directory that uses
//! them is `kubernetes`; this module does no I/O besides checking that the
//! files it names exist, and imports nothing from the crate.

use std::{path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

/// Shortest `resync_interval`: a full list of the node's pods is cheap, but
/// not free for the API server.
pub const MIN_RESYNC: Duration = Duration::from_secs(10);

/// Whether the pod directory runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KubeEnabled {
    /// On in a cluster (service-account environment and token present) or
    /// with `api_url` set; off elsewhere.
    Auto,
    On,
    Off,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KubernetesConfig {
    pub enabled: KubeEnabled,
    /// This node's name (`NODE_NAME`): only its pods are watched.
    pub node_name: String,
    /// The API server, for tests and out-of-cluster use. Empty: in-cluster.
    pub api_url: String,
    /// CA certificate (PEM) for `api_url`. Empty: the system roots.
    pub ca_file: PathBuf,
    /// Bearer token file for `api_url`. Empty: no token.
    pub token_file: PathBuf,
    /// How often the whole pod list is read again, on top of the watch.
    #[serde(with = "humantime_serde")]
    pub resync_interval: Duration,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        Self {
            enabled: KubeEnabled::Auto,
            node_name: String::new(),
            api_url: String::new(),
            ca_file: PathBuf::new(),
            token_file: PathBuf::new(),
            resync_interval: Duration::from_secs(600),
        }
    }
}

impl KubernetesConfig {
    /// Every problem with these settings, each prefixed with its field.
    pub fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if !self.api_url.is_empty() {
            match reqwest::Url::parse(&self.api_url) {
                Ok(url) if matches!(url.scheme(), "http" | "https") && url.host_str().is_some() => {}
                Ok(url) => errors.push(format!("kubernetes.api_url: must be an http(s) URL with a host, not {url}")),
                Err(e) => errors.push(format!("kubernetes.api_url: {:?} is not a URL: {e}", self.api_url)),
            }
        }
        for (field, path) in [("ca_file", &self.ca_file), ("token_file", &self.token_file)] {
            if path.as_os_str().is_empty() {
                continue;
            }
            if self.api_url.is_empty() {
                errors.push(format!(
                    "kubernetes.{field}: only used with kubernetes.api_url (in a cluster the service account's is used)"
                ));
            } else if !path.is_file() {
                errors.push(format!("kubernetes.{field}: {} is not a readable file", path.display()));
            }
        }
        if self.enabled == KubeEnabled::On && self.node_name.trim().is_empty() {
            errors.push(
                "kubernetes.node_name: required when kubernetes.enabled = \"on\" (set NODE_NAME from the downward API: \
                 spec.nodeName)"
                    .into(),
            );
        }
        if self.resync_interval < MIN_RESYNC {
            errors.push(format!("kubernetes.resync_interval: must be at least {MIN_RESYNC:?}"));
        }
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_the_file_form_parses() {
        assert!(KubernetesConfig::default().validate().is_empty());
        let c: KubernetesConfig = toml::from_str(
            "enabled = \"on\"\nnode_name = \"n1\"\napi_url = \"http://127.0.0.1:6443\"\nresync_interval = \"1m\"",
        )
        .unwrap();
        assert_eq!(c.enabled, KubeEnabled::On);
        assert_eq!(c.resync_interval, Duration::from_secs(60));
        assert!(c.validate().is_empty(), "{:?}", c.validate());
        assert!(toml::from_str::<KubernetesConfig>("enabled = \"maybe\"").is_err());
        assert!(toml::from_str::<KubernetesConfig>("apiurl = \"x\"").is_err());
    }

    #[test]
    fn every_problem_is_reported() {
        let c = KubernetesConfig {
            enabled: KubeEnabled::On,
            api_url: "ftp://x".into(),
            ca_file: "/nonexistent/ca.pem".into(),
            resync_interval: Duration::from_secs(1),
            ..KubernetesConfig::default()
        };
        let errors = c.validate();
        assert_eq!(errors.len(), 4, "{errors:#?}");
        for field in ["api_url", "ca_file", "node_name", "resync_interval"] {
            assert!(errors.iter().any(|e| e.starts_with(&format!("kubernetes.{field}:"))), "{field}: {errors:?}");
        }
        let stray = KubernetesConfig { token_file: "/etc/hostname".into(), ..KubernetesConfig::default() };
        assert!(stray.validate()[0].contains("only used with kubernetes.api_url"), "{:?}", stray.validate());
    }
}
