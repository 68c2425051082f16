//! `topic_route`: a copy to another topic, or the message rerouted there.

use kaelix_core::plugin::{Plugin, PluginContext, ProcessingAction, StreamProcessor};
use kaelix_core::{Message, Result, Topic};

use super::{bad, known_keys};

/// Sends a copy of each message to another topic, or the message itself.
///
/// ```toml
/// [[plugins]]
/// name = "topic_route"
/// pattern = "orders.>"
/// [plugins.config]
/// to = "audit.{topic}"     # {topic} is the message's topic
/// mode = "copy"            # or "reroute"
/// ```
///
/// The copy, or the rerouted message, goes to the subscribers of its new
/// topic without running that topic's plugins: a chain runs once per
/// publish, so routes cannot loop.
#[derive(Debug, Default)]
pub struct TopicRoute {
    to: Target,
    reroute: bool,
}

#[derive(Debug, Default)]
enum Target {
    #[default]
    Unset,
    Fixed(Topic),
    /// Text before and after `{topic}`.
    Template(String, String),
}

impl Plugin for TopicRoute {
    fn name(&self) -> &str {
        "topic_route"
    }

    fn version(&self) -> &str {
        env!("CARGO_PKG_VERSION")
    }

    fn initialize(&mut self, context: &PluginContext) -> Result<()> {
        known_keys(context, &["to", "mode"])?;
        let to = context
            .get_config("to")
            .ok_or_else(|| bad(context, "to", "is required: the topic to route to"))?;
        self.to = match to.split_once("{topic}") {
            None => Target::Fixed(Topic::new(&to).map_err(|err| bad(context, "to", err))?),
            Some((before, after)) => {
                // A template must make a valid topic of a valid one.
                Topic::new(format!("{before}x{after}")).map_err(|err| bad(context, "to", err))?;
                Target::Template(before.to_string(), after.to_string())
            }
        };
        self.reroute = match context.get_config("mode").as_deref() {
            None | Some("copy") => false,
            Some("reroute") => true,
            Some(other) => {
                return Err(bad(
                    context,
                    "mode",
                    format!("{other:?} is neither \"copy\" nor \"reroute\""),
                ))
            }
        };
        Ok(())
    }
}

impl StreamProcessor for TopicRoute {
    fn process_message(&mut self, message: &mut Message) -> Result<ProcessingAction> {
        let topic = match &self.to {
            Target::Fixed(topic) => topic.clone(),
            Target::Template(before, after) => {
                Topic::new(format!("{before}{}{after}", message.topic))?
            }
            Target::Unset => return Ok(ProcessingAction::Continue),
        };
        Ok(if self.reroute {
            ProcessingAction::Reroute { topic }
        } else {
            ProcessingAction::Copy { topic }
        })
    }
}
