//! The watch loop: kube's watcher over this node's pods, fed into the
//! [`Store`]. A list replaces the map when it is complete; watch events
//! change one pod. Every `resync` the watcher is started afresh (a full
//! list); after a failure it is too, after a jittered exponential backoff.
//! An expired resource version (`410 Gone`) is not a failure: the watcher
//! lists again by itself.

use std::{collections::HashMap, pin::pin, sync::Arc, time::Duration};

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher::{self, Event};
use tokio::time::Instant;

use super::{PodEntry, Store};

/// First wait after a failure; doubled per failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Watches the pods of `node` until the task is aborted.
pub(super) async fn run(api: kube::Api<Pod>, node: String, resync: Duration, store: Arc<Store>) {
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let mut backoff = FIRST_BACKOFF;
    loop {
        let mut events = pin!(watcher::watcher(api.clone(), config.clone()));
        let resync_at = Instant::now() + resync;
        // The pods of a list in progress (between `Init` and `InitDone`).
        let mut listing: Option<HashMap<String, PodEntry>> = None;
        let failed = loop {
            let event = tokio::select! {
                _ = tokio::time::sleep_until(resync_at) => break false,
                event = events.next() => event,
            };
            match event {
                None => break false,
                Some(Ok(Event::Init)) => listing = Some(HashMap::new()),
                Some(Ok(Event::InitApply(pod))) => {
                    if let Some((uid, entry)) = PodEntry::of(&pod) {
                        listing.get_or_insert_default().insert(uid, entry);
                    }
                }
                Some(Ok(Event::InitDone)) => {
                    store.replace(listing.take().unwrap_or_default());
                    backoff = FIRST_BACKOFF;
                }
                Some(Ok(Event::Apply(pod))) => {
                    if let Some((uid, entry)) = PodEntry::of(&pod) {
                        store.change(|pods| {
                            pods.insert(uid, entry);
                        });
                    }
                }
                Some(Ok(Event::Delete(pod))) => {
                    if let Some(uid) = pod.metadata.uid.as_deref() {
                        store.change(|pods| {
                            pods.remove(uid);
                        });
                    }
                }
                Some(Err(error)) if expired(&error) => {
                    tracing::debug!("kubernetes pod watch expired; listing again");
                }
                Some(Err(error)) => {
                    store.degrade(&crate::error::chain(&error), hint(&error));
                    break true;
                }
            }
        };
        if failed {
            tokio::time::sleep(jitter(backoff)).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

/// `d` plus up to half of it, so that the nodes of a cluster do not all
/// come back to a recovering API server at once.
fn jitter(d: Duration) -> Duration {
    d + d.mul_f64(rand::random::<f64>() / 2.0)
}

/// The HTTP status the API server answered with, if it answered.
fn api_code(error: &watcher::Error) -> Option<u16> {
    match error {
        watcher::Error::InitialListFailed(e) | watcher::Error::WatchStartFailed(e) | watcher::Error::WatchFailed(e) => {
            match e {
                kube::Error::Api(response) => Some(response.code),
                _ => None,
            }
        }
        watcher::Error::WatchError(response) => Some(response.code),
        _ => None,
    }
}

/// The resource version the watch resumed from is too old (`410 Gone`).
fn expired(error: &watcher::Error) -> bool {
    api_code(error) == Some(410)
}

/// What an operator should look at for `error`.
fn hint(error: &watcher::Error) -> &'static str {
    match api_code(error) {
        Some(401) => "the API server does not accept the service account token",
        Some(403) => {
            "the service account may not list and watch pods: apply the ClusterRole and ClusterRoleBinding of \
             deploy/kubernetes/rbac.yaml"
        }
        Some(_) => "the API server answered with an error",
        None => "is the API server reachable from this node?",
    }
}
