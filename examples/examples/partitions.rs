//! Partitions: a topic split in four, messages placed by key so that each
//! customer's orders keep their order, a partition-sticky queue group that
//! shares the partitions among its members, and a reader of one partition.
//!
//! ```text
//! cargo run -p kaelix-examples --example partitions
//! ```
//!
//! With `KAELIX_SERVER` set, the broker there needs the same `[[topics]]`
//! entry as the embedded one below (`pattern = "orders.*"`, `partitions = 4`).

use std::collections::BTreeMap;
use std::time::Duration;

use kaelix_consumer::{Consumer, Subscription};
use kaelix_core::config::TopicConfig;
use kaelix_core::{MemoryStreamerConfig, Message, PartitionId, StartPosition, SubscribeOptions};
use kaelix_examples::broker_address_with;
use kaelix_publisher::Publisher;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = MemoryStreamerConfig::default();
    config.topics.push(TopicConfig {
        pattern: "orders.*".into(),
        partitions: 4,
        ..TopicConfig::default()
    });
    let addr = broker_address_with(config).await?;

    // Two billing workers: with sticky partitions each owns whole
    // partitions (p % 2), so it sees every order of its customers in order.
    let sticky = SubscribeOptions::new()
        .queue_group("billing")
        .sticky_partitions();
    let first = Consumer::connect(addr.as_str()).await?;
    let mut worker_a = first
        .subscribe_with("orders.created", sticky.clone())
        .await?;
    let second = Consumer::connect(addr.as_str()).await?;
    let mut worker_b = second.subscribe_with("orders.created", sticky).await?;

    // Orders keyed by customer: one customer, one partition.
    let publisher = Publisher::connect(addr.as_str()).await?;
    for (n, customer) in ["ada", "grace", "alan", "ada", "edsger", "grace", "ada"]
        .iter()
        .enumerate()
    {
        let order = Message::builder()
            .topic("orders.created")
            .key(*customer)
            .payload(format!("order-{n} for {customer}"))
            .build()?;
        publisher.publish_message(&order).await?;
    }
    // Or a partition named outright; one the topic lacks is refused.
    let audit = Message::builder()
        .topic("orders.created")
        .partition(PartitionId::new(3))
        .payload("audit marker")
        .build()?;
    publisher.publish_message(&audit).await?;
    let beyond = Message::builder()
        .topic("orders.created")
        .partition(PartitionId::new(9))
        .payload("lost?")
        .build()?;
    if let Err(err) = publisher.publish_message(&beyond).await {
        println!("refused: {err}");
    }

    for (name, worker) in [("worker a", &mut worker_a), ("worker b", &mut worker_b)] {
        let mut by_partition: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        for message in drain(worker).await {
            let partition = message.partition.map_or(0, |p| p.get());
            let offset = message.offset.map_or(0, |o| o.get());
            let text = String::from_utf8_lossy(&message.payload);
            by_partition
                .entry(partition)
                .or_default()
                .push(format!("{offset}:{text}"));
        }
        for (partition, orders) in by_partition {
            println!("{name}, partition {partition}: {}", orders.join(", "));
        }
    }

    // A reader of one partition, from the oldest message it still holds.
    let ada = PartitionId::for_key(b"ada", 4);
    let reader = Consumer::connect(addr.as_str()).await?;
    let options = SubscribeOptions::new()
        .partitions([ada])
        .start(StartPosition::Earliest);
    let mut partition = reader.subscribe_with("orders.created", options).await?;
    let replayed: Vec<String> = drain(&mut partition)
        .await
        .iter()
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect();
    println!(
        "partition {ada} (ada's) from the start: {}",
        replayed.join(", ")
    );
    Ok(())
}

/// What arrives until the subscription has been quiet for a moment.
async fn drain(subscription: &mut Subscription) -> Vec<Message> {
    let mut out = Vec::new();
    while let Ok(Ok(message)) =
        tokio::time::timeout(Duration::from_millis(200), subscription.recv()).await
    {
        out.push(message);
    }
    out
}
