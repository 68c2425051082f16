//! Protocol errors and the codes that error frames carry.

use std::fmt;

/// A peer sent bytes that are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    FrameTooLarge { len: u64, max: usize },
    #[error("frame length {0} is shorter than the 2-byte opcode and flags")]
    FrameTooShort(u32),
    #[error("unknown opcode 0x{0:02x}")]
    UnknownOpcode(u8),
    #[error("{frame} frame has undefined flag bits 0x{flags:02x}")]
    UnknownFlags { frame: &'static str, flags: u8 },
    #[error("{frame} frame ends inside its {field} field")]
    Truncated {
        frame: &'static str,
        field: &'static str,
    },
    #[error("{frame} frame has {extra} bytes after its last field")]
    TrailingBytes { frame: &'static str, extra: usize },
    #[error("{frame} frame's {field} field is not valid UTF-8")]
    InvalidUtf8 {
        frame: &'static str,
        field: &'static str,
    },
    #[error("not a Kaelix client: the HELLO frame lacks the protocol magic")]
    BadMagic,
    #[error("the first frame must be HELLO, not {0}")]
    HelloRequired(&'static str),
    #[error(
        "no common protocol version: peer speaks {peer_min}..={peer_max}, this side {min}..={max}"
    )]
    UnsupportedVersion {
        peer_min: u16,
        peer_max: u16,
        min: u16,
        max: u16,
    },
    #[error("{frame} frame's {field} field has an undefined value {value}")]
    UnknownValue {
        frame: &'static str,
        field: &'static str,
        value: u64,
    },
    #[error("{frame} frame is not allowed {context}")]
    Unexpected {
        frame: &'static str,
        context: &'static str,
    },
}

impl ProtocolError {
    /// The code an error frame reports for this violation.
    pub fn code(&self) -> ErrorCode {
        match self {
            ProtocolError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            ProtocolError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            ProtocolError::BadMagic | ProtocolError::HelloRequired(_) => {
                ErrorCode::HandshakeRequired
            }
            _ => ErrorCode::Malformed,
        }
    }
}

macro_rules! error_codes {
    ($($(#[$doc:meta])* $name:ident = $value:literal, $text:literal;)*) => {
        /// Why a broker refused something or closed a connection.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $($(#[$doc])* $name,)*
            /// A code this build does not know (from a newer peer).
            Other(u16),
        }

        impl ErrorCode {
            /// The number on the wire.
            pub fn as_u16(self) -> u16 {
                match self {
                    $(ErrorCode::$name => $value,)*
                    ErrorCode::Other(code) => code,
                }
            }

            /// The code for a number on the wire.
            pub fn from_u16(code: u16) -> ErrorCode {
                match code {
                    $($value => ErrorCode::$name,)*
                    other => ErrorCode::Other(other),
                }
            }

            /// A short stable name, as used in logs and metrics.
            pub fn name(self) -> &'static str {
                match self {
                    $(ErrorCode::$name => $text,)*
                    ErrorCode::Other(_) => "other",
                }
            }
        }
    };
}

error_codes! {
    /// A frame could not be decoded.
    Malformed = 1, "malformed";
    /// A frame was larger than the negotiated maximum.
    FrameTooLarge = 2, "frame-too-large";
    /// No protocol version both sides speak.
    UnsupportedVersion = 3, "unsupported-version";
    /// The first frame was not a valid HELLO.
    HandshakeRequired = 4, "handshake-required";
    /// No HELLO arrived in time.
    HandshakeTimeout = 5, "handshake-timeout";
    /// Nothing arrived from the client, not even an answer to a PING,
    /// within `limits.idle_timeout_ms`.
    IdleTimeout = 6, "idle-timeout";
    /// A topic name broke the naming rules.
    InvalidTopic = 10, "invalid-topic";
    /// A subscription pattern broke the naming rules.
    InvalidPattern = 11, "invalid-pattern";
    /// A queue group name broke the naming rules.
    InvalidGroup = 12, "invalid-group";
    /// The connection holds as many subscriptions as it may.
    TooManySubscriptions = 13, "too-many-subscriptions";
    /// The subscription id is already in use on this connection.
    DuplicateSubscription = 14, "duplicate-subscription";
    /// A message body was larger than `limits.max_payload_bytes`.
    PayloadTooLarge = 15, "payload-too-large";
    /// A header could not be carried.
    InvalidHeader = 16, "invalid-header";
    /// A publish named a partition its topic does not have, or a
    /// subscription one no topic can have.
    UnknownPartition = 17, "unknown-partition";
    /// An ADMIN request the broker cannot carry out as asked (an unknown
    /// operation, a node that is not a member, a refused topic change).
    InvalidRequest = 18, "invalid-request";
    /// The client fell further behind than its buffer allows.
    SlowConsumer = 20, "slow-consumer";
    /// The broker is shutting down.
    ShuttingDown = 21, "shutting-down";
    /// The broker holds as many connections as it may.
    ConnectionLimit = 22, "connection-limit";
    /// The cluster cannot do this now: no majority of its voters is
    /// reachable, or the broker is not a cluster node.
    Unavailable = 23, "unavailable";
    /// The client may not do this.
    NotPermitted = 30, "not-permitted";
    /// The credentials were not accepted.
    AuthenticationFailed = 31, "authentication-failed";
    /// A plugin on the topic dropped the message; the reason says which
    /// and why.
    Rejected = 40, "rejected";
    /// A plugin on the topic sent the message to the dead-letter topic
    /// (it refused it, failed or panicked); the reason says which and why.
    DeadLettered = 41, "dead-lettered";
    /// The broker failed internally.
    Internal = 99, "internal";
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.as_u16())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for n in 0..200 {
            assert_eq!(ErrorCode::from_u16(n).as_u16(), n);
        }
        assert_eq!(ErrorCode::from_u16(10), ErrorCode::InvalidTopic);
        assert_eq!(ErrorCode::InvalidTopic.to_string(), "invalid-topic (10)");
    }
}
