//! A running cluster node: Raft over the links, joining through the seeds,
//! and failure detection.
//!
//! **Forming and joining.** A node with Raft state under `data_dir` is a
//! member already: it starts Raft and catches up from the others. A new
//! node asks its seeds to add it. A seed that is in the cluster names the
//! Raft leader, and the leader adds the node (as a learner until it has
//! caught up, then as a voter). When every seed answers and none is in a
//! cluster yet, the node with the lowest id founds one on its own and the
//! others join it; a node without seeds founds one at once.
//!
//! **Failure detection.** Each node pings every member every
//! `heartbeat_ms`; a member that has not answered for `failure_timeout_ms`
//! counts as down. Raft itself elects a new leader when followers have
//! not heard theirs for that long.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kaelix_core::config::ClusterConfig;
use openraft::error::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, Raft, ServerState};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

use crate::metadata::{Command, Member, Metadata, NodeId};
use crate::network::{
    kind, open_route, raft_config, serve, Channel, Link, LinkError, LinkTls, PeerNetwork,
    RouteAcceptor,
};
use crate::store::{self, StateMachine, StoreError, TypeConfig};

/// How long a join may take: the leader answers once the new node has
/// caught up with the log.
const JOIN_TTL: Duration = Duration::from_secs(30);

/// Pause between rounds of asking the seeds.
const JOIN_RETRY: Duration = Duration::from_millis(500);

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("[cluster] {0}")]
    Config(String),
    #[error("cluster.tls: {0}")]
    Tls(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cluster.listen {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("cluster: Raft did not start: {0}")]
    Raft(String),
}

/// A node's request to join, and the answers it can get.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinRequest {
    pub node_id: NodeId,
    pub member: Member,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum JoinReply {
    /// The node is a voting member.
    Joined,
    /// Ask the Raft leader, at this address.
    AskLeader {
        node_id: NodeId,
        cluster_addr: String,
    },
    /// The answering node is not in a cluster yet.
    NotFormed { node_id: NodeId },
    /// Not now, and why (no leader yet, another change under way, an id
    /// taken at another address).
    Refused(String),
}

/// The answer to a ping: who answered and what it knows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pong {
    pub node_id: NodeId,
    pub leader: Option<NodeId>,
    pub term: u64,
}

/// What this node has heard from each member.
#[derive(Default)]
struct Health {
    peers: Mutex<BTreeMap<NodeId, Contact>>,
}

#[derive(Default, Clone)]
struct Contact {
    last_ok: Option<Instant>,
    problem: Option<String>,
}

/// A running node. Dropping it stops its tasks; [`shutdown`](Node::shutdown)
/// also stops Raft in order.
pub struct Node {
    id: NodeId,
    raft: Raft<TypeConfig>,
    sm: StateMachine,
    health: Arc<Health>,
    listen_addr: SocketAddr,
    failure_timeout: Duration,
    tls: Option<Arc<LinkTls>>,
    /// Where this node's connections to the others come from.
    bind: Option<std::net::IpAddr>,
    tasks: Vec<JoinHandle<()>>,
}

