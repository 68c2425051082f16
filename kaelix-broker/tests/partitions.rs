//! Partitioned topics through the real broker process and client crates:
//! order per partition under several publishers, keys, named partitions
//! and their refusal, partition filters, replay per partition, and
//! partition-sticky queue groups.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{BrokerProcess, RawClient};
use kaelix_consumer::{Consumer, Subscription};
use kaelix_core::protocol::{ErrorCode, Frame, Subscribe};
use kaelix_core::{Error, Message, PartitionId, StartPosition, SubscribeOptions};
use kaelix_publisher::Publisher;

/// A broker whose `orders.*` topics have four partitions.
fn broker() -> (tempfile::TempDir, BrokerProcess) {
    BrokerProcess::with_config(
        "[[topics]]\npattern = \"orders.*\"\npartitions = 4\nretain_messages = 100000\n",
    )
}

async fn recv(sub: &mut Subscription) -> Message {
    tokio::time::timeout(Duration::from_secs(10), sub.recv())
        .await
        .expect("a message within 10 s")
        .expect("the subscription is open")
}

async fn nothing_more(sub: &mut Subscription) {
    let extra = tokio::time::timeout(Duration::from_millis(200), sub.recv()).await;
    assert!(extra.is_err(), "an unexpected message: {extra:?}");
}

fn place(m: &Message) -> (u32, u64) {
    (
        m.partition
            .expect("a partitioned topic's messages carry it")
            .get(),
        m.offset.expect("and an offset").get(),
    )
}

/// Payload: publisher, key index, sequence number of that pair.
fn payload(publisher: u8, key: u8, seq: u32) -> Vec<u8> {
    let mut p = vec![publisher, key];
    p.extend_from_slice(&seq.to_be_bytes());
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_holds_per_partition_and_per_key_under_several_publishers() {
    let (_dir, broker) = broker();
    let addr = broker.addr();
    const PUBLISHERS: u8 = 3;
    const KEYS: u8 = 8;
    const PER_KEY: u32 = 250;
    let consumer = Consumer::connect(&addr).await.unwrap();
    let mut all = consumer.subscribe("orders.placed").await.unwrap();

    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let addr = addr.clone();
            tokio::spawn(async move {
                let publisher = Publisher::connect(&addr).await.unwrap();
                // Keys interleaved, fire-and-forget: runs of one partition
                // are short, and batches mix all of them.
                for seq in 0..PER_KEY {
                    for key in 0..KEYS {
                        let message = Message::builder()
                            .topic("orders.placed")
                            .key(format!("customer-{key}"))
                            .payload(payload(p, key, seq))
                            .build()
                            .unwrap();
                        publisher.send_message(&message).await.unwrap();
                    }
                }
                publisher.flush().await.unwrap();
            })
        })
        .collect();
    for p in publishers {
        p.await.unwrap();
    }

    let total = u32::from(PUBLISHERS) * u32::from(KEYS) * PER_KEY;
    let mut next_offset = [0u64; 4];
    let mut next_seq: HashMap<(u8, u8), u32> = HashMap::new();
    for _ in 0..total {
        let m = recv(&mut all).await;
        let (partition, offset) = place(&m);
        // Each partition's offsets run from 0 with no gap or repeat.
        assert_eq!(
            offset, next_offset[partition as usize],
            "partition {partition}"
        );
        next_offset[partition as usize] += 1;
        // A key always lands in the partition its hash names.
        let key = m.key().expect("the key travels with the message");
        assert_eq!(PartitionId::for_key(key.as_bytes(), 4).get(), partition);
        // And each publisher's messages of one key arrive in order.
        let (p, k) = (m.payload[0], m.payload[1]);
        let seq = u32::from_be_bytes(m.payload[2..6].try_into().unwrap());
        let expected = next_seq.entry((p, k)).or_insert(0);
        assert_eq!(seq, *expected, "publisher {p} key {k}");
        *expected += 1;
    }
    nothing_more(&mut all).await;
    assert_eq!(next_offset.iter().sum::<u64>(), u64::from(total));
    // Eight keys over four partitions: every partition got some.
    assert!(next_offset.iter().all(|&n| n > 0), "{next_offset:?}");
}

#[tokio::test]
async fn messages_without_key_or_partition_are_spread_over_the_partitions() {
    let (_dir, broker) = broker();
    let consumer = Consumer::connect(broker.addr()).await.unwrap();
    let mut sub = consumer.subscribe("orders.spread").await.unwrap();
    let publisher = Publisher::connect(broker.addr()).await.unwrap();
    // Each acknowledged publish is a batch of its own: the broker moves on
    // to the next partition for each.
    for i in 0..40u32 {
        publisher
            .publish("orders.spread", i.to_be_bytes().to_vec())
            .await
            .unwrap();
    }
    let mut per_partition = [0u32; 4];
    for _ in 0..40 {
        per_partition[place(&recv(&mut sub).await).0 as usize] += 1;
    }
    assert_eq!(per_partition, [10, 10, 10, 10]);
}

