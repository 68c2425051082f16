//! Clusters of real `kaelix-broker` processes on 127.0.0.1, linked over
//! mutually authenticated TLS with certificates made here: three nodes
//! form a cluster through their seeds, survive one of them killed with
//! SIGKILL, and take it back when it restarts; a node whose certificate
//! another CA signed is kept out.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::pki::{Issued, Pki};
use common::BrokerProcess;
use serde_json::Value;

/// Ports free now, for nodes that must name each other before any starts.
fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

struct NodeSpec {
    id: u64,
    dir: PathBuf,
    listen: String,
    /// How the others reach it, when not at `listen`.
    advertise: Option<String>,
    seeds: Vec<String>,
    cert: Issued,
    ca: PathBuf,
}

impl NodeSpec {
    fn config(&self) -> String {
        let seeds: Vec<String> = self.seeds.iter().map(|s| format!("{s:?}")).collect();
        format!(
            "[telemetry.logging]\nlevel = \"info\"\n\n\
             [cluster]\nenabled = true\nnode_id = {}\nlisten = {:?}\nadvertise = {:?}\nseeds = [{}]\n\
             data_dir = {:?}\nheartbeat_ms = 100\nfailure_timeout_ms = 600\n\n\
             [cluster.tls]\nenabled = true\ncert_path = {:?}\nkey_path = {:?}\nca_path = {:?}\n",
            self.id,
            self.listen,
            self.advertise.as_deref().unwrap_or(""),
            seeds.join(", "),
            self.dir.join("data"),
            self.cert.cert,
            self.cert.key,
            self.ca,
        )
    }

    fn start(&self) -> BrokerProcess {
        std::fs::create_dir_all(&self.dir).unwrap();
        BrokerProcess::with_config_in(&self.dir, &self.config())
    }
}

/// The `cluster` object of the node's `/healthz`, with the health status.
fn cluster_of(node: &BrokerProcess) -> Value {
    let (_, body) = node.http_get("/healthz");
    let health: Value = serde_json::from_str(&body).unwrap();
    let mut cluster = health["cluster"].clone();
    cluster["health"] = health["status"].clone();
    cluster
}

