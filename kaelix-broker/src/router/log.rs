//! Topic logs: the offsets of each topic and the recent messages it keeps
//! in memory for replay.
//!
//! A publisher holds a topic's log lock for a whole run of publishes to that
//! topic within one read batch: it assigns their offsets, keeps copies, and
//! hands the deliveries to the subscribers' buffers before letting go. So
//! every subscriber sees a topic's messages in offset order, and a
//! subscriber that replays (which takes the same lock) gets exactly what was
//! published before it, then everything after, with no gap or duplicate.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use foldhash::HashMap;
use kaelix_core::{MemoryStreamerConfig, Timestamp, Topic, TopicPattern};
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

/// One kept message: its wire body, as it is forwarded.
#[derive(Debug, Clone)]
pub(crate) struct Kept {
    pub(crate) offset: u64,
    pub(crate) timestamp: Timestamp,
    pub(crate) flags: u8,
    pub(crate) body: Bytes,
}

/// A topic's log.
pub(crate) struct TopicLog {
    pub(crate) topic: Topic,
    pub(crate) state: Arc<Mutex<LogState>>,
}

/// What the log lock guards.
pub(crate) struct LogState {
    /// The offset the next message gets.
    pub(crate) next: u64,
    pub(crate) kept: VecDeque<Kept>,
    /// Body bytes in `kept`.
    bytes: usize,
    retention: Retention,
    /// The broker-wide count of kept bytes, against `retention.max_bytes`.
    budget: Arc<Budget>,
    /// Bodies copied during the current run, split off when it ends.
    chunk: BytesMut,
    /// `(offset, timestamp, flags, start, len)` of the bodies in `chunk`.
    pending: Vec<(u64, Timestamp, u8, usize, usize)>,
}

/// Kept bytes across all topics.
pub(crate) struct Budget {
    used: AtomicUsize,
    max: AtomicUsize,
}

impl LogState {
    /// Gives the next offset to a message and, if the topic keeps messages,
    /// copies its body to be kept when the run ends.
    pub(crate) fn append(&mut self, timestamp: Timestamp, flags: u8, body: &[u8]) -> u64 {
        let offset = self.next;
        self.next += 1;
        if self.retention.keeps_anything() && body.len() <= self.retention.bytes {
            let start = self.chunk.len();
            self.chunk.extend_from_slice(body);
            self.pending
                .push((offset, timestamp, flags, start, body.len()));
        }
        offset
    }

    /// Ends a run: the copied bodies become kept messages (one shared
    /// buffer for the run), and the oldest go as the limits require.
    pub(crate) fn end_run(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let chunk = self.chunk.split().freeze();
        let mut pending = std::mem::take(&mut self.pending);
        for (offset, timestamp, flags, start, len) in pending.drain(..) {
            let body = chunk.slice(start..start + len);
            self.make_room(len);
            if !self.budget.take(len) {
                // Everything of this topic is gone and the broker is still
                // at its cap: delivered, not kept.
                continue;
            }
            self.bytes += len;
            self.kept.push_back(Kept {
                offset,
                timestamp,
                flags,
                body,
            });
        }
        // The emptied list goes back, keeping its capacity.
        self.pending = pending;
        self.expire(Timestamp::now());
    }

    /// Drops the oldest until one more message of `len` bytes fits this
    /// topic's limits and, if it can, the broker's.
    fn make_room(&mut self, len: usize) {
        while !self.kept.is_empty()
            && (self.kept.len() >= self.retention.messages
                || self.bytes + len > self.retention.bytes
                || !self.budget.fits(len))
        {
            self.drop_oldest();
        }
    }

    fn drop_oldest(&mut self) {
        if let Some(old) = self.kept.pop_front() {
            self.bytes -= old.body.len();
            self.budget.give(old.body.len());
        }
    }

    /// Drops what is older than the age limit.
    pub(crate) fn expire(&mut self, now: Timestamp) {
        let Some(age) = self.retention.age else {
            return;
        };
        let limit = now.as_nanos().saturating_sub(age.as_nanos() as u64);
        while self
            .kept
            .front()
            .is_some_and(|k| k.timestamp.as_nanos() < limit)
        {
            self.drop_oldest();
        }
    }

