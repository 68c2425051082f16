//! Bytes to frames.
//!
//! Two ways in:
//!
//! - [`decode`] splits one complete frame off a buffer and returns it owned;
//!   its topic, payload and header block are slices of the received bytes,
//!   not copies.
//! - [`peek`] is the data path's: it looks at the frame at the front of a
//!   buffer without taking it, and for PUBLISH and MESSAGE frames returns
//!   views borrowed from the buffer ([`PublishRef`], [`DeliverRef`]), so that
//!   a connection handles a whole read chunk and then advances past it once,
//!   with no reference counting per message.
//!
//! Both validate everything: a body forwarded unchanged to subscribers has
//! been checked field by field.

use std::ops::Range;

use bytes::{Bytes, BytesMut};

use super::error::{ErrorCode, ProtocolError};
use super::frame::*;
use super::{flags, opcode, HEADER_LEN, MAGIC};

/// Takes the first complete frame off `buf`.
///
/// Returns `Ok(None)` when `buf` holds only part of a frame; the caller reads
/// more and calls again. A length above `max_frame_bytes` is an error before
/// anything is allocated for it.
pub fn decode(buf: &mut BytesMut, max_frame_bytes: usize) -> Result<Option<Frame>, ProtocolError> {
    let Some(len) = frame_len(buf, max_frame_bytes)? else {
        return Ok(None);
    };
    let frame = buf.split_to(4 + len).freeze();
    parse(frame).map(Some)
}

/// The announced length of the frame at the front of `buf`, once `buf`
/// holds all of it; `Ok(None)` while it does not.
#[inline]
pub fn frame_len(buf: &[u8], max_frame_bytes: usize) -> Result<Option<usize>, ProtocolError> {
    let Some(prefix) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
    if len < 2 {
        return Err(ProtocolError::FrameTooShort(len));
    }
    if len as usize > max_frame_bytes {
        return Err(ProtocolError::FrameTooLarge {
            len: u64::from(len),
            max: max_frame_bytes,
        });
    }
    Ok((buf.len() >= 4 + len as usize).then_some(len as usize))
}

/// A PUBLISH frame borrowed from a read buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishRef<'a> {
    pub seq: u64,
    pub ack: bool,
    /// The body's flag bits ([`flags::BODY`]).
    pub body_flags: u8,
    /// The whole message body, as forwarded in MESSAGE frames.
    pub body: &'a [u8],
    /// The topic, not yet validated.
    pub topic: &'a [u8],
}

/// A MESSAGE frame borrowed from a read buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliverRef<'a> {
    pub sid: u32,
    /// The message's offset in its topic partition, when the broker sent it.
    pub offset: Option<u64>,
    /// The partition the message is in, when the topic has more than one.
    pub partition: Option<u32>,
    pub body_flags: u8,
    pub body: &'a [u8],
}

/// A ROUTE frame borrowed from a read buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteRef<'a> {
    pub plain: bool,
    pub partition: Option<u32>,
    /// The queue group names, each a length byte and UTF-8 (validated);
    /// see [`RouteRef::groups`].
    pub group_block: &'a [u8],
    pub body_flags: u8,
    pub body: &'a [u8],
    /// The topic, not yet validated as a topic name.
    pub topic: &'a [u8],
}

impl<'a> RouteRef<'a> {
    /// The queue group names.
    pub fn groups(&self) -> impl Iterator<Item = &'a [u8]> {
        let mut rest = self.group_block;
        std::iter::from_fn(move || {
            let (&n, tail) = rest.split_first()?;
            let (name, tail) = tail.split_at(usize::from(n));
            rest = tail;
            Some(name)
        })
    }
}

