//! The Raft log and the metadata state machine, kept under
//! `cluster.data_dir` so that a restarted node catches up from where it
//! was rather than from nothing.
//!
//! Both live in one [redb] database (`raft.redb`): the log entries by index,
//! the vote, the committed and last purged log ids, and the latest snapshot
//! of the state machine. Every write commits durably (fsync) before Raft is
//! told it happened. The state machine itself is in memory: at start it is
//! the latest snapshot, and Raft applies the committed entries after it
//! again.
//!
//! Metadata changes are rare (members, topic definitions, partition
//! leaders), so the storage does its I/O inline rather than on a pool.

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership, Vote,
};
use parking_lot::Mutex;
use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::metadata::{Command, Member, Metadata, NodeId, Reply};

openraft::declare_raft_types!(
    /// Kaelix's Raft types: metadata commands, node ids, members.
    pub TypeConfig:
        D = Command,
        R = Reply,
        NodeId = NodeId,
        Node = Member,
        Entry = Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
);

type StoreResult<T> = Result<T, StorageError<NodeId>>;

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const PURGED: &str = "last_purged";
const SNAPSHOT: &str = "snapshot";

/// The file the log and snapshots are kept in, under `cluster.data_dir`.
pub const DB_FILE: &str = "raft.redb";

/// Opens (or creates) the storage under `data_dir`.
pub fn open(data_dir: &Path) -> Result<(LogStore, StateMachine), StoreError> {
    std::fs::create_dir_all(data_dir).map_err(|source| StoreError::Dir {
        path: data_dir.to_owned(),
        source,
    })?;
    let path = data_dir.join(DB_FILE);
    let db = Database::create(&path).map_err(|e| StoreError::Open {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let db = Arc::new(db);
    // Both tables exist from the start, so that readers never meet a
    // missing one.
    let init = || -> std::io::Result<()> {
        let tx = db.begin_write().map_err(ioe)?;
        tx.open_table(LOG).map_err(ioe)?;
        tx.open_table(META).map_err(ioe)?;
        tx.commit().map_err(ioe)
    };
    init().map_err(|e| StoreError::Open {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let log = LogStore { db: db.clone() };
    let sm = StateMachine::load(db).map_err(|e| StoreError::Open {
        path,
        reason: e.to_string(),
    })?;
    Ok((log, sm))
}

/// Why the storage could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cluster.data_dir {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cluster storage {path}: {reason}")]
    Open { path: PathBuf, reason: String },
}

/// Storage failures as I/O errors, to be told to Raft with what was being
/// done ([`StorageIOError`]'s subject and verb).
fn ioe(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

fn err(
    make: fn(&std::io::Error) -> StorageIOError<NodeId>,
) -> impl Fn(std::io::Error) -> StorageError<NodeId> {
    move |e| StorageError::IO { source: make(&e) }
}

fn read_logs(e: &std::io::Error) -> StorageIOError<NodeId> {
    StorageIOError::read_logs(e)
}

fn write_logs(e: &std::io::Error) -> StorageIOError<NodeId> {
    StorageIOError::write_logs(e)
}

fn read_meta<T: for<'de> Deserialize<'de>>(db: &Database, key: &str) -> std::io::Result<Option<T>> {
    let tx = db.begin_read().map_err(ioe)?;
    let table = tx.open_table(META).map_err(ioe)?;
    let Some(raw) = table.get(key).map_err(ioe)? else {
        return Ok(None);
    };
    serde_json::from_slice(raw.value()).map(Some).map_err(ioe)
}

fn write_meta<T: Serialize>(db: &Database, key: &str, value: &T) -> std::io::Result<()> {
    let raw = serde_json::to_vec(value).map_err(ioe)?;
    let tx = db.begin_write().map_err(ioe)?;
    {
        let mut table = tx.open_table(META).map_err(ioe)?;
        table.insert(key, raw.as_slice()).map_err(ioe)?;
    }
    tx.commit().map_err(ioe)
}

/// The Raft log: entries by index, the vote and the log ids Raft asks to
/// keep.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

impl LogStore {
    fn entries<RB: RangeBounds<u64>>(&self, range: RB) -> std::io::Result<Vec<Entry<TypeConfig>>> {
        let tx = self.db.begin_read().map_err(ioe)?;
        let table = tx.open_table(LOG).map_err(ioe)?;
        let range = (range.start_bound().cloned(), range.end_bound().cloned());
        let mut out = Vec::new();
        for item in table.range::<u64>(range).map_err(ioe)? {
            let (_, raw) = item.map_err(ioe)?;
            out.push(serde_json::from_slice(raw.value()).map_err(ioe)?);
        }
        Ok(out)
    }

    fn last_entry(&self) -> std::io::Result<Option<Entry<TypeConfig>>> {
        let tx = self.db.begin_read().map_err(ioe)?;
        let table = tx.open_table(LOG).map_err(ioe)?;
        let Some((_, raw)) = table.last().map_err(ioe)? else {
            return Ok(None);
        };
        serde_json::from_slice(raw.value()).map(Some).map_err(ioe)
    }

    fn insert(&self, entries: impl IntoIterator<Item = Entry<TypeConfig>>) -> std::io::Result<()> {
        let tx = self.db.begin_write().map_err(ioe)?;
        {
            let mut table = tx.open_table(LOG).map_err(ioe)?;
            for entry in entries {
                let raw = serde_json::to_vec(&entry).map_err(ioe)?;
                table
                    .insert(entry.log_id.index, raw.as_slice())
                    .map_err(ioe)?;
            }
        }
        // Durable once committed.
        tx.commit().map_err(ioe)
    }

    /// Removes the entries in `range`, and records `then` (if any) in the
    /// same transaction.
    fn remove(
        &self,
        range: (Bound<u64>, Bound<u64>),
        then: Option<(&str, Vec<u8>)>,
    ) -> std::io::Result<()> {
        let tx = self.db.begin_write().map_err(ioe)?;
        {
            let mut table = tx.open_table(LOG).map_err(ioe)?;
            table
                .retain_in::<u64, _>(range, |_, _| false)
                .map_err(ioe)?;
            if let Some((key, value)) = then {
                let mut meta = tx.open_table(META).map_err(ioe)?;
                meta.insert(key, value.as_slice()).map_err(ioe)?;
            }
        }
        tx.commit().map_err(ioe)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> StoreResult<Vec<Entry<TypeConfig>>> {
        self.entries(range).map_err(err(read_logs))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> StoreResult<LogState<TypeConfig>> {
        let last_purged_log_id: Option<LogId<NodeId>> =
            read_meta(&self.db, PURGED).map_err(err(read_logs))?;
        let last_log_id = match self.last_entry().map_err(err(read_logs))? {
            Some(entry) => Some(entry.log_id),
            None => last_purged_log_id,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StoreResult<()> {
        write_meta(&self.db, VOTE, vote).map_err(err(|e| StorageIOError::write_vote(e)))
    }

    async fn read_vote(&mut self) -> StoreResult<Option<Vote<NodeId>>> {
        read_meta(&self.db, VOTE).map_err(err(|e| StorageIOError::read_vote(e)))
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StoreResult<()> {
        write_meta(&self.db, COMMITTED, &committed).map_err(err(write_logs))
    }

    async fn read_committed(&mut self) -> StoreResult<Option<LogId<NodeId>>> {
        let committed = read_meta::<Option<LogId<NodeId>>>(&self.db, COMMITTED);
        Ok(committed.map_err(err(read_logs))?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StoreResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        // Raft is told only once the entries are durable.
        match self.insert(entries) {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                let error = err(write_logs)(ioe(&e));
                callback.log_io_completed(Err(e));
                Err(error)
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StoreResult<()> {
        self.remove((Bound::Included(log_id.index), Bound::Unbounded), None)
            .map_err(err(write_logs))
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StoreResult<()> {
        let purged = serde_json::to_vec(&Some(log_id))
            .map_err(ioe)
            .map_err(err(write_logs))?;
        self.remove(
            (Bound::Unbounded, Bound::Included(log_id.index)),
            Some((PURGED, purged)),
        )
        .map_err(err(write_logs))
    }
}

/// A snapshot as stored: its meta and the state it holds.
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, Member>,
    data: Vec<u8>,
}

/// What a snapshot holds.
#[derive(Serialize, Deserialize)]
struct SnapshotState {
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, Member>,
    metadata: Metadata,
}

/// The applied state: the metadata, the membership, and how far the log
/// has been applied.
#[derive(Default)]
struct Applied {
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, Member>,
    metadata: Metadata,
}

/// The metadata state machine. Cloning shares it: the node reads the
/// metadata through a clone while Raft applies to it.
#[derive(Clone)]
pub struct StateMachine {
    db: Arc<Database>,
    applied: Arc<Mutex<Applied>>,
    /// Snapshots built since start, for their ids.
    built: Arc<std::sync::atomic::AtomicU64>,
}

impl StateMachine {
    /// The state of the latest stored snapshot, or nothing.
    fn load(db: Arc<Database>) -> std::io::Result<StateMachine> {
        let mut applied = Applied::default();
        if let Some(stored) = read_meta::<StoredSnapshot>(&db, SNAPSHOT)? {
            let state: SnapshotState = serde_json::from_slice(&stored.data).map_err(ioe)?;
            applied = Applied {
                last_applied: state.last_applied,
                membership: state.membership,
                metadata: state.metadata,
            };
        }
        Ok(StateMachine {
            db,
            applied: Arc::new(Mutex::new(applied)),
            built: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        })
    }

    /// A copy of the metadata as applied so far.
    pub fn metadata(&self) -> Metadata {
        self.applied.lock().metadata.clone()
    }

    /// The membership as applied so far.
    pub fn membership(&self) -> StoredMembership<NodeId, Member> {
        self.applied.lock().membership.clone()
    }

    fn stored_snapshot(&self) -> std::io::Result<Option<StoredSnapshot>> {
        read_meta(&self.db, SNAPSHOT)
    }

    fn save_snapshot(&self, stored: &StoredSnapshot) -> std::io::Result<()> {
        write_meta(&self.db, SNAPSHOT, stored)
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> StoreResult<Snapshot<TypeConfig>> {
        let (state, last_applied, membership) = {
            let applied = self.applied.lock();
            let state = SnapshotState {
                last_applied: applied.last_applied,
                membership: applied.membership.clone(),
                metadata: applied.metadata.clone(),
            };
            (state, applied.last_applied, applied.membership.clone())
        };
        let data = serde_json::to_vec(&state).map_err(|e| StorageError::IO {
            source: StorageIOError::write_snapshot(None, &e),
        })?;
        let n = self
            .built
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let snapshot_id = match last_applied {
            Some(id) => format!("{}-{}-{n}", id.leader_id, id.index),
            None => format!("--{n}"),
        };
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership: membership,
            snapshot_id,
        };
        let stored = StoredSnapshot { meta, data };
        self.save_snapshot(&stored).map_err(|e| StorageError::IO {
            source: StorageIOError::write_snapshot(Some(stored.meta.signature()), &e),
        })?;
        Ok(Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(
        &mut self,
    ) -> StoreResult<(Option<LogId<NodeId>>, StoredMembership<NodeId, Member>)> {
        let applied = self.applied.lock();
        Ok((applied.last_applied, applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StoreResult<Vec<Reply>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut applied = self.applied.lock();
        let mut replies = Vec::new();
        for entry in entries {
            applied.last_applied = Some(entry.log_id);
            let reply = match entry.payload {
                EntryPayload::Blank => Reply::Done,
                EntryPayload::Normal(command) => applied.metadata.apply(&command),
                EntryPayload::Membership(membership) => {
                    applied.membership = StoredMembership::new(Some(entry.log_id), membership);
                    Reply::Done
                }
            };
            replies.push(reply);
        }
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StoreResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Member>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StoreResult<()> {
        let data = snapshot.into_inner();
        let state: SnapshotState = serde_json::from_slice(&data).map_err(|e| StorageError::IO {
            source: StorageIOError::read_snapshot(Some(meta.signature()), &e),
        })?;
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        self.save_snapshot(&stored).map_err(|e| StorageError::IO {
            source: StorageIOError::write_snapshot(Some(meta.signature()), &e),
        })?;
        *self.applied.lock() = Applied {
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
            metadata: state.metadata,
        };
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StoreResult<Option<Snapshot<TypeConfig>>> {
        let stored = self
            .stored_snapshot()
            .map_err(err(|e| StorageIOError::read_snapshot(None, e)))?;
        Ok(stored.map(|stored| Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        }))
    }
}
