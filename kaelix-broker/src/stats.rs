//! Broker counters. Publishers add to them once per batch, not per message.

use std::fmt;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use kaelix_core::protocol::ErrorCode;
use kaelix_core::runtime::HealthStatus;

/// Why a connection closed, as counted in
/// `kaelix_connections_closed_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disconnect {
    /// The client closed its side.
    ClientClosed,
    /// Reading from the socket failed.
    ReadError,
    /// Writing to the socket failed.
    WriteError,
    /// The broker shut down.
    ShuttingDown,
    /// No HELLO in time.
    HandshakeTimeout,
    /// The client broke the protocol (malformed or oversized frame, ...).
    ProtocolViolation,
    /// More was pending for it than `limits.max_pending_bytes`.
    SlowConsumer,
    /// The TLS handshake failed (no common version or cipher, a client
    /// certificate missing or not signed by the CA, not TLS at all).
    TlsHandshake,
    /// The credentials were not accepted.
    AuthenticationFailed,
    /// Nothing heard from the client within `limits.idle_timeout_ms`.
    IdleTimeout,
    /// A reload removed the identity the client logged in as.
    Revoked,
}

impl Disconnect {
    /// Every reason, in counter order.
    pub const ALL: [Disconnect; 11] = [
        Disconnect::ClientClosed,
        Disconnect::ReadError,
        Disconnect::WriteError,
        Disconnect::ShuttingDown,
        Disconnect::HandshakeTimeout,
        Disconnect::ProtocolViolation,
        Disconnect::SlowConsumer,
        Disconnect::TlsHandshake,
        Disconnect::AuthenticationFailed,
        Disconnect::IdleTimeout,
        Disconnect::Revoked,
    ];

    /// The label value.
    pub fn name(self) -> &'static str {
        match self {
            Disconnect::ClientClosed => "client_closed",
            Disconnect::ReadError => "read_error",
            Disconnect::WriteError => "write_error",
            Disconnect::ShuttingDown => "shutting_down",
            Disconnect::HandshakeTimeout => "handshake_timeout",
            Disconnect::ProtocolViolation => "protocol_violation",
            Disconnect::SlowConsumer => "slow_consumer",
            Disconnect::TlsHandshake => "tls_handshake",
            Disconnect::AuthenticationFailed => "authentication_failed",
            Disconnect::IdleTimeout => "idle_timeout",
            Disconnect::Revoked => "revoked",
        }
    }
}

/// Why a connection was refused when it arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// `network.max_connections` reached.
    ConnectionLimit,
    /// The runtime's queues were full.
    RuntimeBusy,
    /// `limits.max_connections_per_address` reached for the client's address.
    AddressLimit,
    /// `limits.max_pending_handshakes` connections were still in their handshake.
    HandshakeLimit,
}

impl Rejection {
    /// Every reason, in counter order.
    pub const ALL: [Rejection; 4] = [
        Rejection::ConnectionLimit,
        Rejection::RuntimeBusy,
        Rejection::AddressLimit,
        Rejection::HandshakeLimit,
    ];

    /// The label value.
    pub fn name(self) -> &'static str {
        match self {
            Rejection::ConnectionLimit => "connection_limit",
            Rejection::RuntimeBusy => "runtime_busy",
            Rejection::AddressLimit => "address_limit",
            Rejection::HandshakeLimit => "handshake_limit",
        }
    }
}

/// The publish refusals counted one by one; any other counts as `other`.
pub const PUBLISH_REFUSALS: [ErrorCode; 6] = [
    ErrorCode::InvalidTopic,
    ErrorCode::PayloadTooLarge,
    ErrorCode::InvalidHeader,
    ErrorCode::NotPermitted,
    ErrorCode::Rejected,
    ErrorCode::DeadLettered,
];

/// The subscribe refusals counted one by one; any other counts as `other`.
pub const SUBSCRIBE_REFUSALS: [ErrorCode; 5] = [
    ErrorCode::InvalidPattern,
    ErrorCode::InvalidGroup,
    ErrorCode::TooManySubscriptions,
    ErrorCode::DuplicateSubscription,
    ErrorCode::NotPermitted,
];

