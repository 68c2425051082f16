//! `/metrics` and `/healthz` of the real binary: counters that match known
//! traffic, valid exposition text, health codes, and the endpoint following
//! hot reloads.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{eventually, BrokerProcess};
use kaelix_consumer::Consumer;
use kaelix_publisher::Publisher;
use prometheus_parse::{Scrape, Value};

const WAIT: Duration = Duration::from_secs(20);

fn scrape(broker: &BrokerProcess) -> Scrape {
    let (status, body) = broker.http_get("/metrics");
    assert_eq!(status, 200, "{body}");
    Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("valid exposition text")
}

/// The value of `name` with `labels`.
fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            Value::Histogram(buckets) => buckets.last().map_or(0.0, |b| b.count),
            Value::Summary(_) => f64::NAN,
        })
}

fn must(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    value(scrape, name, labels).unwrap_or_else(|| panic!("{name}{labels:?} missing"))
}

#[tokio::test]
async fn counters_match_the_traffic_sent_and_delivered() {
    let broker = BrokerProcess::start(&[
        ("KAELIX_LIMITS_MAX_PAYLOAD_BYTES", "1000"),
        ("KAELIX_LIMITS_MAX_SUBSCRIPTIONS_PER_CONNECTION", "2"),
    ]);
    let consumer = Consumer::connect(broker.addr()).await.unwrap();
    let mut exact = consumer.subscribe("m.a").await.unwrap();
    let mut wild = consumer.subscribe("m.*").await.unwrap();
    // Refused by the broker: the connection's third subscription.
    assert!(consumer.subscribe("m.b").await.is_err());

    let publisher = Publisher::connect(broker.addr()).await.unwrap();
    for _ in 0..10 {
        publisher.publish("m.a", vec![7u8; 100]).await.unwrap();
    }
    // Refused by the client before it is sent: not the broker's count.
    assert!(publisher.publish("bad topic", "x").await.is_err());
    assert!(publisher.publish("m.a", vec![0u8; 2000]).await.is_err());
    for _ in 0..10 {
        exact.recv().await.unwrap();
        wild.recv().await.unwrap();
    }

    let s = scrape(&broker);
    assert_eq!(must(&s, "kaelix_messages_published_total", &[]), 10.0);
    assert_eq!(must(&s, "kaelix_messages_delivered_total", &[]), 20.0);
    assert_eq!(must(&s, "kaelix_publish_acks_total", &[]), 10.0);
    assert!(must(&s, "kaelix_bytes_received_total", &[]) >= 1000.0);
    assert!(must(&s, "kaelix_bytes_delivered_total", &[]) >= 2000.0);
    let refused = |reason| must(&s, "kaelix_publish_refusals_total", &[("reason", reason)]);
    assert_eq!(refused("invalid-topic"), 0.0);
    assert_eq!(refused("payload-too-large"), 1.0);
    assert_eq!(refused("not-permitted"), 0.0);
    assert_eq!(
        must(
            &s,
            "kaelix_subscribe_refusals_total",
            &[("reason", "too-many-subscriptions")]
        ),
        1.0
    );
    assert_eq!(must(&s, "kaelix_connections_active", &[]), 2.0);
    assert_eq!(must(&s, "kaelix_connections_accepted_total", &[]), 2.0);
    assert_eq!(must(&s, "kaelix_subscriptions_active", &[]), 2.0);
    assert_eq!(must(&s, "kaelix_topics_active", &[]), 1.0);
    assert_eq!(must(&s, "kaelix_wildcard_subscriptions_active", &[]), 1.0);
    assert!(must(&s, "kaelix_delivery_latency_seconds", &[]) > 0.0);
    assert!(must(&s, "kaelix_runtime_workers", &[]) >= 1.0);
    assert!(must(&s, "kaelix_process_resident_memory_bytes", &[]) > 1e6);
    let statuses: f64 = ["healthy", "degraded", "unhealthy", "unknown"]
        .iter()
        .map(|status| must(&s, "kaelix_health_status", &[("status", status)]))
        .sum();
    assert_eq!(statuses, 1.0, "exactly one health status is current");
    let high_p99 = must(
        &s,
        "kaelix_runtime_scheduling_delay_seconds",
        &[("priority", "high"), ("percentile", "99")],
    );
    assert!(high_p99 > 0.0);
    for sample in &s.samples {
        assert!(sample.metric.starts_with("kaelix_"), "{}", sample.metric);
    }
    for help in s.docs.keys() {
        assert!(help.starts_with("kaelix_"), "{help}");
    }

    // A client leaving is counted by its reason.
    publisher.close().await.unwrap();
    let mut closed = 0.0;
    eventually(WAIT, "the close to be counted", || {
        let s = scrape(&broker);
        closed = must(
            &s,
            "kaelix_connections_closed_total",
            &[("reason", "client_closed")],
        );
        closed == 1.0 && must(&s, "kaelix_connections_active", &[]) == 1.0
    })
    .await;
    assert_eq!(
        value(
            &scrape(&broker),
            "kaelix_connections_closed_total",
            &[("reason", "slow_consumer")]
        ),
        Some(0.0)
    );
}

