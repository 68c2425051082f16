//! The real broker binary, the real client crates, real sockets.

mod common;

use std::time::Duration;

use common::BrokerProcess;
use kaelix_consumer::{Consumer, ConsumerOptions, Subscription};
use kaelix_core::client::{ClientOptions, ReconnectPolicy};
use kaelix_core::{CloseReason, Error};
use kaelix_publisher::Publisher;

const WAIT: Duration = Duration::from_secs(30);

async fn recv(sub: &mut Subscription) -> kaelix_core::Message {
    tokio::time::timeout(WAIT, sub.recv())
        .await
        .expect("a message within 30 s")
        .expect("subscription open")
}

fn seq(payload: &[u8]) -> u64 {
    u64::from_be_bytes(payload.try_into().expect("8-byte payload"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_thousand_messages_reach_two_subscribers_complete_and_in_order() {
    let broker = BrokerProcess::start(&[]);
    let a = Consumer::connect(broker.addr()).await.unwrap();
    let b = Consumer::connect(broker.addr()).await.unwrap();
    let sub_a = a.subscribe("load.test").await.unwrap();
    let sub_b = b.subscribe("load.test").await.unwrap();
    let publisher = Publisher::connect(broker.addr()).await.unwrap();

    const N: u64 = 100_000;
    let sending = tokio::spawn(async move {
        for i in 0..N {
            publisher
                .send("load.test", i.to_be_bytes().to_vec())
                .await
                .unwrap();
        }
        publisher.flush().await.unwrap();
    });
    let reader = |mut sub: Subscription| {
        tokio::spawn(async move {
            for i in 0..N {
                let m = recv(&mut sub).await;
                assert_eq!(seq(&m.payload), i, "message {i} out of order");
                assert_eq!(m.topic.as_str(), "load.test");
            }
        })
    };
    let (ra, rb) = (reader(sub_a), reader(sub_b));
    sending.await.unwrap();
    ra.await.unwrap();
    rb.await.unwrap();
}

#[tokio::test]
async fn wildcards_route_to_matching_subscriptions_only() {
    let broker = BrokerProcess::start(&[]);
    let consumer = Consumer::connect(broker.addr()).await.unwrap();
    let mut exact = consumer.subscribe("events.user.signup").await.unwrap();
    let mut star = consumer.subscribe("events.*.signup").await.unwrap();
    let mut tail = consumer.subscribe("events.>").await.unwrap();
    let mut other = consumer.subscribe("other.>").await.unwrap();
    let publisher = Publisher::connect(broker.addr()).await.unwrap();
    for topic in [
        "events.user.signup",
        "events.admin.signup",
        "events.user.login",
        "events.a.b.c",
        "events",
    ] {
        publisher.publish(topic, topic.to_string()).await.unwrap();
    }
    // A last message each subscription matches, so that receiving it proves
    // nothing else was on its way.
    publisher
        .publish("events.user.signup", "end")
        .await
        .unwrap();
    publisher.publish("other.end", "end").await.unwrap();

    async fn drain(sub: &mut Subscription) -> Vec<String> {
        let mut got = Vec::new();
        loop {
            let m = recv(sub).await;
            if m.payload == "end" {
                return got;
            }
            got.push(m.topic.to_string());
        }
    }
    assert_eq!(drain(&mut exact).await, ["events.user.signup"]);
    assert_eq!(
        drain(&mut star).await,
        ["events.user.signup", "events.admin.signup"]
    );
    assert_eq!(
        drain(&mut tail).await,
        [
            "events.user.signup",
            "events.admin.signup",
            "events.user.login",
            "events.a.b.c"
        ]
    );
    assert!(drain(&mut other).await.is_empty());
}

#[tokio::test]
async fn a_queue_group_delivers_each_message_to_exactly_one_member() {
    let broker = BrokerProcess::start(&[]);
    let mut members = Vec::new();
    for _ in 0..3 {
        let consumer = Consumer::connect(broker.addr()).await.unwrap();
        let jobs = consumer.subscribe_queue("jobs.>", "workers").await.unwrap();
        // Same connection, so its barrier arrives after its earlier jobs.
        let barrier = consumer.subscribe("barrier").await.unwrap();
        members.push((consumer, jobs, barrier));
    }
    let watcher = Consumer::connect(broker.addr()).await.unwrap();
    let mut all = watcher.subscribe("jobs.>").await.unwrap();
    let publisher = Publisher::connect(broker.addr()).await.unwrap();
    const N: u64 = 300;
    for i in 0..N {
        publisher
            .send("jobs.resize", i.to_be_bytes().to_vec())
            .await
            .unwrap();
    }
    publisher.publish("barrier", "b").await.unwrap();

    let mut seen = Vec::new();
    let mut per_member = Vec::new();
    for (_, jobs, barrier) in &mut members {
        recv(barrier).await;
        let mut n = 0;
        while let Some(m) = jobs.try_recv() {
            seen.push(seq(&m.payload));
            n += 1;
        }
        per_member.push(n);
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..N).collect::<Vec<_>>(), "each job exactly once");
    assert!(
        per_member.iter().all(|&n| n > 0),
        "every member got work: {per_member:?}"
    );
    for i in 0..N {
        assert_eq!(seq(&recv(&mut all).await.payload), i);
    }
}

#[tokio::test]
async fn sigterm_delivers_what_is_queued_then_exits_zero_within_5s() {
    let mut broker = BrokerProcess::start(&[]);
    // Clients that do not reconnect, so that the shutdown ends them (by
    // default they wait for the broker to come back).
    let client = ClientOptions {
        reconnect: ReconnectPolicy::never(),
        ..ClientOptions::default()
    };
    let consumer = Consumer::connect_with(
        broker.addr(),
        ConsumerOptions {
            client: client.clone(),
            ..ConsumerOptions::default()
        },
    )
    .await
    .unwrap();
    let mut sub = consumer.subscribe("t").await.unwrap();
    let publisher = Publisher::connect_with(broker.addr(), client)
        .await
        .unwrap();
    for i in 0u64..1000 {
        publisher.send("t", i.to_be_bytes().to_vec()).await.unwrap();
    }
    publisher.flush().await.unwrap();

    let started = std::time::Instant::now();
    broker.terminate();
    let status = tokio::task::spawn_blocking(move || {
        let status = broker.wait_exit(Duration::from_secs(5));
        (status, broker)
    })
    .await
    .unwrap()
    .0
    .expect("exited within 5 s");
    assert!(status.success(), "exit status {status}");
    assert!(started.elapsed() < Duration::from_secs(5));

    for i in 0..1000 {
        assert_eq!(seq(&recv(&mut sub).await.payload), i);
    }
    match sub.recv().await {
        Err(Error::Closed(CloseReason::Server { code, .. })) => {
            assert_eq!(code, kaelix_core::protocol::ErrorCode::ShuttingDown)
        }
        other => panic!("expected a shutting-down close, got {other:?}"),
    }
    let err = publisher.publish("t", "late").await.unwrap_err();
    assert!(matches!(err, Error::Closed(_)), "{err}");
}

#[tokio::test]
async fn refusals_carry_the_reason() {
    let broker = BrokerProcess::start(&[("KAELIX_LIMITS_MAX_FRAME_BYTES", "1024")]);
    let publisher = Publisher::connect(broker.addr()).await.unwrap();
    let err = publisher.publish("bad topic", "x").await.unwrap_err();
    assert!(
        err.to_string()
            .starts_with("Topic name contains invalid characters"),
        "{err}"
    );
    let err = publisher.publish("t", vec![0u8; 2000]).await.unwrap_err();
    assert!(matches!(err, Error::PayloadTooLarge { .. }), "{err}");
    // The connection is still good.
    publisher.publish("t", "ok").await.unwrap();

    let consumer = Consumer::connect(broker.addr()).await.unwrap();
    let err = consumer.subscribe("a.>.b").await.unwrap_err();
    assert!(err.to_string().contains("pattern"), "{err}");
    let err = consumer
        .subscribe_queue("a", "bad group")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidGroup { .. }), "{err}");
}

