//! The configuration sections. Every struct refuses unknown keys, so a typo
//! is an error that names the key instead of a setting silently ignored.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The whole configuration of a broker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryStreamerConfig {
    pub network: NetworkConfig,
    pub runtime: RuntimeSection,
    pub limits: LimitsConfig,
    pub telemetry: TelemetryConfig,
    pub security: SecurityConfig,
    pub retention: RetentionConfig,
    /// How the broker recognises publishes a reconnecting publisher sent
    /// again.
    pub dedupe: DedupeConfig,
    /// Per-topic settings, matched by pattern (the most specific wins).
    pub topics: Vec<TopicConfig>,
    /// Plugins in the publish path, each on the topics its pattern matches.
    pub plugins: Vec<PluginConfig>,
    /// Where messages that plugins dead-letter go.
    pub dead_letter: DeadLetterConfig,
    /// Brokers that form one cluster.
    pub cluster: ClusterConfig,
}

/// `[network]`: where and how the broker listens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// Address to listen on.
    pub host: String,
    /// TCP port; 0 picks a free one (the broker prints which).
    pub port: u16,
    /// Connections served at once; more are refused with an error frame.
    pub max_connections: usize,
    /// How long a new connection has to send its HELLO.
    pub handshake_timeout_ms: u64,
    /// On shutdown, how long connections get to flush what is queued.
    pub shutdown_grace_ms: u64,
    /// On SIGTERM, how long the broker drains first: it takes no new
    /// connections, tells connected clients to move on, and keeps serving
    /// those that stay until they leave or this passes; 0 shuts down at
    /// once.
    pub drain_timeout_ms: u64,
    /// Bytes read from a socket per call.
    pub read_buffer_bytes: usize,
    /// How long a client refused for load (a connection limit, handshake
    /// admission, a busy runtime) is asked to wait before it comes back
    /// (ms); 0 sends no hint.
    pub retry_after_ms: u32,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            host: "0.0.0.0".into(),
            port: 8080,
            max_connections: 10_000,
            handshake_timeout_ms: 5_000,
            shutdown_grace_ms: 3_000,
            drain_timeout_ms: 2_000,
            read_buffer_bytes: 64 * 1024,
            retry_after_ms: 1_000,
        }
    }
}

/// `[runtime]`: the workers the broker runs on; see [`RuntimeConfig`].
pub type RuntimeSection = crate::runtime::RuntimeConfig;

/// `[limits]`: what one client may take from the broker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest frame accepted, header included; larger ones close the
    /// connection. Negotiated when a connection opens: a reload applies it
    /// to new connections.
    pub max_frame_bytes: usize,
    /// Largest message body (payload and headers) a publish may carry;
    /// larger ones are refused and the connection stays.
    pub max_payload_bytes: usize,
    /// Bytes queued for one connection before it counts as a slow consumer
    /// and its topics' `slow_consumer` policy applies.
    pub max_pending_bytes: usize,
    /// Subscriptions one connection may hold.
    pub max_subscriptions_per_connection: usize,
    /// Messages an in-process receiver may hold before it counts as slow.
    pub max_pending_messages: usize,
    /// Under the `block` policy, how long a publisher waits for a slow
    /// subscriber to make room before that subscriber is disconnected;
    /// 0 waits for as long as it takes.
    pub slow_consumer_block_ms: u64,
    /// Connections one client IP address may hold at once; 0 for no limit.
    pub max_connections_per_address: usize,
    /// Connections still in their handshake (TLS and HELLO) at once; more
    /// are refused as they arrive, so a flood of handshakes cannot starve
    /// the clients already connected.
    pub max_pending_handshakes: usize,
    /// Messages per second one connection may publish; 0 for no limit.
    /// Past it the broker stops reading the connection until its rate is
    /// back under the limit, and TCP pushes back on the publisher.
    pub max_publish_messages_per_sec: u64,
    /// Message bytes per second one connection may publish; 0 for no limit.
    pub max_publish_bytes_per_sec: u64,
    /// A connection the broker has heard nothing from for half of this is
    /// sent a PING; hearing nothing for all of it, the broker closes the
    /// connection (idle-timeout). 0 never does.
    pub idle_timeout_ms: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_frame_bytes: crate::protocol::DEFAULT_MAX_FRAME_BYTES,
            max_payload_bytes: 1024 * 1024,
            max_pending_bytes: 64 * 1024 * 1024,
            max_subscriptions_per_connection: 10_000,
            max_pending_messages: 1_000_000,
            slow_consumer_block_ms: 10_000,
            max_connections_per_address: 0,
            max_pending_handshakes: 1_000,
            max_publish_messages_per_sec: 0,
            max_publish_bytes_per_sec: 0,
            idle_timeout_ms: 120_000,
        }
    }
}

