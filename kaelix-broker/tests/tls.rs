//! TLS through the real binary: the client crates, the `kaelix` CLI and
//! `openssl s_client` against certificates made here; mutual TLS; and
//! certificates rotated while clients stay connected.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::pki::{Issued, Pki};
use common::BrokerProcess;
use kaelix_consumer::{Consumer, ConsumerOptions};
use kaelix_core::client::ClientOptions;
use kaelix_core::tls::ClientTls;
use kaelix_core::Error;
use kaelix_publisher::Publisher;

fn tls_section(server: &Issued, client_ca: Option<&Path>) -> String {
    let mut toml = format!(
        "[security.tls]\nenabled = true\ncert_path = {:?}\nkey_path = {:?}\n",
        server.cert, server.key
    );
    if let Some(ca) = client_ca {
        toml.push_str(&format!("client_ca_path = {ca:?}\n"));
    }
    toml
}

fn options(tls: ClientTls) -> ClientOptions {
    ClientOptions {
        tls: Some(tls),
        ..ClientOptions::default()
    }
}

async fn consumer(addr: &str, client: ClientOptions) -> kaelix_core::Result<Consumer> {
    Consumer::connect_with(
        addr,
        ConsumerOptions {
            client,
            ..ConsumerOptions::default()
        },
    )
    .await
}

/// Publishes `count` acknowledged messages on `topic` and checks that
/// `sub` receives them all, in order.
async fn round_trip(
    publisher: &Publisher,
    sub: &mut kaelix_consumer::Subscription,
    topic: &str,
    count: u32,
) {
    for i in 0..count {
        publisher
            .publish(topic, format!("m{i}"))
            .await
            .expect("publish");
    }
    for i in 0..count {
        let message = tokio::time::timeout(Duration::from_secs(10), sub.recv())
            .await
            .expect("a message within 10 s")
            .expect("receive");
        assert_eq!(message.payload.as_ref(), format!("m{i}").as_bytes());
    }
}

/// What `openssl s_client` reports of a handshake: its `-brief` lines.
fn s_client(addr: &str, ca: &Path, extra: &[&str]) -> (bool, String) {
    let output = Command::new("openssl")
        .args([
            "s_client",
            "-brief",
            "-verify_return_error",
            "-connect",
            addr,
        ])
        .arg("-CAfile")
        .arg(ca)
        .args(extra)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl is installed (.ci/run installs it)");
    let text = String::from_utf8_lossy(&output.stderr).to_string()
        + &String::from_utf8_lossy(&output.stdout);
    (output.status.success(), text)
}

#[tokio::test]
async fn clients_publish_and_subscribe_over_tls_and_plain_tcp_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "test-ca");
    let server = pki.server("server", "kaelix-test-server");
    let broker = BrokerProcess::with_config_in(dir.path(), &tls_section(&server, None));
    let addr = broker.addr();

    let tls = ClientTls::from_ca_file(pki.ca_path()).unwrap();
    let consumer = consumer(&addr, options(tls.clone()))
        .await
        .expect("TLS consumer");
    let mut sub = consumer.subscribe("secure.>").await.unwrap();
    let publisher = Publisher::connect_with(&addr, options(tls))
        .await
        .expect("TLS publisher");
    round_trip(&publisher, &mut sub, "secure.orders", 200).await;

    // By host name, as the certificate also names localhost.
    let by_name = ClientTls::builder()
        .ca_file(pki.ca_path())
        .unwrap()
        .server_name("localhost")
        .build()
        .unwrap();
    Publisher::connect_with(&addr, options(by_name))
        .await
        .expect("TLS by host name");

    // A name the certificate does not carry, and a CA that did not sign it.
    let wrong_name = ClientTls::builder()
        .ca_file(pki.ca_path())
        .unwrap()
        .server_name("elsewhere.example")
        .build()
        .unwrap();
    let err = Publisher::connect_with(&addr, options(wrong_name))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Tls(_)), "{err}");
    let other = Pki::new(dir.path(), "other-ca");
    let err = Publisher::connect_with(
        &addr,
        options(ClientTls::from_ca_file(other.ca_path()).unwrap()),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("certificate"), "{err}");

    // Plain TCP to a TLS port: no WELCOME, the broker says why it closed.
    let plain = Publisher::connect_with(
        &addr,
        ClientOptions {
            connect_timeout: Duration::from_secs(3),
            ..ClientOptions::default()
        },
    )
    .await;
    assert!(plain.is_err());
    broker.wait_for_log(&["TLS handshake failed"], Duration::from_secs(10));

    // The TLS clients carried on through all of that.
    round_trip(&publisher, &mut sub, "secure.more", 10).await;
    let (_, metrics) = broker.http_get("/metrics");
    assert!(
        metrics.contains("kaelix_connections_closed_total{reason=\"tls_handshake\"}"),
        "{metrics}"
    );
}