#[tokio::test]
async fn connection_limit_refuses_with_a_reason() {
    let broker = BrokerProcess::start(&[("KAELIX_NETWORK_MAX_CONNECTIONS", "1")]);
    let first = Publisher::connect(broker.addr()).await.unwrap();
    match Publisher::connect(broker.addr()).await {
        Err(Error::Refused { code, .. }) => {
            assert_eq!(code, kaelix_core::protocol::ErrorCode::ConnectionLimit)
        }
        other => panic!("expected a connection-limit refusal, got {other:?}"),
    }
    first.publish("still.works", "x").await.unwrap();
}

#[tokio::test]
async fn unsubscribe_stops_delivery() {
    use kaelix_core::protocol::{Frame, Subscribe};
    let broker = BrokerProcess::start(&[]);
    let mut raw = common::RawClient::handshake(&broker.addr()).await;
    raw.send(&Frame::Subscribe(Subscribe {
        sid: 7,
        pattern: "u".into(),
        group: None,
        start: kaelix_core::StartPosition::Latest,
        policy: None,
        ..Default::default()
    }))
    .await;
    assert_eq!(raw.next().await, Some(Frame::SubAck(7)));
    let publisher = Publisher::connect(broker.addr()).await.unwrap();
    publisher.publish("u", "1").await.unwrap();
    match raw.next().await {
        Some(Frame::Message(d)) => assert_eq!((d.sid, &d.body.payload()[..]), (7, &b"1"[..])),
        other => panic!("expected a MESSAGE, got {other:?}"),
    }
    raw.send(&Frame::Unsubscribe(7)).await;
    raw.send(&Frame::Ping(1)).await;
    assert_eq!(raw.next().await, Some(Frame::Pong(1)));
    publisher.publish("u", "2").await.unwrap();
    // Frames on a connection are answered in order: a PONG with nothing
    // before it means no MESSAGE was sent after the unsubscribe.
    raw.send(&Frame::Ping(2)).await;
    assert_eq!(raw.next().await, Some(Frame::Pong(2)));
}
