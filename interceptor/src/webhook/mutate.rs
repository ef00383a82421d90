//! The pod mutation: from an AdmissionReview request to the response, with
//! a JSON Patch that makes every container trust our CA. Pure: no I/O.
//!
//! What a patched pod gets:
//! * an `emptyDir` volume, filled by a first initContainer
//!   (`interceptor ca bundle`, from the interceptor image) with our CA alone,
//!   the image's system roots plus our CA, and the same as a JKS trust store
//!   (see `ca::bundle`);
//! * in every container and initContainer, that volume read-only at
//!   [`MOUNT_PATH`] and the variables each runtime reads (see [`ENV`] and
//!   [`JAVA_TOOL_OPTIONS`]). A variable the container already sets is kept:
//!   the user's explicit choice wins. `JAVA_TOOL_OPTIONS` with a plain value
//!   that names no trust store gets ours appended;
//! * the annotation [`INJECTED_ANNOTATION`]. A pod seen again (a retry, or a
//!   reinvocation after another webhook added a container) gets only what
//!   it lacks: nothing twice.
//!
//! A pod annotated `interceptor.io/inject-ca: disabled`, a Windows pod and a
//! request that cannot be read are allowed unchanged: this webhook never
//! refuses a pod.

use std::fmt;

use json_patch::{AddOperation, Patch, PatchOperation, ReplaceOperation, jsonptr::PointerBuf};
use serde::Deserialize;
use serde_json::{Map, Value, json};

/// Where the trust files are mounted in every container.
pub const MOUNT_PATH: &str = "/var/run/interceptor-ca";
/// The volume holding them.
pub const VOLUME: &str = "interceptor-ca";
/// The initContainer that writes them.
pub const INIT_CONTAINER: &str = "interceptor-ca-bundle";
/// Set on a patched pod; its value is the CA certificate's fingerprint
/// (first 16 hex digits of its SHA-256).
pub const INJECTED_ANNOTATION: &str = "interceptor.io/ca-injected";
/// A pod annotated with this set to `disabled` is left alone.
pub const OPT_OUT_ANNOTATION: &str = "interceptor.io/inject-ca";
/// The variable the initContainer reads our CA certificate (PEM) from.
pub const CA_CERT_ENV: &str = "INTERCEPTOR_CA_CERT";

/// Which trust file a variable names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrustFile {
    /// System roots plus our CA: the variable replaces the runtime's roots.
    Bundle,
    /// Our CA alone: the variable adds to the runtime's roots.
    CaOnly,
}

/// The variables set in every container, and the runtime that reads each.
pub const ENV: &[(&str, TrustFile)] = &[
    // OpenSSL (and everything built on it: Python's ssl, Ruby, PHP, curl
    // with OpenSSL), Go's crypto/x509, rustls-native-certs.
    ("SSL_CERT_FILE", TrustFile::Bundle),
    // Python requests (which otherwise uses certifi's own roots).
    ("REQUESTS_CA_BUNDLE", TrustFile::Bundle),
    // The curl command line.
    ("CURL_CA_BUNDLE", TrustFile::Bundle),
    // git over HTTPS.
    ("GIT_SSL_CAINFO", TrustFile::Bundle),
    // The AWS SDKs and CLI (Bedrock), which read neither of the above.
    ("AWS_CA_BUNDLE", TrustFile::Bundle),
    // Node.js: added to its built-in roots.
    ("NODE_EXTRA_CA_CERTS", TrustFile::CaOnly),
];

/// The JVM's trust options, read by every JVM at start.
pub const JAVA_TOOL_OPTIONS: &str = "JAVA_TOOL_OPTIONS";

/// What the webhook needs to patch a pod.
#[derive(Debug, Clone)]
pub struct InjectSettings {
    /// Our CA certificates (PEM; two while the CA is rolled over). Public:
    /// it goes into the pod spec.
    pub ca_pem: String,
    /// The image of the initContainer (the interceptor image).
    pub image: String,
}

