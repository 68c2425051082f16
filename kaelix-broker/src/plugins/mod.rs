//! Plugins in the broker's publish path.
//!
//! `[[plugins]]` entries become [`PluginHandle`]s (a new instance per entry
//! from a factory, or a plugin the program registered), and the entries
//! whose pattern matches a topic make that topic's [`Chain`], in `order`.
//! The router keeps each topic's chain beside its subscribers in the
//! publishers' route caches, so a topic without plugins costs one branch;
//! a reload builds a new [`ChainSet`] and invalidates those caches.
//!
//! A chain runs once per publish, before routing: reroutes and copies go
//! to their topic's subscribers without that topic's chain, so routes
//! cannot loop.

pub mod builtin;

use std::sync::Arc;
use std::time::{Duration, Instant};

use kaelix_core::config::{PluginConfig, WhenOff};
use kaelix_core::plugin::{
    dead_letter_headers, BreakerPolicy, Call, PermissionSet, PluginHandle, PluginRegistry,
    ProcessingAction, ResourceLimits, SecurityIsolation,
};
use kaelix_core::protocol::ErrorCode;
use kaelix_core::{MemoryStreamerConfig, Message, Topic, TopicPattern};
use parking_lot::Mutex;
use smallvec::SmallVec;

/// One plugin in a chain.
#[derive(Clone, Debug)]
pub(crate) struct Step {
    pub(crate) handle: PluginHandle,
    when_off: WhenOff,
}

/// The plugins one topic's messages pass through, in order.
#[derive(Debug)]
pub(crate) struct Chain {
    steps: Vec<Step>,
    dead_letter: Topic,
}

/// Every `[[plugins]]` entry in force, with its pattern.
#[derive(Debug)]
pub(crate) struct ChainSet {
    /// Sorted by order, then file order.
    rules: Vec<(TopicPattern, Step)>,
    dead_letter: Topic,
}

impl Default for ChainSet {
    fn default() -> Self {
        ChainSet {
            rules: Vec::new(),
            dead_letter: Topic::new(kaelix_core::config::DeadLetterConfig::default().topic)
                .unwrap_or_else(|e| unreachable!("the default dead-letter topic is valid: {e}")),
        }
    }
}

impl ChainSet {
    /// The chain of `topic`; `None` when no plugin applies to it.
    pub(crate) fn chain_for(&self, topic: &Topic) -> Option<Arc<Chain>> {
        let steps: Vec<Step> = self
            .rules
            .iter()
            .filter(|(pattern, _)| pattern.matches(topic))
            .map(|(_, step)| step.clone())
            .collect();
        (!steps.is_empty()).then(|| {
            Arc::new(Chain {
                steps,
                dead_letter: self.dead_letter.clone(),
            })
        })
    }

    /// Every plugin in force.
    pub(crate) fn handles(&self) -> impl Iterator<Item = &PluginHandle> {
        self.rules.iter().map(|(_, step)| &step.handle)
    }
}

/// What became of a message that went through its chain.
pub(crate) enum Outcome {
    /// Route `message` (its topic may have changed) and the copies.
    Deliver {
        message: Message,
        copies: SmallVec<[Message; 1]>,
    },
    /// Refused: tell the publisher; route the dead letter, if any.
    Refused {
        code: ErrorCode,
        reason: String,
        dead_letter: Option<Message>,
    },
}

impl Outcome {
    /// The messages to route (the message first, then its copies, or the
    /// dead letter) and the refusal to answer with, if any.
    pub(crate) fn into_parts(self) -> (SmallVec<[Message; 2]>, Option<(ErrorCode, String)>) {
        match self {
            Outcome::Deliver { message, copies } => {
                let mut all = SmallVec::new();
                all.push(message);
                all.extend(copies);
                (all, None)
            }
            Outcome::Refused {
                code,
                reason,
                dead_letter,
            } => (dead_letter.into_iter().collect(), Some((code, reason))),
        }
    }
}

