//! The runtime the broker runs on: NUMA-aware worker placement, core
//! pinning, and four task priorities with bounded queues.
//!
//! ```text
//!   spawn(priority, future) ─▶ worker k: [Critical][High][Normal][Background] ─poll─▶ task
//!                                  │ one OS thread pinned to one core,
//!                                  │ a single-threaded tokio runtime inside for I/O and timers
//!   wake on worker j ─────────────▶ worker j's queue (no thread wake-up)
//!   wake from elsewhere ──────────▶ the task's home worker, which is unparked
//! ```
//!
//! Each worker runs the highest class with work, except that a lower class
//! passed over 16 times in a row while it had work gets the next poll: a
//! flood of Background work delays a Critical task by at most the poll in
//! progress plus one poll of each lower class, and Background still gets
//! one poll in 17 (docs/architecture.md, "Runtime").
//!
//! ```
//! use kaelix_core::runtime::{OptimizedRuntime, RuntimeConfig, TaskPriority};
//! # #[tokio::main] async fn main() -> kaelix_core::Result<()> {
//! let runtime = OptimizedRuntime::new(RuntimeConfig { worker_threads: Some(2), ..Default::default() })?;
//! runtime.start().await?;
//! let answer = runtime.spawn_with_priority(TaskPriority::High, async { 6 * 7 }).await?;
//! assert_eq!(answer.await?, 42);
//! runtime.shutdown().await?;
//! # Ok(()) }
//! ```

mod health;
#[cfg(feature = "hwloc")]
mod hwloc;
mod metrics;
mod scheduler;
pub mod topology;

use std::cell::RefCell;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::FutureExt;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::error::{Error, Result};
use scheduler::{Shared, TaskMeta, Worker};

pub use health::{HealthMetrics, HealthMonitor, HealthReport, HealthStatus};
pub use metrics::{process_rss, DelaySummary, RuntimeMetrics, WorkerMetrics};
pub use topology::{CpuSet, Topology, TopologySource, WorkerPlacement};

/// How urgent a task is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskPriority {
    /// Heartbeats and control: must run within the latency target.
    Critical,
    /// Connection I/O and routing.
    High,
    /// Ordinary work.
    Normal,
    /// Housekeeping that may wait.
    Background,
}

impl TaskPriority {
    /// Every priority, most urgent first.
    pub const ALL: [TaskPriority; 4] = [
        TaskPriority::Critical,
        TaskPriority::High,
        TaskPriority::Normal,
        TaskPriority::Background,
    ];

    /// 0 for Critical up to 3 for Background.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The lower-case name, as in metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            TaskPriority::Critical => "critical",
            TaskPriority::High => "high",
            TaskPriority::Normal => "normal",
            TaskPriority::Background => "background",
        }
    }
}

impl fmt::Display for TaskPriority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What waking a parked thread on another CPU costs on a small virtual
/// machine, measured (docs/performance.md): below this target, an idle
/// worker spins rather than parks.
pub const PARK_WAKE_COST_US: u64 = 50;

/// How long an idle worker spins before parking when the latency target is
/// below [`PARK_WAKE_COST_US`] and `idle_spin_us` is unset.
pub const DEFAULT_IDLE_SPIN_US: u64 = 100;

/// `[runtime]`: the workers the broker runs on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Worker threads; unset means one per physical core this process may use.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker_threads: Option<usize>,
    /// Tasks that may wait in one worker's queue of one priority; a spawn
    /// that finds every worker's queue full fails with `Worker pool exhausted`.
    pub task_queue_depth: usize,
    /// Scheduling delay (wake to first poll) that Critical and High tasks
    /// should stay under, at the 99th percentile; health is judged by it.
    pub target_latency_us: u64,
    /// Fill one NUMA node before using the next.
    pub numa_aware: bool,
    /// Distinct priority queues, 1 to 4: with fewer, neighbouring classes
    /// share a queue (2: Critical+High and Normal+Background).
    pub priority_levels: usize,
    /// Pin each worker to its CPU.
    pub pin_workers: bool,
    /// How long an idle worker polls for work before parking, in µs. Unset:
    /// 100 when `target_latency_us` is under the ~50 µs a cross-CPU wake-up
    /// costs, else 0.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_spin_us: Option<u64>,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            worker_threads: None,
            task_queue_depth: 4096,
            target_latency_us: 100,
            numa_aware: true,
            priority_levels: 4,
            pin_workers: true,
            idle_spin_us: None,
        }
    }
}

