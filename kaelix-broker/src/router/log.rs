//! Topic logs: the offsets of each topic partition and the recent messages
//! it keeps in memory for replay.
//!
//! A publisher holds a partition's log lock for a whole run of publishes to
//! that partition within one read batch: it assigns their offsets, keeps
//! copies, and hands the deliveries to the subscribers' buffers before
//! letting go. So every subscriber sees a partition's messages in offset
//! order, and a subscriber that replays (which takes the same lock) gets
//! exactly what was published before it, then everything after, with no
//! gap or duplicate.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use foldhash::HashMap;
use kaelix_core::{MemoryStreamerConfig, SlowConsumerPolicy, Timestamp, Topic, TopicPattern};
use parking_lot::{Mutex, RwLock, RwLockWriteGuard};

/// How much one topic keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Retention {
    pub(crate) messages: usize,
    pub(crate) bytes: usize,
    pub(crate) age: Option<Duration>,
}

impl Retention {
    fn of(config: &MemoryStreamerConfig, topic: &Topic) -> Retention {
        if !config.retention.enabled {
            return Retention {
                messages: 0,
                bytes: 0,
                age: None,
            };
        }
        let settings = config.topic_settings(topic);
        Retention {
            messages: settings.retain_messages,
            bytes: settings.retain_bytes,
            age: (settings.retain_age_secs > 0)
                .then(|| Duration::from_secs(settings.retain_age_secs)),
        }
    }

    fn keeps_anything(&self) -> bool {
        self.messages > 0 && self.bytes > 0
    }
}

/// One kept message: where its wire body lies in the topic's chunks.
#[derive(Debug, Clone, Copy)]
struct Entry {
    offset: u64,
    timestamp: Timestamp,
    flags: u8,
    /// Sequence number of the chunk holding the body.
    chunk: u64,
    start: u32,
    len: u32,
}

/// Most bytes in one chunk (so entries can point into it with `u32`s; a
/// run from the network is far smaller, a large in-process batch is split).
const CHUNK_MAX: usize = 64 * 1024 * 1024;

/// Most room reserved ahead for a run's copies: one network read batch
/// (`network.read_buffer_bytes` by default). Consecutive runs share an
/// allocation until it is full, so what a topic can hold unused is about
/// one run's worth.
const RUN_RESERVE_MAX: usize = 64 * 1024;

/// A kept message handed out for replay.
#[derive(Debug, Clone)]
pub(crate) struct Kept {
    pub(crate) offset: u64,
    pub(crate) timestamp: Timestamp,
    pub(crate) flags: u8,
    pub(crate) body: Bytes,
}

/// A topic's logs, one per partition.
pub(crate) struct TopicLog {
    pub(crate) topic: Topic,
    pub(crate) parts: Box<[Arc<Mutex<LogState>>]>,
}

impl TopicLog {
    /// The topic's partitions.
    pub(crate) fn partitions(&self) -> u32 {
        self.parts.len() as u32
    }
}

/// What a partition's log lock guards.
///
/// The bodies of one run are copied into one buffer (a chunk) and the
/// kept messages point into it, so keeping a message costs a copy and an
/// entry, with no allocation or reference count of its own; a chunk goes
/// when its last message does.
pub(crate) struct LogState {
    /// The offset the next message gets.
    pub(crate) next: u64,
    kept: VecDeque<Entry>,
    /// `(sequence number, bodies)`, oldest first.
    chunks: VecDeque<(u64, Bytes)>,
    /// The sequence number the chunk being filled will get.
    next_chunk: u64,
    /// Bodies copied during the current run.
    filling: BytesMut,
    /// Body bytes in `kept`.
    bytes: usize,
    /// Bytes added in the current run, not yet counted in the budget.
    run_bytes: usize,
    /// Bytes the last run copied: the room a new run's copies get at once
    /// (up to [`RUN_RESERVE_MAX`]). A run that outgrows its room continues
    /// in a new chunk; nothing copied is copied again.
    last_run: usize,
    retention: Retention,
    /// What happens to this topic's subscribers that fall behind, unless a
    /// subscription chose for itself.
    pub(crate) slow_consumer: SlowConsumerPolicy,
    /// The broker-wide count of kept bytes, against `retention.max_bytes`.
    budget: Arc<Budget>,
}

