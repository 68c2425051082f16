//! `[limits]` through the real binary: connections per address, handshakes
//! in progress, idle connections, and publish rates. Each breach is
//! answered with its reason and counted; other clients carry on.

mod common;

use std::time::Duration;

use common::{BrokerProcess, RawClient};
use kaelix_consumer::Consumer;
use kaelix_core::protocol::{ErrorCode, Frame};
use kaelix_publisher::Publisher;

fn metric(broker: &BrokerProcess, name: &str, labels: &str) -> f64 {
    let (_, text) = broker.http_get("/metrics");
    let prefix = format!("{name}{labels} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn expect_refusal(client: &mut RawClient, code: ErrorCode, mentions: &str) {
    match client.next().await {
        Some(Frame::Error(e)) => {
            assert_eq!(e.code, code, "{}", e.reason);
            assert!(e.reason.contains(mentions), "{}", e.reason);
        }
        other => panic!("expected an ERROR frame, got {other:?}"),
    }
    assert_eq!(client.next().await, None, "closed after the error");
}

#[tokio::test]
async fn one_address_holds_at_most_its_share_of_connections() {
    let (_dir, broker) = BrokerProcess::with_config("[limits]\nmax_connections_per_address = 3\n");
    let addr = broker.addr();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(RawClient::handshake(&addr).await);
    }
    let mut fourth = RawClient::connect(&addr).await;
    expect_refusal(
        &mut fourth,
        ErrorCode::ConnectionLimit,
        "limits.max_connections_per_address",
    )
    .await;
    broker.wait_for_log(
        &["connection refused", "max_connections_per_address"],
        Duration::from_secs(10),
    );
    assert_eq!(
        metric(
            &broker,
            "kaelix_connections_rejected_total",
            "{reason=\"address_limit\"}"
        ),
        1.0
    );
    // A place given back is a place to take.
    held.pop();
    common::eventually(Duration::from_secs(10), "a freed place is taken", || {
        std::net::TcpStream::connect(&addr).is_ok()
            && metric(&broker, "kaelix_connections_active", "") < 3.0
    })
    .await;
    RawClient::handshake(&addr).await;
}

#[tokio::test]
async fn handshakes_in_progress_are_bounded_and_connected_clients_keep_their_service() {
    let (_dir, broker) = BrokerProcess::with_config(
        // Lines before the first header land in [network].
        "handshake_timeout_ms = 30000\n[limits]\nmax_pending_handshakes = 8\n",
    );
    let addr = broker.addr();
    let consumer = Consumer::connect(&addr).await.unwrap();
    let mut sub = consumer.subscribe("steady").await.unwrap();
    let publisher = Publisher::connect(&addr).await.unwrap();

    // Eight connections that never say HELLO hold every handshake place.
    let mut silent = Vec::new();
    for _ in 0..8 {
        silent.push(RawClient::connect(&addr).await);
    }
    common::eventually(
        Duration::from_secs(10),
        "the silent ones are accepted",
        || metric(&broker, "kaelix_connections_active", "") >= 2.0,
    )
    .await;
    let mut ninth = RawClient::connect(&addr).await;
    expect_refusal(
        &mut ninth,
        ErrorCode::ConnectionLimit,
        "limits.max_pending_handshakes",
    )
    .await;
    assert!(
        metric(
            &broker,
            "kaelix_connections_rejected_total",
            "{reason=\"handshake_limit\"}"
        ) >= 1.0
    );

    // The connected pair does not notice.
    for i in 0..100u32 {
        publisher
            .publish("steady", i.to_be_bytes().to_vec())
            .await
            .unwrap();
    }
    for i in 0..100u32 {
        let m = tokio::time::timeout(Duration::from_secs(10), sub.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(m.payload.as_ref(), i.to_be_bytes());
    }
    // Their places come back when they go.
    drop(silent);
    let mut again = None;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if let Ok(p) = Publisher::connect(&addr).await {
            again = Some(p);
            break;
        }
    }
    again.expect("a new client connects once the silent ones left");
}

#[tokio::test]
async fn an_idle_connection_is_pinged_then_closed_and_a_live_client_answers() {
    let (_dir, broker) = BrokerProcess::with_config("[limits]\nidle_timeout_ms = 1000\n");
    let addr = broker.addr();
    let publisher = Publisher::connect(&addr).await.unwrap();
    let consumer = Consumer::connect(&addr).await.unwrap();
    let mut sub = consumer.subscribe("alive").await.unwrap();

    let mut mute = RawClient::handshake(&addr).await;
    assert!(
        matches!(mute.next().await, Some(Frame::Ping(_))),
        "pinged first"
    );
    expect_refusal(&mut mute, ErrorCode::IdleTimeout, "limits.idle_timeout_ms").await;
    broker.wait_for_log(
        &["connection closed", "idle for 1000 ms"],
        Duration::from_secs(10),
    );
    assert_eq!(
        metric(
            &broker,
            "kaelix_connections_closed_total",
            "{reason=\"idle_timeout\"}"
        ),
        1.0
    );
    // The client crates answer pings: several idle periods later they are
    // still connected.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    publisher.publish("alive", "still here").await.unwrap();
    let m = tokio::time::timeout(Duration::from_secs(10), sub.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m.payload.as_ref(), b"still here");
}

#[tokio::test]
async fn a_publisher_over_its_rate_is_held_back_and_loses_nothing() {
    let (_dir, broker) =
        BrokerProcess::with_config("[limits]\nmax_publish_messages_per_sec = 500\n");
    let addr = broker.addr();
    let consumer = Consumer::connect(&addr).await.unwrap();
    let mut sub = consumer.subscribe("metered").await.unwrap();
    let publisher = Publisher::connect(&addr).await.unwrap();
    const N: u32 = 1500;
    for i in 0..N {
        publisher
            .send("metered", i.to_be_bytes().to_vec())
            .await
            .unwrap();
    }
    publisher.flush().await.unwrap();
    for i in 0..N {
        let m = tokio::time::timeout(Duration::from_secs(10), sub.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(m.payload.as_ref(), i.to_be_bytes(), "in order, none lost");
    }
    assert!(metric(&broker, "kaelix_publish_throttled_total", "") >= 1.0);
    broker.wait_for_log(&["publisher held back"], Duration::from_secs(10));
}
