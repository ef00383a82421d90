//! AWS SigV4 under key brokering (Bedrock): where an AWS access key id sits
//! in a request, the credential scope of a workload's `Authorization:
//! AWS4-HMAC-SHA256 …`, and re-signing the request as it will be sent with
//! the brokered credentials, by the AWS SDK's own signer (`aws-sigv4`).
//!
//! This module owns the real AWS credentials in memory ([`AwsCredentials`]:
//! zeroed on drop, never shown) and the signing of one request head over
//! its final body. It is pure: the time is given, and nothing is logged
//! (the signer's own trace events, whose parameters name the access key id,
//! are not emitted).
//!
//! What is verified and what is not. The workload signs with a placeholder
//! secret the proxy never knows, so its signature cannot be checked and is
//! not: it is dropped. The access key id it names is judged by the caller
//! (a placeholder of this provider and scope); the credential scope must be
//! well formed, and its region and service are signed for again. The new
//! signature covers the method, path and query, the host the provider sees,
//! the body as it leaves (after any guardrail rewrite), and the headers the
//! workload signed that are still sent (not `content-length`, which the
//! proxy sets after a rewrite; the body hash covers the body).

use std::{fmt, time::SystemTime};

use aws_credential_types::Credentials;
use aws_sigv4::{
    http_request::{PayloadChecksumKind, SignableBody, SignableRequest, SigningSettings, sign},
    sign::v4,
};
use aws_smithy_runtime_api::client::identity::Identity;
use http::{HeaderName, HeaderValue, header};
use zeroize::Zeroizing;

/// The signature's algorithm, as `Authorization` names it.
pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";
/// SigV4a (`Authorization: AWS4-ECDSA-P256-SHA256 …`): multi-region, not
/// re-signed here.
pub const ALGORITHM_V4A: &str = "AWS4-ECDSA-P256-SHA256";
/// A presigned request's access key id (and scope), in the query.
pub const QUERY_CREDENTIAL: &str = "X-Amz-Credential";

const X_AMZ_DATE: HeaderName = HeaderName::from_static("x-amz-date");
const X_AMZ_SECURITY_TOKEN: HeaderName = HeaderName::from_static("x-amz-security-token");
const X_AMZ_CONTENT_SHA256: HeaderName = HeaderName::from_static("x-amz-content-sha256");

/// The headers of the old signature: removed, and made again by the signer.
const SIGNATURE_HEADERS: [HeaderName; 4] =
    [header::AUTHORIZATION, X_AMZ_DATE, X_AMZ_SECURITY_TOKEN, X_AMZ_CONTENT_SHA256];

/// Signed headers the new signature leaves out: the signer makes the
/// signature's own, `host` comes from the request target, and the proxy
/// sets `content-length` (and removes hop-by-hop headers) after signing.
const NOT_RESIGNED: [&str; 9] = [
    "authorization",
    "x-amz-date",
    "x-amz-security-token",
    "x-amz-content-sha256",
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
];

/// Real AWS credentials: an access key id, its secret and an optional
/// session token, held by the SDK's credential type (which zeroes them on
/// drop). Never shown: `Debug` prints nothing of them.
pub struct AwsCredentials {
    /// The SDK's `Credentials`, as the signer takes them.
    identity: Identity,
}

impl AwsCredentials {
    pub fn new(access_key_id: String, secret_access_key: String, session_token: Option<String>) -> Self {
        let credentials = Credentials::new(access_key_id, secret_access_key, session_token, None, "interceptor-keys");
        Self { identity: Identity::from(credentials) }
    }
}

impl fmt::Debug for AwsCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AwsCredentials(***)")
    }
}

/// The credential scope and signed headers of a workload's SigV4
/// `Authorization` (its access key id and signature are not kept).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scope {
    pub region: String,
    pub service: String,
    /// `SignedHeaders`, lowercase, in the order given.
    pub signed_headers: Vec<HeaderName>,
}