/// What is at the front of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Peek<'a> {
    /// Not a whole frame yet.
    Incomplete,
    /// A valid PUBLISH of `len` bytes (prefix included).
    Publish(PublishRef<'a>, usize),
    /// A valid MESSAGE of `len` bytes (prefix included).
    Deliver(DeliverRef<'a>, usize),
    /// A valid ROUTE of `len` bytes (prefix included).
    Route(RouteRef<'a>, usize),
    /// A whole frame of another kind: take it with [`decode`].
    Other,
}

/// Looks at the frame at the front of `buf` without taking it.
#[inline(always)]
pub fn peek(buf: &[u8], max_frame_bytes: usize) -> Result<Peek<'_>, ProtocolError> {
    let Some(len) = frame_len(buf, max_frame_bytes)? else {
        return Ok(Peek::Incomplete);
    };
    let (op, fl) = (buf[4], buf[5]);
    let body = &buf[HEADER_LEN..4 + len];
    match op {
        opcode::PUBLISH => {
            check_flags("PUBLISH", fl, flags::ACK | flags::BODY)?;
            let mut r = Reader::new(body, "PUBLISH");
            let seq = r.u64("seq")?;
            let body = r.rest();
            let layout = body_layout(body, fl, "PUBLISH")?;
            Ok(Peek::Publish(
                PublishRef {
                    seq,
                    ack: fl & flags::ACK != 0,
                    body_flags: fl & flags::BODY,
                    body,
                    topic: &body[layout.topic],
                },
                4 + len,
            ))
        }
        opcode::MESSAGE => {
            check_flags("MESSAGE", fl, MESSAGE_FLAGS)?;
            let mut r = Reader::new(body, "MESSAGE");
            let (sid, offset, partition) = deliver_fields(&mut r, fl)?;
            let body = r.rest();
            body_layout(body, fl, "MESSAGE")?;
            Ok(Peek::Deliver(
                DeliverRef {
                    sid,
                    offset,
                    partition,
                    body_flags: fl & flags::BODY,
                    body,
                },
                4 + len,
            ))
        }
        // Out of line: only route links carry it, and `peek` stays small
        // enough to be inlined into the clients' and connections' loops.
        opcode::ROUTE => peek_route(body, fl, len),
        _ => Ok(Peek::Other),
    }
}

/// [`peek`] of a ROUTE frame's `body` (after the header).
#[inline(never)]
fn peek_route(body: &[u8], fl: u8, len: usize) -> Result<Peek<'_>, ProtocolError> {
    check_flags("ROUTE", fl, ROUTE_FLAGS)?;
    let mut r = Reader::new(body, "ROUTE");
    let (partition, group_block) = route_fields(&mut r, fl)?;
    let body = r.rest();
    let layout = body_layout(body, fl, "ROUTE")?;
    Ok(Peek::Route(
        RouteRef {
            plain: fl & flags::ROUTE_PLAIN != 0,
            partition,
            group_block,
            body_flags: fl & flags::BODY,
            body,
            topic: &body[layout.topic],
        },
        4 + len,
    ))
}

/// The flags a MESSAGE frame may carry.
const MESSAGE_FLAGS: u8 = flags::BODY | flags::OFFSET | flags::IN_PARTITION;

/// The flags a ROUTE frame may carry.
const ROUTE_FLAGS: u8 = flags::BODY | flags::ROUTE_PLAIN | flags::IN_PARTITION;

/// ROUTE's partition and its block of group names (validated).
fn route_fields<'a>(r: &mut Reader<'a>, fl: u8) -> Result<(Option<u32>, &'a [u8]), ProtocolError> {
    let partition = if fl & flags::IN_PARTITION != 0 {
        Some(r.u32("partition")?)
    } else {
        None
    };
    let count = r.take(1, "group count")?[0];
    let start = r.pos;
    for _ in 0..count {
        r.str8_ref("group")?;
    }
    Ok((partition, &r.buf[start..r.pos]))
}

/// A MESSAGE frame's fields before its body: sid, offset, partition.
#[inline]
fn deliver_fields(
    r: &mut Reader<'_>,
    fl: u8,
) -> Result<(u32, Option<u64>, Option<u32>), ProtocolError> {
    let sid = r.u32("sid")?;
    let offset = if fl & flags::OFFSET != 0 {
        Some(r.u64("offset")?)
    } else {
        None
    };
    let partition = if fl & flags::IN_PARTITION != 0 {
        Some(r.u32("partition")?)
    } else {
        None
    };
    Ok((sid, offset, partition))
}

#[inline]
fn check_flags(frame: &'static str, fl: u8, allowed: u8) -> Result<(), ProtocolError> {
    if fl & !allowed != 0 {
        return Err(ProtocolError::UnknownFlags {
            frame,
            flags: fl & !allowed,
        });
    }
    Ok(())
}

