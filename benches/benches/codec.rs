//! The wire codec: decoding a read buffer full of PUBLISH frames, and
//! encoding publishes and deliveries into an output buffer.
//!
//! `cargo bench -p kaelix-bench --bench codec`

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kaelix_core::protocol::{
    decode, encode_deliver, encode_publish, peek, Frame, MessageBody, Peek,
};
use kaelix_core::{Headers, Topic};

const FRAMES: usize = 1000;

fn publishes(size: usize) -> Bytes {
    let topic = Topic::new("bench.codec.topic").unwrap();
    let payload = vec![0xabu8; size];
    let mut buf = BytesMut::new();
    for seq in 0..FRAMES as u64 {
        encode_publish(
            &mut buf,
            seq,
            false,
            &topic,
            None,
            &Headers::new(),
            &payload,
        );
    }
    buf.freeze()
}

fn bench_decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode_publish");
    for size in [16usize, 128, 1024] {
        let wire = publishes(size);
        group.throughput(Throughput::Elements(FRAMES as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &wire, |b, wire| {
            b.iter(|| {
                let mut buf = BytesMut::from(&wire[..]);
                let mut n = 0;
                while let Ok(Some(frame)) = decode(&mut buf, 1 << 20) {
                    if let Frame::Publish(p) = frame {
                        n += p.body.payload().len();
                    }
                }
                n
            })
        });
    }
    group.finish();
}

/// The broker's path: borrowed views of each PUBLISH, no copy, no
/// reference counting; the buffer is advanced once.
fn bench_peek(c: &mut Criterion) {
    let mut group = c.benchmark_group("peek_publish");
    for size in [16usize, 128, 1024] {
        let wire = publishes(size);
        group.throughput(Throughput::Elements(FRAMES as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &wire, |b, wire| {
            b.iter(|| {
                let (mut at, mut n) = (0, 0);
                while let Ok(Peek::Publish(p, len)) = peek(&wire[at..], 1 << 20) {
                    n += p.body.len();
                    at += len;
                }
                n
            })
        });
    }
    group.finish();
}

fn bench_encode(c: &mut Criterion) {
    let topic = Topic::new("bench.codec.topic").unwrap();
    let payload = Bytes::from(vec![0xabu8; 16]);
    let headers = Headers::new();
    let mut group = c.benchmark_group("encode_16B");
    group.throughput(Throughput::Elements(FRAMES as u64));
    let mut buf = BytesMut::with_capacity(64 * FRAMES);
    group.bench_function("publish", |b| {
        b.iter(|| {
            buf.clear();
            for seq in 0..FRAMES as u64 {
                encode_publish(&mut buf, seq, false, &topic, None, &headers, &payload);
            }
            buf.len()
        })
    });
    let body = MessageBody::new(&topic, None, &headers, &payload);
    group.bench_function("deliver", |b| {
        b.iter(|| {
            buf.clear();
            for sid in 0..FRAMES as u32 {
                encode_deliver(&mut buf, sid, Some(sid as u64), &body);
            }
            buf.len()
        })
    });
    group.finish();
}

criterion_group!(benches, bench_decode, bench_peek, bench_encode);
criterion_main!(benches);
