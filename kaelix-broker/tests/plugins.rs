//! The built-in plugins end to end through the real binary, dead letters,
//! and plugins changed by hot reload.

mod common;

use std::path::Path;
use std::time::Duration;

use common::BrokerProcess;
use kaelix_consumer::{Consumer, Subscription};
use kaelix_core::protocol::ErrorCode;
use kaelix_core::{Error, Message};
use kaelix_publisher::Publisher;

const WAIT: Duration = Duration::from_secs(10);

async fn next(sub: &mut Subscription) -> Message {
    tokio::time::timeout(WAIT, sub.recv())
        .await
        .expect("a message in time")
        .expect("the subscription is open")
}

fn refused(result: kaelix_core::Result<()>) -> (ErrorCode, String) {
    match result {
        Err(Error::Refused { code, reason }) => (code, reason),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

const CHAIN: &str = r#"
[[plugins]]
name = "header_stamp"
pattern = "orders.>"
order = 1
[plugins.config]
id = "eu-1"
headers = { env = "prod" }

[[plugins]]
name = "json_validate"
pattern = "orders.>"
order = 2
[plugins.config]
required = ["id", "customer.email"]

[[plugins]]
name = "size_cap"
pattern = "orders.>"
order = 3
[plugins.config]
max_bytes = 200

[[plugins]]
name = "topic_route"
id = "audit-copy"
pattern = "orders.>"
order = 4
[plugins.config]
to = "audit.{topic}"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_of_built_ins_stamps_validates_caps_and_copies() {
    let (_dir, broker) = BrokerProcess::with_config(CHAIN);
    let addr = broker.addr();
    let consumer = Consumer::connect(&addr).await.unwrap();
    let mut orders = consumer.subscribe("orders.eu").await.unwrap();
    let mut audit = consumer.subscribe("audit.orders.eu").await.unwrap();
    let mut dead = consumer.subscribe("kaelix.dead_letter").await.unwrap();
    let publisher = Publisher::connect(&addr).await.unwrap();

    // Valid: stamped, delivered, and copied to audit.
    let good = r#"{"id": 1, "customer": {"email": "a@b.c"}}"#;
    publisher.publish("orders.eu", good).await.unwrap();
    let m = next(&mut orders).await;
    assert_eq!(&m.payload[..], good.as_bytes());
    assert_eq!(m.header("kaelix-broker"), Some("eu-1"));
    assert_eq!(m.header("env"), Some("prod"));
    let time = m.header("kaelix-time").expect("a receive time");
    assert!(humantime::parse_rfc3339(time).is_ok(), "{time}");
    let copy = next(&mut audit).await;
    assert_eq!(copy.topic.as_str(), "audit.orders.eu");
    assert_eq!(&copy.payload[..], good.as_bytes());
    assert_eq!(copy.header("env"), Some("prod"));

    // Not JSON: refused as dead-lettered, and in the dead-letter topic
    // with the plugin, the reason and the original topic.
    let (code, reason) = refused(publisher.publish("orders.eu", "{not json").await);
    assert_eq!(code, ErrorCode::DeadLettered);
    assert!(
        reason.starts_with("plugin json_validate: payload is not JSON"),
        "{reason}"
    );
    let d = next(&mut dead).await;
    assert_eq!(&d.payload[..], b"{not json");
    assert_eq!(d.header("kaelix-dead-letter-plugin"), Some("json_validate"));
    assert_eq!(d.header("kaelix-dead-letter-topic"), Some("orders.eu"));
    assert!(d
        .header("kaelix-dead-letter-reason")
        .unwrap()
        .starts_with("payload is not JSON"));
    // Stamped before it was refused: the dead letter says when it came.
    assert_eq!(d.header("env"), Some("prod"));

    // A required field missing.
    let (code, reason) = refused(publisher.publish("orders.eu", r#"{"id": 2}"#).await);
    assert_eq!(code, ErrorCode::DeadLettered);
    assert!(
        reason.contains("required field \"customer.email\" is missing"),
        "{reason}"
    );
    next(&mut dead).await;

    // Over the cap: dropped, with the reason; nothing copied.
    let big = format!(
        r#"{{"id": 3, "customer": {{"email": "{}"}}}}"#,
        "x".repeat(300)
    );
    let (code, reason) = refused(publisher.publish("orders.eu", big).await);
    assert_eq!(code, ErrorCode::Rejected);
    assert!(
        reason.contains("is over the cap of 200 bytes for orders.eu"),
        "{reason}"
    );

    // Another topic passes untouched.
    let mut other = consumer.subscribe("misc").await.unwrap();
    publisher.publish("misc", "{not json").await.unwrap();
    let m = next(&mut other).await;
    assert_eq!(m.header("kaelix-broker"), None);

    // Nothing more arrived on orders or audit: the refused ones went nowhere.
    publisher.publish("orders.eu", good).await.unwrap();
    assert_eq!(&next(&mut orders).await.payload[..], good.as_bytes());
    assert_eq!(&next(&mut audit).await.payload[..], good.as_bytes());

    let (_, metrics) = broker.http_get("/metrics");
    for line in [
        "kaelix_plugin_actions_total{plugin=\"json_validate\",action=\"dead_letter\"} 2",
        "kaelix_plugin_actions_total{plugin=\"size_cap\",action=\"drop\"} 1",
        "kaelix_plugin_actions_total{plugin=\"audit-copy\",action=\"copy\"} 2",
        "kaelix_plugin_state{plugin=\"header_stamp\"} 0",
        "kaelix_publish_refusals_total{reason=\"dead-lettered\"} 2",
        "kaelix_publish_refusals_total{reason=\"rejected\"} 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "missing {line}\n{metrics}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_and_reroute() {
    let config = r#"
[[plugins]]
name = "rate_limit"
pattern = "sensors.>"
[plugins.config]
messages_per_sec = 5
burst = 10

[[plugins]]
name = "topic_route"
pattern = "old.>"
[plugins.config]
to = "new.place"
mode = "reroute"
"#;
    let (_dir, broker) = BrokerProcess::with_config(config);
    let addr = broker.addr();
    let consumer = Consumer::connect(&addr).await.unwrap();
    let mut sensors = consumer.subscribe("sensors.a").await.unwrap();
    let mut old = consumer.subscribe("old.>").await.unwrap();
    let mut new = consumer.subscribe("new.place").await.unwrap();
    let publisher = Publisher::connect(&addr).await.unwrap();

    let (mut passed, mut limited) = (0, 0);
    for i in 0..40u32 {
        match publisher.publish("sensors.a", i.to_string()).await {
            Ok(()) => passed += 1,
            Err(Error::Refused { code, reason }) => {
                assert_eq!(code, ErrorCode::Rejected);
                assert!(
                    reason.contains("over its rate of 5 messages per second"),
                    "{reason}"
                );
                limited += 1;
            }
            Err(other) => panic!("{other}"),
        }
    }
    // The burst of 10, and at most a few more for the time the 40 took.
    assert!(
        (10..=15).contains(&passed),
        "{passed} passed, {limited} limited"
    );
    for _ in 0..passed {
        next(&mut sensors).await;
    }
    // Another topic under the same pattern has its own bucket.
    publisher.publish("sensors.b", "x").await.unwrap();

    publisher.publish("old.thing", "moved").await.unwrap();
    let m = next(&mut new).await;
    assert_eq!(
        (m.topic.as_str(), &m.payload[..]),
        ("new.place", &b"moved"[..])
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(200), old.recv())
            .await
            .is_err(),
        "a rerouted message does not reach its old topic"
    );
}

fn write_config(path: &Path, plugins: &str) {
    let body = format!("[network]\nhost = \"127.0.0.1\"\nport = 0\n\n{plugins}");
    let tmp = path.with_extension("toml.new");
    std::fs::write(&tmp, body).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

const CAP_100: &str = r#"
[[plugins]]
name = "size_cap"
pattern = "reload.>"
[plugins.config]
max_bytes = 100
"#;

/// Publishes `size` bytes on `reload.x` until `done` says the answer is the
/// one expected (the reload takes a moment).
async fn until(
    publisher: &Publisher,
    size: usize,
    done: impl Fn(&kaelix_core::Result<()>) -> bool,
) {
    let start = std::time::Instant::now();
    loop {
        let result = publisher.publish("reload.x", vec![b'a'; size]).await;
        if done(&result) {
            return;
        }
        assert!(
            start.elapsed() < WAIT,
            "the reload did not apply: {result:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_are_added_reconfigured_reordered_and_removed_by_reload() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("kaelix.toml");
    write_config(&file, "");
    let broker = BrokerProcess::start_in(dir.path(), &["--config", file.to_str().unwrap()], &[]);
    let publisher = Publisher::connect(broker.addr()).await.unwrap();
    let is_rejected = |r: &kaelix_core::Result<()>| {
        matches!(
            r,
            Err(Error::Refused {
                code: ErrorCode::Rejected,
                ..
            })
        )
    };
    publisher
        .publish("reload.x", vec![b'a'; 150])
        .await
        .unwrap();

    // Added: the open connection's next publish meets it.
    write_config(&file, CAP_100);
    until(&publisher, 150, is_rejected).await;

    // Reconfigured.
    write_config(
        &file,
        &CAP_100.replace("max_bytes = 100", "max_bytes = 200"),
    );
    until(&publisher, 150, |r| r.is_ok()).await;
    assert!(is_rejected(
        &publisher.publish("reload.x", vec![b'a'; 250]).await
    ));

    // Reordered: a copy before the cap copies what the cap then refuses;
    // after it, the refused message is not copied.
    let consumer = Consumer::connect(broker.addr()).await.unwrap();
    let mut copies = consumer.subscribe("copies.>").await.unwrap();
    let copy = |order: i32| {
        format!(
            "[[plugins]]\nname = \"topic_route\"\npattern = \"reload.>\"\norder = {order}\n\
             [plugins.config]\nto = \"copies.{{topic}}\"\n"
        )
    };
    let cap_first = format!(
        "{}\n{}",
        CAP_100.replace("pattern", "order = 1\npattern"),
        copy(2)
    );
    write_config(&file, &cap_first);
    // The new chain is in once a small message is copied.
    let start = std::time::Instant::now();
    loop {
        publisher.publish("reload.x", vec![b'a'; 10]).await.unwrap();
        let got = tokio::time::timeout(Duration::from_millis(100), copies.recv()).await;
        if got.is_ok() {
            break;
        }
        assert!(start.elapsed() < WAIT, "the reload did not apply");
    }
    // Drain copies of the probes that crossed.
    while tokio::time::timeout(Duration::from_millis(100), copies.recv())
        .await
        .is_ok()
    {}
    assert!(is_rejected(
        &publisher.publish("reload.x", vec![b'a'; 150]).await
    ));
    // Refused before the copy: nothing copied (the next copy is a small one).
    publisher.publish("reload.x", vec![b'b'; 10]).await.unwrap();
    let m = next(&mut copies).await;
    assert_eq!(m.payload.len(), 10);

    // Invalid: an unknown plugin is refused, and the running chain stays.
    write_config(&file, "[[plugins]]\nname = \"no_such_plugin\"\n");
    broker.wait_for_log(&["no plugin \"no_such_plugin\""], WAIT);
    assert!(is_rejected(
        &publisher.publish("reload.x", vec![b'a'; 150]).await
    ));

    // Removed.
    write_config(&file, "");
    until(&publisher, 150, |r| r.is_ok()).await;
}

#[test]
fn an_unknown_plugin_or_a_bad_plugin_config_fails_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("kaelix.toml");
    for (plugins, expected) in [
        (
            "[[plugins]]\nname = \"nope\"\n",
            "plugins[0].name: no plugin \"nope\"",
        ),
        (
            "[[plugins]]\nname = \"size_cap\"\n[plugins.config]\nmax_bites = 3\n",
            "config.max_bites: unknown key; this plugin takes max_bytes, action",
        ),
    ] {
        write_config(&file, plugins);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kaelix-broker"))
            .args(["--config", file.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{stderr}");
    }
}