impl InjectSettings {
    fn fingerprint(&self) -> String {
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, self.ca_pem.as_bytes());
        digest.as_ref().iter().take(8).map(|b| format!("{b:02x}")).collect()
    }

    fn java_options(&self) -> String {
        format!(
            "-Djavax.net.ssl.trustStore={MOUNT_PATH}/{} -Djavax.net.ssl.trustStoreType=JKS \
             -Djavax.net.ssl.trustStorePassword={}",
            crate::ca::JKS_FILE,
            crate::ca::JKS_PASSWORD
        )
    }
}

/// What the webhook did with one request, for logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Patched (the number of operations).
    Patched(usize),
    /// Already carries our annotation or initContainer.
    AlreadyInjected,
    /// Annotated `interceptor.io/inject-ca: disabled`.
    OptedOut,
    /// Not a pod creation, or a Windows pod: nothing to do.
    NotApplicable(&'static str),
    /// The request could not be read; allowed unchanged.
    Unreadable(String),
}

impl Outcome {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Patched(_) => "patched",
            Self::AlreadyInjected => "already injected",
            Self::OptedOut => "opted out",
            Self::NotApplicable(_) => "not applicable",
            Self::Unreadable(_) => "unreadable",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Patched(n) => write!(f, "patched ({n} operations)"),
            Self::NotApplicable(why) => write!(f, "not applicable: {why}"),
            Self::Unreadable(why) => write!(f, "unreadable: {why}"),
            other => f.write_str(other.as_str()),
        }
    }
}

/// The parts of an AdmissionReview request we read.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Request {
    uid: String,
    #[serde(default)]
    operation: String,
    #[serde(default)]
    kind: Kind,
    #[serde(default)]
    object: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
struct Kind {
    #[serde(default)]
    group: String,
    #[serde(default)]
    kind: String,
}

/// Answers one AdmissionReview (the request body): always `allowed`, with
/// a JSON Patch when the pod needs one. Whatever cannot be read is allowed
/// unchanged (with the request's uid when it can be found, so the API
/// server accepts the answer).
pub fn review(body: &[u8], settings: &InjectSettings) -> (Value, Outcome) {
    let value: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return (response("", None), Outcome::Unreadable(format!("not json: {e}"))),
    };
    let api_version = value.get("apiVersion").and_then(Value::as_str).unwrap_or("admission.k8s.io/v1").to_owned();
    let raw_request = value.get("request").cloned().unwrap_or(Value::Null);
    let uid = raw_request.get("uid").and_then(Value::as_str).unwrap_or("").to_owned();
    let request: Request = match serde_json::from_value(raw_request) {
        Ok(r) => r,
        Err(e) => {
            return (with_version(response(&uid, None), &api_version), Outcome::Unreadable(format!("no request: {e}")));
        }
    };
    let (patch, outcome) = decide(&request, settings);
    (with_version(response(&request.uid, patch.as_ref()), &api_version), outcome)
}

fn decide(request: &Request, settings: &InjectSettings) -> (Option<Patch>, Outcome) {
    if !request.kind.group.is_empty() || request.kind.kind != "Pod" {
        return (None, Outcome::NotApplicable("not a pod"));
    }
    if request.operation != "CREATE" {
        return (None, Outcome::NotApplicable("not a creation"));
    }
    let Some(pod) = &request.object else {
        return (None, Outcome::Unreadable("no object".to_owned()));
    };
    match patch_pod(pod, settings) {
        Ok(Some(patch)) => {
            let n = patch.0.len();
            (Some(patch), Outcome::Patched(n))
        }
        Ok(None) => (None, Outcome::AlreadyInjected),
        Err(Skip::OptedOut) => (None, Outcome::OptedOut),
        Err(Skip::NotApplicable(why)) => (None, Outcome::NotApplicable(why)),
        Err(Skip::Malformed(why)) => (None, Outcome::Unreadable(why)),
    }
}

