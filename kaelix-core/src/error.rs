//! The error type shared by the Kaelix crates.

use std::fmt;

use crate::protocol::{ErrorCode, ProtocolError};

/// `Result` with Kaelix's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong when building messages or talking to a broker.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A topic name broke the naming rules; the text says which rule.
    #[error("Topic name contains invalid characters: {name:?} ({reason})")]
    InvalidTopic { name: String, reason: &'static str },

    /// A subscription pattern broke the naming rules.
    #[error("Topic pattern is invalid: {pattern:?} ({reason})")]
    InvalidPattern {
        pattern: String,
        reason: &'static str,
    },

    /// A queue group name broke the naming rules.
    #[error("Queue group name is invalid: {group:?} ({reason})")]
    InvalidGroup { group: String, reason: &'static str },

    /// A partition that does not exist, or partitions asked for where they
    /// do not apply.
    #[error("Partition is invalid: {0}")]
    InvalidPartition(String),

    /// A credit window that cannot work.
    #[error("Credit window is invalid: {0}")]
    InvalidCredit(String),

    /// A header name or value cannot be carried by the protocol.
    #[error("Header is invalid: {name:?} ({reason})")]
    InvalidHeader { name: String, reason: &'static str },

    /// A payload is larger than any frame can carry.
    #[error("Payload of {size} bytes exceeds the maximum of {max} bytes")]
    PayloadTooLarge { size: usize, max: usize },

    /// A message builder was asked to build without a topic.
    #[error("Message has no topic: call .topic(..) on the builder")]
    MissingTopic,

    /// The in-process broker was used before `start()` or after `shutdown()`.
    #[error("Broker is not running")]
    BrokerNotRunning,

    /// The broker refused a publish or a subscription, with its reason.
    #[error("refused by the broker ({code}): {reason}")]
    Refused { code: ErrorCode, reason: String },

    /// The peer broke the wire protocol.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),

    /// The connection or subscription is closed; the reason says why.
    #[error("closed: {0}")]
    Closed(CloseReason),

    /// A connection could not be made or was broken.
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),

    /// The connection was lost (and made again) since the last flush.
    #[error("the connection to the broker was lost ({0}); messages sent without an acknowledgement since the last flush may not have arrived")]
    ConnectionLost(CloseReason),

    /// Disconnected, and the buffer for sends meanwhile is full.
    #[error("the broker is unreachable and the reconnect buffer ({limit} bytes, reconnect_buffer_bytes) is full")]
    BufferFull { limit: usize },

    /// Reconnecting failed too often: sends fail fast until it succeeds.
    #[error("the broker is unreachable: {failures} reconnect attempts failed in a row (last: {last_error}); failing fast until one succeeds")]
    CircuitOpen { failures: u32, last_error: String },

    /// None of the broker addresses given answered; each address and why.
    #[error("no broker could be reached: {0}")]
    NoBroker(String),

    /// A wait that has a deadline ran past it.
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(std::time::Duration, &'static str),

    /// Every worker's queue for this priority is full (`runtime.task_queue_depth`).
    #[error("Worker pool exhausted: every worker already queues runtime.task_queue_depth = {depth} {priority} tasks")]
    WorkerPoolExhausted {
        priority: crate::runtime::TaskPriority,
        depth: usize,
    },

    /// The runtime could not do what was asked; the text says why.
    #[error("runtime error: {0}")]
    Runtime(String),

    /// A spawned task was cancelled (aborted, or the runtime shut down)
    /// before it completed.
    #[error("the task was cancelled before it completed")]
    TaskCancelled,

    /// A spawned task panicked; the runtime carried on.
    #[error("the task panicked: {0}")]
    TaskPanicked(String),

    /// TLS could not be set up: a certificate, key or name was unusable.
    #[error("TLS: {0}")]
    Tls(String),

    /// A plugin could not be registered, initialized or called.
    #[error("plugin {plugin}: {reason}")]
    Plugin { plugin: String, reason: String },

    /// The configuration could not be loaded or is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

/// Why a connection, subscription or receiver stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The application unsubscribed or closed it.
    Closed,
    /// The broker is shutting down.
    ShuttingDown,
    /// The receiver fell further behind than its buffer allows.
    SlowConsumer,
    /// The peer closed the connection.
    PeerClosed,
    /// The broker sent an error frame and closed the connection.
    Server { code: ErrorCode, reason: String },
    /// This side found a protocol violation.
    Protocol(String),
    /// A socket error.
    Io(String),
    /// Nothing heard from the peer, not even an answer to a ping, for this
    /// long: the connection is taken for dead (a half-open TCP connection,
    /// a peer that hangs).
    PeerSilent(std::time::Duration),
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::Closed => f.write_str("closed by the application"),
            CloseReason::ShuttingDown => f.write_str("the broker is shutting down"),
            CloseReason::SlowConsumer => {
                f.write_str("slow consumer: the receive buffer overflowed")
            }
            CloseReason::PeerClosed => f.write_str("the peer closed the connection"),
            CloseReason::Server { code, reason } => write!(f, "broker error {code}: {reason}"),
            CloseReason::Protocol(reason) => write!(f, "protocol violation: {reason}"),
            CloseReason::Io(err) => write!(f, "socket error: {err}"),
            CloseReason::PeerSilent(t) => write!(
                f,
                "nothing heard from the peer for {} ms, not even an answer to a ping",
                t.as_millis()
            ),
        }
    }
}
