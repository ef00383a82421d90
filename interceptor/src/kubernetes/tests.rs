//! The pod directory against the fake API server (`testing::kube`): what a
//! list and watch events make known, what a deletion forgets, an expired
//! watch listing again, and an API server that is down or refuses.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use super::*;
use crate::{
    config::KubernetesConfig,
    testing::kube::{Availability, FakeKubeApi, FakePod},
    workload::Workload,
};

const NODE: &str = "node-a";
const UID: &str = "1f2e3d4c-5b6a-7980-a1b2-c3d4e5f60718";
const CONTAINER: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
/// Bound on every wait (the suite runs on loaded machines).
const WAIT: Duration = Duration::from_secs(30);

fn config(api: &FakeKubeApi) -> KubernetesConfig {
    KubernetesConfig { enabled: KubeEnabled::On, node_name: NODE.into(), api_url: api.url(), ..Default::default() }
}

fn billing() -> FakePod {
    FakePod::new(UID, "billing-0", "team-a", NODE)
        .label("app", "billing")
        .service_account("billing-sa")
        .container("agent", CONTAINER)
}

/// The pod's own cgroup, as the kubelet's systemd driver names it.
fn cgroup() -> String {
    format!("/kubepods.slice/kubepods-pod{}.slice/cri-containerd-{CONTAINER}.scope", UID.replace('-', "_"))
}

fn identity() -> KubeIdentity {
    crate::workload::kube_identity(&cgroup()).expect("a pod's cgroup")
}

/// Waits until the directory's status satisfies `pred`.
async fn wait_status(dir: &PodDirectory, what: &str, pred: impl Fn(&DirectoryStatus) -> bool) -> DirectoryStatus {
    let mut rx = dir.status();
    let found = match tokio::time::timeout(WAIT, rx.wait_for(|s| pred(s))).await {
        Ok(Ok(status)) => Some(status.clone()),
        _ => None,
    };
    found.unwrap_or_else(|| panic!("directory never {what}: {:?}", *dir.status().borrow()))
}

#[tokio::test]
async fn pods_of_this_node_are_named_until_deleted() {
    let api = FakeKubeApi::start().unwrap();
    api.apply(billing());
    api.apply(FakePod::new("other-node-pod", "x", "team-b", "node-b"));
    let metrics = Arc::new(Metrics::new());
    let dir = PodDirectory::start(&config(&api), Arc::clone(&metrics)).expect("on");
    let status = wait_status(&dir, "synced", |s| s.state == DirectoryState::Synced).await;
    assert_eq!(status.pods, 1, "only this node's pods: {status:?}");
    assert_eq!(status.node, NODE);

    let pod = dir.pod(&identity()).expect("listed pod is known");
    assert_eq!(pod.uid, UID);
    assert_eq!((pod.name.as_str(), pod.namespace.as_str()), ("billing-0", "team-a"));
    assert_eq!(pod.labels.get("app").map(String::as_str), Some("billing"));
    assert_eq!(pod.service_account.as_deref(), Some("billing-sa"));
    assert_eq!(pod.container.as_deref(), Some("agent"));
    // Every request asked for this node's pods only.
    let requests = api.requests();
    assert!(!requests.is_empty());
    for r in &requests {
        assert_eq!(r.param("fieldSelector"), Some("spec.nodeName=node-a"), "{r:?}");
    }

    // Added while watching, with a connection's workload named from it.
    let later = "aaaaaaaa-0000-1111-2222-333344445555";
    api.apply(FakePod::new(later, "web-1", "team-b", NODE).label("app", "web").container("web", "ab12cd34ef56ab12"));
    wait_status(&dir, "saw the added pod", |s| s.pods == 2).await;
    let mut w = Workload {
        pid: 7,
        comm: "node".into(),
        cgroup: Some(format!("/kubepods/besteffort/pod{later}/ab12cd34ef56ab12").into()),
        ..Workload::default()
    };
    w.name_pod(&dir);
    let pod = w.pod.as_deref().expect("named");
    assert_eq!((pod.namespace.as_str(), pod.name.as_str(), pod.container.as_deref()), ("team-b", "web-1", Some("web")));

    // Modified: the new labels are served.
    let updates = dir.status().borrow().updates;
    api.apply(billing().label("app", "billing-v2"));
    wait_status(&dir, "saw the change", |s| s.updates > updates).await;
    assert_eq!(dir.pod(&identity()).unwrap().labels["app"], "billing-v2");

    // Deleted: gone; a workload of that pod is named by its UID only.
    assert!(api.delete(UID));
    wait_status(&dir, "saw the deletion", |s| s.pods == 1).await;
    assert!(dir.pod(&identity()).is_none());
    let mut w = Workload { cgroup: Some(cgroup().into()), ..Workload::default() };
    w.name_pod(&dir);
    let pod = w.pod.as_deref().expect("UID-only");
    assert_eq!(pod.uid, UID);
    assert!(pod.name.is_empty() && pod.namespace.is_empty() && pod.container.is_none());
    // Not a pod's cgroup: nothing to name.
    let mut host = Workload { cgroup: Some("/system.slice/sshd.service".into()), ..Workload::default() };
    host.name_pod(&dir);
    assert!(host.pod.is_none());
    assert!(metrics.encode().contains("interceptor_pod_directory_pods 1"), "{}", metrics.encode());
}

