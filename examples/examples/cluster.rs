//! Three brokers in one process as the three nodes of a cluster: a
//! subscriber on node 1, a publisher on node 3, and the messages crossing
//! between them. In production each node is its own `kaelix-broker` with
//! a `[cluster]` section (docs/cluster.md); the keys are the same.
//!
//! ```text
//! cargo run -p kaelix-examples --example cluster
//! ```

use std::time::Duration;

use kaelix_broker::{MessageBroker, Server};
use kaelix_consumer::Consumer;
use kaelix_core::MemoryStreamerConfig;
use kaelix_publisher::Publisher;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let data = std::env::temp_dir().join(format!("kaelix-cluster-example-{}", std::process::id()));
    // Every node names all three cluster addresses as seeds; the node with
    // the lowest id founds the cluster and the others join it.
    let ports = free_ports(3)?;
    let seeds: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let mut nodes = Vec::new();
    let mut clients = Vec::new();
    for (i, seed) in seeds.iter().enumerate() {
        let mut config = MemoryStreamerConfig::default();
        config.cluster.enabled = true;
        config.cluster.node_id = i as u64 + 1;
        config.cluster.listen = seed.clone();
        config.cluster.seeds = seeds.clone();
        config.cluster.data_dir = data.join(format!("node{}", i + 1));
        let broker = MessageBroker::with_config(config);
        broker.start().await?;
        let addr = Server::spawn(&broker, "127.0.0.1:0").await?;
        broker.join_cluster(addr.to_string()).await?;
        clients.push(addr.to_string());
        nodes.push(broker);
    }

    // Wait until all three are members and a leader is elected.
    loop {
        let status = nodes[0].cluster_status().expect("a cluster node");
        if status.members.iter().filter(|m| m.up).count() == 3 && status.leader.is_some() {
            println!(
                "cluster formed: leader is node {}",
                status.leader.unwrap_or(0)
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let consumer = Consumer::connect(&clients[0]).await?;
    let mut orders = consumer.subscribe("orders.>").await?;
    // Node 3 learns of node 1's interest in a moment: until then nothing
    // crosses (a subscription is node 1's, not yet the cluster's).
    let publisher = Publisher::connect(&clients[2]).await?;
    let mut received = 0;
    let mut sent = 0;
    while received < 3 {
        publisher
            .publish("orders.eu", format!("order {sent}"))
            .await?;
        sent += 1;
        if let Ok(message) = tokio::time::timeout(Duration::from_millis(200), orders.recv()).await {
            let message = message?;
            println!(
                "node 1 got {} {} (published on node 3)",
                message.topic,
                String::from_utf8_lossy(&message.payload)
            );
            received += 1;
        }
    }

    publisher.close().await?;
    consumer.close().await?;
    for node in &nodes {
        node.shutdown().await?;
    }
    let _ = std::fs::remove_dir_all(&data);
    Ok(())
}

/// Ports free now on 127.0.0.1.
fn free_ports(n: usize) -> std::io::Result<Vec<u16>> {
    let held = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    held.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}
