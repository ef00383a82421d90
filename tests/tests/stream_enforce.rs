//! `stream_mode = "enforce"` seen from both ends, through the in-process
//! proxy with the built-in policy, in lockstep with the fake provider: it
//! sends its next event only when the test lets it (`gated=1`), so every
//! step waits for an event (what the client read, what the provider sent),
//! never for time.
//!
//! * A harmless stream reaches the client event by event: the provider
//!   sends event N+1 only after the client has read event N, so a proxy
//!   that held the stream would never finish.
//! * A credential split across many paced events: the text before it
//!   streams through, the provider sends every piece of it, and the client
//!   gets none of it (so not its last byte), then the provider's error.
//!
//! Secrets are built at run time so no secret-shaped literal sits here.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use futures_util::StreamExt;
use interceptor::{
    audit::AuditLog,
    config::{GuardrailsConfig, StreamMode},
    guardrails::{
        engine::Engine,
        pipeline::{Guardrails, Pipeline},
    },
    metrics::Metrics,
    net::{ClientAddr, OrigDstAddr},
    policy::DomainsConfig,
    proxy::hook::{ChunkAction, Exchange, Hook, RequestAction, ResponseAction},
    testing::provider::{FakeProvider, TestPki},
};
use interceptor_tests::inprocess::{InProcessProxy, client_for};
use serde_json::json;
use tokio::sync::watch;

const OPENAI: &str = "api.openai.com";

/// A bound on each step, so that a proxy holding the stream fails the test
/// instead of hanging it; a passing run never gets near it.
const STEP: Duration = Duration::from_secs(20);

struct World {
    provider: FakeProvider,
    proxy: InProcessProxy,
    _reload: watch::Sender<Arc<Guardrails>>,
    _dir: tempfile::TempDir,
}

impl World {
    async fn start() -> Result<World> {
        let pki = TestPki::with_defaults()?;
        let provider = FakeProvider::start(std::net::TcpListener::bind("127.0.0.1:0")?, &pki)?;
        let dir = tempfile::tempdir()?;
        let upstream_ca = pki.write_ca(dir.path())?;
        let metrics = Arc::new(Metrics::new());
        let guardrails = Guardrails {
            engine: Some(Arc::new(Engine::builtin()?)),
            akto: None,
            cfg: GuardrailsConfig { stream_mode: StreamMode::Enforce, ..Default::default() },
            keys: None,
        };
        let (reload, current) = watch::channel(Arc::new(guardrails));
        let pipeline = Pipeline::new(current, AuditLog::start(None, Arc::clone(&metrics)), metrics);
        let proxy = InProcessProxy::start(
            provider.local_addr(),
            &upstream_ca,
            DomainsConfig::default(),
            Some(Arc::new(pipeline)),
        )
        .await?;
        Ok(World { provider, proxy, _reload: reload, _dir: dir })
    }

    /// Opens a gated chat-completion stream of `n` events saying `reply`.
    async fn open(&self, reply: &str, n: usize) -> Result<Client> {
        let client = client_for(OPENAI, self.proxy.addr, &[&self.proxy.ca_pem], false)?;
        let body = json!({
            "model": "gpt-4o-mini",
            "stream": true,
            "messages": [{"role": "user", "content": "Tell me something."}],
        });
        let response = client
            .post(format!("https://{OPENAI}/v1/chat/completions?gated=1&n={n}"))
            .header("content-type", "application/json")
            .header("x-fake-reply", reply)
            .body(body.to_string())
            .send()
            .await
            .context("stream request")?;
        ensure!(response.status() == 200, "status {}", response.status());
        Ok(Client { body: Box::pin(response.bytes_stream()), seen: Vec::new(), ended: false })
    }

    /// Lets the provider send one more event and waits until it has.
    async fn provider_sends_one(&self) -> Result<()> {
        let before = self.provider.sse_events_sent();
        self.provider.release_events(1);
        tokio::time::timeout(STEP, async {
            while self.provider.sse_events_sent() == before {
                tokio::task::yield_now().await;
            }
        })
        .await
        .context("the provider did not send its event")
    }
}

type BodyStream = std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>;

/// What the client has read so far.
struct Client {
    body: BodyStream,
    seen: Vec<u8>,
    ended: bool,
}

