//! Kubernetes identity on a node, end to end: one interceptor (eBPF mode)
//! covering two workloads in the same run, one in a cgroup named the way
//! the kubelet names a pod's container
//! (`kubepods.slice/kubepods-pod<uid>.slice/cri-containerd-<id>.scope`), one
//! in a node service's cgroup. The pod directory watches a fake API server
//! (`kubernetes.api_url`) that describes the UID as pod `billing-0` of
//! namespace `team-a`, label `app=billing`. With
//! `app_name = "{namespace|host}/{pod_label:app|none}"` the two reach a
//! recording fake Akto under two app names, and local rules scoped to the
//! pod block the pod's requests only.
//!
//! The rules are scoped by what the pod directory says of the pod
//! ([`POD_SCOPES`]): its namespace and a label selector.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use interceptor::testing::{
    Cgroup, Interceptor, Netns,
    akto::FakeAkto,
    clients::{ClientEnv, HostsFile, HttpRequest, HttpVersion, curl},
    kube::{FakeKubeApi, FakePod},
    provider::{FakeProvider, TestPki},
    require_privileges,
};
use interceptor_tests::stage::{start_interceptor, trust_bundle};
use serde_json::{Value, json};

const UID: &str = "5c7e0d2a-91b3-4f6e-8a2d-0b1c2d3e4f50";
const CONTAINER: &str = "9f8e7d6c5b4a39281706f5e4d3c2b1a09f8e7d6c5b4a39281706f5e4d3c2b1a0";
const NODE: &str = "node-a";
/// The scopes of the two rules: the pod's cgroup path (under the test's
/// own cgroup tree, hence the leading `*`).
const POD_SCOPES: [&str; 2] = ["namespace:team-a", "label:app=billing"];

