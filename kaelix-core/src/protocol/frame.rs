//! The frames of the protocol. `docs/protocol.md` gives their byte layout.

use bytes::Bytes;

use super::error::{ErrorCode, ProtocolError};
use super::flags;
use crate::error::Result;
use crate::message::{Headers, Message, MessageId, PartitionId, Timestamp};
use crate::topic::Topic;

/// One frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// Client → broker, first frame: who is speaking, which versions.
    Hello(Hello),
    /// Broker → client, answer to HELLO: the chosen version and limits.
    Welcome(Welcome),
    /// Either way: asks for a PONG with the same token.
    Ping(u64),
    /// Either way: answers a PING.
    Pong(u64),
    /// Broker → client: the connection is closing, and why.
    Error(ErrorFrame),
    /// Client → broker: asks for the broker's statistics, answered by a
    /// STATS_REPLY with the same token.
    Stats(u64),
    /// Broker → client: the statistics, as a JSON object.
    StatsReply(StatsReply),
    /// Client → broker: an operator's request (a change to the cluster),
    /// answered by an ADMIN_REPLY with the same token.
    Admin(AdminRequest),
    /// Broker → client: the outcome of an ADMIN.
    AdminReply(AdminReply),
    /// Broker → client: the broker is draining (about to stop); it keeps
    /// serving for this many milliseconds at most. A client with other
    /// brokers moves to one.
    Drain(u32),
    /// Client → broker: a message to route.
    Publish(Publish),
    /// Broker → client: the publish with this sequence number was routed.
    PubAck(u64),
    /// Broker → client: the publish with this sequence number was refused.
    PubNack(Nack),
    /// Client → broker: start a subscription.
    Subscribe(Subscribe),
    /// Broker → client: the subscription with this id is active.
    SubAck(u32),
    /// Broker → client: the subscription was refused.
    SubNack(Nack),
    /// Client → broker: end the subscription with this id.
    Unsubscribe(u32),
    /// Client → broker: more credit for a subscription that has a window.
    Credit(Credit),
    /// Broker → client: a message for a subscription.
    Message(Deliver),
    /// Broker → client: messages a subscription asked for that it will not
    /// get (no longer retained).
    Missed(Missed),
    /// Node → node, on a cluster link: a call (a Raft message, a
    /// subscription-interest update), answered by a PEER_REPLY with the
    /// same id.
    PeerCall(PeerCall),
    /// Node → node: the answer to the PEER_CALL with the same id.
    PeerReply(PeerReply),
    /// Node → node, on a route link: a message published on the sending
    /// node, for the receiving node's subscribers.
    Route(Routed),
}

impl Frame {
    /// The frame's name, as used in errors and docs.
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Hello(_) => "HELLO",
            Frame::Welcome(_) => "WELCOME",
            Frame::Ping(_) => "PING",
            Frame::Pong(_) => "PONG",
            Frame::Error(_) => "ERROR",
            Frame::Stats(_) => "STATS",
            Frame::StatsReply(_) => "STATS_REPLY",
            Frame::Admin(_) => "ADMIN",
            Frame::AdminReply(_) => "ADMIN_REPLY",
            Frame::Drain(_) => "DRAIN",
            Frame::Publish(_) => "PUBLISH",
            Frame::PubAck(_) => "PUB_ACK",
            Frame::PubNack(_) => "PUB_NACK",
            Frame::Subscribe(_) => "SUBSCRIBE",
            Frame::SubAck(_) => "SUB_ACK",
            Frame::SubNack(_) => "SUB_NACK",
            Frame::Unsubscribe(_) => "UNSUBSCRIBE",
            Frame::Credit(_) => "CREDIT",
            Frame::PeerCall(_) => "PEER_CALL",
            Frame::PeerReply(_) => "PEER_REPLY",
            Frame::Route(_) => "ROUTE",
            Frame::Message(_) => "MESSAGE",
            Frame::Missed(_) => "MISSED",
        }
    }
}

/// The opening frame of a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Oldest protocol version the client speaks.
    pub min_version: u16,
    /// Newest protocol version the client speaks.
    pub max_version: u16,
    /// A name for logs, such as the application's.
    pub client_name: String,
    /// Extensions, such as credentials, as name/value pairs.
    pub properties: Vec<(String, String)>,
}

