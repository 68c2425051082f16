//! Hot reload against the real `kaelix-broker` binary: edits to its
//! configuration file apply without a restart, broken edits are refused
//! while it keeps serving, and SIGHUP reloads.

mod common;

use std::path::Path;
use std::time::Duration;

use common::BrokerProcess;
use kaelix_consumer::Consumer;
use kaelix_core::protocol::ErrorCode;
use kaelix_core::Error;
use kaelix_publisher::Publisher;

const WAIT: Duration = Duration::from_secs(10);

fn write_config(path: &Path, max_payload: usize, extra: &str) {
    let body = format!(
        "[network]\nhost = \"127.0.0.1\"\nport = 0\n\n\
         [limits]\nmax_payload_bytes = {max_payload}\n\n{extra}"
    );
    // The way editors and deploy tools replace a file: write a temporary
    // file beside it, then rename it over.
    let tmp = path.with_extension("toml.new");
    std::fs::write(&tmp, body).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn start(dir: &Path, extra_args: &[&str]) -> BrokerProcess {
    let file = dir.join("kaelix.toml");
    let mut args = vec!["--config", file.to_str().unwrap()];
    args.extend_from_slice(extra_args);
    BrokerProcess::start_in(dir, &args, &[])
}

fn assert_too_large(result: kaelix_core::Result<()>, limit: usize) {
    match result {
        Err(Error::Refused { code, reason }) => {
            assert_eq!(code, ErrorCode::PayloadTooLarge, "{reason}");
            assert!(
                reason.contains(&format!("limits.max_payload_bytes ({limit})")),
                "{reason}"
            );
        }
        other => panic!("expected a payload-too-large refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn lowering_the_payload_limit_applies_to_open_connections_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("kaelix.toml");
    write_config(&file, 4096, "");
    let broker = start(dir.path(), &[]);
    let pid = broker.child.id();

    let publisher = Publisher::connect(broker.addr()).await.unwrap();
    let consumer = Consumer::connect(broker.addr()).await.unwrap();
    let mut sub = consumer.subscribe("reload.payload").await.unwrap();
    publisher
        .publish("reload.payload", vec![b'a'; 2000])
        .await
        .unwrap();
    assert_eq!(sub.recv().await.unwrap().payload.len(), 2000);

    write_config(&file, 1000, "");
    broker.wait_for_log(&["configuration applied", "limits.max_payload_bytes"], WAIT);

    // The same connection now gets the new limit, and stays usable.
    assert_too_large(
        publisher.publish("reload.payload", vec![b'b'; 2000]).await,
        1000,
    );
    publisher
        .publish("reload.payload", vec![b'c'; 1000])
        .await
        .unwrap();
    let got = sub.recv().await.unwrap();
    assert_eq!(got.payload.len(), 1000, "the refused message was delivered");
    // New connections too.
    let fresh = Publisher::connect(broker.addr()).await.unwrap();
    assert_too_large(
        fresh.publish("reload.payload", vec![b'd'; 1001]).await,
        1000,
    );
    assert_eq!(broker.child.id(), pid);

    // A key that cannot change live is named and keeps its running value.
    write_config(&file, 1000, "[runtime]\ntask_queue_depth = 64\n");
    let line = broker.wait_for_log(&["needs a restart", "runtime.task_queue_depth"], WAIT);
    assert!(!line.contains("limits."), "{line}");
}

#[tokio::test]
async fn a_broken_edit_is_refused_and_the_broker_keeps_serving_the_old_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("kaelix.toml");
    write_config(&file, 4096, "");
    let broker = start(dir.path(), &[]);
    let publisher = Publisher::connect(broker.addr()).await.unwrap();

    // Not TOML.
    std::fs::write(
        dir.path().join("broken.tmp"),
        "[limits\nmax_payload_bytes = 10\n",
    )
    .unwrap();
    std::fs::rename(dir.path().join("broken.tmp"), &file).unwrap();
    broker.wait_for_log(&["configuration reload refused", "kaelix.toml"], WAIT);
    // Valid TOML, invalid value: refused with the key and the reason.
    write_config(&file, 0, "");
    broker.wait_for_log(
        &[
            "configuration reload refused",
            "limits.max_payload_bytes: must be at least 1",
        ],
        WAIT,
    );
    // A typo in a section name.
    write_config(&file, 10, "[netwrok]\nport = 1\n");
    broker.wait_for_log(&["configuration reload refused", "netwrok"], WAIT);

    // Still serving, with the old limit.
    publisher
        .publish("reload.broken", vec![b'a'; 4000])
        .await
        .unwrap();
    let other = Publisher::connect(broker.addr()).await.unwrap();
    other
        .publish("reload.broken", vec![b'a'; 4000])
        .await
        .unwrap();
    assert_eq!(broker.log_count("configuration applied"), 0);

    // Fixing the file applies it.
    write_config(&file, 100, "");
    broker.wait_for_log(&["configuration applied", "limits.max_payload_bytes"], WAIT);
    assert_too_large(
        publisher.publish("reload.broken", vec![b'a'; 101]).await,
        100,
    );
}

#[tokio::test]
async fn sighup_reloads_when_the_file_is_not_watched() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("kaelix.toml");
    write_config(&file, 4096, "");
    let broker = start(dir.path(), &["--no-watch"]);
    let publisher = Publisher::connect(broker.addr()).await.unwrap();

    write_config(&file, 1000, "");
    // Unwatched: the edit waits for SIGHUP (the watcher would have applied
    // it well within this time).
    tokio::time::sleep(Duration::from_secs(1)).await;
    publisher
        .publish("reload.hup", vec![b'a'; 2000])
        .await
        .unwrap();
    assert_eq!(broker.log_count("configuration applied"), 0);

    broker.signal("-HUP");
    broker.wait_for_log(&["configuration applied", "limits.max_payload_bytes"], WAIT);
    assert_too_large(
        publisher.publish("reload.hup", vec![b'a'; 2000]).await,
        1000,
    );
}

#[tokio::test]
async fn the_log_level_changes_live() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("kaelix.toml");
    write_config(&file, 4096, "[telemetry.logging]\nlevel = \"warn\"\n");
    let broker = start(dir.path(), &[]);

    // At warn, a client leaving is not logged.
    drop(Publisher::connect(broker.addr()).await.unwrap());
    write_config(&file, 4096, "[telemetry.logging]\nlevel = \"debug\"\n");
    // The reload itself is logged at info, so wait for the applier instead:
    // once debug is on, a client leaving is logged.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let publisher = Publisher::connect(broker.addr()).await.unwrap();
        publisher.close().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        if broker.log_count("connection closed") > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the debug level was not applied"
        );
    }
    assert_eq!(broker.log_count("configuration reload refused"), 0);

    // A filter that does not parse keeps the old level, and says why.
    write_config(
        &file,
        4096,
        "[telemetry.logging]\nlevel = \"kaelix=loud\"\n",
    );
    broker.wait_for_log(
        &["configuration change refused", "is not a log filter"],
        WAIT,
    );
}