impl Node {
    /// Starts the node `cluster` describes, on the current tokio runtime;
    /// `client_addr` is where this node's clients connect (told to the
    /// other members). Returns once the node listens; joining goes on in
    /// the background (see [`status`](Node::status)).
    ///
    /// With `routes`, route links other nodes open are handed to it.
    pub async fn start(
        cluster: &ClusterConfig,
        client_addr: String,
        routes: Option<Arc<dyn RouteAcceptor>>,
    ) -> Result<Node, NodeError> {
        let id = cluster.node_id;
        if id == 0 {
            return Err(NodeError::Config("node_id must be at least 1".into()));
        }
        let config = raft_config(cluster).map_err(NodeError::Config)?;
        let tls = if cluster.tls.enabled {
            Some(Arc::new(
                LinkTls::from_config(&cluster.tls).map_err(NodeError::Tls)?,
            ))
        } else {
            None
        };
        let (log, sm) = store::open(&cluster.data_dir)?;
        let listener =
            TcpListener::bind(&cluster.listen)
                .await
                .map_err(|source| NodeError::Listen {
                    addr: cluster.listen.clone(),
                    source,
                })?;
        let listen_addr = listener.local_addr().map_err(|source| NodeError::Listen {
            addr: cluster.listen.clone(),
            source,
        })?;
        let advertise = if cluster.advertise.is_empty() {
            listen_addr.to_string()
        } else {
            cluster.advertise.clone()
        };
        // Connections to the others come from the listening address, when
        // it is one: firewalls and peers see one address per node.
        let bind = (!listen_addr.ip().is_unspecified()).then(|| listen_addr.ip());
        let raft = Raft::new(
            id,
            Arc::new(config),
            PeerNetwork::new(tls.clone(), bind),
            log,
            sm.clone(),
        )
        .await
        .map_err(|e| NodeError::Raft(e.to_string()))?;
        let health = Arc::new(Health::default());
        let heartbeat = Duration::from_millis(cluster.heartbeat_ms);
        let failure_timeout = Duration::from_millis(cluster.failure_timeout_ms);
        let mut tasks = vec![tokio::spawn(serve(
            listener,
            raft.clone(),
            tls.clone(),
            routes,
        ))];
        let member = Member {
            cluster_addr: advertise.clone(),
            client_addr,
        };
        let member_already = raft
            .is_initialized()
            .await
            .map_err(|e| NodeError::Raft(e.to_string()))?;
        if member_already {
            tracing::info!(
                node = id,
                data_dir = %cluster.data_dir.display(),
                "cluster: member already; catching up with the others"
            );
        } else {
            let seeds: Vec<String> = cluster
                .seeds
                .iter()
                .filter(|seed| **seed != advertise)
                .cloned()
                .collect();
            tasks.push(tokio::spawn(join(
                raft.clone(),
                id,
                member,
                seeds,
                tls.clone(),
                bind,
            )));
        }
        tasks.push(tokio::spawn(watch_peers(
            raft.clone(),
            id,
            tls.clone(),
            bind,
            health.clone(),
            heartbeat,
            failure_timeout,
        )));
        tasks.push(tokio::spawn(lead_partitions(
            raft.clone(),
            sm.clone(),
            heartbeat,
        )));
        tracing::info!(node = id, listen = %listen_addr, %advertise, "cluster: node started");
        Ok(Node {
            id,
            raft,
            sm,
            health,
            listen_addr,
            failure_timeout,
            tls,
            bind,
            tasks,
        })
    }

    /// The other members and their addresses.
    pub fn peers(&self) -> Vec<(NodeId, Member)> {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        metrics
            .membership_config
            .membership()
            .nodes()
            .filter(|(id, _)| **id != self.id)
            .map(|(id, member)| (*id, member.clone()))
            .collect()
    }

    /// Opens a route link to the node at `cluster_addr` (see
    /// [`RouteAcceptor`]); what was read past the opening call comes with it.
    pub async fn open_route(
        &self,
        cluster_addr: &str,
    ) -> Result<(Link, bytes::BytesMut), LinkError> {
        let channel = Channel::new(cluster_addr, self.tls.clone()).bound_to(self.bind);
        open_route(channel, self.id, JOIN_RETRY * 4).await
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The address the cluster listener is bound to.
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen_addr
    }

    /// The node's Raft, for proposing metadata changes.
    pub fn raft(&self) -> &Raft<TypeConfig> {
        &self.raft
    }

    /// The metadata as this node has applied it.
    pub fn metadata(&self) -> Metadata {
        self.sm.metadata()
    }

