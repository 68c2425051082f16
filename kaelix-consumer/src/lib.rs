//! The Kaelix consumer client.
//!
//! A [`Consumer`] holds one connection; each [`Consumer::subscribe`] or
//! [`Consumer::subscribe_queue`] returns a [`Subscription`] that yields
//! messages through [`Subscription::recv`] or as a `futures` `Stream`.
//!
//! ```
//! use kaelix_consumer::Consumer;
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let broker = kaelix_broker::MessageBroker::new();
//! # broker.start().await?;
//! # let addr = kaelix_broker::Server::spawn(&broker, "127.0.0.1:0").await?.to_string();
//! let consumer = Consumer::connect(&addr).await?; // addr: "127.0.0.1:8080", say
//! let mut signups = consumer.subscribe("events.*.signup").await?;
//! let mut jobs = consumer.subscribe_queue("jobs.>", "workers").await?;
//! # let publisher = kaelix_publisher::Publisher::connect(&addr).await?;
//! # publisher.publish("events.user.signup", "alice").await?;
//! let message = signups.recv().await?;
//! println!("{}: {:?}", message.topic, message.payload);
//! # assert_eq!(message.payload, "alice");
//! jobs.unsubscribe().await?;
//! # Ok(()) }
//! ```
//!
//! A consumer rides through a lost connection: it reconnects (to any of
//! its brokers, with backoff) and subscribes again, each subscription
//! carrying on from the offset after the last message it received, so a
//! retained topic shows no gap and no duplicate across the outage (see
//! `docs/clients.md`).
//!
//! Each subscription buffers at most [`ConsumerOptions::max_pending_messages`]
//! messages; when an application reads more slowly than messages arrive, the
//! consumer stops reading from the socket, so the broker's own limit for the
//! connection (`limits.max_pending_bytes`) decides what happens next.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use kaelix_core::client::session::{self, Ended, Session};
use kaelix_core::client::{self, ClientOptions, CloseOnDrop, ConnectionEvent, FrameReader, Link};
use kaelix_core::outbox::Pushed;
use kaelix_core::protocol::{self, Credit, Frame, Peek, Subscribe, HEADER_LEN};
use kaelix_core::topic::check_group;
use kaelix_core::{
    CloseReason, CreditWindow, Error, Gap, Message, Result, StartPosition, SubscribeOptions,
    Timestamp, TopicPattern,
};

mod inbox;
mod positions;
use inbox::Inbox;
pub use inbox::MessageView;
use parking_lot::Mutex;
use positions::{Positions, Tracking};
use tokio::net::ToSocketAddrs;
use tokio::sync::{broadcast, oneshot};

/// How a consumer connects and buffers.
#[derive(Debug, Clone)]
pub struct ConsumerOptions {
    /// Connection settings.
    pub client: ClientOptions,
    /// Messages one subscription buffers before the consumer stops reading.
    pub max_pending_messages: usize,
    /// Payload bytes one subscription buffers before the consumer stops reading.
    pub max_pending_bytes: usize,
}

impl Default for ConsumerOptions {
    fn default() -> Self {
        ConsumerOptions {
            client: ClientOptions {
                name: "kaelix-consumer".into(),
                ..ClientOptions::default()
            },
            max_pending_messages: 65_536,
            max_pending_bytes: 64 * 1024 * 1024,
        }
    }
}

/// A connection to a broker for receiving. Cheap to clone; clones share it.
#[derive(Clone, Debug)]
pub struct Consumer {
    inner: Arc<Inner>,
    guard: Arc<CloseOnDrop>,
}

#[derive(Debug)]
struct Inner {
    link: Arc<Link>,
    next_sid: AtomicU32,
    options: ConsumerOptions,
    state: Mutex<State>,
}

/// Lock order: this, then a slot's outbox. Subscribing and unsubscribing
/// push their frame under this lock, and a reconnect re-sends every
/// subscription and puts the new connection in use under it too, so each
/// subscription reaches the new connection exactly once.
#[derive(Debug, Default)]
struct State {
    subs: HashMap<u32, Sub>,
    pending: HashMap<u32, oneshot::Sender<Result<()>>>,
    closed: Option<CloseReason>,
}

