//! The broker's logs: JSON when asked, connection events with their id and
//! peer, and client-supplied text that cannot forge a line.

mod common;

use std::time::Duration;

use common::{BrokerProcess, RawClient};
use kaelix_core::protocol::{Frame, Hello, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn json_logs_carry_the_connection_id_and_peer() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start_in(
        dir.path(),
        &["--host", "127.0.0.1", "--port", "0"],
        &[
            ("KAELIX_TELEMETRY_LOGGING_FORMAT", "json"),
            ("KAELIX_TELEMETRY_LOGGING_LEVEL", "debug"),
        ],
    );
    let mut client = RawClient::connect(&broker.addr()).await;
    // A name with a line break: it must stay inside one JSON string.
    client
        .send(&Frame::Hello(Hello {
            min_version: MIN_PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            client_name: "evil\n{\"level\":\"ERROR\"}".into(),
            properties: Vec::new(),
        }))
        .await;
    assert!(matches!(client.next().await, Some(Frame::Welcome(_))));
    let line = broker.wait_for_log(&["connection opened"], WAIT);
    let event: serde_json::Value = serde_json::from_str(&line).expect(&line);
    assert_eq!(event["level"], "DEBUG", "{line}");
    let fields = &event["fields"];
    assert!(fields["conn"].as_u64().is_some_and(|id| id >= 1), "{line}");
    assert!(
        fields["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:")),
        "{line}"
    );
    assert!(
        fields["client"]
            .as_str()
            .is_some_and(|c| c.contains("evil")),
        "{line}"
    );
    // Every line the broker wrote is one JSON object.
    for line in broker.log.lock().unwrap().iter() {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    }
    drop(client);
    let closed = broker.wait_for_log(&["connection closed"], WAIT);
    assert!(closed.contains("\"conn\""), "{closed}");
}

#[tokio::test]
async fn text_logs_escape_client_names() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start_in(
        dir.path(),
        &["--host", "127.0.0.1", "--port", "0"],
        &[("KAELIX_TELEMETRY_LOGGING_LEVEL", "debug")],
    );
    let mut client = RawClient::connect(&broker.addr()).await;
    client
        .send(&Frame::Hello(Hello {
            min_version: MIN_PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            client_name: "a\nFAKE ERROR line".into(),
            properties: Vec::new(),
        }))
        .await;
    assert!(matches!(client.next().await, Some(Frame::Welcome(_))));
    let line = broker.wait_for_log(&["connection opened"], WAIT);
    assert!(line.contains(r#"client="a\nFAKE ERROR line""#), "{line}");
    assert!(
        line.contains("conn=") && line.contains("peer=127.0.0.1:"),
        "{line}"
    );
    assert_eq!(broker.log_count("FAKE ERROR"), 1, "a forged line appeared");
}
