//! What the broker does when a subscriber falls behind.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// What happens when a subscriber's buffer in the broker is full
/// (`limits.max_pending_bytes` for a connection, `limits.max_pending_messages`
/// for an in-process receiver). Set per topic pattern (`[[topics]]
/// slow_consumer`) and, overriding that, per subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlowConsumerPolicy {
    /// Close the slow connection (or receiver) with a `slow-consumer`
    /// error. Other subscribers are untouched. The default, as in NATS.
    #[default]
    Disconnect,
    /// Drop the subscription's oldest undelivered messages to make room,
    /// and tell it how many it missed and their offsets; it can replay them
    /// while the topic still retains them.
    DropOldest,
    /// Make the publishers wait: a publisher whose delivery finds the
    /// buffer full stops reading (TCP pushes back on it, and its
    /// acknowledgements wait) until the subscriber has caught up. A
    /// subscriber that does not catch up within
    /// `limits.slow_consumer_block_ms` is disconnected.
    Block,
}

impl SlowConsumerPolicy {
    /// The name used in configuration and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            SlowConsumerPolicy::Disconnect => "disconnect",
            SlowConsumerPolicy::DropOldest => "drop_oldest",
            SlowConsumerPolicy::Block => "block",
        }
    }

    /// Its code in a SUBSCRIBE frame.
    pub fn code(self) -> u8 {
        match self {
            SlowConsumerPolicy::Disconnect => 1,
            SlowConsumerPolicy::DropOldest => 2,
            SlowConsumerPolicy::Block => 3,
        }
    }

    /// The policy with this SUBSCRIBE code.
    pub fn from_code(code: u8) -> Option<SlowConsumerPolicy> {
        match code {
            1 => Some(SlowConsumerPolicy::Disconnect),
            2 => Some(SlowConsumerPolicy::DropOldest),
            3 => Some(SlowConsumerPolicy::Block),
            _ => None,
        }
    }
}

