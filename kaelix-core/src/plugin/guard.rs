//! The guard every plugin call goes through: timing, panics, the CPU share
//! and the circuit breaker.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::breaker::{BreakerState, CircuitBreaker, Transition};
use super::context::{MetricKind, PluginContext, Shared};
use super::security::SecurityIsolation;
use super::{ProcessingAction, StreamPlugin};
use crate::{Error, Message, Result};

/// The outcome of one guarded call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    /// The plugin answered.
    Done(ProcessingAction),
    /// The plugin returned an error or panicked; the message should be
    /// dead-lettered.
    Failed(Failure),
    /// The plugin is switched off by its circuit breaker (or was never
    /// initialized, or failed to): the call did not reach it.
    Off,
}

/// How a call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    Error(String),
    Panic(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Error(e) => write!(f, "failed: {e}"),
            Failure::Panic(p) => write!(f, "panicked: {p}"),
        }
    }
}

/// A plugin's counters, kept by its guard.
#[derive(Debug, Default)]
pub struct PluginStats {
    pub calls: AtomicU64,
    /// Time spent in calls, in nanoseconds.
    pub call_nanos: AtomicU64,
    pub errors: AtomicU64,
    pub panics: AtomicU64,
    /// Calls over the time budget.
    pub over_budget: AtomicU64,
    /// Seconds in which the plugin took more than its CPU share.
    pub over_cpu: AtomicU64,
    /// Messages that passed while the plugin was off.
    pub skipped: AtomicU64,
    /// Actions by kind: continue, drop, dead_letter, reroute, copy.
    pub actions: [AtomicU64; 5],
    /// Changes into closed, half-open, open.
    pub transitions: [AtomicU64; 3],
    /// [`BreakerState::gauge`] now.
    pub state: AtomicU8,
}

impl PluginStats {
    /// The action kinds in the order of `actions`.
    pub const ACTIONS: [&'static str; 5] = ["continue", "drop", "dead_letter", "reroute", "copy"];

    fn action_index(action: &ProcessingAction) -> usize {
        match action {
            ProcessingAction::Continue => 0,
            ProcessingAction::Drop { .. } => 1,
            ProcessingAction::DeadLetter { .. } => 2,
            ProcessingAction::Reroute { .. } => 3,
            ProcessingAction::Copy { .. } => 4,
        }
    }
}

/// Counters of the calls in one batch, added to [`PluginStats`] at its end.
#[derive(Default)]
struct Tally {
    calls: u64,
    busy: Duration,
    errors: u64,
    panics: u64,
    over_budget: u64,
    skipped: u64,
    actions: [u64; 5],
}

struct State {
    plugin: Box<dyn StreamPlugin>,
    breaker: CircuitBreaker,
    security: SecurityIsolation,
    /// `initialize` succeeded and `shutdown` has not been called since.
    ready: bool,
    /// Time each call of the next batch: the last untimed batch took
    /// longer than one time budget.
    time_each: bool,
    /// Time in calls since `window_start`, for the CPU share.
    window_start: Instant,
    window_busy: Duration,
}

struct Inner {
    name: String,
    kind: String,
    state: Mutex<State>,
    shared: Arc<Shared>,
    stats: PluginStats,
}

/// A plugin behind its guard; cheap to clone, shared by every chain that
/// uses it. Calls to one plugin are serialised: its `&mut self` methods
/// never run at the same time.
#[derive(Clone)]
pub struct PluginHandle {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PluginHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginHandle")
            .field("name", &self.inner.name)
            .field("kind", &self.inner.kind)
            .finish_non_exhaustive()
    }
}

impl PluginHandle {
    /// Guards `plugin` under the name `name`; `kind` is what it is (the
    /// built-in's or registered plugin's name).
    pub fn new(
        name: impl Into<String>,
        kind: impl Into<String>,
        plugin: Box<dyn StreamPlugin>,
        security: SecurityIsolation,
    ) -> PluginHandle {
        let shared = Arc::new(Shared::new(security.permissions));
        PluginHandle {
            inner: Arc::new(Inner {
                name: name.into(),
                kind: kind.into(),
                state: Mutex::new(State {
                    plugin,
                    breaker: CircuitBreaker::new(security.breaker),
                    security,
                    ready: false,
                    time_each: false,
                    window_start: Instant::now(),
                    window_busy: Duration::ZERO,
                }),
                shared,
                stats: PluginStats::default(),
            }),
        }
    }

    /// Whether both are the same plugin instance.
    pub fn same_as(&self, other: &PluginHandle) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// The name it is registered or configured under.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// What it is: the built-in's or registered plugin's name.
    pub fn kind(&self) -> &str {
        &self.inner.kind
    }

