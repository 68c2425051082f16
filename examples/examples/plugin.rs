//! Writing a plugin and putting it in the broker's publish path.
//!
//! `Redact` masks card numbers in JSON payloads and counts what it masked;
//! a `[[plugins]]` entry puts it on `payments.>` after the built-in
//! `json_validate`, which dead-letters what is not JSON.
//!
//! ```text
//! cargo run -p kaelix-examples --example plugin
//! ```

use bytes::Bytes;
use kaelix_broker::{MessageBroker, Server};
use kaelix_consumer::Consumer;
use kaelix_core::plugin::{
    Plugin, PluginContext, PluginCounter, ProcessingAction, StreamProcessor,
};
use kaelix_core::{Error, MemoryStreamerConfig, Message, Result};
use kaelix_publisher::Publisher;

/// Replaces the digits of `"card": "…"` values with `*`, but the last four.
#[derive(Default)]
struct Redact {
    field: String,
    masked: Option<PluginCounter>,
}

impl Plugin for Redact {
    fn name(&self) -> &str {
        "redact"
    }

    fn version(&self) -> &str {
        "1.0.0"
    }

    fn initialize(&mut self, context: &PluginContext) -> Result<()> {
        self.field = context.get_config("field").unwrap_or_else(|| "card".into());
        // Taken once: each increment is then one atomic add.
        self.masked = context.metrics().map(|m| m.counter("masked"));
        Ok(())
    }
}

impl StreamProcessor for Redact {
    fn process_message(&mut self, message: &mut Message) -> Result<ProcessingAction> {
        let key = format!("\"{}\": \"", self.field);
        let text = String::from_utf8_lossy(&message.payload);
        let Some(start) = text.find(&key).map(|i| i + key.len()) else {
            return Ok(ProcessingAction::Continue);
        };
        let Some(len) = text[start..].find('"') else {
            return Ok(ProcessingAction::dead_letter("an unterminated card number"));
        };
        let value = &text[start..start + len];
        let keep = value.len().saturating_sub(4);
        let masked: String = value
            .chars()
            .enumerate()
            .map(|(i, c)| {
                if i < keep && c.is_ascii_digit() {
                    '*'
                } else {
                    c
                }
            })
            .collect();
        let payload = format!("{}{masked}{}", &text[..start], &text[start + len..]);
        message.set_payload(Bytes::from(payload));
        message.set_header("redacted", "true");
        if let Some(counter) = &self.masked {
            counter.increment(1);
        }
        Ok(ProcessingAction::Continue)
    }
}

#[tokio::main]
async fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    // In a deployment this is kaelix.toml.
    let config: MemoryStreamerConfig = toml::from_str(
        r#"
        [telemetry.metrics.prometheus]
        port = 0

        [[plugins]]
        name = "json_validate"
        pattern = "payments.>"
        order = 1

        [[plugins]]
        name = "redact"
        pattern = "payments.>"
        order = 2
        [plugins.config]
        field = "card"
        "#,
    )?;
    let broker = MessageBroker::with_config(config);
    broker.register_plugin("redact", Box::new(Redact::default()))?;
    broker.start().await?;
    let addr = Server::spawn(&broker, "127.0.0.1:0").await?;

    let consumer = Consumer::connect(addr).await?;
    let mut payments = consumer.subscribe("payments.>").await?;
    let mut dead = consumer.subscribe("kaelix.dead_letter").await?;
    let publisher = Publisher::connect(addr).await?;

    publisher
        .publish(
            "payments.eu",
            r#"{"amount": 12, "card": "4111111111111111"}"#,
        )
        .await?;
    let m = payments.recv().await?;
    println!(
        "delivered: {} (redacted: {:?})",
        String::from_utf8_lossy(&m.payload),
        m.header("redacted")
    );

    match publisher.publish("payments.eu", "not json").await {
        Err(Error::Refused { code, reason }) => println!("refused ({code}): {reason}"),
        other => println!("unexpected: {other:?}"),
    }
    let letter = dead.recv().await?;
    println!(
        "dead letter from {:?}: {:?}",
        letter.header("kaelix-dead-letter-plugin"),
        letter.header("kaelix-dead-letter-reason")
    );

    let metrics = broker.render_metrics();
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("kaelix_plugin_custom"))
    {
        println!("{line}");
    }
    broker.shutdown().await?;
    Ok(())
}
