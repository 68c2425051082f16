//! Value checks beyond what the types enforce, and warnings about settings
//! that work but do not suit this machine.

use std::fmt;

use super::load::ConfigError;
use super::schema::MemoryStreamerConfig;
use crate::runtime::topology::{allowed_cpus, Topology};

/// One problem: the key and what is wrong with its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key path, such as `network.port`.
    pub key: String,
    /// What is wrong, such as `must be at least 1`.
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
    }
}

/// A setting that is valid but likely not what the operator wants here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigWarning {
    /// Dotted key path.
    pub key: String,
    /// Why it is worth a look.
    pub message: String,
}

impl fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Checks a [`MemoryStreamerConfig`].
#[derive(Debug, Clone, Default)]
pub struct ConfigValidator {
    _private: (),
}

impl ConfigValidator {
    /// A validator for this machine.
    pub fn new() -> ConfigValidator {
        ConfigValidator::default()
    }

    /// Every problem with `config`'s values, each as `key: reason`, in an
    /// error that starts `Configuration validation failed`.
    pub fn validate(config: &MemoryStreamerConfig) -> Result<(), ConfigError> {
        let problems = Self::problems(config);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(
                problems.iter().map(Problem::to_string).collect(),
            ))
        }
    }

    /// Every problem with `config`'s values.
    pub fn problems(config: &MemoryStreamerConfig) -> Vec<Problem> {
        let mut out = Vec::new();
        let mut bad = |key: &str, reason: String| {
            out.push(Problem {
                key: key.to_string(),
                reason,
            })
        };
        let n = &config.network;
        if n.host.trim().is_empty() || n.host.contains(char::is_whitespace) {
            bad(
                "network.host",
                format!("{:?} is not an address or host name", n.host),
            );
        }
        if n.max_connections == 0 {
            bad("network.max_connections", "must be at least 1".into());
        }
        if n.handshake_timeout_ms == 0 {
            bad("network.handshake_timeout_ms", "must be at least 1".into());
        }
        if !(512..=64 << 20).contains(&n.read_buffer_bytes) {
            bad(
                "network.read_buffer_bytes",
                format!(
                    "must be between 512 and {}, not {}",
                    64 << 20,
                    n.read_buffer_bytes
                ),
            );
        }
        cluster_problems(&config.cluster, &mut bad);
        let l = &config.limits;
        if l.max_frame_bytes < 64 || l.max_frame_bytes > u32::MAX as usize {
            bad(
                "limits.max_frame_bytes",
                format!(
                    "must be between 64 and {}, not {}",
                    u32::MAX,
                    l.max_frame_bytes
                ),
            );
        }
        if l.max_payload_bytes == 0 {
            bad("limits.max_payload_bytes", "must be at least 1".into());
        }
        if l.max_pending_bytes == 0 {
            bad("limits.max_pending_bytes", "must be at least 1".into());
        }
        if l.max_subscriptions_per_connection == 0 {
            bad(
                "limits.max_subscriptions_per_connection",
                "must be at least 1".into(),
            );
        }
        if l.max_pending_handshakes == 0 {
            bad("limits.max_pending_handshakes", "must be at least 1".into());
        }
        if l.idle_timeout_ms != 0 && l.idle_timeout_ms < 1_000 {
            bad(
                "limits.idle_timeout_ms",
                format!(
                    "{} ms is shorter than a client on a busy network can answer a ping; \
                     use 1000 or more (or 0 for never)",
                    l.idle_timeout_ms
                ),
            );
        }
        if l.max_pending_messages == 0 {
            bad("limits.max_pending_messages", "must be at least 1".into());
        }
        if config.telemetry.logging.level.trim().is_empty() {
            bad(
                "telemetry.logging.level",
                "must name a level (error, warn, info, debug, trace) or a filter".into(),
            );
        }
        if config.retention.max_bytes == 0 {
            bad("retention.max_bytes", "must be at least 1".into());
        }
        let d = &config.dedupe;
        if d.enabled {
            for (key, value) in [
                ("dedupe.window_ms", d.window_ms as usize),
                ("dedupe.max_entries", d.max_entries),
                ("dedupe.max_publishers", d.max_publishers),
            ] {
                if value == 0 {
                    bad(
                        key,
                        "must be at least 1 (or set dedupe.enabled = false)".into(),
                    );
                }
            }
        }
        for (i, topic) in config.topics.iter().enumerate() {
            if let Err(err) = crate::TopicPattern::new(&topic.pattern) {
                bad(&format!("topics[{i}].pattern"), err.to_string());
            }
            let max = crate::PartitionId::MAX_PARTITIONS;
            if !(1..=max).contains(&topic.partitions) {
                bad(
                    &format!("topics[{i}].partitions"),
                    format!("must be between 1 and {max}, not {}", topic.partitions),
                );
            }
        }
        let mut ids = std::collections::HashSet::new();
        for (i, plugin) in config.plugins.iter().enumerate() {
            if plugin.name.trim().is_empty() {
                bad(
                    &format!("plugins[{i}].name"),
                    "must name a plugin (header_stamp, json_validate, rate_limit, size_cap, topic_route, or a registered one)".into(),
                );
            }
            if let Err(err) = crate::TopicPattern::new(&plugin.pattern) {
                bad(&format!("plugins[{i}].pattern"), err.to_string());
            }
            if !ids.insert(plugin.id()) {
                bad(
                    &format!("plugins[{i}].id"),
                    format!(
                        "{:?} is already the id of another entry; give each entry of the same plugin its own id",
                        plugin.id()
                    ),
                );
            }
            if plugin.failure_threshold == 0 {
                bad(
                    &format!("plugins[{i}].failure_threshold"),
                    "must be at least 1".into(),
                );
            }
            if plugin.max_cpu_percent > 100 * 1024 {
                bad(
                    &format!("plugins[{i}].max_cpu_percent"),
                    format!(
                        "{} is more CPU than any machine has",
                        plugin.max_cpu_percent
                    ),
                );
            }
        }
        if let Err(err) = crate::Topic::new(&config.dead_letter.topic) {
            bad("dead_letter.topic", err.to_string());
        }
        let buckets = &config.telemetry.metrics.delivery_latency_buckets_us;
        if buckets.is_empty() || buckets.windows(2).any(|w| w[0] >= w[1]) || buckets[0] == 0 {
            bad(
                "telemetry.metrics.delivery_latency_buckets_us",
                format!("must be a non-empty list of increasing positive numbers, not {buckets:?}"),
            );
        }
        let prometheus = &config.telemetry.metrics.prometheus;
        if prometheus.host.trim().is_empty() || prometheus.host.contains(char::is_whitespace) {
            bad(
                "telemetry.metrics.prometheus.host",
                format!("{:?} is not an address or host name", prometheus.host),
            );
        }
        let tls = &config.security.tls;
        if tls.enabled {
            for (key, path) in [
                ("security.tls.cert_path", &tls.cert_path),
                ("security.tls.key_path", &tls.key_path),
            ] {
                if path.as_os_str().is_empty() {
                    bad(key, "required when security.tls.enabled is true".into());
                }
            }
        }
        auth_problems(config, &mut bad);
        for problem in config.runtime.problems() {
            if let Some((key, reason)) = problem.split_once(": ") {
                bad(key, reason.to_string());
            }
        }
        out
    }

    /// Settings that are valid but do not suit this machine. Fails only if
    /// the values themselves are invalid.
    pub fn validate_environment_compatibility(
        &self,
        config: &MemoryStreamerConfig,
    ) -> Result<Vec<ConfigWarning>, ConfigError> {
        Self::validate(config)?;
        let allowed = allowed_cpus();
        let topology = Topology::detect_sysfs(&allowed);
        Ok(Self::warnings_for(config, &topology))
    }

    /// The warnings for `config` on a machine shaped like `topology`.
    pub fn warnings_for(config: &MemoryStreamerConfig, topology: &Topology) -> Vec<ConfigWarning> {
        let mut out = Vec::new();
        let mut warn = |key: &str, message: String| {
            out.push(ConfigWarning {
                key: key.to_string(),
                message,
            })
        };
        let rt = &config.runtime;
        let pus = topology.pu_count();
        let cores = topology.core_count();
        if let Some(workers) = rt.worker_threads {
            if workers > pus {
                warn(
                    "runtime.worker_threads",
                    format!("{workers} workers on {pus} CPUs: workers will share CPUs"),
                );
            } else if workers > cores {
                warn(
                    "runtime.worker_threads",
                    format!(
                        "{workers} workers on {cores} physical cores: some share a core with an SMT sibling"
                    ),
                );
            }
        }
        if rt.numa_aware && topology.nodes.len() <= 1 {
            warn(
                "runtime.numa_aware",
                "this machine has a single NUMA node: the setting changes nothing".into(),
            );
        }
        let spin = rt.idle_spin();
        let workers = rt.worker_threads.unwrap_or(cores);
        if !spin.is_zero() && workers >= pus {
            warn(
                "runtime.idle_spin_us",
                format!(
                    "idle workers spin {} µs on every CPU this process has: that CPU time is \
                     taken from clients and other processes on the machine",
                    spin.as_micros()
                ),
            );
        }
        let tls = &config.security.tls;
        for (key, path) in [
            ("security.tls.cert_path", &tls.cert_path),
            ("security.tls.key_path", &tls.key_path),
            ("security.tls.client_ca_path", &tls.client_ca_path),
        ] {
            if path.as_os_str().is_empty() {
                continue;
            }
            if let Err(err) = std::fs::File::open(path) {
                warn(key, format!("cannot read {}: {err}", path.display()));
            }
        }
        let auth = &config.security.auth;
        if !auth.users.is_empty() && !config.security.tls.enabled {
            warn(
                "security.auth.users",
                "TLS is off (security.tls.enabled = false): passwords and tokens cross the \
                 network in the clear"
                    .into(),
            );
        }
        for (i, user) in auth.users.iter().enumerate() {
            if !user.token.is_empty() && user.token.len() < 16 {
                warn(
                    &format!("security.auth.users[{i}].token"),
                    format!(
                        "{} characters is short enough to guess; use 16 or more random ones",
                        user.token.len()
                    ),
                );
            }
        }
        let prometheus = &config.telemetry.metrics.prometheus;
        if config.telemetry.enabled
            && config.telemetry.metrics.enabled
            && prometheus.enabled
            && prometheus.port != 0
            && prometheus.port == config.network.port
        {
            warn(
                "telemetry.metrics.prometheus.port",
                format!(
                    "the same as network.port ({}): the broker and the metrics endpoint cannot \
                     both listen on it",
                    prometheus.port
                ),
            );
        }
        if config.limits.max_payload_bytes >= config.limits.max_frame_bytes {
            warn(
                "limits.max_payload_bytes",
                format!(
                    "not below limits.max_frame_bytes ({}): the frame limit, which closes the \
                     connection, caps messages first",
                    config.limits.max_frame_bytes
                ),
            );
        }
        if config.limits.max_pending_bytes < config.limits.max_frame_bytes {
            warn(
                "limits.max_pending_bytes",
                "smaller than limits.max_frame_bytes: one large message fills a subscriber's \
                 buffer"
                    .into(),
            );
        }
        out
    }
}

