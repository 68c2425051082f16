//! The broker runs on the OptimizedRuntime: its workers are pinned where
//! the log says, `[runtime]` keys configure it, and an embedded broker can
//! be given one.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use kaelix_broker::{MessageBroker, Server};
use kaelix_consumer::Consumer;
use kaelix_core::runtime::{OptimizedRuntime, RuntimeConfig, TaskPriority};
use kaelix_publisher::Publisher;

/// The CPUs a thread of `pid` may run on, from /proc.
fn cpus_allowed(pid: u32, tid: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn workers_are_pinned_as_logged() {
    let child = Command::new(env!("CARGO_BIN_EXE_kaelix-broker"))
        .current_dir(std::env::temp_dir())
        .env("KAELIX_NETWORK_HOST", "127.0.0.1")
        .env("KAELIX_NETWORK_PORT", "0")
        .env("KAELIX_RUNTIME_WORKER_THREADS", "2")
        .env("KAELIX_TELEMETRY_METRICS_PROMETHEUS_ENABLED", "false")
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Killed however the test ends, so a failed assertion leaves no broker
    // running.
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut guard = KillOnDrop(child);
    let child = &mut guard.0;
    let pid = child.id();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let started = stderr
        .lines()
        .map_while(Result::ok)
        .find(|l| l.contains("runtime started"))
        .expect("the broker logs its placement");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert!(line.contains("listening on"), "{line}");

    let allowed = kaelix_core::runtime::topology::allowed_cpus();
    for worker in 0..2 {
        // "worker 0 on cpu 3 (node 0, core 3)"
        let said = started
            .split(&format!("worker {worker} on cpu "))
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .unwrap_or_else(|| panic!("worker {worker} missing from {started:?}"))
            .to_string();
        let tid = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().into_string().unwrap())
            .find(|tid| {
                std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
                    .is_ok_and(|c| c.trim() == format!("kaelix-worker-{worker}"))
            })
            .unwrap_or_else(|| panic!("no thread kaelix-worker-{worker}"));
        assert_eq!(cpus_allowed(pid, &tid), said, "{started}");
        assert!(allowed.contains(said.parse().unwrap()));
    }
}

#[test]
fn invalid_runtime_settings_stop_the_broker_with_the_key() {
    let out = Command::new(env!("CARGO_BIN_EXE_kaelix-broker"))
        .current_dir(std::env::temp_dir())
        .env("KAELIX_NETWORK_PORT", "0")
        .env("KAELIX_RUNTIME_PRIORITY_LEVELS", "9")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("runtime.priority_levels"), "{stderr}");
}

#[tokio::test]
async fn an_embedded_broker_serves_on_the_runtime_it_is_given() {
    let runtime = OptimizedRuntime::new(RuntimeConfig {
        worker_threads: Some(2),
        ..Default::default()
    })
    .unwrap();
    runtime.start().await.unwrap();
    let broker = MessageBroker::new();
    assert!(broker.use_runtime(runtime.handle()));
    assert!(
        !broker.use_runtime(runtime.handle()),
        "only the first counts"
    );
    broker.start().await.unwrap();
    let addr = Server::spawn(&broker, "127.0.0.1:0").await.unwrap();

    let consumer = Consumer::connect(&addr.to_string()).await.unwrap();
    let mut sub = consumer.subscribe("rt.events").await.unwrap();
    let publisher = Publisher::connect(&addr.to_string()).await.unwrap();
    for i in 0..100u32 {
        publisher
            .publish("rt.events", Bytes::from(i.to_be_bytes().to_vec()))
            .await
            .unwrap();
    }
    publisher.flush().await.unwrap();
    for i in 0..100u32 {
        let message = tokio::time::timeout(Duration::from_secs(5), sub.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&message.payload[..], &i.to_be_bytes());
    }

    let stats = broker.stats();
    let rt = stats.runtime.clone().expect("runtime stats");
    assert_eq!(rt.workers, 2);
    assert!(stats.to_string().contains("2 workers (w0:cpu"), "{stats}");
    // Connection tasks ran on the runtime, at High priority.
    let metrics = runtime.metrics();
    assert!(metrics.scheduling_delay(TaskPriority::High).count > 0);
    assert!(metrics.scheduling_delay(TaskPriority::Critical).count > 0);

    drop(sub);
    consumer.close().await.unwrap();
    publisher.close().await.unwrap();
    broker.shutdown().await.unwrap();
    runtime.shutdown().await.unwrap();
}
