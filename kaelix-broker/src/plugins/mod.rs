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

/// What a chain made of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Fate {
    /// Route it (its topic may have changed), then its copies.
    Pass,
    /// Refused: tell the publisher; when `dead_letter`, the message is now
    /// the dead letter and is routed.
    Refused {
        code: ErrorCode,
        reason: String,
        dead_letter: bool,
    },
}

/// Most messages a run holds before it must be put through its chain.
pub(crate) const RUN_CAP: usize = 256;

/// A run of messages on one topic put through its chain together, plugin
/// by plugin: each plugin's guard (its lock, its counters) is paid once
/// per run rather than once per message, and its code and data stay hot.
/// Order holds: each message meets the plugins in the chain's order, and
/// the caller routes the results in the order they were pushed.
#[derive(Default)]
pub(crate) struct Run {
    chain: Option<Arc<Chain>>,
    /// The topic every message was published on.
    topic: Option<Topic>,
    messages: Vec<Message>,
    fates: Vec<Fate>,
    /// Copies, by the index of the message they were made of.
    copies: Vec<(usize, Message)>,
    calls: Vec<(usize, Call)>,
}

impl Run {
    pub(crate) fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// Whether the run's messages were published on `topic`.
    pub(crate) fn holds_topic(&self, topic: &[u8]) -> bool {
        self.topic.as_ref().is_some_and(|t| t.as_bytes() == topic)
    }

    /// Whether a message on `topic` with `chain` may join this run (or the
    /// run must be put through first).
    pub(crate) fn accepts(&self, chain: &Arc<Chain>, topic: &Topic) -> bool {
        match (&self.chain, &self.topic) {
            (Some(c), Some(t)) => {
                Arc::ptr_eq(c, chain) && t == topic && self.messages.len() < RUN_CAP
            }
            _ => true,
        }
    }

    /// Adds `message` (published on `topic`, whose chain is `chain`); the
    /// caller checked [`accepts`](Self::accepts).
    pub(crate) fn push(&mut self, chain: &Arc<Chain>, topic: &Topic, message: Message) {
        if self.chain.is_none() {
            self.chain = Some(chain.clone());
            self.topic = Some(topic.clone());
        }
        self.messages.push(message);
    }

    /// Puts the messages through the chain, then hands each message, its
    /// fate and its copies to `each`, in order; leaves the run empty.
    pub(crate) fn finish(
        &mut self,
        mut each: impl FnMut(usize, Message, Fate, &mut dyn Iterator<Item = Message>),
    ) {
        let (Some(chain), Some(topic)) = (self.chain.take(), self.topic.take()) else {
            return;
        };
        self.put_through(&chain, &topic);
        // Copies were made plugin by plugin; each message's in chain order.
        self.copies.sort_by_key(|(i, _)| *i);
        let mut copies = self.copies.drain(..).peekable();
        let messages = self.messages.drain(..).zip(self.fates.drain(..));
        for (i, (message, fate)) in messages.enumerate() {
            let mut mine =
                std::iter::from_fn(|| copies.next_if(|(at, _)| *at == i).map(|(_, m)| m));
            each(i, message, fate, &mut mine);
            // Copies `each` did not take are dropped.
            mine.for_each(drop);
        }
    }

