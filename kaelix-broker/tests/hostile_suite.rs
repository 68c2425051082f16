//! Hostile clients against the real binary, one attack per test, each while
//! a well-behaved publisher and subscriber pair runs through it and must
//! receive every message in order. The broker must not panic, must say why
//! it closed each bad connection, and its memory must stay bounded (RSS is
//! measured before and after).

mod common;

use std::time::Duration;

use bytes::BufMut;
use common::{rss_of, BrokerProcess, RawClient};
use kaelix_consumer::{Consumer, Subscription};
use kaelix_core::protocol::{opcode, ErrorCode, Frame, Hello, Subscribe};
use kaelix_publisher::Publisher;
use rand::{Rng, SeedableRng};
use tokio::io::AsyncWriteExt;
use tokio::task::JoinHandle;

/// What the broker's memory may grow by across an attack.
const RSS_BOUND: u64 = 96 << 20;

/// A publisher and a subscriber exchanging numbered messages while an
/// attack runs.
struct Steady {
    traffic: JoinHandle<()>,
    sub: Subscription,
    count: u64,
}

impl Steady {
    async fn start(addr: &str, count: u64) -> Steady {
        let consumer = Consumer::connect(addr).await.unwrap();
        let sub = consumer.subscribe("steady.pair").await.unwrap();
        let publisher = Publisher::connect(addr).await.unwrap();
        let traffic = tokio::spawn(async move {
            let _consumer = consumer;
            for i in 0..count {
                publisher
                    .send("steady.pair", i.to_be_bytes().to_vec())
                    .await
                    .unwrap();
                // Spread over the attack.
                if i % 500 == 499 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            publisher.flush().await.unwrap();
        });
        Steady {
            traffic,
            sub,
            count,
        }
    }

    /// Every message arrived, in order.
    async fn verify(mut self) {
        for i in 0..self.count {
            let m = tokio::time::timeout(Duration::from_secs(30), self.sub.recv())
                .await
                .expect("a message within 30 s")
                .expect("the well-behaved subscription stays open");
            assert_eq!(u64::from_be_bytes(m.payload[..].try_into().unwrap()), i);
        }
        self.traffic.await.unwrap();
    }
}

/// Runs `attack` against a broker started with `config`, with the steady
/// pair running through it; checks memory and that the broker lives on.
async fn under_attack<F, Fut>(config: &str, attack: F) -> (tempfile::TempDir, BrokerProcess)
where
    F: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let (dir, broker) = BrokerProcess::with_config(config);
    let addr = broker.addr();
    let pid = broker.child.id();
    let steady = Steady::start(&addr, 20_000).await;
    let before = rss_of(pid);
    attack(addr.clone()).await;
    steady.verify().await;
    let after = rss_of(pid);
    eprintln!(
        "RSS before {} KiB, after {} KiB",
        before / 1024,
        after / 1024
    );
    assert!(
        after < before + RSS_BOUND,
        "RSS grew from {before} to {after} bytes"
    );
    // Still serving, and not crashed.
    Publisher::connect(&addr)
        .await
        .expect("still accepting")
        .publish("after.attack", "ok")
        .await
        .unwrap();
    (dir, broker)
}

/// Reads until the broker closes the connection; the error frame, if any.
async fn closed_with(client: &mut RawClient) -> Option<ErrorCode> {
    let mut code = None;
    while let Some(frame) = client.next().await {
        if let Frame::Error(e) = frame {
            code = Some(e.code);
        }
    }
    code
}

