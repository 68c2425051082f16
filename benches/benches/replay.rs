//! Replay throughput: how fast a subscription that starts at `earliest`
//! reads a topic's retained window, in process and over TCP through the
//! client crate (broker and consumer in this process, on loopback).
//!
//! `cargo bench -p kaelix-bench --bench replay`

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kaelix_broker::{MessageBroker, Server};
use kaelix_consumer::Consumer;
use kaelix_core::config::TopicConfig;
use kaelix_core::{MemoryStreamerConfig, Message, MessageBatch, StartPosition, Topic};

/// Messages in the retained window.
const WINDOW: usize = 100_000;

fn broker_with_window(rt: &tokio::runtime::Runtime, size: usize) -> (MessageBroker, String) {
    let mut config = MemoryStreamerConfig {
        topics: vec![TopicConfig {
            pattern: "replay.>".into(),
            retain_messages: WINDOW,
            retain_bytes: 1 << 30,
            ..TopicConfig::default()
        }],
        ..MemoryStreamerConfig::default()
    };
    config.retention.max_bytes = 1 << 30;
    config.limits.max_pending_messages = WINDOW * 2;
    config.limits.max_pending_bytes = 1 << 30;
    config.telemetry.metrics.enabled = false;
    rt.block_on(async {
        let broker = MessageBroker::with_config(config);
        broker.start().await.unwrap();
        let topic = Topic::new("replay.window").unwrap();
        let payload = bytes::Bytes::from(vec![0x5a; size]);
        for chunk in 0..WINDOW / 1000 {
            let batch: Vec<Message> = (0..1000)
                .map(|_| Message::new(topic.clone(), payload.clone()).unwrap())
                .collect();
            broker
                .publish_batch(MessageBatch::new(batch))
                .await
                .unwrap();
            let _ = chunk;
        }
        let addr = Server::spawn(&broker, "127.0.0.1:0").await.unwrap();
        (broker, addr.to_string())
    })
}

fn bench_replay(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("replay");
    group.sample_size(10);
    group.throughput(Throughput::Elements(WINDOW as u64));
    for size in [16usize, 1024] {
        let (broker, addr) = broker_with_window(&rt, size);
        group.bench_function(BenchmarkId::new("in_process", size), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let started = Instant::now();
                        let mut receiver = broker
                            .subscribe_from("replay.window", StartPosition::Earliest)
                            .await
                            .unwrap();
                        for _ in 0..WINDOW {
                            receiver.recv().await.unwrap();
                        }
                        total += started.elapsed();
                    }
                    total
                })
            })
        });
        let consumer = rt.block_on(Consumer::connect(addr.as_str())).unwrap();
        group.bench_function(BenchmarkId::new("tcp", size), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let started = Instant::now();
                        let mut sub = consumer
                            .subscribe_from("replay.window", StartPosition::Earliest)
                            .await
                            .unwrap();
                        let mut n = 0;
                        while n < WINDOW {
                            n += sub.recv_batch(|_| {}).await.unwrap();
                        }
                        total += started.elapsed();
                        sub.unsubscribe().await.unwrap();
                    }
                    total
                })
            })
        });
        rt.block_on(broker.shutdown()).unwrap();
    }
    group.finish();
}

criterion_group!(benches, bench_replay);
criterion_main!(benches);
