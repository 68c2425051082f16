//! Healthy, Degraded or Unhealthy, from measured scheduling delay and error
//! rates over the last second or two.
//!
//! | status    | when |
//! |-----------|------|
//! | Healthy   | p99 scheduling delay of Critical and High tasks ≤ the target, and ≤ 1% errors (or too few events to judge: an idle runtime is healthy) |
//! | Degraded  | p99 delay above the target but within 10× it, or 1–10% errors |
//! | Unhealthy | p99 delay above 10× the target, or more than 10% errors, or the runtime stopped |
//! | Unknown   | a monitor with nothing to go on: not linked to a running runtime and fed nothing |
//!
//! Errors are tasks that panicked, spawns refused for a full queue, and
//! whatever the application reports with [`HealthMonitor::record_error`].

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use parking_lot::Mutex;

use super::scheduler::{Shared, HEALTH_WINDOW};

/// Judge latency on at least this many samples in the window.
const MIN_LATENCY_SAMPLES: u64 = 20;
/// Judge errors on at least this many events in the window.
const MIN_EVENTS: u64 = 20;
/// Above this multiple of the target, Degraded becomes Unhealthy.
const UNHEALTHY_FACTOR: u32 = 10;

/// Overall health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HealthStatus {
    /// Within targets.
    Healthy,
    /// Serving, but slower than the target or with some errors.
    Degraded,
    /// Far off the target, failing, or stopped.
    Unhealthy,
    /// Nothing measured yet.
    Unknown,
}

impl HealthStatus {
    fn rank(self) -> u8 {
        match self {
            HealthStatus::Healthy => 0,
            HealthStatus::Unknown => 1,
            HealthStatus::Degraded => 2,
            HealthStatus::Unhealthy => 3,
        }
    }

    /// The lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            HealthStatus::Healthy => "healthy",
            HealthStatus::Degraded => "degraded",
            HealthStatus::Unhealthy => "unhealthy",
            HealthStatus::Unknown => "unknown",
        }
    }
}

impl fmt::Display for HealthStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The status with the reason for it.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthReport {
    /// The status.
    pub status: HealthStatus,
    /// Why, in words.
    pub reason: String,
    /// What it was judged on.
    pub metrics: HealthMetrics,
}

/// The figures a [`HealthReport`] rests on (the last complete window and
/// the current one).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HealthMetrics {
    /// 99th percentile scheduling delay of Critical and High tasks (or of
    /// the latencies fed with `record_latency`), when there were samples.
    pub p99_latency: Option<Duration>,
    /// Latency samples it rests on.
    pub latency_samples: u64,
    /// Operations that succeeded.
    pub successes: u64,
    /// Operations that failed.
    pub errors: u64,
    /// The latency target.
    pub target: Duration,
}

impl HealthMetrics {
    /// Failed operations as a fraction of all (0 when there were none).
    pub fn error_rate(&self) -> f64 {
        let total = self.successes + self.errors;
        if total == 0 {
            0.0
        } else {
            self.errors as f64 / total as f64
        }
    }
}

/// Judges health; cheap to clone (clones share state).
#[derive(Clone)]
pub struct HealthMonitor {
    inner: Arc<Inner>,
}

struct Inner {
    runtime: Option<Weak<Shared>>,
    target: Duration,
    window: Mutex<Window>,
}

struct Window {
    since: Instant,
    current: Counts,
    previous: Counts,
}

struct Counts {
    successes: u64,
    errors: u64,
    latency: Histogram<u64>,
}

impl Counts {
    fn new() -> Counts {
        Counts {
            successes: 0,
            errors: 0,
            latency: Histogram::new_with_bounds(1, 60_000_000_000, 3)
                .expect("valid histogram bounds"),
        }
    }

    fn clear(&mut self) {
        self.successes = 0;
        self.errors = 0;
        self.latency.reset();
    }
}

