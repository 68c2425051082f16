//! One interface over the three targets, so that every scenario drives
//! Kaelix, NATS and the relay the same way.
//!
//! - [`nats`]: a lean NATS protocol driver.
//! - [`relay`]: the raw TCP relay and its client.
//! - Kaelix goes through the real client crates, as users would.

pub mod nats;
pub mod relay;

use std::sync::OnceLock;
use std::time::Duration;

use kaelix_consumer::{Consumer, Subscription};
use kaelix_core::Topic;
use kaelix_publisher::Publisher;

use crate::error::{BenchError, Result};
use nats::NatsConn;
use relay::RelayConn;

/// How Kaelix clients connect (TLS), when not the defaults.
static KAELIX_CLIENT: OnceLock<kaelix_core::client::ClientOptions> = OnceLock::new();

/// Makes every Kaelix connection of this run use `options`.
pub fn use_kaelix_client(options: kaelix_core::client::ClientOptions) {
    let _ = KAELIX_CLIENT.set(options);
}

async fn kaelix_publisher(addr: &str) -> Result<Publisher> {
    Ok(match KAELIX_CLIENT.get() {
        Some(options) => Publisher::connect_with(addr, options.clone()).await?,
        None => Publisher::connect(addr).await?,
    })
}

async fn kaelix_consumer(addr: &str) -> Result<Consumer> {
    Ok(match KAELIX_CLIENT.get() {
        Some(options) => {
            let options = kaelix_consumer::ConsumerOptions {
                client: options.clone(),
                ..Default::default()
            };
            Consumer::connect_with(addr, options).await?
        }
        None => Consumer::connect(addr).await?,
    })
}

/// Where to connect, once a relay has been started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Kaelix(String),
    Nats(String),
    Relay(String),
}

/// A publishing connection.
pub enum Pub {
    Kaelix { publisher: Publisher, topic: Topic },
    Nats { conn: NatsConn, subject: String },
    Relay(RelayConn),
}

impl Pub {
    pub async fn connect(endpoint: &Endpoint, topic: &str) -> Result<Pub> {
        Ok(match endpoint {
            Endpoint::Kaelix(addr) => Pub::Kaelix {
                publisher: kaelix_publisher(addr).await?,
                topic: Topic::new(topic)?,
            },
            Endpoint::Nats(addr) => Pub::Nats {
                conn: NatsConn::connect(addr).await?,
                subject: topic.to_string(),
            },
            Endpoint::Relay(addr) => Pub::Relay(RelayConn::publisher(addr).await?),
        })
    }

    /// Queues payloads of `len` bytes each, laid end to end in `flat`
    /// (fire-and-forget). Kaelix takes them in one call, the others one by one
    /// into their own write buffers.
    pub async fn send_burst(&mut self, flat: &[u8], len: usize) -> Result<()> {
        match self {
            Pub::Kaelix { publisher, topic } => {
                let payloads: Vec<&[u8]> = flat.chunks(len).collect();
                publisher.send_batch(topic, &payloads).await?;
            }
            _ => {
                for payload in flat.chunks(len) {
                    self.send(payload).await?;
                }
            }
        }
        Ok(())
    }

    /// Queues one message (fire-and-forget).
    pub async fn send(&mut self, payload: &[u8]) -> Result<()> {
        match self {
            Pub::Kaelix { publisher, topic } => publisher.send_slice(topic, payload).await?,
            Pub::Nats { conn, subject } => conn.publish(subject, payload).await?,
            Pub::Relay(conn) => conn.publish(payload).await?,
        }
        Ok(())
    }

    /// Makes sure what was queued is on its way, without a round trip.
    pub async fn push(&mut self) -> Result<()> {
        match self {
            // The client's writer task sends as soon as it is woken.
            Pub::Kaelix { .. } => Ok(()),
            Pub::Nats { conn, .. } => conn.push().await,
            Pub::Relay(conn) => conn.push().await,
        }
    }

    /// Waits until the server has handled everything sent (the relay has no
    /// acknowledgements: there it only pushes).
    pub async fn flush(&mut self) -> Result<()> {
        match self {
            Pub::Kaelix { publisher, .. } => Ok(publisher.flush().await?),
            Pub::Nats { conn, .. } => conn.flush().await,
            Pub::Relay(conn) => conn.push().await,
        }
    }

    /// Publishes with an acknowledgement and waits for it.
    pub async fn send_acked(&mut self, payload: &[u8]) -> Result<()> {
        match self {
            Pub::Kaelix { publisher, topic } => {
                publisher
                    .publish(topic, bytes::Bytes::copy_from_slice(payload))
                    .await?;
                Ok(())
            }
            Pub::Nats { conn, subject } => {
                // Core NATS has no per-message acknowledgement; a PING round
                // trip after the publish is the nearest equivalent.
                conn.publish(subject, payload).await?;
                conn.flush().await
            }
            Pub::Relay(_) => Err(BenchError::Usage(
                "the relay has no acknowledgements".into(),
            )),
        }
    }
}

/// A subscribing connection.
pub enum Sub {
    Kaelix {
        _consumer: Consumer,
        subscription: Subscription,
    },
    Nats(NatsConn),
    Relay(RelayConn),
}

impl Sub {
    /// Connects and subscribes; returns once the server confirmed it.
    pub async fn connect(
        endpoint: &Endpoint,
        topic: &str,
        group: Option<&str>,
        credit: Option<u32>,
    ) -> Result<Sub> {
        if credit.is_some() && !matches!(endpoint, Endpoint::Kaelix(_)) {
            return Err(BenchError::Usage(
                "--credit is a Kaelix subscription option".into(),
            ));
        }
        Ok(match endpoint {
            Endpoint::Kaelix(addr) => {
                let consumer = kaelix_consumer(addr).await?;
                let subscription = match (group, credit) {
                    (Some(g), _) => consumer.subscribe_queue(topic, g).await?,
                    (None, Some(n)) => {
                        let window = kaelix_core::CreditWindow::messages(n);
                        let options = kaelix_core::SubscribeOptions::new().credit(window);
                        consumer.subscribe_with(topic, options).await?
                    }
                    (None, None) => consumer.subscribe(topic).await?,
                };
                Sub::Kaelix {
                    _consumer: consumer,
                    subscription,
                }
            }
            Endpoint::Nats(addr) => {
                let mut conn = NatsConn::connect(addr).await?;
                conn.subscribe(topic, group, 1).await?;
                conn.flush().await?;
                Sub::Nats(conn)
            }
            Endpoint::Relay(addr) => {
                if group.is_some() {
                    return Err(BenchError::Usage("the relay has no queue groups".into()));
                }
                Sub::Relay(RelayConn::subscriber(addr).await?)
            }
        })
    }

    /// Waits up to `idle` for messages, then hands every payload that is
    /// available to `f`. Returns how many (0 when `idle` passed).
    pub async fn recv_batch(
        &mut self,
        idle: Duration,
        f: &mut (dyn FnMut(&[u8]) + Send),
    ) -> Result<usize> {
        match self {
            Sub::Kaelix { subscription, .. } => {
                match tokio::time::timeout(idle, subscription.recv_batch(|m| f(m.payload))).await {
                    Err(_) => Ok(0),
                    Ok(n) => Ok(n?),
                }
            }
            Sub::Nats(conn) => match tokio::time::timeout(idle, conn.recv_batch(f)).await {
                Err(_) => Ok(0),
                Ok(n) => n,
            },
            Sub::Relay(conn) => match tokio::time::timeout(idle, conn.recv_batch(f)).await {
                Err(_) => Ok(0),
                Ok(n) => n,
            },
        }
    }
}