/// A live subscription: its inbox, and what it asked for, to ask again
/// after a reconnect.
#[derive(Debug)]
struct Sub {
    inbox: Arc<Inbox>,
    request: Subscribe,
    /// When it was made (this machine's clock): where it carries on in
    /// topics it had received nothing from when the connection was lost.
    since: Timestamp,
}

impl Consumer {
    /// Connects to a broker at `addr` (`"host:port"`).
    pub async fn connect(addr: impl ToSocketAddrs) -> Result<Consumer> {
        Self::connect_with(addr, ConsumerOptions::default()).await
    }

    /// Connects with explicit options.
    pub async fn connect_with(
        addr: impl ToSocketAddrs,
        options: ConsumerOptions,
    ) -> Result<Consumer> {
        Self::connect_any(&client::resolve(addr).await?, options).await
    }

    /// Connects to the first of several brokers (`"host:port"` each, tried
    /// in a random order, so that clients sharing a list spread over it)
    /// that answers; reconnects go to any of them.
    pub async fn connect_any(addresses: &[String], options: ConsumerOptions) -> Result<Consumer> {
        let (conn, addr) = client::connect_any(addresses, &options.client).await?;
        let link = Link::new(
            &conn,
            addr,
            addresses.to_vec(),
            options.client.clone(),
            Vec::new(),
        );
        let inner = Arc::new(Inner {
            link: link.clone(),
            next_sid: AtomicU32::new(1),
            options,
            state: Mutex::new(State::default()),
        });
        tokio::spawn(run(conn, inner.clone()));
        Ok(Consumer {
            guard: Arc::new(CloseOnDrop(link)),
            inner,
        })
    }

    /// What happens to the connection from now on: lost, each reconnect
    /// attempt, back again (with every subscription made again).
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

    /// Subscribes to `pattern` (`*` matches one token, a final `>` one or
    /// more). Returns once the broker has confirmed the subscription, so
    /// every message published after that reaches it.
    pub async fn subscribe(&self, pattern: impl AsRef<str>) -> Result<Subscription> {
        self.subscribe_inner(TopicPattern::new(pattern)?, SubscribeOptions::new())
            .await
    }

    /// Subscribes with `options`: a start position, a queue group, and this
    /// subscription's own slow-consumer policy (over the broker's
    /// `[[topics]] slow_consumer` for the topics it matches).
    ///
    /// ```no_run
    /// use kaelix_consumer::Consumer;
    /// use kaelix_core::{SlowConsumerPolicy, StartPosition, SubscribeOptions};
    /// # #[tokio::main] async fn main() -> kaelix_core::Result<()> {
    /// let consumer = Consumer::connect("127.0.0.1:8080").await?;
    /// let options = SubscribeOptions::new()
    ///     .start(StartPosition::Last(100))
    ///     .slow_consumer(SlowConsumerPolicy::DropOldest);
    /// let mut ticks = consumer.subscribe_with("prices.>", options).await?;
    /// let tick = ticks.recv().await?;
    /// for gap in ticks.take_gaps() {
    ///     eprintln!("missed {} on {} ({}..={})", gap.count, gap.topic, gap.first, gap.last);
    /// }
    /// # let _ = tick; Ok(()) }
    /// ```
    pub async fn subscribe_with(
        &self,
        pattern: impl AsRef<str>,
        options: SubscribeOptions,
    ) -> Result<Subscription> {
        let pattern = TopicPattern::new(pattern)?;
        options.check()?;
        self.subscribe_inner(pattern, options).await
    }

    /// Subscribes starting at `start`: what the broker still holds of the
    /// matching topics from there comes first, in offset order per topic,
    /// then live messages, with no gap and no duplicate between the two.
    /// [`Subscription::missed`] tells how many asked-for messages the broker
    /// no longer held.
    pub async fn subscribe_from(
        &self,
        pattern: impl AsRef<str>,
        start: StartPosition,
    ) -> Result<Subscription> {
        self.subscribe_inner(
            TopicPattern::new(pattern)?,
            SubscribeOptions::new().start(start),
        )
        .await
    }

