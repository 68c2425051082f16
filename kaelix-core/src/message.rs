//! Messages and the small types they carry.

use std::cell::Cell;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::topic::Topic;

/// A message: a payload published on a topic, with optional headers.
#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    /// Unique within the process that made the message.
    pub id: MessageId,
    /// Where the message was published.
    pub topic: Topic,
    /// The bytes the publisher sent, shared rather than copied.
    pub payload: Bytes,
    /// When the message was made (or, on a consumer, received).
    pub timestamp: Timestamp,
    /// Publishing: the partition the publisher chose, if any. Received:
    /// the partition the message is in (set whenever the topic has more
    /// than one partition, or the publisher chose one).
    pub partition: Option<PartitionId>,
    /// The position the broker assigned in its topic partition.
    pub offset: Option<Offset>,
    /// Application headers.
    pub headers: Headers,
}

impl Message {
    /// The header a message's key travels in: a broker puts a message with
    /// a key in partition [`PartitionId::for_key`] of its topic.
    pub const KEY_HEADER: &'static str = "kaelix-key";

    /// The largest payload a message may carry. A broker's frame limit
    /// (`limits.max_frame_bytes`) is usually far lower.
    pub const MAX_PAYLOAD: usize = u32::MAX as usize - 1024;

    /// A message on `topic` carrying `payload`.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use kaelix_core::{Message, Topic};
    /// let message = Message::new(Topic::new("events.user.signup")?, Bytes::from("user_data"))?;
    /// assert_eq!(message.payload, "user_data");
    /// # Ok::<(), kaelix_core::Error>(())
    /// ```
    pub fn new(topic: Topic, payload: impl Into<Bytes>) -> Result<Message> {
        let payload = payload.into();
        check_payload(&payload)?;
        Ok(Message {
            id: MessageId::next(),
            topic,
            payload,
            timestamp: Timestamp::now(),
            partition: None,
            offset: None,
            headers: Headers::new(),
        })
    }

    /// The message's key (the [`KEY_HEADER`](Self::KEY_HEADER) header), if
    /// it has one.
    pub fn key(&self) -> Option<&str> {
        self.headers.get(Message::KEY_HEADER)
    }

    /// A builder for messages with headers or a partition.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use kaelix_core::{Message, PartitionId};
    /// let message = Message::builder()
    ///     .topic("events.user.signup")
    ///     .payload(Bytes::from(r#"{"userId": "12345"}"#))
    ///     .header("content-type", "application/json")
    ///     .partition(PartitionId::new(1))
    ///     .build()?;
    /// assert_eq!(message.header("content-type"), Some("application/json"));
    /// # Ok::<(), kaelix_core::Error>(())
    /// ```
    pub fn builder() -> MessageBuilder {
        MessageBuilder::default()
    }

    /// The value of header `name`, if set.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)
    }

    /// Sets header `name`, replacing an earlier value.
    pub fn set_header(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.headers.insert(name, value);
    }

    /// Moves the message to another topic.
    pub fn set_topic(&mut self, topic: Topic) {
        self.topic = topic;
    }

    /// Replaces the payload.
    pub fn set_payload(&mut self, payload: impl Into<Bytes>) {
        self.payload = payload.into();
    }

    /// Clears the message for reuse: empty payload, no headers (their
    /// allocation is kept), no partition or offset, the placeholder topic `_`.
    pub fn reset(&mut self) {
        self.topic = placeholder_topic();
        self.payload = Bytes::new();
        self.partition = None;
        self.offset = None;
        self.headers.clear();
        self.timestamp = Timestamp::now();
    }

    /// The bytes this message occupies on the wire: topic, headers and payload.
    pub fn size_bytes(&self) -> usize {
        self.topic.len() + self.headers.size_bytes() + self.payload.len()
    }
}

pub(crate) fn placeholder_topic() -> Topic {
    static PLACEHOLDER: OnceLock<Topic> = OnceLock::new();
    PLACEHOLDER
        .get_or_init(|| Topic::from_static("_").unwrap_or_else(|_| unreachable!()))
        .clone()
}

fn check_payload(payload: &Bytes) -> Result<()> {
    if payload.len() > Message::MAX_PAYLOAD {
        return Err(Error::PayloadTooLarge {
            size: payload.len(),
            max: Message::MAX_PAYLOAD,
        });
    }
    Ok(())
}

/// Builds a [`Message`]; see [`Message::builder`].
#[derive(Default, Debug)]
pub struct MessageBuilder {
    topic: Option<String>,
    payload: Bytes,
    headers: Headers,
    partition: Option<PartitionId>,
}

impl MessageBuilder {
    /// The topic name; validated by [`build`](Self::build).
    pub fn topic(mut self, topic: impl AsRef<str>) -> Self {
        self.topic = Some(topic.as_ref().to_owned());
        self
    }

    /// The payload.
    pub fn payload(mut self, payload: impl Into<Bytes>) -> Self {
        self.payload = payload.into();
        self
    }

