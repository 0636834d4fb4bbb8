//! The DATA reader and the dot-stuffing writer on typical and large messages.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use portcullis::wire::data::{DataReader, write_stuffed};
use std::hint::black_box;

fn message(size: usize) -> Vec<u8> {
    let mut m = b"From: a@sender.test\r\nTo: b@example.test\r\nSubject: bench\r\n\r\n".to_vec();
    let mut i = 0;
    while m.len() < size {
        if i % 50 == 0 {
            m.extend_from_slice(b".a line that needs dot-stuffing\r\n");
        }
        m.extend_from_slice(
            b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.\r\n",
        );
        i += 1;
    }
    m
}

fn wire(content: &[u8]) -> Vec<u8> {
    let mut w = Vec::with_capacity(content.len() + 1024);
    write_stuffed(content, |s| w.extend_from_slice(s));
    w
}

fn bench(c: &mut Criterion) {
    for (name, size) in [("20KB", 20 * 1024), ("1MB", 1 << 20)] {
        let content = message(size);
        let wire = wire(&content);
        let mut g = c.benchmark_group(format!("data_{name}"));
        g.throughput(Throughput::Bytes(wire.len() as u64));
        g.bench_function("read", |b| {
            let mut out = Vec::with_capacity(content.len());
            b.iter(|| {
                out.clear();
                let mut r = DataReader::new(u64::MAX, 998);
                // Socket-sized chunks, as the session feeds it.
                for chunk in wire.chunks(64 * 1024) {
                    black_box(r.feed(chunk, &mut out));
                }
            })
        });
        g.bench_function("write_stuffed", |b| {
            let mut n = 0usize;
            b.iter(|| {
                write_stuffed(black_box(&content), |s| n += s.len());
            })
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