    fn put_through(&mut self, chain: &Chain, topic: &Topic) {
        self.fates.clear();
        self.fates.resize(self.messages.len(), Fate::Pass);
        let mut at = Instant::now();
        for step in &chain.steps {
            let alive = self
                .messages
                .iter_mut()
                .zip(&self.fates)
                .enumerate()
                .filter(|(_, (_, fate))| **fate == Fate::Pass)
                .map(|(i, (message, _))| (i, message));
            self.calls.clear();
            at = step.handle.call_each(alive, at, &mut self.calls);
            for (i, call) in self.calls.drain(..) {
                let message = &mut self.messages[i];
                let dead = match call {
                    Call::Done(ProcessingAction::Continue) => continue,
                    Call::Done(ProcessingAction::Reroute { topic }) => {
                        message.set_topic(topic);
                        continue;
                    }
                    Call::Done(ProcessingAction::Copy { topic }) => {
                        let mut copy = message.clone();
                        copy.set_topic(topic);
                        self.copies.push((i, copy));
                        continue;
                    }
                    Call::Done(ProcessingAction::Drop { reason }) => {
                        self.fates[i] = Fate::Refused {
                            code: ErrorCode::Rejected,
                            reason: format!("plugin {}: {reason}", step.handle.name()),
                            dead_letter: false,
                        };
                        continue;
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
                self.fates[i] = dead_letter(chain, step, message, topic, dead);
            }
        }
    }
}

/// Puts one message through `chain` (an in-process publish): the message
/// to route first, then its copies (or the dead letter), and the refusal.
pub(crate) fn run_one(
    chain: &Arc<Chain>,
    topic: &Topic,
    message: Message,
) -> (SmallVec<[Message; 2]>, Option<(ErrorCode, String)>) {
    let mut run = Run::default();
    run.push(chain, topic, message);
    let mut routed = SmallVec::new();
    let mut refusal = None;
    run.finish(|_, message, fate, copies| match fate {
        Fate::Pass => {
            routed.push(message);
            routed.extend(copies);
        }
        Fate::Refused {
            code,
            reason,
            dead_letter,
        } => {
            if dead_letter {
                routed.push(message);
            }
            refusal = Some((code, reason));
        }
    });
    (routed, refusal)
}

/// Longest reason a dead letter's header carries.
const MAX_REASON: usize = 1024;

/// Makes `message` its dead letter.
fn dead_letter(
    chain: &Chain,
    step: &Step,
    message: &mut Message,
    original: &Topic,
    mut reason: String,
) -> Fate {
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
    Fate::Refused {
        code: ErrorCode::DeadLettered,
        reason: refusal,
        dead_letter: true,
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

/// Checks `config`'s `[[plugins]]` against the built-in plugins without
/// putting anything in force (what `kaelix-broker --check-config` does):
/// each entry is made and initialized with its config table, then shut
/// down. Plugins a program registers are not known here.
pub fn check(config: &MemoryStreamerConfig) -> Result<(), String> {
    let plugins = Plugins::new();
    plugins.build(config)?;
    plugins.shutdown();
    Ok(())
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use kaelix_core::plugin::{Plugin, PluginContext, StreamProcessor};
    use kaelix_core::{Error, Result};

    use super::*;

    /// Answers by the message's payload: "drop", "dead", "fail" or else
    /// `otherwise`; counts its calls.
    struct ByPayload {
        otherwise: fn() -> ProcessingAction,
        calls: Arc<AtomicUsize>,
    }

    impl Plugin for ByPayload {
        fn name(&self) -> &str {
            "by_payload"
        }
        fn version(&self) -> &str {
            "1"
        }
        fn initialize(&mut self, _: &PluginContext) -> Result<()> {
            Ok(())
        }
    }

    impl StreamProcessor for ByPayload {
        fn process_message(&mut self, message: &mut Message) -> Result<ProcessingAction> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            Ok(match &message.payload[..] {
                b"drop" => ProcessingAction::dropped("asked to"),
                b"dead" => ProcessingAction::dead_letter("asked to"),
                b"fail" => {
                    return Err(Error::Plugin {
                        plugin: "by_payload".into(),
                        reason: "asked to".into(),
                    })
                }
                _ => (self.otherwise)(),
            })
        }
    }

    fn step(
        name: &str,
        otherwise: fn() -> ProcessingAction,
        policy: BreakerPolicy,
    ) -> (Step, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let plugin = ByPayload {
            otherwise,
            calls: calls.clone(),
        };
        let security = SecurityIsolation::new().with_breaker(policy);
        let handle = PluginHandle::new(name, "by_payload", Box::new(plugin), security);
        handle.initialize(toml::Table::new()).unwrap();
        let step = Step {
            handle,
            when_off: WhenOff::Bypass,
        };
        (step, calls)
    }

    fn topic(name: &str) -> Topic {
        Topic::new(name).unwrap()
    }

    fn chain(steps: Vec<Step>) -> Arc<Chain> {
        Arc::new(Chain {
            steps,
            dead_letter: topic("dead"),
        })
    }

    /// Runs `payloads` on topic "in" through `chain`; what each became.
    fn run_all(chain: &Arc<Chain>, payloads: &[&str]) -> Vec<(String, String, Fate, Vec<String>)> {
        let mut run = Run::default();
        let on = topic("in");
        for payload in payloads {
            assert!(run.accepts(chain, &on));
            run.push(
                chain,
                &on,
                Message::new(on.clone(), payload.as_bytes().to_vec()).unwrap(),
            );
        }
        let mut out = Vec::new();
        run.finish(|i, message, fate, copies| {
            assert_eq!(i, out.len(), "in the order pushed");
            let copies = copies.map(|c| c.topic.to_string()).collect();
            let payload = String::from_utf8(message.payload.to_vec()).unwrap();
            out.push((payload, message.topic.to_string(), fate, copies));
        });
        assert!(run.is_empty());
        out
    }

    #[test]
    fn a_run_meets_each_plugin_in_order_and_keeps_its_order() {
        let policy = BreakerPolicy::default();
        let (first, first_calls) = step("first", || ProcessingAction::Continue, policy);
        let copy = || ProcessingAction::Copy {
            topic: Topic::new("copied").unwrap(),
        };
        let (second, second_calls) = step("second", copy, policy);
        let reroute = || ProcessingAction::Reroute {
            topic: Topic::new("moved").unwrap(),
        };
        let (third, third_calls) = step("third", reroute, policy);
        let chain = chain(vec![first, second, third]);
        let out = run_all(&chain, &["a", "drop", "b", "dead", "c"]);

        // Refused messages meet no later plugin.
        assert_eq!(first_calls.load(Ordering::Relaxed), 5);
        assert_eq!(second_calls.load(Ordering::Relaxed), 3);
        assert_eq!(third_calls.load(Ordering::Relaxed), 3);

        let passed = |payload: &str| {
            (
                payload.to_string(),
                "moved".to_string(),
                Fate::Pass,
                vec!["copied".to_string()],
            )
        };
        assert_eq!(out[0], passed("a"));
        assert_eq!(out[2], passed("b"));
        assert_eq!(out[4], passed("c"));
        assert!(matches!(
            &out[1].2,
            Fate::Refused { code: ErrorCode::Rejected, dead_letter: false, reason } if reason.contains("first")
        ));
        assert_eq!(out[1].1, "in");
        assert!(matches!(
            &out[3].2,
            Fate::Refused {
                code: ErrorCode::DeadLettered,
                dead_letter: true,
                ..
            }
        ));
        assert_eq!(
            out[3].1, "dead",
            "a dead letter goes to the dead-letter topic"
        );
        assert!(out[1].3.is_empty() && out[3].3.is_empty());
    }

    #[test]
    fn the_breaker_opens_in_the_middle_of_a_run() {
        let policy = BreakerPolicy {
            failure_threshold: 2,
            cooldown: Duration::from_secs(60),
        };
        let (failing, calls) = step("failing", || ProcessingAction::Continue, policy);
        let chain = chain(vec![failing.clone()]);
        let out = run_all(&chain, &["fail", "fail", "fail", "ok"]);
        // Two failures open it: the rest bypass it (when_off = bypass).
        assert_eq!(calls.load(Ordering::Relaxed), 2);
        assert!(matches!(
            &out[0].2,
            Fate::Refused {
                dead_letter: true,
                ..
            }
        ));
        assert!(matches!(
            &out[1].2,
            Fate::Refused {
                dead_letter: true,
                ..
            }
        ));
        assert_eq!(out[2].2, Fate::Pass);
        assert_eq!(out[3].2, Fate::Pass);
        let stats = failing.handle.stats();
        assert_eq!(stats.calls.load(Ordering::Relaxed), 2);
        assert_eq!(stats.errors.load(Ordering::Relaxed), 2);
        assert_eq!(stats.skipped.load(Ordering::Relaxed), 2);
        assert_eq!(
            failing.handle.breaker_state(),
            kaelix_core::plugin::BreakerState::Open
        );
    }

    #[test]
    fn a_run_takes_one_topic_and_chain_up_to_its_cap() {
        let (only, _) = step(
            "only",
            || ProcessingAction::Continue,
            BreakerPolicy::default(),
        );
        let (a, b) = (chain(vec![only.clone()]), chain(vec![only]));
        let mut run = Run::default();
        let on = topic("in");
        assert!(run.accepts(&a, &on));
        run.push(&a, &on, Message::new(on.clone(), "x").unwrap());
        assert!(run.holds_topic(b"in") && !run.holds_topic(b"other"));
        assert!(!run.accepts(&a, &topic("other")));
        assert!(
            !run.accepts(&b, &on),
            "a chain made by a reload starts a new run"
        );
        for _ in 1..RUN_CAP {
            run.push(&a, &on, Message::new(on.clone(), "x").unwrap());
        }
        assert!(!run.accepts(&a, &on), "full");
        let mut n = 0;
        run.finish(|_, _, _, _| n += 1);
        assert_eq!(n, RUN_CAP);
        assert!(run.accepts(&b, &on));
    }
}
