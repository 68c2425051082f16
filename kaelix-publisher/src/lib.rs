//! The Kaelix publisher client.
//!
//! [`Publisher::publish`] sends one message and returns once the broker
//! acknowledged it, or with the broker's reason for refusing it.
//! [`Publisher::send`] is fire-and-forget: messages are buffered and written
//! in batches; [`Publisher::flush`] waits until the broker has handled all of
//! them and reports any it refused.
//!
//! A publisher rides through a lost connection: it reconnects (to any of
//! its brokers, with backoff), holds what is sent meanwhile in a bounded
//! buffer, and sends again the acknowledged publishes it had no answer
//! for; the broker recognises those by the publisher's id and never routes
//! one twice. `docs/clients.md` says what is guaranteed in each failure.
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

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use kaelix_core::client::session::{self, Ended, Session};
use kaelix_core::client::{
    self, hello_keys, ClientOptions, CloseOnDrop, ConnectionEvent, FrameReader, Link,
};
use kaelix_core::outbox::Pushed;
use kaelix_core::protocol::encode::publish_len;
use kaelix_core::protocol::{
    self, encode_publish, AdminRequest, ErrorCode, Frame, Peek, HEADER_LEN,
};
use kaelix_core::{CloseReason, Error, Headers, Message, PartitionId, Result, Topic};
use parking_lot::Mutex;
use tokio::net::ToSocketAddrs;
use tokio::sync::{broadcast, oneshot};

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
    link: Arc<Link>,
    next_seq: AtomicU64,
    /// The largest frame the broker in use takes.
    max_frame_bytes: AtomicUsize,
    state: Mutex<State>,
}

/// Lock order: a slot's outbox, then this (an acknowledged publish is
/// filed under the outbox lock, so that it is filed with the slot it went
/// into).
#[derive(Debug, Default)]
struct State {
    /// Acknowledged publishes without an answer yet, by sequence number:
    /// sent again after a reconnect.
    acks: BTreeMap<u64, Pending>,
    pongs: HashMap<u64, oneshot::Sender<()>>,
    stats: HashMap<u64, oneshot::Sender<String>>,
    /// Operator requests without an answer yet: not sent again after a
    /// reconnect (a change is not repeated blindly); they fail instead.
    admin: HashMap<u64, oneshot::Sender<(Option<ErrorCode>, String)>>,
    /// The first refusal of a fire-and-forget send since the last flush
    /// (the one `flush` returns; later ones are logged, not kept).
    refused: Vec<Error>,
    /// A connection lost since the last flush.
    lost: Option<CloseReason>,
    closed: Option<CloseReason>,
}

