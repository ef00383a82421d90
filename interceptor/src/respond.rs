//! Everything the interceptor answers a client by itself: a guardrail block
//! (the seed's contract) and the interceptor's own errors (a body over a
//! limit, a provider it cannot reach, a request it cannot take).
//!
//! * A block is `{"error": "<reason>"}` with `X-Akto-Guardrails-Decision:
//!   blocked` ([`blocked`]), `403` unless the decision says otherwise.
//! * An error is `{"error": {"type": "interceptor_error", "code", "message"}}`,
//!   the shape provider SDKs read, with `X-Interceptor-Error: <code>`
//!   naming the interceptor as its source ([`error`]). What went wrong is a
//!   [`Problem`]; it knows its status, its code and whose [`Fault`] it is.
//!
//! * A refusal by a budget is `429` in the provider's own error shape
//!   ([`rate_limited`], built by [`provider_error`]), with `retry-after`, so
//!   each provider's SDK reads it as its rate-limit error.
//!
//! A low module: it knows HTTP and JSON, never the proxy or the guardrails,
//! which both answer through it.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;

/// Header naming the interceptor as the source of a response it generated.
pub const ERROR_HEADER: &str = "x-interceptor-error";
/// Header of the seed's block contract.
pub const DECISION_HEADER: &str = "x-akto-guardrails-decision";

/// Whose fault an answer is: the side that would have to change for the
/// exchange to succeed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fault {
    /// The client sent something we cannot take (too large, too slow,
    /// malformed, on the wrong connection).
    Client,
    /// The provider could not be reached, or its answer not used.
    Provider,
    /// A guardrail decided against the exchange, or could not decide.
    Guardrail,
    /// The interceptor itself ran out of something.
    Internal,
}

impl Fault {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Provider => "provider",
            Self::Guardrail => "guardrail",
            Self::Internal => "internal",
        }
    }
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error the interceptor answers itself: each picks the status, the
/// `code` of the body and header, and the fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Problem {
    /// An AI request on a connection made for another name (`421`).
    MisdirectedRequest,
    /// A request target that is not a valid URI (`400`).
    BadRequest,
    /// A request body over the inspection limit, refused (`413`).
    RequestTooLarge,
    /// The client stopped sending its body (`408`).
    RequestBodyTimeout,
    /// The client's body could not be read (`400`).
    RequestBodyError,
    /// Buffered bodies use the whole inspection budget (`503`).
    InspectionBudgetExhausted,
    /// No connection to the provider, or no response head, in time (`504`).
    UpstreamTimeout,
    /// The provider cannot be reached (`502`).
    UpstreamUnreachable,
    /// The provider's certificate or TLS failed (`502`).
    UpstreamTlsError,
    /// Any other failure of the request to the provider (`502`).
    UpstreamError,
    /// A response body over the inspection limit, refused (`502`).
    ResponseTooLarge,
    /// The provider's body could not be read (`502`).
    UpstreamBodyError,
}

impl Problem {
    pub fn status(self) -> StatusCode {
        match self {
            Self::MisdirectedRequest => StatusCode::MISDIRECTED_REQUEST,
            Self::BadRequest | Self::RequestBodyError => StatusCode::BAD_REQUEST,
            Self::RequestTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RequestBodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::InspectionBudgetExhausted => StatusCode::SERVICE_UNAVAILABLE,
            Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::UpstreamUnreachable
            | Self::UpstreamTlsError
            | Self::UpstreamError
            | Self::ResponseTooLarge
            | Self::UpstreamBodyError => StatusCode::BAD_GATEWAY,
        }
    }

