//! Bytes to frames.
//!
//! [`decode`] splits one complete frame off the front of a buffer and parses
//! it without copying: topics, payloads and header blocks are slices of the
//! received bytes.

use bytes::{Buf, Bytes, BytesMut};

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

/// Parses one whole frame, length prefix included.
fn parse(mut frame: Bytes) -> Result<Frame, ProtocolError> {
    let op = frame[4];
    let fl = frame[5];
    frame.advance(HEADER_LEN);
    let name = opcode_name(op).ok_or(ProtocolError::UnknownOpcode(op))?;
    let allowed = match op {
        opcode::PUBLISH => flags::ACK | flags::BODY,
        opcode::MESSAGE => flags::BODY,
        opcode::SUBSCRIBE => flags::QUEUE,
        _ => 0,
    };
    if fl & !allowed != 0 {
        return Err(ProtocolError::UnknownFlags {
            frame: name,
            flags: fl & !allowed,
        });
    }
    if op == opcode::PUBLISH || op == opcode::MESSAGE {
        return parse_message_frame(op, fl, frame);
    }
    let mut r = Reader {
        buf: frame,
        frame: name,
    };
    let parsed = match op {
        opcode::HELLO => {
            let magic = r.take(4, "magic")?;
            if magic[..] != MAGIC {
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
        opcode::ERROR => Frame::Error(ErrorFrame {
            code: ErrorCode::from_u16(r.u16("code")?),
            reason: r.str16("reason")?,
        }),
        opcode::PUB_ACK => Frame::PubAck(r.u64("seq")?),
        opcode::PUB_NACK => Frame::PubNack(Nack {
            id: r.u64("seq")?,
            code: ErrorCode::from_u16(r.u16("code")?),
            reason: r.str16("reason")?,
        }),
        opcode::SUBSCRIBE => {
            let sid = r.u32("sid")?;
            let pattern = r.bytes8("pattern")?;
            let group = if fl & flags::QUEUE != 0 {
                Some(r.bytes8("group")?)
            } else {
                None
            };
            Frame::Subscribe(Subscribe {
                sid,
                pattern,
                group,
            })
        }
        opcode::SUB_ACK => Frame::SubAck(r.u32("sid")?),
        opcode::SUB_NACK => Frame::SubNack(Nack {
            id: u64::from(r.u32("sid")?),
            code: ErrorCode::from_u16(r.u16("code")?),
            reason: r.str16("reason")?,
        }),
        opcode::UNSUBSCRIBE => Frame::Unsubscribe(r.u32("sid")?),
        _ => return Err(ProtocolError::UnknownOpcode(op)),
    };
    r.finish()?;
    Ok(parsed)
}

fn parse_message_frame(op: u8, fl: u8, frame: Bytes) -> Result<Frame, ProtocolError> {
    if op == opcode::PUBLISH {
        let mut r = Reader {
            buf: frame,
            frame: "PUBLISH",
        };
        let seq = r.u64("seq")?;
        let body = parse_body(r.buf, fl, "PUBLISH")?;
        Ok(Frame::Publish(Publish {
            seq,
            ack: fl & flags::ACK != 0,
            body,
        }))
    } else {
        let mut r = Reader {
            buf: frame,
            frame: "MESSAGE",
        };
        let sid = r.u32("sid")?;
        let body = parse_body(r.buf, fl, "MESSAGE")?;
        Ok(Frame::Message(Deliver { sid, body }))
    }
}

/// Parses a message body; `raw` is exactly the body's bytes.
pub(super) fn parse_body(
    raw: Bytes,
    fl: u8,
    frame: &'static str,
) -> Result<MessageBody, ProtocolError> {
    let mut r = Reader {
        buf: raw.clone(),
        frame,
    };
    let topic = r.bytes8("topic")?;
    let partition = if fl & flags::PARTITION != 0 {
        Some(r.u32("partition")?)
    } else {
        None
    };
    let headers = if fl & flags::HEADERS != 0 {
        let start = r.buf.clone();
        let count = r.u16("header count")?;
        for _ in 0..count {
            r.str8_ref("header name")?;
            r.str16_ref("header value")?;
        }
        let block_len = start.len() - r.buf.len();
        Some(start.slice(..block_len))
    } else {
        None
    };
    Ok(MessageBody {
        flags: fl & flags::BODY,
        raw,
        topic,
        partition,
        headers,
        payload: r.buf,
    })
}

/// The name/value pairs of a headers block that [`parse_body`] validated.
pub(super) fn header_pairs(block: &Bytes) -> impl Iterator<Item = (String, String)> + '_ {
    let mut r = Reader {
        buf: block.clone(),
        frame: "MESSAGE",
    };
    let count = r.u16("header count").unwrap_or(0);
    (0..count).map_while(move |_| {
        let name = r.str8("header name").ok()?;
        let value = r.str16("header value").ok()?;
        Some((name, value))
    })
}

fn opcode_name(op: u8) -> Option<&'static str> {
    Some(match op {
        opcode::HELLO => "HELLO",
        opcode::WELCOME => "WELCOME",
        opcode::PING => "PING",
        opcode::PONG => "PONG",
        opcode::ERROR => "ERROR",
        opcode::PUBLISH => "PUBLISH",
        opcode::PUB_ACK => "PUB_ACK",
        opcode::PUB_NACK => "PUB_NACK",
        opcode::SUBSCRIBE => "SUBSCRIBE",
        opcode::SUB_ACK => "SUB_ACK",
        opcode::SUB_NACK => "SUB_NACK",
        opcode::UNSUBSCRIBE => "UNSUBSCRIBE",
        opcode::MESSAGE => "MESSAGE",
        _ => return None,
    })
}

