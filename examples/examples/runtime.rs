//! The OptimizedRuntime: pinned workers, priorities, metrics and health,
//! with an embedded broker serving on it.
//!
//! ```text
//! cargo run -p kaelix-examples --example runtime
//! ```

use std::time::{Duration, Instant};

use kaelix_broker::{MessageBroker, Server};
use kaelix_consumer::Consumer;
use kaelix_core::runtime::{OptimizedRuntime, RuntimeConfig, TaskPriority};
use kaelix_publisher::Publisher;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // One worker per physical core, pinned; the placement is logged and
    // visible in the metrics.
    let runtime = OptimizedRuntime::new(RuntimeConfig {
        task_queue_depth: 1024,
        target_latency_us: 100,
        ..Default::default()
    })?;
    runtime.start().await?;
    println!("topology: {}", runtime.topology());
    for place in runtime.placement() {
        println!(
            "worker {} pinned to cpu {} (node {})",
            place.worker, place.cpu, place.node
        );
    }

    // Background work that never ends does not hold up urgent work.
    for _ in 0..8 {
        runtime
            .spawn_with_priority(TaskPriority::Background, async {
                loop {
                    let start = Instant::now();
                    while start.elapsed() < Duration::from_micros(50) {
                        std::hint::spin_loop();
                    }
                    kaelix_core::runtime::yield_now().await;
                }
            })
            .await?;
    }
    let spawned = Instant::now();
    let waited = runtime
        .spawn_with_priority(TaskPriority::Critical, async move { spawned.elapsed() })
        .await?
        .await?;
    println!("a Critical task started {waited:?} after its spawn, under a Background flood");

    // A broker embedded on the runtime: its connections run at High.
    let broker = MessageBroker::new();
    broker.use_runtime(runtime.handle());
    broker.start().await?;
    let addr = Server::spawn(&broker, "127.0.0.1:0").await?.to_string();
    let consumer = Consumer::connect(&addr).await?;
    let mut subscription = consumer.subscribe("runtime.demo").await?;
    let publisher = Publisher::connect(&addr).await?;
    publisher
        .publish("runtime.demo", "hello from a pinned worker")
        .await?;
    let message = subscription.recv().await?;
    println!("received: {}", String::from_utf8_lossy(&message.payload));
    println!("broker: {}", broker.stats());

    let metrics = runtime.metrics();
    println!("{metrics}");
    println!("error rate: {:.2}%", metrics.error_rate() * 100.0);
    let health = runtime.health().report();
    println!("health: {} ({})", health.status, health.reason);

    publisher.close().await?;
    consumer.close().await?;
    broker.shutdown().await?;
    runtime.shutdown().await?;
    Ok(())
}