    /// What is kept from `start` on, and how many asked-for messages are
    /// gone.
    pub(crate) fn since(
        &mut self,
        start: kaelix_core::StartPosition,
    ) -> (impl Iterator<Item = &Kept>, u64) {
        self.expire(Timestamp::now());
        let (first, next) = (self.first_kept(), self.next);
        let kept = &self.kept;
        let (from, missed) = start.resolve(first, next, |t| {
            kept.iter()
                .find(|k| k.timestamp >= t)
                .map_or(next, |k| k.offset)
        });
        let at = kept.partition_point(|k| k.offset < from);
        (kept.range(at..), missed)
    }

    /// The first offset still kept, or `next` when none is.
    pub(crate) fn first_kept(&self) -> u64 {
        self.kept.front().map_or(self.next, |k| k.offset)
    }

    /// Kept messages and their bytes.
    pub(crate) fn usage(&self) -> (usize, usize) {
        (self.kept.len(), self.bytes)
    }

    fn set_retention(&mut self, retention: Retention) {
        self.retention = retention;
        while !self.kept.is_empty()
            && (self.kept.len() > retention.messages || self.bytes > retention.bytes)
        {
            self.drop_oldest();
        }
        self.expire(Timestamp::now());
    }
}

impl Drop for LogState {
    fn drop(&mut self) {
        self.budget.give(self.bytes);
    }
}

impl Budget {
    fn fits(&self, len: usize) -> bool {
        self.used.load(Ordering::Relaxed) + len <= self.max.load(Ordering::Relaxed)
    }

    fn take(&self, len: usize) -> bool {
        let max = self.max.load(Ordering::Relaxed);
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |used| {
                (used + len <= max).then_some(used + len)
            })
            .is_ok()
    }

    fn give(&self, len: usize) {
        self.used.fetch_sub(len, Ordering::AcqRel);
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
        let retention = Retention::of(&self.config.read(), topic);
        self.map
            .write()
            .entry(topic.clone())
            .or_insert_with(|| {
                Arc::new(TopicLog {
                    topic: topic.clone(),
                    state: Arc::new(Mutex::new(LogState {
                        next: 0,
                        kept: VecDeque::new(),
                        bytes: 0,
                        retention,
                        budget: self.budget.clone(),
                        chunk: BytesMut::new(),
                        pending: Vec::new(),
                    })),
                })
            })
            .clone()
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
    pub(crate) fn reconfigure(&self, config: &MemoryStreamerConfig) {
        self.budget
            .max
            .store(config.retention.max_bytes, Ordering::Relaxed);
        *self.config.write() = Arc::new(config.clone());
        let logs: Vec<Arc<TopicLog>> = self.map.read().values().cloned().collect();
        for log in logs {
            let retention = Retention::of(config, &log.topic);
            log.state.lock().set_retention(retention);
        }
    }

    /// Housekeeping: drops messages past their age limit in every log, then
    /// the logs that keep nothing and that no publisher's route cache
    /// holds (a topic that comes back starts its offsets again).
    pub(crate) fn expire_all(&self) {
        let now = Timestamp::now();
        let logs: Vec<Arc<TopicLog>> = self.map.read().values().cloned().collect();
        for log in &logs {
            log.state.lock().expire(now);
        }
        // Near the broker's cap, the topics holding more than an even share
        // give back the excess, so that a topic that started later is not
        // kept from retaining anything by those that filled the budget.
        let max = self.budget.max.load(Ordering::Relaxed);
        if self.budget.used.load(Ordering::Relaxed) > max / 10 * 9 && !logs.is_empty() {
            let share = max / logs.len() / 10 * 9;
            for log in &logs {
                let mut state = log.state.lock();
                while state.bytes > share {
                    state.drop_oldest();
                }
            }
        }
        drop(logs);
        self.map.write().retain(|_, log| {
            Arc::strong_count(log) > 1 || Arc::strong_count(&log.state) > 1 || {
                let state = log.state.lock();
                !state.kept.is_empty()
            }
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
