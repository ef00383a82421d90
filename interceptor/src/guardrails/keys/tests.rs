use std::os::unix::fs::PermissionsExt as _;

use super::*;

const REAL_A: &str = "sk-real-team-a-0123456789";
const REAL_B: &str = "sk-ant-real-team-b-987654";

fn workload(comm: &str) -> Workload {
    Workload { pid: 42, comm: comm.into(), ..Workload::default() }
}

/// A file with real keys for `python3` (OpenAI) and `node` (Anthropic), and
/// placeholders issued for them; returns the broker and the placeholders.
fn broker() -> (Broker, String, String, String) {
    let openai = "ik-openaiPlaceholder0000000000000000".to_string();
    let anthropic = "ik-anthropicPlaceholder000000000000".to_string();
    let stray = "ik-openaiForNodeOnly000000000000000".to_string();
    let text = format!(
        r#"
[[real]]
provider = "openai"
scope.workloads = ["comm:python3"]
key = "{REAL_A}"

[[real]]
provider = "anthropic"
scope.workloads = ["comm:node"]
key = "{REAL_B}"

[[placeholder]]
id = "{}"
provider = "openai"
scope.workloads = ["comm:python3"]

[[placeholder]]
id = "{}"
provider = "anthropic"
scope.workloads = ["comm:node", "comm:python3"]

[[placeholder]]
id = "{}"
provider = "openai"
scope.workloads = ["comm:node"]
"#,
        placeholder_id(&openai),
        placeholder_id(&anthropic),
        placeholder_id(&stray),
    );
    (Broker::from_text(&text, "ik-", Path::new("keys.toml")).unwrap(), openai, anthropic, stray)
}

fn head(uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
    let mut b = http::Request::post(uri);
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    b.body(()).unwrap().into_parts().0
}

fn swapped(b: &Broker, host: &str, w: &Workload, mut h: http::request::Parts) -> http::request::Parts {
    match b.decide(host, Some(w), &h) {
        Verdict::Replace(brokered) => apply(&mut h, &brokered.swaps),
        other => panic!("expected a replacement, got {other:?}"),
    }
    h
}

