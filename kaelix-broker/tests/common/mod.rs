//! Helpers for black-box tests: the real `kaelix-broker` binary on an
//! ephemeral port, raw protocol clients, and polling with a deadline.

#![allow(dead_code)]

pub mod pki;
pub mod proxy;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use kaelix_core::protocol::{self, Frame, Hello};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A running `kaelix-broker` process, killed when dropped.
pub struct BrokerProcess {
    pub child: Child,
    pub addr: SocketAddr,
    /// Where it serves /metrics and /healthz, when it does.
    pub metrics: Option<SocketAddr>,
    /// Its log lines, when started with [`BrokerProcess::start_in`].
    pub log: Arc<Mutex<Vec<String>>>,
}

impl BrokerProcess {
    /// Starts the broker on 127.0.0.1 and a free port, with extra
    /// `KAELIX_*` variables, and waits for its "listening on" line.
    pub fn start(env: &[(&str, &str)]) -> BrokerProcess {
        let dir = std::env::temp_dir();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kaelix-broker"));
        cmd.current_dir(dir)
            .env("KAELIX_NETWORK_HOST", "127.0.0.1")
            .env("KAELIX_NETWORK_PORT", "0")
            .env("KAELIX_TELEMETRY_METRICS_PROMETHEUS_HOST", "127.0.0.1")
            .env("KAELIX_TELEMETRY_METRICS_PROMETHEUS_PORT", "0")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        Self::spawn(cmd, Arc::default())
    }

    /// Starts the broker on 127.0.0.1 and a free port with a `kaelix.toml`
    /// of `extra` (sections and keys after `[network]`) in a new directory,
    /// kept while the returned guard lives.
    pub fn with_config(extra: &str) -> (tempfile::TempDir, BrokerProcess) {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let broker = Self::with_config_in(dir.path(), extra);
        (dir, broker)
    }

    /// Like [`with_config`](Self::with_config), in `dir` (which may hold
    /// files the configuration names).
    pub fn with_config_in(dir: &Path, extra: &str) -> BrokerProcess {
        let file = dir.join("kaelix.toml");
        let toml = format!("[network]\nhost = \"127.0.0.1\"\nport = 0\n\n{extra}\n");
        std::fs::write(&file, toml).expect("write kaelix.toml");
        let path = file.to_str().expect("a UTF-8 path");
        Self::start_in(dir, &["--config", path], &[])
    }

    /// Starts the broker in `dir` with `args` and `env` (no `RUST_LOG`:
    /// the configuration sets the level), keeping its log lines.
    pub fn start_in(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> BrokerProcess {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kaelix-broker"));
        cmd.current_dir(dir)
            .args(args)
            .env_remove("RUST_LOG")
            .env("KAELIX_TELEMETRY_METRICS_PROMETHEUS_HOST", "127.0.0.1")
            .env("KAELIX_TELEMETRY_METRICS_PROMETHEUS_PORT", "0")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let log: Arc<Mutex<Vec<String>>> = Arc::default();
        Self::spawn(cmd, log)
    }

    fn spawn(mut cmd: Command, log: Arc<Mutex<Vec<String>>>) -> BrokerProcess {
        let mut child = cmd.spawn().expect("start kaelix-broker");
        if let Some(stderr) = child.stderr.take() {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    eprintln!("broker: {line}");
                    log.lock().unwrap().push(line);
                }
            });
        }
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // Up to the "listening on" line, which comes last.
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut metrics = None;
        let addr = loop {
            let line = rx
                .recv_timeout(Duration::from_secs(20))
                .expect("the broker prints where it listens");
            let addr_after = |marker: &str| {
                line.split(marker)
                    .nth(1)
                    .and_then(|rest| rest.split_whitespace().next())
                    .map(|rest| rest.trim_end_matches("/metrics").to_string())
            };
            if let Some(addr) = addr_after("metrics on http://") {
                metrics = Some(addr.parse().expect("metrics address"));
            } else if let Some(addr) = addr_after("listening on ") {
                break addr.parse().expect("listen address");
            } else {
                panic!("unexpected line: {line:?}");
            }
        };
        // Keep draining so the broker never blocks on a full pipe.
        std::thread::spawn(move || for _ in rx {});
        BrokerProcess {
            child,
            addr,
            metrics,
            log,
        }
    }

    /// `GET path` on the metrics endpoint: the status code and the body.
    pub fn http_get(&self, path: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let addr = self.metrics.expect("the broker serves metrics");
        let mut stream = std::net::TcpStream::connect(addr).expect("connect to /metrics");
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("a status code");
        let body = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(body)
        } else {
            body.to_string()
        };
        (status, body)
    }

    /// Waits until a log line contains every one of `parts`; returns it.
    pub fn wait_for_log(&self, parts: &[&str], limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(line) = self
                .log
                .lock()
                .unwrap()
                .iter()
                .find(|l| parts.iter().all(|p| l.contains(p)))
            {
                return line.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {parts:?} within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// How many log lines contain `part`.
    pub fn log_count(&self, part: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(part))
            .count()
    }

    /// Sends `signal` (`-HUP`, `-TERM`).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(signal)
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        self.signal("-TERM");
    }

    /// Waits for the process to exit, up to `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` until it holds or `limit` passes.
pub async fn eventually(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The resident memory of process `pid`, in bytes.
pub fn rss_of(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS");
    kb * 1024
}

/// A client that speaks raw frames, for hostile-input tests.
pub struct RawClient {
    pub stream: TcpStream,
    buf: BytesMut,
}

impl RawClient {
    pub async fn connect(addr: &str) -> RawClient {
        RawClient {
            stream: TcpStream::connect(addr).await.expect("connect"),
            buf: BytesMut::new(),
        }
    }

    /// Connects with a small receive buffer, so that a client that does
    /// not read falls behind quickly, and completes the handshake.
    pub async fn handshake_small(addr: &str) -> RawClient {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
        let stream = socket
            .connect(addr.parse().expect("an address"))
            .await
            .expect("connect");
        Self::hello(RawClient {
            stream,
            buf: BytesMut::new(),
        })
        .await
    }

    /// Connects and completes the handshake.
    pub async fn handshake(addr: &str) -> RawClient {
        Self::hello(Self::connect(addr).await).await
    }

    async fn hello(mut client: RawClient) -> RawClient {
        client
            .send(&Frame::Hello(Hello {
                min_version: 1,
                max_version: 1,
                client_name: "raw-test".into(),
                properties: vec![],
            }))
            .await;
        match client.next().await {
            Some(Frame::Welcome(_)) => client,
            other => panic!("expected WELCOME, got {other:?}"),
        }
    }

    pub async fn send(&mut self, frame: &Frame) {
        self.send_bytes(&frame.to_bytes()).await;
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// Whether no frame arrives within `wait`.
    pub async fn quiet_for(&mut self, wait: Duration) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        match tokio::time::timeout(wait, self.stream.read_buf(&mut self.buf)).await {
            Err(_) => true,
            Ok(_) => self.buf.is_empty(),
        }
    }

    /// The next frame, or `None` at end of stream. Panics after 10 s.
    pub async fn next(&mut self) -> Option<Frame> {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some(frame) =
                    protocol::decode(&mut self.buf, 64 << 20).expect("valid frames from the broker")
                {
                    return Some(frame);
                }
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
        .expect("the broker answers within 10 s")
    }
}

/// The body of a chunked HTTP response.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).expect("a chunk size");
        if size == 0 {
            break;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
    out
}
