//! Credit: subscriptions that pace the broker, through the real broker
//! process — a raw client to see exactly what the broker sends, and the
//! consumer crate, which gives credit back as the application reads.

mod common;

use std::time::Duration;

use common::{BrokerProcess, RawClient};
use kaelix_consumer::Consumer;
use kaelix_core::protocol::{Credit, ErrorCode, Frame, Subscribe};
use kaelix_core::{CreditWindow, StartPosition, SubscribeOptions};
use kaelix_publisher::Publisher;

/// A broker whose `paced.*` topics keep `retain` messages, and whose
/// connections may have `pending` bytes queued.
fn broker(retain: usize, pending: usize) -> (tempfile::TempDir, BrokerProcess) {
    BrokerProcess::with_config(&format!(
        "[limits]\nmax_pending_bytes = {pending}\n\n\
         [[topics]]\npattern = \"paced.*\"\nretain_messages = {retain}\nretain_bytes = 67108864\n"
    ))
}

async fn publish(addr: &str, topic: &str, range: std::ops::Range<u64>) {
    let publisher = Publisher::connect(addr).await.unwrap();
    for i in range {
        publisher
            .send(topic, i.to_be_bytes().to_vec())
            .await
            .unwrap();
    }
    publisher.flush().await.unwrap();
}

async fn paced(raw: &mut RawClient, sid: u32, topic: &str, start: StartPosition, messages: u32) {
    raw.send(&Frame::Subscribe(Subscribe {
        sid,
        pattern: topic.to_string().into(),
        start,
        credit: Some(Credit {
            sid,
            messages,
            bytes: 0,
        }),
        ..Default::default()
    }))
    .await;
    assert_eq!(raw.next().await, Some(Frame::SubAck(sid)));
}

/// The offsets of the next `n` MESSAGE frames.
async fn offsets(raw: &mut RawClient, n: usize) -> Vec<u64> {
    let mut out = Vec::new();
    while out.len() < n {
        match raw.next().await {
            Some(Frame::Message(m)) => out.push(m.offset.unwrap()),
            other => panic!("expected MESSAGE, got {other:?}"),
        }
    }
    out
}

async fn grant(raw: &mut RawClient, sid: u32, messages: u32) {
    raw.send(&Frame::Credit(Credit {
        sid,
        messages,
        bytes: 0,
    }))
    .await;
}