impl Client {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.seen).into_owned()
    }

    /// Reads until the body holds `needle`.
    async fn read_until(&mut self, needle: &str) -> Result<()> {
        let found = tokio::time::timeout(STEP, async {
            while !self.text().contains(needle) {
                match self.body.next().await {
                    Some(chunk) => self.seen.extend_from_slice(&chunk?),
                    None => {
                        self.ended = true;
                        bail!("the stream ended first");
                    }
                }
            }
            Ok(())
        })
        .await;
        match found {
            Ok(result) => result.with_context(|| format!("waiting for {needle:?}; the client has: {}", self.text())),
            Err(_) => bail!("{needle:?} never reached the client; it has: {}", self.text()),
        }
    }

    /// Reads to the end of the body.
    async fn read_to_end(&mut self) -> Result<()> {
        tokio::time::timeout(STEP, async {
            while let Some(chunk) = self.body.next().await {
                self.seen.extend_from_slice(&chunk?);
            }
            self.ended = true;
            anyhow::Ok(())
        })
        .await
        .with_context(|| format!("the stream did not end; the client has: {}", self.text()))?
    }
}

/// How the fake provider cuts a reply into deltas: each word with its
/// space, words over twelve characters in twelve-character pieces.
fn pieces(reply: &str) -> Vec<String> {
    let mut out = Vec::new();
    for word in reply.split(' ') {
        let chars: Vec<char> = word.chars().collect();
        let mut parts: Vec<String> = chars.chunks(12).map(|c| c.iter().collect()).collect();
        if let Some(last) = parts.last_mut() {
            last.push(' ');
        }
        out.extend(parts);
    }
    out
}

