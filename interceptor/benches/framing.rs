//! Stream framing: the SSE parser and the AWS event-stream decoder over a
//! realistic response stream, fed in network-sized chunks, with and without
//! extracting each event's text as the stream guard does.

mod common;

use std::{hint::black_box, time::Duration};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use interceptor::guardrails::{
    framing::{eventstream::Decoder, sse::SseParser},
    model::Provider,
    providers::stream_delta,
};

/// A TLS record's worth of plaintext at most, as reads deliver them.
const CHUNK: usize = 1400;
const EVENTS: usize = 500;

fn sse(c: &mut Criterion) {
    let stream = common::openai_sse_stream(EVENTS);
    let mut group = c.benchmark_group("sse");
    group.throughput(Throughput::Bytes(stream.len() as u64));
    group.bench_function("parse", |b| {
        b.iter(|| {
            let mut p = SseParser::default();
            let mut n = 0;
            for chunk in black_box(&stream).chunks(CHUNK) {
                n += p.feed(chunk).expect("valid stream").len();
            }
            assert_eq!(n, EVENTS + 1);
        })
    });
    group.bench_function("parse_and_delta", |b| {
        b.iter(|| {
            let mut p = SseParser::default();
            let mut chars = 0;
            for chunk in black_box(&stream).chunks(CHUNK) {
                for ev in p.feed(chunk).expect("valid stream") {
                    chars +=
                        stream_delta(Provider::OpenAiChat, (&ev).into()).texts.iter().map(|t| t.1.len()).sum::<usize>();
                }
            }
            chars
        })
    });
    group.finish();
}

fn event_stream(c: &mut Criterion) {
    let stream = common::converse_event_stream(EVENTS);
    let mut group = c.benchmark_group("event_stream");
    group.throughput(Throughput::Bytes(stream.len() as u64));
    group.bench_function("decode", |b| {
        b.iter(|| {
            let mut d = Decoder::default();
            let mut n = 0;
            for chunk in black_box(&stream).chunks(CHUNK) {
                n += d.feed(chunk).expect("valid stream").len();
            }
            assert_eq!(n, EVENTS + 3);
        })
    });
    group.bench_function("decode_and_delta", |b| {
        b.iter(|| {
            let mut d = Decoder::default();
            let mut chars = 0;
            for chunk in black_box(&stream).chunks(CHUNK) {
                for m in d.feed(chunk).expect("valid stream") {
                    chars += stream_delta(Provider::BedrockConverse, (&m).into())
                        .texts
                        .iter()
                        .map(|t| t.1.len())
                        .sum::<usize>();
                }
            }
            chars
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = sse, event_stream
}
criterion_main!(benches);
