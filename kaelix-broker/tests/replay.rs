//! Offsets, retention and replay through the in-process API.

use std::time::Duration;

use kaelix_broker::MessageBroker;
use kaelix_core::config::TopicConfig;
use kaelix_core::{MemoryStreamerConfig, Message, StartPosition, Timestamp, Topic};

fn broker_with(topics: Vec<TopicConfig>, max_bytes: usize) -> MessageBroker {
    let mut config = MemoryStreamerConfig {
        topics,
        ..MemoryStreamerConfig::default()
    };
    config.retention.max_bytes = max_bytes;
    MessageBroker::with_config(config)
}

async fn publish(broker: &MessageBroker, topic: &str, payload: impl Into<bytes::Bytes>) {
    let topic = Topic::new(topic).unwrap();
    broker
        .publish(&topic, Message::new(topic.clone(), payload.into()).unwrap())
        .await
        .unwrap();
}

fn offsets(messages: &[Message]) -> Vec<u64> {
    messages
        .iter()
        .map(|m| m.offset.expect("an offset").get())
        .collect()
}

async fn take(receiver: &mut kaelix_broker::Receiver, n: usize) -> Vec<Message> {
    let mut out = Vec::new();
    for _ in 0..n {
        let message = tokio::time::timeout(Duration::from_secs(5), receiver.recv())
            .await
            .expect("a message within 5 s")
            .unwrap();
        out.push(message);
    }
    out
}

#[tokio::test]
async fn a_late_subscriber_replays_then_continues_live() {
    let broker = MessageBroker::new();
    broker.start().await.unwrap();
    for i in 0..10u8 {
        publish(&broker, "replay.a", vec![i]).await;
    }
    let mut late = broker
        .subscribe_from("replay.a", StartPosition::Earliest)
        .await
        .unwrap();
    assert_eq!(late.missed(), 0);
    for i in 10..15u8 {
        publish(&broker, "replay.a", vec![i]).await;
    }
    let got = take(&mut late, 15).await;
    assert_eq!(offsets(&got), (0..15).collect::<Vec<_>>());
    assert!(got
        .iter()
        .enumerate()
        .all(|(i, m)| m.payload[..] == [i as u8]));
    assert!(late.try_recv().is_none(), "a duplicate at the seam");

    // Live subscribers see offsets too; `Latest` replays nothing.
    let mut live = broker.subscribe("replay.a").await.unwrap();
    publish(&broker, "replay.a", "x").await;
    assert_eq!(offsets(&take(&mut live, 1).await), [15]);
    let info = broker.topic_info(&Topic::new("replay.a").unwrap()).unwrap();
    assert_eq!((info.first_offset, info.next_offset), (0, 16));
    assert_eq!(info.retained_messages, 16);
}

