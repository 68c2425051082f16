//! The client side of a connection, shared by the publisher and consumer
//! crates: connect, handshake, read frames in batches, write through an
//! [`Outbox`].

pub mod link;
pub mod reconnect;
pub mod session;

pub use link::Link;
pub use reconnect::{Backoff, ConnectionEvent, ReconnectPolicy};

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::{TcpStream, ToSocketAddrs};
use tokio::task::JoinHandle;

use crate::error::{CloseReason, Error, Result};
use crate::outbox::{Outbox, Pushed};
use crate::protocol::{self, Frame, Hello, Welcome};
use crate::tls::ClientTls;

/// HELLO property names that carry credentials.
pub mod hello_keys {
    /// An access token.
    pub const TOKEN: &str = "token";
    /// A user name; goes with [`PASSWORD`].
    pub const USER: &str = "user";
    /// The user's password.
    pub const PASSWORD: &str = "password";
    /// A publisher's id, the same across its reconnects: the broker
    /// recognises the publishes it sends again by it.
    pub const PUBLISHER_ID: &str = "publisher-id";
}

/// Who the client says it is. The broker may also take the identity from
/// a client certificate (see [`ClientTls`]), and then needs none of these.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    /// An access token from the broker's `[[security.auth.users]]`.
    Token(String),
    /// A user name and password.
    User { name: String, password: String },
}

impl Credentials {
    /// A user name and password.
    pub fn user(name: impl Into<String>, password: impl Into<String>) -> Credentials {
        Credentials::User {
            name: name.into(),
            password: password.into(),
        }
    }

    /// An access token.
    pub fn token(token: impl Into<String>) -> Credentials {
        Credentials::Token(token.into())
    }

    fn hello_properties(&self) -> Vec<(String, String)> {
        match self {
            Credentials::Token(token) => vec![(hello_keys::TOKEN.into(), token.clone())],
            Credentials::User { name, password } => vec![
                (hello_keys::USER.into(), name.clone()),
                (hello_keys::PASSWORD.into(), password.clone()),
            ],
        }
    }
}

/// Secrets stay out of logs and panics.
impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::Token(_) => f.write_str("Token(<redacted>)"),
            Credentials::User { name, .. } => f
                .debug_struct("User")
                .field("name", name)
                .field("password", &"<redacted>")
                .finish(),
        }
    }
}

/// How a client connects.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Sent in HELLO; shows up in the broker's logs.
    pub name: String,
    /// How long connecting and the handshake may take.
    pub connect_timeout: Duration,
    /// Bytes buffered for sending before senders wait. Small enough to stay
    /// in the CPU cache: a larger buffer only adds queueing (measured:
    /// 8 MiB → 512 KiB made 1 KiB publishes 1.37× faster on one CPU).
    pub max_pending_bytes: usize,
    /// Bytes read per read call.
    pub read_buffer_bytes: usize,
    /// Speak TLS to the broker; `None` connects in plain TCP.
    pub tls: Option<ClientTls>,
    /// Credentials sent in HELLO, for brokers that require them.
    pub credentials: Option<Credentials>,
    /// How the client notices a dead broker.
    pub heartbeat: Heartbeat,
    /// Whether and how the client reconnects after losing its broker.
    pub reconnect: ReconnectPolicy,
    /// Bytes of frames held while disconnected, sent once reconnected.
    pub reconnect_buffer_bytes: usize,
    /// What a send does when that buffer is full.
    pub when_buffer_full: WhenBufferFull,
    /// When a publisher stops waiting for a broker that does not come back.
    pub circuit: CircuitPolicy,
}

/// What a send does while disconnected when the reconnect buffer is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WhenBufferFull {
    /// Wait until the client reconnects (or gives up) and there is room.
    #[default]
    Wait,
    /// Fail at once with [`Error::BufferFull`].
    Fail,
}

/// The client's circuit breaker: after `failure_threshold` reconnect
/// attempts in a row failed, sends made while disconnected fail at once
/// with [`Error::CircuitOpen`] instead of waiting in the buffer, and the
/// client tries the brokers once per `cooldown` (half-open); the first
/// connection that succeeds closes it. A zero threshold turns it off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitPolicy {
    pub failure_threshold: u32,
    pub cooldown: Duration,
}

impl Default for CircuitPolicy {
    fn default() -> Self {
        CircuitPolicy {
            failure_threshold: 5,
            cooldown: Duration::from_secs(5),
        }
    }
}

