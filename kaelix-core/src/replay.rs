//! Where a subscription starts reading a topic's retained messages.

use std::fmt;
use std::str::FromStr;
use std::time::SystemTime;

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

/// The written forms: `latest`, `earliest`, `offset:N`, `last:N`,
/// `time:RFC3339` (`time:2026-11-24T09:30:00Z`) and `ago:DURATION`
/// (`ago:5m`, `ago:1h 30m`: that long before now).
impl FromStr for StartPosition {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (kind, value) = s.split_once(':').unwrap_or((s, ""));
        let number = |what: &str| {
            value.trim().parse::<u64>().map_err(|_| {
                format!("{what} needs a whole number after the colon, e.g. {what}:100, not {s:?}")
            })
        };
        match kind.trim().to_ascii_lowercase().as_str() {
            "latest" | "new" if value.is_empty() => Ok(StartPosition::Latest),
            "earliest" | "all" if value.is_empty() => Ok(StartPosition::Earliest),
            "offset" => number("offset").map(StartPosition::Offset),
            "last" => number("last").map(StartPosition::Last),
            "time" => humantime::parse_rfc3339_weak(value.trim())
                .map(|t| StartPosition::Time(t.into()))
                .map_err(|e| {
                    format!("time needs an RFC 3339 time, e.g. time:2026-11-24T09:30:00Z ({e})")
                }),
            "ago" => humantime::parse_duration(value.trim())
                .map(|d| {
                    let at = SystemTime::now()
                        .checked_sub(d)
                        .unwrap_or(SystemTime::UNIX_EPOCH);
                    StartPosition::Time(at.into())
                })
                .map_err(|e| format!("ago needs a duration, e.g. ago:5m or ago:1h30m ({e})")),
            _ => Err(format!(
                "unknown start position {s:?}: use latest, earliest, offset:N, last:N, \
                 time:RFC3339 or ago:DURATION"
            )),
        }
    }
}

impl fmt::Display for StartPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartPosition::Latest => f.write_str("latest"),
            StartPosition::Earliest => f.write_str("earliest"),
            StartPosition::Offset(n) => write!(f, "offset:{n}"),
            StartPosition::Last(n) => write!(f, "last:{n}"),
            StartPosition::Time(t) => write!(
                f,
                "time:{}",
                humantime::format_rfc3339_nanos(SystemTime::from(*t))
            ),
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

    #[test]
    fn written_forms_parse_and_print_back() {
        for text in [
            "latest",
            "earliest",
            "offset:42",
            "last:10",
            "time:2026-11-24T09:30:00.000000000Z",
        ] {
            let start: StartPosition = text.parse().unwrap();
            assert_eq!(start.to_string(), text);
        }
        assert_eq!("all".parse(), Ok(StartPosition::Earliest));
        let ago: StartPosition = "ago:1h".parse().unwrap();
        let StartPosition::Time(t) = ago else {
            panic!("ago is a time, got {ago:?}")
        };
        let hour_ago = Timestamp::now().as_nanos() - 3_600_000_000_000;
        assert!(t.as_nanos().abs_diff(hour_ago) < 60_000_000_000);
        for bad in [
            "offset:x",
            "offset",
            "last:-1",
            "soon",
            "time:yesterday",
            "ago:ever",
            "latest:3",
        ] {
            let err = bad.parse::<StartPosition>().unwrap_err();
            assert!(!err.is_empty(), "{bad}");
        }
        assert!("offset:x"
            .parse::<StartPosition>()
            .unwrap_err()
            .contains("offset:100"));
    }
}