/// Kept bytes across all topics.
pub(crate) struct Budget {
    used: AtomicUsize,
    max: AtomicUsize,
}

impl LogState {
    fn new(
        retention: Retention,
        slow_consumer: SlowConsumerPolicy,
        budget: Arc<Budget>,
    ) -> LogState {
        LogState {
            slow_consumer,
            next: 0,
            kept: VecDeque::new(),
            chunks: VecDeque::new(),
            next_chunk: 0,
            filling: BytesMut::new(),
            bytes: 0,
            run_bytes: 0,
            last_run: 0,
            retention,
            budget,
        }
    }

    /// Gives the next offset to a message and, if the topic keeps messages,
    /// copies its body.
    pub(crate) fn append(&mut self, timestamp: Timestamp, flags: u8, body: &[u8]) -> u64 {
        let offset = self.next;
        self.next += 1;
        if self.retention.keeps_anything() && body.len() <= self.retention.bytes.min(CHUNK_MAX) {
            // Full: what the run copied so far becomes a chunk, rather than
            // being copied again into a larger buffer.
            if self.filling.len() + body.len() > CHUNK_MAX
                || self.filling.capacity() - self.filling.len() < body.len()
            {
                self.seal();
            }
            if self.filling.is_empty() {
                // As much room as the last run took, or as much again as
                // this one has taken so far.
                let want = self.last_run.max(self.run_bytes);
                self.filling
                    .reserve(want.min(RUN_RESERVE_MAX).max(body.len()));
            }
            let start = self.filling.len();
            self.filling.extend_from_slice(body);
            self.kept.push_back(Entry {
                offset,
                timestamp,
                flags,
                chunk: self.next_chunk,
                start: start as u32,
                len: body.len() as u32,
            });
            self.bytes += body.len();
            self.run_bytes += body.len();
        }
        offset
    }

    /// Ends a run: its copies become a chunk, and the oldest messages go as
    /// this topic's limits and the broker's budget require. The budget is
    /// touched once or twice per run, not per message.
    pub(crate) fn end_run(&mut self) {
        self.seal();
        let added = std::mem::take(&mut self.run_bytes);
        self.last_run = added;
        // Over the count: those go in one sweep.
        let mut freed = self.drop_first(self.kept.len().saturating_sub(self.retention.messages));
        while self.bytes > self.retention.bytes {
            freed += self.pop_oldest();
        }
        if added > 0 {
            let max = self.budget.max.load(Ordering::Relaxed);
            let used = self.budget.used.fetch_add(added, Ordering::AcqRel) + added;
            // Over the broker's cap: this topic gives back its oldest, down
            // to its newest messages if it must (delivered, not kept).
            let mut over = used.saturating_sub(max + freed);
            while over > 0 && !self.kept.is_empty() {
                let len = self.pop_oldest();
                freed += len;
                over = over.saturating_sub(len);
            }
        }
        if freed > 0 {
            self.budget.give(freed);
        }
        self.expire(Timestamp::now());
    }

    /// Turns the copies gathered so far into a chunk.
    fn seal(&mut self) {
        if !self.filling.is_empty() {
            let chunk = self.filling.split().freeze();
            self.chunks.push_back((self.next_chunk, chunk));
            self.next_chunk += 1;
        }
    }

    /// Drops the `n` oldest kept messages, and the chunks they emptied;
    /// returns their bytes.
    fn drop_first(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        let freed: usize = self.kept.drain(..n).map(|e| e.len as usize).sum();
        self.bytes -= freed;
        self.drop_empty_chunks();
        freed
    }

    fn drop_empty_chunks(&mut self) {
        let live = self.kept.front().map_or(u64::MAX, |e| e.chunk);
        while self.chunks.front().is_some_and(|(seq, _)| *seq < live) {
            self.chunks.pop_front();
        }
    }