/// Parses one whole frame, length prefix included.
fn parse(frame: Bytes) -> Result<Frame, ProtocolError> {
    let op = frame[4];
    let fl = frame[5];
    let name = opcode_name(op).ok_or(ProtocolError::UnknownOpcode(op))?;
    let allowed = match op {
        opcode::PUBLISH => flags::ACK | flags::BODY,
        opcode::MESSAGE => MESSAGE_FLAGS,
        opcode::ROUTE => ROUTE_FLAGS,
        opcode::SUBSCRIBE => {
            flags::QUEUE
                | flags::START
                | flags::POLICY
                | flags::PARTITIONS
                | flags::STICKY
                | flags::CREDIT
                | flags::RESUME
        }
        opcode::MISSED => flags::RANGE | flags::RANGE_PARTITION,
        opcode::ERROR => flags::RETRY_AFTER,
        _ => 0,
    };
    check_flags(name, fl, allowed)?;
    let body = frame.slice(HEADER_LEN..);
    let mut r = Reader::new(&body, name);
    let parsed = match op {
        opcode::HELLO => {
            if r.take(4, "magic")? != MAGIC {
                return Err(ProtocolError::BadMagic);
            }
            Frame::Hello(Hello {
                min_version: r.u16("min_version")?,
                max_version: r.u16("max_version")?,
                client_name: r.str8("client_name")?,
                properties: r.properties()?,
            })
        }
        opcode::WELCOME => Frame::Welcome(Welcome {
            version: r.u16("version")?,
            server_name: r.str8("server_name")?,
            max_frame_bytes: r.u32("max_frame_bytes")?,
            properties: r.properties()?,
        }),
        opcode::PING => Frame::Ping(r.u64("token")?),
        opcode::PONG => Frame::Pong(r.u64("token")?),
        opcode::STATS => Frame::Stats(r.u64("token")?),
        opcode::DRAIN => Frame::Drain(r.u32("within")?),
        opcode::STATS_REPLY => Frame::StatsReply(StatsReply {
            token: r.u64("token")?,
            json: r.str16("json")?,
        }),
        opcode::ADMIN => Frame::Admin(AdminRequest {
            token: r.u64("token")?,
            json: r.str16("request")?,
        }),
        opcode::ADMIN_REPLY => Frame::AdminReply(AdminReply {
            token: r.u64("token")?,
            code: match r.u16("code")? {
                0 => None,
                code => Some(ErrorCode::from_u16(code)),
            },
            text: r.str16("text")?,
        }),
        opcode::ERROR => Frame::Error(ErrorFrame {
            code: ErrorCode::from_u16(r.u16("code")?),
            reason: r.str16("reason")?,
            retry_after_ms: if fl & flags::RETRY_AFTER != 0 {
                Some(r.u32("retry after")?)
            } else {
                None
            },
        }),
        opcode::PUBLISH => {
            let seq = r.u64("seq")?;
            let start = r.pos;
            return Ok(Frame::Publish(Publish {
                seq,
                ack: fl & flags::ACK != 0,
                body: parse_body(body.slice(start..), fl, "PUBLISH")?,
            }));
        }
        opcode::MESSAGE => {
            let (sid, offset, partition) = deliver_fields(&mut r, fl)?;
            let start = r.pos;
            return Ok(Frame::Message(Deliver {
                sid,
                offset,
                partition,
                body: parse_body(body.slice(start..), fl, "MESSAGE")?,
            }));
        }
        opcode::ROUTE => {
            let (partition, block) = route_fields(&mut r, fl)?;
            let groups = RouteRef {
                plain: false,
                partition,
                group_block: block,
                body_flags: 0,
                body: &[],
                topic: &[],
            }
            .groups()
            .map(|g| String::from_utf8_lossy(g).into_owned())
            .collect();
            let start = r.pos;
            return Ok(Frame::Route(Routed {
                plain: fl & flags::ROUTE_PLAIN != 0,
                partition,
                groups,
                body: parse_body(body.slice(start..), fl, "ROUTE")?,
            }));
        }
        opcode::PEER_CALL => {
            let id = r.u64("id")?;
            let kind = r.take(1, "kind")?[0];
            let start = r.pos;
            return Ok(Frame::PeerCall(PeerCall {
                id,
                kind,
                body: body.slice(start..),
            }));
        }
        opcode::PEER_REPLY => {
            let id = r.u64("id")?;
            let start = r.pos;
            return Ok(Frame::PeerReply(PeerReply {
                id,
                body: body.slice(start..),
            }));
        }
        opcode::PUB_ACK => Frame::PubAck(r.u64("seq")?),
        opcode::PUB_NACK => Frame::PubNack(Nack {
            id: r.u64("seq")?,
            code: ErrorCode::from_u16(r.u16("code")?),
            reason: r.str16("reason")?,
        }),
        opcode::SUBSCRIBE => {
            let sid = r.u32("sid")?;
            let pattern = r.range8("pattern")?;
            let group = if fl & flags::QUEUE != 0 {
                Some(body.slice(r.range8("group")?))
            } else {
                None
            };
            let start = if fl & flags::START != 0 {
                let kind = r.take(1, "start")?[0];
                let value = r.u64("start value")?;
                match kind {
                    1 => crate::StartPosition::Earliest,
                    2 => crate::StartPosition::Offset(value),
                    3 => crate::StartPosition::Time(crate::Timestamp::from_nanos(value)),
                    4 => crate::StartPosition::Last(value),
                    other => {
                        return Err(ProtocolError::UnknownValue {
                            frame: "SUBSCRIBE",
                            field: "start",
                            value: u64::from(other),
                        })
                    }
                }
            } else {
                crate::StartPosition::Latest
            };
            let policy = if fl & flags::POLICY != 0 {
                let code = r.take(1, "policy")?[0];
                Some(crate::SlowConsumerPolicy::from_code(code).ok_or(
                    ProtocolError::UnknownValue {
                        frame: "SUBSCRIBE",
                        field: "policy",
                        value: u64::from(code),
                    },
                )?)
            } else {
                None
            };
            let mut partitions = Vec::new();
            if fl & flags::PARTITIONS != 0 {
                let n = r.u16("partitions")?;
                // Each entry is checked against the frame before the list
                // grows, so an announced count costs no more than its bytes.
                for _ in 0..n {
                    partitions.push(r.u32("partitions")?);
                }
            }
            let credit = if fl & flags::CREDIT != 0 {
                let (messages, bytes) = (r.u32("credit messages")?, r.u32("credit bytes")?);
                if messages == 0 && bytes == 0 {
                    return Err(ProtocolError::UnknownValue {
                        frame: "SUBSCRIBE",
                        field: "credit",
                        value: 0,
                    });
                }
                Some(Credit {
                    sid,
                    messages,
                    bytes,
                })
            } else {
                None
            };
            let mut resume = Vec::new();
            if fl & flags::RESUME != 0 {
                let n = r.u32("resume")?;
                // As with partitions: the list grows only as its bytes are there.
                for _ in 0..n {
                    let topic = r.range8("resume topic")?;
                    let partition = r.u32("resume partition")?;
                    let next = r.u64("resume offset")?;
                    resume.push(ResumeAt {
                        topic: body.slice(topic),
                        partition,
                        next,
                    });
                }
            }
            let sticky = fl & flags::STICKY != 0;
            if sticky && group.is_none() {
                return Err(ProtocolError::UnknownFlags {
                    frame: "SUBSCRIBE",
                    flags: flags::STICKY,
                });
            }
            Frame::Subscribe(Subscribe {
                sid,
                pattern: body.slice(pattern),
                group,
                start,
                policy,
                partitions,
                sticky,
                credit,
                resume,
            })
        }
        opcode::SUB_ACK => Frame::SubAck(r.u32("sid")?),
        opcode::SUB_NACK => Frame::SubNack(Nack {
            id: u64::from(r.u32("sid")?),
            code: ErrorCode::from_u16(r.u16("code")?),
            reason: r.str16("reason")?,
        }),
        opcode::UNSUBSCRIBE => Frame::Unsubscribe(r.u32("sid")?),
        opcode::CREDIT => Frame::Credit(Credit {
            sid: r.u32("sid")?,
            messages: r.u32("messages")?,
            bytes: r.u32("bytes")?,
        }),
        opcode::MISSED => {
            let sid = r.u32("sid")?;
            let count = r.u64("count")?;
            let range = if fl & flags::RANGE != 0 {
                let topic = body.slice(r.range8("topic")?);
                let (first, last) = (r.u64("first")?, r.u64("last")?);
                let partition = if fl & flags::RANGE_PARTITION != 0 {
                    Some(r.u32("partition")?)
                } else {
                    None
                };
                Some(MissedRange {
                    topic,
                    partition,
                    first,
                    last,
                })
            } else if fl & flags::RANGE_PARTITION != 0 {
                return Err(ProtocolError::UnknownFlags {
                    frame: "MISSED",
                    flags: flags::RANGE_PARTITION,
                });
            } else {
                None
            };
            Frame::Missed(Missed { sid, count, range })
        }
        _ => return Err(ProtocolError::UnknownOpcode(op)),
    };
    r.finish()?;
    Ok(parsed)
}

