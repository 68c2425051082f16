//! The router: the one owner of subscription state, shared by in-process and
//! network subscribers.
//!
//! Publishers never lock on the hot path. Each publisher keeps a
//! [`RouteCache`] from topic to [`Matches`]; it is valid while the router's
//! generation (bumped by every subscribe and unsubscribe) is unchanged. Only
//! a cache miss takes the subscription index's read lock.
//!
//! Delivering appends to each subscriber's buffer and records the buffers
//! that went from empty to non-empty; the publisher wakes those once, after
//! its whole batch ([`Batch::finish`]).

mod credit;
pub(crate) mod log;
mod partition;
mod shed;
mod sublist;

use std::cell::OnceCell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use foldhash::HashMap;
use kaelix_core::outbox::{Outbox, Pushed};
use kaelix_core::protocol::decode::{body_parts, header_pairs};
use kaelix_core::protocol::encode::encode_body;
use kaelix_core::protocol::{encode_deliver_raw, encode_route_raw, ErrorCode, ErrorFrame, Frame};
use kaelix_core::queue::MessageQueue;
use kaelix_core::{CloseReason, Message, SlowConsumerPolicy, Timestamp, Topic, TopicPattern};
use parking_lot::lock_api::ArcMutexGuard;
use parking_lot::{RawMutex, RwLock};

use crate::plugins::{Chain, ChainSet};
use crate::stats::Stats;
use credit::{Flow, Part};
use log::{LogState, Logs, TopicLog};
pub(crate) use partition::PartitionSet;
use partition::{message_choice, unknown_partition, wire_choice, Choice};
use sublist::Sublist;

/// Where a subscriber's messages go.
pub(crate) enum Sink {
    /// A network connection: MESSAGE frames into its outbox.
    Net(Arc<Outbox>),
    /// An in-process receiver.
    Local(Arc<MessageQueue>),
}

/// Who holds a subscription, for the logs.
#[derive(Debug)]
pub(crate) struct Owner {
    /// The connection id in the logs; 0 in process.
    pub(crate) conn: u64,
    pub(crate) peer: String,
    pub(crate) client: String,
}

impl Owner {
    pub(crate) fn in_process() -> Arc<Owner> {
        Arc::new(Owner {
            conn: 0,
            peer: "in-process".into(),
            client: String::new(),
        })
    }
}

/// A subscription about to be made.
pub(crate) struct NewSub {
    pub(crate) pattern: TopicPattern,
    pub(crate) group: Option<Arc<str>>,
    pub(crate) sid: u32,
    pub(crate) sink: Sink,
    /// Its own slow-consumer policy, over its topics'.
    pub(crate) policy: Option<SlowConsumerPolicy>,
    pub(crate) owner: Arc<Owner>,
    /// Only these partitions; `None` takes all.
    pub(crate) partitions: Option<PartitionSet>,
    /// In a queue group: the group gives out whole partitions.
    pub(crate) sticky: bool,
    /// A credit window (messages, bytes) for a network subscription that
    /// paces the broker.
    pub(crate) credit: Option<(u32, u32)>,
    /// Made by another cluster node for its clients' interest (on a route
    /// link): it gets ROUTE frames, and nothing that itself came over a
    /// route.
    pub(crate) route: bool,
}

/// One subscription.
pub(crate) struct Subscriber {
    /// Unique in this broker.
    pub(crate) id: u64,
    /// The connection's own id for it, carried in MESSAGE frames.
    pub(crate) sid: u32,
    pub(crate) pattern: TopicPattern,
    pub(crate) group: Option<Arc<str>>,
    pub(crate) sink: Sink,
    pub(crate) policy: Option<SlowConsumerPolicy>,
    pub(crate) owner: Arc<Owner>,
    pub(crate) partitions: Option<PartitionSet>,
    pub(crate) sticky: bool,
    /// Another node's interest (see [`NewSub::route`]).
    pub(crate) route: bool,
    /// Its credit, when it paces the broker. Boxed: most subscriptions
    /// have none, and a million of them would carry its size for nothing.
    flow: Option<Box<Flow>>,
}

impl Subscriber {
    fn takes(&self, partition: u32) -> bool {
        PartitionSet::takes(self.partitions.as_ref(), partition)
    }
}

/// The subscribers of one topic.
pub(crate) struct Matches {
    plain: Vec<Arc<Subscriber>>,
    groups: Vec<Group>,
    /// Other nodes' plain interest: one subscription per route link, so
    /// that a message crosses to a node once however many of its
    /// subscriptions match.
    routes: Vec<Arc<Subscriber>>,
    /// No other node wants this topic (and every group has a member here):
    /// a message published here takes the single broker's path.
    local_only: bool,
}

struct Group {
    name: Arc<str>,
    /// This node's members.
    members: Vec<Arc<Subscriber>>,
    next: AtomicUsize,
    /// Partition `p` goes to member `p % members` (any member asked).
    sticky: bool,
    /// Other nodes with members (one subscription per route link): a
    /// message goes to one of them only when no member here takes it.
    remote: Vec<Arc<Subscriber>>,
    remote_next: AtomicUsize,
}

/// Where a topic's messages go: its subscribers as of `generation`, and
/// its log.
pub(crate) struct Route {
    matches: Matches,
    log: Arc<TopicLog>,
    generation: u64,
    /// The topic's plugins, if any apply to it.
    chain: Option<Arc<Chain>>,
}

impl Route {
    /// The plugins a message to this topic passes through first.
    pub(crate) fn chain(&self) -> Option<&Arc<Chain>> {
        self.chain.as_ref()
    }
}

impl Matches {
    fn build(subs: Vec<Arc<Subscriber>>) -> Matches {
        let mut plain = Vec::new();
        let mut routes: Vec<Arc<Subscriber>> = Vec::new();
        // Name, members here, route subscriptions of nodes with members.
        type Gathered = (Arc<str>, Vec<Arc<Subscriber>>, Vec<Arc<Subscriber>>);
        let mut groups: Vec<Gathered> = Vec::new();
        for sub in subs {
            match &sub.group {
                None if sub.route => {
                    if !routes.iter().any(|r| same_link(r, &sub)) {
                        routes.push(sub);
                    }
                }
                None => plain.push(sub),
                Some(name) => {
                    let at = match groups.iter().position(|(n, ..)| n == name) {
                        Some(at) => at,
                        None => {
                            groups.push((name.clone(), Vec::new(), Vec::new()));
                            groups.len() - 1
                        }
                    };
                    let (_, members, remote) = &mut groups[at];
                    if !sub.route {
                        members.push(sub);
                    } else if !remote.iter().any(|r| same_link(r, &sub)) {
                        remote.push(sub);
                    }
                }
            }
        }
        let local_only = routes.is_empty()
            && groups
                .iter()
                .all(|(_, members, remote)| remote.is_empty() && !members.is_empty());
        Matches {
            plain,
            routes,
            local_only,
            groups: groups
                .into_iter()
                .map(|(name, mut members, mut remote)| {
                    // A stable order, so the round robin is fair.
                    members.sort_by_key(|s| s.id);
                    remote.sort_by_key(|s| s.id);
                    Group {
                        name,
                        sticky: members.iter().any(|m| m.sticky),
                        members,
                        next: AtomicUsize::new(0),
                        remote,
                        remote_next: AtomicUsize::new(0),
                    }
                })
                .collect(),
        }
    }
}

