//! Layered loading with figment: defaults, then the file, then `KAELIX_*`.
//!
//! Environment variable names are mapped to key paths by longest section
//! prefix, so keys that contain `_` work: `KAELIX_NETWORK_MAX_CONNECTIONS`
//! sets `network.max_connections`, `KAELIX_TELEMETRY_LOGGING_LEVEL` sets
//! `telemetry.logging.level`. (figment's own `split("_")` would turn the
//! first into `network.max.connections`.)

use std::path::{Path, PathBuf};

use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};

use super::schema::MemoryStreamerConfig;
use super::validate::ConfigValidator;

/// The prefix of every environment variable the broker reads.
pub const ENV_PREFIX: &str = "KAELIX_";

const ENV_ORIGIN: &str = "environment variable";

/// `KAELIX_*` variables that belong to the clients, not to the broker's
/// configuration: `KAELIX_SERVER` is the address the `kaelix` command and
/// the examples connect to.
pub const CLIENT_VARS: &[&str] = &["KAELIX_SERVER"];
const FLAG_ORIGIN: &str = "command-line flag";

/// The configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {0} does not exist")]
    Missing(PathBuf),
    /// Values or keys are wrong; each problem names the key and where it
    /// came from (the file, or the environment variable).
    #[error("Configuration validation failed:\n  {}", .0.join("\n  "))]
    Invalid(Vec<String>),
    /// The file cannot be watched for changes.
    #[error("{0}")]
    Watch(String),
}

/// Loads the configuration: defaults, then `path` (or `./kaelix.toml` if it
/// exists when `path` is `None`), then `KAELIX_*` variables. Command-line
/// overrides come through [`load_annotated`].
pub fn load(path: Option<&Path>) -> Result<MemoryStreamerConfig, ConfigError> {
    let file = config_file(path)?;
    load_from(file.as_deref(), std::env::vars())
}

/// The file [`load`] reads: `path` (which must exist), else `./kaelix.toml`
/// when present, else none.
pub fn config_file(path: Option<&Path>) -> Result<Option<PathBuf>, ConfigError> {
    match path {
        Some(p) if !p.exists() => Err(ConfigError::Missing(p.to_owned())),
        Some(p) => Ok(Some(p.to_owned())),
        None => Ok(Some(PathBuf::from("kaelix.toml")).filter(|p| p.exists())),
    }
}

/// Loads from an optional file and the given environment, for callers and
/// tests that supply their own variables.
pub fn load_from(
    file: Option<&Path>,
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<MemoryStreamerConfig, ConfigError> {
    load_annotated(file, vars, &[]).map(|loaded| loaded.config)
}

/// A value set on the command line, the highest layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Override {
    /// Dotted key path: `network.port`.
    pub key: String,
    /// The value as typed (parsed like an environment variable's).
    pub value: String,
    /// The flag as the user wrote it, for messages: `--port`, `--set network.port`.
    pub flag: String,
}

impl Override {
    /// Parses `--set`'s `key.path=value`.
    pub fn parse_set(text: &str) -> Result<Override, String> {
        let (key, value) = text
            .split_once('=')
            .ok_or_else(|| format!("{text:?} is not KEY=VALUE (for example network.port=9000)"))?;
        let key = key.trim();
        if key.is_empty() || key.split('.').any(str::is_empty) {
            return Err(format!("{key:?} is not a key path such as network.port"));
        }
        Ok(Override {
            key: key.to_string(),
            value: value.to_string(),
            flag: format!("--set {key}"),
        })
    }
}

/// A loaded configuration with where each value came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The effective configuration.
    pub config: MemoryStreamerConfig,
    /// Every leaf key (`network.port`) with its origin: `default`,
    /// `file PATH` or `env KAELIX_…`.
    pub origins: Vec<(String, String)>,
}

/// As [`load_from`], keeping where each value came from (for
/// `kaelix-broker --check-config`).
pub fn load_annotated(
    file: Option<&Path>,
    vars: impl IntoIterator<Item = (String, String)>,
    flags: &[Override],
) -> Result<Loaded, ConfigError> {
    let defaults = MemoryStreamerConfig::default();
    let sections = section_names(&defaults);
    let mut figment = Figment::from(Serialized::defaults(&defaults));
    if let Some(file) = file {
        figment = figment.merge(Toml::file_exact(file));
    }
    figment = figment.merge(EnvVars::new(&sections, vars));
    let flags: Vec<(String, String, String)> = flags
        .iter()
        .map(|o| (o.key.clone(), o.flag.clone(), o.value.clone()))
        .collect();
    figment = figment.merge(EnvVars::flags(&flags));
    let config: MemoryStreamerConfig = figment
        .extract()
        .map_err(|e| ConfigError::Invalid(e.into_iter().map(describe).collect()))?;
    let problems = ConfigValidator::problems(&config);
    if !problems.is_empty() {
        return Err(ConfigError::Invalid(
            problems
                .iter()
                .map(|p| match origin(&figment, &p.key) {
                    Some(from) => format!("{p} (in {from})"),
                    None => p.to_string(),
                })
                .collect(),
        ));
    }
    let mut origins = Vec::new();
    if let Ok(Value::Dict(_, dict)) = Value::serialize(&config) {
        leaf_keys(&dict, "", &mut origins);
    }
    let origins = origins
        .into_iter()
        .map(|key| {
            let from = origin(&figment, &key).unwrap_or_else(|| "default".into());
            (key, from)
        })
        .collect();
    Ok(Loaded { config, origins })
}