impl Window {
    fn roll(&mut self, now: Instant) {
        let age = now.saturating_duration_since(self.since);
        if age < HEALTH_WINDOW {
            return;
        }
        std::mem::swap(&mut self.previous, &mut self.current);
        self.current.clear();
        if age >= HEALTH_WINDOW * 2 {
            self.previous.clear();
        }
        self.since = now;
    }
}

impl Default for HealthMonitor {
    fn default() -> Self {
        Self::new()
    }
}

impl HealthMonitor {
    /// A monitor fed only by what the application records, with a 100 µs
    /// latency target. [`OptimizedRuntime::health`](super::OptimizedRuntime::health)
    /// gives one fed by the runtime.
    pub fn new() -> HealthMonitor {
        Self::with_target(Duration::from_micros(100))
    }

    /// A monitor judging latency against `target`.
    pub fn with_target(target: Duration) -> HealthMonitor {
        Self::build(None, target)
    }

    pub(crate) fn for_runtime(runtime: Weak<Shared>, target: Duration) -> HealthMonitor {
        Self::build(Some(runtime), target)
    }

    fn build(runtime: Option<Weak<Shared>>, target: Duration) -> HealthMonitor {
        HealthMonitor {
            inner: Arc::new(Inner {
                runtime,
                target,
                window: Mutex::new(Window {
                    since: Instant::now(),
                    current: Counts::new(),
                    previous: Counts::new(),
                }),
            }),
        }
    }

    /// Counts a successful operation.
    pub fn record_success(&self) {
        let mut w = self.inner.window.lock();
        w.roll(Instant::now());
        w.current.successes += 1;
    }

    /// Counts a failed operation.
    pub fn record_error(&self) {
        let mut w = self.inner.window.lock();
        w.roll(Instant::now());
        w.current.errors += 1;
    }

    /// Records a latency (for a monitor not linked to a runtime, or for
    /// latencies the application measures itself).
    pub fn record_latency(&self, latency: Duration) {
        let mut w = self.inner.window.lock();
        w.roll(Instant::now());
        w.current
            .latency
            .saturating_record(latency.as_nanos().min(u64::MAX as u128) as u64);
    }

    /// The status now.
    pub fn status(&self) -> HealthStatus {
        self.report().status
    }

    /// The figures the status is judged on.
    pub fn metrics(&self) -> HealthMetrics {
        self.report().metrics
    }

