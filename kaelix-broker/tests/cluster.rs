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
    seeds: Vec<String>,
    cert: Issued,
    ca: PathBuf,
}

impl NodeSpec {
    fn config(&self) -> String {
        let seeds: Vec<String> = self.seeds.iter().map(|s| format!("{s:?}")).collect();
        format!(
            "[telemetry.logging]\nlevel = \"info\"\n\n\
             [cluster]\nenabled = true\nnode_id = {}\nlisten = {:?}\nseeds = [{}]\n\
             data_dir = {:?}\nheartbeat_ms = 100\nfailure_timeout_ms = 600\n\n\
             [cluster.tls]\nenabled = true\ncert_path = {:?}\nkey_path = {:?}\nca_path = {:?}\n",
            self.id,
            self.listen,
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
            seeds: addrs.clone(),
            cert: pki.node(&format!("node{id}"), &format!("node{id}")),
            ca: pki.ca_path(),
        })
        .collect()
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