/// `[telemetry]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Master switch: off turns every exporter below off.
    pub enabled: bool,
    pub metrics: MetricsConfig,
    pub logging: LoggingConfig,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            enabled: true,
            metrics: MetricsConfig::default(),
            logging: LoggingConfig::default(),
        }
    }
}

/// `[telemetry.metrics]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Collect metrics at all.
    pub enabled: bool,
    /// Upper bounds of the publish-to-delivery latency histogram's
    /// buckets, in microseconds, increasing.
    pub delivery_latency_buckets_us: Vec<u64>,
    pub prometheus: PrometheusConfig,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: true,
            delivery_latency_buckets_us: vec![
                10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 100_000, 1_000_000,
            ],
            prometheus: PrometheusConfig::default(),
        }
    }
}

/// `[telemetry.metrics.prometheus]`: the scrape endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrometheusConfig {
    /// Serve `/metrics` and `/healthz`.
    pub enabled: bool,
    /// Address the endpoint listens on.
    pub host: String,
    /// Port of the endpoint; 0 picks a free one.
    pub port: u16,
}

impl Default for PrometheusConfig {
    fn default() -> Self {
        PrometheusConfig {
            enabled: true,
            host: "0.0.0.0".into(),
            port: 9090,
        }
    }
}

/// `[telemetry.logging]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    /// `error`, `warn`, `info`, `debug` or `trace`, or a full filter such as
    /// `info,kaelix_broker=debug`. `RUST_LOG`, when set, wins.
    pub level: String,
    /// `text` (one readable line per event) or `json` (one JSON object per
    /// line, for log collectors).
    pub format: LogFormat,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One readable line per event.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[security]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct SecurityConfig {
    pub tls: TlsConfig,
    pub auth: AuthConfig,
}

/// `[security.auth]`: who may connect, and what each identity may do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Accept clients that present no credentials, as the identity
    /// `anonymous`. Unset: allowed while no users are configured.
    pub anonymous: Option<bool>,
    /// What anonymous clients may do (everything, by default).
    pub anonymous_publish: Permissions,
    pub anonymous_subscribe: Permissions,
    /// Under mutual TLS, a client whose verified certificate names a user
    /// (its subject common name, else its first alternative name) is that
    /// user, with no password or token.
    pub certificate_identity: bool,
    /// The users.
    pub users: Vec<UserConfig>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            anonymous: None,
            anonymous_publish: Permissions::everything(),
            anonymous_subscribe: Permissions::everything(),
            certificate_identity: false,
            users: Vec::new(),
        }
    }
}

impl AuthConfig {
    /// Whether clients without credentials are accepted.
    pub fn anonymous_allowed(&self) -> bool {
        self.anonymous.unwrap_or(self.users.is_empty())
    }
}

/// One `[[security.auth.users]]` entry: an identity, how it logs in, and
/// what it may do. A user is granted nothing it is not allowed explicitly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct UserConfig {
    /// The identity, in logs and in certificates (`certificate_identity`).
    pub name: String,
    /// The password's argon2 hash in PHC form (`$argon2id$...`), as
    /// `kaelix passwd` prints it; empty for none.
    pub password_hash: String,
    /// An access token that logs in as this user; empty for none.
    pub token: String,
    /// Topics this user may publish to.
    pub publish: Permissions,
    /// Topic patterns this user may subscribe to.
    pub subscribe: Permissions,
    /// May change the cluster (`kaelix cluster remove`, topic definitions).
    pub admin: bool,
}

/// Allow and deny lists of topic patterns; deny wins.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Permissions {
    pub allow: Vec<String>,
    pub deny: Vec<String>,
}

impl Permissions {
    /// Every topic.
    pub fn everything() -> Permissions {
        Permissions {
            allow: vec![">".into()],
            deny: Vec::new(),
        }
    }
}

/// `[security.tls]`: TLS for client connections. Empty paths are unset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Serve clients over TLS only.
    pub enabled: bool,
    /// PEM certificate chain, leaf first.
    pub cert_path: PathBuf,
    /// PEM private key of the leaf certificate.
    pub key_path: PathBuf,
    /// PEM CA bundle; when set, clients must present a certificate it signed.
    pub client_ca_path: PathBuf,
}

