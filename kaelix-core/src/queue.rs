//! The bounded message queue behind a receiver: an in-process subscriber of
//! the broker, or a subscription of the consumer client.
//!
//! The producer appends under a short lock and, when the queue was empty,
//! learns that the receiver needs a wake-up ([`Pushed::First`]), which it
//! gives once per batch. The receiver takes everything queued in one swap
//! and then serves from its own buffer without locking.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::error::CloseReason;
use crate::flow::{record_gap, Gap};
use crate::message::Message;
pub use crate::outbox::Pushed;

/// A bounded queue of messages with one receiver.
#[derive(Debug)]
pub struct MessageQueue {
    state: Mutex<State>,
    space: Notify,
    /// Set with `State::closed`, readable without the lock.
    closed_flag: AtomicBool,
    max_messages: usize,
    max_bytes: usize,
}

#[derive(Debug, Default)]
struct State {
    items: VecDeque<Message>,
    bytes: usize,
    waker: Option<Waker>,
    closed: Option<CloseReason>,
    /// Messages dropped to make room (the drop-oldest policy).
    dropped: u64,
    /// Where they were, until the receiver takes the list.
    gaps: Vec<Gap>,
}

impl MessageQueue {
    /// A queue that holds at most `max_messages` messages and `max_bytes`
    /// payload bytes (one message may exceed the bytes bound when the queue
    /// is empty).
    pub fn new(max_messages: usize, max_bytes: usize) -> Self {
        MessageQueue {
            state: Mutex::new(State::default()),
            space: Notify::new(),
            closed_flag: AtomicBool::new(false),
            max_messages: max_messages.max(1),
            max_bytes,
        }
    }

    /// Appends a message. Call [`wake`](Self::wake) when this returns
    /// [`Pushed::First`], after the batch is appended.
    pub fn push(&self, message: Message) -> Pushed {
        self.try_push(message).unwrap_or(Pushed::Full)
    }

    /// Like [`push`](Self::push), but a message that does not fit comes back.
    // The message is handed back by value: boxing it would allocate.
    #[allow(clippy::result_large_err)]
    pub fn try_push(&self, message: Message) -> Result<Pushed, Message> {
        let mut state = self.state.lock();
        if state.closed.is_some() {
            return Ok(Pushed::Closed);
        }
        let size = message.payload.len();
        if state.items.len() >= self.max_messages
            || (!state.items.is_empty() && state.bytes + size > self.max_bytes)
        {
            return Err(message);
        }
        state.items.push_back(message);
        state.bytes += size;
        Ok(if state.items.len() == 1 {
            Pushed::First
        } else {
            Pushed::More
        })
    }

    /// Appends all of `messages` with one lock, or none of them: returns
    /// [`Pushed::Full`] when they do not fit (and the queue is not empty).
    /// `messages` is left empty unless the answer is `Full`.
    pub fn push_all(&self, messages: &mut Vec<Message>) -> Pushed {
        let mut state = self.state.lock();
        if state.closed.is_some() {
            messages.clear();
            return Pushed::Closed;
        }
        let size: usize = messages.iter().map(|m| m.payload.len()).sum();
        let was_empty = state.items.is_empty();
        if !was_empty
            && (state.items.len() + messages.len() > self.max_messages
                || state.bytes + size > self.max_bytes)
        {
            return Pushed::Full;
        }
        if was_empty && messages.len() > self.max_messages {
            return Pushed::Full;
        }
        state.items.extend(messages.drain(..));
        state.bytes += size;
        if was_empty {
            Pushed::First
        } else {
            Pushed::More
        }
    }

    /// Appends all of `messages` whatever the limits (the block policy:
    /// the caller then waits for [`wait_for_space`](Self::wait_for_space)).
    pub fn push_all_over(&self, messages: &mut Vec<Message>) -> Pushed {
        let mut state = self.state.lock();
        if state.closed.is_some() {
            messages.clear();
            return Pushed::Closed;
        }
        let was_empty = state.items.is_empty();
        state.bytes += messages.iter().map(|m| m.payload.len()).sum::<usize>();
        state.items.extend(messages.drain(..));
        if was_empty {
            Pushed::First
        } else {
            Pushed::More
        }
    }