/// Polls `check` on the node's cluster view until it holds; the view.
fn wait_until(
    node: &BrokerProcess,
    what: &str,
    limit: Duration,
    check: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let cluster = cluster_of(node);
        if check(&cluster) {
            return cluster;
        }
        assert!(
            Instant::now() < deadline,
            "not {what} within {limit:?}: {cluster}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn whole(n: u64) -> impl Fn(&Value) -> bool {
    move |c| c["members_up"] == n && c["members"] == n && c["has_quorum"] == true
}

fn kaelix(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kaelix"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn specs(root: &Path, pki: &Pki, n: u64) -> Vec<NodeSpec> {
    let addrs: Vec<String> = free_ports(n as usize)
        .into_iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    (1..=n)
        .map(|id| NodeSpec {
            id,
            dir: root.join(format!("node{id}")),
            listen: addrs[id as usize - 1].clone(),
            advertise: None,
            seeds: addrs.clone(),
            cert: pki.node(&format!("node{id}"), &format!("node{id}")),
            ca: pki.ca_path(),
        })
        .collect()
}

/// `n` nodes over mutual TLS, each naming all as seeds, started and formed
/// into one cluster; the directory holds their certificates and data.
fn start_cluster(n: u64) -> (tempfile::TempDir, Vec<NodeSpec>, Vec<Option<BrokerProcess>>) {
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new(root.path(), "cluster-ca");
    let specs = specs(root.path(), &pki, n);
    let nodes: Vec<Option<BrokerProcess>> = specs.iter().map(|s| Some(s.start())).collect();
    for node in nodes.iter().flatten() {
        wait_until(node, "a whole cluster", Duration::from_secs(20), whole(n));
    }
    (root, specs, nodes)
}

#[test]
fn three_processes_form_a_cluster_survive_a_sigkill_and_take_the_node_back() {
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new(root.path(), "cluster-ca");
    let specs = specs(root.path(), &pki, 3);
    let mut nodes: Vec<Option<BrokerProcess>> = specs.iter().map(|s| Some(s.start())).collect();

    let mut leaders = Vec::new();
    for node in nodes.iter().flatten() {
        let view = wait_until(
            node,
            "a healthy cluster of three",
            Duration::from_secs(20),
            |c| whole(3)(c) && c["health"] == "healthy",
        );
        leaders.push(view["leader"].as_u64().unwrap());
    }
    assert!(
        leaders.windows(2).all(|w| w[0] == w[1]),
        "one leader: {leaders:?}"
    );
    let leader = leaders[0];

    // `kaelix cluster status` on any node names every member and the leader.
    let client = nodes[1].as_ref().unwrap().addr();
    let (ok, out, err) = kaelix(&["--server", &client, "cluster", "status"]);
    assert!(ok, "{err}");
    assert!(out.contains("3 of 3 members up"), "{out}");
    assert!(out.contains(&format!("leader {leader};")), "{out}");
    for spec in &specs {
        assert!(out.contains(&spec.listen), "{out}");
    }
    let (ok, json, err) = kaelix(&["--server", &client, "cluster", "status", "--json"]);
    assert!(ok, "{err}");
    let json: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json["members"].as_array().unwrap().len(), 3);
    assert_eq!(json["node_id"], 2);

    // The leader is killed outright: the two others elect another leader
    // and report the dead node down, within a bounded time.
    let killed = leader as usize - 1;
    let killed_at = Instant::now();
    drop(nodes[killed].take());
    let mut recovered = Duration::ZERO;
    for node in nodes.iter().flatten() {
        wait_until(
            node,
            "led again without the killed node",
            Duration::from_secs(10),
            |c| {
                c["leader"].as_u64().is_some_and(|l| l != leader)
                    && c["members_up"] == 2
                    && c["has_quorum"] == true
            },
        );
        recovered = recovered.max(killed_at.elapsed());
    }
    eprintln!("new leader and the dead node seen down after {recovered:?}");
    let survivor = nodes.iter().flatten().next().unwrap();
    let (_, metrics) = survivor.http_get("/metrics");
    assert!(metrics.contains("kaelix_cluster_members_up 2"), "{metrics}");
    assert!(
        metrics.contains(&format!("kaelix_cluster_member_up{{node=\"{leader}\"}} 0")),
        "{metrics}"
    );
    assert!(metrics.contains("kaelix_cluster_has_quorum 1"), "{metrics}");

    // It restarts from its data directory and is a member again.
    nodes[killed] = Some(specs[killed].start());
    for node in nodes.iter().flatten() {
        wait_until(node, "whole again", Duration::from_secs(20), whole(3));
    }
    let back = nodes[killed].as_ref().unwrap();
    back.wait_for_log(&["member already"], Duration::from_secs(1));
}

#[test]
fn a_node_whose_certificate_another_ca_signed_is_kept_out() {
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new(root.path(), "cluster-ca");
    let mut specs = specs(root.path(), &pki, 2);
    // Node 1 founds a cluster on its own (no seeds).
    specs[0].seeds.clear();
    let first = specs[0].start();
    wait_until(&first, "founded", Duration::from_secs(20), whole(1));

    // Node 2's certificate is genuine, but from a CA the cluster does not trust.
    let other = Pki::new(root.path(), "other-ca");
    specs[1].cert = other.node("intruder", "node2");
    specs[1].ca = other.ca_path();
    specs[1].seeds = vec![specs[0].listen.clone()];
    let intruder = specs[1].start();
    first.wait_for_log(&["TLS handshake refused"], Duration::from_secs(10));
    let view = cluster_of(&intruder);
    assert_eq!(view["role"], "joining", "{view}");
    assert_eq!(view["health"], "degraded", "{view}");
    assert_eq!(cluster_of(&first)["members"], 1);
}

#[test]
fn cluster_status_on_a_broker_on_its_own_says_so() {
    let broker = BrokerProcess::start(&[]);
    let (ok, _, err) = kaelix(&["--server", &broker.addr(), "cluster", "status"]);
    assert!(!ok);
    assert!(err.contains("not a cluster node"), "{err}");
    let (_, body) = broker.http_get("/healthz");
    let health: Value = serde_json::from_str(&body).unwrap();
    assert!(health.get("cluster").is_none(), "{health}");
}

/// `subscriptions` in the node's `/healthz`: its clients' and, on route
/// links, other nodes' interest.
fn subscriptions_of(node: &BrokerProcess) -> u64 {
    let (_, body) = node.http_get("/healthz");
    let health: Value = serde_json::from_str(&body).unwrap();
    health["subscriptions"].as_u64().unwrap()
}

