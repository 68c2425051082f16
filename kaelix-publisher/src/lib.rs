//! The Kaelix publisher client.
//!
//! [`Publisher::publish`] sends one message and returns once the broker
//! acknowledged it, or with the broker's reason for refusing it.
//! [`Publisher::send`] is fire-and-forget: messages are buffered and written
//! in batches; [`Publisher::flush`] waits until the broker has handled all of
//! them and reports any it refused.
//!
//! ```
//! use kaelix_publisher::Publisher;
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let broker = kaelix_broker::MessageBroker::new();
//! # broker.start().await?;
//! # let addr = kaelix_broker::Server::spawn(&broker, "127.0.0.1:0").await?.to_string();
//! let publisher = Publisher::connect(&addr).await?; // addr: "127.0.0.1:8080", say
//! publisher.publish("events.user.signup", "alice").await?;
//! for i in 0..1000 {
//!     publisher.send("metrics.cpu", format!("{i}")).await?;
//! }
//! publisher.flush().await?;
//! publisher.close().await?;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use kaelix_core::client::{self, ClientOptions, CloseOnDrop, FrameReader};
use kaelix_core::outbox::{Outbox, Pushed};
use kaelix_core::protocol::encode::publish_len;
use kaelix_core::protocol::{encode_publish, Frame, HEADER_LEN};
use kaelix_core::{CloseReason, Error, Headers, Message, PartitionId, Result, Topic};
use parking_lot::Mutex;
use tokio::net::ToSocketAddrs;
use tokio::sync::oneshot;

pub use kaelix_core::client::ClientOptions as PublisherOptions;

/// A connection to a broker for publishing. Cheap to clone; clones share
/// the connection.
#[derive(Clone, Debug)]
pub struct Publisher {
    inner: Arc<Inner>,
    _guard: Arc<CloseOnDrop>,
}

#[derive(Debug)]
struct Inner {
    outbox: Arc<Outbox>,
    next_seq: AtomicU64,
    max_frame_bytes: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    acks: HashMap<u64, oneshot::Sender<Result<()>>>,
    pongs: HashMap<u64, oneshot::Sender<()>>,
    stats: HashMap<u64, oneshot::Sender<String>>,
    /// The first refusal of a fire-and-forget send since the last flush
    /// (the one `flush` returns; later ones are logged, not kept).
    refused: Vec<Error>,
    closed: Option<CloseReason>,
}

impl Publisher {
    /// Connects to a broker at `addr` (`"host:port"`).
    pub async fn connect(addr: impl ToSocketAddrs) -> Result<Publisher> {
        Self::connect_with(
            addr,
            PublisherOptions {
                name: "kaelix-publisher".into(),
                ..Default::default()
            },
        )
        .await
    }

    /// Connects with explicit options.
    pub async fn connect_with(
        addr: impl ToSocketAddrs,
        options: ClientOptions,
    ) -> Result<Publisher> {
        let conn = client::connect(addr, &options).await?;
        Ok(Self::start(conn))
    }

    fn start(conn: client::ClientConn) -> Publisher {
        let inner = Arc::new(Inner {
            outbox: conn.outbox,
            // Heartbeat pings use token 0.
            next_seq: AtomicU64::new(client::HEARTBEAT_TOKEN + 1),
            max_frame_bytes: conn.welcome.max_frame_bytes as usize,
            state: Mutex::new(State::default()),
        });
        tokio::spawn(read_loop(conn.reader, inner.clone()));
        Publisher {
            _guard: Arc::new(CloseOnDrop(inner.outbox.clone())),
            inner,
        }
    }

    /// Connects to the first of several brokers (`"host:port"` each, tried
    /// in a random order, so that clients sharing a list spread over it)
    /// that answers.
    pub async fn connect_any(addresses: &[String], options: ClientOptions) -> Result<Publisher> {
        let (conn, _) = client::connect_any(addresses, &options).await?;
        Ok(Self::start(conn))
    }

    /// Publishes `payload` on `topic` and waits for the broker's
    /// acknowledgement. A refusal comes back as [`Error::Refused`] with the
    /// broker's reason.
    pub async fn publish(&self, topic: impl AsRef<str>, payload: impl Into<Bytes>) -> Result<()> {
        let topic = Topic::new(topic)?;
        self.publish_parts(&topic, None, &Headers::new(), payload.into())
            .await
    }

    /// Publishes a whole message (headers and partition included) and waits
    /// for the acknowledgement.
    pub async fn publish_message(&self, message: &Message) -> Result<()> {
        self.publish_parts(
            &message.topic,
            message.partition,
            &message.headers,
            message.payload.clone(),
        )
        .await
    }