/// `[retention]`: what the broker keeps in memory for replay, across topics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Keep messages for replay at all. Off, no topic keeps any (offsets
    /// are still given), whatever `[[topics]]` says.
    pub enabled: bool,
    /// Message bytes (bodies) all topics together may retain. A topic at
    /// the cap makes room by dropping its own oldest messages; a message
    /// that still does not fit is delivered but not retained.
    pub max_bytes: usize,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            enabled: true,
            max_bytes: 256 * 1024 * 1024,
        }
    }
}

/// `[dedupe]`: duplicate-free retries. A publisher that reconnects sends
/// again the acknowledged publishes it had no answer for; the broker
/// remembers, per publisher, the ids of the acknowledged publishes it
/// routed and answers a retry of one of them without routing it twice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DedupeConfig {
    /// Recognise retries at all.
    pub enabled: bool,
    /// How long a routed publish is remembered (ms): a retry later than
    /// this is routed again.
    pub window_ms: u64,
    /// Routed publishes remembered per publisher, at most (16 bytes
    /// each); the oldest are forgotten first.
    pub max_entries: usize,
    /// Publishers remembered at most; past it, the one unheard from
    /// longest is forgotten.
    pub max_publishers: usize,
}

impl Default for DedupeConfig {
    fn default() -> Self {
        DedupeConfig {
            enabled: true,
            window_ms: 120_000,
            max_entries: 100_000,
            max_publishers: 10_000,
        }
    }
}

/// One `[[topics]]` entry: settings for the topics its pattern matches.
/// Keys left out take the defaults below; among the entries whose pattern
/// matches a topic, the most specific pattern wins (literal tokens over
/// `*` over `>`), then the first listed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopicConfig {
    /// Topic pattern: `orders.>`, `prices.*`, `audit.log`.
    pub pattern: String,
    /// Partitions of each topic: each has its own offsets, retention and
    /// order. A message goes to the partition its publisher names, else the
    /// one its key hashes to, else the broker picks one (per batch of a
    /// publisher, in turn). A reload can add partitions to existing topics,
    /// not remove them.
    pub partitions: u32,
    /// Most recent messages kept per topic partition; 0 keeps none.
    pub retain_messages: usize,
    /// Most message bytes kept per topic partition.
    pub retain_bytes: usize,
    /// Oldest message age kept, in seconds; 0 keeps them regardless of age.
    pub retain_age_secs: u64,
    /// What happens to a subscriber of these topics that falls behind:
    /// `disconnect`, `drop_oldest` or `block`.
    pub slow_consumer: crate::SlowConsumerPolicy,
}

impl Default for TopicConfig {
    fn default() -> Self {
        TopicConfig {
            pattern: ">".into(),
            partitions: 1,
            retain_messages: 1000,
            retain_bytes: 16 * 1024 * 1024,
            retain_age_secs: 0,
            slow_consumer: crate::SlowConsumerPolicy::Disconnect,
        }
    }
}

impl MemoryStreamerConfig {
    /// The `[[topics]]` settings for `topic`: the most specific matching
    /// entry, or the defaults.
    pub fn topic_settings(&self, topic: &crate::Topic) -> TopicConfig {
        let mut best: Option<(usize, &TopicConfig)> = None;
        for entry in &self.topics {
            let Ok(pattern) = crate::TopicPattern::new(&entry.pattern) else {
                continue;
            };
            if !pattern.matches(topic) {
                continue;
            }
            // Literal tokens weigh most, then `*`; `>` adds nothing.
            let score = pattern
                .tokens()
                .map(|t| match t {
                    ">" => 0,
                    "*" => 1,
                    _ => 3,
                })
                .sum::<usize>()
                * 2
                + usize::from(pattern.is_literal());
            if best.is_none_or(|(s, _)| score > s) {
                best = Some((score, entry));
            }
        }
        best.map(|(_, e)| e.clone()).unwrap_or_default()
    }
}

