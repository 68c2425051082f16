//! Where a subscription starts reading a topic's retained messages.

use crate::message::Timestamp;

/// Where a new subscription starts. Everything after that point that the
/// broker still holds is delivered first, in offset order, then live
/// messages follow with no gap and no duplicate at the seam.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartPosition {
    /// Only messages published from now on (the default).
    #[default]
    Latest,
    /// The oldest message each topic still holds.
    Earliest,
    /// The message with this offset. An offset no longer held starts at
    /// the oldest one held, and the subscription says how many were missed.
    Offset(u64),
    /// The first message published at or after this time.
    Time(Timestamp),
    /// The last `n` messages of each topic.
    Last(u64),
}

impl StartPosition {
    /// Where to start in a log that holds offsets `first..next`, with the
    /// held messages' timestamps given by `timestamp_at(offset)`: the first
    /// offset to deliver and how many asked-for messages are gone.
    pub fn resolve(
        self,
        first: u64,
        next: u64,
        mut first_at_or_after: impl FnMut(Timestamp) -> u64,
    ) -> (u64, u64) {
        match self {
            StartPosition::Latest => (next, 0),
            StartPosition::Earliest => (first, 0),
            StartPosition::Offset(n) if n < first => (first, first - n),
            StartPosition::Offset(n) => (n.min(next), 0),
            StartPosition::Time(t) => (first_at_or_after(t), 0),
            StartPosition::Last(n) => (next.saturating_sub(n).max(first), 0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_resolve_within_what_is_held() {
        let never = |_| unreachable!();
        assert_eq!(StartPosition::Latest.resolve(5, 10, never), (10, 0));
        assert_eq!(StartPosition::Earliest.resolve(5, 10, never), (5, 0));
        assert_eq!(StartPosition::Offset(7).resolve(5, 10, never), (7, 0));
        assert_eq!(StartPosition::Offset(2).resolve(5, 10, never), (5, 3));
        assert_eq!(StartPosition::Offset(20).resolve(5, 10, never), (10, 0));
        assert_eq!(StartPosition::Last(3).resolve(5, 10, never), (7, 0));
        assert_eq!(StartPosition::Last(30).resolve(5, 10, never), (5, 0));
        let at = StartPosition::Time(Timestamp::from_nanos(42));
        assert_eq!(at.resolve(5, 10, |t| t.as_nanos() / 6), (7, 0));
    }
}
