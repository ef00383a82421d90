//! The fake Bedrock's check of AWS SigV4: given the real credentials, it
//! computes the signature a request should carry, as AWS does, and says
//! whether the one it carries is that one.
//!
//! The expected signature is made by the SDK's signer (`aws-sigv4`) over
//! what the server received: the method, the path and query as sent, the
//! headers the request names in `SignedHeaders` with the values received
//! (the `host` the server saw), the request's own `x-amz-date`, and the
//! received body's SHA-256. The signer adds nothing of its own: the date,
//! session token and body hash it would add are compared with the received
//! headers first. A request the proxy signs with this same signer can only
//! pass if all of those agree; the SDK test also sends `boto3`'s own
//! signature straight to the fake provider, so the check is held to a
//! signer other than ours too.

use std::time::SystemTime;

use aws_credential_types::Credentials;
use aws_lc_rs::digest;
use aws_sigv4::{
    http_request::{PayloadChecksumKind, SessionTokenMode, SignableBody, SignableRequest, SigningSettings, sign},
    sign::v4,
};
use aws_smithy_runtime_api::client::identity::Identity;
use http::HeaderMap;

/// The credentials the fake provider holds as the real ones.
#[derive(Clone, PartialEq, Eq)]
pub struct AwsCredentialsExpected {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl std::fmt::Debug for AwsCredentialsExpected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AwsCredentialsExpected(***)")
    }
}

/// What a request's signature was found to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SigV4Check {
    /// Made with the expected credentials over what was received.
    Verified {
        access_key_id: String,
        region: String,
        service: String,
        /// `SignedHeaders`, as sent.
        signed_headers: String,
    },
    /// Not: AWS's error code (`InvalidSignatureException`,
    /// `UnrecognizedClientException`, `IncompleteSignatureException`) and why.
    Rejected { code: &'static str, why: String },
}

impl SigV4Check {
    pub fn is_verified(&self) -> bool {
        matches!(self, Self::Verified { .. })
    }
}

fn rejected(code: &'static str, why: impl Into<String>) -> SigV4Check {
    SigV4Check::Rejected { code, why: why.into() }
}

fn incomplete(why: &str) -> SigV4Check {
    rejected("IncompleteSignatureException", why)
}