impl RuntimeConfig {
    /// Every problem with the values, each naming its key.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.worker_threads == Some(0) {
            problems.push("runtime.worker_threads: must be at least 1".to_string());
        }
        if self.task_queue_depth == 0 {
            problems.push("runtime.task_queue_depth: must be at least 1".to_string());
        }
        if self.target_latency_us == 0 {
            problems.push("runtime.target_latency_us: must be at least 1".to_string());
        }
        if !(1..=4).contains(&self.priority_levels) {
            problems.push(format!(
                "runtime.priority_levels: must be 1 to 4, not {}",
                self.priority_levels
            ));
        }
        if self.idle_spin_us.is_some_and(|us| us > 1_000_000) {
            problems.push("runtime.idle_spin_us: at most 1000000 (one second)".to_string());
        }
        problems
    }

    /// The idle spin this configuration asks for.
    pub fn idle_spin(&self) -> Duration {
        let us = self
            .idle_spin_us
            .unwrap_or(if self.target_latency_us < PARK_WAKE_COST_US {
                DEFAULT_IDLE_SPIN_US
            } else {
                0
            });
        Duration::from_micros(us)
    }

    /// The queue each priority uses with `priority_levels` queues.
    fn levels(&self) -> [usize; 4] {
        match self.priority_levels {
            1 => [0, 0, 0, 0],
            2 => [0, 0, 1, 1],
            3 => [0, 1, 2, 2],
            _ => [0, 1, 2, 3],
        }
    }
}

const NEW: u8 = 0;
const RUNNING: u8 = 1;
const STOPPED: u8 = 2;

/// The priority runtime. See the [module documentation](self).
pub struct OptimizedRuntime {
    config: RuntimeConfig,
    topology: Topology,
    placement: Vec<WorkerPlacement>,
    shared: Arc<Shared>,
    state: AtomicU8,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    health: HealthMonitor,
    meta: Arc<RuntimeMeta>,
}

/// What metrics need besides the scheduler's counters.
pub(crate) struct RuntimeMeta {
    pub(crate) topology: Topology,
    pub(crate) placement: Vec<WorkerPlacement>,
    pub(crate) affinity: Mutex<Vec<CpuSet>>,
    pub(crate) pinned: bool,
    pub(crate) spin: Duration,
    pub(crate) queue_depth: usize,
    pub(crate) target_latency: Duration,
}

thread_local! {
    static HANDLE: RefCell<Option<Handle>> = const { RefCell::new(None) };
}

impl OptimizedRuntime {
    /// Reads the topology and plans the workers; threads start with
    /// [`start`](Self::start). Fails on invalid configuration.
    pub fn new(config: RuntimeConfig) -> Result<OptimizedRuntime> {
        let problems = config.problems();
        if !problems.is_empty() {
            return Err(Error::Runtime(format!(
                "invalid runtime configuration:\n  {}",
                problems.join("\n  ")
            )));
        }
        let topology = Topology::detect();
        Self::with_topology(config, topology)
    }

    /// As [`new`](Self::new) on a given topology.
    pub fn with_topology(config: RuntimeConfig, topology: Topology) -> Result<OptimizedRuntime> {
        let workers = config
            .worker_threads
            .unwrap_or_else(|| topology.core_count())
            .max(1);
        let placement = topology.place(workers, config.numa_aware);
        if placement.len() != workers {
            return Err(Error::Runtime(
                "the topology has no CPU this process may use".into(),
            ));
        }
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let spin = config.idle_spin();
        let shared = Arc::new(Shared {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            workers: (0..workers).map(Worker::new).collect(),
            level_of: config.levels(),
            queue_depth: config.task_queue_depth,
            spin,
            stopping: Default::default(),
            stopped_workers: AtomicUsize::new(0),
            all_stopped: Notify::new(),
            next_worker: AtomicUsize::new(0),
            counters: Default::default(),
        });
        let meta = Arc::new(RuntimeMeta {
            topology: topology.clone(),
            placement: placement.clone(),
            affinity: Mutex::new(placement.iter().map(|p| CpuSet::single(p.cpu)).collect()),
            pinned: config.pin_workers,
            spin,
            queue_depth: config.task_queue_depth,
            target_latency: Duration::from_micros(config.target_latency_us),
        });
        let health = HealthMonitor::for_runtime(Arc::downgrade(&shared), meta.target_latency);
        Ok(OptimizedRuntime {
            config,
            topology,
            placement,
            shared,
            state: AtomicU8::new(NEW),
            threads: Mutex::new(Vec::new()),
            health,
            meta,
        })
    }