    /// Subscribes as a member of queue group `group`: each message matching
    /// `pattern` goes to exactly one member of the group.
    pub async fn subscribe_queue(
        &self,
        pattern: impl AsRef<str>,
        group: &str,
    ) -> Result<Subscription> {
        check_group(group)?;
        let options = SubscribeOptions::new().queue_group(group);
        self.subscribe_inner(TopicPattern::new(pattern)?, options)
            .await
    }

    async fn subscribe_inner(
        &self,
        pattern: TopicPattern,
        options: SubscribeOptions,
    ) -> Result<Subscription> {
        let inner = &self.inner;
        let sid = inner.next_sid.fetch_add(1, Ordering::Relaxed);
        let inbox = Arc::new(Inbox::new(
            inner.options.max_pending_messages,
            inner.options.max_pending_bytes,
        ));
        let (tx, rx) = oneshot::channel();
        let request = Subscribe {
            sid,
            pattern: pattern.to_bytes(),
            group: options
                .queue_group
                .as_ref()
                .map(|g| Bytes::copy_from_slice(g.as_bytes())),
            start: options.start,
            policy: options.slow_consumer,
            partitions: options.partitions.iter().map(|p| p.get()).collect(),
            sticky: options.sticky_partitions,
            credit: options.credit.map(|w| Credit {
                sid,
                messages: w.messages,
                bytes: w.bytes,
            }),
            resume: Vec::new(),
        };
        let frame = Frame::Subscribe(request.clone());
        let subscription = Subscription {
            sid,
            pattern,
            inbox: inbox.clone(),
            rx: inbox::Receiver::new(),
            inner: inner.clone(),
            _guard: self.guard.clone(),
            ended: false,
            window: options.credit,
        };
        {
            let mut state = inner.state.lock();
            if let Some(reason) = &state.closed {
                return Err(Error::Closed(reason.clone()));
            }
            // Registered before the request goes out, so no early message
            // is lost; sent under the lock (see `State`). Into a connection
            // being lost it is sent again with the others once reconnected.
            state.subs.insert(
                sid,
                Sub {
                    inbox: inbox.clone(),
                    request,
                    since: Timestamp::now(),
                },
            );
            state.pending.insert(sid, tx);
            let pushed = inner.link.push_now(HEADER_LEN + 520, |b| frame.encode(b));
            if pushed == Pushed::Closed && inner.link.ended().is_some() {
                state.subs.remove(&sid);
                state.pending.remove(&sid);
                drop(state);
                return Err(inner.closed_error());
            }
        }
        match rx.await {
            Ok(Ok(())) => Ok(subscription),
            Ok(Err(err)) => Err(err),
            Err(_) => Err(inner.closed_error()),
        }
    }

    /// Ends every subscription and closes the connection.
    pub async fn close(&self) -> Result<()> {
        self.inner.link.close(CloseReason::Closed);
        Ok(())
    }
}

impl Inner {
    fn closed_error(&self) -> Error {
        let reason = self
            .state
            .lock()
            .closed
            .clone()
            .or_else(|| self.link.ended())
            .unwrap_or(CloseReason::PeerClosed);
        Error::Closed(reason)
    }

    fn end(&self, sid: u32) {
        let mut state = self.state.lock();
        if let Some(sub) = state.subs.remove(&sid) {
            sub.inbox.close(CloseReason::Closed);
            let frame = Frame::Unsubscribe(sid);
            self.link.push_now(HEADER_LEN + 4, |b| frame.encode(b));
        }
    }
}

/// The messages of one subscription, in the order each publisher sent them.
/// Dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    sid: u32,
    pattern: TopicPattern,
    inbox: Arc<Inbox>,
    rx: inbox::Receiver,
    inner: Arc<Inner>,
    /// The connection stays open while a subscription lives.
    _guard: Arc<CloseOnDrop>,
    ended: bool,
    /// Its credit window, if it paces the broker.
    window: Option<CreditWindow>,
}

