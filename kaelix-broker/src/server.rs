//! The TCP listener: accepts connections up to `network.max_connections`
//! and hands each to [`connection::serve`](crate::connection) until the
//! broker shuts down.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kaelix_core::protocol::{ErrorCode, ErrorFrame, Frame};
use kaelix_core::runtime::TaskPriority;
use tokio::net::{TcpListener, TcpStream, ToSocketAddrs};

use crate::broker::MessageBroker;
use crate::connection;
use crate::exec;
use crate::live::LiveLimits;
use crate::stats::Rejection;

/// A bound listener serving a [`MessageBroker`] over TCP.
pub struct Server {
    listener: TcpListener,
    broker: MessageBroker,
}

impl Server {
    /// Binds to `network.host`:`network.port` of the broker's configuration.
    pub async fn bind(broker: &MessageBroker) -> io::Result<Server> {
        let config = broker.config();
        let network = &config.network;
        Self::bind_addr(broker, (network.host.as_str(), network.port)).await
    }

    /// Binds to `addr`; port 0 picks a free port (see [`local_addr`](Self::local_addr)).
    ///
    /// With `security.tls.enabled`, the certificate is loaded first (an
    /// unusable one fails the bind) and its files are watched from then on.
    pub async fn bind_addr(broker: &MessageBroker, addr: impl ToSocketAddrs) -> io::Result<Server> {
        let inner = &broker.inner;
        let tls = &broker.config().security.tls;
        if tls.enabled && inner.tls.acceptor().is_none() {
            inner
                .tls
                .apply(tls, "start")
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("TLS: {e}")))?;
        }
        inner.tls.watch(tls, Arc::downgrade(inner));
        let listener = TcpListener::bind(addr).await?;
        Ok(Server {
            listener,
            broker: broker.clone(),
        })
    }

    /// Binds to `addr` and serves in a background task until the broker
    /// shuts down; returns the address it listens on. For embedding a
    /// broker in a program or a test:
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> std::io::Result<()> {
    /// let broker = kaelix_broker::MessageBroker::new();
    /// let addr = kaelix_broker::Server::spawn(&broker, "127.0.0.1:0").await?;
    /// assert_ne!(addr.port(), 0);
    /// # Ok(()) }
    /// ```
    pub async fn spawn(broker: &MessageBroker, addr: impl ToSocketAddrs) -> io::Result<SocketAddr> {
        let server = Self::bind_addr(broker, addr).await?;
        let local = server.local_addr()?;
        exec::spawn(broker.runtime(), TaskPriority::Critical, server.run())
            .map_err(io::Error::other)?;
        Ok(local)
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts connections until the broker shuts down, then waits for
    /// every connection to flush and close.
    pub async fn run(self) -> io::Result<()> {
        let inner = self.broker.inner.clone();
        let admission = Arc::new(Admission::default());
        let refusals = LogThrottle::default();
        let shutdown = inner.shutdown.clone();
        let draining = inner.draining.clone();
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                // New connections are refused from here on (the listener
                // closes); open ones are served until the shutdown.
                _ = draining.cancelled() => break,
                accepted = self.listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // The certificate in force now serves this connection to its end.
            let tls = inner.tls.acceptor();
            // Limits are read per accept, so a reload moves them at once
            // (lowering one closes no open connection).
            let (permit, handshake) = match admission.admit(&inner.live.limits, peer.ip()) {
                Ok(admitted) => admitted,
                Err((why, reason)) => {
                    inner.stats.rejected(why);
                    refusals.warn(|suppressed| {
                        tracing::warn!(%peer, suppressed, "connection refused: {reason}")
                    });
                    let retry_after = inner.live.running().network.retry_after_ms;
                    refuse_inline(stream, &reason, retry_after, tls.is_none());
                    continue;
                }
            };
            let admitted = Admitted { permit, handshake };
            match inner.runtime.get() {
                None => {
                    let inner = inner.clone();
                    inner.tasks.clone().spawn(async move {
                        connection::serve(stream, peer, inner, tls, admitted.handshake).await;
                        drop(admitted.permit);
                    });
                }
                Some(runtime) => {
                    // The connection goes to the least busy worker and
                    // registers its socket with that worker's reactor, so
                    // its reads are noticed where it runs.
                    let worker = runtime.next_worker();
                    let stream = match stream.into_std() {
                        Ok(stream) => stream,
                        Err(err) => {
                            tracing::warn!(%peer, error = %err, "cannot hand the connection to a worker");
                            continue;
                        }
                    };
                    let slot = Arc::new(parking_lot::Mutex::new(Some(stream)));
                    let task = {
                        let tracker = inner.tasks.clone();
                        let inner = inner.clone();
                        let slot = slot.clone();
                        tracker.track_future(async move {
                            let Some(stream) = slot.lock().take() else {
                                return;
                            };
                            match TcpStream::from_std(stream) {
                                Ok(stream) => {
                                    connection::serve(stream, peer, inner, tls, admitted.handshake)
                                        .await
                                }
                                Err(err) => {
                                    tracing::warn!(%peer, error = %err, "cannot register the connection")
                                }
                            }
                            drop(admitted.permit);
                        })
                    };
                    if let Err(err) = runtime.spawn_on(worker, TaskPriority::High, task) {
                        inner.stats.rejected(Rejection::RuntimeBusy);
                        tracing::warn!(%peer, error = %err, "connection refused");
                        if let Some(stream) = slot.lock().take() {
                            let retry_after = inner.live.running().network.retry_after_ms;
                            refuse_now(stream, RUNTIME_BUSY, retry_after);
                        }
                    }
                }
            }
        }
        drop(self.listener);
        inner.tasks.close();
        inner.tasks.wait().await;
        Ok(())
    }
}

