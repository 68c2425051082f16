//! Frames to bytes.
//!
//! [`Frame::encode`] appends any frame to a buffer. The data path uses the
//! fast paths beside it: [`encode_publish`] writes a publish from its parts
//! and [`encode_deliver`] writes a delivery around an already encoded body,
//! both straight into the connection's output buffer.

use bytes::{BufMut, Bytes, BytesMut};

use super::frame::*;
use super::{flags, opcode, MAGIC};
use crate::message::{Headers, Message, PartitionId};
use crate::topic::Topic;

impl Frame {
    /// Appends this frame to `buf`. Names longer than their field allows
    /// (255 bytes, or 65535 for reasons and property values) are cut at a
    /// character boundary.
    pub fn encode(&self, buf: &mut BytesMut) {
        match self {
            Frame::Hello(h) => with_header(buf, opcode::HELLO, 0, |b| {
                b.put_slice(&MAGIC);
                b.put_u16(h.min_version);
                b.put_u16(h.max_version);
                put_str8(b, &h.client_name);
                put_properties(b, &h.properties);
            }),
            Frame::Welcome(w) => with_header(buf, opcode::WELCOME, 0, |b| {
                b.put_u16(w.version);
                put_str8(b, &w.server_name);
                b.put_u32(w.max_frame_bytes);
                put_properties(b, &w.properties);
            }),
            Frame::Ping(token) => with_header(buf, opcode::PING, 0, |b| b.put_u64(*token)),
            Frame::Pong(token) => with_header(buf, opcode::PONG, 0, |b| b.put_u64(*token)),
            Frame::Stats(token) => with_header(buf, opcode::STATS, 0, |b| b.put_u64(*token)),
            Frame::Drain(within) => with_header(buf, opcode::DRAIN, 0, |b| b.put_u32(*within)),
            Frame::StatsReply(r) => with_header(buf, opcode::STATS_REPLY, 0, |b| {
                b.put_u64(r.token);
                put_str16(b, &r.json);
            }),
            Frame::Admin(r) => with_header(buf, opcode::ADMIN, 0, |b| {
                b.put_u64(r.token);
                put_str16(b, &r.json);
            }),
            Frame::AdminReply(r) => with_header(buf, opcode::ADMIN_REPLY, 0, |b| {
                b.put_u64(r.token);
                b.put_u16(r.code.map_or(0, |c| c.as_u16()));
                put_str16(b, &r.text);
            }),
            Frame::Error(e) => {
                let fl = if e.retry_after_ms.is_some() {
                    flags::RETRY_AFTER
                } else {
                    0
                };
                with_header(buf, opcode::ERROR, fl, |b| {
                    b.put_u16(e.code.as_u16());
                    put_str16(b, &e.reason);
                    if let Some(ms) = e.retry_after_ms {
                        b.put_u32(ms);
                    }
                })
            }
            Frame::Publish(p) => {
                let fl = p.body.flags() | if p.ack { flags::ACK } else { 0 };
                with_header(buf, opcode::PUBLISH, fl, |b| {
                    b.put_u64(p.seq);
                    b.put_slice(p.body.raw());
                })
            }
            Frame::PubAck(seq) => with_header(buf, opcode::PUB_ACK, 0, |b| b.put_u64(*seq)),
            Frame::PubNack(n) => with_header(buf, opcode::PUB_NACK, 0, |b| {
                b.put_u64(n.id);
                b.put_u16(n.code.as_u16());
                put_str16(b, &n.reason);
            }),
            Frame::Subscribe(s) => {
                let start = start_fields(s.start);
                let fl = if s.group.is_some() { flags::QUEUE } else { 0 }
                    | if start.is_some() { flags::START } else { 0 }
                    | if s.policy.is_some() { flags::POLICY } else { 0 }
                    | if s.partitions.is_empty() {
                        0
                    } else {
                        flags::PARTITIONS
                    }
                    | if s.sticky { flags::STICKY } else { 0 }
                    | if s.credit.is_some() { flags::CREDIT } else { 0 }
                    | if s.resume.is_empty() {
                        0
                    } else {
                        flags::RESUME
                    };
                with_header(buf, opcode::SUBSCRIBE, fl, |b| {
                    b.put_u32(s.sid);
                    put_bytes8(b, &s.pattern);
                    if let Some(group) = &s.group {
                        put_bytes8(b, group);
                    }
                    if let Some((kind, value)) = start {
                        b.put_u8(kind);
                        b.put_u64(value);
                    }
                    if let Some(policy) = s.policy {
                        b.put_u8(policy.code());
                    }
                    if !s.partitions.is_empty() {
                        // At most u16::MAX go out; the broker refuses more
                        // than a topic can have long before that.
                        let n = s.partitions.len().min(usize::from(u16::MAX));
                        b.put_u16(n as u16);
                        for p in &s.partitions[..n] {
                            b.put_u32(*p);
                        }
                    }
                    if let Some(credit) = s.credit {
                        b.put_u32(credit.messages);
                        b.put_u32(credit.bytes);
                    }
                    if !s.resume.is_empty() {
                        b.put_u32(s.resume.len() as u32);
                        for at in &s.resume {
                            put_bytes8(b, &at.topic);
                            b.put_u32(at.partition);
                            b.put_u64(at.next);
                        }
                    }
                })
            }
            Frame::Missed(m) => {
                let fl = match &m.range {
                    None => 0,
                    Some(r) if r.partition.is_some() => flags::RANGE | flags::RANGE_PARTITION,
                    Some(_) => flags::RANGE,
                };
                with_header(buf, opcode::MISSED, fl, |b| {
                    b.put_u32(m.sid);
                    b.put_u64(m.count);
                    if let Some(range) = &m.range {
                        put_bytes8(b, &range.topic);
                        b.put_u64(range.first);
                        b.put_u64(range.last);
                        if let Some(p) = range.partition {
                            b.put_u32(p);
                        }
                    }
                })
            }
            Frame::SubAck(sid) => with_header(buf, opcode::SUB_ACK, 0, |b| b.put_u32(*sid)),
            Frame::SubNack(n) => with_header(buf, opcode::SUB_NACK, 0, |b| {
                b.put_u32(n.id as u32);
                b.put_u16(n.code.as_u16());
                put_str16(b, &n.reason);
            }),
            Frame::Unsubscribe(sid) => {
                with_header(buf, opcode::UNSUBSCRIBE, 0, |b| b.put_u32(*sid))
            }
            Frame::PeerCall(c) => with_header(buf, opcode::PEER_CALL, 0, |b| {
                b.put_u64(c.id);
                b.put_u8(c.kind);
                b.put_slice(&c.body);
            }),
            Frame::PeerReply(r) => with_header(buf, opcode::PEER_REPLY, 0, |b| {
                b.put_u64(r.id);
                b.put_slice(&r.body);
            }),
            Frame::Credit(c) => with_header(buf, opcode::CREDIT, 0, |b| {
                b.put_u32(c.sid);
                b.put_u32(c.messages);
                b.put_u32(c.bytes);
            }),
            Frame::Message(d) => {
                let at = (d.offset, d.partition);
                encode_deliver_raw(buf, d.sid, at, d.body.flags(), d.body.raw())
            }
            Frame::Route(r) => {
                let groups: Vec<&[u8]> = r.groups.iter().map(|g| g.as_bytes()).collect();
                encode_route_raw(
                    buf,
                    r.plain,
                    r.partition,
                    &groups,
                    r.body.flags(),
                    r.body.raw(),
                )
            }
        }
    }

