//! Kaelix's cluster layer: brokers that name each other as seeds agree,
//! through Raft (openraft), on who the members are, which topics exist and
//! which node leads each partition.
//!
//! - [`metadata`]: what is agreed on, and how a change applies.
//! - [`store`]: the Raft log and the state machine, kept under
//!   `cluster.data_dir`.
//! - [`network`]: Raft messages between nodes, as PEER_CALL frames, over
//!   TCP or mutually authenticated TLS.
//! - [`node`]: a running node: joining through the seeds, failure
//!   detection, its status.

pub mod metadata;
pub mod network;
pub mod node;
pub mod store;

pub use metadata::{Command, Member, Metadata, NodeId, Reply, TopicDef};
pub use node::{Change, ChangeError, ClusterStatus, MemberStatus, Node, NodeError};
pub use store::{LogStore, StateMachine, StoreError, TypeConfig};
