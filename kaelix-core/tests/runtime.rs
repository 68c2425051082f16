//! The priority runtime: the guide's snippets, priority order, the queue
//! bound, I/O and timers on workers, panics, affinity and shutdown.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use kaelix_core::runtime::{
    topology, CpuSet, HealthMonitor, HealthStatus, OptimizedRuntime, RuntimeConfig, TaskPriority,
};
use kaelix_core::Error;
use parking_lot::Mutex;

fn one_worker(depth: usize) -> RuntimeConfig {
    RuntimeConfig {
        worker_threads: Some(1),
        task_queue_depth: depth,
        ..Default::default()
    }
}

/// Occupies the runtime's only worker until the returned sender is used.
async fn block_worker(runtime: &OptimizedRuntime) -> mpsc::Sender<()> {
    let (release, gate) = mpsc::channel::<()>();
    let (entered_tx, entered) = tokio::sync::oneshot::channel();
    runtime
        .spawn_with_priority(TaskPriority::Critical, async move {
            let _ = entered_tx.send(());
            // Deliberately blocks the worker thread: everything spawned
            // meanwhile waits in the queues.
            let _ = gate.recv();
        })
        .await
        .unwrap();
    entered.await.unwrap();
    release
}

#[tokio::test]
async fn configuring_the_runtime_from_the_guide() -> Result<(), Box<dyn std::error::Error>> {
    // Default configuration
    let runtime = OptimizedRuntime::new(RuntimeConfig::default())?;
    drop(runtime);

    // Custom configuration
    let config = RuntimeConfig {
        worker_threads: Some(8),
        task_queue_depth: 8192,
        target_latency_us: 5, // 5μs target
        numa_aware: true,
        priority_levels: 4,
        ..Default::default()
    };

    let runtime = OptimizedRuntime::new(config)?;

    // Start runtime
    runtime.start().await?;

    // Submit high-priority task
    let (tx, rx) = tokio::sync::oneshot::channel();
    runtime
        .spawn_with_priority(TaskPriority::High, async {
            // Your high-priority work here
            println!("High priority task executed");
            let _ = tx.send(());
        })
        .await?;
    tokio::time::timeout(Duration::from_secs(5), rx).await??;
    assert_eq!(runtime.metrics().workers.len(), 8);
    runtime.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn health_monitoring_from_the_guide() -> Result<(), Box<dyn std::error::Error>> {
    let health_monitor = HealthMonitor::new();

    // Check health status
    match health_monitor.status() {
        HealthStatus::Healthy => println!("System is healthy"),
        HealthStatus::Degraded => println!("System is degraded"),
        HealthStatus::Unhealthy => println!("System is unhealthy"),
        HealthStatus::Unknown => println!("Health status unknown"),
    }

    // Get detailed metrics
    let metrics = health_monitor.metrics();
    println!("Error rate: {:.2}%", metrics.error_rate() * 100.0);
    assert_eq!(health_monitor.status(), HealthStatus::Unknown);

    // The runtime's own monitor judges its scheduling delay.
    let runtime = OptimizedRuntime::new(RuntimeConfig {
        worker_threads: Some(1),
        target_latency_us: 1_000_000,
        ..Default::default()
    })?;
    let health = runtime.health();
    assert_eq!(health.status(), HealthStatus::Unknown);
    runtime.start().await?;
    assert_eq!(
        health.status(),
        HealthStatus::Healthy,
        "{}",
        health.report().reason
    );
    for _ in 0..50 {
        runtime
            .spawn_with_priority(TaskPriority::High, async {})
            .await?
            .await?;
    }
    let report = health.report();
    assert_eq!(report.status, HealthStatus::Healthy, "{}", report.reason);
    assert!(report.metrics.latency_samples >= 50);
    runtime.shutdown().await?;
    assert_eq!(health.status(), HealthStatus::Unhealthy);
    Ok(())
}

#[tokio::test]
async fn cpu_optimization_from_the_guide() -> Result<(), Box<dyn std::error::Error>> {
    // Enable NUMA awareness
    let config = RuntimeConfig {
        numa_aware: true,
        worker_threads: Some(num_cpus::get()),
        ..Default::default()
    };
    let runtime = OptimizedRuntime::new(config)?;
    runtime.start().await?;

    // Set CPU affinity for workers (to the CPUs this machine has)
    let allowed = topology::allowed_cpus();
    let cpus: Vec<usize> = allowed.cpus().iter().copied().take(2).collect();
    runtime.set_worker_affinity(0, CpuSet::new(&cpus))?;
    assert_eq!(runtime.metrics().workers[0].cpus, CpuSet::new(&cpus));

    // The worker's own thread sees the new mask.
    let seen = runtime
        .spawn_with_priority(TaskPriority::Critical, async {
            topology::thread_affinity(0).unwrap()
        })
        .await?;
    let _ = seen.await?;
    let err = runtime
        .set_worker_affinity(99, CpuSet::new(&[0]))
        .unwrap_err();
    assert!(err.to_string().contains("no worker 99"), "{err}");
    runtime.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn workers_are_pinned_where_the_placement_says() {
    let runtime = OptimizedRuntime::new(RuntimeConfig::default()).unwrap();
    runtime.start().await.unwrap();
    let placement = runtime.placement().to_vec();
    assert_eq!(placement.len(), runtime.topology().core_count());
    for place in placement {
        let handle = runtime.handle();
        // spawn_on binds the first poll to the worker; a later wake from
        // another worker could move it, so only the first poll is checked.
        let seen = handle
            .spawn_on(place.worker, TaskPriority::High, async {
                topology::thread_affinity(0).unwrap()
            })
            .unwrap()
            .await
            .unwrap();
        assert_eq!(seen, CpuSet::single(place.cpu));
    }
    runtime.shutdown().await.unwrap();
}

#[tokio::test]
async fn higher_priorities_run_first() {
    let runtime = OptimizedRuntime::new(one_worker(64)).unwrap();
    runtime.start().await.unwrap();
    let release = block_worker(&runtime).await;
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut handles = Vec::new();
    for priority in TaskPriority::ALL.iter().rev() {
        for _ in 0..3 {
            let order = order.clone();
            let priority = *priority;
            handles.push(
                runtime
                    .spawn_with_priority(priority, async move { order.lock().push(priority) })
                    .await
                    .unwrap(),
            );
        }
    }
    release.send(()).unwrap();
    for handle in handles {
        handle.await.unwrap();
    }
    let expected: Vec<TaskPriority> = TaskPriority::ALL.iter().flat_map(|&p| [p; 3]).collect();
    assert_eq!(*order.lock(), expected);
    runtime.shutdown().await.unwrap();
}

#[tokio::test]
async fn background_work_is_not_starved() {
    let runtime = OptimizedRuntime::new(one_worker(64)).unwrap();
    runtime.start().await.unwrap();
    let release = block_worker(&runtime).await;
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut handles = Vec::new();
    let spawn = |priority: TaskPriority, order: Arc<Mutex<Vec<TaskPriority>>>| {
        runtime
            .handle()
            .spawn(priority, async move { order.lock().push(priority) })
    };
    handles.push(spawn(TaskPriority::Background, order.clone()).unwrap());
    for _ in 0..40 {
        handles.push(spawn(TaskPriority::Critical, order.clone()).unwrap());
    }
    release.send(()).unwrap();
    for handle in handles {
        handle.await.unwrap();
    }
    let at = order
        .lock()
        .iter()
        .position(|&p| p == TaskPriority::Background)
        .unwrap();
    assert_eq!(at, 16, "Background runs after 16 Critical polls");
    runtime.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_full_queue_refuses_spawns_with_the_guide_error() {
    let runtime = OptimizedRuntime::new(one_worker(4)).unwrap();
    runtime.start().await.unwrap();
    let release = block_worker(&runtime).await;
    let mut handles = Vec::new();
    for _ in 0..4 {
        handles.push(
            runtime
                .spawn_with_priority(TaskPriority::Normal, async {})
                .await
                .unwrap(),
        );
    }
    let err = runtime
        .spawn_with_priority(TaskPriority::Normal, async {})
        .await
        .unwrap_err();
    assert!(matches!(err, Error::WorkerPoolExhausted { depth: 4, .. }));
    assert!(
        err.to_string().starts_with("Worker pool exhausted"),
        "{err}"
    );
    // Each priority has its own queue.
    handles.push(
        runtime
            .spawn_with_priority(TaskPriority::High, async {})
            .await
            .unwrap(),
    );
    assert_eq!(runtime.metrics().queue_depth(), [0, 1, 4, 0]);
    assert_eq!(runtime.metrics().spawns_refused, 1);
    assert!(runtime.metrics().error_rate() > 0.0);
    release.send(()).unwrap();
    for handle in handles {
        handle.await.unwrap();
    }
    runtime
        .spawn_with_priority(TaskPriority::Normal, async {})
        .await
        .unwrap()
        .await
        .unwrap();
    runtime.shutdown().await.unwrap();
}

#[tokio::test]
async fn tasks_use_tokio_sockets_and_timers() {
    let runtime = OptimizedRuntime::new(RuntimeConfig {
        worker_threads: Some(2),
        ..Default::default()
    })
    .unwrap();
    runtime.start().await.unwrap();
    let handle = runtime.handle();
    let server = runtime
        .spawn_with_priority(TaskPriority::High, async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let echo = handle
                .spawn(TaskPriority::High, async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let (mut socket, _) = listener.accept().await.unwrap();
                    let mut buf = [0u8; 5];
                    socket.read_exact(&mut buf).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    socket.write_all(&buf).await.unwrap();
                })
                .unwrap();
            (addr, echo)
        })
        .await
        .unwrap();
    let (addr, echo) = server.await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
    client.write_all(b"hello").await.unwrap();
    let mut buf = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"hello");
    echo.await.unwrap();
    let metrics = runtime.metrics();
    assert!(metrics.scheduling_delay(TaskPriority::High).count >= 3);
    assert_eq!(metrics.tasks_completed, 2);
    runtime.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_panicking_task_is_reported_and_the_worker_survives() {
    let runtime = OptimizedRuntime::new(one_worker(16)).unwrap();
    runtime.start().await.unwrap();
    let err = runtime
        .spawn_with_priority(TaskPriority::Normal, async { panic!("boom") })
        .await
        .unwrap()
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::TaskPanicked(m) if m == "boom"),
        "{err}"
    );
    let value = runtime
        .spawn_with_priority(TaskPriority::Normal, async { 7 })
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(value, 7);
    assert_eq!(runtime.metrics().tasks_panicked, 1);
    runtime.shutdown().await.unwrap();
}

