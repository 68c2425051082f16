//! The Raft storage against openraft's own storage suite, and across a
//! restart from its data directory.

use std::collections::BTreeMap;

use kaelix_cluster::store::{self, LogStore, StateMachine, TypeConfig};
use kaelix_cluster::{Command, Member, NodeId, Reply, TopicDef};
use openraft::storage::{RaftLogStorage, RaftStateMachine};
use openraft::testing::{log_id, StoreBuilder, Suite};
use openraft::{Entry, EntryPayload, Membership, RaftSnapshotBuilder, StorageError, Vote};

struct OnDisk;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for OnDisk {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<NodeId>> {
        let dir = tempfile::tempdir().expect("temp dir");
        let (log, sm) = store::open(dir.path()).expect("storage opens");
        Ok((dir, log, sm))
    }
}

#[test]
fn passes_openraft_storage_suite() {
    Suite::test_all(OnDisk).expect("storage suite");
}

fn normal(term: u64, index: u64, command: Command) -> Entry<TypeConfig> {
    Entry {
        log_id: log_id(term, 1, index),
        payload: EntryPayload::Normal(command),
    }
}

fn orders(partitions: u32) -> Command {
    Command::DefineTopic {
        topic: "orders".into(),
        def: TopicDef {
            partitions,
            retention_messages: Some(1000),
            retention_bytes: None,
            retention_age_ms: None,
        },
    }
}

#[tokio::test]
async fn a_reopened_store_has_its_vote_log_and_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let members: BTreeMap<NodeId, Member> = (1..=3)
        .map(|id| {
            let member = Member {
                cluster_addr: format!("127.0.0.1:{}", 7000 + id),
                client_addr: format!("127.0.0.1:{}", 6000 + id),
            };
            (id, member)
        })
        .collect();
    let voters = members.keys().copied().collect();
    {
        let (mut log, mut sm) = store::open(dir.path()).unwrap();
        log.save_vote(&Vote::new_committed(2, 1)).await.unwrap();
        let entries = vec![
            Entry {
                log_id: log_id(2, 1, 1),
                payload: EntryPayload::Membership(Membership::new(vec![voters], None)),
            },
            normal(2, 2, orders(3)),
            normal(
                2,
                3,
                Command::SetPartitionLeader {
                    topic: "orders".into(),
                    partition: 2,
                    leader: 3,
                },
            ),
        ];
        // `append` reports through a callback made by Raft; the blocking
        // form used by openraft's own tests does the same write.
        openraft::storage::RaftLogStorageExt::blocking_append(&mut log, entries.clone())
            .await
            .unwrap();
        log.save_committed(Some(log_id(2, 1, 3))).await.unwrap();
        let replies = sm.apply(entries[..2].to_vec()).await.unwrap();
        assert_eq!(replies, vec![Reply::Done, Reply::Done]);
        // A snapshot after entry 2; entry 3 is applied after it.
        sm.get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        sm.apply(entries[2..].to_vec()).await.unwrap();
        assert_eq!(sm.metadata().leader_of("orders", 2), Some(3));
    }
    let (mut log, mut sm) = store::open(dir.path()).unwrap();
    assert_eq!(
        log.read_vote().await.unwrap(),
        Some(Vote::new_committed(2, 1))
    );
    assert_eq!(log.read_committed().await.unwrap(), Some(log_id(2, 1, 3)));
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_log_id, Some(log_id(2, 1, 3)));
    // The state machine restarts from its snapshot: entry 3 is applied
    // again by Raft from the log, not remembered.
    let (applied, membership) = sm.applied_state().await.unwrap();
    assert_eq!(applied, Some(log_id(2, 1, 2)));
    assert_eq!(membership.membership().voter_ids().count(), 3);
    assert_eq!(sm.metadata().topics["orders"].partitions, 3);
    assert_eq!(sm.metadata().leader_of("orders", 2), None);

    log.purge(log_id(2, 1, 2)).await.unwrap();
    drop((log, sm));
    let (mut log, _sm) = store::open(dir.path()).unwrap();
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(log_id(2, 1, 2)));
    assert_eq!(state.last_log_id, Some(log_id(2, 1, 3)));
    let kept = openraft::RaftLogReader::try_get_log_entries(&mut log, 0..10)
        .await
        .unwrap();
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].log_id, log_id(2, 1, 3));
}
