//! The floor: a raw TCP relay that forwards length-prefixed frames from
//! publisher connections to every subscriber connection, one write per read
//! chunk. No topics, no acknowledgements — the least one hop through a
//! process can cost.
//!
//! A client's first byte says its role: `P` (publisher) or `S` (subscriber;
//! the relay answers `K` once it is registered). Frames are `u32` length
//! (big-endian) and payload.

use std::sync::Arc;

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

use crate::error::{protocol, Result};

type Subscribers = Arc<Registry>;

/// Subscriber write halves, each behind its own async mutex so that
/// publishers write whole chunks without interleaving.
#[derive(Default)]
struct Registry(std::sync::Mutex<Vec<Arc<Mutex<OwnedWriteHalf>>>>);

impl Registry {
    fn add(&self, w: OwnedWriteHalf) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::new(Mutex::new(w)));
    }

    fn snapshot(&self) -> Vec<Arc<Mutex<OwnedWriteHalf>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Serves the relay on `listener` until the process ends.
pub async fn serve(listener: TcpListener) -> Result<()> {
    let subscribers: Subscribers = Arc::default();
    loop {
        let (mut stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let subscribers = subscribers.clone();
        tokio::spawn(async move {
            let mut role = [0u8];
            if stream.read_exact(&mut role).await.is_err() {
                return;
            }
            let (mut rd, mut wr) = stream.into_split();
            match role[0] {
                b'S' => {
                    if wr.write_all(b"K").await.is_ok() {
                        subscribers.add(wr);
                    }
                    // Hold the read half until the subscriber leaves.
                    let mut sink = [0u8; 64];
                    while matches!(rd.read(&mut sink).await, Ok(n) if n > 0) {}
                }
                b'P' => {
                    let _ = pump(&mut rd, &subscribers).await;
                }
                _ => {}
            }
        });
    }
}

async fn pump(rd: &mut tokio::net::tcp::OwnedReadHalf, subscribers: &Subscribers) -> Result<()> {
    let mut buf = BytesMut::with_capacity(256 * 1024);
    loop {
        buf.reserve(64 * 1024);
        if rd.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
        let whole = complete_frames(&buf);
        if whole == 0 {
            continue;
        }
        let chunk = buf.split_to(whole);
        for sub in subscribers.snapshot() {
            sub.lock().await.write_all(&chunk).await?;
        }
    }
}

/// Bytes at the front of `buf` that are whole frames.
pub fn complete_frames(buf: &[u8]) -> usize {
    let mut at = 0;
    while let Some(prefix) = buf.get(at..at + 4) {
        let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
        if buf.len() < at + 4 + len {
            break;
        }
        at += 4 + len;
    }
    at
}

/// A relay client, publisher or subscriber.
pub struct RelayConn {
    stream: TcpStream,
    rbuf: BytesMut,
    wbuf: BytesMut,
}

impl RelayConn {
    pub async fn publisher(addr: &str) -> Result<RelayConn> {
        let mut stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        stream.write_all(b"P").await?;
        Ok(RelayConn {
            stream,
            rbuf: BytesMut::new(),
            wbuf: BytesMut::with_capacity(128 * 1024),
        })
    }

    pub async fn subscriber(addr: &str) -> Result<RelayConn> {
        let mut stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        stream.write_all(b"S").await?;
        let mut ok = [0u8];
        stream.read_exact(&mut ok).await?;
        if ok != *b"K" {
            return Err(protocol(
                "relay",
                "the relay did not confirm the subscriber",
            ));
        }
        Ok(RelayConn {
            stream,
            rbuf: BytesMut::with_capacity(256 * 1024),
            wbuf: BytesMut::new(),
        })
    }

    pub async fn publish(&mut self, payload: &[u8]) -> Result<()> {
        self.wbuf.put_u32(payload.len() as u32);
        self.wbuf.put_slice(payload);
        if self.wbuf.len() >= 64 * 1024 {
            self.push().await?;
        }
        Ok(())
    }

    pub async fn push(&mut self) -> Result<()> {
        if !self.wbuf.is_empty() {
            self.stream.write_all(&self.wbuf).await?;
            self.wbuf.clear();
        }
        Ok(())
    }

    /// Reads until at least one whole frame is in, and hands `f` every
    /// whole one: a read can end inside a frame.
    pub async fn recv_batch(&mut self, f: &mut (dyn FnMut(&[u8]) + Send)) -> Result<usize> {
        let mut n = 0;
        while n == 0 {
            self.rbuf.reserve(64 * 1024);
            if self.stream.read_buf(&mut self.rbuf).await? == 0 {
                return Err(protocol("relay", "the relay closed the connection"));
            }
            n = self.take_frames(f);
        }
        Ok(n)
    }

    /// Hands `f` each whole frame at the front of the buffer.
    fn take_frames(&mut self, f: &mut (dyn FnMut(&[u8]) + Send)) -> usize {
        let mut n = 0;
        while let Some(prefix) = self.rbuf.get(..4) {
            let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
            if self.rbuf.len() < 4 + len {
                break;
            }
            f(&self.rbuf[4..4 + len]);
            self.rbuf.advance(4 + len);
            n += 1;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_whole_frames() {
        let mut buf = Vec::new();
        for len in [3u32, 0, 5] {
            buf.extend_from_slice(&len.to_be_bytes());
            buf.extend(std::iter::repeat_n(1u8, len as usize));
        }
        assert_eq!(complete_frames(&buf), buf.len());
        assert_eq!(complete_frames(&buf[..buf.len() - 1]), 7 + 4);
        assert_eq!(complete_frames(&buf[..2]), 0);
    }

    #[tokio::test]
    async fn relays_frames_to_subscribers() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(serve(listener));
        let mut sub = RelayConn::subscriber(&addr).await.unwrap();
        let mut publisher = RelayConn::publisher(&addr).await.unwrap();
        for i in 0u8..10 {
            publisher.publish(&[i; 20]).await.unwrap();
        }
        publisher.push().await.unwrap();
        let mut got = Vec::new();
        while got.len() < 10 {
            sub.recv_batch(&mut |p| got.push(p[0])).await.unwrap();
        }
        assert_eq!(got, (0..10).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_frame_cut_across_reads_is_waited_for_not_counted_as_none() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let relay = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut role = [0u8];
            s.read_exact(&mut role).await.unwrap();
            s.write_all(b"K").await.unwrap();
            let mut frame = 5u32.to_be_bytes().to_vec();
            frame.extend_from_slice(b"hello");
            s.write_all(&frame[..6]).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            s.write_all(&frame[6..]).await.unwrap();
            s
        });
        let mut sub = RelayConn::subscriber(&addr).await.unwrap();
        let mut got = Vec::new();
        let n = sub.recv_batch(&mut |p| got.push(p.to_vec())).await.unwrap();
        assert_eq!(n, 1);
        assert_eq!(got, vec![b"hello".to_vec()]);
        drop(relay.await.unwrap());
    }
}