/// Sets its flag when dropped.
struct DropFlag(Arc<AtomicBool>);
impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn shutdown_cancels_waiting_and_queued_tasks_without_hanging() {
    let runtime = OptimizedRuntime::new(RuntimeConfig {
        worker_threads: Some(2),
        ..Default::default()
    })
    .unwrap();
    runtime.start().await.unwrap();
    let sleeping_dropped = Arc::new(AtomicBool::new(false));
    let reading_dropped = Arc::new(AtomicBool::new(false));
    let flag = DropFlag(sleeping_dropped.clone());
    let sleeping = runtime
        .spawn_with_priority(TaskPriority::Background, async move {
            let _flag = flag;
            tokio::time::sleep(Duration::from_secs(3600)).await;
        })
        .await
        .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let flag = DropFlag(reading_dropped.clone());
    let reading = runtime
        .spawn_with_priority(TaskPriority::High, async move {
            let _flag = flag;
            use tokio::io::AsyncReadExt;
            let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
            let mut buf = [0u8; 1];
            let _ = socket.read(&mut buf).await;
        })
        .await
        .unwrap();
    let _peer = listener.accept().unwrap();
    let done = runtime
        .spawn_with_priority(TaskPriority::Normal, async { 1 })
        .await
        .unwrap();
    assert_eq!(done.await.unwrap(), 1);

    tokio::time::timeout(Duration::from_secs(10), runtime.shutdown())
        .await
        .expect("shutdown does not hang")
        .unwrap();
    assert!(sleeping_dropped.load(Ordering::SeqCst));
    assert!(reading_dropped.load(Ordering::SeqCst));
    assert!(matches!(sleeping.await, Err(Error::TaskCancelled)));
    assert!(matches!(reading.await, Err(Error::TaskCancelled)));
    let err = runtime
        .spawn_with_priority(TaskPriority::High, async {})
        .await
        .unwrap_err();
    assert!(err.to_string().contains("shutting down"), "{err}");
}