#[tokio::test]
async fn named_partitions_filters_and_replay_per_partition() {
    let (_dir, broker) = broker();
    let addr = broker.addr();
    let consumer = Consumer::connect(&addr).await.unwrap();
    let only =
        |ps: &[u32]| SubscribeOptions::new().partitions(ps.iter().map(|&p| PartitionId::new(p)));
    let mut two = consumer
        .subscribe_with("orders.*", only(&[2]))
        .await
        .unwrap();
    let mut odd = consumer
        .subscribe_with("orders.*", only(&[1, 3]))
        .await
        .unwrap();
    let publisher = Publisher::connect(&addr).await.unwrap();
    for i in 0..12u32 {
        let message = Message::builder()
            .topic("orders.named")
            .partition(PartitionId::new(i % 4))
            .payload(i.to_be_bytes().to_vec())
            .build()
            .unwrap();
        publisher.publish_message(&message).await.unwrap();
    }
    for i in [2u32, 6, 10] {
        let m = recv(&mut two).await;
        assert_eq!(place(&m), (2, u64::from(i / 4)));
        assert_eq!(m.payload[..], i.to_be_bytes());
    }
    nothing_more(&mut two).await;
    let mut odd_got = Vec::new();
    for _ in 0..6 {
        odd_got.push(place(&recv(&mut odd).await));
    }
    assert_eq!(
        odd_got,
        [(1, 0), (3, 0), (1, 1), (3, 1), (1, 2), (3, 2)],
        "partitions 1 and 3, each in offset order"
    );
    nothing_more(&mut odd).await;

    // A partition the topic does not have is refused with a reason, and
    // the connection carries on.
    let beyond = Message::builder()
        .topic("orders.named")
        .partition(PartitionId::new(4))
        .payload("x")
        .build()
        .unwrap();
    match publisher.publish_message(&beyond).await {
        Err(Error::Refused { code, reason }) => {
            assert_eq!(code, ErrorCode::UnknownPartition);
            assert!(reason.contains("orders.named has 4 partitions"), "{reason}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    publisher.publish("orders.named", "after").await.unwrap();

    // A replay of one partition: its retained messages, in offset order.
    let mut replay = consumer
        .subscribe_with("orders.named", only(&[2]).start(StartPosition::Earliest))
        .await
        .unwrap();
    for offset in 0..3 {
        assert_eq!(place(&recv(&mut replay).await), (2, offset));
    }
    // A subscription cannot name a partition no topic can have.
    let err = consumer
        .subscribe_with("orders.*", only(&[PartitionId::MAX_PARTITIONS]))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidPartition(_)), "{err}");
}

#[tokio::test]
async fn the_broker_refuses_partition_requests_that_make_no_sense() {
    let (_dir, broker) = broker();
    let mut raw = RawClient::handshake(&broker.addr()).await;
    raw.send(&Frame::Subscribe(Subscribe {
        sid: 1,
        pattern: "orders.*".into(),
        partitions: vec![0, PartitionId::MAX_PARTITIONS],
        ..Default::default()
    }))
    .await;
    match raw.next().await {
        Some(Frame::SubNack(nack)) => {
            assert_eq!((nack.id, nack.code), (1, ErrorCode::UnknownPartition));
            assert!(
                nack.reason.contains("at most 1024 partitions"),
                "{}",
                nack.reason
            );
        }
        other => panic!("expected SUB_NACK, got {other:?}"),
    }
    raw.send(&Frame::Subscribe(Subscribe {
        sid: 2,
        pattern: "orders.*".into(),
        group: Some("g".into()),
        partitions: vec![1],
        ..Default::default()
    }))
    .await;
    match raw.next().await {
        Some(Frame::SubNack(nack)) => assert_eq!(nack.code, ErrorCode::InvalidGroup),
        other => panic!("expected SUB_NACK, got {other:?}"),
    }
    // The connection is still served.
    raw.send(&Frame::Subscribe(Subscribe {
        sid: 3,
        pattern: "orders.*".into(),
        partitions: vec![3],
        ..Default::default()
    }))
    .await;
    assert_eq!(raw.next().await, Some(Frame::SubAck(3)));
}

#[tokio::test]
async fn an_unpartitioned_topic_takes_partition_zero_and_refuses_others() {
    let (_dir, broker) = broker();
    let consumer = Consumer::connect(broker.addr()).await.unwrap();
    let mut sub = consumer.subscribe("plain.topic").await.unwrap();
    let publisher = Publisher::connect(broker.addr()).await.unwrap();
    let zero = Message::builder()
        .topic("plain.topic")
        .partition(PartitionId::new(0))
        .key("ignored-with-one-partition")
        .payload("a")
        .build()
        .unwrap();
    publisher.publish_message(&zero).await.unwrap();
    let m = recv(&mut sub).await;
    assert_eq!(m.offset.map(|o| o.get()), Some(0));
    assert_eq!(
        m.partition,
        Some(PartitionId::new(0)),
        "as the publisher named it"
    );
    let one = Message::builder()
        .topic("plain.topic")
        .partition(PartitionId::new(1))
        .build()
        .unwrap();
    let err = publisher.publish_message(&one).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("plain.topic has 1 partition (0..=0)"),
        "{err}"
    );
    // An unkeyed message on an unpartitioned topic carries no partition.
    publisher.publish("plain.topic", "b").await.unwrap();
    assert_eq!(recv(&mut sub).await.partition, None);
}