#[test]
fn openssl_s_client_verifies_the_certificate_over_tls_1_3_and_1_2() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "test-ca");
    let server = pki.server("server", "kaelix-test-server");
    let broker = BrokerProcess::with_config_in(dir.path(), &tls_section(&server, None));
    let addr = broker.addr();

    for (flag, version) in [("-tls1_3", "TLSv1.3"), ("-tls1_2", "TLSv1.2")] {
        let (ok, text) = s_client(&addr, &pki.ca_path(), &[flag, "-servername", "localhost"]);
        assert!(ok, "{flag}: {text}");
        assert!(
            text.contains(&format!("Protocol version: {version}")),
            "{text}"
        );
        assert!(text.contains("Verification: OK"), "{text}");
        assert!(text.contains("CN = kaelix-test-server"), "{text}");
    }
    // TLS 1.1 and older are not offered.
    let (ok, text) = s_client(&addr, &pki.ca_path(), &["-tls1_1"]);
    assert!(!ok, "{text}");
}

#[tokio::test]
async fn mutual_tls_requires_a_certificate_signed_by_the_client_ca() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "test-ca");
    let server = pki.server("server", "kaelix-test-server");
    let client = pki.client("client", "orders-service");
    let broker =
        BrokerProcess::with_config_in(dir.path(), &tls_section(&server, Some(&pki.ca_path())));
    let addr = broker.addr();

    let with_cert = ClientTls::builder()
        .ca_file(pki.ca_path())
        .unwrap()
        .client_cert_files(&client.cert, &client.key)
        .unwrap()
        .build()
        .unwrap();
    let consumer = consumer(&addr, options(with_cert.clone()))
        .await
        .expect("mutual TLS");
    let mut sub = consumer.subscribe("mtls").await.unwrap();
    let publisher = Publisher::connect_with(&addr, options(with_cert))
        .await
        .unwrap();
    round_trip(&publisher, &mut sub, "mtls", 20).await;

    // No certificate.
    let without = ClientTls::from_ca_file(pki.ca_path()).unwrap();
    assert!(Publisher::connect_with(&addr, options(without))
        .await
        .is_err());
    // A certificate from a CA the broker does not trust.
    let other = Pki::new(dir.path(), "other-ca");
    let stranger = other.client("stranger", "orders-service");
    let forged = ClientTls::builder()
        .ca_file(pki.ca_path())
        .unwrap()
        .client_cert_files(&stranger.cert, &stranger.key)
        .unwrap()
        .build()
        .unwrap();
    assert!(Publisher::connect_with(&addr, options(forged))
        .await
        .is_err());
    broker.wait_for_log(&["TLS handshake failed"], Duration::from_secs(10));

    // openssl as a client, with and without a certificate.
    let cert = client.cert.to_str().unwrap();
    let key = client.key.to_str().unwrap();
    let (ok, text) = s_client(&addr, &pki.ca_path(), &["-cert", cert, "-key", key]);
    assert!(ok && text.contains("Verification: OK"), "{text}");
    round_trip(&publisher, &mut sub, "mtls", 5).await;
}

/// Replaces `to` by `from` the way deployment tools do: a new file renamed
/// over the old one.
fn replace(from: &Path, to: &Path) {
    let tmp = to.with_extension("tmp");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

#[tokio::test]
async fn certificates_rotate_without_a_restart_and_a_broken_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "test-ca");
    let live = pki.server("live", "first");
    let broker = BrokerProcess::with_config_in(dir.path(), &tls_section(&live, None));
    let addr = broker.addr();
    let ca = pki.ca_path();
    let subject = |expect: &str| {
        let (ok, text) = s_client(&addr, &ca, &[]);
        ok && text.contains(&format!("CN = {expect}"))
    };
    assert!(subject("first"));

    // Clients connected before the rotation.
    let tls = ClientTls::from_ca_file(&ca).unwrap();
    let consumer = consumer(&addr, options(tls.clone())).await.unwrap();
    let mut sub = consumer.subscribe("rotate").await.unwrap();
    let publisher = Publisher::connect_with(&addr, options(tls.clone()))
        .await
        .unwrap();
    round_trip(&publisher, &mut sub, "rotate", 10).await;

    let next = pki.server("next", "second");
    replace(&next.cert, &live.cert);
    replace(&next.key, &live.key);
    common::eventually(
        Duration::from_secs(10),
        "new connections get the new certificate",
        || subject("second"),
    )
    .await;
    // The old connections carry on; new clients connect.
    round_trip(&publisher, &mut sub, "rotate", 10).await;
    Publisher::connect_with(&addr, options(tls.clone()))
        .await
        .unwrap();

    // A broken certificate is refused and the last good one stays.
    std::fs::write(&live.cert, "-----BEGIN CERTIFICATE-----\nbroken\n").unwrap();
    broker.wait_for_log(
        &["TLS certificate refused", "the certificate in force stays"],
        Duration::from_secs(10),
    );
    assert!(subject("second"));
    // So is an expired one.
    let expired = pki.expired_server("expired");
    replace(&expired.key, &live.key);
    replace(&expired.cert, &live.cert);
    broker.wait_for_log(&["the certificate expired"], Duration::from_secs(10));
    assert!(subject("second"));
    round_trip(&publisher, &mut sub, "rotate", 10).await;

    let (_, metrics) = broker.http_get("/metrics");
    assert!(
        metrics.contains("kaelix_tls_certificate_reloads_total{result=\"refused\"}"),
        "{metrics}"
    );
}

