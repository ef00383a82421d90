//! The Kubernetes manifests in deploy/kubernetes: schema-valid for a recent
//! Kubernetes, clean under checkov's policies (accepted findings are skipped
//! in the manifests with a justification), and carrying a configuration the
//! interceptor accepts.
//!
//! Unprivileged. The validators are Python tools (`cargo xtask setup`
//! installs them); without them a test prints `SKIPPED: <test>: <reason>`, or
//! fails when `CI` is set.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use anyhow::{Context as _, Result, bail};
use interceptor::testing::interceptor_bin;

/// The Kubernetes version the manifests are validated against.
const KUBERNETES_VERSION: &str = "1.33.0";

/// The proxy address of configmap.yaml, which the DaemonSet's initContainer
/// binds on the host.
const PROXY_ADDRESS: &str = "169.254.20.11";

fn manifests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes")
}

/// Every manifest but kustomization.yaml (a kustomize file, not a Kubernetes
/// object), sorted.
fn manifests() -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(manifests_dir()).context("reading deploy/kubernetes")? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if (name.ends_with(".yaml") || name.ends_with(".yml")) && name != "kustomization.yaml" {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Whether `tool` is usable (`probe` runs it harmlessly). When it is not,
/// reports the test as skipped and returns false, or panics when `CI` is
/// set: a CI run must not skip silently.
fn require_tool(test_name: &str, tool: &str, probe: &mut Command) -> bool {
    let reason = match probe.output() {
        Ok(out) if out.status.success() => return true,
        Ok(out) => format!("`{tool}` does not run: {}", String::from_utf8_lossy(&out.stderr).trim()),
        Err(e) => format!("`{tool}` not found: {e}"),
    };
    let reason = format!("{reason} (install it with `cargo xtask setup` or `python3 -m pip install {tool}`)");
    interceptor::testing::skip(test_name, &reason)
}

fn describe(out: &Output) -> String {
    format!("stdout:\n{}\nstderr:\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn manifests_validate_against_the_kubernetes_schema() -> Result<()> {
    let name = "manifests_validate_against_the_kubernetes_schema";
    if !require_tool(
        name,
        "kubernetes-validate",
        Command::new("python3").args(["-m", "kubernetes_validate", "--version"]),
    ) {
        return Ok(());
    }
    let files = manifests()?;
    assert!(files.len() >= 4, "expected the manifests in deploy/kubernetes, found {files:?}");
    for file in files {
        // --strict rejects unknown fields (a misspelt or misplaced key).
        let out = Command::new("python3")
            .args(["-m", "kubernetes_validate", "--strict", "--kubernetes-version", KUBERNETES_VERSION])
            .arg(&file)
            .output()?;
        assert!(
            out.status.success(),
            "{} is not a valid Kubernetes {KUBERNETES_VERSION} object:\n{}",
            file.display(),
            describe(&out)
        );
    }
    Ok(())
}

#[test]
fn manifests_pass_checkov() -> Result<()> {
    let name = "manifests_pass_checkov";
    if !require_tool(name, "checkov", Command::new("checkov").arg("--version")) {
        return Ok(());
    }
    let out = Command::new("checkov")
        .arg("--directory")
        .arg(manifests_dir())
        .args(["--framework", "kubernetes", "--compact", "--quiet"])
        // Offline: no guideline download from the vendor's platform.
        .arg("--skip-download")
        .env("BC_SKIP_MAPPING", "TRUE")
        .output()?;
    assert!(
        out.status.success(),
        "checkov found problems in deploy/kubernetes (fix them, or skip an accepted finding in the manifest with a \
         `checkov.io/skipN: CKV_K8S_xx=<justification>` annotation):\n{}",
        describe(&out)
    );
    Ok(())
}

/// The `config.toml` block scalar (`|`) of configmap.yaml, de-indented.
fn configmap_toml(yaml: &str) -> Result<String> {
    let mut lines = yaml.lines().skip_while(|l| l.trim() != "config.toml: |");
    if lines.next().is_none() {
        bail!("configmap.yaml has no `config.toml: |` entry");
    }
    let body: Vec<&str> = lines.take_while(|l| l.trim().is_empty() || l.starts_with("    ")).collect();
    let indent = body.iter().find(|l| !l.trim().is_empty()).map_or(0, |l| l.len() - l.trim_start().len());
    let mut toml = String::new();
    for line in body {
        toml.push_str(line.get(indent..).unwrap_or(""));
        toml.push('\n');
    }
    Ok(toml)
}

#[test]
fn configmap_holds_a_valid_node_config() -> Result<()> {
    let dir = manifests_dir();
    let toml = configmap_toml(&std::fs::read_to_string(dir.join("configmap.yaml"))?)?;
    assert!(toml.contains("[proxy]") && toml.contains("[targets]"), "extracted config looks truncated:\n{toml}");
    let tmp = tempfile::tempdir()?;
    let path = tmp.path().join("config.toml");
    std::fs::write(&path, &toml)?;

    let mut check = Command::new(interceptor_bin());
    check.arg("check-config").arg("--config").arg(&path);
    // Only the file decides: no overrides leaking in from this environment.
    for (key, _) in std::env::vars_os() {
        if key.to_str().is_some_and(|k| k.starts_with("INTERCEPTOR_") || k.starts_with("AKTO_") || k == "APP_NAME") {
            check.env_remove(key);
        }
    }
    let out = check.output()?;
    assert!(out.status.success(), "interceptor check-config rejects the ConfigMap's config:\n{}", describe(&out));

    // The effective settings the DaemonSet relies on.
    let effective = String::from_utf8_lossy(&out.stdout);
    for expected in [
        format!("address_v4 = \"{PROXY_ADDRESS}\""),
        "mode = \"ebpf\"".to_owned(),
        "cgroup = \"\"".to_owned(),
        "address = \"127.0.0.1:15000\"".to_owned(),
    ] {
        assert!(effective.contains(&expected), "effective config lacks `{expected}`:\n{effective}");
    }
    // Each pod's query goes to the server it asked (the cluster DNS service);
    // naming that service here would send CoreDNS's own upstream queries
    // back to CoreDNS.
    assert!(effective.contains("dns_upstreams = []"), "CoreDNS's queries would loop:\n{effective}");
    Ok(())
}

#[test]
fn daemonset_and_kustomization_agree_with_the_rest() -> Result<()> {
    let dir = manifests_dir();
    let daemonset = std::fs::read_to_string(dir.join("daemonset.yaml"))?;
    // The initContainer binds the address the proxy is configured to use.
    assert!(daemonset.contains(&format!("\"{PROXY_ADDRESS}/32\"")), "daemonset.yaml does not bind {PROXY_ADDRESS}");
    // The probes hit the admin address of the config.
    assert!(daemonset.contains("port: 15000") && daemonset.contains("host: 127.0.0.1"));
    // kustomization.yaml lists every manifest.
    let kustomization = std::fs::read_to_string(dir.join("kustomization.yaml"))?;
    for file in manifests()? {
        let name = file.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
        assert!(kustomization.contains(&format!("- {name}")), "kustomization.yaml does not list {name}");
    }
    Ok(())
}

/// Every object of a manifest file, as JSON (PyYAML, which
/// kubernetes-validate brings).
fn objects(test_name: &str, file: &str) -> Result<Option<Vec<serde_json::Value>>> {
    if !require_tool(test_name, "kubernetes-validate", Command::new("python3").args(["-c", "import yaml"])) {
        return Ok(None);
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import sys, yaml, json; print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d]))",
        ])
        .arg(manifests_dir().join(file))
        .output()?;
    assert!(out.status.success(), "cannot read {file}:\n{}", describe(&out));
    Ok(Some(serde_json::from_slice(&out.stdout)?))
}

