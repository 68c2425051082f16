//! The running configuration, and how a reload reaches the parts of the
//! broker that can change while it serves.
//!
//! Each part that can take a new value live registers an applier for the
//! keys it owns ([`MessageBroker::on_reconfigure`]). A reload applies the
//! changed keys some applier owns and leaves every other changed key at its
//! running value, reported as needing a restart. The hot path never reads
//! the configuration itself: limits it checks are atomics, read once per
//! read batch or per connection.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use kaelix_core::config::{
    changed_keys, with_values_from, ConfigError, HotReloadManager, HotReloadSettings, ReloadStats,
};
use kaelix_core::MemoryStreamerConfig;
use parking_lot::Mutex;

use crate::MessageBroker;

/// Keys whose new value applies without a restart because the broker reads
/// them from the running configuration when it next needs them (a new
/// connection, a closing one).
const READ_WHEN_USED: &[&str] = &[
    "network.handshake_timeout_ms",
    "network.shutdown_grace_ms",
    "network.drain_timeout_ms",
    "network.retry_after_ms",
    "network.read_buffer_bytes",
    // Read by each connection when it opens.
    "dedupe",
    "limits.max_frame_bytes",
    "limits.idle_timeout_ms",
];

/// Keys held in [`LiveLimits`].
const LIMITS: &[&str] = &[
    "network.max_connections",
    "limits.max_payload_bytes",
    "limits.max_pending_bytes",
    "limits.max_subscriptions_per_connection",
    "limits.max_pending_messages",
    "limits.slow_consumer_block_ms",
    "limits.max_connections_per_address",
    "limits.max_pending_handshakes",
    "limits.max_publish_messages_per_sec",
    "limits.max_publish_bytes_per_sec",
];

/// The limits the data path checks, as atomics a reload can move.
#[derive(Debug)]
pub(crate) struct LiveLimits {
    pub(crate) max_connections: AtomicUsize,
    pub(crate) max_payload_bytes: AtomicUsize,
    /// Shared with every connection's outbox.
    pub(crate) max_pending_bytes: Arc<AtomicUsize>,
    pub(crate) max_subscriptions_per_connection: AtomicUsize,
    pub(crate) max_pending_messages: AtomicUsize,
    pub(crate) slow_consumer_block_ms: AtomicUsize,
    pub(crate) max_connections_per_address: AtomicUsize,
    pub(crate) max_pending_handshakes: AtomicUsize,
    pub(crate) max_publish_messages_per_sec: AtomicUsize,
    pub(crate) max_publish_bytes_per_sec: AtomicUsize,
}

impl LiveLimits {
    fn new(config: &MemoryStreamerConfig) -> Self {
        let limits = LiveLimits {
            max_connections: AtomicUsize::new(0),
            max_payload_bytes: AtomicUsize::new(0),
            max_pending_bytes: Arc::new(AtomicUsize::new(0)),
            max_subscriptions_per_connection: AtomicUsize::new(0),
            max_pending_messages: AtomicUsize::new(0),
            slow_consumer_block_ms: AtomicUsize::new(0),
            max_connections_per_address: AtomicUsize::new(0),
            max_pending_handshakes: AtomicUsize::new(0),
            max_publish_messages_per_sec: AtomicUsize::new(0),
            max_publish_bytes_per_sec: AtomicUsize::new(0),
        };
        limits.set(config);
        limits
    }

    fn set(&self, config: &MemoryStreamerConfig) {
        let l = &config.limits;
        let store = |a: &AtomicUsize, v: usize| a.store(v, Ordering::Relaxed);
        store(&self.max_connections, config.network.max_connections);
        store(&self.max_payload_bytes, l.max_payload_bytes);
        store(&self.max_pending_bytes, l.max_pending_bytes);
        store(
            &self.max_subscriptions_per_connection,
            l.max_subscriptions_per_connection,
        );
        store(&self.max_pending_messages, l.max_pending_messages);
        let wide = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
        store(&self.slow_consumer_block_ms, wide(l.slow_consumer_block_ms));
        store(
            &self.max_connections_per_address,
            l.max_connections_per_address,
        );
        store(&self.max_pending_handshakes, l.max_pending_handshakes);
        store(
            &self.max_publish_messages_per_sec,
            wide(l.max_publish_messages_per_sec),
        );
        store(
            &self.max_publish_bytes_per_sec,
            wide(l.max_publish_bytes_per_sec),
        );
    }

