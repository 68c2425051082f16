//! Routing between cluster nodes.
//!
//! Each node opens a route link to every other member (through its
//! cluster listener, with the cluster's TLS) and subscribes on it, with
//! ordinary SUBSCRIBE and UNSUBSCRIBE frames, to the patterns and queue
//! groups its own clients are subscribed to. The other node routes each
//! message published there once per link: a ROUTE frame saying whether the
//! receiving node's plain subscriptions get it and which of its queue
//! groups do (see [`Scope`]). The receiving node delivers it to its own
//! subscribers only, so a message makes at most one hop and never loops.
//!
//! A queue group spread over nodes gets each message once: the publishing
//! node gives it to one of its own members if it has any that takes it,
//! else to one node that has members.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use kaelix_cluster::network::{Link, RouteAcceptor};
use kaelix_cluster::{Node, NodeId};
use kaelix_core::outbox::Outbox;
use kaelix_core::protocol::decode::frame_len;
use kaelix_core::protocol::{self, Frame, Peek, Subscribe};
use kaelix_core::{CloseReason, Timestamp, TopicPattern};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::broker::Inner;
use crate::exec;
use crate::live::LiveLimits;
use crate::router::{
    Batch, InterestKey, NewSub, Owner, Publication, RouteCache, Scope, Sink, Subscriber,
};
use kaelix_core::runtime::TaskPriority;

/// How often the set of members is checked for links to open or close.
const MEMBERS_EVERY: Duration = Duration::from_millis(250);

/// Wait before opening a failed link again.
const RECONNECT: Duration = Duration::from_millis(250);

/// A route link's buffer holds this many times a client connection's
/// (`limits.max_pending_bytes`): it carries many clients' messages.
const LINK_BUFFER_FACTOR: usize = 8;

/// Serves the route links other nodes open to this one.
pub(crate) struct Routes {
    broker: Weak<Inner>,
}

impl Routes {
    pub(crate) fn new(broker: &Arc<Inner>) -> Arc<Routes> {
        Arc::new(Routes {
            broker: Arc::downgrade(broker),
        })
    }
}

impl RouteAcceptor for Routes {
    fn accept(&self, from: NodeId, link: Link, buffered: BytesMut) {
        let Some(broker) = self.broker.upgrade() else {
            return;
        };
        tokio::spawn(serve_link(broker, from, link, buffered));
    }
}

/// The publishing side of a link: node `from` subscribes on it; this node
/// sends it ROUTE frames for those subscriptions.
async fn serve_link(broker: Arc<Inner>, from: NodeId, link: Link, mut buf: BytesMut) {
    let (mut rd, mut wr) = tokio::io::split(link);
    let limit = broker.live.running().limits.max_pending_bytes * LINK_BUFFER_FACTOR;
    let outbox = Arc::new(Outbox::new(limit));
    // The writer runs on the runtime's workers, where the publishers that
    // fill its outbox run: a message crossing wakes no other thread here.
    let writer = {
        let outbox = outbox.clone();
        let write = async move {
            let result = outbox.write_to(&mut wr).await;
            let _ = wr.shutdown().await;
            result
        };
        match exec::spawn(broker.runtime.get(), TaskPriority::High, write) {
            Ok(writer) => writer,
            Err(e) => {
                tracing::warn!(node = from, error = %e, "cluster: route link from node refused");
                return;
            }
        }
    };
    let owner = Arc::new(Owner {
        conn: 0,
        peer: format!("node {from}"),
        client: "route".into(),
    });
    let mut subs: HashMap<u32, Arc<Subscriber>> = HashMap::new();
    tracing::info!(node = from, "cluster: route link from node open");
    let reason = loop {
        match protocol::decode(&mut buf, protocol::DEFAULT_MAX_FRAME_BYTES) {
            Ok(Some(Frame::Subscribe(subscribe))) => {
                if let Some(sub) = route_subscription(&broker, &subscribe, &outbox, &owner) {
                    if let Some(old) = subs.insert(subscribe.sid, sub) {
                        broker.router.unsubscribe(&old);
                    }
                }
                continue;
            }
            Ok(Some(Frame::Unsubscribe(sid))) => {
                if let Some(sub) = subs.remove(&sid) {
                    broker.router.unsubscribe(&sub);
                }
                continue;
            }
            Ok(Some(Frame::Ping(token))) => {
                outbox.push(16, |b| Frame::Pong(token).encode(b));
                outbox.wake();
                continue;
            }
            Ok(Some(other)) => break format!("unexpected {} frame", other.name()),
            Ok(None) => {}
            Err(e) => break e.to_string(),
        }
        tokio::select! {
            read = rd.read_buf(&mut buf) => match read {
                Ok(0) => break "closed by the peer".to_string(),
                Ok(_) => {}
                Err(e) => break e.to_string(),
            },
            closed = outbox.closed() => break format!("{closed:?}"),
            _ = broker.shutdown.cancelled() => break "shutting down".to_string(),
        }
    };
    for sub in subs.values() {
        broker.router.unsubscribe(sub);
    }
    outbox.close(CloseReason::ShuttingDown, None);
    writer.abort();
    tracing::info!(node = from, %reason, "cluster: route link from node closed");
}

