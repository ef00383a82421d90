//! Akto's own mitmproxy addon and the interceptor, side by side.
//!
//! For each scenario, the real addon (`akto_guardrails.py` from Akto's
//! `akto-ai-egress`, run unmodified from `../shared/reference/akto-addon/`
//! next to this repository, or from `$INTERCEPTOR_AKTO_ADDON`) and the
//! interceptor each sit in front of the same fake provider and the same
//! recording fake Akto, and the same client request goes through each. The
//! addon runs as the seed's compose file runs it: mitmdump in regular-proxy
//! mode with `AKTO_URL` and `APP_NAME` in its environment, the client using
//! it as its `HTTPS_PROXY` and trusting its CA; a harness addon sends its
//! upstream connections to the fake provider (see `interceptor::testing::mitm`).
//! The interceptor runs in process on loopback, with Akto as its only backend
//! and every other setting at its default.
//!
//! Then three things are compared, field by field (presence, JSON type,
//! value): what the client got, what the provider received, and every call
//! the fake Akto received, with the JSON that Akto's string fields carry
//! (`requestPayload`, `requestHeaders`, `responsePayload`, ...) compared as
//! parsed JSON (shown as `$json` in a path). Only what must differ between
//! two runs is normalized: the `time` field (checked to be the time of the
//! run) and `date` headers. Transport details neither side controls are left
//! out (listed in `*_NOT_COMPARED`). Every other difference must be an
//! intended one, listed with its reason in [`ALLOWED`] or in the scenario's
//! own list; anything else fails the test with the differences printed.
//!
//! Where the addon's behaviour is a bug (it breaks the provider call, lets
//! through what Akto redacted, or ignores what Akto said), the interceptor
//! keeps its own and the difference is listed with why; README's Akto
//! section lists the same differences for users.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, OnceLock},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};
use interceptor::{
    audit::AuditLog,
    config::{Backend, GuardrailsConfig},
    guardrails::{
        akto::{AktoClient, AktoConfig},
        pipeline::{Guardrails, Pipeline},
    },
    metrics::Metrics,
    policy::DomainsConfig,
    testing::{
        akto::{FakeAkto, RecordedCall, Reply},
        mitm::{MitmProxy, MitmSettings},
        provider::{FakeProvider, RecordedRequest, TestPki},
        skip,
    },
};
use interceptor_tests::inprocess::{InProcessProxy, client_for};
use serde_json::{Map, Value, json};
use tokio::sync::watch;

/// Where the addon is read from, unless `$INTERCEPTOR_AKTO_ADDON` says otherwise
/// (relative to this repository's root).
const ADDON_DEFAULT: &str = "../shared/reference/akto-addon/akto_guardrails.py";
const ADDON_ENV: &str = "INTERCEPTOR_AKTO_ADDON";
/// The addon's sha256, from the reference's README (Akto's commit
/// `851d9e53e11f22c0c40d96deede98afd44dbd793`): the oracle must be the
/// unmodified file.
const ADDON_SHA256: &str = "04b62c3551ffdba732258aae2e3c0bcb55d65f0f94c387b824b060c694831e5d";
/// The mitmproxy release the addon runs under (`cargo xtask setup` installs it).
const MITMPROXY_VERSION: &str = "11.0.2";

/// `APP_NAME` for the addon and `akto.app_name` for the interceptor. Already
/// in the form Akto stores (the interceptor normalizes it, the addon does not).
const APP_NAME: &str = "billing-agent";

/// How long each side is given, after the client has its answer, to make
/// the Akto calls the scenario expects (a stream's batch check is sent
/// after the stream ends, by both). Reached only when a side makes fewer.
const LATE_CALLS: Duration = Duration::from_secs(5);

/// Who made a call to the fake Akto, by its `user-agent`.
const ADDON_AGENT: &str = "python-requests/";
const INTERCEPTOR_AGENT: &str = "interceptor/";

/// Response headers the client got that are not compared: framing and the
/// clock (`content-length` follows the body, which is compared).
const CLIENT_NOT_COMPARED: &[&str] = &["date", "content-length", "transfer-encoding", "connection", "keep-alive"];
/// Request headers the provider got that are not compared: framing and the
/// connection (`host` is compared as the request's authority).
const PROVIDER_NOT_COMPARED: &[&str] = &["host", "content-length", "transfer-encoding", "connection", "keep-alive"];
/// Headers of the calls to Akto that are not compared: each side's HTTP
/// client and its framing. (`content-type`, auth and ids are compared.)
const CALL_NOT_COMPARED: &[&str] =
    &["host", "user-agent", "accept", "accept-encoding", "connection", "content-length", "transfer-encoding"];
/// Fields of the Akto body whose value is a JSON document in a string,
/// compared as parsed JSON (Python's `json.dumps` spaces its output, serde
/// does not). `tag`, a constant, is compared as it is, byte for byte.
const JSON_IN_STRING: &[&str] = &["requestHeaders", "responseHeaders", "requestPayload", "responsePayload", "metadata"];

/// Which shape of difference an allow-list entry permits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    /// Only the interceptor has it (the addon does not send or do it).
    OnlyInterceptor,
    /// Only the addon has it.
    OnlyAddon,
    /// Both have it, with different values (or types).
    Differs,
    /// Any of the above.
    Any,
}

/// An intended difference: where, what shape, and why (the comment).
#[derive(Clone, Copy, Debug)]
struct Allowed {
    /// Dotted path (`akto.request#1.body.method`): `*` matches one segment,
    /// a final `**` everything below.
    path: &'static str,
    shape: Shape,
}

const fn allow(path: &'static str, shape: Shape) -> Allowed {
    Allowed { path, shape }
}

