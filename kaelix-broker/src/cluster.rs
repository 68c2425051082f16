//! The broker as a cluster node: starting its node from `[cluster]`, and
//! the node's status in the statistics, `/metrics` and `/healthz`.

use std::sync::Arc;

use kaelix_cluster::{Change, ChangeError, ClusterStatus, Command, Node, NodeError, TopicDef};
use kaelix_core::protocol::ErrorCode;
use kaelix_core::runtime::HealthStatus;
use metrics::gauge;

use crate::{BrokerHealth, MessageBroker};

impl MessageBroker {
    /// Starts this broker's cluster node as `[cluster]` describes it, on
    /// the current tokio runtime, and returns once it listens; joining the
    /// others goes on in the background (see
    /// [`cluster_status`](Self::cluster_status)). `client_addr` is where
    /// this broker's clients connect, as the other nodes' clients can
    /// reach it. A broker joins one cluster, once.
    pub async fn join_cluster(&self, client_addr: String) -> Result<(), NodeError> {
        let config = self.config();
        if !config.cluster.enabled {
            return Err(NodeError::Config("cluster.enabled is false".into()));
        }
        if self.inner.cluster.get().is_some() {
            return Err(NodeError::Config("this broker runs a node already".into()));
        }
        let routes = crate::route::Routes::new(&self.inner);
        let node = Arc::new(Node::start(&config.cluster, client_addr, Some(routes)).await?);
        // Count this node's interest from now on, before any link sends it.
        self.inner.router.interest();
        tokio::spawn(crate::route::link_members(
            Arc::downgrade(&self.inner),
            node.clone(),
        ));
        tokio::spawn(follow_topics(Arc::downgrade(&self.inner), node.clone()));
        let _ = self.inner.cluster.set(node);
        Ok(())
    }

    /// The cluster as this broker's node sees it; `None` on a broker that
    /// is not in a cluster.
    pub fn cluster_status(&self) -> Option<ClusterStatus> {
        self.inner.cluster.get().map(|node| node.status())
    }

    /// Carries out an operator's request (an ADMIN frame's JSON; see
    /// docs/protocol.md) through the cluster's Raft leader; returns what
    /// was done, or the error code and reason.
    pub(crate) async fn admin(&self, request: &str) -> Result<String, (ErrorCode, String)> {
        let invalid = |reason: String| (ErrorCode::InvalidRequest, reason);
        let Some(node) = self.inner.cluster.get().cloned() else {
            return Err((
                ErrorCode::Unavailable,
                "this broker is not a cluster node (cluster.enabled = false)".into(),
            ));
        };
        let request: serde_json::Value =
            serde_json::from_str(request).map_err(|e| invalid(format!("not JSON: {e}")))?;
        let number = |key: &str| request.get(key).and_then(serde_json::Value::as_u64);
        let topic = || -> Result<String, (ErrorCode, String)> {
            let name = request
                .get("topic")
                .and_then(serde_json::Value::as_str)
                .ok_or_else(|| invalid("\"topic\" is missing".into()))?;
            kaelix_core::Topic::new(name).map_err(|e| invalid(e.to_string()))?;
            Ok(name.to_string())
        };
        let change = match request.get("op").and_then(serde_json::Value::as_str) {
            Some("remove") => Change::Remove {
                node_id: number("node").ok_or_else(|| invalid("\"node\" is missing".into()))?,
            },
            Some("define_topic") => {
                let partitions = number("partitions").unwrap_or(1);
                let partitions = u32::try_from(partitions)
                    .ok()
                    .filter(|p| (1..=kaelix_core::PartitionId::MAX_PARTITIONS).contains(p))
                    .ok_or_else(|| {
                        invalid(format!(
                            "partitions must be 1 to {}, not {partitions}",
                            kaelix_core::PartitionId::MAX_PARTITIONS
                        ))
                    })?;
                Change::Metadata(Command::DefineTopic {
                    topic: topic()?,
                    def: TopicDef {
                        partitions,
                        retention_messages: number("retention_messages"),
                        retention_bytes: number("retention_bytes"),
                        retention_age_ms: number("retention_age_ms"),
                    },
                })
            }
            Some("delete_topic") => Change::Metadata(Command::DeleteTopic { topic: topic()? }),
            Some(other) => return Err(invalid(format!("unknown operation {other:?}"))),
            None => return Err(invalid("\"op\" is missing".into())),
        };
        node.change(change).await.map_err(|e| match e {
            ChangeError::Refused(reason) => (ErrorCode::InvalidRequest, reason),
            ChangeError::Unavailable(reason) => (ErrorCode::Unavailable, reason),
        })
    }