    /// Starts the worker threads, pins them and waits until each runs.
    /// Logs the placement. Starting twice is an error.
    pub async fn start(&self) -> Result<()> {
        if self
            .state
            .compare_exchange(NEW, RUNNING, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Err(Error::Runtime("the runtime was already started".into()));
        }
        let mut ready = Vec::new();
        {
            let mut threads = self.threads.lock();
            for place in &self.placement {
                let (tx, rx) = tokio::sync::oneshot::channel();
                ready.push(rx);
                let shared = self.shared.clone();
                let handle = self.handle();
                let place = place.clone();
                let pin = self.config.pin_workers;
                let thread = std::thread::Builder::new()
                    .name(format!("kaelix-worker-{}", place.worker))
                    .spawn(move || worker_thread(shared, handle, place, pin, tx))
                    .map_err(|e| Error::Runtime(format!("cannot start a worker thread: {e}")))?;
                threads.push(thread);
            }
        }
        for rx in ready {
            match rx.await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => {
                    self.stop();
                    return Err(Error::Runtime(format!("a worker failed to start: {err}")));
                }
                Err(_) => {
                    self.stop();
                    return Err(Error::Runtime("a worker thread died while starting".into()));
                }
            }
        }
        let workers: Vec<String> = self
            .placement
            .iter()
            .map(|p| {
                format!(
                    "worker {} on cpu {} (node {}, core {}{})",
                    p.worker,
                    p.cpu,
                    p.node,
                    p.core.1,
                    if p.shared { ", shared" } else { "" }
                )
            })
            .collect();
        if self.topology.source == TopologySource::OsCpuList {
            tracing::warn!(
                "no NUMA or core topology found (no sysfs or hwloc data); placing workers on the OS CPU list"
            );
        }
        tracing::info!(
            topology = %self.topology,
            pinned = self.config.pin_workers,
            idle_spin_us = self.meta.spin.as_micros() as u64,
            "runtime started: {}",
            workers.join(", ")
        );
        Ok(())
    }

    /// A cheap, cloneable handle for spawning from anywhere.
    pub fn handle(&self) -> Handle {
        Handle {
            shared: self.shared.clone(),
            health: self.health.clone(),
            meta: self.meta.clone(),
        }
    }

    /// Spawns `future` at `priority` on the least recently chosen worker
    /// with room (the current worker when called from one). Fails with
    /// `Worker pool exhausted` when every worker's queue for that priority
    /// is full, and when the runtime is shutting down.
    pub async fn spawn_with_priority<F>(
        &self,
        priority: TaskPriority,
        future: F,
    ) -> Result<JoinHandle<F::Output>>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle().spawn(priority, future)
    }

    /// Restricts worker `worker` to `cpus` (replacing its pinning).
    pub fn set_worker_affinity(&self, worker: usize, cpus: CpuSet) -> Result<()> {
        self.handle().set_worker_affinity(worker, cpus)
    }

    /// Counters, queue depths, placement and scheduling delay histograms.
    pub fn metrics(&self) -> RuntimeMetrics {
        self.handle().metrics()
    }

    /// The health monitor fed by this runtime's scheduling delays and errors.
    pub fn health(&self) -> HealthMonitor {
        self.health.clone()
    }

    /// The configuration it was made with.
    pub fn config(&self) -> &RuntimeConfig {
        &self.config
    }

    /// The topology it read.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Where each worker runs.
    pub fn placement(&self) -> &[WorkerPlacement] {
        &self.placement
    }

    /// Stops the runtime. Spawns fail from now on; each worker finishes the
    /// poll in progress and stops; every task not yet complete is cancelled
    /// (its future dropped, its [`JoinHandle`] resolves to
    /// `Error::TaskCancelled`), including tasks that wait on I/O or timers.
    /// A task waiting on something outside the runtime is cancelled when it
    /// is next woken. Returns once every worker thread has ended; calling it
    /// from a task of this runtime is an error (it would wait for itself).
    pub async fn shutdown(&self) -> Result<()> {
        if scheduler::current_worker(self.shared.id).is_some() {
            return Err(Error::Runtime(
                "shutdown() must not be awaited on one of the runtime's own workers".into(),
            ));
        }
        if self.state.swap(STOPPED, Ordering::AcqRel) != RUNNING {
            self.stop();
            return Ok(());
        }
        self.stop();
        loop {
            let notified = self.shared.all_stopped.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.shared.stopped_workers.load(Ordering::Acquire) == self.shared.workers.len() {
                break;
            }
            notified.await;
        }
        // Each thread has signalled its end: joining is immediate.
        for thread in self.threads.lock().drain(..) {
            let _ = thread.join();
        }
        tracing::info!("runtime stopped");
        Ok(())
    }

    fn stop(&self) {
        self.state.store(STOPPED, Ordering::Release);
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.shared.wake_all();
        // Tasks queued before start (or when no worker started) end here.
        for worker in &self.shared.workers {
            if self.threads.lock().is_empty() {
                scheduler::drain(&self.shared, worker);
            }
        }
    }
}

