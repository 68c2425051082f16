//! A subscription's inbox: the MESSAGE frames the connection's reader
//! received for it, handed over as chunks of raw frames once per read, and
//! turned into [`Message`]s (or borrowed [`MessageView`]s) by the
//! application's own task when it receives them.
//!
//! When a read holds frames for one subscription only — the common case —
//! the chunk is the read buffer itself: no copy. Otherwise the reader copies
//! each frame into a chunk of its subscription. Either way the reader takes
//! one lock per read, and no reference count is shared between two threads
//! per message.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::task::{ready, Context, Poll, Waker};

use bytes::Bytes;
use kaelix_core::outbox::Pushed;
use kaelix_core::protocol::decode::{body_parts, header_pairs};
use kaelix_core::protocol::flags;
use kaelix_core::{CloseReason, Gap, Message, MessageId, Offset, PartitionId, Timestamp, Topic};
use parking_lot::Mutex;
use tokio::sync::Notify;

/// Bytes of a MESSAGE frame before its body: length, opcode, flags, sid.
const FRAME_HEADER: usize = 10;

/// The shared half, written by the reader.
#[derive(Debug)]
pub(crate) struct Inbox {
    state: Mutex<State>,
    space: Notify,
    max_messages: usize,
    max_bytes: usize,
    /// Messages the subscription will not get (see `Subscription::missed`).
    missed: std::sync::atomic::AtomicU64,
    /// Where dropped ones were, until taken.
    gaps: Mutex<Vec<Gap>>,
}

#[derive(Debug, Default)]
struct State {
    chunks: VecDeque<Bytes>,
    count: usize,
    bytes: usize,
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
            missed: std::sync::atomic::AtomicU64::new(0),
            gaps: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn add_gap(&self, gap: Gap) {
        kaelix_core::flow::record_gap(&mut self.gaps.lock(), gap);
    }

    pub(crate) fn take_gaps(&self) -> Vec<Gap> {
        std::mem::take(&mut self.gaps.lock())
    }

