//! What a plugin may have and how much it may take.

use std::time::Duration;

use super::breaker::BreakerPolicy;

/// Limits on a plugin's resources.
///
/// `max_cpu_percent` is enforced: the guard adds up the time spent in the
/// plugin's calls, and a plugin that spends more than this share of one
/// CPU over a second is switched off by its circuit breaker. The other two
/// are recorded and reported, not enforced: a plugin runs inside the
/// broker's process, where its allocations and file descriptors cannot be
/// told apart from the broker's. Zero means no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResourceLimits {
    /// Not enforced (see above).
    pub max_memory_mb: u64,
    /// Share of one CPU the plugin's calls may take, measured each second.
    pub max_cpu_percent: u32,
    /// Not enforced (see above).
    pub max_file_descriptors: u32,
}

/// What a plugin's [`PluginContext`](super::PluginContext) hands out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PermissionSet {
    /// `get_config` and `config` answer; without it they return nothing.
    pub can_read_config: bool,
    /// `metrics()` gives a handle; without it, none (and a handle taken
    /// earlier records nothing).
    pub can_write_metrics: bool,
    /// Advisory: a plugin can read it from its context, but code inside
    /// the broker's process can open sockets whatever it says.
    pub can_access_network: bool,
}

impl Default for PermissionSet {
    fn default() -> Self {
        PermissionSet {
            can_read_config: true,
            can_write_metrics: true,
            can_access_network: false,
        }
    }
}

/// A plugin's limits and permissions, and the guard's settings for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecurityIsolation {
    pub limits: ResourceLimits,
    pub permissions: PermissionSet,
    /// A call that takes longer counts as a failure of the plugin (its
    /// message still goes on, as the plugin said). Zero: no budget.
    pub time_budget: Duration,
    /// When the plugin is switched off, and for how long.
    pub breaker: BreakerPolicy,
}

impl Default for SecurityIsolation {
    fn default() -> Self {
        SecurityIsolation {
            limits: ResourceLimits::default(),
            permissions: PermissionSet::default(),
            time_budget: Duration::from_millis(1),
            breaker: BreakerPolicy::default(),
        }
    }
}

impl SecurityIsolation {
    /// The defaults: config and metrics allowed, no network, no resource
    /// limits, a 1 ms time budget per call, switched off after 5 failures
    /// in a row for 10 s.
    pub fn new() -> SecurityIsolation {
        SecurityIsolation::default()
    }

    pub fn with_resource_limits(mut self, limits: ResourceLimits) -> Self {
        self.limits = limits;
        self
    }

    pub fn with_permissions(mut self, permissions: PermissionSet) -> Self {
        self.permissions = permissions;
        self
    }

    pub fn with_time_budget(mut self, budget: Duration) -> Self {
        self.time_budget = budget;
        self
    }

    pub fn with_breaker(mut self, breaker: BreakerPolicy) -> Self {
        self.breaker = breaker;
        self
    }
}
