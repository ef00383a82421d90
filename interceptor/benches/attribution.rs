//! iptables-mode attribution, per connection (`cargo bench -p interceptor
//! --bench attribution`): the `sock_diag` query for the
//! client's socket, the process lookup when the process opened recent
//! connections (the common case, and every connection of a burst after the
//! first), a cold lookup (new process, no cgroup hint: every process is
//! read, newest first), a fruitless scan of every process (the bound, with
//! the process count printed), and the whole path as the resolver runs it.

use std::{hint::black_box, os::fd::AsRawFd as _, os::unix::fs::MetadataExt as _, path::Path, time::Duration};

use criterion::{Criterion, criterion_group, criterion_main};
use interceptor::{
    net::{ClientAddr, OrigDstAddr},
    redirect::{
        iptables::IptablesResolver,
        owner::{OwnerSource, Owners},
        sockdiag,
    },
};

fn attribution(c: &mut Criterion) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listener");
    let client = std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
    let (_server, _) = listener.accept().expect("accept");
    let (local, peer) = (client.local_addr().expect("local"), client.peer_addr().expect("peer"));
    let inode = std::fs::metadata(format!("/proc/self/fd/{}", client.as_raw_fd())).expect("fd").ino() as u32;
    let processes = std::fs::read_dir("/proc")
        .map(|d| d.flatten().filter(|e| e.file_name().to_str().is_some_and(|n| n.parse::<u32>().is_ok())).count())
        .unwrap_or(0);
    println!("attribution: {processes} processes in /proc");

    let mut group = c.benchmark_group("attribution");
    group.bench_function("sock_diag_query", |b| b.iter(|| sockdiag::find(black_box(local), peer).expect("query")));
    let mut warm = Owners::new(Path::new("/proc"), None, Duration::from_secs(5));
    warm.find(inode, 0).expect("found");
    group.bench_function("process_of_a_recent_opener", |b| b.iter(|| warm.find(black_box(inode), 0).expect("found")));
    group.bench_function("process_cold_lookup", |b| {
        b.iter(|| {
            Owners::new(Path::new("/proc"), None, Duration::from_secs(5)).find(black_box(inode), 0).expect("found")
        })
    });
    group.bench_function("scan_of_every_process", |b| {
        b.iter(|| Owners::new(Path::new("/proc"), None, Duration::from_secs(5)).find(black_box(u32::MAX), 0))
    });
    let resolver = IptablesResolver::new(Some(OwnerSource::Local(Owners::default())));
    group.bench_function("whole_lookup_recent_opener", |b| {
        b.iter(|| resolver.attribute(ClientAddr(black_box(local)), OrigDstAddr(peer)).expect("attributed"))
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    targets = attribution
}
criterion_main!(benches);
