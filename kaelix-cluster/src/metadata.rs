//! What the cluster agrees on through Raft: topic definitions and which
//! node leads each partition. Members (with their addresses) are Raft's own
//! membership, kept beside this in the state machine.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A node's id in the cluster (`cluster.node_id`).
pub type NodeId = u64;

/// What the cluster knows of one member: where the other nodes reach it
/// and where its clients do.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// `cluster.advertise`: the node-to-node address.
    pub cluster_addr: String,
    /// The address its clients connect to (`network.host:port` as others
    /// can reach it).
    pub client_addr: String,
}

/// A topic as the cluster defines it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicDef {
    pub partitions: u32,
    /// Messages kept per partition; `None` for the broker's default.
    pub retention_messages: Option<u64>,
    /// Bytes kept per partition; `None` for the broker's default.
    pub retention_bytes: Option<u64>,
    /// How long a message is kept, in milliseconds; `None` for no limit.
    pub retention_age_ms: Option<u64>,
}

/// A change to the metadata, proposed to the Raft leader and applied by
/// every node in the same order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Creates `topic`, or changes its definition. Its partition count can
    /// grow, never shrink (offsets of a dropped partition would be reused).
    DefineTopic { topic: String, def: TopicDef },
    /// Deletes `topic` and its partition leaders.
    DeleteTopic { topic: String },
    /// Makes `leader` the leader of `partition` of `topic`.
    SetPartitionLeader {
        topic: String,
        partition: u32,
        leader: NodeId,
    },
}

/// What applying a [`Command`] gave.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// Applied.
    #[default]
    Done,
    /// Not applied, and why (the same on every node).
    Refused(String),
}

/// The replicated metadata, apart from membership.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    pub topics: BTreeMap<String, TopicDef>,
    /// `(topic, partition)` → its leader.
    pub leaders: BTreeMap<(String, u32), NodeId>,
}

impl Metadata {
    /// Applies `command`; a refused one changes nothing.
    pub fn apply(&mut self, command: &Command) -> Reply {
        match command {
            Command::DefineTopic { topic, def } => {
                if def.partitions == 0 {
                    return Reply::Refused(format!("topic {topic}: partitions must be at least 1"));
                }
                if let Some(old) = self.topics.get(topic) {
                    if def.partitions < old.partitions {
                        return Reply::Refused(format!(
                            "topic {topic}: partitions can grow, not shrink ({} → {})",
                            old.partitions, def.partitions
                        ));
                    }
                }
                self.topics.insert(topic.clone(), def.clone());
                Reply::Done
            }
            Command::DeleteTopic { topic } => {
                if self.topics.remove(topic).is_none() {
                    return Reply::Refused(format!("topic {topic} is not defined"));
                }
                self.leaders.retain(|(t, _), _| t != topic);
                Reply::Done
            }
            Command::SetPartitionLeader {
                topic,
                partition,
                leader,
            } => {
                let Some(def) = self.topics.get(topic) else {
                    return Reply::Refused(format!("topic {topic} is not defined"));
                };
                if *partition >= def.partitions {
                    return Reply::Refused(format!(
                        "topic {topic} has {} partitions; there is no partition {partition}",
                        def.partitions
                    ));
                }
                self.leaders.insert((topic.clone(), *partition), *leader);
                Reply::Done
            }
        }
    }

