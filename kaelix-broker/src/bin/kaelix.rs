//! `kaelix`: publish and subscribe from the command line.
//!
//! ```text
//! kaelix sub 'events.>'                 # one line per message: topic, then payload
//! kaelix sub orders --from earliest      # what the broker still holds, then live
//! kaelix pub events.user.signup alice   # exits once the broker acknowledged it
//! kaelix pub orders o-1 --key user-42    # same key, same partition, kept in order
//! kaelix sub orders --partitions 0,2     # only those partitions
//! kaelix stats [--json]                 # the broker's statistics and rates
//! kaelix passwd                          # a password hash for kaelix.toml
//! KAELIX_PASSWORD=... kaelix --tls-ca ca.pem --user alice pub orders o-1
//! ```

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kaelix_broker::stats::{duration, human};
use kaelix_consumer::{Consumer, ConsumerOptions};
use kaelix_core::client::{ClientOptions, Credentials};
use kaelix_core::tls::ClientTls;
use kaelix_publisher::Publisher;

/// The port used when `--server` names only a host.
const DEFAULT_PORT: u16 = 8080;

#[derive(Parser)]
#[command(
    name = "kaelix",
    version,
    about = "Publish and subscribe to a Kaelix broker"
)]
struct Args {
    /// Broker address, `host:port` or `host` (port 8080).
    #[arg(
        long,
        short,
        global = true,
        default_value = "127.0.0.1:8080",
        env = "KAELIX_SERVER"
    )]
    server: String,
    #[command(flatten)]
    connection: ConnectionArgs,
    #[command(subcommand)]
    command: Command,
}

/// How to reach and log in to the broker; the same for every command.
#[derive(clap::Args)]
struct ConnectionArgs {
    /// Connect over TLS (implied by the other --tls-* options); without
    /// --tls-ca the system's trusted CAs are used.
    #[arg(long, global = true, env = "KAELIX_TLS")]
    tls: bool,
    /// PEM file of the CA(s) that signed the broker's certificate.
    #[arg(long, global = true, value_name = "FILE", env = "KAELIX_TLS_CA")]
    tls_ca: Option<std::path::PathBuf>,
    /// The name the broker's certificate must carry (default: the host of
    /// --server).
    #[arg(long, global = true, value_name = "NAME", env = "KAELIX_TLS_NAME")]
    tls_name: Option<String>,
    /// This client's certificate (PEM), for brokers that require mutual TLS.
    #[arg(long, global = true, value_name = "FILE", env = "KAELIX_TLS_CERT")]
    tls_cert: Option<std::path::PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, global = true, value_name = "FILE", env = "KAELIX_TLS_KEY")]
    tls_key: Option<std::path::PathBuf>,
    /// Log in with this access token.
    #[arg(long, global = true, env = "KAELIX_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Log in as this user (with --password).
    #[arg(long, global = true, env = "KAELIX_USER")]
    user: Option<String>,
    /// The user's password. Prefer the KAELIX_PASSWORD variable: other
    /// users of the machine can read command lines.
    #[arg(long, global = true, env = "KAELIX_PASSWORD", hide_env_values = true)]
    password: Option<String>,
}

impl ConnectionArgs {
    /// The client options these arguments ask for; `host` is the host part
    /// of the server address, the default name to check in its certificate.
    fn client_options(&self, name: &str, host: &str) -> Result<ClientOptions, String> {
        let tls =
            self.tls || self.tls_ca.is_some() || self.tls_name.is_some() || self.tls_cert.is_some();
        let tls = if tls {
            let mut builder = ClientTls::builder();
            if let Some(ca) = &self.tls_ca {
                builder = builder.ca_file(ca).map_err(|e| e.to_string())?;
            }
            match (&self.tls_cert, &self.tls_key) {
                (Some(cert), Some(key)) => {
                    builder = builder
                        .client_cert_files(cert, key)
                        .map_err(|e| e.to_string())?;
                }
                (None, None) => {}
                _ => return Err("--tls-cert and --tls-key go together".into()),
            }
            let name = self.tls_name.as_deref().unwrap_or(host);
            Some(
                builder
                    .server_name(name)
                    .build()
                    .map_err(|e| e.to_string())?,
            )
        } else {
            None
        };
        let credentials = match (&self.token, &self.user, &self.password) {
            (Some(_), Some(_), _) => {
                return Err("--token and --user are two ways to log in: pick one".into())
            }
            (Some(token), _, _) => Some(Credentials::token(token)),
            (None, Some(user), Some(password)) => Some(Credentials::user(user, password)),
            (None, Some(_), None) => {
                return Err("--user needs --password (or KAELIX_PASSWORD)".into())
            }
            (None, None, Some(_)) => return Err("--password needs --user".into()),
            (None, None, None) => None,
        };
        Ok(ClientOptions {
            name: name.into(),
            tls,
            credentials,
            ..ClientOptions::default()
        })
    }
}