impl Drop for OptimizedRuntime {
    fn drop(&mut self) {
        self.stop();
        if scheduler::current_worker(self.shared.id).is_none() {
            for thread in self.threads.get_mut().drain(..) {
                let _ = thread.join();
            }
        }
    }
}

impl fmt::Debug for OptimizedRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OptimizedRuntime")
            .field("workers", &self.placement.len())
            .field("topology", &self.topology.to_string())
            .finish()
    }
}

fn worker_thread(
    shared: Arc<Shared>,
    handle: Handle,
    place: WorkerPlacement,
    pin: bool,
    ready: tokio::sync::oneshot::Sender<std::io::Result<()>>,
) {
    let me = place.worker;
    scheduler::enter(shared.id, me);
    HANDLE.with(|h| *h.borrow_mut() = Some(handle));
    shared.workers[me]
        .tid
        .store(topology::current_tid(), Ordering::Release);
    if pin {
        if let Err(err) = topology::pin_current(&CpuSet::single(place.cpu)) {
            tracing::warn!(worker = me, cpu = place.cpu, error = %err, "cannot pin worker; it runs unpinned");
        }
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            let _ = ready.send(Err(err));
            shared.stopped_workers.fetch_add(1, Ordering::AcqRel);
            shared.all_stopped.notify_waiters();
            return;
        }
    };
    let _ = ready.send(Ok(()));
    // Our loop decides when tasks yield; tokio's per-poll budget would be
    // shared by every task the loop polls in one turn.
    rt.block_on(tokio::task::coop::unconstrained(scheduler::run(
        shared.clone(),
        me,
    )));
    scheduler::drain(&shared, &shared.workers[me]);
    // Dropping the runtime wakes every task waiting on its sockets and
    // timers; with `stopping` set their wakes cancel them.
    drop(rt);
    scheduler::drain(&shared, &shared.workers[me]);
    HANDLE.with(|h| h.borrow_mut().take());
    shared.stopped_workers.fetch_add(1, Ordering::AcqRel);
    shared.all_stopped.notify_waiters();
}

/// A cloneable handle to an [`OptimizedRuntime`].
#[derive(Clone)]
pub struct Handle {
    shared: Arc<Shared>,
    health: HealthMonitor,
    meta: Arc<RuntimeMeta>,
}

impl Handle {
    /// The handle of the runtime whose worker this thread is, if any.
    pub fn try_current() -> Option<Handle> {
        HANDLE.with(|h| h.borrow().clone())
    }

    /// The worker this thread is, when it is one of this runtime's.
    pub fn current_worker(&self) -> Option<usize> {
        scheduler::current_worker(self.shared.id)
    }

    /// Number of workers.
    pub fn worker_count(&self) -> usize {
        self.shared.workers.len()
    }