#[tokio::test]
async fn the_broker_sends_no_more_than_the_credit_and_the_rest_follows_in_order() {
    let (_dir, broker) = broker(100_000, 64 << 20);
    let addr = broker.addr();
    let mut raw = RawClient::handshake(&addr).await;
    paced(&mut raw, 1, "paced.live", StartPosition::Latest, 10).await;
    publish(&addr, "paced.live", 0..1000).await;
    assert_eq!(offsets(&mut raw, 10).await, (0..10).collect::<Vec<_>>());
    assert!(
        raw.quiet_for(Duration::from_millis(300)).await,
        "more than the credit"
    );

    grant(&mut raw, 1, 25).await;
    assert_eq!(offsets(&mut raw, 25).await, (10..35).collect::<Vec<_>>());
    assert!(raw.quiet_for(Duration::from_millis(300)).await);

    // Enough for the rest: the waiting messages, then live ones, with no
    // gap or duplicate at the seam.
    grant(&mut raw, 1, 1_000_000).await;
    assert_eq!(offsets(&mut raw, 965).await, (35..1000).collect::<Vec<_>>());
    publish(&addr, "paced.live", 1000..1005).await;
    assert_eq!(offsets(&mut raw, 5).await, (1000..1005).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_paced_replay_stops_at_the_credit() {
    let (_dir, broker) = broker(100_000, 64 << 20);
    let addr = broker.addr();
    publish(&addr, "paced.replay", 0..500).await;
    let mut raw = RawClient::handshake(&addr).await;
    paced(&mut raw, 3, "paced.replay", StartPosition::Earliest, 20).await;
    assert_eq!(offsets(&mut raw, 20).await, (0..20).collect::<Vec<_>>());
    assert!(raw.quiet_for(Duration::from_millis(300)).await);
    publish(&addr, "paced.replay", 500..510).await;
    assert!(
        raw.quiet_for(Duration::from_millis(300)).await,
        "live waits too"
    );
    grant(&mut raw, 3, 490).await;
    assert_eq!(offsets(&mut raw, 490).await, (20..510).collect::<Vec<_>>());
}

#[tokio::test]
async fn what_the_window_dropped_meanwhile_is_reported_with_offsets() {
    let (_dir, broker) = broker(100, 64 << 20);
    let addr = broker.addr();
    let mut raw = RawClient::handshake(&addr).await;
    paced(&mut raw, 2, "paced.short", StartPosition::Latest, 10).await;
    publish(&addr, "paced.short", 0..500).await;
    assert_eq!(offsets(&mut raw, 10).await, (0..10).collect::<Vec<_>>());
    grant(&mut raw, 2, 1000).await;
    match raw.next().await {
        Some(Frame::Missed(m)) => {
            let range = m.range.expect("with offsets");
            assert_eq!((m.sid, m.count, range.first, range.last), (2, 390, 10, 399));
            assert_eq!(&range.topic[..], b"paced.short");
        }
        other => panic!("expected MISSED, got {other:?}"),
    }
    assert_eq!(offsets(&mut raw, 100).await, (400..500).collect::<Vec<_>>());
    let line = broker.wait_for_log(&["paced subscriber"], Duration::from_secs(5));
    assert!(line.contains("raw-test"), "{line}");
}

#[tokio::test]
async fn a_byte_window_sends_while_any_bytes_are_left() {
    let (_dir, broker) = broker(100_000, 64 << 20);
    let addr = broker.addr();
    let mut raw = RawClient::handshake(&addr).await;
    raw.send(&Frame::Subscribe(Subscribe {
        sid: 4,
        pattern: "paced.bytes".into(),
        // A body here is 1 + 11 (topic) + 8 (payload) = 20 bytes.
        credit: Some(Credit {
            sid: 4,
            messages: 0,
            bytes: 50,
        }),
        ..Default::default()
    }))
    .await;
    assert_eq!(raw.next().await, Some(Frame::SubAck(4)));
    publish(&addr, "paced.bytes", 0..10).await;
    assert_eq!(offsets(&mut raw, 3).await, [0, 1, 2]);
    assert!(raw.quiet_for(Duration::from_millis(300)).await);
    raw.send(&Frame::Credit(Credit {
        sid: 4,
        messages: 0,
        bytes: 60,
    }))
    .await;
    assert_eq!(offsets(&mut raw, 3).await, [3, 4, 5]);
}

#[tokio::test]
async fn credit_is_refused_where_it_cannot_work() {
    let (_dir, broker) = broker(100, 64 << 20);
    let mut raw = RawClient::handshake(&broker.addr()).await;
    raw.send(&Frame::Subscribe(Subscribe {
        sid: 5,
        pattern: "paced.g".into(),
        group: Some("workers".into()),
        credit: Some(Credit {
            sid: 5,
            messages: 10,
            bytes: 0,
        }),
        ..Default::default()
    }))
    .await;
    match raw.next().await {
        Some(Frame::SubNack(n)) => assert_eq!(n.code, ErrorCode::InvalidGroup),
        other => panic!("expected SUB_NACK, got {other:?}"),
    }
    // Credit for a subscription that has no window, or none at all, is
    // ignored.
    grant(&mut raw, 99, 10).await;
    raw.send(&Frame::Ping(7)).await;
    assert_eq!(raw.next().await, Some(Frame::Pong(7)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_with_a_window_is_paced_not_disconnected() {
    // 20 MiB for a subscriber whose connection may queue 256 KiB: without
    // a window it would be a slow consumer; with one it reads at its pace.
    let (_dir, broker) = broker(100_000, 256 << 10);
    let addr = broker.addr();
    const N: u64 = 20_000;
    let consumer = Consumer::connect(&addr).await.unwrap();
    let options = SubscribeOptions::new().credit(CreditWindow::messages(64));
    let mut sub = consumer
        .subscribe_with("paced.slow", options)
        .await
        .unwrap();
    let publishing = {
        let addr = addr.clone();
        tokio::spawn(async move {
            let publisher = Publisher::connect(&addr).await.unwrap();
            let mut payload = vec![0u8; 1024];
            for i in 0..N {
                payload[..8].copy_from_slice(&i.to_be_bytes());
                publisher.send("paced.slow", payload.clone()).await.unwrap();
            }
            publisher.flush().await.unwrap();
        })
    };
    for i in 0..N {
        let m = tokio::time::timeout(Duration::from_secs(10), sub.recv())
            .await
            .expect("a message within 10 s")
            .expect("still subscribed");
        assert_eq!(m.offset.unwrap().get(), i);
        assert_eq!(m.payload[..8], i.to_be_bytes());
        if i % 1000 == 0 {
            // A reader slower than the publisher, now and then.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    publishing.await.unwrap();
    assert_eq!(sub.missed(), 0);
    let stats: serde_json::Value = serde_json::from_str(
        &Publisher::connect(&addr)
            .await
            .unwrap()
            .server_stats()
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(stats["slow_consumers"].as_u64(), Some(0));
}
