//! The TCP listener: accepts connections up to `network.max_connections`
//! and hands each to [`connection::serve`](crate::connection) until the
//! broker shuts down.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kaelix_core::protocol::{ErrorCode, ErrorFrame, Frame};
use kaelix_core::runtime::TaskPriority;
use tokio::io::AsyncWriteExt;
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
        let open = Arc::new(AtomicUsize::new(0));
        let shutdown = inner.shutdown.clone();
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
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
            // The limit is read per accept, so a reload moves it at once
            // (lowering it closes no open connection).
            let limit = LiveLimits::get(&inner.live.limits.max_connections);
            let Some(permit) = Slot::take(&open, limit) else {
                inner.stats.rejected(Rejection::ConnectionLimit);
                tracing::warn!(%peer, "connection refused: network.max_connections reached");
                spawn_refusal(&inner, stream, CONNECTION_LIMIT);
                continue;
            };
            // The certificate in force now serves this connection to its end.
            let tls = inner.tls.acceptor();
            match inner.runtime.get() {
                None => {
                    let inner = inner.clone();
                    inner.tasks.clone().spawn(async move {
                        connection::serve(stream, peer, inner, tls).await;
                        drop(permit);
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
                                Ok(stream) => connection::serve(stream, peer, inner, tls).await,
                                Err(err) => {
                                    tracing::warn!(%peer, error = %err, "cannot register the connection")
                                }
                            }
                            drop(permit);
                        })
                    };
                    if let Err(err) = runtime.spawn_on(worker, TaskPriority::High, task) {
                        inner.stats.rejected(Rejection::RuntimeBusy);
                        tracing::warn!(%peer, error = %err, "connection refused");
                        if let Some(stream) = slot.lock().take() {
                            refuse_now(stream, RUNTIME_BUSY);
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

/// One of `network.max_connections`, given back on drop.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    /// Only the accept loop takes slots, so the check and the add race
    /// with nothing but releases.
    fn take(open: &Arc<AtomicUsize>, limit: usize) -> Option<Slot> {
        if open.load(Ordering::Acquire) >= limit {
            return None;
        }
        open.fetch_add(1, Ordering::AcqRel);
        Some(Slot(open.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

const CONNECTION_LIMIT: &str =
    "the broker is serving as many connections as network.max_connections allows";
const RUNTIME_BUSY: &str =
    "the broker is overloaded: its runtime queues are full (runtime.task_queue_depth)";

/// Refuses a connection from a task of its own: an error frame, then close.
fn spawn_refusal(inner: &Arc<crate::broker::Inner>, stream: TcpStream, reason: &'static str) {
    let refusal = inner.tasks.track_future(refuse(stream, reason));
    if let Err(err) = exec::spawn(inner.runtime.get(), TaskPriority::Normal, refusal) {
        // The future, and the socket with it, is dropped: closed unanswered.
        tracing::debug!(error = %err, "refusal not sent");
    }
}

fn error_frame(reason: &str) -> Vec<u8> {
    Frame::Error(ErrorFrame {
        code: ErrorCode::ConnectionLimit,
        reason: reason.into(),
    })
    .to_bytes()
    .to_vec()
}

async fn refuse(mut stream: TcpStream, reason: &'static str) {
    let frame = error_frame(reason);
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(&frame).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// Refuses without a task: one non-blocking write of the error frame (a
/// fresh socket's buffer has room for it), then close.
fn refuse_now(mut stream: std::net::TcpStream, reason: &str) {
    use std::io::Write;
    let _ = stream.write(&error_frame(reason));
    let _ = stream.shutdown(std::net::Shutdown::Both);
}
