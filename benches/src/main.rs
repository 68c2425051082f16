//! `kaelix-bench`: end-to-end load against a running broker.
//!
//! ```text
//! cargo run --release --bin kaelix-broker &
//! cargo run --release -p kaelix-bench -- throughput --size 16 --duration 5
//! ```
//!
//! `throughput` runs publishers that send fire-and-forget and subscribers on
//! one topic, and reports what the subscribers received per second, from the
//! first publish to the last delivery. Publishers keep at most
//! `--window-bytes` of payload in flight ahead of the slowest subscriber, so that the figure is
//! a rate the subscribers sustain rather than a burst that ends in a
//! slow-consumer disconnect.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, Subcommand};
use kaelix_consumer::Consumer;
use kaelix_publisher::Publisher;

#[derive(Parser)]
#[command(
    name = "kaelix-bench",
    about = "End-to-end load against a Kaelix broker"
)]
struct Args {
    /// Broker address.
    #[arg(long, short, default_value = "127.0.0.1:8080", global = true)]
    server: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Messages per second from publishers to subscribers over TCP.
    Throughput {
        /// Payload bytes per message.
        #[arg(long, default_value_t = 16)]
        size: usize,
        /// Seconds to publish for.
        #[arg(long, default_value_t = 5.0)]
        duration: f64,
        /// Publishing connections.
        #[arg(long, default_value_t = 1)]
        publishers: usize,
        /// Subscribing connections (each gets every message).
        #[arg(long, default_value_t = 1)]
        subscribers: usize,
        /// Payload bytes in flight ahead of the slowest subscriber; keep it
        /// well under the broker's limits.max_pending_bytes.
        #[arg(long, default_value_t = 16 << 20)]
        window_bytes: u64,
    },
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    match args.command {
        Command::Throughput {
            size,
            duration,
            publishers,
            subscribers,
            window_bytes,
        } => {
            let window = (window_bytes / size.max(1) as u64).max(1024);
            let duration = Duration::from_secs_f64(duration);
            throughput(
                &args.server,
                size,
                duration,
                publishers,
                subscribers,
                window,
            )
            .await
        }
    }
}

async fn throughput(
    server: &str,
    size: usize,
    duration: Duration,
    publishers: usize,
    subscribers: usize,
    window: u64,
) -> Result<(), Box<dyn std::error::Error>> {
    let topic = format!("bench.{}", std::process::id());
    let mut subs = Vec::new();
    for _ in 0..subscribers {
        let consumer = Consumer::connect(server).await?;
        let subscription = consumer.subscribe(&topic).await?;
        subs.push((consumer, subscription));
    }
    let stop = Arc::new(AtomicBool::new(false));
    // Messages received by each subscriber, and sent by all publishers.
    let received: Arc<Vec<AtomicU64>> =
        Arc::new((0..subscribers).map(|_| AtomicU64::new(0)).collect());
    let sent_total = Arc::new(AtomicU64::new(0));
    let payload = Bytes::from(vec![0x5a; size]);
    let start = Instant::now();
    let mut senders = Vec::new();
    for _ in 0..publishers {
        let publisher = Publisher::connect(server).await?;
        let (stop, payload, topic) = (stop.clone(), payload.clone(), topic.clone());
        let (received, sent_total) = (received.clone(), sent_total.clone());
        senders.push(tokio::spawn(async move {
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let slowest = received
                    .iter()
                    .map(|r| r.load(Ordering::Relaxed))
                    .min()
                    .unwrap_or(0);
                if sent_total.load(Ordering::Relaxed).saturating_sub(slowest) > window {
                    tokio::time::sleep(Duration::from_micros(100)).await;
                    continue;
                }
                for _ in 0..1024 {
                    publisher.send(&topic, payload.clone()).await?;
                }
                sent += 1024;
                sent_total.fetch_add(1024, Ordering::Relaxed);
            }
            publisher.flush().await?;
            Ok::<u64, kaelix_core::Error>(sent)
        }));
    }
    let mut receivers = Vec::new();
    for (i, (consumer, mut subscription)) in subs.into_iter().enumerate() {
        let counter = received.clone();
        receivers.push(tokio::spawn(async move {
            let _keep = consumer;
            let mut n = 0u64;
            loop {
                // Take what is buffered without a timer per message.
                while subscription.try_recv().is_some() {
                    n += 1;
                }
                counter[i].store(n, Ordering::Relaxed);
                let last = Instant::now();
                match tokio::time::timeout(Duration::from_secs(2), subscription.recv()).await {
                    Ok(Ok(_)) => n += 1,
                    _ => return (n, last),
                }
            }
        }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut sent = 0;
    for s in senders {
        sent += s.await??;
    }
    let mut delivered = 0;
    let mut end = start;
    for r in receivers {
        let (n, last) = r.await?;
        delivered += n;
        end = end.max(last);
    }
    let secs = (end - start).as_secs_f64();
    let rate = delivered as f64 / secs;
    println!(
        "size={size}B publishers={publishers} subscribers={subscribers} sent={sent} delivered={delivered} \
         elapsed={secs:.2}s rate={:.0} msg/s ({:.1} MB/s payload)",
        rate,
        rate * size as f64 / 1e6
    );
    if delivered != sent * subscribers as u64 {
        eprintln!(
            "warning: {} messages missing",
            sent * subscribers as u64 - delivered
        );
    }
    Ok(())
}
