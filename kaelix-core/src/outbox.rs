//! The bounded write buffer in front of a socket.
//!
//! Producers append encoded frames under a short lock; one writer task swaps
//! the whole buffer out and sends it with a single write. A producer that
//! appends to an empty buffer learns so ([`Pushed::First`]) and wakes the
//! writer, usually once per batch it routed rather than once per frame.
//!
//! ```text
//!  router / client API ──push──▶ [ BytesMut ≤ limit ] ──swap──▶ writer ──write──▶ socket
//! ```

use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use parking_lot::Mutex;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

use crate::error::CloseReason;

/// Writes the writer makes before it lets other tasks on its worker run.
const WRITES_PER_YIELD: u32 = 16;

/// What became of an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Appended to an empty buffer: the writer needs a [`Outbox::wake`].
    First,
    /// Appended behind data the writer already knows of.
    More,
    /// Not appended: it would pass the limit.
    Full,
    /// Not appended: the outbox is closing.
    Closed,
}

/// A connection's bounded output buffer.
#[derive(Debug)]
pub struct Outbox {
    state: Mutex<State>,
    ready: Notify,
    space: Notify,
    closing: Notify,
    /// Set with `State::closed`, readable without the lock.
    closed_flag: AtomicBool,
    /// Shared with the broker's live limits, so a reload moves it.
    limit: Arc<AtomicUsize>,
}

#[derive(Debug)]
struct State {
    buf: BytesMut,
    closed: Option<CloseReason>,
    /// When the oldest data appended (not pushed) to `buf` was queued.
    since: Option<Instant>,
}

impl Outbox {
    /// An outbox that holds at most `limit` bytes (one frame may exceed it
    /// when the buffer is empty, so that no frame is unsendable).
    pub fn new(limit: usize) -> Self {
        Self::with_shared_limit(Arc::new(AtomicUsize::new(limit)))
    }

    /// An outbox whose limit is read from `limit` at each append, so the
    /// owner can change it for every outbox at once.
    pub fn with_shared_limit(limit: Arc<AtomicUsize>) -> Self {
        Outbox {
            state: Mutex::new(State {
                // Grown on first use: an idle connection holds no buffer.
                buf: BytesMut::new(),
                closed: None,
                since: None,
            }),
            ready: Notify::new(),
            space: Notify::new(),
            closing: Notify::new(),
            closed_flag: AtomicBool::new(false),
            limit,
        }
    }

    /// Appends `len` bytes written by `write`. The caller wakes the writer
    /// when this returns [`Pushed::First`].
    pub fn push(&self, len: usize, write: impl FnOnce(&mut BytesMut)) -> Pushed {
        let mut state = self.state.lock();
        if state.closed.is_some() {
            return Pushed::Closed;
        }
        let was_empty = state.buf.is_empty();
        if !was_empty && state.buf.len() + len > self.limit() {
            return Pushed::Full;
        }
        write(&mut state.buf);
        if was_empty {
            Pushed::First
        } else {
            Pushed::More
        }
    }

    /// Appends everything in `data` with one lock; `data` is left empty
    /// (when the outbox was empty the two buffers are swapped, not copied).
    /// The caller wakes the writer on [`Pushed::First`].
    pub fn append(&self, data: &mut BytesMut) -> Pushed {
        let mut state = self.state.lock();
        if state.closed.is_some() {
            return Pushed::Closed;
        }
        // Only appended data (deliveries) starts the clock: replies pushed
        // one by one are not what the latency measures.
        if state.since.is_none() {
            state.since = Some(Instant::now());
        }
        if state.buf.is_empty() {
            std::mem::swap(&mut state.buf, data);
            return Pushed::First;
        }
        if state.buf.len() + data.len() > self.limit() {
            return Pushed::Full;
        }
        state.buf.extend_from_slice(data);
        data.clear();
        Pushed::More
    }

    /// Appends everything in `data` whatever the limit (the block policy:
    /// the publisher then waits for [`wait_below_limit`](Self::wait_below_limit)).
    pub fn append_over(&self, data: &mut BytesMut) -> Pushed {
        self.append_then(data, |_, _| ()).0
    }