    /// Spawns `future` at `priority`; see [`OptimizedRuntime::spawn_with_priority`].
    pub fn spawn<F>(&self, priority: TaskPriority, future: F) -> Result<JoinHandle<F::Output>>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let level = self.shared.level_of[priority.index()];
        let home = self.shared.choose_worker(level);
        self.spawn_at(home, false, priority, future)
    }

    /// Spawns `future` on worker `worker` (taken modulo the worker count):
    /// its first poll happens there (no other worker steals it before), and
    /// wakes from outside the runtime send it back there.
    pub fn spawn_on<F>(
        &self,
        worker: usize,
        priority: TaskPriority,
        future: F,
    ) -> Result<JoinHandle<F::Output>>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let worker = worker % self.shared.workers.len();
        let level = self.shared.level_of[priority.index()];
        let home = self.shared.has_room(worker, level).then_some(worker);
        self.spawn_at(home, true, priority, future)
    }

    /// The worker the next connection should go to: the one with the
    /// fewest queued tasks, ties broken round robin.
    pub fn next_worker(&self) -> usize {
        let n = self.shared.workers.len();
        let start = self.shared.next_worker.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|i| (start + i) % n)
            .min_by_key(|&w| self.shared.workers[w].queued_total())
            .unwrap_or(0)
    }

    fn spawn_at<F>(
        &self,
        home: Option<usize>,
        bound: bool,
        priority: TaskPriority,
        future: F,
    ) -> Result<JoinHandle<F::Output>>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let shared = &self.shared;
        if shared.stopping.load(Ordering::Acquire) {
            return Err(Error::Runtime("the runtime is shutting down".into()));
        }
        let Some(home) = home else {
            shared.counters.refused.fetch_add(1, Ordering::Relaxed);
            self.health.record_error();
            return Err(Error::WorkerPoolExhausted {
                priority,
                depth: shared.queue_depth,
            });
        };
        let counting = shared.clone();
        let health = self.health.clone();
        // A combinator, not an `async` block: the block would hold the
        // future twice (once captured, once awaited), doubling every task's
        // allocation — for a connection, its memory while idle.
        let future = AssertUnwindSafe(future).catch_unwind().map(move |result| {
            if result.is_ok() {
                counting.counters.completed.fetch_add(1, Ordering::Relaxed);
                health.record_success();
            } else {
                counting.counters.panicked.fetch_add(1, Ordering::Relaxed);
                health.record_error();
            }
            result
        });
        let scheduling = shared.clone();
        let level = shared.level_of[priority.index()];
        let (runnable, task) = async_task::Builder::new()
            .metadata(TaskMeta { priority, level })
            .spawn(
                move |_| future,
                move |runnable| scheduling.schedule(runnable, home),
            );
        shared.counters.spawned.fetch_add(1, Ordering::Relaxed);
        shared.enqueue_new(runnable, home, bound);
        Ok(JoinHandle {
            task: Some(task.fallible()),
        })
    }

    /// See [`OptimizedRuntime::set_worker_affinity`].
    pub fn set_worker_affinity(&self, worker: usize, cpus: CpuSet) -> Result<()> {
        let Some(w) = self.shared.workers.get(worker) else {
            return Err(Error::Runtime(format!(
                "no worker {worker}: the runtime has {}",
                self.shared.workers.len()
            )));
        };
        if cpus.is_empty() {
            return Err(Error::Runtime("an empty CPU set".into()));
        }
        let tid = w.tid.load(Ordering::Acquire);
        if tid == 0 {
            return Err(Error::Runtime(format!(
                "worker {worker} is not running: start the runtime first"
            )));
        }
        topology::set_affinity(tid, &cpus).map_err(|e| {
            Error::Runtime(format!("cannot set worker {worker}'s CPUs to {cpus}: {e}"))
        })?;
        self.meta.affinity.lock()[worker] = cpus;
        Ok(())
    }

    /// See [`OptimizedRuntime::metrics`].
    pub fn metrics(&self) -> RuntimeMetrics {
        RuntimeMetrics::collect(&self.shared, &self.meta)
    }

    /// See [`OptimizedRuntime::health`].
    pub fn health(&self) -> HealthMonitor {
        self.health.clone()
    }
}

impl fmt::Debug for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handle")
            .field("workers", &self.shared.workers.len())
            .finish()
    }
}

/// Awaits a spawned task's output. Dropping it detaches the task (it runs
/// on); [`abort`](Self::abort) cancels it.
pub struct JoinHandle<T> {
    task: Option<async_task::FallibleTask<std::thread::Result<T>, TaskMeta>>,
}

impl<T> JoinHandle<T> {
    /// Cancels the task: its future is dropped (after the poll in progress,
    /// if one is).
    pub fn abort(mut self) {
        self.task.take();
    }

    /// Whether the task has completed (or was cancelled).
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(|t| t.is_finished())
    }
}

impl<T> Future for JoinHandle<T> {
    type Output = Result<T>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T>> {
        let Some(task) = self.task.as_mut() else {
            return Poll::Ready(Err(Error::TaskCancelled));
        };
        let out = match Pin::new(task).poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(out) => out,
        };
        self.task = None;
        Poll::Ready(match out {
            Some(Ok(value)) => Ok(value),
            Some(Err(panic)) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic with a non-text payload".into());
                Err(Error::TaskPanicked(message))
            }
            None => Err(Error::TaskCancelled),
        })
    }
}

impl<T> Drop for JoinHandle<T> {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.detach();
        }
    }
}

impl<T> fmt::Debug for JoinHandle<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinHandle")
            .field("finished", &self.is_finished())
            .finish()
    }
}

/// Yields once to the scheduler, letting other tasks (and, on this
/// runtime, the worker's I/O polling) run: for loops that could otherwise
/// stay busy, such as a connection whose socket is always readable. Works
/// on any executor.
pub async fn yield_now() {
    let mut yielded = false;
    std::future::poll_fn(move |cx| {
        if yielded {
            return Poll::Ready(());
        }
        yielded = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await
}
