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

mod sublist;

use std::cell::OnceCell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use foldhash::HashMap;
use kaelix_core::outbox::{Outbox, Pushed};
use kaelix_core::protocol::encode::deliver_len;
use kaelix_core::protocol::{encode_deliver, ErrorCode, ErrorFrame, Frame, MessageBody};
use kaelix_core::queue::MessageQueue;
use kaelix_core::{CloseReason, Message, Timestamp, Topic, TopicPattern};
use parking_lot::RwLock;

use crate::stats::Stats;
use sublist::Sublist;

/// Where a subscriber's messages go.
pub(crate) enum Sink {
    /// A network connection: MESSAGE frames into its outbox.
    Net(Arc<Outbox>),
    /// An in-process receiver.
    Local(Arc<MessageQueue>),
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
}

impl Subscriber {
    fn is_open(&self) -> bool {
        match &self.sink {
            Sink::Net(outbox) => !outbox.is_closed(),
            Sink::Local(queue) => !queue.is_closed(),
        }
    }
}

/// The subscribers of one topic.
pub(crate) struct Matches {
    plain: Vec<Arc<Subscriber>>,
    groups: Vec<Group>,
}

struct Group {
    members: Vec<Arc<Subscriber>>,
    next: AtomicUsize,
}

impl Matches {
    fn build(subs: Vec<Arc<Subscriber>>) -> Matches {
        let mut plain = Vec::new();
        let mut groups: Vec<(Arc<str>, Vec<Arc<Subscriber>>)> = Vec::new();
        for sub in subs {
            match &sub.group {
                None => plain.push(sub),
                Some(name) => match groups.iter_mut().find(|(n, _)| n == name) {
                    Some((_, members)) => members.push(sub),
                    None => groups.push((name.clone(), vec![sub])),
                },
            }
        }
        Matches {
            plain,
            groups: groups
                .into_iter()
                .map(|(_, mut members)| {
                    // A stable order, so the round robin is fair.
                    members.sort_by_key(|s| s.id);
                    Group {
                        members,
                        next: AtomicUsize::new(0),
                    }
                })
                .collect(),
        }
    }
}

/// The subscription state of a broker.
pub(crate) struct Router {
    subs: RwLock<Sublist>,
    generation: AtomicU64,
    next_id: AtomicU64,
    stats: Arc<Stats>,
}

impl Router {
    pub(crate) fn new(stats: Arc<Stats>) -> Self {
        Router {
            subs: RwLock::new(Sublist::default()),
            generation: AtomicU64::new(0),
            next_id: AtomicU64::new(1),
            stats,
        }
    }

    pub(crate) fn subscribe(
        &self,
        pattern: TopicPattern,
        group: Option<Arc<str>>,
        sid: u32,
        sink: Sink,
    ) -> Arc<Subscriber> {
        let sub = Arc::new(Subscriber {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            sid,
            pattern,
            group,
            sink,
        });
        self.subs.write().insert(sub.clone());
        self.generation.fetch_add(1, Ordering::Release);
        self.stats.subscriptions.fetch_add(1, Ordering::Relaxed);
        sub
    }

