//! The broker as a cluster node: starting its node from `[cluster]`, and
//! the node's status in the statistics, `/metrics` and `/healthz`.

use std::sync::Arc;

use kaelix_cluster::{ClusterStatus, Node, NodeError};
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
        let _ = self.inner.cluster.set(node);
        Ok(())
    }

    /// The cluster as this broker's node sees it; `None` on a broker that
    /// is not in a cluster.
    pub fn cluster_status(&self) -> Option<ClusterStatus> {
        self.inner.cluster.get().map(|node| node.status())
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