/// The JSON-escaped form of a delta, as it appears in the event.
fn in_event(piece: &str) -> String {
    let quoted = serde_json::to_string(piece).unwrap_or_default();
    format!("\"content\":{quoted}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_harmless_stream_reaches_the_client_event_by_event() -> Result<()> {
    let w = World::start().await?;
    let reply = "Paris is the capital of France, and its largest city by population. It sits on the Seine.";
    let pieces = pieces(reply);
    let mut client = w.open(reply, pieces.len()).await?;
    for (k, piece) in pieces.iter().enumerate() {
        w.provider_sends_one().await?;
        // Event k reaches the client before the provider may send k + 1.
        client.read_until(&format!("{{\"i\":{k},")).await?;
        client.read_until(&in_event(piece)).await.with_context(|| format!("event {k}"))?;
        ensure!(w.provider.sse_events_sent() == k + 1, "the provider is ahead of the test");
    }
    w.provider_sends_one().await?;
    client.read_to_end().await?;
    let text = client.text();
    ensure!(text.ends_with("data: [DONE]\n\n"), "not the provider's end: {text}");
    ensure!(!text.contains("error"), "the harmless stream was cut: {text}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_split_across_paced_events_never_reaches_the_client() -> Result<()> {
    let w = World::start().await?;
    // `github_pat_` and the 60 characters that make it a token (the
    // shortest the detector knows): six events of the fake's pieces, the
    // last of which completes it.
    let token = format!("{}_{}_{}", "github", "pat", "a1B2c3D4e5".repeat(6));
    let reply = format!("Sure. The deploy token is {token} and it expires tomorrow.");
    let pieces = pieces(&reply);
    let first = pieces.iter().position(|p| p.starts_with("github")).context("token piece")?;
    let last = pieces.iter().rposition(|p| token.ends_with(p.trim_end())).context("token piece")?;
    ensure!(last - first >= 5, "the token is not split across many events: {pieces:?}");
    let mut client = w.open(&reply, pieces.len()).await?;
    // The text before the token streams through, event by event.
    for (k, piece) in pieces[..first].iter().enumerate() {
        w.provider_sends_one().await?;
        client.read_until(&in_event(piece)).await.with_context(|| format!("event {k}"))?;
    }
    // The token, one event at a time, each sent by the provider.
    for _ in first..=last {
        w.provider_sends_one().await?;
    }
    ensure!(w.provider.sse_events_sent() == last + 1, "the provider did not send the token's last piece");
    // Whatever the provider sends next, the stream is already cut.
    w.provider.release_events(pieces.len() + 1);
    client.read_to_end().await?;
    let text = client.text();
    for piece in &pieces[first..=last] {
        let piece = piece.trim_end();
        ensure!(!text.contains(piece), "a piece of the token reached the client ({piece}): {text}");
    }
    ensure!(!text.contains("github_pat"), "the token's start reached the client: {text}");
    ensure!(!text.contains("expires"), "text after the token reached the client: {text}");
    ensure!(text.contains("error"), "no error event: {text}");
    ensure!(text.ends_with("data: [DONE]\n\n"), "not an OpenAI stream end: {text}");
    Ok(())
}

/// An OpenAI chat stream carrying `pieces`, one event each, then `[DONE]`.
fn openai_stream(pieces: &[String]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, piece) in pieces.iter().enumerate() {
        let event =
            json!({"i": i, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": piece}}]});
        out.extend_from_slice(format!("data: {event}\n\n").as_bytes());
    }
    out.extend_from_slice(b"data: [DONE]\n\n");
    out
}

/// Runs `stream` cut at `cuts` through the enforcing hook; returns what the
/// client got, how much of it before the stream's end, and whether it was
/// cut.
async fn through_hook(pipeline: &Pipeline, stream: &[u8], cuts: &[usize]) -> Result<(Vec<u8>, usize, bool)> {
    let addr = |s: &str| s.parse::<SocketAddr>();
    let ex = Exchange {
        client: ClientAddr(addr("10.0.0.2:40000")?),
        orig_dst: OrigDstAddr(addr("198.18.0.10:443")?),
        sni: OPENAI.to_string(),
        workload: None,
    };
    let (mut head, ()) = http::Request::builder()
        .method("POST")
        .uri("/v1/chat/completions")
        .header("host", OPENAI)
        .body(())?
        .into_parts();
    let request =
        Bytes::from_static(br#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}"#);
    let (action, state) = pipeline.on_request(&ex, &mut head, &request).await;
    ensure!(matches!(action, RequestAction::Forward), "the request was not forwarded");
    let (response, ()) =
        http::Response::builder().status(200).header("content-type", "text/event-stream").body(())?.into_parts();
    let ResponseAction::Inspect(mut guard) = pipeline.on_response(&ex, &state, &head, &response).await else {
        bail!("the stream is not inspected");
    };
    let mut out = Vec::new();
    let mut at = 0;
    for &cut in cuts.iter().chain([&stream.len()]) {
        match guard.on_chunk(Bytes::copy_from_slice(&stream[at..cut])).await {
            ChunkAction::Forward(bytes) => {
                out.extend_from_slice(&bytes);
                ensure!(stream.starts_with(&out), "released bytes the provider did not send in that order");
            }
            ChunkAction::End(_) => {
                let before_end = out.len();
                return Ok((out, before_end, true));
            }
        }
        at = cut;
    }
    let before_end = out.len();
    out.extend_from_slice(&guard.on_end().await);
    Ok((out, before_end, false))
}

fn enforcing_pipeline() -> Result<Pipeline> {
    let metrics = Arc::new(Metrics::new());
    let guardrails = Guardrails {
        engine: Some(Arc::new(Engine::builtin()?)),
        akto: None,
        cfg: GuardrailsConfig { stream_mode: StreamMode::Enforce, ..Default::default() },
        keys: None,
    };
    let (_, current) = watch::channel(Arc::new(guardrails));
    Ok(Pipeline::new(current, AuditLog::start(None, Arc::clone(&metrics)), metrics))
}

/// Any two cuts of the provider's bytes: only a prefix of what it sent is
/// released, a harmless stream whole and as it comes (before its end), and
/// of a stream with a key, nothing from the key's first event on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_chunking_releases_a_prefix_and_never_the_key() -> Result<()> {
    let pipeline = enforcing_pipeline()?;
    let token = format!("{}_{}", "ghp", "a1B2".repeat(9));
    let harmless = openai_stream(&pieces("Paris is lovely in spring, and quiet in winter."));
    let leaking = pieces(&format!("The token is {token} today."));
    let first = leaking.iter().position(|p| p.starts_with("ghp")).context("token piece")?;
    let leak = openai_stream(&leaking);
    let key_event = leak.windows(4).position(|w| w == b"ghp_").context("token in the stream")?;
    let key_event = leak[..key_event].windows(6).rposition(|w| w == b"data: ").context("its event")?;
    ensure!(first > 0);
    for (stream, leaks) in [(&harmless, false), (&leak, true)] {
        for a in (1..stream.len()).step_by(7) {
            for b in [a + 1, a + 13, a + 101] {
                let cuts: Vec<usize> = [a, b].into_iter().filter(|&c| c < stream.len()).collect();
                let (out, before_end, cut) = through_hook(&pipeline, stream, &cuts).await?;
                if leaks {
                    ensure!(cut, "{a} {b}: the key's stream was not cut");
                    ensure!(out.len() <= key_event, "{a} {b}: released into the key's event");
                } else {
                    ensure!(!cut && out == *stream, "{a} {b}: the harmless stream was not passed whole");
                    // Every event of it ends on a space: nothing waits for
                    // the end of the stream.
                    ensure!(before_end == stream.len(), "{a} {b}: held to the end");
                }
            }
        }
    }
    Ok(())
}