/// Where `key`'s value came from, unless it is the built-in default.
fn origin(figment: &Figment, key: &str) -> Option<String> {
    let meta = figment.find_metadata(key)?;
    if meta.name == ENV_ORIGIN || meta.name == FLAG_ORIGIN {
        let path: Vec<&str> = key.split('.').collect();
        return Some(format!(
            "{} {}",
            meta.name,
            meta.interpolate(&Profile::Default, &path)
        ));
    }
    match &meta.source {
        Some(figment::Source::File(path)) => Some(format!("file {}", path.display())),
        _ => None,
    }
}

fn leaf_keys(dict: &Dict, prefix: &str, out: &mut Vec<String>) {
    for (key, value) in dict {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match value {
            Value::Dict(_, inner) => leaf_keys(inner, &path, out),
            _ => out.push(path),
        }
    }
}

/// One problem as `key: what is wrong (where it came from)`.
fn describe(err: figment::Error) -> String {
    let key = err.path.join(".");
    let origin = match &err.metadata {
        Some(meta) if meta.name == ENV_ORIGIN || meta.name == FLAG_ORIGIN => {
            format!(
                "{} {}",
                meta.name,
                meta.interpolate(&err.profile.clone().unwrap_or_default(), &err.path)
            )
        }
        Some(meta) => match &meta.source {
            Some(source) => format!("{} {source}", meta.name),
            None => meta.name.to_string(),
        },
        None => "unknown source".to_string(),
    };
    if key.is_empty() {
        format!("{} (in {origin})", err.kind)
    } else {
        format!("{key}: {} (in {origin})", err.kind)
    }
}

/// The `KAELIX_*` variables as a figment provider whose errors name the
/// variable a bad value came from.
struct EnvVars {
    /// `(key path, what set it, value)`.
    values: Vec<(String, String, String)>,
    /// `environment variable` or `command-line flag`: the origin's name.
    kind: &'static str,
}

