//! Wildcard subscriptions and queue groups.
//!
//! `*` matches exactly one token, a final `>` one or more. Members of a
//! queue group share the messages: each goes to exactly one of them.
//!
//! ```text
//! cargo run -p kaelix-examples --example wildcards
//! ```

use futures_util::StreamExt;
use kaelix_consumer::Consumer;
use kaelix_publisher::Publisher;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = kaelix_examples::broker_address().await?;
    let consumer = Consumer::connect(&addr).await?;

    let signups = consumer.subscribe("events.*.signup").await?;
    let everything = consumer.subscribe("events.>").await?;
    let worker_a = consumer.subscribe_queue("jobs.>", "workers").await?;
    let worker_b = consumer.subscribe_queue("jobs.>", "workers").await?;

    let publisher = Publisher::connect(&addr).await?;
    for topic in [
        "events.user.signup",
        "events.admin.signup",
        "events.user.login",
    ] {
        publisher.publish(topic, topic.to_string()).await?;
    }
    for i in 0..4 {
        publisher
            .publish("jobs.resize", format!("image-{i}"))
            .await?;
    }

    let show = |label: &'static str| {
        move |m: kaelix_core::Message| async move {
            println!(
                "{label:>18}: {} {}",
                m.topic,
                String::from_utf8_lossy(&m.payload)
            );
        }
    };
    signups.take(2).for_each(show("events.*.signup")).await;
    everything.take(3).for_each(show("events.>")).await;
    worker_a.take(2).for_each(show("worker a")).await;
    worker_b.take(2).for_each(show("worker b")).await;
    Ok(())
}