/// The broker's answer to a HELLO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// The protocol version both sides now speak.
    pub version: u16,
    /// The broker's name.
    pub server_name: String,
    /// The largest frame the broker accepts.
    pub max_frame_bytes: u32,
    /// Extensions as name/value pairs.
    pub properties: Vec<(String, String)>,
}

/// A fatal error: the sender closes the connection after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFrame {
    pub code: ErrorCode,
    pub reason: String,
    /// How long the client should wait before it connects again (a broker
    /// shedding load says so), in milliseconds.
    pub retry_after_ms: Option<u32>,
}

/// PEER_CALL: one node asks another for something on a cluster link.
/// What `kind` means and how `body` is encoded is the cluster layer's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCall {
    /// Chosen by the caller; the reply carries it back.
    pub id: u64,
    pub kind: u8,
    pub body: Bytes,
}

/// ROUTE: a message crossing from the node it was published on to a node
/// whose subscribers want it. It crosses once per message and node: for the
/// receiving node's plain subscriptions (`plain`), and for one member of each
/// of its queue groups named in `groups`.
#[derive(Debug, Clone, PartialEq)]
pub struct Routed {
    pub plain: bool,
    /// The partition the publishing node put it in (a topic with several).
    pub partition: Option<u32>,
    pub groups: Vec<String>,
    pub body: MessageBody,
}

/// PEER_REPLY: the answer to a PEER_CALL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerReply {
    pub id: u64,
    pub body: Bytes,
}

/// ADMIN: an operator's request, as one JSON object (`docs/protocol.md`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminRequest {
    pub token: u64,
    pub json: String,
}

/// ADMIN_REPLY: whether the request was carried out (`code` is `None`),
/// with what it did, or why not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminReply {
    pub token: u64,
    pub code: Option<ErrorCode>,
    pub text: String,
}

/// STATS_REPLY: the answer to STATS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatsReply {
    /// The token of the STATS it answers.
    pub token: u64,
    /// The statistics as one JSON object (fields in `docs/protocol.md`).
    pub json: String,
}

/// A refusal of one publish (`id` is its sequence number) or one
/// subscription (`id` is its subscription id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nack {
    pub id: u64,
    pub code: ErrorCode,
    pub reason: String,
}

/// A message sent to the broker.
#[derive(Debug, Clone, PartialEq)]
pub struct Publish {
    /// The publisher's sequence number, echoed in PUB_ACK and PUB_NACK.
    pub seq: u64,
    /// Whether the publisher wants a PUB_ACK.
    pub ack: bool,
    pub body: MessageBody,
}

/// A request for messages matching a pattern.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Subscribe {
    /// Chosen by the client, unique on its connection; MESSAGE frames carry it.
    pub sid: u32,
    /// The pattern, not yet validated.
    pub pattern: Bytes,
    /// The queue group, not yet validated.
    pub group: Option<Bytes>,
    /// Where to start; `Latest` is sent as no start at all.
    pub start: crate::StartPosition,
    /// The subscription's own slow-consumer policy; `None` takes the
    /// topic's.
    pub policy: Option<crate::SlowConsumerPolicy>,
    /// The partitions to take, not yet checked; empty takes them all.
    pub partitions: Vec<u32>,
    /// With a queue group: each partition goes to one member of the group.
    pub sticky: bool,
    /// The initial credit of a subscription that paces the broker; `None`
    /// for one without a window.
    pub credit: Option<Credit>,
    /// Where a resumed subscription carries on, per topic partition it had
    /// received from before (a client that reconnected); every other
    /// matching partition starts at `start`.
    pub resume: Vec<ResumeAt>,
}

/// One entry of a resumed SUBSCRIBE: the next offset the subscription wants
/// of one topic partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumeAt {
    /// The topic, not validated by the decoder.
    pub topic: Bytes,
    /// The partition (0 for a topic with one).
    pub partition: u32,
    /// The first offset to send.
    pub next: u64,
}