impl fmt::Display for SlowConsumerPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SlowConsumerPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().replace('-', "_").as_str() {
            "disconnect" => Ok(SlowConsumerPolicy::Disconnect),
            "drop_oldest" => Ok(SlowConsumerPolicy::DropOldest),
            "block" => Ok(SlowConsumerPolicy::Block),
            _ => Err(format!(
                "unknown slow-consumer policy {s:?}: use disconnect, drop_oldest or block"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gap(topic: &str, first: u64, last: u64, count: u64) -> Gap {
        Gap {
            topic: crate::Topic::new(topic).unwrap(),
            partition: None,
            first: crate::Offset::new(first),
            last: crate::Offset::new(last),
            count,
        }
    }

    #[test]
    fn adjacent_gaps_merge_and_the_list_stays_bounded() {
        let mut gaps = Vec::new();
        for offset in 10..20 {
            record_gap(&mut gaps, gap("a", offset, offset, 1));
        }
        record_gap(&mut gaps, gap("a", 30, 30, 1));
        record_gap(&mut gaps, gap("b", 31, 31, 1));
        assert_eq!(
            gaps,
            [
                gap("a", 10, 19, 10),
                gap("a", 30, 30, 1),
                gap("b", 31, 31, 1)
            ]
        );

        for offset in (100..10_000).step_by(2) {
            record_gap(&mut gaps, gap("c", offset, offset, 1));
        }
        assert_eq!(gaps.len(), MAX_GAPS);
        let total: u64 = gaps.iter().map(|g| g.count).sum();
        assert_eq!(total, 12 + 4950);
    }

    #[test]
    fn names_and_codes_round_trip() {
        for policy in [
            SlowConsumerPolicy::Disconnect,
            SlowConsumerPolicy::DropOldest,
            SlowConsumerPolicy::Block,
        ] {
            assert_eq!(policy.as_str().parse(), Ok(policy));
            assert_eq!(SlowConsumerPolicy::from_code(policy.code()), Some(policy));
        }
        assert_eq!("drop-oldest".parse(), Ok(SlowConsumerPolicy::DropOldest));
        assert!("later".parse::<SlowConsumerPolicy>().is_err());
        assert_eq!(SlowConsumerPolicy::from_code(0), None);
    }
}

/// How to subscribe, beyond the pattern: where to start, a queue group,
/// the subscription's own slow-consumer policy, and the partitions to take.
///
/// ```
/// use kaelix_core::{SlowConsumerPolicy, StartPosition, SubscribeOptions};
///
/// let options = SubscribeOptions::new()
///     .start(StartPosition::Earliest)
///     .slow_consumer(SlowConsumerPolicy::DropOldest);
/// assert_eq!(options.start, StartPosition::Earliest);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubscribeOptions {
    /// Where to start (default: the latest message).
    pub start: crate::StartPosition,
    /// Join this queue group: each message goes to one member.
    pub queue_group: Option<String>,
    /// Overrides the topics' `slow_consumer` policy for this subscription.
    pub slow_consumer: Option<SlowConsumerPolicy>,
    /// Only these partitions of the matching topics; empty takes them all.
    /// Not with a queue group (a group shares out its topics' partitions).
    pub partitions: Vec<crate::PartitionId>,
    /// With a queue group: each partition goes to one member of the group
    /// (partition `p` to member `p % members`, members in joining order),
    /// so a member sees each of its partitions in order. A group is sticky
    /// when any of its members asks.
    pub sticky_partitions: bool,
    /// Pace the broker: it sends at most this window of messages (or
    /// bytes) that the application has not taken yet; what it cannot send
    /// waits in the topic's retained window. Not with a queue group.
    pub credit: Option<CreditWindow>,
}

/// A subscription's credit window: the most messages and message body
/// bytes the broker sends before the consumer takes some (0 on one axis:
/// no limit on it). The consumer gives credit back as the application
/// takes messages; while the subscription has none, its messages wait in
/// the topic's retained window and follow when credit comes, in order. What
/// the window no longer holds by then is reported as missed, with offsets.
///
/// ```
/// use kaelix_core::CreditWindow;
/// let window = CreditWindow::messages(500).and_bytes(4 << 20);
/// assert_eq!((window.messages, window.bytes), (500, 4 << 20));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreditWindow {
    pub messages: u32,
    pub bytes: u32,
}

impl CreditWindow {
    /// At most `n` messages in flight.
    pub fn messages(n: u32) -> CreditWindow {
        CreditWindow {
            messages: n,
            bytes: 0,
        }
    }

    /// At most `n` message body bytes in flight (a message larger than
    /// what is left is still sent when any is left).
    pub fn bytes(n: u32) -> CreditWindow {
        CreditWindow {
            messages: 0,
            bytes: n,
        }
    }

    /// A byte limit as well.
    pub fn and_bytes(mut self, n: u32) -> CreditWindow {
        self.bytes = n;
        self
    }
}

impl SubscribeOptions {
    /// Latest, no group, the topics' policy.
    pub fn new() -> SubscribeOptions {
        SubscribeOptions::default()
    }

    /// Starts at `start`.
    pub fn start(mut self, start: crate::StartPosition) -> Self {
        self.start = start;
        self
    }

    /// Joins queue group `group`.
    pub fn queue_group(mut self, group: impl Into<String>) -> Self {
        self.queue_group = Some(group.into());
        self
    }

    /// Uses `policy` when this subscription falls behind.
    pub fn slow_consumer(mut self, policy: SlowConsumerPolicy) -> Self {
        self.slow_consumer = Some(policy);
        self
    }

    /// Takes only `partitions` of the matching topics.
    pub fn partitions(mut self, partitions: impl IntoIterator<Item = crate::PartitionId>) -> Self {
        self.partitions = partitions.into_iter().collect();
        self
    }