    /// The `code` of the error body and of [`ERROR_HEADER`].
    pub fn code(self) -> &'static str {
        match self {
            Self::MisdirectedRequest => "misdirected_request",
            Self::BadRequest => "bad_request",
            Self::RequestTooLarge => "request_too_large",
            Self::RequestBodyTimeout => "request_body_timeout",
            Self::RequestBodyError => "request_body_error",
            Self::InspectionBudgetExhausted => "inspection_budget_exhausted",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::UpstreamUnreachable => "upstream_unreachable",
            Self::UpstreamTlsError => "upstream_tls_error",
            Self::UpstreamError => "upstream_error",
            Self::ResponseTooLarge => "response_too_large",
            Self::UpstreamBodyError => "upstream_body_error",
        }
    }

    pub fn fault(self) -> Fault {
        match self {
            Self::MisdirectedRequest
            | Self::BadRequest
            | Self::RequestTooLarge
            | Self::RequestBodyTimeout
            | Self::RequestBodyError => Fault::Client,
            Self::InspectionBudgetExhausted => Fault::Internal,
            Self::UpstreamTimeout
            | Self::UpstreamUnreachable
            | Self::UpstreamTlsError
            | Self::UpstreamError
            | Self::ResponseTooLarge
            | Self::UpstreamBodyError => Fault::Provider,
        }
    }
}

/// The seed's block response: `{"error": reason}` with the decision header,
/// under `status` (`403` for a policy block, `503` when failing closed, ...).
pub fn blocked(status: StatusCode, reason: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({ "error": reason }).to_string();
    json(status, body, DECISION_HEADER, HeaderValue::from_static("blocked"))
}

/// A refusal inside a JSON-RPC session (MCP): `200` with the JSON-RPC
/// error(s) as the body, and the decision header, so the client sees a
/// failed call and its session goes on.
pub fn blocked_json_rpc(body: String) -> Response<Full<Bytes>> {
    json(StatusCode::OK, body, DECISION_HEADER, HeaderValue::from_static("blocked"))
}

/// An error of the interceptor's own, in the shape provider SDKs understand.
pub fn error(problem: Problem, message: &str) -> Response<Full<Bytes>> {
    let code = problem.code();
    let body = serde_json::json!({
        "error": { "type": "interceptor_error", "code": code, "message": message }
    });
    json(problem.status(), body.to_string(), ERROR_HEADER, HeaderValue::from_static(code))
}

/// A provider API whose error shape an answer takes, so that its own SDKs
/// read it as the provider's error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorShape {
    /// `{"error": {"message", "type", "param", "code"}}` (OpenAI, and the
    /// many APIs that copy it).
    OpenAi,
    /// `{"type": "error", "error": {"type", "message"}}`.
    Anthropic,
    /// `{"message"}` with the error's name in `x-amzn-ErrorType` (AWS
    /// REST-JSON, which botocore reads as the error code).
    Bedrock,
    /// `{"error": {"code", "message", "status"}}` (Google APIs).
    Gemini,
}

/// The AWS error-type header of [`ErrorShape::Bedrock`].
pub const AMZN_ERROR_TYPE: &str = "x-amzn-errortype";

/// An error answer in `shape`, under `status`: the error's type is the one
/// the provider uses for that status (rate limit, authentication,
/// permission, server error).
pub fn provider_error(shape: ErrorShape, status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let code = status.as_u16();
    let (body, aws_type) = match shape {
        ErrorShape::OpenAi => {
            let kind = match code {
                429 => "rate_limit_exceeded",
                401 => "invalid_api_key",
                403 => "permission_denied",
                500.. => "server_error",
                _ => "invalid_request_error",
            };
            (serde_json::json!({"error": {"message": message, "type": kind, "param": null, "code": kind}}), None)
        }
        ErrorShape::Anthropic => {
            let kind = match code {
                429 => "rate_limit_error",
                401 => "authentication_error",
                403 => "permission_error",
                500.. => "api_error",
                _ => "invalid_request_error",
            };
            (serde_json::json!({"type": "error", "error": {"type": kind, "message": message}}), None)
        }
        ErrorShape::Bedrock => {
            let kind = match code {
                429 => "ThrottlingException",
                401 | 403 => "AccessDeniedException",
                500.. => "InternalServerException",
                _ => "ValidationException",
            };
            (serde_json::json!({ "message": message }), Some(kind))
        }
        ErrorShape::Gemini => {
            let kind = match code {
                429 => "RESOURCE_EXHAUSTED",
                401 => "UNAUTHENTICATED",
                403 => "PERMISSION_DENIED",
                500.. => "INTERNAL",
                _ => "INVALID_ARGUMENT",
            };
            (serde_json::json!({"error": {"code": code, "message": message, "status": kind}}), None)
        }
    };
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(kind) = aws_type {
        resp.headers_mut().insert(AMZN_ERROR_TYPE, HeaderValue::from_static(kind));
    }
    resp
}

