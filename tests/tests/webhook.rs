//! The admission webhook end to end, with recorded AdmissionReview requests
//! (`tests/fixtures/admission`): it is served over HTTPS with the serving
//! certificate `interceptor webhook certs` makes, each request is answered
//! `allowed`, the JSON Patch is applied to the pod, the patched pod
//! validates with `kubernetes-validate --strict`, and the trust it gives is
//! exercised: the initContainer's own command (`interceptor ca bundle`)
//! writes the trust files, and Python (`ssl`, `requests`), Node, curl, Go and
//! Java clients run with each patched container's environment then accept
//! our CA's certificate for an AI host, and still accept a certificate from
//! the system roots (the bundle adds to them, never replaces them).
//!
//! Unprivileged; everything on 127.0.0.1. The namespace opt-in itself is
//! the API server's job (`namespaceSelector`, checked in
//! `deploy_kubernetes.rs`); a request carries no namespace labels.

#[allow(dead_code)] // Shared with the name-constraint tests, which use the rest.
mod trust_clients;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use base64::Engine as _;
use interceptor::{
    testing::interceptor_bin,
    webhook::{self, INIT_CONTAINER, INJECTED_ANNOTATION, MOUNT_PATH, VOLUME},
};
use serde_json::{Value, json};
use trust_clients::{Client, TlsServer, Trust, available, connect, mint_leaf};

const KUBERNETES_VERSION: &str = "1.33.0";
const SERVICE_NAME: &str = "interceptor-webhook.interceptor.svc";
const IMAGE: &str = "registry.example.com/interceptor:1.0.0";

fn fixture(name: &str) -> Result<Vec<u8>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/admission").join(name);
    std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A cluster CA, the webhook's serving certificate, and the webhook serving
/// on 127.0.0.1 (in process), with a client that trusts only the serving CA
/// and reaches the Service name at that address.
struct Setup {
    tmp: tempfile::TempDir,
    client: reqwest::Client,
    url: String,
    _server: tokio::task::JoinHandle<()>,
}

impl Setup {
    async fn new() -> Result<Setup> {
        let tmp = tempfile::tempdir()?;
        run(Command::new(interceptor_bin()).args(["ca", "create-cluster", "--out"]).arg(tmp.path().join("ca")))?;
        run(Command::new(interceptor_bin()).args(["webhook", "certs", "--out"]).arg(tmp.path().join("serving")))?;
        let serving = tmp.path().join("serving");
        let settings = webhook::InjectSettings {
            ca_pem: std::fs::read_to_string(tmp.path().join("ca/ca.crt"))?,
            image: IMAGE.to_owned(),
        };
        let server = webhook::WebhookServer::bind(
            "127.0.0.1:0".parse()?,
            &serving.join("tls.crt"),
            &serving.join("tls.key"),
            settings,
        )
        .await?;
        let addr = server.local_addr()?;
        let task = tokio::spawn(webhook::serve(server));
        let serving_ca = reqwest::Certificate::from_pem(&std::fs::read(serving.join("ca.crt"))?)?;
        let client = reqwest::Client::builder()
            .no_proxy()
            .tls_certs_only([serving_ca])
            .resolve(SERVICE_NAME, addr)
            .timeout(std::time::Duration::from_secs(10))
            .build()?;
        let url = format!("https://{SERVICE_NAME}:{}/mutate", addr.port());
        Ok(Setup { tmp, client, url, _server: task })
    }

    async fn review(&self, body: Vec<u8>) -> Result<Value> {
        let response = self.client.post(&self.url).header("content-type", "application/json").body(body).send().await?;
        assert_eq!(response.status(), 200);
        Ok(response.json().await?)
    }
}

/// The response's JSON Patch applied to the request's pod (the pod
/// unchanged when there is no patch).
fn patched(request: &Value, answer: &Value) -> Result<Value> {
    let response = &answer["response"];
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    assert_eq!(response["uid"], request["request"]["uid"], "the answer names the request");
    assert_eq!(response["allowed"], true, "never refused");
    let mut pod = request["request"]["object"].clone();
    if let Some(patch) = response["patch"].as_str() {
        assert_eq!(response["patchType"], "JSONPatch");
        let patch: json_patch::Patch =
            serde_json::from_slice(&base64::engine::general_purpose::STANDARD.decode(patch)?)?;
        json_patch::patch(&mut pod, &patch)?;
    }
    Ok(pod)
}