/// The problems of `[security.auth]`: names, credentials, patterns.
fn auth_problems(config: &MemoryStreamerConfig, bad: &mut impl FnMut(&str, String)) {
    let auth = &config.security.auth;
    let tls = &config.security.tls;
    if auth.certificate_identity && (!tls.enabled || tls.client_ca_path.as_os_str().is_empty()) {
        bad(
            "security.auth.certificate_identity",
            "needs mutual TLS: security.tls.enabled = true and security.tls.client_ca_path set"
                .into(),
        );
    }
    let mut patterns = |key: &str, permissions: &crate::config::Permissions| {
        for (list, items) in [("allow", &permissions.allow), ("deny", &permissions.deny)] {
            for (j, pattern) in items.iter().enumerate() {
                if let Err(err) = crate::TopicPattern::new(pattern) {
                    bad(&format!("{key}.{list}[{j}]"), err.to_string());
                }
            }
        }
    };
    patterns("security.auth.anonymous_publish", &auth.anonymous_publish);
    patterns(
        "security.auth.anonymous_subscribe",
        &auth.anonymous_subscribe,
    );
    for (i, user) in auth.users.iter().enumerate() {
        let key = format!("security.auth.users[{i}]");
        patterns(&format!("{key}.publish"), &user.publish);
        patterns(&format!("{key}.subscribe"), &user.subscribe);
    }
    let mut names = std::collections::HashSet::new();
    let mut tokens = std::collections::HashSet::new();
    for (i, user) in auth.users.iter().enumerate() {
        let key = format!("security.auth.users[{i}]");
        if user.name.trim().is_empty() {
            bad(&format!("{key}.name"), "required".into());
        } else if user.name == "anonymous" {
            bad(
                &format!("{key}.name"),
                "\"anonymous\" is the identity of clients without credentials".into(),
            );
        } else if !names.insert(user.name.as_str()) {
            bad(
                &format!("{key}.name"),
                format!("{:?} is listed more than once", user.name),
            );
        }
        if !user.password_hash.is_empty() {
            if let Err(reason) = check_password_hash(&user.password_hash) {
                bad(&format!("{key}.password_hash"), reason);
            }
        }
        if !user.token.is_empty() && !tokens.insert(user.token.as_str()) {
            // The value is a secret: name the users, not the token.
            bad(
                &format!("{key}.token"),
                "another user has the same token".into(),
            );
        }
        if user.password_hash.is_empty() && user.token.is_empty() && !auth.certificate_identity {
            bad(
                &key,
                format!(
                    "user {:?} has no way to log in: set password_hash or token, or \
                     security.auth.certificate_identity",
                    user.name
                ),
            );
        }
    }
}

