//! Authentication and per-topic permissions through the real binary:
//! passwords hashed by `kaelix passwd`, tokens, client certificates, and
//! permissions changed by a reload while clients stay connected.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::pki::Pki;
use common::BrokerProcess;
use kaelix_consumer::{Consumer, ConsumerOptions};
use kaelix_core::client::{ClientOptions, Credentials};
use kaelix_core::protocol::ErrorCode;
use kaelix_core::tls::ClientTls;
use kaelix_core::{CloseReason, Error};
use kaelix_publisher::Publisher;

const TOKEN: &str = "svc-token-0123456789abcdef";

/// `kaelix passwd` with the password on standard input.
fn passwd(password: &str) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kaelix"))
        .arg("passwd")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let hash = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    assert!(!hash.contains(password));
    hash
}

fn auth_toml(alice_hash: &str, alice_subscribe: &str, with_svc: bool) -> String {
    let mut toml = format!(
        r#"
[security.auth]

[[security.auth.users]]
name = "alice"
password_hash = "{alice_hash}"
publish.allow = ["orders.>"]
publish.deny = ["orders.admin.>"]
subscribe.allow = [{alice_subscribe}]
subscribe.deny = ["orders.secret.>"]
"#
    );
    if with_svc {
        toml.push_str(&format!(
            r#"
[[security.auth.users]]
name = "svc"
token = "{TOKEN}"
publish.allow = [">"]
subscribe.allow = [">"]
"#
        ));
    }
    toml
}

fn write_config(dir: &Path, extra: &str) {
    // As the test helper writes it, so a rewrite changes only `extra`.
    let toml = format!("[network]\nhost = \"127.0.0.1\"\nport = 0\n\n{extra}\n");
    let tmp = dir.join("kaelix.toml.tmp");
    std::fs::write(&tmp, toml).unwrap();
    std::fs::rename(tmp, dir.join("kaelix.toml")).unwrap();
}

fn with(credentials: Credentials) -> ClientOptions {
    ClientOptions {
        credentials: Some(credentials),
        ..ClientOptions::default()
    }
}

async fn connect_consumer(addr: &str, client: ClientOptions) -> kaelix_core::Result<Consumer> {
    let options = ConsumerOptions {
        client,
        ..ConsumerOptions::default()
    };
    Consumer::connect_with(addr, options).await
}