    /// Drops the oldest kept message and, with its last message, its
    /// chunk; returns its bytes (for the caller to give back).
    fn pop_oldest(&mut self) -> usize {
        let Some(old) = self.kept.pop_front() else {
            return 0;
        };
        self.bytes -= old.len as usize;
        self.drop_empty_chunks();
        old.len as usize
    }

    /// Drops what is older than the age limit.
    pub(crate) fn expire(&mut self, now: Timestamp) {
        let Some(age) = self.retention.age else {
            return;
        };
        let limit = now.as_nanos().saturating_sub(age.as_nanos() as u64);
        let mut freed = 0;
        while self
            .kept
            .front()
            .is_some_and(|k| k.timestamp.as_nanos() < limit)
        {
            freed += self.pop_oldest();
        }
        self.budget.give(freed);
    }

    /// Drops the oldest until at most `bytes` are kept.
    pub(crate) fn trim_to(&mut self, bytes: usize) {
        let mut freed = 0;
        while self.bytes > bytes {
            freed += self.pop_oldest();
        }
        self.budget.give(freed);
    }

    /// What is kept from `start` on, and how many asked-for messages are
    /// gone. Called between runs (under the log lock), never during one.
    pub(crate) fn since(&mut self, start: kaelix_core::StartPosition) -> (Vec<Kept>, u64) {
        let (from, missed) = self.position(start);
        let kept = &self.kept;
        let at = kept.partition_point(|k| k.offset < from);
        let base = self.chunks.front().map_or(0, |(seq, _)| *seq);
        let out = kept
            .range(at..)
            .map(|e| {
                let chunk = &self.chunks[(e.chunk - base) as usize].1;
                Kept {
                    offset: e.offset,
                    timestamp: e.timestamp,
                    flags: e.flags,
                    body: chunk.slice(e.start as usize..(e.start + e.len) as usize),
                }
            })
            .collect();
        (out, missed)
    }

    /// Where `start` is in this log: the first offset to send, and how
    /// many asked-for messages are gone.
    pub(crate) fn position(&mut self, start: kaelix_core::StartPosition) -> (u64, u64) {
        self.expire(Timestamp::now());
        let (first, next) = (self.first_kept(), self.next);
        let kept = &self.kept;
        start.resolve(first, next, |t| {
            kept.iter()
                .find(|k| k.timestamp >= t)
                .map_or(next, |k| k.offset)
        })
    }

    /// Calls `f` with each kept message from offset `from` on (offset,
    /// body flags, body), oldest first, until it returns false; returns
    /// the first offset still kept. Called between runs, like
    /// [`since`](Self::since), but copies nothing.
    pub(crate) fn read_from(
        &mut self,
        from: u64,
        mut f: impl FnMut(u64, u8, &[u8]) -> bool,
    ) -> u64 {
        self.expire(Timestamp::now());
        let first = self.first_kept();
        let at = self.kept.partition_point(|k| k.offset < from);
        let base = self.chunks.front().map_or(0, |(seq, _)| *seq);
        for e in self.kept.range(at..) {
            let chunk = &self.chunks[(e.chunk - base) as usize].1;
            if !f(
                e.offset,
                e.flags,
                &chunk[e.start as usize..(e.start + e.len) as usize],
            ) {
                break;
            }
        }
        first
    }

    /// The first offset still kept, or `next` when none is.
    pub(crate) fn first_kept(&self) -> u64 {
        self.kept.front().map_or(self.next, |k| k.offset)
    }

    /// Kept messages and their bytes.
    pub(crate) fn usage(&self) -> (usize, usize) {
        (self.kept.len(), self.bytes)
    }

    /// Whether nothing is kept.
    pub(crate) fn is_empty(&self) -> bool {
        self.kept.is_empty()
    }

    fn set_retention(&mut self, retention: Retention) {
        self.retention = retention;
        let mut freed = 0;
        while !self.kept.is_empty()
            && (self.kept.len() > retention.messages || self.bytes > retention.bytes)
        {
            freed += self.pop_oldest();
        }
        self.budget.give(freed);
        self.expire(Timestamp::now());
    }
}

