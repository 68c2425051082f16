//! Replay over the network: offsets on delivered messages, start positions
//! in SUBSCRIBE, and the MISSED notice, through the real client crates.

mod common;

use std::time::Duration;

use common::{BrokerProcess, RawClient};
use kaelix_consumer::{Consumer, Subscription};
use kaelix_core::protocol::{ErrorCode, Frame, Missed, Subscribe};
use kaelix_core::{Message, StartPosition};
use kaelix_publisher::Publisher;

async fn recv(sub: &mut Subscription) -> Message {
    tokio::time::timeout(Duration::from_secs(5), sub.recv())
        .await
        .expect("a message within 5 s")
        .expect("the subscription is open")
}

fn offset(m: &Message) -> u64 {
    m.offset.expect("network deliveries carry offsets").get()
}

fn seq(payload: &[u8]) -> u64 {
    u64::from_be_bytes(payload.try_into().expect("8-byte payload"))
}

async fn nothing_more(sub: &mut Subscription) {
    let extra = tokio::time::timeout(Duration::from_millis(200), sub.recv()).await;
    assert!(extra.is_err(), "an unexpected message: {extra:?}");
}

#[tokio::test]
async fn a_late_consumer_replays_from_earliest_then_continues_live() {
    let broker = BrokerProcess::start(&[]);
    let publisher = Publisher::connect(broker.addr()).await.unwrap();
    for i in 0..10u64 {
        publisher
            .publish("net.replay", i.to_be_bytes().to_vec())
            .await
            .unwrap();
    }

    let consumer = Consumer::connect(broker.addr()).await.unwrap();
    let mut late = consumer
        .subscribe_from("net.replay", StartPosition::Earliest)
        .await
        .unwrap();
    let mut live = consumer.subscribe("net.replay").await.unwrap();
    for i in 10..15u64 {
        publisher
            .publish("net.replay", i.to_be_bytes().to_vec())
            .await
            .unwrap();
    }
    for i in 0..15 {
        let m = recv(&mut late).await;
        assert_eq!((offset(&m), seq(&m.payload)), (i, i));
    }
    nothing_more(&mut late).await;
    assert_eq!(late.missed(), 0);
    // A subscription from `latest` sees offsets too, and only new messages.
    for i in 10..15 {
        assert_eq!(offset(&recv(&mut live).await), i);
    }

    let mut tail = consumer
        .subscribe_from("net.replay", StartPosition::Last(3))
        .await
        .unwrap();
    for i in 12..15 {
        assert_eq!(offset(&recv(&mut tail).await), i);
    }
    let mut from = consumer
        .subscribe_from("net.replay", StartPosition::Offset(13))
        .await
        .unwrap();
    for i in 13..15 {
        assert_eq!(offset(&recv(&mut from).await), i);
    }
    nothing_more(&mut from).await;
}

/// The seam under load: the subscription arrives while a publisher is
/// streaming, and still sees every offset exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_gap_and_no_duplicate_when_subscribing_mid_stream() {
    let broker = BrokerProcess::start(&[]);
    let publisher = Publisher::connect(broker.addr()).await.unwrap();
    const N: u64 = 20_000;
    let sending = tokio::spawn(async move {
        for i in 0..N {
            publisher
                .send("net.seam", i.to_be_bytes().to_vec())
                .await
                .unwrap();
            if i % 1000 == 0 {
                tokio::task::yield_now().await;
            }
        }
        publisher.flush().await.unwrap();
    });
    tokio::time::sleep(Duration::from_millis(5)).await;
    let consumer = Consumer::connect(broker.addr()).await.unwrap();
    let mut sub = consumer
        .subscribe_from("net.seam", StartPosition::Earliest)
        .await
        .unwrap();
    sending.await.unwrap();
    // The default retention keeps 1000 messages per topic: the replay
    // starts wherever the window was, then every later offset follows.
    let first = recv(&mut sub).await;
    let start = offset(&first);
    assert_eq!(seq(&first.payload), start);
    for expected in start + 1..N {
        let m = recv(&mut sub).await;
        assert_eq!(offset(&m), expected, "gap or duplicate at the seam");
        assert_eq!(seq(&m.payload), expected);
    }
    nothing_more(&mut sub).await;
}

