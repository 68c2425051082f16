//! The Kaelix broker.
//!
//! # Layout
//!
//! - [`broker`]: [`MessageBroker`], the in-process API, and its [`Receiver`].
//! - [`server`]: [`Server`], the TCP listener with its connection limit.
//! - `connection`: one client connection: handshake, batched decode and
//!   routing, replies, and the named reason it ended.
//! - `auth`: identities (tokens, passwords, certificates) and their
//!   publish and subscribe permissions.
//! - `dedupe`: the acknowledged publishes each publisher had routed, so
//!   that its retries after a reconnect are not routed twice.
//! - `cluster`: the broker's cluster node (`[cluster]`) and its status.
//! - `route`: route links between cluster nodes: interest out, messages in.
//! - `tls`: the TLS acceptor, swapped when certificate files change.
//! - `router`: subscription state (exact topics in a map, wildcards in a
//!   trie), per-publisher route caches, delivery into subscriber buffers.
//! - `exec`: spawning on the broker's [`OptimizedRuntime`](kaelix_core::runtime::OptimizedRuntime),
//!   or on tokio for a broker embedded without one.
//! - [`stats`]: counters and the [`BrokerStats`] snapshot.
//! - [`telemetry`]: metrics in Prometheus form, health, and the HTTP
//!   endpoint serving both.
//! - [`live`]: the running configuration, live limits, and
//!   [`MessageBroker::reconfigure`] with its appliers.
//!
//! The binaries `kaelix-broker` (the server) and `kaelix` (a command-line
//! client) live in `src/bin`.

mod auth;
pub mod broker;
mod cluster;
mod connection;
mod dedupe;
mod exec;
pub mod live;
pub mod plugins;
mod route;
mod router;
pub mod server;
pub mod stats;
pub mod telemetry;
mod tls;

pub use auth::{hash_password, AuthFailure};
pub use broker::{IntoPattern, MessageBroker, Receiver, TopicInfo};
pub use kaelix_cluster::{ClusterStatus, MemberStatus};
pub use live::Reconfigured;
pub use server::Server;
pub use stats::{BrokerStats, RuntimeStats};
pub use telemetry::BrokerHealth;

/// The README's Rust snippets, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;

/// The Rust snippets of docs/configuration.md (they use the broker too).
#[cfg(doctest)]
#[doc = include_str!("../../docs/configuration.md")]
struct ConfigurationDoc;

/// The Rust snippets of docs/delivery.md.
#[cfg(doctest)]
#[doc = include_str!("../../docs/delivery.md")]
struct DeliveryDoc;

/// The Rust snippets of docs/security.md.
#[cfg(doctest)]
#[doc = include_str!("../../docs/security.md")]
struct SecurityDoc;

/// The Rust snippets of docs/plugins.md.
#[cfg(doctest)]
#[doc = include_str!("../../docs/plugins.md")]
struct PluginsDoc;

/// The Rust snippets of docs/clients.md.
#[cfg(doctest)]
#[doc = include_str!("../../docs/clients.md")]
struct ClientsDoc;

/// The Rust snippets of docs/cluster.md.
#[cfg(doctest)]
#[doc = include_str!("../../docs/cluster.md")]
struct ClusterDoc;
