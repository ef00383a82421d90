//! The pod directory: which pod, namespace, labels, service account and
//! container a connection comes from, on a Kubernetes node.
//!
//! This module owns the node agent's view of its own pods: a watch of the
//! API server limited to this node (`spec.nodeName=<node>` field selector),
//! listed again every `kubernetes.resync_interval` and after every failure
//! (with jittered exponential backoff), kept in memory as a map pod UID →
//! [`PodInfo`] per container. The data plane reads it through
//! [`PodLookup`], with the pod UID and container id of a connection's cgroup
//! path: a read lock and an `Arc` clone, never an await or I/O.
//!
//! It must never block or fail a connection. When the API server cannot be
//! reached or refuses (a missing RBAC binding), the directory says so once
//! (a warning, `state = "degraded"` in `/status`, the
//! `interceptor_pod_directory_degraded` gauge), keeps the pods it knew, and
//! connections of other pods are named by their UID alone until it recovers.
//!
//! The API server is found in the cluster (service-account token and CA,
//! `KUBERNETES_SERVICE_HOST`), or at `kubernetes.api_url` (tests and
//! out-of-cluster use). The service account needs `get`, `list` and `watch`
//! on pods (`deploy/kubernetes/rbac.yaml`), nothing else.
//!
//! * `pods` — a pod reduced to what the directory keeps (pure);
//! * `watch` — the watch loop and what its failures mean.

mod pods;
mod watch;

#[cfg(test)]
#[cfg(feature = "testing")]
mod tests;

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, RwLock},
};

use serde::Serialize;
use tokio::task::JoinHandle;

use self::pods::PodEntry;
use crate::{
    config::{KubeEnabled, KubernetesConfig},
    metrics::Metrics,
    workload::{KubeIdentity, PodInfo, PodLookup},
};

/// Where a pod's service account token is mounted.
const SERVICE_ACCOUNT_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    #[error("cannot read the in-cluster service account configuration")]
    InCluster(#[source] kube::config::InClusterError),
    #[error("kubernetes.api_url {url:?} is not a valid URI")]
    Url {
        url: String,
        #[source]
        source: http::uri::InvalidUri,
    },
    #[error("cannot read kubernetes.ca_file {path}")]
    CaFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("kubernetes.ca_file {path} holds no PEM certificate")]
    NoCertificate { path: String },
    #[error("cannot build the Kubernetes API client")]
    Client(#[source] kube::Error),
}

/// How far the directory can be trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DirectoryState {
    /// Listing the node's pods for the first time.
    Starting,
    /// Listed, and following changes.
    Synced,
    /// The API server cannot be reached or refuses: pods it did not describe
    /// before are named by their UID only.
    Degraded,
}

/// What `/status` shows of the directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DirectoryStatus {
    pub state: DirectoryState,
    /// The node whose pods are watched.
    pub node: String,
    /// Pods known.
    pub pods: usize,
    /// Changes applied (lists and watch events), for tests and debugging.
    pub updates: u64,
    /// The last failure, while degraded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The map and its status, shared by the directory handles and the watch.
struct Store {
    pods: RwLock<HashMap<String, PodEntry>>,
    status: tokio::sync::watch::Sender<DirectoryStatus>,
    metrics: Arc<Metrics>,
}

/// Stops the watch when the last directory handle is dropped.
struct AbortOnDrop(Option<JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// The pod directory of this node; see the module docs. Clones share one
/// map and one watch, which stops when the last clone is dropped.
#[derive(Clone)]
pub struct PodDirectory {
    store: Arc<Store>,
    _watch: Arc<AbortOnDrop>,
}

impl std::fmt::Debug for PodDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodDirectory").field("status", &*self.store.status.borrow()).finish_non_exhaustive()
    }
}

impl PodDirectory {
    /// Starts the directory `cfg` asks for, or returns `None` when it is off
    /// (`enabled = "off"`, or `"auto"` outside a cluster without `api_url`,
    /// or no node name). Never fails: a client that cannot be built is a
    /// directory degraded from the start. Must be called within a tokio
    /// runtime.
    pub fn start(cfg: &KubernetesConfig, metrics: Arc<Metrics>) -> Option<Self> {
        let wanted = match cfg.enabled {
            KubeEnabled::Off => false,
            KubeEnabled::On => true,
            KubeEnabled::Auto => !cfg.api_url.is_empty() || in_cluster(),
        };
        if !wanted {
            tracing::info!("kubernetes pod directory off: connections are named by the pod UID of their cgroup only");
            return None;
        }
        let node = cfg.node_name.trim().to_owned();
        if node.is_empty() {
            tracing::warn!(
                "kubernetes pod directory off: no node name (set NODE_NAME from the downward API, spec.nodeName); \
                 connections are named by the pod UID of their cgroup only"
            );
            return None;
        }
        let store = Arc::new(Store::new(node.clone(), metrics));
        let client = client_config(cfg).and_then(|c| kube::Client::try_from(c).map_err(KubernetesError::Client));
        let task = match client {
            Ok(client) => {
                tracing::info!(node = %node, api = %api_name(cfg), "kubernetes pod directory watching this node's pods");
                let api = kube::Api::<k8s_openapi::api::core::v1::Pod>::all(client);
                Some(tokio::spawn(watch::run(api, node, cfg.resync_interval, Arc::clone(&store))))
            }
            Err(error) => {
                store.degrade(&crate::error::chain(&error), "check the [kubernetes] settings");
                None
            }
        };
        Some(Self { store, _watch: Arc::new(AbortOnDrop(task)) })
    }

