//! `kaelix-broker`: runs the Kaelix broker.
//!
//! Configuration: built-in defaults, then `--config PATH` (or `./kaelix.toml`
//! if present), then `KAELIX_*` environment variables. Prints one line with
//! the address it listens on; SIGINT or SIGTERM stops it gracefully.
//!
//! The broker runs on an `OptimizedRuntime` configured by `[runtime]`:
//! connections at High priority, the listener at Critical, health
//! housekeeping at Background.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use kaelix_broker::{MessageBroker, Server};
use kaelix_core::runtime::{HealthMonitor, HealthStatus, OptimizedRuntime, TaskPriority};
use kaelix_core::MemoryStreamerConfig;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "kaelix-broker",
    version,
    about = "The Kaelix pub/sub message broker"
)]
struct Args {
    /// Configuration file; without it ./kaelix.toml is read if present.
    #[arg(long, short, value_name = "PATH")]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match kaelix_core::config::load(args.config.as_deref()) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("kaelix-broker: {err}");
            return ExitCode::from(2);
        }
    };
    init_logging(&config);
    // This thread waits for signals; the broker's work runs on the
    // OptimizedRuntime's pinned workers.
    let main = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("kaelix-broker: cannot start: {err}");
            return ExitCode::FAILURE;
        }
    };
    match main.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("kaelix-broker: {err}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(config: &MemoryStreamerConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.telemetry.logging.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

async fn run(config: MemoryStreamerConfig) -> Result<(), String> {
    // Handlers first: a supervisor may signal as soon as it reads the
    // listening line.
    let signals = Signals::install()?;
    let runtime = OptimizedRuntime::new(config.runtime.clone()).map_err(|e| e.to_string())?;
    runtime.start().await.map_err(|e| e.to_string())?;
    let (host, port) = (config.network.host.clone(), config.network.port);
    let broker = MessageBroker::with_config(config);
    broker.use_runtime(runtime.handle());
    broker.start().await.map_err(|e| e.to_string())?;

    // The listener is bound on a worker, so that its readiness is noticed
    // there; accepting is control work and runs at Critical.
    let (bound_tx, bound) = tokio::sync::oneshot::channel();
    let serving = {
        let broker = broker.clone();
        runtime
            .spawn_with_priority(TaskPriority::Critical, async move {
                let server = match Server::bind(&broker).await {
                    Ok(server) => server,
                    Err(err) => {
                        let _ = bound_tx.send(Err(err));
                        return Ok(());
                    }
                };
                let _ = bound_tx.send(server.local_addr());
                server.run().await
            })
            .await
            .map_err(|e| e.to_string())?
    };
    let addr = match bound.await {
        Ok(Ok(addr)) => addr,
        Ok(Err(err)) => return Err(format!("cannot listen on {host}:{port}: {err}")),
        Err(_) => return Err("the listener task ended before binding".into()),
    };
    println!("kaelix-broker listening on {addr}");
    let housekeeping = runtime
        .spawn_with_priority(TaskPriority::Background, watch_health(runtime.health()))
        .await
        .map_err(|e| e.to_string())?;

    signals.wait().await;
    tracing::info!("signal received: draining connections and shutting down");
    broker.shutdown().await.map_err(|e| e.to_string())?;
    match serving.await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => return Err(format!("listener failed: {err}")),
        Err(err) => return Err(format!("listener task failed: {err}")),
    }
    housekeeping.abort();
    tracing::info!(stats = %broker.stats(), "stopped");
    runtime.shutdown().await.map_err(|e| e.to_string())?;
    Ok(())
}

/// Background housekeeping: logs each change of the runtime's health, with
/// its reason.
async fn watch_health(health: HealthMonitor) {
    let mut last = health.status();
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tick.tick().await;
        let report = health.report();
        if report.status == last {
            continue;
        }
        match report.status {
            HealthStatus::Healthy => {
                tracing::info!(reason = %report.reason, "runtime healthy again")
            }
            status => tracing::warn!(%status, reason = %report.reason, "runtime health changed"),
        }
        last = report.status;
    }
}

/// SIGTERM and SIGINT, both of which stop the broker gracefully.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Signals, String> {
        use tokio::signal::unix::{signal, SignalKind};
        let install = |kind| signal(kind).map_err(|e| format!("cannot handle signals: {e}"));
        Ok(Signals {
            term: install(SignalKind::terminate())?,
            int: install(SignalKind::interrupt())?,
        })
    }

    async fn wait(mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}
