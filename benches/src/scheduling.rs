//! `kaelix-bench scheduling`: how long urgent tasks wait while the machine
//! is flooded with CPU-bound background work, on the OptimizedRuntime
//! (flood at Background, probes at Critical and High) and on a plain tokio
//! runtime with as many workers (everything in one class).
//!
//! A probe thread spawns one task every `1 / rate` seconds and the task
//! records the time from just before the spawn to its first poll. Flood
//! tasks burn `--payload` microseconds of CPU, then yield, forever.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use kaelix_core::runtime::{OptimizedRuntime, RuntimeConfig, TaskPriority};
use parking_lot::Mutex;
use serde::Serialize;

use crate::error::{BenchError, Result};

/// What one side of the comparison measured.
#[derive(Debug, Clone, Serialize)]
pub struct SchedulingResult {
    pub scenario: &'static str,
    /// `kaelix-runtime` or `tokio`.
    pub runtime: &'static str,
    /// `critical`, `high`, or `any` (tokio has no classes).
    pub class: &'static str,
    pub workers: usize,
    pub flood_tasks: usize,
    pub flood_slice_us: u64,
    pub probes: u64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    /// Flood slices completed per second (background progress).
    pub flood_slices_per_s: f64,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub label: String,
}

/// The benchmark's settings.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub workers: usize,
    pub flood_tasks: usize,
    pub slice: Duration,
    pub probes_per_s: f64,
    pub duration: Duration,
}

type Recorder = Arc<Mutex<Histogram<u64>>>;

fn histogram() -> Recorder {
    Arc::new(Mutex::new(
        Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds"),
    ))
}

fn burn(slice: Duration) {
    let start = Instant::now();
    while start.elapsed() < slice {
        std::hint::spin_loop();
    }
}

