//! Naming workloads from what the kernel recorded: a cgroup id becomes the
//! cgroup's path, and a path in the kubelet's naming becomes a pod UID and a
//! container ID (systemd driver: `kubepods.slice/kubepods-burstable.slice/
//! kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope`; cgroupfs
//! driver: `kubepods/burstable/pod<uid>/<id>`).
//!
//! Paths are found by walking the cgroup2 tree once per unknown id (the id is
//! the directory's inode number) and cached.
//!
//! [`Workload`] (who opened a connection) is defined here, below both the
//! redirect that finds it and the data plane, audit and guardrails that
//! report it; this module imports nothing above `cgroup`.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, OnceLock},
};

use serde::Serialize;

/// Bound on cached ids; the cache starts over when full.
const CACHE: usize = 16_384;
/// Bound on directories visited per lookup.
const MAX_WALK: usize = 100_000;

/// The process that opened a redirected connection: as the kernel saw it at
/// `connect()` time (eBPF mode), or as its socket shows it when the proxy
/// accepts the connection (iptables mode). A `pid` of 0 means the process
/// was not found (then `comm` is empty) though the socket was: its `uid`
/// and `cgroup_id` still hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Workload {
    /// Process (thread-group) id.
    pub pid: u32,
    /// Id of the thread that connected.
    pub tid: u32,
    pub uid: u32,
    pub gid: u32,
    /// Process name: the thread-group leader's `comm`.
    pub comm: String,
    /// Name of the thread that connected (a runtime's worker thread, say),
    /// when it differs from `comm`; empty otherwise.
    pub thread: String,
    /// Executable path (`/proc/<pid>/exe`), when readable.
    pub exe: Option<Arc<str>>,
    /// The command line's first word (`argv[0]`), when readable.
    pub argv0: Option<Arc<str>>,
    pub cgroup_id: u64,
    /// cgroup path relative to the cgroup2 mount (`/kubepods.slice/...`).
    pub cgroup: Option<Arc<str>>,
    /// The Kubernetes pod the cgroup belongs to, when known.
    pub pod: Option<Arc<PodInfo>>,
}

impl Workload {
    /// Whether the process is known (not only its socket's uid and cgroup).
    pub fn has_process(&self) -> bool {
        self.pid != 0 && !self.comm.is_empty()
    }

    /// Names the pod (and container) the workload's cgroup belongs to, from
    /// `pods`; a pod `pods` does not know is named by its UID alone. Does
    /// nothing for a cgroup outside the kubelet's tree.
    pub fn name_pod(&mut self, pods: &dyn PodLookup) {
        if self.cgroup.is_none() && self.cgroup_id != 0 {
            // The redirect did not record the path: find it (cached).
            self.cgroup = cgroup_path(self.cgroup_id);
        }
        let Some(identity) = self.cgroup.as_deref().and_then(kube_identity) else { return };
        self.pod = Some(
            pods.pod(&identity).unwrap_or_else(|| Arc::new(PodInfo { uid: identity.pod_uid, ..PodInfo::default() })),
        );
    }
}

/// Names pods from what their cgroup paths reveal: the Kubernetes pod
/// directory answers it from memory (a map read, never I/O), so the data
/// plane can ask on every connection.
pub trait PodLookup: Send + Sync {
    /// The pod with `identity.pod_uid`, its `container` set when
    /// `identity.container_id` names one of its containers; `None` when the
    /// pod is not known.
    fn pod(&self, identity: &KubeIdentity) -> Option<Arc<PodInfo>>;
}

/// A Kubernetes pod, as the API server describes it, with the container a
/// connection came from. Only `uid` is set when the pod directory does not
/// know the pod (not yet seen, or the API server unreachable).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodInfo {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub service_account: Option<String>,
    /// Name of the container (not its runtime id), when the cgroup names one
    /// the pod's status lists.
    pub container: Option<String>,
}

/// Pod and container, as the cgroup path reveals them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KubeIdentity {
    pub pod_uid: String,
    pub container_id: Option<String>,
    pub qos: Option<String>,
}

struct Names {
    root: Option<PathBuf>,
    cache: Mutex<HashMap<u64, Option<Arc<str>>>>,
}

fn names() -> &'static Names {
    static NAMES: OnceLock<Names> = OnceLock::new();
    NAMES.get_or_init(|| Names { root: crate::cgroup::cgroup2_root().ok(), cache: Mutex::new(HashMap::new()) })
}

/// The cgroup path (relative to the cgroup2 mount, starting with `/`) of a
/// cgroup id, if it still exists.
pub fn cgroup_path(id: u64) -> Option<Arc<str>> {
    let names = names();
    let root = names.root.as_deref()?;
    if let Some(found) = names.cache.lock().unwrap_or_else(|e| e.into_inner()).get(&id) {
        return found.clone();
    }
    let found = find(root, id).map(|p| Arc::<str>::from(p.as_str()));
    let mut cache = names.cache.lock().unwrap_or_else(|e| e.into_inner());
    if cache.len() >= CACHE {
        cache.clear();
    }
    cache.insert(id, found.clone());
    found
}

/// Fills `workload.cgroup` from its id, without holding an async worker
/// through a walk: a known id is answered at once, an unknown one is
/// looked up on the blocking pool. Once per connection.
pub async fn name_cgroup(workload: &mut Workload) {
    let id = workload.cgroup_id;
    if id == 0 || workload.cgroup.is_some() {
        return;
    }
    let names = names();
    if names.root.is_none() {
        return;
    }
    let cached = names.cache.lock().unwrap_or_else(|e| e.into_inner()).get(&id).cloned();
    workload.cgroup = match cached {
        Some(found) => found,
        None => tokio::task::spawn_blocking(move || cgroup_path(id)).await.ok().flatten(),
    };
}

