//! `kaelix-bench`: end-to-end load against Kaelix, NATS, or a raw TCP relay.
//!
//! ```text
//! kaelix-bench <scenario> [--target URL] [--payload BYTES] [--duration SECS]
//!              [--publishers N] [--subscribers N] [--rate MSGS_PER_S] [--acked]
//!              [--pid BROKER_PID] [--json]
//! ```
//!
//! Scenarios: `pubsub` (P → S on one topic), `fanout` (1 → N), `fanin`
//! (N → 1), `queue` (1 → a queue group of N), `latency` (one message in
//! flight, or at `--rate`), `inprocess` (the in-process `MessageBroker`'s
//! publish → receive latency), `topics` (broker memory per subscription on
//! its own topic), `connections` (broker memory per idle connection),
//! `scheduling` (urgent tasks' scheduling delay under a CPU-bound flood, on
//! the OptimizedRuntime beside plain tokio).
//! `report` turns `--json` lines into the medians table of
//! docs/performance.md; `relay-server` is the relay that `--target relay`
//! starts.

mod driver;
mod error;
mod memory;
mod payload;
mod procfs;
mod report;
mod results;
mod scenario;
mod scheduling;
mod target;

use std::io::{BufRead, BufReader, IsTerminal};
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use driver::Endpoint;
use error::{BenchError, Result};
use results::RunResult;
use scenario::Flow;
use target::Target;

#[derive(Parser)]
#[command(
    name = "kaelix-bench",
    version,
    about = "End-to-end load against Kaelix, NATS or a raw TCP relay"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// P publishers → S subscribers on one topic.
    Pubsub(RunOpts),
    /// 1 publisher → N subscribers (N = --subscribers, default 4).
    Fanout(RunOpts),
    /// N publishers (--publishers, default 4) → 1 subscriber.
    Fanin(RunOpts),
    /// 1 publisher → a queue group of N (--subscribers, default 4): each message once.
    Queue(RunOpts),
    /// Latency with one message in flight, or at a fixed --rate.
    Latency(RunOpts),
    /// In-process MessageBroker publish → receive latency (no network; --target is ignored).
    Inprocess(RunOpts),
    /// Broker memory for --count subscriptions, each on its own topic.
    Topics(RunOpts),
    /// Broker memory for --count idle connections.
    Connections(RunOpts),
    /// Scheduling delay of urgent tasks while CPU-bound background tasks
    /// flood the workers: the OptimizedRuntime beside plain tokio.
    Scheduling {
        /// Worker threads of both runtimes.
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// CPU-bound background tasks.
        #[arg(long, default_value_t = 64)]
        flood: usize,
        /// Microseconds of CPU each background task burns between yields.
        #[arg(long, default_value_t = 20)]
        slice_us: u64,
        /// Probe tasks spawned per second.
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        /// Seconds per runtime.
        #[arg(long, default_value_t = 5.0)]
        duration: f64,
        /// A label for reports.
        #[arg(long, default_value = "")]
        label: String,
        /// One JSON object per result instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Serve the raw TCP relay (what `--target relay` starts).
    RelayServer {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
    },
    /// Read `--json` lines and print the medians table with Kaelix/NATS ratios.
    Report {
        /// Files of JSON lines (one run per line).
        files: Vec<PathBuf>,
    },
}