/// A request refused by a budget: `429` in the provider's shape, with
/// `retry-after` (seconds) and `X-Interceptor-Error: budget_exceeded`.
pub fn rate_limited(shape: ErrorShape, message: &str, retry_after_secs: u64) -> Response<Full<Bytes>> {
    let mut resp = provider_error(shape, StatusCode::TOO_MANY_REQUESTS, message);
    resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs.max(1)));
    resp.headers_mut().insert(ERROR_HEADER, HeaderValue::from_static("budget_exceeded"));
    resp
}

fn json(status: StatusCode, body: String, name: &'static str, value: HeaderValue) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp.headers_mut().insert(name, value);
    resp
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt as _;

    use super::*;

    async fn body(r: Response<Full<Bytes>>) -> String {
        let bytes = r.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    #[test]
    fn blocked_response_follows_the_contract() {
        let r = blocked(StatusCode::FORBIDDEN, "no secrets");
        assert_eq!(r.status(), 403);
        assert_eq!(r.headers()[DECISION_HEADER], "blocked");
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
    }

    #[test]
    fn error_responses_name_the_interceptor() {
        let r = error(Problem::UpstreamUnreachable, "no route");
        assert_eq!(r.status(), 502);
        assert_eq!(r.headers()[ERROR_HEADER], "upstream_unreachable");
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
    }

    #[tokio::test]
    async fn rate_limits_take_each_providers_shape() {
        let r = rate_limited(ErrorShape::OpenAi, "over", 7);
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()[header::RETRY_AFTER], "7");
        assert_eq!(r.headers()[ERROR_HEADER], "budget_exceeded");
        let v: serde_json::Value = serde_json::from_str(&body(r).await).unwrap();
        assert_eq!(v["error"]["type"], "rate_limit_exceeded");
        assert_eq!(v["error"]["message"], "over");
        let v: serde_json::Value =
            serde_json::from_str(&body(rate_limited(ErrorShape::Anthropic, "over", 0)).await).unwrap();
        assert_eq!((v["type"].as_str(), v["error"]["type"].as_str()), (Some("error"), Some("rate_limit_error")));
        let r = rate_limited(ErrorShape::Bedrock, "over", 1);
        assert_eq!(r.headers()[AMZN_ERROR_TYPE], "ThrottlingException");
        assert_eq!(body(r).await, r#"{"message":"over"}"#);
        let v: serde_json::Value =
            serde_json::from_str(&body(rate_limited(ErrorShape::Gemini, "over", 1)).await).unwrap();
        assert_eq!(
            (v["error"]["code"].as_u64(), v["error"]["status"].as_str()),
            (Some(429), Some("RESOURCE_EXHAUSTED"))
        );
    }

    #[tokio::test]
    async fn bodies_are_byte_for_byte() {
        let r = blocked(StatusCode::FORBIDDEN, "no \"secrets\"");
        assert_eq!(body(r).await, r#"{"error":"no \"secrets\""}"#);
        let r = error(Problem::RequestTooLarge, "too big");
        assert_eq!(r.status(), 413);
        assert_eq!(
            body(r).await,
            r#"{"error":{"type":"interceptor_error","code":"request_too_large","message":"too big"}}"#
        );
    }

    #[test]
    fn faults_pick_the_side() {
        assert_eq!(Problem::RequestBodyTimeout.fault(), Fault::Client);
        assert_eq!(Problem::UpstreamTimeout.fault(), Fault::Provider);
        assert_eq!(Problem::UpstreamTimeout.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(Problem::InspectionBudgetExhausted.fault(), Fault::Internal);
    }
}
