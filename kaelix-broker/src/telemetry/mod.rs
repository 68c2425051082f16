//! Metrics in Prometheus form, and the HTTP endpoint that serves them with
//! the broker's health.
//!
//! The data path counts into the broker's own atomics, once per read batch
//! (see [`stats`](crate::stats)); nothing on it goes through a registry, a
//! lock or an allocation per message. A scrape copies those counters into a
//! `metrics` recorder (the `metrics` facade, with `metrics-exporter-prometheus`
//! rendering the text format). The one histogram, publish-to-delivery
//! latency, is recorded by each connection's writer once per socket write.
//!
//! Every metric is listed with its meaning in `docs/operations.md`.

pub mod http;

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kaelix_core::runtime::{HealthStatus, TaskPriority};
use kaelix_core::MemoryStreamerConfig;
use metrics::{counter, gauge, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use crate::MessageBroker;

/// Publish-to-delivery latency inside the broker.
pub const DELIVERY_LATENCY: &str = "kaelix_delivery_latency_seconds";

/// A broker's metrics: its own recorder (so that several brokers in one
/// process keep theirs apart) and the delivery-latency histogram.
pub(crate) struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    delivery: metrics::Histogram,
    /// `telemetry.enabled && telemetry.metrics.enabled`, live.
    enabled: AtomicBool,
}

impl Metrics {
    pub(crate) fn new(config: &MemoryStreamerConfig) -> Metrics {
        let buckets: Vec<f64> = config
            .telemetry
            .metrics
            .delivery_latency_buckets_us
            .iter()
            .map(|us| *us as f64 / 1e6)
            .collect();
        let builder = PrometheusBuilder::new();
        // Validation keeps the list non-empty; without buckets the
        // histogram would render as a summary, which is still correct.
        let builder = builder
            .set_buckets_for_metric(Matcher::Full(DELIVERY_LATENCY.into()), &buckets)
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        let delivery = metrics::with_local_recorder(&recorder, || {
            describe();
            metrics::histogram!(DELIVERY_LATENCY)
        });
        Metrics {
            recorder,
            handle,
            delivery,
            enabled: AtomicBool::new(collecting(config)),
        }
    }

    /// One socket write delivered data whose oldest byte waited `waited`
    /// since it was routed.
    pub(crate) fn record_delivery(&self, waited: Duration) {
        if self.enabled.load(Ordering::Relaxed) {
            self.delivery.record(waited.as_secs_f64());
        }
    }

    pub(crate) fn set_enabled(&self, config: &MemoryStreamerConfig) {
        self.enabled.store(collecting(config), Ordering::Relaxed);
    }

    /// Drains recorded samples into the histogram's buckets; run now and
    /// then so that samples between scrapes do not pile up.
    pub(crate) fn upkeep(&self) {
        self.handle.run_upkeep();
    }
}

fn collecting(config: &MemoryStreamerConfig) -> bool {
    config.telemetry.enabled && config.telemetry.metrics.enabled
}

impl MessageBroker {
    /// Every metric of this broker in the Prometheus text format, as
    /// `/metrics` serves it.
    pub fn render_metrics(&self) -> String {
        let metrics = &self.inner.metrics;
        metrics::with_local_recorder(&metrics.recorder, || self.export_metrics());
        metrics.handle.render()
    }