/// Where a message body's fields are.
struct BodyLayout {
    topic: Range<usize>,
    partition: Option<u32>,
    headers: Option<Range<usize>>,
    payload: usize,
}

/// Checks a message body field by field and says where each field is.
#[inline]
fn body_layout(body: &[u8], fl: u8, frame: &'static str) -> Result<BodyLayout, ProtocolError> {
    let mut r = Reader::new(body, frame);
    let topic = r.range8("topic")?;
    let partition = if fl & flags::PARTITION != 0 {
        Some(r.u32("partition")?)
    } else {
        None
    };
    let headers = if fl & flags::HEADERS != 0 {
        let start = r.pos;
        let count = r.u16("header count")?;
        for _ in 0..count {
            r.str8_ref("header name")?;
            r.str16_ref("header value")?;
        }
        Some(start..r.pos)
    } else {
        None
    };
    Ok(BodyLayout {
        topic,
        partition,
        headers,
        payload: r.pos,
    })
}

/// Parses a message body; `raw` is exactly the body's bytes.
pub(super) fn parse_body(
    raw: Bytes,
    fl: u8,
    frame: &'static str,
) -> Result<MessageBody, ProtocolError> {
    let layout = body_layout(&raw, fl, frame)?;
    Ok(MessageBody {
        flags: fl & flags::BODY,
        topic: raw.slice(layout.topic),
        partition: layout.partition,
        headers: layout.headers.map(|h| raw.slice(h)),
        payload: raw.slice(layout.payload..),
        raw,
    })
}