/// How a client notices a broker that went away without closing the
/// connection (a half-open TCP connection, a hung process): after
/// `interval` without hearing anything it sends a ping; if nothing comes
/// back within `timeout`, the connection is closed as
/// [`CloseReason::PeerSilent`]. A dead broker is noticed within
/// `interval + timeout`. A zero `interval` turns it off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    pub interval: Duration,
    pub timeout: Duration,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Heartbeat {
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(10),
        }
    }
}

/// The heartbeat of one connection, kept by its reader.
struct Watch {
    outbox: Arc<Outbox>,
    heartbeat: Heartbeat,
    /// When to ping, or (once pinged) to give up.
    deadline: tokio::time::Instant,
    pinged: bool,
}

impl Watch {
    fn heard(&mut self) {
        self.pinged = false;
        self.deadline = tokio::time::Instant::now() + self.heartbeat.interval;
    }

    /// The deadline passed: ping, or give up if a ping went unanswered.
    fn expired(&mut self) -> Result<(), CloseReason> {
        if self.pinged {
            return Err(CloseReason::PeerSilent(
                self.heartbeat.interval + self.heartbeat.timeout,
            ));
        }
        let ping = Frame::Ping(HEARTBEAT_TOKEN);
        if self
            .outbox
            .push_now(protocol::HEADER_LEN + 8, |b| ping.encode(b))
            == Pushed::Closed
        {
            return Err(self
                .outbox
                .close_reason()
                .unwrap_or(CloseReason::PeerClosed));
        }
        self.pinged = true;
        self.deadline = tokio::time::Instant::now() + self.heartbeat.timeout;
        Ok(())
    }
}

/// The token of heartbeat pings (clients number their own from 1).
pub const HEARTBEAT_TOKEN: u64 = 0;

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            name: "kaelix-client".into(),
            connect_timeout: Duration::from_secs(5),
            max_pending_bytes: 512 * 1024,
            read_buffer_bytes: 64 * 1024,
            tls: None,
            credentials: None,
            heartbeat: Heartbeat::default(),
            reconnect: ReconnectPolicy::default(),
            reconnect_buffer_bytes: 8 * 1024 * 1024,
            when_buffer_full: WhenBufferFull::default(),
            circuit: CircuitPolicy::default(),
        }
    }
}

/// A connected, handshaken client connection.
#[derive(Debug)]
pub struct ClientConn {
    /// Frames to send go here; a writer task sends them.
    pub outbox: Arc<Outbox>,
    /// Frames received.
    pub reader: FrameReader,
    /// What the broker answered to HELLO.
    pub welcome: Welcome,
    /// The writer task; it ends when the outbox closes.
    pub writer: JoinHandle<()>,
}

/// The receiving half of a connection, plain or TLS.
pub type ReadHalf = Box<dyn AsyncRead + Send + Unpin>;

/// Reads frames off the receiving half of a connection, a batch per read.
pub struct FrameReader {
    rd: ReadHalf,
    buf: BytesMut,
    read_size: usize,
    max_frame_bytes: usize,
    watch: Option<Watch>,
}

impl fmt::Debug for FrameReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrameReader")
            .field("buffered", &self.buf.len())
            .field("max_frame_bytes", &self.max_frame_bytes)
            .finish()
    }
}

impl FrameReader {
    /// Reads once more into the buffer (for callers that [`peek`](crate::protocol::peek)
    /// at frames in place).
    pub async fn fill(&mut self) -> Result<(), CloseReason> {
        if self.buf.capacity() - self.buf.len() < self.read_size / 2 {
            self.buf.reserve(self.read_size);
        }
        self.read_more().await
    }

    /// One read into the buffer, keeping the heartbeat: a quiet connection
    /// is pinged, and one that stays quiet is given up on.
    async fn read_more(&mut self) -> Result<(), CloseReason> {
        let FrameReader { rd, buf, watch, .. } = self;
        loop {
            let read = match watch {
                None => rd.read_buf(buf).await,
                // Reading into a buffer is cancel-safe: a timed-out read
                // loses nothing.
                Some(w) => match tokio::time::timeout_at(w.deadline, rd.read_buf(buf)).await {
                    Ok(read) => read,
                    Err(_) => {
                        w.expired()?;
                        continue;
                    }
                },
            };
            return match read {
                Ok(0) => Err(CloseReason::PeerClosed),
                Ok(_) => {
                    if let Some(w) = watch {
                        w.heard();
                    }
                    Ok(())
                }
                Err(err) => Err(CloseReason::Io(err.to_string())),
            };
        }
    }

