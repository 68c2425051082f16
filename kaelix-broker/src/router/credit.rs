//! Credit: a subscription that paces the broker.
//!
//! A subscription with a credit window is sent messages while it has
//! credit. A publisher that finds it without credit does not buffer for it:
//! it notes the partition and the offset the subscription stopped at
//! ([`Flow::admit`]), and from then on that partition's messages wait in
//! the partition's retained log. When the client gives credit back, the
//! connection task reads them from the log ([`Flow::read`]) under the
//! partition's lock, and once it reaches the log's end the partition is live
//! again — under the same lock a publisher holds for its runs, so there is
//! no gap or duplicate at the seam. What the log dropped meanwhile is
//! reported with a MISSED notice carrying the offsets.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use kaelix_core::protocol::{encode_deliver_raw, Frame, Missed, MissedRange};
use kaelix_core::Topic;
use parking_lot::Mutex;

use super::log::LogState;

/// A partition's log.
pub(crate) type Part = Arc<Mutex<LogState>>;

/// No limit on an axis.
const UNLIMITED: u64 = u64::MAX;

/// The credit state of one subscription.
pub(crate) struct Flow {
    /// Messages it may still be sent.
    messages: AtomicU64,
    /// Message body bytes it may still be sent (a message is sent while
    /// any is left).
    bytes: AtomicU64,
    /// Partitions whose messages wait in their log for credit.
    behind: Mutex<Vec<Behind>>,
    /// `behind.len()`, read without the lock on the delivery path.
    behind_count: AtomicUsize,
}

/// A partition a subscription stopped at for lack of credit.
pub(crate) struct Behind {
    part: Part,
    topic: Topic,
    /// Its number, for a topic with more than one.
    partition: Option<u32>,
    /// The next offset to send.
    next: u64,
}

impl Flow {
    /// A window of `messages` and `bytes` (0: no limit on that axis).
    pub(crate) fn new(messages: u32, bytes: u32) -> Flow {
        let axis = |n: u32| if n == 0 { UNLIMITED } else { u64::from(n) };
        Flow {
            messages: AtomicU64::new(axis(messages)),
            bytes: AtomicU64::new(axis(bytes)),
            behind: Mutex::new(Vec::new()),
            behind_count: AtomicUsize::new(0),
        }
    }

    /// Adds credit given back by the client.
    pub(crate) fn add(&self, messages: u32, bytes: u32) {
        for (axis, n) in [(&self.messages, messages), (&self.bytes, bytes)] {
            if n > 0 {
                let _ = axis.fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                    (left != UNLIMITED)
                        .then(|| left.saturating_add(u64::from(n)).min(UNLIMITED - 1))
                });
            }
        }
    }

    /// Takes credit for one message of `len` body bytes; false when there
    /// is none. Concurrent publishers (of other partitions) can each take
    /// one message past the window, not more.
    fn take(&self, len: usize) -> bool {
        if self.messages.load(Ordering::Acquire) == 0 || self.bytes.load(Ordering::Acquire) == 0 {
            return false;
        }
        for (axis, n) in [(&self.messages, 1), (&self.bytes, len as u64)] {
            let _ = axis.fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                (left != UNLIMITED).then(|| left.saturating_sub(n))
            });
        }
        true
    }

    /// Whether `part`'s messages wait in its log for this subscription.
    /// Stable while the caller holds `part`'s lock (only a holder of it
    /// adds or removes the partition), so a publisher asks once per run.
    pub(crate) fn waits_on(&self, part: &Part) -> bool {
        self.behind_count.load(Ordering::Acquire) > 0
            && self
                .behind
                .lock()
                .iter()
                .any(|b| Arc::ptr_eq(&b.part, part))
    }

    /// Whether a publisher holding `part`'s lock (which is not waiting,
    /// see [`waits_on`](Self::waits_on)) may deliver the message at
    /// `offset` now. If not, the partition waits in its log from `offset`
    /// on until the client gives credit.
    pub(crate) fn admit(
        &self,
        part: &Part,
        topic: &Topic,
        partition: Option<u32>,
        offset: u64,
        len: usize,
    ) -> bool {
        if self.take(len) {
            return true;
        }
        self.stop_at(part, topic, partition, offset);
        false
    }

    /// Notes that a publisher or a replay holding `part`'s lock stopped at
    /// `next` for lack of credit.
    pub(crate) fn stop_at(&self, part: &Part, topic: &Topic, partition: Option<u32>, next: u64) {
        let mut behind = self.behind.lock();
        behind.push(Behind {
            part: part.clone(),
            topic: topic.clone(),
            partition,
            next,
        });
        self.behind_count.store(behind.len(), Ordering::Release);
    }

    /// Encodes into `frames` what credit allows of one partition's kept
    /// messages from `from` on, for subscription `sid` (the caller holds
    /// the partition's lock). Returns how many were written and where the
    /// subscription stands after them.
    pub(crate) fn take_from(
        &self,
        state: &mut LogState,
        sid: u32,
        from: u64,
        partition: Option<u32>,
        frames: &mut BytesMut,
    ) -> (u64, u64) {
        let mut next = from;
        let mut sent = 0;
        state.read_from(from, |offset, flags, body| {
            if !self.take(body.len()) {
                return false;
            }
            encode_deliver_raw(frames, sid, (Some(offset), partition), flags, body);
            next = offset + 1;
            sent += 1;
            true
        });
        (sent, next)
    }

    /// Reads what credit allows from the partitions this subscription is
    /// behind on into `frames`: for each, a MISSED notice first if its log
    /// dropped messages it had not been sent, then its messages in offset
    /// order. A partition whose log end is reached is live again. Returns
    /// the messages written and the ones missed.
    pub(crate) fn read(&self, sid: u32, frames: &mut BytesMut) -> (u64, u64) {
        let parts: Vec<(Part, Topic, Option<u32>)> = self
            .behind
            .lock()
            .iter()
            .map(|b| (b.part.clone(), b.topic.clone(), b.partition))
            .collect();
        let (mut sent, mut missed) = (0, 0);
        for (part, topic, partition) in parts {
            if self.messages.load(Ordering::Acquire) == 0 || self.bytes.load(Ordering::Acquire) == 0
            {
                break;
            }
            // The partition's lock first, as publishers take it (they
            // take `behind` under it).
            let mut state = part.lock();
            state.expire(kaelix_core::Timestamp::now());
            let mut behind = self.behind.lock();
            let Some(at) = behind.iter().position(|b| Arc::ptr_eq(&b.part, &part)) else {
                continue;
            };
            let from = behind[at].next;
            let first = state.first_kept();
            if first > from {
                let count = first - from;
                missed += count;
                Frame::Missed(Missed {
                    sid,
                    count,
                    range: Some(MissedRange {
                        topic: Bytes::copy_from_slice(topic.as_bytes()),
                        partition,
                        first: from,
                        last: first - 1,
                    }),
                })
                .encode(frames);
            }
            let (n, next) = self.take_from(&mut state, sid, from.max(first), partition, frames);
            sent += n;
            if next >= state.next {
                behind.swap_remove(at);
            } else {
                behind[at].next = next;
            }
            self.behind_count.store(behind.len(), Ordering::Release);
        }
        (sent, missed)
    }

    /// Whether any partition waits for credit.
    pub(crate) fn is_behind(&self) -> bool {
        self.behind_count.load(Ordering::Acquire) > 0
    }
}
