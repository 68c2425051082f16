//! A client's link to its brokers: the connection in use, and what the
//! client does when it is lost.
//!
//! The link outlives its connections. Senders push frames into the slot in
//! use; while the client is disconnected that slot is a *parking* outbox,
//! bounded by `ClientOptions::reconnect_buffer_bytes` and written nowhere.
//! The client's reader task calls [`Link::reconnect`] when its connection
//! ends, and [`Link::install`] with the new connection: what was parked
//! goes out on it, behind what the client re-sends first (subscriptions,
//! unanswered acknowledged publishes).
//!
//! ```text
//!  send ──▶ slot ─┬─ live:    outbox ──▶ writer ──▶ socket
//!                 └─ parked:  outbox (bounded) ──install──▶ next connection
//! ```

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::BytesMut;
use parking_lot::Mutex;
use tokio::sync::{broadcast, Notify};

use super::reconnect::{Backoff, ConnectionEvent};
use super::{attempt_any, ClientConn, ClientOptions, Failed, WhenBufferFull};
use crate::error::{CloseReason, Error, Result};
use crate::outbox::{Outbox, Pushed};
use crate::protocol::ErrorCode;

/// Events kept for a watcher that falls behind.
const EVENTS_KEPT: usize = 256;

/// The outbox frames go to now.
#[derive(Debug)]
pub struct Slot {
    /// Counts the slots of this link: a new one for each connection and
    /// each outage.
    pub gen: u64,
    pub outbox: Arc<Outbox>,
    /// False while disconnected: the outbox parks frames for the next
    /// connection.
    pub live: bool,
}

/// A client's connection to one of its brokers, across reconnects.
#[derive(Debug)]
pub struct Link {
    slot: ArcSwap<Slot>,
    /// Told whenever the slot changes or the link ends.
    changed: Notify,
    state: Mutex<State>,
    events: broadcast::Sender<ConnectionEvent>,
    addresses: Vec<String>,
    options: ClientOptions,
    /// HELLO properties of this client beyond its credentials.
    properties: Vec<(String, String)>,
}

#[derive(Debug)]
struct State {
    /// The broker connected to, or last connected to.
    addr: String,
    /// Why the link ended, once it has: nothing more will be sent.
    ended: Option<CloseReason>,
    /// Reconnect attempts that failed in a row.
    failures: u32,
    last_error: String,
    next_gen: u64,
}

impl Link {
    /// A link whose first connection is `conn`, made to `addr`, one of
    /// `addresses`.
    pub fn new(
        conn: &ClientConn,
        addr: String,
        addresses: Vec<String>,
        options: ClientOptions,
        properties: Vec<(String, String)>,
    ) -> Arc<Link> {
        let (events, _) = broadcast::channel(EVENTS_KEPT);
        Arc::new(Link {
            slot: ArcSwap::from_pointee(Slot {
                gen: 0,
                outbox: conn.outbox.clone(),
                live: true,
            }),
            changed: Notify::new(),
            state: Mutex::new(State {
                addr,
                ended: None,
                failures: 0,
                last_error: String::new(),
                next_gen: 1,
            }),
            events,
            addresses,
            options,
            properties,
        })
    }

    /// The slot in use.
    pub fn slot(&self) -> arc_swap::Guard<Arc<Slot>> {
        self.slot.load()
    }

    /// The outbox in use (the parking one while disconnected).
    pub fn outbox(&self) -> Arc<Outbox> {
        self.slot.load().outbox.clone()
    }

    /// Connection events from now on: lost, reconnect attempts, back.
    pub fn events(&self) -> broadcast::Receiver<ConnectionEvent> {
        self.events.subscribe()
    }

    /// Why the link ended, once it has.
    pub fn ended(&self) -> Option<CloseReason> {
        self.state.lock().ended.clone()
    }

    /// Whether a connection is up now.
    pub fn is_connected(&self) -> bool {
        self.slot.load().live
    }

    /// The broker connected to (or last connected to).
    pub fn addr(&self) -> String {
        self.state.lock().addr.clone()
    }

    /// The error a sender gets when the link ended, or for a closed slot.
    pub fn closed_error(&self) -> Error {
        let reason = self
            .ended()
            .or_else(|| self.slot.load().outbox.close_reason())
            .unwrap_or(CloseReason::PeerClosed);
        Error::Closed(reason)
    }