impl Subscription {
    /// How many messages this subscription will not get: those its start
    /// position asked for that the broker no longer held (it then started
    /// at the oldest one it had), and those the broker dropped because the
    /// subscription fell behind under the `drop_oldest` policy.
    pub fn missed(&self) -> u64 {
        self.inbox.missed()
    }

    /// Where the messages dropped since the last call were (topic and
    /// offsets), oldest first. While the topic retains them they can be
    /// read again with [`Consumer::subscribe_from`] at a gap's first offset.
    pub fn take_gaps(&self) -> Vec<Gap> {
        self.inbox.take_gaps()
    }

    /// The next message. When the subscription has ended it returns
    /// [`Error::Closed`] with the reason (unsubscribed, broker shutting
    /// down, connection lost), after every message already received.
    pub async fn recv(&mut self) -> Result<Message> {
        let message = self.rx.recv(&self.inbox).await.map_err(Error::Closed);
        self.give_credit();
        message
    }

    /// The next message if one is buffered now.
    pub fn try_recv(&mut self) -> Option<Message> {
        let message = self.rx.try_recv(&self.inbox);
        self.give_credit();
        message
    }

    /// With a credit window: once the application has taken half of it,
    /// gives that much credit back to the broker (one small frame per half
    /// window, not one per message).
    fn give_credit(&mut self) {
        let Some(window) = self.window else {
            return;
        };
        let (messages, bytes) = self.rx.counted();
        let half = |n: u32| u64::from(n).div_ceil(2).max(1);
        let due = (window.messages > 0 && u64::from(messages) >= half(window.messages))
            || (window.bytes > 0 && bytes >= half(window.bytes));
        if !due {
            return;
        }
        self.rx.take_counts();
        let credit = Frame::Credit(Credit {
            sid: self.sid,
            messages: if window.messages > 0 { messages } else { 0 },
            bytes: if window.bytes > 0 {
                u32::try_from(bytes).unwrap_or(u32::MAX)
            } else {
                0
            },
        });
        self.inner
            .link
            .push_now(HEADER_LEN + 12, |b| credit.encode(b));
    }

    /// Waits for messages, then hands every one buffered now to `f` as a
    /// [`MessageView`] borrowed from the receive buffer — no copy, no
    /// allocation, no message id — and returns how many. The fastest way to
    /// consume; use [`MessageView::to_message`] to keep one.
    ///
    /// ```
    /// # use kaelix_consumer::Consumer;
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let broker = kaelix_broker::MessageBroker::new();
    /// # broker.start().await?;
    /// # let addr = kaelix_broker::Server::spawn(&broker, "127.0.0.1:0").await?.to_string();
    /// let consumer = Consumer::connect(&addr).await?;
    /// let mut ticks = consumer.subscribe("ticks.>").await?;
    /// # let publisher = kaelix_publisher::Publisher::connect(&addr).await?;
    /// # publisher.publish("ticks.eurusd", "1.0842").await?;
    /// let mut bytes = 0;
    /// let n = ticks.recv_batch(|m| bytes += m.payload.len()).await?;
    /// assert!(n >= 1 && bytes >= 6);
    /// # Ok(()) }
    /// ```
    pub async fn recv_batch(&mut self, mut f: impl FnMut(MessageView<'_>)) -> Result<usize> {
        let n = self
            .rx
            .recv_batch(&self.inbox, &mut f)
            .await
            .map_err(Error::Closed);
        self.give_credit();
        n
    }

    /// The pattern subscribed to.
    pub fn pattern(&self) -> &TopicPattern {
        &self.pattern
    }

    /// Ends the subscription; messages still in flight are discarded.
    pub async fn unsubscribe(mut self) -> Result<()> {
        self.ended = true;
        self.inner.end(self.sid);
        Ok(())
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if !self.ended {
            self.inner.end(self.sid);
        }
    }
}

impl futures_core::Stream for Subscription {
    type Item = Message;

    /// Yields messages until the subscription ends; [`Subscription::recv`]
    /// tells why it ended.
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        let this = self.get_mut();
        let polled = this.rx.poll_recv(&this.inbox, cx).map(Result::ok);
        if polled.is_ready() {
            this.give_credit();
        }
        polled
    }
}

