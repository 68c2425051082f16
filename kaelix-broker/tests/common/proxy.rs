//! A TCP proxy that injects faults between clients and a broker: it cuts
//! connections, delays data, black-holes it (the connection stays open and
//! silent, as with a dead host or a half-open connection) or refuses new
//! connections.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A running proxy; dropping it stops it and closes its connections.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

struct Shared {
    upstream: Mutex<SocketAddr>,
    /// Bumped to cut every open connection.
    cuts: watch::Sender<u64>,
    blackhole: AtomicBool,
    refuse: AtomicBool,
    /// New connections from this address are closed at once.
    refuse_from: Mutex<Option<std::net::IpAddr>>,
    delay_us: AtomicU64,
    accepted: AtomicU64,
    /// When each connection was accepted.
    accept_times: Mutex<Vec<std::time::Instant>>,
}

impl FaultProxy {
    /// Listens on an ephemeral port of 127.0.0.1 and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            upstream: Mutex::new(upstream),
            cuts: watch::channel(0).0,
            blackhole: AtomicBool::new(false),
            refuse: AtomicBool::new(false),
            refuse_from: Mutex::new(None),
            delay_us: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            accept_times: Mutex::new(Vec::new()),
        });
        let task = tokio::spawn(accept_loop(listener, shared.clone()));
        FaultProxy { addr, shared, task }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Forwards new connections to `upstream` from now on.
    pub fn set_upstream(&self, upstream: SocketAddr) {
        *self.shared.upstream.lock() = upstream;
    }

    /// Closes every open connection (both sides see it end).
    pub fn cut(&self) {
        self.shared.cuts.send_modify(|n| *n += 1);
    }

    /// Data in both directions is dropped while on; connections stay open.
    pub fn blackhole(&self, on: bool) {
        self.shared.blackhole.store(on, Ordering::SeqCst);
    }

    /// New connections are closed at once while on.
    pub fn refuse(&self, on: bool) {
        self.shared.refuse.store(on, Ordering::SeqCst);
    }

    /// Refuses new connections from `ip` (none: from anywhere again) and,
    /// when set, cuts the open ones (the others connect again).
    pub fn refuse_from(&self, ip: Option<std::net::IpAddr>) {
        *self.shared.refuse_from.lock() = ip;
        if ip.is_some() {
            self.cut();
        }
    }

    /// Each chunk of data waits this long before it is passed on.
    pub fn delay(&self, delay: Duration) {
        self.shared
            .delay_us
            .store(delay.as_micros() as u64, Ordering::SeqCst);
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// When each connection so far was accepted, in order.
    pub fn accept_times(&self) -> Vec<std::time::Instant> {
        self.shared.accept_times.lock().clone()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((client, from)) = listener.accept().await else {
            return;
        };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        shared.accept_times.lock().push(std::time::Instant::now());
        if shared.refuse.load(Ordering::SeqCst) || *shared.refuse_from.lock() == Some(from.ip()) {
            drop(client);
            continue;
        }
        let upstream = *shared.upstream.lock();
        let shared = shared.clone();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let mut cuts = shared.cuts.subscribe();
            cuts.borrow_and_update();
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::select! {
                _ = pump(cr, sw, &shared) => {}
                _ = pump(sr, cw, &shared) => {}
                _ = cuts.changed() => {}
            }
            // Dropping both halves of both sockets closes them.
        });
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    shared: &Shared,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if shared.blackhole.load(Ordering::SeqCst) {
            continue;
        }
        let delay = shared.delay_us.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_micros(delay)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
