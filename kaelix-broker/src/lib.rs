//! The Kaelix broker.
//!
//! # Layout
//!
//! - [`broker`]: [`MessageBroker`], the in-process API, and its [`Receiver`].
//! - [`server`]: [`Server`], the TCP listener with its connection limit.
//! - `connection`: one client connection: handshake, batched decode and
//!   routing, replies, and the named reason it ended.
//! - `router`: subscription state (exact topics in a map, wildcards in a
//!   trie), per-publisher route caches, delivery into subscriber buffers.
//! - [`stats`]: counters and the [`BrokerStats`] snapshot.
//!
//! The binaries `kaelix-broker` (the server) and `kaelix` (a command-line
//! client) live in `src/bin`.

pub mod broker;
mod connection;
mod router;
pub mod server;
pub mod stats;

pub use broker::{IntoPattern, MessageBroker, Receiver};
pub use server::Server;
pub use stats::BrokerStats;

/// The README's Rust snippets, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;