    /// The plugin's own `name()` and `version()`.
    pub fn describe(&self) -> (String, String) {
        let state = self.inner.state.lock();
        (
            state.plugin.name().to_string(),
            state.plugin.version().to_string(),
        )
    }

    pub fn stats(&self) -> &PluginStats {
        &self.inner.stats
    }

    pub fn breaker_state(&self) -> BreakerState {
        self.inner.state.lock().breaker.state()
    }

    /// The plugin's own metrics: name, kind, value (a gauge's as f64 bits).
    pub fn custom_metrics(&self) -> Vec<(String, MetricKind, u64)> {
        self.inner.shared.custom_metrics()
    }

    pub fn security(&self) -> SecurityIsolation {
        self.inner.state.lock().security.clone()
    }

    /// New limits and permissions: the limits, the breaker's policy and
    /// the metrics permission apply at once; the config permission at the
    /// next `initialize`.
    pub fn set_security(&self, security: SecurityIsolation) {
        let mut state = self.inner.state.lock();
        self.inner.shared.set_permissions(security.permissions);
        state.breaker.set_policy(security.breaker);
        state.security = security;
    }

    /// Initializes the plugin with `config` (again, if it was: a new
    /// configuration). A failure or panic leaves it out of the path.
    pub fn initialize(&self, config: toml::Table) -> Result<()> {
        let context =
            PluginContext::with_shared(self.inner.name.clone(), config, self.inner.shared.clone());
        let mut state = self.inner.state.lock();
        state.ready = false;
        let result = catch_unwind(AssertUnwindSafe(|| state.plugin.initialize(&context)));
        match result {
            Ok(Ok(())) => {
                state.ready = true;
                Ok(())
            }
            Ok(Err(err)) => Err(self.error(format!("initialize failed: {err}"))),
            Err(panic) => Err(self.error(format!("initialize panicked: {}", panic_text(&*panic)))),
        }
    }