/// The reader task: every connection of the consumer in turn (see
/// [`session::supervise`]), then every subscription ends with the reason
/// the consumer closed, after what it holds.
async fn run(conn: client::ClientConn, inner: Arc<Inner>) {
    let mut session = ConsumerSession {
        node: node_of(&conn.welcome),
        lost_at: None,
        inner: inner.clone(),
        staging: Staging::default(),
        // Where each subscription is, to resume from there; kept only when
        // there is a reconnect to resume after.
        positions: inner
            .options
            .client
            .reconnect
            .enabled
            .then(Positions::default),
    };
    session::supervise(inner.link.clone(), conn, &mut session).await;
    let reason = inner.link.ended().unwrap_or(CloseReason::Closed);
    let mut state = inner.state.lock();
    state.closed = Some(reason.clone());
    for (_, sub) in state.subs.drain() {
        sub.inbox.close(reason.clone());
    }
    for (_, tx) in state.pending.drain() {
        let _ = tx.send(Err(Error::Closed(reason.clone())));
    }
}

/// What the consumer's reader keeps across connections.
struct ConsumerSession {
    inner: Arc<Inner>,
    staging: Staging,
    positions: Option<Positions>,
    /// The cluster node the connection is to (its WELCOME says), whose
    /// offsets `positions` are in; `None` for a broker on its own.
    node: Option<String>,
    /// When the last connection was lost.
    lost_at: Option<Timestamp>,
}

/// How far before losing a connection to another cluster node a
/// subscription starts again on the new one: messages in flight then are
/// delivered again rather than missed.
const MOVE_OVERLAP: std::time::Duration = std::time::Duration::from_secs(1);

/// The cluster node a WELCOME names, if any.
fn node_of(welcome: &kaelix_core::protocol::Welcome) -> Option<String> {
    welcome
        .properties
        .iter()
        .find(|(k, _)| k == "node")
        .map(|(_, v)| v.clone())
}

impl Session for ConsumerSession {
    fn read<'a>(
        &'a mut self,
        reader: &'a mut FrameReader,
    ) -> impl std::future::Future<Output = Ended> + Send + 'a {
        read_loop(reader, &self.inner, &mut self.staging, &mut self.positions)
    }

    /// Nothing a consumer sends is worth carrying over: its subscriptions
    /// are made again whole, with a fresh credit window.
    fn lost(&mut self, _: &CloseReason, _: BytesMut) -> BytesMut {
        self.lost_at = Some(Timestamp::now());
        BytesMut::new()
    }

    fn circuit_open(&mut self, _: &Link) {}

    fn resume(&mut self, next: &client::ClientConn, moved: bool) {
        let node = node_of(&next.welcome);
        // Another node numbers its offsets its own way: start there from
        // a little before the connection was lost, by time.
        let across = (node != self.node).then(|| {
            let at = if moved {
                Timestamp::now()
            } else {
                self.lost_at.unwrap_or_else(Timestamp::now)
            };
            let overlap = MOVE_OVERLAP.as_nanos() as u64;
            Timestamp::from_nanos(at.as_nanos().saturating_sub(overlap))
        });
        if across.is_some() {
            tracing::info!(from = ?self.node, to = ?node, "moved to another cluster node: subscriptions resume by time, not by offset");
            if let Some(positions) = self.positions.as_mut() {
                *positions = Positions::default();
            }
        }
        self.node = node;
        resubscribe(&self.inner, next, self.positions.as_mut(), across);
    }
}