#[derive(Subcommand)]
enum Command {
    /// Publish a message; exits once the broker acknowledged every copy.
    Pub {
        /// Topic to publish on, e.g. events.user.signup.
        topic: String,
        /// Message text.
        text: String,
        /// Publish the message this many times.
        #[arg(long, short = 'n', default_value_t = 1)]
        count: u64,
        /// The message's key: messages with the same key go to the same
        /// partition of the topic, so they keep their order.
        #[arg(long, short)]
        key: Option<String>,
        /// Publish to this partition (the broker refuses one the topic does
        /// not have).
        #[arg(long, short)]
        partition: Option<u32>,
    },
    /// Subscribe and print one line per message: topic, a space, the payload.
    Sub {
        /// Topic or pattern: `*` matches one token, a final `>` one or more.
        pattern: String,
        /// Join this queue group: each message goes to one member.
        #[arg(long, short)]
        queue: Option<String>,
        /// Exit after this many messages.
        #[arg(long, short = 'n')]
        count: Option<u64>,
        /// Where to start: latest (default), earliest, offset:N, last:N,
        /// time:RFC3339 or ago:DURATION. What the broker still holds from
        /// there comes first, then live messages.
        #[arg(long, default_value = "latest")]
        from: kaelix_core::StartPosition,
        /// Begin each line with the message's offset in its topic (as
        /// `partition/offset` for a topic with several partitions).
        #[arg(long)]
        offsets: bool,
        /// This subscription's policy when it falls behind, over the
        /// topic's: disconnect, drop_oldest (gaps are reported on standard
        /// error) or block.
        #[arg(long)]
        slow_consumer: Option<kaelix_core::SlowConsumerPolicy>,
        /// Only these partitions of the matching topics, comma-separated
        /// (default: all).
        #[arg(long, value_delimiter = ',')]
        partitions: Vec<u32>,
        /// With --queue: each partition goes to one member of the group,
        /// so a member sees its partitions in order.
        #[arg(long, requires = "queue")]
        sticky: bool,
        /// Pace the broker: at most this many messages in flight to this
        /// subscriber; the rest waits in the topic's retained window.
        #[arg(long, conflicts_with = "queue")]
        credit: Option<u32>,
    },
    /// Print an argon2 hash of a password, for `password_hash` in
    /// `[[security.auth.users]]`. Asks for it twice on a terminal (without
    /// echo); otherwise reads the first line of standard input.
    Passwd,
    /// Print the broker's statistics: uptime, health, connections,
    /// subscriptions and topics, message and byte rates, refusals, drops.
    Stats {
        /// Print the broker's JSON (with the measured rates added) instead.
        #[arg(long)]
        json: bool,
        /// Seconds between the two samples the rates are measured over;
        /// 0 takes one sample and gives averages since the broker started.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
    },
    /// The cluster the broker is a node of.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Members and their health as this node sees them, the Raft leader
    /// and the partition leaders.
    Status {
        /// Print the node's JSON instead.
        #[arg(long)]
        json: bool,
    },
    /// Take a node out of the membership (stop it first). Needs a majority
    /// of the voters reachable.
    Remove {
        /// The node's cluster.node_id.
        node: u64,
    },
    /// Define a topic for the whole cluster: its partitions (which can grow,
    /// never shrink) and retention.
    DefineTopic {
        topic: String,
        #[arg(long, default_value_t = 1)]
        partitions: u32,
        /// Messages kept per partition.
        #[arg(long)]
        retention_messages: Option<u64>,
        /// Bytes kept per partition.
        #[arg(long)]
        retention_bytes: Option<u64>,
        /// How long a message is kept, e.g. 1h.
        #[arg(long, value_parser = humantime::parse_duration)]
        retention_age: Option<std::time::Duration>,
    },
    /// Delete a topic's cluster-wide definition.
    DeleteTopic { topic: String },
}