#[tokio::test]
async fn an_offset_no_longer_retained_starts_at_earliest_and_says_how_many_were_missed() {
    let (_dir, broker) =
        BrokerProcess::with_config("[[topics]]\npattern = \"short.>\"\nretain_messages = 5\n");
    let publisher = Publisher::connect(broker.addr()).await.unwrap();
    for i in 0..20u64 {
        publisher
            .publish("short.window", i.to_be_bytes().to_vec())
            .await
            .unwrap();
    }

    let consumer = Consumer::connect(broker.addr()).await.unwrap();
    let mut sub = consumer
        .subscribe_from("short.window", StartPosition::Offset(3))
        .await
        .unwrap();
    // Offsets 15..20 are what is left; 3..15 are gone.
    for i in 15..20 {
        assert_eq!(offset(&recv(&mut sub).await), i);
    }
    assert_eq!(sub.missed(), 12);

    // The same on the wire: MISSED comes first, then SUB_ACK, then the
    // messages with their offsets.
    let mut raw = RawClient::handshake(&broker.addr()).await;
    raw.send(&Frame::Subscribe(Subscribe {
        sid: 7,
        pattern: "short.window".into(),
        group: None,
        start: StartPosition::Offset(0),
        policy: None,
        ..Default::default()
    }))
    .await;
    assert_eq!(
        raw.next().await,
        Some(Frame::Missed(Missed {
            sid: 7,
            count: 15,
            range: None
        }))
    );
    assert_eq!(raw.next().await, Some(Frame::SubAck(7)));
    for i in 15..20 {
        match raw.next().await {
            Some(Frame::Message(m)) => assert_eq!((m.sid, m.offset), (7, Some(i))),
            other => panic!("expected MESSAGE, got {other:?}"),
        }
    }

    // A queue group cannot replay: refused with a reason, and the
    // connection carries on.
    raw.send(&Frame::Subscribe(Subscribe {
        sid: 8,
        pattern: "short.window".into(),
        group: Some("workers".into()),
        start: StartPosition::Earliest,
        policy: None,
        ..Default::default()
    }))
    .await;
    match raw.next().await {
        Some(Frame::SubNack(nack)) => {
            assert_eq!((nack.id, nack.code), (8, ErrorCode::InvalidGroup));
            assert!(nack.reason.contains("queue group"), "{}", nack.reason);
        }
        other => panic!("expected SUB_NACK, got {other:?}"),
    }
    raw.send(&Frame::Ping(1)).await;
    assert_eq!(raw.next().await, Some(Frame::Pong(1)));
}

/// A replay larger than the consumer's buffer: the subscription is
/// confirmed before the replayed messages, so subscribing returns and the
/// application drains them.
#[tokio::test]
async fn a_replay_larger_than_the_consumers_buffer_does_not_stall_subscribing() {
    let broker = BrokerProcess::start(&[]);
    let publisher = Publisher::connect(broker.addr()).await.unwrap();
    for i in 0..1000u64 {
        publisher
            .send("net.big", i.to_be_bytes().to_vec())
            .await
            .unwrap();
    }
    publisher.flush().await.unwrap();
    let options = kaelix_consumer::ConsumerOptions {
        max_pending_messages: 10,
        ..Default::default()
    };
    let consumer = Consumer::connect_with(broker.addr(), options)
        .await
        .unwrap();
    let mut sub = tokio::time::timeout(
        Duration::from_secs(5),
        consumer.subscribe_from("net.big", StartPosition::Earliest),
    )
    .await
    .expect("subscribing returns although the replay does not fit")
    .unwrap();
    for i in 0..1000 {
        assert_eq!(offset(&recv(&mut sub).await), i);
    }
}