    pub(crate) fn unsubscribe(&self, sub: &Subscriber) {
        if self.subs.write().remove(sub) {
            self.generation.fetch_add(1, Ordering::Release);
            self.stats.subscriptions.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Every subscription; for shutdown.
    pub(crate) fn all(&self) -> Vec<Arc<Subscriber>> {
        self.subs.read().all()
    }

    fn lookup(&self, topic: &Topic) -> Arc<Matches> {
        let mut found = Vec::new();
        self.subs.read().matches(topic, &mut found);
        Arc::new(Matches::build(found))
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

/// A publisher's cache of topic → subscribers.
pub(crate) struct RouteCache {
    generation: u64,
    map: HashMap<Topic, Arc<Matches>>,
}

/// Past this many topics, a publisher's cache starts over.
const CACHE_CAP: usize = 4096;

impl RouteCache {
    pub(crate) fn new() -> Self {
        RouteCache {
            generation: u64::MAX,
            map: HashMap::default(),
        }
    }

    /// The subscribers of `topic`, validating the name on a miss. Validated
    /// names stay in the cache, so a hit skips validation too.
    pub(crate) fn resolve(
        &mut self,
        router: &Router,
        topic: &Bytes,
    ) -> kaelix_core::Result<(Topic, Arc<Matches>)> {
        let generation = router.generation();
        if generation != self.generation {
            self.map.clear();
            self.generation = generation;
        }
        if let Some((topic, matches)) = self.map.get_key_value(&topic[..]) {
            return Ok((topic.clone(), matches.clone()));
        }
        let topic = Topic::from_bytes(topic.clone())?;
        let matches = router.lookup(&topic);
        if self.map.len() >= CACHE_CAP {
            self.map.clear();
        }
        self.map.insert(topic.clone(), matches.clone());
        Ok((topic, matches))
    }
}

/// One message being routed: its wire body and its in-process form, each
/// made when first needed and then shared by every subscriber.
pub(crate) struct Publication {
    body: OnceCell<MessageBody>,
    message: OnceCell<Message>,
    timestamp: Timestamp,
}

impl Publication {
    pub(crate) fn from_wire(body: MessageBody, timestamp: Timestamp) -> Self {
        Publication {
            body: OnceCell::from(body),
            message: OnceCell::new(),
            timestamp,
        }
    }

    pub(crate) fn from_message(message: Message) -> Self {
        Publication {
            timestamp: message.timestamp,
            body: OnceCell::new(),
            message: OnceCell::from(message),
        }
    }

    fn body(&self) -> &MessageBody {
        self.body.get_or_init(|| {
            MessageBody::from_message(self.message.get().unwrap_or_else(|| unreachable!()))
        })
    }

    fn message(&self, topic: &Topic) -> Message {
        self.message
            .get_or_init(|| {
                let body = self.body.get().unwrap_or_else(|| unreachable!());
                Message {
                    id: kaelix_core::MessageId::next(),
                    topic: topic.clone(),
                    payload: body.payload().clone(),
                    timestamp: self.timestamp,
                    partition: body.partition(),
                    offset: None,
                    headers: body.headers(),
                }
            })
            .clone()
    }
}

/// The state of routing one batch: buffers to wake and counts to publish.
pub(crate) struct Batch<'a> {
    stats: &'a Stats,
    wake_outboxes: Vec<Arc<Outbox>>,
    wake_queues: Vec<Arc<MessageQueue>>,
    published: u64,
    delivered: u64,
    bytes_in: u64,
}

impl<'a> Batch<'a> {
    pub(crate) fn new(stats: &'a Stats) -> Self {
        Batch {
            stats,
            wake_outboxes: Vec::new(),
            wake_queues: Vec::new(),
            published: 0,
            delivered: 0,
            bytes_in: 0,
        }
    }

    /// Delivers `publication` on `topic` to every plain subscriber and to one
    /// member of each queue group.
    pub(crate) fn route(&mut self, topic: &Topic, matches: &Matches, publication: &Publication) {
        self.published += 1;
        for sub in &matches.plain {
            self.deliver(sub, topic, publication);
        }
        for group in &matches.groups {
            let n = group.members.len();
            let start = group.next.fetch_add(1, Ordering::Relaxed);
            // The first member that takes it; a closed or full one passes it on.
            for i in 0..n {
                if self.deliver(&group.members[(start + i) % n], topic, publication) {
                    break;
                }
            }
        }
    }

    pub(crate) fn add_bytes_in(&mut self, n: usize) {
        self.bytes_in += n as u64;
    }

    fn deliver(&mut self, sub: &Subscriber, topic: &Topic, publication: &Publication) -> bool {
        if !sub.is_open() {
            return false;
        }
        let pushed = match &sub.sink {
            Sink::Net(outbox) => {
                let body = publication.body();
                let pushed = outbox.push(deliver_len(body), |b| encode_deliver(b, sub.sid, body));
                match pushed {
                    Pushed::First => self.wake_outboxes.push(outbox.clone()),
                    Pushed::Full => slow_consumer_net(outbox, self.stats),
                    Pushed::More | Pushed::Closed => {}
                }
                pushed
            }
            Sink::Local(queue) => {
                let pushed = queue.push(publication.message(topic));
                match pushed {
                    Pushed::First => self.wake_queues.push(queue.clone()),
                    Pushed::Full => {
                        queue.close(CloseReason::SlowConsumer);
                        self.stats.slow_consumers.fetch_add(1, Ordering::Relaxed);
                    }
                    Pushed::More | Pushed::Closed => {}
                }
                pushed
            }
        };
        let ok = matches!(pushed, Pushed::First | Pushed::More);
        self.delivered += u64::from(ok);
        ok
    }

    /// Wakes every buffer this batch filled and publishes the counts.
    pub(crate) fn finish(&mut self) {
        for outbox in self.wake_outboxes.drain(..) {
            outbox.wake();
        }
        for queue in self.wake_queues.drain(..) {
            queue.wake();
        }
        self.stats
            .add_routed(self.published, self.delivered, self.bytes_in);
        self.published = 0;
        self.delivered = 0;
        self.bytes_in = 0;
    }
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        self.finish();
    }
}

fn slow_consumer_net(outbox: &Outbox, stats: &Stats) {
    let frame = Frame::Error(ErrorFrame {
        code: ErrorCode::SlowConsumer,
        reason: "slow consumer: more data was pending for this connection than limits.max_pending_bytes allows".into(),
    })
    .to_bytes();
    outbox.close(CloseReason::SlowConsumer, Some(&frame));
    stats.slow_consumers.fetch_add(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> Router {
        Router::new(Arc::new(Stats::default()))
    }

    fn local(
        router: &Router,
        pattern: &str,
        group: Option<&str>,
    ) -> (Arc<Subscriber>, Arc<MessageQueue>) {
        let queue = Arc::new(MessageQueue::new(1000, 1 << 20));
        let sub = router.subscribe(
            TopicPattern::new(pattern).unwrap(),
            group.map(Into::into),
            0,
            Sink::Local(queue.clone()),
        );
        (sub, queue)
    }

    fn publish(router: &Router, cache: &mut RouteCache, topic: &str) {
        let stats = Stats::default();
        let mut batch = Batch::new(&stats);
        let (topic, matches) = cache
            .resolve(router, &Bytes::copy_from_slice(topic.as_bytes()))
            .unwrap();
        let message = Message::new(topic.clone(), "x").unwrap();
        batch.route(&topic, &matches, &Publication::from_message(message));
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
        let err = cache
            .resolve(&router, &Bytes::from_static(b"a..b"))
            .err()
            .unwrap();
        assert!(err
            .to_string()
            .starts_with("Topic name contains invalid characters"));
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
