//! The plugins the broker ships, by the names `[[plugins]]` entries use:
//!
//! - `header_stamp` ([`HeaderStamp`]): the broker's time, its id and fixed
//!   headers on every message.
//! - `json_validate` ([`JsonValidate`]): the payload must be JSON, with the
//!   required fields; otherwise dead-lettered (or dropped).
//! - `rate_limit` ([`RateLimit`]): messages per second per topic, over it
//!   dropped (or dead-lettered).
//! - `size_cap` ([`SizeCap`]): a payload size cap for the topics matched.
//! - `topic_route` ([`TopicRoute`]): a copy to another topic, or the
//!   message rerouted there.

mod json;
mod rate;
mod route;
mod size;
mod stamp;

pub use json::JsonValidate;
pub use rate::RateLimit;
pub use route::TopicRoute;
pub use size::SizeCap;
pub use stamp::HeaderStamp;

use kaelix_core::plugin::{PluginContext, PluginRegistry, ProcessingAction};
use kaelix_core::{Error, Result};

/// Registers every built-in plugin's factory in `registry`.
pub fn register_builtins(registry: &mut PluginRegistry) -> Result<()> {
    registry.register_factory("header_stamp", || Box::new(HeaderStamp::default()))?;
    registry.register_factory("json_validate", || Box::new(JsonValidate::default()))?;
    registry.register_factory("rate_limit", || Box::new(RateLimit::default()))?;
    registry.register_factory("size_cap", || Box::new(SizeCap::default()))?;
    registry.register_factory("topic_route", || Box::new(TopicRoute::default()))?;
    Ok(())
}

/// The names of the built-in plugins.
pub const BUILTINS: [&str; 5] = [
    "header_stamp",
    "json_validate",
    "rate_limit",
    "size_cap",
    "topic_route",
];

/// A configuration error of plugin `context`'s key `key`.
fn bad(context: &PluginContext, key: &str, reason: impl std::fmt::Display) -> Error {
    Error::Plugin {
        plugin: context.plugin_name().to_string(),
        reason: format!("config.{key}: {reason}"),
    }
}

/// Checks that every key of the plugin's config table is one of `known`.
fn known_keys(context: &PluginContext, known: &[&str]) -> Result<()> {
    let Some(config) = context.config() else {
        return Ok(());
    };
    for key in config.keys() {
        if !known.contains(&key.as_str()) {
            return Err(bad(
                context,
                key,
                format!("unknown key; this plugin takes {}", known.join(", ")),
            ));
        }
    }
    Ok(())
}

/// What a plugin that refuses a message does with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    Drop,
    DeadLetter,
}

impl Refusal {
    fn from_config(context: &PluginContext, default: Refusal) -> Result<Refusal> {
        match context.get_config("action").as_deref() {
            None => Ok(default),
            Some("drop") => Ok(Refusal::Drop),
            Some("dead_letter") => Ok(Refusal::DeadLetter),
            Some(other) => Err(bad(
                context,
                "action",
                format!("{other:?} is neither \"drop\" nor \"dead_letter\""),
            )),
        }
    }

    fn action(self, reason: String) -> ProcessingAction {
        match self {
            Refusal::Drop => ProcessingAction::Drop { reason },
            Refusal::DeadLetter => ProcessingAction::DeadLetter { reason },
        }
    }
}

/// A non-negative integer setting.
fn integer(context: &PluginContext, key: &str) -> Result<Option<u64>> {
    match context.value(key) {
        None => Ok(None),
        Some(toml::Value::Integer(n)) if *n >= 0 => Ok(Some(*n as u64)),
        Some(other) => Err(bad(
            context,
            key,
            format!("must be a non-negative integer, not {other}"),
        )),
    }
}
