//! Provider request parsers: bytes to normalized texts (JSON parsing
//! included, as the pipeline does it) for each provider's request shape.

mod common;

use std::{hint::black_box, time::Duration};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use interceptor::guardrails::{model::Provider, providers::parse_request};

fn parsers(c: &mut Criterion) {
    let prompt = common::clean_prompt(4);
    let bodies = [
        ("openai_chat", Provider::OpenAiChat, common::openai_chat(&prompt)),
        ("anthropic", Provider::Anthropic, common::anthropic(&prompt)),
        ("bedrock_converse", Provider::BedrockConverse, common::bedrock_converse(&prompt)),
        ("gemini", Provider::Gemini, common::gemini(&prompt)),
    ];
    let mut group = c.benchmark_group("parse_request");
    for (name, provider, doc) in bodies {
        let bytes = serde_json::to_vec(&doc).expect("json");
        let parsed = parse_request(provider, &doc);
        assert!(parsed.texts.len() >= 4, "{name}: {} texts", parsed.texts.len());
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| {
                let doc: serde_json::Value = serde_json::from_slice(black_box(&bytes)).expect("json");
                parse_request(provider, &doc)
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = parsers
}
criterion_main!(benches);