/// Counters by refusal code: one per listed code, then `other`.
#[derive(Debug)]
struct ByCode<const N: usize> {
    codes: &'static [ErrorCode; N],
    counts: [AtomicU64; N],
    other: AtomicU64,
}

impl<const N: usize> ByCode<N> {
    fn new(codes: &'static [ErrorCode; N]) -> Self {
        ByCode {
            codes,
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            other: AtomicU64::new(0),
        }
    }

    fn add(&self, code: ErrorCode) {
        let counter = match self.codes.iter().position(|c| *c == code) {
            Some(i) => &self.counts[i],
            None => &self.other,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> Vec<(&'static str, u64)> {
        self.codes
            .iter()
            .zip(&self.counts)
            .map(|(code, n)| (code.name(), n.load(Ordering::Relaxed)))
            .chain(std::iter::once((
                "other",
                self.other.load(Ordering::Relaxed),
            )))
            .collect()
    }
}

/// Live counters, shared by every connection. The data path adds to them
/// once per read batch, not per message.
#[derive(Debug)]
pub(crate) struct Stats {
    pub(crate) published: AtomicU64,
    pub(crate) delivered: AtomicU64,
    pub(crate) bytes_in: AtomicU64,
    pub(crate) bytes_out: AtomicU64,
    pub(crate) acked: AtomicU64,
    /// Retried publishes dropped as already routed (see `dedupe`).
    pub(crate) duplicates: AtomicU64,
    pub(crate) slow_consumers: AtomicU64,
    /// Messages dropped from slow subscribers' buffers (drop_oldest), or
    /// gone from the retained window before a paced subscriber had credit.
    pub(crate) slow_dropped: AtomicU64,
    /// Times a publisher waited for a slow subscriber (block).
    pub(crate) slow_blocked: AtomicU64,
    /// Times a connection was held back for its publish rate, and for how
    /// long in all (µs).
    pub(crate) throttled: AtomicU64,
    pub(crate) throttled_us: AtomicU64,
    pub(crate) subscriptions: AtomicI64,
    pub(crate) connections_active: AtomicI64,
    pub(crate) connections_total: AtomicU64,
    rejected: [AtomicU64; Rejection::ALL.len()],
    closed: [AtomicU64; Disconnect::ALL.len()],
    publish_refused: ByCode<6>,
    subscribe_refused: ByCode<5>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            published: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            slow_consumers: AtomicU64::new(0),
            slow_dropped: AtomicU64::new(0),
            slow_blocked: AtomicU64::new(0),
            throttled: AtomicU64::new(0),
            throttled_us: AtomicU64::new(0),
            subscriptions: AtomicI64::new(0),
            connections_active: AtomicI64::new(0),
            connections_total: AtomicU64::new(0),
            rejected: Default::default(),
            closed: Default::default(),
            publish_refused: ByCode::new(&PUBLISH_REFUSALS),
            subscribe_refused: ByCode::new(&SUBSCRIBE_REFUSALS),
        }
    }
}

