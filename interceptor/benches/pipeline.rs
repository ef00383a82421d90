//! The guardrail pipeline per exchange, as the data plane runs it on the
//! allowed path: a ~2 KB chat request and its ~1 KB JSON answer through the
//! built-in policy, with both audit events written as JSON log lines (to a
//! sink). This is the CPU the guardrails add to each proxied request.

mod common;

use std::{hint::black_box, sync::Arc, time::Duration};

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
    proxy::hook::{BodyAction, Exchange, Hook, RequestAction, ResponseAction},
    testing::provider::sample_chat_completion,
    workload::Workload,
};

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
    // The product's default log (JSON lines on stderr, info and up), with
    // stderr sent to /dev/null.
    let null = std::fs::OpenOptions::new().write(true).open("/dev/null").expect("/dev/null");
    nix::unistd::dup2_stderr(null).expect("dup2");
    interceptor::telemetry::init(interceptor::telemetry::LogFormat::Json);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let hook = runtime.block_on(async {
        let metrics = Arc::new(Metrics::new());
        let guardrails = Guardrails {
            engine: Some(Arc::new(Engine::builtin().expect("policy"))),
            akto: None,
            cfg: GuardrailsConfig::default(),
        };
        let (_, rx) = tokio::sync::watch::channel(Arc::new(guardrails));
        Pipeline::new(rx, AuditLog::start(None, Arc::clone(&metrics)), metrics)
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
    let mut doc = common::openai_chat(&common::clean_prompt(1));
    doc["stream"] = false.into();
    let body = Bytes::from(serde_json::to_vec(&doc).expect("json"));
    let answer = Bytes::from(sample_chat_completion());
    let response = response_head(answer.len());

    c.bench_function("pipeline/allowed_exchange", |b| {
        b.iter(|| {
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
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    targets = pipeline
}
criterion_main!(benches);