    pub(crate) fn get(a: &AtomicUsize) -> usize {
        a.load(Ordering::Relaxed)
    }
}

/// Applies a new configuration to one part of the broker.
type ApplyFn = dyn Fn(&MemoryStreamerConfig) -> Result<(), String> + Send + Sync;

struct Applier {
    name: String,
    keys: Vec<String>,
    apply: Box<ApplyFn>,
}

impl Applier {
    fn owns(&self, key: &str) -> bool {
        self.keys.iter().any(|k| owns(k, key))
    }
}

/// Whether `prefix` (`limits`, or a whole key) covers `key`.
fn owns(prefix: &str, key: &str) -> bool {
    key == prefix
        || key
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('.'))
}

/// The running configuration and the appliers.
pub(crate) struct LiveConfig {
    running: ArcSwap<MemoryStreamerConfig>,
    pub(crate) limits: Arc<LiveLimits>,
    appliers: Mutex<Vec<Applier>>,
}

impl LiveConfig {
    pub(crate) fn new(config: MemoryStreamerConfig) -> Self {
        let limits = Arc::new(LiveLimits::new(&config));
        let live = LiveConfig {
            running: ArcSwap::from_pointee(config),
            limits: limits.clone(),
            appliers: Mutex::new(Vec::new()),
        };
        live.register("limits", LIMITS, move |config| {
            limits.set(config);
            Ok(())
        });
        live.register("connections", READ_WHEN_USED, |_| Ok(()));
        live
    }

    pub(crate) fn running(&self) -> Arc<MemoryStreamerConfig> {
        self.running.load_full()
    }

    fn register(
        &self,
        name: &str,
        keys: &[&str],
        apply: impl Fn(&MemoryStreamerConfig) -> Result<(), String> + Send + Sync + 'static,
    ) {
        self.appliers.lock().push(Applier {
            name: name.to_string(),
            keys: keys.iter().map(|k| k.to_string()).collect(),
            apply: Box::new(apply),
        });
    }

    fn reconfigure(&self, new: &MemoryStreamerConfig) -> Reconfigured {
        let appliers = self.appliers.lock();
        let old = self.running.load_full();
        let changed = changed_keys(&old, new);
        let (mut live, needs_restart): (Vec<String>, Vec<String>) = changed
            .into_iter()
            .partition(|key| appliers.iter().any(|a| a.owns(key)));
        let mut running = with_values_from(&old, new, &live);
        let mut failed = Vec::new();
        for applier in appliers.iter() {
            let mine: Vec<String> = live.iter().filter(|k| applier.owns(k)).cloned().collect();
            if mine.is_empty() {
                continue;
            }
            if let Err(reason) = (applier.apply)(&running) {
                // This part keeps its old values; the others go ahead.
                running = with_values_from(&running, &old, &mine);
                live.retain(|k| !mine.contains(k));
                failed.push(Failure {
                    applier: applier.name.clone(),
                    keys: mine,
                    reason,
                });
            }
        }
        self.running.store(Arc::new(running));
        Reconfigured {
            applied: live,
            needs_restart,
            failed,
        }
    }
}

/// What a reconfiguration did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reconfigured {
    /// Keys now in force.
    pub applied: Vec<String>,
    /// Changed keys that keep their running value until the broker restarts.
    pub needs_restart: Vec<String>,
    /// Parts that refused their new values (and kept the old ones).
    pub failed: Vec<Failure>,
}

/// One part of the broker refused its new values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The applier's name.
    pub applier: String,
    /// The keys it kept at their old values.
    pub keys: Vec<String>,
    /// Why.
    pub reason: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}): {}",
            self.applier,
            self.keys.join(", "),
            self.reason
        )
    }
}

impl MessageBroker {
    /// Registers `apply` as the live applier of `keys` (whole sections such
    /// as `telemetry.logging` or single keys): on each
    /// [`reconfigure`](Self::reconfigure) that changes one of them, it is
    /// called with the new running configuration. An error keeps the old
    /// values of its keys. Keys no applier owns need a restart.
    pub fn on_reconfigure(
        &self,
        name: &str,
        keys: &[&str],
        apply: impl Fn(&MemoryStreamerConfig) -> Result<(), String> + Send + Sync + 'static,
    ) {
        self.inner.live.register(name, keys, apply);
    }