/// Whether two route subscriptions are on the same link (one outbox).
fn same_link(a: &Subscriber, b: &Subscriber) -> bool {
    match (&a.sink, &b.sink) {
        (Sink::Net(x), Sink::Net(y)) => Arc::ptr_eq(x, y),
        _ => false,
    }
}

/// Counts of this node's subscriptions by pattern and queue group (route
/// subscriptions left out), and a signal when a count goes to or from zero.
#[derive(Default)]
pub(crate) struct Interest {
    counts: parking_lot::Mutex<HashMap<InterestKey, usize>>,
    /// Bumped when the set of keys changes.
    changed: tokio::sync::watch::Sender<u64>,
}

/// A pattern and, for queue subscriptions, the group.
pub(crate) type InterestKey = (TopicPattern, Option<Arc<str>>);

impl Interest {
    fn add(&self, sub: &Subscriber) {
        if sub.route {
            return;
        }
        let mut counts = self.counts.lock();
        let n = counts
            .entry((sub.pattern.clone(), sub.group.clone()))
            .or_insert(0);
        *n += 1;
        if *n == 1 {
            self.changed.send_modify(|v| *v += 1);
        }
    }

    fn remove(&self, sub: &Subscriber) {
        if sub.route {
            return;
        }
        let mut counts = self.counts.lock();
        let key = (sub.pattern.clone(), sub.group.clone());
        if let Some(n) = counts.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&key);
                self.changed.send_modify(|v| *v += 1);
            }
        }
    }

    /// The patterns and groups subscribed to now.
    pub(crate) fn keys(&self) -> Vec<InterestKey> {
        self.counts.lock().keys().cloned().collect()
    }

    /// Changes when [`keys`](Self::keys) does.
    pub(crate) fn watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

/// The subscription state of a broker.
pub(crate) struct Router {
    subs: RwLock<Sublist>,
    generation: AtomicU64,
    next_id: AtomicU64,
    stats: Arc<Stats>,
    pub(crate) logs: Logs,
    /// The plugin chains in force.
    chains: arc_swap::ArcSwap<ChainSet>,
    /// This node's clients' interest, counted once the broker is in a
    /// cluster (see [`Router::interest`]).
    interest: std::sync::OnceLock<Arc<Interest>>,
}

impl Router {
    pub(crate) fn new(stats: Arc<Stats>, config: &kaelix_core::MemoryStreamerConfig) -> Self {
        Router {
            subs: RwLock::new(Sublist::default()),
            generation: AtomicU64::new(0),
            next_id: AtomicU64::new(1),
            stats,
            logs: Logs::new(config),
            chains: arc_swap::ArcSwap::from_pointee(ChainSet::default()),
            interest: std::sync::OnceLock::new(),
        }
    }

    /// The interest of this node's clients (patterns and queue groups they
    /// subscribe to), counted from now on: other nodes subscribe to it on
    /// their route links so that messages cross only to nodes that want
    /// them.
    pub(crate) fn interest(&self) -> Arc<Interest> {
        let subs = self.subs.write();
        self.interest
            .get_or_init(|| {
                let interest = Interest::default();
                for sub in subs.all() {
                    interest.add(&sub);
                }
                Arc::new(interest)
            })
            .clone()
    }

