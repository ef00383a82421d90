//! One Akto app per workload, in process: the data plane `app` builds, with
//! the pod directory watching a fake API server, in front of a fake
//! provider and a fake Akto. Two clients, told apart by their loopback
//! address, stand for a pod's process and a node process: with
//! `app_name = "{namespace|host}/{pod_label:app|none}"` their checks reach
//! Akto under two app names.

use std::{collections::HashMap, net::IpAddr, sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use interceptor::{
    config::{Backend, Config, KubeEnabled, KubernetesConfig, RedirectMode},
    dataplane::{self, DataPlaneBuilder},
    kubernetes::{DirectoryState, PodDirectory},
    metrics::Metrics,
    net::{ClientAddr, NoOriginalDst, OrigDstAddr, OrigDstResolver, WorkloadLookup},
    proxy::{Listeners, Snapshot},
    testing::{
        akto::FakeAkto,
        kube::{FakeKubeApi, FakePod},
        provider::{FakeProvider, TestPki},
    },
    workload::{PodLookup, Workload},
};
use tokio::{net::TcpStream, sync::watch};

const UID: &str = "1f2e3d4c-5b6a-7980-a1b2-c3d4e5f60718";
const CONTAINER: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const POD_CLIENT: &str = "127.0.0.2";
const HOST_CLIENT: &str = "127.0.0.3";

/// Every connection goes to `upstream`; its workload is the one of its
/// client's address (what the redirect records per socket).
struct ByClientAddress {
    upstream: std::net::SocketAddr,
    workloads: HashMap<IpAddr, Workload>,
}

impl OrigDstResolver for ByClientAddress {
    fn original_dst(&self, _: &TcpStream, _: ClientAddr) -> Result<OrigDstAddr, NoOriginalDst> {
        Ok(OrigDstAddr(self.upstream))
    }

    fn workload(&self, client: ClientAddr, _: OrigDstAddr) -> WorkloadLookup {
        Box::pin(std::future::ready(self.workloads.get(&client.0.ip()).cloned()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workloads_reach_akto_as_two_apps() -> Result<()> {
    let api = FakeKubeApi::start()?;
    api.apply(
        FakePod::new(UID, "billing-0", "team-a", "node-a")
            .label("app", "billing")
            .service_account("billing")
            .container("agent", CONTAINER),
    );
    let pki = TestPki::with_defaults()?;
    let provider = FakeProvider::start(std::net::TcpListener::bind("127.0.0.1:0")?, &pki)?;
    let akto = FakeAkto::start()?;
    let dir = tempfile::tempdir()?;

    let mut config = Config::default();
    config.tls.upstream_ca = pki.write_ca(dir.path())?;
    // In process: nothing is redirected, upstream sockets are not marked.
    config.redirect.mode = RedirectMode::None;
    config.proxy.mark = 0;
    config.guardrails.backends = vec![Backend::Akto];
    config.guardrails.akto.url = akto.url();
    config.guardrails.akto.app_name = "{namespace|host}/{pod_label:app|none}".into();
    config.kubernetes = KubernetesConfig {
        enabled: KubeEnabled::On,
        node_name: "node-a".into(),
        api_url: api.url(),
        ..KubernetesConfig::default()
    };
    config.validate()?;

    let pods = PodDirectory::start(&config.kubernetes, Arc::new(Metrics::new())).context("directory on")?;
    let mut status = pods.status();
    tokio::time::timeout(Duration::from_secs(30), status.wait_for(|s| s.state == DirectoryState::Synced))
        .await
        .context("the pod directory never synced")??;

    let ca = dataplane::certificate_authority(&config, dir.path())?;
    let ca_pem = ca.cert_pem().to_string();
    let tls = Arc::new(dataplane::tls_termination(&config, ca)?);
    let (_snapshot_tx, snapshot) = watch::channel(Arc::new(Snapshot::new(config.domain_policy()?)));
    let mut builder = DataPlaneBuilder::new(&config).tls(Some(tls)).pods(Some(Arc::new(pods) as Arc<dyn PodLookup>));
    let _guardrails = builder.configured_guardrails()?;
    let pod_cgroup =
        format!("/kubepods.slice/kubepods-pod{}.slice/cri-containerd-{CONTAINER}.scope", UID.replace('-', "_"));
    let workloads = HashMap::from([
        (
            POD_CLIENT.parse()?,
            Workload {
                pid: 10,
                uid: 1000,
                comm: "python3".into(),
                cgroup: Some(pod_cgroup.into()),
                ..Workload::default()
            },
        ),
        (
            HOST_CLIENT.parse()?,
            Workload {
                pid: 20,
                comm: "curl".into(),
                cgroup: Some("/system.slice/cron.service".into()),
                ..Workload::default()
            },
        ),
    ]);
    let resolver = Arc::new(ByClientAddress { upstream: provider.local_addr(), workloads });
    let listeners = Listeners::bind(std::net::Ipv4Addr::LOCALHOST, None, 0, 0).await?;
    let addr = std::net::SocketAddr::V4(listeners.addrs.v4);
    let (_stop, shutdown) = watch::channel(false);
    let _proxy = builder.serve(listeners, resolver, snapshot, shutdown)?;

    let body = serde_json::json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}]}).to_string();
    for (from, expected) in [(POD_CLIENT, "team-a-billing"), (HOST_CLIENT, "host-none")] {
        akto.clear_calls();
        let client = reqwest::Client::builder()
            .local_address(Some(from.parse()?))
            .tls_certs_only(reqwest::Certificate::from_pem_bundle(ca_pem.as_bytes())?)
            .resolve("api.openai.com", addr)
            .no_proxy()
            .timeout(Duration::from_secs(20))
            .build()?;
        let resp = client.post("https://api.openai.com/v1/chat/completions").body(body.clone()).send().await?;
        assert_eq!(resp.status(), 200, "{from}");
        let calls = akto.calls();
        let check = calls.iter().find(|c| c.query_param("guardrails") == Some("true")).context("a request check")?;
        let headers: serde_json::Value =
            serde_json::from_str(check.body["requestHeaders"].as_str().context("requestHeaders")?)?;
        assert_eq!(headers["host"], expected, "{from}: {headers}");
        // The response check of the same exchange names the same app.
        let response =
            calls.iter().find(|c| c.query_param("response_guardrails") == Some("true")).context("a response check")?;
        let headers: serde_json::Value =
            serde_json::from_str(response.body["requestHeaders"].as_str().context("requestHeaders")?)?;
        assert_eq!(headers["host"], expected, "{from}: {headers}");
    }
    Ok(())
}
