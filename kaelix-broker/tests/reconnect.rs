//! Clients that lose their broker and come back on their own: through a
//! fault-injecting proxy that cuts connections or refuses new ones, and
//! through a broker process killed and started again.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::proxy::FaultProxy;
use common::BrokerProcess;
use kaelix_broker::{MessageBroker, Server};
use kaelix_consumer::{Consumer, ConsumerOptions, Subscription};
use kaelix_core::client::{
    CircuitPolicy, ClientOptions, ConnectionEvent, Heartbeat, ReconnectPolicy, WhenBufferFull,
};
use kaelix_core::config::{MemoryStreamerConfig, TopicConfig};
use kaelix_core::{Error, Message, Topic};
use kaelix_publisher::Publisher;
use tokio::sync::broadcast;

/// Quick to notice a dead peer and quick to come back, so the tests are
/// short; the defaults are seconds.
fn quick(name: &str) -> ClientOptions {
    ClientOptions {
        name: name.into(),
        heartbeat: Heartbeat {
            interval: Duration::from_millis(200),
            timeout: Duration::from_millis(300),
        },
        reconnect: ReconnectPolicy {
            enabled: true,
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(200),
            max_attempts: 0,
        },
        ..ClientOptions::default()
    }
}

fn consumer_options(name: &str) -> ConsumerOptions {
    ConsumerOptions {
        client: quick(name),
        ..ConsumerOptions::default()
    }
}

/// An in-process broker whose `seq.>` and `orders.>` topics keep enough
/// to resume from (`orders.keyed` in three partitions).
async fn retaining_broker() -> (MessageBroker, std::net::SocketAddr) {
    let mut config = MemoryStreamerConfig::default();
    for (pattern, partitions) in [("seq.>", 1), ("orders.>", 1), ("orders.keyed", 3)] {
        config.topics.push(TopicConfig {
            pattern: pattern.into(),
            partitions,
            retain_messages: 100_000,
            ..TopicConfig::default()
        });
    }
    let broker = MessageBroker::with_config(config);
    broker.start().await.unwrap();
    let addr = Server::spawn(&broker, "127.0.0.1:0").await.unwrap();
    (broker, addr)
}

/// A topic and, for one with several, a partition.
type TopicPartition = (String, Option<u32>);

async fn next(sub: &mut Subscription) -> Message {
    tokio::time::timeout(Duration::from_secs(20), sub.recv())
        .await
        .expect("a message within 20 s")
        .expect("the subscription is open")
}

fn number(message: &Message) -> u32 {
    std::str::from_utf8(&message.payload)
        .unwrap()
        .parse()
        .unwrap()
}

/// Every event received so far.
fn drain(events: &mut broadcast::Receiver<ConnectionEvent>) -> Vec<ConnectionEvent> {
    let mut seen = Vec::new();
    while let Ok(event) = events.try_recv() {
        seen.push(event);
    }
    seen
}

