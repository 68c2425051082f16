//! What a client does when it loses its broker: the reconnect policy, the
//! wait between attempts (exponential, with full jitter), the order it
//! tries the addresses in, and the events it reports.

use std::fmt;
use std::time::Duration;

use rand::seq::SliceRandom;
use rand::Rng;

use crate::CloseReason;

/// How a client reconnects after losing its broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReconnectPolicy {
    /// Reconnect at all; when false a lost connection ends the client.
    pub enabled: bool,
    /// The cap of the first wait before reconnecting.
    pub initial_backoff: Duration,
    /// The largest cap of any wait: the cap doubles per failed attempt up
    /// to this.
    pub max_backoff: Duration,
    /// Failed attempts in a row before the client gives up; 0 never gives
    /// up.
    pub max_attempts: u32,
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        ReconnectPolicy {
            enabled: true,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            max_attempts: 0,
        }
    }
}

impl ReconnectPolicy {
    /// No reconnecting: a lost connection ends the client.
    pub fn never() -> ReconnectPolicy {
        ReconnectPolicy {
            enabled: false,
            ..ReconnectPolicy::default()
        }
    }
}

/// The waits between reconnect attempts: the n-th (from 0) is drawn
/// uniformly from zero to `min(max_backoff, initial_backoff · 2ⁿ)` ("full
/// jitter"), so that many clients that lost the same broker at the same
/// moment come back spread over the whole window rather than in waves.
#[derive(Debug, Clone)]
pub struct Backoff {
    policy: ReconnectPolicy,
    attempt: u32,
    /// A wait the broker asked for (a retry-after hint): the next wait is
    /// this plus a random share of it.
    floor: Duration,
}

impl Backoff {
    pub fn new(policy: ReconnectPolicy) -> Backoff {
        Backoff {
            policy,
            attempt: 0,
            floor: Duration::ZERO,
        }
    }

    /// Failed attempts since the last [`reset`](Self::reset).
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// The cap of the next wait.
    pub fn cap(&self) -> Duration {
        self.cap_before(self.attempt)
    }

    fn cap_before(&self, attempt: u32) -> Duration {
        let doubled = self
            .policy
            .initial_backoff
            .saturating_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX));
        doubled.min(self.policy.max_backoff)
    }

    /// The broker asked clients to wait `after` before coming back: the
    /// next wait is drawn uniformly from `after..=2·after` (capped at an
    /// hour, whatever a broker says), so that the clients it refused at
    /// once do not all come back at the same instant either.
    pub fn retry_after(&mut self, after: Duration) {
        self.floor = self.floor.max(after.min(Duration::from_secs(3600)));
    }

    /// The wait before the next attempt; `None` once the policy's attempts
    /// are used up (or it does not reconnect at all).
    pub fn next_wait(&mut self) -> Option<Duration> {
        self.next_wait_with(&mut rand::rng())
    }

    /// [`next_wait`](Self::next_wait) drawing from `rng`.
    pub fn next_wait_with(&mut self, rng: &mut impl Rng) -> Option<Duration> {
        if !self.policy.enabled
            || (self.policy.max_attempts > 0 && self.attempt >= self.policy.max_attempts)
        {
            return None;
        }
        let full_jitter = |cap: Duration, rng: &mut dyn rand::RngCore| {
            if cap.is_zero() {
                Duration::ZERO
            } else {
                Duration::from_nanos(rng.random_range(0..=cap.as_nanos() as u64))
            }
        };
        self.attempt = self.attempt.saturating_add(1);
        let floor = std::mem::take(&mut self.floor);
        if !floor.is_zero() {
            return Some(floor + full_jitter(floor, rng));
        }
        Some(full_jitter(self.cap_before(self.attempt - 1), rng))
    }

    /// Connected again: the next outage starts from the first wait.
    pub fn reset(&mut self) {
        self.attempt = 0;
        self.floor = Duration::ZERO;
    }
}

/// `addresses` in a random order, so that clients given the same list do
/// not all go to its first broker.
pub fn shuffled(addresses: &[String]) -> Vec<String> {
    let mut order = addresses.to_vec();
    order.shuffle(&mut rand::rng());
    order
}

/// What happened to a client's connection; watch them with the client's
/// `events()`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectionEvent {
    /// The first connection is up.
    Connected { addr: String },
    /// The connection was lost; the client reconnects if its policy says so.
    Disconnected { addr: String, reason: CloseReason },
    /// Connected again after `attempts` attempts.
    Reconnected { addr: String, attempts: u32 },
    /// One reconnect attempt failed; the next comes after `wait`.
    AttemptFailed {
        addr: String,
        error: String,
        wait: Duration,
    },
    /// The client stopped trying (its policy's attempts are used up) and
    /// is closed.
    GaveUp { attempts: u32, last_error: String },
    /// The broker is draining (about to stop) and serves for `within` at
    /// most; a client given other brokers moves to one.
    Draining { addr: String, within: Duration },
    /// Moved from a draining broker to another.
    Moved { from: String, to: String },
}