fn of_kind<'a>(objects: &'a [serde_json::Value], kind: &str) -> &'a serde_json::Value {
    objects.iter().find(|o| o["kind"] == kind).unwrap_or_else(|| panic!("no {kind}"))
}

#[test]
fn the_webhook_never_fails_a_pod_and_serves_opted_in_namespaces_only() -> Result<()> {
    let name = "the_webhook_never_fails_a_pod_and_serves_opted_in_namespaces_only";
    let (Some(config), Some(webhook)) = (objects(name, "mutatingwebhook.yaml")?, objects(name, "webhook.yaml")?) else {
        return Ok(());
    };
    let hooks = of_kind(&config, "MutatingWebhookConfiguration")["webhooks"].as_array().cloned().unwrap_or_default();
    assert_eq!(hooks.len(), 1);
    let hook = &hooks[0];
    assert_eq!(hook["failurePolicy"], "Ignore", "a pod must never be refused for the webhook's sake");
    assert_eq!(hook["sideEffects"], "None");
    assert!(hook["timeoutSeconds"].as_u64().is_some_and(|t| t <= 10), "{hook}");
    assert_eq!(hook["admissionReviewVersions"], serde_json::json!(["v1"]));
    assert_eq!(
        hook["namespaceSelector"],
        serde_json::json!({ "matchLabels": { "interceptor.io/inject-ca": "enabled" } })
    );
    assert_eq!(hook["rules"][0]["resources"], serde_json::json!(["pods"]));
    assert_eq!(hook["rules"][0]["operations"], serde_json::json!(["CREATE"]));

    // The webhook configuration reaches the Service, which reaches the pod.
    let service = of_kind(&webhook, "Service");
    let target = &hook["clientConfig"]["service"];
    assert_eq!(target["name"], service["metadata"]["name"]);
    assert_eq!(target["namespace"], service["metadata"]["namespace"]);
    assert_eq!(target["path"], "/mutate");
    assert_eq!(target["port"], service["spec"]["ports"][0]["port"]);
    let deployment = of_kind(&webhook, "Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(container["ports"][0]["name"], service["spec"]["ports"][0]["targetPort"]);
    let env: std::collections::BTreeMap<String, String> = container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            (e["name"].as_str().unwrap_or_default().to_owned(), e["value"].as_str().unwrap_or_default().to_owned())
        })
        .collect();
    assert!(env["INTERCEPTOR_WEBHOOK_LISTEN"].ends_with(&format!(":{}", container["ports"][0]["containerPort"])));
    assert_eq!(env["INTERCEPTOR_WEBHOOK_IMAGE"], container["image"].as_str().unwrap_or_default());

    // The cluster CA's certificate reaches the webhook, its key never does.
    let ca_volume = pod["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["secret"]["secretName"] == "interceptor-ca")
        .expect("the webhook mounts the cluster CA Secret");
    assert_eq!(ca_volume["secret"]["items"], serde_json::json!([{ "key": "ca.crt", "path": "ca.crt" }]));
    let mount = container["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["name"] == ca_volume["name"])
        .expect("mounted");
    assert_eq!(
        env["INTERCEPTOR_WEBHOOK_CA_CERT"],
        format!("{}/ca.crt", mount["mountPath"].as_str().unwrap_or_default())
    );
    Ok(())
}

#[test]
fn every_node_loads_the_cluster_ca_from_its_secret() -> Result<()> {
    let name = "every_node_loads_the_cluster_ca_from_its_secret";
    let Some(daemonset) = objects(name, "daemonset.yaml")? else {
        return Ok(());
    };
    let toml = configmap_toml(&std::fs::read_to_string(manifests_dir().join("configmap.yaml"))?)?;
    let config: interceptor::config::Config = toml::from_str(&toml)?;
    let ca_dir = config.tls.ca_dir.to_str().unwrap_or_default().to_owned();
    assert!(!ca_dir.is_empty(), "the DaemonSet's config names no cluster CA");
    let pod = &of_kind(&daemonset, "DaemonSet")["spec"]["template"]["spec"];
    let volume = pod["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["secret"]["secretName"] == "interceptor-ca")
        .expect("the DaemonSet mounts the cluster CA Secret");
    // 0400: the interceptor refuses a key readable by group or others.
    assert_eq!(volume["secret"]["defaultMode"], 0o400);
    let mount = pod["containers"][0]["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["name"] == volume["name"])
        .expect("mounted in the interceptor container");
    assert_eq!(mount["mountPath"], ca_dir.as_str());
    assert_eq!(mount["readOnly"], true);
    Ok(())
}

#[test]
fn the_node_agents_may_only_read_the_pods_of_their_node() -> Result<()> {
    let name = "the_node_agents_may_only_read_the_pods_of_their_node";
    let (Some(rbac), Some(daemonset), Some(account)) =
        (objects(name, "rbac.yaml")?, objects(name, "daemonset.yaml")?, objects(name, "serviceaccount.yaml")?)
    else {
        return Ok(());
    };
    // Read-only, pods only.
    let role = of_kind(&rbac, "ClusterRole");
    assert_eq!(
        role["rules"],
        serde_json::json!([{ "apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"] }]),
        "{role}"
    );
    assert!(!rbac.iter().any(|o| o["kind"] == "Role" || o["kind"] == "RoleBinding"), "nothing else is granted");
    // Bound to the service account the DaemonSet runs as.
    let ds = of_kind(&daemonset, "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    let binding = of_kind(&rbac, "ClusterRoleBinding");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    assert_eq!(binding["roleRef"]["kind"], "ClusterRole");
    let subject = &binding["subjects"][0];
    assert_eq!(binding["subjects"].as_array().map(Vec::len), Some(1));
    assert_eq!(subject["kind"], "ServiceAccount");
    assert_eq!(subject["name"], pod["serviceAccountName"]);
    assert_eq!(subject["namespace"], ds["metadata"]["namespace"]);
    let sa = of_kind(&account, "ServiceAccount");
    assert_eq!(sa["metadata"]["name"], pod["serviceAccountName"]);
    // The node name from the downward API scopes the watch to this node.
    let container = &pod["containers"][0];
    let node_name = container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["name"] == "NODE_NAME")
        .expect("NODE_NAME in the interceptor's environment");
    assert_eq!(node_name["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");
    // A token where the in-cluster client looks, though none is mounted
    // automatically.
    assert_eq!(pod["automountServiceAccountToken"], false);
    let mount = container["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount")
        .expect("the service account token is mounted");
    assert_eq!(mount["readOnly"], true);
    let volume =
        pod["volumes"].as_array().into_iter().flatten().find(|v| v["name"] == mount["name"]).expect("the token volume");
    let sources = volume["projected"]["sources"].as_array().cloned().unwrap_or_default();
    assert!(sources.iter().any(|s| s["serviceAccountToken"]["path"] == "token"), "{volume}");
    assert!(sources.iter().any(|s| s["configMap"]["items"][0]["path"] == "ca.crt"), "{volume}");
    Ok(())
}