    /// Ends the link: the application closed the client. The connection
    /// in use sends what it holds, then closes; a reconnect under way stops.
    pub fn close(&self, reason: CloseReason) {
        self.end(reason.clone());
        self.slot.load().outbox.close(reason, None);
    }

    fn end(&self, reason: CloseReason) {
        {
            let mut state = self.state.lock();
            if state.ended.is_some() {
                return;
            }
            state.ended = Some(reason.clone());
        }
        let slot = self.slot.load();
        if !slot.live {
            slot.outbox.close(reason, None);
        }
        self.changed.notify_waiters();
    }

    /// Waits until the slot is no longer `gen`, or the link ended.
    pub async fn wait_changed(&self, gen: u64) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.slot.load().gen != gen || self.state.lock().ended.is_some() {
                return;
            }
            notified.await;
        }
    }

    /// The error for a sender that should fail at once instead of
    /// parking, when the circuit is open (this many reconnect attempts
    /// failed in a row).
    pub fn circuit_error(&self) -> Option<Error> {
        let threshold = self.options.circuit.failure_threshold;
        let state = self.state.lock();
        (threshold > 0 && state.failures >= threshold).then(|| Error::CircuitOpen {
            failures: state.failures,
            last_error: state.last_error.clone(),
        })
    }

    /// Appends a frame of `len` bytes written by `write` (given the slot's
    /// generation) to the slot in use; waits while the outbox is full, and
    /// while disconnected parks it for the next connection (waiting for
    /// room or failing, as `ClientOptions::when_buffer_full` says; failing
    /// at once while the circuit is open). `wake_now` wakes the writer even
    /// behind other data (for a sender that waits for an answer).
    pub async fn push(
        &self,
        len: usize,
        mut write: impl FnMut(&mut BytesMut, u64),
        wake_now: bool,
    ) -> Result<()> {
        enum Then {
            Space(Arc<Outbox>),
            Changed(u64),
        }
        loop {
            // The slot is only borrowed on the way through: no reference
            // count is taken unless the sender must wait.
            let then = {
                let slot = self.slot.load();
                if !slot.live {
                    if let Some(err) = self.circuit_error() {
                        return Err(err);
                    }
                }
                let gen = slot.gen;
                match slot.outbox.push(len, |b| write(b, gen)) {
                    Pushed::First => {
                        slot.outbox.wake();
                        return Ok(());
                    }
                    Pushed::More => {
                        if wake_now {
                            slot.outbox.wake();
                        }
                        return Ok(());
                    }
                    Pushed::Full
                        if !slot.live && self.options.when_buffer_full == WhenBufferFull::Fail =>
                    {
                        return Err(Error::BufferFull {
                            limit: self.options.reconnect_buffer_bytes,
                        })
                    }
                    Pushed::Full => Then::Space(slot.outbox.clone()),
                    Pushed::Closed => Then::Changed(gen),
                }
            };
            match then {
                Then::Space(outbox) => outbox.wait_for_space(len).await,
                Then::Changed(gen) => {
                    if self.ended().is_some() {
                        return Err(self.closed_error());
                    }
                    self.wait_changed(gen).await;
                }
            }
        }
    }

    /// Appends a control frame to the slot in use and wakes its writer;
    /// never waits (a parked one goes out after the reconnect).
    pub fn push_now(&self, len: usize, write: impl FnOnce(&mut BytesMut)) -> Pushed {
        self.slot.load().outbox.push_now(len, write)
    }

    /// The connection in use was lost with `reason`: reconnects as the
    /// policy says, with backoff between attempts. `carried` (whole frames
    /// the lost connection never wrote) is parked first, to go out on the
    /// next connection. While the circuit is open, `on_open` runs after
    /// each failed attempt (the publisher fails what waits for an
    /// acknowledgement then). Returns the new
    /// connection (put it in use with [`install`](Self::install)), or
    /// `None` when the link ended ([`ended`](Self::ended) says why): the
    /// application closed it, the reason rules out reconnecting, the
    /// policy's attempts ran out, or a broker refused the client.
    pub async fn reconnect(
        &self,
        reason: CloseReason,
        carried: BytesMut,
        on_open: &mut (dyn FnMut(&Link) + Send),
    ) -> Option<ClientConn> {
        if self.ended().is_some() {
            return None;
        }
        if !self.options.reconnect.enabled || !worth_reconnecting(&reason) {
            self.end(reason);
            return None;
        }
        let addr = self.park(carried);
        tracing::warn!(broker = %addr, %reason, "connection to the broker lost; reconnecting");
        self.emit(ConnectionEvent::Disconnected {
            addr: addr.clone(),
            reason: reason.clone(),
        });
        let mut backoff = Backoff::new(self.options.reconnect.clone());
        let mut last_error = reason.to_string();
        let mut wait = match backoff.next_wait() {
            Some(wait) => wait,
            None => return self.give_up(0, last_error),
        };
        loop {
            if !self.sleep_unless_ended(wait).await {
                return None;
            }
            let attempt = attempt_any(&self.addresses, &self.options, &self.properties);
            let result = tokio::select! {
                result = attempt => result,
                _ = self.until_ended() => return None,
            };
            match result {
                Ok((conn, addr)) => {
                    let attempts = backoff.attempts();
                    {
                        let mut state = self.state.lock();
                        state.addr = addr.clone();
                        state.failures = 0;
                    }
                    tracing::info!(broker = %addr, attempts, "reconnected to the broker");
                    self.emit(ConnectionEvent::Reconnected { addr, attempts });
                    return Some(conn);
                }
                Err(Failed {
                    error: Error::Refused { code, reason },
                    ..
                }) if !worth_reconnecting(&CloseReason::Server {
                    code,
                    reason: reason.clone(),
                }) =>
                {
                    let reason = CloseReason::Server { code, reason };
                    tracing::error!(%reason, "a broker refused the client; not reconnecting");
                    self.emit(ConnectionEvent::GaveUp {
                        attempts: backoff.attempts(),
                        last_error: reason.to_string(),
                    });
                    self.end(reason);
                    return None;
                }
                Err(Failed { error, retry_after }) => {
                    last_error = error.to_string();
                    if let Some(after) = retry_after {
                        backoff.retry_after(after);
                    }
                    let failures = {
                        let mut state = self.state.lock();
                        state.failures += 1;
                        state.last_error = last_error.clone();
                        state.failures
                    };
                    // Drawn even while the circuit is open, so that
                    // max_attempts counts every attempt.
                    let Some(backed_off) = backoff.next_wait() else {
                        return self.give_up(backoff.attempts(), last_error);
                    };
                    let threshold = self.options.circuit.failure_threshold;
                    wait = if threshold > 0 && failures >= threshold {
                        // Open: probe once per cool-down, senders fail fast.
                        on_open(self);
                        self.options
                            .circuit
                            .cooldown
                            .max(retry_after.unwrap_or_default())
                    } else {
                        backed_off
                    };
                    tracing::debug!(error = %last_error, ?wait, "reconnect attempt failed");
                    self.emit(ConnectionEvent::AttemptFailed {
                        addr: self.addresses.join(","),
                        error: last_error.clone(),
                        wait,
                    });
                }
            }
        }
    }

    /// Passes what is parked through `keep` (whole frames in, the frames
    /// to keep out) in a new parking slot; senders waiting on the old one
    /// move to it. Only while disconnected.
    pub fn repark(&self, keep: impl FnOnce(BytesMut) -> BytesMut) {
        if self.slot.load().live {
            return;
        }
        let parked = self.slot.load().outbox.close_and_take(CloseReason::Closed);
        self.park(keep(parked));
    }

    /// Puts a parking slot in use, holding `carried`; returns the broker
    /// that was lost.
    fn park(&self, mut carried: BytesMut) -> String {
        let gen = self.next_gen();
        let outbox = Outbox::new(self.options.reconnect_buffer_bytes);
        if !carried.is_empty() {
            outbox.append_over(&mut carried);
        }
        self.slot.store(Arc::new(Slot {
            gen,
            outbox: Arc::new(outbox),
            live: false,
        }));
        self.changed.notify_waiters();
        self.addr()
    }

    fn next_gen(&self) -> u64 {
        let mut state = self.state.lock();
        let gen = state.next_gen;
        state.next_gen += 1;
        gen
    }

    fn give_up(&self, attempts: u32, last_error: String) -> Option<ClientConn> {
        tracing::error!(attempts, error = %last_error, "gave up reconnecting to the broker");
        self.emit(ConnectionEvent::GaveUp {
            attempts,
            last_error: last_error.clone(),
        });
        self.end(CloseReason::Io(format!(
            "gave up reconnecting after {attempts} attempt(s): {last_error}"
        )));
        None
    }

    /// Sleeps `wait`; false if the link ended meanwhile.
    async fn sleep_unless_ended(&self, wait: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(wait) => self.ended().is_none(),
            _ = self.until_ended() => false,
        }
    }

    async fn until_ended(&self) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.ended().is_some() {
                return;
            }
            notified.await;
        }
    }

    /// The broker in use said it is draining: emits the event and, if the
    /// client has other brokers, connects to one of them (one pass over
    /// them). `None` when there is none to move to, or none answered: the
    /// client stays until the draining broker closes the connection.
    pub async fn elsewhere(&self, within: Duration) -> Option<ClientConn> {
        let from = self.addr();
        tracing::info!(broker = %from, ?within, "the broker is draining");
        self.emit(ConnectionEvent::Draining {
            addr: from.clone(),
            within,
        });
        let others: Vec<String> = self
            .addresses
            .iter()
            .filter(|a| **a != from)
            .cloned()
            .collect();
        if others.is_empty() || self.ended().is_some() {
            return None;
        }
        match attempt_any(&others, &self.options, &self.properties).await {
            Ok((conn, to)) => {
                self.state.lock().addr = to.clone();
                tracing::info!(%from, %to, "moved off a draining broker");
                self.emit(ConnectionEvent::Moved { from, to });
                Some(conn)
            }
            Err(failed) => {
                tracing::warn!(
                    error = %failed.error,
                    "no other broker to move to; staying until the draining one closes"
                );
                None
            }
        }
    }

    /// Puts `outbox` (a new connection's) in use. `prepare` first gets it
    /// and what was parked while disconnected, before any sender can reach
    /// it, so that what the client re-sends goes first. The caller does
    /// this only after [`reconnect`](Self::reconnect) returned a connection.
    /// What `prepare` returns (a lock guard, say) is dropped only once the
    /// new connection is in use.
    pub fn install<G>(&self, outbox: Arc<Outbox>, prepare: impl FnOnce(&Outbox, BytesMut) -> G) {
        let parked = self.slot.load().outbox.close_and_take(CloseReason::Closed);
        let held = prepare(&outbox, parked);
        let gen = self.next_gen();
        self.slot.store(Arc::new(Slot {
            gen,
            outbox: outbox.clone(),
            live: true,
        }));
        drop(held);
        self.changed.notify_waiters();
        // Closed by the application while this was being prepared: the new
        // connection goes too.
        if let Some(reason) = self.ended() {
            outbox.close(reason, None);
        }
    }

    fn emit(&self, event: ConnectionEvent) {
        // No watcher is no error.
        let _ = self.events.send(event);
    }
}