fn response(uid: &str, patch: Option<&Patch>) -> Value {
    let mut response = json!({ "uid": uid, "allowed": true });
    if let Some(patch) = patch {
        use base64::Engine as _;
        // Serialising our own operations cannot fail; an empty patch is
        // the safe fallback all the same.
        let bytes = serde_json::to_vec(patch).unwrap_or_else(|_| b"[]".to_vec());
        response["patchType"] = json!("JSONPatch");
        response["patch"] = json!(base64::engine::general_purpose::STANDARD.encode(bytes));
    }
    json!({ "kind": "AdmissionReview", "response": response })
}

fn with_version(mut review: Value, api_version: &str) -> Value {
    // Answer in the version asked (v1; v1beta1 has the same shape).
    review["apiVersion"] = json!(api_version);
    review
}

enum Skip {
    OptedOut,
    NotApplicable(&'static str),
    Malformed(String),
}

/// The patch for `pod`; `None` when it already has what we add.
fn patch_pod(pod: &Value, settings: &InjectSettings) -> Result<Option<Patch>, Skip> {
    let malformed = |what: &str| Skip::Malformed(format!("pod {what}"));
    let metadata = pod.get("metadata").unwrap_or(&Value::Null);
    let annotations = metadata.get("annotations").and_then(Value::as_object);
    if annotations.and_then(|a| a.get(OPT_OUT_ANNOTATION)).and_then(Value::as_str) == Some("disabled") {
        return Err(Skip::OptedOut);
    }
    let spec = pod.get("spec").and_then(Value::as_object).ok_or_else(|| malformed("has no spec"))?;
    if spec.get("os").and_then(|os| os.get("name")).and_then(Value::as_str) == Some("windows") {
        return Err(Skip::NotApplicable("windows pod"));
    }
    let containers = spec.get("containers").and_then(Value::as_array).ok_or_else(|| malformed("has no containers"))?;
    let init_containers = match spec.get("initContainers") {
        None | Some(Value::Null) => None,
        Some(Value::Array(list)) => Some(list),
        Some(_) => return Err(malformed("initContainers is not a list")),
    };
    let already = annotations.is_some_and(|a| a.contains_key(INJECTED_ANNOTATION))
        || init_containers.into_iter().flatten().any(|c| c.get("name").and_then(Value::as_str) == Some(INIT_CONTAINER));
    let volumes = match spec.get("volumes") {
        None | Some(Value::Null) => None,
        Some(Value::Array(list)) => Some(list),
        Some(_) => return Err(malformed("volumes is not a list")),
    };
    if !already && volumes.into_iter().flatten().any(|v| v.get("name").and_then(Value::as_str) == Some(VOLUME)) {
        // Someone else's volume of that name: do not guess.
        return Err(Skip::NotApplicable("a volume named interceptor-ca exists"));
    }

    let mut ops = Vec::new();
    // Existing initContainers first: our own goes in at index 0 last, which
    // shifts their indices. Each container is patched only where it lacks
    // something, so a pod seen again (reinvoked after another webhook added
    // a container) gets only what is missing.
    for (list, items) in [("initContainers", init_containers), ("containers", Some(containers))] {
        for (i, container) in items.into_iter().flatten().enumerate() {
            let container = container.as_object().ok_or_else(|| malformed("has a container that is not an object"))?;
            if container.get("name").and_then(Value::as_str) == Some(INIT_CONTAINER) {
                continue;
            }
            patch_container(&mut ops, &["spec", list, &i.to_string()], container, settings)?;
        }
    }
    if already {
        return Ok((!ops.is_empty()).then_some(Patch(ops)));
    }
    let volume = json!({ "name": VOLUME, "emptyDir": { "sizeLimit": "8Mi" } });
    push_to_list(&mut ops, &["spec", "volumes"], volumes.is_some(), volume);
    let init = init_container(settings);
    match init_containers {
        Some(_) => add(&mut ops, &["spec", "initContainers", "0"], init),
        None => add(&mut ops, &["spec", "initContainers"], json!([init])),
    }
    if metadata.get("annotations").and_then(Value::as_object).is_some() {
        add(&mut ops, &["metadata", "annotations", INJECTED_ANNOTATION], json!(settings.fingerprint()));
    } else if metadata.is_object() {
        add(&mut ops, &["metadata", "annotations"], json!({ INJECTED_ANNOTATION: settings.fingerprint() }));
    } else {
        return Err(malformed("has no metadata"));
    }
    Ok(Some(Patch(ops)))
}

fn patch_container(
    ops: &mut Vec<PatchOperation>,
    at: &[&str],
    container: &Map<String, Value>,
    settings: &InjectSettings,
) -> Result<(), Skip> {
    let list = |key: &str| match container.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => Ok(Some(items)),
        Some(_) => Err(Skip::Malformed(format!("container {key} is not a list"))),
    };
    let mounts = list("volumeMounts")?;
    let env = list("env")?;
    let taken = mounts.into_iter().flatten().any(|m| m.get("mountPath").and_then(Value::as_str) == Some(MOUNT_PATH));
    if !taken {
        let mount = json!({ "name": VOLUME, "mountPath": MOUNT_PATH, "readOnly": true });
        push_to_list(ops, &[at, &["volumeMounts"]].concat(), mounts.is_some(), mount);
    }

