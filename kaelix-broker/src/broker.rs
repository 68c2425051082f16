//! The in-process broker API. Network connections route through the same
//! [`Router`], so what in-process code sees is what clients get.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use kaelix_core::queue::{MessageQueue, QueueReceiver};
use kaelix_core::runtime::Handle;
use kaelix_core::topic::check_group;
use kaelix_core::{
    CloseReason, Error, Gap, MemoryStreamerConfig, Message, MessageBatch, PartitionId, Result,
    StartPosition, SubscribeOptions, Topic, TopicPattern,
};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::live::{LiveConfig, LiveLimits};
use crate::router::{
    Batch, Blocked, NewSub, Owner, PartitionSet, Publication, RouteCache, Router, Scope, Sink,
    Subscriber,
};
use crate::stats::{BrokerStats, RuntimeStats, Stats};
use crate::telemetry::{Endpoint, Metrics};
use kaelix_core::config::HotReloadManager;
use kaelix_core::plugin::{PluginHandle, StreamPlugin};

/// A broker: subscriptions, routing and counters. Cheap to clone; clones
/// share one broker.
///
/// ```
/// use bytes::Bytes;
/// use kaelix_broker::MessageBroker;
/// use kaelix_core::{Message, Topic};
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let broker = MessageBroker::new();
/// broker.start().await?;
/// let topic = Topic::new("events.notifications")?;
/// let mut receiver = broker.subscribe(&topic).await?;
/// broker.publish(&topic, Message::new(topic.clone(), Bytes::from("Hello, World!"))?).await?;
/// assert_eq!(receiver.recv().await?.payload, "Hello, World!");
/// println!("Broker stats: {}", broker.stats());
/// broker.shutdown().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct MessageBroker {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    /// Unique per broker in this process; keys the thread-local route cache.
    id: u64,
    /// The running configuration and its live parts.
    pub(crate) live: LiveConfig,
    pub(crate) router: Router,
    pub(crate) stats: Arc<Stats>,
    running: AtomicBool,
    /// Cancelled by `shutdown`; every connection and listener watches it.
    pub(crate) shutdown: CancellationToken,
    /// Cancelled by `drain`: listeners stop taking connections, and every
    /// connection tells its client to move on.
    pub(crate) draining: CancellationToken,
    /// Every connection task, so that shutdown can wait for them.
    pub(crate) tasks: TaskTracker,
    /// The runtime connections run on; without one they run on tokio.
    pub(crate) runtime: OnceLock<Handle>,
    /// When the broker was made, for its uptime.
    pub(crate) started: std::time::Instant,
    /// The id of the next network connection, for the logs.
    pub(crate) next_conn: AtomicU64,
    /// Its metrics recorder and latency histogram.
    pub(crate) metrics: Metrics,
    /// The metrics endpoint, while one is serving.
    pub(crate) endpoint: parking_lot::Mutex<Option<Endpoint>>,
    /// The configuration file watcher, once [`MessageBroker::watch_config`] ran.
    pub(crate) reloader: OnceLock<std::sync::Weak<HotReloadManager>>,
    /// The TLS acceptor for new connections, when TLS is on.
    pub(crate) tls: crate::tls::TlsState,
    /// Who may connect, and what each identity may do.
    pub(crate) auth: crate::auth::Auth,
    /// The plugin registry and the `[[plugins]]` entries in force.
    pub(crate) plugins: crate::plugins::Plugins,
    /// What each publisher had routed, to recognise its retries.
    pub(crate) dedupe: crate::dedupe::Dedupe,
    /// This broker's cluster node, once it joined one.
    pub(crate) cluster: OnceLock<Arc<kaelix_cluster::Node>>,
    /// The topics the cluster defines, as it last applied them.
    pub(crate) cluster_topics:
        parking_lot::RwLock<std::collections::BTreeMap<String, kaelix_cluster::TopicDef>>,
}

impl Default for MessageBroker {
    fn default() -> Self {
        Self::new()
    }
}

impl Inner {
    /// Builds the chains of `config`'s `[[plugins]]` and puts them in
    /// force; plugins no longer named are shut down. On an error nothing
    /// changes.
    pub(crate) fn put_plugins_in_force(
        &self,
        config: &MemoryStreamerConfig,
    ) -> std::result::Result<(), String> {
        let (chains, retired) = self.plugins.build(config)?;
        let names: Vec<&str> = chains.handles().map(PluginHandle::name).collect();
        if !names.is_empty() || !retired.is_empty() {
            tracing::info!(plugins = %names.join(", "), "plugins in force");
        }
        self.router.set_chains(chains);
        crate::plugins::Plugins::retire(retired);
        Ok(())
    }
}