/// Whether a connection that ended this way is worth making again: not
/// when the application closed it, nor when the broker said the client
/// itself is at fault (its credentials, its permissions, its frames), which
/// a new connection would repeat.
pub fn worth_reconnecting(reason: &CloseReason) -> bool {
    match reason {
        CloseReason::Closed => false,
        CloseReason::Server { code, .. } => !matches!(
            code,
            ErrorCode::AuthenticationFailed
                | ErrorCode::NotPermitted
                | ErrorCode::Malformed
                | ErrorCode::FrameTooLarge
                | ErrorCode::UnsupportedVersion
                | ErrorCode::HandshakeRequired
        ),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_of_the_client_itself_are_not_retried() {
        assert!(!worth_reconnecting(&CloseReason::Closed));
        let server = |code| CloseReason::Server {
            code,
            reason: String::new(),
        };
        assert!(!worth_reconnecting(&server(
            ErrorCode::AuthenticationFailed
        )));
        assert!(!worth_reconnecting(&server(ErrorCode::Malformed)));
        assert!(worth_reconnecting(&server(ErrorCode::ShuttingDown)));
        assert!(worth_reconnecting(&server(ErrorCode::SlowConsumer)));
        assert!(worth_reconnecting(&server(ErrorCode::IdleTimeout)));
        assert!(worth_reconnecting(&CloseReason::PeerClosed));
        assert!(worth_reconnecting(&CloseReason::PeerSilent(
            Duration::from_secs(1)
        )));
        assert!(worth_reconnecting(&CloseReason::Io("reset".into())));
    }
}