#[derive(Debug)]
struct Pending {
    /// The whole frame, to send again.
    frame: Bytes,
    /// The slot it went into: one parked while disconnected goes out with
    /// the parked frames, not again.
    gen: u64,
    tx: oneshot::Sender<Result<()>>,
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
        Self::connect_any(&client::resolve(addr).await?, options).await
    }

    /// Connects to the first of several brokers (`"host:port"` each, tried
    /// in a random order, so that clients sharing a list spread over it)
    /// that answers; reconnects go to any of them.
    pub async fn connect_any(addresses: &[String], options: ClientOptions) -> Result<Publisher> {
        // New for each publisher: the broker tells its retries apart from
        // another's publishes by it, and its sequence numbers start again.
        let id = format!("{:016x}{:016x}", rand_u64(), rand_u64());
        let properties = vec![(hello_keys::PUBLISHER_ID.to_string(), id)];
        let (conn, addr) = client::connect_any_as(addresses, &options, &properties).await?;
        let max_frame_bytes = conn.welcome.max_frame_bytes as usize;
        let link = Link::new(&conn, addr, addresses.to_vec(), options, properties);
        let inner = Arc::new(Inner {
            link: link.clone(),
            // Heartbeat pings use token 0.
            next_seq: AtomicU64::new(client::HEARTBEAT_TOKEN + 1),
            max_frame_bytes: AtomicUsize::new(max_frame_bytes),
            state: Mutex::new(State::default()),
        });
        tokio::spawn(run(conn, inner.clone()));
        Ok(Publisher {
            _guard: Arc::new(CloseOnDrop(link)),
            inner,
        })
    }

    /// What happens to the connection from now on: lost, each reconnect
    /// attempt, back again.
    pub fn events(&self) -> broadcast::Receiver<ConnectionEvent> {
        self.inner.link.events()
    }

    /// Whether a connection to a broker is up now.
    pub fn is_connected(&self) -> bool {
        self.inner.link.is_connected()
    }

    /// The broker connected to (or, while reconnecting, last connected to).
    pub fn broker_addr(&self) -> String {
        self.inner.link.addr()
    }

    /// Publishes `payload` on `topic` and waits for the broker's
    /// acknowledgement. A refusal comes back as [`Error::Refused`] with the
    /// broker's reason. Across a lost connection the publish is sent again
    /// once reconnected, and routed once.
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
        headers.validate()?;
        let len = self.frame_len(topic, partition, headers, &payload)?;
        let seq = self.inner.next_seq.fetch_add(1, Ordering::Relaxed);
        let mut frame = BytesMut::with_capacity(len);
        encode_publish(&mut frame, seq, true, topic, partition, headers, &payload);
        let frame = frame.freeze();
        let (tx, rx) = oneshot::channel();
        if let Some(reason) = &self.inner.state.lock().closed {
            return Err(Error::Closed(reason.clone()));
        }
        let mut tx = Some(tx);
        let state = &self.inner.state;
        self.inner
            .link
            .push(
                len,
                |b, gen| {
                    b.extend_from_slice(&frame);
                    if let Some(tx) = tx.take() {
                        let frame = frame.clone();
                        state.lock().acks.insert(seq, Pending { frame, gen, tx });
                    }
                },
                true,
            )
            .await?;
        rx.await
            .unwrap_or_else(|_| Err(self.inner.link.closed_error()))
    }

    /// The length of a PUBLISH frame (prefix included), or the error for
    /// one larger than the broker takes.
    fn frame_len(
        &self,
        topic: &Topic,
        partition: Option<PartitionId>,
        headers: &Headers,
        payload: &[u8],
    ) -> Result<usize> {
        let frame_len = publish_len(topic, partition, headers, payload);
        let max = self.inner.max_frame_bytes.load(Ordering::Relaxed);
        if frame_len > max {
            return Err(Error::PayloadTooLarge {
                size: payload.len(),
                max: max.saturating_sub(frame_len - payload.len()),
            });
        }
        Ok(4 + frame_len)
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
        self.enqueue(topic, None, &Headers::new(), payload).await
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
            total += self.frame_len(topic, None, &headers, payload.as_ref())?;
        }
        let first = self
            .inner
            .next_seq
            .fetch_add(payloads.len() as u64, Ordering::Relaxed);
        self.inner
            .link
            .push(
                total,
                |b, _| {
                    for (i, payload) in payloads.iter().enumerate() {
                        let seq = first + i as u64;
                        encode_publish(b, seq, false, topic, None, &headers, payload.as_ref());
                    }
                },
                false,
            )
            .await
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
        self.enqueue(topic, partition, headers, payload).await
    }

    /// Queues one fire-and-forget publish.
    async fn enqueue(
        &self,
        topic: &Topic,
        partition: Option<PartitionId>,
        headers: &Headers,
        payload: &[u8],
    ) -> Result<()> {
        headers.validate()?;
        let len = self.frame_len(topic, partition, headers, payload)?;
        let seq = self.inner.next_seq.fetch_add(1, Ordering::Relaxed);
        self.inner
            .link
            .push(
                len,
                |b, _| encode_publish(b, seq, false, topic, partition, headers, payload),
                false,
            )
            .await
    }

    /// Waits until the broker has handled everything sent so far. Returns the
    /// first refusal of a [`send`](Self::send) since the last flush, if any,
    /// or [`Error::ConnectionLost`] if the connection was lost (and made
    /// again) since: sends of that time may not have arrived.
    pub async fn flush(&self) -> Result<()> {
        self.ask(Frame::Ping, |state| &mut state.pongs).await?;
        let mut state = self.inner.state.lock();
        if let Some(reason) = state.lost.take() {
            state.refused.clear();
            return Err(Error::ConnectionLost(reason));
        }
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

    /// Sends an operator's request (one JSON object, as `docs/protocol.md`
    /// describes ADMIN) and returns what the broker did; a refusal is
    /// [`Error::Refused`] with its code and reason. `kaelix cluster` uses it.
    pub async fn admin(&self, request: &str) -> Result<String> {
        let json = request.to_string();
        let (code, text) = self
            .ask(
                |token| Frame::Admin(AdminRequest { token, json }),
                |state| &mut state.admin,
            )
            .await?;
        match code {
            None => Ok(text),
            Some(code) => Err(Error::Refused { code, reason: text }),
        }
    }

    /// Sends a frame carrying a fresh token and waits for the answer the
    /// read loop files under that token in `pending` (asked again after a
    /// reconnect).
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
        let pushed = self
            .inner
            .link
            .push_now(HEADER_LEN + 8, |b| frame.encode(b));
        if pushed == Pushed::Closed && self.inner.link.ended().is_some() {
            return Err(self.inner.link.closed_error());
        }
        // Otherwise, pushed into a connection just lost: asked again on
        // the next.
        rx.await.map_err(|_| self.inner.link.closed_error())
    }

    /// Flushes, then closes the connection.
    pub async fn close(&self) -> Result<()> {
        let flushed = self.flush().await;
        self.inner.link.close(CloseReason::Closed);
        flushed
    }
}

