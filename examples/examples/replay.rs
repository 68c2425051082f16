//! Catching up: a consumer that starts late reads what the broker still
//! holds of a topic, then carries on live, and resumes by offset.
//!
//! ```text
//! cargo run -p kaelix-examples --example replay
//! ```

use kaelix_consumer::Consumer;
use kaelix_core::StartPosition;
use kaelix_examples::broker_address;
use kaelix_publisher::Publisher;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = broker_address().await?;
    let publisher = Publisher::connect(addr.as_str()).await?;
    // Published before anyone subscribed: kept by the broker (by default
    // the last 1,000 messages of each topic).
    for id in 1..=5 {
        publisher
            .publish("orders.created", format!("order-{id}"))
            .await?;
    }

    let consumer = Consumer::connect(addr.as_str()).await?;
    let mut orders = consumer
        .subscribe_from("orders.created", StartPosition::Earliest)
        .await?;
    // Live messages follow the retained ones with no gap and no duplicate.
    publisher.publish("orders.created", "order-6").await?;
    let mut last_seen = 0;
    for _ in 0..6 {
        let message = orders.recv().await?;
        let offset = message.offset.expect("every delivery carries its offset");
        println!(
            "offset {offset}: {}",
            String::from_utf8_lossy(&message.payload)
        );
        last_seen = offset.get();
    }

    // A service that stored `last_seen` resumes right after it.
    publisher.publish("orders.created", "order-7").await?;
    drop(orders);
    let mut resumed = consumer
        .subscribe_from("orders.created", StartPosition::Offset(last_seen + 1))
        .await?;
    let next = resumed.recv().await?;
    println!(
        "resumed at offset {}: {}",
        next.offset.expect("an offset"),
        String::from_utf8_lossy(&next.payload)
    );
    println!("missed while away: {}", resumed.missed());
    Ok(())
}
