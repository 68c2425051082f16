//! `size_cap`: a payload size cap for the topics matched.

use kaelix_core::plugin::{Plugin, PluginContext, ProcessingAction, StreamProcessor};
use kaelix_core::{Message, Result};

use super::{bad, integer, known_keys, Refusal};

/// Refuses payloads over a size, below the broker-wide
/// `limits.max_payload_bytes`.
///
/// ```toml
/// [[plugins]]
/// name = "size_cap"
/// pattern = "telemetry.>"
/// [plugins.config]
/// max_bytes = 4096
/// action = "drop"          # or "dead_letter"
/// ```
#[derive(Debug)]
pub struct SizeCap {
    max: usize,
    refusal: Refusal,
}

impl Default for SizeCap {
    fn default() -> Self {
        SizeCap {
            max: usize::MAX,
            refusal: Refusal::Drop,
        }
    }
}

impl Plugin for SizeCap {
    fn name(&self) -> &str {
        "size_cap"
    }

    fn version(&self) -> &str {
        env!("CARGO_PKG_VERSION")
    }

    fn initialize(&mut self, context: &PluginContext) -> Result<()> {
        known_keys(context, &["max_bytes", "action"])?;
        self.refusal = Refusal::from_config(context, Refusal::Drop)?;
        self.max = integer(context, "max_bytes")?
            .ok_or_else(|| bad(context, "max_bytes", "is required"))? as usize;
        Ok(())
    }
}

impl StreamProcessor for SizeCap {
    fn process_message(&mut self, message: &mut Message) -> Result<ProcessingAction> {
        let size = message.payload.len();
        if size > self.max {
            return Ok(self.refusal.action(format!(
                "payload of {size} bytes is over the cap of {} bytes for {}",
                self.max, message.topic
            )));
        }
        Ok(ProcessingAction::Continue)
    }
}
