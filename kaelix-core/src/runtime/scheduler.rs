//! Workers, their priority queues and the loop each one runs.
//!
//! Each worker is one OS thread pinned to its CPU, running a single-threaded
//! tokio runtime for I/O and timers. Inside it, the worker loop takes
//! [`Runnable`]s from its four priority queues and polls them; when the
//! queues are empty it yields to tokio (which polls epoll without blocking),
//! spins for a bounded time if configured, and then parks in tokio until a
//! socket, a timer or another thread's wake needs it.
//!
//! A task woken on a worker thread is queued on that worker, so the common
//! chain "socket readable → route → wake the subscriber's writer" stays on
//! one core with no thread wake-up. An idle worker steals from busy ones.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_task::Runnable;
use crossbeam_queue::SegQueue;
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use tokio::sync::Notify;

use super::TaskPriority;

/// Runnables polled before the worker lets tokio poll for I/O.
const POLLS_PER_TICK: usize = 64;

/// A lower class passed over this many times in a row while it had work
/// gets the next poll.
pub(crate) const STARVATION_LIMIT: u32 = 16;

/// How long a scheduling-delay window lasts for health evaluation.
pub(crate) const HEALTH_WINDOW: Duration = Duration::from_secs(1);

pub(crate) type Task = Runnable<TaskMeta>;

/// What every task carries.
#[derive(Debug)]
pub(crate) struct TaskMeta {
    pub(crate) priority: TaskPriority,
    /// The queue it goes to (see `Shared::level_of`).
    pub(crate) level: usize,
}

/// A runnable with the time it was queued.
pub(crate) struct Job {
    task: Task,
    queued_at: Instant,
    /// Placed on this worker on purpose (`spawn_on`): not to be stolen
    /// before its first poll.
    bound: bool,
}

thread_local! {
    /// `(runtime id, worker index)` of the worker this thread runs.
    static CURRENT: Cell<Option<(u64, usize)>> = const { Cell::new(None) };
    /// True while the worker loop is running tasks (so a local wake needs no
    /// notification: the loop looks at the queues again before parking).
    static IN_LOOP: Cell<bool> = const { Cell::new(false) };
}

pub(crate) fn current_worker(runtime: u64) -> Option<usize> {
    CURRENT.with(|c| match c.get() {
        Some((id, worker)) if id == runtime => Some(worker),
        _ => None,
    })
}

/// Scheduling delay histograms of one worker.
pub(crate) struct DelayStats {
    /// Since start, per priority, in nanoseconds.
    pub(crate) total: [Histogram<u64>; 4],
    /// The window being filled.
    pub(crate) current: [Histogram<u64>; 4],
    /// The last complete window.
    pub(crate) previous: [Histogram<u64>; 4],
    current_since: Instant,
}

fn histograms() -> [Histogram<u64>; 4] {
    // 1 ns .. 60 s at 3 significant digits.
    std::array::from_fn(|_| {
        Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds")
    })
}

impl DelayStats {
    fn new() -> DelayStats {
        DelayStats {
            total: histograms(),
            current: histograms(),
            previous: histograms(),
            current_since: Instant::now(),
        }
    }

    fn record(&mut self, priority: usize, nanos: u64, now: Instant) {
        self.roll(now);
        self.total[priority].saturating_record(nanos);
        self.current[priority].saturating_record(nanos);
    }

    /// Moves to a new window when the current one is over.
    pub(crate) fn roll(&mut self, now: Instant) {
        let age = now.saturating_duration_since(self.current_since);
        if age < HEALTH_WINDOW {
            return;
        }
        std::mem::swap(&mut self.previous, &mut self.current);
        for h in &mut self.current {
            h.reset();
        }
        if age >= HEALTH_WINDOW * 2 {
            // Nothing ran through a whole window: it was idle, not slow.
            for h in &mut self.previous {
                h.reset();
            }
        }
        self.current_since = now;
    }
}

/// One worker's shared state.
pub(crate) struct Worker {
    pub(crate) index: usize,
    queues: [SegQueue<Job>; 4],
    pub(crate) queued: [AtomicUsize; 4],
    unpark: Notify,
    parked: AtomicBool,
    pub(crate) polls: AtomicU64,
    pub(crate) parks: AtomicU64,
    pub(crate) steals: AtomicU64,
    pub(crate) delays: Mutex<DelayStats>,
    /// The worker thread's kernel id, once it runs.
    pub(crate) tid: std::sync::atomic::AtomicI32,
}

impl Worker {
    pub(crate) fn new(index: usize) -> Worker {
        Worker {
            index,
            queues: Default::default(),
            queued: Default::default(),
            unpark: Notify::new(),
            parked: AtomicBool::new(false),
            polls: AtomicU64::new(0),
            parks: AtomicU64::new(0),
            steals: AtomicU64::new(0),
            delays: Mutex::new(DelayStats::new()),
            tid: std::sync::atomic::AtomicI32::new(0),
        }
    }