    /// This frame as a new buffer.
    pub fn to_bytes(&self) -> Bytes {
        let mut buf = BytesMut::new();
        self.encode(&mut buf);
        buf.freeze()
    }
}

/// Writes a PUBLISH frame from its parts.
pub fn encode_publish(
    buf: &mut BytesMut,
    seq: u64,
    ack: bool,
    topic: &Topic,
    partition: Option<PartitionId>,
    headers: &Headers,
    payload: &[u8],
) {
    let body = body_len(topic, partition, headers, payload);
    let fl = body_flags(partition, headers) | if ack { flags::ACK } else { 0 };
    buf.reserve(super::HEADER_LEN + 8 + body);
    buf.put_u32((2 + 8 + body) as u32);
    buf.put_u8(opcode::PUBLISH);
    buf.put_u8(fl);
    buf.put_u64(seq);
    put_body(buf, topic, partition, headers, payload);
}

/// The length field of a PUBLISH frame with these parts: what the broker
/// compares with its maximum frame size.
pub fn publish_len(
    topic: &Topic,
    partition: Option<PartitionId>,
    headers: &Headers,
    payload: &[u8],
) -> usize {
    2 + 8 + body_len(topic, partition, headers, payload)
}

/// Writes a MESSAGE frame: the subscription id, then `body` unchanged.
pub fn encode_deliver(buf: &mut BytesMut, sid: u32, offset: Option<u64>, body: &MessageBody) {
    encode_deliver_raw(buf, sid, (offset, None), body.flags(), body.raw());
}

