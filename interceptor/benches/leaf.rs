//! Leaf-certificate issuance: minting for a new server name (P-256 key and
//! one signature), a cache hit, and the P-256 key generation alone.

use std::{
    hint::black_box,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use criterion::{Criterion, criterion_group, criterion_main};
use interceptor::ca::{CertificateAuthority, LeafIssuer, LeafSettings};
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};

fn leaf(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = CertificateAuthority::load_or_create(dir.path()).expect("CA");
    let issuer = LeafIssuer::new(Arc::new(ca), LeafSettings::default()).expect("issuer");
    let mut group = c.benchmark_group("leaf");
    let next = AtomicU64::new(0);
    group.bench_function("mint_new_name", |b| {
        b.iter(|| {
            let name = format!("host-{}.example.com", next.fetch_add(1, Ordering::Relaxed));
            issuer.issue_blocking(black_box(&name)).expect("minted")
        })
    });
    issuer.issue_blocking("api.openai.com").expect("minted");
    group.bench_function("cache_hit", |b| {
        b.iter(|| issuer.issue_blocking(black_box("api.openai.com")).expect("cached"))
    });
    group.bench_function("p256_keygen", |b| b.iter(|| KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key")));
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    targets = leaf
}
criterion_main!(benches);