fn count(events: &[ConnectionEvent], pick: impl Fn(&ConnectionEvent) -> bool) -> usize {
    events.iter().filter(|e| pick(e)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_publishes_arrive_exactly_once_and_in_order_across_cuts() {
    let (broker, addr) = retaining_broker().await;
    let (to_publisher, to_consumer) =
        (FaultProxy::start(addr).await, FaultProxy::start(addr).await);
    let consumer = Consumer::connect_with(to_consumer.addr(), consumer_options("reader"))
        .await
        .unwrap();
    let mut consumer_events = consumer.events();
    let mut sub = consumer.subscribe("seq.>").await.unwrap();
    let publisher = Publisher::connect_with(to_publisher.addr(), quick("writer"))
        .await
        .unwrap();
    let mut publisher_events = publisher.events();
    // A slow path to the broker: more publishes are in flight at each cut.
    to_publisher.delay(Duration::from_millis(1));

    // Four tasks share the publisher, so several publishes are in flight
    // when a connection is cut; each keeps its own topic in order.
    const TASKS: u32 = 4;
    const EACH: u32 = 600;
    let mut senders = Vec::new();
    for task in 0..TASKS {
        let publisher = publisher.clone();
        senders.push(tokio::spawn(async move {
            let topic = format!("seq.t{task}");
            for i in 0..EACH {
                publisher.publish(&topic, i.to_string()).await.unwrap();
            }
        }));
    }
    let cutter = tokio::spawn(async move {
        for k in 0..12 {
            tokio::time::sleep(Duration::from_millis(150)).await;
            if k % 2 == 0 {
                to_publisher.cut();
            } else {
                to_consumer.cut();
            }
        }
        (to_publisher, to_consumer)
    });

    let mut got: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for _ in 0..TASKS * EACH {
        let message = next(&mut sub).await;
        got.entry(message.topic.to_string())
            .or_default()
            .push(number(&message));
    }
    for sender in senders {
        sender.await.unwrap();
    }
    let _proxies = cutter.await.unwrap();
    for task in 0..TASKS {
        assert_eq!(
            got[&format!("seq.t{task}")],
            (0..EACH).collect::<Vec<_>>(),
            "seq.t{task}: each number once, in order"
        );
    }
    // Nothing comes after the last one: no late duplicate.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), sub.recv())
            .await
            .is_err(),
        "a duplicate arrived"
    );
    // Retries were routed once: the broker routed exactly what was sent.
    let stats = broker.stats();
    assert_eq!(stats.messages_published, u64::from(TASKS * EACH));

    let publisher_seen = drain(&mut publisher_events);
    let consumer_seen = drain(&mut consumer_events);
    for seen in [&publisher_seen, &consumer_seen] {
        let lost = count(seen, |e| matches!(e, ConnectionEvent::Disconnected { .. }));
        let back = count(seen, |e| matches!(e, ConnectionEvent::Reconnected { .. }));
        assert!(lost >= 1, "{seen:?}");
        assert_eq!(lost, back, "each outage ends in a reconnect: {seen:?}");
    }
    eprintln!(
        "publisher reconnects: {}, consumer reconnects: {}, duplicates dropped by the broker: {}",
        count(&publisher_seen, |e| matches!(
            e,
            ConnectionEvent::Reconnected { .. }
        )),
        count(&consumer_seen, |e| matches!(
            e,
            ConnectionEvent::Reconnected { .. }
        )),
        stats.publish_duplicates
    );
    broker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wildcard_subscription_resumes_every_topic_without_gap_or_duplicate() {
    let (broker, addr) = retaining_broker().await;
    let proxy = FaultProxy::start(addr).await;
    let consumer = Consumer::connect_with(proxy.addr(), consumer_options("resumer"))
        .await
        .unwrap();
    let mut sub = consumer.subscribe("orders.>").await.unwrap();
    let publisher = Publisher::connect(addr).await.unwrap();
    let eu = Topic::new("orders.eu").unwrap();
    let keyed = |i: u32| {
        Message::builder()
            .topic("orders.keyed")
            .key(format!("customer-{}", i % 7))
            .payload(i.to_string())
            .build()
            .unwrap()
    };

    let mut got: BTreeMap<TopicPartition, Vec<(u64, u32)>> = BTreeMap::new();
    let mut take = |message: Message| {
        got.entry((
            message.topic.to_string(),
            message.partition.map(|p| p.get()),
        ))
        .or_default()
        .push((message.offset.unwrap().get(), number(&message)));
    };

    let numbers = |range: std::ops::Range<u32>| range.map(|i| i.to_string()).collect::<Vec<_>>();
    publisher.send_batch(&eu, &numbers(0..100)).await.unwrap();
    for i in 0..30 {
        publisher.send_message(&keyed(i)).await.unwrap();
    }
    publisher.flush().await.unwrap();
    for _ in 0..130 {
        take(next(&mut sub).await);
    }

    // The consumer's connection goes, and it cannot come back for a while.
    proxy.refuse(true);
    proxy.cut();
    common::eventually(Duration::from_secs(5), "the consumer notices", || {
        !consumer.is_connected()
    })
    .await;
    publisher.send_batch(&eu, &numbers(100..200)).await.unwrap();
    for i in 30..60 {
        publisher.send_message(&keyed(i)).await.unwrap();
    }
    // A topic the subscription had never received from.
    let us = Topic::new("orders.us").unwrap();
    publisher.send_batch(&us, &numbers(0..50)).await.unwrap();
    publisher.flush().await.unwrap();
    assert!(!consumer.is_connected(), "its way back is shut");
    proxy.refuse(false);

    // Back: what it missed comes first, then live messages.
    for _ in 0..180 {
        take(next(&mut sub).await);
    }
    publisher.send_batch(&eu, &numbers(200..250)).await.unwrap();
    for i in 60..90 {
        publisher.send_message(&keyed(i)).await.unwrap();
    }
    publisher.flush().await.unwrap();
    for _ in 0..80 {
        take(next(&mut sub).await);
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(300), sub.recv())
            .await
            .is_err(),
        "a duplicate arrived"
    );

    let numbers_of = |key: &TopicPartition| got[key].iter().map(|(_, n)| *n).collect::<Vec<_>>();
    assert_eq!(
        numbers_of(&("orders.eu".into(), None)),
        (0..250).collect::<Vec<_>>()
    );
    assert_eq!(
        numbers_of(&("orders.us".into(), None)),
        (0..50).collect::<Vec<_>>()
    );
    let mut keyed_numbers = Vec::new();
    for ((topic, partition), messages) in &got {
        // Offsets of each topic partition run from 0 without a hole.
        let offsets: Vec<u64> = messages.iter().map(|(o, _)| *o).collect();
        assert_eq!(
            offsets,
            (0..offsets.len() as u64).collect::<Vec<_>>(),
            "{topic} {partition:?}"
        );
        if topic == "orders.keyed" {
            assert!(partition.is_some());
            keyed_numbers.extend(messages.iter().map(|(_, n)| *n));
        }
    }
    keyed_numbers.sort();
    assert_eq!(keyed_numbers, (0..90).collect::<Vec<_>>());
    broker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_broker_restart_clients_reconnect_resubscribe_and_traffic_resumes() {
    let mut first = BrokerProcess::start(&[]);
    let addr = first.addr.to_string();
    let consumer = Consumer::connect_with(&addr, consumer_options("survivor"))
        .await
        .unwrap();
    let mut events = consumer.events();
    let mut sub = consumer.subscribe("restart.>").await.unwrap();
    let mut queue = consumer
        .subscribe_queue("restart.jobs", "workers")
        .await
        .unwrap();
    let publisher = Publisher::connect_with(&addr, quick("survivor-pub"))
        .await
        .unwrap();
    publisher.publish("restart.a", "before").await.unwrap();
    assert_eq!(next(&mut sub).await.payload, "before");

    first.child.kill().unwrap();
    first.child.wait().unwrap();
    // Published while the broker is down: held, sent once it is back.
    let waiting = {
        let publisher = publisher.clone();
        tokio::spawn(async move { publisher.publish("restart.a", "during").await })
    };
    common::eventually(Duration::from_secs(5), "the consumer notices", || {
        !consumer.is_connected()
    })
    .await;

    let port = first.addr.port().to_string();
    let _second = BrokerProcess::start(&[("KAELIX_NETWORK_PORT", &port)]);
    tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("the held publish goes out")
        .unwrap()
        .unwrap();
    common::eventually(Duration::from_secs(10), "the consumer is back", || {
        consumer.is_connected()
    })
    .await;
    // The held publish may have come before the consumer subscribed again;
    // what is published now reaches both subscriptions, made again on
    // their own.
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !got.iter().any(|p| p == "after") {
        assert!(Instant::now() < deadline, "traffic did not resume: {got:?}");
        publisher.publish("restart.a", "after").await.unwrap();
        if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(200), sub.recv()).await {
            got.push(String::from_utf8(m.payload.to_vec()).unwrap());
        }
    }
    publisher.publish("restart.jobs", "job").await.unwrap();
    assert_eq!(next(&mut queue).await.payload, "job");
    let seen = drain(&mut events);
    assert!(
        seen.iter()
            .any(|e| matches!(e, ConnectionEvent::Disconnected { .. })),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .any(|e| matches!(e, ConnectionEvent::Reconnected { .. })),
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_facing_a_dead_broker_fails_fast_once_its_buffer_or_circuit_says_so() {
    let (broker, addr) = retaining_broker().await;
    let proxy = FaultProxy::start(addr).await;
    let options = ClientOptions {
        reconnect_buffer_bytes: 4096,
        when_buffer_full: WhenBufferFull::Fail,
        circuit: CircuitPolicy {
            failure_threshold: 3,
            cooldown: Duration::from_millis(300),
        },
        ..quick("doomed")
    };
    let publisher = Publisher::connect_with(proxy.addr(), options)
        .await
        .unwrap();
    let mut events = publisher.events();
    publisher.publish("seq.dead", "first").await.unwrap();
    proxy.refuse(true);
    proxy.cut();
    common::eventually(Duration::from_secs(5), "the publisher notices", || {
        !publisher.is_connected()
    })
    .await;

    // The buffer holds sends while it is down, up to its size.
    let payload = vec![b'x'; 100];
    let mut held = 0;
    let err = loop {
        match publisher.send("seq.dead", payload.clone()).await {
            Ok(()) => held += 1,
            Err(err) => break err,
        }
        assert!(held < 100, "the buffer is bounded");
    };
    assert!(held >= 20, "held {held}");
    assert!(
        matches!(err, Error::BufferFull { limit: 4096 })
            || matches!(err, Error::CircuitOpen { .. }),
        "{err}"
    );

    // After three failed attempts the circuit opens: publishing fails at
    // once, naming the failures, rather than waiting.
    // An acknowledged publish parked before the circuit opened fails
    // when it opens (and is not sent later).
    let deadline = Instant::now() + Duration::from_secs(10);
    let open = loop {
        match publisher.publish("seq.dead", "lost").await {
            Err(err @ Error::CircuitOpen { .. }) => break err,
            Err(Error::BufferFull { .. }) => {}
            other => panic!("expected a fast failure, got {other:?}"),
        }
        assert!(Instant::now() < deadline, "the circuit never opened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        open.to_string().contains("reconnect attempts failed"),
        "{open}"
    );
    let started = Instant::now();
    let again = publisher.publish("seq.dead", "lost").await;
    assert!(matches!(again, Err(Error::CircuitOpen { .. })), "{again:?}");
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "{:?}",
        started.elapsed()
    );
    // The broker is back: the next probe gets through, the circuit closes,
    // and what the buffer held goes out.
    let check = Consumer::connect(addr).await.unwrap();
    let mut sub = check.subscribe("seq.dead").await.unwrap();
    proxy.refuse(false);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match publisher.publish("seq.dead", "back").await {
            Ok(()) => break,
            Err(Error::CircuitOpen { .. }) | Err(Error::BufferFull { .. }) => {
                assert!(Instant::now() < deadline, "the circuit never closed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(other) => panic!("{other}"),
        }
    }
    let mut held_got = 0;
    loop {
        let message = next(&mut sub).await;
        if message.payload == "back" {
            break;
        }
        assert_eq!(message.payload.len(), 100);
        held_got += 1;
    }
    assert_eq!(held_got, held, "every held send went out once");
    // Sends of the outage may be lost in general; flush says so once.
    assert!(matches!(
        publisher.flush().await,
        Err(Error::ConnectionLost(_))
    ));
    publisher.flush().await.unwrap();
    let seen = drain(&mut events);
    assert!(
        count(&seen, |e| matches!(
            e,
            ConnectionEvent::AttemptFailed { .. }
        )) >= 3,
        "{seen:?}"
    );
    broker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_clients_come_back_spread_over_the_backoff_window() {
    let (broker, addr) = retaining_broker().await;
    let proxy = FaultProxy::start(addr).await;
    const CLIENTS: usize = 1000;
    let window = Duration::from_millis(1000);
    let options = ConsumerOptions {
        client: ClientOptions {
            name: "herd".into(),
            reconnect: ReconnectPolicy {
                enabled: true,
                initial_backoff: window,
                max_backoff: window * 2,
                max_attempts: 0,
            },
            ..ClientOptions::default()
        },
        ..ConsumerOptions::default()
    };
    let mut clients = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        clients.push(
            Consumer::connect_with(proxy.addr(), options.clone())
                .await
                .unwrap(),
        );
    }
    let before = proxy.accept_times().len();
    let cut_at = Instant::now();
    proxy.cut();
    common::eventually(Duration::from_secs(20), "every client came back", || {
        proxy.accepted() as usize >= before + CLIENTS
    })
    .await;
    common::eventually(Duration::from_secs(20), "every client is connected", || {
        clients.iter().all(Consumer::is_connected)
    })
    .await;
    let times = proxy.accept_times();
    let back: Vec<Duration> = times[before..]
        .iter()
        .map(|t| t.duration_since(cut_at))
        .collect();
    assert_eq!(back.len(), CLIENTS, "one reconnect each");

    // Full jitter: the first waits are uniform over the window, so each
    // tenth of it sees about a tenth of the reconnects, not a wave (the
    // clients notice the cut a little after it, so some come after it).
    let mut tenths = [0usize; 20];
    for t in &back {
        let i = (t.as_micros() * 10 / window.as_micros()).min(19) as usize;
        tenths[i] += 1;
    }
    let mut sorted = back.clone();
    sorted.sort();
    let (p10, p50, p90) = (
        sorted[CLIENTS / 10],
        sorted[CLIENTS / 2],
        sorted[CLIENTS * 9 / 10],
    );
    eprintln!(
        "reconnects per tenth of the {window:?} window after the cut: {tenths:?}; \
         p10 {p10:?}, p50 {p50:?}, p90 {p90:?}"
    );
    let busiest = tenths.iter().max().unwrap();
    assert!(*busiest <= CLIENTS / 4, "a wave of {busiest}: {tenths:?}");
    assert!(p90 - p10 >= window / 2, "p10 {p10:?} p90 {p90:?}");
    drop(clients);
    broker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_shedding_load_is_obeyed_and_another_address_is_tried() {
    let mut config = MemoryStreamerConfig::default();
    config.network.max_connections = 1;
    config.network.retry_after_ms = 700;
    let full = MessageBroker::with_config(config);
    full.start().await.unwrap();
    let full_addr = Server::spawn(&full, "127.0.0.1:0").await.unwrap();
    let proxy = FaultProxy::start(full_addr).await;
    let options = ConsumerOptions {
        client: ClientOptions {
            reconnect: ReconnectPolicy {
                initial_backoff: Duration::from_millis(300),
                ..quick("patient").reconnect
            },
            ..quick("patient")
        },
        ..ConsumerOptions::default()
    };
    let consumer = Consumer::connect_with(proxy.addr(), options).await.unwrap();
    let mut events = consumer.events();
    let mut sub = consumer.subscribe("load.t").await.unwrap();

    // The consumer loses its connection, and another client takes the
    // broker's only place before it is back (its way back is shut until
    // then).
    proxy.refuse(true);
    proxy.cut();
    let never = ClientOptions {
        reconnect: ReconnectPolicy::never(),
        ..ClientOptions::default()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let squatter = loop {
        match Publisher::connect_with(full_addr, never.clone()).await {
            Ok(publisher) => break publisher,
            Err(Error::Refused { .. }) => {
                assert!(Instant::now() < deadline, "the place never freed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(other) => panic!("{other}"),
        }
    };
    proxy.refuse(false);
    // Refused with a retry-after hint: the next wait is at least the hint.
    let deadline = Instant::now() + Duration::from_secs(10);
    let hinted = loop {
        match tokio::time::timeout(Duration::from_secs(10), events.recv()).await {
            Ok(Ok(ConnectionEvent::AttemptFailed { error, wait, .. }))
                if error.contains("connection-limit") =>
            {
                break (error, wait)
            }
            Ok(Ok(_)) => {}
            other => panic!("expected a failed attempt, got {other:?}"),
        }
        assert!(Instant::now() < deadline);
    };
    assert!(hinted.0.contains("connection-limit"), "{}", hinted.0);
    assert!(
        (Duration::from_millis(700)..=Duration::from_millis(1400)).contains(&hinted.1),
        "{hinted:?}"
    );
    // The place frees: the consumer gets in and its subscription works.
    drop(squatter);
    common::eventually(Duration::from_secs(10), "the consumer is back", || {
        consumer.is_connected()
    })
    .await;
    // Its one place is the consumer's: publish in process.
    let topic = Topic::new("load.t").unwrap();
    let message = Message::builder()
        .topic("load.t")
        .payload("in")
        .build()
        .unwrap();
    full.publish(&topic, message).await.unwrap();
    assert_eq!(next(&mut sub).await.payload, "in");

    // Given a full broker and a free one, a new client lands on the free one.
    let (free, free_addr) = retaining_broker().await;
    let addresses = vec![full_addr.to_string(), free_addr.to_string()];
    for _ in 0..5 {
        let publisher = Publisher::connect_any(&addresses, never.clone())
            .await
            .unwrap();
        assert_eq!(publisher.broker_addr(), free_addr.to_string());
    }
    free.shutdown().await.unwrap();
    full.shutdown().await.unwrap();
}

/// A client of the given kind connected through `addresses` to `want`
/// (connect_any picks at random: try until it lands there).
async fn landing_on<T>(
    want: &str,
    mut connect: impl AsyncFnMut() -> T,
    addr_of: impl Fn(&T) -> String,
) -> T {
    for _ in 0..50 {
        let client = connect().await;
        if addr_of(&client) == want {
            return client;
        }
    }
    panic!("never landed on {want}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sigterm_the_broker_drains_and_clients_with_another_broker_move_first() {
    let drain = [("KAELIX_NETWORK_DRAIN_TIMEOUT_MS", "3000")];
    let mut a = BrokerProcess::start(&drain);
    let b = BrokerProcess::start(&drain);
    let addresses = vec![a.addr(), b.addr()];
    let consumer = landing_on(
        &a.addr(),
        async || {
            Consumer::connect_any(&addresses, consumer_options("mover"))
                .await
                .unwrap()
        },
        Consumer::broker_addr,
    )
    .await;
    let publisher = landing_on(
        &a.addr(),
        async || {
            Publisher::connect_any(&addresses, quick("mover-pub"))
                .await
                .unwrap()
        },
        Publisher::broker_addr,
    )
    .await;
    let mut events = (consumer.events(), publisher.events());
    let mut moved_sub = consumer.subscribe("drain.t").await.unwrap();
    // Clients that know only the draining broker stay with it.
    let stayer = Consumer::connect_with(a.addr(), consumer_options("stayer"))
        .await
        .unwrap();
    let mut stayed_sub = stayer.subscribe("drain.t").await.unwrap();
    let stayer_pub = Publisher::connect_with(a.addr(), quick("stayer-pub"))
        .await
        .unwrap();
    publisher.publish("drain.t", "before").await.unwrap();
    assert_eq!(next(&mut moved_sub).await.payload, "before");
    assert_eq!(next(&mut stayed_sub).await.payload, "before");

    let signalled = Instant::now();
    a.terminate();
    // Told to move on, the clients with another broker move to it while
    // the draining one still serves.
    for (who, events) in [("consumer", &mut events.0), ("publisher", &mut events.1)] {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut seen = Vec::new();
        while !seen
            .iter()
            .any(|e| matches!(e, ConnectionEvent::Moved { .. }))
        {
            assert!(Instant::now() < deadline, "{who} did not move: {seen:?}");
            if let Ok(Ok(event)) =
                tokio::time::timeout(Duration::from_millis(100), events.recv()).await
            {
                seen.push(event);
            }
        }
        assert!(
            matches!(&seen[0], ConnectionEvent::Draining { addr, .. } if *addr == a.addr()),
            "{who}: {seen:?}"
        );
        assert!(
            seen.iter()
                .any(|e| matches!(e, ConnectionEvent::Moved { to, .. } if *to == b.addr())),
            "{who}: {seen:?}"
        );
    }
    let moved_at = signalled.elapsed();
    assert_eq!(consumer.broker_addr(), b.addr());
    assert_eq!(publisher.broker_addr(), b.addr());
    // The draining broker reports so and takes no new connections...
    let (status, body) = a.http_get("/healthz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("draining"), "{body}");
    let never = ClientOptions {
        reconnect: ReconnectPolicy::never(),
        ..ClientOptions::default()
    };
    assert!(Publisher::connect_with(a.addr(), never).await.is_err());
    // ...but serves the clients that stay.
    stayer_pub.publish("drain.t", "during").await.unwrap();
    assert_eq!(next(&mut stayed_sub).await.payload, "during");
    // The moved ones work on the other broker.
    publisher.publish("drain.t", "moved").await.unwrap();
    assert_eq!(next(&mut moved_sub).await.payload, "moved");

    // Then it stops, within the drain time and the flush.
    let status = tokio::task::spawn_blocking(move || a.wait_exit(Duration::from_secs(10)))
        .await
        .unwrap()
        .expect("the draining broker exits");
    assert!(status.success(), "{status}");
    assert!(moved_at < signalled.elapsed());
    eprintln!(
        "moved {moved_at:?} after SIGTERM; the broker exited after {:?}",
        signalled.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kaelix_broker_drain_pid_drains_a_running_broker_and_waits_for_it() {
    let mut broker = BrokerProcess::start(&[("KAELIX_NETWORK_DRAIN_TIMEOUT_MS", "500")]);
    let consumer = Consumer::connect_with(broker.addr(), consumer_options("told"))
        .await
        .unwrap();
    let mut events = consumer.events();
    let pid = broker.child.id().to_string();
    let drainer = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_kaelix-broker"))
            .args(["--drain", &pid, "--drain-wait", "20"])
            .output()
            .expect("run kaelix-broker --drain")
    });
    // This test started the broker, so it reaps it; --drain sees it gone.
    let exited = tokio::task::spawn_blocking(move || broker.wait_exit(Duration::from_secs(20)))
        .await
        .unwrap()
        .expect("the broker stops");
    assert!(exited.success(), "{exited}");
    let output = drainer.await.unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(stdout.contains("stopped"), "{stdout}");
    let event = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(event, ConnectionEvent::Draining { within, .. } if within == Duration::from_millis(500)),
        "{event:?}"
    );
    // Nobody is running there: a wrong pid is an error, said so.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kaelix-broker"))
        .args(["--drain", "0"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gives_up_after_its_attempts_and_says_why() {
    let (broker, addr) = retaining_broker().await;
    let proxy = FaultProxy::start(addr).await;
    let options = ClientOptions {
        reconnect: ReconnectPolicy {
            max_attempts: 2,
            ..quick("quitter").reconnect
        },
        ..quick("quitter")
    };
    let publisher = Publisher::connect_with(proxy.addr(), options)
        .await
        .unwrap();
    let mut events = publisher.events();
    proxy.refuse(true);
    proxy.cut();
    let gave_up = loop {
        match tokio::time::timeout(Duration::from_secs(10), events.recv()).await {
            Ok(Ok(ConnectionEvent::GaveUp { attempts, .. })) => break attempts,
            Ok(Ok(_)) => {}
            other => panic!("expected the client to give up, got {other:?}"),
        }
    };
    assert_eq!(gave_up, 2);
    match publisher.publish("seq.quit", "late").await {
        Err(Error::Closed(reason)) => {
            assert!(reason.to_string().contains("gave up"), "{reason}")
        }
        other => panic!("expected the closed client's error, got {other:?}"),
    }
    broker.shutdown().await.unwrap();
}