fn hex_sha256(bytes: &[u8]) -> String {
    digest::digest(&digest::SHA256, bytes).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks the SigV4 signature of a request as received: `path` with its
/// query, `authority` the host it was sent to.
pub fn verify(
    method: &str,
    authority: &str,
    path: &str,
    headers: &HeaderMap,
    body: &[u8],
    expected: &AwsCredentialsExpected,
) -> SigV4Check {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let Some(auth) = header("authorization") else {
        return rejected("MissingAuthenticationTokenException", "no authorization header");
    };
    let Some(rest) = auth.strip_prefix("AWS4-HMAC-SHA256 ") else {
        return incomplete("not an AWS4-HMAC-SHA256 authorization");
    };
    let field = |name: &str| {
        rest.split(',').filter_map(|p| p.trim().split_once('=')).find(|(k, _)| *k == name).map(|(_, v)| v.trim())
    };
    let (Some(credential), Some(signed_headers), Some(signature)) =
        (field("Credential"), field("SignedHeaders"), field("Signature"))
    else {
        return incomplete("Credential, SignedHeaders or Signature missing");
    };
    let scope: Vec<&str> = credential.split('/').collect();
    let [access_key_id, date, region, service, "aws4_request"] = scope.as_slice() else {
        return incomplete("malformed credential scope");
    };
    if *access_key_id != expected.access_key_id {
        return rejected("UnrecognizedClientException", "the security token included in the request is invalid");
    }
    let Some(amz_date) = header("x-amz-date") else {
        return incomplete("no x-amz-date");
    };
    let time = match time::format_description::parse_borrowed::<2>("[year][month][day]T[hour][minute][second]Z")
        .ok()
        .and_then(|format| time::PrimitiveDateTime::parse(amz_date, &format).ok())
    {
        Some(t) => SystemTime::from(t.assume_utc()),
        None => return incomplete("x-amz-date is not yyyymmddThhmmssZ"),
    };
    if !amz_date.starts_with(date) {
        return rejected("InvalidSignatureException", "the credential scope's date is not x-amz-date's");
    }
    let names: Vec<&str> = signed_headers.split(';').collect();
    for needed in ["host", "x-amz-date"] {
        if !names.contains(&needed) {
            return incomplete("host and x-amz-date must be signed");
        }
    }
    let token_signed = names.contains(&"x-amz-security-token");
    if header("x-amz-security-token") != expected.session_token.as_deref()
        || token_signed != expected.session_token.is_some()
    {
        return rejected("UnrecognizedClientException", "the session token is not the expected one, or not signed");
    }
    let hash_signed = names.contains(&"x-amz-content-sha256");
    if hash_signed && header("x-amz-content-sha256") != Some(hex_sha256(body).as_str()) {
        return rejected("InvalidSignatureException", "x-amz-content-sha256 is not the body's");
    }
    // The signed headers as received, but those the signer makes itself.
    let mut signed = Vec::new();
    for name in &names {
        if matches!(*name, "x-amz-date" | "x-amz-security-token" | "x-amz-content-sha256") {
            continue;
        }
        if *name == "host" {
            signed.push(("host", header("host").unwrap_or(authority)));
            continue;
        }
        let values: Vec<&str> = headers.get_all(*name).iter().filter_map(|v| v.to_str().ok()).collect();
        if values.is_empty() {
            return rejected("InvalidSignatureException", format!("signed header {name} was not received"));
        }
        signed.extend(values.into_iter().map(|v| (*name, v)));
    }
    let mut settings = SigningSettings::default();
    settings.excluded_headers = None;
    if hash_signed {
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
    }
    if !token_signed {
        settings.session_token_mode = SessionTokenMode::Exclude;
    }
    let identity: Identity = Credentials::new(
        expected.access_key_id.clone(),
        expected.secret_access_key.clone(),
        expected.session_token.clone(),
        None,
        "fake-provider",
    )
    .into();
    let params = match v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(service)
        .time(time)
        .settings(settings)
        .build()
    {
        Ok(p) => p.into(),
        Err(e) => return incomplete(&e.to_string()),
    };
    let uri = format!("https://{authority}{path}");
    let request = match SignableRequest::new(method, uri, signed.into_iter(), SignableBody::Bytes(body)) {
        Ok(r) => r,
        Err(e) => return incomplete(&e.to_string()),
    };
    // The signer traces its parameters, the access key id among them: the
    // SDK test searches the process's log for it (the proxy's signing).
    let computed = match tracing::subscriber::with_default(tracing::subscriber::NoSubscriber::default(), || {
        sign(request, &params)
    }) {
        Ok(out) => out.into_parts().1,
        Err(e) => return incomplete(&e.to_string()),
    };
    if computed != signature {
        return rejected(
            "InvalidSignatureException",
            "The request signature we calculated does not match the signature you provided.",
        );
    }
    SigV4Check::Verified {
        access_key_id: (*access_key_id).to_owned(),
        region: (*region).to_owned(),
        service: (*service).to_owned(),
        signed_headers: signed_headers.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use crate::guardrails::keys::sigv4::{AwsCredentials, Scope, resign};

    use super::*;

    const URI: &str = "https://bedrock-runtime.us-east-1.amazonaws.com:8443/model/amazon.nova-lite-v1%3A0/converse";

    fn expected() -> AwsCredentialsExpected {
        AwsCredentialsExpected {
            access_key_id: "AKIAREAL".into(),
            secret_access_key: "real/secret".into(),
            session_token: Some("token".into()),
        }
    }

    /// A request signed by the proxy's signer with `creds`, over `body`.
    fn signed(creds: &AwsCredentials, body: &[u8]) -> http::request::Parts {
        let mut head = http::Request::post(URI)
            .header("content-type", "application/json")
            .header(
                "authorization",
                "AWS4-HMAC-SHA256 Credential=ik-x/20260101/us-east-1/bedrock/aws4_request, \
                 SignedHeaders=content-type;host;x-amz-date, Signature=00",
            )
            .body(())
            .unwrap()
            .into_parts()
            .0;
        let scope = Scope::parse(head.headers["authorization"].to_str().unwrap()).unwrap();
        resign(&mut head, body, creds, &scope, SystemTime::now()).unwrap();
        head.headers.insert("host", "bedrock-runtime.us-east-1.amazonaws.com:8443".parse().unwrap());
        head
    }

    fn check(head: &http::request::Parts, body: &[u8]) -> SigV4Check {
        let path = head.uri.path_and_query().unwrap().as_str();
        verify("POST", "ignored-when-host-is-sent", path, &head.headers, body, &expected())
    }

    #[test]
    fn a_good_signature_passes_and_any_change_fails() {
        let real = AwsCredentials::new("AKIAREAL".into(), "real/secret".into(), Some("token".into()));
        let head = signed(&real, b"{\"a\":1}");
        let verified = check(&head, b"{\"a\":1}");
        assert_eq!(
            verified,
            SigV4Check::Verified {
                access_key_id: "AKIAREAL".into(),
                region: "us-east-1".into(),
                service: "bedrock".into(),
                signed_headers: "content-type;host;x-amz-date;x-amz-security-token".into(),
            }
        );
        let code = |c: SigV4Check| match c {
            SigV4Check::Rejected { code, .. } => code,
            SigV4Check::Verified { .. } => "verified",
        };
        assert_eq!(code(check(&head, b"{\"a\":2}")), "InvalidSignatureException");
        let mut other_type = head.clone();
        other_type.headers.insert("content-type", "text/plain".parse().unwrap());
        assert_eq!(code(check(&other_type, b"{\"a\":1}")), "InvalidSignatureException");
        let wrong_secret = AwsCredentials::new("AKIAREAL".into(), "not/it".into(), Some("token".into()));
        assert_eq!(code(check(&signed(&wrong_secret, b"{}"), b"{}")), "InvalidSignatureException");
        let other_key = AwsCredentials::new("AKIAOTHER".into(), "real/secret".into(), Some("token".into()));
        assert_eq!(code(check(&signed(&other_key, b"{}"), b"{}")), "UnrecognizedClientException");
        let no_token = AwsCredentials::new("AKIAREAL".into(), "real/secret".into(), None);
        assert_eq!(code(check(&signed(&no_token, b"{}"), b"{}")), "UnrecognizedClientException");
    }
}