fn validate_pod(test: &str, pod: &Value, dir: &Path) -> Result<()> {
    let probe = Command::new("python3").args(["-m", "kubernetes_validate", "--version"]).output();
    if !probe.is_ok_and(|o| o.status.success()) {
        let reason = "kubernetes-validate not installed (`cargo xtask setup`)";
        if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
            panic!("{test}: {reason} (CI is set, so not skipping)");
        }
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "SKIP {test} (schema validation): {reason}");
        return Ok(());
    }
    // The API server names a pod made from `generateName` after admission;
    // the validator wants a name.
    let mut pod = pod.clone();
    if pod["metadata"]["name"].is_null() {
        let generated = format!("{}x7k2p", pod["metadata"]["generateName"].as_str().unwrap_or("pod-"));
        pod["metadata"]["name"] = json!(generated);
    }
    let pod = &pod;
    let file = dir.join("pod.json");
    std::fs::write(&file, serde_json::to_vec_pretty(pod)?)?;
    let out = Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict", "--kubernetes-version", KUBERNETES_VERSION])
        .arg(&file)
        .output()?;
    assert!(
        out.status.success(),
        "the patched pod is not a valid Kubernetes {KUBERNETES_VERSION} Pod:\n{}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        serde_json::to_string_pretty(pod)?
    );
    Ok(())
}

fn env_of(container: &Value) -> BTreeMap<String, Value> {
    container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| (e["name"].as_str().unwrap_or_default().to_owned(), e.get("value").cloned().unwrap_or(Value::Null)))
        .collect()
}

fn named<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array().into_iter().flatten().find(|c| c["name"] == name).unwrap_or(&Value::Null)
}