    /// Appends all of `messages`, then drops the oldest queued messages
    /// until the queue is within its limits again (the drop-oldest
    /// policy). Returns what became of the append and how many were
    /// dropped; the drops are recorded as gaps for the receiver.
    pub fn push_all_dropping_oldest(&self, messages: &mut Vec<Message>) -> (Pushed, u64) {
        let mut state = self.state.lock();
        if state.closed.is_some() {
            messages.clear();
            return (Pushed::Closed, 0);
        }
        let was_empty = state.items.is_empty();
        state.bytes += messages.iter().map(|m| m.payload.len()).sum::<usize>();
        state.items.extend(messages.drain(..));
        let mut dropped = 0;
        while state.items.len() > self.max_messages
            || (state.items.len() > 1 && state.bytes > self.max_bytes)
        {
            let Some(old) = state.items.pop_front() else {
                break;
            };
            state.bytes -= old.payload.len();
            dropped += 1;
            if let Some(offset) = old.offset {
                record_gap(
                    &mut state.gaps,
                    Gap {
                        topic: old.topic,
                        partition: old.partition,
                        first: offset,
                        last: offset,
                        count: 1,
                    },
                );
            }
        }
        state.dropped += dropped;
        let pushed = if was_empty || dropped > 0 && state.items.len() == 1 {
            Pushed::First
        } else {
            Pushed::More
        };
        (pushed, dropped)
    }

    /// Messages dropped so far to make room (the drop-oldest policy).
    pub fn dropped(&self) -> u64 {
        self.state.lock().dropped
    }

    /// The gaps recorded since the last call, oldest first.
    pub fn take_gaps(&self) -> Vec<Gap> {
        std::mem::take(&mut self.state.lock().gaps)
    }

    /// Whether the queue is closed, without taking the lock: a hint for
    /// routing, which re-checks under the lock when it appends.
    pub fn is_closed_hint(&self) -> bool {
        self.closed_flag.load(Ordering::Relaxed)
    }

    /// Wakes the receiver if it is waiting.
    pub fn wake(&self) {
        let waker = self.state.lock().waker.take();
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Waits until a message fits, or the queue closes.
    pub async fn wait_for_space(&self) {
        loop {
            let notified = self.space.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let state = self.state.lock();
                if state.closed.is_some()
                    || (state.items.len() < self.max_messages && state.bytes < self.max_bytes)
                {
                    return;
                }
            }
            notified.await;
        }
    }

