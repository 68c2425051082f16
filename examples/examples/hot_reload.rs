//! Hot reload in an embedded broker: a `HotReloadManager` watches the
//! configuration file, `MessageBroker::reconfigure` applies each change,
//! and an open connection feels the new payload limit at once.
//!
//! ```text
//! cargo run -p kaelix-examples --example hot_reload
//! ```

use std::path::Path;
use std::time::Duration;

use kaelix_broker::{MessageBroker, Server};
use kaelix_core::config::{load_from, HotReloadManager};
use kaelix_publisher::Publisher;

/// Writes the file the safe way: a temporary file renamed over the old one.
fn write_config(path: &Path, max_payload: usize) -> std::io::Result<()> {
    let tmp = path.with_extension("toml.new");
    std::fs::write(
        &tmp,
        format!("[limits]\nmax_payload_bytes = {max_payload}\n"),
    )?;
    std::fs::rename(&tmp, path)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("kaelix-hot-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("kaelix.toml");
    write_config(&file, 4096)?;

    // The file under the process's KAELIX_* variables, as the broker loads it.
    let config = load_from(Some(&file), std::env::vars())?;
    let broker = MessageBroker::with_config(config.clone());
    broker.start().await?;
    let addr = Server::spawn(&broker, "127.0.0.1:0").await?;
    let reload = HotReloadManager::new(&file, config, None).await?;
    let mut changes = reload.subscribe();

    let publisher = Publisher::connect(addr).await?;
    publisher.publish("reload.demo", vec![0u8; 2000]).await?;
    println!("2000-byte publish accepted under max_payload_bytes = 4096");

    write_config(&file, 1000)?;
    let change = tokio::time::timeout(Duration::from_secs(10), changes.recv()).await??;
    println!("{} changed {:?}", change.timestamp, change.changed);
    let done = broker.reconfigure(&change.new_config);
    println!("applied live: {:?}", done.applied);

    match publisher.publish("reload.demo", vec![0u8; 2000]).await {
        Err(err) => println!("the same connection now gets: {err}"),
        Ok(()) => println!("unexpectedly accepted"),
    }

    // A broken edit is refused; the broker keeps the running configuration.
    std::fs::write(dir.join("broken.new"), "[limits\n")?;
    std::fs::rename(dir.join("broken.new"), &file)?;
    if let Err(err) = reload.force_reload().await {
        println!("broken edit refused: {err}");
    }
    println!(
        "still running with max_payload_bytes = {}",
        broker.config().limits.max_payload_bytes
    );

    broker.shutdown().await?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