/// Whether `hash` is an argon2 hash in PHC form, as `kaelix passwd` prints.
pub fn check_password_hash(hash: &str) -> Result<(), String> {
    let parsed = argon2::PasswordHash::new(hash).map_err(|e| {
        format!("not a password hash in PHC form ($argon2id$v=19$m=...): {e}; make one with `kaelix passwd`")
    })?;
    match parsed.algorithm.as_str() {
        "argon2id" | "argon2i" | "argon2d" => Ok(()),
        other => Err(format!(
            "{other} hashes are not accepted; make an argon2 hash with `kaelix passwd`"
        )),
    }
}

/// Whether `addr` is `host:port` with a host and a port above 0.
fn is_host_port(addr: &str) -> bool {
    match addr.rsplit_once(':') {
        Some((host, port)) => {
            let host = host.trim_start_matches('[').trim_end_matches(']');
            !host.is_empty()
                && !host.contains(char::is_whitespace)
                && port.parse::<u16>().is_ok_and(|p| p > 0)
        }
        None => false,
    }
}

fn is_wildcard(addr: &str) -> bool {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    matches!(host, "0.0.0.0" | "[::]" | "::")
}

fn cluster_problems(c: &super::schema::ClusterConfig, bad: &mut impl FnMut(&str, String)) {
    if !c.enabled {
        return;
    }
    if c.node_id == 0 {
        bad(
            "cluster.node_id",
            "must be at least 1, and unique in the cluster".into(),
        );
    }
    if !is_host_port(&c.listen) {
        bad("cluster.listen", format!("{:?} is not host:port", c.listen));
    }
    if c.advertise.is_empty() {
        if is_wildcard(&c.listen) {
            bad(
                "cluster.advertise",
                format!(
                    "must be set when cluster.listen is {:?}: other nodes cannot reach a \
                     wildcard address",
                    c.listen
                ),
            );
        }
    } else if !is_host_port(&c.advertise) || is_wildcard(&c.advertise) {
        bad(
            "cluster.advertise",
            format!("{:?} is not a host:port other nodes can reach", c.advertise),
        );
    }
    for (i, seed) in c.seeds.iter().enumerate() {
        if !is_host_port(seed) {
            bad(
                &format!("cluster.seeds[{i}]"),
                format!("{seed:?} is not host:port"),
            );
        }
    }
    if c.data_dir.as_os_str().is_empty() {
        bad("cluster.data_dir", "must name a directory".into());
    }
    if c.heartbeat_ms < 10 {
        bad(
            "cluster.heartbeat_ms",
            format!("must be at least 10, not {}", c.heartbeat_ms),
        );
    }
    if c.failure_timeout_ms < 3 * c.heartbeat_ms {
        bad(
            "cluster.failure_timeout_ms",
            format!(
                "must be at least three heartbeats ({} ms), not {}: a node would count a \
                 live leader failed",
                3 * c.heartbeat_ms,
                c.failure_timeout_ms
            ),
        );
    }
    let t = &c.tls;
    if t.enabled {
        for (key, path) in [
            ("cluster.tls.cert_path", &t.cert_path),
            ("cluster.tls.key_path", &t.key_path),
            ("cluster.tls.ca_path", &t.ca_path),
        ] {
            if path.as_os_str().is_empty() {
                bad(
                    key,
                    "must be set when cluster.tls.enabled is true (links are mutually \
                     authenticated)"
                        .into(),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::TopologySource;

    #[test]
    fn the_defaults_are_valid() {
        assert!(ConfigValidator::validate(&MemoryStreamerConfig::default()).is_ok());
    }

    #[test]
    fn every_problem_is_listed_with_its_key() {
        let mut config = MemoryStreamerConfig::default();
        config.network.host = " ".into();
        config.network.max_connections = 0;
        config.network.read_buffer_bytes = 1;
        config.limits.max_frame_bytes = 10;
        config.limits.max_pending_messages = 0;
        config.runtime.priority_levels = 7;
        config.telemetry.logging.level = String::new();
        let err = ConfigValidator::validate(&config).unwrap_err().to_string();
        assert!(err.starts_with("Configuration validation failed"), "{err}");
        for key in [
            "network.host: ",
            "network.max_connections: must be at least 1",
            "network.read_buffer_bytes: must be between 512",
            "limits.max_frame_bytes: must be between 64",
            "limits.max_pending_messages: must be at least 1",
            "runtime.priority_levels: must be 1 to 4, not 7",
            "telemetry.logging.level: ",
        ] {
            assert!(err.contains(key), "{key} missing from {err}");
        }
    }

    #[test]
    fn a_cluster_node_needs_an_id_a_reachable_address_and_sane_timeouts() {
        let mut config = MemoryStreamerConfig::default();
        // Off, the cluster keys are not looked at.
        config.cluster.seeds = vec!["nowhere".into()];
        assert!(ConfigValidator::validate(&config).is_ok());

        config.cluster.enabled = true;
        config.cluster.heartbeat_ms = 500;
        config.cluster.failure_timeout_ms = 1000;
        config.cluster.tls.enabled = true;
        config.cluster.tls.cert_path = "node.pem".into();
        let keys: Vec<String> = ConfigValidator::problems(&config)
            .into_iter()
            .map(|p| p.key)
            .collect();
        assert_eq!(
            keys,
            [
                "cluster.node_id",
                "cluster.advertise",
                "cluster.seeds[0]",
                "cluster.failure_timeout_ms",
                "cluster.tls.key_path",
                "cluster.tls.ca_path",
            ]
        );

        config.cluster.node_id = 1;
        config.cluster.advertise = "10.0.0.1:7222".into();
        config.cluster.seeds = vec!["10.0.0.2:7222".into(), "[fd00::3]:7222".into()];
        config.cluster.failure_timeout_ms = 1500;
        config.cluster.tls.enabled = false;
        assert!(ConfigValidator::validate(&config).is_ok());
        config.cluster.advertise = "0.0.0.0:7222".into();
        let err = ConfigValidator::validate(&config).unwrap_err().to_string();
        assert!(err.contains("cluster.advertise"), "{err}");
    }

    #[test]
    fn warnings_fit_the_machine() {
        let one_node = Topology::from_rows(
            TopologySource::Sysfs,
            &[(0, 0, 0, 0), (0, 0, 0, 1)], // one core, two SMT siblings
        );
        let mut config = MemoryStreamerConfig::default();
        config.runtime.worker_threads = Some(2);
        let warnings = ConfigValidator::warnings_for(&config, &one_node);
        let keys: Vec<&str> = warnings.iter().map(|w| w.key.as_str()).collect();
        assert_eq!(keys, ["runtime.worker_threads", "runtime.numa_aware"]);
        assert!(warnings[0].message.contains("SMT"), "{}", warnings[0]);

        config.runtime.worker_threads = Some(3);
        config.runtime.numa_aware = false;
        config.runtime.idle_spin_us = Some(50);
        let warnings = ConfigValidator::warnings_for(&config, &one_node);
        let keys: Vec<&str> = warnings.iter().map(|w| w.key.as_str()).collect();
        assert_eq!(keys, ["runtime.worker_threads", "runtime.idle_spin_us"]);
    }
}
