//! Publish and subscribe over TCP with the client crates.
//!
//! ```text
//! cargo run -p kaelix-examples --example pubsub
//! KAELIX_SERVER=127.0.0.1:8080 cargo run -p kaelix-examples --example pubsub
//! ```

use kaelix_consumer::Consumer;
use kaelix_core::Message;
use kaelix_publisher::Publisher;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = kaelix_examples::broker_address().await?;

    let consumer = Consumer::connect(&addr).await?;
    let mut subscription = consumer.subscribe("events.user.signup").await?;

    let publisher = Publisher::connect(&addr).await?;
    // Acknowledged: returns once the broker has routed the message.
    publisher.publish("events.user.signup", "alice").await?;

    // With headers, through the builder.
    let message = Message::builder()
        .topic("events.user.signup")
        .payload(r#"{"user": "bob"}"#)
        .header("content-type", "application/json")
        .build()?;
    publisher.publish_message(&message).await?;

    // Fire-and-forget, batched; flush reports anything the broker refused.
    for i in 0..3 {
        publisher
            .send("events.user.signup", format!("guest-{i}"))
            .await?;
    }
    publisher.flush().await?;

    for _ in 0..5 {
        let message = subscription.recv().await?;
        println!(
            "{} {} (content-type: {})",
            message.topic,
            String::from_utf8_lossy(&message.payload),
            message.header("content-type").unwrap_or("none"),
        );
    }
    publisher.close().await?;
    consumer.close().await?;
    Ok(())
}
