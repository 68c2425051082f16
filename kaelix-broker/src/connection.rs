//! One client connection: handshake, then read, decode and route frames in
//! batches while a writer task drains the connection's outbox.
//!
//! ```text
//! socket ─read─▶ BytesMut ─decode all─▶ frames ─route─▶ subscribers' outboxes
//!                                          └─ replies (acks, pongs) ─▶ own outbox ─▶ writer ─▶ socket
//! ```
//!
//! Every way a connection ends is an [`Exit`] with a name in logs; those the
//! client caused or should know of are answered with an ERROR frame first.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use foldhash::HashMap;
use kaelix_core::outbox::{Outbox, Pushed};
use kaelix_core::protocol::decode::PublishRef;
use kaelix_core::protocol::{
    self, AdminReply, ErrorCode, ErrorFrame, Frame, Nack, Peek, ProtocolError, StatsReply,
    Subscribe, Welcome,
};
use kaelix_core::runtime::TaskPriority;
use kaelix_core::topic::check_group;
use kaelix_core::{
    CloseReason, MemoryStreamerConfig, Message, StartPosition, Timestamp, Topic, TopicPattern,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use crate::auth::{AuthFailure, Identity, Login};
use crate::broker::Inner;
use crate::dedupe::{self, Window};
use crate::exec;
use crate::live::LiveLimits;
use crate::plugins::{Chain, Fate, Run};
use crate::router::{
    Batch, NewSub, Owner, PartitionSet, Publication, RouteCache, Scope, Sink, Starts, Subscriber,
};
use crate::server::HandshakeSlot;
use crate::stats::{Disconnect, Rejection};

/// Bytes of a connection's first reads; see `Connection::run`.
const INITIAL_READ: usize = 1024;

/// Reads a connection makes before it lets other tasks on its worker run;
/// it lets them sooner once it has read two full read buffers' worth.
const READS_PER_YIELD: u32 = 16;

/// Why a connection ended.
#[derive(Debug)]
pub(crate) enum Exit {
    /// The client closed its side.
    ClientClosed,
    /// Reading failed.
    ReadError(std::io::Error),
    /// The broker is shutting down.
    ShuttingDown,
    /// No HELLO within `network.handshake_timeout_ms`.
    HandshakeTimeout(Duration),
    /// The client broke the protocol.
    Protocol(ProtocolError),
    /// The outbox closed: a slow consumer, or a failed write.
    Outbox(CloseReason),
    /// The client's credentials were not accepted.
    AuthFailed(AuthFailure, Option<&'static str>),
    /// The identity was removed by a reload.
    Revoked(String),
    /// Nothing heard, not even a PONG, within `limits.idle_timeout_ms`.
    IdleTimeout(Duration),
    /// The client closed its side in the middle of a frame.
    Truncated(usize),
}

impl Exit {
    /// The ERROR frame that tells the client, if it should be told.
    fn error_frame(&self) -> Option<ErrorFrame> {
        let (code, reason) = match self {
            Exit::Protocol(err) => (err.code(), err.to_string()),
            Exit::HandshakeTimeout(t) => (
                ErrorCode::HandshakeTimeout,
                format!("no HELLO frame within {} ms", t.as_millis()),
            ),
            Exit::ShuttingDown => (
                ErrorCode::ShuttingDown,
                "the broker is shutting down".into(),
            ),
            Exit::AuthFailed(failure, detail) => (
                ErrorCode::AuthenticationFailed,
                auth_failure_reason(*failure, *detail),
            ),
            Exit::Revoked(reason) => (ErrorCode::NotPermitted, reason.clone()),
            Exit::Truncated(n) => (
                ErrorCode::Malformed,
                format!("the connection ended {n} bytes into an unfinished frame"),
            ),
            Exit::IdleTimeout(t) => (
                ErrorCode::IdleTimeout,
                format!(
                    "nothing heard from the client for {} ms, not even an answer to a PING \
                     (limits.idle_timeout_ms)",
                    t.as_millis()
                ),
            ),
            Exit::ClientClosed | Exit::ReadError(_) | Exit::Outbox(_) => return None,
        };
        Some(ErrorFrame {
            code,
            reason,
            retry_after_ms: None,
        })
    }

    /// The reason as counted.
    fn disconnect(&self) -> Disconnect {
        match self {
            Exit::ClientClosed => Disconnect::ClientClosed,
            Exit::ReadError(_) => Disconnect::ReadError,
            Exit::ShuttingDown => Disconnect::ShuttingDown,
            Exit::HandshakeTimeout(_) => Disconnect::HandshakeTimeout,
            Exit::Protocol(_) => Disconnect::ProtocolViolation,
            Exit::AuthFailed(..) => Disconnect::AuthenticationFailed,
            Exit::Revoked(_) => Disconnect::Revoked,
            Exit::IdleTimeout(_) => Disconnect::IdleTimeout,
            Exit::Truncated(_) => Disconnect::ProtocolViolation,
            Exit::Outbox(CloseReason::SlowConsumer) => Disconnect::SlowConsumer,
            Exit::Outbox(CloseReason::ShuttingDown) => Disconnect::ShuttingDown,
            Exit::Outbox(CloseReason::PeerClosed) => Disconnect::ClientClosed,
            Exit::Outbox(_) => Disconnect::WriteError,
        }
    }

    fn close_reason(&self) -> CloseReason {
        match self {
            Exit::ClientClosed => CloseReason::PeerClosed,
            Exit::ReadError(err) => CloseReason::Io(err.to_string()),
            Exit::ShuttingDown => CloseReason::ShuttingDown,
            Exit::HandshakeTimeout(_) | Exit::Protocol(_) => {
                CloseReason::Protocol(self.to_string())
            }
            Exit::AuthFailed(..) | Exit::Revoked(_) | Exit::IdleTimeout(_) | Exit::Truncated(_) => {
                CloseReason::Protocol(self.to_string())
            }
            Exit::Outbox(reason) => reason.clone(),
        }
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::ClientClosed => f.write_str("client closed the connection"),
            Exit::ReadError(err) => write!(f, "read error: {err}"),
            Exit::ShuttingDown => f.write_str("broker shutting down"),
            Exit::HandshakeTimeout(t) => write!(f, "no HELLO within {} ms", t.as_millis()),
            Exit::Protocol(err) => write!(f, "protocol violation: {err}"),
            Exit::Outbox(reason) => write!(f, "{reason}"),
            Exit::AuthFailed(failure, _) => {
                write!(f, "authentication failed ({})", failure.name())
            }
            Exit::Revoked(reason) => f.write_str(reason),
            Exit::IdleTimeout(t) => write!(f, "idle for {} ms", t.as_millis()),
            Exit::Truncated(n) => write!(
                f,
                "client closed the connection {n} bytes into an unfinished frame"
            ),
        }
    }
}

/// Serves one accepted connection to its end: the TLS handshake when
/// `tls` is given, then the protocol.
pub(crate) async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    broker: Arc<Inner>,
    tls: Option<Arc<TlsAcceptor>>,
    slot: HandshakeSlot,
) {
    // Every log line of this connection carries its id and peer.
    let id = broker.next_conn.fetch_add(1, Ordering::Relaxed);
    let _ = stream.set_nodelay(true);
    // The configuration as the connection opens: its frame limit, read
    // size and handshake time hold for its life.
    let config = broker.live.running();
    // TLS and HELLO together must be done by then.
    let deadline =
        tokio::time::Instant::now() + Duration::from_millis(config.network.handshake_timeout_ms);
    let open = Open {
        id,
        peer,
        config,
        deadline,
        cert_name: None,
        handshake: slot,
    };
    let Some(acceptor) = tls else {
        let (rd, wr) = stream.into_split();
        return serve_open(rd, wr, open, broker).await;
    };
    // Boxed: the handshake's state and the TLS connection are large, and
    // inline they would size every plain connection's task as well.
    Box::pin(serve_tls(stream, acceptor, open, broker)).await
}

