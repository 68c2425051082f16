//! The Kaelix wire protocol, specified byte by byte in `docs/protocol.md`.
//!
//! Every frame is `u32 length | u8 opcode | u8 flags | body`, big-endian,
//! where `length` counts the bytes after itself. The codec is pure: [`decode`]
//! takes complete frames off the front of a buffer (returning `Ok(None)` when
//! it needs more bytes) and [`Frame::encode`] appends one to a buffer. It
//! never allocates more than the maximum frame size, however large the
//! announced length.
//!
//! - [`frame`]: the frames and their fields.
//! - [`decode`](mod@decode): bytes to frames.
//! - [`encode`](mod@encode): frames to bytes, with fast paths that write a
//!   publish or a delivery straight into an output buffer.
//! - [`error`]: [`ProtocolError`] and the [`ErrorCode`]s carried by error frames.

pub mod decode;
pub mod encode;
pub mod error;
pub mod frame;

pub use decode::{decode, peek, Peek};
pub use encode::{encode_deliver, encode_deliver_raw, encode_publish, encode_route_raw};
pub use error::{ErrorCode, ProtocolError};
pub use frame::{
    AdminReply, AdminRequest, Credit, Deliver, ErrorFrame, Frame, Hello, MessageBody, Missed,
    MissedRange, Nack, PeerCall, PeerReply, Publish, ResumeAt, Routed, StatsReply, Subscribe,
    Welcome,
};

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// The oldest protocol version this build accepts.
pub const MIN_PROTOCOL_VERSION: u16 = 1;
/// The first four bytes of every HELLO body.
pub const MAGIC: [u8; 4] = *b"KLX\x01";
/// Bytes before a frame's body: length, opcode, flags.
pub const HEADER_LEN: usize = 6;
/// The default largest frame, `limits.max_frame_bytes`: a message body of
/// `limits.max_payload_bytes` (1 MiB) with room for its topic and header.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 1024 * 1024 + 64 * 1024;

/// Frame opcodes.
pub mod opcode {
    pub const HELLO: u8 = 0x01;
    pub const WELCOME: u8 = 0x02;
    pub const PING: u8 = 0x03;
    pub const PONG: u8 = 0x04;
    pub const ERROR: u8 = 0x05;
    pub const STATS: u8 = 0x06;
    pub const STATS_REPLY: u8 = 0x07;
    pub const DRAIN: u8 = 0x08;
    pub const ADMIN: u8 = 0x09;
    pub const ADMIN_REPLY: u8 = 0x0A;
    pub const PUBLISH: u8 = 0x10;
    pub const PUB_ACK: u8 = 0x11;
    pub const PUB_NACK: u8 = 0x12;
    pub const SUBSCRIBE: u8 = 0x20;
    pub const SUB_ACK: u8 = 0x21;
    pub const SUB_NACK: u8 = 0x22;
    pub const UNSUBSCRIBE: u8 = 0x23;
    pub const CREDIT: u8 = 0x24;
    pub const MESSAGE: u8 = 0x30;
    pub const MISSED: u8 = 0x31;
    pub const PEER_CALL: u8 = 0x40;
    pub const PEER_REPLY: u8 = 0x41;
    pub const ROUTE: u8 = 0x42;
}

/// Flag bits. Bits a frame does not define must be zero.
pub mod flags {
    /// PUBLISH: the publisher wants a PUB_ACK or PUB_NACK.
    pub const ACK: u8 = 0x01;
    /// PUBLISH, MESSAGE: the message body carries a headers block.
    pub const HEADERS: u8 = 0x02;
    /// PUBLISH, MESSAGE: the message body carries a partition.
    pub const PARTITION: u8 = 0x04;
    /// The bits that describe a message body, shared by PUBLISH and MESSAGE
    /// so that a broker forwards a published body unchanged.
    pub const BODY: u8 = HEADERS | PARTITION;
    /// SUBSCRIBE: a queue group name follows the pattern.
    pub const QUEUE: u8 = 0x01;
    /// SUBSCRIBE: a start position follows (pattern and group).
    pub const START: u8 = 0x02;
    /// SUBSCRIBE: a slow-consumer policy follows (after the start).
    pub const POLICY: u8 = 0x04;
    /// MISSED: the topic and the first and last offsets missed follow.
    pub const RANGE: u8 = 0x01;
    /// SUBSCRIBE: the partitions to take follow (after the policy).
    pub const PARTITIONS: u8 = 0x08;
    /// SUBSCRIBE, with QUEUE: each partition goes to one member of the group.
    pub const STICKY: u8 = 0x10;
    /// SUBSCRIBE: an initial credit follows (after the partitions).
    pub const CREDIT: u8 = 0x20;
    /// SUBSCRIBE: resume positions follow (after the credit).
    pub const RESUME: u8 = 0x40;
    /// MISSED, with RANGE: the partition follows the last offset.
    pub const RANGE_PARTITION: u8 = 0x02;
    /// MESSAGE: the message's offset in its topic partition follows the sid.
    pub const OFFSET: u8 = 0x08;
    /// MESSAGE: the partition the message is in follows the offset.
    pub const IN_PARTITION: u8 = 0x10;
    /// ERROR: a retry-after hint (`u32` ms) follows the reason.
    pub const RETRY_AFTER: u8 = 0x01;
    /// ROUTE: the receiving node's plain (non-group) subscriptions get it.
    pub const ROUTE_PLAIN: u8 = 0x08;
}