/// Runs `message` through `chain`. One clock reading between two plugins
/// serves both.
pub(crate) fn run(chain: &Chain, mut message: Message) -> Outcome {
    let mut copies = SmallVec::new();
    let mut at = Instant::now();
    let original = message.topic.clone();
    for step in &chain.steps {
        let (call, end) = step.handle.call_at(&mut message, at);
        at = end;
        let dead = match call {
            Call::Done(ProcessingAction::Continue) => continue,
            Call::Done(ProcessingAction::Reroute { topic }) => {
                message.set_topic(topic);
                continue;
            }
            Call::Done(ProcessingAction::Copy { topic }) => {
                let mut copy = message.clone();
                copy.set_topic(topic);
                copies.push(copy);
                continue;
            }
            Call::Done(ProcessingAction::Drop { reason }) => {
                return Outcome::Refused {
                    code: ErrorCode::Rejected,
                    reason: format!("plugin {}: {reason}", step.handle.name()),
                    dead_letter: None,
                }
            }
            Call::Done(ProcessingAction::DeadLetter { reason }) => reason,
            Call::Failed(failure) => failure.to_string(),
            Call::Off => match step.when_off {
                WhenOff::Bypass => continue,
                WhenOff::DeadLetter => "switched off by its circuit breaker".to_string(),
            },
            // An action this broker does not know: passed over.
            Call::Done(_) => continue,
        };
        return dead_letter(chain, step, message, &original, dead);
    }
    Outcome::Deliver { message, copies }
}

/// Longest reason a dead letter's header carries.
const MAX_REASON: usize = 1024;

fn dead_letter(
    chain: &Chain,
    step: &Step,
    mut message: Message,
    original: &Topic,
    mut reason: String,
) -> Outcome {
    if reason.len() > MAX_REASON {
        let mut cut = MAX_REASON;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.truncate(cut);
    }
    let plugin = step.handle.name();
    let refusal = format!(
        "plugin {plugin}: {reason} (sent to the dead-letter topic {})",
        chain.dead_letter
    );
    message.set_header(dead_letter_headers::PLUGIN, plugin);
    message.set_header(dead_letter_headers::REASON, reason);
    message.set_header(dead_letter_headers::TOPIC, original.as_str());
    message.set_topic(chain.dead_letter.clone());
    // The partition named for the original topic means nothing here.
    message.partition = None;
    Outcome::Refused {
        code: ErrorCode::DeadLettered,
        reason: refusal,
        dead_letter: Some(message),
    }
}

/// The broker's plugins: the registry (built-in factories and what the
/// program registered) and the entries in force.
pub(crate) struct Plugins {
    registry: Mutex<PluginRegistry>,
    /// The entries in force and their handles, to keep unchanged plugins
    /// (and their state) across a reload.
    active: Mutex<Vec<(PluginConfig, PluginHandle)>>,
}