#[derive(Args, Clone)]
struct RunOpts {
    /// kaelix://host:port, nats://host:port, relay (started here) or relay://host:port.
    #[arg(long, default_value = "kaelix://127.0.0.1:8080")]
    target: Target,
    /// Subscribers connect here instead of to --target (another node of
    /// the same cluster): the messages cross between nodes. Publishing
    /// starts once the subscriptions had time to reach --target's node.
    #[arg(long, value_name = "URL")]
    subscribe_to: Option<Target>,
    /// Payload bytes per message (at least 16: sequence number and send time).
    #[arg(long, default_value_t = 16)]
    payload: usize,
    /// Seconds to publish for.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Publishing connections.
    #[arg(long)]
    publishers: Option<usize>,
    /// Subscribing connections.
    #[arg(long)]
    subscribers: Option<usize>,
    /// Messages per second across all publishers (unpaced if absent).
    #[arg(long)]
    rate: Option<f64>,
    /// Wait for an acknowledgement of every publish.
    #[arg(long)]
    acked: bool,
    /// Kaelix subscribers pace the broker with a credit window of this many
    /// messages.
    #[arg(long)]
    credit: Option<u32>,
    /// Payload bytes publishers keep in flight ahead of the slowest subscriber.
    #[arg(long, default_value_t = 16 << 20)]
    window_bytes: u64,
    /// Subscriptions (topics) or connections for the memory scenarios.
    #[arg(long, default_value_t = 10_000)]
    count: u64,
    /// The broker's pid, for its CPU time and memory.
    #[arg(long)]
    pid: Option<u32>,
    /// Connect to Kaelix over TLS, trusting the CA certificates in FILE
    /// (the broker's certificate must name the address connected to).
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// A label for reports, e.g. the CPU placement.
    #[arg(long, default_value = "")]
    label: String,
    /// One JSON object per run on stdout instead of a table.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("kaelix-bench: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("kaelix-bench: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cmd: Cmd) -> Result<()> {
    let (name, opts) = match cmd {
        Cmd::RelayServer { listen } => {
            let listener = tokio::net::TcpListener::bind(&listen).await?;
            println!("relay listening on {}", listener.local_addr()?);
            return driver::relay::serve(listener).await;
        }
        Cmd::Scheduling {
            workers,
            flood,
            slice_us,
            rate,
            duration,
            label,
            json,
        } => {
            if workers == 0 || rate <= 0.0 || duration <= 0.0 {
                return Err(BenchError::Usage(
                    "--workers, --rate and --duration must be positive".into(),
                ));
            }
            let settings = scheduling::Settings {
                workers,
                flood_tasks: flood,
                slice: Duration::from_micros(slice_us),
                probes_per_s: rate,
                duration: Duration::from_secs_f64(duration),
            };
            let mut results = scheduling::kaelix(settings).await?;
            results.push(
                tokio::task::spawn_blocking(move || scheduling::tokio(settings))
                    .await
                    .map_err(|e| BenchError::Usage(e.to_string()))??,
            );
            for r in &mut results {
                r.label = label.clone();
            }
            if json {
                for r in &results {
                    println!(
                        "{}",
                        serde_json::to_string(r).map_err(|e| BenchError::Usage(e.to_string()))?
                    );
                }
            } else {
                print!("{}", scheduling::table(&results));
            }
            return Ok(());
        }
        Cmd::Report { files } => {
            let mut runs = Vec::new();
            for file in files {
                let text = std::fs::read_to_string(&file)?;
                runs.extend(report::parse_lines(&text).map_err(BenchError::Usage)?);
            }
            print!("{}", report::markdown(&runs));
            return Ok(());
        }
        Cmd::Pubsub(o) => ("pubsub", o),
        Cmd::Fanout(o) => ("fanout", o),
        Cmd::Fanin(o) => ("fanin", o),
        Cmd::Queue(o) => ("queue", o),
        Cmd::Latency(o) => ("latency", o),
        Cmd::Inprocess(o) => {
            let runs = scenario::in_process(o.payload, Duration::from_secs_f64(o.duration)).await?;
            for mut r in runs {
                r.target = "inprocess".into();
                r.label = o.label.clone();
                if o.json {
                    println!(
                        "{}",
                        serde_json::to_string(&r).map_err(|e| BenchError::Usage(e.to_string()))?
                    );
                } else {
                    print!("{}", r.table());
                }
            }
            return Ok(());
        }
        Cmd::Topics(o) => ("topics", o),
        Cmd::Connections(o) => ("connections", o),
    };
    let mut relay = None;
    if let Some(ca) = &opts.tls_ca {
        let tls = kaelix_core::tls::ClientTls::from_ca_file(ca)?;
        driver::use_kaelix_client(kaelix_core::client::ClientOptions {
            tls: Some(tls),
            ..kaelix_core::client::ClientOptions::default()
        });
    }
    let (endpoint, pid) = match &opts.target {
        Target::Kaelix(a) => (Endpoint::Kaelix(a.clone()), opts.pid),
        Target::Nats(a) => (Endpoint::Nats(a.clone()), opts.pid),
        Target::Relay(Some(a)) => (Endpoint::Relay(a.clone()), opts.pid),
        Target::Relay(None) => {
            let (child, addr) = start_relay()?;
            let pid = child.id();
            relay = Some(KillOnDrop(child));
            (Endpoint::Relay(addr), Some(pid))
        }
    };
    let subscribe_to = match &opts.subscribe_to {
        None => None,
        Some(Target::Kaelix(a)) => Some(Endpoint::Kaelix(a.clone())),
        Some(Target::Nats(a)) => Some(Endpoint::Nats(a.clone())),
        Some(Target::Relay(_)) => {
            return Err(BenchError::Usage(
                "--subscribe-to takes kaelix:// or nats:// (another node)".into(),
            ))
        }
    };
    let endpoints = scenario::Endpoints {
        publish: endpoint.clone(),
        subscribe: subscribe_to.unwrap_or(endpoint),
    };
    let mut result = run(name, &opts, &endpoints, pid).await?;
    drop(relay);
    result.target = opts.target.to_string();
    result.label = opts.label.clone();
    if opts.json {
        println!(
            "{}",
            serde_json::to_string(&result).map_err(|e| BenchError::Usage(e.to_string()))?
        );
    } else {
        print!("{}", result.table());
    }
    if result.lost > 0 {
        eprintln!("kaelix-bench: {} message(s) lost", result.lost);
    }
    Ok(())
}

