//! Clients that are wrong or hostile get an error frame and are closed;
//! everyone else carries on and loses nothing.

mod common;

use std::time::Duration;

use bytes::BufMut;
use common::{BrokerProcess, RawClient};
use kaelix_consumer::Consumer;
use kaelix_core::protocol::{opcode, ErrorCode, Frame, MessageBody, Publish};
use kaelix_core::{Headers, Topic};
use kaelix_publisher::Publisher;

async fn expect_error_then_close(client: &mut RawClient, code: ErrorCode) {
    match client.next().await {
        Some(Frame::Error(e)) => assert_eq!(e.code, code, "reason: {}", e.reason),
        other => panic!("expected an ERROR frame, got {other:?}"),
    }
    assert_eq!(
        client.next().await,
        None,
        "the connection is closed after the error"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_a_4gib_frame_are_refused_while_a_third_client_is_unaffected() {
    let broker = BrokerProcess::start(&[]);
    let addr = broker.addr();
    let consumer = Consumer::connect(&addr).await.unwrap();
    let mut sub = consumer.subscribe("steady").await.unwrap();
    let publisher = Publisher::connect(&addr).await.unwrap();

    const N: u64 = 20_000;
    let traffic = tokio::spawn(async move {
        for i in 0..N {
            publisher
                .send("steady", i.to_be_bytes().to_vec())
                .await
                .unwrap();
            if i % 1000 == 0 {
                tokio::task::yield_now().await;
            }
        }
        publisher.flush().await.unwrap();
    });

    let hostile = tokio::spawn({
        let addr = addr.clone();
        async move {
            // Not our protocol at all.
            let mut garbage = RawClient::connect(&addr).await;
            garbage
                .send_bytes(b"GET / HTTP/1.1\r\nHost: kaelix\r\n\r\n")
                .await;
            expect_error_then_close(&mut garbage, ErrorCode::FrameTooLarge).await;

            // A valid handshake, then a frame announcing 4 GiB.
            let mut huge = RawClient::handshake(&addr).await;
            huge.send_bytes(&[0xff, 0xff, 0xff, 0xff, opcode::PUBLISH, 0])
                .await;
            expect_error_then_close(&mut huge, ErrorCode::FrameTooLarge).await;

            // A valid handshake, then random bytes with a plausible length.
            let mut noise = RawClient::handshake(&addr).await;
            let mut frame = vec![0u8, 0, 0, 12, 0x7e];
            frame.extend_from_slice(&[0xa5; 11]);
            noise.send_bytes(&frame).await;
            expect_error_then_close(&mut noise, ErrorCode::Malformed).await;

            // Frames before HELLO.
            let mut early = RawClient::connect(&addr).await;
            early.send(&Frame::Ping(1)).await;
            expect_error_then_close(&mut early, ErrorCode::HandshakeRequired).await;

            // A truncated publish: its topic runs past the frame's end.
            let mut truncated = RawClient::handshake(&addr).await;
            let mut bytes = Vec::new();
            bytes.put_u32(2 + 8 + 1);
            bytes.put_u8(opcode::PUBLISH);
            bytes.put_u8(0);
            bytes.put_u64(1);
            bytes.put_u8(200);
            truncated.send_bytes(&bytes).await;
            expect_error_then_close(&mut truncated, ErrorCode::Malformed).await;
        }
    });

    for i in 0..N {
        let m = tokio::time::timeout(Duration::from_secs(30), sub.recv())
            .await
            .expect("message within 30 s")
            .expect("subscription open");
        assert_eq!(u64::from_be_bytes(m.payload[..].try_into().unwrap()), i);
    }
    hostile.await.unwrap();
    traffic.await.unwrap();
}

#[tokio::test]
async fn a_silent_client_is_closed_after_the_handshake_timeout() {
    let broker = BrokerProcess::start(&[("KAELIX_NETWORK_HANDSHAKE_TIMEOUT_MS", "200")]);
    let mut silent = RawClient::connect(&broker.addr()).await;
    expect_error_then_close(&mut silent, ErrorCode::HandshakeTimeout).await;
}

#[tokio::test]
async fn an_invalid_topic_is_refused_and_the_connection_stays() {
    let broker = BrokerProcess::start(&[]);
    let mut raw = RawClient::handshake(&broker.addr()).await;
    // Bypass client-side validation: build a body, then corrupt its topic.
    let body = MessageBody::new(
        &Topic::new("a.b").unwrap(),
        None,
        &Headers::new(),
        &"x".into(),
    );
    let mut frame = Frame::Publish(Publish {
        seq: 9,
        ack: false,
        body,
    })
    .to_bytes()
    .to_vec();
    let topic_at = 6 + 8 + 1;
    frame[topic_at + 1] = b' ';
    raw.send_bytes(&frame).await;
    match raw.next().await {
        Some(Frame::PubNack(nack)) => {
            assert_eq!((nack.id, nack.code), (9, ErrorCode::InvalidTopic));
            assert!(
                nack.reason
                    .starts_with("Topic name contains invalid characters"),
                "{}",
                nack.reason
            );
        }
        other => panic!("expected PUB_NACK, got {other:?}"),
    }
    raw.send(&Frame::Ping(5)).await;
    assert_eq!(raw.next().await, Some(Frame::Pong(5)));
}

#[tokio::test]
async fn a_consumer_that_stops_reading_is_cut_off_not_the_others() {
    let broker = BrokerProcess::start(&[
        ("KAELIX_LIMITS_MAX_PENDING_BYTES", "2097152"),
        // Time for the test to start reading before the broker gives up flushing.
        ("KAELIX_NETWORK_SHUTDOWN_GRACE_MS", "30000"),
    ]);
    let addr = broker.addr();
    // Subscribes, then never reads its socket.
    let mut stalled = RawClient::handshake(&addr).await;
    stalled
        .send(&Frame::Subscribe(kaelix_core::protocol::Subscribe {
            sid: 1,
            pattern: "flood".into(),
            group: None,
            start: kaelix_core::StartPosition::Latest,
            policy: None,
            ..Default::default()
        }))
        .await;
    let consumer = Consumer::connect(&addr).await.unwrap();
    let mut healthy = consumer.subscribe("flood").await.unwrap();
    let publisher = Publisher::connect(&addr).await.unwrap();
    // In rounds the healthy consumer keeps up with, while the stalled
    // one's backlog (20 MB) outgrows its 2 MiB allowance and the kernel's
    // socket buffers.
    let payload = bytes::Bytes::from(vec![7u8; 1000]);
    for _round in 0..20 {
        for _ in 0..1000 {
            publisher.send("flood", payload.clone()).await.unwrap();
        }
        publisher.flush().await.unwrap();
        for _ in 0..1000 {
            tokio::time::timeout(Duration::from_secs(30), healthy.recv())
                .await
                .expect("message within 30 s")
                .expect("the healthy subscription stays open");
        }
    }
    // Now read what the stalled client was sent: it ends in a slow-consumer error.
    let mut last = None;
    while let Some(frame) = stalled.next().await {
        last = Some(frame);
    }
    match last {
        Some(Frame::Error(e)) => assert_eq!(e.code, ErrorCode::SlowConsumer),
        other => panic!("expected a slow-consumer ERROR last, got {other:?}"),
    }
}
