//! `kaelix-broker`: runs the Kaelix broker.
//!
//! Configuration: built-in defaults, then `--config PATH` (or `./kaelix.toml`
//! if present), then `KAELIX_*` environment variables, then `--set KEY=VALUE`,
//! `--host` and `--port`. Prints one line with
//! the address it listens on; SIGINT or SIGTERM stops it gracefully: it
//! drains first (no new connections, clients told to move on), then
//! flushes and exits. `kaelix-broker --drain PID` does that to a running
//! broker and waits for it.
//!
//! The configuration file is watched: edits apply live where they can
//! (`MessageBroker::reconfigure`), SIGHUP reloads it on demand, and an edit
//! that does not load is refused with the running configuration kept.
//!
//! The broker runs on an `OptimizedRuntime` configured by `[runtime]`:
//! connections at High priority, the listener at Critical, health
//! housekeeping at Background.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use kaelix_broker::{MessageBroker, Server};
use kaelix_core::config::LogFormat;
use kaelix_core::config::{config_file, load_annotated, HotReloadSettings, Loaded, Override};
use kaelix_core::runtime::{HealthMonitor, HealthStatus, OptimizedRuntime, TaskPriority};
use kaelix_core::MemoryStreamerConfig;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

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
    /// Set any key, above the file and the environment: `--set
    /// limits.max_frame_bytes=65536` (repeatable).
    #[arg(long = "set", short = 's', value_name = "KEY=VALUE", value_parser = Override::parse_set)]
    set: Vec<Override>,
    /// Address to listen on (network.host).
    #[arg(long, value_name = "HOST")]
    host: Option<String>,
    /// Port to listen on (network.port; 0 picks a free one).
    #[arg(long, value_name = "PORT")]
    port: Option<String>,
    /// Validate the configuration, print it as TOML with where each value
    /// came from, and exit (0 when valid).
    #[arg(long)]
    check_config: bool,
    /// Print the commented default configuration file and exit.
    #[arg(long, conflicts_with = "check_config")]
    print_default_config: bool,
    /// Do not watch the configuration file; reload it only on SIGHUP.
    #[arg(long)]
    no_watch: bool,
    /// Tell the broker running as process PID to drain and stop (as
    /// SIGTERM does), wait until it has exited, and exit 0 (1 if it still
    /// runs after WAIT_SECS, 30 by default).
    #[arg(long, value_name = "PID", conflicts_with_all = ["check_config", "print_default_config"])]
    drain: Option<i32>,
    /// With --drain: how long to wait for the broker to exit.
    #[arg(
        long,
        value_name = "WAIT_SECS",
        default_value_t = 30,
        requires = "drain"
    )]
    drain_wait: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.print_default_config {
        print!("{}", kaelix_core::config::DEFAULT_CONFIG_TOML);
        return ExitCode::SUCCESS;
    }
    if let Some(pid) = args.drain {
        return drain(pid, std::time::Duration::from_secs(args.drain_wait));
    }
    let loaded = load(&args);
    if args.check_config {
        return check_config(loaded);
    }
    let config = match loaded {
        Ok(loaded) => loaded.config,
        Err(err) => {
            eprintln!("kaelix-broker: {err}");
            return ExitCode::from(2);
        }
    };
    // Reloads read the same file under the same variables and flags.
    let reload = match config_file(args.config.as_deref()) {
        Ok(Some(file)) => Some(Reload {
            file,
            settings: HotReloadSettings {
                watch: !args.no_watch,
                overrides: flags(&args),
                ..HotReloadSettings::default()
            },
        }),
        _ => None,
    };
    let logging = init_logging(&config);
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
    match main.block_on(run(config, reload, logging)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("kaelix-broker: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Where reloads come from.
struct Reload {
    file: PathBuf,
    settings: HotReloadSettings,
}

/// Defaults, the file, `KAELIX_*`, then the command-line flags.
fn load(args: &Args) -> Result<Loaded, kaelix_core::config::ConfigError> {
    let file = config_file(args.config.as_deref())?;
    load_annotated(file.as_deref(), std::env::vars(), &flags(args))
}

/// The command-line flags that set configuration keys.
fn flags(args: &Args) -> Vec<Override> {
    let mut flags = Vec::new();
    let mut named = |key: &str, flag: &str, value: &Option<String>| {
        if let Some(value) = value {
            flags.push(Override {
                key: key.into(),
                value: value.clone(),
                flag: flag.into(),
            });
        }
    };
    named("network.host", "--host", &args.host);
    named("network.port", "--port", &args.port);
    flags.extend(args.set.iter().cloned());
    flags
}

/// Where the other nodes' clients reach this broker: the client listener's
/// address, or, when it listens on every interface, the host the cluster
/// advertises with the client port.
fn advertised_client_addr(
    bound: std::net::SocketAddr,
    cluster: &kaelix_core::config::ClusterConfig,
) -> String {
    if !bound.ip().is_unspecified() {
        return bound.to_string();
    }
    let cluster_addr = if cluster.advertise.is_empty() {
        &cluster.listen
    } else {
        &cluster.advertise
    };
    match cluster_addr.rsplit_once(':') {
        Some((host, _)) => format!("{host}:{}", bound.port()),
        None => bound.to_string(),
    }
}

/// `--check-config`: every problem, or the effective configuration with
/// the origin of each value and any warnings for this machine.
/// `--drain PID`: SIGTERM to the broker (it drains, then stops), then waits
/// for the process to be gone.
fn drain(pid: i32, wait: std::time::Duration) -> ExitCode {
    if pid <= 0 {
        eprintln!("kaelix-broker: --drain needs the broker's process id, not {pid}");
        return ExitCode::from(2);
    }
    // SAFETY: kill(2) with a positive pid only sends a signal.
    if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
        let err = std::io::Error::last_os_error();
        eprintln!("kaelix-broker: cannot signal process {pid}: {err}");
        return ExitCode::from(2);
    }
    println!("kaelix-broker: told process {pid} to drain; waiting for it to stop");
    let deadline = std::time::Instant::now() + wait;
    // SAFETY: signal 0 only checks that the process exists.
    while unsafe { libc::kill(pid, 0) } == 0 {
        if std::time::Instant::now() > deadline {
            eprintln!("kaelix-broker: process {pid} still runs after {wait:?}");
            return ExitCode::from(1);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    println!("kaelix-broker: process {pid} stopped");
    ExitCode::SUCCESS
}

fn check_config(loaded: Result<Loaded, kaelix_core::config::ConfigError>) -> ExitCode {
    use kaelix_core::config::ConfigValidator;
    let loaded = match loaded {
        Ok(loaded) => loaded,
        Err(err) => {
            eprintln!("kaelix-broker: {err}");
            return ExitCode::from(2);
        }
    };
    let origins: std::collections::HashMap<&str, &str> = loaded
        .origins
        .iter()
        .map(|(k, o)| (k.as_str(), o.as_str()))
        .collect();
    // Tokens are secrets: say one is set, not what it is.
    let mut shown = loaded.config.clone();
    for user in &mut shown.security.auth.users {
        if !user.token.is_empty() {
            user.token = "<set, not shown>".into();
        }
    }
    let text = match toml::to_string(&shown) {
        Ok(text) => text,
        Err(err) => {
            eprintln!("kaelix-broker: cannot print the configuration: {err}");
            return ExitCode::FAILURE;
        }
    };
    // Annotate each `key = value` line with its origin.
    let mut section = String::new();
    for line in text.lines() {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            // `[[topics]]` entries come from wherever the list came from.
            section = name.trim_matches(|c| c == '[' || c == ']').to_string();
            println!("{line}");
        } else if let Some((key, _)) = line.split_once(" = ") {
            let path = if section.is_empty() {
                key.to_string()
            } else {
                format!("{section}.{key}")
            };
            let from = origins
                .get(path.as_str())
                .or_else(|| origins.get(section.as_str()))
                .copied()
                .unwrap_or("default");
            println!("{line}  # {from}");
        } else {
            println!("{line}");
        }
    }
    match ConfigValidator::new().validate_environment_compatibility(&loaded.config) {
        Ok(warnings) => {
            for warning in warnings {
                eprintln!("warning: {warning}");
            }
        }
        Err(err) => {
            eprintln!("kaelix-broker: {err}");
            return ExitCode::from(2);
        }
    }
    if let Err(err) = kaelix_broker::plugins::check(&loaded.config) {
        eprintln!("kaelix-broker: {err}");
        return ExitCode::from(2);
    }
    eprintln!("configuration is valid");
    ExitCode::SUCCESS
}

/// The log filter, replaceable while running. `RUST_LOG`, when set, wins
/// over `telemetry.logging.level` at start and on reload.
struct Logging {
    filter: reload::Handle<EnvFilter, Registry>,
    from_env: bool,
}

impl Logging {
    /// The live applier of `telemetry.logging`.
    fn apply(&self, config: &MemoryStreamerConfig) -> Result<(), String> {
        if self.from_env {
            tracing::info!("RUST_LOG is set and takes precedence over telemetry.logging.level");
            return Ok(());
        }
        let level = &config.telemetry.logging.level;
        let filter = EnvFilter::try_new(quiet_raft(level))
            .map_err(|e| format!("{level:?} is not a log filter: {e}"))?;
        self.filter.reload(filter).map_err(|e| e.to_string())
    }
}

/// `level`, with the Raft library's own lines off unless it names them:
/// it logs every unanswered call to a node that is down, several a second.
/// The cluster layer logs each member going down and coming back, once.
fn quiet_raft(level: &str) -> String {
    if level.contains("openraft") {
        level.to_string()
    } else {
        format!("{level},openraft=off")
    }
}

fn init_logging(config: &MemoryStreamerConfig) -> Logging {
    let from_env = EnvFilter::try_from_default_env();
    let from_env_ok = from_env.is_ok();
    let filter = from_env
        .or_else(|_| EnvFilter::try_new(quiet_raft(&config.telemetry.logging.level)))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let json = config.telemetry.logging.format == LogFormat::Json;
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::registry()
        .with(filter)
        .with((!json).then(|| {
            tracing_subscriber::fmt::layer()
                .with_ansi(ansi)
                .with_writer(std::io::stderr)
        }))
        .with(json.then(|| {
            tracing_subscriber::fmt::layer()
                .json()
                .with_writer(std::io::stderr)
        }))
        .init();
    Logging {
        filter: handle,
        from_env: from_env_ok,
    }
}

async fn run(
    config: MemoryStreamerConfig,
    reload: Option<Reload>,
    logging: Logging,
) -> Result<(), String> {
    // Handlers first: a supervisor may signal as soon as it reads the
    // listening line.
    let mut signals = Signals::install()?;
    let runtime = OptimizedRuntime::new(config.runtime.clone()).map_err(|e| e.to_string())?;
    runtime.start().await.map_err(|e| e.to_string())?;
    let (host, port) = (config.network.host.clone(), config.network.port);
    let broker = MessageBroker::with_config(config.clone());
    broker.use_runtime(runtime.handle());
    broker.on_reconfigure("logging", &["telemetry.logging"], move |config| {
        logging.apply(config)
    });
    broker.start().await.map_err(|e| e.to_string())?;
    let reloader = match reload {
        Some(reload) => Some(
            broker
                .watch_config(&reload.file, reload.settings)
                .await
                .map_err(|e| e.to_string())?,
        ),
        None => None,
    };

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
        // An unusable TLS certificate: the error names the file and why.
        Ok(Err(err)) if err.kind() == std::io::ErrorKind::InvalidInput => {
            return Err(format!("{err}; refusing to serve plain TCP instead"))
        }
        Ok(Err(err)) => return Err(format!("cannot listen on {host}:{port}: {err}")),
        Err(_) => return Err("the listener task ended before binding".into()),
    };
    // The cluster node runs on this thread's runtime too: it is control
    // work, kept off the workers that move messages.
    if config.cluster.enabled {
        let client_addr = advertised_client_addr(addr, &config.cluster);
        broker
            .join_cluster(client_addr)
            .await
            .map_err(|e| e.to_string())?;
    }
    // Served from this thread's runtime, away from the workers.
    match broker.serve_metrics() {
        Ok(Some(metrics)) => println!("kaelix-broker metrics on http://{metrics}/metrics"),
        Ok(None) => {}
        Err(err) => {
            return Err(format!(
                "{err} (telemetry.metrics.prometheus: set another port, or enabled = false)"
            ))
        }
    }
    // The last line: supervisors and tests take it as "ready".
    let tls = &config.security.tls;
    let transport = match (tls.enabled, tls.client_ca_path.as_os_str().is_empty()) {
        (false, _) => "",
        (true, true) => " (TLS)",
        (true, false) => " (TLS, client certificates required)",
    };
    println!("kaelix-broker listening on {addr}{transport}");
    let housekeeping = runtime
        .spawn_with_priority(TaskPriority::Background, watch_health(runtime.health()))
        .await
        .map_err(|e| e.to_string())?;

    loop {
        match signals.next().await {
            Signal::Stop => break,
            Signal::Reload => match &reloader {
                Some(reloader) => {
                    tracing::info!(file = %reloader.path().display(), "SIGHUP: reloading the configuration");
                    // A refusal is logged by the manager; the broker carries on.
                    let _ = reloader.force_reload().await;
                }
                None => tracing::warn!(
                    "SIGHUP: no configuration file to reload (the broker runs on defaults, \
                     KAELIX_* variables and flags; start it with --config PATH)"
                ),
            },
        }
    }
    let drain = std::time::Duration::from_millis(broker.config().network.drain_timeout_ms);
    if !drain.is_zero() {
        tracing::info!("signal received: draining");
        broker.drain(drain).await;
    }
    tracing::info!("shutting down: flushing connections");
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

/// SIGTERM and SIGINT, both of which stop the broker gracefully, and
/// SIGHUP, which reloads the configuration.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

enum Signal {
    Stop,
    Reload,
}

impl Signals {
    fn install() -> Result<Signals, String> {
        use tokio::signal::unix::{signal, SignalKind};
        let install = |kind| signal(kind).map_err(|e| format!("cannot handle signals: {e}"));
        Ok(Signals {
            term: install(SignalKind::terminate())?,
            int: install(SignalKind::interrupt())?,
            hup: install(SignalKind::hangup())?,
        })
    }

    async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::Stop,
            _ = self.int.recv() => Signal::Stop,
            _ = self.hup.recv() => Signal::Reload,
        }
    }
}
