//! Raft between nodes, on the project's own wire protocol: each Raft
//! message is a PEER_CALL frame on a TCP link to the target node's
//! `cluster.listen` address, answered by a PEER_REPLY with the same id.
//! Bodies are the openraft request and result, serde-encoded (JSON: the
//! metadata is small and changes rarely).
//!
//! A link carries one call at a time and is made on first use; a failed
//! call drops it, and the next call connects again (Raft backs off on an
//! unreachable node by itself).

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use kaelix_core::config::ClusterTlsConfig;
use kaelix_core::protocol::{decode, Frame, PeerCall, PeerReply};
use kaelix_core::tls::{provider, read_certs, read_key, read_roots};
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::Raft;
use rustls::pki_types::ServerName;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ServerConfig};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::metadata::{Member, NodeId};
use crate::store::TypeConfig;

/// What a PEER_CALL asks (its `kind`).
pub mod kind {
    pub const APPEND_ENTRIES: u8 = 1;
    pub const VOTE: u8 = 2;
    pub const INSTALL_SNAPSHOT: u8 = 3;
    /// A node asks to be added to the cluster (sent to a seed, then to
    /// the Raft leader the seed names).
    pub const JOIN: u8 = 4;
    /// Failure detection: who are you, and who leads?
    pub const PING: u8 = 5;
    /// Turns the link into a route link: the caller subscribes on it for
    /// its clients' interest and this node sends it ROUTE frames.
    pub const ROUTE: u8 = 6;
    /// An operator's change, sent to the Raft leader by the node asked.
    pub const CHANGE: u8 = 7;
}

/// Largest frame on a cluster link: a snapshot of the metadata travels in
/// one.
pub const MAX_PEER_FRAME: usize = 64 * 1024 * 1024;

/// How long a connection attempt to a peer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

type Rpc<T, E = RaftError<NodeId>> = Result<T, RPCError<NodeId, Member, E>>;

/// Mutually authenticated TLS for the links between nodes (`[cluster.tls]`):
/// each node presents its certificate and accepts only peers whose
/// certificate the cluster's CA signed, in both directions.
pub struct LinkTls {
    connector: TlsConnector,
    acceptor: TlsAcceptor,
}

impl LinkTls {
    /// Loads the certificate, key and CA that `tls` names.
    pub fn from_config(tls: &ClusterTlsConfig) -> Result<LinkTls, String> {
        let certs = read_certs(&tls.cert_path).map_err(|e| e.to_string())?;
        let key = read_key(&tls.key_path).map_err(|e| e.to_string())?;
        let roots = Arc::new(read_roots(&tls.ca_path).map_err(|e| e.to_string())?);
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| format!("{}: {e}", tls.ca_path.display()))?;
        let pair = || {
            format!(
                "{} with {}",
                tls.cert_path.display(),
                tls.key_path.display()
            )
        };
        let server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs.clone(), key.clone_key())
            .map_err(|e| format!("{}: {e}", pair()))?;
        let client = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .map_err(|e| format!("{}: {e}", pair()))?;
        Ok(LinkTls {
            connector: TlsConnector::from(Arc::new(client)),
            acceptor: TlsAcceptor::from(Arc::new(server)),
        })
    }
}

/// A byte stream a link runs on: TCP, or TLS over TCP.
pub trait LinkIo: AsyncRead + AsyncWrite + Unpin + Send + Sync {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + Sync> LinkIo for T {}

/// A link to another node, once connected (and through TLS when the
/// cluster uses it).
pub type Link = Box<dyn LinkIo>;

/// Takes the route links other nodes open to this one (see
/// [`kind::ROUTE`]): the broker serves its subscribers' interest on them.
pub trait RouteAcceptor: Send + Sync + 'static {
    /// A route link from node `from`; `buffered` holds what was read past
    /// the call that opened it.
    fn accept(&self, from: NodeId, link: Link, buffered: BytesMut);
}

/// Opens a route link to the node at `addr`: a ROUTE call saying which
/// node this is, answered, and the link handed over.
pub async fn open_route(
    channel: Channel,
    from: NodeId,
    ttl: Duration,
) -> Result<(Link, BytesMut), LinkError> {
    let mut channel = channel;
    let addr = channel.addr().to_string();
    let addr = addr.as_str();
    let body = serde_json::to_vec(&RouteOpen { node_id: from }).unwrap_or_default();
    let answer = channel.call(kind::ROUTE, body.into(), ttl).await?;
    let refused = |reason: String| LinkError::Io {
        addr: addr.to_string(),
        reason,
    };
    match serde_json::from_slice::<Result<(), String>>(&answer) {
        Ok(Ok(())) => {}
        Ok(Err(reason)) => return Err(refused(reason)),
        Err(e) => return Err(refused(format!("bad answer: {e}"))),
    }
    match channel.stream.take() {
        Some(stream) => Ok((stream, std::mem::take(&mut channel.buf))),
        None => Err(refused("the link closed".into())),
    }
}