/// Puts a new connection in use with every subscription made again (what
/// was parked while disconnected is dropped: subscribing and unsubscribing
/// are in the re-sent set already, credit starts again with a whole
/// window). A subscription carries on from the offset after the last
/// message it received in each topic partition; in those it had received
/// nothing from, at its own start if that was `earliest` or a time, else
/// from when it was made.
///
/// On another cluster node (`across`), every subscription that is not a
/// queue group member starts at that time instead: offsets are a node's own.
fn resubscribe(
    inner: &Inner,
    next: &client::ClientConn,
    mut positions: Option<&mut Positions>,
    across: Option<Timestamp>,
) {
    inner.link.install(next.outbox.clone(), |outbox, _parked| {
        let state = inner.state.lock();
        let mut frames = BytesMut::new();
        for (sid, sub) in &state.subs {
            let mut request = sub.request.clone();
            if request.group.is_none() {
                if let Some(positions) = positions.as_deref_mut() {
                    request.resume = positions.resume(*sid);
                    fit_resume(&mut request, next.welcome.max_frame_bytes as usize);
                }
                request.start = match (across, request.start) {
                    (Some(at), _) => StartPosition::Time(at),
                    (None, start @ (StartPosition::Earliest | StartPosition::Time(_))) => start,
                    (None, _) => StartPosition::Time(sub.since),
                };
            }
            Frame::Subscribe(request).encode(&mut frames);
        }
        if let Some(positions) = positions {
            positions.keep_only(|sid| state.subs.contains_key(&sid));
        }
        tracing::debug!(subscriptions = state.subs.len(), "subscribing again");
        if !frames.is_empty() && outbox.append_over(&mut frames) == Pushed::First {
            outbox.wake();
        }
        // Held until the new connection is in use (see `State`).
        state
    });
}

/// Keeps a resumed SUBSCRIBE within the broker's frame size: past it the
/// broker would refuse the frame and the client would reconnect in a loop.
/// The topic partitions left out start where a fresh subscription would,
/// and the log says how many (they may see messages again).
fn fit_resume(request: &mut Subscribe, max_frame: usize) {
    // Room for everything but the entries: pattern, group, the fixed fields.
    let mut room = max_frame.saturating_sub(1024);
    let fits = request
        .resume
        .iter()
        .take_while(|at| {
            let len = 1 + at.topic.len() + 12;
            let fits = len <= room;
            room = room.saturating_sub(len);
            fits
        })
        .count();
    if fits < request.resume.len() {
        tracing::warn!(
            sid = request.sid,
            kept = fits,
            dropped = request.resume.len() - fits,
            "too many topic partitions to resume in one SUBSCRIBE; the rest start afresh"
        );
        request.resume.truncate(fits);
    }
}

/// Handles one connection's frames until it ends; returns why. What was
/// read is handed to the inboxes before it returns.
async fn read_loop(
    reader: &mut FrameReader,
    inner: &Inner,
    staging: &mut Staging,
    positions: &mut Option<Positions>,
) -> Ended {
    let reason = loop {
        if let Err(reason) = reader.fill().await {
            break reason;
        }
        if let Err(reason) = handle_buffer(reader, inner, staging, positions.as_mut()) {
            break reason;
        }
        staging.hand_over().await;
        // An ended subscription's positions go with it, so a consumer that
        // subscribes and unsubscribes for ever holds no more.
        for sid in staging.ended.drain(..) {
            if let Some(positions) = positions.as_mut() {
                positions.forget(sid);
            }
        }
        if let Some(within) = staging.drain.take() {
            return Ended::Drain(within);
        }
    };
    staging.hand_over().await;
    Ended::Lost(reason)
}

/// MESSAGE frames gathered per subscription during one read, handed to
/// the inboxes once per read.
#[derive(Default)]
struct Staging {
    by_sid: HashMap<u32, Staged>,
    /// A drain notice read, for the reader to act on after this read.
    drain: Option<std::time::Duration>,
    /// Subscriptions found ended since the reader last asked.
    ended: Vec<u32>,
}

struct Staged {
    inbox: Arc<Inbox>,
    /// Chunks of whole frames ready to hand over.
    chunks: Vec<Bytes>,
    /// Frames copied out of mixed reads, not yet a chunk.
    copied: BytesMut,
    count: usize,
}