    /// Copies the broker's counters and gauges into the `metrics` recorder
    /// installed for this thread (the global one, unless called inside
    /// `metrics::with_local_recorder`): for programs that embed the broker
    /// and export metrics their own way. Call it before each export.
    pub fn export_metrics(&self) {
        let stats = self.stats();
        let set = |name: &'static str, value: u64| counter!(name).absolute(value);
        set("kaelix_messages_published_total", stats.messages_published);
        set("kaelix_messages_delivered_total", stats.messages_delivered);
        set("kaelix_bytes_received_total", stats.bytes_received);
        set("kaelix_bytes_delivered_total", stats.bytes_delivered);
        set("kaelix_publish_acks_total", stats.publishes_acknowledged);
        set("kaelix_publish_duplicates_total", stats.publish_duplicates);
        set("kaelix_slow_consumers_total", stats.slow_consumers);
        set(
            "kaelix_slow_consumer_dropped_total",
            stats.slow_consumer_drops,
        );
        set(
            "kaelix_slow_consumer_waits_total",
            stats.slow_consumer_waits,
        );
        set("kaelix_connections_accepted_total", stats.connections_total);
        set("kaelix_publish_throttled_total", stats.publish_throttles);
        counter!("kaelix_publish_throttled_seconds_total")
            .absolute(stats.publish_throttled.as_secs());
        for (reason, n) in &stats.publish_refusals {
            counter!("kaelix_publish_refusals_total", "reason" => *reason).absolute(*n);
        }
        for (reason, n) in &stats.subscribe_refusals {
            counter!("kaelix_subscribe_refusals_total", "reason" => *reason).absolute(*n);
        }
        for (reason, n) in &stats.rejections {
            counter!("kaelix_connections_rejected_total", "reason" => *reason).absolute(*n);
        }
        for (reason, n) in &stats.disconnects {
            counter!("kaelix_connections_closed_total", "reason" => *reason).absolute(*n);
        }
        gauge!("kaelix_connections_active").set(stats.connections_active as f64);
        gauge!("kaelix_subscriptions_active").set(stats.subscriptions as f64);
        gauge!("kaelix_topics_active").set(stats.topics as f64);
        gauge!("kaelix_wildcard_subscriptions_active").set(stats.wildcard_subscriptions as f64);
        gauge!("kaelix_uptime_seconds").set(stats.uptime.as_secs_f64());
        gauge!("kaelix_retained_bytes").set(stats.retained_bytes as f64);
        gauge!("kaelix_topic_logs").set(stats.topic_logs as f64);

        if let Some(reloads) = self.reload_stats() {
            for (result, n) in [
                ("applied", reloads.applied),
                ("unchanged", reloads.unchanged),
                ("refused", reloads.refused),
            ] {
                counter!("kaelix_config_reloads_total", "result" => result).absolute(n);
            }
        }

        for (reason, n) in self.inner.auth.failures() {
            counter!("kaelix_auth_failures_total", "reason" => reason).absolute(n);
        }
        let tls = &self.inner.tls;
        if self.config().security.tls.enabled {
            for (result, n) in [("loaded", &tls.loaded), ("refused", &tls.refused)] {
                counter!("kaelix_tls_certificate_reloads_total", "result" => result)
                    .absolute(n.load(Ordering::Relaxed));
            }
            gauge!("kaelix_tls_certificate_expiry_timestamp_seconds")
                .set(tls.not_after.load(Ordering::Relaxed) as f64);
        }

        self.export_plugin_metrics();
        self.export_cluster_metrics();

        let health = self.health();
        for status in [
            HealthStatus::Healthy,
            HealthStatus::Degraded,
            HealthStatus::Unhealthy,
            HealthStatus::Unknown,
        ] {
            let now = if status == health.status { 1.0 } else { 0.0 };
            gauge!("kaelix_health_status", "status" => status.name()).set(now);
        }
        if let Some(runtime) = self.runtime() {
            let m = runtime.metrics();
            gauge!("kaelix_runtime_workers").set(m.workers.len() as f64);
            let depth = m.queue_depth();
            for priority in TaskPriority::ALL {
                let name = priority.name();
                gauge!("kaelix_runtime_queue_depth", "priority" => name)
                    .set(depth[priority as usize] as f64);
                let delay = m.scheduling_delay(priority);
                counter!("kaelix_runtime_tasks_scheduled_total", "priority" => name)
                    .absolute(delay.count);
                // A gauge per percentile: Prometheus keeps the `quantile`
                // label for summaries, and these come from the runtime's
                // own histograms.
                for (percentile, value) in [
                    ("50", delay.p50),
                    ("90", delay.p90),
                    ("99", delay.p99),
                    ("99.9", delay.p999),
                    ("100", delay.max),
                ] {
                    gauge!(
                        "kaelix_runtime_scheduling_delay_seconds",
                        "priority" => name,
                        "percentile" => percentile
                    )
                    .set(value.as_secs_f64());
                }
            }
        }
        if let Some(rss) = kaelix_core::runtime::process_rss() {
            gauge!("kaelix_process_resident_memory_bytes").set(rss as f64);
        }
    }