    /// Adds a header, replacing an earlier one of the same name.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name, value);
        self
    }

    /// The partition to publish to. A broker refuses a partition its topic
    /// does not have (`unknown-partition`).
    pub fn partition(mut self, partition: PartitionId) -> Self {
        self.partition = Some(partition);
        self
    }

    /// The message's key: messages with the same key go to the same
    /// partition of a topic ([`PartitionId::for_key`]), so they keep their
    /// order. Carried in the [`Message::KEY_HEADER`] header; an explicit
    /// [`partition`](Self::partition) wins over it.
    pub fn key(self, key: impl Into<String>) -> Self {
        self.header(Message::KEY_HEADER, key)
    }

    /// Validates the topic, headers and payload and makes the message.
    pub fn build(self) -> Result<Message> {
        let topic = Topic::new(self.topic.ok_or(Error::MissingTopic)?)?;
        self.headers.validate()?;
        let mut message = Message::new(topic, self.payload)?;
        message.headers = self.headers;
        message.partition = self.partition;
        Ok(message)
    }
}

/// Message headers: an ordered list of name/value pairs, names unique.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Headers(Vec<(String, String)>);

impl Headers {
    /// Longest header name in bytes.
    pub const MAX_NAME_LEN: usize = 255;
    /// Longest header value in bytes.
    pub const MAX_VALUE_LEN: usize = u16::MAX as usize;
    /// Most headers on one message.
    pub const MAX_COUNT: usize = u16::MAX as usize;

    /// No headers.
    pub const fn new() -> Self {
        Headers(Vec::new())
    }

    /// The value of `name`, if present.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Sets `name` to `value`, replacing an earlier value.
    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<String>) {
        let (name, value) = (name.into(), value.into());
        match self.0.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = value,
            None => self.0.push((name, value)),
        }
    }

    /// Removes `name`, returning its value.
    pub fn remove(&mut self, name: &str) -> Option<String> {
        let at = self.0.iter().position(|(n, _)| n == name)?;
        Some(self.0.remove(at).1)
    }

    /// The pairs in insertion order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &str)> {
        self.0.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    /// How many headers there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Removes every header, keeping the allocation.
    pub fn clear(&mut self) {
        self.0.clear()
    }

    /// Bytes of names and values.
    pub fn size_bytes(&self) -> usize {
        self.0.iter().map(|(n, v)| n.len() + v.len()).sum()
    }

    /// Checks that the protocol can carry these headers.
    pub fn validate(&self) -> Result<()> {
        if self.0.len() > Self::MAX_COUNT {
            return Err(Error::InvalidHeader {
                name: String::new(),
                reason: "more than 65535 headers",
            });
        }
        for (name, value) in &self.0 {
            let reason = if name.is_empty() {
                "empty name"
            } else if name.len() > Self::MAX_NAME_LEN {
                "name longer than 255 bytes"
            } else if value.len() > Self::MAX_VALUE_LEN {
                "value longer than 65535 bytes"
            } else {
                continue;
            };
            return Err(Error::InvalidHeader {
                name: name.clone(),
                reason,
            });
        }
        Ok(())
    }
}

impl<N: Into<String>, V: Into<String>> FromIterator<(N, V)> for Headers {
    fn from_iter<I: IntoIterator<Item = (N, V)>>(iter: I) -> Self {
        let mut headers = Headers::new();
        for (n, v) in iter {
            headers.insert(n, v);
        }
        headers
    }
}

/// A message id, unique within the process that made it.
///
/// The high half is a random value drawn once per process, the low half a
/// counter that each thread takes in blocks, so making an id costs neither a
/// syscall nor a contended atomic.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(u128);

const ID_BLOCK: u64 = 4096;

impl MessageId {
    /// A new id.
    pub fn next() -> MessageId {
        static NEXT_BLOCK: AtomicU64 = AtomicU64::new(0);
        thread_local! {
            static RANGE: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
        }
        let counter = RANGE.with(|range| {
            let (mut next, mut end) = range.get();
            if next == end {
                next = NEXT_BLOCK.fetch_add(ID_BLOCK, Ordering::Relaxed);
                end = next + ID_BLOCK;
            }
            range.set((next + 1, end));
            next
        });
        MessageId((u128::from(process_salt()) << 64) | u128::from(counter))
    }

    /// The id as a number.
    pub fn as_u128(self) -> u128 {
        self.0
    }

    /// An id from a number, as carried by another system.
    pub fn from_u128(id: u128) -> MessageId {
        MessageId(id)
    }
}

fn process_salt() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static SALT: OnceLock<u64> = OnceLock::new();
    *SALT.get_or_init(|| {
        // RandomState is seeded from the OS once per process.
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u32(std::process::id());
        hasher.finish()
    })
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({self})")
    }
}

/// Nanoseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The current wall-clock time.
    pub fn now() -> Timestamp {
        Timestamp::from(SystemTime::now())
    }

    /// From nanoseconds since the Unix epoch.
    pub const fn from_nanos(nanos: u64) -> Timestamp {
        Timestamp(nanos)
    }

    /// Nanoseconds since the Unix epoch.
    pub const fn as_nanos(self) -> u64 {
        self.0
    }
}