#[test]
fn the_cli_publishes_and_subscribes_over_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "test-ca");
    let server = pki.server("server", "kaelix-test-server");
    let client = pki.client("client", "cli-user");
    let broker =
        BrokerProcess::with_config_in(dir.path(), &tls_section(&server, Some(&pki.ca_path())));
    let kaelix = |args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kaelix"));
        cmd.args(["--server", &broker.addr(), "--tls-ca"])
            .arg(pki.ca_path())
            .arg("--tls-cert")
            .arg(&client.cert)
            .arg("--tls-key")
            .arg(&client.key)
            .args(args);
        cmd
    };
    let sub = kaelix(&["sub", "cli.tls", "--count", "1"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The subscriber is up once a publish reaches it; publish until then.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut sub = sub;
    loop {
        let out = kaelix(&["pub", "cli.tls", "over-tls"]).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        if let Some(status) = sub.try_wait().unwrap() {
            assert!(status.success());
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the subscriber got nothing"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut line = String::new();
    std::io::Read::read_to_string(&mut sub.stdout.take().unwrap(), &mut line).unwrap();
    assert_eq!(line.trim(), "cli.tls over-tls");

    // Without a certificate the broker refuses it.
    let out = Command::new(env!("CARGO_BIN_EXE_kaelix"))
        .args(["--server", &broker.addr(), "--tls-ca"])
        .arg(pki.ca_path())
        .args(["pub", "cli.tls", "x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_tls_handshakes_is_bounded_and_connected_clients_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "test-ca");
    let server = pki.server("server", "kaelix-test-server");
    let toml = format!(
        "handshake_timeout_ms = 2000\n{}\n[limits]\nmax_pending_handshakes = 16\n",
        tls_section(&server, None)
    );
    let broker = BrokerProcess::with_config_in(dir.path(), &toml);
    let addr = broker.addr();
    let tls = ClientTls::from_ca_file(pki.ca_path()).unwrap();
    let consumer = consumer(&addr, options(tls.clone())).await.unwrap();
    let mut sub = consumer.subscribe("steady").await.unwrap();
    let publisher = Publisher::connect_with(&addr, options(tls.clone()))
        .await
        .unwrap();
    const N: u32 = 5_000;
    let traffic = tokio::spawn(async move {
        for i in 0..N {
            publisher
                .send("steady", i.to_be_bytes().to_vec())
                .await
                .unwrap();
            if i % 250 == 249 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        publisher.flush().await.unwrap();
    });

    // Waves of full handshakes; `silent` connections that never start
    // theirs hold every place during the first waves.
    let wave = |addr: String, tls: ClientTls| async move {
        let mut tasks = Vec::new();
        for _ in 0..30 {
            let (addr, tls) = (addr.clone(), tls.clone());
            tasks.push(tokio::spawn(async move {
                Publisher::connect_with(&addr, options(tls)).await.is_ok()
            }));
        }
        let mut connected = 0;
        for task in tasks {
            connected += usize::from(task.await.unwrap());
        }
        connected
    };
    let mut silent = Vec::new();
    for _ in 0..16 {
        silent.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    let mut refused = 0;
    for _ in 0..3 {
        refused += 30 - wave(addr.clone(), tls.clone()).await;
    }
    drop(silent);
    let mut connected = 0;
    for _ in 0..7 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        connected += wave(addr.clone(), tls.clone()).await;
    }
    eprintln!("handshake flood: {refused} refused while the places were held, {connected} of 210 connected after");
    assert!(connected > 0, "handshakes go through once places are free");
    for i in 0..N {
        let m = tokio::time::timeout(Duration::from_secs(30), sub.recv())
            .await
            .expect("a message within 30 s")
            .expect("the subscription stays open");
        assert_eq!(m.payload.as_ref(), i.to_be_bytes());
    }
    traffic.await.unwrap();
    assert!(refused > 0, "the flood met the bound");
    let (_, metrics) = broker.http_get("/metrics");
    let line = metrics
        .lines()
        .find(|l| l.starts_with("kaelix_connections_rejected_total{reason=\"handshake_limit\"}"))
        .unwrap_or_default()
        .to_string();
    assert!(!line.ends_with(" 0") && !line.is_empty(), "{line}");
}
