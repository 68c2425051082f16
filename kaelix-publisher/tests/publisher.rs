//! The publisher against an in-process broker on an ephemeral port.

use std::time::Duration;

use kaelix_broker::{MessageBroker, Server};
use kaelix_core::client::ReconnectPolicy;
use kaelix_core::protocol::ErrorCode;
use kaelix_core::{CloseReason, Error, Message, PartitionId, Topic};
use kaelix_publisher::{Publisher, PublisherOptions};

async fn broker() -> (MessageBroker, String) {
    let mut config = kaelix_core::MemoryStreamerConfig::default();
    config.topics.push(kaelix_core::config::TopicConfig {
        pattern: "orders.*".into(),
        partitions: 4,
        ..Default::default()
    });
    let broker = MessageBroker::with_config(config);
    broker.start().await.unwrap();
    let addr = Server::spawn(&broker, "127.0.0.1:0")
        .await
        .unwrap()
        .to_string();
    (broker, addr)
}

#[tokio::test]
async fn acknowledged_publishes_reach_in_process_subscribers() {
    let (broker, addr) = broker().await;
    let mut receiver = broker.subscribe("orders.*").await.unwrap();
    let publisher = Publisher::connect(&addr).await.unwrap();
    publisher.publish("orders.created", "o-1").await.unwrap();
    let message = Message::builder()
        .topic("orders.paid")
        .payload("o-1")
        .header("content-type", "text/plain")
        .partition(PartitionId::new(2))
        .build()
        .unwrap();
    publisher.publish_message(&message).await.unwrap();
    // A partition the topic does not have is refused, and named.
    let beyond = Message::builder()
        .topic("orders.paid")
        .partition(PartitionId::new(4))
        .build()
        .unwrap();
    match publisher.publish_message(&beyond).await {
        Err(Error::Refused { code, reason }) => {
            assert_eq!(code, ErrorCode::UnknownPartition);
            assert!(reason.contains("has 4 partitions"), "{reason}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }

    let first = receiver.recv().await.unwrap();
    assert_eq!(
        (first.topic.as_str(), &first.payload[..]),
        ("orders.created", &b"o-1"[..])
    );
    let second = receiver.recv().await.unwrap();
    assert_eq!(second.topic, Topic::new("orders.paid").unwrap());
    assert_eq!(second.header("content-type"), Some("text/plain"));
    assert_eq!(second.partition, Some(PartitionId::new(2)));
    assert_eq!(broker.stats().messages_published, 2);
}

#[tokio::test]
async fn sends_are_batched_and_flush_waits_for_the_broker() {
    let (broker, addr) = broker().await;
    let mut receiver = broker.subscribe("metrics.>").await.unwrap();
    let publisher = Publisher::connect(&addr).await.unwrap();
    for i in 0..10_000u32 {
        publisher
            .send("metrics.cpu", i.to_be_bytes().to_vec())
            .await
            .unwrap();
    }
    publisher.flush().await.unwrap();
    // After flush the broker has routed everything: all of it is queued here.
    assert_eq!(broker.stats().messages_published, 10_000);
    for i in 0..10_000u32 {
        let m = receiver.try_recv().expect("already queued after flush");
        assert_eq!(m.payload[..], i.to_be_bytes());
    }
    publisher.close().await.unwrap();
    let err = publisher.send("metrics.cpu", "late").await.unwrap_err();
    assert!(matches!(err, Error::Closed(_)), "{err}");
}

#[tokio::test]
async fn without_reconnecting_shutdown_fails_later_publishes_with_the_reason() {
    let (broker, addr) = broker().await;
    let options = PublisherOptions {
        reconnect: ReconnectPolicy::never(),
        ..PublisherOptions::default()
    };
    let publisher = Publisher::connect_with(&addr, options).await.unwrap();
    publisher.publish("a", "1").await.unwrap();
    broker.shutdown().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let err = loop {
        match publisher.publish("a", "2").await {
            Err(err) => break err,
            Ok(()) => assert!(
                tokio::time::Instant::now() < deadline,
                "publishes keep succeeding"
            ),
        }
    };
    match err {
        Error::Closed(CloseReason::Server { code, .. }) => {
            assert_eq!(code, ErrorCode::ShuttingDown)
        }
        other => panic!("expected a shutting-down close, got {other}"),
    }
}

#[tokio::test]
async fn connecting_to_nothing_is_an_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    assert!(matches!(Publisher::connect(addr).await, Err(Error::Io(_))));
}

#[tokio::test]
async fn dropping_the_last_handle_closes_the_connection() {
    let (broker, addr) = broker().await;
    let publisher = Publisher::connect(&addr).await.unwrap();
    let clone = publisher.clone();
    drop(publisher);
    clone.publish("a", "still open").await.unwrap();
    assert_eq!(broker.stats().connections_active, 1);
    drop(clone);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while broker.stats().connections_active != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the connection stayed open"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
