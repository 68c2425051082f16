//! The drop-oldest policy on a connection's pending frames: the oldest
//! MESSAGE frames of the subscriptions that chose it are taken out, and a
//! MISSED notice per subscription and topic takes their place at the front.

use std::ops::Range;

use bytes::{Bytes, BytesMut};
use kaelix_core::protocol::{flags, opcode, Frame, Missed, MissedRange, HEADER_LEN};

/// What one subscription lost on one topic partition.
#[derive(Debug)]
pub(crate) struct Dropped {
    pub(crate) sid: u32,
    pub(crate) topic: Bytes,
    /// For a topic with more than one partition.
    pub(crate) partition: Option<u32>,
    pub(crate) first: u64,
    pub(crate) last: u64,
    /// Messages the notice names, earlier notices folded in.
    pub(crate) count: u64,
    /// Of which dropped by this call.
    pub(crate) new: u64,
}

/// Bytes of a MISSED frame with a range on a topic of `topic_len` bytes.
fn notice_len(topic_len: usize, partition: Option<u32>) -> usize {
    HEADER_LEN + 4 + 8 + 1 + topic_len + 8 + 8 + partition.map_or(0, |_| 4)
}

/// Takes the oldest MESSAGE frames of `sids` out of `buf` until it holds
/// at most `target` bytes (or none of theirs is left), and puts a MISSED
/// notice for each subscription and topic in front. `buf` holds whole
/// frames, as the router wrote them. Returns what was dropped.
pub(crate) fn drop_oldest(buf: &mut BytesMut, target: usize, sids: &[u32]) -> Vec<Dropped> {
    let mut need = buf.len().saturating_sub(target);
    let mut freed = 0;
    let mut groups: Vec<Dropped> = Vec::new();
    let mut cut: Vec<Range<usize>> = Vec::new();
    let mut at = 0;
    while freed < need && at + HEADER_LEN <= buf.len() {
        let len = u32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]) as usize;
        let end = at + 4 + len;
        if end > buf.len() || end < at + HEADER_LEN {
            break;
        }
        let frame = &buf[at..end];
        // An earlier notice of these subscriptions is folded into the new
        // one, which goes in front of everything left.
        let found = match frame[4] {
            opcode::MISSED => parse_missed(frame).map(|(sid, count, topic, first, last, p)| {
                (
                    sid,
                    topic,
                    Dropped {
                        sid,
                        topic: Bytes::new(),
                        partition: p,
                        first,
                        last,
                        count,
                        new: 0,
                    },
                )
            }),
            opcode::MESSAGE => parse_message(frame).map(|(sid, offset, partition, topic)| {
                let one = Dropped {
                    sid,
                    topic: Bytes::new(),
                    partition,
                    first: offset,
                    last: offset,
                    count: 1,
                    new: 1,
                };
                (sid, topic, one)
            }),
            _ => None,
        };
        if let Some((sid, topic, dropped)) = found.filter(|(sid, ..)| sids.contains(sid)) {
            let topic = &buf[at + topic.start..at + topic.end];
            match groups
                .iter_mut()
                .find(|g| g.sid == sid && g.partition == dropped.partition && g.topic[..] == *topic)
            {
                Some(g) => {
                    g.first = g.first.min(dropped.first);
                    g.last = g.last.max(dropped.last);
                    g.count += dropped.count;
                    g.new += dropped.new;
                }
                None => {
                    need += notice_len(topic.len(), dropped.partition);
                    groups.push(Dropped {
                        topic: Bytes::copy_from_slice(topic),
                        ..dropped
                    });
                }
            }
            freed += end - at;
            match cut.last_mut() {
                Some(last) if last.end == at => last.end = end,
                _ => cut.push(at..end),
            }
        }
        at = end;
    }
    if groups.is_empty() {
        return groups;
    }
    let notices: usize = groups
        .iter()
        .map(|g| notice_len(g.topic.len(), g.partition))
        .sum();
    let mut out = BytesMut::with_capacity(buf.len() - freed + notices);
    for g in &groups {
        Frame::Missed(Missed {
            sid: g.sid,
            count: g.count,
            range: Some(MissedRange {
                topic: g.topic.clone(),
                partition: g.partition,
                first: g.first,
                last: g.last,
            }),
        })
        .encode(&mut out);
    }
    let mut kept_from = 0;
    for range in &cut {
        out.extend_from_slice(&buf[kept_from..range.start]);
        kept_from = range.end;
    }
    out.extend_from_slice(&buf[kept_from..]);
    *buf = out;
    groups
}

