//! The guardrail pipeline per exchange, as the data plane runs it on the
//! allowed path: a ~2 KB chat request and its ~1 KB JSON answer through the
//! built-in policy, with both audit events written as JSON log lines (to a
//! sink). This is the CPU the guardrails add to each proxied request.
//! `pipeline/allowed_exchange_traced` is the same with an OpenTelemetry
//! span per exchange: the request path's share of trace export. The
//! `…_16_in_flight` groups run 16 exchanges interleaved phase by phase, as a
//! loaded worker has them (each one's state cold when it comes back to it),
//! and report per batch of 16.
//!
//! The benchmark binary counts heap allocations (its own global allocator,
//! never the product's) and prints the allocations per exchange before the
//! criterion run.

mod common;

use std::{
    alloc::{GlobalAlloc, Layout, System},
    hint::black_box,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use interceptor::{
    audit::AuditLog,
    config::GuardrailsConfig,
    guardrails::{
        engine::Engine,
        pipeline::{Guardrails, Pipeline},
    },
    metrics::Metrics,
    net::{ClientAddr, OrigDstAddr},
    proxy::hook::{BodyAction, ChunkAction, Exchange, Hook, RequestAction, ResponseAction},
    telemetry::otlp::{Otlp, OtlpConfig, OtlpCounters},
    testing::provider::sample_chat_completion,
    workload::Workload,
};

/// The system allocator, counting allocations and allocated bytes.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static ALLOCATED: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; the
// counters are only side effects.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        ALLOCATED.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        ALLOCATED.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        ALLOCATED.fetch_add(new_size as u64, Ordering::Relaxed);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn request_head(len: usize) -> http::request::Parts {
    let request = http::Request::post("/v1/chat/completions")
        .header("host", "api.openai.com")
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-bench")
        .header("content-length", len)
        .body(())
        .expect("request");
    request.into_parts().0
}

fn response_head(len: usize) -> http::response::Parts {
    let response = http::Response::builder()
        .header("content-type", "application/json")
        .header("content-length", len)
        .body(())
        .expect("response");
    response.into_parts().0
}

fn pipeline(c: &mut Criterion) {
    run(c, "pipeline/allowed_exchange", false);
    run(c, "pipeline/allowed_exchange_traced", true);
    streamed(c, "pipeline/streamed_exchange");
}

/// Allocations and bytes allocated per call of `f`, warm: `f` runs a tenth
/// of `runs` times first, uncounted.
fn allocations(runs: u64, mut f: impl FnMut()) -> (f64, u64) {
    for _ in 0..runs / 10 {
        f();
    }
    let (count, bytes) = (ALLOCATIONS.load(Ordering::Relaxed), ALLOCATED.load(Ordering::Relaxed));
    for _ in 0..runs {
        f();
    }
    let count = ALLOCATIONS.load(Ordering::Relaxed) - count;
    let bytes = ALLOCATED.load(Ordering::Relaxed) - bytes;
    (count as f64 / runs as f64, bytes / runs)
}

/// One exchange after the other through the pipeline; `traced`: with a span
/// per exchange (OpenTelemetry export on, to a port where nothing listens,
/// so the export thread's own work is not what is timed).
fn run(c: &mut Criterion, name: &str, traced: bool) {
    let (runtime, hook, exchange) = setup(traced);
    let mut doc = common::openai_chat(&common::clean_prompt(1));
    doc["stream"] = false.into();
    let body = Bytes::from(serde_json::to_vec(&doc).expect("json"));
    let answer = Bytes::from(sample_chat_completion());
    let response = response_head(answer.len());

    let exchange_once = || {
        runtime.block_on(async {
            let mut head = request_head(body.len());
            let (action, state) = hook.on_request(&exchange, &mut head, black_box(&body)).await;
            assert!(matches!(action, RequestAction::Forward));
            let action = hook.on_response(&exchange, &state, &head, &response).await;
            assert!(matches!(action, ResponseAction::Collect));
            let action = hook.on_response_body(&exchange, &state, &head, &response, black_box(&answer)).await;
            assert!(matches!(action, BodyAction::Forward));
            // Let the audit writer take both events.
            tokio::task::yield_now().await;
        })
    };

    // Allocations per exchange, warm (caches and buffers already grown),
    // including the request head the benchmark builds (as hyper would).
    let runs = 10_000;
    let (count, bytes) = allocations(runs, exchange_once);
    let (head_allocations, _) = allocations(runs, || {
        black_box(request_head(body.len()));
    });
    println!(
        "{name}: {count:.1} allocations, {bytes} bytes allocated per exchange \
         ({head_allocations:.1} of them the benchmark's request head)"
    );

    c.bench_function(name, |b| b.iter(exchange_once));

    // The same with IN_FLIGHT exchanges interleaved, phase by phase, as a
    // loaded worker has them: each exchange's state is cold when it is
    // touched again. Timed per exchange.
    let interleaved = || {
        runtime.block_on(async {
            let mut heads = Vec::with_capacity(IN_FLIGHT);
            let mut states = Vec::with_capacity(IN_FLIGHT);
            for _ in 0..IN_FLIGHT {
                let mut head = request_head(body.len());
                let (action, state) = hook.on_request(&exchange, &mut head, black_box(&body)).await;
                assert!(matches!(action, RequestAction::Forward));
                heads.push(head);
                states.push(state);
            }
            for (head, state) in heads.iter().zip(&states) {
                let action = hook.on_response(&exchange, state, head, &response).await;
                assert!(matches!(action, ResponseAction::Collect));
            }
            for (head, state) in heads.iter().zip(&states) {
                let action = hook.on_response_body(&exchange, state, head, &response, black_box(&answer)).await;
                assert!(matches!(action, BodyAction::Forward));
            }
            tokio::task::yield_now().await;
        })
    };
    let mut group = c.benchmark_group(format!("{name}_{IN_FLIGHT}_in_flight"));
    group.throughput(criterion::Throughput::Elements(IN_FLIGHT as u64));
    group.bench_function("per_batch", |b| b.iter(interleaved));
    group.finish();
}