async fn serve_tls(stream: TcpStream, acceptor: Arc<TlsAcceptor>, open: Open, broker: Arc<Inner>) {
    let (id, peer, deadline) = (open.id, open.peer, open.deadline);
    let handshake = Duration::from_millis(open.config.network.handshake_timeout_ms);
    match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => {
            let cert_name = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(crate::tls::certificate_identity);
            let (rd, wr) = tokio::io::split(stream);
            serve_open(rd, wr, Open { cert_name, ..open }, broker).await
        }
        Ok(Err(err)) => {
            broker.stats.closed(Disconnect::TlsHandshake);
            tracing::warn!(conn = id, %peer, error = %err, "connection closed: TLS handshake failed");
        }
        Err(_) => {
            broker.stats.closed(Disconnect::HandshakeTimeout);
            tracing::warn!(
                conn = id, %peer,
                "connection closed: TLS handshake not done within {} ms",
                handshake.as_millis()
            );
        }
    }
}

/// A connection as it starts the protocol.
struct Open {
    id: u64,
    peer: SocketAddr,
    config: Arc<MemoryStreamerConfig>,
    /// When HELLO must have arrived.
    deadline: tokio::time::Instant,
    /// The identity in the client's verified certificate, under mutual TLS.
    cert_name: Option<String>,
    /// Held until HELLO is answered.
    handshake: HandshakeSlot,
}

async fn serve_open<R, W>(mut rd: R, mut wr: W, open: Open, broker: Arc<Inner>)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let Open {
        id,
        peer,
        config,
        deadline,
        cert_name,
        handshake,
    } = open;
    let outbox = Arc::new(Outbox::with_shared_limit(
        broker.live.limits.max_pending_bytes.clone(),
    ));
    let writer = {
        let outbox = outbox.clone();
        let broker_for_writer = broker.clone();
        exec::spawn(broker.runtime.get(), TaskPriority::High, async move {
            let metrics = &broker_for_writer.metrics;
            let result = outbox
                .write_to_timed(&mut wr, |waited| metrics.record_delivery(waited))
                .await;
            let _ = wr.shutdown().await;
            result
        })
    };
    let writer = match writer {
        Ok(writer) => writer,
        Err(err) => {
            broker.stats.rejected(Rejection::RuntimeBusy);
            tracing::warn!(conn = id, %peer, error = %err, "connection refused");
            return;
        }
    };
    broker
        .stats
        .connections_active
        .fetch_add(1, Ordering::Relaxed);
    broker
        .stats
        .connections_total
        .fetch_add(1, Ordering::Relaxed);

    let mut conn = Connection {
        broker: broker.clone(),
        outbox: outbox.clone(),
        subs: HashMap::default(),
        cache: RouteCache::new(),
        batch: Batch::new(broker.stats.clone()),
        client: String::new(),
        owner: None,
        config,
        acks: 0,
        id,
        peer,
        cert_name,
        identity: Identity::nobody(),
        login: None,
        gate: PublishGate::default(),
        handshake: Some(handshake),
        published: (0, 0),
        throttle: Throttle::default(),
        refusals_logged: 0,
        run: Run::default(),
        held: Vec::new(),
        dedupe: None,
    };
    // Boxed: awaited inline, the connection's future would be kept twice
    // in the task (once made, once awaited) for the connection's life.
    let exit = Box::pin(conn.run(&mut rd, deadline)).await;
    conn.unsubscribe_all();
    let last = exit.error_frame().map(|e| Frame::Error(e).to_bytes());
    outbox.close(exit.close_reason(), last.as_deref());

    let grace = Duration::from_millis(broker.live.running().network.shutdown_grace_ms);
    let mut writer = writer;
    if tokio::time::timeout(grace, &mut writer).await.is_err() {
        writer.abort();
    }
    broker
        .stats
        .connections_active
        .fetch_sub(1, Ordering::Relaxed);
    broker.stats.closed(exit.disconnect());
    match &exit {
        Exit::Protocol(_)
        | Exit::HandshakeTimeout(_)
        | Exit::AuthFailed(..)
        | Exit::Revoked(_)
        | Exit::IdleTimeout(_)
        | Exit::Truncated(_) => {
            tracing::warn!(conn = id, %peer, client = ?conn.client, user = ?conn.login, reason = %exit, "connection closed")
        }
        _ => {
            tracing::debug!(conn = id, %peer, client = ?conn.client, reason = %exit, "connection closed")
        }
    }
}

