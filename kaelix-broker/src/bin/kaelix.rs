//! `kaelix`: publish and subscribe from the command line.
//!
//! ```text
//! kaelix sub 'events.>'                 # one line per message: topic, then payload
//! kaelix pub events.user.signup alice   # exits once the broker acknowledged it
//! ```

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kaelix_consumer::Consumer;
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
    #[command(subcommand)]
    command: Command,
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
    },
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
    let server = server_addr(&args.server);
    let result = match args.command {
        Command::Pub { topic, text, count } => publish(&server, &topic, text, count).await,
        Command::Sub {
            pattern,
            queue,
            count,
        } => subscribe(&server, &pattern, queue.as_deref(), count).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("kaelix: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn publish(server: &str, topic: &str, text: String, count: u64) -> Result<(), String> {
    let publisher = Publisher::connect(server)
        .await
        .map_err(|e| format!("cannot connect to {server}: {e}"))?;
    let payload = bytes::Bytes::from(text);
    if count == 1 {
        publisher
            .publish(topic, payload)
            .await
            .map_err(|e| e.to_string())?;
    } else {
        for _ in 0..count {
            publisher
                .send(topic, payload.clone())
                .await
                .map_err(|e| e.to_string())?;
        }
        // A flush returns once the broker has handled every message, and
        // reports the first it refused.
        publisher.flush().await.map_err(|e| e.to_string())?;
    }
    publisher.close().await.map_err(|e| e.to_string())?;
    eprintln!("published {count} message(s) to {topic}");
    Ok(())
}

async fn subscribe(
    server: &str,
    pattern: &str,
    queue: Option<&str>,
    count: Option<u64>,
) -> Result<(), String> {
    let consumer = Consumer::connect(server)
        .await
        .map_err(|e| format!("cannot connect to {server}: {e}"))?;
    let mut subscription = match queue {
        Some(group) => consumer.subscribe_queue(pattern, group).await,
        None => consumer.subscribe(pattern).await,
    }
    .map_err(|e| e.to_string())?;
    eprintln!("subscribed to {pattern}");
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