    async fn publish_parts(
        &self,
        topic: &Topic,
        partition: Option<PartitionId>,
        headers: &Headers,
        payload: Bytes,
    ) -> Result<()> {
        let seq = self.inner.next_seq.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut state = self.inner.state.lock();
            if let Some(reason) = &state.closed {
                return Err(Error::Closed(reason.clone()));
            }
            state.acks.insert(seq, tx);
        }
        let sent = self
            .enqueue(seq, true, topic, partition, headers, &payload, true)
            .await;
        if let Err(err) = sent {
            self.inner.state.lock().acks.remove(&seq);
            return Err(err);
        }
        rx.await
            .unwrap_or(Err(Error::Closed(CloseReason::PeerClosed)))
    }

    /// Queues `payload` on `topic` without waiting for the broker. Messages
    /// are written in batches; [`flush`](Self::flush) tells whether the broker
    /// refused any. Waits only when the send buffer is full.
    pub async fn send(&self, topic: impl AsRef<str>, payload: impl Into<Bytes>) -> Result<()> {
        let topic = Topic::new(topic)?;
        self.send_parts(&topic, None, &Headers::new(), &payload.into())
            .await
    }

    /// Like [`send`](Self::send) for a topic already validated and a
    /// borrowed payload: the payload is copied once, into the send buffer.
    pub async fn send_slice(&self, topic: &Topic, payload: &[u8]) -> Result<()> {
        let seq = self.inner.next_seq.fetch_add(1, Ordering::Relaxed);
        self.enqueue(seq, false, topic, None, &Headers::new(), payload, false)
            .await
    }

    /// Queues many payloads on one topic with a single append to the send
    /// buffer: the cheapest way to publish a burst. Like [`send`](Self::send),
    /// refusals are reported by the next [`flush`](Self::flush).
    ///
    /// ```
    /// # use kaelix_publisher::Publisher;
    /// # use kaelix_core::Topic;
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let broker = kaelix_broker::MessageBroker::new();
    /// # broker.start().await?;
    /// # let addr = kaelix_broker::Server::spawn(&broker, "127.0.0.1:0").await?.to_string();
    /// # let mut receiver = broker.subscribe("prices.eurusd").await?;
    /// let publisher = Publisher::connect(&addr).await?;
    /// let topic = Topic::new("prices.eurusd")?;
    /// publisher.send_batch(&topic, &["1.0841", "1.0842", "1.0840"]).await?;
    /// publisher.flush().await?;
    /// # assert_eq!(receiver.recv().await?.payload, "1.0841");
    /// # Ok(()) }
    /// ```
    pub async fn send_batch<P: AsRef<[u8]>>(&self, topic: &Topic, payloads: &[P]) -> Result<()> {
        let headers = Headers::new();
        let mut total = 0;
        for payload in payloads {
            let frame_len = publish_len(topic, None, &headers, payload.as_ref());
            if frame_len > self.inner.max_frame_bytes {
                return Err(Error::PayloadTooLarge {
                    size: payload.as_ref().len(),
                    max: self
                        .inner
                        .max_frame_bytes
                        .saturating_sub(frame_len - payload.as_ref().len()),
                });
            }
            total += 4 + frame_len;
        }
        let first = self
            .inner
            .next_seq
            .fetch_add(payloads.len() as u64, Ordering::Relaxed);
        let outbox = &self.inner.outbox;
        loop {
            let pushed = outbox.push(total, |b| {
                for (i, payload) in payloads.iter().enumerate() {
                    let seq = first + i as u64;
                    encode_publish(b, seq, false, topic, None, &headers, payload.as_ref());
                }
            });
            match pushed {
                Pushed::First => {
                    outbox.wake();
                    return Ok(());
                }
                Pushed::More => return Ok(()),
                Pushed::Full => outbox.wait_for_space(total).await,
                Pushed::Closed => return Err(self.closed_error()),
            }
        }
    }

    /// Queues a whole message without waiting for the broker.
    pub async fn send_message(&self, message: &Message) -> Result<()> {
        self.send_parts(
            &message.topic,
            message.partition,
            &message.headers,
            &message.payload,
        )
        .await
    }

    async fn send_parts(
        &self,
        topic: &Topic,
        partition: Option<PartitionId>,
        headers: &Headers,
        payload: &Bytes,
    ) -> Result<()> {
        let seq = self.inner.next_seq.fetch_add(1, Ordering::Relaxed);
        self.enqueue(seq, false, topic, partition, headers, payload, false)
            .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn enqueue(
        &self,
        seq: u64,
        ack: bool,
        topic: &Topic,
        partition: Option<PartitionId>,
        headers: &Headers,
        payload: &[u8],
        wake_now: bool,
    ) -> Result<()> {
        headers.validate()?;
        let frame_len = publish_len(topic, partition, headers, payload);
        if frame_len > self.inner.max_frame_bytes {
            return Err(Error::PayloadTooLarge {
                size: payload.len(),
                max: self
                    .inner
                    .max_frame_bytes
                    .saturating_sub(frame_len - payload.len()),
            });
        }
        let len = 4 + frame_len;
        let outbox = &self.inner.outbox;
        loop {
            match outbox.push(len, |b| {
                encode_publish(b, seq, ack, topic, partition, headers, payload)
            }) {
                Pushed::First => {
                    outbox.wake();
                    return Ok(());
                }
                Pushed::More => {
                    if wake_now {
                        outbox.wake();
                    }
                    return Ok(());
                }
                Pushed::Full => outbox.wait_for_space(len).await,
                Pushed::Closed => return Err(self.closed_error()),
            }
        }
    }

    /// Waits until the broker has handled everything sent so far. Returns the
    /// first refusal of a [`send`](Self::send) since the last flush, if any.
    pub async fn flush(&self) -> Result<()> {
        self.ask(Frame::Ping, |state| &mut state.pongs).await?;
        let mut state = self.inner.state.lock();
        if state.refused.is_empty() {
            Ok(())
        } else {
            let first = state.refused.remove(0);
            state.refused.clear();
            Err(first)
        }
    }

    /// The broker's statistics, as the JSON object `kaelix stats --json`
    /// prints (its fields are listed in `docs/protocol.md`).
    pub async fn server_stats(&self) -> Result<String> {
        self.ask(Frame::Stats, |state| &mut state.stats).await
    }

    /// Sends a frame carrying a fresh token and waits for the answer the
    /// read loop files under that token in `pending`.
    async fn ask<T>(
        &self,
        frame: impl FnOnce(u64) -> Frame,
        pending: impl FnOnce(&mut State) -> &mut HashMap<u64, oneshot::Sender<T>>,
    ) -> Result<T> {
        let token = self.inner.next_seq.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut state = self.inner.state.lock();
            if let Some(reason) = &state.closed {
                return Err(Error::Closed(reason.clone()));
            }
            pending(&mut state).insert(token, tx);
        }
        let frame = frame(token);
        if self
            .inner
            .outbox
            .push_now(HEADER_LEN + 8, |b| frame.encode(b))
            == Pushed::Closed
        {
            return Err(self.closed_error());
        }
        rx.await.map_err(|_| self.closed_error())
    }

    /// Flushes, then closes the connection.
    pub async fn close(&self) -> Result<()> {
        let flushed = self.flush().await;
        self.inner.outbox.close(CloseReason::Closed, None);
        flushed
    }

    fn closed_error(&self) -> Error {
        let reason = self
            .inner
            .state
            .lock()
            .closed
            .clone()
            .or_else(|| self.inner.outbox.close_reason())
            .unwrap_or(CloseReason::PeerClosed);
        Error::Closed(reason)
    }
}