/// Events of the streamed answer.
const STREAM_EVENTS: usize = 20;
/// A TLS record's worth of plaintext at most, as reads deliver it.
const CHUNK: usize = 1400;

/// A streamed exchange: the request (`"stream": true`), then an SSE answer
/// of [`STREAM_EVENTS`] deltas through the stream guard (monitor, the
/// default), fed as reads deliver it, then its end. This is the CPU the
/// guardrails add to a streamed call.
fn streamed(c: &mut Criterion, name: &str) {
    let (runtime, hook, exchange) = setup(false);
    let mut doc = common::openai_chat(&common::clean_prompt(1));
    doc["stream"] = true.into();
    let body = Bytes::from(serde_json::to_vec(&doc).expect("json"));
    let stream = Bytes::from(common::openai_sse_stream(STREAM_EVENTS));
    let response = http::Response::builder()
        .header("content-type", "text/event-stream")
        .body(())
        .expect("response")
        .into_parts()
        .0;
    let exchange_once = || {
        runtime.block_on(async {
            let mut head = request_head(body.len());
            let (action, state) = hook.on_request(&exchange, &mut head, black_box(&body)).await;
            assert!(matches!(action, RequestAction::Forward));
            let ResponseAction::Inspect(mut inspector) = hook.on_response(&exchange, &state, &head, &response).await
            else {
                panic!("the stream is not inspected");
            };
            for chunk in stream.chunks(CHUNK) {
                let action = inspector.on_chunk(stream.slice_ref(chunk)).await;
                assert!(matches!(action, ChunkAction::Forward(_)));
            }
            black_box(inspector.on_end().await);
            // Let the audit writer take both events.
            tokio::task::yield_now().await;
        })
    };
    let (count, bytes) = allocations(2_000, exchange_once);
    println!(
        "{name}: {count:.1} allocations, {bytes} bytes allocated per exchange \
         ({STREAM_EVENTS} events in {} bytes)",
        stream.len()
    );
    c.bench_function(name, |b| b.iter(exchange_once));
}

/// The runtime, the pipeline (the built-in policy, audit events to the
/// JSON log) and the connection the exchanges come on.
fn setup(traced: bool) -> (tokio::runtime::Runtime, Pipeline, Exchange) {
    // The product's default log (JSON lines on stderr, info and up), with
    // stderr sent to /dev/null.
    let null = std::fs::OpenOptions::new().write(true).open("/dev/null").expect("/dev/null");
    nix::unistd::dup2_stderr(null).expect("dup2");
    interceptor::telemetry::init(interceptor::telemetry::LogFormat::Json);
    let otlp = traced.then(|| {
        let cfg = OtlpConfig { endpoint: "http://127.0.0.1:9".into(), ..OtlpConfig::default() };
        Otlp::start(&cfg, OtlpCounters::default()).expect("otlp").expect("export on")
    });
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let hook = runtime.block_on(async {
        let metrics = Arc::new(Metrics::new());
        let guardrails = Guardrails {
            engine: Some(Arc::new(Engine::builtin().expect("policy"))),
            akto: None,
            cfg: GuardrailsConfig::default(),
            keys: None,
        };
        let (_, rx) = tokio::sync::watch::channel(Arc::new(guardrails));
        Pipeline::new(rx, AuditLog::start(None, Arc::clone(&metrics)), metrics).with_otlp(otlp)
    });
    let exchange = Exchange {
        client: ClientAddr("10.0.0.2:41000".parse().expect("addr")),
        orig_dst: OrigDstAddr("198.18.0.10:443".parse().expect("addr")),
        sni: "api.openai.com".into(),
        workload: Some(Workload {
            pid: 4242,
            tid: 4242,
            uid: 1000,
            gid: 1000,
            comm: "agent".into(),
            cgroup_id: 1,
            ..Default::default()
        }),
    };
    (runtime, hook, exchange)
}

/// Exchanges in flight at once in the interleaved variant (the namespace
/// benchmark's 16 connections).
const IN_FLIGHT: usize = 16;

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    targets = pipeline
}
criterion_main!(benches);