    /// The changes that give every partition a leader among `voters`: a
    /// partition without one, or led by a node that is no longer a voter,
    /// goes to the voter leading fewest partitions (the lowest id among
    /// equals), so that leadership spreads evenly. Empty when every
    /// partition is led.
    pub fn leader_assignments(&self, voters: &[NodeId]) -> Vec<Command> {
        if voters.is_empty() {
            return Vec::new();
        }
        let mut load: BTreeMap<NodeId, usize> = voters.iter().map(|v| (*v, 0)).collect();
        for leader in self.leaders.values() {
            if let Some(n) = load.get_mut(leader) {
                *n += 1;
            }
        }
        let mut changes = Vec::new();
        for (topic, def) in &self.topics {
            for partition in 0..def.partitions {
                let led = self
                    .leaders
                    .get(&(topic.clone(), partition))
                    .is_some_and(|l| load.contains_key(l));
                if led {
                    continue;
                }
                let Some((&leader, _)) = load.iter().min_by_key(|(id, n)| (**n, **id)) else {
                    break;
                };
                *load.entry(leader).or_default() += 1;
                changes.push(Command::SetPartitionLeader {
                    topic: topic.clone(),
                    partition,
                    leader,
                });
            }
        }
        changes
    }

    /// The leader of `partition` of `topic`, if one is set.
    pub fn leader_of(&self, topic: &str, partition: u32) -> Option<NodeId> {
        self.leaders.get(&(topic.to_owned(), partition)).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(partitions: u32) -> TopicDef {
        TopicDef {
            partitions,
            retention_messages: None,
            retention_bytes: None,
            retention_age_ms: None,
        }
    }

    #[test]
    fn topics_grow_but_never_shrink_and_leaders_need_a_partition() {
        let mut m = Metadata::default();
        let define = |p| Command::DefineTopic {
            topic: "orders".into(),
            def: def(p),
        };
        assert_eq!(m.apply(&define(3)), Reply::Done);
        assert_eq!(m.apply(&define(4)), Reply::Done);
        assert!(matches!(m.apply(&define(2)), Reply::Refused(r) if r.contains("not shrink")));
        assert!(matches!(m.apply(&define(0)), Reply::Refused(_)));
        assert_eq!(m.topics["orders"].partitions, 4);

        let lead = |partition, leader| Command::SetPartitionLeader {
            topic: "orders".into(),
            partition,
            leader,
        };
        assert_eq!(m.apply(&lead(3, 2)), Reply::Done);
        assert!(matches!(m.apply(&lead(4, 2)), Reply::Refused(r) if r.contains("no partition 4")));
        assert_eq!(m.leader_of("orders", 3), Some(2));

        assert_eq!(
            m.apply(&Command::DeleteTopic {
                topic: "orders".into()
            }),
            Reply::Done
        );
        assert_eq!(m.leader_of("orders", 3), None);
        assert!(matches!(
            m.apply(&Command::SetPartitionLeader {
                topic: "orders".into(),
                partition: 0,
                leader: 1
            }),
            Reply::Refused(_)
        ));
    }

    #[test]
    fn partitions_get_leaders_spread_over_the_voters() {
        let mut m = Metadata::default();
        let define = |topic: &str, partitions| Command::DefineTopic {
            topic: topic.into(),
            def: TopicDef {
                partitions,
                retention_messages: None,
                retention_bytes: None,
                retention_age_ms: None,
            },
        };
        assert_eq!(m.apply(&define("orders", 4)), Reply::Done);
        assert_eq!(m.apply(&define("audit", 1)), Reply::Done);
        let changes = m.leader_assignments(&[1, 2, 3]);
        assert_eq!(changes.len(), 5);
        for change in &changes {
            assert_eq!(m.apply(change), Reply::Done);
        }
        let mut load = BTreeMap::new();
        for leader in m.leaders.values() {
            *load.entry(*leader).or_insert(0) += 1;
        }
        assert_eq!(load, BTreeMap::from([(1, 2), (2, 2), (3, 1)]));
        assert!(m.leader_assignments(&[1, 2, 3]).is_empty());
        // Node 1 leaves: only its partitions move, to the least loaded.
        let changes = m.leader_assignments(&[2, 3]);
        assert_eq!(changes.len(), 2);
        for change in &changes {
            assert!(matches!(change, Command::SetPartitionLeader { leader, .. } if *leader != 1));
            m.apply(change);
        }
        assert!(m.leaders.values().all(|l| *l != 1));
        assert!(m.leader_assignments(&[]).is_empty());
    }
}
