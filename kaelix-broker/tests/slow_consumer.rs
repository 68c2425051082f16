//! Slow consumers: each policy under a subscriber that stops reading, while
//! a fast subscriber of the same topic keeps full, in-order delivery.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{rss_of, BrokerProcess, RawClient};
use kaelix_broker::MessageBroker;
use kaelix_consumer::{Consumer, Subscription};
use kaelix_core::config::TopicConfig;
use kaelix_core::protocol::{ErrorCode, Frame, Subscribe};
use kaelix_core::{
    CloseReason, Error, MemoryStreamerConfig, Message, SlowConsumerPolicy, StartPosition,
    SubscribeOptions, Topic,
};
use kaelix_publisher::Publisher;

const PAYLOAD: usize = 1024;

/// A broker whose connections may have 256 KiB pending, with `extra`
/// configuration appended.
fn broker(extra: &str) -> (tempfile::TempDir, BrokerProcess) {
    BrokerProcess::with_config(&format!("[limits]\nmax_pending_bytes = 262144\n{extra}"))
}

fn payload(i: u64) -> Vec<u8> {
    let mut p = vec![0u8; PAYLOAD];
    p[..8].copy_from_slice(&i.to_be_bytes());
    p
}

fn seq(payload: &[u8]) -> u64 {
    u64::from_be_bytes(payload[..8].try_into().unwrap())
}

/// A raw subscriber with a tiny receive buffer that will not read until
/// told to.
async fn stalled_subscriber(
    addr: &str,
    topic: &str,
    policy: Option<SlowConsumerPolicy>,
) -> RawClient {
    let mut raw = RawClient::handshake_small(addr).await;
    raw.send(&Frame::Subscribe(Subscribe {
        sid: 1,
        pattern: topic.to_string().into(),
        group: None,
        start: StartPosition::Latest,
        policy,
        ..Default::default()
    }))
    .await;
    assert_eq!(raw.next().await, Some(Frame::SubAck(1)));
    raw
}

/// A subscriber that keeps up, and never loses a message: under `block`
/// it holds the publisher back rather than being dropped or cut off.
async fn fast_subscriber(addr: &str, topic: &str) -> Subscription {
    let consumer = Consumer::connect(addr).await.unwrap();
    let options = SubscribeOptions::new().slow_consumer(SlowConsumerPolicy::Block);
    let sub = consumer.subscribe_with(topic, options).await.unwrap();
    // The consumer lives as long as the subscription's task needs it.
    std::mem::forget(consumer);
    sub
}

/// Reads `n` messages and checks they are 0..n in order, offsets included.
fn read_all(mut sub: Subscription, n: u64) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for i in 0..n {
            let m = tokio::time::timeout(Duration::from_secs(30), sub.recv())
                .await
                .expect("the fast subscriber keeps receiving")
                .unwrap();
            assert_eq!(seq(&m.payload), i, "the fast subscriber lost or reordered");
            assert_eq!(m.offset.map(|o| o.get()), Some(i));
        }
    })
}

