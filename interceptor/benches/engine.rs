//! The local guardrail engine with the built-in policy: scan throughput on
//! prompts of a few KB, without and with matches.

mod common;

use std::{hint::black_box, time::Duration};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use interceptor::guardrails::{
    engine::{Decision, Engine, ScanContext},
    model::{Direction, Provider, TextKind},
};

fn engine(c: &mut Criterion) {
    let engine = Engine::builtin().expect("built-in policy compiles");
    let ctx = ScanContext {
        direction: Direction::Request,
        provider: Provider::OpenAiChat,
        host: "api.openai.com",
        workload: None,
    };
    let mut group = c.benchmark_group("engine");
    for kb in [4, 16] {
        let clean = common::clean_prompt(kb);
        let matched = common::prompt_with_matches(kb);
        assert!(engine.scan(&ctx, [(TextKind::Content, clean.as_str())]).findings.is_empty(), "clean prompt matched");
        let scan = engine.scan(&ctx, [(TextKind::Content, matched.as_str())]);
        assert_eq!(scan.decision, Decision::Redact, "{:?}", scan.findings);

        group.throughput(Throughput::Bytes(clean.len() as u64));
        group.bench_function(format!("scan_clean_{kb}k"), |b| {
            b.iter(|| engine.scan(&ctx, [(TextKind::Content, black_box(clean.as_str()))]))
        });
        group.throughput(Throughput::Bytes(matched.len() as u64));
        group.bench_function(format!("scan_and_redact_matches_{kb}k"), |b| {
            b.iter(|| {
                let scan = engine.scan(&ctx, [(TextKind::Content, black_box(matched.as_str()))]);
                scan.redacted(0, &matched)
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = engine
}
criterion_main!(benches);
