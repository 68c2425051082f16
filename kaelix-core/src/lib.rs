//! What the Kaelix broker and its clients share.
//!
//! # Layout
//!
//! - [`topic`]: [`Topic`] names and [`TopicPattern`] subscriptions (`*`, `>`).
//! - [`message`]: [`Message`], its id, partition, offset, timestamp and
//!   [`Headers`], and the [`MessageBuilder`].
//! - [`batch`]: [`MessageBatch`], many messages moved as one.
//! - [`plugin`]: [`Plugin`](plugin::Plugin) and
//!   [`StreamProcessor`](plugin::StreamProcessor), the
//!   [`PluginRegistry`](plugin::PluginRegistry) and the guard every plugin
//!   call goes through.
//! - [`pool`]: [`MessagePool`], reusable message instances.
//! - [`protocol`]: the wire frames and their codec; pure functions on
//!   buffers that know nothing of sockets.
//! - [`config`]: the [`MemoryStreamerConfig`] schema and its layered loader.
//! - [`client`]: connecting and reading frames, shared by the client crates.
//! - [`outbox`]: the bounded, batching write buffer in front of a socket.
//! - [`queue`]: the bounded message queue behind every receiver.
//! - [`replay`]: [`StartPosition`], where a subscription starts reading
//!   what the broker retains.
//! - [`tls`]: [`ClientTls`](tls::ClientTls), and reading PEM files.
//! - [`runtime`]: [`OptimizedRuntime`](runtime::OptimizedRuntime), the
//!   NUMA-aware priority runtime with core pinning that the broker runs on.
//! - [`error`]: [`Error`] and [`Result`].

pub mod batch;
pub mod client;
pub mod config;
pub mod error;
pub mod flow;
pub mod message;
pub mod outbox;
pub mod plugin;
pub mod pool;
pub mod protocol;
pub mod queue;
pub mod replay;
pub mod runtime;
pub mod tls;
pub mod topic;

pub use batch::MessageBatch;
pub use config::MemoryStreamerConfig;
pub use error::{CloseReason, Error, Result};
pub use flow::{CreditWindow, Gap, SlowConsumerPolicy, SubscribeOptions};
pub use message::{Headers, Message, MessageBuilder, MessageId, Offset, PartitionId, Timestamp};
pub use pool::MessagePool;
pub use replay::StartPosition;
pub use topic::{Topic, TopicPattern};
