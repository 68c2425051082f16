//! `json_validate`: the payload must parse as JSON, with the required
//! fields.

use kaelix_core::plugin::{Plugin, PluginContext, ProcessingAction, StreamProcessor};
use kaelix_core::{Message, Result};

use super::{bad, known_keys, Refusal};

/// Refuses payloads that are not JSON or lack a required field.
///
/// ```toml
/// [[plugins]]
/// name = "json_validate"
/// pattern = "orders.>"
/// [plugins.config]
/// required = ["id", "customer.email"]   # dotted: a field inside an object
/// action = "dead_letter"                # or "drop"
/// ```
#[derive(Debug)]
pub struct JsonValidate {
    required: Vec<Vec<String>>,
    refusal: Refusal,
}

impl Default for JsonValidate {
    fn default() -> Self {
        JsonValidate {
            required: Vec::new(),
            refusal: Refusal::DeadLetter,
        }
    }
}

impl Plugin for JsonValidate {
    fn name(&self) -> &str {
        "json_validate"
    }

    fn version(&self) -> &str {
        env!("CARGO_PKG_VERSION")
    }

    fn initialize(&mut self, context: &PluginContext) -> Result<()> {
        known_keys(context, &["required", "action"])?;
        self.refusal = Refusal::from_config(context, Refusal::DeadLetter)?;
        self.required.clear();
        if let Some(required) = context.value("required") {
            let Some(list) = required.as_array() else {
                return Err(bad(context, "required", "must be a list of field names"));
            };
            for field in list {
                match field.as_str() {
                    Some(f) if !f.is_empty() => self
                        .required
                        .push(f.split('.').map(str::to_string).collect()),
                    _ => {
                        return Err(bad(
                            context,
                            "required",
                            format!("{field} is not a field name"),
                        ))
                    }
                }
            }
        }
        Ok(())
    }
}

impl StreamProcessor for JsonValidate {
    fn process_message(&mut self, message: &mut Message) -> Result<ProcessingAction> {
        if self.required.is_empty() {
            // Only whether it parses: nothing is built.
            return Ok(
                match serde_json::from_slice::<serde::de::IgnoredAny>(&message.payload) {
                    Ok(_) => ProcessingAction::Continue,
                    Err(err) => self.refusal.action(format!("payload is not JSON: {err}")),
                },
            );
        }
        let value: serde_json::Value = match serde_json::from_slice(&message.payload) {
            Ok(v) => v,
            Err(err) => return Ok(self.refusal.action(format!("payload is not JSON: {err}"))),
        };
        for path in &self.required {
            let mut at = &value;
            for part in path {
                match at.get(part) {
                    Some(next) => at = next,
                    None => {
                        return Ok(self
                            .refusal
                            .action(format!("required field {:?} is missing", path.join("."))))
                    }
                }
            }
        }
        Ok(ProcessingAction::Continue)
    }
}