impl Staging {
    /// The staging of `sid`, if the subscription still exists.
    fn get(&mut self, sid: u32, inner: &Inner) -> Option<&mut Staged> {
        match self.by_sid.entry(sid) {
            std::collections::hash_map::Entry::Occupied(e) => Some(e.into_mut()),
            std::collections::hash_map::Entry::Vacant(e) => {
                let inbox = inner.state.lock().subs.get(&sid)?.inbox.clone();
                Some(e.insert(Staged {
                    inbox,
                    chunks: Vec::new(),
                    copied: BytesMut::new(),
                    count: 0,
                }))
            }
        }
    }

    async fn hand_over(&mut self) {
        for staged in self.by_sid.values_mut() {
            if !staged.copied.is_empty() {
                staged.chunks.push(staged.copied.split().freeze());
            }
            if staged.count == 0 {
                continue;
            }
            // A full inbox makes the reader wait, so the socket stops being read.
            while staged.inbox.append(&mut staged.chunks, staged.count) == Pushed::Full {
                staged.inbox.wait_for_space().await;
            }
            staged.count = 0;
        }
        let ended = &mut self.ended;
        self.by_sid.retain(|sid, staged| {
            let open = !staged.inbox.is_closed();
            if !open {
                ended.push(*sid);
            }
            open
        });
    }
}

/// A run of MESSAGE frames at the front of the read buffer.
#[derive(Default)]
struct Run {
    len: usize,
    count: usize,
    /// The one sid of the run, while it has only one.
    sid: Option<u32>,
    mixed: bool,
}

/// Hands a run of MESSAGE frames at the front of `buf` to the staging:
/// whole, without a copy, when they are all for one subscription; frame by
/// frame otherwise.
fn take_run(
    buf: &mut BytesMut,
    run: &mut Run,
    staging: &mut Staging,
    inner: &Inner,
    max_frame: usize,
) {
    if run.count == 0 {
        return;
    }
    let frames = buf.split_to(run.len);
    match (run.sid, run.mixed) {
        (Some(sid), false) => {
            if let Some(staged) = staging.get(sid, inner) {
                if !staged.copied.is_empty() {
                    staged.chunks.push(staged.copied.split().freeze());
                }
                staged.chunks.push(frames.freeze());
                staged.count += run.count;
            }
        }
        _ => {
            let mut at = 0;
            while let Ok(Peek::Deliver(d, len)) = protocol::peek(&frames[at..], max_frame) {
                if let Some(staged) = staging.get(d.sid, inner) {
                    staged.copied.extend_from_slice(&frames[at..at + len]);
                    staged.count += 1;
                }
                at += len;
            }
        }
    }
    *run = Run::default();
}

/// Handles every complete frame in the reader's buffer.
fn handle_buffer(
    reader: &mut FrameReader,
    inner: &Inner,
    staging: &mut Staging,
    mut positions: Option<&mut Positions>,
) -> Result<(), CloseReason> {
    let max_frame = reader.max_frame_bytes();
    let buf = reader.buffer();
    let mut run = Run::default();
    loop {
        match protocol::peek(&buf[run.len..], max_frame) {
            Ok(Peek::Incomplete) => break,
            Ok(Peek::Deliver(delivery, len)) => {
                if let (Some(positions), Some(offset)) = (positions.as_deref_mut(), delivery.offset)
                {
                    let resumes = || {
                        let state = inner.state.lock();
                        match state.subs.get(&delivery.sid) {
                            Some(s) if s.request.group.is_none() => {
                                let pattern = TopicPattern::from_bytes(s.request.pattern.clone());
                                if pattern.is_ok_and(|p| p.is_literal()) {
                                    Tracking::OneTopic
                                } else {
                                    Tracking::AnyTopic
                                }
                            }
                            _ => Tracking::Nothing,
                        }
                    };
                    positions.saw(
                        delivery.sid,
                        delivery.body,
                        delivery.partition,
                        offset,
                        resumes,
                    );
                }
                match run.sid {
                    None if run.count == 0 => run.sid = Some(delivery.sid),
                    Some(sid) if sid == delivery.sid => {}
                    _ => run.mixed = true,
                }
                run.len += len;
                run.count += 1;
            }
            Ok(Peek::Publish(..)) => {
                return Err(CloseReason::Protocol(
                    "unexpected PUBLISH frame from the broker".into(),
                ))
            }
            Ok(Peek::Route(..)) => {
                return Err(CloseReason::Protocol(
                    "unexpected ROUTE frame from the broker".into(),
                ))
            }
            Ok(Peek::Other) => {
                take_run(buf, &mut run, staging, inner, max_frame);
                match protocol::decode(buf, max_frame) {
                    Ok(Some(frame)) => {
                        handle_control(frame, inner, positions.as_deref_mut(), &mut staging.drain)?
                    }
                    Ok(None) => break,
                    Err(err) => return Err(CloseReason::Protocol(err.to_string())),
                }
            }
            Err(err) => return Err(CloseReason::Protocol(err.to_string())),
        }
    }
    take_run(buf, &mut run, staging, inner, max_frame);
    Ok(())
}

