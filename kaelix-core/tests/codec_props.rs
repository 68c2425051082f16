//! Property tests of the codec: every frame round-trips, and no input
//! panics the decoder or makes it take more than it was given.

use bytes::{Bytes, BytesMut};
use kaelix_core::protocol::{
    decode, Deliver, ErrorCode, ErrorFrame, Frame, Hello, MessageBody, Nack, Publish, Subscribe,
    Welcome,
};
use kaelix_core::{Headers, PartitionId, Topic};
use proptest::prelude::*;

const MAX: usize = 1 << 20;

fn topic() -> impl Strategy<Value = Topic> {
    proptest::collection::vec("[a-zA-Z0-9_-]{1,12}", 1..6)
        .prop_map(|tokens| Topic::new(tokens.join(".")).unwrap())
}

fn text(max: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!(".{{0,{max}}}"))
        .unwrap()
        .prop_map(move |s| {
            let mut s = s;
            while s.len() > max {
                s.pop();
            }
            s
        })
}

fn props() -> impl Strategy<Value = Vec<(String, String)>> {
    proptest::collection::vec((text(40), text(80)), 0..4)
}

fn body() -> impl Strategy<Value = MessageBody> {
    (
        topic(),
        proptest::option::of(any::<u32>()),
        proptest::collection::vec(("[a-z]{1,10}", text(30)), 0..4),
        proptest::collection::vec(any::<u8>(), 0..300),
    )
        .prop_map(|(topic, partition, headers, payload)| {
            let headers: Headers = headers.into_iter().collect();
            MessageBody::new(
                &topic,
                partition.map(PartitionId::new),
                &headers,
                &Bytes::from(payload),
            )
        })
}

fn code() -> impl Strategy<Value = ErrorCode> {
    any::<u16>().prop_map(ErrorCode::from_u16)
}

fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (any::<u16>(), any::<u16>(), text(60), props()).prop_map(|(a, b, name, properties)| {
            Frame::Hello(Hello {
                min_version: a,
                max_version: b,
                client_name: name,
                properties,
            })
        }),
        (any::<u16>(), text(60), any::<u32>(), props()).prop_map(|(v, name, max, properties)| {
            Frame::Welcome(Welcome {
                version: v,
                server_name: name,
                max_frame_bytes: max,
                properties,
            })
        }),
        any::<u64>().prop_map(Frame::Ping),
        any::<u64>().prop_map(Frame::Pong),
        any::<u64>().prop_map(Frame::Stats),
        (any::<u64>(), ".{0,200}").prop_map(|(token, json)| Frame::Admin(
            kaelix_core::protocol::AdminRequest { token, json }
        )),
        (
            any::<u64>(),
            proptest::option::of(code().prop_filter("0 means done", |c| c.as_u16() != 0)),
            ".{0,200}"
        )
            .prop_map(|(token, code, text)| Frame::AdminReply(
                kaelix_core::protocol::AdminReply { token, code, text }
            )),
        (any::<u64>(), ".{0,200}").prop_map(|(token, json)| Frame::StatsReply(
            kaelix_core::protocol::StatsReply { token, json }
        )),
        (code(), text(200), proptest::option::of(any::<u32>())).prop_map(
            |(code, reason, retry_after_ms)| Frame::Error(ErrorFrame {
                code,
                reason,
                retry_after_ms
            })
        ),
        (any::<u64>(), any::<bool>(), body())
            .prop_map(|(seq, ack, body)| Frame::Publish(Publish { seq, ack, body })),
        any::<u64>().prop_map(Frame::PubAck),
        (
            any::<u64>(),
            any::<u8>(),
            proptest::collection::vec(any::<u8>(), 0..300)
        )
            .prop_map(|(id, kind, body)| Frame::PeerCall(
                kaelix_core::protocol::PeerCall {
                    id,
                    kind,
                    body: body.into()
                }
            )),
        (any::<u64>(), proptest::collection::vec(any::<u8>(), 0..300)).prop_map(|(id, body)| {
            Frame::PeerReply(kaelix_core::protocol::PeerReply {
                id,
                body: body.into(),
            })
        }),
        any::<u32>().prop_map(Frame::Drain),
        (
            any::<bool>(),
            proptest::option::of(any::<u32>()),
            proptest::collection::vec("[a-z-]{0,20}", 0..4),
            body()
        )
            .prop_map(|(plain, partition, groups, body)| Frame::Route(
                kaelix_core::protocol::Routed {
                    plain,
                    partition,
                    groups,
                    body
                }
            )),
        (any::<u64>(), code(), text(100)).prop_map(|(id, code, reason)| Frame::PubNack(Nack {
            id,
            code,
            reason
        })),
        (
            any::<u32>(),
            "[a-z.*>]{1,40}",
            proptest::option::of("[a-z]{1,20}"),
            start(),
            proptest::option::of(1u8..=3),
            proptest::collection::vec(any::<u32>(), 0..8),
            any::<bool>(),
            proptest::option::of((1u32.., any::<u32>())),
            proptest::collection::vec(("[a-z.]{1,30}", any::<u32>(), any::<u64>()), 0..4),
        )
            .prop_map(
                |(sid, pattern, group, start, policy, partitions, sticky, credit, resume)| {
                    Frame::Subscribe(Subscribe {
                        sid,
                        pattern: Bytes::from(pattern),
                        // Sticky only with a group, as the decoder insists.
                        sticky: sticky && group.is_some(),
                        group: group.map(Bytes::from),
                        start,
                        policy: policy.and_then(kaelix_core::SlowConsumerPolicy::from_code),
                        partitions,
                        credit: credit.map(|(messages, bytes)| kaelix_core::protocol::Credit {
                            sid,
                            messages,
                            bytes,
                        }),
                        resume: resume
                            .into_iter()
                            .map(|(topic, partition, next)| kaelix_core::protocol::ResumeAt {
                                topic: Bytes::from(topic),
                                partition,
                                next,
                            })
                            .collect(),
                    })
                }
            ),
        any::<u32>().prop_map(Frame::SubAck),
        (any::<u32>(), code(), text(100)).prop_map(|(sid, code, reason)| Frame::SubNack(Nack {
            id: u64::from(sid),
            code,
            reason
        })),
        any::<u32>().prop_map(Frame::Unsubscribe),
        (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(sid, messages, bytes)| {
            Frame::Credit(kaelix_core::protocol::Credit {
                sid,
                messages,
                bytes,
            })
        }),
        (
            any::<u32>(),
            proptest::option::of(any::<u64>()),
            proptest::option::of(any::<u32>()),
            body()
        )
            .prop_map(|(sid, offset, partition, body)| Frame::Message(Deliver {
                sid,
                offset,
                partition,
                body
            })),
        (
            any::<u32>(),
            any::<u64>(),
            proptest::option::of((
                "[a-z.]{1,40}",
                proptest::option::of(any::<u32>()),
                any::<u64>(),
                any::<u64>()
            ))
        )
            .prop_map(
                |(sid, count, range)| Frame::Missed(kaelix_core::protocol::Missed {
                    sid,
                    count,
                    range: range.map(|(topic, partition, first, last)| {
                        kaelix_core::protocol::MissedRange {
                            topic: Bytes::from(topic),
                            partition,
                            first,
                            last,
                        }
                    }),
                })
            ),
    ]
}

