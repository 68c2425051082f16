//! Plugins in the publish path.
//!
//! A plugin is a [`Plugin`] (name, version, set-up and tear-down) that is
//! also a [`StreamProcessor`]: it sees each message published on the topics
//! it is configured for, before the message is routed, may change its
//! headers, payload and topic, and says what happens to it with a
//! [`ProcessingAction`].
//!
//! A [`PluginRegistry`] holds plugins by name and calls them through a
//! guard ([`PluginHandle`]) that measures each call, catches a panic, and
//! switches a plugin that keeps failing off with a [`CircuitBreaker`] until
//! a cool-down has passed. [`SecurityIsolation`] sets what a plugin's
//! [`PluginContext`] hands out ([`PermissionSet`]) and the call-time and CPU
//! limits the guard enforces ([`ResourceLimits`]); limits that code running
//! inside the broker's process cannot be held to (memory, file descriptors,
//! network access) are recorded but not enforced, and `docs/plugins.md`
//! says so.
//!
//! The broker builds its chains from `[[plugins]]` in `kaelix.toml`; a
//! program that embeds the broker registers its own plugins beside the
//! built-in ones.

mod breaker;
mod context;
mod guard;
mod registry;
mod security;

pub use breaker::{BreakerPolicy, BreakerState, CircuitBreaker, Transition};
pub use context::{MetricKind, PluginContext, PluginCounter, PluginGauge, PluginMetrics};
pub use guard::{Call, Failure, PluginHandle, PluginStats};
pub use registry::{PluginFactory, PluginRegistry};
pub use security::{PermissionSet, ResourceLimits, SecurityIsolation};

use crate::{Message, Result, Topic};

/// What every plugin is: a name, a version, and set-up and tear-down.
pub trait Plugin: Send {
    /// The plugin's name, as logs and metrics show it.
    fn name(&self) -> &str;

    /// The plugin's version.
    fn version(&self) -> &str;

    /// Called once before the first message, and again with the new
    /// configuration when the configuration changes. An error keeps the
    /// plugin out of the message path.
    fn initialize(&mut self, _context: &PluginContext) -> Result<()> {
        Ok(())
    }

    /// Called when the plugin leaves the message path (removed by a reload,
    /// or the broker stops).
    fn shutdown(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Sees each message before it is routed.
pub trait StreamProcessor: Send {
    /// Looks at (and may change) `message`, and says what happens to it.
    /// An error counts as a failure of the plugin, and the message is
    /// dead-lettered.
    fn process_message(&mut self, message: &mut Message) -> Result<ProcessingAction>;
}

/// A plugin that sits in the message path: both [`Plugin`] and
/// [`StreamProcessor`]. Every type that is both is one.
pub trait StreamPlugin: Plugin + StreamProcessor {}

impl<T: Plugin + StreamProcessor> StreamPlugin for T {}

/// What happens to a message after a plugin has seen it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProcessingAction {
    /// On to the next plugin, then to its topic's subscribers.
    Continue,
    /// Discarded. A publisher that asked for an acknowledgement is told
    /// it was refused, with the reason.
    Drop { reason: String },
    /// Sent to the dead-letter topic with headers naming the plugin, the
    /// reason and the original topic; the publisher is told, as for `Drop`.
    DeadLetter { reason: String },
    /// Sent to `topic` instead of its own (the rest of the chain still
    /// runs; the chain of the new topic does not).
    Reroute { topic: Topic },
    /// Goes on as `Continue`, and a copy of it as it is now is also sent to
    /// `topic`.
    Copy { topic: Topic },
}

impl ProcessingAction {
    /// `Drop` with `reason`.
    pub fn dropped(reason: impl Into<String>) -> ProcessingAction {
        ProcessingAction::Drop {
            reason: reason.into(),
        }
    }

    /// `DeadLetter` with `reason`.
    pub fn dead_letter(reason: impl Into<String>) -> ProcessingAction {
        ProcessingAction::DeadLetter {
            reason: reason.into(),
        }
    }

    /// A short stable name, as metrics label it.
    pub fn name(&self) -> &'static str {
        match self {
            ProcessingAction::Continue => "continue",
            ProcessingAction::Drop { .. } => "drop",
            ProcessingAction::DeadLetter { .. } => "dead_letter",
            ProcessingAction::Reroute { .. } => "reroute",
            ProcessingAction::Copy { .. } => "copy",
        }
    }
}

/// The headers a dead letter carries besides the message's own.
pub mod dead_letter_headers {
    /// The plugin (its configured id) that sent the message here.
    pub const PLUGIN: &str = "kaelix-dead-letter-plugin";
    /// Why.
    pub const REASON: &str = "kaelix-dead-letter-reason";
    /// The topic the message was published on.
    pub const TOPIC: &str = "kaelix-dead-letter-topic";
}