fn rand_u64() -> u64 {
    rand::random()
}

/// The reader task: every connection of the publisher in turn (see
/// [`session::supervise`]), then every call still waiting gets the reason
/// the publisher closed.
async fn run(conn: client::ClientConn, inner: Arc<Inner>) {
    let link = inner.link.clone();
    session::supervise(link, conn, &mut PublisherSession(inner.clone())).await;
    let reason = inner.link.ended().unwrap_or(CloseReason::Closed);
    let mut state = inner.state.lock();
    state.closed = Some(reason.clone());
    for (_, pending) in std::mem::take(&mut state.acks) {
        let _ = pending.tx.send(Err(Error::Closed(reason.clone())));
    }
    state.pongs.clear();
    state.stats.clear();
    state.admin.clear();
}

struct PublisherSession(Arc<Inner>);

impl Session for PublisherSession {
    fn read<'a>(
        &'a mut self,
        reader: &'a mut FrameReader,
    ) -> impl std::future::Future<Output = Ended> + Send + 'a {
        read_loop(reader, &self.0)
    }

    fn lost(&mut self, reason: &CloseReason, unwritten: BytesMut) -> BytesMut {
        self.0.state.lock().lost = Some(reason.clone());
        unwritten_sends(unwritten)
    }

    fn circuit_open(&mut self, link: &Link) {
        fail_parked_publishes(&self.0, link);
    }

    fn resume(&mut self, next: &client::ClientConn, moved: bool) {
        let resend = if moved {
            Resend::All
        } else {
            Resend::NotParked
        };
        resume(&self.0, next, resend);
    }
}

/// The circuit is open: acknowledged publishes parked while disconnected
/// fail now with [`Error::CircuitOpen`], and leave the buffer (so they
/// are not sent later behind an error); fire-and-forget sends stay parked.
fn fail_parked_publishes(inner: &Inner, link: &Link) {
    let parked = link.slot().gen;
    link.repark(unwritten_sends);
    let mut state = inner.state.lock();
    let failed: Vec<u64> = state
        .acks
        .iter()
        .filter(|(_, pending)| pending.gen == parked)
        .map(|(seq, _)| *seq)
        .collect();
    for seq in failed {
        if let (Some(pending), Some(err)) = (state.acks.remove(&seq), link.circuit_error()) {
            let _ = pending.tx.send(Err(err));
        }
    }
}

/// What of a lost connection's unwritten frames goes out on the next:
/// everything but acknowledged publishes, which are sent again from
/// `State::acks` (the rest are fire-and-forget publishes, never written, so
/// sending them now cannot duplicate them, and requests a reply answers).
fn unwritten_sends(mut frames: BytesMut) -> BytesMut {
    let mut kept = BytesMut::with_capacity(frames.len());
    loop {
        match protocol::peek(&frames, usize::MAX) {
            Ok(Peek::Publish(publish, len)) => {
                let acked = publish.ack;
                let frame = frames.split_to(len);
                if !acked {
                    kept.extend_from_slice(&frame);
                }
            }
            Ok(Peek::Other) => match protocol::decode::frame_len(&frames, usize::MAX) {
                Ok(Some(len)) => kept.extend_from_slice(&frames.split_to(4 + len)),
                _ => break,
            },
            _ => break,
        }
    }
    kept
}