    /// Applies `new` to the running broker: changed keys with a live
    /// applier take effect now, the others are reported as needing a
    /// restart and keep their running value. Logs what it did.
    pub fn reconfigure(&self, new: &MemoryStreamerConfig) -> Reconfigured {
        let done = self.inner.live.reconfigure(new);
        if !done.applied.is_empty() {
            tracing::info!(keys = %done.applied.join(", "), "configuration applied");
        }
        if !done.needs_restart.is_empty() {
            tracing::warn!(
                keys = %done.needs_restart.join(", "),
                "configuration changed but needs a restart to take effect; the running values stay"
            );
        }
        for failure in &done.failed {
            tracing::warn!(%failure, "configuration change refused; the old values stay");
        }
        done
    }
}

impl MessageBroker {
    /// Watches `path` (the file this broker's configuration came from) and
    /// applies every change with [`reconfigure`](Self::reconfigure); the
    /// reloads by result show in the metrics. Must be called within a
    /// tokio runtime. Keep the returned manager: dropping it stops the
    /// watching. `settings` should carry the same environment and
    /// command-line overrides the first load had.
    pub async fn watch_config(
        &self,
        path: impl AsRef<std::path::Path>,
        settings: HotReloadSettings,
    ) -> Result<Arc<HotReloadManager>, ConfigError> {
        let initial = self.config().as_ref().clone();
        let manager = Arc::new(HotReloadManager::new(path, initial, Some(settings)).await?);
        let _ = self.inner.reloader.set(Arc::downgrade(&manager));
        let mut changes = manager.subscribe();
        let broker = Arc::downgrade(&self.inner);
        let latest = Arc::downgrade(&manager);
        tokio::spawn(async move {
            use tokio::sync::broadcast::error::RecvError;
            loop {
                let config = match changes.recv().await {
                    Ok(change) => change.new_config,
                    // Fell behind: the latest configuration is what counts.
                    Err(RecvError::Lagged(_)) => match latest.upgrade() {
                        Some(manager) => manager.current_config().await,
                        None => return,
                    },
                    Err(RecvError::Closed) => return,
                };
                let Some(inner) = broker.upgrade() else {
                    return;
                };
                MessageBroker { inner }.reconfigure(&config);
            }
        });
        Ok(manager)
    }

    /// Reloads by result, when [`watch_config`](Self::watch_config) runs.
    pub fn reload_stats(&self) -> Option<ReloadStats> {
        let manager = self.inner.reloader.get()?.upgrade()?;
        Some(manager.stats())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_keys_apply_and_the_rest_wait_for_a_restart() {
        let broker = MessageBroker::new();
        let mut new = broker.config().as_ref().clone();
        new.limits.max_payload_bytes = 100;
        new.network.max_connections = 3;
        new.network.port = 1;
        new.runtime.worker_threads = Some(7);
        let done = broker.reconfigure(&new);
        assert_eq!(
            done.applied,
            ["limits.max_payload_bytes", "network.max_connections"]
        );
        assert_eq!(
            done.needs_restart,
            ["network.port", "runtime.worker_threads"]
        );
        let running = broker.config();
        assert_eq!(running.limits.max_payload_bytes, 100);
        assert_eq!(running.network.port, 8080);
        assert_eq!(running.runtime.worker_threads, None);
        let limits = &broker.inner.live.limits;
        assert_eq!(LiveLimits::get(&limits.max_payload_bytes), 100);
        assert_eq!(LiveLimits::get(&limits.max_connections), 3);
        // Still pending, still reported.
        let again = broker.reconfigure(&new);
        assert!(again.applied.is_empty());
        assert_eq!(
            again.needs_restart,
            ["network.port", "runtime.worker_threads"]
        );
    }

    #[test]
    fn a_failing_applier_keeps_its_old_values() {
        let broker = MessageBroker::new();
        broker.on_reconfigure("logging", &["telemetry.logging"], |config| {
            match config.telemetry.logging.level.as_str() {
                "nonsense" => Err("not a filter".into()),
                _ => Ok(()),
            }
        });
        let mut new = broker.config().as_ref().clone();
        new.telemetry.logging.level = "nonsense".into();
        new.limits.max_pending_messages = 5;
        let done = broker.reconfigure(&new);
        assert_eq!(done.applied, ["limits.max_pending_messages"]);
        assert_eq!(done.failed.len(), 1);
        assert_eq!(done.failed[0].keys, ["telemetry.logging.level"]);
        assert_eq!(broker.config().telemetry.logging.level, "info");
        assert_eq!(broker.config().limits.max_pending_messages, 5);
    }
}