async fn wait_subscriptions(node: &BrokerProcess, at_least: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while subscriptions_of(node) < at_least {
        assert!(
            Instant::now() < deadline,
            "interest did not reach the node: {} subscriptions",
            subscriptions_of(node)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Receives `n` messages numbered 0.. in order, then checks nothing more
/// comes for a moment.
async fn receive_all(sub: &mut kaelix_consumer::Subscription, n: u64, what: &str) {
    for i in 0..n {
        let m = tokio::time::timeout(Duration::from_secs(20), sub.recv())
            .await
            .unwrap_or_else(|_| panic!("{what}: message {i} of {n} within 20 s"))
            .unwrap();
        assert_eq!(seq(&m.payload), i, "{what}: out of order");
    }
    no_more(sub, what).await;
}

async fn no_more(sub: &mut kaelix_consumer::Subscription, what: &str) {
    let extra = tokio::time::timeout(Duration::from_millis(300), sub.recv()).await;
    assert!(extra.is_err(), "{what}: got more than it should: {extra:?}");
}

fn seq(payload: &[u8]) -> u64 {
    u64::from_be_bytes(payload.try_into().expect("8-byte payload"))
}

/// Receives numbered messages from a queue group's members until `n` in
/// all; each member's share is in order and no number comes twice.
async fn drain_group(members: &mut [&mut kaelix_consumer::Subscription], n: u64) -> Vec<u64> {
    let mut seen = vec![false; n as usize];
    let mut shares = vec![0u64; members.len()];
    let mut last: Vec<Option<u64>> = vec![None; members.len()];
    let mut got = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while got < n {
        assert!(
            Instant::now() < deadline,
            "queue group: {got} of {n} within 20 s"
        );
        for (i, member) in members.iter_mut().enumerate() {
            while let Ok(Ok(m)) =
                tokio::time::timeout(Duration::from_millis(5), member.recv()).await
            {
                let k = seq(&m.payload);
                assert!(!seen[k as usize], "queue group: {k} delivered twice");
                assert!(last[i] < Some(k), "queue group: member {i} out of order");
                seen[k as usize] = true;
                last[i] = Some(k);
                shares[i] += 1;
                got += 1;
            }
        }
    }
    for (i, member) in members.iter_mut().enumerate() {
        no_more(member, &format!("queue member {i}")).await;
    }
    shares
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_published_on_one_node_reach_subscribers_on_the_others_once() {
    use kaelix_consumer::Consumer;
    use kaelix_publisher::Publisher;

    let (_root, _specs, nodes) = start_cluster(3);
    let nodes: Vec<BrokerProcess> = nodes.into_iter().flatten().collect();
    // Node 1: two overlapping patterns; node 2: the exact topic. Both have
    // members of one queue group.
    let c1 = Consumer::connect(nodes[0].addr()).await.unwrap();
    let c2 = Consumer::connect(nodes[1].addr()).await.unwrap();
    let c3 = Consumer::connect(nodes[2].addr()).await.unwrap();
    let mut star = c1.subscribe("orders.*").await.unwrap();
    let mut tail = c1.subscribe("orders.>").await.unwrap();
    let mut exact = c2.subscribe("orders.eu").await.unwrap();
    let mut q1 = c1.subscribe_queue("jobs", "workers").await.unwrap();
    let mut q2 = c2.subscribe_queue("jobs", "workers").await.unwrap();
    // Node 3 holds the two nodes' interest: 3 from node 1, 2 from node 2.
    wait_subscriptions(&nodes[2], 5).await;

    // Published on node 3: every subscription elsewhere gets every message
    // once, in the publisher's order.
    const N: u64 = 2000;
    let publisher = Publisher::connect(nodes[2].addr()).await.unwrap();
    for i in 0..N {
        publisher
            .send("orders.eu", i.to_be_bytes().to_vec())
            .await
            .unwrap();
    }
    publisher.flush().await.unwrap();
    receive_all(&mut star, N, "orders.* on node 1").await;
    receive_all(&mut tail, N, "orders.> on node 1").await;
    receive_all(&mut exact, N, "orders.eu on node 2").await;

    // The queue group gets each job once, spread over the two nodes.
    const M: u64 = 1000;
    for i in 0..M {
        publisher
            .send("jobs", i.to_be_bytes().to_vec())
            .await
            .unwrap();
    }
    publisher.flush().await.unwrap();
    let shares = drain_group(&mut [&mut q1, &mut q2], M).await;
    assert!(
        shares.iter().all(|&s| s > 0),
        "both nodes' members served: {shares:?}"
    );

    // A member on the publishing node takes them all: local first.
    let mut q3 = c3.subscribe_queue("jobs", "workers").await.unwrap();
    for i in 0..M {
        publisher
            .send("jobs", i.to_be_bytes().to_vec())
            .await
            .unwrap();
    }
    publisher.flush().await.unwrap();
    let shares = drain_group(&mut [&mut q1, &mut q2, &mut q3], M).await;
    assert_eq!(shares, vec![0, 0, M], "the publishing node's own member");

    // Published on node 1: its own subscribers get it once (nothing comes
    // back from the other nodes), node 2's once.
    let local = Publisher::connect(nodes[0].addr()).await.unwrap();
    local
        .publish("orders.eu", 0u64.to_be_bytes().to_vec())
        .await
        .unwrap();
    receive_all(&mut star, 1, "orders.* from its own node").await;
    receive_all(&mut tail, 1, "orders.> from its own node").await;
    receive_all(&mut exact, 1, "orders.eu from node 1").await;

    // Interest leaves with the subscription: node 3 forgets node 2's.
    drop(exact);
    drop(q2);
    drop(c2);
    let deadline = Instant::now() + Duration::from_secs(20);
    while subscriptions_of(&nodes[2]) != 4 {
        assert!(Instant::now() < deadline, "node 2's interest not withdrawn");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_leaves_the_others_delivering_and_its_clients_move() {
    use kaelix_consumer::{Consumer, ConsumerOptions};
    use kaelix_publisher::Publisher;

    let (_root, _specs, mut nodes) = start_cluster(3);
    let addrs: Vec<String> = nodes.iter().flatten().map(|n| n.addr()).collect();
    // A resilient consumer, on whichever node it picks; the publisher and
    // a second consumer on the two others.
    let options = ConsumerOptions {
        client: kaelix_core::client::ClientOptions {
            name: "mover".into(),
            ..Default::default()
        },
        ..ConsumerOptions::default()
    };
    let mover = Consumer::connect_any(&addrs, options).await.unwrap();
    let doomed = addrs
        .iter()
        .position(|a| *a == mover.broker_addr())
        .unwrap();
    let others: Vec<usize> = (0..3).filter(|i| *i != doomed).collect();
    let moving = mover.subscribe("ticks").await.unwrap();
    let steady_client = Consumer::connect(&addrs[others[1]]).await.unwrap();
    let steady = steady_client.subscribe("ticks").await.unwrap();
    // The publisher's node holds both consumers' interest.
    wait_subscriptions(nodes[others[0]].as_ref().unwrap(), 2).await;
    let publisher = Publisher::connect(&addrs[others[0]]).await.unwrap();

    const N: u64 = 4000;
    let publishing = tokio::spawn(async move {
        for i in 0..N {
            publisher
                .publish("ticks", i.to_be_bytes().to_vec())
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
    });
    let receive = |mut sub: kaelix_consumer::Subscription| {
        tokio::spawn(async move {
            let mut got: Vec<(u64, Instant)> = Vec::new();
            while got.last().is_none_or(|(k, _)| *k < N - 1) {
                let m = tokio::time::timeout(Duration::from_secs(20), sub.recv())
                    .await
                    .expect("a message within 20 s")
                    .unwrap();
                got.push((seq(&m.payload), Instant::now()));
            }
            got
        })
    };
    let (moving_rx, steady_rx) = (receive(moving), receive(steady));
    tokio::time::sleep(Duration::from_millis(800)).await;
    let killed_at = Instant::now();
    drop(nodes[doomed].take());
    publishing.await.unwrap();

    // The consumer on a node that stayed up: every message, in order, with
    // no stall longer than the failure detection.
    let steady = steady_rx.await.unwrap();
    let numbers: Vec<u64> = steady.iter().map(|(k, _)| *k).collect();
    assert_eq!(numbers, (0..N).collect::<Vec<_>>(), "the steady consumer");
    let stall = steady
        .windows(2)
        .filter(|w| w[1].1 > killed_at)
        .map(|w| w[1].1 - w[0].1)
        .max()
        .unwrap_or_default();
    assert!(stall < Duration::from_secs(3), "stalled {stall:?}");

    // The consumer of the killed node moved and resumed: nothing missing
    // (a few messages around the move may come twice).
    let moved = moving_rx.await.unwrap();
    let mut seen = vec![0u32; N as usize];
    for (k, _) in &moved {
        seen[*k as usize] += 1;
    }
    let missing: Vec<u64> = (0..N).filter(|k| seen[*k as usize] == 0).collect();
    assert!(
        missing.is_empty(),
        "missing after the move: {} of {N}",
        missing.len()
    );
    let resumed = moved
        .iter()
        .find(|(_, at)| *at > killed_at)
        .map(|(_, at)| *at - killed_at)
        .unwrap();
    let twice = seen.iter().filter(|n| **n > 1).count();
    eprintln!("moved consumer: resumed {resumed:?} after the kill; {twice} messages twice; steady stall {stall:?}");
    assert!(resumed < Duration::from_secs(10));
    assert_ne!(mover.broker_addr(), addrs[doomed]);
}

/// `kaelix cluster status --json` of a node.
fn status_json(node: &BrokerProcess) -> Value {
    let (ok, out, err) = kaelix(&["--server", &node.addr(), "cluster", "status", "--json"]);
    assert!(ok, "{err}");
    serde_json::from_str(&out).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_cannot_change_the_cluster_and_heals() {
    use common::proxy::FaultProxy;
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};

    // Node i listens on 127.0.0.i, so its links to the others come from
    // there; the others reach it through proxy i, which can refuse it all
    // traffic, and refuse a node's address.
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new(root.path(), "cluster-ca");
    let ip = |i: u8| IpAddr::V4(Ipv4Addr::new(127, 0, 0, i));
    let mut listens = Vec::new();
    let mut proxies = Vec::new();
    for i in 1..=3u8 {
        let port = std::net::TcpListener::bind((ip(i), 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let listen = SocketAddr::new(ip(i), port);
        proxies.push(FaultProxy::start(listen).await);
        listens.push(listen.to_string());
    }
    let seeds: Vec<String> = proxies.iter().map(|p| p.addr().to_string()).collect();
    let specs: Vec<NodeSpec> = (1..=3u64)
        .map(|id| NodeSpec {
            id,
            dir: root.path().join(format!("node{id}")),
            listen: listens[id as usize - 1].clone(),
            advertise: Some(seeds[id as usize - 1].clone()),
            seeds: seeds.clone(),
            cert: pki.node(&format!("node{id}"), &format!("node{id}")),
            ca: pki.ca_path(),
        })
        .collect();
    let nodes: Vec<BrokerProcess> = specs.iter().map(|s| s.start()).collect();
    for node in &nodes {
        wait_until(
            node,
            "a cluster of three",
            Duration::from_secs(20),
            whole(3),
        );
    }
    let define = |node: &BrokerProcess, topic: &str| {
        kaelix(&[
            "--server",
            &node.addr(),
            "cluster",
            "define-topic",
            topic,
            "--partitions",
            "2",
        ])
    };
    let (ok, out, err) = define(&nodes[0], "orders");
    assert!(ok, "{out}{err}");

    // Node 3 is cut off: nothing reaches it, nothing from it gets through.
    proxies[2].refuse(true);
    proxies[2].cut();
    proxies[0].refuse_from(Some(ip(3)));
    proxies[1].refuse_from(Some(ip(3)));
    let cut_at = Instant::now();
    wait_until(
        &nodes[2],
        "without a majority",
        Duration::from_secs(10),
        |c| c["has_quorum"] == false && c["health"] == "degraded" && c["members_up"] == 1,
    );
    for node in &nodes[..2] {
        wait_until(node, "a majority of two", Duration::from_secs(10), |c| {
            c["has_quorum"] == true && c["members_up"] == 2
        });
    }
    eprintln!("partition seen by every side after {:?}", cut_at.elapsed());
    // The cut-off node cannot change the cluster; the majority can.
    let (ok, _, err) = define(&nodes[2], "payments");
    assert!(!ok, "the minority changed the cluster");
    assert!(err.contains("cannot change"), "{err}");
    let (ok, out, err) = define(&nodes[1], "payments");
    assert!(ok, "{out}{err}");
    assert_eq!(status_json(&nodes[0])["topics"], 2);
    assert_eq!(status_json(&nodes[2])["topics"], 1);

    // Reconnected, it rejoins and catches up with what changed meanwhile.
    proxies[2].refuse(false);
    proxies[0].refuse_from(None);
    proxies[1].refuse_from(None);
    for node in &nodes {
        wait_until(node, "whole again", Duration::from_secs(20), whole(3));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while status_json(&nodes[2])["topics"] != 2 {
        assert!(
            Instant::now() < deadline,
            "the healed node did not catch up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (ok, _, err) = kaelix(&["--server", &nodes[2].addr(), "cluster", "remove", "9"]);
    assert!(!ok);
    assert!(err.contains("not a member"), "{err}");
}

#[test]
fn a_stopped_node_is_removed_and_the_others_go_on() {
    let (_root, _specs, mut nodes) = start_cluster(3);
    let mut stopped = nodes[2].take().unwrap();
    stopped.terminate();
    stopped
        .wait_exit(Duration::from_secs(30))
        .expect("node 3 stops");
    let first = nodes[0].as_ref().unwrap();
    let (ok, out, err) = kaelix(&["--server", &first.addr(), "cluster", "remove", "3"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("node 3 removed"), "{out}");
    for node in nodes.iter().flatten() {
        wait_until(node, "a cluster of two", Duration::from_secs(10), whole(2));
    }
    // Two voters left: both must agree, and they do.
    let (ok, out, err) = kaelix(&[
        "--server",
        &nodes[1].as_ref().unwrap().addr(),
        "cluster",
        "define-topic",
        "after",
    ]);
    assert!(ok, "{out}{err}");
}

#[test]
fn only_an_admin_changes_the_cluster() {
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new(root.path(), "cluster-ca");
    let mut specs = specs(root.path(), &pki, 1);
    specs[0].seeds.clear();
    let spec = &specs[0];
    std::fs::create_dir_all(&spec.dir).unwrap();
    let users = "\n[[security.auth.users]]\nname = \"app\"\ntoken = \"app-token\"\n\
                 publish.allow = [\">\"]\nsubscribe.allow = [\">\"]\n\n\
                 [[security.auth.users]]\nname = \"ops\"\ntoken = \"ops-token\"\nadmin = true\n";
    let node = BrokerProcess::with_config_in(&spec.dir, &format!("{}{users}", spec.config()));
    wait_until(&node, "founded", Duration::from_secs(20), whole(1));
    let define = |token: &str| {
        kaelix(&[
            "--server",
            &node.addr(),
            "--token",
            token,
            "cluster",
            "define-topic",
            "orders",
        ])
    };
    let (ok, _, err) = define("app-token");
    assert!(!ok);
    assert!(err.contains("may not change the cluster"), "{err}");
    let (ok, out, err) = define("ops-token");
    assert!(ok, "{out}{err}");
    // A request the cluster refuses says why.
    let (ok, _, err) = kaelix(&[
        "--server",
        &node.addr(),
        "--token",
        "ops-token",
        "cluster",
        "remove",
        "1",
    ]);
    assert!(!ok);
    assert!(err.contains("only voter"), "{err}");
}

#[test]
fn a_topic_defined_on_one_node_takes_effect_on_the_others() {
    let (_root, _specs, nodes) = start_cluster(2);
    let nodes: Vec<BrokerProcess> = nodes.into_iter().flatten().collect();
    let publish = |node: &BrokerProcess, partition: &str| {
        kaelix(&[
            "--server",
            &node.addr(),
            "pub",
            "ledger",
            "entry",
            "--partition",
            partition,
        ])
    };
    // One partition by default: partition 3 does not exist yet.
    let (ok, _, err) = publish(&nodes[1], "3");
    assert!(!ok);
    assert!(err.contains("partition"), "{err}");
    let (ok, out, err) = kaelix(&[
        "--server",
        &nodes[0].addr(),
        "cluster",
        "define-topic",
        "ledger",
        "--partitions",
        "4",
    ]);
    assert!(ok, "{out}{err}");
    // Node 2 applies the definition: four partitions there too.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (ok, _, err) = publish(&nodes[1], "3");
        if ok {
            break;
        }
        assert!(Instant::now() < deadline, "not applied on node 2: {err}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (ok, _, err) = publish(&nodes[1], "4");
    assert!(!ok, "a fifth partition");
    assert!(err.contains("partition"), "{err}");
    // The Raft leader gives each partition a leader, two per node.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = status_json(&nodes[1]);
        let leaders = status["partition_leaders"].as_array().unwrap().clone();
        if leaders.len() == 4 {
            let on = |n: u64| leaders.iter().filter(|l| l["node"] == n).count();
            assert_eq!((on(1), on(2)), (2, 2), "{status}");
            break;
        }
        assert!(Instant::now() < deadline, "partition leaders: {status}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (ok, out, _) = kaelix(&["--server", &nodes[0].addr(), "cluster", "status"]);
    assert!(ok && out.contains("ledger/3 → "), "{out}");
}