#[tokio::test]
async fn an_expired_watch_lists_again_without_degrading() {
    let api = FakeKubeApi::start().unwrap();
    let dir = PodDirectory::start(&config(&api), Arc::new(Metrics::new())).expect("on");
    wait_status(&dir, "synced", |s| s.state == DirectoryState::Synced).await;
    // Wait for the watch to be open, then compact the history under it.
    api.wait_until(WAIT, |reqs| reqs.iter().any(|r| r.is_watch())).await.unwrap();
    api.expire();
    api.apply(billing());
    // The pod is known again through a second list (the watch from the old
    // version gets 410 too).
    wait_status(&dir, "relisted", |s| s.pods == 1).await;
    api.wait_until(WAIT, |reqs| reqs.iter().filter(|r| !r.is_watch()).count() >= 2).await.unwrap();
    assert!(dir.pod(&identity()).is_some());
    let status = dir.status().borrow().clone();
    assert_eq!(status.state, DirectoryState::Synced, "{status:?}");
}

/// Log lines, for the tests that count warnings.
#[derive(Clone, Default)]
struct LogBuf(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogBuf {
    fn warnings(&self) -> Vec<String> {
        let text = String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned();
        text.lines()
            .filter(|l| l.contains("WARN") && l.contains("interceptor::kubernetes"))
            .map(str::to_owned)
            .collect()
    }
}

/// A current-thread runtime: the directory's task logs through this
/// subscriber.
fn capture() -> (LogBuf, tracing::subscriber::DefaultGuard) {
    let logs = LogBuf::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt().with_writer(move || writer.clone()).with_ansi(false).finish();
    (logs, tracing::subscriber::set_default(subscriber))
}

#[tokio::test]
async fn an_unreachable_api_server_leaves_uid_only_names_and_recovers() {
    let (logs, _guard) = capture();
    let api = FakeKubeApi::start().unwrap();
    api.apply(billing());
    api.set_availability(Availability::Down);
    let metrics = Arc::new(Metrics::new());
    let dir = PodDirectory::start(&config(&api), Arc::clone(&metrics)).expect("on");
    let status = wait_status(&dir, "degraded", |s| s.state == DirectoryState::Degraded).await;
    assert!(status.error.is_some(), "{status:?}");
    assert!(metrics.encode().contains("interceptor_pod_directory_degraded 1"));
    // Connections go on, their pods named by UID.
    let mut w = Workload { cgroup: Some(cgroup().into()), ..Workload::default() };
    w.name_pod(&dir);
    assert_eq!(w.pod.as_deref().map(|p| (p.uid.as_str(), p.name.as_str())), Some((UID, "")));
    let warnings = logs.warnings();
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    assert!(warnings[0].contains("pod directory degraded") && warnings[0].contains("reachable"), "{warnings:?}");

    // Back: listed again, the pod is named.
    api.set_availability(Availability::Up);
    let status = wait_status(&dir, "recovered", |s| s.state == DirectoryState::Synced).await;
    assert_eq!((status.pods, status.error), (1, None));
    assert_eq!(dir.pod(&identity()).map(|p| p.name.clone()).as_deref(), Some("billing-0"));
    assert!(metrics.encode().contains("interceptor_pod_directory_degraded 0"));
    assert_eq!(logs.warnings().len(), 1, "recovery is not a warning");
}

#[tokio::test]
async fn a_forbidden_list_warns_once_with_the_rbac_fix() {
    let (logs, _guard) = capture();
    let api = FakeKubeApi::start().unwrap();
    api.apply(billing());
    api.set_availability(Availability::Forbidden);
    let dir = PodDirectory::start(&config(&api), Arc::new(Metrics::new())).expect("on");
    // Three refusals: one outage, one warning.
    api.wait_until(WAIT, |reqs| reqs.len() >= 3).await.unwrap();
    let status = dir.status().borrow().clone();
    assert_eq!(status.state, DirectoryState::Degraded, "{status:?}");
    assert!(status.error.as_deref().is_some_and(|e| e.contains("forbidden")), "{status:?}");
    assert!(dir.pod(&identity()).is_none());
    let warnings = logs.warnings();
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    assert!(warnings[0].contains("rbac.yaml"), "{warnings:?}");

    api.set_availability(Availability::Up);
    wait_status(&dir, "recovered", |s| s.state == DirectoryState::Synced).await;
    assert!(dir.pod(&identity()).is_some());
}

#[tokio::test]
async fn the_directory_is_off_unless_asked_or_in_a_cluster() {
    let metrics = Arc::new(Metrics::new());
    let off = KubernetesConfig { enabled: KubeEnabled::Off, node_name: NODE.into(), ..Default::default() };
    assert!(PodDirectory::start(&off, Arc::clone(&metrics)).is_none());
    // Auto without api_url: on only in a cluster (never on a test machine).
    if !in_cluster() {
        let auto = KubernetesConfig { node_name: NODE.into(), ..Default::default() };
        assert!(PodDirectory::start(&auto, Arc::clone(&metrics)).is_none());
    }
    // Asked for, but no node name to scope the watch: off, with a warning.
    let api = FakeKubeApi::start().unwrap();
    let nameless = KubernetesConfig { node_name: String::new(), ..config(&api) };
    assert!(PodDirectory::start(&nameless, Arc::clone(&metrics)).is_none());
    // A CA file that is not a certificate: degraded from the start.
    let dir = tempfile::tempdir().unwrap();
    let bogus = dir.path().join("ca.pem");
    std::fs::write(&bogus, "not a certificate").unwrap();
    let bad = KubernetesConfig { ca_file: bogus, ..config(&api) };
    let pods = PodDirectory::start(&bad, metrics).expect("on");
    let status = pods.status().borrow().clone();
    assert_eq!(status.state, DirectoryState::Degraded);
    assert!(status.error.as_deref().is_some_and(|e| e.contains("no PEM certificate")), "{status:?}");
}

#[tokio::test]
async fn dropping_the_directory_stops_the_watch() {
    let api = FakeKubeApi::start().unwrap();
    let dir = PodDirectory::start(&config(&api), Arc::new(Metrics::new())).expect("on");
    let mut status = dir.status();
    wait_status(&dir, "synced", |s| s.state == DirectoryState::Synced).await;
    drop(dir);
    // The watch task held the last sender: the channel closes with it.
    tokio::time::timeout(WAIT, async { while status.changed().await.is_ok() {} }).await.expect("the watch task ended");
}
