//! A subscription's inbox: the MESSAGE bodies the connection's reader
//! received for it, appended as bytes once per read, and turned into
//! [`Message`]s by the application's own task when it receives them.
//!
//! Keeping the per-message work (slicing, topic lookup, message ids) on the
//! receiving task means the reader does one copy and one lock per read, and
//! no reference count is shared between two threads per message.
//!
//! Entry layout in the buffer: `u8` body flags, `u32` body length, body.

use std::future::poll_fn;
use std::task::{Context, Poll, Waker};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kaelix_core::outbox::Pushed;
use kaelix_core::protocol::decode::{body_parts, header_pairs};
use kaelix_core::{CloseReason, Message, MessageId, PartitionId, Timestamp, Topic};
use parking_lot::Mutex;
use tokio::sync::Notify;

/// Bytes of an entry before its body.
const ENTRY_HEADER: usize = 5;

/// The shared half, written by the reader.
#[derive(Debug)]
pub(crate) struct Inbox {
    state: Mutex<State>,
    space: Notify,
    max_messages: usize,
    max_bytes: usize,
}

#[derive(Debug, Default)]
struct State {
    buf: BytesMut,
    count: usize,
    waker: Option<Waker>,
    closed: Option<CloseReason>,
}

impl Inbox {
    pub(crate) fn new(max_messages: usize, max_bytes: usize) -> Self {
        Inbox {
            state: Mutex::new(State::default()),
            space: Notify::new(),
            max_messages: max_messages.max(1),
            max_bytes,
        }
    }

    /// Appends `count` staged entries. Returns [`Pushed::Full`] (appending
    /// nothing) when they do not fit and the inbox is not empty.
    pub(crate) fn append(&self, staged: &mut BytesMut, count: usize) -> Pushed {
        let waker = {
            let mut state = self.state.lock();
            if state.closed.is_some() {
                staged.clear();
                return Pushed::Closed;
            }
            if state.count > 0
                && (state.count + count > self.max_messages
                    || state.buf.len() + staged.len() > self.max_bytes)
            {
                return Pushed::Full;
            }
            if state.buf.is_empty() {
                std::mem::swap(&mut state.buf, staged);
            } else {
                state.buf.extend_from_slice(staged);
                staged.clear();
            }
            state.count += count;
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        Pushed::More
    }

    /// Waits until the receiver has taken what is queued, or the inbox closes.
    pub(crate) async fn wait_for_space(&self) {
        loop {
            let notified = self.space.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let state = self.state.lock();
                if state.closed.is_some() || state.count == 0 {
                    return;
                }
            }
            notified.await;
        }
    }

    pub(crate) fn close(&self, reason: CloseReason) {
        let waker = {
            let mut state = self.state.lock();
            if state.closed.is_none() {
                state.closed = Some(reason);
            }
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        self.space.notify_waiters();
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.state.lock().closed.is_some()
    }
}

/// Appends one MESSAGE body to a reader's staging buffer.
pub(crate) fn stage(staged: &mut BytesMut, body_flags: u8, body: &[u8]) {
    staged.reserve(ENTRY_HEADER + body.len());
    staged.put_u8(body_flags);
    staged.put_u32(body.len() as u32);
    staged.put_slice(body);
}

/// The receiving half: what was taken from the inbox, turned into messages
/// one at a time.
#[derive(Debug)]
pub(crate) struct Receiver {
    local: Bytes,
    /// Emptied buffers handed back to the inbox for reuse.
    spare: BytesMut,
    received_at: Timestamp,
    last_topic: Option<Topic>,
}

impl Receiver {
    pub(crate) fn new() -> Self {
        Receiver {
            local: Bytes::new(),
            spare: BytesMut::new(),
            received_at: Timestamp::now(),
            last_topic: None,
        }
    }

    pub(crate) async fn recv(&mut self, inbox: &Inbox) -> Result<Message, CloseReason> {
        poll_fn(|cx| self.poll_recv(inbox, cx)).await
    }

    pub(crate) fn try_recv(&mut self, inbox: &Inbox) -> Option<Message> {
        if self.local.is_empty() && !self.take(inbox, None) {
            return None;
        }
        self.next_message()
    }