    /// Paces the broker with a credit window (see [`CreditWindow`]).
    pub fn credit(mut self, window: CreditWindow) -> Self {
        self.credit = Some(window);
        self
    }

    /// In a queue group, takes whole partitions (see
    /// [`sticky_partitions`](Self::sticky_partitions)).
    pub fn sticky_partitions(mut self) -> Self {
        self.sticky_partitions = true;
        self
    }

    /// Checks the queue group's name, that a group starts at the latest
    /// message (replaying to one member of a group is not defined), that
    /// partitions are named only outside a group and within
    /// [`PartitionId::MAX_PARTITIONS`](crate::PartitionId::MAX_PARTITIONS),
    /// and that only a group is sticky.
    pub fn check(&self) -> crate::Result<()> {
        if let Some(p) = self
            .partitions
            .iter()
            .find(|p| p.get() >= crate::PartitionId::MAX_PARTITIONS)
        {
            return Err(crate::Error::InvalidPartition(
                crate::PartitionId::beyond_max(p.get()),
            ));
        }
        if self.credit.is_some_and(|c| c.messages == 0 && c.bytes == 0) {
            return Err(crate::Error::InvalidCredit(
                "a credit window needs a message or a byte limit".into(),
            ));
        }
        if self.sticky_partitions && self.queue_group.is_none() {
            return Err(crate::Error::InvalidPartition(
                "sticky partitions share a topic's partitions among the members of a \
                 queue group: name the group"
                    .into(),
            ));
        }
        if let Some(group) = &self.queue_group {
            if self.credit.is_some() {
                return Err(crate::Error::InvalidGroup {
                    group: group.clone(),
                    reason: "a queue group member cannot have a credit window: the group \
                             shares out messages as they come",
                });
            }
            if !self.partitions.is_empty() {
                return Err(crate::Error::InvalidGroup {
                    group: group.clone(),
                    reason: "a queue group member takes the partitions the group gives it: \
                             ask for sticky partitions instead of naming them",
                });
            }
            crate::topic::check_group(group)?;
            if self.start != crate::StartPosition::Latest {
                return Err(crate::Error::InvalidGroup {
                    group: group.clone(),
                    reason: "a queue group subscription starts at the latest message: \
                             replaying to one member of a group is not defined",
                });
            }
        }
        Ok(())
    }
}

/// Messages of one topic a subscription did not get because it fell
/// behind under [`SlowConsumerPolicy::DropOldest`]: `count` of the offsets
/// `first..=last` (every one of them, unless the subscription is one member
/// of a queue group). While the topic still retains them they can be read
/// again with a subscription that starts at `first`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    pub topic: crate::Topic,
    /// The partition, for a topic with more than one.
    pub partition: Option<crate::PartitionId>,
    pub first: crate::Offset,
    pub last: crate::Offset,
    pub count: u64,
}

/// Most gaps a subscription remembers until they are taken; later ones
/// are merged into the newest gap of their topic (their count stays exact).
pub const MAX_GAPS: usize = 1024;

/// Records `gap` in `gaps`, keeping at most [`MAX_GAPS`].
pub fn record_gap(gaps: &mut Vec<Gap>, gap: Gap) {
    if let Some(last) = gaps.last_mut() {
        // Adjacent drops of one topic make one gap.
        if last.topic == gap.topic
            && last.partition == gap.partition
            && last.last.get() + 1 == gap.first.get()
        {
            last.last = gap.last;
            last.count += gap.count;
            return;
        }
    }
    if gaps.len() >= MAX_GAPS {
        match gaps
            .iter_mut()
            .rev()
            .find(|g| g.topic == gap.topic && g.partition == gap.partition)
        {
            Some(same) => {
                same.first = same.first.min(gap.first);
                same.last = same.last.max(gap.last);
                same.count += gap.count;
            }
            None => {
                gaps.remove(0);
                gaps.push(gap);
            }
        }
        return;
    }
    gaps.push(gap);
}
