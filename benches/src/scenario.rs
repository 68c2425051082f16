//! Message-flow scenarios: publishers and subscribers on one topic, paced
//! by an in-flight window (or a fixed rate), with every message stamped so
//! that subscribers measure latency and count what is lost.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::driver::{Endpoint, Pub, Sub};
use crate::error::{BenchError, Result};
use crate::payload::{self, now_ns, STAMP_LEN};
use crate::procfs;
use crate::results::{self, RunResult};

/// The shape of one run.
#[derive(Debug, Clone)]
pub struct Flow {
    pub scenario: &'static str,
    pub payload: usize,
    pub duration: Duration,
    pub publishers: usize,
    pub subscribers: usize,
    /// Subscribers form this queue group.
    pub group: Option<String>,
    /// Kaelix subscribers pace the broker with this credit window (messages).
    pub credit: Option<u32>,
    /// Total messages per second across publishers; unpaced when `None`.
    pub rate: Option<f64>,
    /// Each publish waits for its acknowledgement.
    pub acked: bool,
    /// Payload bytes publishers may have in flight ahead of the slowest subscriber.
    pub window_bytes: u64,
    pub progress: bool,
}

/// Counters shared by the publishers, subscribers and progress display.
struct Shared {
    stop: AtomicBool,
    done: AtomicBool,
    sent: AtomicU64,
    received: Vec<AtomicU64>,
}

impl Shared {
    /// Messages sent that the slowest subscriber (or, for a queue group,
    /// the group) has not yet received.
    fn in_flight(&self, queue: bool) -> u64 {
        let got: Vec<u64> = self
            .received
            .iter()
            .map(|r| r.load(Ordering::Relaxed))
            .collect();
        let received = if queue {
            got.iter().sum()
        } else {
            got.iter().copied().min().unwrap_or(0)
        };
        self.sent.load(Ordering::Relaxed).saturating_sub(received)
    }
}

/// What one subscriber saw.
struct SubReport {
    latency: Histogram<u64>,
    received: u64,
    last_ns: u64,
    /// Sequence numbers seen, per publisher (queue groups only).
    seen: Vec<Vec<u64>>,
}

/// Where publishers and subscribers connect: one broker, or two nodes of
/// a cluster.
#[derive(Clone)]
pub struct Endpoints {
    pub publish: Endpoint,
    pub subscribe: Endpoint,
}