    /// Takes the plugin out of the path and calls its `shutdown`.
    pub fn shutdown(&self) -> Result<()> {
        let mut state = self.inner.state.lock();
        if !std::mem::replace(&mut state.ready, false) {
            return Ok(());
        }
        match catch_unwind(AssertUnwindSafe(|| state.plugin.shutdown())) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(self.error(format!("shutdown failed: {err}"))),
            Err(panic) => Err(self.error(format!("shutdown panicked: {}", panic_text(&*panic)))),
        }
    }

    fn error(&self, reason: String) -> Error {
        Error::Plugin {
            plugin: self.inner.name.clone(),
            reason,
        }
    }

    /// Calls the plugin on `message` through the guard.
    pub fn call(&self, message: &mut Message) -> Call {
        self.call_at(message, Instant::now()).0
    }

    /// [`call`](Self::call) with the time it starts at; returns the time it
    /// ended, so that a chain reads the clock once between two plugins.
    pub fn call_at(&self, message: &mut Message, start: Instant) -> (Call, Instant) {
        let mut state = self.inner.state.lock();
        let mut tally = Tally::default();
        let (call, end) = self.call_locked(&mut state, &mut tally, message, start, true);
        self.settle(&mut state, &tally, end);
        (call, end)
    }

    /// Calls the plugin on each message in turn, under one lock: the
    /// guard's own work (the lock, the counters, the CPU share) is paid
    /// once per batch, while each call's outcome is judged on its own (the
    /// breaker can open in the middle of a batch). Pushes onto `out` the
    /// index and outcome of each call that did not answer
    /// [`ProcessingAction::Continue`]; returns the time the last call ended.
    ///
    /// Time is read once for the whole batch while that is enough to tell
    /// that no call went over the time budget (the batch took less than
    /// one budget). When a batch of several calls takes longer, the next
    /// batch times each call, until one has no call over the budget; a
    /// batch of one call, and a half-open trial, are always timed exactly.
    pub fn call_each<'m>(
        &self,
        messages: impl IntoIterator<Item = (usize, &'m mut Message)>,
        start: Instant,
        out: &mut Vec<(usize, Call)>,
    ) -> Instant {
        let mut state = self.inner.state.lock();
        let mut tally = Tally::default();
        let budget = state.security.time_budget;
        let mut each = state.time_each || state.breaker.state() != BreakerState::Closed;
        let mut at = start;
        let mut messages = messages.into_iter().peekable();
        let mut first = true;
        while let Some((i, message)) = messages.next() {
            if std::mem::take(&mut first) && messages.peek().is_none() {
                // A batch of one: its time is the call's.
                each = true;
            }
            let (call, end) = self.call_locked(&mut state, &mut tally, message, at, each);
            at = end;
            if call != Call::Done(ProcessingAction::Continue) {
                out.push((i, call));
            }
        }
        if each {
            state.time_each = tally.over_budget > 0;
        } else if tally.calls > 0 {
            at = Instant::now();
            let took = at.saturating_duration_since(start);
            tally.busy = took;
            if !budget.is_zero() && took > budget {
                // Some call may have gone over: find out next time.
                state.time_each = true;
            }
        }
        self.settle(&mut state, &tally, at);
        at
    }

    /// One call, under the lock; counters go to `tally`. Untimed, it is
    /// judged on its outcome alone and its time is the caller's to count.
    fn call_locked(
        &self,
        state: &mut State,
        tally: &mut Tally,
        message: &mut Message,
        start: Instant,
        timed: bool,
    ) -> (Call, Instant) {
        let (allowed, half_open) = state.breaker.allow(start);
        if let Some(t) = half_open {
            self.changed(t, "the cool-down is over: the next message tries it");
        }
        if !allowed || !state.ready {
            tally.skipped += 1;
            return (Call::Off, start);
        }
        let result = catch_unwind(AssertUnwindSafe(|| state.plugin.process_message(message)));
        let end = if timed { Instant::now() } else { start };
        let took = end.saturating_duration_since(start);
        tally.calls += 1;
        tally.busy += took;
        let budget = state.security.time_budget;
        let over_budget = timed && !budget.is_zero() && took > budget;
        let call = match result {
            Ok(Ok(action)) => {
                tally.actions[PluginStats::action_index(&action)] += 1;
                Call::Done(action)
            }
            Ok(Err(err)) => {
                tally.errors += 1;
                Call::Failed(Failure::Error(err.to_string()))
            }
            Err(panic) => {
                tally.panics += 1;
                Call::Failed(Failure::Panic(panic_text(&*panic)))
            }
        };
        match &call {
            Call::Failed(f) => {
                if over_budget {
                    tally.over_budget += 1;
                }
                if let Some(t) = state.breaker.failure(end) {
                    self.changed(t, &format!("it {f}"));
                }
            }
            _ if over_budget => {
                tally.over_budget += 1;
                if let Some(t) = state.breaker.failure(end) {
                    self.changed(
                        t,
                        &format!("a call took {took:?}, over its budget of {budget:?}"),
                    );
                }
            }
            _ => {
                if let Some(t) = state.breaker.success() {
                    self.changed(t, "the trial message went through");
                }
            }
        }
        (call, end)
    }

    /// Adds a batch's counters to the plugin's and its time to the CPU
    /// window.
    fn settle(&self, state: &mut State, tally: &Tally, now: Instant) {
        let stats = &self.inner.stats;
        let add = |counter: &AtomicU64, n: u64| {
            if n > 0 {
                counter.fetch_add(n, Ordering::Relaxed);
            }
        };
        add(&stats.calls, tally.calls);
        add(&stats.call_nanos, tally.busy.as_nanos() as u64);
        add(&stats.errors, tally.errors);
        add(&stats.panics, tally.panics);
        add(&stats.over_budget, tally.over_budget);
        add(&stats.skipped, tally.skipped);
        for (counter, n) in stats.actions.iter().zip(tally.actions) {
            add(counter, n);
        }
        if tally.calls > 0 {
            self.charge_cpu(state, tally.busy, now);
        }
    }

    /// Adds a call's time to the CPU window; a window of a second or more
    /// over `max_cpu_percent` switches the plugin off.
    fn charge_cpu(&self, state: &mut State, took: Duration, now: Instant) {
        let max = state.security.limits.max_cpu_percent;
        if max == 0 {
            return;
        }
        state.window_busy += took;
        let window = now.saturating_duration_since(state.window_start);
        if window < Duration::from_secs(1) {
            return;
        }
        let percent = state.window_busy.as_secs_f64() / window.as_secs_f64() * 100.0;
        state.window_start = now;
        state.window_busy = Duration::ZERO;
        if percent > f64::from(max) {
            self.inner.stats.over_cpu.fetch_add(1, Ordering::Relaxed);
            if let Some(t) = state.breaker.trip(now) {
                self.changed(
                    t,
                    &format!(
                        "its calls took {percent:.0}% of a CPU, over its max_cpu_percent of {max}"
                    ),
                );
            }
        }
    }

    fn changed(&self, t: Transition, why: &str) {
        let stats = &self.inner.stats;
        stats.state.store(t.to.gauge(), Ordering::Relaxed);
        let i = match t.to {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen => 1,
            BreakerState::Open => 2,
        };
        stats.transitions[i].fetch_add(1, Ordering::Relaxed);
        let name = &self.inner.name;
        match t.to {
            BreakerState::Open => tracing::warn!(
                plugin = %name, from = t.from.name(), to = t.to.name(),
                "plugin switched off by its circuit breaker: {why}"
            ),
            _ => tracing::info!(
                plugin = %name, from = t.from.name(), to = t.to.name(),
                "plugin circuit breaker: {why}"
            ),
        }
    }
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}
