//! Plugins that panic, fail or are slow, in a broker serving real clients
//! over TCP: the broker carries on, the messages are dead-lettered or pass
//! as configured, and the circuit breaker goes open, half-open and closed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kaelix_broker::{MessageBroker, Server};
use kaelix_consumer::{Consumer, Subscription};
use kaelix_core::plugin::{BreakerState, Plugin, PluginContext, ProcessingAction, StreamProcessor};
use kaelix_core::protocol::ErrorCode;
use kaelix_core::{Error, MemoryStreamerConfig, Message, Result};
use kaelix_publisher::Publisher;

const WAIT: Duration = Duration::from_secs(10);

/// Panics on payloads that start with "boom" while `armed`; tags the rest.
struct Fragile {
    armed: Arc<AtomicBool>,
    tag: String,
}

impl Plugin for Fragile {
    fn name(&self) -> &str {
        "fragile"
    }
    fn version(&self) -> &str {
        "1.0.0"
    }
    fn initialize(&mut self, context: &PluginContext) -> Result<()> {
        self.tag = context.get_config("tag").unwrap_or_default();
        Ok(())
    }
}

impl StreamProcessor for Fragile {
    fn process_message(&mut self, message: &mut Message) -> Result<ProcessingAction> {
        if self.armed.load(Ordering::Relaxed) && message.payload.starts_with(b"boom") {
            panic!("fragile plugin hit a bomb");
        }
        message.set_header("tag", self.tag.clone());
        Ok(ProcessingAction::Continue)
    }
}

/// Takes 20 ms per message.
struct Slow;

impl Plugin for Slow {
    fn name(&self) -> &str {
        "slow"
    }
    fn version(&self) -> &str {
        "1.0.0"
    }
}

impl StreamProcessor for Slow {
    fn process_message(&mut self, _message: &mut Message) -> Result<ProcessingAction> {
        std::thread::sleep(Duration::from_millis(20));
        Ok(ProcessingAction::Continue)
    }
}

async fn next(sub: &mut Subscription) -> Message {
    tokio::time::timeout(WAIT, sub.recv())
        .await
        .expect("a message in time")
        .expect("the subscription is open")
}

