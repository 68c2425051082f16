//! What a plugin is given when it starts: its configuration and a handle
//! for its own metrics, as far as its permissions go.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::security::PermissionSet;

/// Permissions and custom metrics, shared by a plugin's guard, its context
/// and the metric handles it took.
#[derive(Debug)]
pub(crate) struct Shared {
    read_config: AtomicBool,
    write_metrics: AtomicBool,
    network: AtomicBool,
    metrics: Mutex<BTreeMap<(String, MetricKind), Arc<AtomicU64>>>,
}

/// What a custom metric is, as exported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MetricKind {
    Counter,
    Gauge,
}

impl Shared {
    pub(crate) fn new(permissions: PermissionSet) -> Shared {
        let shared = Shared {
            read_config: AtomicBool::new(false),
            write_metrics: AtomicBool::new(false),
            network: AtomicBool::new(false),
            metrics: Mutex::new(BTreeMap::new()),
        };
        shared.set_permissions(permissions);
        shared
    }

    pub(crate) fn set_permissions(&self, p: PermissionSet) {
        self.read_config.store(p.can_read_config, Ordering::Relaxed);
        self.write_metrics
            .store(p.can_write_metrics, Ordering::Relaxed);
        self.network.store(p.can_access_network, Ordering::Relaxed);
    }

    pub(crate) fn permissions(&self) -> PermissionSet {
        PermissionSet {
            can_read_config: self.read_config.load(Ordering::Relaxed),
            can_write_metrics: self.write_metrics.load(Ordering::Relaxed),
            can_access_network: self.network.load(Ordering::Relaxed),
        }
    }

    /// Every custom metric: name, kind, value (a gauge's as f64 bits).
    pub(crate) fn custom_metrics(&self) -> Vec<(String, MetricKind, u64)> {
        self.metrics
            .lock()
            .iter()
            .map(|((name, kind), v)| (name.clone(), *kind, v.load(Ordering::Relaxed)))
            .collect()
    }
}

/// Given to [`Plugin::initialize`](super::Plugin::initialize): the plugin's
/// name, its configuration table (the `config` of its `[[plugins]]`
/// entry) and, if permitted, a metrics handle.
#[derive(Debug, Clone)]
pub struct PluginContext {
    name: String,
    config: toml::Table,
    shared: Arc<Shared>,
}

impl PluginContext {
    /// A context for `name` with `config`, under the default permissions:
    /// for running a plugin outside a registry (its tests, say).
    pub fn new(name: impl Into<String>, config: toml::Table) -> PluginContext {
        PluginContext::with_shared(
            name.into(),
            config,
            Arc::new(Shared::new(PermissionSet::default())),
        )
    }

    pub(crate) fn with_shared(
        name: String,
        config: toml::Table,
        shared: Arc<Shared>,
    ) -> PluginContext {
        PluginContext {
            name,
            config,
            shared,
        }
    }

    /// The name the plugin was registered or configured under.
    pub fn plugin_name(&self) -> &str {
        &self.name
    }

    /// A configuration value as text (a string as it is, a number or
    /// boolean written out); `key` may be dotted (`limits.max`). `None`
    /// when absent, when it is a table or array, or when the plugin may
    /// not read its configuration.
    pub fn get_config(&self, key: &str) -> Option<String> {
        match self.value(key)? {
            toml::Value::String(s) => Some(s.clone()),
            toml::Value::Integer(i) => Some(i.to_string()),
            toml::Value::Float(f) => Some(f.to_string()),
            toml::Value::Boolean(b) => Some(b.to_string()),
            toml::Value::Datetime(d) => Some(d.to_string()),
            toml::Value::Array(_) | toml::Value::Table(_) => None,
        }
    }

    /// A configuration value as it is in the TOML; `key` may be dotted.
    pub fn value(&self, key: &str) -> Option<&toml::Value> {
        let config = self.config()?;
        let mut parts = key.split('.');
        let mut value = config.get(parts.next()?)?;
        for part in parts {
            value = value.as_table()?.get(part)?;
        }
        Some(value)
    }

    /// The whole configuration table, if the plugin may read it.
    pub fn config(&self) -> Option<&toml::Table> {
        self.shared
            .read_config
            .load(Ordering::Relaxed)
            .then_some(&self.config)
    }