/// Runs the probes from a plain thread for `duration`; `spawn` starts one
/// probe task given its recorder and the send instant.
fn probe_loop(settings: Settings, mut spawn: impl FnMut(usize, Instant)) -> u64 {
    let period = Duration::from_secs_f64(1.0 / settings.probes_per_s);
    let end = Instant::now() + settings.duration;
    let mut next = Instant::now();
    let mut sent = 0u64;
    while Instant::now() < end {
        next += period;
        spawn(sent as usize, Instant::now());
        sent += 1;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    sent
}

fn summarise(
    runtime: &'static str,
    class: &'static str,
    settings: Settings,
    h: &Histogram<u64>,
    slices: u64,
    elapsed: Duration,
) -> SchedulingResult {
    let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    SchedulingResult {
        scenario: "scheduling",
        runtime,
        class,
        workers: settings.workers,
        flood_tasks: settings.flood_tasks,
        flood_slice_us: settings.slice.as_micros() as u64,
        probes: h.len(),
        p50_us: us(0.5),
        p90_us: us(0.9),
        p99_us: us(0.99),
        p999_us: us(0.999),
        max_us: h.max() as f64 / 1000.0,
        flood_slices_per_s: slices as f64 / elapsed.as_secs_f64(),
        label: String::new(),
    }
}

/// The flood body shared by both runtimes; `yield_now` is each runtime's
/// own way of yielding.
async fn flood<Y, F>(slice: Duration, stop: Arc<AtomicBool>, slices: Arc<AtomicU64>, yield_now: Y)
where
    Y: Fn() -> F,
    F: Future<Output = ()>,
{
    while !stop.load(Ordering::Relaxed) {
        burn(slice);
        slices.fetch_add(1, Ordering::Relaxed);
        yield_now().await;
    }
}

/// The OptimizedRuntime: flood at Background, probes alternating Critical and High.
pub async fn kaelix(settings: Settings) -> Result<Vec<SchedulingResult>> {
    let runtime = OptimizedRuntime::new(RuntimeConfig {
        worker_threads: Some(settings.workers),
        task_queue_depth: 1 << 16,
        ..Default::default()
    })
    .map_err(|e| BenchError::Usage(e.to_string()))?;
    runtime
        .start()
        .await
        .map_err(|e| BenchError::Usage(e.to_string()))?;
    let handle = runtime.handle();
    let stop = Arc::new(AtomicBool::new(false));
    let slices = Arc::new(AtomicU64::new(0));
    for _ in 0..settings.flood_tasks {
        let (stop, slices) = (stop.clone(), slices.clone());
        handle
            .spawn(
                TaskPriority::Background,
                flood(
                    settings.slice,
                    stop,
                    slices,
                    kaelix_core::runtime::yield_now,
                ),
            )
            .map_err(|e| BenchError::Usage(e.to_string()))?;
    }
    let (critical, high) = (histogram(), histogram());
    let start = Instant::now();
    let probe_handle = handle.clone();
    let (c, h) = (critical.clone(), high.clone());
    let probing = std::thread::spawn(move || {
        probe_loop(settings, |i, sent| {
            let (priority, rec) = if i % 2 == 0 {
                (TaskPriority::Critical, c.clone())
            } else {
                (TaskPriority::High, h.clone())
            };
            let _ = probe_handle.spawn(priority, async move {
                rec.lock()
                    .saturating_record(sent.elapsed().as_nanos() as u64);
            });
        })
    });
    tokio::task::spawn_blocking(move || probing.join())
        .await
        .map_err(|e| BenchError::Usage(e.to_string()))?
        .map_err(|_| BenchError::Usage("the probe thread panicked".into()))?;
    let elapsed = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    let done = slices.load(Ordering::Relaxed);
    runtime
        .shutdown()
        .await
        .map_err(|e| BenchError::Usage(e.to_string()))?;
    let critical = critical.lock().clone();
    let high = high.lock().clone();
    Ok(vec![
        summarise(
            "kaelix-runtime",
            "critical",
            settings,
            &critical,
            done,
            elapsed,
        ),
        summarise("kaelix-runtime", "high", settings, &high, done, elapsed),
    ])
}

/// A plain tokio multi-thread runtime with the same load.
pub fn tokio(settings: Settings) -> Result<SchedulingResult> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(settings.workers)
        .enable_all()
        .build()?;
    let stop = Arc::new(AtomicBool::new(false));
    let slices = Arc::new(AtomicU64::new(0));
    for _ in 0..settings.flood_tasks {
        let (stop, slices) = (stop.clone(), slices.clone());
        rt.spawn(flood(settings.slice, stop, slices, tokio::task::yield_now));
    }
    let rec = histogram();
    let start = Instant::now();
    let handle = rt.handle().clone();
    let r = rec.clone();
    probe_loop(settings, |_, sent| {
        let r = r.clone();
        handle.spawn(async move {
            r.lock().saturating_record(sent.elapsed().as_nanos() as u64);
        });
    });
    let elapsed = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    let done = slices.load(Ordering::Relaxed);
    rt.shutdown_timeout(Duration::from_secs(5));
    let h = rec.lock().clone();
    Ok(summarise("tokio", "any", settings, &h, done, elapsed))
}

/// A markdown table of the results.
pub fn table(results: &[SchedulingResult]) -> String {
    let mut out = String::from(
        "| runtime | class | probes | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs | flood slices/s |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in results {
        out.push_str(&format!(
            "| {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} |\n",
            r.runtime,
            r.class,
            r.probes,
            r.p50_us,
            r.p90_us,
            r.p99_us,
            r.p999_us,
            r.max_us,
            r.flood_slices_per_s
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_read_the_histogram_in_microseconds() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).unwrap();
        for ns in [1_000u64, 2_000, 3_000, 100_000] {
            h.record(ns).unwrap();
        }
        let settings = Settings {
            workers: 2,
            flood_tasks: 4,
            slice: Duration::from_micros(50),
            probes_per_s: 1000.0,
            duration: Duration::from_secs(1),
        };
        let r = summarise("tokio", "any", settings, &h, 500, Duration::from_secs(2));
        assert_eq!(r.probes, 4);
        assert!((r.p50_us - 2.0).abs() < 0.01, "{}", r.p50_us);
        assert!((r.max_us - 100.0).abs() < 0.1, "{}", r.max_us);
        assert_eq!(r.flood_slices_per_s, 250.0);
        assert!(table(&[r]).contains("| tokio | any | 4 |"));
    }
}