    /// The bytes read and not yet consumed.
    pub fn buffer(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// The largest frame this reader accepts.
    pub fn max_frame_bytes(&self) -> usize {
        self.max_frame_bytes
    }

    /// Reads once and appends every complete frame to `out`. An error frame
    /// from the broker is returned as a frame; the stream ending or breaking
    /// is returned as the reason.
    pub async fn read_batch(&mut self, out: &mut Vec<Frame>) -> Result<(), CloseReason> {
        loop {
            loop {
                match protocol::decode(&mut self.buf, self.max_frame_bytes) {
                    Ok(Some(frame)) => out.push(frame),
                    Ok(None) => break,
                    Err(err) => return Err(CloseReason::Protocol(err.to_string())),
                }
            }
            if !out.is_empty() {
                return Ok(());
            }
            self.buf.reserve(self.read_size);
            self.read_more().await?;
        }
    }
}

/// Connects to the first of `addresses` (`"host:port"`, tried in a random
/// order) that answers, and says HELLO; returns the connection and the
/// address it reached. When none answers, the error names each address
/// and why. A refusal by a broker (bad credentials, say) is returned at
/// once: another broker of the same cluster would refuse as well.
pub async fn connect_any(
    addresses: &[String],
    options: &ClientOptions,
) -> Result<(ClientConn, String)> {
    connect_any_as(addresses, options, &[]).await
}

/// [`connect_any`], with HELLO properties of the client's own (beyond its
/// credentials).
pub async fn connect_any_as(
    addresses: &[String],
    options: &ClientOptions,
    properties: &[(String, String)],
) -> Result<(ClientConn, String)> {
    attempt_any(addresses, options, properties)
        .await
        .map_err(|failed| failed.error)
}

/// Why a connection attempt failed, and how long the broker asked the
/// client to wait before the next (a broker shedding load says so).
#[derive(Debug)]
pub struct Failed {
    pub error: Error,
    pub retry_after: Option<Duration>,
}

impl From<Error> for Failed {
    fn from(error: Error) -> Failed {
        Failed {
            error,
            retry_after: None,
        }
    }
}

impl Failed {
    /// A refusal that another attempt, or another broker of the same
    /// cluster, would get too (the client's credentials, say); a broker
    /// refusing for load or shutting down is worth another try.
    pub fn is_final(&self) -> bool {
        match &self.error {
            Error::Refused { code, reason } => !link::worth_reconnecting(&CloseReason::Server {
                code: *code,
                reason: reason.clone(),
            }),
            _ => false,
        }
    }
}

/// One attempt over `addresses` (in a random order): the first that
/// answers, or why none did, with the longest wait a broker asked for.
pub async fn attempt_any(
    addresses: &[String],
    options: &ClientOptions,
    properties: &[(String, String)],
) -> Result<(ClientConn, String), Failed> {
    if addresses.is_empty() {
        return Err(Error::NoBroker("no address given".into()).into());
    }
    if let [addr] = addresses {
        // One address: its own error says it best.
        return Ok((
            attempt(addr.as_str(), options, properties).await?,
            addr.clone(),
        ));
    }
    let mut failures = Vec::new();
    let mut retry_after = None;
    for addr in reconnect::shuffled(addresses) {
        match attempt(addr.as_str(), options, properties).await {
            Ok(conn) => return Ok((conn, addr)),
            Err(failed) if failed.is_final() => return Err(failed),
            Err(failed) => {
                retry_after = retry_after.max(failed.retry_after);
                failures.push(format!("{addr}: {}", failed.error));
            }
        }
    }
    Err(Failed {
        error: Error::NoBroker(failures.join("; ")),
        retry_after,
    })
}

/// The addresses `addr` stands for, as `"ip:port"` strings a client can
/// reconnect to (a host name is resolved now, once).
pub async fn resolve(addr: impl ToSocketAddrs) -> Result<Vec<String>> {
    let addresses: Vec<String> = tokio::net::lookup_host(addr)
        .await?
        .map(|a| a.to_string())
        .collect();
    if addresses.is_empty() {
        return Err(Error::NoBroker("the address resolves to nothing".into()));
    }
    Ok(addresses)
}

/// Connects to `addr` and says HELLO.
pub async fn connect(addr: impl ToSocketAddrs, options: &ClientOptions) -> Result<ClientConn> {
    connect_as(addr, options, &[]).await
}

/// [`connect`], with HELLO properties of the client's own.
pub async fn connect_as(
    addr: impl ToSocketAddrs,
    options: &ClientOptions,
    properties: &[(String, String)],
) -> Result<ClientConn> {
    attempt(addr, options, properties)
        .await
        .map_err(|failed| failed.error)
}

async fn attempt(
    addr: impl ToSocketAddrs,
    options: &ClientOptions,
    properties: &[(String, String)],
) -> Result<ClientConn, Failed> {
    let timeout = options.connect_timeout;
    tokio::time::timeout(timeout, connect_inner(addr, options, properties))
        .await
        .map_err(|_| Error::Timeout(timeout, "the broker to accept the connection"))?
}

async fn connect_inner(
    addr: impl ToSocketAddrs,
    options: &ClientOptions,
    properties: &[(String, String)],
) -> Result<ClientConn, Failed> {
    let stream = TcpStream::connect(addr).await.map_err(Error::from)?;
    stream.set_nodelay(true).map_err(Error::from)?;
    match &options.tls {
        None => {
            let (rd, wr) = stream.into_split();
            handshake(Box::new(rd), wr, options, properties).await
        }
        Some(tls) => {
            let name = tls.server_name_for(stream.peer_addr().map_err(Error::from)?.ip());
            let connector = tokio_rustls::TlsConnector::from(tls.config().clone());
            let stream = connector
                .connect(name, stream)
                .await
                .map_err(|e| Error::Tls(format!("handshake with the broker failed: {e}")))?;
            let (rd, wr) = tokio::io::split(stream);
            handshake(Box::new(rd), wr, options, properties).await
        }
    }
}

/// Says HELLO over an open transport and waits for WELCOME.
async fn handshake<W>(
    rd: ReadHalf,
    mut wr: W,
    options: &ClientOptions,
    extra: &[(String, String)],
) -> Result<ClientConn, Failed>
where
    W: AsyncWrite + Send + Unpin + 'static,
{
    let outbox = Arc::new(Outbox::new(options.max_pending_bytes));
    let mut properties = options
        .credentials
        .as_ref()
        .map(Credentials::hello_properties)
        .unwrap_or_default();
    properties.extend_from_slice(extra);
    let hello = Frame::Hello(Hello {
        min_version: protocol::MIN_PROTOCOL_VERSION,
        max_version: protocol::PROTOCOL_VERSION,
        client_name: options.name.clone(),
        properties,
    });
    let bytes = hello.to_bytes();
    outbox.push_now(bytes.len(), |b| b.extend_from_slice(&bytes));
    let writer = {
        let outbox = outbox.clone();
        tokio::spawn(async move {
            if let Ok(reason) = outbox.write_to(&mut wr).await {
                tracing::debug!(%reason, "client writer finished");
            }
        })
    };
    let mut reader = FrameReader {
        rd,
        buf: BytesMut::with_capacity(options.read_buffer_bytes),
        read_size: options.read_buffer_bytes,
        // Until the broker states its limit, accept what any broker may send.
        max_frame_bytes: 64 * 1024 * 1024,
        watch: None,
    };
    let mut frames = Vec::with_capacity(1);
    let first = reader.read_batch(&mut frames).await;
    let welcome = match (first, frames.first()) {
        (Ok(()), Some(Frame::Welcome(w))) if frames.len() == 1 => w.clone(),
        (Ok(()), Some(Frame::Error(e))) => {
            writer.abort();
            return Err(Failed {
                error: Error::Refused {
                    code: e.code,
                    reason: e.reason.clone(),
                },
                retry_after: e.retry_after_ms.map(|ms| Duration::from_millis(ms.into())),
            });
        }
        (Ok(()), _) => {
            writer.abort();
            return Err(Error::Closed(CloseReason::Protocol(
                "the broker did not answer HELLO with WELCOME".into(),
            ))
            .into());
        }
        (Err(reason), _) => {
            writer.abort();
            return Err(Error::Closed(reason).into());
        }
    };
    if !options.heartbeat.interval.is_zero() {
        reader.watch = Some(Watch {
            outbox: outbox.clone(),
            heartbeat: options.heartbeat,
            deadline: tokio::time::Instant::now() + options.heartbeat.interval,
            pinged: false,
        });
    }
    Ok(ClientConn {
        outbox,
        reader,
        welcome,
        writer,
    })
}

/// Closes a client's link when the last handle to it is dropped. The
/// client's reader task holds the shared state but not this guard, so an
/// application that drops its handles does not leak the connection (nor
/// a reconnect loop).
#[derive(Debug)]
pub struct CloseOnDrop(pub Arc<Link>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close(CloseReason::Closed);
    }
}