#[test]
fn the_exposition_passes_promtool_where_it_is_installed() {
    let has_promtool = std::process::Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_promtool {
        // CI installs promtool and sets this, so there the check must run.
        assert!(
            std::env::var_os("REQUIRE_PROMTOOL").is_none(),
            "promtool is required here but not installed"
        );
        eprintln!("promtool not installed: skipping `promtool check metrics`");
        return;
    }
    let broker = BrokerProcess::start(&[]);
    let (_, body) = broker.http_get("/metrics");
    let mut check = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    check
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}\n{body}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn healthz_answers_with_a_small_json_body() {
    let broker = BrokerProcess::start(&[]);
    let (status, body) = broker.http_get("/healthz");
    let json: serde_json::Value = serde_json::from_str(&body).expect(&body);
    let state = json["status"].as_str().unwrap();
    match state {
        "healthy" | "degraded" | "unknown" => assert_eq!(status, 200, "{body}"),
        other => panic!("a fresh broker is {other}: {body}"),
    }
    assert!(json["reason"].is_string(), "{body}");
    assert!(json["uptime_seconds"].is_u64(), "{body}");
    let (status, _) = broker.http_get("/nothing-here");
    assert_eq!(status, 404);
}

#[tokio::test]
async fn healthz_turns_503_when_the_runtime_is_unhealthy() {
    // A 1 µs target with no idle spinning: every wake-up misses it by far
    // more than ten times, which is Unhealthy.
    let broker = BrokerProcess::start(&[
        ("KAELIX_RUNTIME_TARGET_LATENCY_US", "1"),
        ("KAELIX_RUNTIME_IDLE_SPIN_US", "0"),
    ]);
    let publisher = Publisher::connect(broker.addr()).await.unwrap();
    let consumer = Consumer::connect(broker.addr()).await.unwrap();
    let mut sub = consumer.subscribe("h").await.unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        for _ in 0..50 {
            publisher.publish("h", "x").await.unwrap();
            sub.recv().await.unwrap();
        }
        let (status, body) = broker.http_get("/healthz");
        if status == 503 {
            let json: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(json["status"], "unhealthy", "{body}");
            assert!(
                json["reason"].as_str().unwrap().contains("target"),
                "{body}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never unhealthy: {body}"
        );
    }
}

fn write_config(path: &Path, body: &str) {
    let tmp = path.with_extension("toml.new");
    std::fs::write(&tmp, body).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn the_endpoint_follows_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("kaelix.toml");
    let base = "[network]\nhost = \"127.0.0.1\"\nport = 0\n";
    write_config(&file, base);
    let broker = BrokerProcess::start_in(dir.path(), &["--config", file.to_str().unwrap()], &[]);
    let first = broker.metrics.expect("serving metrics");
    assert_eq!(broker.http_get("/healthz").0, 200);

    write_config(
        &file,
        &format!("{base}[telemetry.metrics.prometheus]\nenabled = false\n"),
    );
    broker.wait_for_log(&["metrics endpoint stopped"], WAIT);
    assert!(
        std::net::TcpStream::connect(first).is_err(),
        "still listening on {first}"
    );

    write_config(&file, base);
    // The second "serving" line: the first was at start.
    let deadline = std::time::Instant::now() + WAIT;
    while broker.log_count("metrics endpoint serving") < 2 {
        assert!(std::time::Instant::now() < deadline, "not served again");
        std::thread::sleep(Duration::from_millis(20));
    }
    let line = broker
        .log
        .lock()
        .unwrap()
        .iter()
        .rev()
        .find(|l| l.contains("metrics endpoint serving"))
        .cloned()
        .unwrap();
    let addr: std::net::SocketAddr = line
        .split("addr=")
        .nth(1)
        .and_then(|a| a.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    let body = std::io::Read::bytes({
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        std::io::Write::write_all(
            &mut s,
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
        s
    })
    .map(|b| b.unwrap())
    .collect::<Vec<u8>>();
    let text = String::from_utf8_lossy(&body);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.contains("kaelix_config_reloads_total{result=\"applied\"} 2"),
        "{text}"
    );

    // Buckets are fixed when the histogram is made: a restart key.
    write_config(
        &file,
        &format!("{base}[telemetry.metrics]\ndelivery_latency_buckets_us = [5, 50]\n"),
    );
    broker.wait_for_log(
        &[
            "needs a restart",
            "telemetry.metrics.delivery_latency_buckets_us",
        ],
        WAIT,
    );
}