/// A cursor over a frame's body that names the field it failed on.
struct Reader {
    buf: Bytes,
    frame: &'static str,
}

impl Reader {
    fn take(&mut self, n: usize, field: &'static str) -> Result<Bytes, ProtocolError> {
        if self.buf.len() < n {
            return Err(ProtocolError::Truncated {
                frame: self.frame,
                field,
            });
        }
        Ok(self.buf.split_to(n))
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, ProtocolError> {
        let b = self.take(2, field)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, ProtocolError> {
        let b = self.take(4, field)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, ProtocolError> {
        let b = self.take(8, field)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(&b);
        Ok(u64::from_be_bytes(a))
    }

    fn bytes8(&mut self, field: &'static str) -> Result<Bytes, ProtocolError> {
        let b = self.take(1, field)?;
        self.take(usize::from(b[0]), field)
    }

    fn bytes16(&mut self, field: &'static str) -> Result<Bytes, ProtocolError> {
        let n = self.u16(field)?;
        self.take(usize::from(n), field)
    }

    fn utf8(&self, bytes: Bytes, field: &'static str) -> Result<String, ProtocolError> {
        String::from_utf8(bytes.to_vec()).map_err(|_| ProtocolError::InvalidUtf8 {
            frame: self.frame,
            field,
        })
    }

    fn str8(&mut self, field: &'static str) -> Result<String, ProtocolError> {
        let b = self.bytes8(field)?;
        self.utf8(b, field)
    }

    fn str16(&mut self, field: &'static str) -> Result<String, ProtocolError> {
        let b = self.bytes16(field)?;
        self.utf8(b, field)
    }

    /// Checks a string field without copying it out.
    fn str8_ref(&mut self, field: &'static str) -> Result<(), ProtocolError> {
        let b = self.bytes8(field)?;
        self.check_utf8(&b, field)
    }

    fn str16_ref(&mut self, field: &'static str) -> Result<(), ProtocolError> {
        let b = self.bytes16(field)?;
        self.check_utf8(&b, field)
    }

    fn check_utf8(&self, b: &[u8], field: &'static str) -> Result<(), ProtocolError> {
        std::str::from_utf8(b)
            .map(|_| ())
            .map_err(|_| ProtocolError::InvalidUtf8 {
                frame: self.frame,
                field,
            })
    }

    fn properties(&mut self) -> Result<Vec<(String, String)>, ProtocolError> {
        let count = self.u16("property count")?;
        // Each property takes at least 3 bytes, which bounds the allocation
        // by the frame that was already received.
        let mut props = Vec::with_capacity(usize::from(count).min(self.buf.len() / 3));
        for _ in 0..count {
            props.push((self.str8("property name")?, self.str16("property value")?));
        }
        Ok(props)
    }

    fn finish(self) -> Result<(), ProtocolError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ProtocolError::TrailingBytes {
                frame: self.frame,
                extra: self.buf.len(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incomplete_is_not_an_error() {
        let mut buf = BytesMut::from(&[0u8, 0, 0, 10, opcode::PING][..]);
        assert_eq!(decode(&mut buf, 1024), Ok(None));
        assert_eq!(buf.len(), 5);
    }

    #[test]
    fn huge_length_is_refused_before_allocation() {
        let mut buf = BytesMut::from(&[0xffu8, 0xff, 0xff, 0xff][..]);
        let cap = buf.capacity();
        assert_eq!(
            decode(&mut buf, 1 << 20),
            Err(ProtocolError::FrameTooLarge {
                len: u64::from(u32::MAX),
                max: 1 << 20
            })
        );
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
}