impl fmt::Display for ConnectionEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectionEvent::Connected { addr } => write!(f, "connected to {addr}"),
            ConnectionEvent::Disconnected { addr, reason } => {
                write!(f, "disconnected from {addr}: {reason}")
            }
            ConnectionEvent::Reconnected { addr, attempts } => {
                write!(f, "reconnected to {addr} after {attempts} attempt(s)")
            }
            ConnectionEvent::AttemptFailed { addr, error, wait } => {
                write!(
                    f,
                    "reconnecting to {addr} failed ({error}); next try in {wait:?}"
                )
            }
            ConnectionEvent::GaveUp {
                attempts,
                last_error,
            } => write!(f, "gave up after {attempts} attempt(s): {last_error}"),
            ConnectionEvent::Draining { addr, within } => {
                write!(f, "{addr} is draining (serving for {within:?} at most)")
            }
            ConnectionEvent::Moved { from, to } => write!(f, "moved from {from} to {to}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::*;

    fn policy(max_attempts: u32) -> ReconnectPolicy {
        ReconnectPolicy {
            enabled: true,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            max_attempts,
        }
    }

    #[test]
    fn the_cap_doubles_up_to_the_maximum() {
        let mut backoff = Backoff::new(policy(0));
        let mut rng = StdRng::seed_from_u64(7);
        let mut caps = Vec::new();
        for _ in 0..8 {
            caps.push(backoff.cap().as_millis());
            let wait = backoff.next_wait_with(&mut rng).unwrap();
            assert!(wait <= Duration::from_millis(*caps.last().unwrap() as u64));
        }
        assert_eq!(caps, [100, 200, 400, 800, 1600, 2000, 2000, 2000]);
        // Far past any shift width: still the maximum, no overflow.
        for _ in 0..100 {
            backoff.next_wait_with(&mut rng).unwrap();
        }
        assert_eq!(backoff.cap(), Duration::from_secs(2));
        backoff.reset();
        assert_eq!(backoff.cap(), Duration::from_millis(100));
    }

    #[test]
    fn waits_spread_over_the_whole_window() {
        // Many clients at the same attempt: their waits cover 0..cap evenly,
        // not a wave at the cap.
        let mut rng = StdRng::seed_from_u64(42);
        let mut buckets = [0u32; 10];
        for _ in 0..10_000 {
            let mut backoff = Backoff::new(policy(0));
            backoff.next_wait_with(&mut rng).unwrap();
            backoff.next_wait_with(&mut rng).unwrap();
            let wait = backoff.next_wait_with(&mut rng).unwrap(); // cap 400 ms
            let bucket = (wait.as_micros() * 10 / 400_001) as usize;
            buckets[bucket] += 1;
        }
        for (i, n) in buckets.iter().enumerate() {
            assert!((800..1200).contains(n), "bucket {i}: {n} of 10000");
        }
    }

    #[test]
    fn attempts_run_out_and_a_retry_after_hint_is_a_floor() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut backoff = Backoff::new(policy(3));
        backoff.retry_after(Duration::from_secs(30));
        let hinted = backoff.next_wait_with(&mut rng).unwrap();
        assert!(
            (Duration::from_secs(30)..=Duration::from_secs(60)).contains(&hinted),
            "{hinted:?}"
        );
        // The hint applies once.
        assert!(backoff.next_wait_with(&mut rng).unwrap() <= Duration::from_millis(200));
        assert!(backoff.next_wait_with(&mut rng).is_some());
        assert_eq!(backoff.next_wait_with(&mut rng), None);
        assert_eq!(backoff.attempts(), 3);

        let mut never = Backoff::new(ReconnectPolicy::never());
        assert_eq!(never.next_wait_with(&mut rng), None);
    }

    #[test]
    fn addresses_come_in_every_order() {
        let addresses: Vec<String> = ["a:1", "b:2", "c:3"].map(String::from).to_vec();
        let mut firsts = std::collections::HashSet::new();
        for _ in 0..200 {
            let order = shuffled(&addresses);
            let mut sorted = order.clone();
            sorted.sort();
            assert_eq!(sorted, addresses);
            firsts.insert(order[0].clone());
        }
        assert_eq!(firsts.len(), 3, "each address comes first sometimes");
    }
}