    /// Members, their health as this node sees it, the Raft leader and
    /// the partition leaders.
    pub fn status(&self) -> ClusterStatus {
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership().clone();
        let voters: std::collections::BTreeSet<NodeId> = membership.voter_ids().collect();
        let peers = self.health.peers.lock().clone();
        let now = Instant::now();
        let members = membership
            .nodes()
            .map(|(id, member)| {
                let contact = peers.get(id).cloned().unwrap_or_default();
                let since = contact.last_ok.map(|at| now.duration_since(at));
                let up = *id == self.id || since.is_some_and(|s| s < self.failure_timeout);
                MemberStatus {
                    id: *id,
                    cluster_addr: member.cluster_addr.clone(),
                    client_addr: member.client_addr.clone(),
                    voter: voters.contains(id),
                    up,
                    last_seen_ms: if *id == self.id {
                        Some(0)
                    } else {
                        since.map(|s| s.as_millis() as u64)
                    },
                    problem: if up { None } else { contact.problem },
                }
            })
            .collect::<Vec<_>>();
        let role = if members.is_empty() {
            "joining"
        } else {
            match metrics.state {
                ServerState::Leader => "leader",
                ServerState::Follower => "follower",
                ServerState::Candidate => "candidate",
                ServerState::Learner => "learner",
                ServerState::Shutdown => "stopped",
            }
        };
        let metadata = self.sm.metadata();
        ClusterStatus {
            node_id: self.id,
            role,
            leader: metrics.current_leader,
            term: metrics.current_term,
            last_applied: metrics.last_applied.map(|l| l.index),
            members,
            topics: metadata.topics.len(),
            partition_leaders: metadata
                .leaders
                .iter()
                .map(|((topic, partition), node)| PartitionLeader {
                    topic: topic.clone(),
                    partition: *partition,
                    node: *node,
                })
                .collect(),
        }
    }

    /// Stops Raft and the node's tasks.
    pub async fn shutdown(&self) {
        for task in &self.tasks {
            task.abort();
        }
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "cluster: Raft did not stop cleanly");
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// An operator's change to the cluster, carried out by the Raft leader
/// (asked through any node).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Change {
    /// Takes a node out of the membership.
    Remove { node_id: NodeId },
    /// A change to the replicated metadata.
    Metadata(Command),
}

/// Why a change was not made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
pub enum ChangeError {
    /// The change itself is refused (the reason says why); asking again
    /// will not help.
    #[error("{0}")]
    Refused(String),
    /// The cluster cannot change now (no majority reachable, leadership
    /// moving); it may later.
    #[error("{0}")]
    Unavailable(String),
}

/// How long a change may take to commit before it is reported unavailable.
const CHANGE_TTL: Duration = Duration::from_secs(10);

impl Node {
    /// Makes `change` through the Raft leader, wherever it is; returns
    /// what was done. Refused with [`ChangeError::Unavailable`] when no
    /// majority of the voters is reachable from here.
    pub async fn change(&self, change: Change) -> Result<String, ChangeError> {
        let (leader, addr) = {
            let metrics = self.raft.metrics();
            let metrics = metrics.borrow();
            let leader = metrics.current_leader.ok_or_else(|| {
                ChangeError::Unavailable(format!(
                    "node {} knows no Raft leader: a majority of the voters is not \
                     reachable from it, and the cluster cannot change until it is",
                    self.id
                ))
            })?;
            let addr = metrics
                .membership_config
                .membership()
                .get_node(&leader)
                .map(|m| m.cluster_addr.clone());
            (leader, addr)
        };
        if leader == self.id {
            return apply_change(&self.raft, change).await;
        }
        let addr = addr.ok_or_else(|| {
            ChangeError::Unavailable(format!("the leader, node {leader}, has no address yet"))
        })?;
        let body = serde_json::to_vec(&change).map_err(|e| ChangeError::Refused(e.to_string()))?;
        let mut channel = Channel::new(addr, self.tls.clone()).bound_to(self.bind);
        let answer = channel
            .call(
                kind::CHANGE,
                body.into(),
                CHANGE_TTL + Duration::from_secs(2),
            )
            .await
            .map_err(|e| {
                ChangeError::Unavailable(format!(
                    "the leader, node {leader}, is not reachable from node {} ({e}): \
                     the cluster cannot change from here until it is",
                    self.id
                ))
            })?;
        serde_json::from_slice::<Result<String, ChangeError>>(&answer)
            .map_err(|e| ChangeError::Unavailable(format!("the leader's answer: {e}")))?
    }
}

