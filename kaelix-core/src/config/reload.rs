//! Hot reload: watch the configuration file, load and validate each edit,
//! and tell subscribers what changed.
//!
//! The file's directory is watched rather than the file, so the ways tools
//! replace a file all arrive: writing in place, writing a temporary file and
//! renaming it over (editors, `kubectl`, configuration managers), deleting
//! and recreating. Bursts of events are debounced into one reload. Each
//! reload layers the file under the same `KAELIX_*` variables and
//! command-line overrides as the first load, so a variable keeps winning
//! over the file; an edit that does not parse or validate is refused with
//! its reason and the running configuration stays.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use figment::providers::Serialized;
use figment::value::{Dict, Value};
use figment::Figment;
use notify::{EventKind, RecursiveMode};
use notify_debouncer_full::{new_debouncer, DebounceEventResult, Debouncer, RecommendedCache};
use tokio::sync::{broadcast, mpsc};

use super::load::{load_annotated, ConfigError, Override};
use super::schema::MemoryStreamerConfig;

/// How a [`HotReloadManager`] watches and reloads.
#[derive(Debug, Clone)]
pub struct HotReloadSettings {
    /// Quiet time after the last file event before the reload runs: a burst
    /// of writes becomes one reload.
    pub debounce: Duration,
    /// Watch the file. Off, only [`HotReloadManager::force_reload`] (the
    /// broker calls it on SIGHUP) reloads.
    pub watch: bool,
    /// The `KAELIX_*` variables layered over the file. `None` reads the
    /// process environment at each reload.
    pub env: Option<Vec<(String, String)>>,
    /// Command-line overrides layered over everything, as at start.
    pub overrides: Vec<Override>,
    /// Changes a subscriber may fall behind by before it misses some (it
    /// then gets `RecvError::Lagged`; [`HotReloadManager::current_config`]
    /// is always the latest).
    pub channel_capacity: usize,
}

impl Default for HotReloadSettings {
    fn default() -> Self {
        HotReloadSettings {
            debounce: Duration::from_millis(200),
            watch: true,
            env: None,
            overrides: Vec::new(),
            channel_capacity: 16,
        }
    }
}

/// One applied change of configuration.
#[derive(Debug, Clone)]
pub struct ConfigChange {
    /// When it was applied.
    pub timestamp: humantime::Timestamp,
    /// The configuration before.
    pub old_config: Arc<MemoryStreamerConfig>,
    /// The configuration now in force.
    pub new_config: Arc<MemoryStreamerConfig>,
    /// Every leaf key whose value differs, as dotted paths (`limits.max_payload_bytes`).
    pub changed: Vec<String>,
}

/// Counts of reloads by result.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadStats {
    /// Reloads that changed the configuration.
    pub applied: u64,
    /// Reloads that found nothing changed.
    pub unchanged: u64,
    /// Reloads refused (the file did not parse or validate).
    pub refused: u64,
    /// Why the last refused reload was refused.
    pub last_error: Option<String>,
}

/// Watches a configuration file and keeps the current configuration.
///
/// Dropping the manager stops the watching.
pub struct HotReloadManager {
    shared: Arc<Shared>,
    /// Kept for its watch; dropped with the manager.
    _watcher: Option<FileWatch>,
    task: Option<tokio::task::JoinHandle<()>>,
}

struct Shared {
    path: PathBuf,
    settings: HotReloadSettings,
    current: ArcSwap<MemoryStreamerConfig>,
    changes: broadcast::Sender<ConfigChange>,
    /// One reload at a time, so changes are reported in the order applied.
    reloading: tokio::sync::Mutex<()>,
    stats: parking_lot::Mutex<ReloadStats>,
}

impl HotReloadManager {
    /// Starts managing `path` with `initial` as the current configuration
    /// (usually what was loaded from `path` at start). `settings` `None`
    /// takes the defaults. Must be called within a tokio runtime; fails if
    /// the file does not exist or cannot be watched.
    pub async fn new(
        path: impl AsRef<Path>,
        initial: MemoryStreamerConfig,
        settings: Option<HotReloadSettings>,
    ) -> Result<HotReloadManager, ConfigError> {
        let path = path.as_ref().to_path_buf();
        if !path.exists() {
            return Err(ConfigError::Missing(path));
        }
        let settings = settings.unwrap_or_default();
        let (changes, _) = broadcast::channel(settings.channel_capacity.max(1));
        let shared = Arc::new(Shared {
            path,
            current: ArcSwap::from_pointee(initial),
            changes,
            reloading: tokio::sync::Mutex::new(()),
            stats: parking_lot::Mutex::new(ReloadStats::default()),
            settings,
        });
        if !shared.settings.watch {
            return Ok(HotReloadManager {
                shared,
                _watcher: None,
                task: None,
            });
        }
        // The watcher's thread pokes; one task reloads. A full channel
        // means a reload is already due, so pokes coalesce.
        let (poke, mut poked) = mpsc::channel::<()>(1);
        let watcher = FileWatch::new(&[&shared.path], shared.settings.debounce, move || {
            let _ = poke.try_send(());
        })?;
        let task = {
            let shared = shared.clone();
            tokio::spawn(async move {
                while poked.recv().await.is_some() {
                    // A file removed on its way to being replaced is not
                    // an error; its return triggers another reload.
                    if !shared.path.exists() {
                        tracing::info!(
                            file = %shared.path.display(),
                            "configuration file removed; the running configuration stays"
                        );
                        continue;
                    }
                    let _ = shared.reload("file changed").await;
                }
            })
        };
        Ok(HotReloadManager {
            shared,
            _watcher: Some(watcher),
            task: Some(task),
        })
    }

