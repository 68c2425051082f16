//! The TCP listener: accepts connections up to `network.max_connections`
//! and hands each to [`connection::serve`](crate::connection) until the
//! broker shuts down.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use kaelix_core::protocol::{ErrorCode, ErrorFrame, Frame};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream, ToSocketAddrs};
use tokio::sync::Semaphore;

use crate::broker::MessageBroker;
use crate::connection;

/// A bound listener serving a [`MessageBroker`] over TCP.
pub struct Server {
    listener: TcpListener,
    broker: MessageBroker,
}

impl Server {
    /// Binds to `network.host`:`network.port` of the broker's configuration.
    pub async fn bind(broker: &MessageBroker) -> io::Result<Server> {
        let network = &broker.config().network;
        Self::bind_addr(broker, (network.host.as_str(), network.port)).await
    }

    /// Binds to `addr`; port 0 picks a free port (see [`local_addr`](Self::local_addr)).
    pub async fn bind_addr(broker: &MessageBroker, addr: impl ToSocketAddrs) -> io::Result<Server> {
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
        tokio::spawn(server.run());
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
        let limit = Arc::new(Semaphore::new(inner.config.network.max_connections));
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
            match limit.clone().try_acquire_owned() {
                Ok(permit) => {
                    let inner = inner.clone();
                    inner.tasks.clone().spawn(async move {
                        connection::serve(stream, peer, inner).await;
                        drop(permit);
                    });
                }
                Err(_) => {
                    inner
                        .stats
                        .connections_rejected
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%peer, "connection refused: network.max_connections reached");
                    inner.tasks.spawn(refuse(stream));
                }
            }
        }
        drop(self.listener);
        inner.tasks.close();
        inner.tasks.wait().await;
        Ok(())
    }
}

async fn refuse(mut stream: TcpStream) {
    let frame = Frame::Error(ErrorFrame {
        code: ErrorCode::ConnectionLimit,
        reason: "the broker is serving as many connections as network.max_connections allows"
            .into(),
    })
    .to_bytes();
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(&frame).await;
        let _ = stream.shutdown().await;
    })
    .await;
}