/// Makes `change` on this node, the leader.
pub(crate) async fn apply_change(
    raft: &Raft<TypeConfig>,
    change: Change,
) -> Result<String, ChangeError> {
    let unavailable = || {
        ChangeError::Unavailable(format!(
            "not committed within {CHANGE_TTL:?}: a majority of the voters is not \
             reachable, and the cluster cannot change until it is"
        ))
    };
    let write_error = |e: RaftError<NodeId, ClientWriteError<NodeId, Member>>| match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => {
            ChangeError::Unavailable("leadership moved to another node; try again".into())
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
            ChangeError::Refused(e.to_string())
        }
        other => ChangeError::Unavailable(other.to_string()),
    };
    match change {
        Change::Remove { node_id } => {
            let membership = raft
                .metrics()
                .borrow()
                .membership_config
                .membership()
                .clone();
            if membership.get_node(&node_id).is_none() {
                return Err(ChangeError::Refused(format!(
                    "node {node_id} is not a member"
                )));
            }
            let voters: Vec<NodeId> = membership.voter_ids().collect();
            if voters == [node_id] {
                return Err(ChangeError::Refused(format!(
                    "node {node_id} is the only voter: the cluster would have none"
                )));
            }
            if voters.contains(&node_id) {
                let remove = ChangeMembers::RemoveVoters([node_id].into());
                tokio::time::timeout(CHANGE_TTL, raft.change_membership(remove, false))
                    .await
                    .map_err(|_| unavailable())?
                    .map_err(write_error)?;
            } else {
                let remove = ChangeMembers::RemoveNodes([node_id].into());
                tokio::time::timeout(CHANGE_TTL, raft.change_membership(remove, false))
                    .await
                    .map_err(|_| unavailable())?
                    .map_err(write_error)?;
            }
            tracing::info!(node = node_id, "cluster: node removed from the membership");
            Ok(format!("node {node_id} removed"))
        }
        Change::Metadata(command) => {
            let written = tokio::time::timeout(CHANGE_TTL, raft.client_write(command))
                .await
                .map_err(|_| unavailable())?
                .map_err(write_error)?;
            match written.data {
                crate::Reply::Done => Ok(format!("done at log index {}", written.log_id.index)),
                crate::Reply::Refused(reason) => Err(ChangeError::Refused(reason)),
            }
        }
    }
}

/// One node's view of the cluster (`kaelix cluster status`, the `cluster`
/// object of the broker's statistics and `/healthz`).
#[derive(Debug, Clone, Serialize)]
pub struct ClusterStatus {
    pub node_id: NodeId,
    /// `leader`, `follower`, `candidate`, `learner`, `joining` or `stopped`.
    pub role: &'static str,
    /// The Raft leader this node follows, if it knows one.
    pub leader: Option<NodeId>,
    pub term: u64,
    /// Index of the last metadata change applied here.
    pub last_applied: Option<u64>,
    pub members: Vec<MemberStatus>,
    /// Topics the cluster defines.
    pub topics: usize,
    pub partition_leaders: Vec<PartitionLeader>,
}

