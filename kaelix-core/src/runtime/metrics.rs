//! A snapshot of the runtime: placement, counters, queue depths and
//! scheduling delay per priority.

use std::fmt;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hdrhistogram::Histogram;

use super::scheduler::Shared;
use super::{CpuSet, RuntimeMeta, TaskPriority, Topology, WorkerPlacement};

/// Percentiles of a scheduling delay histogram.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct DelaySummary {
    /// Samples (task polls).
    pub count: u64,
    /// Median.
    pub p50: Duration,
    /// 90th percentile.
    pub p90: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// 99.9th percentile.
    pub p999: Duration,
    /// Largest.
    pub max: Duration,
}

impl DelaySummary {
    /// Summarises a histogram of nanoseconds.
    pub fn of(h: &Histogram<u64>) -> DelaySummary {
        if h.is_empty() {
            return DelaySummary::default();
        }
        let at = |q| Duration::from_nanos(h.value_at_quantile(q));
        DelaySummary {
            count: h.len(),
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            p999: at(0.999),
            max: Duration::from_nanos(h.max()),
        }
    }
}

/// One worker's share of a [`RuntimeMetrics`].
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerMetrics {
    /// Where it was placed.
    pub placement: WorkerPlacement,
    /// The CPUs it may run on now (its pinning, or what
    /// `set_worker_affinity` set).
    pub cpus: CpuSet,
    /// Tasks polled.
    pub polls: u64,
    /// Times it parked for lack of work.
    pub parks: u64,
    /// Tasks it took from other workers.
    pub steals: u64,
    /// Tasks queued now, per priority (Critical first).
    pub queued: [usize; 4],
}

/// A snapshot of an [`OptimizedRuntime`](super::OptimizedRuntime).
#[derive(Debug, Clone)]
pub struct RuntimeMetrics {
    /// The topology the placement came from.
    pub topology: Topology,
    /// Per worker.
    pub workers: Vec<WorkerMetrics>,
    /// Whether workers are pinned.
    pub pinned: bool,
    /// How long an idle worker spins before parking.
    pub idle_spin: Duration,
    /// The queue bound per worker and priority.
    pub task_queue_depth: usize,
    /// The scheduling delay target.
    pub target_latency: Duration,
    /// Tasks spawned.
    pub tasks_spawned: u64,
    /// Tasks that ran to completion.
    pub tasks_completed: u64,
    /// Tasks that panicked (the worker survives; the task's handle gets the error).
    pub tasks_panicked: u64,
    /// Tasks cancelled by shutdown.
    pub tasks_cancelled: u64,
    /// Spawns refused because the queues were full.
    pub spawns_refused: u64,
    delays: [Histogram<u64>; 4],
    rss_bytes: Option<u64>,
    memory_limit: Option<u64>,
}

impl RuntimeMetrics {
    pub(crate) fn collect(shared: &Shared, meta: &RuntimeMeta) -> RuntimeMetrics {
        let affinity = meta.affinity.lock().clone();
        let mut delays: [Histogram<u64>; 4] = std::array::from_fn(|_| {
            Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds")
        });
        let workers = shared
            .workers
            .iter()
            .map(|w| {
                {
                    let stats = w.delays.lock();
                    for (all, mine) in delays.iter_mut().zip(&stats.total) {
                        let _ = all.add(mine);
                    }
                }
                WorkerMetrics {
                    placement: meta.placement[w.index].clone(),
                    cpus: affinity[w.index].clone(),
                    polls: w.polls.load(Ordering::Relaxed),
                    parks: w.parks.load(Ordering::Relaxed),
                    steals: w.steals.load(Ordering::Relaxed),
                    queued: std::array::from_fn(|p| w.queued[p].load(Ordering::Relaxed)),
                }
            })
            .collect();
        let c = &shared.counters;
        RuntimeMetrics {
            topology: meta.topology.clone(),
            workers,
            pinned: meta.pinned,
            idle_spin: meta.spin,
            task_queue_depth: meta.queue_depth,
            target_latency: meta.target_latency,
            tasks_spawned: c.spawned.load(Ordering::Relaxed),
            tasks_completed: c.completed.load(Ordering::Relaxed),
            tasks_panicked: c.panicked.load(Ordering::Relaxed),
            tasks_cancelled: c.cancelled.load(Ordering::Relaxed),
            spawns_refused: c.refused.load(Ordering::Relaxed),
            delays,
            rss_bytes: process_rss(),
            memory_limit: memory_limit(),
        }
    }