/// What a new connection holds: its place among the open connections
/// (for its life) and among the handshakes (until it has said HELLO).
struct Admitted {
    permit: Slot,
    handshake: HandshakeSlot,
}

/// Counts of open connections, by client address, and of handshakes.
#[derive(Default)]
struct Admission {
    open: AtomicUsize,
    by_address: parking_lot::Mutex<foldhash::HashMap<IpAddr, usize>>,
    handshaking: Arc<AtomicUsize>,
}

impl Admission {
    /// Takes a place for a connection from `ip`, or says which limit
    /// refuses it. Only the accept loop admits, so each check and its add
    /// race with nothing but releases.
    fn admit(
        self: &Arc<Self>,
        limits: &LiveLimits,
        ip: IpAddr,
    ) -> Result<(Slot, HandshakeSlot), (Rejection, String)> {
        let total = LiveLimits::get(&limits.max_connections);
        if self.open.load(Ordering::Acquire) >= total {
            return Err((Rejection::ConnectionLimit, CONNECTION_LIMIT.into()));
        }
        let handshakes = LiveLimits::get(&limits.max_pending_handshakes);
        if self.handshaking.load(Ordering::Acquire) >= handshakes {
            return Err((
                Rejection::HandshakeLimit,
                format!(
                    "{handshakes} connections are still in their handshake \
                     (limits.max_pending_handshakes); try again shortly"
                ),
            ));
        }
        let per_address = LiveLimits::get(&limits.max_connections_per_address);
        {
            let mut by_address = self.by_address.lock();
            let held = by_address.entry(ip).or_insert(0);
            if per_address > 0 && *held >= per_address {
                return Err((
                    Rejection::AddressLimit,
                    format!(
                        "{ip} already holds {per_address} connections \
                         (limits.max_connections_per_address)"
                    ),
                ));
            }
            *held += 1;
        }
        self.open.fetch_add(1, Ordering::AcqRel);
        self.handshaking.fetch_add(1, Ordering::AcqRel);
        Ok((
            Slot {
                admission: self.clone(),
                ip,
            },
            HandshakeSlot(self.handshaking.clone()),
        ))
    }
}

/// A connection's place among the open ones, given back on drop.
struct Slot {
    admission: Arc<Admission>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.admission.open.fetch_sub(1, Ordering::AcqRel);
        let mut by_address = self.admission.by_address.lock();
        if let Some(held) = by_address.get_mut(&self.ip) {
            *held -= 1;
            if *held == 0 {
                by_address.remove(&self.ip);
            }
        }
    }
}

/// A place among the connections in their handshake, given back when the
/// handshake ends, however it ends.
pub(crate) struct HandshakeSlot(Arc<AtomicUsize>);

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// At most one log line a second for a kind of event that can come in
/// floods; the next line says how many were left out.
#[derive(Default)]
struct LogThrottle {
    last: std::sync::atomic::AtomicU64,
    suppressed: std::sync::atomic::AtomicU64,
}

impl LogThrottle {
    fn warn(&self, log: impl FnOnce(u64)) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if self.last.swap(now, Ordering::Relaxed) == now {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        log(self.suppressed.swap(0, Ordering::Relaxed));
    }
}

const CONNECTION_LIMIT: &str =
    "the broker is serving as many connections as network.max_connections allows";
const RUNTIME_BUSY: &str =
    "the broker is overloaded: its runtime queues are full (runtime.task_queue_depth)";

/// Refuses a connection without a task: one non-blocking write of the
/// error frame (in plain TCP; a TLS client could not read it), then close.
/// A fresh socket's buffer has room for the frame.
fn refuse_inline(stream: TcpStream, reason: &str, retry_after_ms: u32, plain: bool) {
    if plain {
        let _ = stream.try_write(&error_frame(reason, retry_after_ms));
    }
    drop(stream);
}

/// A refusal for load, with the wait the client is asked to keep.
fn error_frame(reason: &str, retry_after_ms: u32) -> Vec<u8> {
    Frame::Error(ErrorFrame {
        code: ErrorCode::ConnectionLimit,
        reason: reason.into(),
        retry_after_ms: (retry_after_ms > 0).then_some(retry_after_ms),
    })
    .to_bytes()
    .to_vec()
}

/// Refuses without a task: one non-blocking write of the error frame (a
/// fresh socket's buffer has room for it), then close.
fn refuse_now(mut stream: std::net::TcpStream, reason: &str, retry_after_ms: u32) {
    use std::io::Write;
    let _ = stream.write(&error_frame(reason, retry_after_ms));
    let _ = stream.shutdown(std::net::Shutdown::Both);
}