    /// Each plugin in force: its guard's counters, its circuit breaker,
    /// and the metrics it keeps itself.
    fn export_plugin_metrics(&self) {
        use kaelix_core::plugin::{MetricKind, PluginStats};
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        for handle in self.plugins() {
            let plugin = handle.name().to_string();
            let s = handle.stats();
            counter!("kaelix_plugin_calls_total", "plugin" => plugin.clone())
                .absolute(get(&s.calls));
            // Time in its calls since it was put in force: with the calls,
            // the average; its rate, the CPU share it takes.
            gauge!("kaelix_plugin_busy_seconds", "plugin" => plugin.clone())
                .set(get(&s.call_nanos) as f64 / 1e9);
            for (kind, n) in [
                ("error", &s.errors),
                ("panic", &s.panics),
                ("over_budget", &s.over_budget),
                ("over_cpu", &s.over_cpu),
            ] {
                counter!("kaelix_plugin_failures_total", "plugin" => plugin.clone(), "kind" => kind)
                    .absolute(get(n));
            }
            counter!("kaelix_plugin_skipped_total", "plugin" => plugin.clone())
                .absolute(get(&s.skipped));
            for (action, n) in PluginStats::ACTIONS.iter().zip(&s.actions) {
                counter!("kaelix_plugin_actions_total", "plugin" => plugin.clone(), "action" => *action)
                    .absolute(get(n));
            }
            for (state, n) in ["closed", "half_open", "open"].iter().zip(&s.transitions) {
                counter!("kaelix_plugin_state_changes_total", "plugin" => plugin.clone(), "state" => *state)
                    .absolute(get(n));
            }
            gauge!("kaelix_plugin_state", "plugin" => plugin.clone())
                .set(f64::from(s.state.load(Ordering::Relaxed)));
            for (name, kind, value) in handle.custom_metrics() {
                match kind {
                    MetricKind::Counter => {
                        counter!(format!("kaelix_plugin_custom_{name}_total"), "plugin" => plugin.clone())
                            .absolute(value)
                    }
                    MetricKind::Gauge => {
                        gauge!(format!("kaelix_plugin_custom_{name}"), "plugin" => plugin.clone())
                            .set(f64::from_bits(value))
                    }
                }
            }
        }
    }
}