/// A subscription for node `from`'s interest, as its SUBSCRIBE asks.
fn route_subscription(
    broker: &Inner,
    subscribe: &Subscribe,
    outbox: &Arc<Outbox>,
    owner: &Arc<Owner>,
) -> Option<Arc<Subscriber>> {
    let pattern = match TopicPattern::from_bytes(subscribe.pattern.clone()) {
        Ok(pattern) => pattern,
        Err(e) => {
            tracing::warn!(peer = %owner.peer, error = %e, "cluster: route interest refused");
            return None;
        }
    };
    let group = match subscribe.group.as_deref().map(std::str::from_utf8) {
        None => None,
        Some(Ok(group)) => Some(Arc::from(group)),
        Some(Err(_)) => {
            tracing::warn!(peer = %owner.peer, "cluster: route interest refused: a group that is not UTF-8");
            return None;
        }
    };
    Some(broker.router.subscribe(NewSub {
        pattern,
        group,
        sid: subscribe.sid,
        sink: Sink::Net(outbox.clone()),
        policy: None,
        owner: owner.clone(),
        partitions: None,
        sticky: false,
        credit: None,
        route: true,
    }))
}

/// Keeps a route link open to every other member, for as long as the
/// broker runs.
pub(crate) async fn link_members(broker: Weak<Inner>, node: Arc<Node>) {
    let mut links: HashMap<NodeId, (String, exec::Task<()>)> = HashMap::new();
    loop {
        let Some(inner) = broker.upgrade() else {
            break;
        };
        if inner.shutdown.is_cancelled() {
            break;
        }
        let peers = node.peers();
        let gone: Vec<NodeId> = links
            .iter()
            .filter(|(id, (addr, _))| {
                !peers
                    .iter()
                    .any(|(p, m)| p == *id && m.cluster_addr == *addr)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            if let Some((_, task)) = links.remove(&id) {
                task.abort();
            }
        }
        for (id, member) in peers {
            if links.contains_key(&id) {
                continue;
            }
            // On a worker: the link's socket is made there, and the
            // messages it brings are routed there, as a publisher's are.
            let link = keep_link(
                broker.clone(),
                node.clone(),
                id,
                member.cluster_addr.clone(),
            );
            match exec::spawn(inner.runtime.get(), TaskPriority::High, link) {
                Ok(task) => {
                    links.insert(id, (member.cluster_addr, task));
                }
                // The runtime's queues are full: tried again next round.
                Err(e) => tracing::warn!(node = id, error = %e, "cluster: route link not started"),
            }
        }
        drop(inner);
        tokio::time::sleep(MEMBERS_EVERY).await;
    }
    for (_, (_, task)) in links {
        task.abort();
    }
}

/// Opens the route link to node `peer` and runs it; opens it again after
/// it fails.
async fn keep_link(broker: Weak<Inner>, node: Arc<Node>, peer: NodeId, addr: String) {
    let mut failing = false;
    loop {
        match node.open_route(&addr).await {
            Ok((link, buf)) => {
                let Some(inner) = broker.upgrade() else {
                    return;
                };
                failing = false;
                tracing::info!(node = peer, "cluster: route link to node open");
                let reason = run_link(inner, link, buf).await;
                tracing::warn!(node = peer, %reason, "cluster: route link to node closed");
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(node = peer, error = %e, "cluster: cannot open a route link to node");
                }
                failing = true;
            }
        }
        tokio::time::sleep(RECONNECT).await;
    }
}

