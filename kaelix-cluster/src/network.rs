//! Raft between nodes, on the project's own wire protocol: each Raft
//! message is a PEER_CALL frame on a TCP link to the target node's
//! `cluster.listen` address, answered by a PEER_REPLY with the same id.
//! Bodies are the openraft request and result, serde-encoded (JSON: the
//! metadata is small and changes rarely).
//!
//! A link carries one call at a time and is made on first use; a failed
//! call drops it, and the next call connects again (Raft backs off on an
//! unreachable node by itself).

use std::time::Duration;

use bytes::BytesMut;
use kaelix_core::protocol::{decode, Frame, PeerCall, PeerReply};
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::Raft;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::metadata::{Member, NodeId};
use crate::store::TypeConfig;

/// What a PEER_CALL asks (its `kind`).
pub mod kind {
    pub const APPEND_ENTRIES: u8 = 1;
    pub const VOTE: u8 = 2;
    pub const INSTALL_SNAPSHOT: u8 = 3;
}

/// Largest frame on a cluster link: a snapshot of the metadata travels in
/// one.
pub const MAX_PEER_FRAME: usize = 64 * 1024 * 1024;

/// How long a connection attempt to a peer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

type Rpc<T, E = RaftError<NodeId>> = Result<T, RPCError<NodeId, Member, E>>;

/// Makes a link to each peer Raft talks to.
#[derive(Debug, Clone, Default)]
pub struct PeerNetwork;

impl RaftNetworkFactory<TypeConfig> for PeerNetwork {
    type Network = PeerLink;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> PeerLink {
        PeerLink {
            target,
            addr: node.cluster_addr.clone(),
            stream: None,
            buf: BytesMut::new(),
            next_id: 0,
        }
    }
}

/// A link to one peer.
pub struct PeerLink {
    target: NodeId,
    addr: String,
    stream: Option<TcpStream>,
    buf: BytesMut,
    next_id: u64,
}

/// Why a call failed before the peer answered it.
#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error("cannot reach node at {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("link to node at {addr}: {reason}")]
    Io { addr: String, reason: String },
    #[error("node at {addr} took longer than {ttl:?} to answer")]
    Timeout { addr: String, ttl: Duration },
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
        let answer = match tokio::time::timeout(ttl, self.exchange(kind, body.into())).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => {
                self.stream = None;
                return Err(match e {
                    LinkError::Connect { .. } => RPCError::Unreachable(Unreachable::new(&e)),
                    _ => RPCError::Network(NetworkError::new(&e)),
                });
            }
            Err(_) => {
                // The answer may still come: the link is out of step.
                self.stream = None;
                let e = LinkError::Timeout {
                    addr: self.addr.clone(),
                    ttl,
                };
                return Err(RPCError::Network(NetworkError::new(&e)));
            }
        };
        let result: Result<T, E> = serde_json::from_slice(&answer)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    async fn exchange(&mut self, kind: u8, body: bytes::Bytes) -> Result<bytes::Bytes, LinkError> {
        let io = |e: std::io::Error| LinkError::Io {
            addr: self.addr.clone(),
            reason: e.to_string(),
        };
        if self.stream.is_none() {
            let connect = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&self.addr));
            let stream = match connect.await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    return Err(LinkError::Connect {
                        addr: self.addr.clone(),
                        reason: e.to_string(),
                    })
                }
                Err(_) => {
                    return Err(LinkError::Connect {
                        addr: self.addr.clone(),
                        reason: format!("no answer within {CONNECT_TIMEOUT:?}"),
                    })
                }
            };
            stream.set_nodelay(true).map_err(io)?;
            self.stream = Some(stream);
            self.buf.clear();
        }
        self.next_id += 1;
        let id = self.next_id;
        let frame = Frame::PeerCall(PeerCall { id, kind, body }).to_bytes();
        let Some(stream) = self.stream.as_mut() else {
            unreachable!("connected above")
        };
        stream.write_all(&frame).await.map_err(io)?;
        loop {
            match decode(&mut self.buf, MAX_PEER_FRAME) {
                Ok(Some(Frame::PeerReply(reply))) if reply.id == id => return Ok(reply.body),
                // An answer to a call that timed out before: not this one.
                Ok(Some(Frame::PeerReply(_))) => continue,
                Ok(Some(other)) => {
                    return Err(LinkError::Io {
                        addr: self.addr.clone(),
                        reason: format!("unexpected {} frame", other.name()),
                    })
                }
                Ok(None) => {}
                Err(e) => {
                    return Err(LinkError::Io {
                        addr: self.addr.clone(),
                        reason: e.to_string(),
                    })
                }
            }
            if stream.read_buf(&mut self.buf).await.map_err(io)? == 0 {
                return Err(LinkError::Io {
                    addr: self.addr.clone(),
                    reason: "closed by the peer".into(),
                });
            }
        }
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

/// Answers the other nodes' Raft calls on `listener` with `raft`, until
/// the task is dropped.
pub async fn serve(listener: TcpListener, raft: Raft<TypeConfig>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "cluster listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let raft = raft.clone();
        tokio::spawn(async move {
            if let Err(reason) = answer(stream, raft).await {
                tracing::debug!(%peer, %reason, "cluster link closed");
            }
        });
    }
}

/// Answers calls on one link, one at a time, until it closes.
async fn answer(mut stream: TcpStream, raft: Raft<TypeConfig>) -> Result<(), String> {
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut buf = BytesMut::new();
    let mut out = BytesMut::new();
    loop {
        let call = loop {
            match decode(&mut buf, MAX_PEER_FRAME).map_err(|e| e.to_string())? {
                Some(Frame::PeerCall(call)) => break call,
                Some(other) => return Err(format!("unexpected {} frame", other.name())),
                None => {
                    if stream.read_buf(&mut buf).await.map_err(|e| e.to_string())? == 0 {
                        return Ok(());
                    }
                }
            }
        };
        let body = dispatch(&raft, &call).await?;
        out.clear();
        Frame::PeerReply(PeerReply {
            id: call.id,
            body: body.into(),
        })
        .encode(&mut out);
        stream.write_all(&out).await.map_err(|e| e.to_string())?;
    }
}

/// The local Raft's answer to `call`, encoded.
async fn dispatch(raft: &Raft<TypeConfig>, call: &PeerCall) -> Result<Vec<u8>, String> {
    fn parse<T: DeserializeOwned>(call: &PeerCall) -> Result<T, String> {
        serde_json::from_slice(&call.body).map_err(|e| format!("bad call body: {e}"))
    }
    let encoded = match call.kind {
        kind::APPEND_ENTRIES => serde_json::to_vec(&raft.append_entries(parse(call)?).await),
        kind::VOTE => serde_json::to_vec(&raft.vote(parse(call)?).await),
        kind::INSTALL_SNAPSHOT => serde_json::to_vec(&raft.install_snapshot(parse(call)?).await),
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