/// The body of a ROUTE call.
#[derive(Debug, Serialize, serde::Deserialize)]
struct RouteOpen {
    node_id: NodeId,
}

/// The calling end of a link to one node: made on first use, dropped after
/// a failure and made again by the next call.
pub struct Channel {
    addr: String,
    tls: Option<Arc<LinkTls>>,
    /// The local address connections come from, when the node listens on
    /// one address (not a wildcard): peers see its cluster address.
    bind: Option<std::net::IpAddr>,
    stream: Option<Link>,
    buf: BytesMut,
    next_id: u64,
}

/// Why a call failed before the peer answered it.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot reach node at {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("link to node at {addr}: {reason}")]
    Io { addr: String, reason: String },
    #[error("node at {addr} took longer than {ttl:?} to answer")]
    Timeout { addr: String, ttl: Duration },
}

impl Channel {
    /// A channel to the node listening at `addr` (`host:port`).
    pub fn new(addr: impl Into<String>, tls: Option<Arc<LinkTls>>) -> Channel {
        Channel {
            addr: addr.into(),
            tls,
            bind: None,
            stream: None,
            buf: BytesMut::new(),
            next_id: 0,
        }
    }

    /// Connects from `ip` (any port), when given.
    pub fn bound_to(mut self, ip: Option<std::net::IpAddr>) -> Channel {
        self.bind = ip;
        self
    }

    /// The address it calls.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Sends a call of `kind` and waits up to `ttl` for its answer's body.
    pub async fn call(&mut self, kind: u8, body: Bytes, ttl: Duration) -> Result<Bytes, LinkError> {
        match tokio::time::timeout(ttl, self.exchange(kind, body)).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(e)) => {
                self.stream = None;
                Err(e)
            }
            Err(_) => {
                // The answer may still come: the link is out of step.
                self.stream = None;
                Err(LinkError::Timeout {
                    addr: self.addr.clone(),
                    ttl,
                })
            }
        }
    }

    /// Connects (TCP, then the TLS handshake when configured).
    async fn connect(&self) -> Result<Link, LinkError> {
        let failed = |reason: String| LinkError::Connect {
            addr: self.addr.clone(),
            reason,
        };
        let connect = async {
            let stream = match self.bind {
                None => TcpStream::connect(&self.addr).await,
                Some(ip) => connect_from(ip, &self.addr).await,
            }
            .map_err(|e| failed(e.to_string()))?;
            stream
                .set_nodelay(true)
                .map_err(|e| failed(e.to_string()))?;
            let Some(tls) = &self.tls else {
                return Ok(Box::new(stream) as Link);
            };
            let name = ServerName::try_from(host_of(&self.addr).to_string())
                .map_err(|e| failed(format!("not a host name for TLS: {e}")))?;
            let stream = tls
                .connector
                .connect(name, stream)
                .await
                .map_err(|e| failed(format!("TLS handshake: {e}")))?;
            Ok(Box::new(stream) as Link)
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(result) => result,
            Err(_) => Err(failed(format!("no answer within {CONNECT_TIMEOUT:?}"))),
        }
    }

    async fn exchange(&mut self, kind: u8, body: Bytes) -> Result<Bytes, LinkError> {
        if self.stream.is_none() {
            self.stream = Some(self.connect().await?);
            self.buf.clear();
        }
        let addr = &self.addr;
        let io = |reason: String| LinkError::Io {
            addr: addr.clone(),
            reason,
        };
        self.next_id += 1;
        let id = self.next_id;
        let frame = Frame::PeerCall(PeerCall { id, kind, body }).to_bytes();
        let Some(stream) = self.stream.as_mut() else {
            unreachable!("connected above")
        };
        stream
            .write_all(&frame)
            .await
            .map_err(|e| io(e.to_string()))?;
        stream.flush().await.map_err(|e| io(e.to_string()))?;
        loop {
            match decode(&mut self.buf, MAX_PEER_FRAME) {
                Ok(Some(Frame::PeerReply(reply))) if reply.id == id => return Ok(reply.body),
                // An answer to a call that timed out before: not this one.
                Ok(Some(Frame::PeerReply(_))) => continue,
                Ok(Some(other)) => return Err(io(format!("unexpected {} frame", other.name()))),
                Ok(None) => {}
                Err(e) => return Err(io(e.to_string())),
            }
            if stream
                .read_buf(&mut self.buf)
                .await
                .map_err(|e| io(e.to_string()))?
                == 0
            {
                return Err(io("closed by the peer".into()));
            }
        }
    }
}