    let existing = |name: &str| {
        env.into_iter().flatten().enumerate().find(|(_, e)| e.get("name").and_then(Value::as_str) == Some(name))
    };
    let mut new_vars = Vec::new();
    for (name, file) in ENV {
        if existing(name).is_none() {
            let file = match file {
                TrustFile::Bundle => crate::ca::BUNDLE_FILE,
                TrustFile::CaOnly => crate::ca::CA_FILE,
            };
            new_vars.push(json!({ "name": name, "value": format!("{MOUNT_PATH}/{file}") }));
        }
    }
    match existing(JAVA_TOOL_OPTIONS) {
        None => new_vars.push(json!({ "name": JAVA_TOOL_OPTIONS, "value": settings.java_options() })),
        Some((i, var)) => {
            // A plain value that names no trust store gets ours appended; a
            // value from a reference, or one with its own trust store, is
            // the user's to keep.
            if let Some(value) = var.get("value").and_then(Value::as_str)
                && var.get("valueFrom").is_none()
                && !value.contains("javax.net.ssl.trustStore")
            {
                let joined = if value.trim().is_empty() {
                    settings.java_options()
                } else {
                    format!("{value} {}", settings.java_options())
                };
                let path = pointer(&[at, &["env", &i.to_string(), "value"]].concat());
                ops.push(PatchOperation::Replace(ReplaceOperation { path, value: json!(joined) }));
            }
        }
    }
    let env_path = [at, &["env"]].concat();
    if env.is_some() {
        for var in new_vars {
            add(ops, &[&env_path[..], &["-"]].concat(), var);
        }
    } else if !new_vars.is_empty() {
        add(ops, &env_path, Value::Array(new_vars));
    }
    Ok(())
}

fn init_container(settings: &InjectSettings) -> Value {
    json!({
        "name": INIT_CONTAINER,
        "image": settings.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["interceptor", "ca", "bundle", "--out", MOUNT_PATH],
        "env": [{ "name": CA_CERT_ENV, "value": settings.ca_pem }],
        "volumeMounts": [{ "name": VOLUME, "mountPath": MOUNT_PATH }],
        "resources": {
            "requests": { "cpu": "10m", "memory": "16Mi" },
            "limits": { "cpu": "200m", "memory": "64Mi" },
        },
        // Fits the restricted Pod Security Standard, so a pod admitted
        // there before is admitted after.
        "securityContext": {
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "runAsNonRoot": true,
            "runAsUser": 65534,
            "runAsGroup": 65534,
            "capabilities": { "drop": ["ALL"] },
            "seccompProfile": { "type": "RuntimeDefault" },
        },
    })
}