    /// Appends everything in `data` whatever the limit, then, if the buffer
    /// is over the limit, lets `make_room(buffer, limit)` edit the frames
    /// not yet handed to the writer (the drop-oldest policy), all under one
    /// lock. Returns what became of the append, `make_room`'s answer (if it
    /// ran) and whether the buffer is within the limit afterwards.
    pub fn append_then<R>(
        &self,
        data: &mut BytesMut,
        make_room: impl FnOnce(&mut BytesMut, usize) -> R,
    ) -> (Pushed, Option<R>, bool) {
        let mut state = self.state.lock();
        if state.closed.is_some() {
            data.clear();
            return (Pushed::Closed, None, true);
        }
        if state.since.is_none() {
            state.since = Some(Instant::now());
        }
        let pushed = if state.buf.is_empty() {
            std::mem::swap(&mut state.buf, data);
            Pushed::First
        } else {
            state.buf.extend_from_slice(data);
            data.clear();
            Pushed::More
        };
        let limit = self.limit();
        let answer = (state.buf.len() > limit).then(|| make_room(&mut state.buf, limit));
        let fits = state.buf.len() <= limit;
        (pushed, answer, fits)
    }

    /// Waits until what is pending is within the limit again, or the
    /// outbox closes.
    pub async fn wait_below_limit(&self) {
        self.wait_for_space(0).await
    }

    fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// Whether closing has begun, without taking the lock: a hint for
    /// routing, which re-checks under the lock when it appends.
    pub fn is_closed_hint(&self) -> bool {
        self.closed_flag.load(Ordering::Relaxed)
    }

    /// Appends and wakes the writer at once: for control frames.
    pub fn push_now(&self, len: usize, write: impl FnOnce(&mut BytesMut)) -> Pushed {
        let pushed = self.push(len, write);
        if pushed == Pushed::First {
            self.wake();
        }
        pushed
    }

    /// Tells the writer there is data.
    pub fn wake(&self) {
        self.ready.notify_one();
    }