/// Connects to `addr` from `ip`.
async fn connect_from(ip: std::net::IpAddr, addr: &str) -> std::io::Result<TcpStream> {
    let mut last = None;
    for target in tokio::net::lookup_host(addr).await? {
        let socket = match target {
            std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        if ip.is_ipv4() != target.is_ipv4() {
            continue;
        }
        socket.bind(std::net::SocketAddr::new(ip, 0))?;
        match socket.connect(target).await {
            Ok(stream) => return Ok(stream),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::AddrNotAvailable,
            format!("{addr} has no address reachable from {ip}"),
        )
    }))
}

/// The host part of `host:port`, without IPv6 brackets.
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Makes a link to each peer Raft talks to.
#[derive(Clone, Default)]
pub struct PeerNetwork {
    tls: Option<Arc<LinkTls>>,
    bind: Option<std::net::IpAddr>,
}

impl PeerNetwork {
    /// Links over TLS when `tls` is given, plain TCP otherwise; from `bind`
    /// when given.
    pub fn new(tls: Option<Arc<LinkTls>>, bind: Option<std::net::IpAddr>) -> PeerNetwork {
        PeerNetwork { tls, bind }
    }
}

impl RaftNetworkFactory<TypeConfig> for PeerNetwork {
    type Network = PeerLink;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> PeerLink {
        PeerLink {
            target,
            channel: Channel::new(node.cluster_addr.clone(), self.tls.clone()).bound_to(self.bind),
        }
    }
}

/// Raft's link to one peer.
pub struct PeerLink {
    target: NodeId,
    channel: Channel,
}

impl PeerLink {
    /// Sends `request` as a call of `kind` and waits for the answer, a
    /// `Result<T, E>` as the peer's Raft gave it.
    async fn call<Q, T, E>(&mut self, kind: u8, request: &Q, ttl: Duration) -> Rpc<T, E>
    where
        Q: Serialize,
        T: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let body =
            serde_json::to_vec(request).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let answer = self
            .channel
            .call(kind, body.into(), ttl)
            .await
            .map_err(|e| match e {
                LinkError::Connect { .. } => RPCError::Unreachable(Unreachable::new(&e)),
                _ => RPCError::Network(NetworkError::new(&e)),
            })?;
        let result: Result<T, E> = serde_json::from_slice(&answer)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerLink {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Rpc<AppendEntriesResponse<NodeId>> {
        self.call(kind::APPEND_ENTRIES, &rpc, option.hard_ttl())
            .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Rpc<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>> {
        self.call(kind::INSTALL_SNAPSHOT, &rpc, option.hard_ttl())
            .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Rpc<VoteResponse<NodeId>> {
        self.call(kind::VOTE, &rpc, option.hard_ttl()).await
    }
}

/// How long a node that connected has to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Answers the other nodes' calls on `listener` (Raft's, and joins and
/// pings) with `raft`, until the task is dropped. With `tls`, a node that
/// does not present a certificate the cluster's CA signed is refused in
/// the handshake.
pub async fn serve(
    listener: TcpListener,
    raft: Raft<TypeConfig>,
    tls: Option<Arc<LinkTls>>,
    routes: Option<Arc<dyn RouteAcceptor>>,
) {
    // The links end with the listener: a stopped node stops answering.
    let mut links = tokio::task::JoinSet::new();
    loop {
        while links.try_join_next().is_some() {}
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "cluster listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let raft = raft.clone();
        let tls = tls.clone();
        let routes = routes.clone();
        links.spawn(async move {
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(%peer, error = %e, "cluster link closed");
                return;
            }
            let result = match tls {
                None => answer(Box::new(stream), raft, routes).await,
                Some(tls) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.acceptor.accept(stream)).await
                    {
                        Ok(Ok(stream)) => answer(Box::new(stream), raft, routes).await,
                        Ok(Err(e)) => Err(format!("TLS handshake refused: {e}")),
                        Err(_) => Err(format!("no TLS handshake within {HANDSHAKE_TIMEOUT:?}")),
                    }
                }
            };
            if let Err(reason) = result {
                tracing::warn!(%peer, %reason, "cluster link closed");
            }
        });
    }
}