    /// Puts `chains` in force: every publisher looks its routes up again.
    pub(crate) fn set_chains(&self, chains: ChainSet) {
        self.chains.store(Arc::new(chains));
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// The plugin chains in force.
    pub(crate) fn chains(&self) -> Arc<ChainSet> {
        self.chains.load_full()
    }

    pub(crate) fn subscribe(&self, new: NewSub) -> Arc<Subscriber> {
        let NewSub {
            pattern,
            group,
            sid,
            sink,
            policy,
            owner,
            partitions,
            sticky,
            credit,
            route,
        } = new;
        let sub = Arc::new(Subscriber {
            flow: credit.map(|(messages, bytes)| Box::new(Flow::new(messages, bytes))),
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            sid,
            pattern,
            group,
            sink,
            policy,
            owner,
            partitions,
            sticky,
            route,
        });
        {
            let mut subs = self.subs.write();
            subs.insert(sub.clone());
            // Under the index's lock, so that enabling the interest count
            // (which reads the index under it) sees each subscription once.
            if let Some(interest) = self.interest.get() {
                interest.add(&sub);
            }
        }
        self.generation.fetch_add(1, Ordering::Release);
        self.stats.subscriptions.fetch_add(1, Ordering::Relaxed);
        sub
    }

    pub(crate) fn unsubscribe(&self, sub: &Subscriber) {
        let removed = {
            let mut subs = self.subs.write();
            let removed = subs.remove(sub);
            if let (true, Some(interest)) = (removed, self.interest.get()) {
                interest.remove(sub);
            }
            removed
        };
        if removed {
            self.generation.fetch_add(1, Ordering::Release);
            self.stats.subscriptions.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Applies new `[retention]` and `[[topics]]` settings; topics that
    /// gained partitions make every route be looked up again.
    pub(crate) fn reconfigure_logs(&self, config: &kaelix_core::MemoryStreamerConfig) {
        if self.logs.reconfigure(config) {
            self.generation.fetch_add(1, Ordering::Release);
        }
    }

    /// Whether `topic` has `partition`: for a batch that must be refused
    /// whole, before any of it is routed.
    pub(crate) fn check_partition(
        &self,
        topic: &Topic,
        partition: kaelix_core::PartitionId,
    ) -> Result<(), UnknownPartition> {
        let partitions = self.logs.get_or_create(topic).partitions();
        if partition.get() < partitions {
            return Ok(());
        }
        Err(UnknownPartition(unknown_partition(
            topic.as_str(),
            partition.get(),
            partitions,
        )))
    }

    /// Distinct exact topics subscribed to, and wildcard subscriptions.
    pub(crate) fn counts(&self) -> (usize, usize) {
        self.subs.read().counts()
    }

    /// Every subscription; for shutdown.
    pub(crate) fn all(&self) -> Vec<Arc<Subscriber>> {
        self.subs.read().all()
    }

    fn lookup(&self, topic: &Topic) -> Arc<Route> {
        // The generation before the read: a subscription that lands after
        // it makes this route stale, never silently incomplete.
        let generation = self.generation();
        Arc::new(Route {
            matches: self.matches(topic),
            log: self.logs.get_or_create(topic),
            generation,
            chain: self.chains.load().chain_for(topic),
        })
    }

    fn matches(&self, topic: &Topic) -> Matches {
        let mut found = Vec::new();
        self.subs.read().matches(topic, &mut found);
        Matches::build(found)
    }

    /// Subscribes and first delivers what the matching topics hold from
    /// `start`; returns the subscriber and how many asked-for messages were
    /// no longer held.
    ///
    /// Lock order, which publishers follow too: the log registry, then
    /// topic logs (by address), then the subscription index. With every
    /// matching log locked and no new log able to appear, the subscription
    /// lands between two runs of each topic: what came before is replayed
    /// here, what comes after is delivered live.
    pub(crate) fn subscribe_from(
        &self,
        new: NewSub,
        start: &Starts,
        ack: Option<&Frame>,
    ) -> (Arc<Subscriber>, u64) {
        let registry = self.logs.lock_registry();
        // Every partition it takes of every matching topic, in lock order.
        let mut parts: Vec<(&Topic, u32, bool, &Arc<parking_lot::Mutex<LogState>>)> = Vec::new();
        let logs = Logs::matching_in(&registry, &new.pattern);
        for log in &logs {
            let split = log.partitions() > 1;
            for (p, part) in log.parts.iter().enumerate() {
                let p = p as u32;
                if PartitionSet::takes(new.partitions.as_ref(), p) {
                    parts.push((&log.topic, p, split, part));
                }
            }
        }
        parts.sort_by_key(|(.., part)| Arc::as_ptr(part) as usize);
        let mut locked: Vec<_> = parts.iter().map(|(.., part)| part.lock()).collect();
        let sub = self.subscribe(new);
        let mut missed = 0;
        if let (Some(flow), Sink::Net(outbox)) = (&sub.flow, &sub.sink) {
            // Paced: what credit allows now, the rest from the logs as
            // credit comes.
            let from: Vec<u64> = parts
                .iter()
                .zip(locked.iter_mut())
                .map(|((topic, p, ..), state)| {
                    let (from, gone) = state.position(start.at(topic, *p));
                    missed += gone;
                    from
                })
                .collect();
            let mut frames = replay_head(&sub, missed, ack);
            for (((topic, p, split, part), state), from) in
                parts.iter().zip(locked.iter_mut()).zip(from)
            {
                let partition = split.then_some(*p);
                let (_, next) = flow.take_from(state, sub.sid, from, partition, &mut frames);
                if next < state.next {
                    flow.stop_at(part, topic, partition, next);
                }
            }
            // Within the window by construction: past the buffer's limit
            // only if the window is larger than the limit.
            outbox.append_over(&mut frames);
            drop(locked);
            drop(registry);
            outbox.wake();
            return (sub, missed);
        }
        let mut replay = Vec::with_capacity(parts.len());
        for ((topic, p, split, _), state) in parts.iter().zip(locked.iter_mut()) {
            let (kept, gone) = state.since(start.at(topic, *p));
            missed += gone;
            let policy = sub.policy.unwrap_or(state.slow_consumer);
            replay.push((*topic, split.then_some(*p), kept, policy));
        }
        match &sub.sink {
            Sink::Local(queue) => {
                // A replay never waits: under block it may pass the limit
                // (by at most what the topics retain).
                let mut never_waited = Blocked::default();
                for (topic, partition, kept, policy) in replay {
                    let mut messages: Vec<Message> = kept
                        .iter()
                        .map(|k| kept_message(topic, partition, k))
                        .collect();
                    if !messages.is_empty() {
                        offer_local(queue, &mut messages, policy, &self.stats, &mut never_waited);
                    }
                }
            }
            Sink::Net(outbox) => {
                let mut frames = replay_head(&sub, missed, ack);
                let mut overflow = Overflow::new(&sub.owner);
                for (_, partition, kept, policy) in &replay {
                    overflow.add(sub.sid, *policy);
                    for k in kept {
                        let at = (Some(k.offset), *partition);
                        encode_deliver_raw(&mut frames, sub.sid, at, k.flags, &k.body);
                    }
                }
                if !frames.is_empty() && outbox.append(&mut frames) == Pushed::Full {
                    // Under block the replay passes the limit (it never
                    // waits; by at most what the topics retain).
                    overflow_net(outbox, &mut frames, &overflow, &self.stats);
                }
            }
        }
        drop(locked);
        drop(registry);
        match &sub.sink {
            Sink::Local(queue) => queue.wake(),
            Sink::Net(outbox) => outbox.wake(),
        }
        (sub, missed)
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Gives credit back to a subscription with a window, and sends it
    /// what waited in the logs for it, as far as the credit goes.
    pub(crate) fn grant(&self, sub: &Subscriber, messages: u32, bytes: u32) {
        let (Some(flow), Sink::Net(outbox)) = (&sub.flow, &sub.sink) else {
            return;
        };
        flow.add(messages, bytes);
        if !flow.is_behind() {
            return;
        }
        let mut frames = BytesMut::new();
        let (sent, missed) = flow.read(sub.sid, &mut frames);
        if frames.is_empty() {
            return;
        }
        if missed > 0 {
            let owner = &sub.owner;
            tracing::warn!(
                conn = owner.conn, peer = %owner.peer, client = ?owner.client,
                sid = sub.sid, missed,
                "paced subscriber: messages left the retained window before it had credit for them"
            );
            self.stats.slow_dropped.fetch_add(missed, Ordering::Relaxed);
        }
        let len = frames.len() as u64;
        if outbox.append_over(&mut frames) == Pushed::First {
            outbox.wake();
        }
        self.stats.add_routed(0, sent, 0, len);
    }
}

/// Where a subscription starts in each topic partition it matches: at the
/// offset a resumed subscription names for it, else at one position for
/// all.
#[derive(Debug, Clone, Default)]
pub(crate) struct Starts {
    pub(crate) default: kaelix_core::StartPosition,
    /// Next offsets by topic and partition (a client that reconnected).
    pub(crate) resume: HashMap<(Bytes, u32), u64>,
}

impl Starts {
    pub(crate) fn all(start: kaelix_core::StartPosition) -> Starts {
        Starts {
            default: start,
            resume: HashMap::default(),
        }
    }

    fn at(&self, topic: &Topic, partition: u32) -> kaelix_core::StartPosition {
        if self.resume.is_empty() {
            return self.default;
        }
        let key = (Bytes::copy_from_slice(topic.as_bytes()), partition);
        match self.resume.get(&key) {
            Some(next) => kaelix_core::StartPosition::Offset(*next),
            None => self.default,
        }
    }
}

/// What goes before a network replay: MISSED (if some asked-for messages
/// are gone) and the acknowledgement. A client returns from subscribing on
/// the acknowledgement, and a replay larger than its buffer must not stand
/// in front of it.
fn replay_head(sub: &Subscriber, missed: u64, ack: Option<&Frame>) -> BytesMut {
    let mut frames = BytesMut::new();
    if missed > 0 {
        Frame::Missed(kaelix_core::protocol::Missed {
            sid: sub.sid,
            count: missed,
            range: None,
        })
        .encode(&mut frames);
    }
    if let Some(ack) = ack {
        ack.encode(&mut frames);
    }
    frames
}

/// A retained message as an in-process receiver gets it: its payload is a
/// slice of the retained chunk, not a copy. `partition` is set for a topic
/// with more than one.
fn kept_message(topic: &Topic, partition: Option<u32>, k: &log::Kept) -> Message {
    // Kept bodies were validated when they were published.
    let parts = body_parts(&k.body, k.flags).unwrap_or_else(|e| unreachable!("{e}"));
    let start = parts.payload.as_ptr() as usize - k.body.as_ptr() as usize;
    Message {
        id: kaelix_core::MessageId::next(),
        topic: topic.clone(),
        payload: k.body.slice(start..start + parts.payload.len()),
        timestamp: k.timestamp,
        partition: partition
            .or(parts.partition)
            .map(kaelix_core::PartitionId::new),
        offset: Some(kaelix_core::Offset::new(k.offset)),
        headers: parts
            .headers
            .map(|h| header_pairs(h).collect())
            .unwrap_or_default(),
    }
}

/// A publisher's cache of topic → subscribers.
pub(crate) struct RouteCache {
    generation: u64,
    map: HashMap<Topic, Arc<Route>>,
    /// The last topic resolved: a run of publishes to one topic skips the
    /// hash lookup.
    last: Option<(Topic, Arc<Route>)>,
}

/// Past this many topics, a publisher's cache starts over.
const CACHE_CAP: usize = 4096;

impl RouteCache {
    pub(crate) fn new() -> Self {
        RouteCache {
            generation: u64::MAX,
            map: HashMap::default(),
            last: None,
        }
    }

    /// The subscribers of `topic`, validating the name on a miss. Validated
    /// names stay in the cache, so a hit skips validation too.
    ///
    /// `batch`'s run is always for the last topic resolved; any other topic
    /// ends it first, so that no log lock is held while a miss takes the
    /// registry's and the router's locks (see [`Router::subscribe_from`]).
    pub(crate) fn resolve(
        &mut self,
        router: &Router,
        topic: &[u8],
        batch: &mut Batch,
    ) -> kaelix_core::Result<(&Topic, &Arc<Route>)> {
        let generation = router.generation();
        if generation != self.generation {
            self.map.clear();
            self.last = None;
            self.generation = generation;
        }
        let hit = matches!(&self.last, Some((t, _)) if t.as_bytes() == topic);
        if !hit {
            batch.end_run();
            let entry = match self.map.get_key_value(topic) {
                Some((t, m)) => (t.clone(), m.clone()),
                None => {
                    let t = Topic::from_bytes(Bytes::copy_from_slice(topic))?;
                    let m = router.lookup(&t);
                    if self.map.len() >= CACHE_CAP {
                        self.map.clear();
                    }
                    self.map.insert(t.clone(), m.clone());
                    (t, m)
                }
            };
            self.last = Some(entry);
        }
        match &self.last {
            Some((t, m)) => Ok((t, m)),
            None => unreachable!("set above"),
        }
    }
}

/// One message being routed. A message from the wire is forwarded as the
/// bytes it arrived in; its in-process form is made only if an in-process
/// subscriber wants it. An in-process message is encoded for the wire only
/// if a network subscriber wants it.
pub(crate) struct Publication<'a> {
    wire: Option<(u8, &'a [u8])>,
    body: OnceCell<(u8, Bytes)>,
    message: OnceCell<Message>,
    timestamp: Timestamp,
}

impl<'a> Publication<'a> {
    /// A PUBLISH body (validated by the decoder) and its flags.
    pub(crate) fn from_wire(body_flags: u8, body: &'a [u8], timestamp: Timestamp) -> Self {
        Publication {
            wire: Some((body_flags, body)),
            body: OnceCell::new(),
            message: OnceCell::new(),
            timestamp,
        }
    }

    pub(crate) fn from_message(message: Message) -> Publication<'static> {
        Publication {
            wire: None,
            timestamp: message.timestamp,
            body: OnceCell::new(),
            message: OnceCell::from(message),
        }
    }

    /// Whether it names a partition, has a key, or neither.
    fn choice(&self) -> Choice<'_> {
        match (self.wire, self.message.get()) {
            (Some((flags, body)), _) => wire_choice(flags, body),
            (None, Some(message)) => message_choice(message),
            (None, None) => unreachable!("a publication has a body or a message"),
        }
    }

    /// Whether it names a partition (the cheap check a topic with one
    /// partition makes).
    fn names_partition(&self) -> bool {
        match (self.wire, self.message.get()) {
            (Some((flags, _)), _) => flags & kaelix_core::protocol::flags::PARTITION != 0,
            (None, Some(message)) => message.partition.is_some(),
            (None, None) => false,
        }
    }

    /// The encoded body and its flags.
    fn wire_body(&self) -> (u8, &[u8]) {
        if let Some(wire) = self.wire {
            return wire;
        }
        let (flags, body) = self
            .body
            .get_or_init(|| encode_body(self.message.get().unwrap_or_else(|| unreachable!())));
        (*flags, body)
    }

    fn message(&self, topic: &Topic) -> Message {
        self.message
            .get_or_init(|| {
                let (flags, body) = self.wire.unwrap_or_else(|| unreachable!());
                wire_message(flags, body, topic, self.timestamp)
            })
            .clone()
    }
}

/// The in-process form of a PUBLISH body the decoder validated (for an
/// in-process subscriber, or the plugins of its topic).
pub(crate) fn wire_message(flags: u8, body: &[u8], topic: &Topic, timestamp: Timestamp) -> Message {
    // The decoder validated this body; a failure here is a bug.
    let parts = body_parts(body, flags).unwrap_or_else(|e| unreachable!("{e}"));
    Message {
        id: kaelix_core::MessageId::next(),
        topic: topic.clone(),
        payload: Bytes::copy_from_slice(parts.payload),
        timestamp,
        partition: parts.partition.map(kaelix_core::PartitionId::new),
        offset: None,
        headers: parts
            .headers
            .map(|h| header_pairs(h).collect())
            .unwrap_or_default(),
    }
}

/// MESSAGE frames for one subscriber connection, gathered during a batch
/// and handed to its outbox in one append.
struct Staged {
    outbox: Arc<Outbox>,
    frames: BytesMut,
    count: u64,
    /// What to do if the outbox is full.
    overflow: Overflow,
}

/// What a full buffer's subscriptions in one run chose.
struct Overflow {
    owner: Arc<Owner>,
    /// Subscriptions (sids) under drop_oldest.
    shed: Vec<u32>,
    /// Any subscription under block.
    block: bool,
}

impl Overflow {
    fn new(owner: &Arc<Owner>) -> Overflow {
        Overflow {
            owner: owner.clone(),
            shed: Vec::new(),
            block: false,
        }
    }

    fn add(&mut self, sid: u32, policy: SlowConsumerPolicy) {
        match policy {
            SlowConsumerPolicy::Disconnect => {}
            SlowConsumerPolicy::DropOldest => {
                if !self.shed.contains(&sid) {
                    self.shed.push(sid);
                }
            }
            SlowConsumerPolicy::Block => self.block = true,
        }
    }
}

/// Where a message was put: its offset, its partition (for a topic with
/// more than one), and its topic's slow-consumer policy.
struct Placed<'a> {
    offset: u64,
    partition: Option<u32>,
    policy: SlowConsumerPolicy,
    /// The partition's log (locked by the publisher).
    part: &'a Part,
}

/// Messages for one in-process receiver, gathered during a run.
struct LocalStaged {
    queue: Arc<MessageQueue>,
    messages: Vec<Message>,
    policy: SlowConsumerPolicy,
}

/// Buffers a publisher filled past their limit under the block policy: it
/// waits for them (see [`Blocked::wait`]) before it reads more.
#[derive(Default)]
pub(crate) struct Blocked {
    outboxes: Vec<(Arc<Outbox>, Arc<Owner>)>,
    queues: Vec<Arc<MessageQueue>>,
}

impl Blocked {
    pub(crate) fn is_empty(&self) -> bool {
        self.outboxes.is_empty() && self.queues.is_empty()
    }