impl MessageBroker {
    /// A broker with the default configuration, not yet started.
    pub fn new() -> Self {
        Self::with_config(MemoryStreamerConfig::default())
    }

    /// A broker with `config`, not yet started.
    pub fn with_config(config: MemoryStreamerConfig) -> Self {
        let stats = Arc::new(Stats::default());
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let broker = MessageBroker {
            inner: Arc::new(Inner {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                router: Router::new(stats.clone(), &config),
                stats,
                live: LiveConfig::new(config.clone()),
                running: AtomicBool::new(false),
                shutdown: CancellationToken::new(),
                draining: CancellationToken::new(),
                tasks: TaskTracker::new(),
                runtime: OnceLock::new(),
                started: std::time::Instant::now(),
                next_conn: AtomicU64::new(1),
                metrics: Metrics::new(&config),
                endpoint: parking_lot::Mutex::new(None),
                reloader: OnceLock::new(),
                tls: crate::tls::TlsState::default(),
                auth: crate::auth::Auth::new(&config.security.auth),
                plugins: crate::plugins::Plugins::new(),
                dedupe: crate::dedupe::Dedupe::new(),
                cluster: OnceLock::new(),
                cluster_topics: Default::default(),
            }),
        };
        let inner = Arc::downgrade(&broker.inner);
        broker.on_reconfigure("plugins", &["plugins", "dead_letter"], move |config| {
            match inner.upgrade() {
                // Before start, start builds the chains from this config.
                Some(inner) if inner.running.load(Ordering::Acquire) => {
                    inner.put_plugins_in_force(config)
                }
                _ => Ok(()),
            }
        });
        let inner = Arc::downgrade(&broker.inner);
        broker.on_reconfigure("auth", &["security.auth"], move |config| {
            match inner.upgrade() {
                Some(inner) => inner.auth.apply(&config.security.auth),
                None => Ok(()),
            }
        });
        let inner = Arc::downgrade(&broker.inner);
        broker.on_reconfigure("tls", &["security.tls"], move |config| {
            let Some(inner) = inner.upgrade() else {
                return Ok(());
            };
            let tls = &config.security.tls;
            inner.tls.apply(tls, "configuration reloaded")?;
            inner.tls.watch(tls, Arc::downgrade(&inner));
            Ok(())
        });
        let inner = Arc::downgrade(&broker.inner);
        broker.on_reconfigure("retention", &["retention", "topics"], move |config| {
            if let Some(inner) = inner.upgrade() {
                // The cluster's topic definitions stay over the file's.
                let config = crate::cluster::with_cluster_topics(&inner, config);
                inner.router.reconfigure_logs(&config);
            }
            Ok(())
        });
        let inner = Arc::downgrade(&broker.inner);
        broker.on_reconfigure(
            "metrics",
            &["telemetry.enabled", "telemetry.metrics.enabled"],
            move |config| {
                if let Some(inner) = inner.upgrade() {
                    inner.metrics.set_enabled(config);
                }
                Ok(())
            },
        );
        broker
    }

    /// The running configuration: what the broker was made with, plus
    /// what [`reconfigure`](Self::reconfigure) has applied since.
    pub fn config(&self) -> Arc<MemoryStreamerConfig> {
        self.inner.live.running()
    }

    /// Runs the broker's network work (listeners, connections) on
    /// `runtime` from now on: connection I/O and routing at High priority,
    /// accepting at Critical. Without it, a [`Server`](crate::Server) spawns
    /// on the tokio runtime it is run on. Only the first call counts; it
    /// returns false for any later one.
    pub fn use_runtime(&self, runtime: Handle) -> bool {
        self.inner.runtime.set(runtime).is_ok()
    }

    /// The runtime given to [`use_runtime`](Self::use_runtime), if any.
    pub fn runtime(&self) -> Option<&Handle> {
        self.inner.runtime.get()
    }