fn find(root: &Path, id: u64) -> Option<String> {
    let mut stack = vec![root.to_path_buf()];
    let mut visited = 0;
    while let Some(dir) = stack.pop() {
        visited += 1;
        if visited > MAX_WALK {
            return None;
        }
        if std::fs::metadata(&dir).is_ok_and(|m| m.ino() == id) {
            let rel = dir.strip_prefix(root).ok()?.to_string_lossy().into_owned();
            return Some(format!("/{rel}"));
        }
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(entry.path());
            }
        }
    }
    None
}

/// Pod UID, container ID and QoS class from a kubelet cgroup path.
pub fn kube_identity(path: &str) -> Option<KubeIdentity> {
    let mut identity: Option<KubeIdentity> = None;
    let mut qos = None;
    for part in path.split('/').filter(|p| !p.is_empty()) {
        let name = part.trim_end_matches(".slice").trim_end_matches(".scope");
        if let Some(rest) = name.strip_prefix("kubepods-") {
            // kubepods-burstable, kubepods-burstable-pod<uid>, kubepods-pod<uid>
            let (class, pod) = match rest.split_once("-pod") {
                Some((class, pod)) => (Some(class), Some(pod)),
                None if rest.starts_with("pod") => (None, rest.strip_prefix("pod")),
                None => (Some(rest), None),
            };
            if let Some(class) = class {
                qos = Some(class.to_string());
            }
            if let Some(pod) = pod {
                // The systemd driver writes the UID's dashes as underscores.
                identity = Some(KubeIdentity { pod_uid: pod.replace('_', "-"), container_id: None, qos: qos.clone() });
            }
        } else if let Some(pod) = name.strip_prefix("pod") {
            if !pod.is_empty() && pod.contains('-') {
                identity = Some(KubeIdentity { pod_uid: pod.to_string(), container_id: None, qos: qos.clone() });
            }
        } else if matches!(name, "burstable" | "besteffort" | "guaranteed") {
            qos = Some(name.to_string());
        } else if let Some(id) = identity.as_mut() {
            // cri-containerd-<id>, crio-<id>, docker-<id>, or a bare id.
            let container = name.rsplit('-').next().unwrap_or(name);
            if container.len() >= 12 && container.bytes().all(|b| b.is_ascii_hexdigit()) {
                id.container_id = Some(container.to_string());
            }
        }
    }
    identity
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn systemd_driver_paths_name_the_pod_and_container() {
        let p = "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1f2e3d4c_5b6a_7980_a1b2_c3d4e5f60718.slice/cri-containerd-0123456789abcdef0123456789abcdef.scope";
        let id = kube_identity(p).unwrap();
        assert_eq!(id.pod_uid, "1f2e3d4c-5b6a-7980-a1b2-c3d4e5f60718");
        assert_eq!(id.container_id.as_deref(), Some("0123456789abcdef0123456789abcdef"));
        assert_eq!(id.qos.as_deref(), Some("burstable"));
    }

    #[test]
    fn cgroupfs_driver_paths_name_the_pod_and_container() {
        let p = "/kubepods/besteffort/pod1f2e3d4c-5b6a-7980-a1b2-c3d4e5f60718/0123456789abcdef0123";
        let id = kube_identity(p).unwrap();
        assert_eq!(id.pod_uid, "1f2e3d4c-5b6a-7980-a1b2-c3d4e5f60718");
        assert_eq!(id.container_id.as_deref(), Some("0123456789abcdef0123"));
        assert_eq!(id.qos.as_deref(), Some("besteffort"));
        let guaranteed =
            kube_identity("/kubepods.slice/kubepods-pod9a8b7c6d_0000_1111_2222_333344445555.slice").unwrap();
        assert_eq!(guaranteed.pod_uid, "9a8b7c6d-0000-1111-2222-333344445555");
    }

    #[test]
    fn other_paths_are_not_pods() {
        assert_eq!(kube_identity("/user.slice/user-0.slice/session-1.scope"), None);
        assert_eq!(kube_identity("/system.slice/interceptor.service"), None);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_workload_gets_its_cgroup_path_once() {
        let Ok(root) = crate::cgroup::cgroup2_root() else { return };
        let own = crate::cgroup::own_cgroup(&root).unwrap();
        let id = std::fs::metadata(&own).unwrap().ino();
        let mut w = Workload { cgroup_id: id, ..Default::default() };
        name_cgroup(&mut w).await;
        assert_eq!(w.cgroup, cgroup_path(id));
        assert!(w.cgroup.is_some());
        let mut unknown = Workload::default();
        name_cgroup(&mut unknown).await;
        assert_eq!(unknown.cgroup, None, "no id, no walk");
    }

    #[test]
    fn a_cgroup_id_resolves_to_its_path() {
        let Ok(root) = crate::cgroup::cgroup2_root() else { return };
        let own = crate::cgroup::own_cgroup(&root).unwrap();
        let id = std::fs::metadata(&own).unwrap().ino();
        let path = cgroup_path(id).expect("own cgroup found");
        assert_eq!(root.join(path.trim_start_matches('/')), own);
        assert_eq!(cgroup_path(u64::MAX), None);
    }
}