fn refused(b: &Broker, host: &str, w: Option<&Workload>, h: &http::request::Parts) -> String {
    match b.decide(host, w, h) {
        Verdict::Refuse(reason) => reason,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn placeholder_ids_are_sha256_hex_and_placeholders_are_random() {
    assert_eq!(placeholder_id("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    let a = new_placeholder("ik-");
    let b = new_placeholder("ik-");
    assert_ne!(a, b);
    assert_eq!(a.len(), 3 + 32);
    assert!(a.starts_with("ik-") && a[3..].bytes().all(|c| c.is_ascii_alphanumeric()), "{a}");
}

#[test]
fn a_placeholder_is_replaced_in_each_place() {
    let (b, openai, anthropic, _) = broker();
    let py = workload("python3");
    let bearer = format!("Bearer {openai}");
    let h = swapped(
        &b,
        "api.openai.com",
        &py,
        head("https://api.openai.com/v1/chat/completions", &[("authorization", &bearer)]),
    );
    // Failure messages never print a key.
    assert!(h.headers["authorization"] == format!("Bearer {REAL_A}").as_str(), "authorization not swapped");
    assert!(h.headers["authorization"].is_sensitive());

    for name in ["x-api-key", "api-key", "x-goog-api-key"] {
        let h = swapped(&b, "api.openai.com", &py, head("https://api.openai.com/v1/x", &[(name, &openai)]));
        assert!(h.headers[name] == REAL_A, "{name} not swapped");
    }
    let node = workload("node");
    let h = swapped(
        &b,
        "api.anthropic.com",
        &node,
        head("https://api.anthropic.com/v1/messages", &[("x-api-key", &anthropic)]),
    );
    assert!(h.headers["x-api-key"] == REAL_B, "x-api-key not swapped");

    let uri = format!("https://api.openai.com/v1/models?alt=sse&key={openai}&x=1");
    let h = swapped(&b, "api.openai.com", &py, head(&uri, &[]));
    assert!(h.uri.query() == Some(format!("alt=sse&key={REAL_A}&x=1").as_str()), "query key not swapped");
    assert_eq!(h.uri.path(), "/v1/models");
}

#[test]
fn query_keys_are_percent_encoded() {
    assert_eq!(percent_encode("a+b/c=d"), "a%2Bb%2Fc%3Dd");
    assert_eq!(percent_encode("AIza-_.~9"), "AIza-_.~9");
}

#[test]
fn each_misuse_is_refused_without_naming_a_key() {
    let (b, openai, anthropic, stray) = broker();
    let py = workload("python3");
    let node = workload("node");
    let cases: Vec<(&str, Option<&Workload>, http::request::Parts, &str)> = vec![
        (
            "api.openai.com",
            Some(&py),
            head("/", &[("authorization", "Bearer ik-neverIssued00000000000000000000")]),
            "unknown or revoked",
        ),
        ("api.openai.com", Some(&node), head("/", &[("x-api-key", &openai)]), "outside its scope"),
        ("api.openai.com", None, head("/", &[("x-api-key", &openai)]), "outside its scope"),
        (
            "api.openai.com",
            Some(&py),
            head("/", &[("x-api-key", &anthropic)]),
            "placeholder for anthropic sent to openai",
        ),
        (
            "api.openai.com",
            Some(&py),
            head("/", &[("authorization", &format!("Bearer {REAL_A}"))]),
            "not a placeholder",
        ),
        ("api.openai.com", Some(&py), head("/", &[("authorization", "Bearer sk-some-other-key")]), "not a placeholder"),
        ("api.anthropic.com", Some(&py), head("/", &[("x-api-key", &anthropic)]), "no key brokered for this workload"),
        ("api.openai.com", Some(&node), head("/", &[("x-api-key", &stray)]), "no key brokered for this workload"),
        ("api.openai.com", Some(&py), head(&format!("/?key={openai}&key={openai}"), &[]), "more than once"),
        ("example.com", Some(&py), head("/", &[("x-api-key", &openai)]), "host of no brokered provider"),
        (
            "api.openai.com",
            Some(&py),
            head("/", &[("api-key", &openai), ("api-key", &openai)]),
            "api-key given more than once",
        ),
        ("api.openai.com", Some(&py), head("/", &[("x-api-key", "ik-\u{e9}")]), "x-api-key not readable text"),
    ];
    for (host, w, h, expected) in cases {
        let reason = refused(&b, host, w, &h);
        assert!(reason.contains(expected), "{host}: `{reason}` lacks `{expected}`");
        for secret in [REAL_A, REAL_B, &openai, &anthropic, &stray] {
            assert!(!reason.contains(secret), "a refusal names a credential: {reason}");
        }
    }
}

#[test]
fn what_brokering_does_not_cover_is_left_alone() {
    let (b, ..) = broker();
    let other = workload("curl");
    // A workload no real key covers keeps its own key.
    let h = head("/", &[("authorization", "Bearer sk-own")]);
    assert!(matches!(b.decide("api.openai.com", Some(&other), &h), Verdict::Untouched));
    // Other schemes are not keys; AWS credentials of a provider nothing is
    // brokered for are left alone.
    let h = head("/", &[("authorization", "Basic dXNlcjpwYXNz")]);
    assert!(matches!(b.decide("api.openai.com", Some(&workload("python3")), &h), Verdict::Untouched));
    let sigv4 = "AWS4-HMAC-SHA256 Credential=AKIA/20260101/us-east-1/bedrock/aws4_request, Signature=ab";
    let h = head("/", &[("authorization", sigv4)]);
    let bedrock = "bedrock-runtime.us-east-1.amazonaws.com";
    assert!(matches!(b.decide(bedrock, Some(&workload("python3")), &h), Verdict::Untouched));
    // No credential at all.
    assert!(matches!(b.decide("api.openai.com", Some(&workload("python3")), &head("/", &[])), Verdict::Untouched));
}

#[test]
fn the_file_is_validated_entry_by_entry_without_echoing_keys() {
    let text = r#"
[[real]]
provider = "nope"
key = "sk-secret-one"
scope.workloads = ["bogus:x"]

[[real]]
provider = "openai"
key = "ik-looks-like-a-placeholder"

[[placeholder]]
id = "abc"
provider = "openai"
"#;
    let error = Broker::from_text(text, "ik-", Path::new("k.toml")).unwrap_err().to_string();
    for expected in [
        "real[0] (nope): unknown provider",
        "real[0] (nope): scope.workloads",
        "real[1] (openai): key starts",
        "placeholder[0]: id",
    ] {
        assert!(error.contains(expected), "{error}");
    }
    assert!(!error.contains("sk-secret-one") && !error.contains("looks-like"), "{error}");

    // A syntax error does not quote the line it is on.
    let error = Broker::from_text(
        "[[real]]\nprovider = \"openai\"\nkey = \"sk-unterminated-secret\n",
        "ik-",
        Path::new("k.toml"),
    )
    .unwrap_err()
    .to_string();
    assert!(error.contains("line 3"), "{error}");
    assert!(!error.contains("sk-unterminated"), "{error}");
    let error = Broker::from_text("[[real]]\nprovider = \"openai\"\nkey = 12345678\n", "ik-", Path::new("k.toml"))
        .unwrap_err()
        .to_string();
    assert!(!error.contains("12345678"), "{error}");

    // Hosts name a provider the built-in list does not know.
    let text = "[[real]]\nprovider = \"internal\"\nhosts = [\"llm.corp.example\"]\nkey = \"k\"\n";
    let b = Broker::from_text(text, "ik-", Path::new("k.toml")).unwrap();
    assert_eq!(b.provider_of("llm.corp.example"), Some("internal"));
    assert_eq!(b.provider_of("api.openai.com"), Some("openai"));
    assert_eq!(b.provider_of("x.openai.azure.com"), Some("azure_openai"));
}

#[test]
fn debug_output_holds_no_key() {
    let (b, ..) = broker();
    let printed = format!("{b:?}");
    assert!(!printed.contains(REAL_A) && !printed.contains(REAL_B), "{printed}");
    let secret = Secret::new(REAL_A.into());
    assert_eq!(format!("{secret:?}"), "Secret(***)");
    let py = workload("python3");
    let h = head("/", &[("x-api-key", &broker().1)]);
    let verdict = b.decide("api.openai.com", Some(&py), &h);
    let printed = format!("{verdict:?}");
    assert!(matches!(verdict, Verdict::Replace(_)));
    assert!(!printed.contains(REAL_A), "{printed}");
}

#[test]
fn a_file_others_can_read_is_refused_and_a_missing_one_is_empty() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    let b = Broker::load(&path, "ik-").unwrap();
    assert_eq!(b.placeholders().count(), 0);
    std::fs::write(&path, format!("[[real]]\nprovider = \"openai\"\nkey = \"{REAL_A}\"\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    let error = Broker::load(&path, "ik-").unwrap_err().to_string();
    assert!(error.contains("can be read by others") && error.contains("640"), "{error}");
    assert!(file_digest(&path).is_err());
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(Broker::load(&path, "ik-").unwrap().real_scopes().count(), 1);
}

#[test]
fn issue_and_revoke_keep_the_rest_of_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    let original = format!("# Team A's key.\n[[real]]\nprovider = \"openai\"\nkey = \"{REAL_A}\"\n");
    std::fs::write(&path, &original).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();

    let mut file = KeysFile::open(&path, "ik-").unwrap();
    let first = file.issue("openai", &["namespace:team-a".into()], "2026-01-01T00:00:00Z").unwrap();
    let second = file.issue("openai", &[], "2026-01-01T00:00:00Z").unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.starts_with(&original), "{text}");
    assert!(!text.contains(&first) && text.contains(&placeholder_id(&first)), "{text}");
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);

    let b = Broker::load(&path, "ik-").unwrap();
    let listed: Vec<_> = b.placeholders().map(|p| (p.id.clone(), p.workloads.clone())).collect();
    assert_eq!(
        listed,
        [(placeholder_id(&first), vec!["namespace:team-a".to_string()]), (placeholder_id(&second), vec![])]
    );
    let py = workload("python3");
    let h = head("/", &[("x-api-key", &second)]);
    assert!(matches!(b.decide("api.openai.com", Some(&py), &h), Verdict::Replace(_)));

    let mut file = KeysFile::open(&path, "ik-").unwrap();
    assert!(matches!(file.revoke("abc"), Err(KeysError::ShortPrefix { .. })));
    assert!(matches!(file.revoke("000000"), Err(KeysError::NotFound { .. })));
    let revoked = file.revoke(&placeholder_id(&second)[..8]).unwrap();
    assert_eq!(revoked.id, placeholder_id(&second));
    let b = Broker::load(&path, "ik-").unwrap();
    assert_eq!(b.placeholders().count(), 1);
    let reason = refused(&b, "api.openai.com", Some(&py), &h);
    assert!(reason.contains("unknown or revoked"), "{reason}");
    assert!(std::fs::read_to_string(&path).unwrap().starts_with(&original));
}

const REAL_AKID: &str = "AKIAREALTEAMA0000001";
const REAL_AWS_SECRET: &str = "realSecretAccessKeyTeamA/0000000000000000";
const BEDROCK: &str = "bedrock-runtime.us-east-1.amazonaws.com";

/// Real AWS credentials (with a session token) for `python3` on Bedrock, and a
/// placeholder access key id for it; returns the broker and the placeholder.
fn aws_broker() -> (Broker, String) {
    let placeholder = "ik-bedrockPlaceholder00000000000000".to_string();
    let text = format!(
        r#"
[[real]]
provider = "bedrock"
scope.workloads = ["comm:python3"]
aws_access_key_id = "{REAL_AKID}"
aws_secret_access_key = "{REAL_AWS_SECRET}"
aws_session_token = "realSessionToken"

[[placeholder]]
id = "{}"
provider = "bedrock"
scope.workloads = ["comm:python3", "comm:node"]
"#,
        placeholder_id(&placeholder),
    );
    (Broker::from_text(&text, "ik-", Path::new("keys.toml")).unwrap(), placeholder)
}

fn signed_by(access_key_id: &str) -> http::request::Parts {
    let auth = format!(
        "AWS4-HMAC-SHA256 Credential={access_key_id}/20260101/us-east-1/bedrock/aws4_request, \
         SignedHeaders=content-type;host;x-amz-date;x-amz-security-token, Signature=00ff"
    );
    head(
        &format!("https://{BEDROCK}/model/amazon.nova-lite-v1%3A0/converse"),
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
            ("x-amz-date", "20260101T000000Z"),
            ("x-amz-security-token", "placeholder-token"),
        ],
    )
}

#[test]
fn a_placeholder_access_key_id_is_signed_for_with_the_real_credentials() {
    let (b, placeholder) = aws_broker();
    let mut h = signed_by(&placeholder);
    let Verdict::Replace(brokered) = b.decide(BEDROCK, Some(&workload("python3")), &h) else {
        panic!("not brokered");
    };
    assert!(brokered.swaps.is_empty());
    let resign = brokered.resign.as_ref().expect("a signature to make again");
    assert!(!format!("{brokered:?}").contains(REAL_AKID), "debug output shows the access key id");
    resign.apply(&mut h, br#"{"messages":[]}"#, std::time::SystemTime::now()).unwrap();
    let auth = h.headers["authorization"].to_str().unwrap();
    assert!(auth.starts_with(&format!("AWS4-HMAC-SHA256 Credential={REAL_AKID}/")), "{auth}");
    assert!(auth.contains("/us-east-1/bedrock/aws4_request, "), "{auth}");
    assert_eq!(h.headers["x-amz-security-token"], "realSessionToken");
    assert!(!format!("{:?}", h.headers).contains(&placeholder));
}

#[test]
fn aws_credentials_are_refused_like_keys() {
    let (b, placeholder) = aws_broker();
    let py = workload("python3");
    // Out of the placeholder's scope; in it, but no real credentials.
    let reason = refused(&b, BEDROCK, Some(&workload("curl")), &signed_by(&placeholder));
    assert!(reason.contains("outside its scope") && reason.contains("AWS SigV4"), "{reason}");
    let reason = refused(&b, BEDROCK, Some(&workload("node")), &signed_by(&placeholder));
    assert!(reason.contains("no AWS credentials brokered"), "{reason}");
    // Real credentials from a workload that must use a placeholder.
    let reason = refused(&b, BEDROCK, Some(&py), &signed_by("AKIASOMEONEELSE00001"));
    assert!(reason.contains("not a placeholder"), "{reason}");
    assert!(!reason.contains("AKIASOMEONEELSE"), "{reason}");
    // The placeholder as a Bedrock API key: no key is brokered.
    let reason = refused(&b, BEDROCK, Some(&py), &head("/", &[("authorization", &format!("Bearer {placeholder}"))]));
    assert!(reason.contains("no key brokered"), "{reason}");
    // Where no signature can be made again: presigned, SigV4a.
    let presigned = format!(
        "https://{BEDROCK}/model/m/invoke?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={placeholder}%2F20260101%2Fus-east-1%2Fbedrock%2Faws4_request&X-Amz-Signature=00"
    );
    let reason = refused(&b, BEDROCK, Some(&py), &head(&presigned, &[]));
    assert!(reason.contains("cannot be signed again") && reason.contains("X-Amz-Credential"), "{reason}");
    let presigned_real = presigned.replace(&placeholder, "AKIASOMEONEELSE00001");
    assert!(refused(&b, BEDROCK, Some(&py), &head(&presigned_real, &[])).contains("not a placeholder"));
    let v4a = format!(
        "AWS4-ECDSA-P256-SHA256 Credential={placeholder}/20260101/bedrock/aws4_request, SignedHeaders=host, Signature=00"
    );
    let reason = refused(&b, BEDROCK, Some(&py), &head("/", &[("authorization", &v4a)]));
    assert!(reason.contains("SigV4a"), "{reason}");
    // A malformed scope is refused, not signed for.
    let mut bad = signed_by(&placeholder);
    let auth = format!(
        "AWS4-HMAC-SHA256 Credential={placeholder}/20260101/us-east-1/bedrock, SignedHeaders=host, Signature=00"
    );
    bad.headers.insert("authorization", auth.parse().unwrap());
    let reason = refused(&b, BEDROCK, Some(&py), &bad);
    assert!(reason.contains("credential scope") && !reason.contains(&placeholder), "{reason}");
}

#[test]
fn aws_credentials_in_the_file_are_validated_without_echoing_them() {
    let text = r#"
[[real]]
provider = "bedrock"
key = "sk-some-key"
aws_access_key_id = "AKIAECHOED000000001"

[[real]]
provider = "bedrock"
aws_access_key_id = "AKIAECHOED000000002"

[[real]]
provider = "openai"
aws_access_key_id = "AKIAECHOED000000003"
aws_secret_access_key = "echoedSecret3"

[[real]]
provider = "bedrock"
aws_access_key_id = "ik-echoed4"
aws_secret_access_key = "echoed secret 4"

[[real]]
provider = "bedrock"
"#;
    let error = Broker::from_text(text, "ik-", Path::new("k.toml")).unwrap_err().to_string();
    for expected in [
        "real[0] (bedrock): give `key` or AWS credentials",
        "real[1] (bedrock): no credential",
        "real[2] (openai): openai takes a `key`, not AWS credentials",
        "real[3] (bedrock): aws_access_key_id starts with the placeholder prefix",
        "real[3] (bedrock): aws_secret_access_key must be",
        "real[4] (bedrock): no credential",
    ] {
        assert!(error.contains(expected), "{expected}: {error}");
    }
    assert!(!error.contains("ECHOED") && !error.contains("echoed") && !error.contains("sk-some"), "{error}");
    // Another provider named by its hosts may take AWS credentials.
    let text = "[[real]]\nprovider = \"sagemaker\"\nhosts = [\"runtime.sagemaker.*.amazonaws.com\"]\n\
                aws_access_key_id = \"AKIAX\"\naws_secret_access_key = \"s\"\n";
    assert!(Broker::from_text(text, "ik-", Path::new("k.toml")).is_ok());
    assert_eq!(aws_broker().0.provider_of("bedrock-runtime.eu-west-3.amazonaws.com"), Some("bedrock"));
}