/// A MISSED frame's sid, count, where its topic lies in the frame, its
/// first and last offsets, and its partition; `None` for one without a
/// range.
#[allow(clippy::type_complexity)]
fn parse_missed(frame: &[u8]) -> Option<(u32, u64, Range<usize>, u64, u64, Option<u32>)> {
    if frame[5] & flags::RANGE == 0 {
        return None;
    }
    let sid = u32::from_be_bytes(frame.get(6..10)?.try_into().ok()?);
    let count = u64::from_be_bytes(frame.get(10..18)?.try_into().ok()?);
    let topic_len = *frame.get(18)? as usize;
    let topic = 19..19 + topic_len;
    let first = u64::from_be_bytes(frame.get(topic.end..topic.end + 8)?.try_into().ok()?);
    let last = u64::from_be_bytes(frame.get(topic.end + 8..topic.end + 16)?.try_into().ok()?);
    let partition = if frame[5] & flags::RANGE_PARTITION != 0 {
        let at = topic.end + 16;
        Some(u32::from_be_bytes(frame.get(at..at + 4)?.try_into().ok()?))
    } else {
        None
    };
    Some((sid, count, topic, first, last, partition))
}

/// A MESSAGE frame's sid, offset, partition and where its topic lies in
/// the frame; `None` for one without an offset (the router always writes
/// one).
fn parse_message(frame: &[u8]) -> Option<(u32, u64, Option<u32>, Range<usize>)> {
    if frame[5] & flags::OFFSET == 0 {
        return None;
    }
    let sid = u32::from_be_bytes(frame.get(6..10)?.try_into().ok()?);
    let offset = u64::from_be_bytes(frame.get(10..18)?.try_into().ok()?);
    let (partition, body) = if frame[5] & flags::IN_PARTITION != 0 {
        let p = u32::from_be_bytes(frame.get(18..22)?.try_into().ok()?);
        (Some(p), 22)
    } else {
        (None, 18)
    };
    let topic_len = *frame.get(body)? as usize;
    let topic = body + 1..body + 1 + topic_len;
    frame.get(topic.clone())?;
    Some((sid, offset, partition, topic))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kaelix_core::protocol::{decode, encode_deliver_raw};

    fn message(buf: &mut BytesMut, sid: u32, offset: u64, topic: &str, payload: &[u8]) {
        let mut body = vec![topic.len() as u8];
        body.extend_from_slice(topic.as_bytes());
        body.extend_from_slice(payload);
        encode_deliver_raw(buf, sid, (Some(offset), None), 0, &body);
    }

    fn frames(mut buf: BytesMut) -> Vec<Frame> {
        let mut out = Vec::new();
        while let Some(frame) = decode(&mut buf, 1 << 20).unwrap() {
            out.push(frame);
        }
        assert!(buf.is_empty());
        out
    }

    #[test]
    fn drops_the_oldest_of_the_chosen_subscriptions_and_says_so_first() {
        let mut buf = BytesMut::new();
        for offset in 0..10 {
            message(&mut buf, 1, offset, "a.b", &[0; 32]);
            message(&mut buf, 2, offset, "a.b", &[0; 32]);
        }
        Frame::Pong(7).encode(&mut buf);
        let total = buf.len();
        let dropped = drop_oldest(&mut buf, total / 2, &[1]);
        assert_eq!(dropped.len(), 1);
        let d = &dropped[0];
        assert_eq!((d.sid, &d.topic[..], d.first), (1, &b"a.b"[..], 0));
        assert!(buf.len() <= total / 2 + 60, "{} of {total}", buf.len());

        let frames = frames(buf);
        let Frame::Missed(missed) = &frames[0] else {
            panic!("MISSED first, got {:?}", frames[0])
        };
        let range = missed.range.as_ref().unwrap();
        assert_eq!((missed.sid, range.first, range.last), (1, 0, d.last));
        assert_eq!(missed.count, d.last + 1);
        // Subscription 2 and the PONG are untouched; subscription 1 keeps
        // its newest messages, in order.
        let of = |sid| {
            frames
                .iter()
                .filter_map(|f| match f {
                    Frame::Message(m) if m.sid == sid => m.offset,
                    _ => None,
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(of(2), (0..10).collect::<Vec<_>>());
        assert_eq!(of(1), (d.last + 1..10).collect::<Vec<_>>());
        assert_eq!(frames.last(), Some(&Frame::Pong(7)));
    }

    #[test]
    fn a_second_drop_folds_the_first_notice_into_its_own() {
        let mut buf = BytesMut::new();
        for offset in 0..20 {
            message(&mut buf, 1, offset, "t", &[0; 32]);
        }
        let first = drop_oldest(&mut buf, 600, &[1]);
        let mut more = BytesMut::new();
        for offset in 20..30 {
            message(&mut more, 1, offset, "t", &[0; 32]);
        }
        buf.extend_from_slice(&more);
        let second = drop_oldest(&mut buf, 600, &[1]);
        assert_eq!((second[0].first, second[0].last), (0, second[0].last));
        assert!(second[0].last > first[0].last);
        let frames = frames(buf);
        let notices: Vec<_> = frames
            .iter()
            .filter(|f| matches!(f, Frame::Missed(_)))
            .collect();
        assert_eq!(notices.len(), 1, "one notice, in front: {frames:?}");
        let Frame::Missed(m) = &frames[0] else {
            panic!("MISSED first")
        };
        assert_eq!(m.count, second[0].last + 1);
        assert_eq!(first[0].new + second[0].new, m.count);
        // What is left follows on from the notice, in order.
        let offsets: Vec<u64> = frames[1..]
            .iter()
            .map(|f| match f {
                Frame::Message(m) => m.offset.unwrap(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(offsets, (second[0].last + 1..30).collect::<Vec<_>>());
    }

    #[test]
    fn each_partition_gets_its_own_notice() {
        let mut buf = BytesMut::new();
        for offset in 0..10 {
            for partition in [0, 1] {
                let body = [&[1u8, b't'][..], &[0; 32]].concat();
                encode_deliver_raw(&mut buf, 1, (Some(offset), Some(partition)), 0, &body);
            }
        }
        let dropped = drop_oldest(&mut buf, 0, &[1]);
        let mut seen: Vec<_> = dropped
            .iter()
            .map(|d| (d.partition, d.first, d.last, d.count))
            .collect();
        seen.sort();
        assert_eq!(seen, [(Some(0), 0, 9, 10), (Some(1), 0, 9, 10)]);
        let notices: Vec<_> = frames(buf)
            .into_iter()
            .map(|f| match f {
                Frame::Missed(m) => m.range.unwrap().partition,
                other => panic!("only notices are left, got {other:?}"),
            })
            .collect();
        assert_eq!(notices.len(), 2);
        assert!(notices.contains(&Some(0)) && notices.contains(&Some(1)));
    }

    #[test]
    fn nothing_to_drop_leaves_the_buffer_alone() {
        let mut buf = BytesMut::new();
        message(&mut buf, 2, 0, "x", b"keep");
        let before = buf.clone();
        assert!(drop_oldest(&mut buf, 0, &[1]).is_empty());
        assert_eq!(buf, before);
    }
}