fn hello_bytes() -> Vec<u8> {
    Frame::Hello(Hello {
        min_version: 1,
        max_version: 1,
        client_name: "hostile".into(),
        properties: vec![],
    })
    .to_bytes()
    .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bytes_before_and_after_the_handshake() {
    let (_dir, broker) = under_attack("handshake_timeout_ms = 2000\n", |addr| async move {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x6b61_656c_6978);
        let mut tasks = Vec::new();
        for i in 0..60 {
            let mut noise = vec![0u8; rng.random_range(1..8192)];
            rng.fill(&mut noise[..]);
            let addr = addr.clone();
            tasks.push(tokio::spawn(async move {
                let mut client = if i % 2 == 0 {
                    RawClient::connect(&addr).await
                } else {
                    RawClient::handshake(&addr).await
                };
                // The broker may close before all of it is written.
                let _ = client.stream.write_all(&noise).await;
                closed_with(&mut client).await
            }));
        }
        for task in tasks {
            // Closed, with or without an error frame (a frame cut short
            // by the client's own close has no one to tell).
            let _ = task.await.unwrap();
        }
    })
    .await;
    // One line per bad connection, each with its reason.
    common::eventually(Duration::from_secs(10), "a reason for each", || {
        broker.log_count("connection closed") >= 60
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_frames_and_a_4gib_length() {
    let (_dir, broker) = under_attack("handshake_timeout_ms = 2000\n", |addr| async move {
        // A PUBLISH cut off halfway, then the client closes.
        for _ in 0..20 {
            let mut client = RawClient::handshake(&addr).await;
            let mut frame = Vec::new();
            frame.put_u32(200);
            frame.put_u8(opcode::PUBLISH);
            frame.put_slice(&[0; 50]);
            client.send_bytes(&frame).await;
            client.stream.shutdown().await.unwrap();
            assert_eq!(closed_with(&mut client).await, Some(ErrorCode::Malformed));
        }
        // Half a HELLO, then the client closes.
        let hello = hello_bytes();
        let mut client = RawClient::connect(&addr).await;
        client.send_bytes(&hello[..hello.len() / 2]).await;
        client.stream.shutdown().await.unwrap();
        assert_eq!(closed_with(&mut client).await, Some(ErrorCode::Malformed));
        // A frame announcing 4 GiB: refused before anything is allocated.
        for _ in 0..20 {
            let mut client = RawClient::handshake(&addr).await;
            client
                .send_bytes(&[0xff, 0xff, 0xff, 0xff, opcode::PUBLISH, 0])
                .await;
            assert_eq!(
                closed_with(&mut client).await,
                Some(ErrorCode::FrameTooLarge)
            );
        }
    })
    .await;
    broker.wait_for_log(&["bytes into an unfinished frame"], Duration::from_secs(10));
    broker.wait_for_log(
        &["connection closed", "exceeds the maximum of"],
        Duration::from_secs(10),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_clients_holding_half_a_handshake_are_cut_at_the_deadline() {
    let (_dir, broker) = under_attack("handshake_timeout_ms = 1000\n", |addr| async move {
        let hello = hello_bytes();
        let mut clients = Vec::new();
        for _ in 0..200 {
            let mut client = RawClient::connect(&addr).await;
            client.send_bytes(&hello[..3]).await;
            clients.push(client);
        }
        // A byte now and then does not buy time.
        for client in clients.iter_mut().take(50) {
            let _ = client.stream.write_all(&hello[3..4]).await;
        }
        for mut client in clients {
            assert_eq!(
                closed_with(&mut client).await,
                Some(ErrorCode::HandshakeTimeout)
            );
        }
    })
    .await;
    broker.wait_for_log(
        &["connection closed", "no HELLO within 1000 ms"],
        Duration::from_secs(10),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_flood_is_capped_per_connection() {
    let config = "[limits]\nmax_subscriptions_per_connection = 1000\n";
    let (_dir, broker) = under_attack(config, |addr| async move {
        let mut flooders = Vec::new();
        for c in 0..5u32 {
            let mut client = RawClient::handshake(&addr).await;
            let mut bytes = Vec::new();
            for sid in 1..=3000u32 {
                let frame = Frame::Subscribe(Subscribe {
                    sid,
                    pattern: format!("flood.{c}.{sid}").into(),
                    ..Default::default()
                })
                .to_bytes();
                bytes.extend_from_slice(&frame);
            }
            client.send_bytes(&bytes).await;
            let (mut acks, mut refused) = (0, 0);
            while acks + refused < 3000 {
                match client.next().await {
                    Some(Frame::SubAck(_)) => acks += 1,
                    Some(Frame::SubNack(n)) => {
                        assert_eq!(n.code, ErrorCode::TooManySubscriptions);
                        refused += 1;
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            assert_eq!((acks, refused), (1000, 2000));
            // The connection stays.
            client.send(&Frame::Ping(7)).await;
            assert_eq!(client.next().await, Some(Frame::Pong(7)));
            flooders.push(client);
        }
        drop(flooders);
    })
    .await;
    // The flooders' 5,000 subscriptions went with them.
    common::eventually(Duration::from_secs(10), "subscriptions released", || {
        let (_, text) = broker.http_get("/metrics");
        // The steady pair is done by now too.
        text.lines().any(|l| l == "kaelix_subscriptions_active 0")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_connections_opened_and_dropped() {
    let (_dir, broker) = under_attack("", |addr| async move {
        let hello = hello_bytes();
        for round in 0..15 {
            let mut tasks = Vec::new();
            for i in 0..200 {
                let addr = addr.clone();
                let hello = hello.clone();
                tasks.push(tokio::spawn(async move {
                    let Ok(mut stream) = tokio::net::TcpStream::connect(&addr).await else {
                        return;
                    };
                    // Some say HELLO, some half of it, some nothing.
                    match (round + i) % 3 {
                        0 => {
                            let _ = stream.write_all(&hello).await;
                        }
                        1 => {
                            let _ = stream.write_all(&hello[..5]).await;
                        }
                        _ => {}
                    }
                    drop(stream);
                }));
            }
            for task in tasks {
                task.await.unwrap();
            }
        }
    })
    .await;
    // Every one of the 3,000 is gone; the steady pair (and the check's
    // publisher, which may linger) remain.
    common::eventually(Duration::from_secs(20), "connections released", || {
        let (_, text) = broker.http_get("/metrics");
        text.lines()
            .find_map(|l| l.strip_prefix("kaelix_connections_active "))
            .and_then(|v| v.parse::<f64>().ok())
            .is_some_and(|n| n <= 3.0)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_that_never_read_are_cut_off_at_their_pending_limit() {
    // Ten consumers subscribe to everything and never read; 10 MB is
    // published past them. Unbounded, the broker would hold 100 MB for them.
    let config = "[limits]\nmax_pending_bytes = 1048576\n";
    let (_dir, broker) = under_attack(config, |addr| async move {
        let mut stalled = Vec::new();
        for sid in 0..10u32 {
            let mut client = RawClient::handshake(&addr).await;
            client
                .send(&Frame::Subscribe(Subscribe {
                    sid,
                    pattern: ">".into(),
                    ..Default::default()
                }))
                .await;
            // Its SUB_ACK is the last thing it reads until the flood is over.
            assert!(matches!(client.next().await, Some(Frame::SubAck(_))));
            stalled.push(client);
        }
        let publisher = Publisher::connect(&addr).await.unwrap();
        let payload = bytes::Bytes::from(vec![7u8; 1024]);
        for _ in 0..10_000 {
            publisher.send("flood", payload.clone()).await.unwrap();
        }
        publisher.flush().await.unwrap();
        // Now they read: what they were sent ends in a slow-consumer error.
        for mut client in stalled {
            assert_eq!(
                closed_with(&mut client).await,
                Some(ErrorCode::SlowConsumer)
            );
        }
    })
    .await;
    broker.wait_for_log(&["slow consumer"], Duration::from_secs(10));
    let (_, text) = broker.http_get("/metrics");
    assert!(
        text.lines()
            .any(|l| l == "kaelix_connections_closed_total{reason=\"slow_consumer\"} 10"),
        "ten slow-consumer disconnects counted"
    );
}