impl Stats {
    pub(crate) fn add_routed(&self, published: u64, delivered: u64, bytes_in: u64, bytes_out: u64) {
        for (counter, n) in [
            (&self.published, published),
            (&self.delivered, delivered),
            (&self.bytes_in, bytes_in),
            (&self.bytes_out, bytes_out),
        ] {
            if n > 0 {
                counter.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    pub(crate) fn rejected(&self, why: Rejection) {
        self.rejected[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn closed(&self, why: Disconnect) {
        self.closed[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn publish_refused(&self, code: ErrorCode) {
        self.publish_refused.add(code);
    }

    pub(crate) fn subscribe_refused(&self, code: ErrorCode) {
        self.subscribe_refused.add(code);
    }

    pub(crate) fn snapshot(&self) -> BrokerStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let all = |cs: &[AtomicU64]| cs.iter().map(get).collect::<Vec<u64>>();
        let rejected = all(&self.rejected);
        let publish_refusals = self.publish_refused.snapshot();
        BrokerStats {
            messages_published: get(&self.published),
            messages_delivered: get(&self.delivered),
            bytes_received: get(&self.bytes_in),
            bytes_delivered: get(&self.bytes_out),
            publishes_acknowledged: get(&self.acked),
            publish_duplicates: get(&self.duplicates),
            publishes_refused: publish_refusals.iter().map(|(_, n)| n).sum(),
            publish_refusals,
            subscribe_refusals: self.subscribe_refused.snapshot(),
            slow_consumers: get(&self.slow_consumers),
            slow_consumer_drops: get(&self.slow_dropped),
            slow_consumer_waits: get(&self.slow_blocked),
            publish_throttles: get(&self.throttled),
            publish_throttled: Duration::from_micros(get(&self.throttled_us)),
            subscriptions: self.subscriptions.load(Ordering::Relaxed).max(0) as u64,
            topics: 0,
            wildcard_subscriptions: 0,
            retained_bytes: 0,
            topic_logs: 0,
            connections_active: self.connections_active.load(Ordering::Relaxed).max(0) as u64,
            connections_total: get(&self.connections_total),
            connections_rejected: rejected.iter().sum(),
            rejections: Rejection::ALL
                .iter()
                .map(|r| r.name())
                .zip(rejected)
                .collect(),
            disconnects: Disconnect::ALL
                .iter()
                .map(|d| d.name())
                .zip(all(&self.closed))
                .collect(),
            uptime: Duration::ZERO,
            runtime: None,
        }
    }
}

/// A snapshot of the broker's counters; see [`MessageBroker::stats`](crate::MessageBroker::stats).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BrokerStats {
    /// Messages accepted for routing.
    pub messages_published: u64,
    /// Messages handed to subscribers (one message to three subscribers counts three).
    pub messages_delivered: u64,
    /// Bytes of PUBLISH frames received from network clients.
    pub bytes_received: u64,
    /// MESSAGE frame bytes handed to network subscribers.
    pub bytes_delivered: u64,
    /// Publishes acknowledged (PUB_ACK sent).
    pub publishes_acknowledged: u64,
    /// Retried publishes acknowledged without routing them again, because
    /// the broker had routed them before (`[dedupe]`).
    pub publish_duplicates: u64,
    /// Publishes refused, each answered with its reason.
    pub publishes_refused: u64,
    /// Publish refusals by reason (error code name), every reason listed.
    pub publish_refusals: Vec<(&'static str, u64)>,
    /// Subscribe refusals by reason, every reason listed.
    pub subscribe_refusals: Vec<(&'static str, u64)>,
    /// Subscribers disconnected because they fell too far behind.
    pub slow_consumers: u64,
    /// Messages dropped from the buffers of subscribers that fell behind
    /// under the `drop_oldest` policy, or gone from the retained window
    /// before a subscriber's credit window let them be sent (each
    /// subscriber was told which).
    pub slow_consumer_drops: u64,
    /// Times a publisher waited for a subscriber that fell behind under the
    /// `block` policy.
    pub slow_consumer_waits: u64,
    /// Times a connection was held back for passing its publish rate
    /// (`limits.max_publish_messages_per_sec`, `max_publish_bytes_per_sec`).
    pub publish_throttles: u64,
    /// Time connections were held back for their publish rate, in all.
    pub publish_throttled: Duration,
    /// Subscriptions active now.
    pub subscriptions: u64,
    /// Distinct exact topics with at least one subscription now.
    pub topics: u64,
    /// Subscriptions with wildcards now.
    pub wildcard_subscriptions: u64,
    /// Message bytes retained for replay, across all topics.
    pub retained_bytes: u64,
    /// Topics with a log (offsets and retained messages).
    pub topic_logs: u64,
    /// Network connections open now.
    pub connections_active: u64,
    /// Network connections accepted since start.
    pub connections_total: u64,
    /// Connections refused at the connection limit (or with the runtime's
    /// queues full).
    pub connections_rejected: u64,
    /// Refused connections by reason.
    pub rejections: Vec<(&'static str, u64)>,
    /// Closed connections by reason, every reason listed.
    pub disconnects: Vec<(&'static str, u64)>,
    /// Time since the broker was made.
    pub uptime: Duration,
    /// The runtime the broker runs on, when it has one.
    pub runtime: Option<RuntimeStats>,
}

/// Where the broker's runtime placed its workers, and its health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeStats {
    /// Worker threads.
    pub workers: usize,
    /// `w0:cpu0,w1:cpu1`: each worker and the CPUs it may run on.
    pub placement: String,
    /// The runtime's health now.
    pub health: HealthStatus,
}

impl BrokerStats {
    /// The statistics as one JSON object, as STATS_REPLY carries them and
    /// `kaelix stats --json` prints them.
    pub fn to_json(&self, health: &crate::BrokerHealth) -> serde_json::Value {
        let map = |pairs: &[(&'static str, u64)]| {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_string(), serde_json::Value::from(*v)))
                .collect::<serde_json::Map<_, _>>()
        };
        serde_json::json!({
            "server": "kaelix-broker",
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": self.uptime.as_secs_f64(),
            "health": { "status": health.status.name(), "reason": health.reason },
            "connections": {
                "active": self.connections_active,
                "accepted": self.connections_total,
                "rejected": map(&self.rejections),
                "closed": map(&self.disconnects),
            },
            "subscriptions": self.subscriptions,
            "topics": self.topics,
            "wildcard_subscriptions": self.wildcard_subscriptions,
            "retention": { "bytes": self.retained_bytes, "topics": self.topic_logs },
            "messages": {
                "published": self.messages_published,
                "delivered": self.messages_delivered,
            },
            "bytes": { "received": self.bytes_received, "delivered": self.bytes_delivered },
            "publishes": {
                "acknowledged": self.publishes_acknowledged,
                "duplicates": self.publish_duplicates,
                "refused": map(&self.publish_refusals),
            },
            "subscribe_refusals": map(&self.subscribe_refusals),
            "slow_consumers": self.slow_consumers,
            "slow_consumer_drops": self.slow_consumer_drops,
            "slow_consumer_waits": self.slow_consumer_waits,
            "runtime": self.runtime.as_ref().map(|r| serde_json::json!({
                "workers": r.workers,
                "placement": r.placement,
                "health": r.health.name(),
            })),
        })
    }
}

/// `1.2 k`, `3.4 M`: a count for people.
pub fn human(n: f64) -> String {
    match n {
        n if n >= 1e9 => format!("{:.1} G", n / 1e9),
        n if n >= 1e6 => format!("{:.1} M", n / 1e6),
        n if n >= 1e4 => format!("{:.1} k", n / 1e3),
        n if n.fract() == 0.0 => format!("{n}"),
        n => format!("{n:.1}"),
    }
}

/// `1h02m03s`, `4.0s`: a duration for people.
pub fn duration(d: Duration) -> String {
    let s = d.as_secs();
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, _) => format!("{:.1}s", d.as_secs_f64()),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, s) => format!("{h}h{m:02}m{s:02}s"),
    }
}

/// One readable line: uptime, connections, subscriptions and topics,
/// messages and bytes with their average rates since start, refusals and
/// drops, and the runtime's placement and health.
impl fmt::Display for BrokerStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.uptime.as_secs_f64().max(1e-3);
        let rate = |n: u64| human(n as f64 / secs);
        write!(
            f,
            "up {}, {} connections ({} accepted, {} rejected), {} subscriptions on {} topics \
             (+{} wildcard), {} published ({}/s), {} delivered ({}/s), {}B in, {}B out, \
             {} acknowledged, {} refused, {} slow consumers ({} messages dropped, {} waits)",
            duration(self.uptime),
            self.connections_active,
            human(self.connections_total as f64),
            self.connections_rejected,
            self.subscriptions,
            self.topics,
            self.wildcard_subscriptions,
            human(self.messages_published as f64),
            rate(self.messages_published),
            human(self.messages_delivered as f64),
            rate(self.messages_delivered),
            human(self.bytes_received as f64),
            human(self.bytes_delivered as f64),
            human(self.publishes_acknowledged as f64),
            self.publishes_refused,
            self.slow_consumers,
            self.slow_consumer_drops,
            self.slow_consumer_waits,
        )?;
        if let Some(runtime) = &self.runtime {
            write!(
                f,
                ", {} workers ({}), health {}",
                runtime.workers, runtime.placement, runtime.health
            )?;
        }
        Ok(())
    }
}