/// The subscribing side of a link: sends this node's interest, and
/// delivers the messages that come back to this node's subscribers.
async fn run_link(broker: Arc<Inner>, link: Link, mut buf: BytesMut) -> String {
    let (mut rd, mut wr) = tokio::io::split(link);
    let interest = broker.router.interest();
    let mut changes = interest.watch();
    let mut sent: HashMap<InterestKey, u32> = HashMap::new();
    let mut next_sid = 0u32;
    let mut out = BytesMut::new();
    let mut reader = Reader::new(&broker);
    loop {
        // Interest first: what this node's clients want now.
        changes.borrow_and_update();
        let now: Vec<InterestKey> = interest.keys();
        out.clear();
        sent.retain(|key, sid| {
            let keep = now.contains(key);
            if !keep {
                Frame::Unsubscribe(*sid).encode(&mut out);
            }
            keep
        });
        for key in now {
            if sent.contains_key(&key) {
                continue;
            }
            next_sid = next_sid.wrapping_add(1);
            Frame::Subscribe(Subscribe {
                sid: next_sid,
                pattern: bytes::Bytes::copy_from_slice(key.0.as_str().as_bytes()),
                group: key
                    .1
                    .as_deref()
                    .map(|g| bytes::Bytes::copy_from_slice(g.as_bytes())),
                ..Subscribe::default()
            })
            .encode(&mut out);
            sent.insert(key, next_sid);
        }
        if !out.is_empty() {
            if let Err(e) = wr.write_all(&out).await {
                return e.to_string();
            }
        }
        loop {
            if let Err(reason) = reader.take(&mut buf) {
                return reason;
            }
            reader.wait_for_blocked().await;
            tokio::select! {
                read = rd.read_buf(&mut buf) => match read {
                    Ok(0) => return "closed by the peer".into(),
                    Ok(_) => {}
                    Err(e) => return e.to_string(),
                },
                changed = changes.changed() => {
                    if changed.is_err() {
                        return "the broker stopped".into();
                    }
                    break;
                }
                _ = broker.shutdown.cancelled() => return "shutting down".into(),
            }
        }
    }
}

/// Routes the messages of a route link to this node's subscribers.
struct Reader {
    broker: Arc<Inner>,
    cache: RouteCache,
    batch: Batch,
}

impl Reader {
    fn new(broker: &Arc<Inner>) -> Reader {
        Reader {
            broker: broker.clone(),
            cache: RouteCache::new(),
            batch: Batch::new(broker.stats.clone()),
        }
    }

    /// Routes every whole ROUTE frame at the front of `buf` and takes them
    /// off; other frames are control (PONG) and are dropped.
    fn take(&mut self, buf: &mut BytesMut) -> Result<(), String> {
        let router = &self.broker.router;
        let now = Timestamp::now();
        let mut used = 0;
        let result = loop {
            match protocol::peek(&buf[used..], protocol::DEFAULT_MAX_FRAME_BYTES) {
                Ok(Peek::Incomplete) => break Ok(()),
                Ok(Peek::Route(routed, len)) => {
                    used += len;
                    let Ok((topic, route)) =
                        self.cache.resolve(router, routed.topic, &mut self.batch)
                    else {
                        continue;
                    };
                    let publication = Publication::from_wire(routed.body_flags, routed.body, now);
                    let scope = Scope::Routed {
                        plain: routed.plain,
                        partition: routed.partition,
                        groups: routed.group_block,
                    };
                    self.batch.add_bytes_in(routed.body.len());
                    // Partitions are taken modulo this node's count: never
                    // refused.
                    let _ = self.batch.route(router, topic, route, &publication, scope);
                }
                Ok(Peek::Other) => {
                    let Ok(Some(len)) = frame_len(&buf[used..], protocol::DEFAULT_MAX_FRAME_BYTES)
                    else {
                        break Ok(());
                    };
                    used += 4 + len;
                }
                Ok(Peek::Publish(..) | Peek::Deliver(..)) => {
                    break Err("unexpected frame on a route link".to_string())
                }
                Err(e) => break Err(e.to_string()),
            }
        };
        self.batch.finish();
        buf.advance(used);
        result
    }

    /// Waits, when a subscriber under the block policy fell behind, until
    /// it caught up (or was disconnected): the link is held back as a
    /// publisher connected here would be.
    async fn wait_for_blocked(&mut self) {
        let blocked = self.batch.take_blocked();
        if blocked.is_empty() {
            return;
        }
        let wait = LiveLimits::get(&self.broker.live.limits.slow_consumer_block_ms);
        let limit = (wait > 0).then(|| Duration::from_millis(wait as u64));
        blocked.wait(limit, &self.broker.stats).await;
    }
}
