//! Reusable message instances.

use parking_lot::Mutex;

use crate::message::{Message, MessageId};

/// A pool of message instances, so that producers that make many messages
/// reuse their header allocations instead of making new ones.
///
/// ```
/// use bytes::Bytes;
/// use kaelix_core::{MessagePool, Topic};
/// let message_pool = MessagePool::new(1000);
/// let mut message = message_pool.acquire();
/// message.reset();
/// message.set_topic(Topic::new("events.a")?);
/// message.set_payload(Bytes::from("data"));
/// message_pool.release(message);
/// assert_eq!(message_pool.available(), 1);
/// # Ok::<(), kaelix_core::Error>(())
/// ```
#[derive(Debug)]
pub struct MessagePool {
    free: Mutex<Vec<Message>>,
    capacity: usize,
}

impl MessagePool {
    /// A pool that keeps at most `capacity` released messages.
    pub fn new(capacity: usize) -> Self {
        MessagePool {
            free: Mutex::new(Vec::with_capacity(capacity)),
            capacity,
        }
    }

    /// A cleared message with a fresh id: reused when one is free, new otherwise.
    pub fn acquire(&self) -> Message {
        let mut message = self.free.lock().pop().unwrap_or_else(|| Message {
            id: MessageId::next(),
            topic: crate::message::placeholder_topic(),
            payload: bytes::Bytes::new(),
            timestamp: crate::Timestamp::now(),
            partition: None,
            offset: None,
            headers: crate::Headers::new(),
        });
        message.id = MessageId::next();
        message
    }

    /// Gives a message back. It is cleared; past `capacity` it is dropped.
    pub fn release(&self, mut message: Message) {
        message.reset();
        let mut free = self.free.lock();
        if free.len() < self.capacity {
            free.push(message);
        }
    }

    /// Messages waiting to be reused.
    pub fn available(&self) -> usize {
        self.free.lock().len()
    }

    /// The most messages the pool keeps.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_and_bounds() {
        let pool = MessagePool::new(1);
        let a = pool.acquire();
        let b = pool.acquire();
        assert_ne!(a.id, b.id);
        let mut a2 = a.clone();
        a2.set_header("h", "v");
        pool.release(a2);
        pool.release(b);
        assert_eq!(pool.available(), 1);
        let c = pool.acquire();
        assert!(c.headers.is_empty());
        assert_ne!(c.id, a.id);
        assert_eq!(pool.available(), 0);
    }
}