    pub(crate) fn poll_recv(
        &mut self,
        inbox: &Inbox,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Message, CloseReason>> {
        if self.local.is_empty() && !self.take(inbox, Some(cx)) {
            let state = inbox.state.lock();
            if let Some(reason) = &state.closed {
                if state.count == 0 {
                    return Poll::Ready(Err(reason.clone()));
                }
            }
            return Poll::Pending;
        }
        match self.next_message() {
            Some(message) => Poll::Ready(Ok(message)),
            // An entry the reader staged always parses; treat the impossible as a close.
            None => Poll::Ready(Err(CloseReason::Protocol("corrupt inbox entry".into()))),
        }
    }

    /// Takes everything queued in one swap; registers `cx` when there is
    /// nothing (and the inbox is open).
    fn take(&mut self, inbox: &Inbox, cx: Option<&mut Context<'_>>) -> bool {
        // Reuse the last buffer when every message made from it is gone.
        let old = std::mem::take(&mut self.local);
        if let Ok(mut reusable) = old.try_into_mut() {
            reusable.clear();
            if reusable.capacity() > self.spare.capacity() {
                self.spare = reusable;
            }
        }
        let mut state = inbox.state.lock();
        if state.count == 0 {
            if let (Some(cx), None) = (cx, &state.closed) {
                match &state.waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => state.waker = Some(cx.waker().clone()),
                }
            }
            return false;
        }
        std::mem::swap(&mut state.buf, &mut self.spare);
        state.count = 0;
        drop(state);
        inbox.space.notify_waiters();
        self.local = std::mem::take(&mut self.spare).freeze();
        self.received_at = Timestamp::now();
        true
    }

    /// Waits until messages are buffered (or the inbox closes), then hands
    /// each buffered message to `f` as a borrowed view. Returns how many.
    pub(crate) async fn recv_batch<F: FnMut(MessageView<'_>)>(
        &mut self,
        inbox: &Inbox,
        f: &mut F,
    ) -> Result<usize, CloseReason> {
        poll_fn(|cx| {
            if !self.local.is_empty() || self.take(inbox, Some(cx)) {
                return Poll::Ready(Ok(()));
            }
            let state = inbox.state.lock();
            match &state.closed {
                Some(reason) if state.count == 0 => Poll::Ready(Err(reason.clone())),
                _ => Poll::Pending,
            }
        })
        .await?;
        let mut n = 0;
        let mut rest = &self.local[..];
        while rest.len() >= ENTRY_HEADER {
            let flags = rest[0];
            let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
            let Some(body) = rest.get(ENTRY_HEADER..ENTRY_HEADER + len) else {
                break;
            };
            rest = &rest[ENTRY_HEADER + len..];
            let Ok(parts) = body_parts(body, flags) else {
                continue;
            };
            let Ok(topic) = std::str::from_utf8(parts.topic) else {
                continue;
            };
            f(MessageView {
                topic,
                payload: parts.payload,
                partition: parts.partition.map(PartitionId::new),
                headers: parts.headers,
                received_at: self.received_at,
            });
            n += 1;
        }
        self.local.clear();
        Ok(n)
    }