/// Differences intended in every scenario.
const ALLOWED: &[Allowed] = &[
    // The addon calls Akto with GET and a JSON body; the interceptor POSTs, as
    // Akto's other connectors do (the server accepts both; a body on GET is
    // dropped by some proxies and load balancers).
    allow("akto.*.method", Shape::Differs),
    // The interceptor sends the intercepted request's id (or a fresh one),
    // the same on the request and the response checks, so that Akto can pair
    // them; the addon sends none.
    allow("akto.*.headers.x-request-id", Shape::OnlyInterceptor),
    // `requestHeaders`: the addon sends only `content-type` and `host` (=
    // APP_NAME), which must match; the interceptor adds the client's other
    // request headers, credentials removed, and `x-request-id`.
    allow("akto.*.body.requestHeaders.$json.*", Shape::OnlyInterceptor),
    // `metadata`: the addon's tag plus what the interceptor knows about the
    // call (`upstream_host`; the process, pid, uid and cgroup when the
    // connection is attributed). `tag` itself stays byte for byte the same.
    allow("akto.*.body.metadata.$json.*", Shape::OnlyInterceptor),
    // The interceptor asks the provider for an uncompressed answer, so that
    // it can inspect a stream as it arrives; the addon passes the client's
    // `accept-encoding` through (or none, as here).
    allow("provider.*.headers.accept-encoding", Shape::Any),
    // A stream's `responseHeaders`: mitmproxy reaches the provider over
    // HTTP/1.1 (the client's protocol) and passes on the hop-by-hop
    // `transfer-encoding: chunked` of that connection; the interceptor
    // reaches it over HTTP/2, which has no such header. It describes the
    // connection, not the answer.
    allow("akto.*.body.responseHeaders.$json.transfer-encoding", Shape::OnlyAddon),
];

/// One exchange, run once through each proxy.
struct Scenario {
    host: &'static str,
    path: &'static str,
    /// Request headers besides `content-type: application/json`.
    headers: &'static [(&'static str, &'static str)],
    body: Value,
    /// What the fake Akto answers to request checks and to response (and
    /// stream-batch) checks.
    request_reply: Reply,
    response_reply: Reply,
    /// The calls to Akto (addon, interceptor) to wait for after the client
    /// has its answer. The addon's count is also asserted, with
    /// `addon_status`, so that a broken harness cannot pass as "no difference".
    calls: (usize, usize),
    /// The status the addon's client gets.
    addon_status: u16,
    /// Differences intended in this scenario only, on top of [`ALLOWED`].
    allowed: &'static [Allowed],
}

impl Scenario {
    fn new(host: &'static str, path: &'static str, body: Value) -> Scenario {
        Scenario {
            host,
            path,
            headers: &[],
            body,
            request_reply: Reply::allowed(),
            response_reply: Reply::allowed(),
            calls: (2, 2),
            addon_status: 200,
            allowed: &[],
        }
    }

    // A streamed answer comes 5 ms an event (the fake provider's
    // `interval_ms`) to keep the run short. Its text (under 600 characters)
    // is one batch for both sides however its events are grouped in reads.

    fn openai(body: Value) -> Scenario {
        let path = if streamed(&body) { "/v1/chat/completions?interval_ms=5" } else { "/v1/chat/completions" };
        Scenario { headers: OPENAI_HEADERS, ..Scenario::new("api.openai.com", path, body) }
    }

    fn anthropic(body: Value) -> Scenario {
        let path = if streamed(&body) { "/v1/messages?interval_ms=5" } else { "/v1/messages" };
        Scenario { headers: ANTHROPIC_HEADERS, ..Scenario::new("api.anthropic.com", path, body) }
    }

    fn responses(body: Value) -> Scenario {
        let path = if streamed(&body) { "/v1/responses?interval_ms=5" } else { "/v1/responses" };
        Scenario { headers: OPENAI_HEADERS, ..Scenario::new("api.openai.com", path, body) }
    }
}

fn streamed(body: &Value) -> bool {
    body["stream"] == json!(true)
}

const OPENAI_HEADERS: &[(&str, &str)] = &[("authorization", "Bearer sk-test-openai-key")];
const ANTHROPIC_HEADERS: &[(&str, &str)] = &[("x-api-key", "sk-ant-test-key"), ("anthropic-version", "2023-06-01")];

fn chat(stream: bool) -> Value {
    let mut body = json!({
        "model": "gpt-4o",
        "max_tokens": 64,
        "messages": [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "My card is 4111 1111 1111 1111. What is the capital of France?"}
        ]
    });
    if stream {
        body["stream"] = json!(true);
    }
    body
}

fn anthropic(stream: bool) -> Value {
    let mut body = json!({
        "model": "claude-sonnet-4-5",
        "max_tokens": 256,
        "system": "You are a terse assistant.",
        "messages": [{"role": "user", "content": "My card is 4111 1111 1111 1111. What is the capital of France?"}]
    });
    if stream {
        body["stream"] = json!(true);
    }
    body
}

fn responses(stream: bool) -> Value {
    let mut body = json!({
        "model": "gpt-4.1",
        "instructions": "You are a terse assistant.",
        "input": "My card is 4111 1111 1111 1111. What is the capital of France?"
    });
    if stream {
        body["stream"] = json!(true);
    }
    body
}

/// The chat request's messages as Akto would redact them.
fn masked_messages() -> Value {
    json!([
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "My card is [CARD]. What is the capital of France?"}
    ])
}