    pub(crate) fn queued_total(&self) -> usize {
        self.queued.iter().map(|q| q.load(Ordering::Relaxed)).sum()
    }

    fn push(&self, job: Job) {
        let p = job.task.metadata().level;
        self.queued[p].fetch_add(1, Ordering::Relaxed);
        self.queues[p].push(job);
    }

    fn pop(&self, p: usize) -> Option<Job> {
        let job = self.queues[p].pop()?;
        self.queued[p].fetch_sub(1, Ordering::Relaxed);
        Some(job)
    }

    fn is_empty(&self) -> bool {
        self.queues.iter().all(SegQueue::is_empty)
    }

    /// Wakes the worker if it is parked (or about to park).
    fn notify(&self) {
        self.unpark.notify_one();
    }
}

/// Chooses the next class to run: the highest with work, unless a lower one
/// has been passed over [`STARVATION_LIMIT`] times in a row.
pub(crate) struct Policy {
    passed: [u32; 4],
}

impl Policy {
    pub(crate) fn new() -> Policy {
        Policy { passed: [0; 4] }
    }

    /// `has_work[p]` tells whether class `p` (0 = Critical) has a task.
    pub(crate) fn pick(&mut self, has_work: [bool; 4]) -> Option<usize> {
        let top = has_work.iter().position(|&w| w)?;
        // The lower class passed over longest; among equals the higher one.
        let starved = (top + 1..4)
            .rev()
            .filter(|&p| has_work[p] && self.passed[p] >= STARVATION_LIMIT)
            .max_by_key(|&p| self.passed[p]);
        let chosen = starved.unwrap_or(top);
        for (p, (passed, &work)) in self.passed.iter_mut().zip(&has_work).enumerate() {
            if p == chosen || !work {
                *passed = 0;
            } else if p > chosen {
                *passed += 1;
            }
        }
        Some(chosen)
    }
}

/// State every worker and handle shares.
pub(crate) struct Shared {
    pub(crate) id: u64,
    pub(crate) workers: Vec<Worker>,
    /// Maps a priority to its queue: with fewer than four priority levels,
    /// neighbouring classes share a queue.
    pub(crate) level_of: [usize; 4],
    pub(crate) queue_depth: usize,
    pub(crate) spin: Duration,
    pub(crate) stopping: AtomicBool,
    /// Workers whose loop has ended.
    pub(crate) stopped_workers: AtomicUsize,
    pub(crate) all_stopped: Notify,
    pub(crate) next_worker: AtomicUsize,
    pub(crate) counters: Counters,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) spawned: AtomicU64,
    pub(crate) completed: AtomicU64,
    pub(crate) panicked: AtomicU64,
    pub(crate) cancelled: AtomicU64,
    pub(crate) refused: AtomicU64,
}

impl Shared {
    /// Queues a woken `task`: on the current worker when woken on one of
    /// this runtime's workers, else on its home worker (which is woken).
    pub(crate) fn schedule(&self, task: Task, home: usize) {
        let target = current_worker(self.id).unwrap_or(home);
        self.enqueue(task, target, false);
    }

    /// Queues a new task on `worker`; a `bound` one stays there for its
    /// first poll (a connection registers its socket where it first runs).
    pub(crate) fn enqueue_new(&self, task: Task, worker: usize, bound: bool) {
        self.enqueue(task, worker, bound);
    }

    fn enqueue(&self, task: Task, target: usize, bound: bool) {
        if self.stopping.load(Ordering::Acquire) {
            // Dropping a runnable cancels its task: its future is dropped.
            self.counters.cancelled.fetch_add(1, Ordering::Relaxed);
            drop(task);
            return;
        }
        let worker = &self.workers[target];
        worker.push(Job {
            task,
            queued_at: Instant::now(),
            bound,
        });
        if current_worker(self.id) != Some(target) {
            worker.notify();
        } else if !IN_LOOP.with(Cell::get) {
            // Woken from inside tokio (I/O or a timer) while the loop
            // waits: a same-thread wake, no syscall.
            worker.notify();
        } else if worker.queued_total() > 1 {
            self.wake_idle_sibling(target);
        }
    }

    /// A backlog is building on `me`: let a parked sibling come and steal.
    fn wake_idle_sibling(&self, me: usize) {
        for worker in &self.workers {
            if worker.index != me && worker.parked.swap(false, Ordering::AcqRel) {
                worker.notify();
                return;
            }
        }
    }