fn handle_control(
    frame: Frame,
    inner: &Inner,
    positions: Option<&mut Positions>,
    drain: &mut Option<std::time::Duration>,
) -> Result<(), CloseReason> {
    match frame {
        Frame::Drain(within) => *drain = Some(std::time::Duration::from_millis(within.into())),
        Frame::SubAck(sid) => {
            if let Some(tx) = inner.state.lock().pending.remove(&sid) {
                let _ = tx.send(Ok(()));
            }
        }
        Frame::SubNack(nack) => {
            let sid = nack.id as u32;
            let mut state = inner.state.lock();
            let active = state.subs.remove(&sid).map(|sub| sub.inbox);
            if let Some(positions) = positions {
                positions.forget(sid);
            }
            if let Some(tx) = state.pending.remove(&sid) {
                let _ = tx.send(Err(Error::Refused {
                    code: nack.code,
                    reason: nack.reason,
                }));
            } else if let Some(inbox) = active {
                // The broker ended a live subscription (its permission was
                // revoked): what it holds can still be read, then `recv`
                // returns the reason.
                inbox.close(CloseReason::Server {
                    code: nack.code,
                    reason: nack.reason,
                });
            }
        }
        Frame::Ping(token) => {
            let pong = Frame::Pong(token);
            inner.link.push_now(HEADER_LEN + 8, |b| pong.encode(b));
        }
        Frame::Pong(_) => {}
        Frame::Missed(missed) => {
            if let Some(inbox) = inner.state.lock().subs.get(&missed.sid).map(|s| &s.inbox) {
                inbox.add_missed(missed.count);
                let range = missed.range.and_then(|r| {
                    Some(Gap {
                        topic: kaelix_core::Topic::from_bytes(r.topic).ok()?,
                        partition: r.partition.map(kaelix_core::PartitionId::new),
                        first: kaelix_core::Offset::new(r.first),
                        last: kaelix_core::Offset::new(r.last),
                        count: missed.count,
                    })
                });
                if let Some(gap) = range {
                    inbox.add_gap(gap);
                }
            }
        }
        Frame::Error(e) => {
            return Err(CloseReason::Server {
                code: e.code,
                reason: e.reason,
            })
        }
        other => {
            return Err(CloseReason::Protocol(format!(
                "unexpected {} frame from the broker",
                other.name()
            )))
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kaelix_core::protocol::ResumeAt;

    #[test]
    fn a_resume_list_is_cut_to_fit_the_brokers_frame() {
        let at = |i: u32| ResumeAt {
            topic: Bytes::from(format!("orders.region-{i:04}")),
            partition: 0,
            next: u64::from(i),
        };
        let mut request = Subscribe {
            sid: 1,
            pattern: "orders.>".into(),
            resume: (0..10_000).map(at).collect(),
            ..Subscribe::default()
        };
        fit_resume(&mut request, 64 * 1024);
        let kept = request.resume.len();
        assert!((1000..10_000).contains(&kept), "{kept}");
        let frame = Frame::Subscribe(request).to_bytes();
        assert!(frame.len() <= 64 * 1024, "{}", frame.len());

        let mut small = Subscribe {
            resume: (0..10).map(at).collect(),
            ..Subscribe::default()
        };
        fit_resume(&mut small, 64 * 1024);
        assert_eq!(small.resume.len(), 10);
    }
}