async fn read_loop(mut reader: FrameReader, inner: Arc<Inner>) {
    let mut frames = Vec::new();
    let reason = loop {
        if let Err(reason) = reader.read_batch(&mut frames).await {
            break reason;
        }
        let mut pong_needed = Vec::new();
        let mut error = None;
        {
            let mut state = inner.state.lock();
            for frame in frames.drain(..) {
                match frame {
                    Frame::PubAck(seq) => {
                        if let Some(tx) = state.acks.remove(&seq) {
                            let _ = tx.send(Ok(()));
                        }
                    }
                    Frame::PubNack(nack) => {
                        let err = Error::Refused {
                            code: nack.code,
                            reason: nack.reason,
                        };
                        match state.acks.remove(&nack.id) {
                            Some(tx) => {
                                let _ = tx.send(Err(err));
                            }
                            None => {
                                tracing::warn!(error = %err, "a sent message was refused");
                                if state.refused.is_empty() {
                                    state.refused.push(err);
                                }
                            }
                        }
                    }
                    Frame::Pong(token) => {
                        if let Some(tx) = state.pongs.remove(&token) {
                            let _ = tx.send(());
                        }
                    }
                    Frame::Ping(token) => pong_needed.push(token),
                    Frame::StatsReply(reply) => {
                        if let Some(tx) = state.stats.remove(&reply.token) {
                            let _ = tx.send(reply.json);
                        }
                    }
                    Frame::Error(e) => {
                        error = Some(CloseReason::Server {
                            code: e.code,
                            reason: e.reason,
                        })
                    }
                    other => {
                        error = Some(CloseReason::Protocol(format!(
                            "unexpected {} frame from the broker",
                            other.name()
                        )))
                    }
                }
            }
        }
        for token in pong_needed {
            let pong = Frame::Pong(token);
            inner.outbox.push_now(HEADER_LEN + 8, |b| pong.encode(b));
        }
        if let Some(reason) = error {
            break reason;
        }
    };
    let mut state = inner.state.lock();
    let reason = inner
        .outbox
        .close_reason()
        .filter(|r| *r == CloseReason::Closed)
        .unwrap_or(reason);
    state.closed = Some(reason.clone());
    for (_, tx) in state.acks.drain() {
        let _ = tx.send(Err(Error::Closed(reason.clone())));
    }
    state.pongs.clear();
    state.stats.clear();
    drop(state);
    inner.outbox.close(reason, None);
}