impl Drop for LogState {
    fn drop(&mut self) {
        self.budget.give(self.bytes);
    }
}

impl Budget {
    fn give(&self, len: usize) {
        if len > 0 {
            self.used.fetch_sub(len, Ordering::AcqRel);
        }
    }
}

/// Every topic's log, created on the first publish to the topic.
pub(crate) struct Logs {
    map: RwLock<HashMap<Topic, Arc<TopicLog>>>,
    budget: Arc<Budget>,
    /// For the retention of new logs.
    config: RwLock<Arc<MemoryStreamerConfig>>,
}

impl Logs {
    pub(crate) fn new(config: &MemoryStreamerConfig) -> Logs {
        Logs {
            map: RwLock::new(HashMap::default()),
            budget: Arc::new(Budget {
                used: AtomicUsize::new(0),
                max: AtomicUsize::new(config.retention.max_bytes),
            }),
            config: RwLock::new(Arc::new(config.clone())),
        }
    }

    /// The log of `topic`, made if it is new.
    pub(crate) fn get_or_create(&self, topic: &Topic) -> Arc<TopicLog> {
        if let Some(log) = self.map.read().get(topic) {
            return log.clone();
        }
        let (retention, settings) = {
            let config = self.config.read();
            (Retention::of(&config, topic), config.topic_settings(topic))
        };
        self.map
            .write()
            .entry(topic.clone())
            .or_insert_with(|| {
                let parts = (0..settings.partitions.max(1))
                    .map(|_| self.new_part(retention, settings.slow_consumer))
                    .collect();
                Arc::new(TopicLog {
                    topic: topic.clone(),
                    parts,
                })
            })
            .clone()
    }

    fn new_part(&self, retention: Retention, policy: SlowConsumerPolicy) -> Arc<Mutex<LogState>> {
        Arc::new(Mutex::new(LogState::new(
            retention,
            policy,
            self.budget.clone(),
        )))
    }

    /// The log of `topic`, if anything was published to it.
    pub(crate) fn get(&self, topic: &Topic) -> Option<Arc<TopicLog>> {
        self.map.read().get(topic).cloned()
    }