impl Plugins {
    pub(crate) fn new() -> Plugins {
        let mut registry = PluginRegistry::new();
        builtin::register_builtins(&mut registry)
            .unwrap_or_else(|e| unreachable!("built-in names are distinct: {e}"));
        Plugins {
            registry: Mutex::new(registry),
            active: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn registry(&self) -> parking_lot::MutexGuard<'_, PluginRegistry> {
        self.registry.lock()
    }

    /// Builds the chains of `config`: entries whose plugin and settings are
    /// unchanged keep their instance; new or changed ones are made and
    /// initialized. On any error nothing changes and the error names the
    /// entry. Returns the new set; the caller puts it in force, then calls
    /// [`retire`](Self::retire) with what it returned second.
    pub(crate) fn build(
        &self,
        config: &MemoryStreamerConfig,
    ) -> Result<(ChainSet, Vec<PluginHandle>), String> {
        let registry = self.registry.lock();
        let mut active = self.active.lock();
        let dead_letter =
            Topic::new(&config.dead_letter.topic).map_err(|e| format!("dead_letter.topic: {e}"))?;
        let mut made: Vec<(PluginConfig, PluginHandle, bool)> = Vec::new();
        let fail = |made: &[(PluginConfig, PluginHandle, bool)], err: String| {
            for (_, handle, new) in made {
                if *new {
                    let _ = handle.shutdown();
                }
            }
            Err(err)
        };
        for (i, entry) in config.plugins.iter().enumerate() {
            if !entry.enabled {
                continue;
            }
            if let Err(e) = TopicPattern::new(&entry.pattern) {
                return fail(&made, format!("plugins[{i}].pattern: {e}"));
            }
            let kept = active
                .iter()
                .find(|(old, _)| old.id() == entry.id() && same_plugin(old, entry))
                .map(|(_, h)| h.clone());
            if let Some(handle) = kept {
                handle.set_security(security(entry));
                made.push((entry.clone(), handle, false));
                continue;
            }
            let handle = if let Some(factory) = registry.factory(&entry.name) {
                PluginHandle::new(entry.id(), &entry.name, factory(), security(entry))
            } else if let Some(handle) = registry.get(&entry.name) {
                if made.iter().any(|(_, h, _)| h.kind() == entry.name) {
                    return fail(
                        &made,
                        format!(
                            "plugins[{i}].name: {:?} is one registered instance, already used by another entry",
                            entry.name
                        ),
                    );
                }
                handle.set_security(security(entry));
                handle.clone()
            } else {
                let mut known: Vec<&str> = registry.kinds().collect();
                known.extend(registry.names());
                return fail(
                    &made,
                    format!(
                        "plugins[{i}].name: no plugin {:?}; there are {}",
                        entry.name,
                        known.join(", ")
                    ),
                );
            };
            if let Err(e) = handle.initialize(entry.config.clone()) {
                return fail(&made, format!("plugins[{i}] ({}): {e}", entry.id()));
            }
            made.push((entry.clone(), handle, true));
        }
        // Order, then file order (the sort is stable).
        made.sort_by_key(|(entry, _, _)| entry.order);
        let rules = made
            .iter()
            .map(|(entry, handle, _)| {
                let pattern = TopicPattern::new(&entry.pattern)
                    .unwrap_or_else(|e| unreachable!("checked above: {e}"));
                let step = Step {
                    handle: handle.clone(),
                    when_off: entry.when_off,
                };
                (pattern, step)
            })
            .collect();
        let in_force: Vec<(PluginConfig, PluginHandle)> =
            made.into_iter().map(|(e, h, _)| (e, h)).collect();
        let retired = active
            .iter()
            .filter(|(_, old)| !in_force.iter().any(|(_, h)| h.same_as(old)))
            .map(|(_, h)| h.clone())
            .collect();
        *active = in_force;
        Ok((ChainSet { rules, dead_letter }, retired))
    }

    /// Shuts down plugins no longer in force.
    pub(crate) fn retire(retired: Vec<PluginHandle>) {
        for handle in retired {
            if let Err(e) = handle.shutdown() {
                tracing::warn!(plugin = handle.name(), "{e}");
            }
        }
    }

    /// Shuts every plugin in force down (the broker stops).
    pub(crate) fn shutdown(&self) {
        let active = std::mem::take(&mut *self.active.lock());
        Plugins::retire(active.into_iter().rev().map(|(_, h)| h).collect());
    }
}

/// Whether two entries make the same plugin instance: same plugin, same
/// settings (pattern, order and the breaker's settings are the chain's or
/// the guard's, not the instance's).
fn same_plugin(a: &PluginConfig, b: &PluginConfig) -> bool {
    a.name == b.name && a.config == b.config && a.can_read_config == b.can_read_config
}

/// The guard's settings of an entry.
fn security(entry: &PluginConfig) -> SecurityIsolation {
    SecurityIsolation::new()
        .with_resource_limits(ResourceLimits {
            max_memory_mb: 0,
            max_cpu_percent: entry.max_cpu_percent,
            max_file_descriptors: 0,
        })
        .with_permissions(PermissionSet {
            can_read_config: entry.can_read_config,
            can_write_metrics: entry.can_write_metrics,
            can_access_network: false,
        })
        .with_time_budget(Duration::from_micros(entry.time_budget_us))
        .with_breaker(BreakerPolicy {
            failure_threshold: entry.failure_threshold,
            cooldown: Duration::from_millis(entry.cooldown_ms),
        })
}