/// The parts of a body [`peek`] validated: topic, partition, header block
/// (if any) and payload.
#[inline]
pub fn body_parts(body: &[u8], body_flags: u8) -> Result<BodyParts<'_>, ProtocolError> {
    let layout = body_layout(body, body_flags, "MESSAGE")?;
    Ok(BodyParts {
        topic: &body[layout.topic],
        partition: layout.partition,
        headers: layout.headers.map(|h| &body[h]),
        payload: &body[layout.payload..],
    })
}

/// The fields of a message body, borrowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyParts<'a> {
    pub topic: &'a [u8],
    pub partition: Option<u32>,
    pub headers: Option<&'a [u8]>,
    pub payload: &'a [u8],
}

/// The value of header `name` in a headers block that was validated,
/// borrowed: nothing is allocated.
pub fn find_header<'a>(block: &'a [u8], name: &str) -> Option<&'a [u8]> {
    let mut r = Reader::new(block, "MESSAGE");
    let count = r.u16("header count").ok()?;
    for _ in 0..count {
        let n = r.bytes8("header name").ok()?;
        let value = r.bytes16("header value").ok()?;
        if n == name.as_bytes() {
            return Some(value);
        }
    }
    None
}

/// The name/value pairs of a headers block that was validated.
pub fn header_pairs(block: &[u8]) -> impl Iterator<Item = (String, String)> + '_ {
    header_slices(block).map_while(|(name, value)| {
        let name = std::str::from_utf8(name).ok()?;
        let value = std::str::from_utf8(value).ok()?;
        Some((name.to_string(), value.to_string()))
    })
}

/// The name/value pairs of a headers block that was validated, borrowed.
pub fn header_slices(block: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
    let mut r = Reader::new(block, "MESSAGE");
    let count = r.u16("header count").unwrap_or(0);
    (0..count).map_while(move |_| {
        let name = r.bytes8("header name").ok()?;
        let value = r.bytes16("header value").ok()?;
        Some((name, value))
    })
}