fn config(plugins: &str) -> MemoryStreamerConfig {
    let text = format!("{plugins}\n");
    let mut config: MemoryStreamerConfig = toml::from_str(&text).unwrap();
    config.telemetry.metrics.prometheus.port = 0;
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_plugin_dead_letters_its_message_and_its_breaker_cycles() {
    let broker = MessageBroker::with_config(config(
        r#"
[[plugins]]
name = "fragile"
pattern = "work.>"
failure_threshold = 3
cooldown_ms = 300
when_off = "bypass"
[plugins.config]
tag = "seen"
"#,
    ));
    let armed = Arc::new(AtomicBool::new(true));
    let plugin_armed = armed.clone();
    broker
        .register_plugin(
            "fragile",
            Box::new(Fragile {
                armed: plugin_armed,
                tag: String::new(),
            }),
        )
        .unwrap();
    broker.start().await.unwrap();
    let addr = Server::spawn(&broker, "127.0.0.1:0").await.unwrap();

    let consumer = Consumer::connect(addr).await.unwrap();
    let mut work = consumer.subscribe("work.items").await.unwrap();
    let mut dead = consumer.subscribe("kaelix.dead_letter").await.unwrap();
    let publisher = Publisher::connect(addr).await.unwrap();

    publisher.publish("work.items", "fine").await.unwrap();
    assert_eq!(next(&mut work).await.header("tag"), Some("seen"));

    // A panic: the message is dead-lettered, the publisher told, the broker
    // and this connection carry on.
    for i in 0..3 {
        match publisher.publish("work.items", format!("boom {i}")).await {
            Err(Error::Refused { code, reason }) => {
                assert_eq!(code, ErrorCode::DeadLettered);
                assert!(
                    reason.contains("panicked: fragile plugin hit a bomb"),
                    "{reason}"
                );
            }
            other => panic!("expected a dead-letter refusal, got {other:?}"),
        }
        let d = next(&mut dead).await;
        assert_eq!(d.header("kaelix-dead-letter-plugin"), Some("fragile"));
        assert_eq!(d.header("kaelix-dead-letter-topic"), Some("work.items"));
    }
    // Three in a row: switched off. Messages now pass without it (bypass).
    let handle = broker.plugins().into_iter().next().unwrap();
    assert_eq!(handle.breaker_state(), BreakerState::Open);
    publisher
        .publish("work.items", "boom while off")
        .await
        .unwrap();
    let m = next(&mut work).await;
    assert_eq!(
        (&m.payload[..], m.header("tag")),
        (&b"boom while off"[..], None)
    );

    // After the cool-down, one message tries it: it panics again → open.
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert!(publisher.publish("work.items", "boom trial").await.is_err());
    assert_eq!(handle.breaker_state(), BreakerState::Open);
    next(&mut dead).await;

    // Fixed; after the cool-down the trial passes and it is closed again.
    armed.store(false, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(350)).await;
    publisher
        .publish("work.items", "boom defused")
        .await
        .unwrap();
    assert_eq!(next(&mut work).await.header("tag"), Some("seen"));
    assert_eq!(handle.breaker_state(), BreakerState::Closed);

    let metrics = broker.render_metrics();
    for line in [
        "kaelix_plugin_failures_total{plugin=\"fragile\",kind=\"panic\"} 4",
        "kaelix_plugin_state_changes_total{plugin=\"fragile\",state=\"open\"} 2",
        "kaelix_plugin_state_changes_total{plugin=\"fragile\",state=\"half_open\"} 2",
        "kaelix_plugin_state_changes_total{plugin=\"fragile\",state=\"closed\"} 1",
        "kaelix_plugin_state{plugin=\"fragile\"} 0",
        "kaelix_plugin_skipped_total{plugin=\"fragile\"} 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "missing {line}\n{metrics}"
        );
    }
    broker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_plugin_is_switched_off_and_its_topic_dead_lettered_while_off() {
    let broker = MessageBroker::with_config(config(
        r#"
[[plugins]]
name = "slow"
pattern = "slow.>"
time_budget_us = 5000
failure_threshold = 2
cooldown_ms = 60000
when_off = "dead_letter"
"#,
    ));
    broker.register_plugin("slow", Box::new(Slow)).unwrap();
    broker.start().await.unwrap();
    let addr = Server::spawn(&broker, "127.0.0.1:0").await.unwrap();
    let consumer = Consumer::connect(addr).await.unwrap();
    let mut slow = consumer.subscribe("slow.lane").await.unwrap();
    let mut fast = consumer.subscribe("fast.lane").await.unwrap();
    let mut dead = consumer.subscribe("kaelix.dead_letter").await.unwrap();
    let publisher = Publisher::connect(addr).await.unwrap();

    // Over budget: the answer stands (delivered), but it counts.
    for _ in 0..2 {
        publisher.publish("slow.lane", "late").await.unwrap();
        next(&mut slow).await;
    }
    let handle = broker.plugins().into_iter().next().unwrap();
    assert_eq!(handle.breaker_state(), BreakerState::Open);
    // Off, under when_off = dead_letter.
    match publisher.publish("slow.lane", "held").await {
        Err(Error::Refused { code, reason }) => {
            assert_eq!(code, ErrorCode::DeadLettered);
            assert!(
                reason.contains("switched off by its circuit breaker"),
                "{reason}"
            );
        }
        other => panic!("expected a dead-letter refusal, got {other:?}"),
    }
    assert_eq!(&next(&mut dead).await.payload[..], b"held");
    // Other topics never met it.
    publisher.publish("fast.lane", "quick").await.unwrap();
    next(&mut fast).await;
    let metrics = broker.render_metrics();
    assert!(metrics
        .lines()
        .any(|l| l == "kaelix_plugin_failures_total{plugin=\"slow\",kind=\"over_budget\"} 2"));
    broker.shutdown().await.unwrap();
}
