//! A node and a pod: the "pod" is its own network namespace joined to the
//! "node" by a veth pair, in its own child cgroup under the attach point.
//! Unmodified clients in it (curl, Node's `fetch`) reaching the provider's
//! address are intercepted by the interceptor on the node, which listens on
//! the node's veth address, with the right original destination, workload
//! and guardrails.

use std::time::Duration;

use anyhow::{Context, Result};
use interceptor::testing::{
    Cgroup, Netns,
    clients::{ClientEnv, HostsFile, HttpRequest, HttpVersion, curl, node_fetch},
    provider::{FakeProvider, TestPki},
    require_privileges, veth_pair,
};
use interceptor_tests::stage::{start_interceptor, trust_bundle};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_clients_are_intercepted_and_guardrailed_by_the_node_interceptor() -> Result<()> {
    if !require_privileges("pod_clients_are_intercepted_and_guardrailed_by_the_node_interceptor") {
        return Ok(());
    }
    let node = Netns::new("pod_node")?;
    node.add_addr("lo", "198.18.0.10/32")?;
    let pod = Netns::new("pod_pod")?;
    let _veth = veth_pair(Some(&node), &pod, "198.18.1.1/24", "198.18.1.2/24")?;
    pod.run(&["route", "add", "default", "via", "198.18.1.1"])?;
    // The attach point plays the node's cgroup root; the pod's cgroup is a child.
    let root = Cgroup::new("pod_root")?;
    let node_cg = Cgroup::new("pod_agent")?;
    // Named the way the kubelet's systemd cgroup driver names them.
    let kubepods = root.child_named("kubepods.slice")?;
    let besteffort = kubepods.child_named("kubepods-besteffort.slice")?;
    let pod_cg = besteffort.child_named("kubepods-besteffort-pod1f2e3d4c_5b6a_7980_a1b2_c3d4e5f60718.slice")?;

    let pki = TestPki::with_defaults()?;
    let dir = tempfile::tempdir()?;
    let upstream_ca = pki.write_ca(dir.path())?;
    let provider = FakeProvider::start_in(&node, "198.18.0.10:443".parse()?, &pki)?;
    let config = format!(
        "[proxy]\naddress_v4 = \"198.18.1.1\"\naddress_v6 = \"\"\n[targets]\nmode = \"resolve\"\ncidrs = [\"198.18.0.10\"]\n\
         [tls]\nupstream_ca = \"{}\"\n",
        upstream_ca.display()
    );
    let proxy = start_interceptor(&node, &node_cg, &root, &config, "ebpf")?;
    let bundle = trust_bundle(&proxy, &pki, dir.path())?;
    let hosts = HostsFile::with_defaults()?;
    let env = ClientEnv::new(&bundle).in_netns(&pod).in_cgroup(&pod_cg).with_hosts(&hosts);

    let chat = |prompt: &str| {
        HttpRequest::post_json(
            "https://api.openai.com/v1/chat/completions",
            &serde_json::json!({"model": "gpt-4o", "messages": [{"role": "user", "content": prompt}]}),
        )
    };
    let r = curl(&env, &chat("card 4111 1111 1111 1111"), HttpVersion::Http2).await?;
    assert_eq!(r.status, 200, "{}", r.verbose);
    assert!(r.issuer.clone().unwrap_or_default().contains("interceptor CA"), "{:?}", r.issuer);
    let rec = proxy.wait_connection(Duration::from_secs(5), |e| e["comm"] == "curl")?;
    assert_eq!(rec["mode"], "intercept", "{rec}");
    assert_eq!(rec["orig_dst"], "198.18.0.10:443", "{rec}");
    assert!(rec["client"].as_str().is_some_and(|c| c.starts_with("198.18.1.2:")), "the pod's address: {rec}");
    assert_eq!(rec["cgroup_id"], pod_cg.id()?, "{rec}");
    let seen = String::from_utf8_lossy(&provider.requests().pop().context("forwarded")?.body).to_string();
    assert!(seen.contains("[REDACTED:credit_card]") && !seen.contains("4111"), "{seen}");

    // The audit event names the pod from its cgroup path.
    let audit = proxy
        .audit_events()
        .into_iter()
        .find(|a| a["decision"] == "modify")
        .context("no audit event for the redaction")?;
    assert_eq!(audit["workload"]["pod_uid"], "1f2e3d4c-5b6a-7980-a1b2-c3d4e5f60718", "{audit}");
    assert_eq!(audit["workload"]["comm"], "curl", "{audit}");

    let key = format!("-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----", "MIIEvQIBADANBgkq".repeat(3));
    let r = node_fetch(&env, &chat(&key)).await?;
    assert_eq!(r.status, 403, "{}", r.body);
    let rec = proxy.wait_connection(Duration::from_secs(5), |e| e["comm"] == "node")?;
    assert_eq!(rec["orig_dst"], "198.18.0.10:443", "{rec}");
    assert_eq!(rec["mode"], "intercept");
    Ok(())
}