    /// Waits until every buffer is within its limit again; one that is not
    /// within `limit` (if any) is closed as a slow consumer.
    pub(crate) async fn wait(self, limit: Option<std::time::Duration>, stats: &Stats) {
        stats.slow_blocked.fetch_add(1, Ordering::Relaxed);
        let deadline = limit.map(|l| tokio::time::Instant::now() + l);
        let until = |deadline: Option<tokio::time::Instant>| async move {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        for (outbox, owner) in self.outboxes {
            tokio::select! {
                _ = outbox.wait_below_limit() => {}
                _ = until(deadline) => {
                    tracing::warn!(
                        conn = owner.conn, peer = %owner.peer, client = ?owner.client,
                        "slow consumer disconnected: publishers waited longer than \
                         limits.slow_consumer_block_ms for it to catch up"
                    );
                    slow_consumer_net(&outbox, stats);
                }
            }
        }
        for queue in self.queues {
            tokio::select! {
                _ = queue.wait_for_space() => {}
                _ = until(deadline) => {
                    tracing::warn!(
                        "slow in-process receiver closed: publishers waited longer than \
                         limits.slow_consumer_block_ms for it to catch up"
                    );
                    queue.close(CloseReason::SlowConsumer);
                    stats.slow_consumers.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// The topic partition a batch is publishing to now, with its log locked.
struct Run {
    route: Arc<Route>,
    /// The partition.
    part: u32,
    log: ArcMutexGuard<RawMutex, LogState>,
    /// The topic's slow-consumer policy.
    policy: SlowConsumerPolicy,
}

/// A publish to a partition its topic does not have; the reason names both.
#[derive(Debug)]
pub(crate) struct UnknownPartition(pub(crate) String);

/// Up to this many outboxes in a run, [`Batch::stage`] finds one by a scan.
const STAGED_SCAN: usize = 8;

/// Routing state of one publisher: frames staged per subscriber, receivers
/// to wake, and counts. Consecutive publishes to one topic form a run, for
/// which the topic's log stays locked; the run's deliveries are handed to
/// the subscribers' buffers when it ends ([`finish`](Self::finish), or a
/// publish to another topic), and the buffers are woken after the lock is
/// let go.
pub(crate) struct Batch {
    stats: Arc<Stats>,
    run: Option<Run>,
    /// Buffers that went from empty to non-empty in this run.
    to_wake: Vec<Arc<Outbox>>,
    local_to_wake: Vec<Arc<MessageQueue>>,
    staged: Vec<Staged>,
    /// Outbox address → index in `staged`.
    index: HashMap<usize, usize>,
    /// Emptied staging buffers, kept for reuse.
    spare: Vec<BytesMut>,
    /// Messages for in-process receivers, appended once per run.
    local: Vec<LocalStaged>,
    /// Buffers filled past their limit under the block policy.
    blocked: Blocked,
    /// Queue address → index in `local`.
    local_index: HashMap<usize, usize>,
    /// Where the next run of messages with neither partition nor key goes
    /// (modulo the topic's partitions).
    next_part: u32,
    /// Paced subscriptions met in this run (by their flow's address), and
    /// whether the run's partition waits in its log for them: asked once
    /// per run, not per message.
    paced: Vec<(usize, bool)>,
    /// The nodes the message being routed crosses to (reused).
    crossings: Vec<Crossing>,
    published: u64,
    delivered: u64,
    bytes_in: u64,
    /// MESSAGE frame bytes handed to network subscribers' outboxes.
    bytes_out: u64,
}

/// One message's crossing to one node: for its plain interest (the route
/// subscription at this index of [`Matches::routes`]) and for the queue
/// groups whose remote member (group index, member index) is on that link.
struct Crossing {
    plain: Option<usize>,
    groups: smallvec::SmallVec<[(usize, usize); 2]>,
}

/// Whose subscribers a message is for.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Scope<'a> {
    /// Published on this node: its subscribers, and other nodes' interest.
    Origin,
    /// Routed here by another node: this node's subscribers only — the
    /// plain ones when `plain`, one member of each group in `groups` (a
    /// ROUTE frame's group block) — in the partition the publishing node
    /// put it in.
    Routed {
        plain: bool,
        partition: Option<u32>,
        groups: &'a [u8],
    },
}

impl Scope<'_> {
    fn plain(&self) -> bool {
        match self {
            Scope::Origin => true,
            Scope::Routed { plain, .. } => *plain,
        }
    }

    fn wants_group(&self, name: &str) -> bool {
        match self {
            Scope::Origin => true,
            Scope::Routed { groups, .. } => {
                let route = kaelix_core::protocol::decode::RouteRef {
                    plain: false,
                    partition: None,
                    group_block: groups,
                    body_flags: 0,
                    body: &[],
                    topic: &[],
                };
                let found = route.groups().any(|g| g == name.as_bytes());
                found
            }
        }
    }
}

/// Whether a subscription's buffer is closed (its connection or link gone).
fn sub_closed(sub: &Subscriber) -> bool {
    match &sub.sink {
        Sink::Net(outbox) => outbox.is_closed_hint(),
        Sink::Local(queue) => queue.is_closed_hint(),
    }
}

impl Batch {
    pub(crate) fn new(stats: Arc<Stats>) -> Self {
        Batch {
            stats,
            run: None,
            to_wake: Vec::new(),
            local_to_wake: Vec::new(),
            staged: Vec::new(),
            index: HashMap::default(),
            spare: Vec::new(),
            local: Vec::new(),
            local_index: HashMap::default(),
            blocked: Blocked::default(),
            next_part: 0,
            paced: Vec::new(),
            crossings: Vec::new(),
            published: 0,
            delivered: 0,
            bytes_in: 0,
            bytes_out: 0,
        }
    }

    /// Puts `publication` on `topic` in its partition, gives it its offset
    /// there, and delivers it to every plain subscriber that takes the
    /// partition and to one member of each queue group.
    ///
    /// The partition is the one the publication names, else the one its
    /// key hashes to, else the current run's if it is on this topic, else
    /// the next in turn: a publisher's consecutive messages without a key
    /// stay in one partition for a batch.
    pub(crate) fn route(
        &mut self,
        router: &Router,
        topic: &Topic,
        route: &Arc<Route>,
        publication: &Publication<'_>,
        scope: Scope<'_>,
    ) -> Result<(), UnknownPartition> {
        let partitions = route.log.partitions();
        let part = if let Scope::Routed {
            partition: Some(p), ..
        } = scope
        {
            // Where the publishing node put it (the same partition when
            // the nodes agree on the topic's partitions).
            p % partitions
        } else if partitions == 1 && !publication.names_partition() {
            0
        } else {
            match publication.choice() {
                Choice::Named(p) if p < partitions => p,
                Choice::Named(p) => {
                    return Err(UnknownPartition(unknown_partition(
                        topic.as_str(),
                        p,
                        partitions,
                    )))
                }
                Choice::Key(key) => kaelix_core::PartitionId::for_key(key, partitions).get(),
                Choice::Any => match &self.run {
                    Some(run) if Arc::ptr_eq(&run.route.log, &route.log) => run.part,
                    _ => {
                        self.next_part = self.next_part.wrapping_add(1);
                        self.next_part % partitions
                    }
                },
            }
        };
        let same = self
            .run
            .as_ref()
            .is_some_and(|run| run.part == part && Arc::ptr_eq(&run.route.log, &route.log));
        if !same {
            self.end_run();
            let log = route.log.parts[part as usize].lock_arc();
            // Under the lock, a route made before a subscription landed is
            // made again: a replaying subscriber must not miss this run.
            let route = if router.generation() == route.generation {
                route.clone()
            } else {
                // Only the subscribers are looked up again: the topic's
                // log is the one locked (and the log registry is not
                // taken under a log lock, see `Router::subscribe_from`).
                let generation = router.generation();
                Arc::new(Route {
                    matches: router.matches(topic),
                    log: route.log.clone(),
                    generation,
                    // The chain already ran; delivery does not look at it.
                    chain: None,
                })
            };
            let policy = log.slow_consumer;
            self.run = Some(Run {
                route,
                part,
                log,
                policy,
            });
        }
        // Taken out for the deliveries (which borrow the batch) and put
        // back: no reference count moves per message.
        let Some(mut run) = self.run.take() else {
            unreachable!("a run was just started")
        };
        let (flags, body) = publication.wire_body();
        let offset = run.log.append(publication.timestamp, flags, body);
        self.published += 1;
        let matches = &run.route.matches;
        let at = Placed {
            offset,
            partition: (partitions > 1).then_some(part),
            policy: run.policy,
            part: ArcMutexGuard::mutex(&run.log),
        };
        if matches.local_only && matches!(scope, Scope::Origin) {
            // Published here, wanted only here: the single broker's path.
            for sub in &matches.plain {
                if sub.takes(part) {
                    self.deliver(sub, topic, publication, &at);
                }
            }
            for group in &matches.groups {
                let n = group.members.len();
                let start = if group.sticky {
                    part as usize % n
                } else {
                    group.next.fetch_add(1, Ordering::Relaxed)
                };
                // The first member that takes it; a closed or full one passes it on.
                for i in 0..n {
                    if self.deliver(&group.members[(start + i) % n], topic, publication, &at) {
                        break;
                    }
                }
            }
        } else {
            self.route_in_cluster(matches, topic, publication, &at, part, scope);
        }
        self.run = Some(run);
        Ok(())
    }

    /// [`route`](Self::route)'s delivery when other nodes want the message
    /// or it came from one.
    #[inline(never)]
    fn route_in_cluster(
        &mut self,
        matches: &Matches,
        topic: &Topic,
        publication: &Publication<'_>,
        at: &Placed<'_>,
        part: u32,
        scope: Scope<'_>,
    ) {
        let origin = matches!(scope, Scope::Origin);
        if scope.plain() {
            for sub in &matches.plain {
                if sub.takes(part) {
                    self.deliver(sub, topic, publication, at);
                }
            }
        }
        // Other nodes this message crosses to, each once (publishes made
        // here only: a routed message never crosses again).
        self.crossings.clear();
        if origin {
            for (i, sub) in matches.routes.iter().enumerate() {
                if sub.takes(part) {
                    self.crossings.push(Crossing {
                        plain: Some(i),
                        groups: smallvec::SmallVec::new(),
                    });
                }
            }
        }
        for (g, group) in matches.groups.iter().enumerate() {
            if !scope.wants_group(&group.name) {
                continue;
            }
            let n = group.members.len();
            let mut taken = false;
            if n > 0 {
                let start = if group.sticky {
                    part as usize % n
                } else {
                    group.next.fetch_add(1, Ordering::Relaxed)
                };
                // The first member that takes it; a closed or full one passes it on.
                for i in 0..n {
                    if self.deliver(&group.members[(start + i) % n], topic, publication, at) {
                        taken = true;
                        break;
                    }
                }
            }
            // No member here took it: one node that has members gets it.
            if !taken && origin && !group.remote.is_empty() {
                let r = group.remote.len();
                let start = group.remote_next.fetch_add(1, Ordering::Relaxed);
                let pick = (0..r)
                    .map(|i| (start + i) % r)
                    .find(|&i| !sub_closed(&group.remote[i]));
                if let Some(i) = pick {
                    self.cross_group(matches, g, i);
                }
            }
        }
        if !self.crossings.is_empty() {
            self.send_crossings(matches, publication, at);
        }
    }

    /// Adds group `g`'s remote member `i` to this message's crossings (to
    /// the entry for its link, if the message crosses there already).
    fn cross_group(&mut self, matches: &Matches, g: usize, i: usize) {
        let sub = &matches.groups[g].remote[i];
        let existing = self.crossings.iter().position(|c| {
            let first = match (c.plain, c.groups.first()) {
                (Some(p), _) => &matches.routes[p],
                (None, Some(&(g, i))) => &matches.groups[g].remote[i],
                (None, None) => return false,
            };
            same_link(first, sub)
        });
        match existing {
            Some(at) => self.crossings[at].groups.push((g, i)),
            None => self.crossings.push(Crossing {
                plain: None,
                groups: smallvec::smallvec![(g, i)],
            }),
        }
    }

    /// Stages one ROUTE frame per crossing.
    fn send_crossings(
        &mut self,
        matches: &Matches,
        publication: &Publication<'_>,
        at: &Placed<'_>,
    ) {
        let (flags, body) = publication.wire_body();
        let crossings = std::mem::take(&mut self.crossings);
        for crossing in &crossings {
            let sub = match (crossing.plain, crossing.groups.first()) {
                (Some(p), _) => &matches.routes[p],
                (None, Some(&(g, i))) => &matches.groups[g].remote[i],
                (None, None) => continue,
            };
            let Sink::Net(outbox) = &sub.sink else {
                continue;
            };
            let policy = sub.policy.unwrap_or(at.policy);
            let names: smallvec::SmallVec<[&[u8]; 4]> = crossing
                .groups
                .iter()
                .map(|&(g, _)| matches.groups[g].name.as_bytes())
                .collect();
            let frames = self.stage(outbox, sub, policy);
            encode_route_raw(
                frames,
                crossing.plain.is_some(),
                at.partition,
                &names,
                flags,
                body,
            );
            self.delivered += 1;
        }
        self.crossings = crossings;
    }

    pub(crate) fn add_bytes_in(&mut self, n: usize) {
        self.bytes_in += n as u64;
    }

    /// Delivers to one subscriber the message placed `at`.
    fn deliver(
        &mut self,
        sub: &Subscriber,
        topic: &Topic,
        publication: &Publication<'_>,
        at: &Placed<'_>,
    ) -> bool {
        let policy = sub.policy.unwrap_or(at.policy);
        let ok = match &sub.sink {
            Sink::Net(outbox) => {
                let (flags, body) = publication.wire_body();
                let paced = match &sub.flow {
                    Some(flow) => !self.admit(flow, topic, at, body.len()),
                    None => false,
                };
                if paced || outbox.is_closed_hint() {
                    false
                } else {
                    let frames = self.stage(outbox, sub, policy);
                    let place = (Some(at.offset), at.partition);
                    encode_deliver_raw(frames, sub.sid, place, flags, body);
                    true
                }
            }
            Sink::Local(queue) => {
                if queue.is_closed_hint() {
                    false
                } else {
                    let mut message = publication.message(topic);
                    message.offset = Some(kaelix_core::Offset::new(at.offset));
                    if let Some(p) = at.partition {
                        message.partition = Some(kaelix_core::PartitionId::new(p));
                    }
                    self.stage_local(queue, policy).push(message);
                    true
                }
            }
        };
        self.delivered += u64::from(ok);
        ok
    }

    /// Whether a paced subscription may be sent the message placed `at`
    /// now; if its partition waits in the log for it, or its credit runs
    /// out here, the message stays in the log for it.
    fn admit(&mut self, flow: &Flow, topic: &Topic, at: &Placed<'_>, len: usize) -> bool {
        let key = flow as *const Flow as usize;
        let i = match self.paced.iter().position(|(k, _)| *k == key) {
            Some(i) => i,
            None => {
                self.paced.push((key, flow.waits_on(at.part)));
                self.paced.len() - 1
            }
        };
        if self.paced[i].1 {
            return false;
        }
        let admitted = flow.admit(at.part, topic, at.partition, at.offset, len);
        self.paced[i].1 = !admitted;
        admitted
    }

    /// The messages staged for an in-process receiver's `queue`.
    fn stage_local(
        &mut self,
        queue: &Arc<MessageQueue>,
        policy: SlowConsumerPolicy,
    ) -> &mut Vec<Message> {
        let key = Arc::as_ptr(queue) as usize;
        let at = match self.local_index.get(&key) {
            Some(&at) => at,
            None => {
                self.local.push(LocalStaged {
                    queue: queue.clone(),
                    messages: Vec::new(),
                    policy,
                });
                self.local_index.insert(key, self.local.len() - 1);
                self.local.len() - 1
            }
        };
        &mut self.local[at].messages
    }

    /// The staging buffer for `outbox`, noting `sub`'s `policy` for the
    /// case where the outbox turns out to be full.
    #[inline(always)]
    fn stage(
        &mut self,
        outbox: &Arc<Outbox>,
        sub: &Subscriber,
        policy: SlowConsumerPolicy,
    ) -> &mut BytesMut {
        let key = Arc::as_ptr(outbox) as usize;
        // A run touches few outboxes: a scan of their addresses beats
        // hashing one per delivery (fan-out to a handful of subscribers).
        let found = if self.staged.len() <= STAGED_SCAN {
            self.staged
                .iter()
                .position(|s| Arc::as_ptr(&s.outbox) as usize == key)
        } else {
            self.index.get(&key).copied()
        };
        let at = match found {
            Some(at) => at,
            None => {
                let frames = self.spare.pop().unwrap_or_default();
                self.staged.push(Staged {
                    outbox: outbox.clone(),
                    frames,
                    count: 0,
                    overflow: Overflow::new(&sub.owner),
                });
                self.index.insert(key, self.staged.len() - 1);
                self.staged.len() - 1
            }
        };
        let staged = &mut self.staged[at];
        staged.count += 1;
        if policy != SlowConsumerPolicy::Disconnect {
            staged.overflow.add(sub.sid, policy);
        }
        &mut staged.frames
    }

    /// Ends the run: hands its deliveries to the subscribers' buffers and
    /// keeps its messages, under the log lock; then wakes the buffers that
    /// went from empty to non-empty.
    pub(crate) fn end_run(&mut self) {
        let Some(mut run) = self.run.take() else {
            return;
        };
        for mut staged in self.staged.drain(..) {
            let bytes = staged.frames.len() as u64;
            let mut pushed = staged.outbox.append(&mut staged.frames);
            if pushed == Pushed::Full {
                let (then, dropped) = overflow_net(
                    &staged.outbox,
                    &mut staged.frames,
                    &staged.overflow,
                    &self.stats,
                );
                pushed = then;
                self.delivered = self.delivered.saturating_sub(dropped);
                if staged.overflow.block && pushed != Pushed::Closed {
                    let blocked = &mut self.blocked.outboxes;
                    if !blocked.iter().any(|(o, _)| Arc::ptr_eq(o, &staged.outbox)) {
                        blocked.push((staged.outbox.clone(), staged.overflow.owner.clone()));
                    }
                }
            }
            match pushed {
                Pushed::First => {
                    self.to_wake.push(staged.outbox.clone());
                    self.bytes_out += bytes;
                }
                Pushed::More => self.bytes_out += bytes,
                Pushed::Full | Pushed::Closed => self.delivered -= staged.count,
            }
            staged.frames.clear();
            self.spare.push(staged.frames);
        }
        self.index.clear();
        for LocalStaged {
            queue,
            mut messages,
            policy,
        } in self.local.drain(..)
        {
            let n = messages.len() as u64;
            let (pushed, dropped) = offer_local(
                &queue,
                &mut messages,
                policy,
                &self.stats,
                &mut self.blocked,
            );
            self.delivered = self.delivered.saturating_sub(dropped);
            match pushed {
                Pushed::First => self.local_to_wake.push(queue),
                Pushed::More => {}
                Pushed::Full | Pushed::Closed => self.delivered -= n,
            }
        }
        self.local_index.clear();
        run.log.end_run();
        drop(run);
        self.paced.clear();
        for outbox in self.to_wake.drain(..) {
            outbox.wake();
        }
        for queue in self.local_to_wake.drain(..) {
            queue.wake();
        }
    }

    /// The buffers this batch filled past their limit under the block
    /// policy, to wait for before reading more.
    pub(crate) fn take_blocked(&mut self) -> Blocked {
        std::mem::take(&mut self.blocked)
    }

    /// Ends the run and publishes the counts.
    pub(crate) fn finish(&mut self) {
        self.end_run();
        self.stats.add_routed(
            self.published,
            self.delivered,
            self.bytes_in,
            self.bytes_out,
        );
        self.published = 0;
        self.delivered = 0;
        self.bytes_in = 0;
        self.bytes_out = 0;
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Hands `messages` to an in-process receiver's queue under `policy`.
/// Returns what became of them and how many were dropped to make room; a
/// queue filled past its limit under block is added to `blocked`.
fn offer_local(
    queue: &Arc<MessageQueue>,
    messages: &mut Vec<Message>,
    policy: SlowConsumerPolicy,
    stats: &Stats,
    blocked: &mut Blocked,
) -> (Pushed, u64) {
    let pushed = match policy {
        SlowConsumerPolicy::Disconnect => queue.push_all(messages),
        SlowConsumerPolicy::DropOldest => {
            let (pushed, dropped) = queue.push_all_dropping_oldest(messages);
            if dropped > 0 {
                stats.slow_dropped.fetch_add(dropped, Ordering::Relaxed);
                tracing::warn!(
                    dropped,
                    "slow in-process receiver: dropped its oldest messages"
                );
            }
            return (pushed, dropped);
        }
        SlowConsumerPolicy::Block => match queue.push_all(messages) {
            Pushed::Full => {
                if !blocked.queues.iter().any(|q| Arc::ptr_eq(q, queue)) {
                    blocked.queues.push(queue.clone());
                }
                queue.push_all_over(messages)
            }
            pushed => pushed,
        },
    };
    if pushed == Pushed::Full {
        tracing::warn!("slow in-process receiver closed: its queue is full");
        queue.close(CloseReason::SlowConsumer);
        stats.slow_consumers.fetch_add(1, Ordering::Relaxed);
    }
    (pushed, 0)
}

/// A full outbox: the subscriptions' policies decide. Returns what became
/// of `frames` and how many messages were dropped to make room.
fn overflow_net(
    outbox: &Outbox,
    frames: &mut BytesMut,
    overflow: &Overflow,
    stats: &Stats,
) -> (Pushed, u64) {
    let owner = &overflow.owner;
    if overflow.block {
        return (outbox.append_over(frames), 0);
    }
    if overflow.shed.is_empty() {
        tracing::warn!(
            conn = owner.conn, peer = %owner.peer, client = ?owner.client,
            pending = outbox.pending_bytes(),
            "slow consumer disconnected: more was pending than limits.max_pending_bytes"
        );
        slow_consumer_net(outbox, stats);
        return (Pushed::Full, 0);
    }
    // Down to three quarters of the limit, so that a consumer that stays
    // behind costs one pass over its buffer per quarter of it, not one per
    // batch.
    let (pushed, dropped, fits) = outbox.append_then(frames, |buf, limit| {
        shed::drop_oldest(buf, limit / 4 * 3, &overflow.shed)
    });
    let dropped = dropped.unwrap_or_default();
    let count: u64 = dropped.iter().map(|d| d.new).sum();
    stats.slow_dropped.fetch_add(count, Ordering::Relaxed);
    for d in &dropped {
        tracing::warn!(
            conn = owner.conn, peer = %owner.peer, client = ?owner.client,
            sid = d.sid, topic = %String::from_utf8_lossy(&d.topic),
            dropped = d.new, missed = d.count, first = d.first, last = d.last,
            "slow consumer: dropped its oldest messages"
        );
    }
    if !fits {
        tracing::warn!(
            conn = owner.conn, peer = %owner.peer, client = ?owner.client,
            "slow consumer disconnected: dropping its drop_oldest subscriptions' messages \
             did not make enough room"
        );
        slow_consumer_net(outbox, stats);
    }
    (pushed, count)
}

fn slow_consumer_net(outbox: &Outbox, stats: &Stats) {
    let frame = Frame::Error(ErrorFrame {
        code: ErrorCode::SlowConsumer,
        reason: "slow consumer: more data was pending for this connection than limits.max_pending_bytes allows".into(),
        retry_after_ms: None,
    })
    .to_bytes();
    outbox.close(CloseReason::SlowConsumer, Some(&frame));
    stats.slow_consumers.fetch_add(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> Router {
        Router::new(
            Arc::new(Stats::default()),
            &kaelix_core::MemoryStreamerConfig::default(),
        )
    }

    fn local(
        router: &Router,
        pattern: &str,
        group: Option<&str>,
    ) -> (Arc<Subscriber>, Arc<MessageQueue>) {
        let queue = Arc::new(MessageQueue::new(1000, 1 << 20));
        let sub = router.subscribe(NewSub {
            pattern: TopicPattern::new(pattern).unwrap(),
            group: group.map(Into::into),
            sid: 0,
            sink: Sink::Local(queue.clone()),
            policy: None,
            owner: Owner::in_process(),
            partitions: None,
            sticky: false,
            credit: None,
            route: false,
        });
        (sub, queue)
    }

    fn publish(router: &Router, cache: &mut RouteCache, topic: &str) {
        let mut batch = Batch::new(Arc::new(Stats::default()));
        let (topic, matches) = cache.resolve(router, topic.as_bytes(), &mut batch).unwrap();
        let message = Message::new(topic.clone(), "x").unwrap();
        batch
            .route(
                router,
                topic,
                matches,
                &Publication::from_message(message),
                Scope::Origin,
            )
            .unwrap();
    }

    #[test]
    fn exact_wildcard_and_tail_match() {
        let router = router();
        let (_, exact) = local(&router, "a.b.c", None);
        let (_, star) = local(&router, "a.*.c", None);
        let (_, tail) = local(&router, "a.>", None);
        let (_, none) = local(&router, "b.>", None);
        let mut cache = RouteCache::new();
        publish(&router, &mut cache, "a.b.c");
        publish(&router, &mut cache, "a.x");
        assert_eq!(
            (exact.len(), star.len(), tail.len(), none.len()),
            (1, 1, 2, 0)
        );
    }

    #[test]
    fn cache_follows_subscription_changes() {
        let router = router();
        let mut cache = RouteCache::new();
        publish(&router, &mut cache, "a.b");
        let (sub, queue) = local(&router, "a.*", None);
        publish(&router, &mut cache, "a.b");
        assert_eq!(queue.len(), 1);
        router.unsubscribe(&sub);
        publish(&router, &mut cache, "a.b");
        assert_eq!(queue.len(), 1);
        assert!(router.all().is_empty());
    }

    #[test]
    fn queue_group_delivers_each_message_once() {
        let router = router();
        let members: Vec<_> = (0..3)
            .map(|_| local(&router, "jobs.>", Some("workers")).1)
            .collect();
        let (_, plain) = local(&router, "jobs.>", None);
        let mut cache = RouteCache::new();
        for _ in 0..30 {
            publish(&router, &mut cache, "jobs.x");
        }
        let counts: Vec<_> = members.iter().map(|q| q.len()).collect();
        assert_eq!(counts, [10, 10, 10]);
        assert_eq!(plain.len(), 30);
    }

    #[test]
    fn invalid_topic_is_refused() {
        let router = router();
        let mut cache = RouteCache::new();
        let mut batch = Batch::new(Arc::new(Stats::default()));
        let err = cache.resolve(&router, b"a..b", &mut batch).err().unwrap();
        assert!(err
            .to_string()
            .starts_with("Topic name contains invalid characters"));
    }

    #[test]
    fn exact_topics_share_one_entry_until_its_last_subscriber_leaves() {
        let router = router();
        let (first, first_queue) = local(&router, "orders.eu", None);
        let (second, second_queue) = local(&router, "orders.eu", None);
        let (_, other) = local(&router, "orders.us", None);
        assert_eq!(router.subs.read().counts(), (2, 0));
        let mut cache = RouteCache::new();
        publish(&router, &mut cache, "orders.eu");
        assert_eq!(
            (first_queue.len(), second_queue.len(), other.len()),
            (1, 1, 0)
        );
        // The entry is found through its first subscription's pattern:
        // removing that one must leave the entry reachable.
        router.unsubscribe(&first);
        publish(&router, &mut cache, "orders.eu");
        assert_eq!((first_queue.len(), second_queue.len()), (1, 2));
        router.unsubscribe(&second);
        router.unsubscribe(&second);
        assert_eq!(router.subs.read().counts(), (1, 0));
        publish(&router, &mut cache, "orders.eu");
        assert_eq!(second_queue.len(), 2);
        publish(&router, &mut cache, "orders.us");
        assert_eq!(other.len(), 1);
    }

    #[test]
    fn removing_wildcards_prunes_the_trie() {
        let router = router();
        let subs: Vec<_> = ["a.*.c", "a.>", "*.b", "a.*.c"]
            .iter()
            .map(|p| local(&router, p, None).0)
            .collect();
        for sub in &subs {
            router.unsubscribe(sub);
        }
        assert!(router.all().is_empty());
    }
}
