//! Memory scenarios: broker RSS growth per subscription (one topic each) and
//! per idle connection. Both use raw protocol connections, so the client
//! side costs the same for every target.

use std::time::Duration;

use bytes::BytesMut;
use futures_util::StreamExt;
use kaelix_core::protocol::{self, Frame, Hello, Subscribe};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::driver::nats::NatsConn;
use crate::driver::relay::RelayConn;
use crate::driver::Endpoint;
use crate::error::{protocol as proto_err, BenchError, Result};
use crate::payload::now_ns;
use crate::procfs;
use crate::results::RunResult;

fn need_pid(pid: Option<u32>) -> Result<u32> {
    pid.ok_or_else(|| BenchError::Usage("memory scenarios need the broker's --pid".into()))
}

/// Settles the allocator and the broker's background work before a reading.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(300)).await;
}

/// K subscriptions, each on its own topic, over one connection.
pub async fn topics(endpoint: &Endpoint, count: u64, pid: Option<u32>) -> Result<RunResult> {
    let pid = need_pid(pid)?;
    let (before, register_s, after) = match endpoint {
        Endpoint::Kaelix(addr) => {
            let mut stream = kaelix_handshake(addr).await?;
            settle().await;
            let before = procfs::rss_bytes(pid);
            let start = now_ns();
            let (mut rd, mut wr) = stream.split();
            let write = async {
                let mut buf = BytesMut::with_capacity(128 * 1024);
                for i in 0..count {
                    Frame::Subscribe(Subscribe {
                        sid: i as u32 + 1,
                        pattern: format!("bench.t.{i}").into(),
                        group: None,
                        start: kaelix_core::StartPosition::Latest,
                        policy: None,
                        ..Default::default()
                    })
                    .encode(&mut buf);
                    if buf.len() >= 64 * 1024 {
                        wr.write_all(&buf).await?;
                        buf.clear();
                    }
                }
                wr.write_all(&buf).await?;
                Ok::<_, BenchError>(())
            };
            let read = async {
                let mut buf = BytesMut::with_capacity(256 * 1024);
                let mut acked = 0;
                while acked < count {
                    buf.reserve(64 * 1024);
                    if rd.read_buf(&mut buf).await? == 0 {
                        return Err(proto_err("kaelix", "the broker closed the connection"));
                    }
                    while let Some(frame) = protocol::decode(&mut buf, 1 << 20)
                        .map_err(|e| proto_err("kaelix", e.to_string()))?
                    {
                        match frame {
                            Frame::SubAck(_) => acked += 1,
                            other => return Err(proto_err("kaelix", format!("{other:?}"))),
                        }
                    }
                }
                Ok(())
            };
            tokio::try_join!(write, read)?;
            let register_s = (now_ns() - start) as f64 / 1e9;
            settle().await;
            let after = procfs::rss_bytes(pid);
            drop(stream);
            (before, register_s, after)
        }
        Endpoint::Nats(addr) => {
            let mut conn = NatsConn::connect(addr).await?;
            settle().await;
            let before = procfs::rss_bytes(pid);
            let start = now_ns();
            for i in 0..count {
                conn.subscribe(&format!("bench.t.{i}"), None, i + 1).await?;
                if i % 2048 == 2047 {
                    conn.push().await?;
                }
            }
            conn.flush().await?;
            let register_s = (now_ns() - start) as f64 / 1e9;
            settle().await;
            let after = procfs::rss_bytes(pid);
            drop(conn);
            (before, register_s, after)
        }
        Endpoint::Relay(_) => return Err(BenchError::Usage("the relay has no topics".into())),
    };
    Ok(memory_result(
        "topics", count, before, after, register_s, pid,
    ))
}

/// C idle connections, each through its handshake.
pub async fn connections(endpoint: &Endpoint, count: u64, pid: Option<u32>) -> Result<RunResult> {
    let pid = need_pid(pid)?;
    settle().await;
    let before = procfs::rss_bytes(pid);
    let start = now_ns();
    // Held only to stay open.
    type Held = Box<dyn std::any::Any + Send>;
    let held: Vec<Held> = futures_util::stream::iter(0..count)
        .map(|_| async {
            Ok::<Held, BenchError>(match endpoint {
                Endpoint::Kaelix(addr) => Box::new(kaelix_handshake(addr).await?),
                Endpoint::Nats(addr) => Box::new(NatsConn::connect(addr).await?),
                Endpoint::Relay(addr) => Box::new(RelayConn::subscriber(addr).await?),
            })
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_>>()?;
    let register_s = (now_ns() - start) as f64 / 1e9;
    settle().await;
    let after = procfs::rss_bytes(pid);
    let n = held.len() as u64;
    drop(held);
    Ok(memory_result(
        "connections",
        n,
        before,
        after,
        register_s,
        pid,
    ))
}

fn memory_result(
    scenario: &str,
    count: u64,
    before: Option<u64>,
    after: Option<u64>,
    register_s: f64,
    pid: u32,
) -> RunResult {
    RunResult {
        scenario: scenario.into(),
        count: Some(count),
        bytes_per_item: match (before, after) {
            (Some(b), Some(a)) if count > 0 => Some(a.saturating_sub(b) as f64 / count as f64),
            _ => None,
        },
        register_s: Some(register_s),
        broker_rss_bytes: procfs::rss_bytes(pid).or(after),
        ..Default::default()
    }
}

async fn kaelix_handshake(addr: &str) -> Result<TcpStream> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let hello = Frame::Hello(Hello {
        min_version: protocol::MIN_PROTOCOL_VERSION,
        max_version: protocol::PROTOCOL_VERSION,
        client_name: "kaelix-bench".into(),
        properties: Vec::new(),
    });
    stream.write_all(&hello.to_bytes()).await?;
    let mut buf = BytesMut::with_capacity(256);
    loop {
        if let Some(frame) =
            protocol::decode(&mut buf, 1 << 20).map_err(|e| proto_err("kaelix", e.to_string()))?
        {
            return match frame {
                Frame::Welcome(_) => Ok(stream),
                other => Err(proto_err(
                    "kaelix",
                    format!("expected WELCOME, got {other:?}"),
                )),
            };
        }
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(proto_err("kaelix", "closed during the handshake"));
        }
    }
}