impl EnvVars {
    fn new(
        sections: &[(String, String)],
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Self {
        let values = vars
            .into_iter()
            .filter(|(name, _)| !CLIENT_VARS.contains(&name.as_str()))
            .filter_map(|(name, value)| {
                let rest = name.strip_prefix(ENV_PREFIX)?.to_ascii_lowercase();
                (!rest.is_empty()).then(|| (key_path(sections, &rest), name, value))
            })
            .collect();
        EnvVars {
            values,
            kind: ENV_ORIGIN,
        }
    }

    /// Overrides from the command line: `(key path, flag as typed, value)`.
    fn flags(values: &[(String, String, String)]) -> Self {
        EnvVars {
            values: values.to_vec(),
            kind: FLAG_ORIGIN,
        }
    }
}

impl Provider for EnvVars {
    fn metadata(&self) -> Metadata {
        let names: Vec<(String, String)> = self
            .values
            .iter()
            .map(|(path, name, _)| (path.clone(), name.clone()))
            .collect();
        Metadata::named(self.kind).interpolater(move |_profile, keys| {
            let path = keys.join(".");
            // The setting at this key, or under it (an unknown section is
            // reported at the section's key).
            names
                .iter()
                .find(|(p, _)| *p == path)
                .or_else(|| {
                    names.iter().find(|(p, _)| {
                        p.strip_prefix(path.as_str())
                            .is_some_and(|r| r.starts_with('.'))
                    })
                })
                .map(|(_, name)| name.clone())
                .unwrap_or_else(|| format!("{ENV_PREFIX}{}", keys.join("_").to_ascii_uppercase()))
        })
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut dict = Dict::new();
        for (path, _, value) in &self.values {
            let parsed: Value = value.parse().unwrap_or_else(|never| match never {});
            let nested = figment::util::nest(path, parsed);
            if let Value::Dict(_, d) = nested {
                merge_into(&mut dict, d);
            }
        }
        Ok(Profile::Default.collect(dict))
    }
}

fn merge_into(into: &mut Dict, from: Dict) {
    for (key, value) in from {
        match (into.get_mut(&key), value) {
            (Some(Value::Dict(_, existing)), Value::Dict(_, incoming)) => {
                merge_into(existing, incoming)
            }
            (_, value) => {
                into.insert(key, value);
            }
        }
    }
}

/// Every table of the schema as `section_subsection`, paired with its dotted
/// path, longest first.
fn section_names(defaults: &MemoryStreamerConfig) -> Vec<(String, String)> {
    fn walk(dict: &Dict, prefix: &str, out: &mut Vec<(String, String)>) {
        for (key, value) in dict {
            if let Value::Dict(_, inner) = value {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                out.push((path.replace('.', "_"), path.clone()));
                walk(inner, &path, out);
            }
        }
    }
    let mut out = Vec::new();
    if let Ok(Value::Dict(_, dict)) = Value::serialize(defaults) {
        walk(&dict, "", &mut out);
    }
    out.sort_by_key(|(flat, _)| std::cmp::Reverse(flat.len()));
    out
}

/// Maps `network_max_connections` to `network.max_connections`.
fn key_path(sections: &[(String, String)], name: &str) -> String {
    for (flat, path) in sections {
        if let Some(rest) = name.strip_prefix(flat.as_str()) {
            if let Some(key) = rest.strip_prefix('_').filter(|k| !k.is_empty()) {
                return format!("{path}.{key}");
            }
        }
    }
    name.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn shipped_file_equals_defaults() {
        let dir = std::env::temp_dir().join(format!("kaelix-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("kaelix.toml");
        std::fs::write(&file, super::super::DEFAULT_CONFIG_TOML).unwrap();
        let loaded = load_from(Some(&file), Vec::new()).unwrap();
        assert_eq!(loaded, MemoryStreamerConfig::default());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn env_keys_with_underscores_map_to_their_sections() {
        let sections = section_names(&MemoryStreamerConfig::default());
        assert_eq!(
            key_path(&sections, "network_max_connections"),
            "network.max_connections"
        );
        assert_eq!(
            key_path(&sections, "telemetry_logging_level"),
            "telemetry.logging.level"
        );
        assert_eq!(
            key_path(&sections, "runtime_worker_threads"),
            "runtime.worker_threads"
        );
        assert_eq!(
            key_path(&sections, "telemetry_metrics_prometheus_port"),
            "telemetry.metrics.prometheus.port"
        );
        assert_eq!(
            key_path(&sections, "telemetry_metrics_enabled"),
            "telemetry.metrics.enabled"
        );
        assert_eq!(
            key_path(&sections, "telemetry_enabled"),
            "telemetry.enabled"
        );
        assert_eq!(
            key_path(&sections, "security_tls_cert_path"),
            "security.tls.cert_path"
        );
    }

    #[test]
    fn env_overrides_file_and_defaults() {
        let config = load_from(
            None,
            env(&[
                ("KAELIX_NETWORK_HOST", "127.0.0.1"),
                ("KAELIX_NETWORK_PORT", "0"),
                ("KAELIX_NETWORK_MAX_CONNECTIONS", "12"),
                ("KAELIX_RUNTIME_WORKER_THREADS", "3"),
                ("KAELIX_TELEMETRY_LOGGING_LEVEL", "debug"),
                ("OTHER_VAR", "x"),
                ("KAELIX_SERVER", "elsewhere:8080"),
            ]),
        )
        .unwrap();
        assert_eq!(config.network.host, "127.0.0.1");
        assert_eq!(config.network.port, 0);
        assert_eq!(config.network.max_connections, 12);
        assert_eq!(config.runtime.worker_threads, Some(3));
        assert_eq!(config.telemetry.logging.level, "debug");
    }

    #[test]
    fn cluster_keys_come_from_the_environment_too() {
        let config = load_from(
            None,
            env(&[
                ("KAELIX_CLUSTER_ENABLED", "true"),
                ("KAELIX_CLUSTER_NODE_ID", "2"),
                ("KAELIX_CLUSTER_ADVERTISE", "10.0.0.2:7222"),
                ("KAELIX_CLUSTER_SEEDS", "[10.0.0.1:7222, 10.0.0.3:7222]"),
                ("KAELIX_CLUSTER_DATA_DIR", "/var/lib/kaelix/cluster"),
                ("KAELIX_CLUSTER_TLS_CA_PATH", "ca.pem"),
            ]),
        )
        .unwrap();
        let c = &config.cluster;
        assert!(c.enabled);
        assert_eq!(c.node_id, 2);
        assert_eq!(c.advertise, "10.0.0.2:7222");
        assert_eq!(c.seeds, ["10.0.0.1:7222", "10.0.0.3:7222"]);
        assert_eq!(c.data_dir, std::path::Path::new("/var/lib/kaelix/cluster"));
        assert_eq!(c.tls.ca_path, std::path::Path::new("ca.pem"));
    }

    #[test]
    fn bad_values_and_unknown_keys_are_named() {
        let err = load_from(None, env(&[("KAELIX_NETWORK_PORT", "eighty")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("port"), "{err}");
        assert!(err.contains("KAELIX_NETWORK_PORT"), "{err}");

        let dir = std::env::temp_dir().join(format!("kaelix-cfg-typo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("kaelix.toml");
        std::fs::write(&file, "[netwrok]\nport = 1\n").unwrap();
        let err = load_from(Some(&file), Vec::new()).unwrap_err().to_string();
        assert!(err.contains("netwrok"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