    /// The worker a new task from outside goes to: round robin over the
    /// workers whose queue for `level` has room.
    pub(crate) fn choose_worker(&self, level: usize) -> Option<usize> {
        if let Some(me) = current_worker(self.id) {
            if self.has_room(me, level) {
                return Some(me);
            }
        }
        let n = self.workers.len();
        let start = self.next_worker.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|i| (start + i) % n)
            .find(|&w| self.has_room(w, level))
    }

    /// Whether `worker`'s queue for `level` takes another new task.
    pub(crate) fn has_room(&self, worker: usize, level: usize) -> bool {
        self.workers[worker].queued[level].load(Ordering::Relaxed) < self.queue_depth
    }

    fn steal_into(&self, me: usize) -> bool {
        let mine = &self.workers[me];
        for victim in self.workers.iter().filter(|w| w.index != me) {
            for p in 0..4 {
                let available = victim.queued[p].load(Ordering::Relaxed);
                if available == 0 {
                    continue;
                }
                // Half, so that the victim keeps work for itself.
                let take = available.div_ceil(2);
                let mut took = 0;
                while took < take {
                    match victim.pop(p) {
                        Some(job) if job.bound => {
                            // Back to its worker (at the tail; rare).
                            victim.push(job);
                            break;
                        }
                        Some(job) => {
                            mine.push(job);
                            took += 1;
                        }
                        None => break,
                    }
                }
                if took > 0 {
                    mine.steals.fetch_add(took as u64, Ordering::Relaxed);
                    return true;
                }
            }
        }
        false
    }
}

/// The loop one worker thread runs inside its tokio runtime.
pub(crate) async fn run(shared: Arc<Shared>, me: usize) {
    let worker = &shared.workers[me];
    let mut policy = Policy::new();
    let mut last_work = Instant::now();
    loop {
        let mut ran = 0;
        IN_LOOP.with(|f| f.set(true));
        while ran < POLLS_PER_TICK && !shared.stopping.load(Ordering::Acquire) {
            let has_work = std::array::from_fn(|p| worker.queued[p].load(Ordering::Relaxed) > 0);
            let Some(p) = policy.pick(has_work) else {
                break;
            };
            let Some(job) = worker.pop(p) else {
                // A thief got there first.
                continue;
            };
            let now = Instant::now();
            let delay = now.saturating_duration_since(job.queued_at);
            let priority = job.task.metadata().priority.index();
            worker
                .delays
                .lock()
                .record(priority, delay.as_nanos() as u64, now);
            job.task.run();
            ran += 1;
        }
        IN_LOOP.with(|f| f.set(false));
        worker.polls.fetch_add(ran as u64, Ordering::Relaxed);
        if shared.stopping.load(Ordering::Acquire) {
            break;
        }
        if ran > 0 {
            last_work = Instant::now();
            if !worker.is_empty() {
                // More to run: let tokio poll for I/O (without blocking)
                // and fire timers in between, then carry on.
                tokio::task::yield_now().await;
                continue;
            }
            // Nothing queued: parking below lets tokio poll for I/O in the
            // same epoll_wait that would otherwise follow a yield.
        }
        if shared.workers.len() > 1 && shared.steal_into(me) {
            continue;
        }
        if !shared.spin.is_zero() && last_work.elapsed() < shared.spin {
            tokio::task::yield_now().await;
            continue;
        }
        worker.parked.store(true, Ordering::SeqCst);
        if !worker.is_empty() || shared.stopping.load(Ordering::SeqCst) {
            worker.parked.store(false, Ordering::SeqCst);
            continue;
        }
        worker.parks.fetch_add(1, Ordering::Relaxed);
        worker.unpark.notified().await;
        worker.parked.store(false, Ordering::SeqCst);
    }
}

/// Runs on the worker thread: marks it as worker `me` of runtime `id`.
pub(crate) fn enter(id: u64, me: usize) {
    CURRENT.with(|c| c.set(Some((id, me))));
}

/// Drops everything still queued on `worker` (cancelling those tasks).
pub(crate) fn drain(shared: &Shared, worker: &Worker) {
    for p in 0..4 {
        while let Some(job) = worker.pop(p) {
            shared.counters.cancelled.fetch_add(1, Ordering::Relaxed);
            drop(job);
        }
    }
}

impl Shared {
    pub(crate) fn wake_all(&self) {
        for worker in &self.workers {
            worker.notify();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_highest_class_runs_first() {
        let mut policy = Policy::new();
        assert_eq!(policy.pick([false, true, true, true]), Some(1));
        assert_eq!(policy.pick([true, true, false, false]), Some(0));
        assert_eq!(policy.pick([false; 4]), None);
    }

    #[test]
    fn a_passed_over_class_gets_one_poll_in_seventeen() {
        let mut policy = Policy::new();
        let mut picks = Vec::new();
        for _ in 0..34 {
            picks.push(policy.pick([true, false, false, true]).unwrap());
        }
        let background: Vec<usize> = picks
            .iter()
            .enumerate()
            .filter(|(_, &p)| p == 3)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(background, vec![16, 33]);
    }

    #[test]
    fn every_starved_class_gets_its_turn() {
        let mut policy = Policy::new();
        let mut seen = [0usize; 4];
        for _ in 0..200 {
            seen[policy.pick([true; 4]).unwrap()] += 1;
        }
        assert!(seen.iter().all(|&n| n > 0), "{seen:?}");
        assert!(seen[0] > seen[1] && seen[0] > seen[3], "{seen:?}");
    }
}
