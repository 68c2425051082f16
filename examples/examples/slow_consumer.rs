//! Slow consumers: what happens to a subscriber that cannot keep up, under
//! each policy, while the rest of the broker carries on — and a network
//! consumer that paces the broker with a credit window instead.
//!
//! ```text
//! cargo run -p kaelix-examples --example slow_consumer
//! ```

use std::time::{Duration, Instant};

use kaelix_broker::{MessageBroker, Server};
use kaelix_consumer::Consumer;
use kaelix_core::config::TopicConfig;
use kaelix_core::{
    CreditWindow, MemoryStreamerConfig, Message, SlowConsumerPolicy, SubscribeOptions, Topic,
};
use kaelix_publisher::Publisher;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // An in-process broker whose receivers hold at most 100 messages;
    // prices.* drop their oldest when behind, the rest disconnect.
    let mut config = MemoryStreamerConfig::default();
    config.limits.max_pending_messages = 100;
    config.topics.push(TopicConfig {
        pattern: "prices.*".into(),
        slow_consumer: SlowConsumerPolicy::DropOldest,
        ..TopicConfig::default()
    });
    let broker = MessageBroker::with_config(config);
    broker.start().await?;

    // drop_oldest: a ticker that was busy gets the newest prices and is
    // told what it missed.
    let topic = Topic::new("prices.eurusd")?;
    let mut ticker = broker.subscribe(&topic).await?;
    for i in 0..1_000u32 {
        let price = format!("1.{:04}", 800 + i);
        broker
            .publish(&topic, Message::new(topic.clone(), price)?)
            .await?;
    }
    let first = ticker.recv().await?;
    println!(
        "drop_oldest: first price read {} (offset {}), missed {}",
        String::from_utf8_lossy(&first.payload),
        first.offset.expect("an offset"),
        ticker.missed()
    );
    for gap in ticker.take_gaps() {
        println!(
            "  gap on {}: offsets {}..={} ({} messages), replayable while retained",
            gap.topic, gap.first, gap.last, gap.count
        );
    }

    // block: the publisher waits for the subscriber instead.
    let topic = Topic::new("orders.created")?;
    let options = SubscribeOptions::new().slow_consumer(SlowConsumerPolicy::Block);
    let mut orders = broker.subscribe_with(&topic, options).await?;
    let publishing = {
        let broker = broker.clone();
        let topic = topic.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            for i in 0..300u32 {
                let message = Message::new(topic.clone(), i.to_be_bytes().to_vec())?;
                broker.publish(&topic, message).await?;
            }
            Ok::<_, kaelix_core::Error>(started.elapsed())
        })
    };
    // A consumer that takes its time: the publisher is held back by it.
    for _ in 0..300 {
        orders.recv().await?;
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    let took = publishing.await??;
    println!("block: 300 orders, none lost; the publisher took {took:?}, paced by the consumer");

    // disconnect (the default): a receiver that never reads is closed,
    // and nobody else notices.
    let topic = Topic::new("audit.log")?;
    let mut stuck = broker.subscribe(&topic).await?;
    for i in 0..200u32 {
        broker
            .publish(
                &topic,
                Message::new(topic.clone(), i.to_be_bytes().to_vec())?,
            )
            .await?;
    }
    let mut read = 0;
    let reason = loop {
        match stuck.recv().await {
            Ok(_) => read += 1,
            Err(err) => break err,
        }
    };
    println!("disconnect: read {read}, then: {reason}");
    // credit: a network consumer with a window of 32 messages reads at its
    // own pace; the broker sends no more than the window and keeps the
    // rest in the topic's retained window until it asks for more.
    let addr = Server::spawn(&broker, "127.0.0.1:0").await?.to_string();
    let consumer = Consumer::connect(addr.as_str()).await?;
    let options = SubscribeOptions::new().credit(CreditWindow::messages(32));
    let mut paced = consumer.subscribe_with("reports.daily", options).await?;
    let publisher = Publisher::connect(addr.as_str()).await?;
    for i in 0..500u32 {
        publisher
            .send("reports.daily", i.to_be_bytes().to_vec())
            .await?;
    }
    publisher.flush().await?;
    let mut last = None;
    for _ in 0..500 {
        let report = paced.recv().await?;
        last = report.offset;
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    println!(
        "credit: 500 reports read at the consumer's pace, last offset {}, missed {}",
        last.expect("an offset"),
        paced.missed()
    );

    let stats = broker.stats();
    println!(
        "stats: {} dropped, {} waits, {} disconnected",
        stats.slow_consumer_drops, stats.slow_consumer_waits, stats.slow_consumers
    );
    Ok(())
}