fn start() -> impl Strategy<Value = kaelix_core::StartPosition> {
    use kaelix_core::StartPosition as S;
    prop_oneof![
        Just(S::Latest),
        Just(S::Earliest),
        any::<u64>().prop_map(S::Offset),
        any::<u64>().prop_map(|t| S::Time(kaelix_core::Timestamp::from_nanos(t))),
        any::<u64>().prop_map(S::Last),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn frames_round_trip(frames in proptest::collection::vec(frame(), 1..5)) {
        let mut buf = BytesMut::new();
        for f in &frames {
            f.encode(&mut buf);
        }
        for f in &frames {
            let decoded = decode(&mut buf, MAX).unwrap().unwrap();
            prop_assert_eq!(&decoded, f);
        }
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn every_prefix_of_a_frame_is_incomplete(f in frame()) {
        let whole = f.to_bytes();
        for cut in 0..whole.len() {
            let mut buf = BytesMut::from(&whole[..cut]);
            prop_assert_eq!(decode(&mut buf, MAX), Ok(None));
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut buf = BytesMut::from(&bytes[..]);
        // Each call either consumes a whole frame, waits, or fails.
        while let Ok(Some(_)) = decode(&mut buf, 256) {}
    }

    #[test]
    fn mutated_frames_never_panic(f in frame(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut bytes = f.to_bytes().to_vec();
        let i = at.index(bytes.len());
        bytes[i] = byte;
        let mut buf = BytesMut::from(&bytes[..]);
        while let Ok(Some(_)) = decode(&mut buf, MAX) {}
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn peek_agrees_with_decode(f in frame()) {
        use kaelix_core::protocol::{peek, Peek};
        let bytes = f.to_bytes();
        match (peek(&bytes, MAX).unwrap(), &f) {
            (Peek::Publish(p, len), Frame::Publish(owned)) => {
                prop_assert_eq!(len, bytes.len());
                prop_assert_eq!(p.seq, owned.seq);
                prop_assert_eq!(p.ack, owned.ack);
                prop_assert_eq!(p.body, &owned.body.raw()[..]);
                prop_assert_eq!(p.topic, &owned.body.topic_bytes()[..]);
            }
            (Peek::Deliver(d, len), Frame::Message(owned)) => {
                prop_assert_eq!(len, bytes.len());
                prop_assert_eq!(d.sid, owned.sid);
                prop_assert_eq!(d.body, &owned.body.raw()[..]);
            }
            (Peek::Route(r, len), Frame::Route(owned)) => {
                prop_assert_eq!(len, bytes.len());
                prop_assert_eq!(r.plain, owned.plain);
                prop_assert_eq!(r.partition, owned.partition);
                let groups: Vec<String> =
                    r.groups().map(|g| String::from_utf8(g.to_vec()).unwrap()).collect();
                prop_assert_eq!(&groups, &owned.groups);
                prop_assert_eq!(r.body, &owned.body.raw()[..]);
                prop_assert_eq!(r.topic, &owned.body.topic_bytes()[..]);
            }
            (Peek::Other, Frame::Publish(_) | Frame::Message(_) | Frame::Route(_)) => prop_assert!(false, "peek missed a data frame"),
            (Peek::Other, _) => {}
            (other, _) => prop_assert!(false, "unexpected {:?}", other),
        }
    }

    #[test]
    fn peek_never_panics_and_never_accepts_what_decode_refuses(
        bytes in proptest::collection::vec(any::<u8>(), 0..256)
    ) {
        use kaelix_core::protocol::{peek, Peek};
        let peeked = peek(&bytes, 256);
        let mut buf = BytesMut::from(&bytes[..]);
        let decoded = decode(&mut buf, 256);
        if let Ok(Peek::Publish(..) | Peek::Deliver(..) | Peek::Route(..)) = peeked {
            prop_assert!(matches!(decoded, Ok(Some(_))), "peek accepted what decode refused: {:?}", decoded);
        }
    }
}