/// Puts a new connection in use: first every acknowledged publish still
/// unanswered that went out on a lost connection (in sequence order), then
/// what was parked meanwhile, then the flushes and statistics requests
/// still waiting, asked again.
fn resume(inner: &Inner, next: &client::ClientConn, resend: Resend) {
    inner
        .max_frame_bytes
        .store(next.welcome.max_frame_bytes as usize, Ordering::Relaxed);
    let current = inner.link.slot().gen;
    inner.link.install(next.outbox.clone(), |outbox, taken| {
        let mut state = inner.state.lock();
        let mut frames = BytesMut::new();
        let mut retried = 0;
        let again = |p: &&Pending| resend == Resend::All || p.gen != current;
        for pending in state.acks.values().filter(again) {
            frames.extend_from_slice(&pending.frame);
            retried += 1;
        }
        match resend {
            // What was parked, acknowledged publishes included (sent once,
            // here, not again above).
            Resend::NotParked => frames.extend_from_slice(&taken),
            // The unwritten frames of the connection left behind; its
            // acknowledged publishes were all sent above.
            Resend::All => frames.extend_from_slice(&unwritten_sends(taken)),
        }
        for token in state.pongs.keys() {
            Frame::Ping(*token).encode(&mut frames);
        }
        for token in state.stats.keys() {
            Frame::Stats(*token).encode(&mut frames);
        }
        // Whether a request was carried out before the connection went is
        // unknown: its caller is told the connection was lost.
        state.admin.clear();
        drop(state);
        if retried > 0 {
            tracing::info!(retried, "sending unacknowledged publishes again");
        }
        if !frames.is_empty() && outbox.append_over(&mut frames) == Pushed::First {
            outbox.wake();
        }
    });
}

/// Which unanswered acknowledged publishes a new connection gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resend {
    /// After an outage: those sent on lost connections (the parked ones
    /// go out with the parked frames).
    NotParked,
    /// On moving off a draining broker: every one (the old connection is
    /// left unread; a broker that routed one of them before it drained
    /// does not tell the new one).
    All,
}

/// Handles one connection's frames until it ends or the broker says it is
/// draining.
async fn read_loop(reader: &mut FrameReader, inner: &Inner) -> Ended {
    let mut frames = Vec::new();
    loop {
        if let Err(reason) = reader.read_batch(&mut frames).await {
            return Ended::Lost(reason);
        }
        let mut drain = None;
        let mut pong_needed = Vec::new();
        let mut error = None;
        {
            let mut state = inner.state.lock();
            for frame in frames.drain(..) {
                match frame {
                    Frame::PubAck(seq) => {
                        if let Some(pending) = state.acks.remove(&seq) {
                            let _ = pending.tx.send(Ok(()));
                        }
                    }
                    Frame::PubNack(nack) => {
                        let err = Error::Refused {
                            code: nack.code,
                            reason: nack.reason,
                        };
                        match state.acks.remove(&nack.id) {
                            Some(pending) => {
                                let _ = pending.tx.send(Err(err));
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
                    Frame::Drain(within) => {
                        drain = Some(std::time::Duration::from_millis(within.into()))
                    }
                    Frame::StatsReply(reply) => {
                        if let Some(tx) = state.stats.remove(&reply.token) {
                            let _ = tx.send(reply.json);
                        }
                    }
                    Frame::AdminReply(reply) => {
                        if let Some(tx) = state.admin.remove(&reply.token) {
                            let _ = tx.send((reply.code, reply.text));
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
            inner.link.push_now(HEADER_LEN + 8, |b| pong.encode(b));
        }
        if let Some(reason) = error {
            return Ended::Lost(reason);
        }
        if let Some(within) = drain {
            return Ended::Drain(within);
        }
    }
}