    /// Scheduling delay (spawn or wake to first poll) of `priority` since start.
    pub fn scheduling_delay(&self, priority: TaskPriority) -> DelaySummary {
        DelaySummary::of(&self.delays[priority.index()])
    }

    /// The histogram behind [`scheduling_delay`](Self::scheduling_delay), in nanoseconds.
    pub fn scheduling_delay_histogram(&self, priority: TaskPriority) -> &Histogram<u64> {
        &self.delays[priority.index()]
    }

    /// Tasks queued now on all workers, per priority (Critical first).
    pub fn queue_depth(&self) -> [usize; 4] {
        let mut total = [0; 4];
        for w in &self.workers {
            for (t, q) in total.iter_mut().zip(w.queued) {
                *t += q;
            }
        }
        total
    }

    /// Panicked tasks and refused spawns as a fraction of all spawns
    /// attempted since start.
    pub fn error_rate(&self) -> f64 {
        let attempts = self.tasks_spawned + self.spawns_refused;
        if attempts == 0 {
            return 0.0;
        }
        (self.tasks_panicked + self.spawns_refused) as f64 / attempts as f64
    }

    /// The process's resident memory as a fraction of what it may use (its
    /// cgroup's limit, else the machine's memory); 0 when unknown.
    pub fn memory_usage(&self) -> f64 {
        match (self.rss_bytes, self.memory_limit) {
            (Some(rss), Some(limit)) if limit > 0 => rss as f64 / limit as f64,
            _ => 0.0,
        }
    }

    /// The process's resident memory in bytes, when the OS tells.
    pub fn rss_bytes(&self) -> Option<u64> {
        self.rss_bytes
    }

    /// One line per worker: `worker 0 on cpu 0 (node 0, core 0)`.
    pub fn placement_summary(&self) -> String {
        self.workers
            .iter()
            .map(|w| format!("w{}:cpu{}", w.placement.worker, w.cpus))
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl fmt::Display for RuntimeMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "topology: {}", self.topology)?;
        for w in &self.workers {
            writeln!(
                f,
                "worker {}: cpus {} (node {}, core {}{}) polls={} parks={} steals={} queued={:?}",
                w.placement.worker,
                w.cpus,
                w.placement.node,
                w.placement.core.1,
                if w.placement.shared { ", shared" } else { "" },
                w.polls,
                w.parks,
                w.steals,
                w.queued
            )?;
        }
        for p in TaskPriority::ALL {
            let d = self.scheduling_delay(p);
            writeln!(
                f,
                "{p}: {} polls, delay p50 {:?} p99 {:?} max {:?}",
                d.count, d.p50, d.p99, d.max
            )?;
        }
        write!(
            f,
            "tasks spawned={} completed={} panicked={} cancelled={} refused={}",
            self.tasks_spawned,
            self.tasks_completed,
            self.tasks_panicked,
            self.tasks_cancelled,
            self.spawns_refused
        )
    }
}

/// Resident set size of this process in bytes, from /proc/self/statm;
/// `None` where the OS does not tell.
pub fn process_rss() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}

/// The memory this process may use: its cgroup v2 limit when set, else
/// the machine's total.
fn memory_limit() -> Option<u64> {
    if let Ok(max) = std::fs::read_to_string("/sys/fs/cgroup/memory.max") {
        if let Ok(limit) = max.trim().parse::<u64>() {
            return Some(limit);
        }
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