impl ClusterStatus {
    /// Whether this node can change metadata: it knows a leader and a
    /// majority of the voters is up as it sees them.
    pub fn has_quorum(&self) -> bool {
        let voters = self.members.iter().filter(|m| m.voter).count();
        let up = self.members.iter().filter(|m| m.voter && m.up).count();
        self.leader.is_some() && voters > 0 && up * 2 > voters
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct MemberStatus {
    pub id: NodeId,
    pub cluster_addr: String,
    pub client_addr: String,
    /// A voter counts toward the majority; a learner is still catching up.
    pub voter: bool,
    /// Answered a ping within `failure_timeout_ms` (this node: always).
    pub up: bool,
    /// Milliseconds since it last answered.
    pub last_seen_ms: Option<u64>,
    /// Why the last ping failed, while it is down.
    pub problem: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PartitionLeader {
    pub topic: String,
    pub partition: u32,
    pub node: NodeId,
}

/// Asks the seeds until this node is a member (or founds the cluster; see
/// the module's documentation).
async fn join(
    raft: Raft<TypeConfig>,
    id: NodeId,
    member: Member,
    seeds: Vec<String>,
    tls: Option<Arc<LinkTls>>,
    bind: Option<std::net::IpAddr>,
) {
    let request = JoinRequest {
        node_id: id,
        member: member.clone(),
    };
    let Ok(body) = serde_json::to_vec(&request) else {
        return;
    };
    let body = Bytes::from(body);
    let mut round = 0u64;
    loop {
        let mut others_unformed = true;
        let mut lowest = true;
        let mut problems = Vec::new();
        for seed in &seeds {
            let mut target = seed.clone();
            // A seed may name the leader; follow it once.
            for _hop in 0..2 {
                let mut channel = Channel::new(target.clone(), tls.clone()).bound_to(bind);
                let reply = match ask(&mut channel, body.clone()).await {
                    Ok(reply) => reply,
                    Err(e) => {
                        others_unformed = false;
                        problems.push(e);
                        break;
                    }
                };
                match reply {
                    JoinReply::Joined => {
                        tracing::info!(node = id, via = %target, "cluster: joined");
                        return;
                    }
                    JoinReply::AskLeader { cluster_addr, .. } => {
                        others_unformed = false;
                        target = cluster_addr;
                    }
                    JoinReply::NotFormed { node_id } => {
                        if node_id == id {
                            // This node itself, under another address.
                        } else if node_id < id {
                            lowest = false;
                        }
                        break;
                    }
                    JoinReply::Refused(reason) => {
                        others_unformed = false;
                        problems.push(format!("{target}: {reason}"));
                        break;
                    }
                }
            }
        }
        if others_unformed && lowest {
            let founders = BTreeMap::from([(id, member.clone())]);
            match raft.initialize(founders).await {
                Ok(()) => {
                    tracing::info!(
                        node = id,
                        "cluster: founded a new cluster; the others join it"
                    );
                    return;
                }
                Err(e) => problems.push(format!("founding: {e}")),
            }
        }
        round += 1;
        // Say why it waits, now and then: a missing seed stalls a first start.
        if round == 1 || round.is_multiple_of(20) {
            if problems.is_empty() {
                tracing::info!(
                    node = id,
                    "cluster: waiting for the node with the lowest id among the seeds to found the cluster"
                );
            } else {
                tracing::warn!(node = id, problems = %problems.join("; "), "cluster: not joined yet, asking the seeds again");
            }
        }
        tokio::time::sleep(JOIN_RETRY).await;
    }
}

async fn ask(channel: &mut Channel, body: Bytes) -> Result<JoinReply, String> {
    let answer = channel
        .call(kind::JOIN, body, JOIN_TTL)
        .await
        .map_err(|e: LinkError| e.to_string())?;
    serde_json::from_slice(&answer).map_err(|e| format!("{}: bad answer: {e}", channel.addr()))
}

/// A seed's or the leader's answer to a node asking to join.
pub(crate) async fn answer_join(raft: &Raft<TypeConfig>, request: JoinRequest) -> JoinReply {
    let metrics = raft.metrics().borrow().clone();
    let membership = metrics.membership_config.membership().clone();
    if membership.nodes().next().is_none() {
        return JoinReply::NotFormed {
            node_id: metrics.id,
        };
    }
    match metrics.current_leader {
        Some(leader) if leader == metrics.id => {}
        Some(leader) => {
            return match membership.get_node(&leader) {
                Some(node) => JoinReply::AskLeader {
                    node_id: leader,
                    cluster_addr: node.cluster_addr.clone(),
                },
                None => JoinReply::Refused(format!("leader {leader} has no address yet")),
            }
        }
        None => return JoinReply::Refused("no Raft leader elected yet".into()),
    }
    let JoinRequest { node_id, member } = request;
    if let Some(known) = membership.get_node(&node_id) {
        if known.cluster_addr != member.cluster_addr {
            return JoinReply::Refused(format!(
                "node id {node_id} is a member already, at {}; remove it first, \
                 or give this node another cluster.node_id",
                known.cluster_addr
            ));
        }
    } else if let Err(e) = raft.add_learner(node_id, member.clone(), true).await {
        return refused(e);
    }
    if !membership.voter_ids().any(|v| v == node_id) {
        let voters = ChangeMembers::AddVoterIds([node_id].into());
        if let Err(e) = raft.change_membership(voters, true).await {
            return refused(e);
        }
    } else if membership.get_node(&node_id) != Some(&member) {
        // Same id and cluster address, a new client address.
        let nodes = ChangeMembers::SetNodes([(node_id, member)].into());
        if let Err(e) = raft.change_membership(nodes, true).await {
            return refused(e);
        }
    }
    tracing::info!(node = node_id, "cluster: node joined");
    JoinReply::Joined
}

fn refused(e: RaftError<NodeId, ClientWriteError<NodeId, Member>>) -> JoinReply {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
            match (f.leader_id, f.leader_node) {
                (Some(node_id), Some(node)) => JoinReply::AskLeader {
                    node_id,
                    cluster_addr: node.cluster_addr,
                },
                _ => JoinReply::Refused("leadership is changing".into()),
            }
        }
        other => JoinReply::Refused(other.to_string()),
    }
}

/// On the Raft leader: gives every partition of every defined topic a
/// leader among the voters (see [`Metadata::leader_assignments`]), and
/// moves the partitions of a node taken out of the membership.
async fn lead_partitions(raft: Raft<TypeConfig>, sm: StateMachine, every: Duration) {
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let voters: Vec<NodeId> = {
            let metrics = raft.metrics();
            let metrics = metrics.borrow();
            if metrics.state != ServerState::Leader {
                continue;
            }
            metrics.membership_config.membership().voter_ids().collect()
        };
        // A bounded batch per round: a large topic does not hold the log.
        for change in sm
            .metadata()
            .leader_assignments(&voters)
            .into_iter()
            .take(256)
        {
            if let Err(e) = raft.client_write(change).await {
                tracing::debug!(error = %e, "cluster: partition leader not assigned this round");
                break;
            }
        }
    }
}

