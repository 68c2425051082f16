//! Observability of an embedded broker: the Prometheus endpoint, the
//! health check, and the statistics a client can ask for.
//!
//! ```text
//! cargo run -p kaelix-examples --example metrics
//! ```

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use kaelix_broker::{MessageBroker, Server};
use kaelix_consumer::Consumer;
use kaelix_core::MemoryStreamerConfig;
use kaelix_publisher::Publisher;

/// `GET path` over plain HTTP/1.1: the response body.
fn get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(addr)?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or(response))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The endpoint on a free local port instead of 0.0.0.0:9090.
    let mut config = MemoryStreamerConfig::default();
    config.telemetry.metrics.prometheus.host = "127.0.0.1".into();
    config.telemetry.metrics.prometheus.port = 0;
    let broker = MessageBroker::with_config(config);
    broker.start().await?;
    let addr = Server::spawn(&broker, "127.0.0.1:0").await?;
    let metrics = broker
        .serve_metrics()?
        .expect("enabled in the default configuration");
    println!("metrics on http://{metrics}/metrics");

    let consumer = Consumer::connect(addr).await?;
    let mut orders = consumer.subscribe("orders.*").await?;
    let publisher = Publisher::connect(addr).await?;
    for i in 0..100u32 {
        publisher
            .publish("orders.created", i.to_be_bytes().to_vec())
            .await?;
    }
    for _ in 0..100 {
        orders.recv().await?;
    }

    // A scrape, as Prometheus sees it (a blocking read, off the runtime).
    let text = tokio::task::spawn_blocking(move || get(metrics, "/metrics")).await??;
    for line in text.lines().filter(|l| {
        l.starts_with("kaelix_messages_")
            || l.starts_with("kaelix_connections_active")
            || l.starts_with("kaelix_delivery_latency_seconds_count")
    }) {
        println!("{line}");
    }
    let health = tokio::task::spawn_blocking(move || get(metrics, "/healthz")).await??;
    println!("/healthz: {}", health.trim());

    // What `kaelix stats --json` prints, asked for over the client port.
    println!("STATS: {}", publisher.server_stats().await?);
    println!("in process: {}", broker.stats());

    broker.shutdown().await?;
    Ok(())
}