impl From<SystemTime> for Timestamp {
    fn from(time: SystemTime) -> Self {
        let nanos = time
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        Timestamp(u64::try_from(nanos).unwrap_or(u64::MAX))
    }
}

impl From<Timestamp> for SystemTime {
    fn from(ts: Timestamp) -> Self {
        UNIX_EPOCH + Duration::from_nanos(ts.0)
    }
}

/// A partition of a topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PartitionId(u32);

impl PartitionId {
    /// Most partitions a topic may have (`[[topics]] partitions`).
    pub const MAX_PARTITIONS: u32 = 1024;

    /// Partition number `id`.
    pub const fn new(id: u32) -> PartitionId {
        PartitionId(id)
    }

    /// The partition number.
    pub const fn get(self) -> u32 {
        self.0
    }

    /// Why partition number `p` (at least [`MAX_PARTITIONS`](Self::MAX_PARTITIONS))
    /// cannot be asked for.
    pub fn beyond_max(p: u32) -> String {
        format!(
            "partition {p} does not exist: a topic has at most {} partitions",
            PartitionId::MAX_PARTITIONS
        )
    }

    /// The partition of a topic with `partitions` partitions that a
    /// message with `key` goes to: the 64-bit FNV-1a hash `h` of the key's
    /// bytes, folded to 32 bits (`(h ^ h >> 32) & 0xffff_ffff`, since
    /// FNV's low bits alone mix poorly), modulo `partitions`. Stable across
    /// brokers, restarts and client languages; it changes only when the
    /// partition count does.
    ///
    /// ```
    /// use kaelix_core::PartitionId;
    /// let p = PartitionId::for_key(b"user-42", 8);
    /// assert_eq!(p, PartitionId::for_key(b"user-42", 8));
    /// assert!(p.get() < 8);
    /// ```
    pub fn for_key(key: &[u8], partitions: u32) -> PartitionId {
        const BASIS: u64 = 0xcbf2_9ce4_8422_2325;
        const PRIME: u64 = 0x0000_0100_0000_01b3;
        let hash = key
            .iter()
            .fold(BASIS, |h, &b| (h ^ u64::from(b)).wrapping_mul(PRIME));
        let folded = (hash ^ (hash >> 32)) as u32;
        PartitionId(folded % partitions.max(1))
    }
}

impl fmt::Display for PartitionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A message's position in a topic partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Offset(u64);

impl Offset {
    /// Offset `n`.
    pub const fn new(n: u64) -> Offset {
        Offset(n)
    }

    /// The offset as a number.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_reads_what_set_header_wrote() {
        let mut message = Message::new(Topic::new("a.b").unwrap(), "x").unwrap();
        assert_eq!(message.header("k"), None);
        message.set_header("k".to_string(), "v1".to_string());
        message.set_header("k", "v2");
        assert_eq!(message.header("k"), Some("v2"));
        assert_eq!(message.headers.len(), 1);
    }

    #[test]
    fn builder_validates() {
        assert!(matches!(
            Message::builder().payload("x").build(),
            Err(Error::MissingTopic)
        ));
        let err = Message::builder().topic("bad topic").build().unwrap_err();
        assert!(err
            .to_string()
            .starts_with("Topic name contains invalid characters"));
        let err = Message::builder()
            .topic("a")
            .header("", "v")
            .build()
            .unwrap_err();
        assert!(matches!(err, Error::InvalidHeader { .. }));
        let m = Message::builder()
            .topic("a.b")
            .payload("p")
            .partition(PartitionId::new(3))
            .build()
            .unwrap();
        assert_eq!(m.partition, Some(PartitionId::new(3)));
        assert_eq!(m.size_bytes(), 4);
    }

    #[test]
    fn keys_hash_with_fnv1a() {
        // The published FNV-1a 64 values of "a" and "foobar", folded.
        let fold = |h: u64| (h ^ (h >> 32)) as u32;
        assert_eq!(fold(0xaf63_dc4c_8601_ec8c) % 1000, 864);
        assert_eq!(PartitionId::for_key(b"a", 1000), PartitionId::new(864));
        assert_eq!(fold(0x8594_4171_f739_67e8) % 7, 2);
        assert_eq!(PartitionId::for_key(b"foobar", 7), PartitionId::new(2));
        assert_eq!(PartitionId::for_key(b"anything", 1), PartitionId::new(0));
        assert_eq!(PartitionId::for_key(b"anything", 0), PartitionId::new(0));
        let m = Message::builder().topic("a").key("user-1").build().unwrap();
        assert_eq!(m.key(), Some("user-1"));
        assert_eq!(m.header(Message::KEY_HEADER), Some("user-1"));
    }

    #[test]
    fn ids_are_unique_across_threads() {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(|| (0..10_000).map(|_| MessageId::next()).collect::<Vec<_>>())
            })
            .collect();
        let mut all: Vec<_> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n);
    }

    #[test]
    fn reset_clears() {
        let mut m = Message::builder()
            .topic("a")
            .payload("p")
            .header("h", "v")
            .build()
            .unwrap();
        m.reset();
        assert_eq!(m.topic.as_str(), "_");
        assert!(m.payload.is_empty() && m.headers.is_empty());
    }
}