// ---------------------------------------------------------------------------
// Scenarios. One test each.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_json_allowed() -> Result<()> {
    compare("openai_json_allowed", Scenario::openai(chat(false))).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_stream_allowed() -> Result<()> {
    compare("openai_stream_allowed", Scenario::openai(chat(true))).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_json_allowed() -> Result<()> {
    compare("anthropic_json_allowed", Scenario::anthropic(anthropic(false))).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_stream_allowed() -> Result<()> {
    compare("anthropic_stream_allowed", Scenario::anthropic(anthropic(true))).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_json_allowed() -> Result<()> {
    compare("responses_json_allowed", Scenario::responses(responses(false))).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_stream_allowed() -> Result<()> {
    let scenario = Scenario {
        // The addon reads no text from a Responses-API stream (its deltas
        // are strings), so it makes no batch check: only the request check.
        calls: (1, 2),
        allowed: RESPONSES_STREAM_CHECKED,
        ..Scenario::responses(responses(true))
    };
    compare("responses_stream_allowed", scenario).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_request_modified() -> Result<()> {
    const NAME: &str = "responses_request_modified";
    let Some(bench) = Bench::start(NAME).await? else { return Ok(()) };
    // Akto redacts what its request check was sent for a body without
    // `messages`, `{"raw": <body>}`, and answers it in the same shape.
    let mut redacted = responses(false);
    redacted["input"] = json!("My card is [CARD]. What is the capital of France?");
    let scenario = Scenario {
        request_reply: Reply::modified(&json!({ "raw": redacted }).to_string()),
        allowed: RAW_MODIFY_IS_MERGED,
        ..Scenario::responses(responses(false))
    };
    let seen = bench.compare(NAME, &scenario).await?;
    // The allow-list says where the two differ; this says the interceptor's
    // provider got exactly the redacted body, and Akto's response check the
    // same, once wrapped.
    assert_eq!(seen.interceptor["provider"][0]["body"], redacted);
    assert_eq!(seen.interceptor["akto"]["response#1"]["body"]["requestPayload"]["$json"], json!({ "raw": redacted }));
    Ok(())
}

/// A `ModifiedPayload` of `{"raw": <redacted body>}`: the addon writes it
/// over the body as it is, so the provider gets `{"raw": {...}}` with no
/// top-level `model` or `input` (a call a real provider rejects) and its
/// response check wraps that again; the interceptor takes the redacted body
/// out of `raw` and merges it into the original, so the provider gets the
/// original call with the card masked. The fake provider's answer differs
/// where it echoes the request: the model (its default when none is sent)
/// and the request's size.
const RAW_MODIFY_IS_MERGED: &[Allowed] = &[
    allow("provider.0.body.raw", Shape::OnlyAddon),
    allow("provider.0.body.model", Shape::OnlyInterceptor),
    allow("provider.0.body.instructions", Shape::OnlyInterceptor),
    allow("provider.0.body.input", Shape::OnlyInterceptor),
    allow("client.body.model", Shape::Differs),
    allow("client.body.usage.input_tokens", Shape::Differs),
    allow("client.body.usage.total_tokens", Shape::Differs),
    allow("akto.response#1.body.responsePayload.$json.usage.input_tokens", Shape::Differs),
    allow("akto.response#1.body.responsePayload.$json.usage.total_tokens", Shape::Differs),
    allow("akto.response#1.body.responseHeaders.$json.content-length", Shape::Differs),
    allow("akto.response#1.body.requestPayload.$json.raw.raw", Shape::OnlyAddon),
    allow("akto.response#1.body.requestPayload.$json.raw.model", Shape::OnlyInterceptor),
    allow("akto.response#1.body.requestPayload.$json.raw.instructions", Shape::OnlyInterceptor),
    allow("akto.response#1.body.requestPayload.$json.raw.input", Shape::OnlyInterceptor),
    allow("akto.response#1.body.responsePayload.$json.model", Shape::Differs),
];

/// The interceptor checks the text of a Responses-API stream; the addon's
/// SSE reader knows only chat-completion and Anthropic deltas and sends no
/// batch for it (a gap of the addon).
const RESPONSES_STREAM_CHECKED: &[Allowed] = &[allow("akto.response#1", Shape::OnlyInterceptor)];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_blocked_with_reason() -> Result<()> {
    let scenario = Scenario {
        request_reply: Reply::blocked("card numbers are not allowed"),
        calls: (1, 1),
        addon_status: 403,
        ..Scenario::openai(chat(false))
    };
    compare("request_blocked_with_reason", scenario).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_blocked_without_reason() -> Result<()> {
    let scenario = Scenario {
        request_reply: Reply::blocked(""),
        calls: (1, 1),
        addon_status: 403,
        ..Scenario::openai(chat(false))
    };
    compare("request_blocked_without_reason", scenario).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_request_blocked() -> Result<()> {
    let scenario = Scenario {
        request_reply: Reply::blocked("card numbers are not allowed"),
        calls: (1, 1),
        addon_status: 403,
        ..Scenario::anthropic(anthropic(false))
    };
    compare("anthropic_request_blocked", scenario).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_modified_whole_body() -> Result<()> {
    let mut modified = chat(false);
    modified["messages"] = masked_messages();
    let scenario = Scenario { request_reply: Reply::modified(&modified.to_string()), ..Scenario::openai(chat(false)) };
    compare("request_modified_whole_body", scenario).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_modified_messages_only() -> Result<()> {
    let modified = json!({ "messages": masked_messages() }).to_string();
    let scenario = Scenario {
        request_reply: Reply::modified(&modified),
        allowed: MESSAGES_ONLY_MODIFY_KEEPS_THE_BODY,
        ..Scenario::openai(chat(false))
    };
    compare("request_modified_messages_only", scenario).await
}

/// A `ModifiedPayload` of `{"messages": [...]}` only: the addon writes it
/// over the whole body, dropping `model`, `max_tokens`, `stream`, `tools`
/// (a call a real provider rejects); the interceptor merges the messages
/// back into the body (the better behaviour is kept). The fake
/// provider's answer then differs where it echoes the request: the model
/// (its default when none is sent) and the request's size.
const MESSAGES_ONLY_MODIFY_KEEPS_THE_BODY: &[Allowed] = &[
    allow("provider.0.body.model", Shape::OnlyInterceptor),
    allow("provider.0.body.max_tokens", Shape::OnlyInterceptor),
    allow("client.body.model", Shape::Differs),
    allow("client.body.echo_len", Shape::Differs),
    allow("client.body.usage.prompt_tokens", Shape::Differs),
    allow("client.body.usage.total_tokens", Shape::Differs),
    allow("akto.response#1.body.responsePayload.$json.model", Shape::Differs),
    allow("akto.response#1.body.responsePayload.$json.echo_len", Shape::Differs),
    allow("akto.response#1.body.responsePayload.$json.usage.prompt_tokens", Shape::Differs),
    allow("akto.response#1.body.responsePayload.$json.usage.total_tokens", Shape::Differs),
    allow("akto.response#1.body.responseHeaders.$json.content-length", Shape::Differs),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_modified_not_json() -> Result<()> {
    let scenario = Scenario {
        request_reply: Reply::modified("My card is [CARD]. What is the capital of France?"),
        allowed: NOT_JSON_REQUEST_PAYLOAD_IS_NEVER_EMPTY,
        ..Scenario::openai(chat(false))
    };
    compare("request_modified_not_json", scenario).await
}

/// After the addon wrote a `ModifiedPayload` that is not JSON over the body,
/// its response check sends `requestPayload: ""` (it cannot parse the body;
/// Akto answers an empty one with 422). The interceptor never sends it
/// empty: a body that is not JSON goes as `{"raw": "<text>"}`.
const NOT_JSON_REQUEST_PAYLOAD_IS_NEVER_EMPTY: &[Allowed] =
    &[allow("akto.response#1.body.requestPayload", Shape::Differs)];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_blocked_lowercase_keys() -> Result<()> {
    let scenario = Scenario {
        request_reply: Reply::blocked("card numbers are not allowed").lowercase_keys(),
        calls: (1, 1),
        addon_status: 403,
        allowed: VERDICT_KEYS_IN_ANY_CASE,
        ..Scenario::openai(chat(false))
    };
    compare("request_blocked_lowercase_keys", scenario).await
}

/// A verdict with lower-cased keys (as some Akto versions send it): the
/// interceptor reads the keys in any case (protocol reference: "casing
/// varies by version"), so the 403 carries Akto's `reason`; the addon reads
/// only `Reason` and falls back to its default text. (Both block: the
/// addon's `behaviour` key is lower case already.)
const VERDICT_KEYS_IN_ANY_CASE: &[Allowed] = &[allow("client.body.error", Shape::Differs)];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_blocked_in_the_merged_verdict() -> Result<()> {
    // The server runs both checks for its default account and answers with
    // the request verdict on top and both results nested.
    let merged = Reply::merged(&Reply::allowed(), &Reply::blocked("the answer leaks data"));
    let scenario = Scenario {
        response_reply: merged,
        allowed: RESPONSE_CHECK_READS_RESPONSE_RESULT,
        ..Scenario::openai(chat(false))
    };
    compare("response_blocked_in_the_merged_verdict", scenario).await
}

/// The merged verdict on a response check: the interceptor reads the nested
/// `responseResult` (protocol reference: "read `responseResult` for a
/// response check"), which says block; the addon reads the top level, the
/// request's verdict with `Allowed` = false but no `behaviour: block`, so it
/// only logs an alert and forwards the answer. The client gets the 403
/// contract from the interceptor.
const RESPONSE_CHECK_READS_RESPONSE_RESULT: &[Allowed] = &[
    allow("client.status", Shape::Differs),
    allow("client.headers.**", Shape::Any),
    allow("client.body.**", Shape::Any),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn akto_fails_open_itself() -> Result<()> {
    // Akto's guardrail service timed out and answered "allowed" on its own.
    // Both forward (fail open is the default); the interceptor also audits
    // and counts it as a failure, not an allow, and refuses it under
    // `fail_mode_request = "closed"` (tests/guardrails_akto.rs).
    let scenario = Scenario {
        request_reply: Reply::fail_open(),
        response_reply: Reply::fail_open(),
        ..Scenario::openai(chat(false))
    };
    compare("akto_fails_open_itself", scenario).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_alert() -> Result<()> {
    let scenario = Scenario {
        request_reply: Reply::alert("card number seen"),
        allowed: ALERT_IS_ENFORCED,
        ..Scenario::openai(chat(false))
    };
    compare("request_alert", scenario).await
}

/// `Allowed: false` with `behaviour: alert`: the addon forwards the call
/// and only logs it; the interceptor, by default, blocks every verdict that
/// is not allowed, as the product's documented contract says
/// (`akto.block_on_disallowed`; the documented contract is kept). So the
/// client gets the 403 contract, the provider is not called, and there is
/// no response check.
const ALERT_IS_ENFORCED: &[Allowed] = &[
    allow("client.status", Shape::Differs),
    allow("client.headers.**", Shape::Any),
    allow("client.body.**", Shape::Any),
    allow("provider.0", Shape::OnlyAddon),
    allow("akto.response#1", Shape::OnlyAddon),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_blocked_with_reason() -> Result<()> {
    let scenario = Scenario {
        response_reply: Reply::blocked("the answer leaks data"),
        addon_status: 403,
        ..Scenario::openai(chat(false))
    };
    compare("response_blocked_with_reason", scenario).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_blocked_without_reason() -> Result<()> {
    let scenario = Scenario { response_reply: Reply::blocked(""), addon_status: 403, ..Scenario::openai(chat(false)) };
    compare("response_blocked_without_reason", scenario).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_response_blocked() -> Result<()> {
    let scenario = Scenario {
        response_reply: Reply::blocked("the answer leaks data"),
        addon_status: 403,
        ..Scenario::anthropic(anthropic(false))
    };
    compare("anthropic_response_blocked", scenario).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_response_blocked_is_not_cut() -> Result<()> {
    // Both stream by default without waiting for verdicts (the addon's async
    // mode, the interceptor's `stream_mode = "monitor"`): the batch is
    // checked, the stream is not cut.
    let scenario = Scenario { response_reply: Reply::blocked("the answer leaks data"), ..Scenario::openai(chat(true)) };
    compare("stream_response_blocked_is_not_cut", scenario).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_modified() -> Result<()> {
    const NAME: &str = "response_modified";
    let Some(bench) = Bench::start(NAME).await? else { return Ok(()) };
    // Akto redacts the response it was sent: the provider's whole answer,
    // with the assistant's text replaced.
    let mut scenario = Scenario::openai(chat(false));
    let mut answer = bench.direct(&scenario).await?;
    answer["choices"][0]["message"]["content"] = json!("[REDACTED]");
    scenario.response_reply = Reply::modified(&answer.to_string());
    bench.compare(NAME, &scenario).await.map(drop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn akto_answers_500() -> Result<()> {
    let error = Reply::Status(500, r#"{"error":"internal server error"}"#.into());
    let scenario = Scenario { request_reply: error.clone(), response_reply: error, ..Scenario::openai(chat(false)) };
    compare("akto_answers_500", scenario).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_answers_429() -> Result<()> {
    let scenario = Scenario {
        headers: &[("authorization", "Bearer sk-test-openai-key"), ("x-fake-status", "429")],
        addon_status: 429,
        ..Scenario::openai(chat(false))
    };
    compare("provider_answers_429", scenario).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_ai_host_is_not_checked() -> Result<()> {
    let scenario = Scenario {
        calls: (0, 0),
        allowed: NON_AI_HOST_IS_NOT_DECRYPTED,
        ..Scenario::new("passthrough.example", "/v1/chat/completions", chat(false))
    };
    compare("non_ai_host_is_not_checked", scenario).await
}

/// A host that is not an AI provider: mitmproxy (as the seed runs it, with
/// no `--ignore-hosts`) decrypts it and the addon lets it through; the
/// interceptor does not decrypt it at all, so the provider's request is the
/// client's, untouched (here, the client sends no `accept-encoding`, so
/// there is nothing to differ on) and no allowed difference is expected.
const NON_AI_HOST_IS_NOT_DECRYPTED: &[Allowed] = &[];

// ---------------------------------------------------------------------------
// The harness.

/// The fake provider and fake Akto both proxies are put in front of.
struct Bench {
    pki: TestPki,
    provider: FakeProvider,
    akto: FakeAkto,
    upstream_ca: PathBuf,
    addon: PathBuf,
    _dir: tempfile::TempDir,
}

/// What one side saw: the client's answer and the provider's requests, and
/// mitmproxy's log for the addon.
struct Seen {
    client: Value,
    provider: Vec<RecordedRequest>,
    log: Option<String>,
}

/// What the comparison compared: each side's view (`client`, `provider`,
/// `akto`), for a scenario that asserts more.
struct Compared {
    interceptor: Value,
}

async fn compare(name: &str, scenario: Scenario) -> Result<()> {
    let Some(bench) = Bench::start(name).await? else { return Ok(()) };
    bench.compare(name, &scenario).await.map(drop)
}

impl Bench {
    /// `None` when this machine cannot run the test (reported as skipped).
    async fn start(name: &str) -> Result<Option<Bench>> {
        let addon = addon_path();
        let Some(addon) = ready(name, &addon)? else { return Ok(None) };
        let pki = TestPki::with_defaults()?;
        let provider = FakeProvider::start(std::net::TcpListener::bind("127.0.0.1:0")?, &pki)?;
        let akto = FakeAkto::start()?;
        let dir = tempfile::tempdir()?;
        let upstream_ca = pki.write_ca(dir.path())?;
        Ok(Some(Bench { pki, provider, akto, upstream_ca, addon, _dir: dir }))
    }

    /// Runs `scenario` through both proxies and fails on any difference not
    /// allowed.
    async fn compare(&self, name: &str, scenario: &Scenario) -> Result<Compared> {
        let started = unix_ms();
        self.akto.set_request_reply(scenario.request_reply.clone());
        self.akto.set_response_reply(scenario.response_reply.clone());
        let addon = self.through_addon(scenario).await?;
        let interceptor = self.through_interceptor(scenario).await?;
        let window = started..=unix_ms() + 1;

        let calls = self.akto.calls();
        let stray: Vec<&RecordedCall> = calls.iter().filter(|c| agent_of(c).is_none()).collect();
        if !stray.is_empty() {
            bail!("calls to Akto from neither side: {stray:?}");
        }
        let addon_calls: Vec<RecordedCall> =
            calls.iter().filter(|c| agent_of(c) == Some(ADDON_AGENT)).cloned().collect();
        let our_calls: Vec<RecordedCall> =
            calls.iter().filter(|c| agent_of(c) == Some(INTERCEPTOR_AGENT)).cloned().collect();

        // The oracle must have done what the scenario says it does.
        let log = addon.log.as_deref().unwrap_or_default();
        if addon.client["status"] != json!(scenario.addon_status) || addon_calls.len() != scenario.calls.0 {
            bail!(
                "{name}: the addon's side is not as the scenario expects (status {}, {} Akto calls; expected {}, {}): \
                 is the harness broken?\nclient: {}\nmitmproxy log:\n{log}",
                addon.client["status"],
                addon_calls.len(),
                scenario.addon_status,
                scenario.calls.0,
                addon.client,
            );
        }

        let view = |seen: &Seen, calls: &[RecordedCall]| {
            json!({
                "client": seen.client,
                "provider": seen.provider.iter().map(provider_view).collect::<Vec<_>>(),
                "akto": akto_view(calls, &window),
            })
        };
        let (a, b) = (view(&addon, &addon_calls), view(&interceptor, &our_calls));
        let mut differences = Vec::new();
        diff(&mut Vec::new(), Some(&a), Some(&b), &mut differences);
        let (allowed, unexpected): (Vec<_>, Vec<_>) =
            differences.into_iter().partition(|d| ALLOWED.iter().chain(scenario.allowed).any(|entry| entry.permits(d)));
        for d in &allowed {
            eprintln!("{name}: intended difference: {d}");
        }
        if !unexpected.is_empty() {
            let listed: Vec<String> = unexpected.iter().map(|d| format!("  {d}")).collect();
            bail!(
                "{name}: the interceptor differs from Akto's addon in {} place(s) outside the allow-list:\n{}\n\
                 ({} intended difference(s) not shown; run with --nocapture to see them)",
                unexpected.len(),
                listed.join("\n"),
                allowed.len(),
            );
        }
        Ok(Compared { interceptor: b })
    }

    /// The scenario's request straight to the fake provider: its answer.
    async fn direct(&self, scenario: &Scenario) -> Result<Value> {
        let client = client_for(scenario.host, self.provider.local_addr(), &[&self.pki.ca_pem()], false)?;
        let seen = send(&client, scenario).await?;
        self.provider.take_requests();
        Ok(seen["body"].clone())
    }

    async fn through_addon(&self, scenario: &Scenario) -> Result<Seen> {
        let settings = MitmSettings {
            addons: vec![self.addon.clone()],
            upstream: self.provider.local_addr(),
            upstream_ca: self.upstream_ca.clone(),
            env: vec![("AKTO_URL".into(), self.akto.url()), ("APP_NAME".into(), APP_NAME.into())],
        };
        let mitm = tokio::task::spawn_blocking(move || MitmProxy::start(&settings)).await??;
        // What `HTTPS_PROXY=http://127.0.0.1:<port>` does, without changing
        // this process's environment under the other tests.
        let client = reqwest::Client::builder()
            .no_proxy()
            .proxy(reqwest::Proxy::https(mitm.url())?)
            .tls_certs_only(reqwest::Certificate::from_pem_bundle(mitm.ca_pem().as_bytes())?)
            .http1_only()
            .timeout(Duration::from_secs(20))
            .build()?;
        let client_seen = send(&client, scenario).await.with_context(|| format!("mitmproxy log:\n{}", mitm.log()))?;
        self.wait_for_calls(ADDON_AGENT, scenario.calls.0).await;
        Ok(Seen { client: client_seen, provider: self.provider.take_requests(), log: Some(mitm.log()) })
    }

    async fn through_interceptor(&self, scenario: &Scenario) -> Result<Seen> {
        let akto = AktoConfig { url: self.akto.url(), app_name: APP_NAME.into(), ..AktoConfig::default() };
        let cfg = GuardrailsConfig { backends: vec![Backend::Akto], akto: akto.clone(), ..GuardrailsConfig::default() };
        let guardrails = Guardrails { engine: None, akto: Some(Arc::new(AktoClient::new(akto)?)), cfg, keys: None };
        // The receiver keeps the last value after the sender is gone.
        let (_, rx) = watch::channel(Arc::new(guardrails));
        let metrics = Arc::new(Metrics::new());
        let pipeline = Pipeline::new(rx, AuditLog::start(None, Arc::clone(&metrics)), metrics);
        let proxy = InProcessProxy::start(
            self.provider.local_addr(),
            &self.upstream_ca,
            DomainsConfig::default(),
            Some(Arc::new(pipeline)),
        )
        .await?;
        // Our CA for what the interceptor decrypts, the provider's (the
        // public CA, in production) for what it passes through.
        let client = client_for(scenario.host, proxy.addr, &[&proxy.ca_pem, &self.pki.ca_pem()], false)?;
        let client_seen = send(&client, scenario).await?;
        self.wait_for_calls(INTERCEPTOR_AGENT, scenario.calls.1).await;
        Ok(Seen { client: client_seen, provider: self.provider.take_requests(), log: None })
    }

    /// Waits until `agent` has made `n` calls to Akto, at most [`LATE_CALLS`].
    async fn wait_for_calls(&self, agent: &str, n: usize) {
        let deadline = Instant::now() + LATE_CALLS;
        while self.akto.calls().iter().filter(|c| agent_of(c) == Some(agent)).count() < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Which side made a call, by its `user-agent`.
fn agent_of(call: &RecordedCall) -> Option<&'static str> {
    let agent = call.header("user-agent")?;
    [ADDON_AGENT, INTERCEPTOR_AGENT].into_iter().find(|prefix| agent.starts_with(prefix))
}

/// The addon to run: `$INTERCEPTOR_AKTO_ADDON`, else [`ADDON_DEFAULT`]
/// next to this repository.
fn addon_path() -> PathBuf {
    match std::env::var_os(ADDON_ENV) {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(ADDON_DEFAULT),
    }
}

/// Whether the addon, mitmproxy and `requests` are here (else the test is
/// skipped), and the addon is the unmodified one (else it fails). Probed
/// once per test binary.
fn ready(name: &str, addon: &Path) -> Result<Option<PathBuf>> {
    static PROBE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let probe = PROBE.get_or_init(|| probe(addon));
    match probe {
        Ok(path) => Ok(Some(path.clone())),
        Err(reason) if reason.starts_with("skip: ") => {
            skip(name, &reason["skip: ".len()..]);
            Ok(None)
        }
        Err(reason) => bail!("{reason}"),
    }
}

fn probe(addon: &Path) -> Result<PathBuf, String> {
    let addon = addon
        .canonicalize()
        .map_err(|e| format!("skip: Akto's addon not found at {} ({e}); set {ADDON_ENV}", addon.display()))?;
    let script = "import hashlib, sys\nimport requests\nimport mitmproxy.version as v\n\
                  print(v.VERSION)\nprint(hashlib.sha256(open(sys.argv[1], 'rb').read()).hexdigest())";
    let out = std::process::Command::new(interceptor::testing::tool("python3"))
        .args(["-c", script])
        .arg(&addon)
        .output()
        .map_err(|e| format!("skip: python3 not usable: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "skip: python3 lacks mitmproxy {MITMPROXY_VERSION} or requests (cargo xtask setup): {}",
            String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or_default()
        ));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut lines = stdout.lines();
    let (version, sha) = (lines.next().unwrap_or_default(), lines.next().unwrap_or_default());
    if version != MITMPROXY_VERSION {
        return Err(format!("skip: mitmproxy {version} installed, the addon runs under {MITMPROXY_VERSION}"));
    }
    if sha != ADDON_SHA256 {
        return Err(format!(
            "{} is not Akto's unmodified addon (sha256 {sha}, expected {ADDON_SHA256})",
            addon.display()
        ));
    }
    Ok(addon)
}

fn unix_ms() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
}

/// Sends the scenario's request; what the client got.
async fn send(client: &reqwest::Client, scenario: &Scenario) -> Result<Value> {
    let mut request = client
        .post(format!("https://{}{}", scenario.host, scenario.path))
        .header("content-type", "application/json")
        .body(scenario.body.to_string());
    for (name, value) in scenario.headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    let headers: Vec<(String, String)> = response
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect();
    let body = response.bytes().await?;
    Ok(json!({
        "status": status,
        "headers": headers_view(&headers, CLIENT_NOT_COMPARED),
        "body": content(&body),
    }))
}

/// A body as JSON when it is JSON, else as text.
fn content(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

/// Headers as an object (names lower-cased, repeats joined with `, `),
/// without those in `skip`.
fn headers_view(headers: &[(String, String)], skip: &[&str]) -> Value {
    let mut out = Map::new();
    for (name, value) in headers {
        let name = name.to_ascii_lowercase();
        if skip.contains(&name.as_str()) {
            continue;
        }
        match out.get_mut(&name) {
            Some(Value::String(v)) => {
                v.push_str(", ");
                v.push_str(value);
            }
            _ => {
                out.insert(name, Value::String(value.clone()));
            }
        }
    }
    Value::Object(out)
}

fn provider_view(request: &RecordedRequest) -> Value {
    json!({
        "method": request.method,
        "path": request.path,
        "authority": request.authority,
        "headers": headers_view(&request.headers, PROVIDER_NOT_COMPARED),
        "body": content(&request.body),
    })
}

/// Akto's calls keyed by kind and rank (`request#1`, `response#1`,
/// `ingest#1`), so that a missing call shows as such.
fn akto_view(calls: &[RecordedCall], window: &std::ops::RangeInclusive<u128>) -> Value {
    let mut out = Map::new();
    let mut counts = [0usize; 3];
    for call in calls {
        let (slot, kind) = if call.query_param("guardrails") == Some("true") {
            (0, "request")
        } else if call.query_param("response_guardrails") == Some("true") {
            (1, "response")
        } else {
            (2, "ingest")
        };
        counts[slot] += 1;
        let query: Map<String, Value> = call
            .query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (k.to_owned(), Value::String(v.to_owned()))
            })
            .collect();
        out.insert(
            format!("{kind}#{}", counts[slot]),
            json!({
                "method": call.method,
                "path": call.path,
                "query": query,
                "headers": headers_view(&call.headers, CALL_NOT_COMPARED),
                "body": akto_body(&call.body, window),
            }),
        );
    }
    Value::Object(out)
}

/// The body of a call to Akto, normalized: JSON held in strings parsed
/// (`{"$json": …}`), `time` checked to fall within the run and replaced,
/// the provider's `date` header replaced.
fn akto_body(body: &Value, window: &std::ops::RangeInclusive<u128>) -> Value {
    let Some(obj) = body.as_object() else { return body.clone() };
    let mut out = obj.clone();
    for field in JSON_IN_STRING {
        if let Some(Value::String(text)) = obj.get(*field)
            && let Ok(parsed @ (Value::Object(_) | Value::Array(_))) = serde_json::from_str::<Value>(text)
        {
            out.insert((*field).to_owned(), json!({ "$json": parsed }));
        }
    }
    if let Some(Value::String(time)) = obj.get("time")
        && time.parse::<u128>().is_ok_and(|t| window.contains(&t))
    {
        out.insert("time".into(), json!("<the time of the call>"));
    }
    let mut out = Value::Object(out);
    if let Some(date @ Value::String(_)) = out.pointer_mut("/responseHeaders/$json/date") {
        *date = json!("<date>");
    }
    out
}

/// One difference between the addon's run and the interceptor's.
#[derive(Debug)]
struct Difference {
    path: Vec<String>,
    addon: Option<Value>,
    interceptor: Option<Value>,
}

impl Difference {
    fn shape(&self) -> Shape {
        match (&self.addon, &self.interceptor) {
            (None, Some(_)) => Shape::OnlyInterceptor,
            (Some(_), None) => Shape::OnlyAddon,
            _ => Shape::Differs,
        }
    }
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let path = self.path.join(".");
        match (&self.addon, &self.interceptor) {
            (None, Some(ours)) => write!(f, "{path}: only the interceptor has it: {}", brief(ours)),
            (Some(theirs), None) => write!(f, "{path}: only the addon has it: {}", brief(theirs)),
            (Some(theirs), Some(ours)) if type_name(theirs) != type_name(ours) => write!(
                f,
                "{path}: type differs: addon {} {}, interceptor {} {}",
                type_name(theirs),
                brief(theirs),
                type_name(ours),
                brief(ours)
            ),
            (Some(theirs), Some(ours)) => {
                write!(f, "{path}: value differs: addon {}, interceptor {}", brief(theirs), brief(ours))
            }
            (None, None) => write!(f, "{path}: (no difference)"),
        }
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// A value for a message: compact JSON, cut at 400 characters.
fn brief(value: &Value) -> String {
    let text = value.to_string();
    match text.char_indices().nth(400) {
        Some((cut, _)) => format!("{}… ({} chars)", &text[..cut], text.chars().count()),
        None => text,
    }
}

/// Every difference between `a` (the addon's) and `b` (the interceptor's),
/// at the shallowest path where it shows: a key or element present on one
/// side only, a type, or a scalar value.
fn diff(path: &mut Vec<String>, a: Option<&Value>, b: Option<&Value>, out: &mut Vec<Difference>) {
    match (a, b) {
        (Some(Value::Object(x)), Some(Value::Object(y))) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for key in keys {
                path.push(key.clone());
                diff(path, x.get(key), y.get(key), out);
                path.pop();
            }
        }
        (Some(Value::Array(x)), Some(Value::Array(y))) => {
            for i in 0..x.len().max(y.len()) {
                path.push(i.to_string());
                diff(path, x.get(i), y.get(i), out);
                path.pop();
            }
        }
        (a, b) if a != b => out.push(Difference { path: path.clone(), addon: a.cloned(), interceptor: b.cloned() }),
        _ => {}
    }
}

impl Allowed {
    fn permits(&self, d: &Difference) -> bool {
        let shape_ok = self.shape == Shape::Any || self.shape == d.shape();
        shape_ok && path_matches(self.path, &d.path)
    }
}

/// Whether `pattern` (dotted, `*` one segment, final `**` any rest) matches `path`.
fn path_matches(pattern: &str, path: &[String]) -> bool {
    let parts: Vec<&str> = pattern.split('.').collect();
    if parts.last() == Some(&"**") {
        let head = &parts[..parts.len() - 1];
        return path.len() >= head.len() && head.iter().zip(path).all(|(p, s)| *p == "*" || p == s);
    }
    parts.len() == path.len() && parts.iter().zip(path).all(|(p, s)| *p == "*" || p == s)
}

#[test]
fn the_comparison_sees_presence_type_and_value() {
    let a = json!({"x": {"k": "1", "gone": true}, "list": [1, 2], "t": "s"});
    let b = json!({"x": {"k": "2", "new": null}, "list": [1], "t": {"s": 1}});
    let mut out = Vec::new();
    diff(&mut Vec::new(), Some(&a), Some(&b), &mut out);
    let shown: Vec<String> = out.iter().map(ToString::to_string).collect();
    assert_eq!(
        shown,
        [
            "list.1: only the addon has it: 2",
            "t: type differs: addon string \"s\", interceptor object {\"s\":1}",
            "x.gone: only the addon has it: true",
            "x.k: value differs: addon \"1\", interceptor \"2\"",
            "x.new: only the interceptor has it: null",
        ]
    );
    assert!(allow("x.*", Shape::OnlyInterceptor).permits(&out[4]));
    assert!(!allow("x.*", Shape::OnlyInterceptor).permits(&out[3]));
    assert!(allow("**", Shape::Any).permits(&out[0]));
    assert!(allow("x.**", Shape::Differs).permits(&out[3]));
    assert!(!allow("x.k.v", Shape::Any).permits(&out[3]));
}

#[test]
fn akto_bodies_are_compared_as_parsed_json() {
    let body = json!({
        "requestPayload": r#"{"messages": [{"role": "user", "content": "hi"}]}"#,
        "responsePayload": "",
        "responseHeaders": r#"{"date": "Mon, 01 Jan 2024 00:00:00 GMT", "x": "y"}"#,
        "time": "1700000000123",
        "type": null
    });
    let view = akto_body(&body, &(1_700_000_000_000..=1_700_000_001_000));
    assert_eq!(view["requestPayload"]["$json"]["messages"][0]["content"], "hi");
    assert_eq!(view["responsePayload"], "");
    assert_eq!(view["responseHeaders"]["$json"], json!({"date": "<date>", "x": "y"}));
    assert_eq!(view["time"], "<the time of the call>");
    assert_eq!(view["type"], Value::Null);
    // A time outside the run is kept, so that it shows as a difference.
    let view = akto_body(&body, &(0..=1));
    assert_eq!(view["time"], "1700000000123");
}
