//! HotReloadManager against real files and the real file watcher.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kaelix_core::config::{
    ConfigChange, HotReloadManager, HotReloadSettings, MemoryStreamerConfig, Override,
};
use tokio::sync::broadcast;

const WAIT: Duration = Duration::from_secs(10);

fn settings() -> Option<HotReloadSettings> {
    Some(HotReloadSettings {
        debounce: Duration::from_millis(50),
        env: Some(Vec::new()),
        ..HotReloadSettings::default()
    })
}

fn config_file(dir: &Path, body: &str) -> PathBuf {
    let path = dir.join("kaelix.toml");
    std::fs::write(&path, body).unwrap();
    path
}

/// A file with `body` in a fresh directory, watched from its first load.
async fn watched(body: &str) -> (tempfile::TempDir, PathBuf, HotReloadManager) {
    let dir = tempfile::tempdir().unwrap();
    let path = config_file(dir.path(), body);
    let initial = kaelix_core::config::load_from(Some(&path), Vec::new()).unwrap();
    let manager = HotReloadManager::new(&path, initial, settings())
        .await
        .unwrap();
    (dir, path, manager)
}

async fn next_change(rx: &mut broadcast::Receiver<ConfigChange>) -> ConfigChange {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("no configuration change within 10 s")
        .expect("change channel closed")
}

/// Replaces the file the way editors and deploy tools do: a temporary file
/// in the same directory, renamed over the original.
fn replace_atomically(path: &Path, body: &str) {
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, body).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn guide_hot_reload_snippet() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let path = config_file(dir.path(), "[network]\nport = 9000\n");
    // The guide's snippet, with the file in a temporary directory.
    let initial_config = MemoryStreamerConfig::default();
    let hot_reload = HotReloadManager::new(&path, initial_config, None).await?;
    let mut config_changes = hot_reload.subscribe();
    let (seen, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(change) = config_changes.recv().await {
            println!("Configuration updated at: {}", change.timestamp);
            println!("New config: {:?}", change.new_config);
            apply_config_changes(&change.new_config).await;
            let _ = seen.send(change.new_config.network.port);
        }
    });
    hot_reload.force_reload().await?;
    let current_config = hot_reload.current_config().await;
    assert_eq!(current_config.network.port, 9000);
    assert_eq!(
        tokio::time::timeout(WAIT, seen_rx.recv()).await?,
        Some(9000)
    );
    Ok(())
}

async fn apply_config_changes(config: &MemoryStreamerConfig) {
    assert!(config.network.port > 0);
}

#[tokio::test]
async fn edits_in_place_by_rename_and_by_recreate_all_apply() {
    let (_dir, path, manager) = watched("[limits]\nmax_payload_bytes = 1000\n").await;
    let mut rx = manager.subscribe();

    std::fs::write(&path, "[limits]\nmax_payload_bytes = 2000\n").unwrap();
    let change = next_change(&mut rx).await;
    assert_eq!(change.changed, ["limits.max_payload_bytes"]);
    assert_eq!(change.old_config.limits.max_payload_bytes, 1000);
    assert_eq!(change.new_config.limits.max_payload_bytes, 2000);

    replace_atomically(
        &path,
        "[limits]\nmax_payload_bytes = 3000\n[telemetry.logging]\nlevel = \"debug\"\n",
    );
    let change = next_change(&mut rx).await;
    assert_eq!(
        change.changed,
        ["limits.max_payload_bytes", "telemetry.logging.level"]
    );
    assert_eq!(change.new_config.limits.max_payload_bytes, 3000);

    std::fs::remove_file(&path).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::write(&path, "[limits]\nmax_payload_bytes = 4000\n").unwrap();
    let change = next_change(&mut rx).await;
    assert_eq!(change.new_config.limits.max_payload_bytes, 4000);
    // The removal in between was not a change, and not a refusal.
    assert_eq!(manager.stats().refused, 0);
    assert_eq!(
        manager.current_config().await.limits.max_payload_bytes,
        4000
    );
}

#[tokio::test]
async fn a_broken_edit_is_refused_and_the_running_configuration_stays() {
    let (_dir, path, manager) = watched("[limits]\nmax_payload_bytes = 1000\n").await;
    let mut rx = manager.subscribe();

    for (body, reason) in [
        ("[limits\nmax_payload_bytes = 5\n", "TOML"),
        ("[netwrok]\nport = 1\n", "netwrok"),
        (
            "[limits]\nmax_payload_bytes = 0\n",
            "limits.max_payload_bytes: must be at least 1",
        ),
    ] {
        let refused = manager.stats().refused;
        replace_atomically(&path, body);
        let deadline = tokio::time::Instant::now() + WAIT;
        while manager.stats().refused == refused {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{body:?} not refused"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let error = manager.stats().last_error.unwrap();
        assert!(error.contains(reason), "{reason:?} not in {error}");
        assert!(error.contains("kaelix.toml"), "file not named in {error}");
        assert_eq!(
            manager.current_config().await.limits.max_payload_bytes,
            1000
        );
        let err = manager.force_reload().await.unwrap_err().to_string();
        assert!(err.starts_with("Configuration validation failed"), "{err}");
    }
    assert!(
        rx.try_recv().is_err(),
        "a refused edit was reported as a change"
    );

    replace_atomically(&path, "[limits]\nmax_payload_bytes = 2000\n");
    assert_eq!(
        next_change(&mut rx)
            .await
            .new_config
            .limits
            .max_payload_bytes,
        2000
    );
}

#[tokio::test]
async fn variables_and_flags_keep_winning_over_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = config_file(dir.path(), "[network]\nmax_connections = 5\n");
    let manager = HotReloadManager::new(
        &path,
        MemoryStreamerConfig::default(),
        Some(HotReloadSettings {
            watch: false,
            env: Some(vec![(
                "KAELIX_LIMITS_MAX_PAYLOAD_BYTES".into(),
                "777".into(),
            )]),
            overrides: vec![Override::parse_set("network.port=4242").unwrap()],
            ..HotReloadSettings::default()
        }),
    )
    .await
    .unwrap();
    std::fs::write(
        &path,
        "[network]\nmax_connections = 6\nport = 1\n[limits]\nmax_payload_bytes = 1\n",
    )
    .unwrap();
    let change = manager.force_reload().await.unwrap().expect("a change");
    assert_eq!(change.new_config.network.max_connections, 6);
    assert_eq!(change.new_config.network.port, 4242);
    assert_eq!(change.new_config.limits.max_payload_bytes, 777);
    // Nothing new: no change.
    assert!(manager.force_reload().await.unwrap().is_none());
    assert_eq!(manager.stats().applied, 1);
    assert_eq!(manager.stats().unchanged, 1);
}

#[tokio::test]
async fn a_missing_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = HotReloadManager::new(
        dir.path().join("absent.toml"),
        MemoryStreamerConfig::default(),
        None,
    )
    .await
    .err()
    .expect("an error")
    .to_string();
    assert!(
        err.contains("absent.toml") && err.contains("does not exist"),
        "{err}"
    );
}