fn refused(result: kaelix_core::Result<impl std::fmt::Debug>, code: ErrorCode) -> String {
    match result {
        Err(Error::Refused { code: c, reason }) if c == code => reason,
        other => panic!("expected a {code} refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn passwords_and_tokens_log_in_and_failures_are_refused_counted_and_logged_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let hash = passwd("correct horse battery");
    let broker = BrokerProcess::with_config_in(dir.path(), &auth_toml(&hash, "\"orders.>\"", true));
    let addr = broker.addr();

    let alice = Credentials::user("alice", "correct horse battery");
    let publisher = Publisher::connect_with(&addr, with(alice.clone()))
        .await
        .expect("alice logs in");
    publisher.publish("orders.new", "o-1").await.unwrap();
    let svc = Publisher::connect_with(&addr, with(Credentials::token(TOKEN)))
        .await
        .expect("token");
    svc.publish("anything.at.all", "x").await.unwrap();

    let wrong = Credentials::user("alice", "Tr0ub4dor&3");
    let reason = refused(
        Publisher::connect_with(&addr, with(wrong)).await,
        ErrorCode::AuthenticationFailed,
    );
    assert_eq!(
        reason,
        "authentication failed: unknown user or wrong password"
    );
    let nobody = Credentials::user("mallory", "guess");
    let same = refused(
        Publisher::connect_with(&addr, with(nobody)).await,
        ErrorCode::AuthenticationFailed,
    );
    assert_eq!(
        same, reason,
        "an unknown user and a wrong password look the same"
    );
    refused(
        Publisher::connect_with(&addr, with(Credentials::token("not-the-token"))).await,
        ErrorCode::AuthenticationFailed,
    );
    let reason = refused(
        Publisher::connect(&addr).await,
        ErrorCode::AuthenticationFailed,
    );
    assert!(reason.contains("credentials required"), "{reason}");

    broker.wait_for_log(
        &["authentication failed (wrong_password)", "alice"],
        Duration::from_secs(10),
    );
    broker.wait_for_log(
        &["authentication failed (no_credentials)"],
        Duration::from_secs(10),
    );
    let log = broker.log.lock().unwrap().join("\n");
    for secret in [
        "Tr0ub4dor&3",
        "guess",
        "not-the-token",
        "correct horse battery",
        TOKEN,
    ] {
        assert!(!log.contains(secret), "{secret:?} reached the log");
    }
    let (_, metrics) = broker.http_get("/metrics");
    for line in [
        "kaelix_auth_failures_total{reason=\"wrong_password\"} 1",
        "kaelix_auth_failures_total{reason=\"unknown_user\"} 1",
        "kaelix_auth_failures_total{reason=\"unknown_token\"} 1",
        "kaelix_auth_failures_total{reason=\"no_credentials\"} 1",
        "kaelix_connections_closed_total{reason=\"authentication_failed\"} 4",
    ] {
        assert!(metrics.contains(line), "{line} missing:\n{metrics}");
    }
    // The good clients were not disturbed.
    publisher.publish("orders.new", "o-2").await.unwrap();
}

#[tokio::test]
async fn permissions_refuse_by_topic_and_a_reload_changes_them_for_open_connections() {
    let dir = tempfile::tempdir().unwrap();
    let hash = kaelix_broker::hash_password("pw").unwrap();
    let broker = BrokerProcess::with_config_in(
        dir.path(),
        &auth_toml(&hash, "\"orders.>\", \"billing.>\"", true),
    );
    let addr = broker.addr();
    let alice = Credentials::user("alice", "pw");

    let publisher = Publisher::connect_with(&addr, with(alice.clone()))
        .await
        .unwrap();
    let reason = refused(
        publisher.publish("orders.admin.drop", "x").await,
        ErrorCode::NotPermitted,
    );
    assert_eq!(
        reason,
        "user \"alice\" may not publish to orders.admin.drop: denied by orders.admin.>"
    );
    let reason = refused(
        publisher.publish("audit.log", "x").await,
        ErrorCode::NotPermitted,
    );
    assert!(reason.contains("audit.log"), "{reason}");
    // The connection stays.
    publisher.publish("orders.eu.new", "fine").await.unwrap();
    broker.wait_for_log(
        &["publish refused", "not-permitted", "orders.admin.drop"],
        Duration::from_secs(10),
    );

    let consumer = connect_consumer(&addr, with(alice.clone())).await.unwrap();
    let reason = refused(
        consumer.subscribe("orders.>").await,
        ErrorCode::NotPermitted,
    );
    assert!(reason.contains("orders.secret.>"), "{reason}");
    let reason = refused(consumer.subscribe("audit.>").await, ErrorCode::NotPermitted);
    assert!(reason.contains("may not subscribe to audit.>"), "{reason}");
    let mut eu = consumer.subscribe("orders.eu.*").await.unwrap();
    let mut billing = consumer.subscribe("billing.*").await.unwrap();
    publisher.publish("orders.eu.new", "o-1").await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), eu.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.payload.as_ref(), b"o-1");

    // svc, connected by token, is about to be removed.
    let svc = Publisher::connect_with(&addr, with(Credentials::token(TOKEN)))
        .await
        .unwrap();
    let svc_consumer = connect_consumer(&addr, with(Credentials::token(TOKEN)))
        .await
        .unwrap();
    let mut svc_sub = svc_consumer.subscribe("billing.*").await.unwrap();

    // Alice loses billing.>; svc goes.
    write_config(dir.path(), &auth_toml(&hash, "\"orders.>\"", false));
    broker.wait_for_log(&["subscription revoked"], Duration::from_secs(20));
    let err = tokio::time::timeout(Duration::from_secs(10), billing.recv())
        .await
        .unwrap()
        .unwrap_err();
    match err {
        Error::Closed(CloseReason::Server { code, reason }) => {
            assert_eq!(code, ErrorCode::NotPermitted);
            assert!(reason.contains("billing.*"), "{reason}");
        }
        other => panic!("expected the subscription to end, got {other:?}"),
    }
    refused(
        consumer.subscribe("billing.>").await,
        ErrorCode::NotPermitted,
    );
    // What is still allowed carries on, on the same connections.
    publisher.publish("orders.eu.new", "o-2").await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), eu.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.payload.as_ref(), b"o-2");

    // svc's connections were closed, with the reason.
    let err = tokio::time::timeout(Duration::from_secs(10), svc_sub.recv())
        .await
        .unwrap()
        .unwrap_err();
    assert!(err.to_string().contains("may no longer connect"), "{err}");
    assert!(svc.publish("x.y", "z").await.is_err());
    refused(
        Publisher::connect_with(&addr, with(Credentials::token(TOKEN))).await,
        ErrorCode::AuthenticationFailed,
    );
}

