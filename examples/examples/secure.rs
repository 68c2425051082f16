//! A broker over TLS with users and per-topic permissions: a service logs
//! in with a password, publishes and subscribes where it is allowed, is
//! refused where it is not, and a wrong password is turned away.
//!
//! The example makes its own certificates (a CA and a broker certificate
//! for 127.0.0.1) and a password hash, as `kaelix passwd` would print it.
//!
//! ```text
//! cargo run -p kaelix-examples --example secure
//! ```

use std::path::Path;

use kaelix_broker::{hash_password, MessageBroker, Server};
use kaelix_consumer::{Consumer, ConsumerOptions};
use kaelix_core::client::{ClientOptions, Credentials};
use kaelix_core::config::load_from;
use kaelix_core::tls::ClientTls;
use kaelix_core::Error;
use kaelix_publisher::Publisher;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

/// A CA (`ca.pem`) and a certificate it signs for 127.0.0.1 (`broker.pem`,
/// `broker.key`) in `dir`.
fn make_certificates(dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;
    let key = KeyPair::generate()?;
    let broker = CertificateParams::new(vec!["127.0.0.1".to_string()])?.signed_by(&key, &ca)?;
    std::fs::write(dir.join("ca.pem"), ca.pem())?;
    std::fs::write(dir.join("broker.pem"), broker.pem())?;
    std::fs::write(dir.join("broker.key"), key.serialize_pem())?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("kaelix-secure-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    make_certificates(&dir)?;

    // The configuration a kaelix.toml would hold.
    let hash = hash_password("orders-password")?;
    let toml = format!(
        r#"
[security.tls]
enabled = true
cert_path = "{dir}/broker.pem"
key_path = "{dir}/broker.key"

[[security.auth.users]]
name = "orders-service"
password_hash = "{hash}"
publish.allow = ["orders.>"]
publish.deny = ["orders.admin.>"]
subscribe.allow = ["orders.>"]
"#,
        dir = dir.display()
    );
    std::fs::write(dir.join("kaelix.toml"), toml)?;
    let config = load_from(Some(&dir.join("kaelix.toml")), std::env::vars())?;
    let broker = MessageBroker::with_config(config);
    broker.start().await?;
    let addr = Server::spawn(&broker, "127.0.0.1:0").await?;
    println!("broker on {addr} (TLS; anonymous clients refused)");

    let client = ClientOptions {
        tls: Some(ClientTls::from_ca_file(dir.join("ca.pem"))?),
        credentials: Some(Credentials::user("orders-service", "orders-password")),
        ..ClientOptions::default()
    };
    let consumer = Consumer::connect_with(
        addr,
        ConsumerOptions {
            client: client.clone(),
            ..ConsumerOptions::default()
        },
    )
    .await?;
    let mut orders = consumer.subscribe("orders.*").await?;
    let publisher = Publisher::connect_with(addr, client.clone()).await?;
    publisher.publish("orders.new", "o-1").await?;
    let message = orders.recv().await?;
    println!("received {} {:?} over TLS", message.topic, message.payload);

    // Denied by orders.admin.>: refused, and the connection stays.
    match publisher.publish("orders.admin.purge", "all").await {
        Err(Error::Refused { code, reason }) => println!("refused ({code}): {reason}"),
        other => println!("unexpected: {other:?}"),
    }
    publisher.publish("orders.new", "o-2").await?;
    println!("still connected: published o-2");

    let wrong = ClientOptions {
        credentials: Some(Credentials::user("orders-service", "guess")),
        ..client
    };
    match Publisher::connect_with(addr, wrong).await {
        Err(err) => println!("wrong password: {err}"),
        Ok(_) => println!("unexpected: a wrong password was accepted"),
    }

    broker.shutdown().await?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
