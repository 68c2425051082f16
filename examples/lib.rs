//! Shared set-up for the examples: the broker they talk to.
//!
//! With `KAELIX_SERVER=host:port` set, examples use that broker (start one
//! with `cargo run --release --bin kaelix-broker`). Without it, they start
//! a broker inside the example process on a free port, so that each runs on
//! its own with `cargo run -p kaelix-examples --example NAME`.

use kaelix_broker::{MessageBroker, Server};
use kaelix_core::MemoryStreamerConfig;

/// The address of the broker to use, starting an embedded one if
/// `KAELIX_SERVER` is not set.
pub async fn broker_address() -> Result<String, Box<dyn std::error::Error>> {
    broker_address_with(MemoryStreamerConfig::default()).await
}

/// The same, with `config` for the embedded broker (a broker named by
/// `KAELIX_SERVER` needs the same settings in its own `kaelix.toml`).
pub async fn broker_address_with(
    config: MemoryStreamerConfig,
) -> Result<String, Box<dyn std::error::Error>> {
    if let Ok(addr) = std::env::var("KAELIX_SERVER") {
        return Ok(addr);
    }
    let broker = MessageBroker::with_config(config);
    broker.start().await?;
    let addr = Server::spawn(&broker, "127.0.0.1:0").await?.to_string();
    println!("(started an embedded broker on {addr}; set KAELIX_SERVER to use your own)");
    Ok(addr)
}