fn opcode_name(op: u8) -> Option<&'static str> {
    Some(match op {
        opcode::HELLO => "HELLO",
        opcode::WELCOME => "WELCOME",
        opcode::PING => "PING",
        opcode::PONG => "PONG",
        opcode::STATS => "STATS",
        opcode::STATS_REPLY => "STATS_REPLY",
        opcode::DRAIN => "DRAIN",
        opcode::ADMIN => "ADMIN",
        opcode::ADMIN_REPLY => "ADMIN_REPLY",
        opcode::ERROR => "ERROR",
        opcode::PUBLISH => "PUBLISH",
        opcode::PUB_ACK => "PUB_ACK",
        opcode::PUB_NACK => "PUB_NACK",
        opcode::SUBSCRIBE => "SUBSCRIBE",
        opcode::SUB_ACK => "SUB_ACK",
        opcode::SUB_NACK => "SUB_NACK",
        opcode::UNSUBSCRIBE => "UNSUBSCRIBE",
        opcode::CREDIT => "CREDIT",
        opcode::PEER_CALL => "PEER_CALL",
        opcode::PEER_REPLY => "PEER_REPLY",
        opcode::ROUTE => "ROUTE",
        opcode::MESSAGE => "MESSAGE",
        opcode::MISSED => "MISSED",
        _ => return None,
    })
}

/// A cursor over a frame's body that names the field it failed on.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    frame: &'static str,
}

impl<'a> Reader<'a> {
    #[inline]
    fn new(buf: &'a [u8], frame: &'static str) -> Self {
        Reader { buf, pos: 0, frame }
    }