/// This node's answer to a ping.
pub(crate) fn answer_ping(raft: &Raft<TypeConfig>) -> Pong {
    let metrics = raft.metrics();
    let metrics = metrics.borrow();
    Pong {
        node_id: metrics.id,
        leader: metrics.current_leader,
        term: metrics.current_term,
    }
}

/// Pings every member each `every`; records who answered, as whom.
async fn watch_peers(
    raft: Raft<TypeConfig>,
    id: NodeId,
    tls: Option<Arc<LinkTls>>,
    bind: Option<std::net::IpAddr>,
    health: Arc<Health>,
    every: Duration,
    failure_timeout: Duration,
) {
    let ttl = (failure_timeout / 2).max(every);
    let mut channels: HashMap<NodeId, Channel> = HashMap::new();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stopped = false;
    loop {
        tick.tick().await;
        let members: Vec<(NodeId, String)> = {
            let metrics = raft.metrics();
            let metrics = metrics.borrow();
            if let (Err(fatal), false) = (&metrics.running_state, stopped) {
                // Storage failed, or Raft panicked: this node no longer
                // takes part; its clients are still served.
                tracing::error!(node = id, error = %fatal, "cluster: Raft stopped on this node");
                stopped = true;
            }
            metrics
                .membership_config
                .membership()
                .nodes()
                .filter(|(node, _)| **node != id)
                .map(|(node, member)| (*node, member.cluster_addr.clone()))
                .collect()
        };
        health
            .peers
            .lock()
            .retain(|node, _| members.iter().any(|(m, _)| m == node));
        let mut pings = JoinSet::new();
        for (node, addr) in members {
            let mut channel = channels
                .remove(&node)
                .filter(|c| c.addr() == addr)
                .unwrap_or_else(|| Channel::new(addr, tls.clone()).bound_to(bind));
            pings.spawn(async move {
                let answer = channel.call(kind::PING, Bytes::new(), ttl).await;
                (node, channel, answer)
            });
        }
        while let Some(done) = pings.join_next().await {
            let Ok((node, channel, answer)) = done else {
                continue;
            };
            let outcome = match answer {
                Err(e) => Err(e.to_string()),
                Ok(body) => match serde_json::from_slice::<Pong>(&body) {
                    Ok(pong) if pong.node_id == node => Ok(()),
                    Ok(pong) => Err(format!(
                        "the node at {} answers as node {}, not {node}",
                        channel.addr(),
                        pong.node_id
                    )),
                    Err(e) => Err(format!("{}: bad answer: {e}", channel.addr())),
                },
            };
            channels.insert(node, channel);
            let mut peers = health.peers.lock();
            let contact = peers.entry(node).or_default();
            match outcome {
                Ok(()) => {
                    if contact.last_ok.is_none() || contact.problem.is_some() {
                        tracing::info!(node, "cluster: member is up");
                    }
                    contact.last_ok = Some(Instant::now());
                    contact.problem = None;
                }
                Err(problem) => {
                    if contact.problem.is_none() {
                        tracing::warn!(node, %problem, "cluster: member does not answer");
                    }
                    contact.problem = Some(problem);
                }
            }
        }
    }
}