/// Answers calls on one link, one at a time, until it closes or becomes a
/// route link.
async fn answer(
    mut stream: Link,
    raft: Raft<TypeConfig>,
    routes: Option<Arc<dyn RouteAcceptor>>,
) -> Result<(), String> {
    let mut buf = BytesMut::new();
    let mut out = BytesMut::new();
    loop {
        let call = loop {
            match decode(&mut buf, MAX_PEER_FRAME).map_err(|e| e.to_string())? {
                Some(Frame::PeerCall(call)) => break call,
                Some(other) => return Err(format!("unexpected {} frame", other.name())),
                None => match stream.read_buf(&mut buf).await {
                    Ok(0) => return Ok(()),
                    Ok(_) => {}
                    // A peer that went away mid-call: nothing to report.
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                    Err(e) => return Err(e.to_string()),
                },
            }
        };
        let route_from = if call.kind == kind::ROUTE {
            let open: RouteOpen =
                serde_json::from_slice(&call.body).map_err(|e| format!("bad call body: {e}"))?;
            Some(open.node_id)
        } else {
            None
        };
        let body = match route_from {
            Some(_) if routes.is_none() => {
                serde_json::to_vec(&Err::<(), _>("this node takes no route links"))
            }
            Some(_) => serde_json::to_vec(&Ok::<(), String>(())),
            None => Ok(dispatch(&raft, &call).await?),
        }
        .map_err(|e| e.to_string())?;
        out.clear();
        Frame::PeerReply(PeerReply {
            id: call.id,
            body: body.into(),
        })
        .encode(&mut out);
        stream.write_all(&out).await.map_err(|e| e.to_string())?;
        stream.flush().await.map_err(|e| e.to_string())?;
        if let (Some(from), Some(routes)) = (route_from, &routes) {
            routes.accept(from, stream, buf);
            return Ok(());
        }
    }
}

/// The local node's answer to `call`, encoded.
async fn dispatch(raft: &Raft<TypeConfig>, call: &PeerCall) -> Result<Vec<u8>, String> {
    fn parse<T: DeserializeOwned>(call: &PeerCall) -> Result<T, String> {
        serde_json::from_slice(&call.body).map_err(|e| format!("bad call body: {e}"))
    }
    let encoded = match call.kind {
        kind::APPEND_ENTRIES => serde_json::to_vec(&raft.append_entries(parse(call)?).await),
        kind::VOTE => serde_json::to_vec(&raft.vote(parse(call)?).await),
        kind::INSTALL_SNAPSHOT => serde_json::to_vec(&raft.install_snapshot(parse(call)?).await),
        kind::JOIN => serde_json::to_vec(&crate::node::answer_join(raft, parse(call)?).await),
        kind::PING => serde_json::to_vec(&crate::node::answer_ping(raft)),
        kind::CHANGE => serde_json::to_vec(&crate::node::apply_change(raft, parse(call)?).await),
        other => return Err(format!("unknown call kind {other}")),
    };
    encoded.map_err(|e| e.to_string())
}

/// Raft's timing from `[cluster]`: the leader's heartbeat every
/// `heartbeat_ms`; a follower that hears nothing for `failure_timeout_ms`
/// (up to twice that, chosen at random so that nodes rarely stand at once)
/// counts the leader failed and stands for election.
pub fn raft_config(
    cluster: &kaelix_core::config::ClusterConfig,
) -> Result<openraft::Config, String> {
    openraft::Config {
        cluster_name: "kaelix".into(),
        heartbeat_interval: cluster.heartbeat_ms,
        election_timeout_min: cluster.failure_timeout_ms,
        election_timeout_max: cluster.failure_timeout_ms.saturating_mul(2),
        ..openraft::Config::default()
    }
    .validate()
    .map_err(|e| format!("cluster.heartbeat_ms, cluster.failure_timeout_ms: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raft_timing_follows_the_cluster_keys() {
        let mut cluster = kaelix_core::config::ClusterConfig {
            heartbeat_ms: 100,
            failure_timeout_ms: 900,
            ..Default::default()
        };
        let config = raft_config(&cluster).unwrap();
        assert_eq!(config.heartbeat_interval, 100);
        assert_eq!(
            (config.election_timeout_min, config.election_timeout_max),
            (900, 1800)
        );
        // Raft itself refuses an election timeout within a heartbeat.
        cluster.failure_timeout_ms = 50;
        let err = raft_config(&cluster).unwrap_err();
        assert!(err.contains("cluster.failure_timeout_ms"), "{err}");
    }
}