    /// The registry, locked against new logs (see `Router::subscribe_from`).
    pub(crate) fn lock_registry(&self) -> RwLockWriteGuard<'_, HashMap<Topic, Arc<TopicLog>>> {
        self.map.write()
    }

    /// The logs of every topic `pattern` matches, from a locked registry.
    pub(crate) fn matching_in(
        map: &HashMap<Topic, Arc<TopicLog>>,
        pattern: &TopicPattern,
    ) -> Vec<Arc<TopicLog>> {
        match pattern.as_topic() {
            Some(topic) => map.get(&topic).cloned().into_iter().collect(),
            None => map
                .values()
                .filter(|log| pattern.matches(&log.topic))
                .cloned()
                .collect(),
        }
    }

    /// Applies new `[retention]` and `[[topics]]` settings to every log.
    /// A topic whose partition count went up gets its new partitions (its
    /// log is replaced, sharing the old partitions); returns whether any
    /// did, so that routes are looked up again. A count that went down is
    /// kept as it is, with a warning.
    pub(crate) fn reconfigure(&self, config: &MemoryStreamerConfig) -> bool {
        self.budget
            .max
            .store(config.retention.max_bytes, Ordering::Relaxed);
        *self.config.write() = Arc::new(config.clone());
        let logs: Vec<Arc<TopicLog>> = self.map.read().values().cloned().collect();
        let mut grown = Vec::new();
        for log in logs {
            let retention = Retention::of(config, &log.topic);
            let settings = config.topic_settings(&log.topic);
            for part in log.parts.iter() {
                let mut state = part.lock();
                state.set_retention(retention);
                state.slow_consumer = settings.slow_consumer;
            }
            let (now, wanted) = (log.partitions(), settings.partitions.max(1));
            if wanted > now {
                let parts = log
                    .parts
                    .iter()
                    .cloned()
                    .chain((now..wanted).map(|_| self.new_part(retention, settings.slow_consumer)))
                    .collect();
                grown.push(Arc::new(TopicLog {
                    topic: log.topic.clone(),
                    parts,
                }));
                tracing::info!(topic = %log.topic, from = now, to = wanted, "topic partitions added");
            } else if wanted < now {
                tracing::warn!(
                    topic = %log.topic, partitions = now, configured = wanted,
                    "a topic's partitions cannot be removed while it lives: keeping them"
                );
            }
        }
        let any = !grown.is_empty();
        if any {
            let mut map = self.map.write();
            for log in grown {
                map.insert(log.topic.clone(), log);
            }
        }
        any
    }

    /// Housekeeping: drops messages past their age limit in every log, then
    /// the logs that keep nothing and that no publisher's route cache
    /// holds (a topic that comes back starts its offsets again).
    pub(crate) fn expire_all(&self) {
        let now = Timestamp::now();
        let logs: Vec<Arc<TopicLog>> = self.map.read().values().cloned().collect();
        let mut parts = 0;
        for log in &logs {
            for part in log.parts.iter() {
                part.lock().expire(now);
                parts += 1;
            }
        }
        // Near the broker's cap, the partitions holding more than an even
        // share give back the excess, so that a topic that started later
        // is not kept from retaining anything by those that filled the
        // budget.
        let max = self.budget.max.load(Ordering::Relaxed);
        if self.budget.used.load(Ordering::Relaxed) > max / 10 * 9 && parts > 0 {
            let share = max / parts / 10 * 9;
            for log in &logs {
                for part in log.parts.iter() {
                    part.lock().trim_to(share);
                }
            }
        }
        drop(logs);
        self.map.write().retain(|_, log| {
            Arc::strong_count(log) > 1
                || log
                    .parts
                    .iter()
                    .any(|part| Arc::strong_count(part) > 1 || !part.lock().is_empty())
        });
    }

    /// Bytes kept across all topics.
    pub(crate) fn kept_bytes(&self) -> usize {
        self.budget.used.load(Ordering::Relaxed)
    }

    /// Topics with a log.
    pub(crate) fn len(&self) -> usize {
        self.map.read().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kaelix_core::StartPosition;

    fn log() -> LogState {
        let budget = Arc::new(Budget {
            used: AtomicUsize::new(0),
            max: AtomicUsize::new(usize::MAX),
        });
        let retention = Retention {
            messages: usize::MAX,
            bytes: usize::MAX,
            age: None,
        };
        LogState::new(retention, SlowConsumerPolicy::default(), budget)
    }

    fn body(i: u32, len: usize) -> Vec<u8> {
        let mut b = vec![(i % 251) as u8; len];
        b[..4].copy_from_slice(&i.to_be_bytes());
        b
    }

    #[test]
    fn a_run_that_outgrows_its_room_continues_in_new_chunks() {
        let mut log = log();
        // A short run, so the next one starts with little room.
        log.append(Timestamp::now(), 0, &body(0, 100));
        log.end_run();
        // A run far larger than any room it gets at once.
        let count = 1000;
        for i in 1..=count {
            log.append(Timestamp::now(), 0, &body(i, 1000));
        }
        log.end_run();
        // Each time the room ran out, the copies so far became a chunk:
        // several chunks, none copied into a bigger buffer.
        assert!(log.chunks.len() > 2, "{} chunks", log.chunks.len());
        assert!(log.chunks.iter().all(|(_, c)| c.len() <= RUN_RESERVE_MAX));
        let (kept, missed) = log.since(StartPosition::Earliest);
        assert_eq!(missed, 0);
        assert_eq!(kept.len(), count as usize + 1);
        for (i, k) in kept.iter().enumerate() {
            assert_eq!(k.offset, i as u64);
            let len = if i == 0 { 100 } else { 1000 };
            assert_eq!(&k.body[..], &body(i as u32, len)[..], "message {i}");
        }
        assert_eq!(
            log.usage(),
            (count as usize + 1, 100 + 1000 * count as usize)
        );
    }
}