    /// Starts accepting publishes. A broker that was shut down stays down.
    pub async fn start(&self) -> Result<()> {
        if self.inner.shutdown.is_cancelled() {
            return Err(Error::BrokerNotRunning);
        }
        if !self.inner.running.load(Ordering::Acquire) {
            self.inner
                .put_plugins_in_force(&self.config())
                .map_err(|e| kaelix_core::config::ConfigError::Invalid(vec![e]))?;
        }
        if !self.inner.running.swap(true, Ordering::AcqRel) {
            self.spawn_housekeeping();
        }
        Ok(())
    }

    /// Registers `plugin` under `name`: a `[[plugins]]` entry with that
    /// name puts it in the path of its topics. Register before
    /// [`start`](Self::start) (or before the reload that names it).
    pub fn register_plugin<P: StreamPlugin + 'static>(
        &self,
        name: &str,
        plugin: Box<P>,
    ) -> Result<()> {
        self.inner.plugins.registry().register(name, plugin)
    }

    /// Registers a factory under `kind`: each `[[plugins]]` entry naming
    /// it gets its own instance, initialized with the entry's `config`.
    pub fn register_plugin_factory<F>(&self, kind: &str, factory: F) -> Result<()>
    where
        F: Fn() -> Box<dyn StreamPlugin> + Send + Sync + 'static,
    {
        self.inner
            .plugins
            .registry()
            .register_factory(kind, factory)
    }

    /// The plugins in the message path now, each with its guard's counters
    /// and state.
    pub fn plugins(&self) -> Vec<PluginHandle> {
        self.inner.router.chains().handles().cloned().collect()
    }

    /// Once a second until shutdown: retained messages past their age go,
    /// and topic logs that keep nothing and are not in use.
    fn spawn_housekeeping(&self) {
        let inner = Arc::downgrade(&self.inner);
        let shutdown = self.inner.shutdown.clone();
        let task = async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let Some(inner) = inner.upgrade() else { return };
                inner.router.logs.expire_all();
            }
        };
        if let Err(err) = crate::exec::spawn(
            self.inner.runtime.get(),
            kaelix_core::runtime::TaskPriority::Background,
            task,
        ) {
            tracing::warn!(error = %err, "retention housekeeping not started");
        }
    }

    /// What the broker holds of `topic`'s first partition (of all of it,
    /// for a topic with one partition): offsets and retained messages;
    /// `None` if nothing was published to it (or its log was dropped).
    pub fn topic_info(&self, topic: &Topic) -> Option<TopicInfo> {
        self.partition_info(topic, PartitionId::new(0))
    }

    /// What the broker holds of one partition of `topic`; `None` if
    /// nothing was published to the topic or it has no such partition.
    pub fn partition_info(&self, topic: &Topic, partition: PartitionId) -> Option<TopicInfo> {
        let log = self.inner.router.logs.get(topic)?;
        let state = log.parts.get(partition.get() as usize)?.lock();
        let (messages, bytes) = state.usage();
        Some(TopicInfo {
            partitions: log.partitions(),
            first_offset: state.first_kept(),
            next_offset: state.next,
            retained_messages: messages,
            retained_bytes: bytes,
        })
    }

    /// True between `start` and `shutdown`.
    pub fn is_running(&self) -> bool {
        self.inner.running.load(Ordering::Acquire)
    }

    /// Subscribes to a topic or pattern (`&Topic`, `&TopicPattern` or `&str`).
    pub async fn subscribe(&self, pattern: impl IntoPattern) -> Result<Receiver> {
        self.subscribe_start(pattern.into_pattern()?, SubscribeOptions::new())
    }

    /// Subscribes as a member of queue group `group`: each message matching
    /// `pattern` goes to exactly one member of the group.
    pub async fn subscribe_queue(
        &self,
        pattern: impl IntoPattern,
        group: &str,
    ) -> Result<Receiver> {
        check_group(group)?;
        let options = SubscribeOptions::new().queue_group(group);
        self.subscribe_start(pattern.into_pattern()?, options)
    }

    /// Subscribes starting at `start`: what the matching topics still hold
    /// from there is received first, in offset order per topic, then live
    /// messages, with no gap and no duplicate between the two. Every
    /// message carries its offset. [`Receiver::missed`] tells how many
    /// asked-for messages the broker no longer held.
    ///
    /// ```
    /// use kaelix_broker::MessageBroker;
    /// use kaelix_core::{Message, StartPosition, Topic};
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let broker = MessageBroker::new();
    /// broker.start().await?;
    /// let topic = Topic::new("prices.eurusd")?;
    /// for price in ["1.0841", "1.0842"] {
    ///     broker.publish(&topic, Message::new(topic.clone(), price)?).await?;
    /// }
    /// // A late subscriber catches up from what the broker holds.
    /// let mut receiver = broker.subscribe_from(&topic, StartPosition::Earliest).await?;
    /// let first = receiver.recv().await?;
    /// assert_eq!(first.payload, "1.0841");
    /// assert_eq!(first.offset.map(|o| o.get()), Some(0));
    /// # Ok(()) }
    /// ```
    pub async fn subscribe_from(
        &self,
        pattern: impl IntoPattern,
        start: StartPosition,
    ) -> Result<Receiver> {
        self.subscribe_start(
            pattern.into_pattern()?,
            SubscribeOptions::new().start(start),
        )
    }

    /// Subscribes with `options`: a start position, a queue group, this
    /// subscription's own slow-consumer policy (over the topics'
    /// `[[topics]] slow_consumer`), the partitions to take, or a
    /// partition-sticky queue group. A queue group starts at the latest
    /// message: asking for both is an error.
    pub async fn subscribe_with(
        &self,
        pattern: impl IntoPattern,
        options: SubscribeOptions,
    ) -> Result<Receiver> {
        let pattern = pattern.into_pattern()?;
        options.check()?;
        self.subscribe_start(pattern, options)
    }

    fn subscribe_start(
        &self,
        pattern: TopicPattern,
        options: SubscribeOptions,
    ) -> Result<Receiver> {
        if options.credit.is_some() {
            return Err(Error::InvalidCredit(
                "a credit window paces a network subscription; an in-process receiver \
                 holds up to limits.max_pending_messages"
                    .into(),
            ));
        }
        if self.inner.shutdown.is_cancelled() {
            return Err(Error::BrokerNotRunning);
        }
        let limits = &self.inner.live.limits;
        let queue = Arc::new(MessageQueue::new(
            LiveLimits::get(&limits.max_pending_messages),
            LiveLimits::get(&limits.max_pending_bytes),
        ));
        let numbers: Vec<u32> = options.partitions.iter().map(|p| p.get()).collect();
        let partitions = PartitionSet::of(&numbers)
            .map_err(|p| Error::InvalidPartition(PartitionId::beyond_max(p)))?;
        let new = NewSub {
            pattern,
            group: options.queue_group.as_deref().map(Arc::from),
            sid: 0,
            sink: Sink::Local(queue.clone()),
            policy: options.slow_consumer,
            owner: Owner::in_process(),
            partitions,
            sticky: options.sticky_partitions,
            credit: None,
            route: false,
        };
        let (sub, missed) = match options.start {
            StartPosition::Latest => (self.inner.router.subscribe(new), 0),
            start => {
                let starts = crate::router::Starts::all(start);
                self.inner.router.subscribe_from(new, &starts, None)
            }
        };
        Ok(Receiver {
            rx: QueueReceiver::new(queue),
            sub,
            broker: self.inner.clone(),
            missed,
        })
    }

    /// Publishes `message` on `topic` (which replaces the message's own topic
    /// if they differ). Returns once every subscriber has it queued.
    pub async fn publish(&self, topic: &Topic, mut message: Message) -> Result<()> {
        self.check_running()?;
        if message.topic != *topic {
            message.topic = topic.clone();
        }
        self.check_size(&message)?;
        self.check_partition(&message)?;
        let blocked = self.route(std::iter::once(message))?;
        self.wait_for(blocked).await;
        Ok(())
    }

    /// Publishes every message of `batch` on its own topic, waking each
    /// subscriber once for the whole batch.
    pub async fn publish_batch(&self, batch: MessageBatch) -> Result<()> {
        self.check_running()?;
        // All or nothing: a batch with a message over the limit routes none.
        for message in batch.iter() {
            self.check_size(message)?;
            self.check_partition(message)?;
        }
        let blocked = self.route(batch)?;
        self.wait_for(blocked).await;
        Ok(())
    }

    /// `limits.max_payload_bytes` applies in process as on the wire: the
    /// payload and the headers as the protocol carries them.
    fn check_size(&self, message: &Message) -> Result<()> {
        let max = LiveLimits::get(&self.inner.live.limits.max_payload_bytes);
        let headers = &message.headers;
        let size = message.payload.len()
            + if headers.is_empty() {
                0
            } else {
                // A count, then a length-prefixed name and value each.
                2 + headers.size_bytes() + 3 * headers.len()
            };
        if size > max {
            return Err(Error::PayloadTooLarge { size, max });
        }
        Ok(())
    }

    /// A message that names a partition its topic does not have is refused.
    fn check_partition(&self, message: &Message) -> Result<()> {
        match message.partition {
            Some(p) => self
                .inner
                .router
                .check_partition(&message.topic, p)
                .map_err(|refused| Error::InvalidPartition(refused.0)),
            None => Ok(()),
        }
    }

    /// Under the block policy: returns once the subscribers this publish
    /// filled past their limit have caught up (or were disconnected after
    /// `limits.slow_consumer_block_ms`).
    async fn wait_for(&self, blocked: Blocked) {
        if blocked.is_empty() {
            return;
        }
        let wait = LiveLimits::get(&self.inner.live.limits.slow_consumer_block_ms);
        let limit = (wait > 0).then(|| std::time::Duration::from_millis(wait as u64));
        blocked.wait(limit, &self.inner.stats).await;
    }

    /// Routes on the calling thread, with that thread's route cache, so
    /// that in-process publishers share no lock on a cache hit.
    fn route(&self, messages: impl IntoIterator<Item = Message>) -> Result<Blocked> {
        thread_local! {
            static CACHE: RefCell<Option<(u64, RouteCache)>> = const { RefCell::new(None) };
        }
        CACHE.with(|slot| {
            let mut slot = slot.borrow_mut();
            if slot.as_ref().map(|(id, _)| *id) != Some(self.inner.id) {
                *slot = Some((self.inner.id, RouteCache::new()));
            }
            let Some((_, cache)) = slot.as_mut() else {
                unreachable!("set just above")
            };
            let router = &self.inner.router;
            let mut batch = Batch::new(self.inner.stats.clone());
            let mut refused = None;
            for message in messages {
                let (topic, matches) =
                    cache.resolve(router, message.topic.as_bytes(), &mut batch)?;
                let Some(chain) = matches.chain().cloned() else {
                    let publication = Publication::from_message(message);
                    if let Err(refused) =
                        batch.route(router, topic, matches, &publication, Scope::Origin)
                    {
                        return Err(Error::InvalidPartition(refused.0));
                    }
                    continue;
                };
                let topic = topic.clone();
                let (deliver, refusal) = crate::plugins::run_one(&chain, &topic, message);
                for message in deliver {
                    let (topic, matches) =
                        cache.resolve(router, message.topic.as_bytes(), &mut batch)?;
                    let publication = Publication::from_message(message);
                    if let Err(refused) =
                        batch.route(router, topic, matches, &publication, Scope::Origin)
                    {
                        return Err(Error::InvalidPartition(refused.0));
                    }
                }
                if let Some((code, reason)) = refusal {
                    self.inner.stats.publish_refused(code);
                    refused.get_or_insert(Error::Refused { code, reason });
                }
            }
            batch.finish();
            match refused {
                // What was not refused is routed; the first refusal is the answer.
                Some(err) => Err(err),
                None => Ok(batch.take_blocked()),
            }
        })
    }

    fn check_running(&self) -> Result<()> {
        if self.is_running() {
            Ok(())
        } else {
            Err(Error::BrokerNotRunning)
        }
    }

    /// The broker's counters now.
    pub fn stats(&self) -> BrokerStats {
        let mut stats = self.inner.stats.snapshot();
        let (topics, wildcards) = self.inner.router.counts();
        stats.topics = topics as u64;
        stats.wildcard_subscriptions = wildcards as u64;
        stats.retained_bytes = self.inner.router.logs.kept_bytes() as u64;
        stats.topic_logs = self.inner.router.logs.len() as u64;
        stats.uptime = self.inner.started.elapsed();
        if let Some(runtime) = self.inner.runtime.get() {
            let metrics = runtime.metrics();
            stats.runtime = Some(RuntimeStats {
                workers: metrics.workers.len(),
                placement: metrics.placement_summary(),
                health: runtime.health().status(),
            });
        }
        stats
    }

    /// Drains the broker before a shutdown: it takes no new connections,
    /// sends every connected client a drain notice (clients given other
    /// brokers move to one), and keeps serving those that stay, until no
    /// network connection is left or `timeout` passes. Returns how many
    /// connections were still open. Call [`shutdown`](Self::shutdown)
    /// after it.
    pub async fn drain(&self, timeout: std::time::Duration) -> u64 {
        self.inner.draining.cancel();
        let open = || self.stats().connections_active;
        tracing::info!(
            connections = open(),
            timeout_ms = timeout.as_millis() as u64,
            "draining: no new connections, clients told to move on"
        );
        let deadline = tokio::time::Instant::now() + timeout;
        while open() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let left = open();
        tracing::info!(connections = left, "drained");
        left
    }

    /// Whether [`drain`](Self::drain) has begun.
    pub fn is_draining(&self) -> bool {
        self.inner.draining.is_cancelled()
    }

    /// Stops the broker: no more publishes, listeners stop accepting, network
    /// connections flush what is queued for them (within
    /// `network.shutdown_grace_ms`) and close, and in-process receivers get
    /// what is queued and then a `ShuttingDown` close.
    pub async fn shutdown(&self) -> Result<()> {
        self.inner.running.store(false, Ordering::Release);
        self.inner.shutdown.cancel();
        self.inner.tasks.close();
        let grace = std::time::Duration::from_millis(self.config().network.shutdown_grace_ms);
        // Each connection bounds its own flush by the grace period; this
        // bound is a second line against a task that does not finish.
        let _ = tokio::time::timeout(grace * 2, self.inner.tasks.wait()).await;
        // The endpoint answered 503 while connections drained; now it goes.
        self.inner.endpoint.lock().take();
        self.inner.router.set_chains(Default::default());
        self.inner.plugins.shutdown();
        if let Some(node) = self.inner.cluster.get() {
            node.shutdown().await;
        }
        for sub in self.inner.router.all() {
            if let Sink::Local(queue) = &sub.sink {
                queue.close(CloseReason::ShuttingDown);
            }
        }
        Ok(())
    }
}

