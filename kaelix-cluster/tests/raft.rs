//! Three Raft nodes in one process, linked over real TCP sockets on
//! 127.0.0.1 with PEER_CALL frames: they elect a leader, every node
//! applies the metadata the leader commits, and when the leader stops the
//! other two elect another and carry on.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kaelix_cluster::network::{raft_config, serve, PeerNetwork};
use kaelix_cluster::store::{self, StateMachine, TypeConfig};
use kaelix_cluster::{Command, Member, NodeId, Reply, TopicDef};
use kaelix_core::config::ClusterConfig;
use openraft::Raft;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

struct Node {
    raft: Raft<TypeConfig>,
    sm: StateMachine,
    server: JoinHandle<()>,
    _dir: tempfile::TempDir,
}

async fn start(id: NodeId, listener: TcpListener) -> Node {
    // Faster than the defaults, as a test can afford on one machine.
    let cluster = ClusterConfig {
        heartbeat_ms: 50,
        failure_timeout_ms: 300,
        ..ClusterConfig::default()
    };
    let config = raft_config(&cluster).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (log, sm) = store::open(dir.path()).unwrap();
    let raft = Raft::new(
        id,
        Arc::new(config),
        PeerNetwork::default(),
        log,
        sm.clone(),
    )
    .await
    .unwrap();
    let server = tokio::spawn(serve(listener, raft.clone(), None, None));
    Node {
        raft,
        sm,
        server,
        _dir: dir,
    }
}

fn topic(name: &str, partitions: u32) -> Command {
    Command::DefineTopic {
        topic: name.into(),
        def: TopicDef {
            partitions,
            retention_messages: None,
            retention_bytes: None,
            retention_age_ms: None,
        },
    }
}

async fn leader_among(nodes: &BTreeMap<NodeId, Node>) -> NodeId {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        for node in nodes.values() {
            if let Some(leader) = node.raft.current_leader().await {
                if nodes.contains_key(&leader) {
                    return leader;
                }
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no leader elected within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn until_all_have(nodes: &BTreeMap<NodeId, Node>, name: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !nodes
        .values()
        .all(|n| n.sm.metadata().topics.contains_key(name))
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} not applied on every node within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_elect_replicate_and_survive_their_leader() {
    let mut listeners = Vec::new();
    let mut members = BTreeMap::new();
    for id in 1..=3u64 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        members.insert(
            id,
            Member {
                cluster_addr: addr,
                client_addr: String::new(),
            },
        );
        listeners.push((id, listener));
    }
    let mut nodes = BTreeMap::new();
    for (id, listener) in listeners {
        nodes.insert(id, start(id, listener).await);
    }
    nodes[&1].raft.initialize(members.clone()).await.unwrap();

    let leader = leader_among(&nodes).await;
    let written = nodes[&leader]
        .raft
        .client_write(topic("orders", 3))
        .await
        .unwrap();
    assert_eq!(written.data, Reply::Done);
    until_all_have(&nodes, "orders").await;
    for node in nodes.values() {
        let membership = node.sm.membership();
        assert_eq!(membership.membership().voter_ids().count(), 3);
    }

    // The leader stops: the two others elect one of themselves and go on.
    let old = nodes.remove(&leader).unwrap();
    old.raft.shutdown().await.unwrap();
    old.server.abort();
    let next = leader_among(&nodes).await;
    assert_ne!(next, leader);
    let written = nodes[&next]
        .raft
        .client_write(topic("payments", 1))
        .await
        .unwrap();
    assert_eq!(written.data, Reply::Done);
    until_all_have(&nodes, "payments").await;
    // A change the state machine refuses is refused the same everywhere.
    let refused = nodes[&next]
        .raft
        .client_write(topic("orders", 1))
        .await
        .unwrap();
    assert!(matches!(refused.data, Reply::Refused(r) if r.contains("not shrink")));
    for node in nodes.values() {
        assert_eq!(node.sm.metadata().topics["orders"].partitions, 3);
        node.raft.shutdown().await.unwrap();
        node.server.abort();
    }
}