    #[inline]
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], ProtocolError> {
        let end = self.pos + n;
        let Some(bytes) = self.buf.get(self.pos..end) else {
            return Err(ProtocolError::Truncated {
                frame: self.frame,
                field,
            });
        };
        self.pos = end;
        Ok(bytes)
    }

    #[inline]
    fn rest(&mut self) -> &'a [u8] {
        let rest = &self.buf[self.pos..];
        self.pos = self.buf.len();
        rest
    }

    #[inline]
    fn u16(&mut self, field: &'static str) -> Result<u16, ProtocolError> {
        let b = self.take(2, field)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    #[inline]
    fn u32(&mut self, field: &'static str) -> Result<u32, ProtocolError> {
        let b = self.take(4, field)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    #[inline]
    fn u64(&mut self, field: &'static str) -> Result<u64, ProtocolError> {
        let b = self.take(8, field)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    /// A `u8`-length field, as a range of the buffer.
    #[inline]
    fn range8(&mut self, field: &'static str) -> Result<Range<usize>, ProtocolError> {
        let n = usize::from(self.take(1, field)?[0]);
        let start = self.pos;
        self.take(n, field)?;
        Ok(start..start + n)
    }

    #[inline]
    fn bytes8(&mut self, field: &'static str) -> Result<&'a [u8], ProtocolError> {
        let n = usize::from(self.take(1, field)?[0]);
        self.take(n, field)
    }

    #[inline]
    fn bytes16(&mut self, field: &'static str) -> Result<&'a [u8], ProtocolError> {
        let n = self.u16(field)?;
        self.take(usize::from(n), field)
    }

    #[inline]
    fn utf8(&self, bytes: &'a [u8], field: &'static str) -> Result<&'a str, ProtocolError> {
        std::str::from_utf8(bytes).map_err(|_| ProtocolError::InvalidUtf8 {
            frame: self.frame,
            field,
        })
    }

    fn str8(&mut self, field: &'static str) -> Result<String, ProtocolError> {
        let b = self.bytes8(field)?;
        Ok(self.utf8(b, field)?.to_owned())
    }

    fn str16(&mut self, field: &'static str) -> Result<String, ProtocolError> {
        let b = self.bytes16(field)?;
        Ok(self.utf8(b, field)?.to_owned())
    }

    #[inline]
    fn str8_ref(&mut self, field: &'static str) -> Result<(), ProtocolError> {
        let b = self.bytes8(field)?;
        self.utf8(b, field).map(|_| ())
    }

    #[inline]
    fn str16_ref(&mut self, field: &'static str) -> Result<(), ProtocolError> {
        let b = self.bytes16(field)?;
        self.utf8(b, field).map(|_| ())
    }

    fn properties(&mut self) -> Result<Vec<(String, String)>, ProtocolError> {
        let count = self.u16("property count")?;
        // Each property takes at least 3 bytes, which bounds the allocation
        // by the frame that was already received.
        let mut props = Vec::with_capacity(usize::from(count).min((self.buf.len() - self.pos) / 3));
        for _ in 0..count {
            props.push((self.str8("property name")?, self.str16("property value")?));
        }
        Ok(props)
    }

    fn finish(self) -> Result<(), ProtocolError> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(ProtocolError::TrailingBytes {
                frame: self.frame,
                extra: self.buf.len() - self.pos,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Headers, PartitionId, Topic};

    #[test]
    fn incomplete_is_not_an_error() {
        let mut buf = BytesMut::from(&[0u8, 0, 0, 10, opcode::PING][..]);
        assert_eq!(decode(&mut buf, 1024), Ok(None));
        assert_eq!(peek(&buf, 1024), Ok(Peek::Incomplete));
        assert_eq!(buf.len(), 5);
    }

    #[test]
    fn huge_length_is_refused_before_allocation() {
        let mut buf = BytesMut::from(&[0xffu8, 0xff, 0xff, 0xff][..]);
        let cap = buf.capacity();
        let expected = ProtocolError::FrameTooLarge {
            len: u64::from(u32::MAX),
            max: 1 << 20,
        };
        assert_eq!(peek(&buf, 1 << 20), Err(expected.clone()));
        assert_eq!(decode(&mut buf, 1 << 20), Err(expected));
        assert_eq!(buf.capacity(), cap);
    }

    #[test]
    fn rejects_unknown_opcode_flags_and_trailing_bytes() {
        let mut buf = BytesMut::from(&[0u8, 0, 0, 2, 0x7f, 0][..]);
        assert_eq!(
            decode(&mut buf, 64),
            Err(ProtocolError::UnknownOpcode(0x7f))
        );
        let mut buf =
            BytesMut::from(&[0u8, 0, 0, 10, opcode::PING, 0x80, 0, 0, 0, 0, 0, 0, 0, 1][..]);
        assert!(matches!(
            decode(&mut buf, 64),
            Err(ProtocolError::UnknownFlags { .. })
        ));
        let mut buf =
            BytesMut::from(&[0u8, 0, 0, 11, opcode::PING, 0, 0, 0, 0, 0, 0, 0, 0, 1, 9][..]);
        assert!(matches!(
            decode(&mut buf, 64),
            Err(ProtocolError::TrailingBytes { .. })
        ));
    }

    #[test]
    fn peek_borrows_publish_and_deliver() {
        let topic = Topic::new("a.b").unwrap();
        let headers: Headers = [("k", "v")].into_iter().collect();
        let mut buf = BytesMut::new();
        super::super::encode_publish(
            &mut buf,
            7,
            true,
            &topic,
            Some(PartitionId::new(3)),
            &headers,
            b"hi",
        );
        let Ok(Peek::Publish(p, len)) = peek(&buf, 1024) else {
            panic!("expected a publish")
        };
        assert_eq!(
            (p.seq, p.ack, p.topic, len),
            (7, true, &b"a.b"[..], buf.len())
        );
        let parts = body_parts(p.body, p.body_flags).unwrap();
        assert_eq!((parts.partition, parts.payload), (Some(3), &b"hi"[..]));
        assert_eq!(
            header_pairs(parts.headers.unwrap()).collect::<Vec<_>>(),
            [("k".into(), "v".into())]
        );

        let mut out = BytesMut::new();
        super::super::encode::encode_deliver_raw(
            &mut out,
            9,
            (Some(77), None),
            p.body_flags,
            p.body,
        );
        let Ok(Peek::Deliver(d, _)) = peek(&out, 1024) else {
            panic!("expected a delivery")
        };
        assert_eq!((d.sid, d.offset, d.body), (9, Some(77), p.body));
        assert_eq!(peek(&Frame::Ping(1).to_bytes(), 1024), Ok(Peek::Other));
    }
}