struct Connection {
    broker: Arc<Inner>,
    outbox: Arc<Outbox>,
    subs: HashMap<u32, Arc<Subscriber>>,
    cache: RouteCache,
    batch: Batch,
    client: String,
    /// Who this connection is, for the logs of its subscriptions; made
    /// once the client has said its name.
    owner: Option<Arc<Owner>>,
    config: Arc<MemoryStreamerConfig>,
    /// PUB_ACKs queued in this read batch, counted once per batch.
    acks: u64,
    /// For the logs.
    id: u64,
    peer: SocketAddr,
    /// The identity in the client's verified certificate, under mutual TLS.
    cert_name: Option<String>,
    /// Who the client logged in as, and what it may do.
    identity: Arc<Identity>,
    /// The user name the client gave, for the logs (never the secret).
    login: Option<String>,
    gate: PublishGate,
    /// Held until HELLO is answered, then given back.
    handshake: Option<HandshakeSlot>,
    /// Messages and body bytes published in this read batch.
    published: (u64, u64),
    throttle: Throttle,
    /// The refusal codes already logged at info on this connection.
    refusals_logged: u64,
    /// Publishes on a topic with plugins, put through its chain together
    /// before anything else of this read is routed (see [`Run`]).
    run: Run,
    /// What answering each publish in `run` needs.
    held: Vec<Held>,
    /// The acknowledged publishes this publisher (by the id in its HELLO)
    /// had routed, so that its retries are not routed twice.
    dedupe: Option<Arc<parking_lot::Mutex<Window>>>,
}

/// A publish waiting in the plugin run.
struct Held {
    seq: u64,
    ack: bool,
    body_flags: u8,
    /// Where its body is in the read buffer.
    body: std::ops::Range<usize>,
}

/// A connection's publish allowance: a token bucket on each axis that
/// holds one second's worth of the limit.
#[derive(Default)]
struct Throttle {
    messages: f64,
    bytes: f64,
    last: Option<tokio::time::Instant>,
    /// Whether this connection was already held back (logged once).
    logged: bool,
}

impl Throttle {
    /// Spends `used` (messages, bytes) against the limits (0: none); how
    /// long the connection must wait before reading more, if at all.
    fn charge(&mut self, used: (u64, u64), limits: (usize, usize)) -> Option<Duration> {
        let (max_messages, max_bytes) = (limits.0 as f64, limits.1 as f64);
        let now = tokio::time::Instant::now();
        let elapsed = match self.last.replace(now) {
            Some(last) => now.duration_since(last).as_secs_f64(),
            // A fresh bucket is full.
            None => 1.0,
        };
        let mut wait: f64 = 0.0;
        for (allowance, max, spent) in [
            (&mut self.messages, max_messages, used.0 as f64),
            (&mut self.bytes, max_bytes, used.1 as f64),
        ] {
            if max == 0.0 {
                continue;
            }
            *allowance = (*allowance + elapsed * max).min(max) - spent;
            if *allowance < 0.0 {
                wait = wait.max(-*allowance / max);
            }
        }
        (wait > 0.0).then(|| Duration::from_secs_f64(wait))
    }
}

/// The topics a connection's identity was found allowed to publish to,
/// so that a run of publishes checks its permissions once per topic.
#[derive(Default)]
struct PublishGate {
    allowed: foldhash::HashSet<Topic>,
}

/// Past this many topics, a connection's permission cache starts over.
const GATE_CAP: usize = 4096;

impl PublishGate {
    /// Whether `identity` may publish to `topic`; the refusal's reason if not.
    #[inline]
    fn check(&mut self, identity: &Identity, topic: &Topic) -> Result<(), String> {
        if identity.publish.everything() || self.allowed.contains(topic) {
            return Ok(());
        }
        self.check_slow(identity, topic)
    }

    #[cold]
    fn check_slow(&mut self, identity: &Identity, topic: &Topic) -> Result<(), String> {
        identity
            .publish
            .permits_topic(topic)
            .map_err(|why| format!("{} may not publish to {topic}: {why}", identity.describe()))?;
        if self.allowed.len() >= GATE_CAP {
            self.allowed.clear();
        }
        self.allowed.insert(topic.clone());
        Ok(())
    }
}

/// What a failed login is told: enough to fix a mistake, not enough to
/// learn which of a user name and a password was wrong.
fn auth_failure_reason(failure: AuthFailure, detail: Option<&'static str>) -> String {
    match failure {
        AuthFailure::NoCredentials => {
            "credentials required: this broker does not accept anonymous clients".into()
        }
        AuthFailure::Malformed => format!(
            "authentication failed: {}",
            detail.unwrap_or("incomplete credentials")
        ),
        AuthFailure::UnknownUser | AuthFailure::WrongPassword => {
            "authentication failed: unknown user or wrong password".into()
        }
        AuthFailure::UnknownToken => "authentication failed: token not accepted".into(),
        AuthFailure::UnknownCertificate => {
            "authentication failed: the client certificate names no user of this broker".into()
        }
    }
}