/// Describes every metric once, for the HELP and TYPE lines.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    for (name, help) in [
        ("kaelix_cluster_node_id", "This broker's cluster.node_id."),
        ("kaelix_cluster_is_leader", "1 while this node is the Raft leader."),
        ("kaelix_cluster_leader_id", "The Raft leader this node follows (0: none known)."),
        ("kaelix_cluster_term", "The Raft term this node is in."),
        (
            "kaelix_cluster_has_quorum",
            "1 while this node knows a leader and sees a majority of voters up: metadata can change.",
        ),
        ("kaelix_cluster_members", "Members of the cluster (voters and learners)."),
        (
            "kaelix_cluster_members_up",
            "Members that answered this node's pings within cluster.failure_timeout_ms (itself included).",
        ),
        (
            "kaelix_cluster_member_up",
            "1 while the member (label node) answers this node's pings.",
        ),
        ("kaelix_cluster_topics", "Topics the cluster's metadata defines."),
        (
            "kaelix_cluster_partition_leader",
            "The node id leading each partition (labels topic, partition).",
        ),
    ] {
        describe_gauge!(name, help);
    }
    describe_counter!(
        "kaelix_messages_published_total",
        "Messages accepted for routing."
    );
    describe_counter!(
        "kaelix_messages_delivered_total",
        "Messages handed to subscribers (one message to three subscribers counts three)."
    );
    describe_counter!(
        "kaelix_bytes_received_total",
        Unit::Bytes,
        "Bytes of PUBLISH message bodies received from network clients."
    );
    describe_counter!(
        "kaelix_bytes_delivered_total",
        Unit::Bytes,
        "Bytes of MESSAGE frames queued for network subscribers."
    );
    describe_counter!(
        "kaelix_publish_acks_total",
        "Publishes acknowledged with PUB_ACK."
    );
    describe_counter!(
        "kaelix_publish_duplicates_total",
        "Retried publishes acknowledged without routing them again: the broker had routed them before."
    );
    describe_counter!(
        "kaelix_publish_refusals_total",
        "Publishes refused with PUB_NACK, by reason."
    );
    describe_counter!(
        "kaelix_subscribe_refusals_total",
        "Subscriptions refused with SUB_NACK, by reason."
    );
    describe_counter!(
        "kaelix_slow_consumers_total",
        "Subscribers closed because more was pending for them than their limit."
    );
    describe_counter!(
        "kaelix_slow_consumer_dropped_total",
        "Messages subscribers that fell behind were told they missed: dropped from their \
         buffers (drop_oldest), or gone from the retained window before a credit window let \
         them be sent."
    );
    describe_counter!(
        "kaelix_slow_consumer_waits_total",
        "Times a publisher waited for a subscriber that fell behind (block)."
    );
    describe_counter!(
        "kaelix_connections_accepted_total",
        "Network connections accepted."
    );
    describe_counter!(
        "kaelix_connections_rejected_total",
        "Network connections refused on arrival, by reason."
    );
    describe_counter!(
        "kaelix_connections_closed_total",
        "Network connections closed, by reason."
    );
    describe_gauge!("kaelix_connections_active", "Network connections open now.");
    describe_gauge!("kaelix_subscriptions_active", "Subscriptions now.");
    describe_gauge!(
        "kaelix_topics_active",
        "Distinct exact topics with at least one subscription now."
    );
    describe_gauge!(
        "kaelix_wildcard_subscriptions_active",
        "Subscriptions with wildcards now."
    );
    describe_gauge!(
        "kaelix_retained_bytes",
        Unit::Bytes,
        "Message bytes retained for replay, across all topics (capped by retention.max_bytes)."
    );
    describe_gauge!(
        "kaelix_topic_logs",
        "Topics with a log: offsets and retained messages."
    );
    describe_gauge!(
        "kaelix_uptime_seconds",
        Unit::Seconds,
        "Seconds since the broker started."
    );
    describe_counter!(
        "kaelix_config_reloads_total",
        "Configuration reloads, by result (applied, unchanged, refused)."
    );
    describe_counter!(
        "kaelix_publish_throttled_total",
        "Times a connection was held back for passing its publish rate limit."
    );
    describe_counter!(
        "kaelix_publish_throttled_seconds_total",
        Unit::Seconds,
        "Whole seconds connections were held back for their publish rate limits."
    );
    describe_counter!(
        "kaelix_auth_failures_total",
        "Logins refused, by reason (no_credentials, malformed, unknown_token, unknown_user, \
         wrong_password, unknown_certificate)."
    );
    describe_counter!(
        "kaelix_tls_certificate_reloads_total",
        "TLS certificate loads, by result (loaded, refused: the last good one stayed)."
    );
    describe_gauge!(
        "kaelix_tls_certificate_expiry_timestamp_seconds",
        Unit::Seconds,
        "When the TLS certificate in force expires, in seconds since the Unix epoch."
    );
    describe_gauge!(
        "kaelix_health_status",
        "1 for the broker's health status now, 0 for the others."
    );
    describe_gauge!("kaelix_runtime_workers", "Runtime worker threads.");
    describe_gauge!(
        "kaelix_runtime_queue_depth",
        "Tasks waiting in the runtime's queues, by priority."
    );
    describe_counter!(
        "kaelix_runtime_tasks_scheduled_total",
        "Task polls whose scheduling delay was measured, by priority."
    );
    describe_gauge!(
        "kaelix_runtime_scheduling_delay_seconds",
        Unit::Seconds,
        "Runtime scheduling delay (wake to first poll) since start, by priority and percentile."
    );
    describe_gauge!(
        "kaelix_process_resident_memory_bytes",
        Unit::Bytes,
        "Resident memory of the broker process."
    );
    describe_histogram!(
        DELIVERY_LATENCY,
        Unit::Seconds,
        "Time from routing a message into a subscriber's buffer to the end of the socket \
         write that sends it, once per write for the oldest message in it."
    );
}

