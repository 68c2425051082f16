//! The fast paths: publish a burst with one call, consume borrowed views
//! without allocating per message.
//!
//! ```text
//! cargo run --release -p kaelix-examples --example batching
//! ```

use std::time::Instant;

use kaelix_consumer::Consumer;
use kaelix_core::Topic;
use kaelix_publisher::Publisher;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = kaelix_examples::broker_address().await?;
    let consumer = Consumer::connect(&addr).await?;
    let mut ticks = consumer.subscribe("ticks.>").await?;

    let publisher = Publisher::connect(&addr).await?;
    let topic = Topic::new("ticks.eurusd")?;
    const BURSTS: usize = 1_000;
    const PER_BURST: usize = 256;
    let payloads: Vec<[u8; 16]> = (0..PER_BURST as u64)
        .map(|i| {
            let mut p = [0u8; 16];
            p[..8].copy_from_slice(&i.to_be_bytes());
            p
        })
        .collect();

    let started = Instant::now();
    let receiving = tokio::spawn(async move {
        let mut received = 0;
        let mut bytes = 0;
        while received < BURSTS * PER_BURST {
            // Each call hands over everything buffered now, borrowed.
            received += ticks.recv_batch(|m| bytes += m.payload.len()).await?;
        }
        Ok::<_, kaelix_core::Error>((received, bytes))
    });
    for _ in 0..BURSTS {
        // One append to the send buffer for the whole burst.
        publisher.send_batch(&topic, &payloads).await?;
    }
    publisher.flush().await?;
    let (received, bytes) = receiving.await??;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{received} messages ({bytes} payload bytes) in {secs:.2} s: {:.2} M msg/s",
        received as f64 / secs / 1e6
    );
    Ok(())
}