    /// The cluster's part of the broker's health: degraded while the node
    /// is joining or cannot reach a majority (it serves its own clients
    /// but cannot change metadata).
    pub(crate) fn cluster_health(&self, health: BrokerHealth) -> BrokerHealth {
        let Some(status) = self.cluster_status() else {
            return health;
        };
        if health.status != HealthStatus::Healthy {
            return health;
        }
        let voters = status.members.iter().filter(|m| m.voter).count();
        let up = status.members.iter().filter(|m| m.voter && m.up).count();
        let reason = if status.role == "joining" {
            "cluster: joining through the seeds".to_string()
        } else if !status.has_quorum() {
            format!(
                "cluster: {up} of {voters} voters reachable and no leader known; \
                 metadata cannot change until a majority is back"
            )
        } else {
            return health;
        };
        BrokerHealth {
            status: HealthStatus::Degraded,
            reason,
        }
    }

    /// The cluster gauges, into the `metrics` recorder in scope.
    pub(crate) fn export_cluster_metrics(&self) {
        let Some(status) = self.cluster_status() else {
            return;
        };
        let flag = |b: bool| if b { 1.0 } else { 0.0 };
        gauge!("kaelix_cluster_node_id").set(status.node_id as f64);
        gauge!("kaelix_cluster_is_leader").set(flag(status.leader == Some(status.node_id)));
        gauge!("kaelix_cluster_leader_id").set(status.leader.unwrap_or(0) as f64);
        gauge!("kaelix_cluster_term").set(status.term as f64);
        gauge!("kaelix_cluster_has_quorum").set(flag(status.has_quorum()));
        gauge!("kaelix_cluster_members").set(status.members.len() as f64);
        gauge!("kaelix_cluster_members_up")
            .set(status.members.iter().filter(|m| m.up).count() as f64);
        for member in &status.members {
            gauge!("kaelix_cluster_member_up", "node" => member.id.to_string())
                .set(flag(member.up));
        }
        gauge!("kaelix_cluster_topics").set(status.topics as f64);
        for leader in &status.partition_leaders {
            gauge!(
                "kaelix_cluster_partition_leader",
                "topic" => leader.topic.clone(),
                "partition" => leader.partition.to_string()
            )
            .set(leader.node as f64);
        }
    }
}

/// `config` with the cluster's topic definitions over its `[[topics]]`: a
/// defined topic takes its partitions and retention from the cluster (what
/// a definition leaves unset, and the slow-consumer policy, from the file).
pub(crate) fn with_cluster_topics(
    inner: &crate::broker::Inner,
    config: &kaelix_core::MemoryStreamerConfig,
) -> kaelix_core::MemoryStreamerConfig {
    let defs = inner.cluster_topics.read();
    let mut merged = config.clone();
    if defs.is_empty() {
        return merged;
    }
    let mut entries = Vec::with_capacity(defs.len() + config.topics.len());
    for (name, def) in defs.iter() {
        let Ok(topic) = kaelix_core::Topic::new(name) else {
            continue;
        };
        let file = config.topic_settings(&topic);
        entries.push(kaelix_core::config::TopicConfig {
            pattern: name.clone(),
            partitions: def.partitions,
            retain_messages: def
                .retention_messages
                .map_or(file.retain_messages, |n| n as usize),
            retain_bytes: def
                .retention_bytes
                .map_or(file.retain_bytes, |n| n as usize),
            retain_age_secs: def
                .retention_age_ms
                .map_or(file.retain_age_secs, |ms| ms.div_ceil(1000)),
            slow_consumer: file.slow_consumer,
        });
    }
    // First among equals: an exact name in the file loses to the cluster's.
    entries.extend(config.topics.iter().cloned());
    merged.topics = entries;
    merged
}

/// Applies the cluster's topic definitions to this broker's topics each
/// time they change (partitions grow, retention follows).
async fn follow_topics(broker: std::sync::Weak<crate::broker::Inner>, node: Arc<Node>) {
    let mut metrics = node.raft().metrics();
    loop {
        let Some(inner) = broker.upgrade() else {
            return;
        };
        let topics = node.metadata().topics;
        if *inner.cluster_topics.read() != topics {
            tracing::info!(topics = topics.len(), "cluster: topic definitions applied");
            *inner.cluster_topics.write() = topics;
            let running = inner.live.running();
            let config = with_cluster_topics(&inner, &running);
            inner.router.reconfigure_logs(&config);
        }
        drop(inner);
        if metrics.changed().await.is_err() {
            return;
        }
    }
}