    /// The status, its reason and its figures.
    pub fn report(&self) -> HealthReport {
        let now = Instant::now();
        let target = self.inner.target;
        let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)
            .expect("valid histogram bounds");
        let (successes, errors) = {
            let mut w = self.inner.window.lock();
            w.roll(now);
            let _ = latency.add(&w.current.latency);
            let _ = latency.add(&w.previous.latency);
            (
                w.current.successes + w.previous.successes,
                w.current.errors + w.previous.errors,
            )
        };
        let mut verdicts: Vec<(HealthStatus, String)> = Vec::new();
        let mut linked_running = false;
        if let Some(runtime) = &self.inner.runtime {
            match runtime.upgrade() {
                None => verdicts.push((HealthStatus::Unhealthy, "the runtime is gone".into())),
                Some(shared) => {
                    let started = shared
                        .workers
                        .iter()
                        .any(|w| w.tid.load(Ordering::Acquire) != 0);
                    let stopped = shared.stopped_workers.load(Ordering::Acquire);
                    if shared.stopping.load(Ordering::Acquire) {
                        verdicts.push((HealthStatus::Unhealthy, "the runtime is stopping".into()));
                    } else if stopped > 0 {
                        verdicts.push((
                            HealthStatus::Unhealthy,
                            format!("{stopped} runtime worker(s) stopped"),
                        ));
                    } else if !started {
                        verdicts.push((HealthStatus::Unknown, "the runtime is not started".into()));
                    } else {
                        linked_running = true;
                    }
                    for worker in &shared.workers {
                        let mut delays = worker.delays.lock();
                        delays.roll(now);
                        for p in 0..2 {
                            let _ = latency.add(&delays.current[p]);
                            let _ = latency.add(&delays.previous[p]);
                        }
                    }
                }
            }
        }
        let samples = latency.len();
        let p99 = (samples > 0).then(|| Duration::from_nanos(latency.value_at_quantile(0.99)));
        let metrics = HealthMetrics {
            p99_latency: p99,
            latency_samples: samples,
            successes,
            errors,
            target,
        };
        if samples >= MIN_LATENCY_SAMPLES {
            let p99 = p99.unwrap_or_default();
            let shown = format!(
                "p99 scheduling delay {:.1} µs against a target of {} µs",
                p99.as_secs_f64() * 1e6,
                target.as_micros()
            );
            verdicts.push(if p99 <= target {
                (HealthStatus::Healthy, shown)
            } else if p99 <= target * UNHEALTHY_FACTOR {
                (HealthStatus::Degraded, shown)
            } else {
                (HealthStatus::Unhealthy, shown)
            });
        }
        if successes + errors >= MIN_EVENTS {
            let rate = metrics.error_rate();
            let shown = format!(
                "{:.1}% of {} operations failed",
                rate * 100.0,
                successes + errors
            );
            verdicts.push(if rate <= 0.01 {
                (HealthStatus::Healthy, shown)
            } else if rate <= 0.10 {
                (HealthStatus::Degraded, shown)
            } else {
                (HealthStatus::Unhealthy, shown)
            });
        }
        if verdicts.is_empty() {
            verdicts.push(if linked_running {
                (HealthStatus::Healthy, "idle".into())
            } else {
                (HealthStatus::Unknown, "nothing measured yet".into())
            });
        }
        let worst = verdicts
            .iter()
            .map(|(s, _)| s.rank())
            .max()
            .unwrap_or_default();
        let status = verdicts
            .iter()
            .find(|(s, _)| s.rank() == worst)
            .map(|(s, _)| *s)
            .unwrap_or(HealthStatus::Unknown);
        let reason = verdicts
            .iter()
            .filter(|(s, _)| *s == status)
            .map(|(_, r)| r.as_str())
            .collect::<Vec<_>>()
            .join("; ");
        HealthReport {
            status,
            reason,
            metrics,
        }
    }
}

impl fmt::Debug for HealthMonitor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HealthMonitor")
            .field("target", &self.inner.target)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_monitor_knows_nothing() {
        let monitor = HealthMonitor::new();
        assert_eq!(monitor.status(), HealthStatus::Unknown);
        assert_eq!(monitor.metrics().error_rate(), 0.0);
    }

    #[test]
    fn latency_against_the_target_sets_the_status() {
        let monitor = HealthMonitor::with_target(Duration::from_micros(10));
        for _ in 0..100 {
            monitor.record_latency(Duration::from_micros(5));
        }
        assert_eq!(monitor.status(), HealthStatus::Healthy);
        for _ in 0..100 {
            monitor.record_latency(Duration::from_micros(50));
        }
        let report = monitor.report();
        assert_eq!(report.status, HealthStatus::Degraded, "{}", report.reason);
        assert!(report.reason.contains("p99"), "{}", report.reason);
        for _ in 0..1000 {
            monitor.record_latency(Duration::from_millis(1));
        }
        assert_eq!(monitor.status(), HealthStatus::Unhealthy);
    }

    #[test]
    fn error_rates_set_the_status() {
        let monitor = HealthMonitor::new();
        for _ in 0..95 {
            monitor.record_success();
        }
        for _ in 0..5 {
            monitor.record_error();
        }
        let metrics = monitor.metrics();
        assert!((metrics.error_rate() - 0.05).abs() < 1e-9);
        assert_eq!(monitor.status(), HealthStatus::Degraded);
        for _ in 0..50 {
            monitor.record_error();
        }
        assert_eq!(monitor.status(), HealthStatus::Unhealthy);
    }
}