/// Publishes `n` numbered messages; `sent` counts those handed over.
fn publish(addr: &str, topic: &str, n: u64, sent: Arc<AtomicU64>) -> tokio::task::JoinHandle<()> {
    let (addr, topic) = (addr.to_string(), topic.to_string());
    tokio::spawn(async move {
        let publisher = Publisher::connect(addr.as_str()).await.unwrap();
        for i in 0..n {
            publisher.send(&topic, payload(i)).await.unwrap();
            sent.store(i + 1, Ordering::Relaxed);
        }
        publisher.flush().await.unwrap();
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_oldest_tells_the_slow_subscriber_exactly_what_it_missed() {
    // The topic disconnects by default; the slow subscription chooses
    // drop_oldest for itself.
    let (_dir, broker) = broker("");
    let addr = broker.addr();
    const N: u64 = 20_000;
    let mut slow =
        stalled_subscriber(&addr, "slow.drop", Some(SlowConsumerPolicy::DropOldest)).await;
    let fast = read_all(fast_subscriber(&addr, "slow.drop").await, N);
    publish(&addr, "slow.drop", N, Arc::default())
        .await
        .unwrap();
    fast.await.unwrap();

    // Every offset arrives once, in order, or is named by a MISSED notice
    // that comes where the gap is.
    let mut next = 0u64;
    let mut missed = 0u64;
    while next < N {
        match slow.next().await {
            Some(Frame::Message(m)) => {
                assert_eq!(m.offset, Some(next), "a gap without a notice");
                next += 1;
            }
            Some(Frame::Missed(notice)) => {
                let range = notice.range.expect("a dropped range");
                assert_eq!(&range.topic[..], b"slow.drop");
                assert_eq!(range.first, next, "the notice is where the gap is");
                assert_eq!(notice.count, range.last - range.first + 1);
                missed += notice.count;
                next = range.last + 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(missed > 0, "the slow subscriber was never behind");
    let line = broker.wait_for_log(&["dropped its oldest messages"], Duration::from_secs(5));
    assert!(line.contains("raw-test") && line.contains("conn"), "{line}");
    let stats = Publisher::connect(addr.as_str())
        .await
        .unwrap()
        .server_stats()
        .await
        .unwrap();
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(stats["slow_consumer_drops"].as_u64(), Some(missed));
    assert_eq!(stats["slow_consumers"].as_u64(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_holds_the_publisher_back_in_bounded_memory_and_loses_nothing() {
    // The topic's policy, from its [[topics]] entry; publishers wait for
    // as long as it takes.
    let (_dir, broker) = broker(
        "slow_consumer_block_ms = 0\n\n\
         [[topics]]\npattern = \"slow.>\"\nslow_consumer = \"block\"\n",
    );
    let addr = broker.addr();
    let pid = broker.child.id();
    const N: u64 = 100_000; // 100 MiB of payload
    let mut slow = stalled_subscriber(&addr, "slow.block", None).await;
    let fast = read_all(fast_subscriber(&addr, "slow.block").await, N);
    let before = rss_of(pid);
    let sent = Arc::new(AtomicU64::new(0));
    let publishing = publish(&addr, "slow.block", N, sent.clone());

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let stalled_at = sent.load(Ordering::Relaxed);
    let mut peak = 0;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(rss_of(pid));
    }
    let still_at = sent.load(Ordering::Relaxed);
    assert!(
        still_at < N / 4,
        "the publisher was not held back: {still_at} sent"
    );
    assert!(
        still_at - stalled_at < N / 100,
        "the publisher kept going: {stalled_at} then {still_at}"
    );
    let grown = peak.saturating_sub(before);
    assert!(
        grown < 40 << 20,
        "the broker buffered instead of pushing back: RSS grew by {grown} bytes"
    );

    // Once the slow subscriber reads, everything flows, in order, complete.
    for i in 0..N {
        match slow.next().await {
            Some(Frame::Message(m)) => assert_eq!(m.offset, Some(i)),
            other => panic!("expected message {i}, got {other:?}"),
        }
    }
    publishing.await.unwrap();
    fast.await.unwrap();
    println!(
        "block: publisher held at {still_at} of {N} messages; broker RSS {} MiB before, \
         peak {} MiB while held",
        before >> 20,
        peak >> 20
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_cuts_off_only_the_slow_subscriber() {
    let (_dir, broker) = broker("");
    let addr = broker.addr();
    const N: u64 = 20_000;
    let mut slow = stalled_subscriber(&addr, "slow.cut", None).await;
    let fast = read_all(fast_subscriber(&addr, "slow.cut").await, N);
    publish(&addr, "slow.cut", N, Arc::default()).await.unwrap();
    fast.await.unwrap();

    // What was sent before the cut arrives in order, then the reason.
    let mut next = 0;
    loop {
        match slow.next().await {
            Some(Frame::Message(m)) => {
                assert_eq!(m.offset, Some(next));
                next += 1;
            }
            Some(Frame::Error(e)) => {
                assert_eq!(e.code, ErrorCode::SlowConsumer);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(next < N);
    assert_eq!(slow.next().await, None, "the connection closes");
    let line = broker.wait_for_log(&["slow consumer disconnected"], Duration::from_secs(5));
    assert!(line.contains("raw-test"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_subscriber_that_never_reads_is_disconnected_after_the_wait() {
    let (_dir, broker) = broker(
        "slow_consumer_block_ms = 300\n\n\
         [[topics]]\npattern = \"slow.>\"\nslow_consumer = \"block\"\n",
    );
    let addr = broker.addr();
    const N: u64 = 20_000;
    let mut slow = stalled_subscriber(&addr, "slow.stuck", None).await;
    let started = std::time::Instant::now();
    publish(&addr, "slow.stuck", N, Arc::default())
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(20));
    let line = broker.wait_for_log(&["slow_consumer_block_ms"], Duration::from_secs(5));
    assert!(line.contains("raw-test"), "{line}");
    loop {
        match slow.next().await {
            Some(Frame::Message(_)) => {}
            Some(Frame::Error(e)) => {
                assert_eq!(e.code, ErrorCode::SlowConsumer);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

// In process: the same policies on a receiver's queue.

fn local_broker(policy: SlowConsumerPolicy) -> MessageBroker {
    let mut config = MemoryStreamerConfig {
        topics: vec![TopicConfig {
            pattern: "local.>".into(),
            slow_consumer: policy,
            ..TopicConfig::default()
        }],
        ..MemoryStreamerConfig::default()
    };
    config.limits.max_pending_messages = 10;
    MessageBroker::with_config(config)
}

async fn publish_local(broker: &MessageBroker, topic: &str, i: u64) {
    let topic = Topic::new(topic).unwrap();
    let message = Message::new(topic.clone(), i.to_be_bytes().to_vec()).unwrap();
    broker.publish(&topic, message).await.unwrap();
}

#[tokio::test]
async fn in_process_policies_drop_block_and_disconnect() {
    // drop_oldest: the newest 10 stay, the rest are named as one gap.
    let broker = local_broker(SlowConsumerPolicy::DropOldest);
    broker.start().await.unwrap();
    let mut receiver = broker.subscribe("local.a").await.unwrap();
    for i in 0..100 {
        publish_local(&broker, "local.a", i).await;
    }
    assert_eq!(receiver.missed(), 90);
    let gaps = receiver.take_gaps();
    assert_eq!(gaps.len(), 1);
    assert_eq!(
        (gaps[0].first.get(), gaps[0].last.get(), gaps[0].count),
        (0, 89, 90)
    );
    for i in 90..100 {
        assert_eq!(receiver.recv().await.unwrap().offset.unwrap().get(), i);
    }
    assert_eq!(broker.stats().slow_consumer_drops, 90);

    // block: the publisher waits until the receiver makes room.
    let broker = local_broker(SlowConsumerPolicy::Block);
    broker.start().await.unwrap();
    let mut receiver = broker.subscribe("local.b").await.unwrap();
    let publisher = {
        let broker = broker.clone();
        tokio::spawn(async move {
            for i in 0..100 {
                publish_local(&broker, "local.b", i).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!publisher.is_finished(), "the publisher did not wait");
    for i in 0..100 {
        let m = tokio::time::timeout(Duration::from_secs(5), receiver.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(m.offset.unwrap().get(), i);
    }
    publisher.await.unwrap();
    assert!(broker.stats().slow_consumer_waits > 0);

    // disconnect (the default), and a subscription's own policy over it.
    let broker = local_broker(SlowConsumerPolicy::Disconnect);
    broker.start().await.unwrap();
    let mut cut = broker.subscribe("local.c").await.unwrap();
    let options = SubscribeOptions::new().slow_consumer(SlowConsumerPolicy::DropOldest);
    let mut kept = broker.subscribe_with("local.c", options).await.unwrap();
    for i in 0..20 {
        publish_local(&broker, "local.c", i).await;
    }
    for _ in 0..10 {
        cut.recv().await.unwrap();
    }
    assert!(matches!(
        cut.recv().await,
        Err(Error::Closed(CloseReason::SlowConsumer))
    ));
    assert_eq!(kept.missed(), 10);
    assert_eq!(kept.recv().await.unwrap().offset.unwrap().get(), 10);
}

#[tokio::test]
async fn a_reload_changes_the_policy_of_existing_topics() {
    let broker = local_broker(SlowConsumerPolicy::Disconnect);
    broker.start().await.unwrap();
    let mut receiver = broker.subscribe("local.live").await.unwrap();
    publish_local(&broker, "local.live", 0).await;
    receiver.recv().await.unwrap();

    let mut config = broker.config().as_ref().clone();
    config.topics[0].slow_consumer = SlowConsumerPolicy::DropOldest;
    let done = broker.reconfigure(&config);
    assert_eq!(done.applied, ["topics"]);
    for i in 1..=30 {
        publish_local(&broker, "local.live", i).await;
    }
    // Not disconnected: the oldest were dropped instead.
    assert_eq!(receiver.missed(), 20);
    assert_eq!(receiver.recv().await.unwrap().offset.unwrap().get(), 21);
}
