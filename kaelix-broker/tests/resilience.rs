//! Clients against faults between them and the broker, injected by a TCP
//! proxy: a broker that goes silent is noticed within the heartbeat's time.

mod common;

use std::time::{Duration, Instant};

use common::proxy::FaultProxy;
use kaelix_broker::{MessageBroker, Server};
use kaelix_consumer::{Consumer, ConsumerOptions};
use kaelix_core::client::{ClientOptions, Heartbeat, ReconnectPolicy};
use kaelix_core::{CloseReason, Error};
use kaelix_publisher::Publisher;

const HEARTBEAT: Heartbeat = Heartbeat {
    interval: Duration::from_millis(200),
    timeout: Duration::from_millis(300),
};

async fn broker() -> (MessageBroker, std::net::SocketAddr) {
    let broker = MessageBroker::new();
    broker.start().await.unwrap();
    let addr = Server::spawn(&broker, "127.0.0.1:0").await.unwrap();
    (broker, addr)
}

/// Without reconnecting, so that what the heartbeat noticed ends the
/// client (tests/reconnect.rs has clients that come back).
fn options(name: &str) -> ClientOptions {
    ClientOptions {
        name: name.into(),
        heartbeat: HEARTBEAT,
        reconnect: ReconnectPolicy::never(),
        ..ClientOptions::default()
    }
}

#[tokio::test]
async fn a_silent_broker_is_noticed_within_the_heartbeat() {
    let (broker, addr) = broker().await;
    let proxy = FaultProxy::start(addr).await;
    let consumer = Consumer::connect_with(
        proxy.addr(),
        ConsumerOptions {
            client: options("watcher"),
            ..ConsumerOptions::default()
        },
    )
    .await
    .unwrap();
    let mut sub = consumer.subscribe("beat.>").await.unwrap();
    let publisher = Publisher::connect_with(proxy.addr(), options("pinger"))
        .await
        .unwrap();

    // Quiet but alive: pings are answered, nothing is closed.
    tokio::time::sleep(HEARTBEAT.interval * 4).await;
    publisher.publish("beat.one", "alive").await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), sub.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.payload, "alive");

    // The broker goes silent without closing anything.
    proxy.blackhole(true);
    let since = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(10), sub.recv())
        .await
        .expect("the consumer notices");
    let noticed = since.elapsed();
    let limit = HEARTBEAT.interval + HEARTBEAT.timeout;
    let err = ended.unwrap_err();
    assert!(
        matches!(err, Error::Closed(CloseReason::PeerSilent(t)) if t == limit),
        "{err}"
    );
    // Noticed after a ping went unanswered, well before a TCP timeout.
    assert!(noticed >= HEARTBEAT.timeout, "{noticed:?}");
    assert!(noticed < limit * 4, "{noticed:?}");

    // A publisher waiting for an acknowledgement is told too.
    let outcome = tokio::time::timeout(
        Duration::from_secs(10),
        publisher.publish("beat.one", "lost"),
    )
    .await
    .expect("the publisher notices");
    let err = outcome.unwrap_err();
    assert!(
        matches!(err, Error::Closed(CloseReason::PeerSilent(t)) if t == limit),
        "{err}"
    );
    broker.shutdown().await.unwrap();
}

#[tokio::test]
async fn clients_given_several_addresses_reach_a_live_one_and_spread_over_them() {
    let (broker, addr) = broker().await;
    // Two proxies to the same broker stand for two brokers; a third
    // address refuses connections.
    let (a, b) = (FaultProxy::start(addr).await, FaultProxy::start(addr).await);
    let dead = FaultProxy::start(addr).await;
    dead.refuse(true);
    let addresses: Vec<String> = [&a, &b, &dead]
        .iter()
        .map(|p| p.addr().to_string())
        .collect();

    let mut consumers = Vec::new();
    for _ in 0..20 {
        let options = ConsumerOptions {
            client: options("spread"),
            ..ConsumerOptions::default()
        };
        consumers.push(Consumer::connect_any(&addresses, options).await.unwrap());
    }
    // Every client got through; both live addresses were chosen first by
    // some of them (random order), and the dead one was tried by some.
    assert!(
        a.accepted() >= 1 && b.accepted() >= 1,
        "{} {}",
        a.accepted(),
        b.accepted()
    );
    assert_eq!(a.accepted() + b.accepted(), 20);
    assert!(dead.accepted() >= 1);

    let publisher = Publisher::connect_any(&addresses, options("spread-pub"))
        .await
        .unwrap();
    let mut sub = consumers[0].subscribe("spread.t").await.unwrap();
    publisher.publish("spread.t", "here").await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), sub.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.payload, "here");

    // None answering: the error names each address.
    dead.refuse(true);
    let nowhere = vec![dead.addr().to_string(), "127.0.0.1:1".to_string()];
    let err = Publisher::connect_any(&nowhere, options("lost"))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.starts_with("no broker could be reached"), "{text}");
    assert!(
        text.contains("127.0.0.1:1") && text.contains(&dead.addr().to_string()),
        "{text}"
    );
    assert!(Publisher::connect_any(&[], options("none")).await.is_err());
    broker.shutdown().await.unwrap();
}
