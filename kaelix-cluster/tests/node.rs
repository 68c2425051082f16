//! Nodes as the broker runs them, in one process over real sockets on
//! 127.0.0.1: three nodes that name each other as seeds form one cluster;
//! a stopped node is seen down by the others, and when it starts again
//! from its data directory it catches up with what changed meanwhile.

use std::time::Duration;

use kaelix_cluster::{ClusterStatus, Command, Node, TopicDef};
use kaelix_core::config::ClusterConfig;

/// Free ports for the nodes to listen on, known before any starts (each
/// node's seeds name them all).
fn free_addrs(n: usize) -> Vec<String> {
    let listeners: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect()
}

fn config(id: u64, addrs: &[String], dir: &std::path::Path) -> ClusterConfig {
    ClusterConfig {
        enabled: true,
        node_id: id,
        listen: addrs[id as usize - 1].clone(),
        seeds: addrs.to_vec(),
        data_dir: dir.join(format!("node{id}")),
        heartbeat_ms: 50,
        failure_timeout_ms: 400,
        ..ClusterConfig::default()
    }
}

async fn until(what: &str, node: &Node, check: impl Fn(&ClusterStatus) -> bool) -> ClusterStatus {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let status = node.status();
        if check(&status) {
            return status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "node {}: not {what} within 20 s: {status:#?}",
            node.id()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn all_voters_up(n: usize) -> impl Fn(&ClusterStatus) -> bool {
    move |s| s.members.len() == n && s.members.iter().all(|m| m.voter && m.up) && s.leader.is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeds_form_one_cluster_and_a_restarted_node_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    let addrs = free_addrs(3);
    let mut nodes = Vec::new();
    for id in 1..=3 {
        let client = format!("127.0.0.1:{}", 9000 + id);
        nodes.push(
            Node::start(&config(id, &addrs, dir.path()), client, None)
                .await
                .unwrap(),
        );
    }
    let mut leaders = Vec::new();
    for node in &nodes {
        let status = until("in a cluster of three", node, all_voters_up(3)).await;
        leaders.push(status.leader);
        let me = status.members.iter().find(|m| m.id == node.id()).unwrap();
        assert_eq!(me.client_addr, format!("127.0.0.1:{}", 9000 + node.id()));
    }
    // One cluster, not three: every node follows the same leader.
    assert!(leaders.windows(2).all(|w| w[0] == w[1]), "{leaders:?}");
    assert!(nodes[0].status().has_quorum());

    // Node 3 stops; the others see it down within the failure timeout.
    let stopped = nodes.pop().unwrap();
    stopped.shutdown().await;
    drop(stopped);
    for node in &nodes {
        until("seeing node 3 down", node, |s| {
            s.members
                .iter()
                .any(|m| m.id == 3 && !m.up && m.problem.is_some())
        })
        .await;
    }
    // The two left are a majority: they still change metadata.
    let leader = until("led", &nodes[0], |s| s.leader.is_some_and(|l| l != 3)).await;
    let leader = nodes
        .iter()
        .find(|n| Some(n.id()) == leader.leader)
        .unwrap();
    let written = leader
        .raft()
        .client_write(Command::DefineTopic {
            topic: "orders".into(),
            def: TopicDef {
                partitions: 4,
                retention_messages: Some(1000),
                retention_bytes: None,
                retention_age_ms: None,
            },
        })
        .await
        .unwrap();
    assert_eq!(written.data, kaelix_cluster::Reply::Done);

    // Node 3 starts again from its data directory: it is a member already,
    // is seen up again, and applies what changed while it was away.
    let back = Node::start(
        &config(3, &addrs, dir.path()),
        "127.0.0.1:9003".into(),
        None,
    )
    .await
    .unwrap();
    until("caught up", &back, |s| s.topics == 1).await;
    assert_eq!(back.metadata().topics["orders"].partitions, 4);
    for node in nodes.iter().chain([&back]) {
        until("in a cluster of three again", node, all_voters_up(3)).await;
    }
    for node in nodes.iter().chain([&back]) {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_seeds_founds_and_others_join_it() {
    let dir = tempfile::tempdir().unwrap();
    let addrs = free_addrs(2);
    let mut first = config(1, &addrs, dir.path());
    first.seeds.clear();
    let first = Node::start(&first, "127.0.0.1:9101".into(), None)
        .await
        .unwrap();
    until("founded", &first, all_voters_up(1)).await;
    let mut second = config(2, &addrs, dir.path());
    second.seeds = vec![addrs[0].clone()];
    let second = Node::start(&second, "127.0.0.1:9102".into(), None)
        .await
        .unwrap();
    for node in [&first, &second] {
        until("in a cluster of two", node, all_voters_up(2)).await;
    }
    // Another node claiming id 2 from another address is refused.
    let extra = free_addrs(1);
    let impostor = ClusterConfig {
        listen: extra[0].clone(),
        seeds: vec![addrs[0].clone()],
        data_dir: dir.path().join("impostor"),
        ..config(2, &addrs, dir.path())
    };
    let impostor = Node::start(&impostor, "127.0.0.1:9199".into(), None)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(impostor.status().role, "joining");
    assert_eq!(first.status().members.len(), 2);
    for node in [&first, &second, &impostor] {
        node.shutdown().await;
    }
}
