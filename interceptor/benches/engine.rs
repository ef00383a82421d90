//! The local guardrail engine with the built-in policy: scan throughput on
//! prompts of a few KB, without and with matches; and on 16 MiB of plain
//! text against 16 MiB of a hostile body (repeated private-key headers,
//! which once cost each header a 64 KiB search), which must stay within
//! twice the plain figure.

mod common;

use std::{
    hint::black_box,
    time::{Duration, Instant},
};

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

/// 16 MiB, the default `proxy.max_inspected_body`.
const LARGE: usize = 16 << 20;

/// `unit` repeated to `LARGE` bytes.
fn repeated(unit: &str) -> String {
    unit.repeat(LARGE / unit.len())
}

fn hostile(c: &mut Criterion) {
    let engine = Engine::builtin().expect("built-in policy compiles");
    let ctx = ScanContext {
        direction: Direction::Request,
        provider: Provider::OpenAiChat,
        host: "api.openai.com",
        workload: None,
    };
    let plain = common::clean_prompt(LARGE / 1024);
    let inputs = [
        ("plain_text_16m", plain),
        ("repeated_key_headers_16m", repeated("-----BEGIN RSA PRIVATE KEY-----\n")),
        ("repeated_key_headers_and_end_markers_16m", repeated("-----BEGIN PRIVATE KEY-----\n-----END x\n")),
        ("separated_key_headers_16m", repeated("-----BEGIN PRIVATE KEY----- x ")),
        // Matches of a redact rule: every one is kept and rewritten.
        ("dense_card_numbers_16m", repeated("4111 1111 1111 1111 ")),
    ];
    // The figures the acceptance asks for, printed once: best of three.
    let best = |text: &str| {
        (0..3)
            .map(|_| {
                let t = Instant::now();
                black_box(engine.scan(&ctx, [(TextKind::Content, text)]));
                t.elapsed()
            })
            .min()
            .unwrap_or_default()
    };
    let base = best(&inputs[0].1);
    for (name, text) in &inputs {
        let t = best(text);
        println!(
            "engine_hostile/{name}: {:.1} ms ({:.0} MB/s), {:.2}x plain text",
            t.as_secs_f64() * 1e3,
            text.len() as f64 / t.as_secs_f64() / 1e6,
            t.as_secs_f64() / base.as_secs_f64()
        );
    }
    assert!(
        matches!(engine.scan(&ctx, [(TextKind::Content, inputs[1].1.as_str())]).decision, Decision::Block(_)),
        "repeated headers are blocked"
    );
    let mut group = c.benchmark_group("engine_hostile");
    group.sample_size(10).warm_up_time(Duration::from_millis(200)).measurement_time(Duration::from_secs(2));
    for (name, text) in &inputs {
        group.throughput(Throughput::Bytes(text.len() as u64));
        group.bench_function(*name, |b| b.iter(|| engine.scan(&ctx, [(TextKind::Content, black_box(text.as_str()))])));
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = engine, hostile
}
criterion_main!(benches);