impl Connection {
    async fn run<R: AsyncRead + Unpin>(
        &mut self,
        rd: &mut R,
        deadline: tokio::time::Instant,
    ) -> Exit {
        let config = self.config.clone();
        let read_size = config.network.read_buffer_bytes.max(4096);
        let max_frame = config.limits.max_frame_bytes;
        // Reads start small and double while they fill the buffer, up to
        // network.read_buffer_bytes: an idle connection holds a few hundred
        // bytes, a busy one reads in large chunks.
        let mut want = INITIAL_READ;
        let mut buf = BytesMut::new();

        let handshake = Duration::from_millis(config.network.handshake_timeout_ms);
        // Boxed: the handshake's futures (authentication among them) are
        // done with before the connection idles, and inline they would
        // size the connection's task for its whole life.
        let opened = Box::pin(async {
            let hello = match tokio::time::timeout_at(deadline, read_first(rd, &mut buf, max_frame))
                .await
            {
                Err(_) => return Err(Exit::HandshakeTimeout(handshake)),
                Ok(Err(exit)) => return Err(exit),
                Ok(Ok(frame)) => frame,
            };
            self.welcome(hello).await
        });
        if let Err(exit) = opened.await {
            return exit;
        }
        // The handshake is over: its place goes to the next one.
        self.handshake = None;
        let idle = Duration::from_millis(config.limits.idle_timeout_ms);
        let mut heard = tokio::time::Instant::now();
        let mut pinged = false;
        let idle_check = tokio::time::sleep(if idle.is_zero() {
            Duration::from_secs(86_400 * 365)
        } else {
            idle / 2
        });
        tokio::pin!(idle_check);

        let shutdown = self.broker.shutdown.clone();
        // The read loop's other wake-ups, made once and kept across reads:
        // each registers its waker once, not on every read.
        let stopping = shutdown.clone().cancelled_owned();
        tokio::pin!(stopping);
        let draining = self.broker.draining.clone().cancelled_owned();
        tokio::pin!(draining);
        let mut told_to_drain = false;
        let outbox = self.outbox.clone();
        let closing = async move { outbox.closed().await };
        tokio::pin!(closing);
        let mut changes = self.broker.auth.changes();
        changes.mark_unchanged();
        let auth_changed = next_change(changes);
        tokio::pin!(auth_changed);
        let mut reads: u32 = 0;
        let mut read_since_yield = 0;
        let yield_bytes = 2 * read_size;
        loop {
            if let Err(exit) = self.process(&mut buf, max_frame) {
                return exit;
            }
            let published = std::mem::take(&mut self.published);
            if published.0 > 0 {
                if let Some(wait) = self.over_rate(published) {
                    // Boxed: rare, and inline its timer would grow every
                    // connection's memory.
                    if let Err(exit) = Box::pin(self.hold_back(wait)).await {
                        return exit;
                    }
                }
            }
            let blocked = self.batch.take_blocked();
            if !blocked.is_empty() {
                // A subscriber under the block policy is behind: read
                // nothing more (TCP pushes back on this publisher) until it
                // has caught up.
                let wait = LiveLimits::get(&self.broker.live.limits.slow_consumer_block_ms);
                let limit = (wait > 0).then(|| Duration::from_millis(wait as u64));
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return Exit::ShuttingDown,
                    reason = self.outbox.closed() => return Exit::Outbox(reason),
                    _ = Box::pin(blocked.wait(limit, &self.broker.stats)) => {}
                }
            }
            reads = reads.wrapping_add(1);
            if reads.is_multiple_of(READS_PER_YIELD) || read_since_yield >= yield_bytes {
                // A socket that is always readable would otherwise keep
                // this worker to itself — and the writers of the
                // subscribers this connection feeds from it: what they
                // have not sent grows, and every copy into it and out of
                // it misses the cache.
                read_since_yield = 0;
                kaelix_core::runtime::yield_now().await;
            }
            if buf.capacity() - buf.len() < want / 2 {
                buf.reserve(want);
            }
            let room = buf.capacity() - buf.len();
            tokio::select! {
                biased;
                _ = &mut stopping => return Exit::ShuttingDown,
                reason = &mut closing => return Exit::Outbox(reason),
                _ = &mut draining, if !told_to_drain => {
                    told_to_drain = true;
                    let within = self.broker.live.running().network.drain_timeout_ms;
                    if self.reply(&Frame::Drain(u32::try_from(within).unwrap_or(u32::MAX))) {
                        self.outbox.wake();
                    }
                }
                changes = &mut auth_changed => {
                    auth_changed.set(next_change(changes));
                    if let Err(exit) = self.reauthorize() {
                        return exit;
                    }
                }
                _ = &mut idle_check, if !idle.is_zero() => {
                    let silent = heard.elapsed();
                    if silent >= idle {
                        return Exit::IdleTimeout(idle);
                    }
                    if silent >= idle / 2 && !pinged {
                        pinged = true;
                        if self.reply(&Frame::Ping(0)) {
                            self.outbox.wake();
                        }
                    }
                    let next = if pinged { heard + idle } else { heard + idle / 2 };
                    idle_check.as_mut().reset(next);
                }
                read = rd.read_buf(&mut buf) => {
                    heard = tokio::time::Instant::now();
                    pinged = false;
                    match read {
                        Ok(0) if !buf.is_empty() => return Exit::Truncated(buf.len()),
                        Ok(0) => return Exit::ClientClosed,
                        Ok(n) => {
                            read_since_yield += n;
                            if n == room {
                                want = (want * 2).min(read_size);
                            }
                        }
                        Err(err) => return Exit::ReadError(err),
                    }
                },
            }
        }
    }

    /// Charges a read's publishes against `limits.max_publish_*_per_sec`;
    /// how long the connection must read nothing, when over the rate.
    fn over_rate(&mut self, published: (u64, u64)) -> Option<Duration> {
        let limits = &self.broker.live.limits;
        let max = (
            LiveLimits::get(&limits.max_publish_messages_per_sec),
            LiveLimits::get(&limits.max_publish_bytes_per_sec),
        );
        if max == (0, 0) {
            return None;
        }
        let wait = self.throttle.charge(published, max)?;
        let stats = &self.broker.stats;
        stats.throttled.fetch_add(1, Ordering::Relaxed);
        stats
            .throttled_us
            .fetch_add(wait.as_micros() as u64, Ordering::Relaxed);
        if !std::mem::replace(&mut self.throttle.logged, true) {
            tracing::info!(
                conn = self.id, peer = %self.peer, identity = ?self.identity.name,
                messages_per_sec = max.0, bytes_per_sec = max.1,
                "publisher held back: over its publish rate (limits.max_publish_*_per_sec)"
            );
        }
        Some(wait)
    }

    /// Reads nothing for `wait`: the publish rate's penalty.
    async fn hold_back(&self, wait: Duration) -> Result<(), Exit> {
        tokio::select! {
            biased;
            _ = self.broker.shutdown.cancelled() => Err(Exit::ShuttingDown),
            reason = self.outbox.closed() => Err(Exit::Outbox(reason)),
            _ = tokio::time::sleep(wait) => Ok(()),
        }
    }

    async fn welcome(&mut self, hello: Frame) -> Result<(), Exit> {
        let Frame::Hello(hello) = hello else {
            return Err(Exit::Protocol(ProtocolError::HelloRequired(hello.name())));
        };
        let login = Login::from_hello(&hello.properties);
        let publisher_id = hello
            .properties
            .iter()
            .find(|(key, _)| key == dedupe::PUBLISHER_ID)
            .map(|(_, id)| id.as_str());
        self.dedupe = publisher_id.and_then(|id| {
            let now = Timestamp::now().as_nanos();
            self.broker.dedupe.window(id, now, &self.config.dedupe)
        });
        let detail = match &login {
            Login::Incomplete(what) => Some(*what),
            _ => None,
        };
        if let Login::Password { user, .. } = &login {
            self.login = Some(user.clone());
        }
        self.client = hello.client_name.clone();
        let auth = &self.broker.auth;
        self.identity = auth
            .authenticate(login, self.cert_name.as_deref())
            .await
            .map_err(|failure| Exit::AuthFailed(failure, detail))?;
        let version = hello.max_version.min(protocol::PROTOCOL_VERSION);
        if version < hello.min_version.max(protocol::MIN_PROTOCOL_VERSION) {
            return Err(Exit::Protocol(ProtocolError::UnsupportedVersion {
                peer_min: hello.min_version,
                peer_max: hello.max_version,
                min: protocol::MIN_PROTOCOL_VERSION,
                max: protocol::PROTOCOL_VERSION,
            }));
        }
        self.client = hello.client_name;
        // Debug-formatted: a client name is the client's text, and must not
        // be able to forge log lines.
        tracing::debug!(
            conn = self.id, peer = %self.peer, client = ?self.client, certificate = ?self.cert_name,
            identity = ?self.identity.name, version, "connection opened"
        );
        let welcome = Frame::Welcome(Welcome {
            version,
            server_name: "kaelix-broker".into(),
            max_frame_bytes: u32::try_from(self.config.limits.max_frame_bytes).unwrap_or(u32::MAX),
            // A cluster node says which: offsets are a node's own, so a
            // client that moves to another node does not resume by them.
            properties: match self.broker.cluster.get() {
                Some(node) => vec![("node".into(), node.id().to_string())],
                None => Vec::new(),
            },
        });
        self.reply(&welcome);
        self.outbox.wake();
        Ok(())
    }

    /// Handles every complete frame in `buf`, then hands the staged
    /// deliveries to their outboxes and wakes each of them once.
    ///
    /// PUBLISH frames are handled in place ([`protocol::peek`]): nothing is
    /// copied or reference-counted per message until a subscriber's staging
    /// buffer; the buffer is advanced past them once at the end.
    fn process(&mut self, buf: &mut BytesMut, max_frame: usize) -> Result<(), Exit> {
        let now = Timestamp::now();
        let max_payload = LiveLimits::get(&self.broker.live.limits.max_payload_bytes);
        let mut replied = false;
        let mut used = 0;
        let result = loop {
            match protocol::peek(&buf[used..], max_frame) {
                Ok(Peek::Incomplete) => break Ok(()),
                Ok(Peek::Publish(publish, len)) => {
                    // The body ends the frame.
                    let body_at = used + len - publish.body.len();
                    used += len;
                    replied |= self.publish(publish, body_at, &buf[..], now, max_payload);
                }
                Ok(Peek::Deliver(..)) => {
                    break Err(Exit::Protocol(ProtocolError::Unexpected {
                        frame: "MESSAGE",
                        context: "from a client",
                    }))
                }
                Ok(Peek::Route(..)) => {
                    break Err(Exit::Protocol(ProtocolError::Unexpected {
                        frame: "ROUTE",
                        context: "from a client",
                    }))
                }
                Ok(Peek::Other) => {
                    replied |= self.put_through(&buf[..]);
                    buf.advance(used);
                    used = 0;
                    match protocol::decode(buf, max_frame) {
                        Ok(Some(frame)) => match self.handle(frame) {
                            Ok(r) => replied |= r,
                            Err(exit) => break Err(exit),
                        },
                        Ok(None) => break Ok(()),
                        Err(err) => break Err(Exit::Protocol(err)),
                    }
                }
                Err(err) => break Err(Exit::Protocol(err)),
            }
        };
        replied |= self.put_through(&buf[..]);
        buf.advance(used);
        self.batch.finish();
        if self.acks > 0 {
            let acks = std::mem::take(&mut self.acks);
            self.broker.stats.acked.fetch_add(acks, Ordering::Relaxed);
        }
        if replied {
            self.outbox.wake();
        }
        result
    }

    /// Handles one frame other than PUBLISH; returns whether a reply was queued.
    fn handle(&mut self, frame: Frame) -> Result<bool, Exit> {
        match frame {
            Frame::Subscribe(subscribe) => Ok(self.subscribe(subscribe)),
            Frame::Unsubscribe(sid) => {
                if let Some(sub) = self.subs.remove(&sid) {
                    self.broker.router.unsubscribe(&sub);
                }
                Ok(false)
            }
            Frame::Credit(credit) => {
                if let Some(sub) = self.subs.get(&credit.sid) {
                    self.broker.router.grant(sub, credit.messages, credit.bytes);
                }
                Ok(false)
            }
            Frame::Ping(token) => Ok(self.reply(&Frame::Pong(token))),
            Frame::Stats(token) => {
                let broker = crate::MessageBroker {
                    inner: self.broker.clone(),
                };
                let mut json = broker.stats().to_json(&broker.health());
                if let Some(cluster) = broker.cluster_status() {
                    json["cluster"] = serde_json::to_value(cluster).unwrap_or_default();
                }
                let json = json.to_string();
                Ok(self.reply(&Frame::StatsReply(StatsReply { token, json })))
            }
            Frame::Admin(request) => {
                self.admin(request);
                Ok(false)
            }
            Frame::Pong(_) => Ok(false),
            other => Err(Exit::Protocol(ProtocolError::Unexpected {
                frame: other.name(),
                context: "from a client",
            })),
        }
    }

    /// An operator's request: carried out in a task of its own (a change
    /// waits for the cluster), answered with ADMIN_REPLY. Out of line: it
    /// is rare, and the frame loop stays small.
    #[cold]
    #[inline(never)]
    fn admin(&mut self, request: kaelix_core::protocol::AdminRequest) {
        let outbox = self.outbox.clone();
        let broker = crate::MessageBroker {
            inner: self.broker.clone(),
        };
        let allowed = self.identity.admin;
        let who = self.identity.describe();
        let task = async move {
            let result = if allowed {
                broker.admin(&request.json).await
            } else {
                Err((
                    ErrorCode::NotPermitted,
                    format!(
                        "{who} may not change the cluster \
                         (admin = true in its [[security.auth.users]] entry)"
                    ),
                ))
            };
            let (code, text) = match result {
                Ok(done) => (None, done),
                Err((code, reason)) => {
                    tracing::warn!(%reason, "cluster change refused");
                    (Some(code), reason)
                }
            };
            let reply = Frame::AdminReply(AdminReply {
                token: request.token,
                code,
                text,
            });
            outbox.push_now(64, |b| reply.encode(b));
            outbox.wake();
        };
        // A change waits for the cluster: not on this connection's task.
        if exec::spawn(self.broker.runtime.get(), TaskPriority::Normal, task).is_err() {
            tracing::warn!(
                conn = self.id,
                "cluster change dropped: the runtime is full"
            );
        }
    }

    /// Routes a publish whose body is at `body_at` in `read` (the read
    /// buffer); returns whether a reply was queued.
    fn publish(
        &mut self,
        publish: PublishRef<'_>,
        body_at: usize,
        read: &[u8],
        now: Timestamp,
        max_payload: usize,
    ) -> bool {
        // What the plugins hold goes first, unless this joins it.
        let mut replied = false;
        if !self.run.is_empty()
            && (!self.run.holds_topic(publish.topic) || publish.body.len() > max_payload)
        {
            replied = self.put_through(read);
        }
        replied | self.publish_one(publish, body_at, read, now, max_payload)
    }

    fn publish_one(
        &mut self,
        publish: PublishRef<'_>,
        body_at: usize,
        read: &[u8],
        now: Timestamp,
        max_payload: usize,
    ) -> bool {
        self.batch.add_bytes_in(publish.body.len());
        self.published.0 += 1;
        self.published.1 += publish.body.len() as u64;
        if publish.ack && self.is_retry(publish.seq, now) {
            self.broker.stats.duplicates.fetch_add(1, Ordering::Relaxed);
            self.acks += 1;
            return self.reply(&Frame::PubAck(publish.seq));
        }
        // The body bounds the payload, so the exact size is only worked
        // out for bodies above the limit.
        if publish.body.len() > max_payload {
            if let Some(refused) = self.refuse_oversized(&publish, max_payload) {
                return refused;
            }
        }
        match self
            .cache
            .resolve(&self.broker.router, publish.topic, &mut self.batch)
        {
            Ok((topic, matches)) => {
                if let Err(reason) = self.gate.check(&self.identity, topic) {
                    return self.refuse(publish.seq, ErrorCode::NotPermitted, reason);
                }
                if let Some(chain) = matches.chain() {
                    let (chain, topic) = (chain.clone(), topic.clone());
                    return self.hold(publish, body_at, read, &topic, &chain, now);
                }
                let publication = Publication::from_wire(publish.body_flags, publish.body, now);
                let routed = self.batch.route(
                    &self.broker.router,
                    topic,
                    matches,
                    &publication,
                    Scope::Origin,
                );
                if let Err(refused) = routed {
                    return self.refuse(publish.seq, ErrorCode::UnknownPartition, refused.0);
                }
                if publish.ack {
                    self.acks += 1;
                    self.reply(&Frame::PubAck(publish.seq))
                } else {
                    false
                }
            }
            Err(err) => self.refuse(publish.seq, ErrorCode::InvalidTopic, err.to_string()),
        }
    }

    /// A publish on a topic with plugins joins the run its chain will go
    /// over (the run was put through already if this could not join it).
    #[inline(never)]
    fn hold(
        &mut self,
        publish: PublishRef<'_>,
        body_at: usize,
        read: &[u8],
        topic: &Topic,
        chain: &Arc<Chain>,
        now: Timestamp,
    ) -> bool {
        let mut replied = false;
        if !self.run.accepts(chain, topic) {
            // Full, or the chain changed under a reload.
            replied = self.put_through(read);
        }
        let message = crate::router::wire_message(publish.body_flags, publish.body, topic, now);
        self.run.push(chain, topic, message);
        self.held.push(Held {
            seq: publish.seq,
            ack: publish.ack,
            body_flags: publish.body_flags,
            body: body_at..body_at + publish.body.len(),
        });
        replied
    }

    /// Puts the held publishes through their chain and routes what it let
    /// through (with copies, or the dead letters), in order. A refusal is
    /// answered when the publisher asked for an acknowledgement, and
    /// counted and logged either way. A message no plugin changed is
    /// forwarded as the bytes it arrived in (`read`, the read buffer).
    #[inline(never)]
    fn put_through(&mut self, read: &[u8]) -> bool {
        if self.run.is_empty() {
            return false;
        }
        let mut run = std::mem::take(&mut self.run);
        let held = std::mem::take(&mut self.held);
        let mut replied = false;
        run.finish(|i, message, fate, copies| {
            let h = &held[i];
            let refusal = match fate {
                Fate::Pass => {
                    let wire = read
                        .get(h.body.clone())
                        .filter(|body| unchanged(&message, h.body_flags, body));
                    let mut failed = self.route_result(message, wire.map(|b| (h.body_flags, b)));
                    for copy in copies {
                        if let Some(reason) = self.route_result(copy, None) {
                            failed.get_or_insert(reason);
                        }
                    }
                    failed.map(|reason| (ErrorCode::UnknownPartition, reason))
                }
                Fate::Refused {
                    code,
                    reason,
                    dead_letter,
                } => {
                    if dead_letter {
                        // Where a dead letter went does not change the answer.
                        let _ = self.route_result(message, None);
                    }
                    Some((code, reason))
                }
            };
            replied |= match refusal {
                None if h.ack => {
                    self.acks += 1;
                    self.reply(&Frame::PubAck(h.seq))
                }
                None => false,
                Some((code, reason)) if h.ack || code == ErrorCode::UnknownPartition => {
                    self.refuse(h.seq, code, reason)
                }
                Some((code, reason)) => {
                    self.broker.stats.publish_refused(code);
                    self.log_refusal("publish", code, &reason);
                    false
                }
            };
        });
        self.run = run;
        self.held = held;
        self.held.clear();
        replied
    }

    /// Routes a message a chain let through: as `wire` (its flags and body
    /// as they arrived) when given, else encoded from `message`.
    fn route_result(&mut self, message: Message, wire: Option<(u8, &[u8])>) -> Option<String> {
        let timestamp = message.timestamp;
        match self.cache.resolve(
            &self.broker.router,
            message.topic.as_bytes(),
            &mut self.batch,
        ) {
            Ok((topic, matches)) => {
                let publication = match wire {
                    Some((flags, body)) => Publication::from_wire(flags, body, timestamp),
                    None => Publication::from_message(message),
                };
                self.batch
                    .route(
                        &self.broker.router,
                        topic,
                        matches,
                        &publication,
                        Scope::Origin,
                    )
                    .err()
                    .map(|refused| refused.0)
            }
            Err(err) => Some(err.to_string()),
        }
    }

    /// Whether acknowledged publish `seq` was routed before (a retry of a
    /// publisher that reconnected); if not, it is remembered as routed.
    fn is_retry(&self, seq: u64, now: Timestamp) -> bool {
        match &self.dedupe {
            Some(window) => !window
                .lock()
                .claim(seq, now.as_nanos(), &self.config.dedupe),
            None => false,
        }
    }

    /// Answers publish `seq` with a refusal, counted by its code.
    #[cold]
    fn refuse(&mut self, seq: u64, code: ErrorCode, reason: String) -> bool {
        if let Some(window) = &self.dedupe {
            // Claimed, but not routed: a retry gets the refusal again.
            window.lock().release(seq);
        }
        self.broker.stats.publish_refused(code);
        self.log_refusal("publish", code, &reason);
        self.reply(&Frame::PubNack(Nack {
            id: seq,
            code,
            reason,
        }))
    }

    /// Refuses a publish whose payload and headers (the body without its
    /// topic and partition) pass `limits.max_payload_bytes`; `None` when
    /// they do not. Returns whether a wake is needed.
    #[cold]
    #[inline(never)]
    fn refuse_oversized(&mut self, publish: &PublishRef<'_>, max_payload: usize) -> Option<bool> {
        let partition = if publish.body_flags & protocol::flags::PARTITION != 0 {
            4
        } else {
            0
        };
        let size = publish
            .body
            .len()
            .saturating_sub(1 + publish.topic.len() + partition);
        if size <= max_payload {
            return None;
        }
        let reason = format!(
            "message of {size} bytes (payload and headers) exceeds \
             limits.max_payload_bytes ({max_payload})"
        );
        Some(self.refuse(publish.seq, ErrorCode::PayloadTooLarge, reason))
    }

    /// Logs a refusal: the first of each kind on this connection at info,
    /// the rest at debug, so that a client repeating a mistake cannot
    /// flood the log (every one is counted in the metrics).
    #[cold]
    fn log_refusal(&mut self, what: &str, code: ErrorCode, reason: &str) {
        let bit = 1u64 << (code.as_u16() % 64);
        if self.refusals_logged & bit == 0 {
            self.refusals_logged |= bit;
            tracing::info!(
                conn = self.id, peer = %self.peer, identity = ?self.identity.name,
                code = code.name(), %reason,
                "{what} refused (further ones of this kind on this connection are logged at debug)"
            );
        } else {
            tracing::debug!(conn = self.id, peer = %self.peer, code = code.name(), %reason, "{what} refused");
        }
    }

    fn subscribe(&mut self, subscribe: Subscribe) -> bool {
        let Subscribe {
            sid,
            pattern,
            group,
            start,
            policy,
            partitions,
            sticky,
            credit,
            resume,
        } = subscribe;
        let stats = &self.broker.stats;
        let refuse = |code, reason: String| {
            stats.subscribe_refused(code);
            Frame::SubNack(Nack {
                id: u64::from(sid),
                code,
                reason,
            })
        };
        let limit = LiveLimits::get(&self.broker.live.limits.max_subscriptions_per_connection);
        let answer = if self.subs.contains_key(&sid) {
            refuse(
                ErrorCode::DuplicateSubscription,
                format!("subscription id {sid} is already in use on this connection"),
            )
        } else if self.subs.len() >= limit {
            refuse(
                ErrorCode::TooManySubscriptions,
                format!("this connection already holds {limit} subscriptions (limits.max_subscriptions_per_connection)"),
            )
        } else {
            match parse_subscription(pattern, group) {
                Err((code, reason)) => refuse(code, reason),
                Ok((pattern, _)) if self.identity.subscribe.permits_pattern(&pattern).is_err() => {
                    let why = self
                        .identity
                        .subscribe
                        .permits_pattern(&pattern)
                        .err()
                        .unwrap_or_default();
                    refuse(
                        ErrorCode::NotPermitted,
                        format!(
                            "{} may not subscribe to {pattern}: {why}",
                            self.identity.describe()
                        ),
                    )
                }
                Ok((_, Some(_))) if start != StartPosition::Latest || !resume.is_empty() => refuse(
                    ErrorCode::InvalidGroup,
                    "a queue group subscription starts at the latest message: replaying \
                     to one member of a group is not defined"
                        .into(),
                ),
                Ok((_, Some(_))) if credit.is_some() => refuse(
                    ErrorCode::InvalidGroup,
                    "a queue group member cannot have a credit window: the group shares out \
                     messages as they come"
                        .into(),
                ),
                Ok((_, Some(_))) if !partitions.is_empty() => refuse(
                    ErrorCode::InvalidGroup,
                    "a queue group member takes the partitions the group gives it: ask for \
                     sticky partitions instead of naming them"
                        .into(),
                ),
                Ok((pattern, group)) => match PartitionSet::of(&partitions) {
                    Err(p) => refuse(
                        ErrorCode::UnknownPartition,
                        kaelix_core::PartitionId::beyond_max(p),
                    ),
                    Ok(partitions) => {
                        let owner = self
                            .owner
                            .get_or_insert_with(|| {
                                Arc::new(Owner {
                                    conn: self.id,
                                    peer: self.peer.to_string(),
                                    client: self.client.clone(),
                                })
                            })
                            .clone();
                        let new = NewSub {
                            pattern,
                            group,
                            sid,
                            sink: Sink::Net(self.outbox.clone()),
                            policy,
                            owner,
                            partitions,
                            sticky,
                            credit: credit.map(|c| (c.messages, c.bytes)),
                            route: false,
                        };
                        let router = &self.broker.router;
                        if start == StartPosition::Latest && resume.is_empty() {
                            self.subs.insert(sid, router.subscribe(new));
                            Frame::SubAck(sid)
                        } else {
                            let starts = Starts {
                                default: start,
                                resume: resume
                                    .into_iter()
                                    .map(|at| ((at.topic, at.partition), at.next))
                                    .collect(),
                            };
                            // The SUB_ACK goes out with the replay, in front
                            // of its messages (and the outbox is woken).
                            let ack = Frame::SubAck(sid);
                            let (sub, _) = router.subscribe_from(new, &starts, Some(&ack));
                            self.subs.insert(sid, sub);
                            return false;
                        }
                    }
                },
            }
        };
        if let Frame::SubNack(nack) = &answer {
            self.log_refusal("subscribe", nack.code, &nack.reason);
        }
        self.reply(&answer)
    }

    /// Queues a reply; returns whether the writer needs a wake. A client
    /// that does not read its replies is a slow consumer like any other.
    fn reply(&self, frame: &Frame) -> bool {
        // Replies are small; the estimate only feeds the limit check.
        match self.outbox.push(64, |b| frame.encode(b)) {
            Pushed::First => true,
            Pushed::More | Pushed::Closed => false,
            Pushed::Full => {
                let last = Frame::Error(ErrorFrame {
                    code: ErrorCode::SlowConsumer,
                    reason: "slow consumer: replies were not read".into(),
                    retry_after_ms: None,
                })
                .to_bytes();
                self.outbox.close(CloseReason::SlowConsumer, Some(&last));
                self.broker
                    .stats
                    .slow_consumers
                    .fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Takes the identity's permissions from a reloaded `[security.auth]`:
    /// subscriptions they no longer allow end (each answered with a
    /// SUB_NACK), and a removed identity is disconnected.
    fn reauthorize(&mut self) -> Result<(), Exit> {
        let Some(identity) = self.broker.auth.refresh(&self.identity) else {
            return Err(Exit::Revoked(format!(
                "{} may no longer connect (security.auth changed)",
                self.identity.describe()
            )));
        };
        self.identity = identity;
        self.gate = PublishGate::default();
        let revoked: Vec<(u32, String)> = self
            .subs
            .iter()
            .filter_map(|(sid, sub)| {
                let why = self
                    .identity
                    .subscribe
                    .permits_pattern(&sub.pattern)
                    .err()?;
                Some((
                    *sid,
                    format!(
                        "subscription to {} ended: {} may no longer subscribe to it: {why}",
                        sub.pattern,
                        self.identity.describe()
                    ),
                ))
            })
            .collect();
        let mut replied = false;
        for (sid, reason) in revoked {
            if let Some(sub) = self.subs.remove(&sid) {
                self.broker.router.unsubscribe(&sub);
            }
            tracing::info!(conn = self.id, peer = %self.peer, identity = ?self.identity.name, %reason, "subscription revoked");
            self.broker.stats.subscribe_refused(ErrorCode::NotPermitted);
            replied |= self.reply(&Frame::SubNack(Nack {
                id: u64::from(sid),
                code: ErrorCode::NotPermitted,
                reason,
            }));
        }
        if replied {
            self.outbox.wake();
        }
        Ok(())
    }

    fn unsubscribe_all(&mut self) {
        for (_, sub) in self.subs.drain() {
            self.broker.router.unsubscribe(&sub);
        }
    }
}

/// Waits for the next change of `[security.auth]`, and hands the receiver
/// back for the one after.
async fn next_change(
    mut changes: tokio::sync::watch::Receiver<u64>,
) -> tokio::sync::watch::Receiver<u64> {
    if changes.changed().await.is_err() {
        // The broker is gone; its shutdown ends the connection.
        std::future::pending::<()>().await;
    }
    changes
}

/// A refusal's code and reason.
type Refusal = (ErrorCode, String);

fn parse_subscription(
    pattern: bytes::Bytes,
    group: Option<bytes::Bytes>,
) -> Result<(TopicPattern, Option<Arc<str>>), Refusal> {
    // Copied: a slice would keep the whole read buffer it arrived in
    // alive for as long as the subscription lasts.
    let pattern = TopicPattern::from_bytes(bytes::Bytes::copy_from_slice(&pattern))
        .map_err(|e| (ErrorCode::InvalidPattern, e.to_string()))?;
    let group = match group {
        None => None,
        Some(raw) => {
            let name = std::str::from_utf8(&raw).map_err(|_| {
                (
                    ErrorCode::InvalidGroup,
                    "queue group name is not UTF-8".to_string(),
                )
            })?;
            check_group(name).map_err(|e| (ErrorCode::InvalidGroup, e.to_string()))?;
            Some(Arc::from(name))
        }
    };
    Ok((pattern, group))
}

/// Reads until the first whole frame.
async fn read_first<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    max_frame: usize,
) -> Result<Frame, Exit> {
    loop {
        match protocol::decode(buf, max_frame) {
            Ok(Some(frame)) => return Ok(frame),
            Ok(None) => {}
            Err(err) => return Err(Exit::Protocol(err)),
        }
        buf.reserve(INITIAL_READ);
        match rd.read_buf(buf).await {
            Ok(0) if !buf.is_empty() => return Err(Exit::Truncated(buf.len())),
            Ok(0) => return Err(Exit::ClientClosed),
            Ok(_) => {}
            Err(err) => return Err(Exit::ReadError(err)),
        }
    }
}

/// Whether a chain left `message` as the PUBLISH body it was made of: same
/// topic, partition, headers and payload.
fn unchanged(message: &Message, body_flags: u8, body: &[u8]) -> bool {
    let Ok(parts) = protocol::decode::body_parts(body, body_flags) else {
        return false;
    };
    let headers = parts.headers.map(protocol::decode::header_slices);
    let same_headers = match headers {
        None => message.headers.is_empty(),
        Some(wire) => message
            .headers
            .iter()
            .map(|(n, v)| (n.as_bytes(), v.as_bytes()))
            .eq(wire),
    };
    message.topic.as_bytes() == parts.topic
        && message.partition.map(|p| p.get()) == parts.partition
        && same_headers
        && message.payload[..] == *parts.payload
}

#[cfg(test)]
mod tests {
    use kaelix_core::protocol::MessageBody;
    use kaelix_core::PartitionId;

    use super::*;

    #[test]
    fn a_message_a_chain_left_alone_is_forwarded_as_it_came() {
        let topic = Topic::new("orders.eu").unwrap();
        let sent = Message::builder()
            .topic("orders.eu")
            .payload("payload")
            .header("a", "1")
            .header("b", "2")
            .build()
            .unwrap();
        let body = MessageBody::from_message(&sent);
        let (flags, raw) = (body.flags(), body.raw().clone());
        let made = crate::router::wire_message(flags, &raw, &topic, Timestamp::now());
        assert!(unchanged(&made, flags, &raw));

        let changed: [fn(&mut Message); 5] = [
            |m| m.set_header("c", "3"),
            |m| m.set_header("a", "one"),
            |m| m.set_payload("other"),
            |m| m.set_topic(Topic::new("orders.us").unwrap()),
            |m| m.partition = Some(PartitionId::new(1)),
        ];
        for change in changed {
            let mut m = made.clone();
            change(&mut m);
            assert!(!unchanged(&m, flags, &raw), "{m:?}");
        }
        let mut fewer = made.clone();
        fewer.headers.remove("b");
        assert!(!unchanged(&fewer, flags, &raw));

        let bare = Message::new(topic.clone(), "payload").unwrap();
        let body = MessageBody::from_message(&bare);
        let made = crate::router::wire_message(body.flags(), body.raw(), &topic, Timestamp::now());
        assert!(unchanged(&made, body.flags(), body.raw()));
        let mut stamped = made.clone();
        stamped.set_header("x", "y");
        assert!(!unchanged(&stamped, body.flags(), body.raw()));
    }
}