/// Writes a MESSAGE frame around an encoded body (as borrowed from a
/// PUBLISH by [`peek`](super::decode::peek)), with the message's offset
/// and partition when given.
pub fn encode_deliver_raw(
    buf: &mut BytesMut,
    sid: u32,
    (offset, partition): (Option<u64>, Option<u32>),
    body_flags: u8,
    body: &[u8],
) {
    let extra = if offset.is_some() { 8 } else { 0 } + if partition.is_some() { 4 } else { 0 };
    buf.reserve(deliver_len_raw(body) + extra);
    buf.put_u32((2 + 4 + extra + body.len()) as u32);
    buf.put_u8(opcode::MESSAGE);
    let fl = body_flags & flags::BODY;
    match (offset, partition) {
        (Some(offset), None) => {
            buf.put_u8(fl | flags::OFFSET);
            buf.put_u32(sid);
            buf.put_u64(offset);
        }
        (None, None) => {
            buf.put_u8(fl);
            buf.put_u32(sid);
        }
        (offset, Some(partition)) => {
            buf.put_u8(fl | flags::IN_PARTITION | offset.map_or(0, |_| flags::OFFSET));
            buf.put_u32(sid);
            if let Some(offset) = offset {
                buf.put_u64(offset);
            }
            buf.put_u32(partition);
        }
    }
    buf.put_slice(body);
}

/// Writes a ROUTE frame around an encoded body: for the receiving node's
/// plain subscriptions (`plain`) and one member of each of `groups` (names
/// of at most 255 bytes, at most 255 of them; longer ones are cut).
pub fn encode_route_raw(
    buf: &mut BytesMut,
    plain: bool,
    partition: Option<u32>,
    groups: &[&[u8]],
    body_flags: u8,
    body: &[u8],
) {
    let groups = &groups[..groups.len().min(255)];
    let group_len: usize = groups.iter().map(|g| 1 + g.len().min(255)).sum();
    let extra = if partition.is_some() { 4 } else { 0 } + 1 + group_len;
    buf.reserve(4 + 2 + extra + body.len());
    buf.put_u32((2 + extra + body.len()) as u32);
    buf.put_u8(opcode::ROUTE);
    let mut fl = body_flags & flags::BODY;
    if plain {
        fl |= flags::ROUTE_PLAIN;
    }
    if partition.is_some() {
        fl |= flags::IN_PARTITION;
    }
    buf.put_u8(fl);
    if let Some(partition) = partition {
        buf.put_u32(partition);
    }
    buf.put_u8(groups.len() as u8);
    for group in groups {
        let group = &group[..group.len().min(255)];
        buf.put_u8(group.len() as u8);
        buf.put_slice(group);
    }
    buf.put_slice(body);
}