/// One `[[plugins]]` entry: a plugin on the publish path of the topics its
/// pattern matches. A topic's chain runs in `order` (then file order)
/// before the message is routed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginConfig {
    /// Which plugin: a built-in (`header_stamp`, `json_validate`,
    /// `rate_limit`, `size_cap`, `topic_route`) or one the program that
    /// embeds the broker registered.
    pub name: String,
    /// What logs and metrics call this entry; unique. Empty: `name`.
    pub id: String,
    /// The topics it applies to.
    pub pattern: String,
    /// Place in the chain: lower runs first; equal keeps the file order.
    pub order: i32,
    /// Off without removing the entry.
    pub enabled: bool,
    /// A call that takes longer counts as a failure; 0: no budget.
    pub time_budget_us: u64,
    /// Failures in a row (errors, panics, calls over budget) that switch
    /// the plugin off.
    pub failure_threshold: u32,
    /// How long it stays off before one message tries it again.
    pub cooldown_ms: u64,
    /// Share of one CPU its calls may take, measured each second; over
    /// it, the plugin is switched off. 0: no limit.
    pub max_cpu_percent: u32,
    /// While the plugin is switched off: `bypass` (messages go on without
    /// it) or `dead_letter`.
    pub when_off: WhenOff,
    /// Whether the plugin may read `config`.
    pub can_read_config: bool,
    /// Whether the plugin may export metrics of its own.
    pub can_write_metrics: bool,
    /// The plugin's own settings.
    pub config: toml::Table,
}

impl Default for PluginConfig {
    fn default() -> Self {
        PluginConfig {
            name: String::new(),
            id: String::new(),
            pattern: ">".into(),
            order: 0,
            enabled: true,
            time_budget_us: 1_000,
            failure_threshold: 5,
            cooldown_ms: 10_000,
            max_cpu_percent: 0,
            when_off: WhenOff::Bypass,
            can_read_config: true,
            can_write_metrics: true,
            config: toml::Table::new(),
        }
    }
}

impl PluginConfig {
    /// `id`, or `name` when no id is set.
    pub fn id(&self) -> &str {
        if self.id.is_empty() {
            &self.name
        } else {
            &self.id
        }
    }
}

/// What happens to messages while a plugin is switched off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum WhenOff {
    /// They go on without it.
    #[default]
    Bypass,
    /// They go to the dead-letter topic.
    DeadLetter,
}

/// `[dead_letter]`: where messages that plugins dead-letter go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeadLetterConfig {
    /// The topic. Dead letters carry the message's own headers plus
    /// `kaelix-dead-letter-plugin`, `-reason` and `-topic`; its retention
    /// is that of `[[topics]]` matching it.
    pub topic: String,
}

impl Default for DeadLetterConfig {
    fn default() -> Self {
        DeadLetterConfig {
            topic: "kaelix.dead_letter".into(),
        }
    }
}

/// `[cluster]`: this broker as one node of a cluster. Nodes find each
/// other through `seeds`, agree on members, topics and partition leaders
/// through Raft, and route messages to the nodes that want them. Every key
/// takes effect at the next start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Run as a node of a cluster. Off: a broker on its own.
    pub enabled: bool,
    /// This node's id, at least 1: unique in the cluster and kept for the
    /// node's life (its Raft state under `data_dir` is the node's).
    pub node_id: u64,
    /// Where this node listens for the other nodes (`host:port`).
    pub listen: String,
    /// The address the other nodes reach this node at; empty: `listen`
    /// (which then must not be a wildcard address such as 0.0.0.0).
    pub advertise: String,
    /// Other nodes' cluster addresses (`host:port`); a new node joins
    /// through any of them that answers.
    pub seeds: Vec<String>,
    /// Where the Raft log and snapshots are kept.
    pub data_dir: PathBuf,
    /// How often the Raft leader tells the others it is alive (ms).
    pub heartbeat_ms: u64,
    /// How long a node goes without hearing the leader before it counts
    /// it failed and stands for election (ms); at least three heartbeats.
    pub failure_timeout_ms: u64,
    pub tls: ClusterTlsConfig,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            enabled: false,
            node_id: 0,
            listen: "0.0.0.0:7222".into(),
            advertise: String::new(),
            seeds: Vec::new(),
            data_dir: PathBuf::from("kaelix-data/cluster"),
            heartbeat_ms: 250,
            failure_timeout_ms: 1500,
            tls: ClusterTlsConfig::default(),
        }
    }
}

/// `[cluster.tls]`: links between nodes over mutually authenticated TLS.
/// Each node presents its certificate and accepts only peers whose
/// certificate `ca_path` signed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterTlsConfig {
    pub enabled: bool,
    /// PEM certificate chain of this node, leaf first.
    pub cert_path: PathBuf,
    /// PEM private key of the leaf certificate.
    pub key_path: PathBuf,
    /// PEM CA bundle that signed the nodes' certificates.
    pub ca_path: PathBuf,
}