/// What the broker holds of one topic partition; see
/// [`MessageBroker::partition_info`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicInfo {
    /// The topic's partitions.
    pub partitions: u32,
    /// The oldest offset still retained (`next_offset` when none is).
    pub first_offset: u64,
    /// The offset the next message will get.
    pub next_offset: u64,
    /// Messages retained.
    pub retained_messages: usize,
    /// Their body bytes.
    pub retained_bytes: usize,
}

/// Receives the messages of one in-process subscription. Dropping it
/// unsubscribes.
pub struct Receiver {
    rx: QueueReceiver,
    sub: Arc<Subscriber>,
    broker: Arc<Inner>,
    missed: u64,
}

impl Receiver {
    /// How many messages this receiver will not get: those its start
    /// position asked for that the broker no longer held, and those
    /// dropped because it fell behind under the `drop_oldest` policy.
    pub fn missed(&self) -> u64 {
        self.missed + self.rx.queue().dropped()
    }

    /// Where the messages dropped since the last call were (topic and
    /// offsets), oldest first; they can be read again with a subscription
    /// starting at a gap's first offset while the topic retains them.
    pub fn take_gaps(&self) -> Vec<Gap> {
        self.rx.queue().take_gaps()
    }

    /// The next message. After the subscription ends (the broker shut down,
    /// or this receiver fell behind by more than `limits.max_pending_messages`)
    /// it returns [`Error::Closed`] with the reason, once what was queued has
    /// been received.
    pub async fn recv(&mut self) -> Result<Message> {
        self.rx.recv().await.map_err(Error::Closed)
    }

