//! What every benchmark message carries: a sequence number (publisher index
//! in the top 16 bits) and the send time, so that subscribers measure
//! latency and count losses without any side channel.

use std::sync::OnceLock;
use std::time::Instant;

/// Bytes a payload needs for the sequence number and the send time.
pub const STAMP_LEN: usize = 16;

/// Nanoseconds since the first call in this process: the clock that
/// publishers stamp and subscribers read (both run in the load generator).
pub fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// Writes the stamp into the first [`STAMP_LEN`] bytes of `buf`.
pub fn stamp(buf: &mut [u8], publisher: u16, seq: u64, sent_ns: u64) {
    let id = (u64::from(publisher) << 48) | (seq & ((1 << 48) - 1));
    buf[..8].copy_from_slice(&id.to_be_bytes());
    buf[8..16].copy_from_slice(&sent_ns.to_be_bytes());
}

/// Reads a stamp: (publisher, sequence, send time). `None` if too short.
pub fn read(buf: &[u8]) -> Option<(u16, u64, u64)> {
    let id = u64::from_be_bytes(buf.get(..8)?.try_into().ok()?);
    let sent = u64::from_be_bytes(buf.get(8..16)?.try_into().ok()?);
    Some(((id >> 48) as u16, id & ((1 << 48) - 1), sent))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip() {
        let mut buf = [0u8; 32];
        stamp(&mut buf, 3, 123_456, 987_654_321);
        assert_eq!(read(&buf), Some((3, 123_456, 987_654_321)));
        assert_eq!(read(&buf[..10]), None);
        assert!(now_ns() <= now_ns());
    }
}