#[tokio::test]
async fn a_client_certificate_is_an_identity_under_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "test-ca");
    let server = pki.server("server", "broker");
    let service = pki.client("service", "orders-service");
    let stranger = pki.client("stranger", "stranger");
    let toml = format!(
        r#"
[security.tls]
enabled = true
cert_path = {:?}
key_path = {:?}
client_ca_path = {:?}

[security.auth]
certificate_identity = true

[[security.auth.users]]
name = "orders-service"
publish.allow = ["orders.>"]
subscribe.allow = ["orders.>"]
"#,
        server.cert,
        server.key,
        pki.ca_path()
    );
    let broker = BrokerProcess::with_config_in(dir.path(), &toml);
    let addr = broker.addr();
    let tls_as = |who: &common::pki::Issued| ClientOptions {
        tls: Some(
            ClientTls::builder()
                .ca_file(pki.ca_path())
                .unwrap()
                .client_cert_files(&who.cert, &who.key)
                .unwrap()
                .build()
                .unwrap(),
        ),
        ..ClientOptions::default()
    };
    let publisher = Publisher::connect_with(&addr, tls_as(&service))
        .await
        .expect("identified by its certificate");
    publisher.publish("orders.new", "x").await.unwrap();
    refused(
        publisher.publish("billing.new", "x").await,
        ErrorCode::NotPermitted,
    );
    let reason = refused(
        Publisher::connect_with(&addr, tls_as(&stranger)).await,
        ErrorCode::AuthenticationFailed,
    );
    assert!(reason.contains("certificate"), "{reason}");
}

#[test]
fn the_cli_logs_in_with_a_password_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let hash = kaelix_broker::hash_password("s3cret-pass").unwrap();
    let broker =
        BrokerProcess::with_config_in(dir.path(), &auth_toml(&hash, "\"orders.>\"", false));
    let kaelix = |password: &str| {
        Command::new(env!("CARGO_BIN_EXE_kaelix"))
            .args([
                "--server",
                &broker.addr(),
                "--user",
                "alice",
                "pub",
                "orders.cli",
                "hi",
            ])
            .env("KAELIX_PASSWORD", password)
            .output()
            .unwrap()
    };
    let ok = kaelix("s3cret-pass");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let bad = kaelix("wrong");
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("authentication failed"), "{stderr}");
}

#[test]
fn check_config_validates_users_and_does_not_print_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("kaelix.toml");
    let check = |toml: &str| {
        std::fs::write(&file, toml).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_kaelix-broker"))
            .arg("--config")
            .arg(&file)
            .arg("--check-config")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    };
    let (ok, text) = check(&format!(
        "[[security.auth.users]]\nname = \"svc\"\ntoken = \"{TOKEN}\"\n"
    ));
    assert!(ok, "{text}");
    assert!(!text.contains(TOKEN), "{text}");
    assert!(
        text.contains("passwords and tokens cross the network in the clear"),
        "{text}"
    );

    let (ok, text) = check(
        "[[security.auth.users]]\nname = \"a\"\npassword_hash = \"plain\"\nsubscribe.allow = [\"a..b\"]\n\
         [[security.auth.users]]\nname = \"a\"\n",
    );
    assert!(!ok);
    for problem in [
        "security.auth.users[0].password_hash: not a password hash in PHC form",
        "security.auth.users[0].subscribe.allow[0]:",
        "security.auth.users[1].name: \"a\" is listed more than once",
        "security.auth.users[1]: user \"a\" has no way to log in",
    ] {
        assert!(text.contains(problem), "{problem} missing from {text}");
    }
    let (ok, text) = check("[security.auth]\ncertificate_identity = true\n");
    assert!(!ok);
    assert!(
        text.contains("security.auth.certificate_identity: needs mutual TLS"),
        "{text}"
    );
}