    fn next_message(&mut self) -> Option<Message> {
        if self.local.len() < ENTRY_HEADER {
            return None;
        }
        let flags = self.local[0];
        let len = u32::from_be_bytes([self.local[1], self.local[2], self.local[3], self.local[4]])
            as usize;
        self.local.advance(ENTRY_HEADER);
        let body = self.local.split_to(len.min(self.local.len()));
        let parts = body_parts(&body, flags).ok()?;
        let topic = match &self.last_topic {
            Some(t) if t.as_bytes() == parts.topic => t.clone(),
            _ => {
                // A copy, so that a remembered topic does not pin a whole read buffer.
                let t = Topic::from_bytes(Bytes::copy_from_slice(parts.topic)).ok()?;
                self.last_topic = Some(t.clone());
                t
            }
        };
        let payload_at = body.len() - parts.payload.len();
        Some(Message {
            id: MessageId::next(),
            topic,
            payload: body.slice(payload_at..),
            timestamp: self.received_at,
            partition: parts.partition.map(PartitionId::new),
            offset: None,
            headers: parts
                .headers
                .map(|h| header_pairs(h).collect())
                .unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kaelix_core::protocol::MessageBody;
    use kaelix_core::Headers;

    fn body(topic: &str, payload: &str) -> MessageBody {
        MessageBody::new(
            &Topic::new(topic).unwrap(),
            None,
            &Headers::new(),
            &Bytes::copy_from_slice(payload.as_bytes()),
        )
    }

    #[tokio::test]
    async fn entries_become_messages_in_order_then_the_reason() {
        let inbox = Inbox::new(100, 1 << 20);
        let mut rx = Receiver::new();
        let mut staged = BytesMut::new();
        for (t, p) in [("a.b", "1"), ("a.b", "2"), ("a.c", "3")] {
            let b = body(t, p);
            stage(&mut staged, b.flags(), b.raw());
        }
        assert_eq!(inbox.append(&mut staged, 3), Pushed::More);
        assert!(staged.is_empty());
        inbox.close(CloseReason::ShuttingDown);
        let got: Vec<(String, String)> = [0, 1, 2]
            .iter()
            .map(|_| rx.try_recv(&inbox).unwrap())
            .map(|m| {
                (
                    m.topic.to_string(),
                    String::from_utf8(m.payload.to_vec()).unwrap(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("a.b".into(), "1".into()),
                ("a.b".into(), "2".into()),
                ("a.c".into(), "3".into())
            ]
        );
        assert_eq!(
            rx.recv(&inbox).await.unwrap_err(),
            CloseReason::ShuttingDown
        );
    }

    #[tokio::test]
    async fn batches_are_borrowed_views() {
        let inbox = Inbox::new(100, 1 << 20);
        let mut rx = Receiver::new();
        let mut staged = BytesMut::new();
        let headers: Headers = [("k", "v")].into_iter().collect();
        let b = MessageBody::new(
            &Topic::new("x.y").unwrap(),
            Some(PartitionId::new(2)),
            &headers,
            &Bytes::from_static(b"pp"),
        );
        stage(&mut staged, b.flags(), b.raw());
        let plain = body("x.z", "q");
        stage(&mut staged, plain.flags(), plain.raw());
        inbox.append(&mut staged, 2);
        let mut seen = Vec::new();
        let n = rx
            .recv_batch(&inbox, &mut |m| {
                seen.push((
                    m.topic.to_string(),
                    m.payload.to_vec(),
                    m.partition,
                    m.header("k"),
                ));
                assert_eq!(m.to_message().unwrap().payload, m.payload);
            })
            .await
            .unwrap();
        assert_eq!(n, 2);
        assert_eq!(
            seen[0],
            (
                "x.y".into(),
                b"pp".to_vec(),
                Some(PartitionId::new(2)),
                Some("v".into())
            )
        );
        assert_eq!(seen[1], ("x.z".into(), b"q".to_vec(), None, None));
        assert!(rx.try_recv(&inbox).is_none());
    }

    #[test]
    fn a_full_inbox_refuses_until_taken() {
        let inbox = Inbox::new(2, 1 << 20);
        let mut rx = Receiver::new();
        let b = body("t", "x");
        let mut staged = BytesMut::new();
        stage(&mut staged, b.flags(), b.raw());
        stage(&mut staged, b.flags(), b.raw());
        assert_eq!(inbox.append(&mut staged, 2), Pushed::More);
        stage(&mut staged, b.flags(), b.raw());
        assert_eq!(inbox.append(&mut staged, 1), Pushed::Full);
        assert!(rx.try_recv(&inbox).is_some());
        assert_eq!(inbox.append(&mut staged, 1), Pushed::More);
    }
}

/// A message borrowed from a subscription's buffer, valid while the
/// callback of [`Subscription::recv_batch`](crate::Subscription::recv_batch)
/// runs: nothing is copied or allocated to make it.
#[derive(Debug, Clone, Copy)]
pub struct MessageView<'a> {
    /// The topic it was published on.
    pub topic: &'a str,
    /// The payload.
    pub payload: &'a [u8],
    /// The partition the publisher chose, if any.
    pub partition: Option<PartitionId>,
    headers: Option<&'a [u8]>,
    received_at: Timestamp,
}

impl MessageView<'_> {
    /// The value of header `name`, if set.
    pub fn header(&self, name: &str) -> Option<String> {
        header_pairs(self.headers?)
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
    }

    /// An owned [`Message`] with the same contents.
    pub fn to_message(&self) -> Option<Message> {
        Some(Message {
            id: MessageId::next(),
            topic: Topic::new(self.topic).ok()?,
            payload: Bytes::copy_from_slice(self.payload),
            timestamp: self.received_at,
            partition: self.partition,
            offset: None,
            headers: self
                .headers
                .map(|h| header_pairs(h).collect())
                .unwrap_or_default(),
        })
    }
}