#[tokio::test]
async fn a_sticky_queue_group_gives_each_partition_to_one_member_in_order() {
    let (_dir, broker) = broker();
    let addr = broker.addr();
    let sticky = SubscribeOptions::new()
        .queue_group("billing")
        .sticky_partitions();
    let first = Consumer::connect(&addr).await.unwrap();
    let mut a = first
        .subscribe_with("orders.sticky", sticky.clone())
        .await
        .unwrap();
    let second = Consumer::connect(&addr).await.unwrap();
    let mut b = second
        .subscribe_with("orders.sticky", sticky)
        .await
        .unwrap();
    let publisher = Publisher::connect(&addr).await.unwrap();
    const N: u32 = 400;
    for i in 0..N {
        let message = Message::builder()
            .topic("orders.sticky")
            .key(format!("k{}", i % 16))
            .payload(i.to_be_bytes().to_vec())
            .build()
            .unwrap();
        publisher.send_message(&message).await.unwrap();
    }
    publisher.flush().await.unwrap();

    let mut owner: HashMap<u32, char> = HashMap::new();
    let mut next = [0u64; 4];
    let mut got = 0;
    for (name, sub) in [('a', &mut a), ('b', &mut b)] {
        while let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(500), sub.recv()).await {
            let (p, offset) = place(&m);
            assert_eq!(*owner.entry(p).or_insert(name), name, "partition {p} split");
            assert_eq!(offset, next[p as usize], "partition {p} out of order");
            next[p as usize] += 1;
            got += 1;
        }
    }
    assert_eq!(got, N, "each message once");
    // Partition p to member p % 2, members in joining order.
    assert_eq!(
        (0..4).map(|p| owner[&p]).collect::<String>(),
        "abab",
        "{owner:?}"
    );

    // Naming partitions in a group, or sticky outside one, is refused.
    let err = first
        .subscribe_with(
            "orders.sticky",
            SubscribeOptions::new()
                .queue_group("billing")
                .partitions([PartitionId::new(1)]),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidGroup { .. }), "{err}");
    let err = first
        .subscribe_with("orders.sticky", SubscribeOptions::new().sticky_partitions())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidPartition(_)), "{err}");
}

#[tokio::test]
async fn in_process_partitions_grow_by_reload_and_a_bad_batch_routes_nothing() {
    use kaelix_broker::MessageBroker;
    use kaelix_core::{MessageBatch, Topic};
    let mut config = kaelix_core::MemoryStreamerConfig::default();
    config.topics.push(kaelix_core::config::TopicConfig {
        pattern: "grow.>".into(),
        partitions: 2,
        ..Default::default()
    });
    let broker = MessageBroker::with_config(config.clone());
    broker.start().await.unwrap();
    let topic = Topic::new("grow.a").unwrap();
    let mut receiver = broker.subscribe(&topic).await.unwrap();
    let keyed = |key: &str| {
        Message::builder()
            .topic("grow.a")
            .key(key)
            .payload(key.to_string())
            .build()
            .unwrap()
    };
    broker.publish(&topic, keyed("k1")).await.unwrap();
    let m = receiver.recv().await.unwrap();
    let p = PartitionId::for_key(b"k1", 2);
    assert_eq!((m.partition, m.offset.map(|o| o.get())), (Some(p), Some(0)));
    let info = broker.partition_info(&topic, p).unwrap();
    assert_eq!(
        (info.partitions, info.next_offset, info.retained_messages),
        (2, 1, 1)
    );
    assert!(broker.partition_info(&topic, PartitionId::new(2)).is_none());

    let named = |p: u32| {
        Message::builder()
            .topic("grow.a")
            .partition(PartitionId::new(p))
            .payload("n")
            .build()
            .unwrap()
    };
    // All or nothing: a batch naming a partition the topic lacks routes none.
    let batch = MessageBatch::new(vec![named(0), named(3)]);
    let err = broker.publish_batch(batch).await.unwrap_err();
    assert!(matches!(err, Error::InvalidPartition(_)), "{err}");
    assert!(receiver.try_recv().is_none());

    // A reload adds partitions to the live topic; its offsets go on.
    config.topics[0].partitions = 4;
    broker.reconfigure(&config);
    broker.publish(&topic, named(3)).await.unwrap();
    let m = receiver.recv().await.unwrap();
    assert_eq!(
        (m.partition, m.offset.map(|o| o.get())),
        (Some(PartitionId::new(3)), Some(0))
    );
    let info = broker.partition_info(&topic, p).unwrap();
    assert_eq!(
        (info.partitions, info.next_offset),
        (4, 1),
        "kept across the reload"
    );
    // Fewer is not applied to a live topic: its partitions stay.
    config.topics[0].partitions = 1;
    broker.reconfigure(&config);
    broker.publish(&topic, named(3)).await.unwrap();
    assert_eq!(
        receiver.recv().await.unwrap().offset.map(|o| o.get()),
        Some(1)
    );
    broker.shutdown().await.unwrap();
}