/// The endpoint serving now, and the address it was asked for.
pub(crate) struct Endpoint {
    wanted: (String, u16),
    server: http::MetricsServer,
}

/// The broker's health: its runtime's, or Unhealthy while shutting down.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerHealth {
    /// The status.
    pub status: HealthStatus,
    /// Why, in words.
    pub reason: String,
}

impl MessageBroker {
    /// The broker's health, as `/healthz` reports it.
    pub fn health(&self) -> BrokerHealth {
        if self.inner.shutdown.is_cancelled() {
            return BrokerHealth {
                status: HealthStatus::Unhealthy,
                reason: "the broker is shutting down".into(),
            };
        }
        if self.inner.draining.is_cancelled() {
            return BrokerHealth {
                status: HealthStatus::Unhealthy,
                reason: "the broker is draining: it takes no new connections".into(),
            };
        }
        let health = match self.runtime() {
            Some(runtime) => {
                let report = runtime.health().report();
                BrokerHealth {
                    status: report.status,
                    reason: report.reason,
                }
            }
            None => BrokerHealth {
                status: HealthStatus::Healthy,
                reason: "serving (embedded, on the caller's tokio runtime)".into(),
            },
        };
        self.cluster_health(health)
    }

    /// Serves `/metrics` and `/healthz` where `[telemetry.metrics.prometheus]`
    /// says, when it and `telemetry.enabled` and `telemetry.metrics.enabled`
    /// are on, and follows every reload from then on: turning it on or
    /// off, moving it. Must be called within a tokio runtime, whose tasks
    /// serve the endpoint. Returns where it listens (`None` when off); an
    /// address that cannot be bound is an error here, and a refused reload
    /// later (the endpoint stays where it was).
    pub fn serve_metrics(&self) -> std::io::Result<Option<SocketAddr>> {
        let runtime = tokio::runtime::Handle::current();
        let addr = self.apply_endpoint(&self.config())?;
        let broker = Arc::downgrade(&self.inner);
        self.on_reconfigure(
            "metrics endpoint",
            &[
                "telemetry.enabled",
                "telemetry.metrics.enabled",
                "telemetry.metrics.prometheus",
            ],
            move |config| {
                let Some(inner) = broker.upgrade() else {
                    return Ok(());
                };
                let _in_runtime = runtime.enter();
                MessageBroker { inner }
                    .apply_endpoint(config)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            },
        );
        Ok(addr)
    }

    /// Starts, moves or stops the endpoint to match `config`.
    fn apply_endpoint(&self, config: &MemoryStreamerConfig) -> std::io::Result<Option<SocketAddr>> {
        let p = &config.telemetry.metrics.prometheus;
        let wanted = (collecting(config) && p.enabled).then(|| (p.host.clone(), p.port));
        let mut current = self.inner.endpoint.lock();
        if current.as_ref().map(|e| &e.wanted) == wanted.as_ref() {
            return Ok(current.as_ref().map(|e| e.server.local_addr()));
        }
        // The old one goes first: the new address may be the same port.
        let old = current.take().map(|e| e.wanted);
        let start = |(host, port): &(String, u16)| -> std::io::Result<Endpoint> {
            let addr = (host.as_str(), *port)
                .to_socket_addrs()?
                .next()
                .ok_or_else(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("{host} has no address"),
                    )
                })?;
            let server = http::MetricsServer::start(self, addr).map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("cannot serve metrics on {host}:{port}: {e}"),
                )
            })?;
            Ok(Endpoint {
                wanted: (host.clone(), *port),
                server,
            })
        };
        let next = match &wanted {
            None => None,
            Some(wanted) => match start(wanted) {
                Ok(endpoint) => Some(endpoint),
                Err(err) => {
                    // Back where it was, if it can be.
                    *current = old.as_ref().and_then(|old| start(old).ok());
                    return Err(err);
                }
            },
        };
        let addr = next.as_ref().map(|e| e.server.local_addr());
        match addr {
            Some(addr) => tracing::info!(%addr, "metrics endpoint serving /metrics and /healthz"),
            None if old.is_some() => tracing::info!("metrics endpoint stopped"),
            None => {}
        }
        *current = next;
        Ok(addr)
    }
}
