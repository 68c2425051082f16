//! `kaelix-broker`: runs the Kaelix broker.
//!
//! Configuration: built-in defaults, then `--config PATH` (or `./kaelix.toml`
//! if present), then `KAELIX_*` environment variables. Prints one line with
//! the address it listens on; SIGINT or SIGTERM stops it gracefully.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use kaelix_broker::{MessageBroker, Server};
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
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all().thread_name("kaelix-worker");
    if let Some(threads) = config.runtime.worker_threads {
        runtime.worker_threads(threads.max(1));
    }
    let runtime = match runtime.build() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("kaelix-broker: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
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
    let (host, port) = (config.network.host.clone(), config.network.port);
    let broker = MessageBroker::with_config(config);
    broker.start().await.map_err(|e| e.to_string())?;
    let server = Server::bind(&broker)
        .await
        .map_err(|e| format!("cannot listen on {host}:{port}: {e}"))?;
    let addr = server.local_addr().map_err(|e| e.to_string())?;
    println!("kaelix-broker listening on {addr}");
    let serving = tokio::spawn(server.run());

    signals.wait().await;
    tracing::info!("signal received: draining connections and shutting down");
    broker.shutdown().await.map_err(|e| e.to_string())?;
    match serving.await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => return Err(format!("listener failed: {err}")),
        Err(err) => return Err(format!("listener task failed: {err}")),
    }
    tracing::info!(stats = %broker.stats(), "stopped");
    Ok(())
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