    pub(crate) fn add_missed(&self, n: u64) {
        self.missed
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    pub(crate) fn missed(&self) -> u64 {
        self.missed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Moves `chunks` (holding `count` frames) into the inbox. Returns
    /// [`Pushed::Full`], moving nothing, when they do not fit and the inbox
    /// is not empty.
    pub(crate) fn append(&self, chunks: &mut Vec<Bytes>, count: usize) -> Pushed {
        let bytes: usize = chunks.iter().map(Bytes::len).sum();
        let waker = {
            let mut state = self.state.lock();
            if state.closed.is_some() {
                chunks.clear();
                return Pushed::Closed;
            }
            if state.count > 0
                && (state.count + count > self.max_messages || state.bytes + bytes > self.max_bytes)
            {
                return Pushed::Full;
            }
            state.chunks.extend(chunks.drain(..));
            state.count += count;
            state.bytes += bytes;
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

/// A MESSAGE frame at the front of a chunk: where the broker put it, and
/// where its body lies.
struct At {
    body_flags: u8,
    offset: Option<Offset>,
    partition: Option<PartitionId>,
    body: std::ops::Range<usize>,
}

/// The frame at the front of `chunk`. The reader puts only whole,
/// validated MESSAGE frames in chunks.
fn frame_at(chunk: &[u8]) -> Option<At> {
    let header = chunk.get(..FRAME_HEADER)?;
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let end = 4 + len;
    let fl = header[5];
    let mut start = FRAME_HEADER;
    let mut field = |n: usize| {
        let raw = chunk.get(start..start + n)?;
        start += n;
        Some(raw.iter().fold(0u64, |v, b| v << 8 | u64::from(*b)))
    };
    let offset = if fl & flags::OFFSET != 0 {
        Some(Offset::new(field(8)?))
    } else {
        None
    };
    let partition = if fl & flags::IN_PARTITION != 0 {
        Some(PartitionId::new(field(4)? as u32))
    } else {
        None
    };
    (end >= start && end <= chunk.len()).then_some(At {
        body_flags: fl & flags::BODY,
        offset,
        partition,
        body: start..end,
    })
}

/// The receiving half: the chunks taken from the inbox, turned into
/// messages one at a time.
#[derive(Debug)]
pub(crate) struct Receiver {
    chunks: VecDeque<Bytes>,
    received_at: Timestamp,
    last_topic: Option<Topic>,
    /// Messages handed out, and their body bytes, since the last
    /// [`take_counts`](Self::take_counts): what a credit window gives back.
    taken: (u32, u64),
}

impl Receiver {
    pub(crate) fn new() -> Self {
        Receiver {
            chunks: VecDeque::new(),
            received_at: Timestamp::now(),
            last_topic: None,
            taken: (0, 0),
        }
    }

    /// Messages and body bytes handed out since the last call.
    pub(crate) fn take_counts(&mut self) -> (u32, u64) {
        std::mem::take(&mut self.taken)
    }

    /// Messages handed out since the last [`take_counts`](Self::take_counts).
    pub(crate) fn counted(&self) -> (u32, u64) {
        self.taken
    }

    pub(crate) async fn recv(&mut self, inbox: &Inbox) -> Result<Message, CloseReason> {
        poll_fn(|cx| self.poll_recv(inbox, cx)).await
    }

    pub(crate) fn try_recv(&mut self, inbox: &Inbox) -> Option<Message> {
        if self.chunks.is_empty() && !self.take(inbox, None) {
            return None;
        }
        self.next_message()
    }

    pub(crate) fn poll_recv(
        &mut self,
        inbox: &Inbox,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Message, CloseReason>> {
        if let Err(reason) = ready!(self.poll_ready(inbox, cx)) {
            return Poll::Ready(Err(reason));
        }
        match self.next_message() {
            Some(message) => Poll::Ready(Ok(message)),
            // A chunk the reader built always parses; treat the impossible as a close.
            None => Poll::Ready(Err(CloseReason::Protocol("corrupt inbox chunk".into()))),
        }
    }

    /// Ready when something is buffered, or with the reason once the inbox
    /// is closed and drained.
    fn poll_ready(&mut self, inbox: &Inbox, cx: &mut Context<'_>) -> Poll<Result<(), CloseReason>> {
        if !self.chunks.is_empty() || self.take(inbox, Some(cx)) {
            return Poll::Ready(Ok(()));
        }
        let state = inbox.state.lock();
        match &state.closed {
            Some(reason) if state.count == 0 => Poll::Ready(Err(reason.clone())),
            _ => Poll::Pending,
        }
    }

    /// Takes everything queued in one swap; registers `cx` when there is
    /// nothing (and the inbox is open).
    fn take(&mut self, inbox: &Inbox, cx: Option<&mut Context<'_>>) -> bool {
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
        std::mem::swap(&mut state.chunks, &mut self.chunks);
        state.count = 0;
        state.bytes = 0;
        drop(state);
        inbox.space.notify_waiters();
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
        poll_fn(|cx| self.poll_ready(inbox, cx)).await?;
        let mut n = 0;
        for chunk in self.chunks.drain(..) {
            let mut rest = &chunk[..];
            // The last topic checked in this chunk: consecutive messages
            // mostly share theirs, and comparing is cheaper than checking.
            let mut last: &str = "";
            while let Some(at) = frame_at(rest) {
                let body_bytes = &rest[at.body.clone()];
                rest = &rest[at.body.end..];
                self.taken.0 += 1;
                self.taken.1 += body_bytes.len() as u64;
                let Ok(parts) = body_parts(body_bytes, at.body_flags) else {
                    continue;
                };
                let topic = if last.as_bytes() == parts.topic {
                    last
                } else {
                    let Ok(topic) = std::str::from_utf8(parts.topic) else {
                        continue;
                    };
                    last = topic;
                    topic
                };
                f(MessageView {
                    topic,
                    payload: parts.payload,
                    partition: at.partition.or(parts.partition.map(PartitionId::new)),
                    offset: at.offset,
                    headers: parts.headers,
                    received_at: self.received_at,
                });
                n += 1;
            }
        }
        Ok(n)
    }

    fn next_message(&mut self) -> Option<Message> {
        let chunk = self.chunks.front_mut()?;
        let at = frame_at(chunk)?;
        let frame = chunk.split_to(at.body.end);
        if chunk.is_empty() {
            self.chunks.pop_front();
        }
        let body = frame.slice(at.body);
        self.taken.0 += 1;
        self.taken.1 += body.len() as u64;
        let parts = body_parts(&body, at.body_flags).ok()?;
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
            partition: at.partition.or(parts.partition.map(PartitionId::new)),
            offset: at.offset,
            headers: parts
                .headers
                .map(|h| header_pairs(h).collect())
                .unwrap_or_default(),
        })
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
    /// The partition it is in (for a topic with more than one, or when
    /// the publisher chose one).
    pub partition: Option<PartitionId>,
    /// Its offset in its topic partition.
    pub offset: Option<Offset>,
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
            offset: self.offset,
            headers: self
                .headers
                .map(|h| header_pairs(h).collect())
                .unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use kaelix_core::protocol::{encode_deliver, MessageBody};
    use kaelix_core::Headers;

    fn frame(sid: u32, body: &MessageBody) -> Bytes {
        let mut b = BytesMut::new();
        encode_deliver(&mut b, sid, None, body);
        b.freeze()
    }

    fn body(topic: &str, payload: &str) -> MessageBody {
        MessageBody::new(
            &Topic::new(topic).unwrap(),
            None,
            &Headers::new(),
            &Bytes::copy_from_slice(payload.as_bytes()),
        )
    }

    #[tokio::test]
    async fn frames_become_messages_in_order_then_the_reason() {
        let inbox = Inbox::new(100, 1 << 20);
        let mut rx = Receiver::new();
        let mut two = BytesMut::new();
        two.extend_from_slice(&frame(1, &body("a.b", "1")));
        two.extend_from_slice(&frame(1, &body("a.b", "2")));
        let mut chunks = vec![two.freeze(), frame(1, &body("a.c", "3"))];
        assert_eq!(inbox.append(&mut chunks, 3), Pushed::More);
        assert!(chunks.is_empty());
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
    async fn a_batch_names_each_message_by_its_own_topic() {
        let inbox = Inbox::new(100, 1 << 20);
        let mut rx = Receiver::new();
        // One chunk: the topic a view names is checked once per change.
        let mut mixed = BytesMut::new();
        for (topic, payload) in [("a.b", "1"), ("a.b", "2"), ("a.bc", "3"), ("a.b", "4")] {
            mixed.extend_from_slice(&frame(1, &body(topic, payload)));
        }
        let mut chunks = vec![mixed.freeze()];
        inbox.append(&mut chunks, 4);
        let mut seen = Vec::new();
        let n = rx
            .recv_batch(&inbox, &mut |m| {
                seen.push(format!(
                    "{} {}",
                    m.topic,
                    String::from_utf8_lossy(m.payload)
                ))
            })
            .await
            .unwrap();
        assert_eq!(n, 4);
        assert_eq!(seen, ["a.b 1", "a.b 2", "a.bc 3", "a.b 4"]);
    }

    #[tokio::test]
    async fn batches_are_borrowed_views() {
        let inbox = Inbox::new(100, 1 << 20);
        let mut rx = Receiver::new();
        let headers: Headers = [("k", "v")].into_iter().collect();
        let b = MessageBody::new(
            &Topic::new("x.y").unwrap(),
            Some(PartitionId::new(2)),
            &headers,
            &Bytes::from_static(b"pp"),
        );
        let mut chunks = vec![frame(4, &b), frame(4, &body("x.z", "q"))];
        inbox.append(&mut chunks, 2);
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
        let f = frame(1, &body("t", "x"));
        assert_eq!(
            inbox.append(&mut vec![f.clone(), f.clone()], 2),
            Pushed::More
        );
        let mut more = vec![f.clone()];
        assert_eq!(inbox.append(&mut more, 1), Pushed::Full);
        assert_eq!(more.len(), 1);
        assert!(rx.try_recv(&inbox).is_some());
        assert_eq!(inbox.append(&mut more, 1), Pushed::More);
    }
}