/// The host part of a `host:port` address, without IPv6 brackets.
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
    host.trim_start_matches('[').trim_end_matches(']')
}

fn server_addr(server: &str) -> String {
    let has_port = match server.rsplit_once(':') {
        Some((host, port)) => !host.ends_with(':') && port.parse::<u16>().is_ok(),
        None => false,
    };
    if has_port {
        server.to_string()
    } else if server.contains(':') && !server.starts_with('[') {
        format!("[{server}]:{DEFAULT_PORT}")
    } else {
        format!("{server}:{DEFAULT_PORT}")
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    if let Command::Passwd = args.command {
        return match passwd() {
            Ok(hash) => {
                println!("{hash}");
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("kaelix passwd: {err}");
                ExitCode::FAILURE
            }
        };
    }
    let server = server_addr(&args.server);
    let client = match args
        .connection
        .client_options("kaelix-cli", host_of(&server))
    {
        Ok(client) => client,
        Err(err) => {
            eprintln!("kaelix: {err}");
            return ExitCode::FAILURE;
        }
    };
    let server = Server {
        addr: server,
        client,
    };
    let result = match args.command {
        Command::Pub {
            topic,
            text,
            count,
            key,
            partition,
        } => {
            let message = kaelix_core::Message::builder().topic(&topic).payload(text);
            let message = match (key, partition) {
                (Some(key), None) => message.key(key),
                (None, Some(p)) => message.partition(kaelix_core::PartitionId::new(p)),
                (Some(key), Some(p)) => {
                    message.key(key).partition(kaelix_core::PartitionId::new(p))
                }
                (None, None) => message,
            };
            match message.build() {
                Ok(message) => publish(&server, &message, count).await,
                Err(err) => Err(err.to_string()),
            }
        }
        Command::Sub {
            pattern,
            queue,
            count,
            from,
            offsets,
            slow_consumer,
            partitions,
            sticky,
            credit,
        } => {
            let options = SubOptions {
                credit,
                queue,
                count,
                from,
                offsets,
                slow_consumer,
                partitions,
                sticky,
            };
            subscribe(&server, &pattern, options).await
        }
        Command::Stats { json, interval } => stats(&server, json, interval).await,
        Command::Cluster {
            command: ClusterCommand::Status { json },
        } => cluster_status(&server, json).await,
        Command::Cluster { command } => cluster_change(&server, command).await,
        Command::Passwd => unreachable!("handled before connecting"),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("kaelix: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Reads a password (twice, without echo, on a terminal) and hashes it.
fn passwd() -> Result<String, String> {
    use std::io::IsTerminal;
    let password = if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password("Password: ").map_err(|e| e.to_string())?;
        let again = rpassword::prompt_password("Again: ").map_err(|e| e.to_string())?;
        if first != again {
            return Err("the two passwords differ".into());
        }
        first
    } else {
        let mut line = String::new();
        std::io::stdin()
            .read_line(&mut line)
            .map_err(|e| format!("cannot read standard input: {e}"))?;
        line.trim_end_matches(['\n', '\r']).to_string()
    };
    if password.is_empty() {
        return Err("an empty password is not a password".into());
    }
    kaelix_broker::hash_password(&password)
}

/// Where the broker is and how to connect to it.
struct Server {
    addr: String,
    client: ClientOptions,
}

impl Server {
    async fn publisher(&self) -> Result<Publisher, String> {
        Publisher::connect_with(&self.addr, self.client.clone())
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", self.addr))
    }

    async fn consumer(&self) -> Result<Consumer, String> {
        let options = ConsumerOptions {
            client: self.client.clone(),
            ..ConsumerOptions::default()
        };
        Consumer::connect_with(&self.addr, options)
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", self.addr))
    }
}

async fn publish(
    server: &Server,
    message: &kaelix_core::Message,
    count: u64,
) -> Result<(), String> {
    let publisher = server.publisher().await?;
    if count == 1 {
        publisher
            .publish_message(message)
            .await
            .map_err(|e| e.to_string())?;
    } else {
        for _ in 0..count {
            publisher
                .send_message(message)
                .await
                .map_err(|e| e.to_string())?;
        }
        // A flush returns once the broker has handled every message, and
        // reports the first it refused.
        publisher.flush().await.map_err(|e| e.to_string())?;
    }
    publisher.close().await.map_err(|e| e.to_string())?;
    eprintln!("published {count} message(s) to {}", message.topic);
    Ok(())
}

struct SubOptions {
    queue: Option<String>,
    count: Option<u64>,
    from: kaelix_core::StartPosition,
    offsets: bool,
    slow_consumer: Option<kaelix_core::SlowConsumerPolicy>,
    partitions: Vec<u32>,
    sticky: bool,
    credit: Option<u32>,
}

async fn subscribe(server: &Server, pattern: &str, options: SubOptions) -> Result<(), String> {
    let SubOptions {
        queue,
        count,
        from,
        offsets,
        slow_consumer,
        partitions,
        sticky,
        credit,
    } = options;
    let consumer = server.consumer().await?;
    if queue.is_some() && from != kaelix_core::StartPosition::Latest {
        return Err("--queue and --from cannot be combined: a queue group \
                    starts at the latest message"
            .into());
    }
    let options = kaelix_core::SubscribeOptions {
        start: from,
        queue_group: queue,
        slow_consumer,
        partitions: partitions
            .into_iter()
            .map(kaelix_core::PartitionId::new)
            .collect(),
        sticky_partitions: sticky,
        credit: credit.map(kaelix_core::CreditWindow::messages),
    };
    let mut subscription = consumer
        .subscribe_with(pattern, options)
        .await
        .map_err(|e| e.to_string())?;
    eprintln!("subscribed to {pattern} from {from}");
    if subscription.missed() > 0 {
        eprintln!(
            "missed {} message(s) no longer held by the broker; starting at the oldest it holds",
            subscription.missed()
        );
    }
    let mut out = std::io::stdout().lock();
    let mut received = 0u64;
    while count.is_none_or(|n| received < n) {
        // Flush only when nothing more is buffered: one write per burst.
        let message = match subscription.try_recv() {
            Some(message) => message,
            None => {
                let _ = out.flush();
                subscription.recv().await.map_err(|e| e.to_string())?
            }
        };
        received += 1;
        for gap in subscription.take_gaps() {
            let partition = gap
                .partition
                .map(|p| format!(" partition {p}"))
                .unwrap_or_default();
            eprintln!(
                "missed {} message(s) of {}{partition} (offsets {} to {}): this subscriber fell behind",
                gap.count, gap.topic, gap.first, gap.last
            );
        }
        if offsets {
            match (message.partition, message.offset) {
                (Some(p), Some(offset)) => {
                    let _ = write!(out, "{p}/{offset} ");
                }
                (None, Some(offset)) => {
                    let _ = write!(out, "{offset} ");
                }
                _ => {}
            }
        }
        let line = writeln!(
            out,
            "{} {}",
            message.topic,
            String::from_utf8_lossy(&message.payload)
        );
        if line.is_err() {
            // stdout closed (e.g. piped into `head`): stop quietly.
            return Ok(());
        }
    }
    let _ = out.flush();
    Ok(())
}

async fn cluster_status(server: &Server, json: bool) -> Result<(), String> {
    let client = server.publisher().await?;
    let text = client.server_stats().await.map_err(|e| e.to_string())?;
    let _ = client.close().await;
    let stats: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| format!("the broker's statistics are not JSON: {e}"))?;
    let cluster = &stats["cluster"];
    if cluster.is_null() {
        return Err(format!(
            "the broker at {} is not a cluster node (cluster.enabled = false)",
            server.addr
        ));
    }
    if json {
        println!("{cluster}");
    } else {
        print!("{}", cluster_table(cluster));
    }
    Ok(())
}

/// `kaelix cluster remove | define-topic | delete-topic`.
async fn cluster_change(server: &Server, command: ClusterCommand) -> Result<(), String> {
    let request = match command {
        ClusterCommand::Status { .. } => unreachable!("handled apart"),
        ClusterCommand::Remove { node } => serde_json::json!({"op": "remove", "node": node}),
        ClusterCommand::DefineTopic {
            topic,
            partitions,
            retention_messages,
            retention_bytes,
            retention_age,
        } => serde_json::json!({
            "op": "define_topic",
            "topic": topic,
            "partitions": partitions,
            "retention_messages": retention_messages,
            "retention_bytes": retention_bytes,
            "retention_age_ms": retention_age.map(|d| d.as_millis() as u64),
        }),
        ClusterCommand::DeleteTopic { topic } => {
            serde_json::json!({"op": "delete_topic", "topic": topic})
        }
    };
    let client = server.publisher().await?;
    let result = client.admin(&request.to_string()).await;
    let _ = client.close().await;
    match result {
        Ok(done) => {
            println!("{done}");
            Ok(())
        }
        Err(kaelix_core::Error::Refused { reason, .. }) => Err(reason),
        Err(e) => Err(e.to_string()),
    }
}

/// `kaelix cluster status` as text.
fn cluster_table(c: &serde_json::Value) -> String {
    use std::fmt::Write;
    let id = c["node_id"].as_u64().unwrap_or(0);
    let leader = c["leader"].as_u64();
    let members = c["members"].as_array().cloned().unwrap_or_default();
    let up = members.iter().filter(|m| m["up"] == true).count();
    let voters: Vec<_> = members.iter().filter(|m| m["voter"] == true).collect();
    let voters_up = voters.iter().filter(|m| m["up"] == true).count();
    let quorum = leader.is_some() && voters_up * 2 > voters.len();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "node {id} ({}), term {}, leader {}; {up} of {} members up; {}",
        c["role"].as_str().unwrap_or("?"),
        c["term"],
        leader.map_or("unknown".into(), |l| l.to_string()),
        members.len(),
        if quorum {
            "majority reachable: metadata can change"
        } else {
            "NO MAJORITY: metadata cannot change"
        }
    );
    let _ = writeln!(
        out,
        "{:>4}  {:<8} {:<5} {:>10}  {:<22} {:<22}",
        "ID", "ROLE", "UP", "LAST SEEN", "CLUSTER ADDRESS", "CLIENT ADDRESS"
    );
    for m in &members {
        let mid = m["id"].as_u64().unwrap_or(0);
        let role = if Some(mid) == leader {
            "leader"
        } else if m["voter"] == true {
            "voter"
        } else {
            "learner"
        };
        let seen = match m["last_seen_ms"].as_u64() {
            _ if mid == id => "this node".to_string(),
            Some(ms) => format!("{ms} ms ago"),
            None => "never".to_string(),
        };
        let _ = writeln!(
            out,
            "{mid:>4}  {role:<8} {:<5} {seen:>10}  {:<22} {:<22}",
            if m["up"] == true { "up" } else { "DOWN" },
            m["cluster_addr"].as_str().unwrap_or(""),
            m["client_addr"].as_str().unwrap_or(""),
        );
        if let Some(problem) = m["problem"].as_str() {
            let _ = writeln!(out, "      {problem}");
        }
    }
    let partitions = c["partition_leaders"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "topics: {}; partition leaders: {}",
        c["topics"],
        if partitions.is_empty() {
            "none assigned".to_string()
        } else {
            partitions
                .iter()
                .map(|p| {
                    format!(
                        "{}/{} → {}",
                        p["topic"].as_str().unwrap_or("?"),
                        p["partition"],
                        p["node"]
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    out
}

async fn stats(server: &Server, json: bool, interval: f64) -> Result<(), String> {
    if !(0.0..=3600.0).contains(&interval) {
        return Err(format!(
            "--interval must be 0 to 3600 seconds, not {interval}"
        ));
    }
    let client = server.publisher().await?;
    let sample = || async {
        let text = client.server_stats().await.map_err(|e| e.to_string())?;
        serde_json::from_str::<serde_json::Value>(&text)
            .map_err(|e| format!("the broker's statistics are not JSON: {e}"))
    };
    let first = sample().await?;
    let (mut last, seconds) = if interval > 0.0 {
        tokio::time::sleep(std::time::Duration::from_secs_f64(interval)).await;
        (sample().await?, interval)
    } else {
        let up = first["uptime_seconds"].as_f64().unwrap_or(0.0);
        (first.clone(), up)
    };
    let _ = client.close().await;
    let count = |v: &serde_json::Value, path: &[&str]| {
        path.iter().fold(v, |v, k| &v[*k]).as_u64().unwrap_or(0)
    };
    let rate = |path: &[&str]| {
        let base = if interval > 0.0 {
            count(&first, path)
        } else {
            0
        };
        count(&last, path).saturating_sub(base) as f64 / seconds.max(1e-3)
    };
    let rates = serde_json::json!({
        "over_seconds": seconds,
        "published_per_second": rate(&["messages", "published"]),
        "delivered_per_second": rate(&["messages", "delivered"]),
        "bytes_received_per_second": rate(&["bytes", "received"]),
        "bytes_delivered_per_second": rate(&["bytes", "delivered"]),
    });
    if json {
        last["rates"] = rates;
        println!("{last}");
        return Ok(());
    }
    print!("{}", summary(&server.addr, &last, &rates));
    Ok(())
}

/// The statistics for people, one topic per line.
fn summary(server: &str, s: &serde_json::Value, rates: &serde_json::Value) -> String {
    let n = |v: &serde_json::Value| human(v.as_f64().unwrap_or(0.0));
    // `reason count, ...` for the non-zero entries of an object.
    let reasons = |v: &serde_json::Value| {
        let parts: Vec<String> = v
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, c)| c.as_u64().unwrap_or(0) > 0)
            .map(|(k, c)| format!("{k} {c}"))
            .collect();
        if parts.is_empty() {
            String::new()
        } else {
            format!(" ({})", parts.join(", "))
        }
    };
    let sum = |v: &serde_json::Value| -> u64 {
        v.as_object()
            .into_iter()
            .flatten()
            .filter_map(|(_, c)| c.as_u64())
            .sum()
    };
    let uptime = std::time::Duration::from_secs_f64(s["uptime_seconds"].as_f64().unwrap_or(0.0));
    let mut out = format!(
        "{} {} at {server}, up {}\n",
        s["server"].as_str().unwrap_or("broker"),
        s["version"].as_str().unwrap_or(""),
        duration(uptime),
    );
    let line = |out: &mut String, label: &str, text: String| {
        out.push_str(&format!("{label:<14}{text}\n"));
    };
    line(
        &mut out,
        "health",
        format!(
            "{} ({})",
            s["health"]["status"].as_str().unwrap_or("unknown"),
            s["health"]["reason"].as_str().unwrap_or("")
        ),
    );
    let c = &s["connections"];
    line(
        &mut out,
        "connections",
        format!(
            "{} open, {} accepted, {} rejected{}",
            n(&c["active"]),
            n(&c["accepted"]),
            sum(&c["rejected"]),
            reasons(&c["rejected"])
        ),
    );
    line(
        &mut out,
        "closed",
        format!("{}{}", sum(&c["closed"]), reasons(&c["closed"])),
    );
    line(
        &mut out,
        "subscriptions",
        format!(
            "{} on {} topics, {} with wildcards",
            n(&s["subscriptions"]),
            n(&s["topics"]),
            n(&s["wildcard_subscriptions"])
        ),
    );
    let over = rates["over_seconds"].as_f64().unwrap_or(0.0);
    line(
        &mut out,
        "messages",
        format!(
            "{} published ({}/s), {} delivered ({}/s)",
            n(&s["messages"]["published"]),
            n(&rates["published_per_second"]),
            n(&s["messages"]["delivered"]),
            n(&rates["delivered_per_second"]),
        ),
    );
    line(
        &mut out,
        "bytes",
        format!(
            "{}B received ({}B/s), {}B delivered ({}B/s)",
            n(&s["bytes"]["received"]),
            n(&rates["bytes_received_per_second"]),
            n(&s["bytes"]["delivered"]),
            n(&rates["bytes_delivered_per_second"]),
        ),
    );
    let p = &s["publishes"];
    line(
        &mut out,
        "publishes",
        format!(
            "{} acknowledged, {} refused{}; {} subscriptions refused{}",
            n(&p["acknowledged"]),
            sum(&p["refused"]),
            reasons(&p["refused"]),
            sum(&s["subscribe_refusals"]),
            reasons(&s["subscribe_refusals"])
        ),
    );
    line(
        &mut out,
        "drops",
        format!(
            "{} slow consumers disconnected, {} messages dropped for slow consumers, \
             {} publisher waits",
            n(&s["slow_consumers"]),
            n(&s["slow_consumer_drops"]),
            n(&s["slow_consumer_waits"])
        ),
    );
    if let Some(runtime) = s["runtime"].as_object() {
        line(
            &mut out,
            "runtime",
            format!(
                "{} workers ({})",
                runtime["workers"],
                runtime["placement"].as_str().unwrap_or("")
            ),
        );
    }
    out.push_str(&format!(
        "rates over the last {}\n",
        duration(std::time::Duration::from_secs_f64(over))
    ));
    out
}