    /// A handle for the plugin's own metrics, if it may write them.
    pub fn metrics(&self) -> Option<PluginMetrics> {
        self.shared
            .write_metrics
            .load(Ordering::Relaxed)
            .then(|| PluginMetrics {
                shared: self.shared.clone(),
            })
    }

    /// What the plugin may do.
    pub fn permissions(&self) -> PermissionSet {
        self.shared.permissions()
    }
}

/// A plugin's own counters and gauges, exported on the broker's `/metrics`
/// as `kaelix_plugin_custom_<name>_total{plugin="…"}` (counters) and
/// `kaelix_plugin_custom_<name>{plugin="…"}` (gauges). Names keep ASCII letters,
/// digits and `_`; anything else becomes `_`.
#[derive(Debug, Clone)]
pub struct PluginMetrics {
    shared: Arc<Shared>,
}

impl PluginMetrics {
    /// The counter `name`, made on first use. Take it once (in
    /// `initialize`) and keep it: each increment is then one atomic add.
    pub fn counter(&self, name: &str) -> PluginCounter {
        PluginCounter {
            value: self.slot(name, MetricKind::Counter),
            shared: self.shared.clone(),
        }
    }

    /// The gauge `name`, made on first use.
    pub fn gauge(&self, name: &str) -> PluginGauge {
        PluginGauge {
            value: self.slot(name, MetricKind::Gauge),
            shared: self.shared.clone(),
        }
    }

    fn slot(&self, name: &str, kind: MetricKind) -> Arc<AtomicU64> {
        let name: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .collect();
        self.shared
            .metrics
            .lock()
            .entry((name, kind))
            .or_default()
            .clone()
    }
}

/// A plugin's counter; see [`PluginMetrics`].
#[derive(Debug, Clone)]
pub struct PluginCounter {
    value: Arc<AtomicU64>,
    shared: Arc<Shared>,
}

impl PluginCounter {
    /// Adds `n`, unless the plugin's permission to write metrics was taken
    /// away.
    pub fn increment(&self, n: u64) {
        if self.shared.write_metrics.load(Ordering::Relaxed) {
            self.value.fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// A plugin's gauge; see [`PluginMetrics`].
#[derive(Debug, Clone)]
pub struct PluginGauge {
    value: Arc<AtomicU64>,
    shared: Arc<Shared>,
}

impl PluginGauge {
    pub fn set(&self, value: f64) {
        if self.shared.write_metrics.load(Ordering::Relaxed) {
            self.value.store(value.to_bits(), Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> toml::Table {
        text.parse().unwrap()
    }

    #[test]
    fn config_values_as_text_and_dotted_keys() {
        let ctx = PluginContext::new(
            "p",
            table("level = \"debug\"\nmax = 3\n[nested]\nkey = true\n"),
        );
        assert_eq!(ctx.get_config("level").as_deref(), Some("debug"));
        assert_eq!(ctx.get_config("max").as_deref(), Some("3"));
        assert_eq!(ctx.get_config("nested.key").as_deref(), Some("true"));
        assert_eq!(ctx.get_config("nested"), None);
        assert_eq!(ctx.get_config("absent"), None);
    }

    #[test]
    fn permissions_decide_what_the_context_hands_out() {
        let shared = Arc::new(Shared::new(PermissionSet {
            can_read_config: false,
            can_write_metrics: false,
            can_access_network: false,
        }));
        let ctx = PluginContext::with_shared("p".into(), table("level = \"x\""), shared.clone());
        assert_eq!(ctx.get_config("level"), None);
        assert!(ctx.metrics().is_none());
        shared.set_permissions(PermissionSet::default());
        assert_eq!(ctx.get_config("level").as_deref(), Some("x"));
        let counter = ctx.metrics().unwrap().counter("seen-things");
        counter.increment(2);
        // Taken away again: the handle it kept records nothing.
        shared.set_permissions(PermissionSet {
            can_write_metrics: false,
            ..PermissionSet::default()
        });
        counter.increment(5);
        assert_eq!(
            shared.custom_metrics(),
            vec![("seen_things".to_string(), MetricKind::Counter, 2)]
        );
    }
}