/// Waits until the interceptor's pod directory has listed the pods.
fn wait_synced(proxy: &Interceptor, netns: &Netns) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = proxy.status(netns)?;
        if status["pod_directory"]["state"] == "synced" && status["pod_directory"]["pods"] == 1 {
            return Ok(status["pod_directory"].clone());
        }
        if Instant::now() > deadline {
            bail!("the pod directory never synced: {status}\n{}", proxy.log_text());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn chat(prompt: &str) -> HttpRequest {
    HttpRequest::post_json(
        "https://api.openai.com/v1/chat/completions",
        &json!({"model": "gpt-4o", "messages": [{"role": "user", "content": prompt}]}),
    )
}

/// The app name (the `host` of `requestHeaders`) of Akto's request checks
/// carrying `marker`.
fn app_names(akto: &FakeAkto, marker: &str) -> Vec<String> {
    akto.calls()
        .iter()
        .filter(|c| c.query_param("guardrails") == Some("true"))
        .filter(|c| c.body["requestPayload"].as_str().is_some_and(|p| p.contains(marker)))
        .filter_map(|c| serde_json::from_str::<Value>(c.body["requestHeaders"].as_str()?).ok())
        .filter_map(|h| h["host"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_and_a_node_process_get_their_own_app_names_and_scoped_rules() -> Result<()> {
    if !require_privileges("a_pod_and_a_node_process_get_their_own_app_names_and_scoped_rules") {
        return Ok(());
    }
    let netns = Netns::new("kube_ident")?;
    netns.add_addr("lo", "198.18.0.10/32")?;
    // The attach point plays the node's cgroup root.
    let root = Cgroup::new("kube_ident_root")?;
    let agent_cg = Cgroup::new("kube_ident_agent")?;
    let kubepods = root.child_named("kubepods.slice")?;
    let pod_slice = kubepods.child_named(&format!("kubepods-pod{}.slice", UID.replace('-', "_")))?;
    let pod_cg = pod_slice.child_named(&format!("cri-containerd-{CONTAINER}.scope"))?;
    let system = root.child_named("system.slice")?;
    let host_cg = system.child_named("cron.service")?;

    let pki = TestPki::with_defaults()?;
    let scratch = tempfile::tempdir()?;
    let upstream_ca = pki.write_ca(scratch.path())?;
    let _provider = FakeProvider::start_in(&netns, "198.18.0.10:443".parse()?, &pki)?;
    let akto = FakeAkto::start_in(&netns, "127.0.0.1:0".parse()?)?;
    let api = FakeKubeApi::start_in(&netns, "127.0.0.1:0".parse()?)?;
    api.apply(
        FakePod::new(UID, "billing-0", "team-a", NODE)
            .label("app", "billing")
            .service_account("billing")
            .container("agent", CONTAINER),
    );
    api.apply(FakePod::new("00000000-0000-0000-0000-000000000001", "elsewhere", "team-b", "node-b"));

    let policy = scratch.path().join("policy.toml");
    let rules = format!(
        r#"
[[detectors]]
name = "falcon_ns"
keywords = ["falcon-namespace"]

[[detectors]]
name = "falcon_label"
keywords = ["falcon-label"]

[[rules]]
id = "team-a-only"
detectors = ["falcon_ns"]
action = "block"
scope.workloads = ["{ns}"]

[[rules]]
id = "billing-only"
detectors = ["falcon_label"]
action = "block"
scope.workloads = ["{label}"]
"#,
        ns = POD_SCOPES[0],
        label = POD_SCOPES[1],
    );
    std::fs::write(&policy, rules)?;
    let config = format!(
        "[targets]\nmode = \"resolve\"\ncidrs = [\"198.18.0.10\"]\n\
         [tls]\nupstream_ca = \"{}\"\n\
         [guardrails]\nbackends = [\"local\", \"akto\"]\npolicy_file = \"{}\"\n\
         [guardrails.akto]\nurl = \"{}\"\napp_name = \"{{namespace|host}}/{{pod_label:app|none}}\"\n\
         [kubernetes]\nenabled = \"on\"\nnode_name = \"{NODE}\"\napi_url = \"{}\"\n",
        upstream_ca.display(),
        policy.display(),
        akto.url(),
        api.url(),
    );
    let proxy = start_interceptor(&netns, &agent_cg, &root, &config, "ebpf")?;
    let directory = wait_synced(&proxy, &netns)?;
    assert_eq!(directory["node"], NODE, "{directory}");
    // The interceptor asked for its node's pods only.
    for request in api.requests() {
        assert_eq!(request.param("fieldSelector"), Some("spec.nodeName=node-a"), "{request:?}");
    }

    let bundle = trust_bundle(&proxy, &pki, scratch.path())?;
    let hosts = HostsFile::with_defaults()?;
    let pod = ClientEnv::new(&bundle).in_netns(&netns).in_cgroup(&pod_cg).with_hosts(&hosts);
    let host = ClientEnv::new(&bundle).in_netns(&netns).in_cgroup(&host_cg).with_hosts(&hosts);

    // Two workloads, two app names.
    let r = curl(&pod, &chat("hello from the pod"), HttpVersion::Http2).await?;
    assert_eq!(r.status, 200, "{}", r.verbose);
    let r = curl(&host, &chat("hello from the node"), HttpVersion::Http2).await?;
    assert_eq!(r.status, 200, "{}", r.verbose);
    assert_eq!(app_names(&akto, "hello from the pod"), ["team-a-billing"]);
    assert_eq!(app_names(&akto, "hello from the node"), ["host-none"]);
    let rec = proxy.wait_connection(Duration::from_secs(5), |e| e["cgroup_id"] == pod_cg.id().unwrap_or(0))?;
    assert_eq!(rec["pod"], "team-a/billing-0", "{rec}");
    let rec = proxy.wait_connection(Duration::from_secs(5), |e| e["cgroup_id"] == host_cg.id().unwrap_or(0))?;
    assert!(rec.get("pod").is_none(), "a node process has no pod: {rec}");

    // Rules scoped to the pod's namespace and label: the pod is blocked, the
    // node process is not.
    for (marker, rule) in [("falcon-namespace", "team-a-only"), ("falcon-label", "billing-only")] {
        let r = curl(&pod, &chat(&format!("about {marker}")), HttpVersion::Http2).await?;
        assert_eq!(r.status, 403, "{rule}: {}", r.body_text());
        let r = curl(&host, &chat(&format!("about {marker}")), HttpVersion::Http2).await?;
        assert_eq!(r.status, 200, "{rule} must not apply outside the pod: {}", r.body_text());
    }
    // Audit events are written off the request path: wait for both.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let rules: Vec<String> = proxy
            .audit_events()
            .into_iter()
            .filter(|a| a["decision"] == "block")
            .flat_map(|a| a["rules"].as_array().cloned().unwrap_or_default())
            .filter_map(|r| r.as_str().map(str::to_owned))
            .collect();
        if rules.iter().any(|r| r == "team-a-only") && rules.iter().any(|r| r == "billing-only") {
            break;
        }
        if Instant::now() > deadline {
            bail!("no audited block by both scoped rules: {rules:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}
