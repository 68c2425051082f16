//! Many messages moved as one.

use crate::message::Message;

/// An ordered batch of messages.
///
/// ```
/// use kaelix_core::{Message, MessageBatch, Topic};
/// let topic = Topic::new("events.a")?;
/// let messages = (0..250)
///     .map(|i| Message::new(topic.clone(), format!("m{i}")))
///     .collect::<Result<Vec<_>, _>>()?;
/// let batch = MessageBatch::new(messages);
/// let parts = batch.split(100);
/// assert_eq!(parts.iter().map(MessageBatch::len).collect::<Vec<_>>(), [100, 100, 50]);
/// let merged = MessageBatch::merge(parts);
/// assert_eq!(merged.len(), 250);
/// for message in batch {
///     assert_eq!(message.topic, topic);
/// }
/// # Ok::<(), kaelix_core::Error>(())
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MessageBatch {
    messages: Vec<Message>,
}

impl MessageBatch {
    /// A batch of `messages`, in order.
    pub fn new(messages: Vec<Message>) -> Self {
        MessageBatch { messages }
    }

    /// An empty batch with room for `capacity` messages.
    pub fn with_capacity(capacity: usize) -> Self {
        MessageBatch {
            messages: Vec::with_capacity(capacity),
        }
    }

    /// Batches of at most `size` messages each, in order. Payloads are
    /// shared, not copied. A `size` of 0 is taken as 1.
    pub fn split(&self, size: usize) -> Vec<MessageBatch> {
        self.messages
            .chunks(size.max(1))
            .map(|chunk| MessageBatch::new(chunk.to_vec()))
            .collect()
    }

    /// One batch holding every message of `batches`, in order.
    pub fn merge(batches: Vec<MessageBatch>) -> MessageBatch {
        let total = batches.iter().map(MessageBatch::len).sum();
        let mut messages = Vec::with_capacity(total);
        for batch in batches {
            messages.extend(batch.messages);
        }
        MessageBatch { messages }
    }

    /// Appends a message.
    pub fn push(&mut self, message: Message) {
        self.messages.push(message);
    }

    /// Number of messages.
    pub fn len(&self) -> usize {
        self.messages.len()
    }

    /// True when there are no messages.
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// Bytes of topics, headers and payloads of every message.
    pub fn total_bytes(&self) -> usize {
        self.messages.iter().map(Message::size_bytes).sum()
    }

    /// The messages, in order.
    pub fn iter(&self) -> std::slice::Iter<'_, Message> {
        self.messages.iter()
    }

    /// The messages as a slice.
    pub fn messages(&self) -> &[Message] {
        &self.messages
    }

    /// The messages, taken out of the batch.
    pub fn into_messages(self) -> Vec<Message> {
        self.messages
    }
}

impl From<Vec<Message>> for MessageBatch {
    fn from(messages: Vec<Message>) -> Self {
        MessageBatch::new(messages)
    }
}

impl FromIterator<Message> for MessageBatch {
    fn from_iter<I: IntoIterator<Item = Message>>(iter: I) -> Self {
        MessageBatch::new(iter.into_iter().collect())
    }
}

impl IntoIterator for MessageBatch {
    type Item = Message;
    type IntoIter = std::vec::IntoIter<Message>;
    fn into_iter(self) -> Self::IntoIter {
        self.messages.into_iter()
    }
}

impl<'a> IntoIterator for &'a MessageBatch {
    type Item = &'a Message;
    type IntoIter = std::slice::Iter<'a, Message>;
    fn into_iter(self) -> Self::IntoIter {
        self.messages.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Topic;

    fn batch(n: usize) -> MessageBatch {
        let topic = Topic::new("t").unwrap();
        (0..n)
            .map(|i| Message::new(topic.clone(), vec![0u8; i]).unwrap())
            .collect()
    }

    #[test]
    fn split_merge_keep_order_and_bytes() {
        let b = batch(10);
        assert_eq!(b.total_bytes(), 10 + (0..10).sum::<usize>());
        let parts = b.split(3);
        assert_eq!(parts.len(), 4);
        assert_eq!(b.split(0).len(), 10);
        let merged = MessageBatch::merge(parts);
        assert_eq!(merged, b);
        assert!(MessageBatch::default().is_empty());
        assert_eq!(MessageBatch::merge(vec![]).len(), 0);
    }
}
