//! The HTTP endpoint: `GET /metrics` (Prometheus text format) and
//! `GET /healthz` (a small JSON body; 200 when healthy or degraded, 503
//! when unhealthy), served with hyper.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use kaelix_core::runtime::HealthStatus;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::MessageBroker;

/// Scrapers served at once; more wait for the accept loop.
const MAX_CLIENTS: usize = 64;
/// Time a client has to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How often recorded latency samples are folded into their buckets.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// A running endpoint; stops when dropped.
pub struct MetricsServer {
    addr: SocketAddr,
    stop: CancellationToken,
    /// The listening socket, shut at drop: the task that owns the other
    /// handle ends a moment later, and until then the port would still
    /// accept connections (a reload that moved the endpoint would seem
    /// not to have).
    socket: std::net::TcpListener,
}

impl MetricsServer {
    /// Listens on `addr` and serves `broker`'s metrics and health from a
    /// task on the current tokio runtime. Binding happens before this
    /// returns, so an address in use is reported here.
    pub fn start(broker: &MessageBroker, addr: SocketAddr) -> io::Result<MetricsServer> {
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let socket = listener.try_clone()?;
        let listener = TcpListener::from_std(listener)?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, broker.clone(), stop.clone()));
        Ok(MetricsServer { addr, stop, socket })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        self.stop.cancel();
        // Shutting a listening socket stops it listening at once (new
        // connections are refused) whoever else holds it.
        // SAFETY: shutdown(2) on a descriptor this value owns.
        unsafe { libc::shutdown(self.socket.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

async fn serve(listener: TcpListener, broker: MessageBroker, stop: CancellationToken) {
    let clients = Arc::new(Semaphore::new(MAX_CLIENTS));
    let mut upkeep = tokio::time::interval(UPKEEP_EVERY);
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => return,
            _ = upkeep.tick() => {
                broker.inner.metrics.upkeep();
                continue;
            }
            permit = clients.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
        };
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    tracing::warn!(error = %err, "metrics endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let broker = broker.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let broker = broker.clone();
                async move { Ok::<_, Infallible>(respond(&broker, &req)) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.cancelled() => conn.as_mut().graceful_shutdown(),
            }
            drop(permit);
        });
    }
}

fn respond(broker: &MessageBroker, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let readable = matches!(*req.method(), Method::GET | Method::HEAD);
    match path {
        "/metrics" | "/healthz" if !readable => {
            let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n".into());
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            response
        }
        "/metrics" => {
            let mut response = text(StatusCode::OK, broker.render_metrics());
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        "/healthz" => {
            let health = broker.health();
            let stats = broker.stats();
            let mut body = serde_json::json!({
                "status": health.status.name(),
                "reason": health.reason,
                "uptime_seconds": stats.uptime.as_secs(),
                "connections": stats.connections_active,
                "subscriptions": stats.subscriptions,
            });
            if let Some(cluster) = broker.cluster_status() {
                body["cluster"] = serde_json::json!({
                    "node_id": cluster.node_id,
                    "role": cluster.role,
                    "leader": cluster.leader,
                    "has_quorum": cluster.has_quorum(),
                    "members": cluster.members.len(),
                    "members_up": cluster.members.iter().filter(|m| m.up).count(),
                });
            }
            let code = match health.status {
                HealthStatus::Unhealthy => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::OK,
            };
            let mut response = Response::new(Full::new(Bytes::from(body.to_string() + "\n")));
            *response.status_mut() = code;
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: this endpoint serves /metrics and /healthz\n".into(),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if !response.headers().contains_key(CONTENT_TYPE) {
        response.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
    }
    response
}