/// SUBSCRIBE's start fields: `(kind, value)`, none for `Latest`.
fn start_fields(start: crate::StartPosition) -> Option<(u8, u64)> {
    use crate::StartPosition as S;
    Some(match start {
        S::Latest => return None,
        S::Earliest => (1, 0),
        S::Offset(n) => (2, n),
        S::Time(t) => (3, t.as_nanos()),
        S::Last(n) => (4, n),
    })
}

/// The bytes a MESSAGE frame with `body` occupies.
pub fn deliver_len(body: &MessageBody) -> usize {
    deliver_len_raw(body.raw())
}

/// The bytes a MESSAGE frame around an encoded body occupies (without an
/// offset; add 8 with one).
pub fn deliver_len_raw(body: &[u8]) -> usize {
    super::HEADER_LEN + 4 + body.len()
}

/// Encodes the body of `message` as PUBLISH and MESSAGE carry it; returns
/// its flag bits and the bytes. Cheaper than [`MessageBody::from_message`]
/// for a caller that only forwards the bytes.
pub fn encode_body(message: &Message) -> (u8, Bytes) {
    let (topic, partition, headers, payload) = (
        &message.topic,
        message.partition,
        &message.headers,
        &message.payload,
    );
    let mut buf = BytesMut::with_capacity(body_len(topic, partition, headers, payload));
    put_body(&mut buf, topic, partition, headers, payload);
    (body_flags(partition, headers), buf.freeze())
}

pub(super) fn body_flags(partition: Option<PartitionId>, headers: &Headers) -> u8 {
    let mut fl = 0;
    if partition.is_some() {
        fl |= flags::PARTITION;
    }
    if !headers.is_empty() {
        fl |= flags::HEADERS;
    }
    fl
}

pub(super) fn body_len(
    topic: &Topic,
    partition: Option<PartitionId>,
    headers: &Headers,
    payload: &[u8],
) -> usize {
    let headers_len = if headers.is_empty() {
        0
    } else {
        2 + headers
            .iter()
            .map(|(n, v)| 1 + n.len().min(255) + 2 + v.len().min(65535))
            .sum::<usize>()
    };
    1 + topic.len() + partition.map_or(0, |_| 4) + headers_len + payload.len()
}

pub(super) fn put_body(
    buf: &mut BytesMut,
    topic: &Topic,
    partition: Option<PartitionId>,
    headers: &Headers,
    payload: &[u8],
) {
    put_bytes8(buf, topic.as_bytes());
    if let Some(p) = partition {
        buf.put_u32(p.get());
    }
    if !headers.is_empty() {
        buf.put_u16(headers.len().min(usize::from(u16::MAX)) as u16);
        for (name, value) in headers.iter().take(usize::from(u16::MAX)) {
            put_str8(buf, name);
            put_str16(buf, value);
        }
    }
    buf.put_slice(payload);
}

fn with_header(buf: &mut BytesMut, op: u8, fl: u8, body: impl FnOnce(&mut BytesMut)) {
    let start = buf.len();
    buf.put_u32(0);
    buf.put_u8(op);
    buf.put_u8(fl);
    body(buf);
    let len = (buf.len() - start - 4) as u32;
    buf[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn put_bytes8(buf: &mut BytesMut, b: &[u8]) {
    let b = &b[..b.len().min(255)];
    buf.put_u8(b.len() as u8);
    buf.put_slice(b);
}

fn put_str8(buf: &mut BytesMut, s: &str) {
    put_bytes8(buf, cut(s, 255).as_bytes());
}

fn put_str16(buf: &mut BytesMut, s: &str) {
    let s = cut(s, usize::from(u16::MAX));
    buf.put_u16(s.len() as u16);
    buf.put_slice(s.as_bytes());
}

fn put_properties(buf: &mut BytesMut, props: &[(String, String)]) {
    let props = &props[..props.len().min(usize::from(u16::MAX))];
    buf.put_u16(props.len() as u16);
    for (name, value) in props {
        put_str8(buf, name);
        put_str16(buf, value);
    }
}