#[tokio::test]
async fn start_positions_offset_last_and_time() {
    let broker = MessageBroker::new();
    broker.start().await.unwrap();
    for i in 0..5u8 {
        publish(&broker, "pos.a", vec![i]).await;
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let middle = Timestamp::now();
    for i in 5..10u8 {
        publish(&broker, "pos.a", vec![i]).await;
    }
    let mut from3 = broker
        .subscribe_from("pos.a", StartPosition::Offset(3))
        .await
        .unwrap();
    assert_eq!(
        offsets(&take(&mut from3, 7).await),
        (3..10).collect::<Vec<_>>()
    );
    let mut last2 = broker
        .subscribe_from("pos.a", StartPosition::Last(2))
        .await
        .unwrap();
    assert_eq!(offsets(&take(&mut last2, 2).await), [8, 9]);
    let mut since = broker
        .subscribe_from("pos.a", StartPosition::Time(middle))
        .await
        .unwrap();
    assert_eq!(
        offsets(&take(&mut since, 5).await),
        (5..10).collect::<Vec<_>>()
    );
    for receiver in [&mut from3, &mut last2, &mut since] {
        assert!(receiver.try_recv().is_none());
    }
}

#[tokio::test]
async fn retention_keeps_the_most_recent_by_count_and_says_what_was_missed() {
    let broker = broker_with(
        vec![TopicConfig {
            pattern: "small.>".into(),
            retain_messages: 5,
            ..TopicConfig::default()
        }],
        1 << 20,
    );
    broker.start().await.unwrap();
    for i in 0..20u8 {
        publish(&broker, "small.a", vec![i]).await;
        publish(&broker, "other.a", vec![i]).await;
    }
    let small = broker.topic_info(&Topic::new("small.a").unwrap()).unwrap();
    assert_eq!((small.first_offset, small.next_offset), (15, 20));
    assert_eq!(small.retained_messages, 5);
    // Topics without an entry keep the default 1000.
    let other = broker.topic_info(&Topic::new("other.a").unwrap()).unwrap();
    assert_eq!(other.retained_messages, 20);

    let mut from2 = broker
        .subscribe_from("small.a", StartPosition::Offset(2))
        .await
        .unwrap();
    assert_eq!(from2.missed(), 13);
    assert_eq!(
        offsets(&take(&mut from2, 5).await),
        (15..20).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn retention_is_bounded_by_topic_bytes_and_by_the_broker_cap() {
    // 100 KiB per topic, 250 KiB for the whole broker, 10 KiB messages.
    let broker = broker_with(
        vec![TopicConfig {
            pattern: ">".into(),
            retain_messages: 1000,
            retain_bytes: 100 * 1024,
            retain_age_secs: 0,
            ..TopicConfig::default()
        }],
        250 * 1024,
    );
    broker.start().await.unwrap();
    let payload = vec![7u8; 10 * 1024];
    for topic in ["cap.a", "cap.b", "cap.c", "cap.d"] {
        for _ in 0..50 {
            publish(&broker, topic, payload.clone()).await;
        }
    }
    let mut total = 0;
    for topic in ["cap.a", "cap.b", "cap.c", "cap.d"] {
        let info = broker.topic_info(&Topic::new(topic).unwrap()).unwrap();
        assert!(info.retained_bytes <= 100 * 1024, "{topic}: {info:?}");
        assert_eq!(info.next_offset, 50);
        total += info.retained_bytes;
    }
    assert!(total <= 250 * 1024, "{total} retained");
    assert_eq!(broker.stats().retained_bytes as usize, total);
    // The topic written last found the budget taken; within a
    // housekeeping round the others give back their excess over an even
    // share, and it retains again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for _ in 0..3 {
        publish(&broker, "cap.d", payload.clone()).await;
    }
    let d = broker.topic_info(&Topic::new("cap.d").unwrap()).unwrap();
    assert_eq!(d.retained_messages, 3, "{d:?}");
    assert_eq!(d.first_offset, 50);
    assert!(broker.stats().retained_bytes <= 250 * 1024);
}

#[tokio::test]
async fn retention_by_age() {
    let broker = broker_with(
        vec![TopicConfig {
            pattern: "aged.>".into(),
            retain_age_secs: 1,
            ..TopicConfig::default()
        }],
        1 << 20,
    );
    broker.start().await.unwrap();
    publish(&broker, "aged.a", "old").await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    publish(&broker, "aged.a", "new").await;
    let mut all = broker
        .subscribe_from("aged.a", StartPosition::Earliest)
        .await
        .unwrap();
    let got = take(&mut all, 1).await;
    assert_eq!(got[0].payload, "new");
    assert_eq!(offsets(&got), [1]);
    // Housekeeping drops what ages out even when nothing is published.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let info = broker.topic_info(&Topic::new("aged.a").unwrap());
    assert!(info.is_none_or(|i| i.retained_messages == 0), "{info:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_gap_and_no_duplicate_at_the_seam_under_concurrent_publishing() {
    let broker = MessageBroker::new();
    broker.start().await.unwrap();
    const N: u64 = 20_000;
    let publisher = {
        let broker = broker.clone();
        tokio::spawn(async move {
            let topic = Topic::new("seam.t").unwrap();
            for i in 0..N {
                let message = Message::new(topic.clone(), i.to_be_bytes().to_vec()).unwrap();
                broker.publish(&topic, message).await.unwrap();
                if i % 512 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    // Subscribe while the publisher runs, from the last 500 held.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let mut receiver = broker
        .subscribe_from("seam.t", StartPosition::Last(500))
        .await
        .unwrap();
    publisher.await.unwrap();
    let mut expected = None;
    let mut count = 0;
    while let Some(message) = receiver.try_recv() {
        let offset = message.offset.unwrap().get();
        let value = u64::from_be_bytes(message.payload[..].try_into().unwrap());
        assert_eq!(offset, value, "offset and content agree");
        if let Some(expected) = expected {
            assert_eq!(offset, expected, "gap or duplicate at {offset}");
        }
        expected = Some(offset + 1);
        count += 1;
    }
    assert_eq!(expected, Some(N), "the last message arrived");
    assert!(count >= 500.min(N) as usize, "{count} received");
}

#[tokio::test]
async fn a_wildcard_subscription_replays_every_matching_topic_in_order() {
    let broker = MessageBroker::new();
    broker.start().await.unwrap();
    for i in 0..3u8 {
        publish(&broker, "wild.a", vec![i]).await;
        publish(&broker, "wild.b", vec![i]).await;
        publish(&broker, "tame.c", vec![i]).await;
    }
    let mut all = broker
        .subscribe_from("wild.*", StartPosition::Earliest)
        .await
        .unwrap();
    let got = take(&mut all, 6).await;
    for topic in ["wild.a", "wild.b"] {
        let of: Vec<u64> = got
            .iter()
            .filter(|m| m.topic.as_str() == topic)
            .map(|m| m.offset.unwrap().get())
            .collect();
        assert_eq!(of, [0, 1, 2], "{topic}");
    }
    assert!(all.try_recv().is_none());
}

#[tokio::test]
async fn retention_settings_follow_a_reload() {
    let broker = MessageBroker::new();
    broker.start().await.unwrap();
    for i in 0..50u8 {
        publish(&broker, "live.a", vec![i]).await;
    }
    let mut config = broker.config().as_ref().clone();
    config.topics = vec![TopicConfig {
        pattern: "live.*".into(),
        retain_messages: 10,
        ..TopicConfig::default()
    }];
    let done = broker.reconfigure(&config);
    assert_eq!(done.applied, ["topics"]);
    let info = broker.topic_info(&Topic::new("live.a").unwrap()).unwrap();
    assert_eq!((info.first_offset, info.retained_messages), (40, 10));
}