    /// Receives every applied change from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<ConfigChange> {
        self.shared.changes.subscribe()
    }

    /// Loads the file now. `Ok(None)` when nothing changed; an error, with
    /// every problem, when the file is missing, does not parse or does not
    /// validate (the running configuration then stays).
    pub async fn force_reload(&self) -> Result<Option<ConfigChange>, ConfigError> {
        self.shared.reload("forced").await
    }

    /// The configuration now in force.
    pub async fn current_config(&self) -> Arc<MemoryStreamerConfig> {
        self.shared.current.load_full()
    }

    /// The file being managed.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Reloads so far, by result.
    pub fn stats(&self) -> ReloadStats {
        self.shared.stats.lock().clone()
    }
}

impl Drop for HotReloadManager {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl Shared {
    async fn reload(&self, cause: &'static str) -> Result<Option<ConfigChange>, ConfigError> {
        let _one = self.reloading.lock().await;
        let env = match &self.settings.env {
            Some(env) => env.clone(),
            None => std::env::vars().collect(),
        };
        let loaded = if self.path.exists() {
            load_annotated(Some(&self.path), env, &self.settings.overrides)
        } else {
            Err(ConfigError::Missing(self.path.clone()))
        };
        let new = match loaded {
            Ok(loaded) => loaded.config,
            Err(err) => {
                let mut stats = self.stats.lock();
                stats.refused += 1;
                stats.last_error = Some(err.to_string());
                drop(stats);
                // One line, for log processors: problems joined by "; ".
                let reason = match &err {
                    ConfigError::Invalid(problems) => problems
                        .iter()
                        .map(|p| p.split_whitespace().collect::<Vec<_>>().join(" "))
                        .collect::<Vec<_>>()
                        .join("; "),
                    other => other.to_string(),
                };
                tracing::warn!(
                    file = %self.path.display(),
                    cause,
                    "configuration reload refused, the running configuration stays: {reason}"
                );
                return Err(err);
            }
        };
        let old = self.current.load_full();
        let changed = changed_keys(&old, &new);
        if changed.is_empty() {
            self.stats.lock().unchanged += 1;
            tracing::debug!(file = %self.path.display(), cause, "configuration unchanged");
            return Ok(None);
        }
        let new = Arc::new(new);
        self.current.store(new.clone());
        self.stats.lock().applied += 1;
        tracing::info!(
            file = %self.path.display(),
            cause,
            changed = %changed.join(", "),
            "configuration reloaded"
        );
        let change = ConfigChange {
            timestamp: SystemTime::now().into(),
            old_config: old,
            new_config: new,
            changed,
        };
        // No subscriber is not an error.
        let _ = self.changes.send(change.clone());
        Ok(Some(change))
    }
}

/// Watches files through their directories (so replacing a file by rename
/// is seen) and calls `on_change` once per burst of events that concern
/// one of them. Dropping it stops the watching.
pub struct FileWatch {
    _debouncer: Debouncer<notify::RecommendedWatcher, RecommendedCache>,
}

impl std::fmt::Debug for FileWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FileWatch")
    }
}

impl FileWatch {
    /// Starts watching `paths`; `on_change` runs on the watcher's thread,
    /// so it should only poke something else.
    pub fn new(
        paths: &[&Path],
        debounce: Duration,
        on_change: impl Fn() + Send + 'static,
    ) -> Result<FileWatch, ConfigError> {
        let mut dirs: Vec<PathBuf> = Vec::new();
        let mut names = Vec::new();
        // Behind a symlink (a Kubernetes ConfigMap or Secret swaps a
        // directory link beside it) any change in the directory may be the
        // file's.
        let mut any = false;
        for path in paths {
            let dir = match path.parent() {
                Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
                _ => PathBuf::from("."),
            };
            if !dirs.contains(&dir) {
                dirs.push(dir);
            }
            names.extend(path.file_name().map(|n| n.to_os_string()));
            any |= path
                .symlink_metadata()
                .is_ok_and(|m| m.file_type().is_symlink());
        }
        let files = paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let first = paths.first().copied().unwrap_or(Path::new("."));
        let mut debouncer =
            new_debouncer(
                debounce,
                None,
                move |result: DebounceEventResult| match result {
                    Ok(events) => {
                        let concerns = events.iter().any(|event| {
                            !matches!(event.kind, EventKind::Access(_))
                                && (any
                                    || event.paths.iter().any(|p| {
                                        p.file_name()
                                            .is_some_and(|n| names.iter().any(|name| name == n))
                                    }))
                        });
                        if concerns {
                            on_change();
                        }
                    }
                    Err(errors) => {
                        for err in errors {
                            tracing::warn!(%files, error = %err, "watching files");
                        }
                    }
                },
            )
            .map_err(|e| watch_error(first, e))?;
        for dir in &dirs {
            debouncer
                .watch(dir, RecursiveMode::NonRecursive)
                .map_err(|e| watch_error(dir, e))?;
        }
        Ok(FileWatch {
            _debouncer: debouncer,
        })
    }
}

