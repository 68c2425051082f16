//! Which partition a message goes to, and which partitions a subscription
//! takes.

use kaelix_core::protocol::decode::{body_parts, find_header};
use kaelix_core::protocol::flags;
use kaelix_core::{Message, PartitionId};

/// The partitions a subscription takes: a bit per partition number, below
/// [`PartitionId::MAX_PARTITIONS`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PartitionSet(Box<[u64]>);

impl PartitionSet {
    /// The set of `partitions`; the first one at or past the maximum is
    /// an error.
    pub(crate) fn new(partitions: impl IntoIterator<Item = u32>) -> Result<PartitionSet, u32> {
        let mut words = Vec::new();
        for p in partitions {
            if p >= PartitionId::MAX_PARTITIONS {
                return Err(p);
            }
            let word = (p / 64) as usize;
            if words.len() <= word {
                words.resize(word + 1, 0u64);
            }
            words[word] |= 1 << (p % 64);
        }
        Ok(PartitionSet(words.into_boxed_slice()))
    }

    /// The set a subscription asked for: `None` (all partitions) for an
    /// empty list.
    pub(crate) fn of(partitions: &[u32]) -> Result<Option<PartitionSet>, u32> {
        if partitions.is_empty() {
            return Ok(None);
        }
        PartitionSet::new(partitions.iter().copied()).map(Some)
    }

    /// Whether a subscription with `set` (`None`: all) takes `partition`.
    pub(crate) fn takes(set: Option<&PartitionSet>, partition: u32) -> bool {
        set.is_none_or(|set| set.contains(partition))
    }

    pub(crate) fn contains(&self, partition: u32) -> bool {
        self.0
            .get((partition / 64) as usize)
            .is_some_and(|w| w & (1 << (partition % 64)) != 0)
    }
}

/// What a publication says about its partition.
pub(crate) enum Choice<'a> {
    /// It names one.
    Named(u32),
    /// It has a key.
    Key(&'a [u8]),
    /// Neither: the broker picks.
    Any,
}

/// The partition choice of a wire body (validated by the decoder). Only
/// called for a topic with more than one partition, or a body that names
/// one; a body without headers costs nothing more than its flags.
pub(crate) fn wire_choice(body_flags: u8, body: &[u8]) -> Choice<'_> {
    if body_flags & (flags::PARTITION | flags::HEADERS) == 0 {
        return Choice::Any;
    }
    let Ok(parts) = body_parts(body, body_flags) else {
        return Choice::Any;
    };
    if let Some(p) = parts.partition {
        return Choice::Named(p);
    }
    match parts
        .headers
        .and_then(|h| find_header(h, Message::KEY_HEADER))
    {
        Some(key) => Choice::Key(key),
        None => Choice::Any,
    }
}

/// The partition choice of an in-process message.
pub(crate) fn message_choice(message: &Message) -> Choice<'_> {
    if let Some(p) = message.partition {
        return Choice::Named(p.get());
    }
    match message.key() {
        Some(key) => Choice::Key(key.as_bytes()),
        None => Choice::Any,
    }
}

/// The refusal of a publish to a partition its topic does not have.
pub(crate) fn unknown_partition(topic: &str, partition: u32, partitions: u32) -> String {
    format!(
        "topic {topic} has {partitions} partition{} (0..={}): there is no partition {partition}",
        if partitions == 1 { "" } else { "s" },
        partitions - 1
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_hold_what_they_were_given() {
        let set = PartitionSet::new([0, 3, 64, 1023]).unwrap();
        for p in [0, 3, 64, 1023] {
            assert!(set.contains(p));
        }
        for p in [1, 2, 63, 65, 1022, 1024, 5000] {
            assert!(!set.contains(p));
        }
        assert_eq!(PartitionSet::new([1024]), Err(1024));
    }

    #[test]
    fn a_body_names_its_partition_or_key() {
        use kaelix_core::protocol::MessageBody;
        use kaelix_core::{Headers, Topic};
        let topic = Topic::new("t").unwrap();
        let payload = bytes::Bytes::from_static(b"x");
        let mut headers = Headers::new();
        let plain = MessageBody::new(&topic, None, &headers, &payload);
        assert!(matches!(
            wire_choice(plain.flags(), plain.raw()),
            Choice::Any
        ));
        headers.insert("other", "v");
        headers.insert(Message::KEY_HEADER, "user-7");
        let keyed = MessageBody::new(&topic, None, &headers, &payload);
        assert!(matches!(
            wire_choice(keyed.flags(), keyed.raw()),
            Choice::Key(b"user-7")
        ));
        let named = MessageBody::new(&topic, Some(PartitionId::new(2)), &headers, &payload);
        assert!(matches!(
            wire_choice(named.flags(), named.raw()),
            Choice::Named(2)
        ));
    }
}
