//! The configuration schema and its loader.
//!
//! [`MemoryStreamerConfig`] is the whole schema; `kaelix.toml` at the
//! repository root lists every key with its default. [`load`] layers, lowest
//! to highest: built-in defaults, the file, `KAELIX_*` environment variables,
//! command-line flags.
//!
//! - [`schema`](mod@schema): the sections and their defaults.
//! - [`load`](mod@load): figment layering and the environment variable mapping.
//! - [`reload`](mod@reload): [`HotReloadManager`], watching the file and
//!   reporting each applied [`ConfigChange`].
//! - [`validate`](mod@validate): [`ConfigValidator`], value checks and
//!   warnings about settings that do not suit the machine.

pub mod load;
pub mod reload;
pub mod schema;
pub mod validate;

pub use load::{
    config_file, load, load_annotated, load_from, ConfigError, Loaded, Override, ENV_PREFIX,
};
pub use reload::{
    changed_keys, with_values_from, ConfigChange, FileWatch, HotReloadManager, HotReloadSettings,
    ReloadStats,
};
pub use schema::{
    AuthConfig, ClusterConfig, ClusterTlsConfig, DeadLetterConfig, DedupeConfig, LimitsConfig,
    LogFormat, LoggingConfig, MemoryStreamerConfig, MetricsConfig, NetworkConfig, Permissions,
    PluginConfig, PrometheusConfig, RetentionConfig, RuntimeSection, SecurityConfig,
    TelemetryConfig, TlsConfig, TopicConfig, UserConfig, WhenOff,
};
pub use validate::{ConfigValidator, ConfigWarning, Problem};

/// The shipped, commented default configuration file.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../../../kaelix.toml");