fn watch_error(path: &Path, err: notify::Error) -> ConfigError {
    ConfigError::Watch(format!("cannot watch {}: {err}", path.display()))
}

/// Every leaf key whose value differs between `old` and `new`, as dotted
/// paths, sorted.
pub fn changed_keys(old: &MemoryStreamerConfig, new: &MemoryStreamerConfig) -> Vec<String> {
    let (old, new) = (to_dict(old), to_dict(new));
    let mut out = Vec::new();
    diff(&old, &new, "", &mut out);
    out
}

/// `base` with the values of `keys` taken from `from`: what a running
/// broker holds when some changed keys apply live and others wait for a
/// restart.
pub fn with_values_from(
    base: &MemoryStreamerConfig,
    from: &MemoryStreamerConfig,
    keys: &[String],
) -> MemoryStreamerConfig {
    let mut dict = to_dict(base);
    let source = to_dict(from);
    for key in keys {
        let path: Vec<&str> = key.split('.').collect();
        // An unset optional key has no value to take: it is unset.
        set(&mut dict, &path, lookup(&source, &path).cloned());
    }
    Figment::from(Serialized::defaults(dict))
        .extract()
        .unwrap_or_else(|_| base.clone())
}

fn to_dict(config: &MemoryStreamerConfig) -> Dict {
    match Value::serialize(config) {
        Ok(Value::Dict(_, dict)) => dict,
        _ => Dict::new(),
    }
}

fn diff(old: &Dict, new: &Dict, prefix: &str, out: &mut Vec<String>) {
    let keys = old
        .keys()
        .chain(new.keys().filter(|k| !old.contains_key(*k)));
    for key in keys {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match (old.get(key), new.get(key)) {
            (Some(Value::Dict(_, a)), Some(Value::Dict(_, b))) => diff(a, b, &path, out),
            (a, b) if a == b => {}
            _ => out.push(path),
        }
    }
}

fn lookup<'a>(dict: &'a Dict, path: &[&str]) -> Option<&'a Value> {
    let (first, rest) = path.split_first()?;
    let value = dict.get(*first)?;
    match (value, rest.is_empty()) {
        (_, true) => Some(value),
        (Value::Dict(_, inner), false) => lookup(inner, rest),
        _ => None,
    }
}

fn set(dict: &mut Dict, path: &[&str], value: Option<Value>) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    if rest.is_empty() {
        match value {
            Some(value) => dict.insert(first.to_string(), value),
            None => dict.remove(*first),
        };
    } else if let Some(Value::Dict(_, inner)) = dict.get_mut(*first) {
        set(inner, rest, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_keys_are_the_differing_leaves() {
        let old = MemoryStreamerConfig::default();
        let mut new = old.clone();
        assert!(changed_keys(&old, &new).is_empty());
        new.limits.max_payload_bytes = 10;
        new.telemetry.metrics.prometheus.port = 1;
        new.runtime.worker_threads = Some(3);
        assert_eq!(
            changed_keys(&old, &new),
            [
                "limits.max_payload_bytes",
                "runtime.worker_threads",
                "telemetry.metrics.prometheus.port"
            ]
        );
    }

    #[test]
    fn values_are_taken_only_for_the_named_keys() {
        let old = MemoryStreamerConfig::default();
        let mut new = old.clone();
        new.limits.max_payload_bytes = 100;
        new.network.port = 9;
        new.runtime.worker_threads = Some(1);
        let merged = with_values_from(&old, &new, &["limits.max_payload_bytes".into()]);
        assert_eq!(merged.limits.max_payload_bytes, 100);
        assert_eq!(merged.network.port, old.network.port);
        assert_eq!(merged.runtime.worker_threads, None);
        // Unsetting an optional key carries over too.
        let back = with_values_from(&new, &old, &["runtime.worker_threads".into()]);
        assert_eq!(back.runtime.worker_threads, None);
        assert_eq!(back.network.port, 9);
    }
}