    /// The directory's state, updated on every change.
    pub fn status(&self) -> tokio::sync::watch::Receiver<DirectoryStatus> {
        self.store.status.subscribe()
    }
}

impl PodLookup for PodDirectory {
    fn pod(&self, identity: &KubeIdentity) -> Option<Arc<PodInfo>> {
        let pods = self.store.pods.read().unwrap_or_else(|e| e.into_inner());
        pods.get(&identity.pod_uid).map(|entry| entry.for_container(identity.container_id.as_deref()))
    }
}

impl Store {
    fn new(node: String, metrics: Arc<Metrics>) -> Self {
        let status = DirectoryStatus { state: DirectoryState::Starting, node, pods: 0, updates: 0, error: None };
        Self { pods: RwLock::new(HashMap::new()), status: tokio::sync::watch::channel(status).0, metrics }
    }

    /// Runs `change` on the map, then publishes the new size.
    fn change(&self, change: impl FnOnce(&mut HashMap<String, PodEntry>)) {
        let size = {
            let mut pods = self.pods.write().unwrap_or_else(|e| e.into_inner());
            change(&mut pods);
            pods.len()
        };
        self.metrics.pod_directory_pods.set(size as i64);
        self.status.send_modify(|s| {
            s.pods = size;
            s.updates += 1;
        });
    }

    /// A full list arrived: it replaces the map (pods deleted while the
    /// watch was down are gone), and the directory is in step again.
    fn replace(&self, pods: HashMap<String, PodEntry>) {
        self.change(|map| *map = pods);
        let before = self.status.borrow().state;
        self.status.send_modify(|s| {
            s.state = DirectoryState::Synced;
            s.error = None;
        });
        self.metrics.pod_directory_degraded.set(0);
        let size = self.status.borrow().pods;
        match before {
            DirectoryState::Starting => tracing::info!(pods = size, "kubernetes pod directory synced"),
            DirectoryState::Degraded => {
                tracing::info!(pods = size, "kubernetes pod directory recovered: pods are named again")
            }
            DirectoryState::Synced => tracing::debug!(pods = size, "kubernetes pod directory listed again"),
        }
    }

    /// The API server failed: warn once per outage, keep what is known.
    fn degrade(&self, error: &str, hint: &str) {
        let before = self.status.borrow().state;
        self.status.send_modify(|s| {
            s.state = DirectoryState::Degraded;
            s.error = Some(error.to_owned());
        });
        self.metrics.pod_directory_degraded.set(1);
        if before == DirectoryState::Degraded {
            tracing::debug!(error, "kubernetes pod directory still degraded");
        } else {
            tracing::warn!(
                error,
                "kubernetes pod directory degraded: pods it does not know yet are named by their UID only until the \
                 API server answers again; {hint}"
            );
        }
    }
}

/// Whether this process runs in a pod with a service account token.
fn in_cluster() -> bool {
    std::env::var_os("KUBERNETES_SERVICE_HOST").is_some_and(|h| !h.is_empty())
        && std::env::var_os("KUBERNETES_SERVICE_PORT").is_some_and(|p| !p.is_empty())
        && Path::new(SERVICE_ACCOUNT_TOKEN).is_file()
}

/// The API server as logs name it.
fn api_name(cfg: &KubernetesConfig) -> String {
    if cfg.api_url.is_empty() { "in-cluster service account".to_owned() } else { cfg.api_url.clone() }
}

/// The client configuration: `api_url` with its CA and token file, or the
/// in-cluster service account.
fn client_config(cfg: &KubernetesConfig) -> Result<kube::Config, KubernetesError> {
    if cfg.api_url.is_empty() {
        return kube::Config::incluster().map_err(KubernetesError::InCluster);
    }
    let uri =
        cfg.api_url.parse::<http::Uri>().map_err(|source| KubernetesError::Url { url: cfg.api_url.clone(), source })?;
    let mut config = kube::Config::new(uri);
    if !cfg.ca_file.as_os_str().is_empty() {
        let path = cfg.ca_file.display().to_string();
        let pem =
            std::fs::read(&cfg.ca_file).map_err(|source| KubernetesError::CaFile { path: path.clone(), source })?;
        use rustls_pki_types::pem::PemObject as _;
        let ders: Vec<Vec<u8>> = rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
            .filter_map(Result::ok)
            .map(|der| der.as_ref().to_vec())
            .collect();
        if ders.is_empty() {
            return Err(KubernetesError::NoCertificate { path });
        }
        config.root_cert = Some(ders);
    }
    if !cfg.token_file.as_os_str().is_empty() {
        config.auth_info.token_file = Some(cfg.token_file.display().to_string());
    }
    Ok(config)
}