    /// Closes the queue: the receiver gets what is queued, then `reason`.
    pub fn close(&self, reason: CloseReason) {
        let waker = {
            let mut state = self.state.lock();
            if state.closed.is_none() {
                state.closed = Some(reason);
                self.closed_flag.store(true, Ordering::Relaxed);
            }
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        self.space.notify_waiters();
    }

    /// True once closed.
    pub fn is_closed(&self) -> bool {
        self.state.lock().closed.is_some()
    }

    /// Messages queued and not yet taken by the receiver.
    pub fn len(&self) -> usize {
        self.state.lock().items.len()
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The receiving end of a [`MessageQueue`].
#[derive(Debug)]
pub struct QueueReceiver {
    queue: std::sync::Arc<MessageQueue>,
    local: VecDeque<Message>,
}

impl QueueReceiver {
    /// The receiver of `queue`. A queue must have only one.
    pub fn new(queue: std::sync::Arc<MessageQueue>) -> Self {
        QueueReceiver {
            queue,
            local: VecDeque::new(),
        }
    }

    /// The next message, or why there will be no more.
    pub async fn recv(&mut self) -> Result<Message, CloseReason> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// The next message if one is queued.
    pub fn try_recv(&mut self) -> Option<Message> {
        if self.local.is_empty() {
            self.refill();
        }
        self.local.pop_front()
    }

    /// Polls for the next message.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<Message, CloseReason>> {
        if let Some(message) = self.local.pop_front() {
            return Poll::Ready(Ok(message));
        }
        let mut state = self.queue.state.lock();
        if take_all(&mut state, &mut self.local) {
            drop(state);
            self.queue.space.notify_waiters();
            return Poll::Ready(Ok(self.local.pop_front().unwrap_or_else(|| unreachable!())));
        }
        if let Some(reason) = &state.closed {
            return Poll::Ready(Err(reason.clone()));
        }
        match &state.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => state.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    fn refill(&mut self) {
        let mut state = self.queue.state.lock();
        if take_all(&mut state, &mut self.local) {
            drop(state);
            self.queue.space.notify_waiters();
        }
    }

    /// The queue this receives from.
    pub fn queue(&self) -> &std::sync::Arc<MessageQueue> {
        &self.queue
    }
}

/// Moves everything queued into `local` (which is empty) in one swap; false
/// if nothing was queued.
fn take_all(state: &mut State, local: &mut VecDeque<Message>) -> bool {
    if state.items.is_empty() {
        return false;
    }
    std::mem::swap(&mut state.items, local);
    state.bytes = 0;
    true
}

impl Drop for QueueReceiver {
    fn drop(&mut self) {
        self.queue.close(CloseReason::Closed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Topic;
    use std::sync::Arc;

    fn msg(i: usize) -> Message {
        Message::new(Topic::new("t").unwrap(), format!("{i}")).unwrap()
    }

    #[tokio::test]
    async fn delivers_in_order_then_reason() {
        let queue = Arc::new(MessageQueue::new(3, 1 << 20));
        let mut rx = QueueReceiver::new(queue.clone());
        assert_eq!(queue.push(msg(0)), Pushed::First);
        assert_eq!(queue.push(msg(1)), Pushed::More);
        assert_eq!(queue.push(msg(2)), Pushed::More);
        assert_eq!(queue.push(msg(3)), Pushed::Full);
        queue.close(CloseReason::SlowConsumer);
        for i in 0..3 {
            assert_eq!(rx.recv().await.unwrap().payload, format!("{i}"));
        }
        assert_eq!(rx.recv().await.unwrap_err(), CloseReason::SlowConsumer);
    }

    #[test]
    fn push_all_is_all_or_nothing() {
        let queue = MessageQueue::new(3, 1 << 20);
        assert_eq!(queue.push_all(&mut vec![msg(0), msg(1)]), Pushed::First);
        let mut two = vec![msg(2), msg(3)];
        assert_eq!(queue.push_all(&mut two), Pushed::Full);
        assert_eq!((two.len(), queue.len()), (2, 2));
        assert_eq!(queue.push_all(&mut vec![msg(2)]), Pushed::More);
        queue.close(CloseReason::Closed);
        assert!(queue.is_closed_hint());
        assert_eq!(queue.push_all(&mut two), Pushed::Closed);
        assert!(two.is_empty());
    }

    #[tokio::test]
    async fn receiver_wakes_on_push_and_producer_on_space() {
        let queue = Arc::new(MessageQueue::new(1, 1 << 20));
        let mut rx = QueueReceiver::new(queue.clone());
        let producer = {
            let queue = queue.clone();
            tokio::spawn(async move {
                for i in 0..100 {
                    loop {
                        match queue.push(msg(i)) {
                            Pushed::First => {
                                queue.wake();
                                break;
                            }
                            Pushed::More => break,
                            Pushed::Full => queue.wait_for_space().await,
                            Pushed::Closed => return,
                        }
                    }
                }
            })
        };
        for i in 0..100 {
            assert_eq!(rx.recv().await.unwrap().payload, format!("{i}"));
        }
        producer.await.unwrap();
    }
}
