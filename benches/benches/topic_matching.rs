//! Topic matching: a pattern against a topic, and routing through the
//! broker's subscription index with exact and wildcard subscribers.
//!
//! `cargo bench -p kaelix-bench --bench topic_matching`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kaelix_broker::MessageBroker;
use kaelix_core::{Message, MessageBatch, Topic, TopicPattern};

fn bench_pattern(c: &mut Criterion) {
    let topic = Topic::new("events.eu.user.signup").unwrap();
    let mut group = c.benchmark_group("pattern_matches");
    for pattern in [
        "events.eu.user.signup",
        "events.*.user.signup",
        "events.>",
        "other.>",
    ] {
        let p = TopicPattern::new(pattern).unwrap();
        group.bench_function(pattern, |b| b.iter(|| p.matches(&topic)));
    }
    group.finish();
}

/// Routes a batch of 1000 messages over 100 distinct topics through a broker
/// holding `subs` subscriptions (a third of them wildcards), none of which
/// buffer more than a batch.
fn bench_route(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("route_batch_1000");
    group.throughput(Throughput::Elements(1000));
    for subs in [10usize, 1_000, 100_000] {
        let broker = MessageBroker::new();
        runtime.block_on(broker.start()).unwrap();
        let topics: Vec<Topic> = (0..100)
            .map(|i| Topic::new(format!("t{i}.x")).unwrap())
            .collect();
        // Receivers that get messages are drained each round; the rest only
        // make the index larger.
        let (mut hot, mut cold) = (Vec::new(), Vec::new());
        for i in 0..subs {
            let pattern = match i % 3 {
                0 => format!("t{}.*", i % 1000),
                _ => format!("t{}.x", i),
            };
            let p = TopicPattern::new(&pattern).unwrap();
            let receiver = runtime.block_on(broker.subscribe(&p)).unwrap();
            if topics.iter().any(|t| p.matches(t)) {
                hot.push(receiver);
            } else {
                cold.push(receiver);
            }
        }
        let batch: MessageBatch = (0..1000)
            .map(|i| Message::new(topics[i % 100].clone(), &b"0123456789abcdef"[..]).unwrap())
            .collect();
        group.bench_with_input(BenchmarkId::from_parameter(subs), &batch, |b, batch| {
            b.iter(|| {
                runtime
                    .block_on(broker.publish_batch(batch.clone()))
                    .unwrap();
                for r in &mut hot {
                    while r.try_recv().is_some() {}
                }
            })
        });
        drop(cold);
    }
    group.finish();
}

/// Matching on a route-cache miss: 10,000 wildcard subscriptions
/// (`w.N.*`), messages to 10,000 distinct topics in turn, so that almost
/// every lookup walks the trie.
fn bench_wildcard_miss(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let broker = MessageBroker::new();
    runtime.block_on(broker.start()).unwrap();
    let mut receivers = Vec::new();
    for i in 0..10_000 {
        receivers.push(
            runtime
                .block_on(broker.subscribe(format!("w.{i}.*").as_str()))
                .unwrap(),
        );
    }
    let topics: Vec<Topic> = (0..10_000)
        .map(|i| Topic::new(format!("w.{i}.x")).unwrap())
        .collect();
    let mut group = c.benchmark_group("match_wildcard_among_10000");
    group.throughput(Throughput::Elements(1000));
    let mut at = 0;
    group.bench_function("cache_miss_1000_msgs", |b| {
        b.iter(|| {
            let batch: MessageBatch = (0..1000)
                .map(|k| {
                    Message::new(topics[(at + k * 7) % topics.len()].clone(), &b"x"[..]).unwrap()
                })
                .collect();
            at += 1;
            runtime.block_on(broker.publish_batch(batch)).unwrap();
            for r in &mut receivers {
                while r.try_recv().is_some() {}
            }
        })
    });
    group.finish();
}

/// One topic with 100 in-process subscribers: each message is delivered
/// 100 times.
fn bench_fanout_100(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let broker = MessageBroker::new();
    runtime.block_on(broker.start()).unwrap();
    let topic = Topic::new("fan.out").unwrap();
    let mut receivers: Vec<_> = (0..100)
        .map(|_| runtime.block_on(broker.subscribe(&topic)).unwrap())
        .collect();
    let batch: MessageBatch = (0..1000)
        .map(|_| Message::new(topic.clone(), &b"0123456789abcdef"[..]).unwrap())
        .collect();
    let mut group = c.benchmark_group("router_fanout_100");
    group.throughput(Throughput::Elements(100 * 1000));
    group.bench_function("deliveries", |b| {
        b.iter(|| {
            runtime
                .block_on(broker.publish_batch(batch.clone()))
                .unwrap();
            for r in &mut receivers {
                while r.try_recv().is_some() {}
            }
        })
    });
    group.finish();
}

criterion_group!(
    benches,
    bench_pattern,
    bench_route,
    bench_wildcard_miss,
    bench_fanout_100
);
criterion_main!(benches);
