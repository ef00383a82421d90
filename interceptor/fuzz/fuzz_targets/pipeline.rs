//! The guardrail pipeline on any request body and any response stream cut
//! into any chunks, through the real hook with the built-in policy: it never
//! panics, monitor mode forwards every byte unchanged, and enforce mode only
//! ever releases a prefix of what the provider sent (then, at most, a block
//! event).
#![no_main]

mod common;

use std::{
    net::SocketAddr,
    sync::{Arc, LazyLock},
};

use bytes::Bytes;
use interceptor::{
    audit::AuditLog,
    config::{GuardrailsConfig, StreamMode},
    guardrails::{
        engine::Engine,
        pipeline::{Guardrails, Pipeline},
    },
    metrics::Metrics,
    net::{ClientAddr, OrigDstAddr},
    proxy::hook::{ChunkAction, Exchange, Hook, RequestAction, ResponseAction},
};
use libfuzzer_sys::fuzz_target;
use tokio::sync::watch;

/// (server name, path, response content type) of each provider's streams.
const ROUTES: &[(&str, &str, &str)] = &[
    ("api.openai.com", "/v1/chat/completions", "text/event-stream"),
    ("api.openai.com", "/v1/responses", "text/event-stream"),
    ("api.anthropic.com", "/v1/messages", "text/event-stream"),
    (
        "bedrock-runtime.us-east-1.amazonaws.com",
        "/model/anthropic.claude-3-haiku-20240307-v1%3A0/invoke-with-response-stream",
        "application/vnd.amazon.eventstream",
    ),
    (
        "bedrock-runtime.us-east-1.amazonaws.com",
        "/model/amazon.nova-lite-v1%3A0/converse-stream",
        "application/vnd.amazon.eventstream",
    ),
    (
        "generativelanguage.googleapis.com",
        "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse",
        "text/event-stream",
    ),
    ("generativelanguage.googleapis.com", "/v1beta/models/gemini-2.0-flash:streamGenerateContent", "application/json"),
    ("llm.example.test", "/api/stream", "text/event-stream"),
];

const ENCODINGS: &[Option<&str>] = &[None, None, Some("gzip"), Some("br"), Some("zstd")];

struct Fixture {
    rt: tokio::runtime::Runtime,
    /// Monitor and enforce, each with a small and the default window.
    pipelines: Vec<(StreamMode, Pipeline)>,
}

static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let engine = Arc::new(Engine::builtin().expect("built-in policy"));
    let pipelines = rt.block_on(async {
        let mut out = Vec::new();
        for mode in [StreamMode::Monitor, StreamMode::Enforce] {
            for (window, overlap) in [(32, 8), (600, 100)] {
                let cfg = GuardrailsConfig {
                    stream_mode: mode,
                    stream_window: window,
                    stream_overlap: overlap,
                    max_decoded_body: 1 << 20,
                    ..GuardrailsConfig::default()
                };
                let metrics = Arc::new(Metrics::new());
                let (_, rx) = watch::channel(Arc::new(Guardrails {
                    engine: Some(Arc::clone(&engine)),
                    akto: None,
                    cfg,
                    keys: None,
                }));
                out.push((mode, Pipeline::new(rx, AuditLog::start(None, Arc::clone(&metrics)), metrics)));
            }
        }
        out
    });
    Fixture { rt, pipelines }
});

fn addr(text: &str) -> SocketAddr {
    text.parse().expect("literal address")
}

fuzz_target!(|data: &[u8]| {
    let fx = &*FIXTURE;
    // Layout: 3 selector bytes, a request body length (u16, little endian),
    // the request body, then the response stream as `common` lays it out.
    let Some((select, rest)) = data.split_first_chunk::<3>() else { return };
    let Some((len, rest)) = rest.split_first_chunk::<2>() else { return };
    let (request_body, rest) = rest.split_at(usize::from(u16::from_le_bytes(*len)).min(rest.len()));
    let (cuts, stream) = common::cuts_and_stream(rest);
    let (host, path, content_type) = ROUTES[usize::from(select[0]) % ROUTES.len()];
    let (mode, pipeline) = &fx.pipelines[usize::from(select[1]) % fx.pipelines.len()];
    let encoding = ENCODINGS[usize::from(select[2]) % ENCODINGS.len()];

    fx.rt.block_on(async {
        let ex = Exchange {
            client: ClientAddr(addr("10.0.0.2:40000")),
            orig_dst: OrigDstAddr(addr("198.18.0.10:443")),
            sni: host.to_string(),
            workload: None,
        };
        let mut request = http::Request::builder().method("POST").uri(path).header("host", host);
        if let Some(encoding) = encoding {
            request = request.header("content-encoding", encoding);
        }
        let (mut head, ()) = request.body(()).expect("request head").into_parts();
        let (action, state) = pipeline.on_request(&ex, &mut head, &Bytes::copy_from_slice(request_body)).await;
        match action {
            RequestAction::Respond(resp) => {
                assert!(resp.status().is_client_error() || resp.status().is_server_error());
                return;
            }
            RequestAction::Forward | RequestAction::ReplaceBody(_) => {}
        }
        let (response, ()) = http::Response::builder()
            .status(200)
            .header("content-type", content_type)
            .body(())
            .expect("head")
            .into_parts();
        let ResponseAction::Inspect(mut guard) = pipeline.on_response(&ex, &state, &head, &response).await else {
            return;
        };

        let chunks = common::chunks(cuts, stream);

        let mut out = Vec::new();
        let mut ended = false;
        for chunk in chunks {
            match guard.on_chunk(Bytes::copy_from_slice(chunk)).await {
                ChunkAction::Forward(bytes) => {
                    if *mode == StreamMode::Monitor {
                        assert_eq!(&bytes[..], chunk, "monitor mode changed a chunk");
                    }
                    out.extend_from_slice(&bytes);
                    assert!(stream.starts_with(&out), "released bytes are not what the provider sent");
                }
                ChunkAction::End(_block) => {
                    assert_eq!(*mode, StreamMode::Enforce, "monitor mode cut a stream");
                    ended = true;
                    break;
                }
            }
        }
        if !ended {
            let tail = guard.on_end().await;
            if *mode == StreamMode::Monitor {
                assert!(tail.is_empty(), "monitor mode added bytes at the end");
                assert_eq!(out, stream);
            } else {
                let mut all = out.clone();
                all.extend_from_slice(&tail);
                // Either everything was released, or the end is a block event.
                assert!(all == stream || !stream.starts_with(&all) || all.len() < stream.len());
            }
        }
    });
});