/// Appends `item` to the list at `path`, creating the list when absent.
fn push_to_list(ops: &mut Vec<PatchOperation>, path: &[&str], exists: bool, item: Value) {
    if exists {
        add(ops, &[path, &["-"]].concat(), item);
    } else {
        add(ops, path, json!([item]));
    }
}

fn add(ops: &mut Vec<PatchOperation>, path: &[&str], value: Value) {
    ops.push(PatchOperation::Add(AddOperation { path: pointer(path), value }));
}

fn pointer(tokens: &[&str]) -> PointerBuf {
    PointerBuf::from_tokens(tokens.iter().copied())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> InjectSettings {
        InjectSettings {
            ca_pem: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
            image: "registry.example/interceptor:1".into(),
        }
    }

    fn review_of(pod: Value) -> Value {
        json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": { "group": "", "version": "v1", "kind": "Pod" },
                "resource": { "group": "", "version": "v1", "resource": "pods" },
                "operation": "CREATE",
                "namespace": "team-a",
                "object": pod,
            }
        })
    }

    fn apply(pod: &Value, answer: &Value) -> Value {
        use base64::Engine as _;
        let mut pod = pod.clone();
        if let Some(patch) = answer["response"]["patch"].as_str() {
            let bytes = base64::engine::general_purpose::STANDARD.decode(patch).unwrap();
            let patch: Patch = serde_json::from_slice(&bytes).unwrap();
            json_patch::patch(&mut pod, &patch).unwrap();
        }
        pod
    }

    fn env_of(container: &Value) -> Vec<(String, String)> {
        container["env"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| (e["name"].as_str().unwrap().to_owned(), e["value"].as_str().unwrap_or("<from>").to_owned()))
            .collect()
    }

    #[test]
    fn minimal_pod_gets_volume_init_container_env_and_annotation() {
        let pod =
            json!({ "metadata": { "name": "p" }, "spec": { "containers": [{ "name": "app", "image": "python" }] } });
        let (answer, outcome) = review(&serde_json::to_vec(&review_of(pod.clone())).unwrap(), &settings());
        assert!(matches!(outcome, Outcome::Patched(_)), "{outcome}");
        assert_eq!(answer["response"]["allowed"], true);
        assert_eq!(answer["response"]["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
        assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
        let patched = apply(&pod, &answer);
        assert_eq!(patched["spec"]["initContainers"][0]["name"], INIT_CONTAINER);
        assert_eq!(patched["spec"]["volumes"][0]["name"], VOLUME);
        let env = env_of(&patched["spec"]["containers"][0]);
        assert!(env.contains(&("SSL_CERT_FILE".into(), format!("{MOUNT_PATH}/ca-bundle.crt"))), "{env:?}");
        assert!(env.contains(&("NODE_EXTRA_CA_CERTS".into(), format!("{MOUNT_PATH}/ca.crt"))), "{env:?}");
        assert!(patched["metadata"]["annotations"][INJECTED_ANNOTATION].is_string());
        // Seen again (a retried request): nothing more.
        let (again, outcome) = review(&serde_json::to_vec(&review_of(patched.clone())).unwrap(), &settings());
        assert_eq!(outcome, Outcome::AlreadyInjected);
        assert!(again["response"].get("patch").is_none());
    }

    #[test]
    fn a_container_added_after_injection_is_patched_alone() {
        let pod = json!({ "metadata": { "name": "p" }, "spec": { "containers": [{ "name": "app" }] } });
        let (answer, _) = review(&serde_json::to_vec(&review_of(pod.clone())).unwrap(), &settings());
        let mut patched = apply(&pod, &answer);
        // Another webhook adds a sidecar; the API server calls us again.
        patched["spec"]["containers"].as_array_mut().unwrap().push(json!({ "name": "sidecar" }));
        let (again, outcome) = review(&serde_json::to_vec(&review_of(patched.clone())).unwrap(), &settings());
        assert!(matches!(outcome, Outcome::Patched(_)), "{outcome}");
        let twice = apply(&patched, &again);
        assert_eq!(twice["spec"]["initContainers"].as_array().unwrap().len(), 1);
        assert_eq!(twice["spec"]["volumes"].as_array().unwrap().len(), 1);
        assert_eq!(env_of(&twice["spec"]["containers"][1]), env_of(&twice["spec"]["containers"][0]));
        assert_eq!(twice["spec"]["containers"][0], patched["spec"]["containers"][0], "untouched");
    }

    #[test]
    fn user_settings_are_kept_and_java_options_appended() {
        let pod = json!({
            "metadata": { "name": "p", "annotations": { "a": "b" } },
            "spec": { "containers": [{
                "name": "app",
                "env": [
                    { "name": "SSL_CERT_FILE", "value": "/mine.pem" },
                    { "name": "JAVA_TOOL_OPTIONS", "value": "-Xmx512m" },
                ],
            }, {
                "name": "jvm2",
                "env": [{ "name": "JAVA_TOOL_OPTIONS", "value": "-Djavax.net.ssl.trustStore=/own.p12" }],
            }]}
        });
        let (answer, _) = review(&serde_json::to_vec(&review_of(pod.clone())).unwrap(), &settings());
        let patched = apply(&pod, &answer);
        let env = env_of(&patched["spec"]["containers"][0]);
        assert!(env.contains(&("SSL_CERT_FILE".into(), "/mine.pem".into())), "{env:?}");
        assert_eq!(env.iter().filter(|(n, _)| n == "SSL_CERT_FILE").count(), 1);
        let java = &env.iter().find(|(n, _)| n == JAVA_TOOL_OPTIONS).unwrap().1;
        assert!(java.starts_with("-Xmx512m -Djavax.net.ssl.trustStore="), "{java}");
        let env = env_of(&patched["spec"]["containers"][1]);
        assert!(env.contains(&(JAVA_TOOL_OPTIONS.into(), "-Djavax.net.ssl.trustStore=/own.p12".into())), "{env:?}");
        assert_eq!(patched["metadata"]["annotations"]["a"], "b");
    }

    #[test]
    fn unreadable_requests_are_allowed_unchanged() {
        for body in [
            &b"not json"[..],
            br#"{"kind":"AdmissionReview"}"#,
            br#"{"request":{"uid":"u1","kind":{"kind":"Pod"},"operation":"CREATE","object":{"spec":{}}}}"#,
        ] {
            let (answer, outcome) = review(body, &settings());
            assert!(matches!(outcome, Outcome::Unreadable(_)), "{outcome}");
            assert_eq!(answer["response"]["allowed"], true);
            assert!(answer["response"].get("patch").is_none());
        }
        let (answer, _) = review(
            br#"{"request":{"uid":"u1","kind":{"kind":"Pod"},"operation":"CREATE","object":{"spec":{}}}}"#,
            &settings(),
        );
        assert_eq!(answer["response"]["uid"], "u1");
    }

    #[test]
    fn opted_out_windows_and_other_kinds_are_left_alone() {
        let opted = json!({ "metadata": { "annotations": { OPT_OUT_ANNOTATION: "disabled" } }, "spec": { "containers": [{ "name": "a" }] } });
        let (_, outcome) = review(&serde_json::to_vec(&review_of(opted)).unwrap(), &settings());
        assert_eq!(outcome, Outcome::OptedOut);
        let windows =
            json!({ "metadata": {}, "spec": { "os": { "name": "windows" }, "containers": [{ "name": "a" }] } });
        let (_, outcome) = review(&serde_json::to_vec(&review_of(windows)).unwrap(), &settings());
        assert_eq!(outcome, Outcome::NotApplicable("windows pod"));
        let mut update = review_of(json!({ "metadata": {}, "spec": { "containers": [] } }));
        update["request"]["operation"] = json!("UPDATE");
        let (answer, outcome) = review(&serde_json::to_vec(&update).unwrap(), &settings());
        assert_eq!(outcome, Outcome::NotApplicable("not a creation"));
        assert!(answer["response"].get("patch").is_none());
    }
}