    /// Waits until `len` more bytes fit, or the outbox closes.
    pub async fn wait_for_space(&self, len: usize) {
        loop {
            let notified = self.space.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let state = self.state.lock();
                if state.closed.is_some()
                    || state.buf.is_empty()
                    || state.buf.len() + len <= self.limit()
                {
                    return;
                }
            }
            notified.await;
        }
    }

    /// Starts closing: nothing more is accepted except `last`, which is
    /// appended after what is queued (an error frame, say). The writer sends
    /// everything and then stops. Only the first close counts.
    pub fn close(&self, reason: CloseReason, last: Option<&[u8]>) {
        {
            let mut state = self.state.lock();
            if state.closed.is_some() {
                return;
            }
            if let Some(last) = last {
                state.buf.extend_from_slice(last);
            }
            state.closed = Some(reason);
            self.closed_flag.store(true, Ordering::Relaxed);
        }
        self.ready.notify_one();
        self.space.notify_waiters();
        self.closing.notify_waiters();
    }

    /// Closes the outbox (if it was not) and takes what it still holds,
    /// unsent: whole frames, since the writer takes only whole swaps. A
    /// client moves a connection's unsent frames to the next this way.
    pub fn close_and_take(&self, reason: CloseReason) -> BytesMut {
        let taken = {
            let mut state = self.state.lock();
            if state.closed.is_none() {
                state.closed = Some(reason);
                self.closed_flag.store(true, Ordering::Relaxed);
            }
            state.since = None;
            std::mem::take(&mut state.buf)
        };
        self.ready.notify_one();
        self.space.notify_waiters();
        self.closing.notify_waiters();
        taken
    }

    /// Why the outbox closed, once it has.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.state.lock().closed.clone()
    }

    /// True once closing has begun.
    pub fn is_closed(&self) -> bool {
        self.state.lock().closed.is_some()
    }

    /// Bytes waiting to be written.
    pub fn pending_bytes(&self) -> usize {
        self.state.lock().buf.len()
    }

    /// Resolves once closing has begun, with the reason.
    pub async fn closed(&self) -> CloseReason {
        loop {
            let notified = self.closing.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(reason) = self.close_reason() {
                return reason;
            }
            notified.await;
        }
    }

    /// The writer loop: sends whatever is queued, one write per swap, until
    /// the outbox is closed and empty. A write error closes the outbox.
    pub async fn write_to<W: AsyncWrite + Unpin>(&self, writer: &mut W) -> io::Result<CloseReason> {
        self.write_to_timed(writer, |_| {}).await
    }

    /// As [`write_to`](Self::write_to), telling `on_write` after each write
    /// that carried [`append`](Self::append)ed data how long the oldest of
    /// it waited since it was queued: one figure per write, not per message.
    pub async fn write_to_timed<W: AsyncWrite + Unpin>(
        &self,
        writer: &mut W,
        mut on_write: impl FnMut(Duration),
    ) -> io::Result<CloseReason> {
        let mut spare = BytesMut::new();
        let mut writes: u32 = 0;
        loop {
            let (closed, since) = {
                let mut state = self.state.lock();
                std::mem::swap(&mut state.buf, &mut spare);
                (state.closed.clone(), state.since.take())
            };
            if spare.is_empty() {
                if let Some(reason) = closed {
                    writer.flush().await?;
                    return Ok(reason);
                }
                self.ready.notified().await;
                continue;
            }
            if let Err(err) = writer.write_all(&spare).await {
                self.close(CloseReason::Io(err.to_string()), None);
                return Err(err);
            }
            if let Some(since) = since {
                on_write(since.elapsed());
            }
            spare.clear();
            self.space.notify_waiters();
            writes = writes.wrapping_add(1);
            if writes.is_multiple_of(WRITES_PER_YIELD) {
                // Producers on other cores could keep this loop busy for good.
                crate::runtime::yield_now().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn writes_everything_then_stops_on_close() {
        let outbox = Arc::new(Outbox::new(16));
        assert_eq!(
            outbox.push(3, |b| b.extend_from_slice(b"abc")),
            Pushed::First
        );
        assert_eq!(
            outbox.push(3, |b| b.extend_from_slice(b"def")),
            Pushed::More
        );
        assert_eq!(
            outbox.push(20, |b| b.extend_from_slice(&[0; 20])),
            Pushed::Full
        );
        let (mut client, mut server) = tokio::io::duplex(1024);
        let writer = {
            let outbox = outbox.clone();
            tokio::spawn(async move { outbox.write_to(&mut server).await })
        };
        outbox.wake();
        outbox.close(CloseReason::Closed, Some(b"!"));
        assert_eq!(
            outbox.push(1, |b| b.extend_from_slice(b"x")),
            Pushed::Closed
        );
        let reason = writer.await.unwrap().unwrap();
        assert_eq!(reason, CloseReason::Closed);
        let mut got = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut client, &mut got)
            .await
            .unwrap();
        assert_eq!(got, b"abcdef!");
        assert_eq!(outbox.closed().await, CloseReason::Closed);
    }

    #[test]
    fn append_swaps_into_an_empty_buffer_and_respects_the_limit() {
        let outbox = Outbox::new(8);
        let mut data = BytesMut::from(&b"abcdef"[..]);
        assert_eq!(outbox.append(&mut data), Pushed::First);
        assert!(data.is_empty());
        let mut more = BytesMut::from(&b"gh"[..]);
        assert_eq!(outbox.append(&mut more), Pushed::More);
        let mut too_much = BytesMut::from(&b"i"[..]);
        assert_eq!(outbox.append(&mut too_much), Pushed::Full);
        assert_eq!(outbox.pending_bytes(), 8);
        outbox.close(CloseReason::Closed, None);
        assert!(outbox.is_closed_hint());
        assert_eq!(outbox.append(&mut too_much), Pushed::Closed);
    }

    #[tokio::test]
    async fn a_large_frame_fits_an_empty_buffer() {
        let outbox = Outbox::new(4);
        assert_eq!(
            outbox.push(10, |b| b.extend_from_slice(&[1; 10])),
            Pushed::First
        );
        assert_eq!(outbox.pending_bytes(), 10);
    }
}
