//! The circuit breaker that switches a failing plugin off and tries it
//! again after a cool-down.

use std::time::{Duration, Instant};

/// When a breaker opens and how long it stays open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerPolicy {
    /// Failures in a row (errors, panics, calls over the time budget) that
    /// switch the plugin off.
    pub failure_threshold: u32,
    /// How long the plugin stays off before one call is let through to try
    /// it again.
    pub cooldown: Duration,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        BreakerPolicy {
            failure_threshold: 5,
            cooldown: Duration::from_secs(10),
        }
    }
}

/// Where a breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through.
    Closed,
    /// The plugin is off: calls do not reach it.
    Open,
    /// The cool-down is over: the next call is a trial.
    HalfOpen,
}

impl BreakerState {
    /// `closed`, `open` or `half_open`, as logs and metrics name it.
    pub fn name(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }

    /// 0 closed, 1 half-open, 2 open: the value of the state gauge.
    pub fn gauge(self) -> u8 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen => 1,
            BreakerState::Open => 2,
        }
    }
}

/// A change of state, for the caller to log and count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub from: BreakerState,
    pub to: BreakerState,
}

/// Closed → (failure_threshold failures in a row) → Open → (cooldown) →
/// HalfOpen → one trial call → Closed on success, Open again on failure.
///
/// It keeps no clock of its own: the caller passes the time, so that one
/// clock reading serves a call's timing and its breaker.
#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    policy: BreakerPolicy,
    state: BreakerState,
    failures: u32,
    opened_at: Option<Instant>,
}

impl CircuitBreaker {
    pub fn new(policy: BreakerPolicy) -> CircuitBreaker {
        CircuitBreaker {
            policy,
            state: BreakerState::Closed,
            failures: 0,
            opened_at: None,
        }
    }

    pub fn state(&self) -> BreakerState {
        self.state
    }

    pub fn policy(&self) -> BreakerPolicy {
        self.policy
    }

    /// Takes a new policy; the state stays.
    pub fn set_policy(&mut self, policy: BreakerPolicy) {
        self.policy = policy;
    }

    /// Whether a call may go through at `now`; an open breaker whose
    /// cool-down is over turns half-open and lets this call through.
    pub fn allow(&mut self, now: Instant) -> (bool, Option<Transition>) {
        match self.state {
            BreakerState::Closed | BreakerState::HalfOpen => (true, None),
            BreakerState::Open => {
                let cooled = self
                    .opened_at
                    .is_none_or(|at| now.saturating_duration_since(at) >= self.policy.cooldown);
                if cooled {
                    (true, self.to(BreakerState::HalfOpen))
                } else {
                    (false, None)
                }
            }
        }
    }

    /// A call succeeded.
    pub fn success(&mut self) -> Option<Transition> {
        self.failures = 0;
        match self.state {
            BreakerState::HalfOpen => self.to(BreakerState::Closed),
            _ => None,
        }
    }

    /// A call failed at `now`.
    pub fn failure(&mut self, now: Instant) -> Option<Transition> {
        self.failures = self.failures.saturating_add(1);
        let open = match self.state {
            BreakerState::Closed => self.failures >= self.policy.failure_threshold.max(1),
            BreakerState::HalfOpen => true,
            BreakerState::Open => false,
        };
        if open {
            self.opened_at = Some(now);
            self.to(BreakerState::Open)
        } else {
            None
        }
    }

    /// Opens at once, whatever the count (a plugin over its CPU share).
    pub fn trip(&mut self, now: Instant) -> Option<Transition> {
        self.opened_at = Some(now);
        if self.state == BreakerState::Open {
            None
        } else {
            self.to(BreakerState::Open)
        }
    }

    fn to(&mut self, to: BreakerState) -> Option<Transition> {
        let from = std::mem::replace(&mut self.state, to);
        if to == BreakerState::Closed {
            self.opened_at = None;
        }
        Some(Transition { from, to })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> (CircuitBreaker, Instant) {
        let policy = BreakerPolicy {
            failure_threshold: 3,
            cooldown: Duration::from_secs(10),
        };
        (CircuitBreaker::new(policy), Instant::now())
    }

    #[test]
    fn opens_after_the_threshold_of_failures_in_a_row() {
        let (mut b, t) = breaker();
        assert_eq!(b.failure(t), None);
        assert_eq!(b.failure(t), None);
        // A success in between starts the count again.
        assert_eq!(b.success(), None);
        assert_eq!(b.failure(t), None);
        assert_eq!(b.failure(t), None);
        let opened = b.failure(t).expect("the third failure in a row opens it");
        assert_eq!(
            (opened.from, opened.to),
            (BreakerState::Closed, BreakerState::Open)
        );
        assert_eq!(b.allow(t + Duration::from_secs(9)), (false, None));
    }

    #[test]
    fn half_open_after_the_cooldown_then_closed_or_open_by_the_trial() {
        let (mut b, t) = breaker();
        for _ in 0..3 {
            b.failure(t);
        }
        let later = t + Duration::from_secs(10);
        let (allowed, to_half) = b.allow(later);
        assert!(allowed);
        assert_eq!(to_half.map(|x| x.to), Some(BreakerState::HalfOpen));
        // The trial fails: open again, for a new cool-down from now.
        assert_eq!(b.failure(later).map(|x| x.to), Some(BreakerState::Open));
        assert_eq!(b.allow(later + Duration::from_secs(5)), (false, None));
        let again = later + Duration::from_secs(10);
        assert!(b.allow(again).0);
        assert_eq!(b.success().map(|x| x.to), Some(BreakerState::Closed));
        assert_eq!(b.state(), BreakerState::Closed);
        // Closed again: it takes the full threshold to open.
        assert_eq!(b.failure(again), None);
    }

    #[test]
    fn a_trip_opens_at_once() {
        let (mut b, t) = breaker();
        assert_eq!(b.trip(t).map(|x| x.to), Some(BreakerState::Open));
        assert_eq!(b.trip(t), None);
    }
}