#[tokio::test]
async fn tasks_queued_behind_a_busy_worker_are_cancelled_by_shutdown() {
    let runtime = OptimizedRuntime::new(one_worker(64)).unwrap();
    runtime.start().await.unwrap();
    let release = block_worker(&runtime).await;
    let queued = runtime
        .spawn_with_priority(TaskPriority::Normal, async { 5 })
        .await
        .unwrap();
    let shutdown = runtime.shutdown();
    tokio::pin!(shutdown);
    // Shutdown waits for the poll in progress...
    assert!(
        tokio::time::timeout(Duration::from_millis(50), &mut shutdown)
            .await
            .is_err()
    );
    release.send(()).unwrap();
    // ...and then ends; the queued task never ran.
    tokio::time::timeout(Duration::from_secs(10), shutdown)
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(queued.await, Err(Error::TaskCancelled)));
    assert_eq!(runtime.metrics().tasks_cancelled, 1);
}

#[test]
fn invalid_configuration_names_every_key() {
    let err = OptimizedRuntime::new(RuntimeConfig {
        worker_threads: Some(0),
        priority_levels: 9,
        task_queue_depth: 0,
        ..Default::default()
    })
    .unwrap_err()
    .to_string();
    for key in [
        "runtime.worker_threads",
        "runtime.priority_levels",
        "runtime.task_queue_depth",
    ] {
        assert!(err.contains(key), "{err}");
    }
}