    /// The next message if one is queued now.
    pub fn try_recv(&mut self) -> Option<Message> {
        self.rx.try_recv()
    }

    /// The pattern this receiver subscribed to.
    pub fn pattern(&self) -> &TopicPattern {
        &self.sub.pattern
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.broker.router.unsubscribe(&self.sub);
    }
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("pattern", &self.sub.pattern)
            .finish_non_exhaustive()
    }
}

/// What [`MessageBroker::subscribe`] accepts: a topic, a pattern or a string.
pub trait IntoPattern {
    fn into_pattern(self) -> Result<TopicPattern>;
}

impl IntoPattern for &Topic {
    fn into_pattern(self) -> Result<TopicPattern> {
        Ok(self.into())
    }
}

impl IntoPattern for Topic {
    fn into_pattern(self) -> Result<TopicPattern> {
        Ok(self.into())
    }
}

impl IntoPattern for &TopicPattern {
    fn into_pattern(self) -> Result<TopicPattern> {
        Ok(self.clone())
    }
}

impl IntoPattern for TopicPattern {
    fn into_pattern(self) -> Result<TopicPattern> {
        Ok(self)
    }
}

impl IntoPattern for &str {
    fn into_pattern(self) -> Result<TopicPattern> {
        TopicPattern::new(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[tokio::test]
    async fn publish_before_start_fails() {
        let broker = MessageBroker::new();
        let topic = Topic::new("a").unwrap();
        let err = broker
            .publish(&topic, Message::new(topic.clone(), "x").unwrap())
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "Broker is not running");
    }

    #[tokio::test]
    async fn pub_sub_wildcards_groups_and_order() {
        let broker = MessageBroker::new();
        broker.start().await.unwrap();
        let topic = Topic::new("test.topic").unwrap();
        let mut exact = broker.subscribe(&topic).await.unwrap();
        let mut wild = broker.subscribe("test.*").await.unwrap();
        let mut g1 = broker.subscribe_queue("test.>", "g").await.unwrap();
        let mut g2 = broker.subscribe_queue("test.>", "g").await.unwrap();
        for i in 0..100 {
            let m = Message::new(topic.clone(), Bytes::from(format!("{i}"))).unwrap();
            broker.publish(&topic, m).await.unwrap();
        }
        for i in 0..100 {
            assert_eq!(exact.recv().await.unwrap().payload, format!("{i}"));
            assert_eq!(wild.recv().await.unwrap().payload, format!("{i}"));
        }
        let mut got = 0;
        while g1.try_recv().is_some() {
            got += 1;
        }
        while g2.try_recv().is_some() {
            got += 1;
        }
        assert_eq!(got, 100);
        let stats = broker.stats();
        assert_eq!(stats.messages_published, 100);
        assert_eq!(stats.messages_delivered, 300);
        assert_eq!(stats.subscriptions, 4);
        drop(g1);
        assert_eq!(broker.stats().subscriptions, 3);
        broker.shutdown().await.unwrap();
        assert!(matches!(
            exact.recv().await,
            Err(Error::Closed(CloseReason::ShuttingDown))
        ));
    }

    #[tokio::test]
    async fn in_process_publishes_keep_to_the_payload_limit() {
        let mut config = MemoryStreamerConfig::default();
        config.limits.max_payload_bytes = 16;
        let broker = MessageBroker::with_config(config);
        broker.start().await.unwrap();
        let topic = Topic::new("sized").unwrap();
        let mut receiver = broker.subscribe(&topic).await.unwrap();
        let big = Message::new(topic.clone(), vec![0u8; 17]).unwrap();
        let err = broker.publish(&topic, big.clone()).await.unwrap_err();
        assert!(
            matches!(err, Error::PayloadTooLarge { size: 17, max: 16 }),
            "{err}"
        );
        let mut with_header = Message::new(topic.clone(), vec![0u8; 10]).unwrap();
        with_header.set_header("k", "v");
        // 10 + 2 (count) + 1 + 1 + 2 + 1 = 17
        assert!(broker.publish(&topic, with_header).await.is_err());
        let ok = Message::new(topic.clone(), vec![0u8; 16]).unwrap();
        let batch = MessageBatch::new(vec![ok.clone(), big]);
        assert!(broker.publish_batch(batch).await.is_err());
        assert!(
            receiver.try_recv().is_none(),
            "a refused batch routes nothing"
        );
        broker.publish(&topic, ok).await.unwrap();
        assert_eq!(receiver.recv().await.unwrap().payload.len(), 16);
    }

    #[tokio::test]
    async fn a_slow_receiver_is_closed_not_the_publisher() {
        let mut config = MemoryStreamerConfig::default();
        config.limits.max_pending_messages = 10;
        let broker = MessageBroker::with_config(config);
        broker.start().await.unwrap();
        let topic = Topic::new("t").unwrap();
        let mut slow = broker.subscribe(&topic).await.unwrap();
        for _ in 0..20 {
            broker
                .publish(&topic, Message::new(topic.clone(), "x").unwrap())
                .await
                .unwrap();
        }
        for _ in 0..10 {
            slow.recv().await.unwrap();
        }
        assert!(matches!(
            slow.recv().await,
            Err(Error::Closed(CloseReason::SlowConsumer))
        ));
        assert_eq!(broker.stats().slow_consumers, 1);
    }
}