/// Every container and initContainer of `pod` but ours.
fn app_containers(pod: &Value) -> Vec<&Value> {
    let spec = &pod["spec"];
    spec["initContainers"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(spec["containers"].as_array().into_iter().flatten())
        .filter(|c| c["name"] != INIT_CONTAINER)
        .collect()
}

fn assert_trusts_our_files(container: &Value) {
    let name = container["name"].as_str().unwrap_or_default();
    let mounts = container["volumeMounts"].as_array().cloned().unwrap_or_default();
    let ours: Vec<&Value> = mounts.iter().filter(|m| m["name"] == VOLUME).collect();
    assert_eq!(ours.len(), 1, "{name}: one mount of our volume: {mounts:?}");
    assert_eq!(ours[0]["mountPath"], MOUNT_PATH, "{name}");
    assert_eq!(ours[0]["readOnly"], true, "{name}");
    let env = env_of(container);
    for (var, _) in webhook::ENV {
        assert!(env.contains_key(*var), "{name}: {var} missing: {env:?}");
    }
    let java = env.get("JAVA_TOOL_OPTIONS").and_then(Value::as_str).unwrap_or_default();
    assert!(java.contains("-Djavax.net.ssl.trustStore="), "{name}: {java}");
    // No variable is listed twice (the API server would keep the last).
    let names: Vec<&str> =
        container["env"].as_array().into_iter().flatten().filter_map(|e| e["name"].as_str()).collect();
    let mut unique = names.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), names.len(), "{name}: duplicate variables {names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_with_several_containers_are_patched_validly_and_once() -> Result<()> {
    let test = "pods_with_several_containers_are_patched_validly_and_once";
    let setup = Setup::new().await?;
    let request: Value = serde_json::from_slice(&fixture("multi-container-pod.json")?)?;
    let answer = setup.review(fixture("multi-container-pod.json")?).await?;
    assert!(answer["response"]["patch"].is_string(), "no patch: {answer}");
    let pod = patched(&request, &answer)?;
    validate_pod(test, &pod, setup.tmp.path())?;
    let spec = &pod["spec"];

    // Our initContainer runs first, so the pod's own initContainers trust
    // the CA too; it is the interceptor image writing the trust files.
    let init = &spec["initContainers"][0];
    assert_eq!(init["name"], INIT_CONTAINER);
    assert_eq!(init["image"], IMAGE);
    assert_eq!(init["command"], json!(["interceptor", "ca", "bundle", "--out", MOUNT_PATH]));
    let ca_env = env_of(init);
    let ca_pem = ca_env.get(webhook::CA_CERT_ENV).and_then(Value::as_str).unwrap_or_default();
    assert!(ca_pem.starts_with("-----BEGIN CERTIFICATE-----"), "{ca_pem}");
    // The certificate only: no key reaches a workload's spec.
    assert!(!serde_json::to_string(&pod)?.contains("PRIVATE KEY"));
    assert_eq!(init["securityContext"]["runAsNonRoot"], true);
    assert_eq!(spec["initContainers"][1]["name"], "fetch-prompts");
    assert_eq!(spec["initContainers"][2]["name"], "migrate");

    // Existing volumes stay, ours is added.
    let volumes: Vec<&str> =
        spec["volumes"].as_array().into_iter().flatten().filter_map(|v| v["name"].as_str()).collect();
    assert_eq!(volumes, ["work", "corp-ca", "kube-api-access-x2k9p", VOLUME]);

    // Every container and initContainer: the mount and every variable.
    let apps = app_containers(&pod);
    assert_eq!(apps.len(), 6);
    for container in &apps {
        assert_trusts_our_files(container);
    }
    // The user's own settings win; existing mounts and variables are kept.
    let python = named(&spec["containers"], "python-agent");
    let env = env_of(python);
    assert_eq!(env["REQUESTS_CA_BUNDLE"], "/etc/corp/ca-bundle.pem", "a user's explicit setting is kept");
    assert_eq!(env["SSL_CERT_FILE"], format!("{MOUNT_PATH}/ca-bundle.crt"));
    assert_eq!(env["NODE_EXTRA_CA_CERTS"], format!("{MOUNT_PATH}/ca.crt"));
    assert!(env.contains_key("OPENAI_API_KEY"));
    assert_eq!(python["volumeMounts"][0]["mountPath"], "/work");
    assert_eq!(python["volumeMounts"][1]["mountPath"], "/etc/corp");
    let java = env_of(named(&spec["containers"], "java-agent"));
    let options = java["JAVA_TOOL_OPTIONS"].as_str().unwrap_or_default();
    assert!(options.starts_with("-XX:MaxRAMPercentage=75 -Djavax.net.ssl.trustStore="), "appended: {options}");
    let migrate = named(&spec["initContainers"], "migrate");
    assert!(migrate["env"][0]["valueFrom"]["secretKeyRef"].is_object(), "valueFrom kept: {migrate}");

    // Annotations: the existing one kept, ours added.
    let annotations = &pod["metadata"]["annotations"];
    assert_eq!(annotations["kubectl.kubernetes.io/restartedAt"], "2026-11-30T10:00:00Z");
    assert!(annotations[INJECTED_ANNOTATION].as_str().is_some_and(|v| v.len() == 16), "{annotations}");

    // Idempotent: the patched pod sent again (a reinvocation, a retry) is
    // allowed unchanged.
    let mut again = request.clone();
    again["request"]["object"] = pod.clone();
    let answer = setup.review(serde_json::to_vec(&again)?).await?;
    assert!(answer["response"].get("patch").is_none(), "patched twice: {answer}");
    assert_eq!(patched(&again, &answer)?, pod);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minimal_opted_out_and_unreadable_requests() -> Result<()> {
    let test = "minimal_opted_out_and_unreadable_requests";
    let setup = Setup::new().await?;

    // A pod with no env, no volumes, no initContainers, no annotations.
    let request: Value = serde_json::from_slice(&fixture("minimal-pod.json")?)?;
    let pod = patched(&request, &setup.review(fixture("minimal-pod.json")?).await?)?;
    validate_pod(test, &pod, setup.tmp.path())?;
    assert_eq!(pod["spec"]["initContainers"][0]["name"], INIT_CONTAINER);
    assert_trusts_our_files(&pod["spec"]["containers"][0]);

    // Opted out by annotation: allowed, untouched.
    let request: Value = serde_json::from_slice(&fixture("opted-out-pod.json")?)?;
    let answer = setup.review(fixture("opted-out-pod.json")?).await?;
    assert!(answer["response"].get("patch").is_none(), "{answer}");
    assert_eq!(patched(&request, &answer)?, request["request"]["object"]);

    // A pod the webhook cannot read: allowed unchanged, answered with its uid.
    let request: Value = serde_json::from_slice(&fixture("malformed.json")?)?;
    let answer = setup.review(fixture("malformed.json")?).await?;
    assert!(answer["response"].get("patch").is_none(), "{answer}");
    assert_eq!(patched(&request, &answer)?, request["request"]["object"]);

    // Not even JSON, or truncated: still allowed, no patch.
    for body in [b"\x00\x01 definitely not json".to_vec(), fixture("multi-container-pod.json")?[..200].to_vec()] {
        let answer = setup.review(body).await?;
        assert_eq!(answer["response"]["allowed"], true, "{answer}");
        assert!(answer["response"].get("patch").is_none(), "{answer}");
    }

    // A plain HTTP client, or one that does not trust the serving CA, is
    // not served (the API server is the only caller).
    let untrusting = reqwest::Client::builder().no_proxy().timeout(std::time::Duration::from_secs(5)).build()?;
    assert!(untrusting.post(&setup.url).body("{}").send().await.is_err());
    Ok(())
}

/// The environment of `container` with the mount path moved to `dir`
/// (where the test wrote the trust files).
fn env_at(container: &Value, dir: &Path) -> Vec<(String, String)> {
    env_of(container)
        .into_iter()
        .filter(|(name, _)| trust_clients::TRUST_VARS.contains(&name.as_str()))
        .filter_map(|(name, value)| Some((name, value.as_str()?.replace(MOUNT_PATH, dir.to_str()?))))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patched_containers_trust_our_ca_and_keep_the_system_roots() -> Result<()> {
    let test = "patched_containers_trust_our_ca_and_keep_the_system_roots";
    let setup = Setup::new().await?;
    let tmp = setup.tmp.path();
    let request: Value = serde_json::from_slice(&fixture("multi-container-pod.json")?)?;
    let pod = patched(&request, &setup.review(fixture("multi-container-pod.json")?).await?)?;
    let init = &pod["spec"]["initContainers"][0];

    // A stand-in for the image's system roots: a "public" CA, handed to
    // the initContainer's command as the system bundle. Its certificates
    // must keep working once the variables point at our bundle.
    run(Command::new(interceptor_bin())
        .args(["ca", "create-cluster", "--no-name-constraints", "--out"])
        .arg(tmp.join("public")))?;
    let files = tmp.join("trust-files");
    std::fs::create_dir(&files)?;
    // The initContainer's command and variables, as the pod would run them.
    let command: Vec<String> = serde_json::from_value(init["command"].clone())?;
    assert_eq!(command[0], "interceptor");
    let args: Vec<String> =
        command[1..].iter().map(|a| if a == MOUNT_PATH { files.display().to_string() } else { a.clone() }).collect();
    let mut cmd = Command::new(interceptor_bin());
    cmd.args(&args).env("SSL_CERT_FILE", tmp.join("public/ca.crt")).env_remove("SSL_CERT_DIR");
    for (name, value) in env_of(init) {
        cmd.env(name, value.as_str().unwrap_or_default());
    }
    run(&mut cmd)?;
    for file in ["ca.crt", "ca-bundle.crt", "truststore.jks"] {
        assert!(files.join(file).is_file(), "{file} not written");
    }
    if available(Client::Java, test) {
        let listing = run(Command::new("keytool")
            .args(["-list", "-storetype", "JKS", "-storepass", "changeit", "-keystore"])
            .arg(files.join("truststore.jks")))?;
        assert!(listing.contains("Your keystore contains 2 entries"), "{listing}");
    }

    let ours = tmp.join("ca");
    let public = tmp.join("public");
    let ai = TlsServer::start_leaf(&ours, "api.openai.com").await?;
    let other = TlsServer::start_leaf(&public, "www.example.com").await?;

    // Each image convention with its own container's environment.
    let cases: &[(&str, &[Client])] = &[
        ("python-agent", &[Client::PythonSsl]),
        ("node-agent", &[Client::Node]),
        ("java-agent", &[Client::Java]),
        ("curl-probe", &[Client::Curl, Client::Go, Client::PythonSsl, Client::PythonRequests]),
        ("fetch-prompts", &[Client::Curl]),
    ];
    let mut failures = Vec::new();
    for (container, clients) in cases {
        let container = app_containers(&pod).into_iter().find(|c| c["name"] == *container).context("container")?;
        let trust = Trust::Env(env_at(container, &files));
        for client in clients.iter().copied().filter(|c| available(*c, test)) {
            let verdict = connect(client, &ai, "api.openai.com", &trust).await?;
            if !verdict.accepted {
                failures.push(format!("{client:?} in {}: refused our CA: {}", container["name"], verdict.detail));
            }
            // Node adds our CA to its own built-in roots (which the
            // stand-in is not part of); every other runtime reads the bundle.
            if client != Client::Node {
                let verdict = connect(client, &other, "www.example.com", &trust).await?;
                if !verdict.accepted {
                    failures.push(format!(
                        "{client:?} in {}: lost the system roots: {}",
                        container["name"], verdict.detail
                    ));
                }
            }
        }
    }
    // Without the variables the same clients refuse our CA: the trust is
    // the patch's doing.
    for client in [Client::PythonSsl, Client::Curl, Client::Node].into_iter().filter(|c| available(*c, test)) {
        let verdict = connect(client, &ai, "api.openai.com", &Trust::Env(Vec::new())).await?;
        if verdict.accepted {
            failures.push(format!("{client:?} trusted our CA without the patch"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

#[test]
fn the_bundle_holds_every_system_root() -> Result<()> {
    let system = PathBuf::from("/etc/ssl/certs/ca-certificates.crt");
    if !system.is_file() {
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "SKIP the_bundle_holds_every_system_root: no {}", system.display());
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    run(Command::new(interceptor_bin()).args(["ca", "create-cluster", "--out"]).arg(tmp.path().join("ca")))?;
    let out = tmp.path().join("out");
    std::fs::create_dir(&out)?;
    run(Command::new(interceptor_bin())
        .args(["ca", "bundle", "--ca-file"])
        .arg(tmp.path().join("ca/ca.crt"))
        .arg("--out")
        .arg(&out)
        .env_remove("SSL_CERT_FILE")
        .env_remove("SSL_CERT_DIR"))?;
    let bundle = std::fs::read_to_string(out.join("ca-bundle.crt"))?;
    let ours = std::fs::read_to_string(tmp.path().join("ca/ca.crt"))?;
    let certs = |pem: &str| -> Vec<String> {
        pem.split("-----END CERTIFICATE-----")
            .filter_map(|c| c.split("-----BEGIN CERTIFICATE-----").nth(1))
            .map(|b| b.split_whitespace().collect())
            .collect()
    };
    let in_bundle = certs(&bundle);
    let system_certs = certs(&std::fs::read_to_string(&system)?);
    assert!(system_certs.len() > 50, "a real system bundle");
    let missing = system_certs.iter().filter(|c| !in_bundle.contains(c)).count();
    assert_eq!(missing, 0, "{missing} system roots missing from the bundle");
    assert!(in_bundle.contains(&certs(&ours)[0]), "our CA missing");
    let mut unique = in_bundle.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), in_bundle.len(), "a certificate listed twice");
    Ok(())
}

impl TlsServer {
    async fn start_leaf(ca_dir: &Path, name: &str) -> Result<TlsServer> {
        let (chain, key) = mint_leaf(ca_dir, name)?;
        TlsServer::start(chain, key).await
    }
}