/// Credit of a subscription: how many more messages, and message body
/// bytes, the broker may send it before it waits for more. In SUBSCRIBE
/// the initial window (0 on one axis: no limit on it); in a CREDIT frame,
/// what the client gives back (with `sid`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Credit {
    /// The subscription (0 in SUBSCRIBE, where the frame names it).
    pub sid: u32,
    pub messages: u32,
    pub bytes: u32,
}

/// MISSED: messages a subscription will not get, either because its start
/// position asked for more than the broker still held, or because it fell
/// behind and its oldest undelivered messages were dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missed {
    pub sid: u32,
    pub count: u64,
    /// Where they were, for dropped messages.
    pub range: Option<MissedRange>,
}

/// The messages of one topic a MISSED notice is about: `count` of the
/// offsets `first..=last` (all of them, unless the subscription is one
/// member of a queue group).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissedRange {
    /// The topic, not validated by the decoder.
    pub topic: Bytes,
    /// The partition, for a topic with more than one.
    pub partition: Option<u32>,
    pub first: u64,
    pub last: u64,
}

/// A message delivered to a subscription.
#[derive(Debug, Clone, PartialEq)]
pub struct Deliver {
    pub sid: u32,
    /// The message's offset in its topic partition, when the broker sent it.
    pub offset: Option<u64>,
    /// The partition the message is in, when the topic has more than one.
    pub partition: Option<u32>,
    pub body: MessageBody,
}

/// A message as the wire carries it: topic, optional partition and headers,
/// payload. PUBLISH and MESSAGE share this encoding so that a broker passes a
/// published body on to its subscribers without re-encoding it.
#[derive(Debug, Clone, PartialEq)]
pub struct MessageBody {
    pub(super) flags: u8,
    pub(super) raw: Bytes,
    pub(super) topic: Bytes,
    pub(super) partition: Option<u32>,
    pub(super) headers: Option<Bytes>,
    pub(super) payload: Bytes,
}

impl MessageBody {
    /// Encodes a body from its parts.
    pub fn new(
        topic: &Topic,
        partition: Option<PartitionId>,
        headers: &Headers,
        payload: &Bytes,
    ) -> MessageBody {
        let mut buf = bytes::BytesMut::with_capacity(super::encode::body_len(
            topic, partition, headers, payload,
        ));
        super::encode::put_body(&mut buf, topic, partition, headers, payload);
        let flags = super::encode::body_flags(partition, headers);
        super::decode::parse_body(buf.freeze(), flags, "MESSAGE")
            .unwrap_or_else(|_| unreachable!("a body this module encoded decodes"))
    }

    /// Encodes the body of `message`.
    pub fn from_message(message: &Message) -> MessageBody {
        MessageBody::new(
            &message.topic,
            message.partition,
            &message.headers,
            &message.payload,
        )
    }

    /// The flag bits describing this body (see [`flags::BODY`]).
    pub fn flags(&self) -> u8 {
        self.flags & flags::BODY
    }

    /// The whole encoded body, as forwarded in MESSAGE frames.
    pub fn raw(&self) -> &Bytes {
        &self.raw
    }

    /// The topic bytes, not yet validated.
    pub fn topic_bytes(&self) -> &Bytes {
        &self.topic
    }

    /// The validated topic.
    pub fn topic(&self) -> Result<Topic> {
        Topic::from_bytes(self.topic.clone())
    }

    /// The partition, if the publisher chose one.
    pub fn partition(&self) -> Option<PartitionId> {
        self.partition.map(PartitionId::new)
    }

    /// The payload.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// The headers, decoded.
    pub fn headers(&self) -> Headers {
        match &self.headers {
            Some(block) => super::decode::header_pairs(block).collect(),
            None => Headers::new(),
        }
    }

    /// A [`Message`] with a fresh id, stamped with `timestamp`.
    pub fn to_message(&self, timestamp: Timestamp) -> Result<Message> {
        Ok(Message {
            id: MessageId::next(),
            topic: self.topic()?,
            payload: self.payload.clone(),
            timestamp,
            partition: self.partition(),
            offset: None,
            headers: self.headers(),
        })
    }
}

impl From<ProtocolError> for Nack {
    fn from(err: ProtocolError) -> Self {
        Nack {
            id: 0,
            code: err.code(),
            reason: err.to_string(),
        }
    }
}