impl Endpoints {
    /// Gives a subscription made on another node the time to reach the
    /// publishers' node (one hop of interest).
    async fn settle(&self) {
        if self.publish != self.subscribe {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// Runs a flow scenario against `endpoints`.
pub async fn run(flow: &Flow, endpoints: &Endpoints, pid: Option<u32>) -> Result<RunResult> {
    let endpoint = &endpoints.publish;
    if flow.payload < STAMP_LEN {
        return Err(BenchError::Usage(format!(
            "--payload must be at least {STAMP_LEN} bytes: each message carries a sequence number and its send time"
        )));
    }
    let topic = format!("bench.{}.{}", std::process::id(), now_ns());
    let queue = flow.group.is_some();
    let shared = Arc::new(Shared {
        stop: AtomicBool::new(false),
        done: AtomicBool::new(false),
        sent: AtomicU64::new(0),
        received: (0..flow.subscribers).map(|_| AtomicU64::new(0)).collect(),
    });
    let mut subs = Vec::new();
    for _ in 0..flow.subscribers {
        subs.push(
            Sub::connect(
                &endpoints.subscribe,
                &topic,
                flow.group.as_deref(),
                flow.credit,
            )
            .await?,
        );
    }
    endpoints.settle().await;
    let mut pubs = Vec::new();
    for _ in 0..flow.publishers {
        pubs.push(Pub::connect(endpoint, &topic).await?);
    }

    let cpu_before = pid.and_then(procfs::cpu_seconds);
    let start_ns = now_ns();
    let subscriber_tasks: Vec<_> = subs
        .into_iter()
        .enumerate()
        .map(|(i, sub)| tokio::spawn(subscribe(sub, i, shared.clone(), queue, flow.publishers)))
        .collect();
    let publisher_tasks: Vec<_> = pubs
        .into_iter()
        .enumerate()
        .map(|(i, p)| tokio::spawn(publish(p, i as u16, flow.clone(), shared.clone())))
        .collect();

    let progress = flow
        .progress
        .then(|| spawn_progress(flow.duration, shared.clone()));
    tokio::time::sleep(flow.duration).await;
    shared.stop.store(true, Ordering::Relaxed);
    let mut sent = 0;
    for task in publisher_tasks {
        sent += task.await.map_err(|e| BenchError::Usage(e.to_string()))??;
    }
    shared.done.store(true, Ordering::Relaxed);
    let mut reports = Vec::new();
    for task in subscriber_tasks {
        reports.push(task.await.map_err(|e| BenchError::Usage(e.to_string()))??);
    }
    if let Some(p) = progress {
        p.abort();
    }
    let cpu_after = pid.and_then(procfs::cpu_seconds);

    let received: u64 = reports.iter().map(|r| r.received).sum();
    let end_ns = reports
        .iter()
        .map(|r| r.last_ns)
        .max()
        .unwrap_or(start_ns)
        .max(start_ns + 1);
    let elapsed_s = (end_ns - start_ns) as f64 / 1e9;
    let (lost, duplicates) = if queue {
        queue_accounting(&reports, sent)
    } else {
        let expected = sent * flow.subscribers as u64;
        (
            expected.saturating_sub(received),
            received.saturating_sub(expected),
        )
    };
    let msgs_per_s = received as f64 / elapsed_s;
    let mut result = RunResult {
        scenario: flow.scenario.into(),
        payload_bytes: flow.payload,
        publishers: flow.publishers,
        subscribers: flow.subscribers,
        msgs_per_s,
        mb_per_s: msgs_per_s * flow.payload as f64 / 1e6,
        lost,
        duplicates,
        sent,
        received,
        elapsed_s,
        broker_cpu_s_per_m: cpu_per_million(cpu_before, cpu_after, received),
        broker_rss_bytes: pid.and_then(procfs::rss_bytes),
        ..Default::default()
    };
    result.set_latency(&results::merge(reports.into_iter().map(|r| r.latency)));
    Ok(result)
}

/// Broker CPU seconds per million messages received, from two readings.
fn cpu_per_million(before: Option<f64>, after: Option<f64>, received: u64) -> Option<f64> {
    match (before, after) {
        (Some(a), Some(b)) if received > 0 => Some((b - a) / (received as f64 / 1e6)),
        _ => None,
    }
}

/// Lost and duplicated messages of a queue group: every sequence number of
/// every publisher must have been seen by exactly one member.
fn queue_accounting(reports: &[SubReport], sent: u64) -> (u64, u64) {
    let publishers = reports.iter().map(|r| r.seen.len()).max().unwrap_or(0);
    let mut unique = 0u64;
    let mut duplicates = 0u64;
    for p in 0..publishers {
        let words = reports
            .iter()
            .filter_map(|r| r.seen.get(p))
            .map(Vec::len)
            .max()
            .unwrap_or(0);
        let mut union = vec![0u64; words];
        for bits in reports.iter().filter_map(|r| r.seen.get(p)) {
            for (w, &b) in bits.iter().enumerate() {
                duplicates += u64::from((union[w] & b).count_ones());
                union[w] |= b;
            }
        }
        unique += union.iter().map(|w| u64::from(w.count_ones())).sum::<u64>();
    }
    (sent.saturating_sub(unique), duplicates)
}

async fn subscribe(
    mut sub: Sub,
    index: usize,
    shared: Arc<Shared>,
    queue: bool,
    publishers: usize,
) -> Result<SubReport> {
    let mut report = SubReport {
        latency: results::histogram(),
        received: 0,
        last_ns: 0,
        seen: vec![Vec::new(); if queue { publishers } else { 0 }],
    };
    let mut idle_since_done = 0u32;
    loop {
        let mut batch = 0u64;
        // One clock reading per received batch, as an application would.
        let mut now = 0;
        let n = sub
            .recv_batch(Duration::from_millis(100), &mut |p| {
                if now == 0 {
                    now = now_ns();
                }
                if let Some((publisher, seq, sent)) = payload::read(p) {
                    let _ = report.latency.record(now.saturating_sub(sent).max(1));
                    if let Some(bits) = report.seen.get_mut(publisher as usize) {
                        let (w, b) = ((seq / 64) as usize, seq % 64);
                        if bits.len() <= w {
                            bits.resize(w + 1024, 0);
                        }
                        bits[w] |= 1 << b;
                    }
                }
                report.last_ns = now;
                batch += 1;
            })
            .await?;
        report.received += batch;
        shared.received[index].store(report.received, Ordering::Relaxed);
        if shared.done.load(Ordering::Relaxed) {
            let sent = shared.sent.load(Ordering::Relaxed);
            let finished = if queue {
                shared
                    .received
                    .iter()
                    .map(|r| r.load(Ordering::Relaxed))
                    .sum::<u64>()
                    >= sent
            } else {
                report.received >= sent
            };
            if finished {
                return Ok(report);
            }
            if n == 0 {
                idle_since_done += 1;
                // Two seconds with nothing after the publishers finished: the rest is lost.
                if idle_since_done >= 20 {
                    return Ok(report);
                }
            }
        }
    }
}

async fn publish(mut conn: Pub, index: u16, flow: Flow, shared: Arc<Shared>) -> Result<u64> {
    let mut buf = vec![0x5au8; flow.payload];
    let mut burst_buf = vec![0x5au8; flow.payload * 256];
    let queue = flow.group.is_some();
    let window = (flow.window_bytes / flow.payload as u64).max(1024);
    let per_publisher_rate = flow.rate.map(|r| r / flow.publishers as f64);
    let started = now_ns();
    let mut seq = 0u64;
    while !shared.stop.load(Ordering::Relaxed) {
        if flow.acked {
            payload::stamp(&mut buf, index, seq, now_ns());
            conn.send_acked(&buf).await?;
            seq += 1;
            shared.sent.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let mut burst = 256u64;
        if let Some(rate) = per_publisher_rate {
            let due = ((now_ns() - started) as f64 / 1e9 * rate) as u64;
            if due <= seq {
                tokio::time::sleep(Duration::from_micros(200)).await;
                continue;
            }
            burst = burst.min(due - seq);
        } else if shared.in_flight(queue) > window {
            tokio::time::sleep(Duration::from_micros(100)).await;
            continue;
        }
        // One clock reading per burst when unpaced (a burst takes a few
        // microseconds); every message gets its own when paced.
        let burst_ns = now_ns();
        let flat = &mut burst_buf[..burst as usize * flow.payload];
        for chunk in flat.chunks_mut(flow.payload) {
            let at = if per_publisher_rate.is_some() {
                now_ns()
            } else {
                burst_ns
            };
            payload::stamp(chunk, index, seq, at);
            seq += 1;
        }
        conn.send_burst(flat, flow.payload).await?;
        shared.sent.fetch_add(burst, Ordering::Relaxed);
        conn.push().await?;
    }
    conn.flush().await?;
    Ok(seq)
}

fn spawn_progress(duration: Duration, shared: Arc<Shared>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let bar = indicatif::ProgressBar::new(duration.as_millis() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        let start = std::time::Instant::now();
        let mut last = 0u64;
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let got: u64 = shared
                .received
                .iter()
                .map(|r| r.load(Ordering::Relaxed))
                .sum();
            bar.set_position(start.elapsed().as_millis() as u64);
            bar.set_message(format!(
                "{:.2} M msg/s received",
                (got - last) as f64 * 5.0 / 1e6
            ));
            last = got;
        }
    })
}

/// Latency with one message in flight: send, wait for it, repeat.
///
/// The loop runs in a task of the runtime, as a service's code would, for
/// every target alike: run on the thread that blocks on the runtime, each
/// message would pay a wake-up of that thread by the runtime's workers,
/// which drive the sockets and the clients' reader and writer tasks.
pub async fn one_in_flight(
    payload_len: usize,
    duration: Duration,
    endpoints: &Endpoints,
    pid: Option<u32>,
) -> Result<RunResult> {
    let endpoints = endpoints.clone();
    tokio::spawn(async move { one_in_flight_loop(payload_len, duration, &endpoints, pid).await })
        .await
        .map_err(|e| BenchError::Task("latency", e.to_string()))?
}

async fn one_in_flight_loop(
    payload_len: usize,
    duration: Duration,
    endpoints: &Endpoints,
    pid: Option<u32>,
) -> Result<RunResult> {
    if payload_len < STAMP_LEN {
        return Err(BenchError::Usage(format!(
            "--payload must be at least {STAMP_LEN} bytes"
        )));
    }
    let topic = format!("bench.{}.{}", std::process::id(), now_ns());
    let mut sub = Sub::connect(&endpoints.subscribe, &topic, None, None).await?;
    endpoints.settle().await;
    let mut conn = Pub::connect(&endpoints.publish, &topic).await?;
    let mut buf = vec![0x5au8; payload_len];
    let mut latency = results::histogram();
    let cpu_before = pid.and_then(procfs::cpu_seconds);
    let start = now_ns();
    let deadline = start + duration.as_nanos() as u64;
    let (mut sent, mut received, mut lost) = (0u64, 0u64, 0u64);
    while now_ns() < deadline {
        payload::stamp(&mut buf, 0, sent, now_ns());
        conn.send(&buf).await?;
        conn.push().await?;
        sent += 1;
        let mut got = false;
        while !got {
            let n = sub
                .recv_batch(Duration::from_secs(2), &mut |p| {
                    if let Some((_, seq, at)) = payload::read(p) {
                        let _ = latency.record(now_ns().saturating_sub(at).max(1));
                        got |= seq == sent - 1;
                        received += 1;
                    }
                })
                .await?;
            if n == 0 {
                lost += 1;
                break;
            }
        }
    }
    let elapsed_s = (now_ns() - start) as f64 / 1e9;
    let cpu_after = pid.and_then(procfs::cpu_seconds);
    let mut result = RunResult {
        scenario: "latency".into(),
        payload_bytes: payload_len,
        publishers: 1,
        subscribers: 1,
        msgs_per_s: received as f64 / elapsed_s,
        mb_per_s: received as f64 * payload_len as f64 / elapsed_s / 1e6,
        lost,
        sent,
        received,
        elapsed_s,
        broker_cpu_s_per_m: cpu_per_million(cpu_before, cpu_after, received),
        broker_rss_bytes: pid.and_then(procfs::rss_bytes),
        ..Default::default()
    };
    result.set_latency(&latency);
    Ok(result)
}

/// In-process `MessageBroker` publish → receive latency, one message in
/// flight: with the receiver polled by the publishing task (the path's own
/// cost), and with the receiver in its own task (a wake-up included).
pub async fn in_process(payload_len: usize, duration: Duration) -> Result<Vec<RunResult>> {
    use kaelix_broker::MessageBroker;
    use kaelix_core::{Message, Topic};

    if payload_len < STAMP_LEN {
        return Err(BenchError::Usage(format!(
            "--payload must be at least {STAMP_LEN} bytes"
        )));
    }
    let broker = MessageBroker::new();
    broker.start().await?;
    let topic = Topic::new("bench.inprocess")?;
    let mut results = Vec::new();
    for separate_task in [false, true] {
        let mut receiver = broker.subscribe(&topic).await?;
        let mut buf = vec![0x5au8; payload_len];
        let start = now_ns();
        let deadline = start + duration.as_nanos() as u64 / 2;
        let mut sent = 0u64;
        let latency = if separate_task {
            let (ack_tx, mut ack_rx) = tokio::sync::mpsc::channel::<()>(1);
            let recorder = tokio::spawn(async move {
                let mut h = results::histogram();
                while let Ok(m) = receiver.recv().await {
                    let now = now_ns();
                    if let Some((_, _, at)) = payload::read(&m.payload) {
                        let _ = h.record(now.saturating_sub(at).max(1));
                    }
                    if ack_tx.send(()).await.is_err() {
                        break;
                    }
                }
                h
            });
            while now_ns() < deadline {
                payload::stamp(&mut buf, 0, sent, now_ns());
                broker
                    .publish(&topic, Message::new(topic.clone(), buf.clone())?)
                    .await?;
                sent += 1;
                if ack_rx.recv().await.is_none() {
                    break;
                }
            }
            drop(ack_rx);
            broker.shutdown().await?;
            recorder
                .await
                .map_err(|e| BenchError::Usage(e.to_string()))?
        } else {
            let mut h = results::histogram();
            while now_ns() < deadline {
                payload::stamp(&mut buf, 0, sent, now_ns());
                broker
                    .publish(&topic, Message::new(topic.clone(), buf.clone())?)
                    .await?;
                sent += 1;
                let m = receiver.recv().await?;
                if let Some((_, _, at)) = payload::read(&m.payload) {
                    let _ = h.record(now_ns().saturating_sub(at).max(1));
                }
            }
            h
        };
        let elapsed_s = (now_ns() - start) as f64 / 1e9;
        let mut result = RunResult {
            scenario: if separate_task {
                "inprocess-task"
            } else {
                "inprocess"
            }
            .into(),
            payload_bytes: payload_len,
            publishers: 1,
            subscribers: 1,
            msgs_per_s: latency.len() as f64 / elapsed_s,
            sent,
            received: latency.len(),
            lost: sent.saturating_sub(latency.len()),
            elapsed_s,
            ..Default::default()
        };
        result.set_latency(&latency);
        results.push(result);
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(seqs: &[u64]) -> SubReport {
        let mut bits = vec![0u64; 4];
        for &s in seqs {
            bits[(s / 64) as usize] |= 1 << (s % 64);
        }
        SubReport {
            latency: results::histogram(),
            received: seqs.len() as u64,
            last_ns: 0,
            seen: vec![bits],
        }
    }

    #[test]
    fn queue_accounting_finds_losses_and_duplicates() {
        let a = report(&[0, 2, 4, 100]);
        let b = report(&[1, 3, 4]);
        // Sent 0..=100: 101 messages; seen 0..=4 and 100, 4 twice.
        assert_eq!(queue_accounting(&[a, b], 101), (101 - 6, 1));
    }
}
