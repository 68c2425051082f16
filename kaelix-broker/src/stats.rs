//! Broker counters. Publishers add to them once per batch, not per message.

use std::fmt;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use kaelix_core::runtime::HealthStatus;

/// Live counters, shared by every connection.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) published: AtomicU64,
    pub(crate) delivered: AtomicU64,
    pub(crate) bytes_in: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) slow_consumers: AtomicU64,
    pub(crate) subscriptions: AtomicI64,
    pub(crate) connections_active: AtomicI64,
    pub(crate) connections_total: AtomicU64,
    pub(crate) connections_rejected: AtomicU64,
}

impl Stats {
    pub(crate) fn add_routed(&self, published: u64, delivered: u64, bytes_in: u64) {
        if published > 0 {
            self.published.fetch_add(published, Ordering::Relaxed);
        }
        if delivered > 0 {
            self.delivered.fetch_add(delivered, Ordering::Relaxed);
        }
        if bytes_in > 0 {
            self.bytes_in.fetch_add(bytes_in, Ordering::Relaxed);
        }
    }

    pub(crate) fn snapshot(&self) -> BrokerStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BrokerStats {
            messages_published: get(&self.published),
            messages_delivered: get(&self.delivered),
            bytes_received: get(&self.bytes_in),
            publishes_refused: get(&self.refused),
            slow_consumers: get(&self.slow_consumers),
            subscriptions: self.subscriptions.load(Ordering::Relaxed).max(0) as u64,
            connections_active: self.connections_active.load(Ordering::Relaxed).max(0) as u64,
            connections_total: get(&self.connections_total),
            connections_rejected: get(&self.connections_rejected),
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
    /// Publishes refused, each answered with its reason.
    pub publishes_refused: u64,
    /// Subscribers disconnected because they fell too far behind.
    pub slow_consumers: u64,
    /// Subscriptions active now.
    pub subscriptions: u64,
    /// Network connections open now.
    pub connections_active: u64,
    /// Network connections accepted since start.
    pub connections_total: u64,
    /// Connections refused at the connection limit (or with the runtime's
    /// queues full).
    pub connections_rejected: u64,
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

impl fmt::Display for BrokerStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "published={} delivered={} bytes_received={} refused={} slow_consumers={} \
             subscriptions={} connections={} connections_total={} connections_rejected={}",
            self.messages_published,
            self.messages_delivered,
            self.bytes_received,
            self.publishes_refused,
            self.slow_consumers,
            self.subscriptions,
            self.connections_active,
            self.connections_total,
            self.connections_rejected,
        )?;
        if let Some(runtime) = &self.runtime {
            write!(
                f,
                " workers={} placement={} health={}",
                runtime.workers, runtime.placement, runtime.health
            )?;
        }
        Ok(())
    }
}
