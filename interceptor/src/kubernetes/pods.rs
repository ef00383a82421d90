//! A pod as the directory keeps it: what the API server says about it,
//! reduced to the [`PodInfo`] the data plane reads, once per container so
//! that a lookup hands out a shared `Arc` and allocates nothing. Pure: no
//! I/O.

use std::sync::Arc;

use k8s_openapi::api::core::v1::{ContainerStatus, Pod};

use crate::workload::PodInfo;

/// One pod of this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct PodEntry {
    /// The pod, no container named.
    pod: Arc<PodInfo>,
    /// (runtime id without its `<runtime>://` prefix, the pod with that
    /// container named), for every container the status lists.
    containers: Vec<(String, Arc<PodInfo>)>,
}

impl PodEntry {
    /// The entry for `pod`, keyed by its UID; `None` for a pod without one
    /// (the API server always sets it).
    pub(super) fn of(pod: &Pod) -> Option<(String, Self)> {
        let meta = &pod.metadata;
        let uid = meta.uid.clone().filter(|u| !u.is_empty())?;
        let info = PodInfo {
            uid: uid.clone(),
            name: meta.name.clone().unwrap_or_default(),
            namespace: meta.namespace.clone().unwrap_or_default(),
            labels: meta.labels.clone().unwrap_or_default(),
            service_account: pod.spec.as_ref().and_then(|s| s.service_account_name.clone()).filter(|s| !s.is_empty()),
            container: None,
        };
        let status = pod.status.as_ref();
        let statuses = status.into_iter().flat_map(|s| {
            let lists: [&Option<Vec<ContainerStatus>>; 3] =
                [&s.container_statuses, &s.init_container_statuses, &s.ephemeral_container_statuses];
            lists.into_iter().flatten().flatten()
        });
        let containers = statuses
            .filter_map(|c| {
                let id = runtime_id(c.container_id.as_deref()?)?;
                let named = PodInfo { container: Some(c.name.clone()), ..info.clone() };
                Some((id.to_owned(), Arc::new(named)))
            })
            .collect();
        Some((uid, Self { pod: Arc::new(info), containers }))
    }

    /// The pod with the container whose runtime id is `container_id` named,
    /// else the pod alone. Ids match when one is a prefix of the other
    /// (runtimes shorten them in some places).
    pub(super) fn for_container(&self, container_id: Option<&str>) -> Arc<PodInfo> {
        let found = container_id.filter(|id| !id.is_empty()).and_then(|want| {
            self.containers.iter().find(|(id, _)| id.starts_with(want) || want.starts_with(id.as_str()))
        });
        Arc::clone(found.map_or(&self.pod, |(_, info)| info))
    }
}

/// `containerd://<id>` (or `cri-o://`, `docker://`) → `<id>`.
fn runtime_id(container_id: &str) -> Option<&str> {
    let id = container_id.split_once("://").map_or(container_id, |(_, id)| id);
    (!id.is_empty()).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn a_pod_is_named_with_its_containers() {
        let p = pod(serde_json::json!({
            "metadata": {"name": "billing-0", "namespace": "team-a", "uid": "u-1", "labels": {"app": "billing"}},
            "spec": {"serviceAccountName": "billing", "containers": [{"name": "agent"}, {"name": "sidecar"}]},
            "status": {
                "containerStatuses": [
                    {"name": "agent", "containerID": "containerd://aaaa1111", "image": "i", "imageID": "", "ready": true, "restartCount": 0},
                    {"name": "sidecar", "image": "i", "imageID": "", "ready": false, "restartCount": 0}
                ],
                "initContainerStatuses": [
                    {"name": "init", "containerID": "cri-o://bbbb2222", "image": "i", "imageID": "", "ready": false, "restartCount": 0}
                ]
            }
        }));
        let (uid, entry) = PodEntry::of(&p).unwrap();
        assert_eq!(uid, "u-1");
        let agent = entry.for_container(Some("aaaa1111"));
        assert_eq!(agent.name, "billing-0");
        assert_eq!(agent.namespace, "team-a");
        assert_eq!(agent.labels["app"], "billing");
        assert_eq!(agent.service_account.as_deref(), Some("billing"));
        assert_eq!(agent.container.as_deref(), Some("agent"));
        assert_eq!(entry.for_container(Some("bbbb2222")).container.as_deref(), Some("init"));
        // A shortened id still matches; an unknown one names the pod only.
        assert_eq!(entry.for_container(Some("aaaa")).container.as_deref(), Some("agent"));
        let unknown = entry.for_container(Some("cccc3333"));
        assert_eq!((unknown.name.as_str(), unknown.container.as_deref()), ("billing-0", None));
        assert_eq!(entry.for_container(None).container, None);
        assert_eq!(entry.for_container(Some("")).container, None);
        // Lookups share the entry's allocation.
        assert!(Arc::ptr_eq(&agent, &entry.for_container(Some("aaaa1111"))));
    }

    #[test]
    fn sparse_pods_are_named_as_far_as_known() {
        let (_, entry) = PodEntry::of(&pod(serde_json::json!({"metadata": {"uid": "u-2"}}))).unwrap();
        let info = entry.for_container(Some("x"));
        assert_eq!(info.uid, "u-2");
        assert!(info.name.is_empty() && info.labels.is_empty() && info.service_account.is_none());
        assert!(PodEntry::of(&pod(serde_json::json!({"metadata": {"name": "no-uid"}}))).is_none());
        assert_eq!(runtime_id("docker://"), None);
        assert_eq!(runtime_id("abc"), Some("abc"));
    }
}
