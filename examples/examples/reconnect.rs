//! Riding through a broker restart: the publisher holds what it sends while
//! the broker is away, the consumer subscribes again on its own, and both
//! report what happens as connection events.
//!
//! ```text
//! cargo run -p kaelix-examples --example reconnect
//! ```
//!
//! The example runs its own broker (it stops and starts it), so it ignores
//! `KAELIX_SERVER`.

use std::time::Duration;

use kaelix_broker::{MessageBroker, Server};
use kaelix_consumer::{Consumer, ConsumerOptions};
use kaelix_core::client::{ClientOptions, ConnectionEvent, ReconnectPolicy};
use kaelix_publisher::Publisher;

async fn start_broker(addr: &str) -> Result<(MessageBroker, String), Box<dyn std::error::Error>> {
    let broker = MessageBroker::new();
    broker.start().await?;
    let bound = Server::spawn(&broker, addr).await?.to_string();
    Ok((broker, bound))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (broker, addr) = start_broker("127.0.0.1:0").await?;
    println!("broker on {addr}");

    // Come back quickly for the demonstration; the defaults wait up to 5 s.
    let client = ClientOptions {
        reconnect: ReconnectPolicy {
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(1),
            ..ReconnectPolicy::default()
        },
        ..ClientOptions::default()
    };
    let consumer = Consumer::connect_with(
        addr.as_str(),
        ConsumerOptions {
            client: client.clone(),
            ..ConsumerOptions::default()
        },
    )
    .await?;
    let publisher = Publisher::connect_with(addr.as_str(), client).await?;
    for (who, mut events) in [
        ("consumer", consumer.events()),
        ("publisher", publisher.events()),
    ] {
        tokio::spawn(async move {
            while let Ok(event) = events.recv().await {
                match &event {
                    ConnectionEvent::AttemptFailed { .. } => {}
                    _ => println!("  [{who}] {event}"),
                }
            }
        });
    }

    let mut alerts = consumer.subscribe("alerts.>").await?;
    publisher.publish("alerts.disk", "disk 91% full").await?;
    println!("received: {:?}", alerts.recv().await?.payload);

    println!("stopping the broker");
    broker.shutdown().await?;
    // Acknowledged once the broker is back: held meanwhile, sent again, routed once.
    let held = {
        let publisher = publisher.clone();
        tokio::spawn(async move { publisher.publish("alerts.cpu", "cpu at 100%").await })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;

    println!("starting it again on {addr}");
    let (broker, _) = start_broker(&addr).await?;
    held.await??;
    println!("the publish made while the broker was down is acknowledged");

    // The subscription was made again on its own. The held publish may have
    // reached the broker before the consumer was back, so publish once more.
    loop {
        publisher.publish("alerts.net", "link down").await?;
        match tokio::time::timeout(Duration::from_millis(500), alerts.recv()).await {
            Ok(message) => {
                println!("received after the restart: {:?}", message?.payload);
                break;
            }
            Err(_) => continue,
        }
    }
    // The first flush after an outage says that fire-and-forget sends of
    // that time may be lost (there were none here).
    if let Err(err) = publisher.close().await {
        println!("close: {err}");
    }
    consumer.close().await?;
    broker.shutdown().await?;
    Ok(())
}
