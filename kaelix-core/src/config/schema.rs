//! The configuration sections. Every struct refuses unknown keys, so a typo
//! is an error that names the key instead of a setting silently ignored.

use serde::{Deserialize, Serialize};

/// The whole configuration of a broker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryStreamerConfig {
    pub network: NetworkConfig,
    pub runtime: RuntimeSection,
    pub limits: LimitsConfig,
    pub telemetry: TelemetryConfig,
}

/// `[network]`: where and how the broker listens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// Address to listen on.
    pub host: String,
    /// TCP port; 0 picks a free one (the broker prints which).
    pub port: u16,
    /// Connections served at once; more are refused with an error frame.
    pub max_connections: usize,
    /// How long a new connection has to send its HELLO.
    pub handshake_timeout_ms: u64,
    /// On shutdown, how long connections get to flush what is queued.
    pub shutdown_grace_ms: u64,
    /// Bytes read from a socket per call.
    pub read_buffer_bytes: usize,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            host: "0.0.0.0".into(),
            port: 8080,
            max_connections: 10_000,
            handshake_timeout_ms: 5_000,
            shutdown_grace_ms: 3_000,
            read_buffer_bytes: 64 * 1024,
        }
    }
}

/// `[runtime]`: the workers the broker runs on; see [`RuntimeConfig`].
pub type RuntimeSection = crate::runtime::RuntimeConfig;

/// `[limits]`: what one client may take from the broker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest frame accepted, header included; larger ones close the connection.
    pub max_frame_bytes: usize,
    /// Bytes queued for one connection before it counts as a slow consumer
    /// and is disconnected.
    pub max_pending_bytes: usize,
    /// Subscriptions one connection may hold.
    pub max_subscriptions_per_connection: usize,
    /// Messages an in-process receiver may hold before it counts as slow.
    pub max_pending_messages: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_frame_bytes: crate::protocol::DEFAULT_MAX_FRAME_BYTES,
            max_pending_bytes: 64 * 1024 * 1024,
            max_subscriptions_per_connection: 10_000,
            max_pending_messages: 1_000_000,
        }
    }
}

/// `[telemetry]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    pub logging: LoggingConfig,
}

/// `[telemetry.logging]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    /// `error`, `warn`, `info`, `debug` or `trace`, or a full filter such as
    /// `info,kaelix_broker=debug`. `RUST_LOG`, when set, wins.
    pub level: String,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig {
            level: "info".into(),
        }
    }
}
