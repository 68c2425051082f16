//! Where each subscription is: the next offset it wants of each topic
//! partition it received from, kept by the connection's reader so that a
//! reconnect can resume every subscription exactly where it was.
//!
//! The reader sees every MESSAGE frame anyway; keeping the position costs
//! a comparison per message (of the partition, and of the topic for a
//! subscription with wildcards; runs of one subscription and one topic are
//! the common case) and a map update only when the topic partition changes.

use std::collections::HashMap;

use kaelix_core::protocol::ResumeAt;

/// Every subscription's position, with the one being read kept hot.
#[derive(Debug, Default)]
pub(crate) struct Positions {
    by_sid: HashMap<u32, Subscription>,
    hot_sid: Option<u32>,
    hot: Subscription,
}

/// What a subscription's position needs, told the first time it is seen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum Tracking {
    /// A queue group member: it never resumes by offset, so nothing is
    /// kept for it.
    #[default]
    Nothing,
    /// A pattern without wildcards: every message is on its one topic, so
    /// only the partition is compared per message.
    OneTopic,
    /// A pattern with wildcards: the topic is compared per message.
    AnyTopic,
}

/// One subscription's next offsets, by topic then partition, with the
/// topic partition of its latest message kept hot.
#[derive(Debug, Default)]
struct Subscription {
    tracking: Tracking,
    next: HashMap<Box<[u8]>, HashMap<u32, u64>>,
    topic: Vec<u8>,
    partition: u32,
    /// The hot topic partition's next offset, not yet in `next`.
    pending: Option<u64>,
}

impl Positions {
    /// Subscription `sid` received the message at `offset` of `partition`
    /// (`None` for a topic with one) of the topic in `body`. `resumes`
    /// tells, the first time a subscription is seen, what its position
    /// needs (nothing, for one that cannot resume by offset).
    pub(crate) fn saw(
        &mut self,
        sid: u32,
        body: &[u8],
        partition: Option<u32>,
        offset: u64,
        resumes: impl FnOnce() -> Tracking,
    ) {
        if self.hot_sid != Some(sid) {
            self.cool();
            self.hot = self.by_sid.remove(&sid).unwrap_or_else(|| Subscription {
                tracking: resumes(),
                ..Subscription::default()
            });
            self.hot_sid = Some(sid);
        }
        if self.hot.tracking == Tracking::Nothing {
            return;
        }
        let Some(topic) = topic_of(body) else {
            return;
        };
        self.hot.saw(topic, partition.unwrap_or(0), offset);
    }

    /// Puts the hot subscription back with the others.
    fn cool(&mut self) {
        if let Some(sid) = self.hot_sid.take() {
            let mut hot = std::mem::take(&mut self.hot);
            hot.settle();
            self.by_sid.insert(sid, hot);
        }
    }

    /// Where subscription `sid` resumes: one entry per topic partition it
    /// received from.
    pub(crate) fn resume(&mut self, sid: u32) -> Vec<ResumeAt> {
        self.cool();
        let Some(sub) = self.by_sid.get(&sid) else {
            return Vec::new();
        };
        sub.next
            .iter()
            .flat_map(|(topic, parts)| {
                parts.iter().map(|(partition, next)| ResumeAt {
                    topic: bytes::Bytes::copy_from_slice(topic),
                    partition: *partition,
                    next: *next,
                })
            })
            .collect()
    }

    /// Subscription `sid` ended.
    pub(crate) fn forget(&mut self, sid: u32) {
        if self.hot_sid == Some(sid) {
            self.hot_sid = None;
            self.hot = Subscription::default();
        }
        self.by_sid.remove(&sid);
    }

    /// Drops the positions of subscriptions that ended.
    pub(crate) fn keep_only(&mut self, live: impl Fn(u32) -> bool) {
        self.cool();
        self.by_sid.retain(|sid, _| live(*sid));
    }
}

impl Subscription {
    fn saw(&mut self, topic: &[u8], partition: u32, offset: u64) {
        let same_topic = self.tracking == Tracking::OneTopic || self.topic == topic;
        if self.pending.is_none() || self.partition != partition || !same_topic {
            self.settle();
            self.topic.clear();
            self.topic.extend_from_slice(topic);
            self.partition = partition;
        }
        self.pending = Some(offset + 1);
    }

    fn settle(&mut self) {
        let Some(next) = self.pending.take() else {
            return;
        };
        let parts = match self.next.get_mut(self.topic.as_slice()) {
            Some(parts) => parts,
            None => self.next.entry(self.topic.as_slice().into()).or_default(),
        };
        parts.insert(self.partition, next);
    }
}

/// The topic at the front of a MESSAGE body (already validated by the
/// reader's peek).
fn topic_of(body: &[u8]) -> Option<&[u8]> {
    let len = usize::from(*body.first()?);
    body.get(1..1 + len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(topic: &str) -> Vec<u8> {
        let mut b = vec![topic.len() as u8];
        b.extend_from_slice(topic.as_bytes());
        b.extend_from_slice(b"payload");
        b
    }

    fn sorted(mut r: Vec<ResumeAt>) -> Vec<(String, u32, u64)> {
        r.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        r.into_iter()
            .map(|r| {
                (
                    String::from_utf8(r.topic.to_vec()).unwrap(),
                    r.partition,
                    r.next,
                )
            })
            .collect()
    }

    #[test]
    fn each_subscription_resumes_after_its_last_message_per_topic_partition() {
        let mut p = Positions::default();
        let (a, b) = (body("orders.eu"), body("orders.us"));
        let yes = || Tracking::AnyTopic;
        p.saw(1, &a, None, 0, yes);
        p.saw(1, &a, None, 1, yes);
        p.saw(1, &b, None, 7, yes);
        p.saw(2, &a, Some(3), 40, yes);
        p.saw(1, &a, None, 2, yes);
        p.saw(2, &a, Some(3), 41, yes);
        p.saw(2, &a, Some(0), 5, yes);
        // A queue group member: nothing kept.
        p.saw(4, &a, None, 9, || Tracking::Nothing);
        p.saw(4, &a, None, 10, || Tracking::AnyTopic);
        assert!(p.resume(4).is_empty());
        assert_eq!(
            sorted(p.resume(1)),
            [("orders.eu".into(), 0, 3), ("orders.us".into(), 0, 8)]
        );
        assert_eq!(
            sorted(p.resume(2)),
            [("orders.eu".into(), 0, 6), ("orders.eu".into(), 3, 42)]
        );
        assert!(p.resume(3).is_empty());
        p.forget(2);
        assert!(p.resume(2).is_empty());
        p.keep_only(|sid| sid != 1);
        assert!(p.resume(1).is_empty());
    }

    #[test]
    fn a_one_topic_subscription_resumes_per_partition() {
        let mut p = Positions::default();
        let a = body("orders.eu");
        let one = || Tracking::OneTopic;
        p.saw(1, &a, Some(0), 10, one);
        p.saw(1, &a, Some(0), 11, one);
        p.saw(1, &a, Some(2), 7, one);
        p.saw(1, &a, Some(0), 12, one);
        p.saw(1, &a, Some(2), 8, one);
        assert_eq!(
            sorted(p.resume(1)),
            [("orders.eu".into(), 0, 13), ("orders.eu".into(), 2, 9)]
        );
    }
}
