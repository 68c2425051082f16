//! The consumer against an in-process broker on an ephemeral port.

use std::time::Duration;

use futures_util::StreamExt;
use kaelix_broker::{MessageBroker, Server};
use kaelix_consumer::{Consumer, ConsumerOptions};
use kaelix_core::client::{ClientOptions, ReconnectPolicy};
use kaelix_core::{CloseReason, Error, Message, Topic};

async fn broker() -> (MessageBroker, String) {
    let broker = MessageBroker::new();
    broker.start().await.unwrap();
    let addr = Server::spawn(&broker, "127.0.0.1:0")
        .await
        .unwrap()
        .to_string();
    (broker, addr)
}

async fn publish(broker: &MessageBroker, topic: &str, payload: &'static str) {
    let topic = Topic::new(topic).unwrap();
    let message = Message::new(topic.clone(), payload).unwrap();
    broker.publish(&topic, message).await.unwrap();
}

#[tokio::test]
async fn in_process_publishes_reach_network_subscriptions_as_a_stream() {
    let (broker, addr) = broker().await;
    let consumer = Consumer::connect(&addr).await.unwrap();
    let subscription = consumer.subscribe("sensors.*.temp").await.unwrap();
    publish(&broker, "sensors.kitchen.temp", "21").await;
    publish(&broker, "sensors.kitchen.humidity", "40").await;
    publish(&broker, "sensors.garage.temp", "9").await;
    let got: Vec<(String, String)> = subscription
        .take(2)
        .map(|m| {
            (
                m.topic.to_string(),
                String::from_utf8(m.payload.to_vec()).unwrap(),
            )
        })
        .collect()
        .await;
    assert_eq!(
        got,
        [
            ("sensors.kitchen.temp".to_string(), "21".to_string()),
            ("sensors.garage.temp".to_string(), "9".to_string())
        ]
    );
}

#[tokio::test]
async fn dropping_a_subscription_unsubscribes() {
    let (broker, addr) = broker().await;
    let consumer = Consumer::connect(&addr).await.unwrap();
    let sub = consumer.subscribe("x").await.unwrap();
    assert_eq!(broker.stats().subscriptions, 1);
    drop(sub);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while broker.stats().subscriptions != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "unsubscribe never reached the broker"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn without_reconnecting_subscriptions_end_with_the_reason_when_the_broker_stops() {
    let (broker, addr) = broker().await;
    let options = ConsumerOptions {
        client: ClientOptions {
            reconnect: ReconnectPolicy::never(),
            ..ClientOptions::default()
        },
        ..ConsumerOptions::default()
    };
    let consumer = Consumer::connect_with(&addr, options).await.unwrap();
    let mut sub = consumer.subscribe_queue("jobs", "workers").await.unwrap();
    publish(&broker, "jobs", "j1").await;
    assert_eq!(sub.recv().await.unwrap().payload, "j1");
    broker.shutdown().await.unwrap();
    match sub.recv().await {
        Err(Error::Closed(CloseReason::Server { code, .. })) => {
            assert_eq!(code, kaelix_core::protocol::ErrorCode::ShuttingDown)
        }
        other => panic!("expected a shutting-down close, got {other:?}"),
    }
    assert!(consumer.subscribe("more").await.is_err());
}

#[tokio::test]
async fn a_subscription_keeps_its_connection_after_the_consumer_is_dropped() {
    let (broker, addr) = broker().await;
    let mut sub = Consumer::connect(&addr)
        .await
        .unwrap()
        .subscribe("kept")
        .await
        .unwrap();
    publish(&broker, "kept", "still here").await;
    assert_eq!(sub.recv().await.unwrap().payload, "still here");
    drop(sub);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while broker.stats().connections_active != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the connection stayed open"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