async fn run(
    name: &'static str,
    opts: &RunOpts,
    endpoints: &scenario::Endpoints,
    pid: Option<u32>,
) -> Result<RunResult> {
    let endpoint = &endpoints.publish;
    let duration = Duration::from_secs_f64(opts.duration);
    let (publishers, subscribers, group) = match name {
        "fanout" => (1, opts.subscribers.unwrap_or(4), None),
        "fanin" => (opts.publishers.unwrap_or(4), 1, None),
        "queue" => (
            1,
            opts.subscribers.unwrap_or(4),
            Some("bench-workers".to_string()),
        ),
        "topics" => return memory::topics(endpoint, opts.count, pid).await,
        "connections" => return memory::connections(endpoint, opts.count, pid).await,
        "latency" if opts.rate.is_none() => {
            return scenario::one_in_flight(opts.payload, duration, endpoints, pid).await
        }
        _ => (
            opts.publishers.unwrap_or(1),
            opts.subscribers.unwrap_or(1),
            None,
        ),
    };
    let flow = Flow {
        scenario: name,
        payload: opts.payload,
        duration,
        publishers,
        subscribers,
        group,
        credit: opts.credit,
        rate: opts.rate,
        acked: opts.acked,
        window_bytes: opts.window_bytes,
        progress: !opts.json && std::io::stderr().is_terminal(),
    };
    scenario::run(&flow, endpoints, pid).await
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `kaelix-bench relay-server` as a separate process (one hop
/// through a process, like a broker) and returns it with its address.
fn start_relay() -> Result<(Child, String)> {
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .args(["relay-server", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| BenchError::Usage("relay stdout".into()))?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let addr = line
        .trim()
        .strip_prefix("relay listening on ")
        .ok_or_else(|| BenchError::Usage(format!("relay said {line:?}")))?
        .to_string();
    Ok((child, addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_interface() {
        let cli = Cli::try_parse_from([
            "kaelix-bench",
            "fanout",
            "--target",
            "nats://127.0.0.1:4222",
            "--payload",
            "128",
            "--duration",
            "2.5",
            "--subscribers",
            "8",
            "--rate",
            "1000",
            "--json",
        ])
        .unwrap();
        let Cmd::Fanout(o) = cli.command else {
            panic!("expected fanout")
        };
        assert_eq!(o.target, Target::Nats("127.0.0.1:4222".into()));
        assert_eq!(
            (o.payload, o.duration, o.subscribers, o.rate, o.json),
            (128, 2.5, Some(8), Some(1000.0), true)
        );
        assert_eq!(o.publishers, None);

        let cli = Cli::try_parse_from(["kaelix-bench", "latency"]).unwrap();
        let Cmd::Latency(o) = cli.command else {
            panic!("expected latency")
        };
        assert_eq!(o.target, Target::Kaelix("127.0.0.1:8080".into()));
        assert!(!o.json && !o.acked);

        assert!(Cli::try_parse_from(["kaelix-bench", "pubsub", "--target", "ftp://x:1"]).is_err());
        assert!(Cli::try_parse_from(["kaelix-bench", "nosuch"]).is_err());
    }
}