#[derive(Debug, thiserror::Error)]
pub enum SigV4Error {
    #[error("the request has no host to sign for")]
    NoHost,
    /// `x-amz-content-sha256: STREAMING-…`: the body carries a signature
    /// per chunk (`aws-chunked`), chained from the one replaced.
    #[error("the body is signed chunk by chunk (aws-chunked), which is not signed again")]
    ChunkSigned,
    /// Only the header's name: its value could be a credential.
    #[error("signed header {0} is not text")]
    NotText(HeaderName),
    /// The signer's own errors name header values: kept as the source,
    /// left out of the message.
    #[error("the signer refused the request")]
    Signing(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// The `key=value` parameters after the algorithm of an `Authorization`
/// value (`Credential=…, SignedHeaders=…, Signature=…`).
fn parameters(rest: &str) -> impl Iterator<Item = (&str, &str)> {
    rest.split(',').filter_map(|p| p.trim().split_once('=')).map(|(k, v)| (k.trim(), v.trim()))
}

/// The algorithm of an AWS `Authorization` value and the rest after it.
fn algorithm(authorization: &str) -> Option<(&str, &str)> {
    let (alg, rest) = authorization.trim().split_once(char::is_whitespace)?;
    [ALGORITHM, ALGORITHM_V4A].contains(&alg).then_some((alg, rest))
}

/// Whether an `Authorization` value is SigV4 (`true`) or SigV4a (`false`);
/// `None` for any other scheme.
pub fn is_sigv4(authorization: &str) -> Option<bool> {
    algorithm(authorization).map(|(alg, _)| alg == ALGORITHM)
}

/// The access key id an AWS `Authorization` value (SigV4 or SigV4a) names
/// in its `Credential`; `None` for another scheme or no credential.
pub fn access_key_id(authorization: &str) -> Option<Zeroizing<String>> {
    let (_, rest) = algorithm(authorization)?;
    let (_, credential) = parameters(rest).find(|(k, _)| *k == "Credential")?;
    let id = credential.split('/').next().filter(|id| !id.is_empty())?;
    Some(Zeroizing::new(id.to_owned()))
}

/// The access key id of a presigned request's `X-Amz-Credential` query
/// parameter (percent-encoded, `/` as `%2F`).
pub fn query_access_key_id(value: &str) -> Option<Zeroizing<String>> {
    let decoded = Zeroizing::new(percent_decode(value));
    let id = decoded.split('/').next().filter(|id| !id.is_empty())?;
    Some(Zeroizing::new(id.to_owned()))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        match (bytes[i], bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(hi), Some(lo)) => {
                // Two hex digits: at most 0xff.
                out.push(u8::try_from(hi * 16 + lo).unwrap_or(b'?'));
                i += 3;
            }
            (b'+', ..) => {
                out.push(b' ');
                i += 1;
            }
            (b, ..) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn is_scope_label(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

impl Scope {
    /// The scope of a SigV4 `Authorization` value:
    /// `AWS4-HMAC-SHA256 Credential=<id>/<yyyymmdd>/<region>/<service>/aws4_request,
    /// SignedHeaders=<a;b;c>, Signature=<hex>`. The error says what is wrong,
    /// never what the header holds.
    pub fn parse(authorization: &str) -> Result<Self, &'static str> {
        let rest = match algorithm(authorization) {
            Some((ALGORITHM, rest)) => rest,
            _ => return Err("is not an AWS4-HMAC-SHA256 signature"),
        };
        let (mut credential, mut signed, mut signature) = (None, None, None);
        for (k, v) in parameters(rest) {
            match k {
                "Credential" => credential = Some(v),
                "SignedHeaders" => signed = Some(v),
                "Signature" => signature = Some(v),
                _ => {}
            }
        }
        let (Some(credential), Some(signed), Some(_)) = (credential, signed, signature) else {
            return Err("lacks Credential, SignedHeaders or Signature");
        };
        let parts: Vec<&str> = credential.split('/').collect();
        let [_, date, region, service, "aws4_request"] = parts.as_slice() else {
            return Err("has a credential scope that is not <id>/<date>/<region>/<service>/aws4_request");
        };
        if date.len() != 8 || !date.bytes().all(|b| b.is_ascii_digit()) {
            return Err("has a credential scope whose date is not yyyymmdd");
        }
        if !is_scope_label(region) || !is_scope_label(service) {
            return Err("has a credential scope whose region or service is not a name");
        }
        let signed_headers = signed
            .split(';')
            .map(|name| {
                HeaderName::from_bytes(name.as_bytes()).map_err(|_| "has SignedHeaders that are not header names")
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { region: (*region).to_owned(), service: (*service).to_owned(), signed_headers })
    }
}

/// The `Host` the provider sees for `uri`: hyper's client sends the
/// authority without a default port.
fn host_of(uri: &http::Uri, headers: &http::HeaderMap) -> Option<String> {
    let Some(authority) = uri.authority() else {
        return headers.get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_owned);
    };
    let default = match uri.scheme_str() {
        Some("http") => Some(80),
        Some("https") | None => Some(443),
        _ => None,
    };
    match authority.port_u16() {
        Some(port) if Some(port) == default => Some(authority.host().to_owned()),
        _ => Some(authority.as_str().to_owned()),
    }
}

/// Replaces the request's signature with one made with `creds` for
/// `scope`'s region and service at `now`, over `body` (the body as it will
/// be sent). Removes the old signature's headers first (`authorization`,
/// `x-amz-date`, `x-amz-security-token`, `x-amz-content-sha256`); the new
/// ones are marked sensitive. `x-amz-content-sha256` is sent again only if
/// the workload sent it.
pub fn resign(
    head: &mut http::request::Parts,
    body: &[u8],
    creds: &AwsCredentials,
    scope: &Scope,
    now: SystemTime,
) -> Result<(), SigV4Error> {
    let host = host_of(&head.uri, &head.headers).ok_or(SigV4Error::NoHost)?;
    let content_sha256 = head.headers.get(&X_AMZ_CONTENT_SHA256);
    if content_sha256.is_some_and(|v| v.as_bytes().starts_with(b"STREAMING-")) {
        return Err(SigV4Error::ChunkSigned);
    }
    let content_sha256 = content_sha256.is_some();
    for name in &SIGNATURE_HEADERS {
        head.headers.remove(name);
    }
    let mut headers: Vec<(&str, &str)> = vec![("host", host.as_str())];
    for name in &scope.signed_headers {
        if NOT_RESIGNED.contains(&name.as_str()) || headers.iter().any(|(n, _)| *n == name.as_str()) {
            continue;
        }
        for value in head.headers.get_all(name) {
            headers.push((name.as_str(), value.to_str().map_err(|_| SigV4Error::NotText(name.clone()))?));
        }
    }
    let mut settings = SigningSettings::default();
    // Which headers are signed is decided above, not by the signer's list.
    settings.excluded_headers = None;
    if content_sha256 {
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
    }
    let params = v4::SigningParams::builder()
        .identity(&creds.identity)
        .region(&scope.region)
        .name(&scope.service)
        .time(now)
        .settings(settings)
        .build()
        .map_err(|e| SigV4Error::Signing(Box::new(e)))?
        .into();
    let uri = head.uri.to_string();
    let signable = SignableRequest::new(head.method.as_str(), uri, headers.into_iter(), SignableBody::Bytes(body))
        .map_err(|e| SigV4Error::Signing(Box::new(e)))?;
    // The signer traces its parameters (the access key id among them): not
    // here.
    let signed =
        tracing::subscriber::with_default(tracing::subscriber::NoSubscriber::default(), || sign(signable, &params))
            .map_err(|e| SigV4Error::Signing(Box::new(e)))?;
    let (instructions, _signature) = signed.into_parts();
    for (name, value) in instructions.headers() {
        let name = HeaderName::from_bytes(name.as_bytes()).map_err(|e| SigV4Error::Signing(Box::new(e)))?;
        let mut value = HeaderValue::from_str(value).map_err(|e| SigV4Error::Signing(Box::new(e)))?;
        value.set_sensitive(true);
        head.headers.insert(name, value);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use aws_lc_rs::{digest, hmac};

    use super::*;

    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYREALSECRET";
    /// 2026-01-02T03:04:05Z.
    const NOW: u64 = 1_767_323_045;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn sha256(bytes: &[u8]) -> String {
        hex(digest::digest(&digest::SHA256, bytes).as_ref())
    }

    fn mac(key: &[u8], data: &str) -> Vec<u8> {
        hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data.as_bytes()).as_ref().to_vec()
    }

    /// SigV4 by the book (docs.aws.amazon.com, "Create a signed AWS API
    /// request"), independently of the signer: the signature of
    /// `canonical` for us-east-1/bedrock on 2026-01-02.
    fn by_hand(canonical: &str) -> String {
        let scope = "20260102/us-east-1/bedrock/aws4_request";
        let to_sign = format!("AWS4-HMAC-SHA256\n20260102T030405Z\n{scope}\n{}", sha256(canonical.as_bytes()));
        let mut key = mac(format!("AWS4{SECRET}").as_bytes(), "20260102");
        for part in ["us-east-1", "bedrock", "aws4_request"] {
            key = mac(&key, part);
        }
        hex(&mac(&key, &to_sign))
    }

    fn placeholder_head(extra: &[(&str, &str)]) -> http::request::Parts {
        let mut b = http::Request::post(
            "https://bedrock-runtime.us-east-1.amazonaws.com/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse",
        )
        .header(
            "authorization",
            "AWS4-HMAC-SHA256 Credential=ik-placeholder/20251231/us-east-1/bedrock/aws4_request, \
             SignedHeaders=content-length;content-type;host;x-amz-date;x-amz-security-token, \
             Signature=0123456789abcdef",
        )
        .header("content-type", "application/json")
        .header("content-length", "17")
        .header("x-amz-date", "20251231T235959Z")
        .header("x-amz-security-token", "ik-placeholder-token")
        .header("user-agent", "Boto3/1.35");
        for (n, v) in extra {
            b = b.header(*n, *v);
        }
        b.body(()).map(|r| r.into_parts().0).unwrap_or_else(|_| unreachable!("a valid test request"))
    }

    fn value<'a>(head: &'a http::request::Parts, name: &str) -> &'a str {
        head.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default()
    }

    #[test]
    fn a_modified_body_is_signed_as_the_canonical_request_says() {
        let creds = AwsCredentials::new("AKIAREALKEY".into(), SECRET.into(), Some("REAL-SESSION-TOKEN".into()));
        let mut head = placeholder_head(&[]);
        let scope = Scope::parse(value(&head, "authorization")).unwrap_or_else(|e| panic!("{e}"));
        let body = br#"{"messages":[{"role":"user","content":[{"text":"card [REDACTED]"}]}]}"#;
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(NOW);
        resign(&mut head, body, &creds, &scope, now).unwrap_or_else(|e| panic!("{e}"));

        // Double-encoded path (every service but S3); content-length is not
        // signed again, user-agent (unsigned) still is not; the real session
        // token is.
        let canonical = format!(
            "POST\n/model/anthropic.claude-3-haiku-20240307-v1%253A0/converse\n\n\
             content-type:application/json\nhost:bedrock-runtime.us-east-1.amazonaws.com\n\
             x-amz-date:20260102T030405Z\nx-amz-security-token:REAL-SESSION-TOKEN\n\n\
             content-type;host;x-amz-date;x-amz-security-token\n{}",
            sha256(body)
        );
        assert_eq!(
            value(&head, "authorization"),
            format!(
                "AWS4-HMAC-SHA256 Credential=AKIAREALKEY/20260102/us-east-1/bedrock/aws4_request, \
                 SignedHeaders=content-type;host;x-amz-date;x-amz-security-token, Signature={}",
                by_hand(&canonical)
            )
        );
        assert_eq!(value(&head, "x-amz-date"), "20260102T030405Z");
        assert_eq!(value(&head, "x-amz-security-token"), "REAL-SESSION-TOKEN");
        assert!(head.headers.get("authorization").is_some_and(HeaderValue::is_sensitive));
        assert!(head.headers.get("x-amz-security-token").is_some_and(HeaderValue::is_sensitive));
        // Left as they were: the proxy sets the length after a rewrite.
        assert_eq!(value(&head, "content-length"), "17");
        assert_eq!(value(&head, "user-agent"), "Boto3/1.35");
        assert!(!format!("{:?}", head.headers).contains("ik-"), "a placeholder is left");
    }

    #[test]
    fn the_old_signature_headers_go_and_the_body_hash_comes_back_only_if_sent() {
        let creds = AwsCredentials::new("AKIAREALKEY".into(), SECRET.into(), None);
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(NOW);
        let body = b"{}";

        // No session token: the workload's placeholder token is removed,
        // none is sent.
        let mut head = placeholder_head(&[]);
        let scope = Scope::parse(value(&head, "authorization")).unwrap_or_else(|e| panic!("{e}"));
        resign(&mut head, body, &creds, &scope, now).unwrap_or_else(|e| panic!("{e}"));
        assert!(head.headers.get("x-amz-security-token").is_none());
        assert!(head.headers.get("x-amz-content-sha256").is_none());
        assert!(value(&head, "authorization").contains("SignedHeaders=content-type;host;x-amz-date, "));

        // A body hash header is made again over the body as it is sent.
        let mut head = placeholder_head(&[("x-amz-content-sha256", "UNSIGNED-PAYLOAD")]);
        resign(&mut head, body, &creds, &scope, now).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(value(&head, "x-amz-content-sha256"), sha256(body));
        assert!(
            value(&head, "authorization").contains("SignedHeaders=content-type;host;x-amz-content-sha256;x-amz-date, ")
        );
        let canonical = format!(
            "POST\n/model/anthropic.claude-3-haiku-20240307-v1%253A0/converse\n\n\
             content-type:application/json\nhost:bedrock-runtime.us-east-1.amazonaws.com\n\
             x-amz-content-sha256:{hash}\nx-amz-date:20260102T030405Z\n\n\
             content-type;host;x-amz-content-sha256;x-amz-date\n{hash}",
            hash = sha256(body)
        );
        assert!(value(&head, "authorization").ends_with(&format!("Signature={}", by_hand(&canonical))));

        // A body signed chunk by chunk cannot be signed again whole.
        let mut head = placeholder_head(&[("x-amz-content-sha256", "STREAMING-AWS4-HMAC-SHA256-PAYLOAD")]);
        assert!(matches!(resign(&mut head, body, &creds, &scope, now), Err(SigV4Error::ChunkSigned)));
    }

    #[test]
    fn the_host_is_the_one_the_provider_sees() {
        let creds = AwsCredentials::new("AKIAREALKEY".into(), SECRET.into(), None);
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(NOW);
        let scope = Scope {
            region: "us-east-1".into(),
            service: "bedrock".into(),
            signed_headers: vec![HeaderName::from_static("host")],
        };
        for (uri, host) in [
            ("https://bedrock-runtime.us-east-1.amazonaws.com:443/x", "bedrock-runtime.us-east-1.amazonaws.com"),
            ("https://bedrock-runtime.us-east-1.amazonaws.com:8443/x", "bedrock-runtime.us-east-1.amazonaws.com:8443"),
        ] {
            let mut head =
                http::Request::post(uri).body(()).map(|r| r.into_parts().0).unwrap_or_else(|_| unreachable!());
            resign(&mut head, b"", &creds, &scope, now).unwrap_or_else(|e| panic!("{e}"));
            let canonical =
                format!("POST\n/x\n\nhost:{host}\nx-amz-date:20260102T030405Z\n\nhost;x-amz-date\n{}", sha256(b""));
            assert!(value(&head, "authorization").ends_with(&by_hand(&canonical)), "{uri}");
        }
        // No authority and no host: nothing to sign for.
        let mut head = http::Request::post("/x").body(()).map(|r| r.into_parts().0).unwrap_or_else(|_| unreachable!());
        assert!(matches!(resign(&mut head, b"", &creds, &scope, now), Err(SigV4Error::NoHost)));
    }

    #[test]
    fn scopes_and_access_key_ids_are_read_from_what_the_sdks_send() {
        let auth = "AWS4-HMAC-SHA256 Credential=ik-abc/20260102/eu-west-1/bedrock/aws4_request, \
                    SignedHeaders=host;x-amz-date, Signature=ff";
        let scope = Scope::parse(auth).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((scope.region.as_str(), scope.service.as_str()), ("eu-west-1", "bedrock"));
        assert_eq!(scope.signed_headers, [HeaderName::from_static("host"), HeaderName::from_static("x-amz-date")]);
        assert_eq!(access_key_id(auth).as_deref().map(String::as_str), Some("ik-abc"));
        assert_eq!(is_sigv4(auth), Some(true));
        let v4a =
            "AWS4-ECDSA-P256-SHA256 Credential=AKIAX/20260102/bedrock/aws4_request, SignedHeaders=host, Signature=ff";
        assert_eq!(is_sigv4(v4a), Some(false));
        assert_eq!(access_key_id(v4a).as_deref().map(String::as_str), Some("AKIAX"));
        assert!(Scope::parse(v4a).is_err());
        assert_eq!(is_sigv4("Bearer ik-abc"), None);
        assert!(access_key_id("Bearer ik-abc").is_none());
        assert!(access_key_id("AWS4-HMAC-SHA256 SignedHeaders=host, Signature=ff").is_none());
        let q = query_access_key_id("ik-abc%2F20260102%2Fus-east-1%2Fbedrock%2Faws4_request");
        assert_eq!(q.as_deref().map(String::as_str), Some("ik-abc"));

        for bad in [
            "AWS4-HMAC-SHA256 Credential=ik-abc/20260102/eu-west-1/bedrock/aws4_request, Signature=ff",
            "AWS4-HMAC-SHA256 Credential=ik-abc/20260102/eu-west-1/aws4_request, SignedHeaders=host, Signature=ff",
            "AWS4-HMAC-SHA256 Credential=ik-abc/2026-01-02/eu-west-1/bedrock/aws4_request, SignedHeaders=host, Signature=ff",
            "AWS4-HMAC-SHA256 Credential=ik-abc/20260102/EU WEST/bedrock/aws4_request, SignedHeaders=host, Signature=ff",
            "AWS4-HMAC-SHA256 Credential=ik-abc/20260102/eu-west-1/bedrock/aws4_request, SignedHeaders=ho st, Signature=ff",
        ] {
            let error = Scope::parse(bad).err().unwrap_or_else(|| panic!("accepted {bad}"));
            assert!(!error.contains("ik-abc"), "the error echoes the header");
        }
    }

    #[test]
    fn credentials_never_show() {
        let creds = AwsCredentials::new("AKIAREALKEY".into(), SECRET.into(), Some("TOKEN".into()));
        let shown = format!("{creds:?}");
        assert!(!shown.contains("AKIAREALKEY") && !shown.contains(SECRET) && !shown.contains("TOKEN"), "{shown}");
    }
}
